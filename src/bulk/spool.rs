//! Export files (data and proof files) kept from the job that makes them for their digests
//! to their downloads, so that each is made once: decrypting every body and writing its line,
//! and every line's inclusion path, are most of an export's cost.
//!
//! No plaintext reaches the disk: a file is sealed in chunks (AES-256-GCM, a random 96-bit
//! nonce each, far below the 2^32 messages a key may seal so; AES instructions make it about
//! twice ChaCha20-Poly1305's speed here) under a key that lives only in this process's memory,
//! each chunk's AAD naming the job, the file, the chunk's place and whether it is the last, so
//! chunks cannot be swapped, dropped or cut off unnoticed. A restart forgets the key; the
//! spool is emptied at start and a download makes the file from the ledger again, as a node
//! that did not run the job always does (the bytes are the same: an export is the ledger at
//! one tree size). A job's files go when it is cancelled,
//! any job's once it has expired, and the oldest jobs' when the spool would outgrow its
//! share of the disk (`--export-spool-mb`).
//!
//! The spool bypasses the page cache (`O_DIRECT`, each chunk padded to whole blocks, from
//! and into buffers aligned to them): an export's hundreds of megabytes, read once, would
//! otherwise take as many page-cache pages, and push the ledger's own pages out. Pages the
//! machine has not used for a while cost most: the first export after a quiet spell spent a
//! third of its job copying its spool into them (`BENCHMARKS.md`). Where the file system
//! refuses direct I/O, the same files go through the page cache.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;

use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// Plaintext bytes sealed together: large enough that the tag and nonce cost nothing, small
/// enough to stream.
const CHUNK: usize = 1 << 20;

/// A chunk's head: its sealed length and whether it is the last.
const HEAD: usize = 5;

/// The AES-GCM tag that ends a sealed chunk.
const TAG: usize = 16;

/// The longest sealed chunk: nonce, a full chunk's ciphertext, tag.
const SEALED: usize = NONCE_LEN + CHUNK + TAG;

/// The block size direct I/O is aligned to (a multiple of every disk's logical block).
const ALIGN: usize = 4096;

/// A chunk's place in a file: its head and sealed bytes, zero-padded to whole blocks. Every
/// chunk but the last fills one exactly.
const SLOT: usize = (HEAD + SEALED).next_multiple_of(ALIGN);

/// A slot's worth of memory aligned for direct I/O: `bytes[start..start + SLOT]`.
struct Block {
    bytes: Vec<u8>,
    start: usize,
}

impl Block {
    fn new() -> Self {
        let bytes = vec![0u8; SLOT + ALIGN];
        // Never more than ALIGN - 1 for bytes; were it not aligned, direct I/O refuses the
        // write and the file is made again at its download.
        let start = bytes.as_ptr().align_offset(ALIGN).min(ALIGN);
        Self { bytes, start }
    }

    fn slot(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + SLOT]
    }
}

/// `path` opened by `options` for direct I/O, or through the page cache where the file
/// system refuses it.
fn open_direct(options: &mut OpenOptions, path: &Path) -> io::Result<File> {
    let direct = nix::fcntl::OFlag::O_DIRECT.bits();
    options.clone().custom_flags(direct).open(path).or_else(|_| options.open(path))
}

/// The spool directory of one server process.
pub struct Spool {
    dir: PathBuf,
    key: std::sync::Arc<LessSafeKey>,
    /// The most bytes kept: older jobs' files are removed to stay below it.
    limit: u64,
}

