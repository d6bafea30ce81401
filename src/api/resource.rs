//! Instance- and type-level interactions: create, read, vread, update, patch, delete, their
//! conditional forms, and search.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::authz;
use super::{base_url, parse_etag, parse_resource, prefer_return, read_body, AppState, Format, Return};
use crate::auth::scopes::Perm;
use crate::error::{information, ErrorCode, FhirError};
use crate::fhir::json::Json;
use crate::fhir::{http_date, is_valid_id};
use crate::repo::interactions::{self, Planned};
use crate::repo::{Repo, Stored};

pub fn check_type(repo: &Repo, rtype: &str) -> Result<(), FhirError> {
    if repo.profiles.is_resource_type(rtype) {
        Ok(())
    } else if rtype.starts_with('$') {
        Err(FhirError::unknown_operation("the system", rtype))
    } else {
        Err(FhirError::new(ErrorCode::UnknownRoute, format!("{rtype:?} is not an R4 resource type")))
    }
}

fn check_id(id: &str) -> Result<(), FhirError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(FhirError::invalid(format!("{id:?} is not a valid FHIR id (1-64 of A-Z a-z 0-9 - .)")))
    }
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Headers every single-version response carries.
pub fn version_headers(b: &mut actix_web::HttpResponseBuilder, s: &Stored) {
    b.insert_header((header::ETAG, format!("W/\"{}\"", s.version)));
    b.insert_header((header::LAST_MODIFIED, http_date(s.last_updated_ms)));
    if let Some(leaf) = s.leaf {
        b.insert_header(("X-Ledger-Leaf", leaf.to_string()));
    }
}

/// The answer to a write: status, `Location`, ETag, and the body `Prefer` asks for.
fn write_response(req: &HttpRequest, f: &Format, status: u16, s: &Stored) -> HttpResponse {
    let mut b = super::body_response(status, f);
    version_headers(&mut b, s);
    if status == 201 || status == 200 {
        let loc = format!("{}/{}/{}/_history/{}", base_url(req), s.rtype, s.id, s.version);
        b.insert_header((if status == 201 { header::LOCATION } else { header::CONTENT_LOCATION }, loc));
    }
    match (prefer_return(req), &s.body) {
        (Return::Minimal, _) | (_, None) => {
            b.content_type(f.content_type);
            b.finish()
        }
        (Return::OperationOutcome, _) => {
            let oo = information(format!("{}/{} version {} stored", s.rtype, s.id, s.version));
            b.body(if f.pretty { oo.to_pretty() } else { oo.to_compact() })
        }
        (Return::Representation, Some(body)) => b.body(render(body, f)),
    }
}

/// Commits a single planned interaction, under the caller's policy, and answers it.
async fn commit_one(
    req: &HttpRequest,
    state: &AppState,
    f: &Format,
    plan: impl FnMut(&mut crate::repo::Plan<'_>) -> Result<Planned, FhirError>,
) -> Result<HttpResponse, FhirError> {
    let caller = authz::caller(req);
    let repo = &state.repo;
    let (planned, results) = repo.commit(&authz::policy(state, &caller), plan).await?;
    if let Some(i) = planned.write {
        let s = results.get(i).ok_or_else(|| FhirError::internal("missing write result"))?;
        if s.deleted {
            let mut b = HttpResponse::NoContent();
            version_headers(&mut b, s);
            return Ok(b.finish());
        }
        return Ok(write_response(req, f, planned.status, s));
    }
    if let Some((t, id)) = planned.existing {
        // A conditional create that found the caller's resource shows it: a disclosure.
        let s = repo.read(&t, &id)?;
        let d =
            authz::version_visible(state, &caller, &s)?.ok_or_else(|| FhirError::not_found(&format!("{t}/{id}")))?;
        authz::disclosed(state, &caller, "create", &[(s.rtype.clone(), s.id.clone(), s.version)], &d);
        return Ok(write_response(req, f, planned.status, &s));
    }
    Ok(HttpResponse::NoContent().finish())
}

async fn resource_body(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    rtype: &str,
) -> Result<Json, FhirError> {
    check_type(&state.repo, rtype)?;
    let body = read_body(req, payload, state.max_body_bytes).await?;
    let res = parse_resource(&body)?;
    crate::search::validate::validate(&state.search, rtype, &res, None)?;
    Ok(res)
}

pub async fn create(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let rtype = path.into_inner();
    let f = Format::negotiate(&req)?;
    // Some clients send create criteria as a query string (an Aidbox extension); FHIR R4's
    // conditional create is the If-None-Exist header, and silently creating would be wrong.
    if let Some((k, _)) =
        crate::codec::parse_query(req.query_string()).into_iter().find(|(k, _)| k != "_format" && k != "_pretty")
    {
        return Err(FhirError::invalid(format!(
            "create takes no search parameters (got {k:?}); for a conditional create send them in the If-None-Exist header"
        ))
        .at(k));
    }
    let caller = authz::caller(&req);
    authz::require(&state, &caller, &rtype, Perm::C, "create")?;
    let res = resource_body(&req, payload, &state, &rtype).await?;
    let if_none_exist = req.headers().get("if-none-exist").map(|v| v.to_str().unwrap_or("").to_string());
    if if_none_exist.is_some() {
        authz::require(&state, &caller, &rtype, Perm::S, "create")?;
    }
    let id = new_id();
    commit_one(&req, &state, &f, |plan| interactions::create(plan, &rtype, &id, &res, if_none_exist.as_deref())).await
}

pub async fn update(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (rtype, id) = path.into_inner();
    let f = Format::negotiate(&req)?;
    check_id(&id)?;
    let res = resource_body(&req, payload, &state, &rtype).await?;
    match res.get("id").and_then(Json::as_str) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(FhirError::invalid(format!("the body's id {body_id:?} differs from the URL's id {id:?}"))
                .at(format!("{rtype}.id")))
        }
        None => {
            return Err(FhirError::invalid(format!("the body has no id; an update must carry id {id:?}"))
                .at(format!("{rtype}.id")))
        }
    }
    let if_match = parse_etag(req.headers(), &header::IF_MATCH)?;
    commit_one(&req, &state, &f, |plan| interactions::update(plan, &rtype, &id, &res, if_match)).await
}

