//! `POST /` with a `batch` or `transaction` Bundle.
//!
//! A transaction is planned as ONE ledger command: every entry's writes, plus the
//! preconditions of every conditional it evaluated, so it applies all-or-nothing on every
//! node. Entries are processed in the spec's order (DELETE, POST, PUT, then GET) and
//! `urn:uuid:` / fullUrl references and conditional references are rewritten to the ids the
//! plan assigns. A batch runs each entry as its own interaction.

use std::collections::BTreeMap;

use actix_web::{web, HttpRequest, HttpResponse};

use super::authz;
use super::resource::check_type;
use super::search::{search_bundle, Who};
use super::{base_url, json_response, parse_resource, prefer_return, read_body, AppState, Format, Return};
use crate::auth::scopes::Perm;
use crate::codec::parse_query;
use crate::error::{information, FhirError};
use crate::fhir::json::Json;
use crate::fhir::refs::{for_each_reference_mut, split_reference};
use crate::fhir::{instant, is_valid_id};
use crate::repo::interactions::{self, Planned};
use crate::repo::{Plan, Stored};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Method {
    Delete,
    Post,
    Put,
    Get,
}

/// One entry, checked and parsed.
#[derive(Clone, Debug)]
struct Entry {
    index: usize,
    method: Method,
    /// `Type`, `Type/id`, `Type?query` or `Type/id/_history/v`.
    url: String,
    rtype: String,
    id: Option<String>,
    query: Option<String>,
    full_url: Option<String>,
    /// The server a RESTful `fullUrl` names, against which the resource's relative
    /// references resolve.
    rest_base: Option<String>,
    resource: Option<Json>,
    if_none_exist: Option<String>,
    if_match: Option<u64>,
    /// Pre-generated id for creates, stable across re-plans.
    new_id: String,
}

fn at(i: usize) -> String {
    format!("Bundle.entry[{i}]")
}

fn parse_entry(search: &crate::search::Engine, i: usize, mut e: Json) -> Result<Entry, FhirError> {
    let req =
        e.get("request").ok_or_else(|| FhirError::invalid("entry has no request").at(format!("{}.request", at(i))))?;
    let method = match req.get("method").and_then(Json::as_str) {
        Some("GET" | "HEAD") => Method::Get,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some(m) => {
            return Err(FhirError::not_supported(format!("method {m} is not supported in bundles"))
                .at(format!("{}.request.method", at(i))))
        }
        None => return Err(FhirError::invalid("request.method is missing").at(format!("{}.request.method", at(i)))),
    };
    let url = req
        .get("url")
        .and_then(Json::as_str)
        .ok_or_else(|| FhirError::invalid("request.url is missing").at(format!("{}.request.url", at(i))))?
        .trim_start_matches('/')
        .to_string();
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (url.clone(), None),
    };
    let mut segs = path.split('/');
    let rtype = segs.next().unwrap_or_default().to_string();
    let id = segs.next().map(String::from);
    check_type(search.repo(), &rtype).map_err(|e| e.at(format!("{}.request.url", at(i))))?;
    if let Some(id) = &id {
        if !is_valid_id(id) {
            return Err(FhirError::invalid(format!("{id:?} is not a valid id")).at(format!("{}.request.url", at(i))));
        }
    }
    let if_match = match req.get("ifMatch").and_then(Json::as_str) {
        Some(s) => Some(s.trim_start_matches("W/").trim_matches('"').parse::<u64>().map_err(|_| {
            FhirError::invalid(format!("ifMatch {s:?} is not a version")).at(format!("{}.request.ifMatch", at(i)))
        })?),
        None => None,
    };
    let full_url = e.get("fullUrl").and_then(Json::as_str).map(String::from);
    let rest_base = full_url.as_deref().and_then(restful_base).map(String::from);
    let if_none_exist = req.get("ifNoneExist").and_then(Json::as_str).map(String::from);
    let resource = e.remove("resource");
    if matches!(method, Method::Post | Method::Put) {
        let Some(r) = &resource else {
            return Err(FhirError::invalid("a POST or PUT entry needs a resource").at(format!("{}.resource", at(i))));
        };
        if method == Method::Put && id.is_none() && query.is_none() {
            return Err(FhirError::invalid("PUT needs Type/id or Type?criteria").at(format!("{}.request.url", at(i))));
        }
        if method == Method::Post && (id.is_some() || query.is_some()) {
            return Err(FhirError::invalid("POST url must be a resource type").at(format!("{}.request.url", at(i))));
        }
        crate::search::validate::validate(search, &rtype, r, Some(&format!("{}.resource", at(i))))?;
        if let (Method::Put, Some(id)) = (&method, &id) {
            if r.get("id").and_then(Json::as_str).is_some_and(|b| b != id) {
                return Err(
                    FhirError::invalid("the resource id differs from request.url").at(format!("{}.resource.id", at(i)))
                );
            }
        }
    }
    Ok(Entry {
        index: i,
        method,
        url,
        rtype,
        id,
        query,
        full_url,
        rest_base,
        resource,
        if_none_exist,
        if_match,
        new_id: uuid::Uuid::new_v4().to_string(),
    })
}