impl Spool {
    /// The spool under `dir`, emptied: what an earlier process left is sealed under a key
    /// that is gone.
    pub fn open(dir: &Path, limit: u64) -> io::Result<Self> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        let key = UnboundKey::new(&AES_256_GCM, &key).map_err(|_| io::Error::other("no AES-256-GCM key"))?;
        Ok(Self { dir: dir.to_path_buf(), key: std::sync::Arc::new(LessSafeKey::new(key)), limit })
    }

    fn job_dir(&self, job: &str) -> Option<PathBuf> {
        // Job ids are server-made UUIDs; anything else never names a path.
        job.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-').then(|| self.dir.join(job))
    }

    /// A writer for file `name` of `job`; the file is readable once [`SpoolWriter::finish`]ed.
    pub fn writer(&self, job: &str, name: &str) -> io::Result<SpoolWriter> {
        let dir = self.job_dir(job).ok_or_else(|| io::Error::other("not a job id"))?;
        if !dir.exists() {
            fs::create_dir_all(&dir)?;
            self.sweep(job); // once a job, when it starts to spool
        }
        let done = dir.join(file_name(name)?);
        let partial = dir.join(format!("{}.partial", file_name(name)?));
        let out = open_direct(OpenOptions::new().write(true).create(true).truncate(true), &partial)?;
        SpoolWriter::new(self.key.clone(), format!("{job}/{name}"), out, partial, done)
    }

    /// File `name` of `job`, if this process spooled it, taken out of the spool: it serves
    /// one download (the open file stays readable until that ends), and a later one makes
    /// the file again from the ledger: most exports are downloaded once, soon after the job.
    pub fn take(&self, job: &str, name: &str) -> Option<SpoolReader> {
        let path = self.job_dir(job)?.join(file_name(name).ok()?);
        let file = open_direct(OpenOptions::new().read(true), &path).ok()?;
        fs::remove_file(&path).ok()?;
        SpoolReader::new(self.key.clone(), format!("{job}/{name}"), file).ok()
    }

    /// Removes the files of `job`.
    pub fn remove(&self, job: &str) {
        if let Some(dir) = self.job_dir(job) {
            let _ = fs::remove_dir_all(dir);
        }
    }

    /// Removes the files of jobs other than `keep` that have expired, then the oldest until
    /// the spool is below its limit (a job starting to spool may take it past for a while).
    fn sweep(&self, keep: &str) {
        let Ok(entries) = fs::read_dir(&self.dir) else { return };
        let ttl = std::time::Duration::from_millis(super::EXPIRES_MS.unsigned_abs());
        let mut jobs = Vec::new();
        let mut total = 0u64;
        for e in entries.flatten() {
            let Ok(modified) = e.metadata().and_then(|m| m.modified()) else { continue };
            let bytes: u64 = fs::read_dir(e.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|f| f.metadata().ok())
                .map(|m| m.len())
                .sum();
            total += bytes;
            if e.file_name() != keep {
                jobs.push((modified, e.path(), bytes));
            }
        }
        jobs.sort();
        for (modified, path, bytes) in jobs {
            let expired = modified.elapsed().is_ok_and(|age| age > ttl);
            if expired || total > self.limit {
                let _ = fs::remove_dir_all(path);
                total = total.saturating_sub(bytes);
            }
        }
    }
}

/// A file name as it may lie in the spool (the job's own names: `Observation-1.ndjson`).
fn file_name(name: &str) -> io::Result<&str> {
    let ok = !name.is_empty() && !name.starts_with('.') && !name.contains(['/', '\\']);
    ok.then_some(name).ok_or_else(|| io::Error::other("not an export file name"))
}

/// The additional data of chunk `n`: the file, the chunk's place, and whether it ends the file.
fn chunk_aad(file: &str, n: u64, last: bool) -> Vec<u8> {
    format!("{file}#{n}{}", if last { "$" } else { "" }).into_bytes()
}

/// Seals a file's bytes chunk by chunk, each in its slot: `[u32 LE length][1 if last, else
/// 0][nonce, ciphertext, tag][zeros to the slot's end]` (the flag is authenticated through the
/// chunk's AAD). A thread of its own writes each sealed slot while the next is filled: a
/// direct write waits for the disk.
pub struct SpoolWriter {
    key: std::sync::Arc<LessSafeKey>,
    aad: String,
    /// The chunk being filled, after the places of its head and nonce.
    block: Block,
    /// The bytes of the slot taken so far (head and nonce places included), 0 before any.
    fill: usize,
    chunks: u64,
    /// Sealed slots (and the bytes of each to write) to the writing thread, which hands each
    /// block back once written, to be filled again.
    to_disk: Option<SyncSender<(Block, usize)>>,
    written: Receiver<Block>,
    disk: Option<JoinHandle<io::Result<()>>>,
    partial: PathBuf,
    done: PathBuf,
}

impl SpoolWriter {
    fn new(
        key: std::sync::Arc<LessSafeKey>,
        aad: String,
        mut out: File,
        partial: PathBuf,
        done: PathBuf,
    ) -> io::Result<Self> {
        let (to_disk, slots) = sync_channel::<(Block, usize)>(1);
        let (give_back, written) = sync_channel(2);
        let disk = std::thread::Builder::new().name("export spool".into()).spawn(move || {
            for (mut block, end) in slots {
                out.write_all(&block.slot()[..end])?;
                let _ = give_back.try_send(block);
            }
            Ok(())
        })?;
        let (to_disk, disk) = (Some(to_disk), Some(disk));
        Ok(Self { key, aad, block: Block::new(), fill: 0, chunks: 0, to_disk, written, disk, partial, done })
    }

