//! What an export holds: the ledger read at one tree size, each resource's version as of that
//! size (or of `_until`), filtered by level, type, `_since`, `_typeFilter` and the caller's
//! guard, in leaf order. Deletions since `_since` are listed apart. The result is a list of
//! leaves per file, so that a file can be produced again, byte for byte, from the ledger.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;

use consensus::Op;

use super::params::{Level, Params, LATEST_PROVENANCE, RELEVANT_PROVENANCE};
use super::Progress;
use crate::auth::access::{Disclosed, Guard, Restriction};
use crate::error::FhirError;
use crate::fhir::json::{self, Json};
use crate::search::index::{Doc, Engine};
use crate::search::query::Filter;
use crate::search::Visibility;

/// Resources read, checked and decrypted together (one index lock, one key lookup each).
const BATCH: usize = 2_048;

/// What an export is of, as the kick-off fixed it.
pub struct Scope<'a> {
    pub level: &'a Level,
    pub params: &'a Params,
    /// Patient and Group level: only these patients' compartments (`None`: all).
    pub patients: Option<&'a BTreeSet<String>>,
    /// The tree size the export is pinned to: leaves below it.
    pub size: u64,
    /// Whether what it shows goes to the disclosure log (not an unrestricted caller's, nor
    /// with the log off): otherwise no list of what was shown is made.
    pub logged: bool,
}

/// The selection: leaves per resource type (types in name order, leaves ascending), the
/// delete leaves since `_since`, and lines for the `error` file.
#[derive(Default, Debug)]
pub struct Selected {
    pub outputs: BTreeMap<String, Vec<u64>>,
    pub deleted: Vec<u64>,
    pub errors: Vec<String>,
}

/// Each resource's newest version by `Type/id`: a map of every resource in the ledger, hashed
/// with foldhash (randomly seeded per process; SipHash was a sixth of the selection). One
/// allocation a resource (its key; compartments are shared), found again without one: the
/// map is built afresh by every export, and three strings a resource were 32 MB of memory
/// first touched by each.
type LatestMap = HashMap<Box<str>, Latest, foldhash::fast::RandomState>;

/// A live resource picked for an export: its leaf, `Type/id` and state.
type Picked<'a> = (u64, &'a str, &'a Latest);

/// What one range of [`latest_at`] contributes: its live resources and deletions in leaf
/// order, to be checked; or, when nothing is decided per resource, those it exports
/// (`outputs`, by type) and discloses (`shown`) already picked.
#[derive(Default)]
struct Picks<'a> {
    live: Vec<Picked<'a>>,
    deleted: Vec<(u64, u64)>,
    outputs: BTreeMap<String, Vec<u64>>,
    shown: Vec<(String, String, u64)>,
    /// How many live resources were picked from (the export's progress).
    picked: usize,
}

impl Picks<'_> {
    /// Every live resource exported, but those whose compartment was erased (no plaintext);
    /// each listed for the disclosure log when `logged`. A resource's own key is not read
    /// unless it is logged: picking is a walk over the map's entries in leaf order, a cache
    /// miss each, and a key's bytes were one more.
    fn pick_all(&mut self, engine: &Engine, progress: &Progress, logged: bool) -> Result<(), FhirError> {
        let mut keys = BTreeMap::new();
        // Versions come in runs of one compartment: its key is looked up once a run.
        let mut run: Option<(&std::sync::Arc<str>, bool)> = None;
        let live = std::mem::take(&mut self.live);
        self.picked = live.len();
        for (n, &(leaf, key, l)) in live.iter().enumerate() {
            if n % BATCH == 0 && progress.cancelled.load(Relaxed) {
                return Err(FhirError::invalid("the export was cancelled"));
            }
            let readable = match run {
                Some((c, readable)) if std::sync::Arc::ptr_eq(c, &l.compartment) => readable,
                _ => {
                    let readable = engine.repo().compartment_key(&l.compartment, &mut keys)?.is_some();
                    run = Some((&l.compartment, readable));
                    readable
                }
            };
            if !readable {
                continue;
            }
            match self.outputs.get_mut(&*l.rtype) {
                Some(leaves) => leaves.push(leaf),
                None => drop(self.outputs.insert(l.rtype.to_string(), vec![leaf])),
            }
            if logged {
                let (t, id) = type_and_id(key);
                self.shown.push((t.to_string(), id.to_string(), l.version));
            }
        }
        Ok(())
    }
}