/// A transaction of at least this many entries has them parsed and validated on every core.
const ENTRIES_ON_EVERY_CORE: usize = 64;

/// Every entry of a transaction parsed and its resource validated, on every core when there
/// are many (an import's thousands): each entry is checked on its own, and the first failure
/// in the Bundle's order is the one reported, as when they are checked one by one.
fn parse_entries(search: &crate::search::Engine, raw: Vec<Json>) -> Result<Vec<Entry>, FhirError> {
    if raw.len() < ENTRIES_ON_EVERY_CORE {
        return raw.into_iter().enumerate().map(|(i, e)| parse_entry(search, i, e)).collect();
    }
    crate::parallel::on_every_core_owned(raw, |i, e| parse_entry(search, i, e))
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(FhirError::internal("a thread checking entries failed"))))
        .collect()
}

pub async fn batch_or_transaction(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let f = Format::negotiate(&req)?;
    process(&req, payload, &state, &f).await
}

async fn process(
    req: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    f: &Format,
) -> Result<HttpResponse, FhirError> {
    // The text is freed once parsed: a large transaction's later steps reuse its memory.
    let mut bundle = parse_resource(&read_body(req, payload, state.max_body_bytes).await?)?;
    if bundle.get("resourceType").and_then(Json::as_str) != Some("Bundle") {
        return Err(FhirError::invalid("POST to the base URL takes a batch or transaction Bundle").at("resourceType"));
    }
    let kind = bundle.get("type").and_then(Json::as_str).unwrap_or_default().to_string();
    let raw_entries = match bundle.remove("entry") {
        Some(Json::Array(entries)) => entries,
        _ => Vec::new(),
    };
    let caller = authz::caller(req);
    let who = Who { state, caller: &caller };
    match kind.as_str() {
        "transaction" => {
            let entries = parse_entries(&state.search, raw_entries)?;
            // All or nothing: one entry the caller may not make refuses the transaction.
            for e in &entries {
                check_entry(&who, e).map_err(|err| err.at(at(e.index)))?;
            }
            transaction(req, &who, entries, f).await
        }
        "batch" => batch(req, &who, raw_entries, f).await,
        other => {
            Err(FhirError::invalid(format!("Bundle.type {other:?}: POST / takes batch or transaction"))
                .at("Bundle.type"))
        }
    }
}

/// Resolves `Type?criteria` to exactly one id (recording the match as a precondition).
fn resolve_conditional(plan: &mut Plan<'_>, rtype: &str, query: &str, what: &str) -> Result<Option<String>, FhirError> {
    let (ids, groups) = interactions::conditional_terms(plan, rtype, query)?;
    let ids = plan.matching(rtype, &ids, groups)?;
    match ids.len() {
        0 | 1 => Ok(ids.into_iter().next()),
        n => Err(FhirError::precondition(format!("{what} {rtype}?{query} matched {n} resources"))),
    }
}

