//! The search index: a deterministic fold over the Merkle log's leaves, kept on disk.
//!
//! Every node applies the same leaves in the same order, so every node derives the same index
//! (and the same document keys: a resource's key is the leaf of its first version). It is
//! stored in a node-local tree (`store.rs`: terms and buckets HMAC'd, values sealed with the
//! compartment keys), so a restart opens it and folds only the leaves appended since; memory
//! holds a bounded cache of decoded documents. Each search first catches up with new leaves,
//! so it sees every write acknowledged before it began.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use super::params::{Derived, Kind, Registry};
pub use super::store::{str_prefix_key, Doc, DocKey, Head, SortHead, NARROW_MS, STR_PREFIX};
use super::store::{Pending, Store};
pub use super::stream::Source;
use super::values::{extract, Value};
use crate::config::IndexCaches;
use crate::error::FhirError;
use crate::fhir::fhirpath::Eval;
use crate::fhir::json::{self, Json};
use crate::fhir::profiles::Profiles;
use crate::repo::Repo;

/// The documents of each of `codes`' sources.
fn union(codes: &[String], each: impl Fn(&str) -> Result<Source, FhirError>) -> Result<Source, FhirError> {
    let mut source = Source::default();
    for c in codes {
        source.add(each(c)?);
    }
    Ok(source)
}

/// Whether `reference` (`Type/id`) is of `rtype`.
fn of_type(reference: &str, rtype: &str) -> bool {
    reference.split_once('/').is_some_and(|(t, _)| t == rtype)
}

/// The live resources of one type, read from the store.
pub struct TypeDocs<'i> {
    idx: &'i Index,
    rtype: &'i str,
}

