//! `GET /Patient/{id}/$everything`: the patient, every resource of its compartment the caller
//! may see, and what those reference, in one `searchset` paged across types.
//!
//! A page runs the per-type compartment searches in a fixed type order (Patient first) until
//! it holds `_count` matches; the next-page cursor is the type reached plus that type's own
//! keyset cursor, so a page never re-ranks the types before it.

use std::collections::HashSet;

use actix_web::{web, HttpRequest, HttpResponse};

use super::search::{bundle, entries, log, patient_compartment, url, warning_entry, Who};
use super::{authz, json_response, prefer_lenient, read_barrier, AppState, Format};
use crate::auth::scopes::Perm;
use crate::error::FhirError;
use crate::search::query::{Filter, DEFAULT_COUNT, MAX_COUNT};
use crate::search::Hit;

/// What the request asked for.
#[derive(Default)]
struct Ask {
    since: Option<String>,
    types: Option<Vec<String>>,
    count: usize,
    /// The type to start at and its search cursor.
    cursor: Option<(usize, Option<String>)>,
    /// Unsupported parameters left out under `Prefer: handling=lenient`.
    ignored: Vec<String>,
}

pub async fn everything(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (req, state, id) = (&req, &**state, path.as_str());
    read_barrier(req, &state.repo).await?;
    let caller = authz::caller(req);
    let f = &Format::negotiate(req)?;
    let ask = ask(&crate::codec::parse_query(req.query_string()), prefer_lenient(req))?;
    authz::require(state, &caller, "Patient", Perm::R, "operation")?;
    // An unknown patient and a hidden one answer alike.
    if !crate::fhir::is_valid_id(id) || state.repo.read("Patient", id).is_err() {
        return Err(FhirError::not_found(&format!("Patient/{id}")));
    }
    authz::check_visible(state, &caller, "Patient", id, "operation")?;
    let who = Who { state, caller: &caller };
    let types = types(&who, ask.types.as_deref())?;
    let (start, mut inner) = ask.cursor.clone().unwrap_or((0, None));
    if start > types.len() {
        return Err(FhirError::invalid("_cursor is not a cursor this server issued").at("_cursor"));
    }
    let base = super::base_url(req);
    let access = state.auth.access(&caller);
    let (mut matches, mut included) = (Vec::<Hit>::new(), Vec::<Hit>::new());
    // Later pages need not include the patient again: the first one starts with it.
    let mut seen = HashSet::from([("Patient".to_string(), id.to_string())]);
    let mut settings = None;
    let mut next = None;
    for (i, t) in types.iter().enumerate().skip(start) {
        if matches.len() == ask.count {
            next = Some(i.to_string());
            break;
        }
        let mut params = vec![("_count".to_string(), (ask.count - matches.len()).to_string())];
        params.push(("_include".into(), "*".into()));
        if let Some(s) = &ask.since {
            params.push(("_lastUpdated".into(), format!("ge{s}")));
        }
        if let Some(c) = inner.take() {
            params.push(("_cursor".into(), c));
        }
        let filter = match t.as_str() {
            "Patient" => Filter::Ids(vec![id.to_string()]),
            _ => patient_compartment(&state.search, t, id),
        };
        let one = std::slice::from_ref(t);
        let (found, disclosed) =
            crate::auth::access::search(&state.search, &base, one, &params, false, Some(filter), access.as_ref())?;
        log(&who, "operation", &found, &disclosed);
        for hit in &found.matches {
            // A resource an earlier type's page included is this type's match: one entry, as
            // the match (a Bundle names each fullUrl once, bdl-7).
            let key = (hit.rtype.clone(), hit.id.clone());
            if !seen.insert(key) {
                included.retain(|h| h.rtype != hit.rtype || h.id != hit.id);
            }
            matches.push(hit.clone());
        }
        included.extend(found.included.iter().filter(|h| seen.insert((h.rtype.clone(), h.id.clone()))).cloned());
        let more = found.next.clone();
        settings = Some(found.search);
        if let Some(c) = more {
            next = Some(format!("{i}.{c}"));
            break;
        }
    }
    let self_url = format!("{base}/Patient/{id}/$everything");
    let mut keep = Vec::new();
    if let Some(s) = &ask.since {
        keep.push(("_since".to_string(), s.clone()));
    }
    if let Some(ts) = &ask.types {
        keep.push(("_type".into(), ts.join(",")));
    }
    keep.push(("_count".into(), ask.count.to_string()));
    let mut page = match &settings {
        Some(s) => {
            let mut page = entries(&state.repo, &base, s, &matches, &included)?;
            authz::present_entries(state, &caller, &mut page);
            page
        }
        None => Vec::new(),
    };
    if !ask.ignored.is_empty() {
        page.push(warning_entry(&ask.ignored));
    }
    let mut self_params = keep.clone();
    if let Some((i, c)) = &ask.cursor {
        self_params.push(("_cursor".into(), c.as_ref().map_or_else(|| i.to_string(), |c| format!("{i}.{c}"))));
    }
    let mut links = Vec::new();
    if let Some(c) = next {
        let mut q = keep;
        q.push(("_cursor".into(), c));
        links.push(super::resource::link("next", &url(&self_url, &q)));
    }
    Ok(json_response(200, &bundle(&self_url, &self_params, None, links, page), f))
}

