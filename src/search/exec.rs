//! Running a parsed search against the index: chains and `_has` are resolved into id sets
//! first (sub-searches), candidates come from postings where a parameter has them, every
//! condition is then checked on each candidate, and the matches are sorted and paged.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::index::{str_prefix_key, Doc, DocKey, Index, SortHead, Source, TypeDocs, NARROW_MS, STR_PREFIX};
use super::query::{Filter, Pred, Prefix, SortKey, StrMode, UriMode};
use super::stream::Meet;
use super::values::{normalize, Value};
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::repo::Repo;

/// Matches decided by postings alone come back whole (with a total) up to this many; a larger
/// set is read only as far as the page.
const WHOLE_UP_TO: usize = 1_000;

/// A filter with its sub-searches done.
enum Cond<'f> {
    Values {
        code: &'f str,
        negate: bool,
        preds: &'f [Pred],
    },
    Missing {
        code: &'f str,
        missing: bool,
    },
    /// Any value of any of `codes` references one of `targets` (`(type, id)`).
    RefIn {
        codes: Vec<&'f str>,
        targets: BTreeSet<(String, String)>,
    },
    IdIn(BTreeSet<String>),
    Text {
        content: bool,
        needles: &'f [String],
    },
}

pub struct Ctx<'a> {
    pub idx: &'a Index,
    pub profiles: &'a crate::fhir::profiles::Profiles,
    pub repo: &'a Repo,
    pub now_ms: i64,
    /// What the caller may see: everything else is left out of matches, chains, `_has` and
    /// `_list` alike, so no condition can reveal a hidden resource.
    pub guard: Option<&'a dyn super::Visibility>,
}

