//! FHIR search: every R4 (and US Core) SearchParameter evaluated by a FHIRPath subset over an
//! in-memory index that every node derives the same way from the ledger.
//!
//! `fhirpath` parses and evaluates expressions; `params` is the registry; `values` turns
//! what an expression yields into comparable values; `index` folds the ledger into
//! documents; `query` parses a request; `exec` matches, sorts and pages; `summary` shapes
//! `_summary`/`_elements` output. `run` ties them together for the HTTP layer.

mod doc;
pub mod exec;
pub mod index;
pub mod params;
pub mod query;
mod store;
mod stream;
pub mod summary;
pub mod validate;
pub mod values;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use self::exec::{cmp_pos, position, Ctx, Position};
use self::index::{Doc, DocKey, Index};
use self::params::Kind;
use self::query::{Filter, Include, Parser, Search};
use self::values::Value;
use crate::definitions::Definitions;
use crate::error::FhirError;

pub use self::index::Engine;

/// The patient compartment: for each resource type, the parameters that place a resource in
/// a patient's compartment (`compartmentdefinition-patient.json`).
#[derive(Debug, Default)]
pub struct Compartments {
    pub patient: BTreeMap<String, Vec<String>>,
    /// Types outside that definition with reference parameters that can point at a Patient
    /// (Device.patient, Contract.subject, GuidanceResponse.subject, ...): for access, such a
    /// resource belongs to every patient it references (see docs/authorization.md, "Security model").
    pub by_reference: BTreeMap<String, Vec<String>>,
}

impl Compartments {
    pub fn load(defs: &Definitions) -> Result<Self, String> {
        let def = defs.json("compartmentdefinition-patient.json")?;
        let mut patient = BTreeMap::new();
        for r in def["resource"].as_array().into_iter().flatten() {
            let params: Vec<String> =
                r["param"].as_array().into_iter().flatten().filter_map(|p| p.as_str().map(String::from)).collect();
            if let (Some(code), false) = (r["code"].as_str(), params.is_empty()) {
                patient.insert(code.to_string(), params);
            }
        }
        Ok(Self { patient, by_reference: BTreeMap::new() })
    }

    /// Adds, for every type of `types` outside the Patient compartment, the reference
    /// parameters of `registry` whose targets include Patient.
    #[must_use]
    pub fn with_references(mut self, registry: &params::Registry, types: &[String]) -> Self {
        for t in types {
            if t == "Patient" || self.patient.contains_key(t) {
                continue;
            }
            let codes: Vec<String> = registry
                .for_type(t)
                .filter(|p| p.kind == Kind::Reference && !p.custom && p.targets.iter().any(|x| x == "Patient"))
                .map(|p| p.code.clone())
                .collect();
            if !codes.is_empty() {
                self.by_reference.insert(t.clone(), codes);
            }
        }
        self
    }

    /// The parameters that tie a resource of `rtype` to patients, for access.
    pub fn patient_params(&self, rtype: &str) -> &[String] {
        self.patient.get(rtype).or_else(|| self.by_reference.get(rtype)).map_or(&[], Vec::as_slice)
    }

    /// The patients a resource belongs to (its patient compartment memberships).
    pub fn patients_of(&self, rtype: &str, doc: &Doc) -> Vec<String> {
        self.patient_ids(rtype, doc).into_iter().map(str::to_string).collect()
    }

    /// [`Compartments::patients_of`], borrowing the ids from the document.
    pub fn patient_ids<'d>(&self, rtype: &str, doc: &'d Doc) -> Vec<&'d str> {
        if rtype == "Patient" {
            return vec![doc.id.as_str()];
        }
        let mut out: Vec<&str> = Vec::new();
        for code in self.patient_params(rtype) {
            for v in doc.get(code) {
                if let Value::Ref { rtype: Some(t), id: Some(id), .. } = v {
                    if t == "Patient" && !out.contains(&id.as_str()) {
                        out.push(id);
                    }
                }
            }
        }
        out
    }

    /// Which patient compartments each `Type/id` of a page belongs to.
    pub fn patients_by_hit<'h>(
        &self,
        idx: &Index,
        hits: impl Iterator<Item = (&'h str, &'h str)>,
    ) -> Result<HashMap<(String, String), Vec<String>>, FhirError> {
        let mut out = HashMap::new();
        for (t, id) in hits {
            if let Some((_, doc)) = idx.of(t).doc(id)? {
                out.insert((t.to_string(), id.to_string()), self.patients_of(t, &doc));
            }
        }
        Ok(out)
    }

    /// Whether resources of `rtype` can belong to a patient (by the compartment definition or
    /// by reference).
    pub fn patient_type(&self, rtype: &str) -> bool {
        rtype == "Patient" || self.patient.contains_key(rtype) || self.by_reference.contains_key(rtype)
    }
}