    pub fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.fill = self.fill.max(HEAD + NONCE_LEN); // the head's and the nonce's places
            let take = (HEAD + NONCE_LEN + CHUNK - self.fill).min(bytes.len());
            let fill = self.fill;
            self.block.slot()[fill..fill + take].copy_from_slice(&bytes[..take]);
            self.fill += take;
            bytes = &bytes[take..];
            if self.fill == HEAD + NONCE_LEN + CHUNK {
                self.seal(false)?;
            }
        }
        Ok(())
    }

    /// Seals the buffered plaintext in place and hands the chunk's slot to the writing
    /// thread: `head || nonce || ciphertext || tag || zeros`.
    fn seal(&mut self, last: bool) -> io::Result<()> {
        let fill = self.fill.max(HEAD + NONCE_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = chunk_aad(&self.aad, self.chunks, last);
        let slot = self.block.slot();
        slot[HEAD..HEAD + NONCE_LEN].copy_from_slice(&nonce);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut slot[HEAD + NONCE_LEN..fill],
            )
            .map_err(|_| io::Error::other("a spool chunk could not be sealed"))?;
        slot[fill..fill + TAG].copy_from_slice(tag.as_ref());
        let len = u32::try_from(fill + TAG - HEAD).map_err(io::Error::other)?;
        slot[..4].copy_from_slice(&len.to_le_bytes());
        slot[4] = u8::from(last);
        let end = (fill + TAG).next_multiple_of(ALIGN);
        slot[fill + TAG..end].fill(0);
        let next = self.written.try_recv().unwrap_or_else(|_| Block::new());
        let sealed = std::mem::replace(&mut self.block, next);
        let sent = self.to_disk.as_ref().is_some_and(|d| d.send((sealed, end)).is_ok());
        if !sent {
            return Err(self.stop().err().unwrap_or_else(|| io::Error::other("the spool's writer stopped")));
        }
        self.fill = 0;
        self.chunks += 1;
        Ok(())
    }

    /// Waits for the writing thread to write what it was given: its error, if any.
    fn stop(&mut self) -> io::Result<()> {
        self.to_disk = None;
        let disk = self.disk.take().ok_or_else(|| io::Error::other("the spool's writer stopped"))?;
        disk.join().map_err(|_| io::Error::other("the spool's writer died"))?
    }

    /// Seals the last chunk (possibly empty) and makes the file readable once written.
    pub fn finish(mut self) -> io::Result<()> {
        self.seal(true)?;
        self.stop()?;
        fs::rename(&self.partial, &self.done)
    }
}

/// Slots a reader reads ahead of the one being opened and sent: direct reads wait for the
/// disk, and a download is a few files at a time.
const READ_AHEAD: usize = 3;

/// A spooled file's plaintext, a chunk at a time; an error if any chunk fails to open or the
/// file ends before its last chunk.
pub struct SpoolReader {
    key: std::sync::Arc<LessSafeKey>,
    aad: String,
    /// The file's slots and the bytes read of each, from a thread of its own that reads
    /// ahead while this one opens and sends.
    slots: Receiver<io::Result<(Block, usize)>>,
    /// Blocks sent and dropped, back to that thread to be read into again.
    free: SyncSender<Block>,
    chunks: u64,
    ended: bool,
}

/// A chunk's plaintext, opened where it was read; its block goes back to its file's reader
/// when dropped (once sent).
pub struct Plain {
    block: Option<Block>,
    range: std::ops::Range<usize>,
    free: SyncSender<Block>,
}

impl AsRef<[u8]> for Plain {
    fn as_ref(&self) -> &[u8] {
        self.block.as_ref().and_then(|b| b.bytes.get(self.range.clone())).unwrap_or_default()
    }
}

impl Drop for Plain {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            let _ = self.free.try_send(block); // or freed, once the reader is gone
        }
    }
}