impl Ctx<'_> {
    /// The keys of the live `rtype` resources matching every filter, in key order.
    pub fn matches(&self, rtype: &str, filters: &[Filter]) -> Result<Vec<DocKey>, FhirError> {
        Ok(self.matches_from(rtype, filters, None, None)?.0)
    }

    /// Matches in key order. With `limit`, only those after `after`, stopping at `limit`
    /// (the flag is then false); when postings decide every condition the whole set comes
    /// back anyway (flag true), since it costs nothing more.
    pub fn matches_from(
        &self,
        rtype: &str,
        filters: &[Filter],
        after: Option<DocKey>,
        limit: Option<usize>,
    ) -> Result<(Vec<DocKey>, bool), FhirError> {
        let docs = self.idx.of(rtype);
        let (after, limit) = match limit {
            Some(l) => (after, l),
            None => (None, usize::MAX),
        };
        let mut conds = Vec::with_capacity(filters.len());
        for f in filters {
            conds.push(self.resolve(rtype, f)?);
        }
        let known = |s: &str, c: &str| self.profiles.is_known_code(s, c);
        let mut out = Vec::new();
        let seen = |k: DocKey, d: &Doc| self.visible(rtype, k, d);
        if let Some((mut stream, exact)) = candidates(&docs, &conds, known)? {
            let rest: Vec<&Cond> = conds.iter().zip(&exact).filter(|(_, e)| !**e).map(|(c, _)| c).collect();
            let from = after.map_or(0, |a| a.saturating_add(1));
            if rest.is_empty() && self.guard.is_none() {
                // Postings list live documents only, and they decided every condition. A set
                // small enough comes back whole (the caller then knows the total); a larger one
                // only up to the limit.
                let whole = limit.max(WHOLE_UP_TO).saturating_add(1);
                let mut all = Vec::new();
                for k in stream.from(0) {
                    all.push(k?);
                    if all.len() >= whole {
                        break;
                    }
                }
                if all.len() < whole {
                    return Ok((all, true));
                }
                if after.is_none() {
                    all.truncate(limit);
                    return Ok((all, false));
                }
                for k in stream.from(from) {
                    out.push(k?);
                    if out.len() >= limit {
                        break;
                    }
                }
                return Ok((out, false));
            }
            for k in stream.from(from) {
                let k = k?;
                let Some(d) = docs.get(k)? else { continue };
                if rest.iter().all(|c| self.holds(c, &d)) && seen(k, &d) && self.text_holds(rtype, &conds, &d)? {
                    out.push(k);
                    if out.len() >= limit {
                        return Ok((out, false));
                    }
                }
            }
        } else {
            let from = after.map_or(0, |a| a.saturating_add(1));
            for item in docs.scan(from) {
                let (k, d) = item?;
                if conds.iter().all(|c| self.holds(c, &d)) && seen(k, &d) && self.text_holds(rtype, &conds, &d)? {
                    out.push(k);
                    if out.len() >= limit {
                        return Ok((out, false));
                    }
                }
            }
        }
        // Ran to the end: the whole set, unless it started after a cursor.
        Ok((out, after.is_none()))
    }

    /// Which of `docs` (versions of `rtype`, not necessarily the current ones: a Bulk export
    /// reads the ledger at one tree size) satisfy every filter. Chains, `_has` and `_list`
    /// are resolved against the index once for all of them.
    pub fn admits_each(&self, rtype: &str, filters: &[Filter], docs: &[&Doc]) -> Result<Vec<bool>, FhirError> {
        let conds = filters.iter().map(|f| self.resolve(rtype, f)).collect::<Result<Vec<_>, _>>()?;
        docs.iter().map(|d| Ok(conds.iter().all(|c| self.holds(c, d)) && self.text_holds(rtype, &conds, d)?)).collect()
    }

    /// Whether the caller may see this document (always, without a guard).
    pub fn visible(&self, rtype: &str, key: DocKey, doc: &Doc) -> bool {
        self.guard.is_none_or(|g| g.visible(rtype, key, doc))
    }

    fn resolve<'f>(&self, rtype: &str, f: &'f Filter) -> Result<Cond<'f>, FhirError> {
        Ok(match f {
            Filter::Values { code, negate, preds } => Cond::Values { code, negate: *negate, preds },
            Filter::Missing { code, missing } => Cond::Missing { code, missing: *missing },
            Filter::Ids(ids) => Cond::IdIn(ids.iter().cloned().collect()),
            Filter::Text { content, needles } => Cond::Text { content: *content, needles },
            Filter::Compartment { codes, target } => Cond::RefIn {
                codes: codes.iter().map(String::as_str).collect(),
                targets: std::iter::once(target.clone()).collect(),
            },
            Filter::Chain { code, targets } => {
                let mut found = BTreeSet::new();
                for (t, inner) in targets {
                    let keys = self.matches(t, std::slice::from_ref(inner))?;
                    // Their ids only: the heads, read together, not each whole document (a
                    // chain's targets grow with the data: ten times the patients by a name).
                    found.extend(self.idx.of(t).heads(&keys)?.into_values().map(|h| (t.clone(), h.id)));
                }
                Cond::RefIn { codes: vec![code], targets: found }
            }
            Filter::Has { rtype: source, code, inner } => {
                let keys = self.matches(source, std::slice::from_ref(inner))?;
                let mut ids = BTreeSet::new();
                let d = self.idx.of(source);
                for k in keys {
                    let Some(doc) = d.get(k)? else { continue };
                    for v in doc.get(code) {
                        if let Value::Ref { rtype: Some(t), id: Some(id), .. } = v {
                            if t == rtype {
                                ids.insert(id.clone());
                            }
                        }
                    }
                }
                Cond::IdIn(ids)
            }
            Filter::List(lists) => {
                let mut ids = BTreeSet::new();
                let d = self.idx.of("List");
                for l in lists {
                    let Some((_, doc)) = d.doc(l)?.filter(|(k, doc)| self.visible("List", *k, doc)) else { continue };
                    for v in doc.get("item") {
                        if let Value::Ref { rtype: Some(t), id: Some(id), .. } = v {
                            if t == rtype {
                                ids.insert(id.clone());
                            }
                        }
                    }
                }
                Cond::IdIn(ids)
            }
        })
    }

    fn holds(&self, c: &Cond, doc: &Doc) -> bool {
        match c {
            Cond::Values { code, negate, preds } => {
                let any = doc.get(code).iter().any(|v| preds.iter().any(|p| pred_matches(p, v, self)));
                any != *negate
            }
            Cond::Missing { code, missing } => doc.get(code).is_empty() == *missing,
            Cond::RefIn { codes, targets } => codes.iter().any(|code| {
                doc.get(code).iter().any(|v| match v {
                    Value::Ref { rtype: Some(t), id: Some(id), .. } => targets.contains(&(t.clone(), id.clone())),
                    _ => false,
                })
            }),
            Cond::IdIn(ids) => ids.contains(&doc.id),
            Cond::Text { .. } => true,
        }
    }

    /// `_text` and `_content` read the resource itself (they are not indexed).
    fn text_holds(&self, rtype: &str, conds: &[Cond], doc: &Doc) -> Result<bool, FhirError> {
        for c in conds {
            let Cond::Text { content, needles } = c else { continue };
            let Some(body) = self.repo.read(rtype, &doc.id)?.parsed()? else { return Ok(false) };
            let mut text = String::new();
            if *content {
                strings_of(&body, &mut text);
            } else if let Some(div) = body.get("text").and_then(|t| t.get("div")).and_then(Json::as_str) {
                text = strip_tags(div);
            }
            let text = normalize(&text);
            if !needles.iter().any(|n| text.contains(n.as_str())) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn strings_of(v: &Json, out: &mut String) {
    match v {
        Json::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        Json::Array(items) => items.iter().for_each(|i| strings_of(i, out)),
        Json::Object(members) => members.iter().for_each(|(_, m)| strings_of(m, out)),
        _ => {}
    }
}

fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// Candidate keys as a stream, and which conditions they decide exactly.
type Candidates<'s> = (Meet<'s>, Vec<bool>);

/// Candidate documents from postings and ordered indexes: the intersection of every
/// condition that can name its documents, in key order, and which conditions that set decides
/// exactly (they need no check per document). `None` when no condition can: scan them all.
fn candidates<'s>(
    docs: &'s TypeDocs<'s>,
    conds: &[Cond],
    profiles_known: impl Fn(&str, &str) -> bool,
) -> Result<Option<Candidates<'s>>, FhirError> {
    let mut parts = Vec::new();
    let mut exact = vec![false; conds.len()];
    // Range conditions on one date parameter (`date=ge…&date=lt…`) read one window together.
    // Not on one whose values lie in other parameters' postings: a document with a value in
    // each of them is a point in each, not wide, and each condition may hold by another one.
    let mut windows: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for c in conds {
        if let Cond::Values { code, negate: false, preds: [Pred::Date { prefix, lo, hi }] } = c {
            if *prefix != Prefix::Ne && docs.derived(code).is_none() {
                let (f, t) = date_window(*prefix, *lo, *hi);
                let w = windows.entry(code).or_insert((i64::MIN, i64::MAX));
                *w = (w.0.max(f), w.1.min(t));
            }
        }
    }
    for (i, c) in conds.iter().enumerate() {
        let found = match c {
            Cond::Values { code, negate: false, preds: [Pred::Date { prefix, .. }] }
                if *prefix != Prefix::Ne && docs.derived(code).is_none() =>
            {
                // The first of them reads the merged window; it decides for the others.
                windows.remove(code).map(|w| docs.date_source(code, w).map(|k| (k, false))).transpose()?
            }
            Cond::IdIn(ids) => {
                let mut keys = Vec::with_capacity(ids.len());
                for id in ids {
                    keys.extend(docs.key_of(id)?);
                }
                Some((Source::keys(keys), true))
            }
            Cond::RefIn { codes, targets } => {
                let mut source = Source::default();
                for code in codes {
                    for (t, id) in targets {
                        source.add(docs.posting_source(code, &format!("{t}/{id}")));
                    }
                }
                Some((source, true))
            }
            Cond::Values { code, negate: false, preds } => pred_candidates(docs, code, preds, &profiles_known)?,
            _ => None,
        };
        if let Some((source, is_exact)) = found {
            exact[i] = is_exact;
            parts.push(docs.stream(source));
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some((Meet::new(parts), exact)))
}