/// What a search found: one page of matches, what they include, and the paging cursors.
pub struct Found {
    pub search: Search,
    pub matches: Vec<Hit>,
    pub included: Vec<Hit>,
    /// `None` when the search stopped at the page (the total was not asked for).
    pub total: Option<usize>,
    pub next: Option<String>,
    pub previous: Option<String>,
    /// With a guard: the patients each returned resource belongs to, by `(type, id)`.
    pub patients: HashMap<(String, String), Vec<String>>,
}

/// A resource a search returns: the version it matched is the one read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hit {
    pub rtype: String,
    pub id: String,
    pub leaf: u64,
    pub version: u64,
}

/// What decides whether a caller may see a document. The authorization layer implements
/// it; a search given one leaves everything it hides out of matches, counts, chains, `_has`,
/// `_list` and includes alike, so no condition can reveal a hidden resource.
pub trait Visibility: Sync {
    fn visible(&self, rtype: &str, key: DocKey, doc: &Doc) -> bool;
}

/// The keys of the live `rtype` resources matching `query`, unguarded (what a scope's query
/// restriction admits).
pub fn matching(
    engine: &Engine,
    idx: &Index,
    rtype: &str,
    query: &[(String, String)],
) -> Result<Vec<DocKey>, FhirError> {
    let parser = Parser { idx, profiles: engine.profiles(), base: "", lenient: false };
    let search = parser.parse(&[rtype.to_string()], query)?;
    let ctx = Ctx { idx, profiles: engine.profiles(), repo: engine.repo(), now_ms: crate::fhir::now_ms(), guard: None };
    let filters = search.types.first().map_or(&[][..], |(_, f)| f.as_slice());
    ctx.matches(rtype, filters)
}

/// The filters of a `_typeFilter` (`Observation?category=laboratory`): search parameters
/// only; a result parameter (`_sort`, `_include`, `_count`...) is refused, since an export has
/// no pages to shape.
pub fn type_filter(engine: &Engine, idx: &Index, rtype: &str, query: &str) -> Result<Vec<Filter>, FhirError> {
    let pairs = crate::codec::parse_query(query);
    if let Some((name, _)) = pairs.iter().find(|(n, _)| query::RESULT.contains(&n.split(':').next().unwrap_or(n))) {
        return Err(FhirError::invalid(format!("_typeFilter {rtype}?{query}: {name} is not a search parameter"))
            .at("_typeFilter"));
    }
    let parser = Parser { idx, profiles: engine.profiles(), base: "", lenient: false };
    let search = parser.parse(&[rtype.to_string()], &pairs)?;
    Ok(search.types.into_iter().next().map(|(_, f)| f).unwrap_or_default())
}

/// Which of `docs` (versions of `rtype`) satisfy at least one of `alternatives` (each a list
/// of ANDed filters, as [`type_filter`] made them); chains see only what `guard` admits.
pub fn admits_any(
    engine: &Engine,
    idx: &Index,
    rtype: &str,
    alternatives: &[Vec<Filter>],
    docs: &[&Doc],
    guard: Option<&dyn Visibility>,
) -> Result<Vec<bool>, FhirError> {
    let ctx = Ctx { idx, profiles: engine.profiles(), repo: engine.repo(), now_ms: crate::fhir::now_ms(), guard };
    let mut out = vec![false; docs.len()];
    for filters in alternatives {
        for (o, ok) in out.iter_mut().zip(ctx.admits_each(rtype, filters, docs)?) {
            *o |= ok;
        }
    }
    Ok(out)
}

