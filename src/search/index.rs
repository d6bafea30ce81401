//! The search index: a deterministic fold over the Merkle log's leaves, held in memory.
//!
//! Every node applies the same leaves in the same order, so every node derives the same index
//! (and the same document keys: a resource's key is the leaf of its first version). It lives
//! in memory because range, prefix and sort queries need values in an order-revealing form,
//! and the state on disk must not hold PHI in clear (docs/search.md, "What the index
//! holds"). A node rebuilds it from the state at start-up and catches up with new leaves
//! before each search, so a search sees every write acknowledged before it began.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use super::params::{Kind, Registry};
use super::values::{extract, Value};
use crate::error::FhirError;
use crate::fhir::fhirpath::Eval;
use crate::fhir::json::{self, Json};
use crate::fhir::profiles::Profiles;
use crate::repo::Repo;

/// A document key: the Merkle leaf of the resource's first version. Creation order, the
/// same on every node.
pub type DocKey = u64;

#[derive(Debug)]
pub struct Doc {
    pub id: String,
    pub version: u64,
    /// The Merkle leaf of that version (where its body is read from).
    pub leaf: u64,
    pub last_updated_ms: i64,
    /// Values by parameter code (parameters without values are absent).
    pub values: BTreeMap<String, Vec<Value>>,
}

impl Doc {
    pub fn get(&self, code: &str) -> &[Value] {
        self.values.get(code).map_or(&[], Vec::as_slice)
    }
}

/// The live resources of one type.
#[derive(Debug, Default)]
pub struct TypeDocs {
    pub by_id: HashMap<String, DocKey>,
    pub docs: BTreeMap<DocKey, Doc>,
    /// Parameter code → posting key → documents: token `code`, `system|code`, `system|`
    /// and (for bare codes) `\0|code`; reference `id` and `Type/id`.
    pub postings: HashMap<String, HashMap<String, BTreeSet<DocKey>>>,
    /// Parameter code → date and number/quantity values in order, for range prefixes.
    pub ordered: HashMap<String, Ordered>,
    /// Counts inserts and removals, so caches derived from these documents know when to
    /// rebuild (the consent engine's book of Consents).
    pub changes: u64,
}

/// Ordered values of one parameter: narrow values by (unit, value), wide ones (periods
/// longer than a day, open periods, ranges) apart, since a range query must check them all.
#[derive(Debug, Default)]
pub struct Ordered {
    pub points: BTreeMap<String, BTreeSet<(u64, DocKey)>>,
    pub wide: BTreeSet<DocKey>,
}

/// The widest date value kept among the points: a day (date precision), so a query range
/// widened by a day finds every point that can overlap it.
pub const NARROW_MS: i64 = 86_400_000;

/// An order-preserving map of i64 into u64.
pub fn ord_i64(x: i64) -> u64 {
    x.cast_unsigned() ^ (1 << 63)
}