fn ask(query: &[(String, String)], lenient: bool) -> Result<Ask, FhirError> {
    let mut a = Ask { count: DEFAULT_COUNT, ..Ask::default() };
    let bad = |name: &str, why: String| FhirError::invalid(format!("$everything {name}: {why}")).at(name.to_string());
    for (name, value) in query {
        match name.as_str() {
            "_since" => {
                let value = crate::fhir::query_date(value);
                if crate::fhir::date_range_ms(&value).is_none() {
                    return Err(bad(name, format!("{value:?} is not an instant")));
                }
                a.since = Some(value.into_owned());
            }
            "_type" => a
                .types
                .get_or_insert_with(Vec::new)
                .extend(value.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_string)),
            "_count" => {
                let n: usize =
                    value.parse().map_err(|_| bad(name, format!("{value:?} is not a non-negative integer")))?;
                a.count = n.clamp(1, MAX_COUNT);
            }
            "_cursor" => {
                let (i, c) = value.split_once('.').map_or((value.as_str(), None), |(i, c)| (i, Some(c.to_string())));
                let i = i.parse().map_err(|_| bad(name, "not a cursor this server issued".into()))?;
                a.cursor = Some((i, c));
            }
            "_format" | "_pretty" => {}
            _ if lenient => a.ignored.push(name.clone()),
            _ => {
                return Err(bad(
                    name,
                    "not supported (supported: _since, _type, _count); send Prefer: handling=lenient to leave it out"
                        .into(),
                ))
            }
        }
    }
    Ok(a)
}

/// The types to search, Patient first: `_type` if given (each in the compartment and granted),
/// else every compartment type the caller may search.
fn types(who: &Who<'_>, asked: Option<&[String]>) -> Result<Vec<String>, FhirError> {
    let comps = &who.state.search.compartments().patient;
    let all = std::iter::once("Patient".to_string()).chain(comps.keys().filter(|t| *t != "Patient").cloned());
    let Some(asked) = asked else {
        return Ok(all.filter(|t| who.caller.require(t, Perm::S).is_ok()).collect());
    };
    for t in asked {
        if t != "Patient" && !comps.contains_key(t) {
            return Err(
                FhirError::invalid(format!("$everything _type: {t} is not in the Patient compartment")).at("_type")
            );
        }
        authz::require(who.state, who.caller, t, Perm::S, "operation")?;
    }
    Ok(all.filter(|t| asked.contains(t)).collect())
}
