//! What operators and orchestrators call: `GET /metrics` (Prometheus text, admin token),
//! `GET /health/live` and `GET /health/ready`, and the middleware every request passes first:
//! a request id (`X-Request-Id`, accepted or made, echoed, in each log line of the request),
//! one log line and the request metrics.

use std::time::{Duration, Instant};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpResponse};
use tracing::Instrument;

use super::admin::Administrator;
use super::AppState;
use crate::error::FhirError;
use crate::telemetry;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A follower that has not heard from a leader for this long is not ready: its reads could
/// be that stale.
const READY_STALENESS: Duration = Duration::from_secs(10);

/// Operators' endpoints: they reach no resource, so they stand outside the FHIR door.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics))
        .route("/health/live", web::get().to(live))
        .route("/health/ready", web::get().to(ready));
}

/// The request's id, in the request's extensions for handlers that name it.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// A caller's id is kept when it is short and plain (it ends up in log lines and headers);
/// otherwise the server makes one.
fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=128).contains(&v.len())
                && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        })
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_string)
}

/// The outermost middleware: request id, span, log line, metrics.
pub async fn middleware(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let id = request_id(&req);
    req.extensions_mut().insert(RequestId(id.clone()));
    let method = req.method().clone();
    let span = tracing::info_span!("request", request_id = %id);
    let started = Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    let elapsed = started.elapsed();
    let (interaction, rtype) = classify(&res, &method);
    let status = res.status().as_u16();
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    metrics::counter!(telemetry::HTTP_REQUESTS, "interaction" => interaction, "type" => rtype.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!(telemetry::HTTP_DURATION, "interaction" => interaction, "type" => rtype).record(elapsed);
    // The token endpoint counts its own refusals by OAuth error; the rest by HTTP's reason.
    if matches!(status, 401 | 403) && interaction != "auth" {
        let reason = if status == 401 { "unauthenticated" } else { "forbidden" };
        metrics::counter!(telemetry::AUTH_REFUSALS, "reason" => reason).increment(1);
    }
    span.in_scope(|| {
        tracing::info!(
            method = %method,
            route = res.request().match_pattern().as_deref().unwrap_or("(none)"),
            status,
            ms = (elapsed.as_secs_f64() * 1e6).round() / 1e3,
            "answered"
        );
    });
    Ok(res.map_into_boxed_body())
}

/// The interaction a matched route serves (FHIR's names where FHIR has one; otherwise the
/// area: `auth`, `admin`, `ledger`, ...) and the resource type it concerned, if any.
fn classify<B>(res: &ServiceResponse<B>, method: &Method) -> (&'static str, String) {
    let req = res.request();
    let is_type = |t: &str| req.app_data::<web::Data<AppState>>().is_some_and(|s| s.repo.profiles.is_resource_type(t));
    // A request refused at the FHIR door was never routed; actix then names the first pattern
    // its path fits, the preflight's catch-all.
    let routed = req.match_pattern().filter(|p| !p.is_empty() && p != "/{tail:.*}");
    let (pattern, rtype) = match routed {
        Some(p) => {
            let t = req.match_info().get("type").filter(|t| is_type(t));
            let rtype = t.unwrap_or(if p.contains("{type") { "unknown" } else { "-" }).to_string();
            (p, rtype)
        }
        // Refused at the FHIR door, before its routes were matched: the path's shape.
        None => shape(req.path(), &is_type),
    };
    let m = method.as_str();
    let interaction = match (pattern.as_str(), m) {
        (_, "OPTIONS") => "preflight",
        ("/metadata", _) => "capabilities",
        ("/", "POST") => "batch-transaction",
        ("/" | "/_search", _) => "search-system",
        ("/_history", _) => "history-system",
        ("/{type}", "GET") | ("/{type}/_search", _) => "search-type",
        ("/{type}", "POST") => "create",
        ("/{type}", "PUT") => "conditional-update",
        ("/{type}", "DELETE") => "conditional-delete",
        ("/{type}/_history", _) => "history-type",
        ("/{type}/{id}", "GET") => "read",
        ("/{type}/{id}", "PUT") => "update",
        ("/{type}/{id}", "PATCH") => "patch",
        ("/{type}/{id}", "DELETE") => "delete",
        ("/{type}/{id}/_history", _) => "history-instance",
        ("/{type}/{id}/_history/{vid}", _) => "vread",
        ("/{compartment}/{id}/{type}", _) => "search-compartment",
        ("/{type}/{id}/{op}" | "/{type}/{id}/_history/{vid}/{op}", _) => "operation",
        (p, _) if p.contains('$') => "operation",
        (p, _) if p.starts_with("/ledger") => "ledger",
        (p, _) if p.starts_with("/auth") || p.starts_with("/.well-known") => "auth",
        (p, _) if p.starts_with("/admin") => "admin",
        (p, _) if p.starts_with("/portal") => "portal",
        (p, _) if p.starts_with("/epcis") || p.starts_with("/01/") => "epcis",
        (p, _) if p.starts_with("/bulk") => "bulk",
        (p, _) if p.starts_with("/health") || p == "/metrics" => "monitoring",
        _ => "other",
    };
    (interaction, rtype)
}

/// The route pattern a path has (`/Patient/123` -> `/{type}/{id}`) and its resource type, for
/// a request answered before routing; ids never leave this function.
fn shape(path: &str, is_type: &dyn Fn(&str) -> bool) -> (String, String) {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let mut rtype = "-".to_string();
    let mut out = Vec::with_capacity(segs.len());
    for (i, s) in segs.iter().enumerate() {
        let literal = s.starts_with('_') || (i == 0 && !is_type(s));
        let part = match (i, *s) {
            (_, s) if s.starts_with('$') => s.to_string(),
            (_, s) if literal => s.to_string(),
            (0, s) => {
                rtype = s.to_string();
                "{type}".into()
            }
            (2, s) if is_type(s) => {
                out[0] = "{compartment}".to_string();
                rtype = s.to_string();
                "{type}".into()
            }
            (3, _) => "{vid}".into(),
            _ => "{id}".into(),
        };
        out.push(part);
    }
    (format!("/{}", out.join("/")), rtype)
}

/// `GET /metrics`: the process's metrics, with the node's Raft, ledger and queue gauges read
/// at the moment of the scrape. Operators only: the admin token.
pub async fn metrics(_: Administrator, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let text =
        render(&state).await.ok_or_else(|| FhirError::not_found("/metrics (this node runs with --no-metrics)"))?;
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(text))
}

