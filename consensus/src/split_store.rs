//! The state as two engines behind one [`KvStore`]: the ledger's own keys (version records,
//! subtree hashes, data keys, metadata), written in leaf order, in sled; the lookup tables
//! derived from them (current records, conditional postings, which leaf touched which id, and
//! how far that derivation has come), written at random places, in an LSM tree. A key's first
//! byte says where it lives, so the state machine reads and writes one ordered key space.
//!
//! A batch goes to the ledger and the lookup (a large one to both at once, small ones ledger
//! first): not atomically across the two, so after a crash either may be ahead of the other. `StateMachine::open` reconciles them from the
//! ledger (`state_machine::reconcile_lookup`).
//!
//! While the process runs, readers see a batch whole or not at all: `apply` holds a gate
//! exclusively across both writes, and every read (each `get`, each step of a scan) holds it
//! shared. Without it a reader could see a new leaf in the ledger before its current record
//! exists, and the search fold, which walks leaves once, would skip that resource for good.

use std::io;
use std::sync::{Arc, PoisonError, RwLock};

use crate::kv::{KvIter, KvStore, WriteBatch};

/// Whether `key` lives in the lookup store (see `state_machine`'s key table).
pub(crate) fn in_lookup(key: &[u8]) -> bool {
    matches!(key.first(), Some(b'c' | b't' | b'u' | b'x'))
}

/// A batch with at least this many writes for each store writes both at once (a thread
/// costs more than a small batch's writes).
const BOTH_AT_ONCE: usize = 1024;

#[derive(Debug)]
pub struct SplitStore {
    ledger: Arc<dyn KvStore>,
    lookup: Arc<dyn KvStore>,
    /// Exclusive while a batch is between the two stores, shared by each read.
    gate: RwLock<()>,
}

impl SplitStore {
    pub fn new(ledger: Arc<dyn KvStore>, lookup: Arc<dyn KvStore>) -> Self {
        Self { ledger, lookup, gate: RwLock::new(()) }
    }

    /// A scan whose every step waits for a batch in flight. The gate is taken per step, not
    /// for the scan's life: a caller may apply while it still holds an iterator.
    fn gated<'a>(&'a self, mut inner: KvIter<'a>) -> KvIter<'a> {
        Box::new(std::iter::from_fn(move || {
            let _shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
            inner.next()
        }))
    }

    fn store(&self, key: &[u8]) -> &dyn KvStore {
        if in_lookup(key) {
            self.lookup.as_ref()
        } else {
            self.ledger.as_ref()
        }
    }
}

/// Merges two ordered scans into one (descending when `rev`).
fn merge<'a>(a: KvIter<'a>, b: KvIter<'a>, rev: bool) -> KvIter<'a> {
    let mut a = a.peekable();
    let mut b = b.peekable();
    Box::new(std::iter::from_fn(move || {
        let take_a = match (a.peek(), b.peek()) {
            (None, None) => return None,
            // An error is passed on first, whichever side it is on.
            (Some(_), None) | (Some(Err(_)), _) => true,
            (None, Some(_)) | (_, Some(Err(_))) => false,
            (Some(Ok((ka, _))), Some(Ok((kb, _)))) => (ka < kb) != rev,
        };
        if take_a {
            a.next()
        } else {
            b.next()
        }
    }))
}