/// Candidates of one OR of values, and whether they are exact.
fn pred_candidates(
    docs: &TypeDocs,
    code: &str,
    preds: &[Pred],
    known: &impl Fn(&str, &str) -> bool,
) -> Result<Option<(Source, bool)>, FhirError> {
    let mut source = Source::default();
    let mut exact = true;
    for p in preds {
        match p {
            Pred::Token { system: None, code: Some(c) } => source.add(docs.posting_source(code, c)),
            Pred::Token { system: Some(Some(s)), code: Some(c) } => {
                source.add(docs.posting_source(code, &format!("{s}|{c}")));
                // A bare code of a known system may be this one: check those documents.
                let bare = format!("\0|{c}");
                if known(s, c) && docs.stream(docs.posting_source(code, &bare)).seek(0)?.is_some() {
                    source.add(docs.posting_source(code, &bare));
                    exact = false;
                }
            }
            Pred::Token { system: Some(Some(s)), code: None } => {
                source.add(docs.posting_source(code, &format!("{s}|")));
            }
            Pred::Token { system: Some(None), code: Some(c) } => {
                source.add(docs.posting_source(code, c));
                exact = false;
            }
            Pred::Str { needle, mode: mode @ (StrMode::Starts | StrMode::Exact) } => {
                // Values are posted under their first prefixes: a short enough prefix query is
                // answered exactly; a longer one or `:exact` (the same characters, normalized)
                // is checked on the documents of its first prefix.
                let norm = if *mode == StrMode::Exact { normalize(needle) } else { needle.clone() };
                if norm.is_empty() {
                    return Ok(None);
                }
                let cut = norm.char_indices().nth(STR_PREFIX).map_or(norm.len(), |(i, _)| i);
                source.add(docs.posting_source(code, &str_prefix_key(&norm[..cut])));
                exact &= *mode == StrMode::Starts && cut == norm.len();
            }
            Pred::Ref { rtype: Some(t), id } => source.add(docs.posting_source(code, &format!("{t}/{id}"))),
            Pred::Ref { rtype: None, id } => source.add(docs.reference_source(code, id)),
            Pred::Date { prefix, lo, hi } if *prefix != Prefix::Ne => {
                source.add(docs.date_source(code, date_window(*prefix, *lo, *hi))?);
                exact = false;
            }
            Pred::Num { prefix, value, lo, hi, code: unit, .. } if *prefix != Prefix::Ne => {
                // Quantities are filed under their code and their unit.
                source.add(docs.num_source(code, unit.as_deref(), num_window(*prefix, *value, *lo, *hi))?);
                exact = false;
            }
            _ => return Ok(None),
        }
    }
    Ok(Some((source, exact)))
}

