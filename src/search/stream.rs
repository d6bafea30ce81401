//! Candidate documents as streams of keys in key order, read from the store only as far as a
//! search needs: a page of fifty matches among a million reads some fifty keys of each posting
//! (skipping ahead where an intersection allows) instead of every key of every posting.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::store::{DocKey, Store};
use crate::error::FhirError;

/// What one condition names: the union of some postings (key prefixes) and of some keys known
/// already (ids looked up).
#[derive(Default)]
pub struct Source {
    prefixes: Vec<Vec<u8>>,
    keys: Vec<DocKey>,
}

impl Source {
    pub fn of(prefixes: Vec<Vec<u8>>) -> Self {
        Self { prefixes, keys: Vec::new() }
    }

    pub fn keys(mut keys: Vec<DocKey>) -> Self {
        keys.sort_unstable();
        keys.dedup();
        Self { prefixes: Vec::new(), keys }
    }

    /// The union of both.
    pub fn add(&mut self, other: Source) {
        self.prefixes.extend(other.prefixes);
        self.keys.extend(other.keys);
        self.keys.sort_unstable();
        self.keys.dedup();
    }
}

type Keys<'s> = Box<dyn Iterator<Item = Result<DocKey, FhirError>> + 's>;

/// One posting's keys; reopened further on when a seek skips far, or back when one goes back.
struct Run<'s> {
    prefix: Vec<u8>,
    /// The last key sought: every key between it and `head` is known absent.
    sought: DocKey,
    iter: Option<Keys<'s>>,
    head: Option<DocKey>,
    done: bool,
}

/// Steps a run takes forward before a seek reopens it at the target instead.
const WALK: usize = 8;

impl<'s> Run<'s> {
    fn seek(&mut self, store: &'s Store, k: DocKey) -> Result<Option<DocKey>, FhirError> {
        if k < self.sought {
            (self.iter, self.head, self.done) = (None, None, false);
        }
        self.sought = k;
        if let Some(h) = self.head.filter(|h| *h >= k) {
            return Ok(Some(h));
        }
        if self.done {
            return Ok(None);
        }
        if let Some(it) = self.iter.as_mut().filter(|_| self.head.is_some()) {
            for _ in 0..WALK {
                self.head = it.next().transpose()?;
                match self.head {
                    None => {
                        self.done = true;
                        return Ok(None);
                    }
                    Some(h) if h >= k => return Ok(Some(h)),
                    Some(_) => {}
                }
            }
        }
        let mut it: Keys<'s> = Box::new(store.keys_from(&self.prefix, k));
        self.head = it.next().transpose()?;
        self.done = self.head.is_none();
        self.iter = Some(it);
        Ok(self.head)
    }
}

/// The keys of a [`Source`], in key order; a seek may go forward or back.
///
/// The runs are merged through a heap of their heads, so a union of many postings (a quantity
/// range over many magnitude buckets, many references) streams like one: it once read every
/// key of a union of more than 16 postings into memory, which grew with the data (a quantity
/// range took 5-9x as long at ten times the resources).
pub struct Union<'s> {
    store: &'s Store,
    runs: Vec<Run<'s>>,
    /// The runs' heads at or after `at`, least first; runs not in it are exhausted.
    heads: BinaryHeap<Reverse<(DocKey, usize)>>,
    /// The key the last seek asked for (`None` before the first seek and after a failed one).
    at: Option<DocKey>,
    keys: Vec<DocKey>,
}

impl<'s> Union<'s> {
    pub fn new(store: &'s Store, source: Source) -> Self {
        let Source { prefixes, keys } = source;
        let runs = prefixes.into_iter().map(|prefix| Run { prefix, sought: 0, iter: None, head: None, done: false });
        Self { store, runs: runs.collect(), heads: BinaryHeap::new(), at: None, keys }
    }

    /// The first key at or after `k`, if any.
    pub fn seek(&mut self, k: DocKey) -> Result<Option<DocKey>, FhirError> {
        // Taken until the seek succeeds: after an error the next seek starts over.
        if self.at.take().is_none_or(|at| k < at) {
            // The first seek, or one going back: every run starts over from `k`.
            self.heads.clear();
            for (i, r) in self.runs.iter_mut().enumerate() {
                if let Some(h) = r.seek(self.store, k)? {
                    self.heads.push(Reverse((h, i)));
                }
            }
        } else {
            // Forward: only the runs whose head lies before `k` move.
            while let Some(&Reverse((h, i))) = self.heads.peek() {
                if h >= k {
                    break;
                }
                self.heads.pop();
                if let Some(h) = self.runs[i].seek(self.store, k)? {
                    self.heads.push(Reverse((h, i)));
                }
            }
        }
        self.at = Some(k);
        let mut first = self.heads.peek().map(|Reverse((h, _))| *h);
        if let Some(&h) = self.keys.get(self.keys.partition_point(|x| *x < k)) {
            first = Some(first.map_or(h, |f: DocKey| f.min(h)));
        }
        Ok(first)
    }
}

/// The keys every part holds, in key order (a leapfrog join: each part skips to where the
/// others are).
pub struct Meet<'s> {
    parts: Vec<Union<'s>>,
}

impl<'s> Meet<'s> {
    pub fn new(parts: Vec<Union<'s>>) -> Self {
        Self { parts }
    }

    /// The first key at or after `k` that every part holds.
    pub fn seek(&mut self, mut k: DocKey) -> Result<Option<DocKey>, FhirError> {
        if self.parts.is_empty() {
            return Ok(None);
        }
        loop {
            let mut agreed = true;
            for p in &mut self.parts {
                match p.seek(k)? {
                    None => return Ok(None),
                    Some(h) if h > k => {
                        k = h;
                        agreed = false;
                    }
                    Some(_) => {}
                }
            }
            if agreed {
                return Ok(Some(k));
            }
        }
    }

    /// The keys from `k` on, one at a time.
    pub fn from(&mut self, k: DocKey) -> impl Iterator<Item = Result<DocKey, FhirError>> + use<'_, 's> {
        let mut next = Some(k);
        std::iter::from_fn(move || {
            let at = next?;
            match self.seek(at) {
                Ok(Some(h)) => {
                    next = h.checked_add(1);
                    Some(Ok(h))
                }
                Ok(None) => {
                    next = None;
                    None
                }
                Err(e) => {
                    next = None;
                    Some(Err(e))
                }
            }
        })
    }
}
