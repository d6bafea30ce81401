//! Search over HTTP: type-level (`GET /Observation?…`, `POST /Observation/_search`),
//! compartment (`GET /Patient/123/Observation`), and system-level (`GET /?_type=…`,
//! `POST /_search`) searches, answered as `searchset` Bundles.

use actix_web::{web, HttpRequest, HttpResponse};

use super::authz;
use super::resource::{check_type, enc, link};
use super::{base_url, json_response, prefer_lenient, read_barrier, read_body, AppState, Format};
use crate::auth::scopes::Perm;
use crate::auth::Caller;
use crate::codec::parse_query;
use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::Json;
use crate::repo::Repo;
use crate::search::query::{Filter, Summary, Total};
use crate::search::{self, summary};

pub async fn type_get(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let rtype = path.into_inner();
    let params = parse_query(req.query_string());
    answer(&req, &state, Scope::Type(rtype), params).await
}

pub async fn type_post(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let rtype = path.into_inner();
    match form(&req, payload, &state).await {
        Ok(params) => answer(&req, &state, Scope::Type(rtype), params).await,
        Err(e) => Err(e),
    }
}

pub async fn system_get(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let params = parse_query(req.query_string());
    answer(&req, &state, Scope::System, params).await
}

pub async fn system_post(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    match form(&req, payload, &state).await {
        Ok(params) => answer(&req, &state, Scope::System, params).await,
        Err(e) => Err(e),
    }
}

pub async fn compartment(
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (ctype, id, rtype) = path.into_inner();
    if ctype == "Patient" && rtype == "$access-report" {
        return super::report::access_report(&req, &state, &id).await;
    }
    if rtype.starts_with('$') {
        return Err(FhirError::unknown_operation(&format!("{ctype}/{id}"), &rtype));
    }
    let params = parse_query(req.query_string());
    answer(&req, &state, Scope::Compartment { ctype, id, rtype }, params).await
}

/// The query string and the form body of a `_search` POST.
async fn form(req: &HttpRequest, payload: web::Payload, state: &AppState) -> Result<Vec<(String, String)>, FhirError> {
    let body = read_body(req, payload, state.max_body_bytes).await?;
    let mut params = parse_query(req.query_string());
    params.extend(crate::codec::parse_form(&body));
    Ok(params)
}

enum Scope {
    Type(String),
    System,
    Compartment { ctype: String, id: String, rtype: String },
}

async fn answer(
    req: &HttpRequest,
    state: &AppState,
    scope: Scope,
    params: Vec<(String, String)>,
) -> Result<HttpResponse, FhirError> {
    read_barrier(req, &state.repo).await?;
    crate::search::index::catch_up(&state.search).await?;
    let base = base_url(req);
    let lenient = prefer_lenient(req);
    let caller = authz::caller(req);
    let who = Who { state, caller: &caller };
    // Run on the worker: a search over the in-memory index takes about as long as a hand-off
    // to the blocking pool and back (measured: the context switches dominated the profile).
    let f = &Format::negotiate(req)?;
    Ok(json_response(200, &bundle_for(&who, &base, scope, &params, lenient)?, f))
}

/// Who searches: the state (for logging) and the caller (for scopes and visibility).
pub struct Who<'a> {
    pub state: &'a AppState,
    pub caller: &'a Caller,
}

impl Who<'_> {
    fn require(&self, rtype: &str, interaction: &'static str) -> Result<(), FhirError> {
        authz::require(self.state, self.caller, rtype, Perm::S, interaction)
    }
}

