//! Bulk Data `$import`, ping-and-pull: a client names a finished export of a trusted peer
//! (`manifestUrl`, the export's status URL) and this server pulls it: the peer's access token
//! for this server's own client there, the download (held in memory, no plaintext on disk),
//! the trust-label check against the peer's node keys, the consistency of its head with the
//! last one imported from that peer, then one transaction as the caller (the caller's scopes
//! and policy decide every entry) with a PDex transmitter Provenance. Any failed check refuses
//! the whole import. It runs as an async job at `/bulk/{job}`.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use sha2::{Digest, Sha256};

use super::search::Who;
use super::{authz, read_barrier, AppState};
use crate::auth::scopes::Perm;
use crate::auth::Caller;
use crate::config::TrustedPeer;
use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::Json;
use crate::repo::System;
use crate::transfer;

/// The most an import downloads, all files together.
const IMPORT_LIMIT: u64 = 1 << 30;
/// The last tree head imported from each peer (`id`: SHA-256 of its name).
const PEER_HEAD: &str = "_transfer.PeerHead";
const FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];

fn refused(why: impl std::fmt::Display) -> FhirError {
    FhirError::new(ErrorCode::Unprocessable, why.to_string())
}

/// What the kick-off asked for: the manifest URL and the peer it belongs to.
fn ask<'a>(state: &'a AppState, params: &Json) -> Result<(String, &'a TrustedPeer), FhirError> {
    let mut url = None;
    let mut peer_name = None;
    for (i, p) in params.items(&["parameter"]).enumerate() {
        let name = p.str_at(&["name"]).unwrap_or_default();
        let value = ["valueUrl", "valueUri", "valueString", "valueCode"].iter().find_map(|k| p.str_at(&[k]));
        let at = format!("Parameters.parameter[{i}]");
        match (name, value) {
            ("manifestUrl", Some(v)) => url = Some(v.to_string()),
            ("peer", Some(v)) => peer_name = Some(v.to_string()),
            ("inputFormat", Some(v)) if FORMATS.contains(&v) => {}
            ("inputFormat", Some(v)) => {
                return Err(
                    FhirError::invalid(format!("$import inputFormat {v:?}: only application/fhir+ndjson")).at(at)
                )
            }
            _ => {
                return Err(FhirError::invalid(format!(
                    "$import parameter {name:?} is not supported (manifestUrl, peer, inputFormat)"
                ))
                .at(at))
            }
        }
    }
    let url = url.ok_or_else(|| FhirError::invalid("$import needs manifestUrl").at("manifestUrl"))?;
    // Only a configured peer's own URLs are fetched: the server pulls from no one else.
    let at_peer = |p: &&TrustedPeer| url.starts_with(&format!("{}/", p.base_url.trim_end_matches('/')));
    let peer = match &peer_name {
        Some(n) => state.trusted_peers.iter().find(|p| &p.name == n),
        None => state.trusted_peers.iter().find(at_peer),
    };
    let peer = peer.filter(at_peer).ok_or_else(|| {
        refused(format!("$import: {url} is not an export of a [[trusted_peer]] of this server")).at("manifestUrl")
    })?;
    Ok((url, peer))
}

pub async fn kickoff(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, FhirError> {
    read_barrier(&req, &state.repo).await?;
    let caller = authz::caller(&req);
    // Every import writes a Provenance; each entry is checked again when it is planned.
    authz::require(&state, &caller, "Provenance", Perm::C, "operation")?;
    if !super::bulk::respond_async(&req) {
        return Err(FhirError::invalid("$import runs asynchronously: send Prefer: respond-async").at("Prefer"));
    }
    let body = super::read_body(&req, payload, state.max_body_bytes).await?;
    let params = super::parse_resource(&body)?;
    if params.str_at(&["resourceType"]) != Some("Parameters") {
        return Err(FhirError::invalid("$import takes a Parameters resource").at("resourceType"));
    }
    let (url, peer) = ask(&state, &params)?;
    let peer = peer.clone();
    let id = super::bulk::operation_job(&req, &state, &caller, "$import", None).await?;
    let (engine, exports, st) = (state.search.clone(), state.exports.clone(), state.clone());
    let own_base = super::base_url(&req);
    let status = format!("{own_base}/bulk/{id}");
    crate::bulk::spawn_operation(engine, exports, id, async move { pull(&st, &caller, &peer, &url, &own_base).await });
    Ok(HttpResponse::Accepted().insert_header((header::CONTENT_LOCATION, status)).finish())
}

fn peer_head_id(peer: &TrustedPeer) -> String {
    hex::encode(Sha256::digest(peer.name.as_bytes()))
}

async fn pull(
    state: &AppState,
    caller: &Caller,
    peer: &TrustedPeer,
    url: &str,
    own_base: &str,
) -> Result<serde_json::Value, FhirError> {
    let (keys, quorum) = transfer::peer_keys(peer).map_err(|e| refused(format!("{e:#}")))?;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_mins(10))
        .build()
        .map_err(FhirError::internal)?;
    let base = peer.base_url.trim_end_matches('/').to_string();
    let token = transfer::peer_token(&http, peer).await.map_err(|e| refused(format!("{e:#}")))?;
    let files = transfer::fetch::download_to_memory(&http, url, Some(&token), IMPORT_LIMIT)
        .await
        .map_err(|e| refused(format!("downloading the export: {e:#}")))?;
    let verified = tokio::task::spawn_blocking(move || transfer::verify(&files, &keys, quorum).map(|v| (v, keys)))
        .await
        .map_err(FhirError::internal)?;
    let (verified, keys) = verified.map_err(|e| refused(format!("{e:#}")))?;
    let head_id = peer_head_id(peer);
    let known: Option<(serde_json::Value, u64)> = crate::auth::store::get(&state.repo, PEER_HEAD, &head_id)?;
    if let Some((known, _)) = &known {
        transfer::consistent(&http, &base, known, &verified.head, &keys, quorum)
            .await
            .map_err(|e| refused(format!("{e:#}")))?;
    }
    // Written on every core, off the request's worker.
    let name = peer.name.clone();
    let (verified, bundle) = tokio::task::spawn_blocking(move || {
        let bundle = transfer::import_bundle(&verified, &base, &name);
        (verified, bundle)
    })
    .await
    .map_err(FhirError::internal)?;
    let bundle = bundle.map_err(|e| refused(format!("{e:#}")))?;
    let bundle = crate::fhir::json::parse(bundle.as_bytes(), usize::MAX).map_err(FhirError::internal)?;
    let who = Who { state, caller };
    let written = super::bundle::run_transaction(&who, bundle, own_base).await?;
    let head = transfer::head_parameters(&verified.head);
    let head_json = crate::auth::store::to_json(&head)?;
    state
        .repo
        .commit(&System::new("fhir-ledger/import"), |plan| plan.put(PEER_HEAD, &head_id, &head_json, None).map(|_| ()))
        .await?;
    let provenance = written.iter().rev().find(|s| s.rtype == "Provenance").map(|s| format!("Provenance/{}", s.id));
    let imported = written.len().saturating_sub(1);
    Ok(serde_json::json!({
        "transactionTime": crate::fhir::instant(crate::fhir::now_ms()),
        "request": url,
        "output": [{"type": "Provenance", "url": provenance, "count": 1}],
        "error": [],
        "extension": {
            "urn:fhir-ledger:import:resources": imported,
            "urn:fhir-ledger:import:provenance": provenance,
            "urn:fhir-ledger:import:source-head": head,
        }
    }))
}