/// The window of point start times (`lo`) that can satisfy a date prefix; a point is at most
/// [`NARROW_MS`] wide, so `hi > x` becomes `lo > x - NARROW_MS`.
fn date_window(prefix: Prefix, s: i64, e: i64) -> (i64, i64) {
    let w = NARROW_MS;
    match prefix {
        Prefix::Eq => (s, e),
        Prefix::Gt => (e.saturating_sub(w), i64::MAX),
        Prefix::Ge => (s.saturating_sub(w), i64::MAX),
        Prefix::Sa => (e, i64::MAX),
        Prefix::Lt | Prefix::Eb => (i64::MIN, s),
        Prefix::Le => (i64::MIN, e),
        Prefix::Ne | Prefix::Ap => (i64::MIN, i64::MAX),
    }
}

/// The window of point values that can satisfy a number prefix.
fn num_window(prefix: Prefix, v: f64, lo: f64, hi: f64) -> (f64, f64) {
    match prefix {
        Prefix::Eq => (lo, hi),
        Prefix::Gt | Prefix::Sa | Prefix::Ge => (v, f64::MAX),
        Prefix::Lt | Prefix::Eb | Prefix::Le => (f64::MIN, v),
        Prefix::Ap => {
            let d = (v.abs() * 0.1).max(hi - lo);
            (v - d, v + d)
        }
        Prefix::Ne => (f64::MIN, f64::MAX),
    }
}

// ---------------------------------------------------------------- value matching

