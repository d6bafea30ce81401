//! An append-only log of numbered records in segment files of our own, for the Raft log
//! (issue 17: the log leaves sled, which takes any record failing its checksum in the tail it
//! re-scans for a torn write and silently drops it and everything after).
//!
//! A segment `seg-<first index, 20 digits>.log` holds records back to back:
//!
//! ```text
//! magic "FLR1" | payload length u32 | index u64 | header crc32 u32 | payload crc32 u32 | payload
//! ```
//!
//! (little-endian; the header CRC covers magic, length and index, the payload CRC index and
//! payload). Indexes are consecutive across
//! segments. Appends go to the last segment, which rotates past `segment_bytes`; `sync` makes
//! everything appended durable (one fdatasync for any number of records: group commit).
//!
//! At open every record is checked. The only damage repaired is a **torn final write**: the
//! last segment ends inside its last record, either before a whole header or after a header
//! whose own CRC holds (the process died mid-append, so that record was never acknowledged),
//! and the partial record is cut off, with a warning. The header CRC is what keeps a damaged
//! length from passing for a torn write: a length flipped to run past the end fails it.
//! Anything else (a bad magic or CRC on a whole header or record, a gap in the indexes, a
//! short record in an earlier segment) is **corruption**: open fails naming the segment and
//! the byte offset, and nothing is cut.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: [u8; 4] = *b"FLR1";
const HEADER: usize = 4 + 4 + 8 + 4 + 4;
/// Larger payloads are refused on append and taken as corruption at open.
pub const MAX_PAYLOAD: usize = 1 << 30;

/// Where a record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    segment: usize,
    offset: u64,
    len: u32,
}

struct Segment {
    first: u64,
    path: PathBuf,
    /// Shared with readers that read outside the log's lock ([`SegmentLog::locate`]).
    file: Arc<File>,
    size: u64,
}

/// Damage found at open (never a torn final write, which is repaired).
#[derive(Debug, thiserror::Error)]
#[error("{path} at byte {offset}: {what}")]
pub struct Corruption {
    pub path: PathBuf,
    pub offset: u64,
    pub what: String,
}

/// Errors of the segment log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("corrupt log: {0}")]
    Corrupt(#[from] Corruption),
    #[error("{0}")]
    Usage(String),
}

/// The log: its segments and where each live record is.
pub struct SegmentLog {
    dir: PathBuf,
    segment_bytes: u64,
    segments: Vec<Segment>,
    /// The index of `places[0]`.
    first: u64,
    places: Vec<Place>,
    /// Bytes appended since the last `sync`, per segment index (the active one, and one that
    /// rotated before the sync).
    dirty: Vec<usize>,
}

fn segment_name(first: u64) -> String {
    format!("seg-{first:020}.log")
}

fn checksum(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A record's header for a payload made of `parts` (laid out back to back).
fn header_of(index: u64, parts: &[&[u8]]) -> [u8; HEADER] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    h[8..16].copy_from_slice(&index.to_le_bytes());
    let header_crc = crc32fast::hash(&h[0..16]);
    h[16..20].copy_from_slice(&header_crc.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&index.to_le_bytes());
    for p in parts {
        crc.update(p);
    }
    h[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// Records up to this size are written with one call from one buffer; larger ones part by
/// part, so that a megabyte payload is not copied into a buffer first.
const COPY_BELOW: usize = 64 << 10;

/// A record header: payload length, index, payload CRC.
struct Header {
    len: u32,
    index: u64,
    crc: u32,
}

fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

/// Decodes a whole header; `Err` says what is wrong with it.
fn header(b: &[u8]) -> Result<Header, &'static str> {
    if b[0..4] != MAGIC {
        return Err("no record starts here (bad magic)");
    }
    if crc32fast::hash(&b[0..16]) != u32::from_le_bytes(field(b, 16)) {
        return Err("the record header fails its checksum");
    }
    Ok(Header {
        len: u32::from_le_bytes(field(b, 4)),
        index: u64::from_le_bytes(field(b, 8)),
        crc: u32::from_le_bytes(field(b, 20)),
    })
}

/// Checks every segment, on as many threads as there are cores (each with one read buffer it
/// reuses: a fresh buffer per segment had the kernel zero new pages each time), and
/// returns their scans in order. Opening reads the whole log, so this is most of a restart at
/// millions of resources.
fn scan_all(files: &[(u64, PathBuf, Arc<File>)]) -> Vec<Result<Scanned, Error>> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get).min(files.len()).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: Vec<std::sync::Mutex<Option<Result<Scanned, Error>>>> =
        files.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut buf = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((first, path, file)) = files.get(i) else { break };
                    let scanned = scan(path, file, *first, &mut buf);
                    *done[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(scanned);
                }
            });
        }
    });
    done.into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .unwrap_or_else(|| Err(Error::Usage("a segment scan did not finish".into())))
        })
        .collect()
}