pub async fn conditional_update(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let rtype = path.into_inner();
    let f = Format::negotiate(&req)?;
    let caller = authz::caller(&req);
    authz::require(&state, &caller, &rtype, Perm::U, "update")?;
    authz::require(&state, &caller, &rtype, Perm::S, "update")?;
    let res = resource_body(&req, payload, &state, &rtype).await?;
    let query = req.query_string().to_string();
    let id = new_id();
    commit_one(&req, &state, &f, |plan| interactions::conditional_update(plan, &rtype, &query, &res, &id)).await
}

pub async fn patch(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (rtype, id) = path.into_inner();
    let f = Format::negotiate(&req)?;
    check_type(&state.repo, &rtype)?;
    check_id(&id)?;
    let caller = authz::caller(&req);
    authz::require(&state, &caller, &rtype, Perm::U, "patch")?;
    authz::check_visible(&state, &caller, &rtype, &id, "patch")?;
    let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.starts_with("application/json-patch+json") {
        return Err(FhirError::new(
            ErrorCode::UnsupportedMediaType,
            "PATCH takes a JSON Patch document (application/json-patch+json)",
        ));
    }
    let body = read_body(&req, payload, state.max_body_bytes).await?;
    let operations = crate::fhir::json::parse(&body, super::MAX_DEPTH)
        .map_err(|e| FhirError::new(ErrorCode::Structure, format!("malformed JSON Patch: {e}")))?;
    let if_match = parse_etag(req.headers(), &header::IF_MATCH)?;
    let repo = &state.repo;
    commit_one(&req, &state, &f, |plan| {
        let current = repo.read(&rtype, &id)?;
        if if_match.is_some_and(|v| v != current.version) {
            return Err(FhirError::precondition(format!("If-Match does not match version {}", current.version)));
        }
        let mut doc = current.parsed()?.ok_or_else(|| FhirError::gone(&format!("{rtype}/{id}")))?;
        crate::fhir::patch::apply(&mut doc, &operations)
            .map_err(|e| FhirError::new(ErrorCode::Unprocessable, format!("JSON Patch failed: {e}")))?;
        if doc.get("id").and_then(Json::as_str) != Some(id.as_str()) {
            return Err(FhirError::new(ErrorCode::Unprocessable, "a patch may not change the resource's id"));
        }
        crate::search::validate::validate(&state.search, &rtype, &doc, None)
            .map_err(|e| e.recode(ErrorCode::Unprocessable))?;
        interactions::update(plan, &rtype, &id, &doc, Some(current.version))
    })
    .await
}

pub async fn delete(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (rtype, id) = path.into_inner();
    let f = Format::negotiate(&req)?;
    check_type(&state.repo, &rtype)?;
    check_id(&id)?;
    let caller = authz::caller(&req);
    authz::require(&state, &caller, &rtype, Perm::D, "delete")?;
    let if_match = parse_etag(req.headers(), &header::IF_MATCH)?;
    commit_one(&req, &state, &f, |plan| {
        let p = interactions::delete(plan, &rtype, &id, if_match)?;
        // To a token, a resource it may not see and one that is not there are both a 404
        // (without authorization, deleting an absent resource stays an idempotent 204).
        if p.write.is_none() && !caller.unrestricted {
            return Err(FhirError::not_found(&format!("{rtype}/{id}")));
        }
        Ok(p)
    })
    .await
}

pub async fn conditional_delete(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let rtype = path.into_inner();
    let f = Format::negotiate(&req)?;
    check_type(&state.repo, &rtype)?;
    let caller = authz::caller(&req);
    authz::require(&state, &caller, &rtype, Perm::D, "delete")?;
    authz::require(&state, &caller, &rtype, Perm::S, "delete")?;
    let query = req.query_string().to_string();
    commit_one(&req, &state, &f, |plan| interactions::conditional_delete(plan, &rtype, &query)).await
}

