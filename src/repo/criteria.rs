//! Conditional-interaction criteria (`If-None-Exist`, `PUT /Patient?identifier=…`) as the
//! equality terms the state machine keeps, so that `apply` can re-check them on every node.
//! Searching itself is `crate::search`.

use consensus::{IndexKey, StateView};

use super::index::{reference_values, term, CONDITIONAL_PARAMS};
use super::Repo;
use crate::error::FhirError;
use crate::fhir::searchparams::ParamType;

/// Parsed criteria.
#[derive(Debug, Default)]
pub struct Query {
    /// AND of OR-groups of index terms.
    pub groups: Vec<Vec<IndexKey>>,
    /// AND of OR-groups of logical ids (`_id`).
    pub ids: Vec<Vec<String>>,
}

/// Result-control parameters that shape output rather than select resources.
const CONTROL: &[&str] = &["_format", "_pretty", "_count", "_summary", "_total"];

/// Criteria beyond `_id` and [`CONDITIONAL_PARAMS`] cannot be re-checked by `apply`, so they
/// are refused.
pub fn unsupported() -> String {
    format!("conditional interactions support _id, {} criteria", CONDITIONAL_PARAMS.join(", "))
}

pub fn parse(repo: &Repo, rtype: &str, params: &[(String, String)]) -> Result<Query, FhirError> {
    let mut q = Query::default();
    let key = repo.index_key();
    for (name, value) in params {
        let (code, modifier) = match name.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (name.as_str(), None),
        };
        let bad = |why: String| FhirError::invalid(why).at(name.clone());
        if CONTROL.contains(&code) && modifier.is_none() {
            continue;
        }
        if code == "_id" && modifier.is_none() {
            q.ids.push(value.split(',').map(String::from).collect());
            continue;
        }
        let sp = repo.params.get(rtype, code).filter(|_| CONDITIONAL_PARAMS.contains(&code));
        let Some(sp) = sp else {
            return Err(bad(format!("{}; {name:?} is not one of them for {rtype}", unsupported())));
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
                    // Where another parameter holds this one's terms, its terms of the one type
                    // this one takes answer; a form of another type matches nothing, as before.
                    let alias = repo.params.alias(rtype, code);
                    group.extend(forms.iter().map(|f| match alias {
                        Some((by, t)) if f.split('/').next() == Some(t) => term(key, by, f),
                        _ => term(key, code, f),
                    }));
                }
                (_, Some(m)) => return Err(bad(format!("modifier :{m} is not supported on {code} yet"))),
                (ParamType::Other(t), None) => return Err(bad(format!("{t} parameter {code} is not indexed yet"))),
            }
        }
        q.groups.push(group);
    }
    Ok(q)
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
