//! The search index on disk: a node-local store beside the state ([`consensus::lsm_store`]), so a
//! restart opens it instead of rebuilding, and memory holds only a bounded cache.
//!
//! No PHI is readable from it at rest (docs/search.md, "What the index holds"):
//!
//! | key | value |
//! | --- | --- |
//! | `i` type 0 id | document key |
//! | `d` type 0 key | [`Record`]: id, version, leaf, lastUpdated, compartment in clear; the values sealed with the compartment's data key |
//! | `p` type 0 term key | posting: a token or reference value, or one of a string's first prefixes (`term` = HMAC of code and value) |
//! | `o` type 0 term key | a date or quantity value in a bucket (HMAC of code, unit and bucket) |
//! | `w` type 0 term key | a wide date or quantity value (HMAC of code): a candidate of every range |
//! | `b` type 0 term | the buckets in use per unit of a parameter, sealed with the index key |
//! | `h` type 0 key | [`Head`]: id, version, leaf in clear (what a page reads of each match) |
//! | `s` type 0 key | [`SortRecord`]: id, lastUpdated, compartment in clear; the least and greatest value of each date, number and quantity parameter, sealed |
//! | `m/…` | the first leaf not folded in yet, the format |
//!
//! Buckets are days for dates and sixteenths of a binary order of magnitude for quantities:
//! a range reads the buckets it overlaps from the (decrypted, cached) bucket list and checks
//! the documents found there, so order is kept without an order-revealing key on disk. The
//! values of a document are sealed with its compartment's key, so `$erase` shreds the index's
//! copy as it shreds the bodies.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, PoisonError};

use consensus::WriteBatch;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use super::doc::Doc;
use super::values::Value;
use crate::crypto::{self, DataKey};
use crate::error::FhirError;
use crate::repo::Repo;
use consensus::lsm_store::Tree;

/// The layout above; a store of another format is cleared and folded again at open.
/// 2: values encoded per parameter ([`Doc::encoded`]), sealed values as bytes. 3: sort records.
/// 4: string prefix postings. 5: head records. 6: bare-id reference postings only where the
/// parameter allows many types (`Param::posts_bare_id`). 7: none for a parameter whose
/// values other parameters' postings hold (`params::Derived`). 8: a document's values
/// compressed before they are sealed ([`seal_values`]).
const FORMAT: u64 = 8;
/// String values are posted under each of their first this many prefixes (in characters).
pub const STR_PREFIX: usize = 6;
/// Records a walk steps over before it seeks instead.
const WALK: usize = 16;
/// Document keys (leaves) at most this far apart are read by one walk ([`Store::walk`]).
const NEAR: DocKey = 4;
const FORMAT_KEY: &[u8] = b"m/format";
const NEXT_KEY: &[u8] = b"m/next";

/// A date bucket: one day, the widest value kept among the points.
const DAY_MS: i64 = NARROW_MS;

/// A document key: the Merkle leaf of the resource's first version. Creation order, the
/// same on every node.
pub type DocKey = u64;

/// The widest date value kept among the points: a day (date precision), so a query range
/// widened by a day finds every point that can overlap it.
pub const NARROW_MS: i64 = 86_400_000;