/// An order-preserving map of finite f64 into u64.
pub fn ord_f64(x: f64) -> u64 {
    let b = x.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

enum Slot {
    Point(String, u64),
    Wide,
}

/// Where a value goes in the ordered index. A quantity is filed under its code and, when
/// different, its unit too (`5.4||mg` matches either).
// Exact float equality on purpose: a point quantity's bounds are the same parsed value.
#[allow(clippy::float_cmp)]
fn ordered_slots(v: &Value) -> Vec<Slot> {
    match v {
        Value::Date { lo, hi } if *lo != i64::MIN && *hi != i64::MAX && hi - lo <= NARROW_MS => {
            vec![Slot::Point(String::new(), ord_i64(*lo))]
        }
        Value::Quantity { lo, hi, code, unit, .. } if lo == hi && lo.is_finite() => {
            let mut units: Vec<String> = code.iter().chain(unit.iter()).cloned().collect();
            units.dedup();
            if units.is_empty() {
                units.push(String::new());
            }
            units.into_iter().map(|u| Slot::Point(u, ord_f64(*lo))).collect()
        }
        Value::Date { .. } | Value::Quantity { .. } => vec![Slot::Wide],
        _ => Vec::new(),
    }
}

impl TypeDocs {
    pub fn doc(&self, id: &str) -> Option<(DocKey, &Doc)> {
        let k = *self.by_id.get(id)?;
        Some((k, self.docs.get(&k)?))
    }

    pub fn posting(&self, code: &str, value: &str) -> Option<&BTreeSet<DocKey>> {
        self.postings.get(code)?.get(value)
    }

    fn remove(&mut self, id: &str) {
        let Some(key) = self.by_id.remove(id) else { return };
        let Some(doc) = self.docs.remove(&key) else { return };
        self.changes += 1;
        for (code, vals) in &doc.values {
            for v in vals {
                for pk in posting_keys(v) {
                    if let Some(m) = self.postings.get_mut(code) {
                        if let Some(set) = m.get_mut(&pk) {
                            set.remove(&key);
                            if set.is_empty() {
                                m.remove(&pk);
                            }
                        }
                    }
                }
                if let Some(o) = self.ordered.get_mut(code) {
                    o.wide.remove(&key);
                    for slot in ordered_slots(v) {
                        match slot {
                            Slot::Point(unit, x) => {
                                if let Some(set) = o.points.get_mut(&unit) {
                                    set.remove(&(x, key));
                                }
                            }
                            Slot::Wide => {
                                o.wide.remove(&key);
                            }
                        }
                    }
                }
            }
        }
    }

    fn insert(&mut self, key: DocKey, doc: Doc) {
        self.remove(&doc.id);
        for (code, vals) in &doc.values {
            for v in vals {
                for pk in posting_keys(v) {
                    self.postings.entry(code.clone()).or_default().entry(pk).or_default().insert(key);
                }
                let slots = ordered_slots(v);
                if vals.len() > 1 && !slots.is_empty() {
                    // Range conditions on one parameter are answered from one window; a
                    // document with several values may satisfy each by another value, so it
                    // is always a candidate.
                    self.ordered.entry(code.clone()).or_default().wide.insert(key);
                }
                for slot in slots {
                    let o = self.ordered.entry(code.clone()).or_default();
                    match slot {
                        Slot::Point(unit, x) => {
                            o.points.entry(unit).or_default().insert((x, key));
                        }
                        Slot::Wide => {
                            o.wide.insert(key);
                        }
                    }
                }
            }
        }
        self.by_id.insert(doc.id.clone(), key);
        self.docs.insert(key, doc);
        self.changes += 1;
    }
}

/// The posting keys of a value (see [`TypeDocs::postings`]).
fn posting_keys(v: &Value) -> Vec<String> {
    match v {
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
        Value::Ref { rtype, id: Some(id), .. } => {
            let mut keys = vec![id.clone()];
            if let Some(t) = rtype {
                keys.push(format!("{t}/{id}"));
            }
            keys
        }
        _ => Vec::new(),
    }
}

#[derive(Debug, Default)]
pub struct Index {
    built: bool,
    /// The first leaf not folded in yet.
    next_leaf: u64,
    pub types: HashMap<String, TypeDocs>,
    pub registry: Registry,
}

impl Index {
    pub fn of(&self, rtype: &str) -> Option<&TypeDocs> {
        self.types.get(rtype)
    }

    /// The index's own copy of a type name (borrowed for as long as the index).
    pub fn type_name<'a>(&'a self, rtype: &'a str) -> &'a str {
        self.types.get_key_value(rtype).map_or(rtype, |(k, _)| k.as_str())
    }
}

pub struct Engine {
    /// The repository the index is folded from.
    repo: Arc<Repo>,
    /// Record types outside R4 that are indexed too (the authorization server's records).
    internal: &'static [&'static str],
    index: RwLock<Index>,
    core: Registry,
    profiles: Arc<Profiles>,
    compartments: super::Compartments,
    /// Leaf ranges `[start, end)` that hold only the disclosure log's own AuditEvents. No
    /// client waits for those, so a search does not stop to fold them (the background thread
    /// does, and [`Engine::current_all`] for the access report).
    log_ranges: std::sync::Mutex<BTreeMap<u64, u64>>,
    folding: std::sync::Mutex<()>,
}

