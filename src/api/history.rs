//! `_history` at instance, type and system level, newest first, paged by cursor.

use actix_web::{web, HttpRequest, HttpResponse};

use super::authz;
use super::resource::{check_type, enc, link};
use super::{base_url, json_response, AppState, Format};
use crate::auth::scopes::Perm;
use crate::auth::Caller;
use crate::codec::parse_query;
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::fhir::{date_range_ms, instant};
use crate::repo::Stored;
use crate::search::query::{DEFAULT_COUNT, MAX_COUNT};

struct Params {
    count: usize,
    since: Option<i64>,
    cursor: Option<u64>,
}

fn params(req: &HttpRequest) -> Result<(Params, Vec<(String, String)>), FhirError> {
    let raw = parse_query(req.query_string());
    let mut p = Params { count: DEFAULT_COUNT, since: None, cursor: None };
    for (k, v) in &raw {
        match k.as_str() {
            "_count" => {
                p.count = v
                    .parse::<usize>()
                    .map_err(|_| FhirError::invalid(format!("_count {v:?} is not a number")).at("_count"))?
                    .min(MAX_COUNT);
            }
            "_since" => {
                p.since = Some(
                    date_range_ms(&crate::fhir::query_date(v))
                        .ok_or_else(|| FhirError::invalid(format!("_since {v:?} is not an instant")).at("_since"))?
                        .0,
                );
            }
            "_cursor" => p.cursor = Some(v.parse().map_err(|_| FhirError::invalid("bad _cursor").at("_cursor"))?),
            "_format" | "_pretty" => {}
            other => {
                return Err(
                    FhirError::invalid(format!("history does not support parameter {other:?}")).at(other.to_string())
                )
            }
        }
    }
    Ok((p, raw))
}

fn entry(base: &str, s: &Stored) -> Json {
    let url = format!("{}/{}", s.rtype, s.id);
    let (method, status) = match (s.deleted, s.created) {
        (true, _) => ("DELETE", "204 No Content"),
        (false, true) => ("POST", "201 Created"),
        (false, false) => ("PUT", "200 OK"),
    };
    let req_url = if method == "POST" { s.rtype.clone() } else { url.clone() };
    let mut members = vec![("fullUrl".to_string(), Json::String(format!("{base}/{url}")))];
    if let Some(r) = s.raw() {
        members.push(("resource".into(), r));
    }
    members.push((
        "request".into(),
        Json::Object(vec![("method".into(), Json::String(method.into())), ("url".into(), Json::String(req_url))]),
    ));
    members.push((
        "response".into(),
        Json::Object(vec![
            ("status".into(), Json::String(status.into())),
            ("etag".into(), Json::String(format!("W/\"{}\"", s.version))),
            ("lastModified".into(), Json::String(instant(s.last_updated_ms))),
        ]),
    ));
    Json::Object(members)
}

fn bundle(
    req: &HttpRequest,
    path: &str,
    raw: &[(String, String)],
    entries: Vec<Json>,
    next: Option<u64>,
    total: Option<usize>,
) -> Json {
    let base = base_url(req);
    let q: Vec<String> =
        raw.iter().filter(|(k, _)| k != "_cursor").map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
    let mut links = vec![link("self", &format!("{base}{path}?{}", q.join("&")))];
    if let Some(c) = next {
        let mut q = q.clone();
        q.push(format!("_cursor={c}"));
        links.push(link("next", &format!("{base}{path}?{}", q.join("&"))));
    }
    let mut members = vec![
        ("resourceType".to_string(), Json::String("Bundle".into())),
        ("id".to_string(), Json::String(uuid::Uuid::new_v4().to_string())),
        ("type".to_string(), Json::String("history".into())),
    ];
    if let Some(t) = total {
        members.push(("total".into(), Json::Number(t.to_string())));
    }
    members.push(("link".into(), Json::Array(links)));
    if !entries.is_empty() {
        members.push(("entry".into(), Json::Array(entries)));
    }
    Json::Object(members)
}