/// An order-preserving map of finite f64 into u64.
pub fn ord_f64(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

/// A document as stored under its `d` key.
#[derive(Serialize, Deserialize)]
struct Record {
    id: String,
    version: u64,
    leaf: u64,
    last_updated_ms: i64,
    compartment: String,
    /// The values ([`Doc::encoded`]), compressed, sealed with the compartment's data key and
    /// bound to the `d` key ([`seal_values`]). As bytes: bincode reads a plain `Vec<u8>` one element at a time.
    #[serde(with = "serde_bytes")]
    sealed: Vec<u8>,
}

/// What `_sort` reads of a document under its `s` key: small and stored in document-key order,
/// so the matches of one patient (created together) are a few adjacent blocks rather than as
/// many documents opened.
#[derive(Serialize, Deserialize)]
struct SortRecord {
    id: String,
    last_updated_ms: i64,
    compartment: String,
    /// [`SortNums`] sealed with the compartment's data key, bound to the `s` key.
    #[serde(with = "serde_bytes")]
    sealed: Vec<u8>,
}

/// Per date, number or quantity parameter with a value: the least and greatest sort value.
pub type SortNums = Vec<(String, f64, f64)>;

/// A document as `_sort` sees it ([`SortRecord`] opened).
pub struct SortHead {
    pub id: String,
    pub last_updated_ms: i64,
    pub nums: SortNums,
}

/// The sort numbers of a document's values (see [`super::values::sort_num`]).
fn sort_nums(doc: &Doc) -> SortNums {
    let mut out = Vec::new();
    for (code, vals) in doc.params() {
        let mut nums = vals.iter().filter_map(super::values::sort_num);
        let Some(first) = nums.next() else { continue };
        let (lo, hi) = nums.fold((first, first), |(lo, hi), x| {
            (if x.total_cmp(&lo).is_lt() { x } else { lo }, if x.total_cmp(&hi).is_gt() { x } else { hi })
        });
        out.push((code.to_string(), lo, hi));
    }
    out
}

/// Units of one parameter → the buckets that ever held a value. Only grows: an emptied
/// bucket costs one empty scan.
type Buckets = BTreeMap<String, BTreeSet<i64>>;

pub struct Store {
    tree: Tree,
    repo: Arc<Repo>,
    /// Keys postings: HMAC of a parameter's code and value under the index key.
    terms: crate::repo::index::TermKey,
    dir_key: DataKey,
    docs: DocCache,
    buckets: Mutex<HashMap<(String, String), Arc<Buckets>>>,
    /// Compartment data keys by compartment (`None`: erased), emptied with the document cache.
    keys: Mutex<HashMap<String, Option<DataKey>>>,
}

/// What a search result needs of a document without its values: id, version, leaf. Stored
/// apart from the document (`h` keys), a small fraction of its size: a page reads the heads
/// of its matches, and at millions of resources, reading whole documents for them was a
/// quarter of a page's time once their blocks had left the cache (issue 17, BENCHMARKS.md).
#[derive(Serialize, Deserialize)]
pub struct Head {
    pub id: String,
    pub version: u64,
    pub leaf: u64,
}

impl Head {
    fn of(doc: &Doc) -> Self {
        Self { id: doc.id.clone(), version: doc.version, leaf: doc.leaf }
    }
}

/// Writes computed outside the index's write lock, committed under it.
#[derive(Default)]
pub struct Pending {
    batch: WriteBatch,
    evict: Vec<Vec<u8>>,
    buckets: HashMap<(String, String), Buckets>,
}

fn io_err(e: &io::Error) -> FhirError {
    FhirError::internal(format!("search index: {e}"))
}

fn typed(tag: u8, rtype: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(rtype.len() + 48);
    k.push(tag);
    k.extend_from_slice(rtype.as_bytes());
    k.push(0);
    k
}

fn with(mut prefix: Vec<u8>, tail: &[u8]) -> Vec<u8> {
    prefix.extend_from_slice(tail);
    prefix
}

/// The records under `prefix` of each of `keys` (any order, duplicates allowed), in key
/// order; a key without one is left out. Keys close to the next one wanted (one patient's,
/// created in one transaction) are read by walking forward through a few adjacent blocks,
/// the others by a point read: a point read per key probes every level's filter and index
/// again, and a walk opened for a lone key seeks in every level (issue 17: the reads that
/// grew with the store).
fn walk(
    tree: &Tree,
    prefix: &[u8],
    keys: &[DocKey],
    mut each: impl FnMut(DocKey, Vec<u8>, Vec<u8>) -> Result<(), FhirError>,
) -> Result<(), FhirError> {
    type Walk<'w> = std::iter::Peekable<Box<dyn Iterator<Item = io::Result<consensus::lsm_store::Kv>> + 'w>>;
    let end = with(prefix.to_vec(), &[0xff; 9]);
    let seek = |want: &[u8]| -> Walk<'_> {
        let range: Box<dyn Iterator<Item = io::Result<consensus::lsm_store::Kv>>> = Box::new(tree.range(want, &end));
        range.peekable()
    };
    let mut walk: Option<Walk<'_>> = None;
    let mut keys = keys.to_vec();
    keys.sort_unstable();
    keys.dedup();
    let close = |a: DocKey, b: DocKey| b.saturating_sub(a) <= NEAR;
    for (i, &key) in keys.iter().enumerate() {
        let want = with(prefix.to_vec(), &key.to_be_bytes());
        let near_last = i > 0 && close(keys[i - 1], key);
        let near_next = keys.get(i + 1).is_some_and(|&next| close(key, next));
        if !near_last || walk.is_none() {
            walk = None;
            if !near_next {
                if let Some(v) = tree.get(&want).map_err(|e| io_err(&e))? {
                    each(key, want, v)?;
                }
                continue;
            }
            walk = Some(seek(&want));
        }
        let mut steps = 0;
        let raw = loop {
            let Some(it) = walk.as_mut() else { break None };
            let ahead = match it.peek() {
                None => None,
                Some(Ok((k, _))) => Some(k.as_slice().cmp(&want)),
                Some(Err(_)) => Some(std::cmp::Ordering::Equal),
            };
            match ahead {
                Some(std::cmp::Ordering::Less) if steps < WALK => {
                    it.next();
                    steps += 1;
                }
                // More records between than it seemed: seek to it, and walk on from there.
                Some(std::cmp::Ordering::Less) => walk = Some(seek(&want)),
                Some(std::cmp::Ordering::Equal) => break it.next(),
                // Past it, or the end: this key has no record.
                _ => break None,
            }
        };
        let Some(raw) = raw else { continue };
        let (k, v) = raw.map_err(|e| io_err(&e))?;
        each(key, k, v)?;
    }
    Ok(())
}