/// The stored compact JSON as it is, or re-indented for `_pretty=true`.
fn render(body: &str, f: &Format) -> String {
    if f.pretty {
        Json::Raw(body.to_string()).to_pretty()
    } else {
        body.to_string()
    }
}

fn read_response(
    state: &AppState,
    caller: &crate::auth::Caller,
    f: &Format,
    s: &Stored,
) -> Result<HttpResponse, FhirError> {
    let body = s.body.as_deref().ok_or_else(|| FhirError::gone(&format!("{}/{}", s.rtype, s.id)))?;
    let mut b = super::body_response(200, f);
    version_headers(&mut b, s);
    if caller.deidentify.is_some() {
        let shown = authz::present(state, caller, Json::Raw(body.to_string()));
        return Ok(b.body(if f.pretty { shown.to_pretty() } else { shown.to_compact() }));
    }
    Ok(b.body(render(body, f)))
}

pub async fn read(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (rtype, id) = path.into_inner();
    let f = Format::negotiate(&req)?;
    check_type(&state.repo, &rtype)?;
    if id.starts_with('$') {
        return Err(FhirError::unknown_operation(&rtype, &id));
    }
    check_id(&id).map_err(|_| FhirError::not_found(&format!("{rtype}/{id}")))?;
    let caller = authz::caller(&req);
    authz::require(&state, &caller, &rtype, Perm::R, "read")?;
    super::read_barrier(&req, &state.repo).await?;
    // Hidden and missing look the same: a 404 before anything is read.
    let disclosed = authz::check_visible(&state, &caller, &rtype, &id, "read")?;
    // The guard found the current version in the index: read it by leaf, from the body
    // cache when it is there.
    let by_leaf = disclosed.leaf.and_then(|leaf| state.repo.read_leaves(&[leaf]).pop());
    let s = match by_leaf.unwrap_or_else(|| state.repo.read(&rtype, &id)) {
        Err(e) if e.status() == 410 => {
            // A deleted resource still tells its ETag, as HAPI and Blaze do.
            let cur = state.repo.view().current(&rtype, &id)?.map_or(0, |c| c.version);
            let mut r = e.render(f.content_type, f.pretty);
            if let Ok(v) = header::HeaderValue::from_str(&format!("W/\"{cur}\"")) {
                r.headers_mut().insert(header::ETAG, v);
            }
            return Ok(r);
        }
        other => other?,
    };
    if not_modified(&req, &s) {
        let mut b = HttpResponse::NotModified();
        version_headers(&mut b, &s);
        return Ok(b.finish());
    }
    authz::disclosed(&state, &caller, "read", &[(s.rtype.clone(), s.id.clone(), s.version)], &disclosed);
    read_response(&state, &caller, &f, &s)
}

/// Conditional read: `If-None-Match` naming the current version (or `*`), or
/// `If-Modified-Since` not older than the last update. `If-None-Match` wins, as RFC 9110 says.
fn not_modified(req: &HttpRequest, s: &Stored) -> bool {
    let headers = req.headers();
    if let Some(v) = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        let current = format!("W/\"{}\"", s.version);
        return v
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag == current || tag == format!("\"{}\"", s.version));
    }
    let since = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<header::HttpDate>().ok())
        .map(std::time::SystemTime::from)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    // HTTP dates have whole seconds, so compare at that precision.
    since.is_some_and(|since| s.last_updated_ms.div_euclid(1000) <= i64::try_from(since.as_secs()).unwrap_or(i64::MAX))
}

pub async fn vread(
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (rtype, id, vid) = path.into_inner();
    let f = Format::negotiate(&req)?;
    check_type(&state.repo, &rtype)?;
    let what = format!("{rtype}/{id}/_history/{vid}");
    let version: u64 = vid.parse().map_err(|_| FhirError::not_found(&what))?;
    check_id(&id).map_err(|_| FhirError::not_found(&what))?;
    let caller = authz::caller(&req);
    authz::require(&state, &caller, &rtype, Perm::R, "vread")?;
    super::read_barrier(&req, &state.repo).await?;
    let s = state.repo.vread(&rtype, &id, version)?;
    // Each version is judged by its own content: one that belonged to another patient
    // before the resource moved (or before its id was reused) is hidden like a missing one.
    let disclosed = authz::version_visible(&state, &caller, &s)?.ok_or_else(|| FhirError::not_found(&what))?;
    if s.deleted {
        return Err(FhirError::gone(&what));
    }
    authz::disclosed(&state, &caller, "vread", &[(s.rtype.clone(), s.id.clone(), s.version)], &disclosed);
    read_response(&state, &caller, &f, &s)
}

pub fn link(relation: &str, url: &str) -> Json {
    Json::Object(vec![("relation".into(), Json::String(relation.into())), ("url".into(), Json::String(url.into()))])
}

pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