/// The base of an absolute RESTful `fullUrl` (`http(s)://server/path/Type/id`).
fn restful_base(full_url: &str) -> Option<&str> {
    let after_scheme = full_url.strip_prefix("https://").or_else(|| full_url.strip_prefix("http://"))?;
    if after_scheme.matches('/').count() < 2 || full_url.contains(['?', '#']) {
        return None;
    }
    let (path, id) = full_url.rsplit_once('/')?;
    let (base, rtype) = path.rsplit_once('/')?;
    let restful = rtype.starts_with(|c: char| c.is_ascii_uppercase())
        && rtype.chars().all(|c| c.is_ascii_alphanumeric())
        && is_valid_id(id);
    restful.then_some(base)
}

/// How the references of a transaction's resources are resolved (FHIR R4, "Resolving
/// references in Bundles"): a reference equal to an entry's `fullUrl` becomes that entry's
/// `Type/id`; a relative `Type/id` in a resource whose `fullUrl` is RESTful is read against
/// that server's base first, so that it finds an entry sent with an absolute `fullUrl`, and
/// when no entry is found and that server is not this one, it is stored absolute: it still
/// names the other server's resource (an import's references to what its export left out).
struct Resolver<'a> {
    map: &'a BTreeMap<String, String>,
    own_base: &'a str,
}

impl Resolver<'_> {
    /// Resolves `r` in a resource of RESTful base `base`; true when it is a conditional
    /// reference (`Type?criteria`), left to be searched.
    fn resolve(&self, r: &mut String, base: Option<&str>) -> bool {
        if let Some(target) = self.map.get(r.as_str()) {
            r.clone_from(target);
            return false;
        }
        if r.contains('?') && !r.contains("://") {
            return true;
        }
        if let Some(base) = base.filter(|_| !r.contains(':') && split_reference(r).is_some()) {
            let absolute = format!("{base}/{r}");
            match self.map.get(&absolute) {
                Some(target) => r.clone_from(target),
                None if base != self.own_base => *r = absolute,
                None => {}
            }
        }
        false
    }
}

/// Rewrites references in place (see [`Resolver`]) when every target id is known before
/// planning (no conditional interaction or reference), so that re-plans need no copies.
/// Returns whether that was possible.
fn prerewrite(entries: &mut [Entry], own_base: &str) -> bool {
    if entries.iter().any(|e| e.if_none_exist.is_some() || e.query.is_some()) {
        return false;
    }
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for e in entries.iter() {
        let id = match (&e.method, &e.id) {
            (Method::Post, _) => &e.new_id,
            (Method::Put, Some(id)) => id,
            _ => continue,
        };
        if let Some(full) = &e.full_url {
            map.insert(full.clone(), format!("{}/{id}", e.rtype));
        }
    }
    let resolver = Resolver { map: &map, own_base };
    let rewrite = |entries: &mut [Entry]| {
        let mut conditional = false;
        for e in entries {
            if let Some(res) = e.resource.as_mut() {
                let base = e.rest_base.as_deref();
                for_each_reference_mut(res, &mut |r| conditional |= resolver.resolve(r, base));
            }
        }
        conditional
    };
    // Every resource is rewritten on its own: many are split over the cores.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if entries.len() < ENTRIES_ON_EVERY_CORE || cores == 1 {
        return !rewrite(entries);
    }
    let conditional = std::thread::scope(|scope| {
        let parts: Vec<_> =
            entries.chunks_mut(entries.len().div_ceil(cores)).map(|part| scope.spawn(|| rewrite(part))).collect();
        // A rewriting that panicked panics here, as it would have on one core.
        parts.into_iter().map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).fold(false, |a, b| a | b)
    });
    !conditional
}