impl TypeDocs<'_> {
    pub fn doc(&self, id: &str) -> Result<Option<(DocKey, Arc<Doc>)>, FhirError> {
        let Some(k) = self.idx.store.key_of(self.rtype, id)? else { return Ok(None) };
        Ok(self.get(k)?.map(|d| (k, d)))
    }

    pub fn get(&self, key: DocKey) -> Result<Option<Arc<Doc>>, FhirError> {
        self.idx.store.doc(self.rtype, key)
    }

    /// What `_sort` needs of each of `keys` (ascending), without opening their documents.
    pub fn sort_heads(&self, keys: &[DocKey]) -> Result<Vec<(DocKey, SortHead)>, FhirError> {
        self.idx.store.sort_heads(self.rtype, keys)
    }

    /// Id, version and leaf without the values (what a result needs when no guard looks).
    pub fn head(&self, key: DocKey) -> Result<Option<Head>, FhirError> {
        self.idx.store.head(self.rtype, key)
    }

    /// [`TypeDocs::head`] of each of `keys` with a document, read together (cheaper than a
    /// read per key when they lie close, as one patient's do).
    pub fn heads(&self, keys: &[DocKey]) -> Result<HashMap<DocKey, Head>, FhirError> {
        self.idx.store.heads(self.rtype, keys)
    }

    /// [`TypeDocs::get`] of each of `keys` with a live document, read together.
    pub fn docs(&self, keys: &[DocKey]) -> Result<HashMap<DocKey, Arc<Doc>>, FhirError> {
        self.idx.store.docs(self.rtype, keys)
    }

    pub fn key_of(&self, id: &str) -> Result<Option<DocKey>, FhirError> {
        self.idx.store.key_of(self.rtype, id)
    }

    /// The ids of every live resource of the type.
    pub fn ids(&self) -> Result<Vec<String>, FhirError> {
        self.idx.store.ids(self.rtype)
    }

    /// Documents from key `from` on, in key order.
    pub fn scan(&self, from: DocKey) -> impl Iterator<Item = Result<(DocKey, Arc<Doc>), FhirError>> + '_ {
        self.idx.store.scan(self.rtype, from)
    }

    /// Documents holding `value` under `code`, in key order: token `code`, `system|code`,
    /// `system|` and (for bare codes) `\0|code`; reference `Type/id` (and `id` where the
    /// parameter posts bare ids: [`TypeDocs::reference_source`] reads those).
    pub fn posting(&self, code: &str, value: &str) -> Result<Vec<DocKey>, FhirError> {
        match self.derived(code) {
            None => self.idx.store.posting(self.rtype, code, value),
            Some(Derived::Union(codes)) => {
                let mut keys = Vec::new();
                for c in codes {
                    keys.extend(self.posting(c, value)?);
                }
                keys.sort_unstable();
                keys.dedup();
                Ok(keys)
            }
            Some(Derived::Restricted { by, target }) if of_type(value, target) => self.posting(by, value),
            Some(Derived::Restricted { .. }) => Ok(Vec::new()),
        }
    }

    /// [`TypeDocs::posting`] as a stream.
    pub fn posting_source(&self, code: &str, value: &str) -> Source {
        match self.derived(code) {
            None => Source::of(vec![self.idx.store.posting_prefix(self.rtype, code, value)]),
            Some(Derived::Union(codes)) => union(codes, |c| Ok(self.posting_source(c, value))).unwrap_or_default(),
            Some(Derived::Restricted { by, target }) if of_type(value, target) => self.posting_source(by, value),
            Some(Derived::Restricted { .. }) => Source::default(),
        }
    }

    /// Documents referencing `id` of any type under `code`: its bare-id posting, and the
    /// `Type/id` postings of each type the parameter allows where it posts those only.
    pub fn reference_source(&self, code: &str, id: &str) -> Source {
        match self.derived(code) {
            None => {
                let mut source = self.posting_source(code, id);
                for t in self.idx.registry.get(self.rtype, code).map_or(&[][..], |p| p.typed_targets()) {
                    source.add(self.posting_source(code, &format!("{t}/{id}")));
                }
                source
            }
            Some(Derived::Union(codes)) => union(codes, |c| Ok(self.reference_source(c, id))).unwrap_or_default(),
            Some(Derived::Restricted { by, target }) => self.posting_source(by, &format!("{target}/{id}")),
        }
    }

    /// Documents whose date value may start in `[from, to)` (and every wide one).
    pub fn date_source(&self, code: &str, window: (i64, i64)) -> Result<Source, FhirError> {
        match self.derived(code) {
            Some(Derived::Union(codes)) => union(codes, |c| self.date_source(c, window)),
            _ => Ok(Source::of(self.idx.store.date_prefixes(self.rtype, code, window)?)),
        }
    }

    /// Documents whose quantity may lie in `[from, to]` in `unit` (any unit: `None`).
    pub fn num_source(&self, code: &str, unit: Option<&str>, window: (f64, f64)) -> Result<Source, FhirError> {
        match self.derived(code) {
            Some(Derived::Union(codes)) => union(codes, |c| self.num_source(c, unit, window)),
            _ => Ok(Source::of(self.idx.store.num_prefixes(self.rtype, code, unit, window)?)),
        }
    }

    /// Whether `code`'s postings are other parameters' ([`Derived`]).
    pub fn derived(&self, code: &str) -> Option<&Derived> {
        self.idx.registry.derived(self.rtype, code)
    }

    /// The keys of `source` as a stream in key order.
    pub fn stream(&self, source: Source) -> super::stream::Union<'_> {
        super::stream::Union::new(&self.idx.store, source)
    }

    /// Counts inserts and removals since this process started, so caches derived from
    /// these documents know when to rebuild (the consent engine's book of Consents).
    pub fn changes(&self) -> u64 {
        self.idx.changes.get(self.rtype).copied().unwrap_or(0)
    }
}

pub struct Index {
    /// The first leaf not folded in yet.
    next_leaf: u64,
    store: Store,
    /// Every type that can be indexed (R4 and the internal ones), for borrowing names.
    types: BTreeSet<String>,
    changes: HashMap<String, u64>,
    pub registry: Registry,
}

impl Index {
    pub fn of<'i>(&'i self, rtype: &'i str) -> TypeDocs<'i> {
        TypeDocs { idx: self, rtype: self.type_name(rtype) }
    }