impl SpoolReader {
    fn new(key: std::sync::Arc<LessSafeKey>, aad: String, mut input: File) -> io::Result<Self> {
        let (tx, slots) = sync_channel(READ_AHEAD - 1);
        let (free, freed) = sync_channel::<Block>(READ_AHEAD + 2);
        std::thread::Builder::new().name("export spool".into()).spawn(move || loop {
            let mut block = freed.try_recv().unwrap_or_else(|_| Block::new());
            let read = read_slot(&mut input, block.slot());
            let end = !matches!(read, Ok(SLOT));
            // A reader gone (the download ended or failed) ends this thread too.
            if tx.send(read.map(|got| (block, got))).is_err() || end {
                return;
            }
        })?;
        Ok(Self { key, aad, slots, free, chunks: 0, ended: false })
    }

    /// Reads and opens the next chunk: its plaintext, or None at the end of the file.
    pub fn next_chunk(&mut self) -> io::Result<Option<Plain>> {
        if self.ended {
            return Ok(None);
        }
        let cut = || io::Error::other("the spooled file is cut short");
        let (mut block, got) = self.slots.recv().map_err(|_| cut())??;
        let start = block.start;
        let slot = block.bytes.get_mut(start..start + got).ok_or_else(cut)?;
        let [a, b, c, d, last] = *slot.first_chunk::<HEAD>().ok_or_else(cut)?;
        let len = u32::from_le_bytes([a, b, c, d]) as usize;
        if len > SEALED {
            return Err(io::Error::other(format!("spooled chunk {} is longer than a chunk", self.chunks)));
        }
        let sealed = slot.get_mut(HEAD..HEAD + len).ok_or_else(cut)?;
        let n = self.chunks;
        let refused = || io::Error::other(format!("spooled chunk {n} does not authenticate"));
        let (nonce, sealed) = sealed.split_at_mut_checked(NONCE_LEN).ok_or_else(refused)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let aad = Aad::from(chunk_aad(&self.aad, n, last == 1));
        let plain_len = self.key.open_in_place(nonce, aad, sealed).map_err(|_| refused())?.len();
        self.ended = last == 1;
        self.chunks += 1;
        // Opened where it lies, after the head and the nonce.
        let plain = start + HEAD + NONCE_LEN;
        Ok(Some(Plain { block: Some(block), range: plain..plain + plain_len, free: self.free.clone() }))
    }
}

