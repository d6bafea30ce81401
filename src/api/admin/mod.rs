//! The cluster admin API (`/admin/...`), used by `fhir-ledger cluster`. Not FHIR: plain JSON
//! in, JSON out, errors as OperationOutcome. Every call needs the node's admin bearer token.

pub mod backup;
pub mod users;

use std::collections::{BTreeMap, BTreeSet};

use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use consensus::{AdminError, Node, NodeId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::AppState;
use crate::error::{ErrorCode, FhirError};

/// What the admin API needs beyond the repository.
#[derive(Clone, Debug, Default)]
pub struct AdminConfig {
    /// SHA-256 of the bearer token; compared digest to digest so timing reveals nothing.
    pub token_sha256: [u8; 32],
    /// Whether `PUT /admin/faults` may isolate peers (partition tests only).
    pub fault_injection: bool,
    /// Fingerprint of the cluster secrets (KEK, index key): equal on every node of a cluster.
    pub secrets_id: String,
    /// The backups this process took.
    pub backups: std::sync::Arc<backup::Backups>,
}

impl AdminConfig {
    pub fn new(token: &str, fault_injection: bool, secrets_id: String) -> Self {
        Self {
            token_sha256: Sha256::digest(token.as_bytes()).into(),
            fault_injection,
            secrets_id,
            backups: std::sync::Arc::default(),
        }
    }
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/admin")
            .route("/node", web::get().to(node))
            .route("/cluster", web::get().to(status))
            .route("/cluster/init", web::post().to(init))
            .route("/cluster/trust", web::post().to(trust))
            .route("/cluster/learners", web::post().to(add_learner))
            .route("/cluster/voters", web::post().to(promote))
            .route("/cluster/nodes/{id}", web::delete().to(remove))
            .route("/faults", web::put().to(faults))
            .route("/reindex", web::post().to(reindex))
            .route("/reindex", web::get().to(reindex_progress))
            .route("/snapshot", web::post().to(snapshot))
            .route("/backups", web::post().to(backup::create))
            .route("/backups", web::get().to(backup::list))
            .route("/backups/{id}", web::get().to(backup::one))
            .default_service(web::to(|| async {
                FhirError::new(ErrorCode::NotFound, "no such admin endpoint").error_response()
            })),
    );
}

/// A request that carried the node's admin token. Admin handlers take it as their first
/// argument, so none of them can run without the token (401 without one, 403 for a wrong one).
pub struct Administrator;

impl FromRequest for Administrator {
    type Error = AdminRefused;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let checked = match req.app_data::<web::Data<AppState>>() {
            Some(state) => authorize(req, state),
            None => Err(FhirError::internal("the admin API runs without application state")),
        };
        std::future::ready(checked.map(|()| Administrator).map_err(AdminRefused))
    }
}

/// A refused admin token: the OperationOutcome, with a bare `Bearer` challenge (the admin
/// token is not a SMART token, so no realm or `invalid_token` is named).
#[derive(Debug)]
pub struct AdminRefused(FhirError);

impl std::fmt::Display for AdminRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ResponseError for AdminRefused {
    fn status_code(&self) -> actix_web::http::StatusCode {
        self.0.status_code()
    }