fn bundle_for(
    who: &Who<'_>,
    base: &str,
    scope: Scope,
    params: &[(String, String)],
    lenient: bool,
) -> Result<Json, FhirError> {
    let repo = &*who.state.repo;
    match scope {
        Scope::Type(rtype) => search_bundle(who, base, &rtype, params, lenient),
        Scope::System => {
            let types: Vec<String> = match params.iter().find(|(k, _)| k == "_type") {
                Some((_, v)) => {
                    let mut ts = Vec::new();
                    for t in v.split(',') {
                        check_type(repo, t)
                            .map_err(|e| FhirError::invalid(e.issues[0].diagnostics.clone()).at("_type"))?;
                        who.require(t, "search-system")?;
                        ts.push(t.to_string());
                    }
                    ts
                }
                // Without _type: every type the caller may search.
                None => repo
                    .profiles
                    .resource_types()
                    .iter()
                    .filter(|t| who.caller.require(t, Perm::S).is_ok())
                    .cloned()
                    .collect(),
            };
            if types.is_empty() {
                // No type passed `require`, so "*" does not either: its 403 says what is granted.
                let refused = who.caller.require("*", Perm::S).err();
                return Err(
                    refused.unwrap_or_else(|| FhirError::forbidden("the access token grants search on no type"))
                );
            }
            searchset(who, base, base, &types, params, lenient, None)
        }
        Scope::Compartment { ctype, id, rtype } => {
            if ctype != "Patient" {
                return Err(FhirError::new(
                    ErrorCode::UnknownRoute,
                    format!("compartment {ctype} is not supported (the Patient compartment is)"),
                ));
            }
            let comps = &who.state.search.compartments().patient;
            let types: Vec<String> = if rtype == "*" {
                comps.keys().cloned().collect()
            } else {
                check_type(repo, &rtype)?;
                if !comps.contains_key(&rtype) {
                    return Err(FhirError::invalid(format!("{rtype} is not in the Patient compartment")));
                }
                vec![rtype.clone()]
            };
            let types: Vec<String> = if rtype == "*" {
                types.into_iter().filter(|t| who.caller.require(t, Perm::S).is_ok()).collect()
            } else {
                who.require(&rtype, "search-type")?;
                types
            };
            let self_url = format!("{base}/Patient/{id}/{rtype}");
            if let [t] = types.as_slice() {
                let f = patient_compartment(&who.state.search, t, &id);
                return searchset(who, base, &self_url, &types, params, lenient, Some(f));
            }
            // `*`: every type of the compartment, each with its own compartment parameters.
            let p: Vec<(String, String)> = params.iter().filter(|(k, _)| k != "_type").cloned().collect();
            searchset_compartment_all(who, base, &self_url, &types, &p, lenient, &id)
        }
    }
}

fn searchset_compartment_all(
    who: &Who<'_>,
    base: &str,
    self_url: &str,
    types: &[String],
    params: &[(String, String)],
    lenient: bool,
    id: &str,
) -> Result<Json, FhirError> {
    // One search per type keeps each type's compartment parameters; ids come back in
    // creation order per type.
    let repo = &*who.state.repo;
    let access = who.state.auth.access(who.caller);
    let mut entries = Vec::new();
    let mut total = 0;
    for t in types {
        let f = patient_compartment(&who.state.search, t, id);
        // Each type's total is summed, so each must be counted.
        let mut p = params.to_vec();
        p.push(("_total".into(), "accurate".into()));
        let (found, disclosed) = crate::auth::access::search(
            &who.state.search,
            base,
            std::slice::from_ref(t),
            &p,
            lenient,
            Some(f),
            access.as_ref(),
        )?;
        total += found.total.unwrap_or_default();
        let mut page = entries_of(repo, base, &found)?;
        authz::present_entries(who.state, who.caller, &mut page);
        entries.extend(page);
        log(who, "search-type", &found, &disclosed);
    }
    Ok(bundle(self_url, params, Some(total), Vec::new(), entries))
}

/// Resources of type `t` in the compartment of `Patient/id` (`t` is one of its types).
pub(super) fn patient_compartment(search: &crate::search::Engine, t: &str, id: &str) -> Filter {
    let codes = search.compartments().patient.get(t).cloned().unwrap_or_default();
    Filter::Compartment { codes, target: ("Patient".into(), id.to_string()) }
}

/// Runs a search and builds its `searchset` Bundle (shared with GET entries of batches).
pub fn search_bundle(
    who: &Who<'_>,
    base: &str,
    rtype: &str,
    params: &[(String, String)],
    lenient: bool,
) -> Result<Json, FhirError> {
    check_type(&who.state.repo, rtype)?;
    who.require(rtype, "search-type")?;
    searchset(who, base, &format!("{base}/{rtype}"), &[rtype.to_string()], params, lenient, None)
}

/// Logs the resources a page disclosed (matches and includes).
pub(super) fn log(who: &Who<'_>, interaction: &'static str, found: &search::Found, d: &crate::auth::access::Disclosed) {
    if found.search.summary == Summary::Count {
        return; // nothing but a count left the server
    }
    let shown: Vec<(String, String, u64)> =
        found.matches.iter().chain(&found.included).map(|h| (h.rtype.clone(), h.id.clone(), h.version)).collect();
    authz::disclosed(who.state, who.caller, interaction, &shown, d);
}

