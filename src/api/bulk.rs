//! Bulk Data Access `$export` over HTTP (IG 2.0.0): the kick-off at system, Patient and
//! Group level (GET, or POST with Parameters), status polling, cancel and file download. Jobs
//! and their files are `crate::bulk`'s; this module is the door: every kick-off passes the
//! caller's scopes here and the guard in the runner, and only the kick-off's client (and
//! subject) may poll, download or cancel.

use std::collections::BTreeSet;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::authz;
use super::{base_url, read_barrier, AppState};
use crate::auth::scopes::Perm;
use crate::bulk::params::{self, Level};
use crate::bulk::{self, label, render, Job, Kind, State};
use crate::codec::parse_query;
use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::Json;

/// What a client should wait between polls; polling at under a quarter of it is answered 429.
const RETRY_AFTER_S: i64 = 2;

pub async fn system(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, FhirError> {
    kickoff(req, state, Level::System, body, false).await
}

pub async fn patient(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, FhirError> {
    kickoff(req, state, Level::Patient, body, false).await
}

pub async fn group(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, FhirError> {
    kickoff(req, state, Level::Group(path.into_inner()), body, false).await
}

/// `GET|POST /Group/{id}/$davinci-data-export` (PDex 2.1.0): the Group-level export of a
/// `$bulk-member-match` result, for the payer that asked for it, with
/// `exportType=hl7.fhir.us.davinci-pdex#payertopayer` and `_since` no earlier than five
/// years back. Each member's consent is evaluated again by the guard when the export runs.
pub async fn davinci_data_export(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, FhirError> {
    kickoff(req, state, Level::Group(path.into_inner()), body, true).await
}

/// What PDex's payer-to-payer export allows of a member's history.
const PAYER_TO_PAYER_YEARS_MS: i64 = 5 * 31_557_600_000;
const PAYER_TO_PAYER: &str = "hl7.fhir.us.davinci-pdex#payertopayer";

pub(super) fn respond_async(req: &HttpRequest) -> bool {
    req.headers()
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split([',', ';']).any(|p| p.trim() == "respond-async"))
}

/// A kick-off at `level`; `davinci` for PDex's `$davinci-data-export` (a payer-to-payer
/// export of the caller's own `$bulk-member-match` Group).
async fn kickoff(
    req: HttpRequest,
    state: web::Data<AppState>,
    level: Level,
    body: web::Payload,
    davinci: bool,
) -> Result<HttpResponse, FhirError> {
    // A GET kicks off with its query string alone; a POST may add a Parameters body.
    let body = (req.method() == actix_web::http::Method::POST).then_some(body);
    read_barrier(&req, &state.repo).await?;
    let caller = authz::caller(&req);
    let post = body.is_some();
    // A POST may carry its parameters in a Parameters body, in the query string (as
    // Medplum's client sends them, with no body), or both.
    let mut pairs = parse_query(req.query_string());
    if let Some(payload) = body {
        let bytes = super::read_body(&req, payload, state.max_body_bytes).await?;
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            pairs.extend(bulk::params::from_parameters(&super::parse_resource(&bytes)?)?);
        }
    }
    if davinci {
        for (_, v) in pairs.iter().filter(|(k, _)| k == "exportType") {
            if v != PAYER_TO_PAYER {
                return Err(FhirError::invalid(format!(
                    "$davinci-data-export exportType {v:?} is not supported (only {PAYER_TO_PAYER})"
                ))
                .at("exportType"));
            }
        }
        pairs.retain(|(k, _)| k != "exportType");
    }
    let lenient = super::prefer_lenient(&req);
    let (mut params, types) = {
        let idx = state.search.current()?;
        let known = |t: &str| idx.known_type(t).is_some() && !crate::auth::store::is_internal(t);
        let params = params::parse(&pairs, &level, post, lenient, known)?;
        for (t, q) in &params.type_filters {
            crate::search::type_filter(&state.search, &idx, t, q)?;
        }
        let comps = state.search.compartments();
        let types: Vec<String> = match &params.types {
            Some(t) => t.clone(),
            None => idx
                .type_names()
                .filter(|t| !crate::auth::store::is_internal(t))
                .filter(|t| level == Level::System || comps.patient_type(t))
                .map(str::to_string)
                .collect(),
        };
        (params, types)
    };
    // Scopes: every type named must be readable; without `_type`, at least one of the level's.
    let readable: Vec<&String> = types.iter().filter(|t| caller.require(t, Perm::R).is_ok()).collect();
    if params.types.is_some() && readable.len() < types.len() || readable.is_empty() {
        let t = types.iter().find(|t| caller.require(t, Perm::R).is_err()).map_or("any type", String::as_str);
        let e = FhirError::forbidden(format!("$export: the token's scopes do not grant reading {t}"));
        authz::denied(&state, &caller, "operation", caller.patient().map(str::to_string), &e);
        return Err(e);
    }
    if !respond_async(&req) {
        return Err(FhirError::invalid("$export runs asynchronously: send Prefer: respond-async").at("Prefer"));
    }
    let mut patients: Option<BTreeSet<String>> =
        (!params.patients.is_empty()).then(|| params.patients.iter().cloned().collect());
    if davinci {
        let earliest = crate::fhir::now_ms() - PAYER_TO_PAYER_YEARS_MS;
        params.since_ms = Some(params.since_ms.map_or(earliest, |s| s.max(earliest)));
    }
    if let Level::Group(gid) = &level {
        authz::require(&state, &caller, "Group", Perm::R, "operation")?;
        let group = if davinci {
            requesters_group(&state, &caller, gid)?
        } else {
            authz::check_visible(&state, &caller, "Group", gid, "operation")?;
            state.repo.read("Group", gid)?.parsed()?.unwrap_or(Json::Null)
        };
        let members: BTreeSet<String> = group
            .items(&["member"])
            .filter_map(|m| m.str_at(&["entity", "reference"]))
            .filter_map(|r| r.strip_prefix("Patient/"))
            .map(str::to_string)
            .collect();
        patients = Some(match patients {
            Some(asked) => asked.intersection(&members).cloned().collect(),
            None => members,
        });
    }
    let head = super::ledger::signed_head(&state.repo).await?;
    let request = format!("{}{}", base_url(&req), req.uri());
    let deidentify = match (&caller.deidentify, &caller.research) {
        (Some(rules), crate::consent::research::Standing::Study(study)) => {
            Some(bulk::Deidentify { study: study.clone(), name: rules.name.clone(), rules: rules.lines.clone() })
        }
        _ => None,
    };
    let job = Job {
        params,
        patients,
        deidentify,
        ..Job::accepted(bulk::owner_of(&caller), request, level, &head, state.auth.enabled)
    };
    let id = uuid::Uuid::new_v4().to_string();
    bulk::create(&state.search, &id, &job).await?;
    start(&state, &caller, &id);
    Ok(HttpResponse::Accepted()
        .insert_header((header::CONTENT_LOCATION, format!("{}/bulk/{id}", base_url(&req))))
        .finish())
}

/// A `$bulk-member-match` result Group, readable by the payer that asked for it (its
/// `managingEntity`) whatever its members' consents say now: the runner's guard decides
/// member by member. Any other Group is the 404 of one that does not exist.
fn requesters_group(state: &AppState, caller: &crate::auth::Caller, gid: &str) -> Result<Json, FhirError> {
    let missing = || FhirError::not_found(&format!("Group/{gid}"));
    let group = state.repo.read("Group", gid).map_err(|_| missing())?.parsed()?.ok_or_else(missing)?;
    let is_match = group
        .items(&["code", "coding"])
        .any(|c| c.str_at(&["system"]) == Some(crate::payer::MATCH_RESULT) && c.str_at(&["code"]) == Some("match"));
    let manager = group.str_at(&["managingEntity", "reference"]);
    if !is_match || !(caller.unrestricted || manager.is_some() && manager == caller.client_actor.as_deref()) {
        return Err(missing());
    }
    Ok(group)
}

/// Records an asynchronous operation `operation` as a job owned by `caller`: finished with
/// `result` when given (its status URL then answers it), else accepted for a runner
/// ([`bulk::spawn_operation`]); returns the job id.
pub(super) async fn operation_job(
    req: &HttpRequest,
    state: &AppState,
    caller: &crate::auth::Caller,
    operation: &str,
    result: Option<serde_json::Value>,
) -> Result<String, FhirError> {
    let head = super::ledger::signed_head(&state.repo).await?;
    let request = format!("{}{}", base_url(req), req.uri());
    let mut job = Job::accepted(bulk::owner_of(caller), request, Level::System, &head, state.auth.enabled);
    job.operation = Some(operation.to_string());
    if result.is_some() {
        job.state = State::Complete;
        job.completed_ms = Some(job.created_ms);
        job.result = result;
    }
    let id = uuid::Uuid::new_v4().to_string();
    bulk::create(&state.search, &id, &job).await?;
    Ok(id)
}

/// Starts (or restarts) the runner of job `id` on this node, as `caller`.
fn start(state: &web::Data<AppState>, caller: &std::sync::Arc<crate::auth::Caller>, id: &str) {
    let log = state.clone();
    let on_shown: bulk::OnShown =
        std::sync::Arc::new(move |c, shown, d| authz::disclosed(&log, c, "operation", shown, &d));
    bulk::spawn(
        state.search.clone(),
        state.auth.clone(),
        state.exports.clone(),
        caller.clone(),
        id.to_string(),
        on_shown,
    );
}

/// The job, if it exists, has not expired and belongs to the caller (anyone else gets the
/// 404 of a job that does not exist).
fn owned_job(state: &AppState, req: &HttpRequest, id: &str) -> Result<Job, FhirError> {
    let caller = authz::caller(req);
    let missing = || FhirError::not_found(&format!("export {id}"));
    let (job, _) = bulk::get_job(&state.search, id)?.ok_or_else(missing)?;
    if job.owner != bulk::owner_of(&caller) || job.expired(crate::fhir::now_ms()) {
        return Err(missing());
    }
    Ok(job)
}

/// How long a poll of a job running on this node waits for it to end before answering 202:
/// a client that follows `Retry-After` learns that a short export is done when it is, not
/// up to `Retry-After` later (long polling; a poll answered by another node does not wait).
const HOLD: std::time::Duration = std::time::Duration::from_secs(5);

/// `job` as it is once it ended, or after [`HOLD`] if it still runs here.
async fn held(state: &AppState, req: &HttpRequest, id: &str, job: Job) -> Result<Job, FhirError> {
    if state.exports.progress(id).is_none() {
        return Ok(job);
    }
    let until = tokio::time::Instant::now() + HOLD;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // The runner leaves once the job's outcome is recorded (or it failed to record one).
        if state.exports.progress(id).is_none() {
            break;
        }
    }
    owned_job(state, req, id)
}

/// `GET /bulk/{id}`: 202 with `X-Progress` while it runs, 200 with the manifest when done.
pub async fn status(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    read_barrier(&req, &state.repo).await?;
    let id = path.into_inner();
    let mut job = owned_job(&state, &req, &id)?;
    if job.state == State::Accepted {
        if !state.exports.poll_ok(&id, crate::fhir::now_ms(), RETRY_AFTER_S * 250) {
            use actix_web::ResponseError;
            let mut r =
                FhirError::new(ErrorCode::TooManyRequests, format!("poll every {RETRY_AFTER_S} s")).error_response();
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(RETRY_AFTER_S));
            return Ok(r);
        }
        job = held(&state, &req, &id, job).await?;
    }
    let now = crate::fhir::now_ms();
    match job.state {
        State::Accepted => {
            let progress = if let Some(p) = state.exports.progress(&id) {
                use std::sync::atomic::Ordering::Relaxed;
                if let Some(op) = &job.operation {
                    format!("{op} running")
                } else {
                    format!("{} of {} resources checked", p.done.load(Relaxed), p.total.load(Relaxed))
                }
            } else if let Some(op) = job.operation.as_deref().filter(|_| now - job.heartbeat_ms > bulk::TAKEOVER_MS) {
                // An operation is not run twice: its runner is gone, and it says so.
                return Err(FhirError::new(
                    ErrorCode::Unprocessable,
                    format!("{op} {id} was interrupted (its node stopped) before it recorded an outcome; an import is one transaction, applied whole or not at all: look for its Provenance before kicking it off again"),
                ));
            } else {
                // An export's runner is gone (a restart, a node lost): this node takes it over.
                if job.operation.is_none() && now - job.heartbeat_ms > bulk::TAKEOVER_MS {
                    start(&state, &authz::caller(&req), &id);
                }
                "in progress".to_string()
            };
            Ok(HttpResponse::Accepted()
                .insert_header(("x-progress", progress))
                .insert_header((header::RETRY_AFTER, RETRY_AFTER_S.to_string()))
                .finish())
        }
        State::Failed => {
            let why = job.error.as_deref().unwrap_or("unknown error");
            Err(match &job.operation {
                // An operation's failure is a refusal of what it was asked to do.
                Some(op) => FhirError::new(ErrorCode::Unprocessable, format!("{op} {id} was refused: {why}")),
                None => FhirError::internal(format!("export {id} failed: {why}")),
            })
        }
        State::Complete => {
            let expires = job.completed_ms.unwrap_or(now) + bulk::EXPIRES_MS;
            if let Some(result) = &job.result {
                return Ok(HttpResponse::Ok()
                    .insert_header((header::EXPIRES, crate::fhir::http_date(expires)))
                    .content_type(crate::error::FHIR_JSON)
                    .body(result.to_string()));
            }
            let manifest = manifest(&job, &id, &base_url(&req));
            Ok(HttpResponse::Ok()
                .insert_header((header::EXPIRES, crate::fhir::http_date(expires)))
                .content_type("application/json")
                .body(manifest.to_string()))
        }
    }
}