fn pred_matches(p: &Pred, v: &Value, ctx: &Ctx) -> bool {
    match (p, v) {
        (Pred::Token { system, code }, Value::Token { system: vs, code: vc, bare, .. }) => {
            code.as_ref().is_none_or(|c| vc.as_ref() == Some(c))
                && match system {
                    None => true,
                    Some(None) => vs.is_none(),
                    Some(Some(s)) if *bare => vc.as_ref().is_some_and(|c| ctx.profiles.is_known_code(s, c)),
                    Some(Some(s)) => vs.as_ref() == Some(s),
                }
        }
        (Pred::TokenText(needle), Value::Token { text: Some(t), .. }) => t.starts_with(needle.as_str()),
        (Pred::OfType { system, code, value }, Value::Token { code: Some(vc), types, .. }) => {
            vc == value
                && types.iter().any(|(ts, tc)| tc == code && system.as_ref().is_none_or(|s| ts.as_ref() == Some(s)))
        }
        // A bare `code` element takes its system from its binding; a Coding without a system
        // is in no value set.
        (Pred::InSet(set), Value::Token { system, code: Some(c), bare, .. }) => match system {
            Some(s) => set.has(s, c),
            None => *bare && set.has_code(c),
        },
        (Pred::Str { needle, mode }, Value::Str { norm, exact }) => match mode {
            StrMode::Starts => norm.starts_with(needle.as_str()),
            StrMode::Contains => norm.contains(needle.as_str()),
            StrMode::Exact => exact == needle,
        },
        (Pred::Date { prefix, lo, hi }, Value::Date { lo: a, hi: b }) => {
            date_matches(*prefix, (*lo, *hi), (*a, *b), ctx.now_ms)
        }
        (
            Pred::Num { prefix, value, lo, hi, system, code },
            Value::Quantity { lo: a, hi: b, system: vs, code: vc, unit },
        ) => {
            let units = system.as_ref().is_none_or(|s| vs.as_ref() == Some(s))
                && code
                    .as_ref()
                    .is_none_or(|c| vc.as_ref() == Some(c) || (system.is_none() && unit.as_ref() == Some(c)));
            units && num_matches(*prefix, *value, (*lo, *hi), (*a, *b))
        }
        (Pred::Ref { rtype, id }, Value::Ref { rtype: vt, id: Some(vid), .. }) => {
            vid == id && rtype.as_ref().is_none_or(|t| vt.as_ref() == Some(t))
        }
        (Pred::RefUrl(u), Value::Ref { url: Some(vu), .. }) => vu == u || vu.split('|').next() == Some(u.as_str()),
        (Pred::RefIdent { system, value }, Value::Ref { ident: Some((vs, vv)), .. }) => {
            vv == value && system.as_ref().is_none_or(|s| vs.as_ref() == Some(s))
        }
        (Pred::Uri { value, mode }, Value::Uri(u)) => match mode {
            UriMode::Exact => u == value,
            UriMode::Below => u.starts_with(value.as_str()),
            UriMode::Above => value.starts_with(u.as_str()),
        },
        (Pred::Uri { value, mode: UriMode::Exact }, Value::Ref { url: Some(u), .. }) => u == value,
        (Pred::Composite(parts), Value::Composite(comps)) => {
            parts.len() == comps.len()
                && parts.iter().zip(comps).all(|(p, vals)| vals.iter().any(|v| pred_matches(p, v, ctx)))
        }
        _ => false,
    }
}

/// R4 search.html, "prefix": search range `[s, e)` against target range `[a, b)`.
fn date_matches(prefix: Prefix, (s, e): (i64, i64), (a, b): (i64, i64), now_ms: i64) -> bool {
    let contains = s <= a && b <= e;
    match prefix {
        Prefix::Eq => contains,
        Prefix::Ne => !contains,
        Prefix::Gt => b > e,
        Prefix::Lt => a < s,
        // The range at or above the search value's start (below its end) overlaps the
        // target: a day born at the searched instant is "le" that instant (as HAPI, Blaze and
        // Medplum read it; the R4 wording's "or contains" is the same within the value).
        Prefix::Ge => b > s,
        Prefix::Le => a < e,
        Prefix::Sa => a >= e,
        Prefix::Eb => b <= s,
        Prefix::Ap => {
            // "approximately": within 10% of the distance between now and the value.
            let gap = ((i128::from(now_ms) - i128::from(s)).abs() / 10) as i64;
            a < e.saturating_add(gap) && b > s.saturating_sub(gap)
        }
    }
}

/// Number and quantity: the search value `v` with implicit range `[lo, hi)` against the
/// target interval `[a, b]` (a single value has `a == b`).
fn num_matches(prefix: Prefix, v: f64, (lo, hi): (f64, f64), (a, b): (f64, f64)) -> bool {
    // The bounds are decimal (0.8 ± 0.05); absorb binary rounding so that 0.85 is outside.
    let eps = (hi - lo) * 1e-9;
    let within = lo - eps <= a && b < hi - eps;
    match prefix {
        Prefix::Eq => within,
        Prefix::Ne => !within,
        Prefix::Gt => b > v,
        Prefix::Lt => a < v,
        // Starts after / ends before: the whole target interval lies beyond the value.
        Prefix::Sa => a > v,
        Prefix::Eb => b < v,
        Prefix::Ge => b >= v,
        Prefix::Le => a <= v,
        Prefix::Ap => {
            let d = (v.abs() * 0.1).max(hi - lo);
            a <= v + d && b >= v - d
        }
    }
}

// ---------------------------------------------------------------- sorting and paging

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SortVal {
    Num(f64),
    Str(String),
    Missing,
}

fn cmp_val(a: &SortVal, b: &SortVal) -> Ordering {
    match (a, b) {
        (SortVal::Num(x), SortVal::Num(y)) => x.total_cmp(y),
        (SortVal::Str(x), SortVal::Str(y)) => x.cmp(y),
        // Numbers before strings, and missing values last whatever the direction.
        _ => rank(a).cmp(&rank(b)),
    }
}