/// The type and id of a `Type/id` key (FHIR ids hold no `/`).
fn type_and_id(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or((key, ""))
}

/// A resource's state at the pinned size.
struct Latest {
    leaf: u64,
    version: u64,
    /// Its type (shared, as compartments are: picking by type then reads no key).
    rtype: std::sync::Arc<str>,
    /// Whose data key encrypted it (an erased compartment's versions have no plaintext).
    compartment: std::sync::Arc<str>,
    last_updated_ms: i64,
    deleted: bool,
    /// The newest version that was not a deletion (what access is decided on for a delete).
    live: Option<u64>,
}

/// Called with each batch of what the export disclosed, for the disclosure log.
pub type Shown<'a> = dyn FnMut(&[(String, String, u64)], Disclosed) + 'a;

pub fn select(
    engine: &Engine,
    guard: Option<&Guard<'_>>,
    scope: &Scope<'_>,
    progress: &Progress,
    shown: &mut Shown<'_>,
) -> Result<Selected, FhirError> {
    let params = scope.params;
    let latest = latest_at(engine, scope)?;
    let filters = type_filters(engine, params)?;
    let checker = Checker { engine, guard, scope, filters: &filters };
    // Nothing to decide per resource (no access rules, compartments or filters): the headers
    // read above tell all, and each range's resources are picked to the end on its core.
    let unrestricted = checker.unrestricted();
    // Each range's resources picked and put in leaf order on every core: the ranges are in
    // leaf order, so their lists joined are too.
    let ranges: Vec<usize> = (0..latest.0.len()).collect();
    let per_range = crate::parallel::on_every_core(&ranges, |&k| {
        let mut part = Picks::default();
        for (key, l, newest_live) in latest.owned(k) {
            if !params.wants(type_and_id(key).0) || params.since_ms.is_some_and(|s| l.last_updated_ms <= s) {
                continue;
            }
            if !l.deleted {
                part.live.push((l.leaf, key, l));
            } else if let (Some(before), true) = (newest_live, params.since_ms.is_some()) {
                // Only an export `_since` something reports deletions (the IG's `deleted`).
                part.deleted.push((l.leaf, before));
            }
        }
        part.live.sort_unstable_by_key(|(leaf, ..)| *leaf);
        part.deleted.sort_unstable();
        if unrestricted {
            part.pick_all(engine, progress, scope.logged)?;
        }
        Ok::<_, FhirError>(part)
    });
    let mut parts = Vec::with_capacity(per_range.len());
    for part in per_range {
        parts.push(part.ok_or_else(|| FhirError::internal("a thread selecting an export died"))??);
    }
    let (mut live, mut deleted) = (Vec::new(), Vec::new());
    for part in &mut parts {
        live.append(&mut part.live);
        deleted.append(&mut part.deleted);
    }
    let picked_whole: usize = parts.iter().map(|p| p.picked).sum();
    progress.total.store((picked_whole + live.len() + deleted.len()) as u64, Relaxed);
    progress.done.fetch_add(picked_whole as u64, Relaxed);
    let mut out = Selected::default();
    for part in parts {
        for (t, leaves) in part.outputs {
            out.outputs.entry(t).or_default().extend(leaves);
        }
        for chunk in part.shown.chunks(BATCH) {
            shown(chunk, Disclosed::default());
        }
    }
    for chunk in live.chunks(BATCH) {
        if progress.cancelled.load(Relaxed) {
            return Err(FhirError::invalid("the export was cancelled"));
        }
        let leaves: Vec<u64> = chunk.iter().map(|(leaf, ..)| *leaf).collect();
        for (leaf, t, ..) in checker.admitted(&leaves, shown)? {
            out.outputs.entry(t).or_default().push(leaf);
        }
        progress.done.fetch_add(chunk.len() as u64, Relaxed);
    }
    if !params.associated.is_empty() {
        provenance(engine, &checker, &latest, &mut out, shown)?;
    }
    for chunk in deleted.chunks(BATCH) {
        // Access to a deletion is decided on the version it deleted: who could not see the
        // resource does not learn that it is gone.
        let before: Vec<u64> = chunk.iter().map(|(_, b)| *b).collect();
        let ok: HashSet<u64> = checker.admitted(&before, &mut |_, _| {})?.into_iter().map(|(l, ..)| l).collect();
        out.deleted.extend(chunk.iter().filter(|(_, b)| ok.contains(b)).map(|(d, _)| *d));
        progress.done.fetch_add(chunk.len() as u64, Relaxed);
    }
    for leaves in out.outputs.values_mut() {
        leaves.sort_unstable();
        leaves.dedup();
    }
    if let Some(patients) = scope.patients.filter(|_| params.wants("Patient")) {
        let exported: HashSet<String> = match out.outputs.get("Patient") {
            Some(leaves) => {
                engine.repo().read_leaves(leaves).into_iter().filter_map(|s| s.ok().map(|s| s.id)).collect()
            }
            None => HashSet::new(),
        };
        for p in patients.iter().filter(|p| !exported.contains(*p)) {
            out.errors.push(format!("Patient/{p} was not found or is not accessible"));
        }
    }
    out.errors.extend(params.ignored.iter().cloned());
    // A map of every resource takes a while to free: not on the export's way.
    std::thread::spawn(move || drop(latest));
    Ok(out)
}

