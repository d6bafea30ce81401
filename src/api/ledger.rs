//! The ledger seen from outside: signed tree heads and Merkle proofs (RFC 9162) that a
//! verifier checks without trusting this server.
//!
//! `GET /ledger/head` — the current tree size and root, signed by this node and cosigned by
//! the other voters that hold the same tree.
//! `GET /{type}/{id}/_history/{vid}/$proof` — inclusion proof of one resource version.
//! `GET /ledger/proof?leaf=N` — inclusion proof of a leaf by index.
//! `GET /ledger/consistency?first=N&second=M` — consistency proof between two tree sizes.
//! Proofs are Parameters resources; hashes and leaf data are base64.

use actix_web::{web, HttpRequest, HttpResponse};
use consensus::proof;

use super::resource::check_type;
use super::{json_response, AppState, Format};
use crate::codec::parse_query;
use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::Json;
use crate::repo::Repo;
use crate::treehead::TreeHead;

fn s(v: impl Into<String>) -> Json {
    Json::String(v.into())
}

fn param(name: &str, kind: &str, value: Json) -> Json {
    Json::obj(vec![("name", s(name)), (kind, value)])
}

/// The current tree head, signed by this node and cosigned by every other voter that holds the
/// same tree (so an auditor can require a quorum of node keys rather than trust one server).
pub async fn signed_head(repo: &Repo) -> Result<TreeHead, FhirError> {
    let frontier = repo.view().frontier()?;
    Ok(signed_head_at(repo, frontier.size, frontier.root()).await)
}

/// A head of the tree at `size` with `root` (a tree this node holds or held: a backup's),
/// signed by this node and cosigned by every other voter whose tree has that root at `size`.
pub async fn signed_head_at(repo: &Repo, size: u64, root: consensus::merkle::Hash) -> TreeHead {
    let node = repo.node_id().to_string();
    let mut head = TreeHead::signed(size, root, crate::fhir::now_ms(), &node, repo.signer());
    for (id, public_key, signature) in repo.ledger().cosign_head(head.size, head.root, head.timestamp_ms).await {
        let key = hex::decode(&public_key).ok().and_then(|k| k.try_into().ok());
        let sig = signature.try_into().ok();
        if let (Some(public_key), Some(signature)) = (key, sig) {
            head.signatures.push(crate::treehead::HeadSignature { node: id.to_string(), public_key, signature });
        }
    }
    head
}

pub fn parameters(parameter: Vec<Json>) -> Json {
    Json::obj(vec![("resourceType", s("Parameters")), ("parameter", Json::Array(parameter))])
}

pub async fn head(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    super::read_barrier(&req, &state.repo).await?;
    let head = signed_head(&state.repo).await;
    let f = &Format::negotiate(&req)?;
    Ok(json_response(200, &parameters(head?.to_parts()), f))
}

/// Leaf `leaf`'s index, data and audit path at `head`: what `fhir-ledger verify proof` checks.
pub fn inclusion_parts(repo: &Repo, head: &TreeHead, leaf: u64) -> Result<Vec<Json>, FhirError> {
    inclusion_parts_from(repo, repo.view(), head, leaf)
}

/// [`inclusion_parts`] with the tree's nodes read through `nodes` (a [`proof::Memo`] when
/// many proofs at one head are made).
pub fn inclusion_parts_from(
    repo: &Repo,
    nodes: &dyn proof::Nodes,
    head: &TreeHead,
    leaf: u64,
) -> Result<Vec<Json>, FhirError> {
    let size = head.size;
    let record = repo.view().record(leaf)?.ok_or_else(|| FhirError::not_found(&format!("leaf {leaf}")))?;
    let path = proof::inclusion_proof(nodes, leaf, size)
        .ok_or_else(|| FhirError::internal(format!("no inclusion proof for leaf {leaf} of {size}")))?;
    let mut p = vec![
        param("leafIndex", "valueString", s(leaf.to_string())),
        param("leafData", "valueBase64Binary", Json::base64(&record.header.encode())),
    ];
    for h in &path {
        p.push(param("auditPath", "valueBase64Binary", Json::base64(h)));
    }
    Ok(p)
}