fn searchset(
    who: &Who<'_>,
    base: &str,
    self_url: &str,
    types: &[String],
    params: &[(String, String)],
    lenient: bool,
    extra: Option<Filter>,
) -> Result<Json, FhirError> {
    let repo = &*who.state.repo;
    let access = who.state.auth.access(who.caller);
    let (found, disclosed) =
        crate::auth::access::search(&who.state.search, base, types, params, lenient, extra, access.as_ref())?;
    let mut entries = entries_of(repo, base, &found)?;
    authz::present_entries(who.state, who.caller, &mut entries);
    log(who, if types.len() > 1 { "search-system" } else { "search-type" }, &found, &disclosed);
    if !found.search.ignored.is_empty() {
        entries.push(warning_entry(&found.search.ignored));
    }
    let keep: Vec<(String, String)> =
        params.iter().filter(|(k, _)| k != "_cursor" && !found.search.ignored.contains(k)).cloned().collect();
    let mut links = Vec::new();
    for (rel, cursor) in [("next", &found.next), ("previous", &found.previous)] {
        if let Some(c) = cursor {
            let mut q = keep.clone();
            q.push(("_cursor".into(), c.clone()));
            links.push((rel, q));
        }
    }
    let total = match found.search.total {
        Total::None if found.search.summary != Summary::Count => None,
        _ => found.total,
    };
    let mut self_params = keep.clone();
    if let Some((_, c)) = params.iter().find(|(k, _)| k == "_cursor") {
        self_params.push(("_cursor".into(), c.clone()));
    }
    let mut b = bundle(self_url, &self_params, total, Vec::new(), entries);
    if let Json::Object(members) = &mut b {
        if let Some((_, Json::Array(ls))) = members.iter_mut().find(|(k, _)| k == "link") {
            for (rel, q) in links {
                ls.push(link(rel, &url(self_url, &q)));
            }
        }
    }
    Ok(b)
}

/// The `search.mode=outcome` entry that names the parameters a lenient search left out.
pub(super) fn warning_entry(ignored: &[String]) -> Json {
    let oo = crate::error::outcome(&[crate::error::Issue {
        severity: "warning",
        code: "not-supported",
        diagnostics: format!("ignored unsupported search parameters: {}", ignored.join(", ")),
        expression: ignored.to_vec(),
    }]);
    Json::obj(vec![("resource", oo), ("search", Json::obj(vec![("mode", Json::str("outcome"))]))])
}

fn entries_of(repo: &Repo, base: &str, found: &search::Found) -> Result<Vec<Json>, FhirError> {
    entries(repo, base, &found.search, &found.matches, &found.included)
}

/// The entries of a page: its matches, then what they include, as the search `s` shapes them.
pub(super) fn entries(
    repo: &Repo,
    base: &str,
    s: &crate::search::query::Search,
    matches: &[search::Hit],
    included: &[search::Hit],
) -> Result<Vec<Json>, FhirError> {
    if s.summary == Summary::Count {
        return Ok(Vec::new());
    }
    let mut entries = Vec::with_capacity(matches.len() + included.len());
    let hits: Vec<(&str, &search::Hit)> =
        matches.iter().map(|h| ("match", h)).chain(included.iter().map(|h| ("include", h))).collect();
    let leaves: Vec<u64> = hits.iter().map(|(_, h)| h.leaf).collect();
    for ((mode, hit), stored) in hits.into_iter().zip(repo.read_leaves(&leaves)) {
        let (t, id) = (&hit.rtype, &hit.id);
        // The version that matched; erased since: skip rather than fail the page.
        let Ok(stored) = stored else { continue };
        let resource = if s.summary == Summary::False && s.elements.is_none() {
            stored.body.map(Json::Raw)
        } else {
            stored
                .parsed()?
                .map(|r| summary::subset(&repo.profiles, t, &r, s.summary, s.elements.as_deref()).unwrap_or(r))
        };
        let Some(resource) = resource else { continue };
        entries.push(Json::obj(vec![
            ("fullUrl", Json::str(format!("{base}/{t}/{id}"))),
            ("resource", resource),
            ("search", Json::obj(vec![("mode", Json::str(mode))])),
        ]));
    }
    Ok(entries)
}

pub(super) fn bundle(
    self_url: &str,
    params: &[(String, String)],
    total: Option<usize>,
    mut links: Vec<Json>,
    entries: Vec<Json>,
) -> Json {
    links.insert(0, link("self", &url(self_url, params)));
    let mut b = vec![
        ("resourceType".to_string(), Json::str("Bundle")),
        ("id".to_string(), Json::str(uuid::Uuid::new_v4().to_string())),
        ("type".to_string(), Json::str("searchset")),
    ];
    if let Some(t) = total {
        b.push(("total".into(), Json::Number(t.to_string())));
    }
    b.push(("link".into(), Json::Array(links)));
    if !entries.is_empty() {
        b.push(("entry".into(), Json::Array(entries)));
    }
    Json::Object(b)
}

pub(super) fn url(base: &str, params: &[(String, String)]) -> String {
    if params.is_empty() {
        return base.to_string();
    }
    let q: Vec<String> = params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect();
    format!("{base}?{}", q.join("&"))
}
