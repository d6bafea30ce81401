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

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

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
        let out = File::create(&partial)?;
        let aad = format!("{job}/{name}");
        let buf = Vec::with_capacity(HEAD + SEALED);
        Ok(SpoolWriter { key: self.key.clone(), aad, out, buf, chunks: 0, partial, done })
    }

    /// File `name` of `job`, if this process spooled it, taken out of the spool: it serves
    /// one download (the open file stays readable until that ends), and a later one makes
    /// the file again from the ledger. Most exports are downloaded once, soon after the job:
    /// their spooled bytes are then dropped before the kernel ever writes them to disk.
    pub fn take(&self, job: &str, name: &str) -> Option<SpoolReader> {
        let path = self.job_dir(job)?.join(file_name(name).ok()?);
        let file = File::open(&path).ok()?;
        fs::remove_file(&path).ok()?;
        Some(SpoolReader { key: self.key.clone(), aad: format!("{job}/{name}"), input: file, chunks: 0, ended: false })
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

/// Seals a file's bytes chunk by chunk: `[u32 LE length][1 if last, else 0][nonce, ciphertext,
/// tag]` each (the flag is authenticated through the chunk's AAD), a chunk a write.
pub struct SpoolWriter {
    key: std::sync::Arc<LessSafeKey>,
    aad: String,
    out: File,
    /// The chunk being filled, after the places of its head and nonce.
    buf: Vec<u8>,
    chunks: u64,
    partial: PathBuf,
    done: PathBuf,
}

impl SpoolWriter {
    pub fn write(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            if self.buf.is_empty() {
                self.buf.resize(HEAD + NONCE_LEN, 0); // the head's and the nonce's places
            }
            let take = (HEAD + NONCE_LEN + CHUNK - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == HEAD + NONCE_LEN + CHUNK {
                self.seal(false)?;
            }
        }
        Ok(())
    }

    /// Seals the buffered plaintext in place and writes the chunk: `head || nonce ||
    /// ciphertext || tag`.
    fn seal(&mut self, last: bool) -> io::Result<()> {
        if self.buf.is_empty() {
            self.buf.resize(HEAD + NONCE_LEN, 0);
        }
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        self.buf[HEAD..HEAD + NONCE_LEN].copy_from_slice(&nonce);
        let aad = chunk_aad(&self.aad, self.chunks, last);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut self.buf[HEAD + NONCE_LEN..],
            )
            .map_err(|_| io::Error::other("a spool chunk could not be sealed"))?;
        self.buf.extend_from_slice(tag.as_ref());
        let len = u32::try_from(self.buf.len() - HEAD).map_err(io::Error::other)?;
        self.buf[..4].copy_from_slice(&len.to_le_bytes());
        self.buf[4] = u8::from(last);
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        self.chunks += 1;
        Ok(())
    }

    /// Seals the last chunk (possibly empty) and makes the file readable.
    pub fn finish(mut self) -> io::Result<()> {
        self.seal(true)?;
        fs::rename(&self.partial, &self.done)
    }
}

/// A spooled file's plaintext, a chunk at a time; an error if any chunk fails to open or the
/// file ends before its last chunk.
pub struct SpoolReader {
    key: std::sync::Arc<LessSafeKey>,
    aad: String,
    input: File,
    chunks: u64,
    ended: bool,
}

impl SpoolReader {
    /// Reads and opens the next chunk in `buf` (cleared first): where its plaintext lies in
    /// `buf` (opened in place, not moved), or None at the end of the file.
    pub fn next_into(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<std::ops::Range<usize>>> {
        if self.ended {
            return Ok(None);
        }
        let mut frame = [0u8; HEAD];
        self.input.read_exact(&mut frame).map_err(|_| io::Error::other("the spooled file is cut short"))?;
        let [a, b, c, d, last] = frame;
        // Read from the file straight into the buffer's spare capacity: zeroing each chunk
        // before reading over it was a tenth of a download's CPU, and a buffered reader
        // copied every chunk once more (and took a fresh megabyte a file).
        let len = u64::from(u32::from_le_bytes([a, b, c, d]));
        if len > SEALED as u64 {
            return Err(io::Error::other(format!("spooled chunk {} is longer than a chunk", self.chunks)));
        }
        buf.clear();
        buf.reserve_exact(len as usize); // one read, no growing
        (&mut self.input).take(len).read_to_end(buf)?;
        if buf.len() as u64 != len {
            return Err(io::Error::other("the spooled file is cut short"));
        }
        let n = self.chunks;
        let refused = || io::Error::other(format!("spooled chunk {n} does not authenticate"));
        let (nonce, sealed) = buf.split_at_mut_checked(NONCE_LEN).ok_or_else(refused)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let aad = Aad::from(chunk_aad(&self.aad, n, last == 1));
        let plain_len = self.key.open_in_place(nonce, aad, sealed).map_err(|_| refused())?.len();
        self.ended = last == 1;
        self.chunks += 1;
        // Opened where it lies, after the nonce.
        Ok(Some(NONCE_LEN..NONCE_LEN + plain_len))
    }
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
        let (mut out, mut buf) = (Vec::new(), Vec::new());
        while let Some(plain) = r.next_into(&mut buf)? {
            out.extend_from_slice(&buf[plain]);
        }
        Ok(out)
    }

    /// Bytes come back as written, at and around chunk sizes; nothing in clear on disk.
    #[test]
    fn a_spooled_file_reads_back_as_written_and_is_not_plaintext_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool"), 1 << 30).unwrap();
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17] {
            let bytes: Vec<u8> = (0..len).map(|i| b"{\"resourceType\":\"Patient\"}\n"[i % 27]).collect();
            spooled(&spool, "job-1", "Patient-1.ndjson", &bytes);
            let on_disk = fs::read(dir.path().join("spool/job-1/Patient-1.ndjson")).unwrap();
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
        let first = 5 + u32::from_le_bytes(whole[..4].try_into().unwrap()) as usize;
        fs::write(path("A-1.ndjson"), &whole[..first]).unwrap();
        assert!(read_all(&spool, "j", "A-1.ndjson").is_err(), "cut after its first chunk");
        fs::write(path("A-1.ndjson"), &whole[..first + 5 + 100]).unwrap();
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