fn rank(v: &SortVal) -> u8 {
    match v {
        SortVal::Num(_) => 0,
        SortVal::Str(_) => 1,
        SortVal::Missing => 2,
    }
}

/// The sort position of a match: its key values, then its document key (creation order).
/// Borrowed from the index while ranking (no copy per match); owned in a cursor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Position<'a> {
    pub vals: Vec<SortVal>,
    /// Resource type (system searches page over several types).
    pub rtype: Cow<'a, str>,
    /// Equal sort values are ordered by id.
    pub id: Cow<'a, str>,
    pub doc: DocKey,
}

pub fn cmp_pos(sort: &[SortKey], x: &Position, y: &Position) -> Ordering {
    for (i, k) in sort.iter().enumerate() {
        let (a, b) = (&x.vals[i], &y.vals[i]);
        let o = match (a, b) {
            (SortVal::Missing, _) | (_, SortVal::Missing) => cmp_val(a, b),
            _ if k.desc => cmp_val(b, a),
            _ => cmp_val(a, b),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    if sort.is_empty() {
        return x.doc.cmp(&y.doc);
    }
    x.id.cmp(&y.id).then_with(|| x.rtype.cmp(&y.rtype)).then_with(|| x.doc.cmp(&y.doc))
}

pub fn position<'a>(sort: &[SortKey], rtype: &'a str, key: DocKey, doc: &Doc) -> Position<'a> {
    let vals = sort
        .iter()
        .map(|k| match k.code.as_str() {
            "_id" => SortVal::Str(doc.id.clone()),
            "_lastUpdated" => SortVal::Num(doc.last_updated_ms as f64),
            code => {
                let vals = doc.get(code).iter().filter_map(sort_val);
                let best = if k.desc { vals.max_by(cmp_val) } else { vals.min_by(cmp_val) };
                best.unwrap_or(SortVal::Missing)
            }
        })
        .collect();
    Position { vals, rtype: Cow::Borrowed(rtype), id: Cow::Owned(doc.id.clone()), doc: key }
}

/// The sort position of a match from its sort record alone (see [`sorts_by_record`]): the same
/// as [`position`] would compute from the whole document.
pub fn position_of_head<'a>(sort: &[SortKey], rtype: &'a str, key: DocKey, head: SortHead) -> Position<'a> {
    let vals = sort
        .iter()
        .map(|k| match k.code.as_str() {
            "_id" => SortVal::Str(head.id.clone()),
            "_lastUpdated" => SortVal::Num(head.last_updated_ms as f64),
            code => head
                .nums
                .iter()
                .find(|(c, _, _)| c == code)
                .map_or(SortVal::Missing, |&(_, lo, hi)| SortVal::Num(if k.desc { hi } else { lo })),
        })
        .collect();
    Position { vals, rtype: Cow::Borrowed(rtype), id: Cow::Owned(head.id), doc: key }
}

/// Whether every sort key is one a sort record holds: `_id`, `_lastUpdated`, or a date,
/// number or quantity parameter of `rtype` (whose values all sort as numbers).
pub fn sorts_by_record(idx: &Index, rtype: &str, sort: &[SortKey]) -> bool {
    sort.iter().all(|k| match k.code.as_str() {
        "_id" | "_lastUpdated" => true,
        code => idx.registry.get(rtype, code).is_some_and(|p| {
            matches!(p.kind, super::params::Kind::Date | super::params::Kind::Number | super::params::Kind::Quantity)
        }),
    })
}

fn sort_val(v: &Value) -> Option<SortVal> {
    if let Some(n) = super::values::sort_num(v) {
        return Some(SortVal::Num(n));
    }
    Some(match v {
        // Letters and digits only, as collations compare at their first level: O'Keefe
        // sorts between Ogden and Olsen, not before Oakes.
        Value::Str { norm, .. } => SortVal::Str(norm.chars().filter(|c| c.is_alphanumeric()).collect()),
        Value::Token { code: Some(c), .. } => SortVal::Str(c.clone()),
        Value::Ref { rtype: Some(t), id: Some(id), .. } => SortVal::Str(format!("{t}/{id}")),
        Value::Ref { url: Some(u), .. } | Value::Uri(u) => SortVal::Str(u.clone()),
        _ => return None,
    })
}