    fn error_response(&self) -> HttpResponse {
        let mut r = self.0.error_response();
        if self.0.status() == 401 {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// The operator console's sign-in cookie: an expiry and an HMAC of it under the admin token's
/// digest, so it is good for this token only and only until it expires.
pub const CONSOLE_COOKIE: &str = "fl_console";
const CONSOLE_TTL_MS: i64 = 8 * 3600 * 1000;

fn console_mac(admin: &AdminConfig, expires_ms: i64) -> hmac::Hmac<Sha256> {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(&admin.token_sha256).unwrap_or_else(|_| unreachable!());
    mac.update(b"fhir-ledger console v1\0");
    mac.update(&expires_ms.to_be_bytes());
    mac
}

/// A console session for whoever just gave the admin token.
pub fn console_cookie(admin: &AdminConfig, secure: bool) -> actix_web::cookie::Cookie<'static> {
    use hmac::Mac;
    let expires = crate::fhir::now_ms() + CONSOLE_TTL_MS;
    let tag = hex::encode(console_mac(admin, expires).finalize().into_bytes());
    actix_web::cookie::Cookie::build(CONSOLE_COOKIE, format!("{expires}.{tag}"))
        .path("/")
        .http_only(true)
        // Strict: no other site's page can make the browser send it, so a session never
        // carries a forged request.
        .same_site(actix_web::cookie::SameSite::Strict)
        .secure(secure)
        .max_age(actix_web::cookie::time::Duration::milliseconds(CONSOLE_TTL_MS))
        .finish()
}

/// Whether the request carries a console session that is still good.
pub fn console_session(req: &HttpRequest, admin: &AdminConfig) -> bool {
    use hmac::Mac;
    let Some(cookie) = req.cookie(CONSOLE_COOKIE) else { return false };
    let Some((expires, tag)) = cookie.value().split_once('.') else { return false };
    let (Ok(expires), Ok(tag)) = (expires.parse::<i64>(), hex::decode(tag)) else { return false };
    expires > crate::fhir::now_ms() && console_mac(admin, expires).verify_slice(&tag).is_ok()
}

fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), FhirError> {
    // The console's session opens what an operator reads (GET), never what changes the node.
    let reading = matches!(*req.method(), actix_web::http::Method::GET | actix_web::http::Method::HEAD);
    if reading && req.headers().get(header::AUTHORIZATION).is_none() && console_session(req, &state.admin) {
        return Ok(());
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            FhirError::new(ErrorCode::Unauthenticated, "the admin API needs `Authorization: Bearer <admin token>`")
        })?;
    let digest: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
    if digest != state.admin.token_sha256 {
        return Err(FhirError::forbidden("wrong admin token"));
    }
    Ok(())
}

fn admin_error(e: AdminError) -> FhirError {
    match e {
        AdminError::NotLeader { .. } => FhirError::new(ErrorCode::NotLeader, e.to_string()),
        AdminError::Invalid(m) => FhirError::invalid(m),
        AdminError::Failed(m) => FhirError::unavailable(m),
    }
}

fn json<T: Serialize>(v: &T) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(serde_json::to_string_pretty(v).unwrap_or_default())
}

fn body<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> Result<T, FhirError> {
    serde_json::from_slice(bytes).map_err(|e| FhirError::invalid(format!("request body: {e}")))
}

/// This node's identity, as `cluster init` and `cluster join` collect it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NodeInfo {
    pub node_id: NodeId,
    #[serde(flatten)]
    pub node: Node,
    pub secrets_id: String,
    pub initialized: bool,
}

async fn node(_: Administrator, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let ledger = state.repo.ledger();
    // A member of a cluster. A node restored from another member's backup holds that
    // cluster's state but is not in its membership: it may join as a new member.
    let initialized =
        ledger.is_initialized().await.unwrap_or(false) && ledger.status().nodes.contains_key(&ledger.node_id());
    Ok(json(&NodeInfo {
        node_id: ledger.node_id(),
        node: ledger.this_node(),
        secrets_id: state.admin.secrets_id.clone(),
        initialized,
    }))
}

/// Rebuilds this node's search index from its state (every node derives its own index from
/// the same ledger, so this changes no results; it recovers from a suspected bug or applies
/// a changed index format without a restart).
async fn reindex(_: Administrator, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let search = state.search.clone();
    let started = std::time::Instant::now();
    let n = web::block(move || search.rebuild()).await.map_err(FhirError::internal)??;
    Ok(json(&serde_json::json!({ "resources": n, "millis": started.elapsed().as_millis() as u64 })))
}