fn plan_transaction(
    plan: &mut Plan<'_>,
    entries: &[Entry],
    rewritten: bool,
    own_base: &str,
) -> Result<Vec<Planned>, FhirError> {
    // Phase 1: decide the id each entry targets, so references can be rewritten.
    // Keyed by entry index: a batch plans one entry at a time, whose index is its place in
    // the whole Bundle.
    let mut targets: BTreeMap<usize, String> = BTreeMap::new();
    let mut existing: BTreeMap<usize, String> = BTreeMap::new();
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for e in entries {
        let id = match (&e.method, &e.id, &e.query) {
            (Method::Post, _, _) => match &e.if_none_exist {
                Some(q) => {
                    match resolve_conditional(plan, &e.rtype, q, "ifNoneExist").map_err(|x| x.at(at(e.index)))? {
                        Some(found) => {
                            existing.insert(e.index, found.clone());
                            found
                        }
                        None => e.new_id.clone(),
                    }
                }
                None => e.new_id.clone(),
            },
            (Method::Put | Method::Delete, Some(id), _) => id.clone(),
            (Method::Put, None, Some(q)) => {
                let body_id = e.resource.as_ref().and_then(|r| r.get("id")).and_then(Json::as_str).map(String::from);
                match resolve_conditional(plan, &e.rtype, q, "conditional update").map_err(|x| x.at(at(e.index)))? {
                    Some(found) => found,
                    None => body_id.unwrap_or_else(|| e.new_id.clone()),
                }
            }
            (Method::Delete, None, Some(q)) => {
                match resolve_conditional(plan, &e.rtype, q, "conditional delete").map_err(|x| x.at(at(e.index)))? {
                    Some(found) => found,
                    None => continue,
                }
            }
            _ => continue,
        };
        if let Some(full) = &e.full_url {
            map.insert(full.clone(), format!("{}/{id}", e.rtype));
        }
        targets.insert(e.index, id);
    }
    // Phase 2 and 3: rewrite references, then write in DELETE, POST, PUT order.
    let mut order: Vec<&Entry> = entries.iter().filter(|e| e.method != Method::Get).collect();
    order.sort_by_key(|e| (e.method.clone(), e.index));
    let mut planned: BTreeMap<usize, Planned> = BTreeMap::new();
    let mut rest = order.as_slice();
    while let Some((&e, after)) = rest.split_first() {
        if rewritten && e.method == Method::Post {
            // Rewritten up front, so no POST is conditional: they are all plain creates under
            // new ids, planned together (on every core when many).
            let n = rest.iter().take_while(|e| e.method == Method::Post).count();
            let (posts, after) = rest.split_at(n);
            plan_creates(plan, posts, &targets, &mut planned)?;
            rest = after;
            continue;
        }
        rest = after;
        let Some(id) = targets.get(&e.index).cloned() else {
            planned.insert(e.index, Planned { status: 204, write: None, existing: None });
            continue;
        };
        if let Some(found) = existing.get(&e.index) {
            planned.insert(
                e.index,
                Planned { status: 200, write: None, existing: Some((e.rtype.clone(), found.clone())) },
            );
            continue;
        }
        let p = match e.method {
            Method::Delete => interactions::delete(plan, &e.rtype, &id, e.if_match),
            Method::Post | Method::Put => {
                let owned;
                let res = match (&e.resource, rewritten) {
                    (Some(r), true) => r,
                    (r, _) => {
                        let mut copy = r.clone().unwrap_or(Json::Null);
                        let resolver = Resolver { map: &map, own_base };
                        rewrite_references(plan, &mut copy, &resolver, e.rest_base.as_deref())
                            .map_err(|x| x.at(format!("{}.resource", at(e.index))))?;
                        owned = copy;
                        &owned
                    }
                };
                if e.method == Method::Post {
                    interactions::create(plan, &e.rtype, &id, res, None)
                } else {
                    interactions::update(plan, &e.rtype, &id, res, e.if_match)
                }
            }
            Method::Get => continue,
        };
        planned.insert(e.index, p.map_err(|x| x.at(at(e.index)))?);
    }
    Ok(entries
        .iter()
        .map(|e| planned.remove(&e.index).unwrap_or(Planned { status: 200, write: None, existing: None }))
        .collect())
}