    /// The index's own copy of a type name (borrowed for as long as the index).
    pub fn type_name<'a>(&'a self, rtype: &'a str) -> &'a str {
        self.types.get(rtype).map_or(rtype, String::as_str)
    }

    /// The index's own copy of a type name, if it is a type the index holds.
    pub fn known_type(&self, rtype: &str) -> Option<&str> {
        self.types.get(rtype).map(String::as_str)
    }

    /// Every type the index can hold.
    pub fn type_names(&self) -> impl Iterator<Item = &str> {
        self.types.iter().map(String::as_str)
    }
}

pub struct Engine {
    /// The repository the index is folded from.
    repo: Arc<Repo>,
    index: RwLock<Index>,
    core: Registry,
    profiles: Arc<Profiles>,
    compartments: super::Compartments,
    /// Leaf ranges `[start, end)` that hold only the disclosure log's own AuditEvents. No
    /// client waits for those, so a search does not stop to fold them (the background thread
    /// does, and [`Engine::current_all`] for the access report).
    log_ranges: std::sync::Mutex<BTreeMap<u64, u64>>,
    /// For [`Engine::current_for`]: up to which leaf the unfolded headers were found clean of
    /// each list of types, so each header is read once.
    clean_until: std::sync::Mutex<BTreeMap<String, u64>>,
    /// Held while one chunk of leaves is folded, so folders take turns chunk by chunk.
    folding: std::sync::Mutex<()>,
    /// Requests that want the index caught up. The background thread, at its lower priority,
    /// stops between chunks while one waits: a request at normal priority folds the rest
    /// itself instead of waiting behind a thread that the load starves (a search during a
    /// large load waited seconds for that thread's whole backlog, BENCHMARKS.md).
    waiting: AtomicUsize,
    /// While [`Engine::rebuild`] runs: leaves folded so far and leaves to fold (for progress).
    rebuilding: std::sync::Mutex<Option<(u64, u64)>>,
}

/// Leaves folded per write batch by a request: bounds the batch, and lets searches in between.
const FOLD_CHUNK: u64 = 4096;

/// Leaves per batch of the background thread: small, because a request that arrives while
/// the thread holds a chunk waits for it, folded at the thread's lower priority.
const BACKGROUND_CHUNK: u64 = 512;

/// The index writes of a range of leaves, computed outside the write lock.
struct Prepared {
    from: u64,
    next: u64,
    pending: Pending,
    changed: Vec<String>,
    erased: bool,
}

/// What a range of leaves touched.
struct Touched {
    /// The first leaf after the range.
    next: u64,
    resources: BTreeSet<(String, String)>,
    /// A SearchParameter is among them.
    params: bool,
    /// An erasure is among them.
    erased: bool,
}