fn inclusion(repo: &Repo, head: &TreeHead, leaf: u64, extra: Vec<Json>) -> Result<Json, FhirError> {
    let mut p = extra;
    p.extend(inclusion_parts(repo, head, leaf)?);
    p.push(Json::obj(vec![("name", s("treeHead")), ("part", Json::Array(head.to_parts()))]));
    Ok(parameters(p))
}

/// `GET /{type}/{id}/_history/{vid}/$proof`
pub async fn version_proof(
    req: HttpRequest,
    path: web::Path<(String, String, String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (rtype, id, vid, op) = path.into_inner();
    super::read_barrier(&req, &state.repo).await?;
    let head = signed_head(&state.repo).await;
    let f = &Format::negotiate(&req)?;
    if op != "$proof" {
        return Err(FhirError::new(ErrorCode::UnknownRoute, format!("unknown operation {op:?}")));
    }
    check_type(&state.repo, &rtype)?;
    let caller = super::authz::caller(&req);
    super::authz::require(&state, &caller, &rtype, crate::auth::scopes::Perm::R, "operation")?;
    super::authz::refuse_deidentified(&caller, "$proof")?;
    let what = format!("{rtype}/{id}/_history/{vid}");
    let version: u64 = vid.parse().map_err(|_| FhirError::not_found(&what))?;
    let record = state.repo.view().version(&rtype, &id, version)?.ok_or_else(|| FhirError::not_found(&what))?;
    // A proof names the version's header (its compartment and actor): only for a caller
    // who may see that version.
    let stored = state.repo.vread(&rtype, &id, version)?;
    super::authz::version_visible(&state, &caller, &stored)?.ok_or_else(|| FhirError::not_found(&what))?;
    // The salt of the version's content commitment: with it, whoever holds the version's
    // exact bytes proves they are what the leaf recorded (a protocol's proof of existence).
    let mut extra = vec![param("resource", "valueString", s(what))];
    if let Some(salt) = state.repo.content_salt(&record.header)? {
        extra.push(param("contentSalt", "valueBase64Binary", Json::base64(&salt)));
    }
    let body = inclusion(&state.repo, &head?, record.leaf, extra)?;
    Ok(json_response(200, &body, f))
}

/// Leaf headers name resources, compartments and actors: `/ledger/entries` and
/// `/ledger/proof` are for auditors (the admin token, or a backend service that may read
/// everything anyway), never for a caller who may not read every patient.
fn auditor(req: &HttpRequest) -> Result<(), FhirError> {
    let caller = super::authz::caller(req);
    if caller.may_audit() {
        Ok(())
    } else {
        Err(FhirError::forbidden(
            "the ledger's entries and leaf proofs are for auditors: the admin token, or a system/*.rs token",
        ))
    }
}

fn number(params: &[(String, String)], name: &str) -> Result<u64, FhirError> {
    let v = params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .ok_or_else(|| FhirError::invalid(format!("parameter {name} is required")).at(name.to_string()))?;
    v.parse().map_err(|_| {
        FhirError::invalid(format!("{name} must be a non-negative integer, not {v:?}")).at(name.to_string())
    })
}

/// `GET /ledger/proof?leaf=N`
pub async fn leaf_proof(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    super::read_barrier(&req, &state.repo).await?;
    let head = signed_head(&state.repo).await;
    let f = &Format::negotiate(&req)?;
    auditor(&req)?;
    let leaf = number(&parse_query(req.query_string()), "leaf")?;
    Ok(json_response(200, &inclusion(&state.repo, &head?, leaf, Vec::new())?, f))
}

/// `GET /ledger/consistency?first=N&second=M` (`second` defaults to the current size).
pub async fn consistency(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    super::read_barrier(&req, &state.repo).await?;
    let head = signed_head(&state.repo).await;
    let f = &Format::negotiate(&req)?;
    let q = parse_query(req.query_string());
    let first = number(&q, "first")?;
    let head = head?;
    let size = head.size;
    let second = if q.iter().any(|(k, _)| k == "second") { number(&q, "second")? } else { size };
    if first == 0 || first > second || second > size {
        return Err(FhirError::invalid(format!(
            "need 0 < first <= second <= {size} (the current tree size); got first={first}, second={second}"
        )));
    }
    let view = state.repo.view();
    let missing = || FhirError::internal("subtree hashes missing");
    let path = proof::consistency_proof(view, first, second).ok_or_else(missing)?;
    let mut p = vec![
        param("first", "valueString", s(first.to_string())),
        param("firstRootHash", "valueBase64Binary", Json::base64(&proof::root_at(view, first).ok_or_else(missing)?)),
        param("second", "valueString", s(second.to_string())),
        param("secondRootHash", "valueBase64Binary", Json::base64(&proof::root_at(view, second).ok_or_else(missing)?)),
    ];
    for h in &path {
        p.push(param("consistencyPath", "valueBase64Binary", Json::base64(h)));
    }
    p.push(Json::obj(vec![("name", s("treeHead")), ("part", Json::Array(head.to_parts()))]));
    Ok(json_response(200, &parameters(p), f))
}

/// `GET /ledger/entries?from=N&_count=M`: leaf headers in order, for auditors. Headers only
/// (type, id, version, time, actor, operation, ciphertext digest): never resource content.
pub async fn entries(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    super::read_barrier(&req, &state.repo).await?;
    let f = &Format::negotiate(&req)?;
    auditor(&req)?;
    let q = parse_query(req.query_string());
    let from = if q.iter().any(|(k, _)| k == "from") { number(&q, "from")? } else { 0 };
    let count = if q.iter().any(|(k, _)| k == "_count") { number(&q, "_count")?.min(1000) } else { 100 };
    let view = state.repo.view();
    let size = view.frontier()?.size;
    let end = from.saturating_add(count).min(size);
    let mut out = Vec::new();
    for leaf in from..end {
        let r = view.record(leaf)?.ok_or_else(|| FhirError::internal(format!("leaf {leaf} has no record")))?;
        let h = &r.header;
        out.push(Json::obj(vec![
            ("leaf", Json::Number(leaf.to_string())),
            ("leafHash", Json::base64(&consensus::merkle::leaf_hash(&h.encode()))),
            ("resource", s(format!("{}/{}/_history/{}", h.rtype, h.id, h.version))),
            ("operation", s(h.op.clone())),
            ("lastUpdated", s(crate::fhir::instant(h.last_updated_ms))),
            ("actor", s(h.actor.clone())),
            ("bodySha256", Json::base64(&h.body_sha256)),
            ("raftLogIndex", Json::Number(h.log_index.to_string())),
        ]));
    }
    let mut body = vec![("treeSize", Json::Number(size.to_string())), ("entries", Json::Array(out))];
    if end < size {
        body.push(("next", s(format!("{}/ledger/entries?from={end}&_count={count}", super::base_url(&req)))));
    }
    let mut resp = json_response(200, &Json::obj(body), f);
    // Not a FHIR resource: plain JSON.
    resp.headers_mut().insert(
        actix_web::http::header::CONTENT_TYPE,
        actix_web::http::header::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// `POST /Patient/{id}/$erase`: crypto-shreds the patient's compartment (see `Plan::erase`).
/// Answers Parameters naming every erased resource's new version and its leaf, so that the
/// erasure itself can be proven like any other change.
pub async fn erase(
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (rtype, id, op) = path.into_inner();
    if op != "$erase" {
        return Err(FhirError::new(ErrorCode::UnknownRoute, format!("no operation {op:?} on {rtype}/{{id}}")));
    }
    if rtype != "Patient" {
        return Err(FhirError::invalid(format!(
            "$erase works on a patient compartment (POST /Patient/{{id}}/$erase), not on {rtype}"
        )));
    }
    if !crate::fhir::is_valid_id(&id) {
        return Err(FhirError::invalid(format!("{id:?} is not a valid id")));
    }
    let caller = super::authz::caller(&req);
    let policy = super::authz::policy(&state, &caller);
    let (_, erased) = state.repo.commit(&policy, |plan| plan.erase(&id)).await?;
    state.repo.forget_key(&format!("Patient/{id}"));
    let mut p = vec![param("erased", "valueString", s(erased.len().to_string()))];
    for e in &erased {
        p.push(Json::obj(vec![
            ("name", s("version")),
            (
                "part",
                Json::Array(vec![
                    param("resource", "valueString", s(format!("{}/{}/_history/{}", e.rtype, e.id, e.version))),
                    param("leafIndex", "valueString", s(e.leaf.map_or(String::new(), |l| l.to_string()))),
                ]),
            ),
        ]));
    }
    let f = &Format::negotiate(&req)?;
    Ok(json_response(200, &parameters(p), f))
}