/// Each resource's newest version below the pinned size (and not after `_until`), from the
/// leaf headers alone: the leaves read in ranges on every core, a map per range.
fn latest_at(engine: &Engine, scope: &Scope<'_>) -> Result<LatestParts, FhirError> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) as u64;
    let step = scope.size.div_ceil(cores).max(1);
    let ranges: Vec<std::ops::Range<u64>> = (0..scope.size)
        .step_by(usize::try_from(step).unwrap_or(usize::MAX))
        .map(|s| s..(s + step).min(scope.size))
        .collect();
    let parts = crate::parallel::on_every_core(&ranges, |r| latest_in(engine, scope, r.clone()))
        .into_iter()
        .map(|p| p.ok_or_else(|| FhirError::internal("a thread selecting an export died")).and_then(|p| p))
        .collect::<Result<Vec<LatestMap>, FhirError>>()?;
    Ok(LatestParts(parts))
}

/// The maps of [`latest_at`], by range in leaf order. A resource is the last range's that
/// holds a version of it, and never merged into one map: merging was most of the
/// selection's time on one core.
struct LatestParts(Vec<LatestMap>);

impl LatestParts {
    /// The resources that range `k` holds last, each with its newest version that was not a
    /// deletion (which may lie in an earlier range).
    fn owned(&self, k: usize) -> impl Iterator<Item = (&str, &Latest, Option<u64>)> {
        let (earlier, rest) = self.0.split_at(k.min(self.0.len()));
        let (mine, later) = rest.split_first().map_or((None, &[][..]), |(m, l)| (Some(m), l));
        mine.into_iter().flat_map(|m| m.iter()).filter(move |(key, _)| !later.iter().any(|m| m.contains_key(*key))).map(
            move |(key, l)| {
                let live = l.live.or_else(|| earlier.iter().rev().find_map(|m| m.get(key).and_then(|e| e.live)));
                (&**key, l, live)
            },
        )
    }

    /// Every resource once, with its newest version that was not a deletion.
    fn all(&self) -> impl Iterator<Item = (&str, &Latest, Option<u64>)> {
        (0..self.0.len()).flat_map(|k| self.owned(k))
    }
}