impl Engine {
    /// Opens the index of `repo` (in the node-local directory `search`), registering the stored
    /// SearchParameters; the leaves not folded yet are folded by the first search.
    pub fn new(
        repo: Arc<Repo>,
        profiles: Arc<Profiles>,
        core: Registry,
        compartments: super::Compartments,
        // Record types outside R4 that are indexed too (the authorization server's records).
        internal: &'static [&'static str],
        caches: IndexCaches,
    ) -> Result<Self, FhirError> {
        let dir = repo.ledger().local_dir("search");
        let tree =
            consensus::lsm_store::Tree::open_for(&dir, "index", caches.blocks, consensus::lsm_store::PointReads::Hit)
                .map_err(FhirError::internal)?;
        let store = Store::open(tree, repo.clone(), caches.documents)?;
        let types =
            profiles.resource_types().iter().cloned().chain(internal.iter().map(|t| (*t).to_string())).collect();
        let index =
            Index { next_leaf: store.next_leaf()?, store, types, changes: HashMap::new(), registry: core.clone() };
        let engine = Self {
            repo,
            index: RwLock::new(index),
            core,
            profiles,
            compartments,
            log_ranges: std::sync::Mutex::default(),
            clean_until: std::sync::Mutex::default(),
            folding: std::sync::Mutex::default(),
            waiting: AtomicUsize::new(0),
            rebuilding: std::sync::Mutex::default(),
        };
        {
            let mut idx = engine.index.write().unwrap_or_else(PoisonError::into_inner);
            engine.register_custom(&mut idx)?;
        }
        Ok(engine)
    }

    /// Lookups of the index's decoded-document cache, for `/metrics`.
    pub fn doc_cache_lookups(&self) -> Arc<crate::telemetry::HitRate> {
        self.index.read().unwrap_or_else(PoisonError::into_inner).store.doc_cache_lookups()
    }

    /// The first leaf the index has not folded in yet.
    pub fn folded(&self) -> u64 {
        self.index.read().unwrap_or_else(PoisonError::into_inner).next_leaf
    }

    /// Registers every stored SearchParameter (at open, and before a rebuild).
    fn register_custom(&self, idx: &mut Index) -> Result<(), FhirError> {
        idx.registry = self.core.clone();
        let types = self.profiles.resource_types();
        for item in self.repo.view().scan_type("SearchParameter", None) {
            let (id, rec) = item?;
            if !rec.deleted {
                let res = read_json(&self.repo, "SearchParameter", &id)?;
                idx.registry.set_custom(&id, res.as_ref(), types);
            }
        }
        Ok(())
    }

    /// Records that leaves `[start, end)` hold only disclosure-log entries.
    pub fn note_log_leaves(&self, start: u64, end: u64) {
        self.log_ranges.lock().unwrap_or_else(PoisonError::into_inner).insert(start, end);
    }

    fn log_only(&self, from: u64, to: u64) -> bool {
        let ranges = self.log_ranges.lock().unwrap_or_else(PoisonError::into_inner);
        let mut at = from;
        while at < to {
            match ranges.get(&at) {
                Some(&end) => at = end,
                None => return false,
            }
        }
        true
    }

    /// The index for lookups of `types` only: as it stands when no leaf since its last fold
    /// wrote one of them (or a SearchParameter, or an erasure), so it answers for them exactly
    /// as a caught-up one would without waiting for the fold; else [`Engine::current`].
    pub fn current_for(&self, types: &[&str]) -> Result<RwLockReadGuard<'_, Index>, FhirError> {
        let size = self.repo.view().leaf_count()?;
        let key = types.join(",");
        {
            let idx = self.index.read().unwrap_or_else(PoisonError::into_inner);
            let known = self.clean_until.lock().unwrap_or_else(PoisonError::into_inner).get(&key).copied();
            let from = known.unwrap_or(0).max(idx.next_leaf);
            let mut clean = true;
            for item in self.repo.view().headers_from(from) {
                let (leaf, h) = item?;
                if leaf >= size {
                    break;
                }
                if types.contains(&h.rtype.as_str())
                    || h.rtype == "SearchParameter"
                    || h.op == consensus::Op::Erase.as_str()
                {
                    clean = false;
                    break;
                }
            }
            if clean {
                self.clean_until.lock().unwrap_or_else(PoisonError::into_inner).insert(key, size);
                return Ok(idx);
            }
        }
        self.caught_up(false)
    }

    /// [`Engine::current`], also folding the disclosure log's latest entries.
    pub fn current_all(&self) -> Result<RwLockReadGuard<'_, Index>, FhirError> {
        self.caught_up(true)
    }

    /// The repository this index folds.
    pub fn repo(&self) -> &Arc<Repo> {
        &self.repo
    }

    pub fn compartments(&self) -> &super::Compartments {
        &self.compartments
    }

    pub fn profiles(&self) -> &Profiles {
        &self.profiles
    }

    /// The index, caught up with every leaf the state holds now (except the disclosure log's
    /// own entries not folded yet: nothing a client wrote waits behind them).
    pub fn current(&self) -> Result<RwLockReadGuard<'_, Index>, FhirError> {
        self.caught_up(false)
    }

    /// Whether an index folded up to `next` is caught up with `size` leaves: all folded, or
    /// (unless `all`) only disclosure-log leaves left.
    fn folded_enough(&self, next: u64, size: u64, all: bool) -> bool {
        next >= size || (!all && self.log_only(next, size))
    }

    /// Whether [`Engine::current`] would fold nothing now.
    fn is_current(&self) -> Result<bool, FhirError> {
        let size = self.repo.view().leaf_count()?;
        let next = self.index.read().unwrap_or_else(PoisonError::into_inner).next_leaf;
        Ok(self.folded_enough(next, size, false))
    }

    fn caught_up(&self, all: bool) -> Result<RwLockReadGuard<'_, Index>, FhirError> {
        let size = self.repo.view().leaf_count()?;
        let done = |idx: &Index| self.folded_enough(idx.next_leaf, size, all);
        {
            let idx = self.index.read().unwrap_or_else(PoisonError::into_inner);
            if done(&idx) {
                return Ok(idx);
            }
        }
        let _waiting = Waiting::enter(&self.waiting);
        self.fold_until(size, FOLD_CHUNK, false)?;
        Ok(self.index.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Folds the leaves before `size`, `chunk` at a time, each under the folding lock;
    /// `yielding` (the background thread) stops before a chunk while a request waits.
    fn fold_until(&self, size: u64, chunk: u64, yielding: bool) -> Result<(), FhirError> {
        loop {
            if yielding && self.waiting.load(Ordering::Acquire) > 0 {
                return Ok(());
            }
            let _folding = self.folding.lock().unwrap_or_else(PoisonError::into_inner);
            let prepared = {
                let idx = self.index.read().unwrap_or_else(PoisonError::into_inner);
                if idx.next_leaf >= size {
                    break;
                }
                // Decrypting and extracting is the slow part: do it while searches go on.
                let prepared = self.prepare(&idx, size, chunk)?;
                idx.store.wait_for_room();
                prepared
            };
            let mut idx = self.index.write().unwrap_or_else(PoisonError::into_inner);
            match prepared {
                Some(p) => Self::apply_prepared(&mut idx, p)?,
                None => self.fold(&mut idx, size, chunk)?,
            }
        }
        let folded = self.index.read().unwrap_or_else(PoisonError::into_inner).next_leaf;
        self.log_ranges.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, end| *end > folded);
        Ok(())
    }

    /// One round of the background thread: folds every leaf written so far (the disclosure
    /// log's too), in small chunks, giving way to any request that wants to fold.
    fn fold_in_background(&self) -> Result<(), FhirError> {
        let size = self.repo.view().leaf_count()?;
        self.fold_until(size, BACKGROUND_CHUNK, true)
    }

    /// Rebuilds the whole index from the state (the `reindex` admin command).
    /// While a rebuild runs: (leaves folded, leaves to fold).
    pub fn rebuild_progress(&self) -> Option<(u64, u64)> {
        *self.rebuilding.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn rebuild(&self) -> Result<usize, FhirError> {
        let _folding = self.folding.lock().unwrap_or_else(PoisonError::into_inner);
        let mut idx = self.index.write().unwrap_or_else(PoisonError::into_inner);
        idx.store.clear()?;
        idx.next_leaf = 0;
        self.register_custom(&mut idx)?;
        let size = self.repo.view().leaf_count()?;
        let progress = |done| *self.rebuilding.lock().unwrap_or_else(PoisonError::into_inner) = done;
        progress(Some((0, size)));
        while idx.next_leaf < size {
            let step = match self.prepare(&idx, size, FOLD_CHUNK) {
                Ok(Some(p)) => Self::apply_prepared(&mut idx, p),
                Ok(None) => self.fold(&mut idx, size, FOLD_CHUNK),
                Err(e) => Err(e),
            };
            if let Err(e) = step {
                progress(None);
                return Err(e);
            }
            progress(Some((idx.next_leaf, size)));
        }
        progress(None);
        let mut n = 0;
        for t in idx.types.iter().map(String::as_str) {
            n += idx.store.ids(t)?.len();
        }
        Ok(n)
    }

    /// The leaves from the last fold on (at most `chunk`) and the resources they touched;
    /// whether a SearchParameter is among them; whether one is an erasure.
    fn touched(&self, from: u64, size: u64, chunk: u64) -> Result<Touched, FhirError> {
        let mut touched = BTreeSet::new();
        let mut next = from;
        let mut params = false;
        let mut erased = false;
        let end = size.min(from.saturating_add(chunk));
        for item in self.repo.view().headers_from(from) {
            let (leaf, h) = item?;
            if leaf >= end {
                break;
            }
            if h.op == consensus::Op::Erase.as_str() {
                // An erasure reached this node: no decrypted body or value of it may stay in
                // memory.
                self.repo.forget_key(&h.compartment);
                erased = true;
            }
            params |= h.rtype == "SearchParameter";
            touched.insert((h.rtype, h.id));
            next = leaf + 1;
        }
        Ok(Touched { next, resources: touched, params, erased })
    }

    /// The index writes for the next leaves, computed under a read lock; `None` when a
    /// SearchParameter changed (that needs the registry, under the write lock).
    fn prepare(&self, idx: &Index, size: u64, chunk: u64) -> Result<Option<Prepared>, FhirError> {
        let Touched { next, resources: touched, params, erased } = self.touched(idx.next_leaf, size, chunk)?;
        if params {
            return Ok(None);
        }
        let mut pending = Pending::default();
        let mut changed = Vec::new();
        for (t, id) in touched {
            self.reindex_into(idx, &mut pending, &t, &id)?;
            changed.push(t);
        }
        Ok(Some(Prepared { from: idx.next_leaf, next, pending, changed, erased }))
    }

    fn apply_prepared(idx: &mut Index, p: Prepared) -> Result<(), FhirError> {
        if idx.next_leaf != p.from {
            return Ok(()); // a rebuild came between: the next round folds again
        }
        if p.changed.is_empty() && p.next == idx.next_leaf {
            return Ok(());
        }
        idx.store.commit(p.pending, p.next)?;
        if p.erased {
            idx.store.clear_cache();
        }
        for t in p.changed {
            *idx.changes.entry(t).or_default() += 1;
        }
        idx.next_leaf = p.next;
        Ok(())
    }

    /// Folds the next leaves under the write lock, registering the SearchParameters among
    /// them first and re-indexing the types a changed parameter is defined on.
    fn fold(&self, idx: &mut Index, size: u64, chunk: u64) -> Result<(), FhirError> {
        let Touched { next, resources: touched, erased, .. } = self.touched(idx.next_leaf, size, chunk)?;
        let mut params_changed = BTreeSet::new();
        for (t, id) in touched.iter().filter(|(t, _)| t == "SearchParameter") {
            let res = read_json(&self.repo, t, id)?;
            params_changed.extend(idx.registry.set_custom(id, res.as_ref(), self.profiles.resource_types()));
        }
        let mut pending = Pending::default();
        let mut done = BTreeSet::new();
        for (t, id) in &touched {
            self.reindex_into(idx, &mut pending, t, id)?;
            done.insert((t.clone(), id.clone()));
        }
        // A new or changed parameter applies to every resource already stored.
        for t in &params_changed {
            for id in idx.store.ids(t)? {
                if done.insert((t.clone(), id.clone())) {
                    self.reindex_into(idx, &mut pending, t, &id)?;
                }
            }
        }
        idx.store.commit(pending, next)?;
        if erased {
            idx.store.clear_cache();
        }
        for (t, _) in touched {
            *idx.changes.entry(t).or_default() += 1;
        }
        for t in params_changed {
            *idx.changes.entry(t).or_default() += 1;
        }
        idx.next_leaf = next;
        Ok(())
    }

    /// Replaces one resource's document by what the state holds now (or drops it if gone).
    fn reindex_into(&self, idx: &Index, p: &mut Pending, rtype: &str, id: &str) -> Result<(), FhirError> {
        let Some(cur) = self.repo.view().current(rtype, id)? else { return Ok(()) };
        // The document key is the first leaf; one written in the leaves being folded has no
        // document yet (most are creates: this saves a lookup each).
        let Some(&key) = cur.leaves.first() else { return Ok(()) };
        if key < idx.next_leaf {
            if let Some(old) = idx.store.doc(rtype, key)? {
                idx.store.remove(p, rtype, key, &old)?;
            }
        }
        let Some((rec, body)) = self.repo.current_version(&cur)? else { return Ok(()) };
        let res = json::parse(body.as_bytes(), usize::MAX).map_err(FhirError::internal)?;
        let values = self.values_of(&idx.registry, rtype, &res);
        let leaf = cur.leaves.last().copied().unwrap_or_default();
        let doc = Doc::new(id.to_string(), cur.version, leaf, cur.last_updated_ms, values);
        idx.store
            .insert(p, rtype, key, &doc, &rec.header.compartment, |code| idx.registry.derived(rtype, code).is_none())
    }

    fn values_of(&self, registry: &Registry, rtype: &str, res: &Json) -> BTreeMap<String, Vec<Value>> {
        let ev = Eval { profiles: &self.profiles };
        let mut values = BTreeMap::new();
        for p in registry.for_type(rtype) {
            if p.kind == Kind::Special {
                continue;
            }
            let v = extract(&ev, p, rtype, res);
            if !v.is_empty() {
                values.insert(p.code.clone(), v);
            }
        }
        values
    }

    /// The document `res` would have as `rtype/id` (a version that is not the current one, or
    /// a body about to be written), for the access rules; key and leaf are unknown (0).
    pub fn doc_of(&self, registry: &Registry, rtype: &str, id: &str, version: u64, res: &Json) -> Doc {
        let last_updated_ms = res
            .get("meta")
            .and_then(|m| m.get("lastUpdated"))
            .and_then(Json::as_str)
            .and_then(crate::fhir::date_range_ms)
            .map_or_else(crate::fhir::now_ms, |(lo, _)| lo);
        Doc::new(id.to_string(), version, 0, last_updated_ms, self.values_of(registry, rtype, res))
    }
}