fn read_be(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

/// A document's encoded values, compressed and sealed under `dkey`. They are most of the
/// index's bytes (1.9 KB a resource, uncompressed: token systems, displays and codes
/// repeated across parameters, bincode's fixed-width lengths), and sealed bytes do not
/// compress, so the LSM tree rewrote them whole at every compaction. Each document is
/// compressed alone: its length shows no more of another resource's values than before.
fn seal_values(dek: &DataKey, encoded: &[u8], dkey: &[u8]) -> Vec<u8> {
    crypto::seal(dek, &lz4_flex::block::compress_prepend_size(encoded), dkey)
}

/// [`seal_values`] undone.
fn open_values(dek: &DataKey, sealed: &[u8], dkey: &[u8]) -> Result<Vec<u8>, FhirError> {
    let packed = crypto::open(dek, sealed, dkey).map_err(FhirError::internal)?;
    lz4_flex::block::decompress_size_prepended(&packed)
        .map_err(|e| FhirError::internal(format!("search index: a document's values do not decompress: {e}")))
}

/// The document key that ends a posting key.
fn key_at(k: &[u8]) -> Option<DocKey> {
    read_be(k.get(k.len().checked_sub(8)?..)?)
}

impl Store {
    /// Opens the tree; a tree of another format (or none) starts empty at leaf 0.
    pub fn open(tree: Tree, repo: Arc<Repo>, cache_bytes: usize) -> Result<Self, FhirError> {
        let derive = |what: &[u8]| -> [u8; 32] {
            let mut h = Sha256::new();
            h.update(what);
            h.update(repo.index_key());
            h.finalize().into()
        };
        let store = Self {
            terms: crate::repo::index::TermKey::new(&derive(b"fhir-ledger search terms v1\0")),
            dir_key: derive(b"fhir-ledger search buckets v1\0"),
            tree,
            repo,
            docs: DocCache::new(cache_bytes),
            buckets: Mutex::default(),
            keys: Mutex::default(),
        };
        let format = store.tree.get(FORMAT_KEY).map_err(|e| io_err(&e))?;
        if format.as_deref().and_then(read_be) != Some(FORMAT) {
            store.clear()?;
        }
        Ok(store)
    }

    /// The first leaf not folded in yet.
    /// Lookups of the decoded-document cache, for `/metrics`.
    pub fn doc_cache_lookups(&self) -> Arc<crate::telemetry::HitRate> {
        self.docs.lookups.clone()
    }

    pub fn next_leaf(&self) -> Result<u64, FhirError> {
        Ok(self.tree.get(NEXT_KEY).map_err(|e| io_err(&e))?.as_deref().and_then(read_be).unwrap_or(0))
    }

    /// Empties the tree (a rebuild, or a tree of another format).
    pub fn clear(&self) -> Result<(), FhirError> {
        self.tree.clear().map_err(|e| io_err(&e))?;
        let mut batch = WriteBatch::default();
        batch.put(FORMAT_KEY.to_vec(), FORMAT.to_be_bytes().to_vec());
        batch.put(NEXT_KEY.to_vec(), 0u64.to_be_bytes().to_vec());
        self.tree.apply(batch).map_err(|e| io_err(&e))?;
        self.docs.clear();
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner).clear();
        Ok(())
    }

    /// Forgets every decoded document and data key (an erasure reached this node).
    pub fn clear_cache(&self) {
        self.docs.clear();
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    fn data_key(&self, compartment: &str) -> Result<Option<DataKey>, FhirError> {
        if let Some(k) = self.keys.lock().unwrap_or_else(PoisonError::into_inner).get(compartment) {
            return Ok(*k);
        }
        let k = self.repo.data_key(compartment)?;
        self.keys.lock().unwrap_or_else(PoisonError::into_inner).insert(compartment.to_string(), k);
        Ok(k)
    }

    fn term(&self, code: &str, value: &str) -> [u8; 16] {
        let t = self.terms.term(code, value);
        let mut out = [0; 16];
        out.copy_from_slice(&t[..16]);
        out
    }

    fn keys(&self, prefix: &[u8]) -> Result<Vec<DocKey>, FhirError> {
        self.keys_from(prefix, 0).collect()
    }

    /// The document keys under `prefix` (a posting, bucket or wide list) from `from` on, in
    /// key order.
    pub fn keys_from<'s>(
        &'s self,
        prefix: &[u8],
        from: DocKey,
    ) -> impl Iterator<Item = Result<DocKey, FhirError>> + 's {
        let start = with(prefix.to_vec(), &from.to_be_bytes());
        let end = with(prefix.to_vec(), &[0xff; 9]);
        self.tree.range(&start, &end).filter_map(|kv| match kv {
            Ok((k, _)) => key_at(&k).map(Ok),
            Err(e) => Some(Err(io_err(&e))),
        })
    }

    // ------------------------------------------------------------------ reading

    pub fn key_of(&self, rtype: &str, id: &str) -> Result<Option<DocKey>, FhirError> {
        let v = self.tree.get(&with(typed(b'i', rtype), id.as_bytes())).map_err(|e| io_err(&e))?;
        Ok(v.as_deref().and_then(read_be))
    }

    /// The ids of every live `rtype` resource, in id order.
    pub fn ids(&self, rtype: &str) -> Result<Vec<String>, FhirError> {
        let prefix = typed(b'i', rtype);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(|e| io_err(&e))?;
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    pub fn doc(&self, rtype: &str, key: DocKey) -> Result<Option<Arc<Doc>>, FhirError> {
        let dkey = with(typed(b'd', rtype), &key.to_be_bytes());
        if let Some(d) = self.docs.get(&dkey) {
            return Ok(Some(d));
        }
        let Some(raw) = self.tree.get(&dkey).map_err(|e| io_err(&e))? else { return Ok(None) };
        self.decode(dkey, &raw)
    }

    /// A document's id, version and leaf, read without opening its values.
    pub fn head(&self, rtype: &str, key: DocKey) -> Result<Option<Head>, FhirError> {
        let dkey = with(typed(b'd', rtype), &key.to_be_bytes());
        if let Some(d) = self.docs.get(&dkey) {
            return Ok(Some(Head::of(&d)));
        }
        let Some(raw) = self.tree.get(&with(typed(b'h', rtype), &key.to_be_bytes())).map_err(|e| io_err(&e))? else {
            return Ok(None);
        };
        Ok(Some(bincode::deserialize(&raw).map_err(FhirError::internal)?))
    }

    fn decode(&self, dkey: Vec<u8>, raw: &[u8]) -> Result<Option<Arc<Doc>>, FhirError> {
        let rec: Record = bincode::deserialize(raw).map_err(FhirError::internal)?;
        // An erased compartment's documents leave with the fold of its erasure.
        let Some(dek) = self.data_key(&rec.compartment)? else { return Ok(None) };
        let plain = open_values(&dek, &rec.sealed, &dkey)?;
        // The cache's budget counts what the decoded document holds, not its compressed form.
        let held = plain.len() + raw.len().saturating_sub(rec.sealed.len());
        let doc = Doc::decode(rec.id, rec.version, rec.leaf, rec.last_updated_ms, plain)
            .ok_or_else(|| FhirError::internal("search index: a document's values are malformed"))?;
        let doc = Arc::new(doc);
        self.docs.put(dkey, doc.clone(), held);
        Ok(Some(doc))
    }

    /// The records under `tag` of each of `keys` ([`walk`]).
    fn walk(
        &self,
        tag: u8,
        rtype: &str,
        keys: &[DocKey],
        each: impl FnMut(DocKey, Vec<u8>, Vec<u8>) -> Result<(), FhirError>,
    ) -> Result<(), FhirError> {
        walk(&self.tree, &typed(tag, rtype), keys, each)
    }

    /// The sort records of `keys` (ascending), in that order; a key without one (erased, or
    /// gone) is left out.
    pub fn sort_heads(&self, rtype: &str, keys: &[DocKey]) -> Result<Vec<(DocKey, SortHead)>, FhirError> {
        let mut out = Vec::with_capacity(keys.len());
        self.walk(b's', rtype, keys, |key, k, v| {
            let rec: SortRecord = bincode::deserialize(&v).map_err(FhirError::internal)?;
            let Some(dek) = self.data_key(&rec.compartment)? else { return Ok(()) };
            let plain = crypto::open(&dek, &rec.sealed, &k).map_err(FhirError::internal)?;
            let nums: SortNums = bincode::deserialize(&plain).map_err(FhirError::internal)?;
            out.push((key, SortHead { id: rec.id, last_updated_ms: rec.last_updated_ms, nums }));
            Ok(())
        })?;
        Ok(out)
    }

    /// The decoded documents of `keys` in the cache, and the keys it does not hold.
    fn cached(&self, rtype: &str, keys: &[DocKey]) -> (Vec<(DocKey, Arc<Doc>)>, Vec<DocKey>) {
        let (mut hits, mut missed) = (Vec::new(), Vec::new());
        for &key in keys {
            match self.docs.get(&with(typed(b'd', rtype), &key.to_be_bytes())) {
                Some(d) => hits.push((key, d)),
                None => missed.push(key),
            }
        }
        (hits, missed)
    }

    /// [`Store::head`] of each of `keys` that has a document, read together ([`Store::walk`]).
    pub fn heads(&self, rtype: &str, keys: &[DocKey]) -> Result<HashMap<DocKey, Head>, FhirError> {
        let (hits, missed) = self.cached(rtype, keys);
        let mut out: HashMap<DocKey, Head> = hits.into_iter().map(|(key, d)| (key, Head::of(&d))).collect();
        self.walk(b'h', rtype, &missed, |key, _, v| {
            out.insert(key, bincode::deserialize(&v).map_err(FhirError::internal)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// [`Store::doc`] of each of `keys` that has a live document, read together
    /// ([`Store::walk`]).
    pub fn docs(&self, rtype: &str, keys: &[DocKey]) -> Result<HashMap<DocKey, Arc<Doc>>, FhirError> {
        let (hits, missed) = self.cached(rtype, keys);
        let mut out: HashMap<DocKey, Arc<Doc>> = hits.into_iter().collect();
        self.walk(b'd', rtype, &missed, |key, k, v| {
            if let Some(d) = self.decode(k, &v)? {
                out.insert(key, d);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Live documents of `rtype` from key `from` on, in key order.
    pub fn scan<'s>(
        &'s self,
        rtype: &str,
        from: DocKey,
    ) -> impl Iterator<Item = Result<(DocKey, Arc<Doc>), FhirError>> + 's {
        let prefix = typed(b'd', rtype);
        let start = with(prefix.clone(), &from.to_be_bytes());
        let mut end = prefix;
        end.extend_from_slice(&[0xff; 9]);
        self.tree.range(&start, &end).filter_map(move |kv| {
            let (k, v) = match kv {
                Ok(kv) => kv,
                Err(e) => return Some(Err(io_err(&e))),
            };
            let key = key_at(&k)?;
            if let Some(d) = self.docs.get(&k) {
                return Some(Ok((key, d)));
            }
            self.decode(k, &v).transpose().map(|d| d.map(|d| (key, d)))
        })
    }

    /// Documents holding `value` under `code` (see [`posting_keys`]), in key order.
    pub fn posting(&self, rtype: &str, code: &str, value: &str) -> Result<Vec<DocKey>, FhirError> {
        self.keys(&self.posting_prefix(rtype, code, value))
    }

    /// Where the keys of [`Store::posting`] lie.
    pub fn posting_prefix(&self, rtype: &str, code: &str, value: &str) -> Vec<u8> {
        with(typed(b'p', rtype), &self.term(code, value))
    }

    /// Where the documents with a point value of `code` in `unit` (every unit when `None`)
    /// whose bucket lies in the buckets of `[lo, hi]` lie, and every wide one.
    fn ranged(
        &self,
        rtype: &str,
        code: &str,
        unit: Option<&str>,
        (lo, hi): (i64, i64),
    ) -> Result<Vec<Vec<u8>>, FhirError> {
        let mut out = vec![with(typed(b'w', rtype), &self.term(code, ""))];
        if lo > hi {
            return Ok(out);
        }
        let buckets = self.buckets_of(rtype, code)?;
        for (u, set) in buckets.iter().filter(|(u, _)| unit.is_none_or(|w| w == u.as_str())) {
            for b in set.range(lo..=hi) {
                out.push(with(typed(b'o', rtype), &self.term(code, &bucket_value(u, *b))));
            }
        }
        Ok(out)
    }

    /// Where the documents whose date value may start in `[from, to)` lie (and every wide one).
    pub fn date_prefixes(&self, rtype: &str, code: &str, (from, to): (i64, i64)) -> Result<Vec<Vec<u8>>, FhirError> {
        let hi = if from < to { to.saturating_sub(1).div_euclid(DAY_MS) } else { i64::MIN };
        self.ranged(rtype, code, None, (from.div_euclid(DAY_MS), hi))
    }

    /// Where the documents whose number or quantity may lie in `[from, to]` lie (and every
    /// wide one).
    pub fn num_prefixes(
        &self,
        rtype: &str,
        code: &str,
        unit: Option<&str>,
        (from, to): (f64, f64),
    ) -> Result<Vec<Vec<u8>>, FhirError> {
        self.ranged(rtype, code, unit, (num_bucket(from), num_bucket(to)))
    }

    fn buckets_key(&self, rtype: &str, code: &str) -> Vec<u8> {
        with(typed(b'b', rtype), &self.term(code, ""))
    }

    fn buckets_of(&self, rtype: &str, code: &str) -> Result<Arc<Buckets>, FhirError> {
        let id = (rtype.to_string(), code.to_string());
        if let Some(b) = self.buckets.lock().unwrap_or_else(PoisonError::into_inner).get(&id) {
            return Ok(b.clone());
        }
        let key = self.buckets_key(rtype, code);
        let b: Buckets = match self.tree.get(&key).map_err(|e| io_err(&e))? {
            None => Buckets::new(),
            Some(sealed) => {
                let plain = crypto::open(&self.dir_key, &sealed, &key).map_err(FhirError::internal)?;
                bincode::deserialize(&plain).map_err(FhirError::internal)?
            }
        };
        let b = Arc::new(b);
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner).insert(id, b.clone());
        Ok(b)
    }

    // ------------------------------------------------------------------ writing

    /// Removes `old` (the stored document at `key`) from the index.
    pub fn remove(&self, p: &mut Pending, rtype: &str, key: DocKey, old: &Doc) -> Result<(), FhirError> {
        p.batch.delete(with(typed(b'i', rtype), old.id.as_bytes()));
        let dkey = with(typed(b'd', rtype), &key.to_be_bytes());
        p.batch.delete(dkey.clone());
        p.evict.push(dkey);
        p.batch.delete(with(typed(b'h', rtype), &key.to_be_bytes()));
        p.batch.delete(with(typed(b's', rtype), &key.to_be_bytes()));
        for k in self.value_keys(p, rtype, key, old, None)? {
            p.batch.delete(k);
        }
        Ok(())
    }

    /// Adds `doc` at `key` (after [`Store::remove`] of what was there), posting the values of
    /// the parameters `posted` says keep postings of their own. A removal takes away every
    /// parameter's, so no posting outlives a change of which those are.
    pub fn insert(
        &self,
        p: &mut Pending,
        rtype: &str,
        key: DocKey,
        doc: &Doc,
        compartment: &str,
        posted: impl Fn(&str) -> bool,
    ) -> Result<(), FhirError> {
        let Some(dek) = self.repo.data_key(compartment)? else { return Ok(()) };
        let dkey = with(typed(b'd', rtype), &key.to_be_bytes());
        let rec = Record {
            id: doc.id.clone(),
            version: doc.version,
            leaf: doc.leaf,
            last_updated_ms: doc.last_updated_ms,
            compartment: compartment.to_string(),
            sealed: seal_values(&dek, doc.encoded(), &dkey),
        };
        p.batch.put(dkey.clone(), bincode::serialize(&rec).map_err(FhirError::internal)?);
        p.evict.push(dkey);
        let head = Head::of(doc);
        p.batch
            .put(with(typed(b'h', rtype), &key.to_be_bytes()), bincode::serialize(&head).map_err(FhirError::internal)?);
        let skey = with(typed(b's', rtype), &key.to_be_bytes());
        let nums = bincode::serialize(&sort_nums(doc)).map_err(FhirError::internal)?;
        let sort = SortRecord {
            id: doc.id.clone(),
            last_updated_ms: doc.last_updated_ms,
            compartment: compartment.to_string(),
            sealed: crypto::seal(&dek, &nums, &skey),
        };
        p.batch.put(skey, bincode::serialize(&sort).map_err(FhirError::internal)?);
        p.batch.put(with(typed(b'i', rtype), doc.id.as_bytes()), key.to_be_bytes().to_vec());
        for k in self.value_keys(p, rtype, key, doc, Some(&posted))? {
            p.batch.put(k, Vec::new());
        }
        Ok(())
    }

    /// The posting, bucket and wide keys of `values`. When adding (`posted` given), only the
    /// parameters it accepts, and new buckets are noted.
    fn value_keys(
        &self,
        p: &mut Pending,
        rtype: &str,
        key: DocKey,
        doc: &Doc,
        posted: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<Vec<Vec<u8>>, FhirError> {
        let doc_key = key.to_be_bytes();
        let mut out = Vec::new();
        let adding = posted.is_some();
        for (code, vals) in doc.params().filter(|(code, _)| posted.is_none_or(|keep| keep(code))) {
            for v in vals {
                for pk in posting_keys(v) {
                    out.push(with(with(typed(b'p', rtype), &self.term(code, &pk)), &doc_key));
                }
                let slots = ordered_slots(v);
                // Range conditions on one parameter are answered from one window; a document
                // with several values may satisfy each by another value, so it is wide.
                let wide = vals.len() > 1 && !slots.is_empty();
                for slot in slots {
                    match slot {
                        Slot::Point(unit, bucket) if !wide => {
                            out.push(with(
                                with(typed(b'o', rtype), &self.term(code, &bucket_value(&unit, bucket))),
                                &doc_key,
                            ));
                            if adding {
                                self.note_bucket(p, rtype, code, unit, bucket)?;
                            }
                        }
                        _ => out.push(with(with(typed(b'w', rtype), &self.term(code, "")), &doc_key)),
                    }
                }
            }
        }
        Ok(out)
    }

    fn note_bucket(
        &self,
        p: &mut Pending,
        rtype: &str,
        code: &str,
        unit: String,
        bucket: i64,
    ) -> Result<(), FhirError> {
        let id = (rtype.to_string(), code.to_string());
        if !p.buckets.contains_key(&id) {
            let known = self.buckets_of(rtype, code)?;
            if known.get(&unit).is_some_and(|s| s.contains(&bucket)) {
                return Ok(());
            }
            p.buckets.insert(id.clone(), (*known).clone());
        }
        if let Some(b) = p.buckets.get_mut(&id) {
            b.entry(unit).or_default().insert(bucket);
        }
        Ok(())
    }

    /// Waits until a commit would not be held by the store's backpressure, so the folder
    /// waits before taking the index's write lock (searches go on meanwhile), not under it.
    pub fn wait_for_room(&self) {
        self.tree.wait_for_room();
    }

    /// Writes `p` with `next` as the first leaf not folded in, atomically.
    pub fn commit(&self, mut p: Pending, next: u64) -> Result<(), FhirError> {
        let buckets = std::mem::take(&mut p.buckets);
        for ((rtype, code), b) in &buckets {
            let key = self.buckets_key(rtype, code);
            let plain = bincode::serialize(b).map_err(FhirError::internal)?;
            p.batch.put(key.clone(), crypto::seal(&self.dir_key, &plain, &key));
        }
        p.batch.put(NEXT_KEY.to_vec(), next.to_be_bytes().to_vec());
        self.tree.apply(p.batch).map_err(|e| io_err(&e))?;
        for k in &p.evict {
            self.docs.remove(k);
        }
        let mut cached = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, b) in buckets {
            cached.insert(id, Arc::new(b));
        }
        Ok(())
    }
}

fn bucket_value(unit: &str, bucket: i64) -> String {
    format!("{unit}\0{bucket}")
}

/// A quantity's bucket: sign, exponent and the top four bits of the mantissa of its
/// order-preserving form, so buckets follow numeric order.
fn num_bucket(x: f64) -> i64 {
    i64::try_from(ord_f64(x) >> 48).unwrap_or(i64::MAX)
}

enum Slot {
    Point(String, i64),
    Wide,
}

/// Where a value goes among the ordered values. A quantity is filed under its code and, when
/// different, its unit too (`5.4||mg` matches either).
// Exact float equality on purpose: a point quantity's bounds are the same parsed value.
#[allow(clippy::float_cmp)]
fn ordered_slots(v: &Value) -> Vec<Slot> {
    match v {
        Value::Date { lo, hi } if *lo != i64::MIN && *hi != i64::MAX && hi - lo <= NARROW_MS => {
            vec![Slot::Point(String::new(), lo.div_euclid(DAY_MS))]
        }
        Value::Quantity { lo, hi, code, unit, .. } if lo == hi && lo.is_finite() => {
            let mut units: Vec<String> = code.iter().chain(unit.iter()).cloned().collect();
            units.dedup();
            if units.is_empty() {
                units.push(String::new());
            }
            units.into_iter().map(|u| Slot::Point(u, num_bucket(*lo))).collect()
        }
        Value::Date { .. } | Value::Quantity { .. } => vec![Slot::Wide],
        _ => Vec::new(),
    }
}

/// The posting keys of a value: token `code`, `system|code`, `system|` and (for bare codes)
/// `\0|code`; reference `Type/id` and (where the parameter posts bare ids) `id`; string each prefix of its normalized form up to
/// [`STR_PREFIX`] characters ([`str_prefix_key`]).
fn posting_keys(v: &Value) -> Vec<String> {
    match v {
        // The end of each of the first prefixes: after the first character, the second, ...
        Value::Str { norm, .. } => norm
            .char_indices()
            .skip(1)
            .map(|(i, _)| i)
            .chain([norm.len()])
            .take(STR_PREFIX)
            .filter(|&end| end > 0)
            .map(|end| str_prefix_key(&norm[..end]))
            .collect(),
        Value::Token { system, code, bare, .. } => {
            let mut keys = Vec::with_capacity(3);
            if let Some(c) = code {
                keys.push(c.clone());
                if let Some(s) = system {
                    keys.push(format!("{s}|{c}"));
                }
                if *bare {
                    keys.push(format!("\0|{c}"));
                }
            }
            if let Some(s) = system {
                keys.push(format!("{s}|"));
            }
            keys
        }
        Value::Ref { rtype, id: Some(id), bare, .. } => {
            let mut keys = Vec::with_capacity(2);
            if let Some(t) = rtype {
                keys.push(format!("{t}/{id}"));
            }
            if *bare || rtype.is_none() {
                keys.push(id.clone());
            }
            keys
        }
        _ => Vec::new(),
    }
}

/// The posting key of a normalized string prefix (tagged, so that no token or reference value
/// of the same parameter could share it).
pub fn str_prefix_key(prefix: &str) -> String {
    format!("\u{1}{prefix}")
}

/// Decoded documents by `d` key, first in first out within a byte budget.
struct DocCache {
    inner: Mutex<CacheInner>,
    budget: usize,
    lookups: Arc<crate::telemetry::HitRate>,
}

#[derive(Default)]
struct CacheInner {
    docs: HashMap<Vec<u8>, (Arc<Doc>, usize)>,
    order: VecDeque<Vec<u8>>,
    bytes: usize,
}

impl DocCache {
    fn new(budget: usize) -> Self {
        Self { inner: Mutex::default(), budget, lookups: Arc::default() }
    }

    fn get(&self, key: &[u8]) -> Option<Arc<Doc>> {
        let found = self.inner.lock().unwrap_or_else(PoisonError::into_inner).docs.get(key).map(|(d, _)| d.clone());
        self.lookups.record(found.is_some());
        found
    }

    fn put(&self, key: Vec<u8>, doc: Arc<Doc>, stored_len: usize) {
        // Decoded values take about three times their encoded size.
        let size = stored_len * 3 + key.len() + 64;
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if g.docs.contains_key(&key) {
            return;
        }
        g.bytes += size;
        g.order.push_back(key.clone());
        g.docs.insert(key, (doc, size));
        // Documents removed by a fold leave their key in the queue; drop those before the
        // queue outgrows the map (a hot resource read and updated again and again).
        if g.order.len() > 2 * g.docs.len() + 1024 {
            let CacheInner { docs, order, .. } = &mut *g;
            let mut seen = std::collections::HashSet::with_capacity(docs.len());
            order.retain(|k| docs.contains_key(k) && seen.insert(k.clone()));
        }
        while g.bytes > self.budget {
            let Some(old) = g.order.pop_front() else { break };
            if let Some((_, s)) = g.docs.remove(&old) {
                g.bytes -= s;
            }
        }
    }

    fn remove(&self, key: &[u8]) {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, s)) = g.docs.remove(key) {
            g.bytes -= s;
        }
    }

    fn clear(&self) {
        *self.inner.lock().unwrap_or_else(PoisonError::into_inner) = CacheInner::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::doc::Values;

    #[test]
    fn document_values_are_compressed_then_sealed_to_their_key() {
        let mut values = Values::new();
        let coding = |code: &str| Value::Token {
            system: Some("http://loinc.org".into()),
            code: Some(code.into()),
            text: Some("body mass index (bmi) [ratio]".into()),
            types: Vec::new(),
            bare: false,
        };
        for code in ["code", "combo-code", "component-code"] {
            values.insert(code.into(), vec![coding("39156-5"), coding("8302-2")]);
        }
        let doc = Doc::new("x".into(), 1, 7, 9, values);
        let (dek, dkey) = ([7u8; 32], with(typed(b'd', "Observation"), &7u64.to_be_bytes()));
        let sealed = seal_values(&dek, doc.encoded(), &dkey);
        assert!(sealed.len() * 2 < doc.encoded().len(), "{} sealed of {} encoded", sealed.len(), doc.encoded().len());
        assert_eq!(open_values(&dek, &sealed, &dkey).unwrap(), doc.encoded());
        let other = with(typed(b'd', "Observation"), &8u64.to_be_bytes());
        assert!(open_values(&dek, &sealed, &other).is_err(), "bound to its own key");
        assert!(open_values(&[8u8; 32], &sealed, &dkey).is_err(), "opened only with the compartment's key");
        // Sealed but not compressed values (a size of 1 MiB, then too few bytes) are an error,
        // not a panic or a short document.
        let not_lz4 = crypto::seal(&dek, &[0, 0, 16, 0, 0xf0, 1], &dkey);
        assert!(open_values(&dek, &not_lz4, &dkey).is_err(), "a malformed block is refused");
    }

    #[test]
    fn a_walk_finds_what_point_reads_find_near_and_far() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::open(dir.path(), "walk", 1 << 20).unwrap();
        let stored: BTreeSet<DocKey> = (1..60).chain((62..200).step_by(7)).chain([1_000, 1_001, 90_000]).collect();
        let mut batch = WriteBatch::default();
        for &k in &stored {
            batch.put(with(b"dX\0".to_vec(), &k.to_be_bytes()), k.to_string().into_bytes());
            // Records of another prefix on both sides must never be taken.
            batch.put(with(b"dW\0".to_vec(), &k.to_be_bytes()), b"other".to_vec());
            batch.put(with(b"dY\0".to_vec(), &k.to_be_bytes()), b"other".to_vec());
        }
        tree.apply(batch).unwrap();
        // Runs of neighbours, lone keys, keys without a record (inside a run, between runs,
        // past the end), duplicates, out of order; and a run that outlasts one walk's steps.
        let wanted: Vec<DocKey> =
            vec![90_000, 3, 2, 2, 7, 8, 9, 60, 61, 62, 69, 70, 999, 1_000, 1_001, 1_002, 5_000, 0, 100_000, 1]
                .into_iter()
                .chain((20..50).step_by(3))
                .chain(62..200)
                .collect();
        let mut got = Vec::new();
        walk(&tree, b"dX\0", &wanted, |key, k, v| {
            assert_eq!(k, with(b"dX\0".to_vec(), &key.to_be_bytes()), "each record comes with its own key");
            got.push((key, String::from_utf8(v).unwrap()));
            Ok(())
        })
        .unwrap();
        let want: BTreeSet<DocKey> = wanted.iter().copied().filter(|k| stored.contains(k)).collect();
        let want: Vec<(DocKey, String)> = want.into_iter().map(|k| (k, k.to_string())).collect();
        assert_eq!(got, want, "every stored key once, in key order; nothing else");
        // Near in key, but more records between than a walk steps over: it seeks instead.
        let mut got = Vec::new();
        walk(&tree, b"dX\0", &[2, 30, 58], |key, _, _| {
            got.push(key);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, [2, 30, 58]);
    }

    #[test]
    fn buckets_follow_the_order_of_values() {
        let nums = [-1e9, -5.5, -1.0, -0.0, 0.0, 1e-9, 0.5, 1.0, 1.06, 7.0, 64.0, 1e12];
        for w in nums.windows(2) {
            assert!(num_bucket(w[0]) <= num_bucket(w[1]), "{} before {}", w[0], w[1]);
        }
        assert!(num_bucket(1.0) < num_bucket(2.0), "an octave spans several buckets");
        // Days before 1970 round down, so a window's first bucket holds its start.
        assert_eq!((-1i64).div_euclid(DAY_MS), -1);
        assert_eq!((DAY_MS - 1).div_euclid(DAY_MS), 0);
    }

    #[test]
    fn the_document_cache_keeps_its_budget_and_a_short_queue() {
        let doc = || Arc::new(Doc::new("x".into(), 1, 0, 0, Values::new()));
        let c = DocCache::new(1 << 20);
        // A hot document cached, then removed by a fold, again and again.
        for _ in 0..10_000 {
            c.put(b"hot".to_vec(), doc(), 100);
            c.remove(b"hot");
        }
        let g = c.inner.lock().unwrap();
        assert!(g.order.len() <= 2 * g.docs.len() + 1025, "queue of {}", g.order.len());
        drop(g);
        let small = DocCache::new(4_000);
        for i in 0..100u64 {
            small.put(i.to_be_bytes().to_vec(), doc(), 100);
        }
        assert!(small.get(&0u64.to_be_bytes()).is_none(), "the oldest went first");
        assert!(small.get(&99u64.to_be_bytes()).is_some());
        assert!(small.inner.lock().unwrap().bytes <= 4_000);
    }

    #[test]
    fn a_value_is_a_point_only_when_narrow_and_closed() {
        let day = Value::Date { lo: 0, hi: DAY_MS };
        assert!(matches!(ordered_slots(&day)[..], [Slot::Point(_, 0)]));
        let open = Value::Date { lo: 0, hi: i64::MAX };
        assert!(matches!(ordered_slots(&open)[..], [Slot::Wide]));
        let q =
            Value::Quantity { lo: 5.0, hi: 5.0, system: None, code: Some("mg".into()), unit: Some("milligram".into()) };
        assert_eq!(ordered_slots(&q).len(), 2, "filed under its code and its unit");
    }
}