/// Runs a search over `types` (one type, or several for a system-level search), with
/// `extra` filters (a compartment) ANDed to the request's.
/// `guard`, when given, is built over `idx` (the index this search must run on) and decides
/// what the caller sees; the patients of what it returns are then reported in
/// [`Found::patients`] for the disclosure log.
#[allow(clippy::too_many_arguments)]
pub fn run(
    engine: &Engine,
    idx: &Index,
    base: &str,
    types: &[String],
    params: &[(String, String)],
    lenient: bool,
    extra: Option<Filter>,
    guard: Option<&dyn Visibility>,
) -> Result<Found, FhirError> {
    let repo = engine.repo();
    let with_patients = |mut found: Found, idx: &Index| -> Result<Found, FhirError> {
        if guard.is_some() {
            let hits = found.matches.iter().chain(&found.included).map(|h| (h.rtype.as_str(), h.id.as_str()));
            found.patients = engine.compartments().patients_by_hit(idx, hits)?;
        }
        Ok(found)
    };
    let parser = Parser { idx, profiles: engine.profiles(), base, lenient };
    let mut search = parser.parse(types, params)?;
    if let Some(f) = extra {
        for (_, filters) in &mut search.types {
            filters.push(f.clone());
        }
    }
    let ctx = Ctx { idx, profiles: engine.profiles(), repo, now_ms: crate::fhir::now_ms(), guard };
    let cursor_key = cursor_key(repo);
    let cursor = search.cursor.as_deref().map(|c| open_cursor(&cursor_key, c)).transpose()?;
    if cursor.as_ref().is_some_and(|(_, at)| at.vals.len() != search.sort.len()) {
        return Err(FhirError::invalid("_cursor belongs to a search with another _sort").at("_cursor"));
    }
    let single = search.types.len() == 1;
    // Without _sort and without an asked-for total, a search stops once its page is full:
    // matches come in key order, and the cursor is the last key.
    let lazy = single
        && search.sort.is_empty()
        && search.total != query::Total::Accurate
        && search.summary != query::Summary::Count
        // `_count=0` asks for the total alone.
        && search.count > 0
        && cursor.as_ref().is_none_or(|(after, _)| *after);
    let mut computed: Option<Vec<DocKey>> = None;
    if lazy {
        let (t, filters) = &search.types[0];
        let after = cursor.as_ref().map(|(_, at)| at.doc);
        let (keys, full) = ctx.matches_from(t, filters, after, Some(search.count + 1))?;
        if !full {
            let more = keys.len() > search.count;
            let page: Vec<Position> = keys
                .iter()
                .take(search.count)
                .map(|&doc| Position { vals: Vec::new(), rtype: "".into(), id: "".into(), doc })
                .collect();
            let next =
                (more && search.count > 0).then(|| page.last().map(|p| seal_cursor(&cursor_key, true, p))).flatten();
            let previous = (after.is_some() && search.count > 0)
                .then(|| page.first().map(|p| seal_cursor(&cursor_key, false, p)))
                .flatten();
            let (matches, included) = page_hits(&ctx, &search, page.iter().map(|p| (t.as_str(), p.doc)))?;
            let found = Found { search, matches, included, total: None, next, previous, patients: HashMap::new() };
            return with_patients(found, idx);
        }
        computed = Some(keys);
    }
    let mut all: Vec<Position> = Vec::new();
    for (t, filters) in &search.types {
        let docs = idx.of(t);
        let keys = match computed.take() {
            Some(k) => k,
            None => ctx.matches(t, filters)?,
        };
        let t = idx.type_name(t);
        if search.sort.is_empty() {
            // Creation order needs only the key (and the type, when several are searched).
            let rtype = if single { "" } else { t };
            all.extend(keys.into_iter().map(|key| Position {
                vals: Vec::new(),
                rtype: rtype.into(),
                id: "".into(),
                doc: key,
            }));
        } else if exec::sorts_by_record(idx, t, &search.sort) {
            // Sort records: a few adjacent blocks for one patient's matches, where opening
            // each document was most of a `_sort` (issue 17).
            all.extend(
                docs.sort_heads(&keys)?
                    .into_iter()
                    .map(|(key, head)| exec::position_of_head(&search.sort, t, key, head)),
            );
        } else {
            for key in keys {
                if let Some(doc) = docs.get(key)? {
                    all.push(position(&search.sort, t, key, &doc));
                }
            }
        }
    }
    if !search.sort.is_empty() || search.types.len() > 1 {
        all.sort_by(|a, b| cmp_pos(&search.sort, a, b));
    }
    let total = all.len();
    let (start, end) = match cursor {
        None => (0, search.count.min(total)),
        Some((after, at)) => {
            if after {
                let s = all.partition_point(|p| cmp_pos(&search.sort, p, &at).is_le());
                (s, (s + search.count).min(total))
            } else {
                let e = all.partition_point(|p| cmp_pos(&search.sort, p, &at).is_lt());
                (e.saturating_sub(search.count), e)
            }
        }
    };
    let page = &all[start..end];
    let paged = search.count > 0 && search.summary != query::Summary::Count;
    let next = (end < total && paged).then(|| page.last().map(|p| seal_cursor(&cursor_key, true, p))).flatten();
    let previous = (start > 0 && paged).then(|| page.first().map(|p| seal_cursor(&cursor_key, false, p))).flatten();
    let (matches, included) = page_hits(
        &ctx,
        &search,
        page.iter().map(|p| (if p.rtype.is_empty() { search.types[0].0.as_str() } else { p.rtype.as_ref() }, p.doc)),
    )?;
    let found = Found { search, matches, included, total: Some(total), next, previous, patients: HashMap::new() };
    with_patients(found, idx)
}