/// Keeps the index caught up in the background (building it first), so that a
/// search rarely folds more than a few leaves itself. Stops when the engine is dropped.
pub fn keep_current(engine: &Arc<Engine>) {
    let weak = Arc::downgrade(engine);
    let spawned = std::thread::Builder::new().name("search-index".into()).spawn(move || {
        consensus::background::lower_this_thread();
        loop {
            let Some(engine) = weak.upgrade() else { return };
            if let Err(e) = engine.fold_in_background() {
                tracing::warn!("search index: {}", e.issues.first().map_or("", |i| i.diagnostics.as_str()));
            }
            drop(engine);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("search index: no background thread ({e}); searches catch up themselves");
    }
}

/// Catches the index up on tokio's blocking pool, for a request about to call
/// [`Engine::current`] on an async worker. A fold of a large backlog (a search during a bulk
/// load) takes seconds, and on the worker it would hold every other connection of that worker
/// meanwhile: with a search beside it a 225,000-resource load took 31 s instead of 10.5 s
/// (BENCHMARKS.md). Afterwards `current` folds at most the leaves written since.
pub async fn catch_up(engine: &Arc<Engine>) -> Result<(), FhirError> {
    if engine.is_current()? {
        return Ok(());
    }
    let engine = Arc::clone(engine);
    tokio::task::spawn_blocking(move || engine.current().map(drop)).await.map_err(FhirError::internal)?
}

/// Counts a request among those waiting to fold while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The current version of a resource as a tree; `None` if deleted or erased.
fn read_json(repo: &Repo, rtype: &str, id: &str) -> Result<Option<Json>, FhirError> {
    let stored = match repo.read(rtype, id) {
        Ok(s) => s,
        Err(e) if e.is_absent() => return Ok(None),
        Err(e) => return Err(e),
    };
    match stored.body {
        Some(b) => json::parse(b.as_bytes(), usize::MAX).map(Some).map_err(FhirError::internal),
        None => Ok(None),
    }
}
