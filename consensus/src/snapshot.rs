//! Snapshots as files, streamed: built by scanning the state tree into a file, sent to a
//! follower in chunks by openraft, received into a file and loaded from it in bounded batches.
//! Nothing holds a whole snapshot in memory.
//!
//! Layout (format 1): `FHLSNAP\0`, format u16, meta (u32 length + bincode), then records
//! `u32 key length, key, u32 value length, value`, a key length of `u32::MAX` to end them, and
//! the SHA-256 of every preceding byte. The trailer lets a receiver refuse a damaged transfer
//! before it clears its state.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use openraft::SnapshotMeta;
use sha2::{Digest, Sha256};

use crate::{invalid_data, Node, NodeId};

const MAGIC: &[u8; 8] = b"FHLSNAP\0";
pub const FORMAT: u16 = 1;
const END: u32 = u32::MAX;
/// Largest key or value a snapshot may hold (a value is one resource version or less).
const MAX_ITEM: usize = 256 * 1024 * 1024;

pub type Meta = SnapshotMeta<NodeId, Node>;

/// The file a snapshot with this id is kept in.
pub fn file_name(meta: &Meta) -> String {
    let safe: String = meta.snapshot_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    format!("snap-{safe}.bin")
}

struct Hashing<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a snapshot: into a file ([`Writer::create`], the node's own) or onto a stream
/// ([`Writer::stream`], a backup on its way to a client).
pub struct Writer<W: Write = SyncedFile> {
    out: Hashing<BufWriter<W>>,
    /// (temporary name, final name) of a file.
    names: Option<(PathBuf, PathBuf)>,
}

/// Bytes a snapshot file takes between syncs while it is written. Made durable only at its
/// end, a file has all its pages dirty then, and on a journaling file system (ext4 in ordered
/// mode) the Raft log's next fsync waits for them: every write stalled for the whole flush
/// (about 250 ms at 100 Synthea patients, `tests/bench/snapshot.sh`). Synced as it goes, the
/// file never holds more than this unsynced; the build thread waits for those syncs, apply
/// does not.
const SYNC_EVERY: u64 = 8 << 20;

/// A snapshot file being written, synced every [`SYNC_EVERY`] bytes.
pub struct SyncedFile {
    file: File,
    unsynced: u64,
}

impl Write for SyncedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Bytes a stale snapshot file is shortened by per step of [`remove_gradually`].
const REMOVE_STEP: u64 = 32 << 20;

/// Deletes a file of any size without one large journal transaction: unlinking a file of
/// hundreds of MB frees (and on a `discard` mount trims) all its extents in the commit the
/// Raft log's next fsync waits for (130 ms measured beside the flush above). Shortened a
/// step at a time, each step synced, then unlinked.
pub fn remove_gradually(path: &Path) -> io::Result<()> {
    let file = fs::OpenOptions::new().write(true).open(path)?;
    let mut len = file.metadata()?.len();
    while len > REMOVE_STEP {
        len -= REMOVE_STEP;
        file.set_len(len)?;
        file.sync_data()?;
    }
    drop(file);
    fs::remove_file(path)
}

impl Writer<SyncedFile> {
    /// Starts `dir/<file_name(meta)>`, written under a temporary name until [`Writer::finish`].
    pub fn create(dir: &Path, meta: &Meta) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(file_name(meta));
        let tmp = path.with_extension("tmp");
        Self::begin(SyncedFile { file: File::create(&tmp)?, unsynced: 0 }, meta, Some((tmp, path)))
    }

    /// Seals the file, makes it durable and gives it its final name.
    pub fn finish(mut self) -> io::Result<PathBuf> {
        let names = self.names.take();
        let file = self.seal()?;
        file.file.sync_all()?;
        let (tmp, path) = names.ok_or_else(|| invalid_data("a snapshot file without a name"))?;
        fs::rename(&tmp, &path)?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        Ok(path)
    }
}

impl<W: Write> Writer<W> {
    /// A snapshot written onto `out` as it is built.
    pub fn stream(out: W, meta: &Meta) -> io::Result<Self> {
        Self::begin(out, meta, None)
    }

