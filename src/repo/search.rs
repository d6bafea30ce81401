//! Search over the index: parsing FHIR query parameters into index terms and filters, and
//! running them with stable, cursor-based paging (results in id order; a `next` link holds
//! the last id seen, so concurrent inserts never shift a page).

use consensus::command::IndexKey;
use consensus::{CurrentRecord, StateView};

use super::index::{reference_values, term};
use super::Repo;
use crate::error::FhirError;
use crate::fhir::date_range_ms;
use crate::fhir::searchparams::ParamType;

pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
}

impl Prefix {
    /// Does the instant `t` satisfy `prefix` against the value range `[s, e)`?
    fn holds(self, t: i64, (s, e): (i64, i64)) -> bool {
        match self {
            Prefix::Eq => s <= t && t < e,
            Prefix::Ne => !(s <= t && t < e),
            Prefix::Gt | Prefix::Sa => t >= e,
            Prefix::Lt | Prefix::Eb => t < s,
            Prefix::Ge => t >= s,
            Prefix::Le => t < e,
        }
    }
}

/// A parsed search.
#[derive(Debug, Default)]
pub struct Query {
    /// AND of OR-groups of index terms.
    pub groups: Vec<Vec<IndexKey>>,
    /// AND of OR-groups of logical ids (`_id`).
    pub ids: Vec<Vec<String>>,
    /// AND of OR-groups of `_lastUpdated` conditions.
    pub last_updated: Vec<Vec<(Prefix, (i64, i64))>>,
    pub count: usize,
    pub cursor: Option<String>,
    pub summary_count: bool,
    /// Parameters ignored under `Prefer: handling=lenient`.
    pub ignored: Vec<String>,
}

/// Result-control parameters that shape output rather than select resources.
const CONTROL: &[&str] = &["_format", "_pretty", "_count", "_summary", "_cursor", "_total"];

pub fn parse(repo: &Repo, rtype: &str, params: &[(String, String)], lenient: bool) -> Result<Query, FhirError> {
    let mut q = Query { count: DEFAULT_COUNT, ..Default::default() };
    let key = repo.index_key();
    for (name, value) in params {
        let (code, modifier) = match name.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (name.as_str(), None),
        };
        let bad = |why: String| FhirError::invalid(why).at(name.clone());
        if CONTROL.contains(&code) && modifier.is_none() {
            match code {
                "_count" => {
                    q.count = value
                        .parse::<usize>()
                        .map_err(|_| bad(format!("_count must be a non-negative integer, not {value:?}")))?
                        .min(MAX_COUNT);
                }
                "_summary" => match value.as_str() {
                    "count" => q.summary_count = true,
                    "false" => {}
                    other => return Err(bad(format!("_summary={other} is not supported (count and false are)"))),
                },
                "_cursor" => q.cursor = Some(value.clone()),
                "_total" if !matches!(value.as_str(), "none" | "estimate" | "accurate") => {
                    return Err(bad(format!("_total must be none, estimate or accurate, not {value:?}")));
                }
                _ => {}
            }
            continue;
        }
        if code == "_lastUpdated" {
            if modifier.is_some() {
                return Err(bad(format!(
                    "modifier :{} is not supported on _lastUpdated",
                    modifier.unwrap_or_default()
                )));
            }
            let mut group = Vec::new();
            for v in value.split(',') {
                group.push(parse_date(v).map_err(|why| bad(format!("_lastUpdated value {v:?}: {why}")))?);
            }
            q.last_updated.push(group);
            continue;
        }
        if code == "_id" && modifier.is_none() {
            q.ids.push(value.split(',').map(String::from).collect());
            continue;
        }
        let Some(sp) = repo.params.get(rtype, code) else {
            if lenient {
                q.ignored.push(name.clone());
                continue;
            }
            return Err(bad(format!(
                "unknown or unsupported search parameter {name:?} for {rtype} (supported: _id, _lastUpdated, identifier, patient, subject where defined for the type)"
            )));
        };
        let mut group = Vec::new();
        for v in value.split(',') {
            match (&sp.kind, modifier) {
                (ParamType::Token, None) => {
                    let form = match v.split_once('|') {
                        None => format!("*|{v}"),
                        Some((s, "")) if !s.is_empty() => format!("{s}|*"),
                        Some(_) => v.to_string(),
                    };
                    group.push(term(key, code, &form));
                }
                (ParamType::Reference, m) => {
                    let typed = match m {
                        None => None,
                        Some(t) if repo.profiles.is_resource_type(t) => Some(t),
                        Some(other) => return Err(bad(format!("modifier :{other} is not supported on {code}"))),
                    };
                    let forms: Vec<String> = match (typed, v.contains('/')) {
                        (Some(t), false) => vec![format!("{t}/{v}")],
                        // An id alone means any type the parameter can point at.
                        (None, false) => sp.targets.iter().map(|t| format!("{t}/{v}")).collect(),
                        (_, true) => reference_values(v, typed),
                    };
                    if forms.is_empty() {
                        return Err(bad(format!("{v:?} is not a reference (Type/id or id)")));
                    }
                    group.extend(forms.iter().map(|f| term(key, code, f)));
                }
                (_, Some(m)) => return Err(bad(format!("modifier :{m} is not supported on {code} yet"))),
                (ParamType::Other(t), None) => return Err(bad(format!("{t} parameter {code} is not indexed yet"))),
            }
        }
        q.groups.push(group);
    }
    Ok(q)
}

