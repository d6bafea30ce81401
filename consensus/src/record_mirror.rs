//! A copy of the version records (`r` keys) in two flat files beside sled, for reading:
//! `records/records.dat` holds each record's bytes followed by their CRC-32, in leaf order;
//! `records/records.idx` holds one little-endian u64 per leaf, where its bytes end in the data
//! file. A record is found with two positioned reads, and a run of leaves with two, straight
//! from the page cache: sled reached the same record through its page table, and at millions
//! of records, with its cache a fraction of them, paged its nodes in and decoded them again
//! (a fifth of a search page's CPU at 2.25 million resources, BENCHMARKS.md).
//!
//! sled stays the ledger's authority: every record is written there first, in the same
//! atomic batch as the rest of its entry, and `verify` reads it there (and checks this copy
//! against it). The copy only ever holds a prefix of the leaves, each byte for byte what sled
//! holds, which `SplitStore` keeps true: a put of the next leaf appends, a put or delete of a
//! leaf the copy holds cuts it back to that leaf first (a snapshot install clears the state),
//! and a put past the end is left to sled (the copy then stops growing until the next open).
//! At open it is cut to sled's leaf count (sled may have lost its last batches in a crash and
//! will apply them again; these files were written after them), its last record is compared
//! with sled's, and what sled holds beyond it is copied. A leaf the copy cannot answer (past
//! its end, a record too large to copy, a checksum that fails) is read from sled.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::kv::KvStore;

/// The directory under the ledger's.
pub const DIR: &str = "records";
const IDX: &str = "records.idx";
const DATA: &str = "records.dat";
/// Set in an index entry whose record is not copied (too large): read it from sled.
const NOT_COPIED: u64 = 1 << 63;
/// Records larger than this are left to sled: only versions that came with an installed
/// snapshot carry their bodies inline, and copying those would store every body twice.
const MAX_COPIED: usize = 2048;
/// Leaves read with one pair of reads when a range is walked.
pub(crate) const RUN: u64 = 512;
/// Bytes copied from sled per write while catching up at open.
const CATCH_UP_BYTES: usize = 8 << 20;

/// What [`RecordMirror::read_run`] hands each leaf to: its record, or None to ask sled.
pub type RunReader<'a> = dyn FnMut(u64, Option<&[u8]>) -> io::Result<()> + 'a;

/// The two files and how much of them holds records.
#[derive(Debug)]
pub struct RecordMirror {
    dir: PathBuf,
    idx: File,
    data: File,
    /// Leaves held (index entries in use).
    count: AtomicU64,
    /// Bytes of the data file in use.
    data_len: AtomicU64,
    /// Serializes writers (the state's batches already are; opening catches up through it).
    write: Mutex<()>,
}

/// The key of leaf `leaf`'s version record, as the state machine writes it.
pub(crate) fn leaf_of(key: &[u8]) -> Option<u64> {
    match key {
        [b'r', rest @ ..] if rest.len() == 8 => crate::kv::read_be(rest),
        _ => None,
    }
}

pub(crate) fn key_of(leaf: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'r');
    k.extend_from_slice(&leaf.to_be_bytes());
    k
}

fn corrupt(path: &Path, what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
}

/// An index entry's end offset, with the flag off.
fn end_of(entry: u64) -> u64 {
    entry & !NOT_COPIED
}

