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
            (Some(_), None) => true,
            (None, Some(_)) => false,
            // An error is passed on first, whichever side it is on.
            (Some(Err(_)), _) => true,
            (_, Some(Err(_))) => false,
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
        match (from.first(), to.first()) {
            (Some(f), Some(t)) if f == t => self.store(from).range(from, to, rev),
            _ => merge(self.ledger.range(from, to, rev), self.lookup.range(from, to, rev), rev),
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
