//! FHIR write interactions as *plans* over a [`Plan`], so that a single request and a
//! transaction bundle share one implementation (a transaction just plans many into one
//! command).

use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::repo::search;
use crate::repo::Plan;

/// What a planned interaction will answer once the command commits.
#[derive(Debug, Clone)]
pub struct Planned {
    pub status: u16,
    /// Index into the committed versions (`Repo::commit`'s results) when this wrote one.
    pub write: Option<usize>,
    /// An existing resource this interaction resolved to without writing (e.g. a conditional
    /// create that matched).
    pub existing: Option<(String, String)>,
}

impl Planned {
    fn wrote(plan_len: usize, status: u16) -> Self {
        Self { status, write: Some(plan_len), existing: None }
    }
}

/// Parses a conditional query (`identifier=a|b&patient=1`) into index-term groups, refusing
/// what the state machine cannot re-check deterministically.
pub type Criteria = (Vec<Vec<String>>, Vec<Vec<[u8; 32]>>);

pub fn conditional_terms(plan: &Plan<'_>, rtype: &str, query: &str) -> Result<Criteria, FhirError> {
    let params = parse_query(query);
    if params.is_empty() {
        return Err(FhirError::invalid("a conditional interaction needs search criteria"));
    }
    let q = search::parse(plan.repo(), rtype, &params, false)?;
    if !q.last_updated.is_empty() || (q.groups.is_empty() && q.ids.is_empty()) {
        return Err(FhirError::invalid(
            "conditional interactions support _id, identifier, patient and subject criteria",
        ));
    }
    Ok((q.ids, q.groups))
}

pub fn parse_query(query: &str) -> Vec<(String, String)> {
    let query = query.split_once('?').map_or(query, |(_, q)| q);
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
}

pub fn create(
    plan: &mut Plan<'_>,
    rtype: &str,
    id: &str,
    res: &Json,
    if_none_exist: Option<&str>,
) -> Result<Planned, FhirError> {
    if let Some(query) = if_none_exist {
        let (ids, groups) = conditional_terms(plan, rtype, query)?;
        let ids = plan.matching(rtype, ids, groups)?;
        match ids.len() {
            0 => {}
            1 => return Ok(Planned { status: 200, write: None, existing: Some((rtype.into(), ids[0].clone())) }),
            n => return Err(FhirError::precondition(format!("If-None-Exist matched {n} {rtype} resources"))),
        }
    }
    let n = plan.results_len();
    plan.put(rtype, id, res, None)?;
    Ok(Planned::wrote(n, 201))
}

pub fn update(
    plan: &mut Plan<'_>,
    rtype: &str,
    id: &str,
    res: &Json,
    if_match: Option<u64>,
) -> Result<Planned, FhirError> {
    let n = plan.results_len();
    let stored = plan.put(rtype, id, res, if_match)?;
    Ok(Planned::wrote(n, if stored.created { 201 } else { 200 }))
}

/// `PUT Type?criteria`: no match creates (with the body's id or `new_id`), one match updates
/// it, several are a 412.
pub fn conditional_update(
    plan: &mut Plan<'_>,
    rtype: &str,
    query: &str,
    res: &Json,
    new_id: &str,
) -> Result<Planned, FhirError> {
    let (ids, groups) = conditional_terms(plan, rtype, query)?;
    let ids = plan.matching(rtype, ids, groups)?;
    let body_id = res.get("id").and_then(Json::as_str).map(String::from);
    let id = match (ids.as_slice(), body_id) {
        ([], Some(b)) => b,
        ([], None) => new_id.to_string(),
        ([one], Some(b)) if *one != b => {
            return Err(FhirError::invalid(format!(
                "the body's id {b} differs from the matched resource {rtype}/{one}"
            ))
            .at(format!("{rtype}.id")))
        }
        ([one], _) => one.clone(),
        (many, _) => {
            return Err(FhirError::precondition(format!("conditional update matched {} {rtype} resources", many.len())))
        }
    };
    update(plan, rtype, &id, res, None)
}

pub fn delete(plan: &mut Plan<'_>, rtype: &str, id: &str, if_match: Option<u64>) -> Result<Planned, FhirError> {
    let n = plan.results_len();
    Ok(match plan.delete(rtype, id, if_match)? {
        Some(_) => Planned::wrote(n, 204),
        None => Planned { status: 204, write: None, existing: None },
    })
}

pub fn conditional_delete(plan: &mut Plan<'_>, rtype: &str, query: &str) -> Result<Planned, FhirError> {
    let (ids, groups) = conditional_terms(plan, rtype, query)?;
    let ids = plan.matching(rtype, ids, groups)?;
    match ids.as_slice() {
        [] => Ok(Planned { status: 204, write: None, existing: None }),
        [one] => delete(plan, rtype, &one.clone(), None),
        many => Err(FhirError::precondition(format!("conditional delete matched {} {rtype} resources", many.len()))),
    }
}
