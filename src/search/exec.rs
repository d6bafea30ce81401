//! Running a parsed search against the index: chains and `_has` are resolved into id sets
//! first (sub-searches), candidates come from postings where a parameter has them, every
//! condition is then checked on each candidate, and the matches are sorted and paged.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::index::{Doc, DocKey, Index, TypeDocs};
use super::query::{Filter, Pred, Prefix, SortKey, StrMode, UriMode};
use super::values::{normalize, Value};
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::repo::Repo;

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
}

impl Ctx<'_> {
    /// The keys of the live `rtype` resources matching every filter, in key order.
    pub fn matches(&self, rtype: &str, filters: &[Filter]) -> Result<Vec<DocKey>, FhirError> {
        let Some(docs) = self.idx.of(rtype) else { return Ok(Vec::new()) };
        let mut conds = Vec::with_capacity(filters.len());
        for f in filters {
            conds.push(self.resolve(rtype, f)?);
        }
        let candidates = candidates(docs, &conds);
        let mut out = Vec::new();
        let mut check = |key: DocKey, doc: &Doc| -> Result<(), FhirError> {
            if conds.iter().all(|c| self.holds(c, doc)) && self.text_holds(rtype, &conds, doc)? {
                out.push(key);
            }
            Ok(())
        };
        match candidates {
            Some(keys) => {
                for k in keys {
                    if let Some(d) = docs.docs.get(&k) {
                        check(k, d)?;
                    }
                }
            }
            None => {
                for (k, d) in &docs.docs {
                    check(*k, d)?;
                }
            }
        }
        Ok(out)
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
                    if let Some(d) = self.idx.of(t) {
                        found.extend(keys.iter().filter_map(|k| d.docs.get(k)).map(|doc| (t.clone(), doc.id.clone())));
                    }
                }
                Cond::RefIn { codes: vec![code], targets: found }
            }
            Filter::Has { rtype: source, code, inner } => {
                let keys = self.matches(source, std::slice::from_ref(inner))?;
                let mut ids = BTreeSet::new();
                if let Some(d) = self.idx.of(source) {
                    for doc in keys.iter().filter_map(|k| d.docs.get(k)) {
                        for v in doc.get(code) {
                            if let Value::Ref { rtype: Some(t), id: Some(id), .. } = v {
                                if t == rtype {
                                    ids.insert(id.clone());
                                }
                            }
                        }
                    }
                }
                Cond::IdIn(ids)
            }
            Filter::List(lists) => {
                let mut ids = BTreeSet::new();
                if let Some(d) = self.idx.of("List") {
                    for l in lists {
                        if let Some((_, doc)) = d.doc(l) {
                            for v in doc.get("item") {
                                if let Value::Ref { rtype: Some(t), id: Some(id), .. } = v {
                                    if t == rtype {
                                        ids.insert(id.clone());
                                    }
                                }
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

/// The smallest candidate set postings give, or `None` to scan every document.
fn candidates(docs: &TypeDocs, conds: &[Cond]) -> Option<BTreeSet<DocKey>> {
    let mut best: Option<BTreeSet<DocKey>> = None;
    let mut offer = |set: BTreeSet<DocKey>| {
        if best.as_ref().is_none_or(|b| set.len() < b.len()) {
            best = Some(set);
        }
    };
    for c in conds {
        match c {
            Cond::IdIn(ids) => offer(ids.iter().filter_map(|id| docs.by_id.get(id).copied()).collect()),
            Cond::RefIn { codes, targets } => {
                let mut set = BTreeSet::new();
                for code in codes {
                    for (_, id) in targets {
                        set.extend(docs.posting(code, id).into_iter().flatten().copied());
                    }
                }
                offer(set);
            }
            Cond::Values { code, negate: false, preds } => {
                let keys: Option<Vec<&str>> = preds
                    .iter()
                    .map(|p| match p {
                        Pred::Token { code: Some(c), .. } => Some(c.as_str()),
                        Pred::Ref { id, .. } => Some(id.as_str()),
                        _ => None,
                    })
                    .collect();
                if let Some(keys) = keys {
                    offer(keys.iter().flat_map(|k| docs.posting(code, k).into_iter().flatten().copied()).collect());
                }
            }
            _ => {}
        }
    }
    best
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
        Prefix::Ge => b > e || contains,
        Prefix::Le => a < s || contains,
        Prefix::Sa => a >= e,
        Prefix::Eb => b <= s,
        Prefix::Ap => {
            // "approximately": within 10% of the distance between now and the value.
            let gap = ((now_ms as i128 - s as i128).abs() / 10) as i64;
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
        Prefix::Gt | Prefix::Sa => b > v,
        Prefix::Lt | Prefix::Eb => a < v,
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
        // Missing values last whatever the direction.
        (SortVal::Missing, SortVal::Missing) => Ordering::Equal,
        (SortVal::Missing, _) => Ordering::Greater,
        (_, SortVal::Missing) => Ordering::Less,
        (SortVal::Num(_), SortVal::Str(_)) => Ordering::Less,
        (SortVal::Str(_), SortVal::Num(_)) => Ordering::Greater,
    }
}

/// The sort position of a match: its key values, then its document key (creation order).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Position {
    pub vals: Vec<SortVal>,
    /// Resource type (system searches page over several types).
    pub rtype: String,
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
    x.doc.cmp(&y.doc).then_with(|| x.rtype.cmp(&y.rtype))
}

pub fn position(sort: &[SortKey], rtype: &str, key: DocKey, doc: &Doc) -> Position {
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
    Position { vals, rtype: rtype.to_string(), doc: key }
}

fn sort_val(v: &Value) -> Option<SortVal> {
    Some(match v {
        Value::Str { norm, .. } => SortVal::Str(norm.clone()),
        Value::Date { lo, .. } => SortVal::Num(*lo as f64),
        Value::Quantity { lo, .. } => SortVal::Num(*lo),
        Value::Token { code: Some(c), .. } => SortVal::Str(c.clone()),
        Value::Ref { rtype: Some(t), id: Some(id), .. } => SortVal::Str(format!("{t}/{id}")),
        Value::Ref { url: Some(u), .. } => SortVal::Str(u.clone()),
        Value::Uri(u) => SortVal::Str(u.clone()),
        _ => return None,
    })
}