/// [`latest_at`] over the leaves of one range.
fn latest_in(engine: &Engine, scope: &Scope<'_>, leaves: std::ops::Range<u64>) -> Result<LatestMap, FhirError> {
    let mut latest = LatestMap::default();
    // Compartments and types, one allocation each.
    let mut interned: HashMap<Box<str>, std::sync::Arc<str>, foldhash::fast::RandomState> = HashMap::default();
    let mut shared = |c: &str| match interned.get(c) {
        Some(a) => a.clone(),
        None => interned.entry(c.into()).or_insert_with(|| c.into()).clone(),
    };
    let mut key = String::new();
    engine.repo().view().for_each_header_in(leaves, |leaf, h| {
        if crate::auth::store::is_internal(h.rtype) || scope.params.until_ms.is_some_and(|u| h.last_updated_ms > u) {
            return;
        }
        let gone = h.op == Op::Delete.as_str() || h.op == Op::Erase.as_str();
        key.clear();
        key.extend([h.rtype, "/", h.id]);
        let e = match latest.get_mut(key.as_str()) {
            Some(e) => e,
            None => latest.entry(key.as_str().into()).or_insert(Latest {
                leaf,
                version: 0,
                rtype: shared(h.rtype),
                compartment: shared(h.compartment),
                last_updated_ms: 0,
                deleted: false,
                live: None,
            }),
        };
        e.leaf = leaf;
        e.version = h.version;
        if *e.compartment != *h.compartment {
            e.compartment = shared(h.compartment);
        }
        e.last_updated_ms = h.last_updated_ms;
        e.deleted = gone;
        if !gone {
            e.live = Some(leaf);
        }
    })?;
    Ok(latest)
}

/// `_typeFilter`s by type, parsed against the index as it is now.
fn type_filters(engine: &Engine, params: &Params) -> Result<HashMap<String, Vec<Vec<Filter>>>, FhirError> {
    let mut out: HashMap<String, Vec<Vec<Filter>>> = HashMap::new();
    if params.type_filters.is_empty() {
        return Ok(out);
    }
    let idx = engine.current()?;
    for (t, q) in &params.type_filters {
        out.entry(t.clone()).or_default().push(crate::search::type_filter(engine, &idx, t, q)?);
    }
    Ok(out)
}

struct Checker<'a> {
    engine: &'a Engine,
    guard: Option<&'a Guard<'a>>,
    scope: &'a Scope<'a>,
    filters: &'a HashMap<String, Vec<Vec<Filter>>>,
}

impl Checker<'_> {
    /// Whether nothing is decided per resource: no access rules, compartments or filters.
    fn unrestricted(&self) -> bool {
        self.guard.is_none() && matches!(self.scope.level, Level::System) && self.filters.is_empty()
    }

    /// Of `leaves` (versions), those the export may hold: `(leaf, type, id, version)`, in the
    /// order given. What was shown is reported to `shown`.
    fn admitted(&self, leaves: &[u64], shown: &mut Shown<'_>) -> Result<Vec<(u64, String, String, u64)>, FhirError> {
        let engine = self.engine;
        if self.unrestricted() {
            // Nothing to decide per resource: read, so that an erased one is left out.
            let mut out = Vec::with_capacity(leaves.len());
            for stored in engine.repo().read_leaves(leaves) {
                let s = stored?;
                if let (Some(_), Some(leaf)) = (s.body.as_deref(), s.leaf) {
                    out.push((leaf, s.rtype, s.id, s.version));
                }
            }
            let list: Vec<(String, String, u64)> =
                out.iter().map(|(_, t, id, v)| (t.clone(), id.clone(), *v)).collect();
            if !list.is_empty() {
                shown(&list, Disclosed::default());
            }
            return Ok(out);
        }
        let comps = engine.compartments();
        let mut docs: Vec<(u64, String, Doc)> = Vec::with_capacity(leaves.len());
        {
            let idx = engine.current()?;
            for stored in engine.repo().read_leaves(leaves) {
                let s = stored?;
                // Erased compartments read as deleted: nothing to export.
                let (Some(body), Some(leaf)) = (s.body.as_deref(), s.leaf) else { continue };
                let res = json::parse(body.as_bytes(), usize::MAX).map_err(FhirError::internal)?;
                let doc = engine.doc_of(&idx.registry, &s.rtype, &s.id, s.version, &res);
                docs.push((leaf, s.rtype, doc));
            }
        }
        let mut keep = vec![true; docs.len()];
        for (k, (_, t, doc)) in keep.iter_mut().zip(&docs) {
            *k = match self.scope.level {
                Level::System => true,
                Level::Patient | Level::Group(_) => {
                    let ps = comps.patient_ids(t, doc);
                    !ps.is_empty() && self.scope.patients.is_none_or(|want| ps.iter().any(|p| want.contains(*p)))
                }
            };
        }
        let idx = self.engine.current()?;
        if let Some(g) = self.guard {
            for (k, (_, t, doc)) in keep.iter_mut().zip(&docs) {
                if !*k {
                    continue;
                }
                let restriction = if g.restricts() {
                    match idx.of(t).doc(&doc.id)? {
                        Some((key, cur)) if cur.version == doc.version => Restriction::Key(key),
                        _ => Restriction::Unknown,
                    }
                } else {
                    Restriction::Unchecked
                };
                *k = g.admits(t, restriction, doc, None);
            }
        }
        // `_typeFilter`, by type: a type with filters keeps what one of them admits.
        let mut by_type: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (_, t, _)) in docs.iter().enumerate() {
            if keep[i] && self.filters.contains_key(t) {
                by_type.entry(t).or_default().push(i);
            }
        }
        let visibility = self.guard.map(|g| g as &dyn Visibility);
        for (t, positions) in by_type {
            let alternatives = &self.filters[t];
            let subset: Vec<&Doc> = positions.iter().map(|&i| &docs[i].2).collect();
            let ok = crate::search::admits_any(engine, &idx, t, alternatives, &subset, visibility)?;
            for (&i, ok) in positions.iter().zip(ok) {
                keep[i] = ok;
            }
        }
        drop(idx);
        let mut out = Vec::new();
        let mut disclosed = Disclosed::default();
        for ((leaf, t, doc), k) in docs.into_iter().zip(keep) {
            if k {
                disclosed.patients.insert((t.clone(), doc.id.clone()), comps.patients_of(&t, &doc));
                out.push((leaf, t, doc.id.clone(), doc.version));
            }
        }
        if let Some(g) = self.guard {
            disclosed.broke_glass = g.broke_glass.load(Relaxed);
            disclosed.consent_hid = g.consent_hid.load(Relaxed);
        }
        let list: Vec<(String, String, u64)> = out.iter().map(|(_, t, id, v)| (t.clone(), id.clone(), *v)).collect();
        if !list.is_empty() {
            shown(&list, disclosed);
        }
        Ok(out)
    }
}