/// The completion manifest, with the trust label in its `extension`.
fn manifest(job: &Job, id: &str, base: &str) -> serde_json::Value {
    use serde_json::json;
    let url = |name: &str| format!("{base}/bulk/{id}/{name}");
    let items = |kind: Kind| -> Vec<serde_json::Value> {
        job.files
            .iter()
            .filter(|f| f.kind == kind)
            .map(|f| {
                json!({"type": f.rtype, "url": url(&f.name), "count": f.count,
                       "extension": {"urn:fhir-ledger:bulk:sha256": f.sha256, "urn:fhir-ledger:bulk:bytes": f.bytes}})
            })
            .collect()
    };
    let mut trust = label::document(job, id);
    trust["url"] = json!(url(label::FILE));
    // Line for line beside each output and deletion file: leaf, salt and inclusion proof.
    let proofs: Vec<serde_json::Value> = job
        .files
        .iter()
        .filter(|f| f.kind != Kind::Error)
        .map(|f| json!({"for": f.name, "url": url(&render::proofs_name(&f.name))}))
        .collect();
    trust["proofs"] = json!(proofs);
    let mut m = json!({
        "transactionTime": crate::fhir::instant(job.transaction_time_ms),
        "request": job.request,
        "requiresAccessToken": job.requires_token,
        "output": items(Kind::Output),
        "deleted": items(Kind::Deleted),
        "error": items(Kind::Error),
    });
    // A de-identified export's bytes trace to no leaf: it carries no trust label.
    if job.deidentify.is_none() {
        m["extension"] = json!({label::EXTENSION: trust});
    }
    m
}