impl RecordMirror {
    /// Opens (creating) the files under `dir` and cuts off a torn tail: index entries past the
    /// data file's end, a partial index entry, data past the last entry's end.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let open = |name| OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join(name));
        let (idx, data) = (open(IDX)?, open(DATA)?);
        let file_len = data.metadata()?.len();
        let mut count = idx.metadata()?.len() / 8;
        let mut end = 0;
        while count > 0 {
            end = end_of(read_u64(&idx, count - 1)?);
            if end <= file_len {
                break;
            }
            count -= 1;
            end = 0;
        }
        let m = Self {
            dir: dir.to_path_buf(),
            idx,
            data,
            count: AtomicU64::new(count),
            data_len: AtomicU64::new(end),
            write: Mutex::new(()),
        };
        m.cut(count)?;
        Ok(m)
    }

    /// Opens the copy under `dir` for reading only, if there is one (the offline verifier).
    pub fn inspect(dir: &Path) -> io::Result<Option<Self>> {
        if !dir.join(IDX).exists() {
            return Ok(None);
        }
        let (idx, data) = (File::open(dir.join(IDX))?, File::open(dir.join(DATA))?);
        let count = idx.metadata()?.len() / 8;
        let data_len = data.metadata()?.len();
        Ok(Some(Self {
            dir: dir.to_path_buf(),
            idx,
            data,
            count: AtomicU64::new(count),
            data_len: AtomicU64::new(data_len),
            write: Mutex::new(()),
        }))
    }

    /// Leaves held.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Where the data file is (for messages).
    pub fn data_path(&self) -> PathBuf {
        self.dir.join(DATA)
    }

    /// Brings the copy to what `ledger` (sled) holds: cut to its leaf count, its last record
    /// compared (a copy that differs is started again), the rest copied. Returns the leaves
    /// copied.
    pub fn sync_with(&self, ledger: &dyn KvStore) -> io::Result<u64> {
        let leaves = match ledger.range(&key_of(0), &[b'r' + 1], true).next() {
            Some(kv) => leaf_of(&kv?.0).map_or(0, |l| l + 1),
            None => 0,
        };
        if self.count() > leaves {
            self.cut(leaves)?;
        }
        if let Some(last) = self.count().checked_sub(1) {
            let same = match self.get(last)? {
                Some(copy) => ledger.get(&key_of(last))?.is_some_and(|v| v == copy),
                None => true, // not copied, or a checksum that failed: nothing to compare
            };
            if !same {
                tracing::warn!(leaf = last, "the record copy differs from the ledger; copying it again");
                self.cut(0)?;
            }
        }
        let from = self.count();
        let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut bytes = 0;
        for kv in ledger.range(&key_of(from), &[b'r' + 1], false) {
            let (k, v) = kv?;
            let Some(leaf) = leaf_of(&k) else { continue };
            bytes += v.len();
            batch.push((leaf, v));
            if bytes >= CATCH_UP_BYTES {
                self.write(batch.drain(..).map(|(l, v)| (l, Some(v))))?;
                bytes = 0;
            }
        }
        self.write(batch.into_iter().map(|(l, v)| (l, Some(v))))?;
        Ok(self.count() - from)
    }

    /// Applies the `r` writes of one batch, in order (see the module's rules).
    pub fn write(&self, ops: impl IntoIterator<Item = (u64, Option<Vec<u8>>)>) -> io::Result<()> {
        let _one = self.write.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut idx, mut data) = (Vec::new(), Vec::new());
        let mut end = self.data_len.load(Ordering::Acquire);
        for (leaf, value) in ops {
            let next = self.count() + idx.len() as u64 / 8;
            if leaf < next {
                self.append(&idx, &data)?;
                (idx, data) = (Vec::new(), Vec::new());
                self.cut(leaf)?;
                end = self.data_len.load(Ordering::Acquire);
            } else if leaf > next {
                continue; // a gap: sled answers from here on
            }
            let Some(value) = value else { continue };
            if value.len() <= MAX_COPIED {
                data.extend_from_slice(&value);
                data.extend_from_slice(&crc32fast::hash(&value).to_le_bytes());
                end += value.len() as u64 + 4;
                idx.extend_from_slice(&end.to_le_bytes());
            } else {
                idx.extend_from_slice(&(end | NOT_COPIED).to_le_bytes());
            }
        }
        self.append(&idx, &data)
    }

    /// Writes index entries and their data at the end, then makes them visible.
    fn append(&self, idx: &[u8], data: &[u8]) -> io::Result<()> {
        if idx.is_empty() {
            return Ok(());
        }
        let (count, len) = (self.count(), self.data_len.load(Ordering::Acquire));
        self.data.write_all_at(data, len)?;
        self.idx.write_all_at(idx, count * 8)?;
        self.data_len.store(len + data.len() as u64, Ordering::Release);
        self.count.store(count + idx.len() as u64 / 8, Ordering::Release);
        Ok(())
    }

    /// Keeps the first `leaves` records only.
    fn cut(&self, leaves: u64) -> io::Result<()> {
        let end = match leaves.checked_sub(1) {
            Some(last) => end_of(read_u64(&self.idx, last)?),
            None => 0,
        };
        self.count.store(leaves, Ordering::Release);
        self.data_len.store(end, Ordering::Release);
        self.idx.set_len(leaves * 8)?;
        self.data.set_len(end)
    }

    /// Leaf `leaf`'s record, if the copy holds it (None: ask sled).
    pub fn get(&self, leaf: u64) -> io::Result<Option<Vec<u8>>> {
        if leaf >= self.count() {
            return Ok(None);
        }
        // The entry before the leaf's says where it starts: both with one read.
        let mut raw = [0u8; 16];
        let (entries, at) = match leaf.checked_sub(1) {
            Some(before) => (&mut raw[..], before * 8),
            None => (&mut raw[8..], 0),
        };
        self.idx.read_exact_at(entries, at)?;
        let [start, entry] = [&raw[..8], &raw[8..]].map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
        let (start, end) = (end_of(start), end_of(entry));
        if entry & NOT_COPIED != 0 || end < start + 4 || end > self.data_len.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut value = vec![0u8; (end - start) as usize];
        self.data.read_exact_at(&mut value, start)?;
        let crc = value.split_off(value.len() - 4);
        if crc32fast::hash(&value).to_le_bytes()[..] != crc[..] {
            tracing::error!(leaf, file = %self.data_path().display(), "a copied record fails its checksum; read from sled");
            return Ok(None);
        }
        Ok(Some(value))
    }

    /// Hands `f` the records of leaves `[from, to)` the copy holds (None for one it cannot
    /// answer), in order, with one read of the index and one of the data.
    pub fn read_run(&self, from: u64, to: u64, f: &mut RunReader<'_>) -> io::Result<()> {
        let to = to.min(self.count());
        if from >= to {
            return Ok(());
        }
        let first = from.saturating_sub(1); // the entry before `from` says where it starts
        let mut raw = vec![0u8; ((to - first) * 8) as usize];
        self.idx.read_exact_at(&mut raw, first * 8)?;
        let ends: Vec<u64> =
            raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect();
        let ends = if from == 0 { &ends[..] } else { &ends[1..] };
        let start = if from == 0 { 0 } else { end_of(u64::from_le_bytes(raw[..8].try_into().unwrap_or_default())) };
        let stop = ends.last().map_or(start, |e| end_of(*e));
        if stop < start || stop > self.data_len.load(Ordering::Acquire) {
            return Err(corrupt(&self.dir.join(IDX), &format!("entries of leaves {from}..{to} point past the data")));
        }
        let mut data = vec![0u8; (stop - start) as usize];
        self.data.read_exact_at(&mut data, start)?;
        let mut at = start;
        for (leaf, &entry) in (from..to).zip(ends) {
            let end = end_of(entry);
            if end < at {
                return Err(corrupt(&self.dir.join(IDX), &format!("the entry of leaf {leaf} goes backwards")));
            }
            let bytes = &data[(at - start) as usize..(end - start) as usize];
            at = end;
            if entry & NOT_COPIED != 0 || bytes.len() < 4 {
                f(leaf, None)?;
                continue;
            }
            let (value, crc) = bytes.split_at(bytes.len() - 4);
            if crc32fast::hash(value).to_le_bytes() != crc {
                tracing::error!(leaf, file = %self.data_path().display(), "a copied record fails its checksum; read from sled");
                f(leaf, None)?;
                continue;
            }
            f(leaf, Some(value))?;
        }
        Ok(())
    }
}