/// `includeAssociatedData`: the Provenance resources whose `target` is an exported resource
/// (every one, or the newest per target), if the caller may see them.
fn provenance(
    engine: &Engine,
    checker: &Checker<'_>,
    latest: &LatestParts,
    out: &mut Selected,
    shown: &mut Shown<'_>,
) -> Result<(), FhirError> {
    let params = checker.scope.params;
    let relevant = params.associated.iter().any(|a| a == RELEVANT_PROVENANCE);
    let newest_only = params.associated.iter().any(|a| a == LATEST_PROVENANCE) && !relevant;
    let mut exported: HashSet<String> = HashSet::new();
    for leaves in out.outputs.values() {
        for s in engine.repo().read_leaves(leaves).into_iter().flatten() {
            exported.insert(format!("{}/{}", s.rtype, s.id));
        }
    }
    let mut candidates: Vec<u64> = latest
        .all()
        .filter(|(key, l, _)| type_and_id(key).0 == "Provenance" && !l.deleted)
        .map(|(_, l, _)| l.leaf)
        .collect();
    candidates.sort_unstable();
    let mut chosen: BTreeSet<u64> = BTreeSet::new();
    let mut newest: HashMap<String, u64> = HashMap::new();
    for s in engine.repo().read_leaves(&candidates).into_iter().flatten() {
        let (Some(body), Some(leaf)) = (s.body.as_deref(), s.leaf) else { continue };
        let Ok(res) = json::parse(body.as_bytes(), usize::MAX) else { continue };
        for target in res.items(&["target"]).filter_map(|t| t.get("reference").and_then(Json::as_str)) {
            if !exported.contains(target) {
                continue;
            }
            if newest_only {
                let e = newest.entry(target.to_string()).or_insert(leaf);
                *e = (*e).max(leaf);
            } else {
                chosen.insert(leaf);
            }
        }
    }
    chosen.extend(newest.into_values());
    let chosen: Vec<u64> = chosen.into_iter().collect();
    let any_level = Checker { scope: &Scope { level: &Level::System, ..*checker.scope }, ..*checker };
    for chunk in chosen.chunks(BATCH) {
        for (leaf, t, ..) in any_level.admitted(chunk, shown)? {
            out.outputs.entry(t).or_default().push(leaf);
        }
    }
    Ok(())
}