/// What a scan of one segment found: where each record is (offset, payload length) up to the
/// end or the first damage.
struct Scanned {
    places: Vec<(u64, u32)>,
    size: u64,
    tail: Tail,
    damage: Option<Corruption>,
}

/// What a scan reads at a time: a whole segment at once held 64 MiB per scanning thread, and
/// the allocator kept it after the scan.
const SCAN_CHUNK: usize = 4 << 20;

/// A segment read front to back through one reused buffer.
struct Window<'a> {
    file: &'a File,
    size: u64,
    buf: &'a mut Vec<u8>,
    /// The file offset of `buf[0]`, and how much of `buf` holds the file.
    start: u64,
    len: usize,
}

impl Window<'_> {
    /// Bytes `[at, at + n)` of the file, or `None` if it ends before.
    fn get(&mut self, at: u64, n: usize) -> io::Result<Option<&[u8]>> {
        let end = at + n as u64;
        if end > self.size {
            return Ok(None);
        }
        if at < self.start || end > self.start + self.len as u64 {
            if self.buf.len() < n.max(SCAN_CHUNK) {
                self.buf.resize(n.max(SCAN_CHUNK), 0);
            }
            let len = self.buf.len().min(usize::try_from(self.size - at).unwrap_or(usize::MAX));
            self.file.read_exact_at(&mut self.buf[..len], at)?;
            (self.start, self.len) = (at, len);
        }
        let from = usize::try_from(at - self.start).unwrap_or(0);
        Ok(Some(&self.buf[from..from + n]))
    }
}

/// Checks every record of one segment whose first record is `first`.
fn scan(path: &Path, file: &File, first: u64, buf: &mut Vec<u8>) -> Result<Scanned, Error> {
    let size = file.metadata()?.len();
    let mut bytes = Window { file, size, buf, start: 0, len: 0 };
    let mut out = Scanned { places: Vec::new(), size, tail: Tail::Clean, damage: None };
    let corrupt = |offset: u64, what: String| Corruption { path: path.to_path_buf(), offset, what };
    let mut at = 0u64;
    let mut index = first;
    while at < size {
        let Some(head) = bytes.get(at, HEADER)? else {
            // Less than a header left: a torn write only if what is there could be its start.
            let rest = bytes.get(at, usize::try_from(size - at).unwrap_or(0))?.unwrap_or_default();
            if rest.iter().zip(MAGIC.iter()).any(|(a, b)| a != b) {
                out.damage = Some(corrupt(at, "no record starts here (bad magic)".into()));
            } else {
                out.tail = Tail::Short(at);
            }
            return Ok(out);
        };
        let Header { len, index: stored_index, crc } = match header(head) {
            Ok(h) => h,
            Err(what) => {
                out.damage = Some(corrupt(at, what.into()));
                return Ok(out);
            }
        };
        if len as usize > MAX_PAYLOAD {
            out.damage = Some(corrupt(at, format!("a record length of {len} bytes")));
            return Ok(out);
        }
        let Some(payload) = bytes.get(at + HEADER as u64, len as usize)? else {
            out.tail = Tail::Short(at);
            return Ok(out);
        };
        if checksum(stored_index, payload) != crc {
            out.damage = Some(corrupt(at, format!("record {stored_index} fails its checksum")));
            return Ok(out);
        }
        if stored_index != index {
            out.damage = Some(corrupt(at, format!("record {stored_index} where {index} was expected")));
            return Ok(out);
        }
        out.places.push((at, len));
        index += 1;
        at += (HEADER + len as usize) as u64;
    }
    Ok(out)
}