/// The creates of `posts` (rewritten, unconditional), planned as one [`Plan::put_new_all`].
fn plan_creates(
    plan: &mut Plan<'_>,
    posts: &[&Entry],
    targets: &BTreeMap<usize, String>,
    planned: &mut BTreeMap<usize, Planned>,
) -> Result<(), FhirError> {
    let mut items = Vec::with_capacity(posts.len());
    for e in posts {
        let id = targets.get(&e.index).ok_or_else(|| FhirError::internal("a create has no id").at(at(e.index)))?;
        let res =
            e.resource.as_ref().ok_or_else(|| FhirError::invalid("a POST entry needs a resource").at(at(e.index)))?;
        items.push((e.rtype.as_str(), id.as_str(), res));
    }
    let first = plan.results_len();
    plan.put_new_all(&items).map_err(|(k, err)| err.at(at(posts[k].index)))?;
    for (k, e) in posts.iter().enumerate() {
        planned.insert(e.index, Planned { status: 201, write: Some(first + k), existing: None });
    }
    Ok(())
}

fn rewrite_references(
    plan: &mut Plan<'_>,
    res: &mut Json,
    references: &Resolver<'_>,
    base: Option<&str>,
) -> Result<(), FhirError> {
    let mut conditional: Vec<String> = Vec::new();
    for_each_reference_mut(res, &mut |r| {
        if references.resolve(r, base) {
            conditional.push(r.clone());
        }
    });
    if conditional.is_empty() {
        return Ok(());
    }
    let mut resolved = BTreeMap::new();
    for c in conditional {
        let (rtype, query) = c.split_once('?').unwrap_or_default();
        check_type(plan.repo(), rtype)?;
        match resolve_conditional(plan, rtype, query, "conditional reference")? {
            Some(id) => resolved.insert(c.clone(), format!("{rtype}/{id}")),
            None => return Err(FhirError::precondition(format!("conditional reference {c} matched no resource"))),
        };
    }
    for_each_reference_mut(res, &mut |r| {
        if let Some(t) = resolved.get(r.as_str()) {
            *r = t.clone();
        }
    });
    Ok(())
}

fn status_text(status: u16) -> &'static str {
    match status {
        201 => "201 Created",
        204 => "204 No Content",
        // 200, and any other success.
        _ => "200 OK",
    }
}

/// Names the Merkle leaf of a bundle entry's version (a string: leaf numbers outgrow FHIR's
/// 32-bit `unsignedInt`).
pub const LEAF_EXTENSION: &str = "urn:fhir-ledger:StructureDefinition/ledger-leaf";

fn response_entry(req: &HttpRequest, status: u16, s: Option<&Stored>, ret: Return) -> Json {
    let base = base_url(req);
    let mut response = vec![("status".to_string(), Json::String(status_text(status).into()))];
    let mut members = Vec::new();
    if let Some(s) = s {
        if !s.deleted {
            members.push(("fullUrl".to_string(), Json::String(format!("{base}/{}/{}", s.rtype, s.id))));
            response.push(("location".into(), Json::String(format!("{}/{}/_history/{}", s.rtype, s.id, s.version))));
        }
        response.push(("etag".into(), Json::String(format!("W/\"{}\"", s.version))));
        response.push(("lastModified".into(), Json::String(instant(s.last_updated_ms))));
        if let Some(leaf) = s.leaf {
            // What `X-Ledger-Leaf` says of a single write, per entry: the version's Merkle leaf.
            response.push((
                "extension".into(),
                Json::Array(vec![Json::obj(vec![
                    ("url", Json::String(LEAF_EXTENSION.into())),
                    ("valueString", Json::String(leaf.to_string())),
                ])]),
            ));
        }
        match (ret, s.raw()) {
            (Return::Representation, Some(r)) => members.push(("resource".into(), r)),
            (Return::OperationOutcome, _) => response.push(("outcome".into(), information("ok"))),
            _ => {}
        }
    }
    members.push(("response".into(), Json::Object(response)));
    Json::Object(members)
}

/// Unless the client asks, bundle responses carry locations, not whole resources (as HAPI
/// does): loading a large transaction should not echo it back.
fn bundle_return(req: &HttpRequest) -> Return {
    let explicit = req.headers().get("prefer").and_then(|v| v.to_str().ok()).is_some_and(|p| p.contains("return="));
    if explicit {
        prefer_return(req)
    } else {
        Return::Minimal
    }
}

