//! The state as two engines behind one [`KvStore`]: the ledger's own keys (version records,
//! subtree hashes, data keys, metadata), written in leaf order, in sled; the lookup tables
//! derived from them (current records, conditional postings, which leaf touched which id, and
//! how far that derivation has come), written at random places, in an LSM tree. A key's first
//! byte says where it lives, so the state machine reads and writes one ordered key space.
//!
//! A batch goes to the ledger first and the lookup second: not atomically across the two, so
//! after a crash either may be ahead of the other. `StateMachine::open` reconciles them from the
//! ledger (`state_machine::reconcile_lookup`).

use std::io;
use std::sync::Arc;

use crate::kv::{KvIter, KvStore, WriteBatch};

/// Whether `key` lives in the lookup store (see `state_machine`'s key table).
pub(crate) fn in_lookup(key: &[u8]) -> bool {
    matches!(key.first(), Some(b'c' | b't' | b'u' | b'x'))
}

#[derive(Debug)]
pub struct SplitStore {
    ledger: Arc<dyn KvStore>,
    lookup: Arc<dyn KvStore>,
}

impl SplitStore {
    pub fn new(ledger: Arc<dyn KvStore>, lookup: Arc<dyn KvStore>) -> Self {
        Self { ledger, lookup }
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
        self.store(key).get(key)
    }

    fn scan_prefix(&self, prefix: &[u8]) -> KvIter<'_> {
        if prefix.is_empty() {
            return merge(self.ledger.scan_prefix(prefix), self.lookup.scan_prefix(prefix), false);
        }
        self.store(prefix).scan_prefix(prefix)
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
        if lookup == 0 {
            self.ledger.range(from, to, rev)
        } else if lookup == usize::from(hi.saturating_sub(lo)) + 1 {
            self.lookup.range(from, to, rev)
        } else {
            merge(self.ledger.range(from, to, rev), self.lookup.range(from, to, rev), rev)
        }
    }

    fn apply(&self, batch: WriteBatch) -> io::Result<()> {
        let (lookup, ledger): (Vec<_>, Vec<_>) = batch.ops.into_iter().partition(|(k, _)| in_lookup(k));
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

    /// Keys of both stores come back as one ordered key space, whichever way it is walked.
    #[test]
    fn scans_and_ranges_merge_both_stores_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::sled_store::SledDb::open(dir.path()).unwrap().tree("state").unwrap();
        let lookup: Arc<dyn KvStore> = Arc::new(Tree::open(&dir.path().join("lookup"), "lookup", 1 << 20).unwrap());
        let split = SplitStore::new(ledger.clone(), lookup.clone());
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
}