/// Sets the gauges read at scrape time and renders every metric in Prometheus text (None when
/// the node records none).
pub async fn render(state: &AppState) -> Option<String> {
    let handle = telemetry::installed()?;
    let ledger = state.repo.ledger();
    let status = ledger.status();
    metrics::gauge!("fhir_ledger_raft_term").set(status.term as f64);
    metrics::gauge!("fhir_ledger_raft_leader_id").set(status.leader.map_or(-1.0, |l| l as f64));
    metrics::gauge!("fhir_ledger_raft_is_leader").set(f64::from(u8::from(status.leader == Some(status.node_id))));
    metrics::gauge!("fhir_ledger_raft_last_log_index").set(status.last_log_index.unwrap_or(0) as f64);
    metrics::gauge!("fhir_ledger_raft_applied_index").set(status.last_applied.unwrap_or(0) as f64);
    metrics::gauge!("fhir_ledger_raft_snapshot_index").set(status.snapshot.unwrap_or(0) as f64);
    metrics::gauge!("fhir_ledger_raft_refused_rpcs").set(status.refused_rpcs as f64);
    metrics::gauge!("fhir_ledger_raft_voters").set(status.voters.len() as f64);
    if let Some(ms) = status.staleness_ms {
        metrics::gauge!("fhir_ledger_raft_staleness_seconds").set(ms as f64 / 1e3);
    }
    for (follower, r) in status.replication.iter().flatten() {
        metrics::gauge!("fhir_ledger_raft_replication_lag_entries", "follower" => follower.to_string())
            .set(r.lag.unwrap_or(0) as f64);
    }
    let view = ledger.view();
    metrics::gauge!("fhir_ledger_ledger_leaves").set(view.leaf_count().unwrap_or(0) as f64);
    let dir = ledger.dir().to_path_buf();
    let bytes = web::block(move || dir_bytes(&dir)).await.unwrap_or(0);
    metrics::gauge!("fhir_ledger_ledger_disk_bytes").set(bytes as f64);
    metrics::gauge!("fhir_ledger_search_index_folded_leaves").set(state.search.folded() as f64);
    state.repo.body_cache_lookups().publish("bodies");
    state.search.doc_cache_lookups().publish("documents");
    Some(handle.render())
}

/// Bytes of the files under `dir` (the ledger's stores, snapshots and segments).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// `GET /health/live`: the process answers.
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(r#"{"status":"live"}"#)
}

/// `GET /health/ready`: this node may take traffic: it knows a leader, is not loading a
/// snapshot, and (a follower) heard from that leader within the last 10 s. 503 with the
/// reason otherwise, so a load balancer sends requests elsewhere.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    let status = state.repo.ledger().status();
    let not_ready = if status.leader.is_none() {
        Some("no leader is known".to_string())
    } else if status.receiving_snapshot_bytes.is_some() {
        Some("loading a snapshot".to_string())
    } else if status.leader != Some(status.node_id)
        && status.staleness_ms.is_none_or(|ms| Duration::from_millis(ms) > READY_STALENESS)
    {
        Some(format!("no word from leader {} for over {} s", status.leader.unwrap_or(0), READY_STALENESS.as_secs()))
    } else {
        None
    };
    let body = |s: &str, reason: Option<&str>| {
        serde_json::json!({
            "status": s, "reason": reason, "node": status.node_id, "leader": status.leader,
            "applied": status.last_applied,
        })
        .to_string()
    };
    match not_ready {
        None => HttpResponse::Ok().content_type("application/json").body(body("ready", None)),
        Some(r) => {
            HttpResponse::ServiceUnavailable().content_type("application/json").body(body("unavailable", Some(&r)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_answered_before_routing_keeps_its_shape_not_its_ids() {
        let is_type = |t: &str| matches!(t, "Patient" | "Observation");
        for (path, pattern, rtype) in [
            ("/Patient/123", "/{type}/{id}", "Patient"),
            ("/Patient", "/{type}", "Patient"),
            ("/Patient/_search", "/{type}/_search", "Patient"),
            ("/Patient/1/_history/2", "/{type}/{id}/_history/{vid}", "Patient"),
            ("/Patient/1/Observation", "/{compartment}/{id}/{type}", "Observation"),
            ("/Patient/1/$everything", "/{type}/{id}/$everything", "Patient"),
            ("/ledger/proof", "/ledger/{id}", "-"),
            ("/", "/", "-"),
        ] {
            assert_eq!(shape(path, &is_type), (pattern.to_string(), rtype.to_string()), "{path}");
        }
    }
}