fn response_bundle(kind: &str, entries: Vec<Json>) -> Json {
    Json::Object(vec![
        ("resourceType".into(), Json::String("Bundle".into())),
        ("id".into(), Json::String(uuid::Uuid::new_v4().to_string())),
        ("type".into(), Json::String(kind.into())),
        ("entry".into(), Json::Array(entries)),
    ])
}

/// The scopes an entry needs before anything is planned (reads are checked when they are
/// answered; what each write finds and leaves is checked by the caller's policy as it is
/// planned, conditional matches included).
fn check_entry(who: &Who<'_>, e: &Entry) -> Result<(), FhirError> {
    let (state, caller) = (who.state, who.caller);
    if caller.unrestricted {
        return Ok(());
    }
    let (perm, interaction) = match e.method {
        Method::Get => return Ok(()),
        Method::Post => (Perm::C, "create"),
        Method::Put => (Perm::U, "update"),
        Method::Delete => (Perm::D, "delete"),
    };
    // A PUT may create: its scope is checked per resource by the policy when planned.
    if e.method != Method::Put {
        authz::require(state, caller, &e.rtype, perm, interaction)?;
    }
    if e.query.is_some() || e.if_none_exist.is_some() {
        authz::require(state, caller, &e.rtype, Perm::S, interaction)?;
    }
    Ok(())
}

async fn transaction(
    req: &HttpRequest,
    who: &Who<'_>,
    mut entries: Vec<Entry>,
    f: &Format,
) -> Result<HttpResponse, FhirError> {
    let repo = &*who.state.repo;
    let own_base = base_url(req);
    let rewritten = prerewrite(&mut entries, &own_base);
    let policy = authz::policy(who.state, who.caller);
    let (planned, results) =
        repo.commit(&policy, |plan| plan_transaction(plan, &entries, rewritten, &own_base)).await?;
    let ret = bundle_return(req);
    let mut out = Vec::with_capacity(entries.len());
    for (e, p) in entries.iter().zip(planned) {
        if e.method == Method::Get {
            out.push(get_entry(req, who, e).unwrap_or_else(|err| error_entry(&err)));
            continue;
        }
        let stored = stored_of(who, &p, &results, ret);
        out.push(response_entry(req, p.status, stored.as_ref(), ret));
    }
    Ok(json_response(200, &response_bundle("transaction-response", out), f))
}

/// Runs a transaction Bundle for `who` outside a request (an import): parsed, scope-checked
/// and planned under the caller's policy exactly as `POST /` does at `own_base`; returns
/// what it wrote.
pub(super) async fn run_transaction(who: &Who<'_>, mut bundle: Json, own_base: &str) -> Result<Vec<Stored>, FhirError> {
    let raw = match bundle.remove("entry") {
        Some(Json::Array(entries)) => entries,
        _ => Vec::new(),
    };
    let mut entries = parse_entries(&who.state.search, raw)?;
    for e in &entries {
        check_entry(who, e).map_err(|err| err.at(at(e.index)))?;
    }
    let rewritten = prerewrite(&mut entries, own_base);
    let policy = authz::policy(who.state, who.caller);
    let (_, results) =
        who.state.repo.commit(&policy, |plan| plan_transaction(plan, &entries, rewritten, own_base)).await?;
    Ok(results)
}

/// The version an entry's response names: what it wrote, or the resource a conditional
/// create found (a disclosure when the response shows it).
fn stored_of(who: &Who<'_>, p: &Planned, results: &[Stored], ret: Return) -> Option<Stored> {
    match (&p.write, &p.existing) {
        (Some(i), _) => results.get(*i).cloned(),
        (None, Some((t, id))) => {
            let s = who.state.repo.read(t, id).ok()?;
            if ret == Return::Representation {
                let d = authz::version_visible(who.state, who.caller, &s).ok().flatten()?;
                authz::disclosed(who.state, who.caller, "create", &[(s.rtype.clone(), s.id.clone(), s.version)], &d);
            }
            Some(s)
        }
        _ => None,
    }
}

fn error_entry(e: &FhirError) -> Json {
    Json::Object(vec![(
        "response".into(),
        Json::Object(vec![("status".into(), Json::String(e.status().to_string())), ("outcome".into(), e.to_outcome())]),
    )])
}