/// Reads the next slot into `slot`: its size, less at the end of the file. A read that ends
/// off a block boundary is the file's end (direct I/O reads no further from there).
fn read_slot(input: &mut File, slot: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < slot.len() {
        let n = input.read(&mut slot[got..])?;
        got += n;
        if n == 0 || got % ALIGN != 0 {
            break;
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spooled(spool: &Spool, job: &str, name: &str, bytes: &[u8]) {
        let mut w = spool.writer(job, name).expect("writer");
        for piece in bytes.chunks(300_001) {
            w.write(piece).expect("write");
        }
        w.finish().expect("finish");
    }

    fn read_all(spool: &Spool, job: &str, name: &str) -> io::Result<Vec<u8>> {
        let mut r = spool.take(job, name).ok_or_else(|| io::Error::other("absent"))?;
        let mut out = Vec::new();
        while let Some(plain) = r.next_chunk()? {
            out.extend_from_slice(plain.as_ref());
        }
        Ok(out)
    }

    /// Bytes come back as written, at and around chunk sizes; nothing in clear on disk; the
    /// file is whole blocks.
    #[test]
    fn a_spooled_file_reads_back_as_written_and_is_not_plaintext_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let bytes: Vec<u8> = (0..len).map(|i| b"{\"resourceType\":\"Patient\"}\n"[i % 27]).collect();
            spooled(&spool, "job-1", "Patient-1.ndjson", &bytes);
            let on_disk = fs::read(dir.path().join("spool/job-1/Patient-1.ndjson")).unwrap();
            let last = (HEAD + NONCE_LEN + len % CHUNK + TAG).next_multiple_of(ALIGN);
            assert_eq!(on_disk.len(), len / CHUNK * SLOT + last, "whole blocks, for direct I/O");
            assert!(len < 27 || !on_disk.windows(27).any(|w| w == b"{\"resourceType\":\"Patient\"}\n"));
            assert_eq!(read_all(&spool, "job-1", "Patient-1.ndjson").unwrap(), bytes, "{len} bytes");
            assert!(spool.take("job-1", "Patient-1.ndjson").is_none(), "a spooled file serves one download");
        }
        assert!(spool.take("job-1", "Observation-1.ndjson").is_none());
        assert!(spool.take("../etc", "passwd").is_none());
        spooled(&spool, "job-1", "Patient-1.ndjson", b"{}");
        spool.remove("job-1");
        assert!(spool.take("job-1", "Patient-1.ndjson").is_none());
    }

    /// A chunk handed to a response stays readable after its download stopped (the reader
    /// dropped, its thread gone): the response may still be writing it. A download that stops
    /// early leaves the rest unread and the file gone.
    #[test]
    fn a_sent_chunk_outlives_its_reader() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
        let bytes: Vec<u8> = (0..3 * CHUNK + 5).map(|i| (i % 251) as u8).collect();
        spooled(&spool, "j", "A-1.ndjson", &bytes);
        let mut reader = spool.take("j", "A-1.ndjson").expect("spooled");
        let first = reader.next_chunk().unwrap().expect("a first chunk");
        drop(reader);
        assert_eq!(first.as_ref(), &bytes[..CHUNK]);
        drop(first);
        assert!(spool.take("j", "A-1.ndjson").is_none(), "taken once, even if not read to its end");
    }

    /// A write the disk refuses (here: a file open for reading only) fails the writer, and
    /// the file never becomes readable: its download makes it again.
    #[test]
    fn a_refused_write_leaves_no_file_to_take() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
        let job = dir.path().join("spool/j");
        fs::create_dir_all(&job).unwrap();
        let partial = job.join("A-1.ndjson.partial");
        fs::write(&partial, b"").unwrap();
        let read_only = File::open(&partial).unwrap();
        let mut w =
            SpoolWriter::new(spool.key.clone(), "j/A-1.ndjson".into(), read_only, partial, job.join("A-1.ndjson"))
                .unwrap();
        let failed = w.write(&vec![1u8; 3 * CHUNK]).is_err() || w.finish().is_err();
        assert!(failed, "the writing thread's error reaches the writer");
        assert!(spool.take("j", "A-1.ndjson").is_none());
    }

    /// A new job pushes the oldest jobs' files out until the spool is below its limit.
    #[test]
    fn the_oldest_jobs_files_go_when_the_spool_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), 2 * CHUNK as u64).unwrap();
        let bytes = vec![1u8; CHUNK + 9];
        for job in ["j1", "j2"] {
            spooled(&spool, job, "A-1.ndjson", &bytes);
            std::thread::sleep(std::time::Duration::from_millis(20)); // distinct mtimes
        }
        spooled(&spool, "j3", "A-1.ndjson", &bytes);
        assert!(spool.take("j1", "A-1.ndjson").is_none(), "the oldest job went");
        assert!(spool.take("j2", "A-1.ndjson").is_some());
        assert_eq!(read_all(&spool, "j3", "A-1.ndjson").unwrap(), bytes);
    }

    /// A file cut at a chunk boundary, a chunk moved from another file, or a process restart
    /// (a new key) is an error, never other bytes.
    #[test]
    fn a_cut_swapped_or_foreign_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
        let bytes = vec![7u8; 2 * CHUNK + 5];
        spooled(&spool, "j", "A-1.ndjson", &bytes);
        spooled(&spool, "j", "B-1.ndjson", &bytes);
        let path = |n: &str| dir.path().join("spool/j").join(n);
        let whole = fs::read(path("A-1.ndjson")).unwrap();
        assert_eq!(whole.len(), 2 * SLOT + ALIGN, "two full slots, the last chunk's block");
        fs::write(path("A-1.ndjson"), &whole[..SLOT]).unwrap();
        assert!(read_all(&spool, "j", "A-1.ndjson").is_err(), "cut after its first chunk");
        fs::write(path("A-1.ndjson"), &whole[..SLOT + 5 + 100]).unwrap();
        let e = read_all(&spool, "j", "A-1.ndjson").unwrap_err();
        assert_eq!(e.to_string(), "the spooled file is cut short", "cut inside its second chunk");
        let mut long = whole.clone();
        long[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(path("A-1.ndjson"), &long).unwrap();
        let e = read_all(&spool, "j", "A-1.ndjson").unwrap_err();
        assert_eq!(e.to_string(), "spooled chunk 0 is longer than a chunk", "a length no chunk has");
        fs::copy(path("B-1.ndjson"), path("A-1.ndjson")).unwrap();
        assert!(read_all(&spool, "j", "A-1.ndjson").is_err(), "another file's chunks");
        let again = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
        assert!(again.take("j", "B-1.ndjson").is_none(), "a new process starts empty");
    }
}