/// `GET /admin/reindex`: how far a running rebuild is (what `cluster reindex` draws).
async fn reindex_progress(_: Administrator, state: web::Data<AppState>) -> HttpResponse {
    let progress = state.search.rebuild_progress();
    json(&serde_json::json!({
        "running": progress.is_some(),
        "done_leaves": progress.map(|p| p.0),
        "total_leaves": progress.map(|p| p.1),
    }))
}

/// `POST /admin/snapshot`: builds this node's Raft snapshot now and compacts its log, as the
/// snapshot policy does every `--snapshot-every` entries; answers once it is built.
async fn snapshot(_: Administrator, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let started = std::time::Instant::now();
    let index = state.repo.ledger().snapshot_now(SNAPSHOT_TIMEOUT).await.map_err(admin_error)?;
    Ok(json(&serde_json::json!({ "lastLogIndex": index, "millis": started.elapsed().as_millis() as u64 })))
}

/// How long `POST /admin/snapshot` waits for the build (minutes of state at most).
const SNAPSHOT_TIMEOUT: std::time::Duration = std::time::Duration::from_mins(10);

async fn status(_: Administrator, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    Ok(json(&state.repo.ledger().status()))
}

#[derive(Deserialize)]
struct InitBody {
    members: BTreeMap<NodeId, Node>,
}

async fn init(_: Administrator, state: web::Data<AppState>, bytes: web::Bytes) -> Result<HttpResponse, FhirError> {
    let b: InitBody = body(&bytes)?;
    state.repo.ledger().initialize(b.members).await.map_err(admin_error)?;
    Ok(json(&state.repo.ledger().status()))
}

#[derive(Deserialize)]
struct TrustBody {
    node_id: NodeId,
    public_key: String,
}

async fn trust(_: Administrator, state: web::Data<AppState>, bytes: web::Bytes) -> Result<HttpResponse, FhirError> {
    let b: TrustBody = body(&bytes)?;
    state.repo.ledger().trust(b.node_id, &b.public_key).map_err(admin_error)?;
    Ok(json(&serde_json::json!({ "trusted": b.node_id })))
}

#[derive(Deserialize)]
struct LearnerBody {
    node_id: NodeId,
    #[serde(flatten)]
    node: Node,
}

async fn add_learner(
    _: Administrator,
    state: web::Data<AppState>,
    bytes: web::Bytes,
) -> Result<HttpResponse, FhirError> {
    let b: LearnerBody = body(&bytes)?;
    state.repo.ledger().add_learner(b.node_id, b.node).await.map_err(admin_error)?;
    Ok(json(&state.repo.ledger().status()))
}

#[derive(Deserialize)]
struct VotersBody {
    node_ids: BTreeSet<NodeId>,
}

async fn promote(_: Administrator, state: web::Data<AppState>, bytes: web::Bytes) -> Result<HttpResponse, FhirError> {
    let b: VotersBody = body(&bytes)?;
    state.repo.ledger().promote(b.node_ids).await.map_err(admin_error)?;
    Ok(json(&state.repo.ledger().status()))
}

async fn remove(
    _: Administrator,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, FhirError> {
    let id: NodeId = path.parse().map_err(|_| FhirError::invalid(format!("node id {path:?} is not a number")))?;
    state.repo.ledger().remove(id).await.map_err(admin_error)?;
    Ok(json(&state.repo.ledger().status()))
}

#[derive(Deserialize)]
struct FaultsBody {
    /// Peers this node stops talking to (empty heals).
    isolate: BTreeSet<NodeId>,
}

async fn faults(_: Administrator, state: web::Data<AppState>, bytes: web::Bytes) -> Result<HttpResponse, FhirError> {
    if !state.admin.fault_injection {
        return Err(FhirError::forbidden("fault injection is off (serve --fault-injection)"));
    }
    let b: FaultsBody = body(&bytes)?;
    state.repo.ledger().set_isolated(b.isolate.clone());
    Ok(json(&serde_json::json!({ "isolated": b.isolate })))
}