fn get_entry(req: &HttpRequest, who: &Who<'_>, e: &Entry) -> Result<Json, FhirError> {
    let repo = &*who.state.repo;
    if let Some(q) = &e.query {
        let b = search_bundle(who, &base_url(req), &e.rtype, &parse_query(q), false)?;
        return Ok(Json::Object(vec![
            ("resource".into(), b),
            ("response".into(), Json::Object(vec![("status".into(), Json::String("200 OK".into()))])),
        ]));
    }
    let id = e.id.as_deref().ok_or_else(|| FhirError::invalid("GET entries need Type/id or Type?criteria"))?;
    authz::require(who.state, who.caller, &e.rtype, Perm::R, "read")?;
    authz::refuse_deidentified(who.caller, "a read inside a batch")?;
    let parts: Vec<&str> = e.url.split('/').collect();
    let (s, d) = match parts.as_slice() {
        [_, _, "_history", v] => {
            let s = repo.vread(&e.rtype, id, v.parse().map_err(|_| FhirError::not_found(&e.url))?)?;
            let d = authz::version_visible(who.state, who.caller, &s)?.ok_or_else(|| FhirError::not_found(&e.url))?;
            if s.deleted {
                return Err(FhirError::gone(&e.url));
            }
            (s, d)
        }
        [_, _] => {
            let d = authz::check_visible(who.state, who.caller, &e.rtype, id, "read")?;
            (repo.read(&e.rtype, id)?, d)
        }
        _ => return Err(FhirError::invalid(format!("unsupported GET url {:?}", e.url))),
    };
    authz::disclosed(who.state, who.caller, "read", &[(s.rtype.clone(), s.id.clone(), s.version)], &d);
    Ok(response_entry(req, 200, Some(&s), Return::Representation))
}

async fn batch(req: &HttpRequest, who: &Who<'_>, raw: Vec<Json>, f: &Format) -> Result<HttpResponse, FhirError> {
    let ret = bundle_return(req);
    let repo = &*who.state.repo;
    let policy = authz::policy(who.state, who.caller);
    let policy = &policy;
    let own_base = &base_url(req);
    let futures = raw.into_iter().enumerate().map(|(i, raw)| async move {
        let e = match parse_entry(&who.state.search, i, raw) {
            Ok(e) => e,
            Err(err) => return error_entry(&err),
        };
        if e.method == Method::Get {
            return get_entry(req, who, &e).unwrap_or_else(|err| error_entry(&err));
        }
        if let Err(err) = check_entry(who, &e) {
            return error_entry(&err);
        }
        let one = std::slice::from_ref(&e);
        match repo.commit(policy, |plan| plan_transaction(plan, one, false, own_base)).await {
            Ok((planned, results)) => {
                let p = planned.into_iter().next().unwrap_or(Planned { status: 200, write: None, existing: None });
                let stored = stored_of(who, &p, &results, ret);
                response_entry(req, p.status, stored.as_ref(), ret)
            }
            Err(err) => error_entry(&err),
        }
    });
    let out = futures::future::join_all(futures).await;
    Ok(json_response(200, &response_bundle("batch-response", out), f))
}

#[cfg(test)]
mod tests {
    use super::restful_base;

    #[test]
    fn a_restful_full_url_has_a_base_and_others_have_none() {
        assert_eq!(restful_base("https://old.example/fhir/Patient/p1"), Some("https://old.example/fhir"));
        assert_eq!(restful_base("http://host/Observation/o-1"), Some("http://host"));
        for other in [
            "urn:uuid:8d4a3a3e-5d7e-4c27-9a0e-6ad3d0c1b1a2",
            "http://host/Patient",
            "http://host/fhir/Patient/p1/_history/2",
            "http://host/fhir/patient/p1",
            "http://host/fhir/Patient/p1?x=1",
            "http://host/fhir/Patient/p%201",
            "ftp://host/fhir/Patient/p1",
        ] {
            assert_eq!(restful_base(other), None, "{other}");
        }
    }
}