/// `DELETE /bulk/{id}`: cancels a running export or removes a finished one.
pub async fn cancel(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    read_barrier(&req, &state.repo).await?;
    let id = path.into_inner();
    let job = owned_job(&state, &req, &id)?;
    state.exports.cancel(&id);
    bulk::delete(&state.search, &id, &job).await?;
    state.exports.unspool(&id);
    Ok(HttpResponse::Accepted().finish())
}

/// `GET /bulk/{id}/{file}`: one output, deletion or error file (made again from the ledger
/// and streamed), or the trust label.
pub async fn file(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    read_barrier(&req, &state.repo).await?;
    let (id, name) = path.into_inner();
    let job = owned_job(&state, &req, &id)?;
    if job.state != State::Complete {
        return Err(FhirError::not_found(&format!("export {id} file {name}")));
    }
    if name == label::FILE {
        return Ok(HttpResponse::Ok().content_type("application/json").body(label::document(&job, &id).to_string()));
    }
    let proofs = job.files.iter().find(|f| f.kind != Kind::Error && render::proofs_name(&f.name) == name);
    let (info, is_proofs) = match proofs {
        Some(f) => (f.clone(), true),
        None => (
            job.files
                .iter()
                .find(|f| f.name == name)
                .cloned()
                .ok_or_else(|| FhirError::not_found(&format!("export {id} file {name}")))?,
            false,
        ),
    };
    let part = bulk::get_part(&state.search, &info.part)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(4);
    // The file as the job made it, when this process ran the job; otherwise made again.
    let spooled = state.exports.spooled(&id, &name);
    let engine = state.search.clone();
    let deid = bulk::Deid::of(&job, &state.auth);
    if deid.is_some() && is_proofs {
        return Err(FhirError::not_found(&format!("export {id} file {name}")));
    }
    tokio::task::spawn_blocking(move || {
        let err = tx.clone();
        let mut sink = |b: &[u8]| {
            tx.blocking_send(Ok(web::Bytes::copy_from_slice(b))).map_err(|_| FhirError::internal("the client left"))
        };
        let r = if let Some(file) = spooled {
            send_spooled(file, &tx)
        } else if is_proofs {
            render::write_proofs(&engine, &job, &part, &mut sink)
        } else {
            render::write(&engine, &job, &info, &part, deid.as_ref(), &mut sink)
        };
        if let Err(e) = r {
            tracing::warn!("export {id} file {name}: {:?}", e.issues.first().map(|i| &i.diagnostics));
            let _ = err.blocking_send(Err(std::io::Error::other("export file failed")));
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Ok(HttpResponse::Ok().content_type("application/fhir+ndjson").streaming(body))
}

/// A spooled file's chunks to the response, each handed over without a copy.
fn send_spooled(
    mut file: bulk::spool::SpoolReader,
    tx: &tokio::sync::mpsc::Sender<Result<web::Bytes, std::io::Error>>,
) -> Result<(), FhirError> {
    while let Some(plain) = file.next_chunk().map_err(FhirError::internal)? {
        tx.blocking_send(Ok(web::Bytes::from_owner(plain))).map_err(|_| FhirError::internal("the client left"))?;
    }
    Ok(())
}