/// Rewrites leaf `leaf`'s copied record in place with `change` (which must keep its length),
/// recomputing its checksum as an attacker who knows the format would (the tamper tests).
#[cfg(feature = "test-hooks")]
pub(crate) fn rewrite(ledger: &Path, leaf: u64, change: impl FnOnce(&mut Vec<u8>)) -> io::Result<()> {
    let m = RecordMirror::open(&ledger.join(DIR))?;
    let mut value = m.get(leaf)?.ok_or_else(|| io::Error::other(format!("leaf {leaf} is not copied")))?;
    let len = value.len();
    change(&mut value);
    if value.len() != len {
        return Err(io::Error::other("a rewrite in place keeps the record's length"));
    }
    let start = match leaf.checked_sub(1) {
        Some(before) => end_of(read_u64(&m.idx, before)?),
        None => 0,
    };
    value.extend_from_slice(&crc32fast::hash(&value).to_le_bytes());
    m.data.write_all_at(&value, start)?;
    m.data.sync_all()
}

fn read_u64(file: &File, entry: u64) -> io::Result<u64> {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, entry * 8)?;
    Ok(u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::WriteBatch;
    use crate::split_store::SplitStore;
    use proptest::prelude::*;
    use std::sync::Arc;

    /// What a batch does to the version records.
    #[derive(Debug, Clone)]
    enum Step {
        /// Appends this many records (sizes from the seed; some too large to copy).
        Append(u8, u16),
        /// Rewrites one existing leaf (a tamperer, or a test hook).
        Rewrite(u16),
        /// Deletes every record and loads the first `n` again (a snapshot install).
        Reload(u16),
        /// A record past the end (a gap the copy must not paper over).
        Gap,
        /// Closes and opens the stores again.
        Reopen,
        /// Reopens with the copy's files cut mid-record (a crash during its write).
        TornReopen(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u8..40, any::<u16>()).prop_map(|(n, s)| Step::Append(n, s)),
            1 => any::<u16>().prop_map(Step::Rewrite),
            1 => any::<u16>().prop_map(Step::Reload),
            1 => Just(Step::Gap),
            1 => Just(Step::Reopen),
            1 => any::<u8>().prop_map(Step::TornReopen),
        ]
    }

    fn value(leaf: u64, seed: u16) -> Vec<u8> {
        let len =
            if seed.is_multiple_of(7) { MAX_COPIED + 1 + usize::from(seed) } else { 20 + usize::from(seed % 300) };
        (0..len).map(|i| (leaf as usize * 31 + i + usize::from(seed)) as u8).collect()
    }

    struct Stores {
        dir: tempfile::TempDir,
        split: Option<SplitStore>,
        /// sled alone: what every answer must equal.
        ledger: Arc<dyn KvStore>,
    }

    impl Stores {
        fn open(dir: tempfile::TempDir, ledger: Arc<dyn KvStore>) -> Self {
            let lookup = Arc::new(crate::lsm_store::Tree::open(&dir.path().join("lookup"), "lookup", 1 << 20).unwrap());
            let copy = RecordMirror::open(&dir.path().join(DIR)).unwrap();
            let split = SplitStore::new(ledger.clone(), lookup).with_records(copy).unwrap();
            Self { dir, split: Some(split), ledger }
        }
        fn split(&self) -> &SplitStore {
            self.split.as_ref().unwrap()
        }
        fn reopen(mut self, torn: Option<u8>) -> Self {
            self.split = None;
            if let Some(cut) = torn {
                let data = self.dir.path().join(DIR).join(DATA);
                let len = std::fs::metadata(&data).unwrap().len();
                let f = OpenOptions::new().write(true).open(&data).unwrap();
                f.set_len(len.saturating_sub(u64::from(cut))).unwrap();
            }
            Self::open(self.dir, self.ledger)
        }
        fn leaves(&self) -> u64 {
            self.ledger.scan_prefix(b"r").count() as u64
        }
        fn check(&self) {
            let all: Vec<_> = self.ledger.scan_prefix(b"r").map(|kv| kv.unwrap()).collect();
            let got: Vec<_> = self.split().scan_prefix(b"r").map(|kv| kv.unwrap()).collect();
            assert_eq!(got, all, "a scan of every record");
            let mut rev = all.clone();
            rev.reverse();
            let got: Vec<_> = self.split().range(b"r", &[b'r' + 1], true).map(|kv| kv.unwrap()).collect();
            assert_eq!(got, rev, "the same, descending");
            let n = all.len() as u64;
            for (lo, hi) in [(0, n / 2), (n / 3, n), (n / 2, n / 2 + 1), (n, n + 5)] {
                let want: Vec<_> = self.ledger.range(&key_of(lo), &key_of(hi), false).map(|kv| kv.unwrap()).collect();
                let got: Vec<_> = self.split().range(&key_of(lo), &key_of(hi), false).map(|kv| kv.unwrap()).collect();
                assert_eq!(got, want, "leaves {lo}..{hi}");
            }
            for leaf in [0, n / 2, n.saturating_sub(1), n, n + 1] {
                assert_eq!(
                    self.split().get(&key_of(leaf)).unwrap(),
                    self.ledger.get(&key_of(leaf)).unwrap(),
                    "leaf {leaf}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        /// Whatever the batches, the copy's answers are sled's: appends, rewrites, a state
        /// cleared and loaded again, gaps, reopening, a torn write of the copy.
        #[test]
        fn reads_through_the_copy_equal_the_ledgers(steps in prop::collection::vec(step(), 1..24)) {
            let dir = tempfile::tempdir().unwrap();
            let ledger = crate::sled_store::SledDb::open(dir.path()).unwrap().tree("state").unwrap();
            let mut s = Stores::open(dir, ledger);
            for step in steps {
                let n = s.leaves();
                let mut wb = WriteBatch::default();
                match step {
                    Step::Append(k, seed) => (n..n + u64::from(k)).for_each(|l| wb.put(key_of(l), value(l, seed))),
                    Step::Rewrite(at) if n > 0 => wb.put(key_of(u64::from(at) % n), value(0, at)),
                    Step::Reload(keep) => {
                        let keep = if n == 0 { 0 } else { u64::from(keep) % n };
                        (0..n).for_each(|l| wb.delete(key_of(l)));
                        (0..keep).for_each(|l| wb.put(key_of(l), value(l, 3)));
                    }
                    Step::Gap => wb.put(key_of(n + 2), value(n + 2, 1)),
                    Step::Reopen => s = s.reopen(None),
                    Step::TornReopen(cut) => s = s.reopen(Some(cut)),
                    Step::Rewrite(_) => {}
                }
                if !wb.ops.is_empty() {
                    s.split().apply(wb).unwrap();
                }
                s.check();
            }
        }
    }

    /// The copy answers what it holds without sled: a record read from it is the copy's bytes.
    #[test]
    fn records_are_read_from_the_copy() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::sled_store::SledDb::open(dir.path()).unwrap().tree("state").unwrap();
        let s = Stores::open(dir, ledger);
        let mut wb = WriteBatch::default();
        (0..10).for_each(|l| wb.put(key_of(l), value(l, 1)));
        s.split().apply(wb).unwrap();
        let copy = s.split().records.as_ref().unwrap();
        assert_eq!(copy.count(), 10);
        assert_eq!(copy.get(4).unwrap(), Some(value(4, 1)));
        // A copied record whose bytes changed on disk fails its checksum and is read from sled.
        let data = OpenOptions::new().write(true).open(s.dir.path().join(DIR).join(DATA)).unwrap();
        data.write_all_at(&[0xff], 0).unwrap();
        assert_eq!(copy.get(0).unwrap(), None);
        assert_eq!(s.split().get(&key_of(0)).unwrap(), Some(value(0, 1)));
    }
}