    fn begin(inner: W, meta: &Meta, names: Option<(PathBuf, PathBuf)>) -> io::Result<Self> {
        let mut out = Hashing { inner: BufWriter::with_capacity(1 << 20, inner), hasher: Sha256::new() };
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT.to_be_bytes())?;
        let meta = bincode::serialize(meta).map_err(|e| invalid_data(e.to_string()))?;
        out.write_all(&(meta.len() as u32).to_be_bytes())?;
        out.write_all(&meta)?;
        Ok(Self { out, names })
    }

    pub fn record(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        if key.len() > MAX_ITEM || value.len() > MAX_ITEM {
            return Err(invalid_data("state entry too large for a snapshot"));
        }
        self.out.write_all(&(key.len() as u32).to_be_bytes())?;
        self.out.write_all(key)?;
        self.out.write_all(&(value.len() as u32).to_be_bytes())?;
        self.out.write_all(value)
    }

    /// Ends the records and writes the trailer; hands back what it wrote to, flushed.
    pub fn seal(mut self) -> io::Result<W> {
        self.out.write_all(&END.to_be_bytes())?;
        let digest = self.out.hasher.finalize_reset();
        let mut inner = self.out.inner.into_inner().map_err(std::io::IntoInnerError::into_error)?;
        inner.write_all(&digest)?;
        inner.flush()?;
        Ok(inner)
    }
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads a snapshot's records in order; the last call checks the trailer.
pub struct Reader<R: Read> {
    input: HashingReader<BufReader<R>>,
    done: bool,
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_item(r: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let len = len as usize;
    if len > MAX_ITEM {
        return Err(invalid_data(format!("item of {len} bytes exceeds the snapshot limit")));
    }
    let mut v = vec![0u8; len];
    r.read_exact(&mut v)?;
    Ok(v)
}

impl<R: Read> Reader<R> {
    pub fn new(input: R) -> io::Result<(Self, Meta)> {
        let mut input = HashingReader { inner: BufReader::with_capacity(1 << 20, input), hasher: Sha256::new() };
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(invalid_data("not a fhir-ledger snapshot"));
        }
        let mut format = [0u8; 2];
        input.read_exact(&mut format)?;
        if u16::from_be_bytes(format) != FORMAT {
            return Err(invalid_data(format!("snapshot format {} is not {FORMAT}", u16::from_be_bytes(format))));
        }
        let len = read_u32(&mut input)?;
        let meta = bincode::deserialize(&read_item(&mut input, len)?).map_err(|e| invalid_data(e.to_string()))?;
        Ok((Self { input, done: false }, meta))
    }

    /// The next (key, value); None after the last one once the trailer checked out.
    pub fn next_record(&mut self) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.done {
            return Ok(None);
        }
        let klen = read_u32(&mut self.input)?;
        if klen == END {
            let expected = self.input.hasher.clone().finalize();
            let mut trailer = [0u8; 32];
            self.input.inner.read_exact(&mut trailer)?;
            if trailer[..] != expected[..] {
                return Err(invalid_data("snapshot checksum does not match its content"));
            }
            self.done = true;
            return Ok(None);
        }
        let key = read_item(&mut self.input, klen)?;
        let vlen = read_u32(&mut self.input)?;
        Ok(Some((key, read_item(&mut self.input, vlen)?)))
    }
}

/// Reads a whole snapshot file only to check it (format and trailer), in bounded memory.
pub fn check(path: &Path) -> io::Result<Meta> {
    let (mut r, meta) = Reader::new(File::open(path)?)?;
    while r.next_record()?.is_some() {}
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: &str) -> Meta {
        SnapshotMeta {
            last_log_id: None,
            last_membership: openraft::StoredMembership::default(),
            snapshot_id: id.into(),
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::create(dir.path(), &meta("7-1")).unwrap();
        w.record(b"a", b"one").unwrap();
        w.record(b"b", &vec![5u8; 100_000]).unwrap();
        // Past a sync of the file as it is written.
        let big = vec![9u8; 1 << 20];
        for i in 0..10u8 {
            w.record(&[b'c', i], &big).unwrap();
        }
        let path = w.finish().unwrap();
        assert_eq!(check(&path).unwrap().snapshot_id, "7-1");
        let (mut r, _) = Reader::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(r.next_record().unwrap().unwrap(), (b"a".to_vec(), b"one".to_vec()));
        assert_eq!(r.next_record().unwrap().unwrap().1.len(), 100_000);
        for i in 0..10u8 {
            assert_eq!(r.next_record().unwrap().unwrap(), (vec![b'c', i], big.clone()));
        }
        assert!(r.next_record().unwrap().is_none());
        let mut bytes = fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(check(&path).is_err(), "a flipped byte fails the trailer");
        bytes.truncate(mid);
        fs::write(&path, &bytes).unwrap();
        assert!(check(&path).is_err(), "a truncated transfer fails");
    }

    #[test]
    fn a_large_file_is_removed_a_step_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap-old.bin");
        let f = File::create(&path).unwrap();
        f.set_len(3 * REMOVE_STEP + 5).unwrap();
        drop(f);
        remove_gradually(&path).unwrap();
        assert!(!path.exists());
        assert!(remove_gradually(&path).is_err(), "a missing file is an error the caller sees");
    }
}