fn parse_date(v: &str) -> Result<(Prefix, (i64, i64)), String> {
    let (prefix, rest) = match v.get(..2) {
        Some("eq") => (Prefix::Eq, &v[2..]),
        Some("ne") => (Prefix::Ne, &v[2..]),
        Some("gt") => (Prefix::Gt, &v[2..]),
        Some("lt") => (Prefix::Lt, &v[2..]),
        Some("ge") => (Prefix::Ge, &v[2..]),
        Some("le") => (Prefix::Le, &v[2..]),
        Some("sa") => (Prefix::Sa, &v[2..]),
        Some("eb") => (Prefix::Eb, &v[2..]),
        Some("ap") => return Err("prefix ap is not supported".into()),
        Some(p) if p.chars().all(|c| c.is_ascii_lowercase()) => return Err(format!("unknown prefix {p:?}")),
        _ => (Prefix::Eq, v),
    };
    let range = date_range_ms(rest).ok_or("not a FHIR date, dateTime or instant")?;
    Ok((prefix, range))
}

/// Live ids of `rtype` matching every group (sorted).
pub fn match_terms(view: &StateView, rtype: &str, groups: &[Vec<IndexKey>]) -> std::io::Result<Vec<String>> {
    let mut result: Option<Vec<String>> = None;
    for group in groups {
        let mut hits = Vec::new();
        for t in group {
            hits.extend(view.postings(t, rtype)?);
        }
        hits.sort();
        hits.dedup();
        result = Some(match result {
            None => hits,
            Some(prev) => prev.into_iter().filter(|id| hits.binary_search(id).is_ok()).collect(),
        });
        if result.as_ref().is_some_and(Vec::is_empty) {
            break;
        }
    }
    Ok(result.unwrap_or_default())
}

/// Live ids named by every `_id` group whose current terms satisfy every term group (sorted).
pub fn match_ids(
    view: &StateView,
    rtype: &str,
    ids: &[Vec<String>],
    groups: &[Vec<IndexKey>],
) -> std::io::Result<Vec<String>> {
    let mut candidates: Vec<String> = ids.first().cloned().unwrap_or_default();
    candidates.sort();
    candidates.dedup();
    candidates.retain(|c| ids.iter().all(|g| g.contains(c)));
    let mut out = Vec::new();
    for id in candidates {
        if let Some(rec) = view.current(rtype, &id)? {
            if !rec.deleted && groups.iter().all(|g| g.iter().any(|t| rec.index.contains(t))) {
                out.push(id);
            }
        }
    }
    Ok(out)
}

pub struct Page {
    pub ids: Vec<String>,
    pub total: usize,
    /// The cursor of the next page, if there is one.
    pub next: Option<String>,
}

fn date_ok(q: &Query, rec: &CurrentRecord) -> bool {
    q.last_updated.iter().all(|group| group.iter().any(|(p, r)| p.holds(rec.last_updated_ms, *r)))
}

pub fn run(repo: &Repo, rtype: &str, q: &Query) -> Result<Page, FhirError> {
    let view = repo.view();
    let after = q.cursor.as_deref();
    let mut ids = Vec::new();
    let mut total = 0;
    let mut next = None;
    let mut take = |id: String| {
        total += 1;
        if after.is_none_or(|a| id.as_str() > a) {
            if ids.len() < q.count {
                ids.push(id);
            } else if next.is_none() {
                next = ids.last().cloned();
            }
        }
    };
    if !q.ids.is_empty() {
        for id in match_ids(view, rtype, &q.ids, &q.groups)? {
            match view.current(rtype, &id)? {
                Some(rec) if !rec.deleted && date_ok(q, &rec) => take(id),
                _ => {}
            }
        }
    } else if q.groups.is_empty() {
        for item in view.scan_type(rtype, None) {
            let (id, rec) = item?;
            if !rec.deleted && date_ok(q, &rec) {
                take(id);
            }
        }
    } else {
        for id in match_terms(view, rtype, &q.groups)? {
            if !q.last_updated.is_empty() {
                match view.current(rtype, &id)? {
                    Some(rec) if !rec.deleted && date_ok(q, &rec) => {}
                    _ => continue,
                }
            }
            take(id);
        }
    }
    if q.count == 0 {
        next = None;
    }
    Ok(Page { ids, total, next })
}