/// How a scan of one segment ended.
enum Tail {
    Clean,
    /// The file ends inside the record starting at this offset.
    Short(u64),
}

/// Segment files (and the directory, after a rotation) that hold appends not yet synced.
#[must_use = "nothing is durable until `run`"]
pub struct PendingSync {
    files: Vec<Arc<File>>,
    dir: Option<PathBuf>,
}

impl PendingSync {
    /// One fdatasync per file written (group commit), and the directory's if a segment was
    /// created.
    pub fn run(self) -> Result<(), Error> {
        if let Some(dir) = self.dir {
            File::open(dir)?.sync_all()?;
        }
        for f in self.files {
            f.sync_data()?;
        }
        Ok(())
    }
}

/// A record's payload in its segment file.
pub struct Located {
    file: Arc<File>,
    offset: u64,
    len: u32,
}

impl Located {
    /// The payload's length.
    pub fn size(&self) -> u32 {
        self.len
    }

    /// `len` bytes of the payload from `from` on (an error past its end).
    pub fn read(&self, from: u32, len: u32) -> Result<Vec<u8>, Error> {
        if u64::from(from) + u64::from(len) > u64::from(self.len) {
            return Err(Error::Usage(format!("bytes {from}+{len} of a record of {}", self.len)));
        }
        let mut buf = Vec::new();
        self.read_into(from, len, &mut buf)?;
        Ok(buf)
    }

    /// The whole payload into the front of `buf`, which grows if it is shorter but never
    /// shrinks, so a reused buffer is neither zeroed nor reallocated again; the payload's length.
    pub fn read_front(&self, buf: &mut Vec<u8>) -> Result<usize, Error> {
        let len = self.len as usize;
        if buf.len() < len {
            buf.resize(len, 0);
        }
        self.file.read_exact_at(&mut buf[..len], self.offset)?;
        Ok(len)
    }