/// Documents computed outside the write lock, applied under it.
struct Prepared {
    from: u64,
    next: u64,
    erased: bool,
    docs: Vec<(String, String, Option<Keyed>)>,
}

/// A document with its key.
type Keyed = (DocKey, Doc);

impl Engine {
    pub fn new(
        repo: Arc<Repo>,
        profiles: Arc<Profiles>,
        core: Registry,
        compartments: super::Compartments,
        internal: &'static [&'static str],
    ) -> Self {
        Self {
            repo,
            internal,
            index: RwLock::new(Index::default()),
            core,
            profiles,
            compartments,
            log_ranges: std::sync::Mutex::default(),
            folding: std::sync::Mutex::default(),
        }
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

    fn caught_up(&self, all: bool) -> Result<RwLockReadGuard<'_, Index>, FhirError> {
        let size = self.repo.view().leaf_count()?;
        {
            let idx = self.index.read().unwrap_or_else(PoisonError::into_inner);
            if idx.built && (idx.next_leaf >= size || (!all && self.log_only(idx.next_leaf, size))) {
                return Ok(idx);
            }
        }
        {
            // One folder at a time; the others wait here, then find little or nothing to do.
            let _folding = self.folding.lock().unwrap_or_else(PoisonError::into_inner);
            let prepared = {
                let idx = self.index.read().unwrap_or_else(PoisonError::into_inner);
                if idx.built && idx.next_leaf >= size {
                    None
                } else if idx.built {
                    // Decrypting and extracting is the slow part: do it while searches go on.
                    self.prepare(&idx)?
                } else {
                    None
                }
            };
            let mut idx = self.index.write().unwrap_or_else(PoisonError::into_inner);
            match prepared {
                Some(p) => self.apply_prepared(&mut idx, p),
                None if !idx.built => self.build(&mut idx)?,
                None => self.fold(&mut idx)?,
            }
            let folded = idx.next_leaf;
            self.log_ranges.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, end| *end > folded);
        }
        Ok(self.index.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Rebuilds the whole index from the state (the `reindex` admin command).
    pub fn rebuild(&self) -> Result<usize, FhirError> {
        let mut idx = self.index.write().unwrap_or_else(PoisonError::into_inner);
        self.build(&mut idx)?;
        Ok(idx.types.values().map(|t| t.docs.len()).sum())
    }

    fn build(&self, idx: &mut Index) -> Result<(), FhirError> {
        let view = self.repo.view();
        let size = view.frontier()?.size;
        *idx = Index { registry: self.core.clone(), ..Default::default() };
        // Custom parameters first: a stored SearchParameter indexes every resource.
        let types = self.profiles.resource_types();
        for item in view.scan_type("SearchParameter", None) {
            let (id, rec) = item?;
            if !rec.deleted {
                let res = read_json(&self.repo, "SearchParameter", &id)?;
                idx.registry.set_custom(&id, res.as_ref(), types);
            }
        }
        for t in types.iter().map(String::as_str).chain(self.internal.iter().copied()) {
            for item in view.scan_type(t, None) {
                let (id, rec) = item?;
                if !rec.deleted {
                    self.reindex(idx, t, &id)?;
                }
            }
        }
        idx.next_leaf = size;
        idx.built = true;
        Ok(())
    }

    /// The documents of the resources the leaves since the last fold touched, computed under
    /// a read lock; `None` when a SearchParameter changed (that needs the whole fold).
    fn prepare(&self, idx: &Index) -> Result<Option<Prepared>, FhirError> {
        let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
        let mut next = idx.next_leaf;
        let mut erased = false;
        for item in self.repo.view().headers_from(idx.next_leaf) {
            let (leaf, h) = item?;
            if h.rtype == "SearchParameter" {
                return Ok(None);
            }
            erased |= h.op == consensus::Op::Erase.as_str();
            touched.insert((h.rtype, h.id));
            next = leaf + 1;
        }
        let mut docs = Vec::with_capacity(touched.len());
        for (t, id) in touched {
            let doc = self.document(&idx.registry, &t, &id)?;
            docs.push((t, id, doc));
        }
        Ok(Some(Prepared { from: idx.next_leaf, next, erased, docs }))
    }

    fn apply_prepared(&self, idx: &mut Index, p: Prepared) {
        if idx.next_leaf != p.from {
            return; // someone else folded meanwhile (a rebuild): the next call folds again
        }
        if p.erased {
            // An erasure reached this node: no decrypted body of it may stay in memory.
            self.repo.clear_body_cache();
        }
        for (t, id, doc) in p.docs {
            let docs = idx.types.entry(t).or_default();
            match doc {
                Some((key, doc)) => docs.insert(key, doc),
                None => docs.remove(&id),
            }
        }
        idx.next_leaf = p.next;
    }

    /// Folds the leaves appended since the last call.
    fn fold(&self, idx: &mut Index) -> Result<(), FhirError> {
        let view = self.repo.view();
        let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
        let mut next = idx.next_leaf;
        let mut erased = false;
        for item in view.headers_from(idx.next_leaf) {
            let (leaf, h) = item?;
            erased |= h.op == consensus::Op::Erase.as_str();
            touched.insert((h.rtype, h.id));
            next = leaf + 1;
        }
        if erased {
            // An erasure reached this node: no decrypted body of it may stay in memory.
            self.repo.clear_body_cache();
        }
        let mut params_changed = BTreeSet::new();
        for (t, id) in &touched {
            self.reindex(idx, t, id)?;
            if t == "SearchParameter" {
                let res =
                    idx.of(t).and_then(|d| d.doc(id)).map(|_| read_json(&self.repo, t, id)).transpose()?.flatten();
                params_changed.extend(idx.registry.set_custom(id, res.as_ref(), self.profiles.resource_types()));
            }
        }
        // A new or changed parameter applies to every resource already stored: re-index the
        // types it is defined on.
        for t in params_changed {
            let ids: Vec<String> = idx.of(&t).map(|d| d.by_id.keys().cloned().collect()).unwrap_or_default();
            for id in ids {
                self.reindex(idx, &t, &id)?;
            }
        }
        idx.next_leaf = next;
        Ok(())
    }

    /// One resource's document as the state holds it now; `None` if it is gone.
    fn document(&self, registry: &Registry, rtype: &str, id: &str) -> Result<Option<(DocKey, Doc)>, FhirError> {
        let Some(cur) = self.repo.view().current(rtype, id)?.filter(|c| !c.deleted) else { return Ok(None) };
        let Some(res) = read_json(&self.repo, rtype, id)? else { return Ok(None) };
        let values = self.values_of(registry, rtype, &res);
        let key = cur.leaves.first().copied().unwrap_or_default();
        let leaf = cur.leaves.last().copied().unwrap_or_default();
        Ok(Some((
            key,
            Doc { id: id.to_string(), version: cur.version, leaf, last_updated_ms: cur.last_updated_ms, values },
        )))
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
        Doc { id: id.to_string(), version, leaf: 0, last_updated_ms, values: self.values_of(registry, rtype, res) }
    }

    /// Re-reads one resource and replaces its document (or drops it if gone).
    fn reindex(&self, idx: &mut Index, rtype: &str, id: &str) -> Result<(), FhirError> {
        let doc = self.document(&idx.registry, rtype, id)?;
        let docs = idx.types.entry(rtype.to_string()).or_default();
        match doc {
            Some((key, doc)) => docs.insert(key, doc),
            None => docs.remove(id),
        }
        Ok(())
    }
}

/// Keeps the index caught up in the background (building it first), so that a
/// search rarely folds more than a few leaves itself. Stops when the engine is dropped.
pub fn keep_current(engine: &Arc<Engine>) {
    let weak = Arc::downgrade(engine);
    let spawned = std::thread::Builder::new().name("search-index".into()).spawn(move || loop {
        let Some(engine) = weak.upgrade() else { return };
        if let Err(e) = engine.current_all() {
            tracing::warn!("search index: {}", e.issues.first().map_or("", |i| i.diagnostics.as_str()));
        }
        drop(engine);
        std::thread::sleep(std::time::Duration::from_millis(50));
    });
    if let Err(e) = spawned {
        tracing::warn!("search index: no background thread ({e}); searches catch up themselves");
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
