//! Decrypted bodies of recently read versions, by Merkle leaf. A leaf's body never changes,
//! so an entry never goes stale; what can change is whether its compartment still has a
//! key, and readers check that on every read before using an entry (an erased patient's
//! bodies are never served from here). Memory only, bounded, first in first out: search
//! pages read the same hot resources again and again, and decryption was a quarter of a
//! page's cost.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

/// The leaf's header (type, id, version, compartment) and its decrypted body.
pub type Entry = Arc<(consensus::LeafHeader, Arc<str>)>;

pub struct BodyCache {
    inner: Mutex<Inner>,
    budget: usize,
    pub lookups: crate::telemetry::HitRate,
}

#[derive(Default)]
struct Inner {
    bodies: HashMap<u64, Entry>,
    order: VecDeque<u64>,
    bytes: usize,
}

impl BodyCache {
    pub fn new(budget: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), budget, lookups: crate::telemetry::HitRate::default() }
    }

    pub fn get(&self, leaf: u64) -> Option<Entry> {
        let found = self.inner.lock().unwrap_or_else(PoisonError::into_inner).bodies.get(&leaf).cloned();
        self.lookups.record(found.is_some());
        found
    }

    pub fn put(&self, leaf: u64, body: Entry) {
        if body.1.len() > self.budget / 64 {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if g.bodies.contains_key(&leaf) {
            return;
        }
        g.bytes += body.1.len();
        g.bodies.insert(leaf, body);
        g.order.push_back(leaf);
        while g.bytes > self.budget {
            let Some(old) = g.order.pop_front() else { break };
            if let Some(b) = g.bodies.remove(&old) {
                g.bytes -= b.1.len();
            }
        }
    }

    /// Drops every entry (after an erasure, so that no plaintext of it lingers in memory).
    pub fn clear(&self) {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        *g = Inner::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_its_budget_first_in_first_out() {
        let c = BodyCache::new(64 * 10);
        // 100 bodies of 10 bytes over a 640-byte budget: the first ones leave.
        for leaf in 0..100u64 {
            let h = consensus::LeafHeader::default();
            c.put(leaf, Arc::new((h, Arc::from("x".repeat(10).as_str()))));
        }
        assert!(c.get(0).is_none(), "the oldest went first");
        assert_eq!(c.get(99).map(|e| e.1.to_string()).as_deref(), Some("xxxxxxxxxx"));
        assert!(c.inner.lock().unwrap().bytes <= 640);
        c.clear();
        assert!(c.get(99).is_none());
    }
}