/// A document as includes and pages name it: its type and key.
type At<'t> = (&'t str, DocKey);

/// `keys` grouped by type, to be read a type at a time.
fn by_type<'t>(keys: impl Iterator<Item = At<'t>>) -> BTreeMap<&'t str, Vec<DocKey>> {
    let mut out: BTreeMap<&str, Vec<DocKey>> = BTreeMap::new();
    for (t, key) in keys {
        out.entry(t).or_default().push(key);
    }
    out
}

/// A page's hits and the resources they include (none when only the total is asked for),
/// `_include` starting from the keys the page already has.
fn page_hits<'p>(
    ctx: &Ctx,
    search: &query::Search,
    page: impl Iterator<Item = At<'p>> + Clone,
) -> Result<(Vec<Hit>, Vec<Hit>), FhirError> {
    let keyed = keyed_hits(ctx.idx, page)?;
    let included = if search.summary == query::Summary::Count {
        Vec::new()
    } else {
        includes(ctx, &search.include, &search.revinclude, &keyed)?
    };
    Ok((keyed.into_iter().map(|(_, h)| h).collect(), included))
}

/// The hits of `page` that still have a document, in page order, each with where it is;
/// each type's heads read together ([`index::TypeDocs::heads`]).
fn keyed_hits<'p>(idx: &Index, page: impl Iterator<Item = At<'p>> + Clone) -> Result<Vec<(At<'p>, Hit)>, FhirError> {
    let mut heads = HashMap::new();
    for (t, keys) in by_type(page.clone()) {
        heads.extend(idx.of(t).heads(&keys)?.into_iter().map(|(key, h)| ((t, key), h)));
    }
    Ok(page
        .filter_map(|at| {
            let h = heads.remove(&at)?;
            Some((at, Hit { rtype: at.0.to_string(), id: h.id, leaf: h.leaf, version: h.version }))
        })
        .collect())
}

/// The live documents of `keys`, each type's read together.
fn docs_of<'t>(idx: &Index, keys: &[At<'t>]) -> Result<HashMap<At<'t>, Arc<Doc>>, FhirError> {
    let mut out = HashMap::with_capacity(keys.len());
    for (t, keys) in by_type(keys.iter().copied()) {
        out.extend(idx.of(t).docs(&keys)?.into_iter().map(|(key, d)| ((t, key), d)));
    }
    Ok(out)
}