impl KvStore for SplitStore {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let _shared = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        self.store(key).get(key)
    }

    fn scan_prefix(&self, prefix: &[u8]) -> KvIter<'_> {
        if prefix.is_empty() {
            return self.gated(merge(self.ledger.scan_prefix(prefix), self.lookup.scan_prefix(prefix), false));
        }
        self.gated(self.store(prefix).scan_prefix(prefix))
    }

    fn range(&self, from: &[u8], to: &[u8], rev: bool) -> KvIter<'_> {
        // The first bytes keys in [from, to) can have: one store holds them all, or both are read.
        let lo = from.first().copied().unwrap_or(0);
        let hi = match to {
            [] => u8::MAX,
            [only] => only.saturating_sub(1),
            [first, ..] => *first,
        };
        let lookup = (lo..=hi).filter(|b| in_lookup(&[*b])).count();
        self.gated(if lookup == 0 {
            self.ledger.range(from, to, rev)
        } else if lookup == usize::from(hi.saturating_sub(lo)) + 1 {
            self.lookup.range(from, to, rev)
        } else {
            merge(self.ledger.range(from, to, rev), self.lookup.range(from, to, rev), rev)
        })
    }

    fn apply(&self, batch: WriteBatch) -> io::Result<()> {
        let (lookup, ledger): (Vec<_>, Vec<_>) = batch.ops.into_iter().partition(|(k, _)| in_lookup(k));
        let _exclusive = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        if ledger.len().min(lookup.len()) >= BOTH_AT_ONCE {
            // Two engines, two cores: neither write waits for the other (a large transaction's
            // batch spent 60 ms in sled, then 40 ms in the LSM tree).
            let (ledger, lookup) = (WriteBatch { ops: ledger }, WriteBatch { ops: lookup });
            return std::thread::scope(|s| {
                let derived = s.spawn(|| self.lookup.apply(lookup));
                let own = self.ledger.apply(ledger);
                let derived = derived.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                own.and(derived)
            });
        }
        if !ledger.is_empty() {
            self.ledger.apply(WriteBatch { ops: ledger })?;
        }
        if !lookup.is_empty() {
            self.lookup.apply(WriteBatch { ops: lookup })?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.ledger.flush()?;
        self.lookup.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsm_store::Tree;

    /// A sled ledger and an LSM lookup store in `dir`, and the split store over both.
    fn stores(dir: &std::path::Path) -> (Arc<dyn KvStore>, Arc<dyn KvStore>, SplitStore) {
        let ledger: Arc<dyn KvStore> = crate::sled_store::SledDb::open(dir).unwrap().tree("state").unwrap();
        let lookup: Arc<dyn KvStore> = Arc::new(Tree::open(&dir.join("lookup"), "lookup", 1 << 20).unwrap());
        (ledger.clone(), lookup.clone(), SplitStore::new(ledger, lookup))
    }

    /// Keys of both stores come back as one ordered key space, whichever way it is walked.
    #[test]
    fn scans_and_ranges_merge_both_stores_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let (_, lookup, split) = stores(dir.path());
        let keys: Vec<&[u8]> = vec![b"c1", b"k1", b"m/a", b"n1", b"r1", b"r2", b"t1", b"u", b"x1"];
        let mut wb = WriteBatch::default();
        for k in &keys {
            wb.put(k.to_vec(), k.to_vec());
        }
        split.apply(wb).unwrap();
        assert_eq!(lookup.scan_prefix(b"").count(), 4, "c, t, u and x keys are the lookup's");
        let got = |it: KvIter<'_>| it.map(|kv| kv.unwrap().0).collect::<Vec<_>>();
        let all: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        assert_eq!(got(split.scan_prefix(b"")), all);
        let mut rev = all.clone();
        rev.reverse();
        assert_eq!(got(split.range(b"", &[u8::MAX], true)), rev);
        assert_eq!(got(split.range(b"k", b"t2", false)), all[1..7].to_vec());
        assert_eq!(got(split.range(b"r", b"s", true)), vec![b"r2".to_vec(), b"r1".to_vec()]);
        assert_eq!(got(split.range(b"t", b"v", false)), vec![b"t1".to_vec(), b"u".to_vec()]);
        assert_eq!(split.get(b"x1").unwrap(), Some(b"x1".to_vec()));
    }

    /// A batch large enough to be written to both stores at once lands whole in each.
    #[test]
    fn a_large_batch_lands_in_both_stores() {
        let dir = tempfile::tempdir().unwrap();
        let (ledger, lookup, split) = stores(dir.path());
        let mut wb = WriteBatch::default();
        for i in 0..2 * BOTH_AT_ONCE {
            wb.put(format!("r{i:06}").into_bytes(), vec![1]);
            wb.put(format!("c{i:06}").into_bytes(), vec![2]);
        }
        split.apply(wb).unwrap();
        assert_eq!(ledger.scan_prefix(b"r").count(), 2 * BOTH_AT_ONCE);
        assert_eq!(lookup.scan_prefix(b"c").count(), 2 * BOTH_AT_ONCE);
        assert_eq!(split.scan_prefix(b"").count(), 4 * BOTH_AT_ONCE);
        assert_eq!(split.get(b"c000007").unwrap(), Some(vec![2]));
    }

    /// A real lookup store whose `apply` stops halfway through a split batch until released:
    /// the moment between the two writes, held open.
    #[derive(Debug)]
    struct Paused {
        inner: Arc<dyn KvStore>,
        entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
        release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl KvStore for Paused {
        fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
            self.inner.get(key)
        }
        fn scan_prefix(&self, prefix: &[u8]) -> KvIter<'_> {
            self.inner.scan_prefix(prefix)
        }
        fn range(&self, from: &[u8], to: &[u8], rev: bool) -> KvIter<'_> {
            self.inner.range(from, to, rev)
        }
        fn apply(&self, batch: WriteBatch) -> io::Result<()> {
            self.entered.lock().unwrap().send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
            self.inner.apply(batch)
        }
        fn flush(&self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    /// A reader that finds a leaf in the ledger finds its current record too, even while the
    /// batch that wrote both is between the two stores (the search fold relies on it).
    #[test]
    fn readers_see_a_batch_in_both_stores_or_in_neither() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::sled_store::SledDb::open(dir.path()).unwrap().tree("state").unwrap();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let lookup = Paused {
            inner: Arc::new(Tree::open(&dir.path().join("lookup"), "lookup", 1 << 20).unwrap()),
            entered: std::sync::Mutex::new(entered_tx),
            release: std::sync::Mutex::new(release_rx),
        };
        let split = SplitStore::new(ledger, Arc::new(lookup));
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut wb = WriteBatch::default();
                wb.put(b"r1".to_vec(), b"leaf".to_vec());
                wb.put(b"c1".to_vec(), b"current".to_vec());
                split.apply(wb).unwrap();
            });
            entered.recv().unwrap(); // the ledger holds r1; the lookup not yet c1
            let reader = s.spawn(|| {
                let leaf = split.get(b"r1").unwrap();
                let scanned = split.scan_prefix(b"r").count();
                (leaf, scanned, split.get(b"c1").unwrap())
            });
            // Give the reader time to run into the half-applied batch before letting it finish.
            std::thread::sleep(std::time::Duration::from_millis(100));
            release.send(()).unwrap();
            let (leaf, scanned, current) = reader.join().unwrap();
            assert_eq!(leaf.as_deref(), Some(&b"leaf"[..]), "the reader waited for the batch");
            assert_eq!(scanned, 1);
            assert_eq!(current.as_deref(), Some(&b"current"[..]), "the leaf's current record is there");
        });
    }
}