pub async fn instance(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (rtype, id) = path.into_inner();
    super::read_barrier(&req, &state.repo).await?;
    let f = &Format::negotiate(&req)?;
    check_type(&state.repo, &rtype)?;
    let caller = authz::caller(&req);
    authz::require(&state, &caller, &rtype, Perm::R, "history-instance")?;
    authz::refuse_deidentified(&caller, "history")?;
    let (p, raw) = params(&req)?;
    let versions = state.repo.view().versions(&rtype, &id)?;
    let base = base_url(&req);
    let mut entries = Vec::new();
    let mut next = None;
    let mut total = 0;
    let mut shown = Vec::new();
    let mut disclosed = crate::auth::access::Disclosed::default();
    let mut any_visible = false;
    for v in versions {
        // Each version by its own content: versions of another patient (before a move,
        // or before the id was reused) are left out, and a resource the caller may see in
        // no version has no history, exactly like a missing one.
        let s = state.repo.vread(&rtype, &id, v.header.version)?;
        let Some(d) = authz::version_visible(&state, &caller, &s)? else { continue };
        any_visible = true;
        if p.since.is_some_and(|s| v.header.last_updated_ms < s) {
            continue;
        }
        total += 1;
        if p.cursor.is_some_and(|c| v.header.version >= c) {
            continue;
        }
        if entries.len() == p.count {
            next = next.or(Some(v.header.version + 1));
            continue;
        }
        disclosed.patients.extend(d.patients);
        disclosed.broke_glass |= d.broke_glass;
        shown.push((s.rtype.clone(), s.id.clone(), s.version));
        entries.push(entry(&base, &s));
    }
    if !any_visible {
        return Err(FhirError::not_found(&format!("{rtype}/{id}")));
    }
    authz::disclosed(&state, &caller, "history-instance", &shown, &disclosed);
    Ok(json_response(200, &bundle(&req, &format!("/{rtype}/{id}/_history"), &raw, entries, next, Some(total)), f))
}

/// Walks the ledger's history newest first, leaving out internal records and (under
/// authorization) every version the caller may not see, judged by that version's own content.
fn walk(
    state: &AppState,
    caller: &Caller,
    req: &HttpRequest,
    rtype: Option<&str>,
    p: &Params,
    interaction: &'static str,
) -> Result<(Vec<Json>, Option<u64>), FhirError> {
    authz::refuse_deidentified(caller, "history")?;
    let repo = &*state.repo;
    let base = base_url(req);
    let mut entries = Vec::new();
    let mut next = None;
    let restricted = !caller.unrestricted;
    let mut shown = Vec::new();
    let mut disclosed = crate::auth::access::Disclosed::default();
    for item in repo.view().history(p.cursor) {
        let (leaf, h) = item?;
        if crate::auth::store::is_internal(&h.rtype)
            || rtype.is_some_and(|t| t != h.rtype)
            || p.since.is_some_and(|s| h.last_updated_ms < s)
        {
            continue;
        }
        if restricted {
            if caller.require(&h.rtype, Perm::S).is_err() {
                continue;
            }
            // Another patient's ciphertext need not be opened to be left out.
            if authz::patient_confined(caller, &h.rtype) {
                let compartment = repo.view().record(leaf)?.map(|r| r.header.compartment).unwrap_or_default();
                if compartment.strip_prefix("Patient/").is_some_and(|p| caller.patient() != Some(p)) {
                    continue;
                }
            }
        }
        let s = repo.vread(&h.rtype, &h.id, h.version)?;
        if restricted {
            let Some(d) = authz::version_visible(state, caller, &s)? else { continue };
            disclosed.patients.extend(d.patients);
            disclosed.broke_glass |= d.broke_glass;
        }
        if entries.len() == p.count {
            next = Some(leaf + 1);
            break;
        }
        shown.push((s.rtype.clone(), s.id.clone(), s.version));
        entries.push(entry(&base, &s));
    }
    authz::disclosed(state, caller, interaction, &shown, &disclosed);
    Ok((entries, next))
}

pub async fn type_level(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let rtype = path.into_inner();
    super::read_barrier(&req, &state.repo).await?;
    let f = &Format::negotiate(&req)?;
    check_type(&state.repo, &rtype)?;
    let caller = authz::caller(&req);
    authz::require(&state, &caller, &rtype, Perm::S, "history-type")?;
    let (p, raw) = params(&req)?;
    let (entries, next) = walk(&state, &caller, &req, Some(&rtype), &p, "history-type")?;
    Ok(json_response(200, &bundle(&req, &format!("/{rtype}/_history"), &raw, entries, next, None), f))
}

pub async fn system(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    super::read_barrier(&req, &state.repo).await?;
    let f = &Format::negotiate(&req)?;
    let (p, raw) = params(&req)?;
    let caller = authz::caller(&req);
    let (entries, next) = walk(&state, &caller, &req, None, &p, "history-system")?;
    Ok(json_response(200, &bundle(&req, "/_history", &raw, entries, next, None), f))
}