    /// [`Located::read`] into `buf` (its capacity reused: only what it grows by is zeroed).
    pub fn read_into(&self, from: u32, len: u32, buf: &mut Vec<u8>) -> Result<(), Error> {
        if u64::from(from) + u64::from(len) > u64::from(self.len) {
            return Err(Error::Usage(format!("bytes {from}+{len} of a record of {}", self.len)));
        }
        buf.resize(len as usize, 0);
        self.file.read_exact_at(buf, self.offset + u64::from(from))?;
        Ok(())
    }
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir`, checking every record: a torn final write is cut
    /// off, any other damage is an error.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Self, Error> {
        fs::create_dir_all(dir)?;
        let (log, damage) = Self::open_with(dir, segment_bytes, true)?;
        match damage {
            Some(c) => Err(c.into()),
            None => Ok(log),
        }
    }

    /// Opens the log for reading only (the offline verifier): nothing is repaired or written.
    /// The log holds the records before the first damage, which is returned beside it; a torn
    /// final write is not damage (it was never acknowledged) and is left out silently.
    pub fn inspect(dir: &Path) -> Result<(Self, Option<Corruption>), Error> {
        Self::open_with(dir, u64::MAX, false)
    }

    fn open_with(dir: &Path, segment_bytes: u64, repair: bool) -> Result<(Self, Option<Corruption>), Error> {
        let mut firsts: Vec<(u64, PathBuf)> = Vec::new();
        for e in fs::read_dir(dir)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_prefix("seg-").and_then(|n| n.strip_suffix(".log")) {
                let path = dir.join(name.as_ref());
                let Ok(first) = n.parse::<u64>() else {
                    return Ok((
                        Self::empty(dir, segment_bytes),
                        Some(Corruption { path, offset: 0, what: "a segment name that is not a number".into() }),
                    ));
                };
                firsts.push((first, path));
            }
        }
        firsts.sort_unstable();
        let mut log = Self::empty(dir, segment_bytes);
        log.first = firsts.first().map_or(0, |f| f.0);
        let count = firsts.len();
        let mut files = Vec::with_capacity(count);
        for (first, path) in firsts {
            let file = Arc::new(OpenOptions::new().read(true).write(repair).open(&path)?);
            files.push((first, path, file));
        }
        let scans = scan_all(&files);
        for (i, ((first, path, file), scanned)) in files.into_iter().zip(scans).enumerate() {
            let expected = log.next_index();
            if !log.places.is_empty() && first != expected {
                let what = format!("the segment starts at index {first}, but the log continues at {expected}");
                return Ok((log, Some(Corruption { path, offset: 0, what })));
            }
            let Scanned { places, size, tail, damage } = scanned?;
            let segment = log.segments.len();
            log.places.extend(places.into_iter().map(|(offset, len)| Place { segment, offset, len }));
            if let Some(c) = damage {
                // The records before the damage stay readable (for the verifier).
                log.segments.push(Segment { first, path, file, size: c.offset });
                return Ok((log, Some(c)));
            }
            let size = match tail {
                Tail::Clean => size,
                Tail::Short(at) if i + 1 == count => {
                    if repair {
                        tracing::warn!(
                            "raft log {}: a torn final write at byte {at} (the process stopped mid-append); cut off",
                            path.display()
                        );
                        file.set_len(at)?;
                        file.sync_data()?;
                    }
                    at
                }
                Tail::Short(at) => {
                    let what = "a record cut short before the last segment".into();
                    return Ok((log, Some(Corruption { path, offset: at, what })));
                }
            };
            log.segments.push(Segment { first, path, file, size });
        }
        Ok((log, None))
    }

    fn empty(dir: &Path, segment_bytes: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            segment_bytes: segment_bytes.max(HEADER as u64 + 1),
            segments: Vec::new(),
            first: 0,
            places: Vec::new(),
            dirty: Vec::new(),
        }
    }

    /// The index of the first record kept.
    pub fn first_index(&self) -> u64 {
        self.first
    }

    /// The index the next append must have.
    pub fn next_index(&self) -> u64 {
        self.first + self.places.len() as u64
    }

    /// The index of the last record, if any.
    pub fn last_index(&self) -> Option<u64> {
        (!self.places.is_empty()).then(|| self.next_index() - 1)
    }

    /// Appends `payload` as record `index`: `next_index`, or any index when the log is empty.
    /// An index past `next_index` (after a snapshot was installed, the log restarts past it)
    /// drops every record kept so far. Not durable until [`SegmentLog::sync`]. Only tests and
    /// the state machine's benchmark append one piece; openraft's entries come in parts.
    #[cfg(any(test, feature = "bench"))]
    pub fn append(&mut self, index: u64, payload: &[u8]) -> Result<(), Error> {
        self.append_parts(index, &[payload])
    }

    /// [`SegmentLog::append`] of the payload made of `parts` back to back, written where they
    /// lie (a large Raft entry's batch is not copied into one buffer with its framing). A crash
    /// midway leaves a torn final record, as a partial single write would.
    pub fn append_parts(&mut self, index: u64, parts: &[&[u8]]) -> Result<(), Error> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_PAYLOAD {
            return Err(Error::Usage(format!("a record of {len} bytes exceeds the limit")));
        }
        if index > self.next_index() && !self.places.is_empty() {
            self.restart_at(index)?;
        }
        if self.places.is_empty() {
            self.first = index;
        } else if index != self.next_index() {
            return Err(Error::Usage(format!("append of {index}, but the log continues at {}", self.next_index())));
        }
        let rotate = self.segments.last().is_none_or(|s| s.size >= self.segment_bytes);
        if rotate {
            let path = self.dir.join(segment_name(index));
            let file = Arc::new(OpenOptions::new().read(true).write(true).create_new(true).open(&path)?);
            self.segments.push(Segment { first: index, path, file, size: 0 });
            // The new file's directory entry must be durable with the first sync.
            self.dirty.push(usize::MAX);
        }
        let segment = self.segments.len() - 1;
        let header = header_of(index, parts);
        let s = &mut self.segments[segment];
        if len < COPY_BELOW {
            let mut buf = Vec::with_capacity(HEADER + len);
            buf.extend_from_slice(&header);
            for p in parts {
                buf.extend_from_slice(p);
            }
            s.file.write_all_at(&buf, s.size)?;
        } else {
            let mut at = s.size;
            for p in std::iter::once(&header[..]).chain(parts.iter().copied()) {
                s.file.write_all_at(p, at)?;
                at += p.len() as u64;
            }
        }
        self.places.push(Place { segment, offset: s.size, len: u32::try_from(len).unwrap_or(u32::MAX) });
        s.size += (HEADER + len) as u64;
        if !self.dirty.contains(&segment) {
            self.dirty.push(segment);
        }
        Ok(())
    }

    /// Drops every record; the log continues at `index`.
    fn restart_at(&mut self, index: u64) -> Result<(), Error> {
        for s in self.segments.drain(..) {
            fs::remove_file(&s.path)?;
        }
        File::open(&self.dir)?.sync_all()?;
        self.places.clear();
        self.dirty.clear();
        self.first = index;
        Ok(())
    }

    /// Makes every append so far durable.
    #[cfg(test)]
    pub fn sync(&mut self) -> Result<(), Error> {
        self.pending_sync().run()
    }

    /// What [`SegmentLog::sync`] would sync, to be synced without holding the log: readers
    /// of other records need not wait for the disk.
    pub fn pending_sync(&mut self) -> PendingSync {
        let mut files = Vec::new();
        let mut dir = None;
        for d in std::mem::take(&mut self.dirty) {
            if d == usize::MAX {
                dir = Some(self.dir.clone());
            } else if let Some(s) = self.segments.get(d) {
                files.push(s.file.clone());
            }
        }
        PendingSync { files, dir }
    }

    /// The payload of record `index`, if the log holds it.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn get(&self, index: u64) -> Result<Option<Vec<u8>>, Error> {
        match self.locate(index) {
            Some(at) => Ok(Some(at.read(0, at.len)?)),
            None => Ok(None),
        }
    }

    /// The length of the longest record's payload (for a reader's buffer).
    pub fn largest(&self) -> u32 {
        self.places.iter().map(|p| p.len).max().unwrap_or(0)
    }

    /// Where record `index`'s payload lies, to be read without holding the log.
    pub fn locate(&self, index: u64) -> Option<Located> {
        let p = index.checked_sub(self.first).and_then(|i| self.places.get(usize::try_from(i).ok()?))?;
        let s = &self.segments[p.segment];
        Some(Located { file: s.file.clone(), offset: p.offset + HEADER as u64, len: p.len })
    }

    /// Removes the records from `index` on (a follower's log conflicting with its leader's).
    pub fn truncate(&mut self, index: u64) -> Result<(), Error> {
        if index >= self.next_index() {
            return Ok(());
        }
        let keep = usize::try_from(index.saturating_sub(self.first)).unwrap_or(usize::MAX).min(self.places.len());
        let Some(cut) = self.places.get(keep).copied() else { return Ok(()) };
        for s in self.segments.drain(cut.segment + 1..) {
            fs::remove_file(&s.path)?;
        }
        let s = &mut self.segments[cut.segment];
        s.file.set_len(cut.offset)?;
        s.file.sync_data()?;
        s.size = cut.offset;
        self.places.truncate(keep);
        self.dirty.retain(|&d| d == usize::MAX || d <= cut.segment);
        if self.places.is_empty() {
            self.first = index;
        }
        Ok(())
    }

    /// Drops whole segments whose records all lie at or below `index` (compacted into a
    /// snapshot). A segment holding later records stays, so the log may keep a few more.
    pub fn purge(&mut self, index: u64) -> Result<(), Error> {
        while self.segments.len() > 1 {
            let next_first = self.segments[1].first;
            if next_first > index + 1 {
                break;
            }
            let s = self.segments.remove(0);
            fs::remove_file(&s.path)?;
            let dropped = usize::try_from(next_first - self.first).unwrap_or(usize::MAX).min(self.places.len());
            self.places.drain(..dropped);
            self.first = next_first;
            for p in &mut self.places {
                p.segment -= 1;
            }
            self.dirty =
                self.dirty.iter().filter(|&&d| d != 0).map(|&d| if d == usize::MAX { d } else { d - 1 }).collect();
        }
        Ok(())
    }
}

/// Rewrites the last record of the log in `dir` (a tamper test's attacker): its payload is
/// changed and its checksums recomputed. Returns its index.
#[cfg(any(test, feature = "test-hooks"))]
pub(crate) fn rewrite_last(dir: &Path, change: impl FnOnce(&mut Vec<u8>)) -> io::Result<u64> {
    let (log, damage) = SegmentLog::inspect(dir).map_err(io::Error::other)?;
    if let Some(c) = damage {
        return Err(io::Error::other(c.to_string()));
    }
    let index = log.last_index().ok_or_else(|| io::Error::other("an empty log"))?;
    let place = log.places[log.places.len() - 1];
    let path = log.segments[place.segment].path.clone();
    let mut payload = log.get(index).map_err(io::Error::other)?.unwrap_or_default();
    drop(log);
    change(&mut payload);
    let record = [&header_of(index, &[&payload])[..], &payload].concat();
    let file = OpenOptions::new().write(true).open(&path)?;
    file.set_len(place.offset)?;
    file.write_all_at(&record, place.offset)?;
    file.sync_data()?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("entry {i} ").repeat((i % 7 + 1) as usize).into_bytes()
    }

    fn filled(dir: &Path, n: u64, segment_bytes: u64) -> SegmentLog {
        let mut log = SegmentLog::open(dir, segment_bytes).unwrap();
        for i in 1..=n {
            log.append(i, &payload(i)).unwrap();
        }
        log.sync().unwrap();
        log
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        v.sort();
        v
    }

    #[test]
    fn appends_read_back_across_segments_and_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        drop(filled(tmp.path(), 100, 512));
        assert!(segments(tmp.path()).len() > 3, "rotated");
        let log = SegmentLog::open(tmp.path(), 512).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (1, Some(100)));
        for i in 1..=100 {
            assert_eq!(log.get(i).unwrap(), Some(payload(i)));
        }
        assert_eq!(log.get(0).unwrap(), None);
        assert_eq!(log.get(101).unwrap(), None);
    }

    #[test]
    fn a_torn_final_write_is_cut_off_and_appending_goes_on() {
        let tmp = tempfile::tempdir().unwrap();
        drop(filled(tmp.path(), 20, 1 << 20));
        let seg = segments(tmp.path()).pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        // Every cut inside the last record is a torn write of that record only.
        let last_len = (HEADER + payload(20).len()) as u64;
        for cut in [1, 5, HEADER as u64, last_len - 1] {
            let copy = tempfile::tempdir().unwrap();
            fs::copy(&seg, copy.path().join(seg.file_name().unwrap())).unwrap();
            let f = OpenOptions::new().write(true).open(copy.path().join(seg.file_name().unwrap())).unwrap();
            f.set_len(len - last_len + cut).unwrap();
            let mut log = SegmentLog::open(copy.path(), 1 << 20).unwrap();
            assert_eq!(log.last_index(), Some(19), "cut {cut}");
            log.append(20, b"again").unwrap();
            log.sync().unwrap();
            drop(log);
            let log = SegmentLog::open(copy.path(), 1 << 20).unwrap();
            assert_eq!(log.get(20).unwrap().as_deref(), Some(&b"again"[..]));
        }
    }

    #[test]
    fn a_flipped_byte_anywhere_else_refuses_to_open_naming_the_place() {
        let tmp = tempfile::tempdir().unwrap();
        drop(filled(tmp.path(), 30, 400));
        let all = segments(tmp.path());
        for seg in &all {
            let len = fs::metadata(seg).unwrap().len();
            for at in [0, 3, 4, 9, 13, 17, 21, HEADER as u64, len / 2, len - 1] {
                let copy = tempfile::tempdir().unwrap();
                for s in &all {
                    fs::copy(s, copy.path().join(s.file_name().unwrap())).unwrap();
                }
                let target = copy.path().join(seg.file_name().unwrap());
                let mut bytes = fs::read(&target).unwrap();
                bytes[at as usize] ^= 0x40;
                fs::write(&target, &bytes).unwrap();
                match SegmentLog::open(copy.path(), 400) {
                    Err(Error::Corrupt(c)) => {
                        assert_eq!(c.path, target, "byte {at} of {}", seg.display());
                        assert!(c.offset <= at, "named offset {} for a flip at {at}", c.offset);
                    }
                    Err(e) => panic!("byte {at} of {}: {e}", seg.display()),
                    Ok(log) => panic!("byte {at} of {}: opened with last {:?}", seg.display(), log.last_index()),
                }
            }
        }
    }

    #[test]
    fn records_across_and_larger_than_the_scan_window_are_checked_and_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        // Records of 1.5 MiB cross each 4 MiB window's end; one of 9 MiB is larger than it.
        let big = |i: u64| vec![u8::try_from(i).unwrap(); if i == 4 { 9 << 20 } else { 3 << 19 }];
        let mut log = SegmentLog::open(tmp.path(), 1 << 30).unwrap();
        for i in 1..=8 {
            log.append(i, &big(i)).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(tmp.path(), 1 << 30).unwrap();
        assert_eq!(log.last_index(), Some(8));
        for i in 1..=8 {
            assert_eq!(log.get(i).unwrap(), Some(big(i)), "record {i}");
        }
        drop(log);
        // A flipped byte in a record the first window does not reach is still found.
        let seg = segments(tmp.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let seventh = 6 * HEADER + 5 * (3 << 19) + (9 << 20);
        bytes[seventh + HEADER + 100] ^= 0x01;
        fs::write(&seg, &bytes).unwrap();
        match SegmentLog::open(tmp.path(), 1 << 30) {
            Err(Error::Corrupt(c)) => assert_eq!(c.offset, seventh as u64),
            other => panic!("expected corruption, got {:?}", other.map(|l| l.last_index())),
        }
    }

    /// A record appended in parts (small ones through one buffer, large ones part by part) is
    /// the record of the parts back to back: the same file bytes, read back and reopened alike,
    /// and torn anywhere inside its last part it is cut off as a torn write.
    #[test]
    fn a_record_appended_in_parts_is_the_record_of_its_bytes() {
        let parts = |i: u64| -> Vec<Vec<u8>> {
            let n = if i.is_multiple_of(2) { 100 << 10 } else { 300 };
            vec![vec![1; 9], vec![u8::try_from(i).unwrap(); n], Vec::new(), vec![2; 72]]
        };
        let (whole, split) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut a, mut b) =
            (SegmentLog::open(whole.path(), 1 << 30).unwrap(), SegmentLog::open(split.path(), 1 << 30).unwrap());
        for i in 1..=4 {
            let p = parts(i);
            a.append(i, &p.concat()).unwrap();
            b.append_parts(i, &p.iter().map(Vec::as_slice).collect::<Vec<_>>()).unwrap();
        }
        b.sync().unwrap();
        assert_eq!(b.get(4).unwrap(), Some(parts(4).concat()));
        drop((a, b));
        let (sa, sb) = (segments(whole.path()).pop().unwrap(), segments(split.path()).pop().unwrap());
        assert_eq!(fs::read(&sa).unwrap(), fs::read(&sb).unwrap());
        let len = fs::metadata(&sb).unwrap().len();
        let f = OpenOptions::new().write(true).open(&sb).unwrap();
        f.set_len(len - 80).unwrap();
        let log = SegmentLog::open(split.path(), 1 << 30).unwrap();
        assert_eq!(log.last_index(), Some(3));
        assert_eq!(log.get(3).unwrap(), Some(parts(3).concat()));
    }

    #[test]
    fn a_final_record_whose_length_was_damaged_is_not_taken_for_a_torn_write() {
        // sled's failure: a damaged length makes the record run past the end of the file,
        // which looks like a torn write, and the record and everything after it vanish.
        let tmp = tempfile::tempdir().unwrap();
        drop(filled(tmp.path(), 20, 1 << 20));
        let seg = segments(tmp.path()).pop().unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let last = bytes.len() - (HEADER + payload(20).len());
        bytes[last + 5] ^= 0x01; // the length's second byte: now 256 bytes longer
        fs::write(&seg, &bytes).unwrap();
        match SegmentLog::open(tmp.path(), 1 << 20) {
            Err(Error::Corrupt(c)) => assert_eq!(c.offset, last as u64),
            other => panic!("expected corruption, got {:?}", other.map(|l| l.last_index())),
        }
    }

    #[test]
    fn a_short_record_before_the_last_segment_is_corruption() {
        let tmp = tempfile::tempdir().unwrap();
        drop(filled(tmp.path(), 30, 400));
        let first = segments(tmp.path()).remove(0);
        let f = OpenOptions::new().write(true).open(&first).unwrap();
        f.set_len(fs::metadata(&first).unwrap().len() - 3).unwrap();
        assert!(matches!(SegmentLog::open(tmp.path(), 400), Err(Error::Corrupt(_))));
    }

    #[test]
    fn truncate_and_purge_keep_the_rest_readable() {
        let tmp = tempfile::tempdir().unwrap();
        let mut log = filled(tmp.path(), 60, 300);
        log.truncate(45).unwrap();
        assert_eq!(log.last_index(), Some(44));
        for i in 45..=50 {
            log.append(i, format!("new {i}").as_bytes()).unwrap();
        }
        log.sync().unwrap();
        log.purge(20).unwrap();
        assert!(log.first_index() <= 21 && log.first_index() > 1, "first {}", log.first_index());
        let first = log.first_index();
        drop(log);
        let mut log = SegmentLog::open(tmp.path(), 300).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (first, Some(50)));
        for i in first..45 {
            assert_eq!(log.get(i).unwrap(), Some(payload(i)));
        }
        for i in 45..=50 {
            assert_eq!(log.get(i).unwrap(), Some(format!("new {i}").into_bytes()));
        }
        assert!(log.append(50, b"again").is_err(), "an index already held");
        // Past the end (a snapshot was installed meanwhile): the log restarts there.
        log.append(60, b"after a snapshot").unwrap();
        log.sync().unwrap();
        drop(log);
        let log = SegmentLog::open(tmp.path(), 300).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (60, Some(60)));
    }
}