/// Resources the page's matches `_include` and that `_revinclude` them, iterating (up to a
/// bound) for the `:iterate` ones. The matches come with their document keys, which the page
/// had: looking each up again by id was a point read per match, slower the larger the store.
fn includes(ctx: &Ctx, inc: &[Include], rev: &[Include], matches: &[(At<'_>, Hit)]) -> Result<Vec<Hit>, FhirError> {
    const MAX_ROUNDS: usize = 8;
    const MAX_INCLUDED: usize = 10_000;
    let idx = ctx.idx;
    if inc.is_empty() && rev.is_empty() {
        return Ok(Vec::new());
    }
    let ref_codes = |t: &str| -> Vec<&str> {
        idx.registry.for_type(t).filter(|p| p.kind == Kind::Reference).map(|p| p.code.as_str()).collect()
    };
    // Resources are (type, document key) while iterating; documents hold id and leaf.
    let mut seen: BTreeSet<(&str, DocKey)> =
        matches.iter().filter_map(|&((t, k), _)| Some((idx.known_type(t)?, k))).collect();
    let mut frontier: Vec<(&str, DocKey)> = seen.iter().copied().collect();
    let mut out = Vec::new();
    for round in 0..MAX_ROUNDS {
        if round > 0 && !inc.iter().chain(rev).any(|i| i.iterate) {
            break; // nothing to follow from what round 0 found
        }
        let mut found: Vec<(&str, DocKey)> = Vec::new();
        let docs = docs_of(idx, &frontier)?;
        // Each referenced id looked up once a round: a page of Encounters names a few
        // practitioners many times, and each lookup is a point read.
        let mut asked: HashSet<(&str, &str)> = HashSet::new();
        for &(t, key) in &frontier {
            let Some(doc) = docs.get(&(t, key)).map(|d| &**d) else { continue };
            for i in inc.iter().filter(|i| round == 0 || i.iterate) {
                if i.source != "*" && i.source != t {
                    continue;
                }
                let codes = i.code.as_deref().map_or_else(|| ref_codes(t), |c| vec![c]);
                for code in codes {
                    for v in doc.get(code) {
                        let Value::Ref { rtype: Some(rt), id: Some(rid), .. } = v else { continue };
                        if i.target.as_ref().is_none_or(|x| x == rt) {
                            let Some(rt) = idx.known_type(rt) else { continue };
                            if !asked.insert((rt, rid.as_str())) {
                                continue;
                            }
                            if let Some(k) = idx.of(rt).key_of(rid)? {
                                found.push((rt, k));
                            }
                        }
                    }
                }
            }
            for i in rev.iter().filter(|i| round == 0 || i.iterate) {
                if i.target.as_ref().is_some_and(|x| x != t) {
                    continue;
                }
                let src = idx.of(&i.source);
                let target = format!("{t}/{}", doc.id);
                let codes = i.code.as_deref().map_or_else(|| ref_codes(&i.source), |c| vec![c]);
                for code in codes {
                    // `Type/id` postings are exact: every document listed points here.
                    for k in src.posting(code, &target)? {
                        found.push((idx.type_name(&i.source), k));
                    }
                }
            }
        }
        frontier.clear();
        found.retain(|&x| seen.insert(x));
        if ctx.guard.is_some() {
            // What the caller may not see is neither returned nor followed further.
            let docs = docs_of(idx, &found)?;
            for (t, k) in found {
                let Some(d) = docs.get(&(t, k)).filter(|d| ctx.visible(t, k, d)) else { continue };
                out.push(Hit { rtype: t.to_string(), id: d.id.clone(), leaf: d.leaf, version: d.version });
                frontier.push((t, k));
            }
        } else {
            // Without a guard the values need not be opened.
            for (at, hit) in keyed_hits(idx, found.into_iter())? {
                frontier.push(at);
                out.push(hit);
            }
        }
        if frontier.is_empty() || out.len() >= MAX_INCLUDED {
            break;
        }
    }
    Ok(out)
}

fn cursor_key(repo: &crate::repo::Repo) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fhir-ledger search cursor v1\0");
    h.update(repo.index_key());
    h.finalize().into()
}

/// A cursor is the sort position of a page's last (or first) match, sealed so that it can
/// be neither read nor forged; paging by position survives concurrent writes.
fn seal_cursor(key: &[u8; 32], after: bool, p: &Position) -> String {
    let plain = serde_json::to_vec(&(after, p)).unwrap_or_default();
    crate::crypto::seal_text(key, &plain, b"cursor")
}

fn open_cursor(key: &[u8; 32], c: &str) -> Result<(bool, Position<'static>), FhirError> {
    let bad = || FhirError::invalid("_cursor is not a cursor this server issued").at("_cursor");
    let plain = crate::crypto::open_text(key, c, b"cursor").ok_or_else(bad)?;
    serde_json::from_slice(&plain).map_err(|_| bad())
}
