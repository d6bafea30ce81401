//! Trial data locks over HTTP.
//!
//! `POST /ResearchStudy/{id}/$lock` records a lock of what the study may see of its enrolled
//! subjects (a `List` and a `Provenance` carrying the locking node's signature and the signed
//! tree head, in one commit) and answers the lock file to keep.
//! `GET /ResearchStudy/{id}/$verify-lock` checks the study's latest lock on the ledger;
//! `POST` checks a kept lock file instead (a ledger restored from an old backup loses the lock
//! List, not the sponsor's copy). The answer lists every amendment since, with who, when and
//! why, and carries the current head, the consistency proof and each amendment's inclusion
//! proof, so `fhir-ledger verify lock` repeats the checks offline.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use consensus::merkle::Hash;
use serde_json::{json, Value};

use super::{authz, json_response, read_barrier, AppState, Format};
use crate::auth::Caller;
use crate::codec::{b64, unb64};
use crate::consent::research::Standing;
use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::Json;
use crate::research::lock;

/// On a lock's Provenance: the signed tree head (compact JSON of its Parameters parts).
pub const HEAD_EXTENSION: &str = "urn:fhir-ledger:StructureDefinition/lock-tree-head";
/// What `$verify-lock` says of a locked version whose subject was erased since.
const ERASED: &str = "erased (crypto-shredded) at the subject's request: the locked version stays in the ledger as a \
                      proof without content";

/// On a lock's Provenance: the leaf table (each entry's leaf and leaf hash).
pub const LEAVES_EXTENSION: &str = "urn:fhir-ledger:StructureDefinition/lock-leaves";

/// The caller a lock is taken as: the study's team member reading for it, or (authorization
/// off) the study itself.
fn locker(caller: &Arc<Caller>, study: &str) -> Result<Arc<Caller>, FhirError> {
    if caller.unrestricted {
        return Ok(Arc::new(Caller::for_study(study)));
    }
    match &caller.research {
        Standing::Study(s) if s == study => Ok(caller.clone()),
        _ => Err(FhirError::forbidden(format!(
            "a data lock of ResearchStudy/{study} is taken by its team, stating X-Purpose-Of-Use: HRESCH for it"
        ))),
    }
}

fn study_visible(state: &AppState, caller: &Caller, study: &str) -> Result<(), FhirError> {
    if !crate::fhir::is_valid_id(study) || state.repo.read("ResearchStudy", study).is_err() {
        return Err(FhirError::not_found(&format!("ResearchStudy/{study}")));
    }
    authz::check_visible(state, caller, "ResearchStudy", study, "operation").map(|_| ())
}

/// What every study operation starts with: the read barrier, the caller, the format, and a
/// study the caller may see (else the 404 of one that does not exist).
async fn study_request(req: &HttpRequest, state: &AppState, study: &str) -> Result<(Arc<Caller>, Format), FhirError> {
    read_barrier(req, &state.repo).await?;
    let caller = authz::caller(req);
    let f = Format::negotiate(req)?;
    study_visible(state, &caller, study)?;
    Ok((caller, f))
}

pub async fn lock(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (req, state, study) = (&req, &**state, path.as_str());
    let (caller, f) = study_request(req, state, study).await?;
    let f = &f;
    let as_study = locker(&caller, study)?;
    let access = state.auth.access(&as_study).ok_or_else(|| FhirError::internal("a study caller is restricted"))?;
    let entries = lock::select(&state.search, &access, study)?;
    let head = super::ledger::signed_head(&state.repo).await?;
    let head_parts = Json::Array(head.to_parts()).to_serde();
    let now = crate::fhir::now_ms();
    let who = caller.user.as_ref().map(|(t, id)| format!("{t}/{id}"));
    let list_id = uuid::Uuid::new_v4().to_string();
    let mut list = lock::list(study, &entries, who.as_deref(), now);
    list["id"] = json!(list_id);
    let node = state.repo.node_id().to_string();
    let (list_bytes, table) = (lock::list_bytes(&list), lock::leaf_table(&entries));
    let jws = lock::sign(&lock::statement(study, &list_bytes, &table, &head_parts), state.repo.signer(), &node);
    let provenance = provenance(&list_id, who.as_deref(), &node, &head_parts, &table, &jws, now);
    let (list_json, provenance) = (Json::from(list.clone()), Json::from(provenance));
    crate::search::validate::validate(&state.search, "List", &list_json, None)?;
    crate::search::validate::validate(&state.search, "Provenance", &provenance, None)?;
    let actor = format!("{} $lock", caller.actor());
    state
        .repo
        .commit(&crate::repo::System::new(actor), |plan| {
            plan.put_new("List", &list_id, &list_json)?;
            plan.put_new("Provenance", &uuid::Uuid::new_v4().to_string(), &provenance).map(|_| ())
        })
        .await?;
    let multiproof = lock::multiproof(&state.search, &entries, head.size)?;
    let file = lock::file(study, &list_bytes, &table, &head_parts, &jws, &multiproof);
    Ok(json_response(200, &Json::from(file), f))
}

fn provenance(list_id: &str, who: Option<&str>, node: &str, head: &Value, table: &[u8], jws: &str, now: i64) -> Value {
    let mut agents = vec![
        json!({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "verifier"}]},
                                 "who": {"display": format!("fhir-ledger node {node}")}}),
    ];
    if let Some(w) = who {
        agents.insert(0, json!({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}]},
                                "who": {"reference": w}}));
    }
    json!({
        "resourceType": "Provenance",
        "target": [{"reference": format!("List/{list_id}")}],
        "recorded": crate::fhir::instant(now),
        "reason": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]}],
        "activity": {"coding": [{"system": lock::CODE_SYSTEM, "code": lock::DATA_LOCK, "display": "trial data lock"}]},
        "agent": agents,
        "extension": [{"url": HEAD_EXTENSION, "valueString": head.to_string()},
                      {"url": LEAVES_EXTENSION, "valueBase64Binary": b64(table)}],
        "signature": [{
            "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5", "display": "Verification Signature"}],
            "when": crate::fhir::instant(now),
            "who": {"display": format!("fhir-ledger node {node}")},
            "sigFormat": "application/jose",
            "data": b64(jws.as_bytes()),
        }],
    })
}

/// The study's latest lock on the ledger, as a lock file.
fn stored_lock(state: &AppState, study: &str) -> Result<Value, FhirError> {
    let none = || FhirError::not_found(&format!("a data lock of ResearchStudy/{study}"));
    let (list_id, prov_key) = {
        let idx = state.search.current()?;
        let lists = idx.of("List");
        let locks = lists.posting("code", &format!("{}|{}", lock::CODE_SYSTEM, lock::DATA_LOCK))?;
        let mut latest: Option<(i64, String)> = None;
        for k in lists.posting("identifier", &format!("{}|{study}", lock::STUDY_SYSTEM))? {
            if let (true, Some(d)) = (locks.contains(&k), lists.get(k)?) {
                if latest.as_ref().is_none_or(|(t, _)| d.last_updated_ms >= *t) {
                    latest = Some((d.last_updated_ms, d.id.clone()));
                }
            }
        }
        let (_, id) = latest.ok_or_else(none)?;
        let provs = idx.of("Provenance");
        let key = provs.posting("target", &format!("List/{id}"))?.into_iter().next().ok_or_else(none)?;
        (id.clone(), provs.get(key)?.map(|d| d.id.clone()).ok_or_else(none)?)
    };
    let body = |rtype: &str, id: &str| -> Result<Value, FhirError> {
        let s = state.repo.read(rtype, id)?;
        let text = s.body.ok_or_else(none)?;
        serde_json::from_str(&text).map_err(FhirError::internal)
    };
    let list = body("List", &list_id)?;
    let prov = body("Provenance", &prov_key)?;
    let ext = |url: &str, kind: &str| {
        prov["extension"].as_array().into_iter().flatten().find(|x| x["url"] == url).and_then(|x| x[kind].as_str())
    };
    let head: Value = ext(HEAD_EXTENSION, "valueString")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| FhirError::internal("a lock Provenance without its tree head"))?;
    let table = ext(LEAVES_EXTENSION, "valueBase64Binary")
        .and_then(|s| unb64(s).ok())
        .ok_or_else(|| FhirError::internal("a lock Provenance without its leaf table"))?;
    let jws = prov["signature"][0]["data"]
        .as_str()
        .and_then(|d| unb64(d).ok())
        .and_then(|d| String::from_utf8(d).ok())
        .ok_or_else(|| FhirError::internal("a lock Provenance without its signature"))?;
    let size = crate::treehead::TreeHead::from_parts(head.as_array().map_or(&[][..], Vec::as_slice))
        .map_err(FhirError::internal)?
        .size;
    let leaves: Vec<u64> =
        table.chunks_exact(40).map(|c| u64::from_be_bytes(c[..8].try_into().unwrap_or_default())).collect();
    let multiproof = if leaves.is_empty() {
        Vec::new()
    } else {
        consensus::proof::multi_proof(state.repo.view(), &leaves, size)
            .ok_or_else(|| FhirError::internal("no multiproof of the locked leaves"))?
    };
    Ok(lock::file(study, &lock::list_bytes(&list), &table, &head, &jws, &multiproof))
}

#[allow(clippy::needless_pass_by_value)] // json! takes it by reference; callers build it in place
fn part(name: &str, key: &str, value: Value) -> Value {
    json!({"name": name, key: value})
}

pub async fn verify_lock(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, FhirError> {
    let (req, state, study) = (&req, &**state, path.as_str());
    let (caller, f) = study_request(req, state, study).await?;
    let f = &f;
    locker(&caller, study)?;
    let file = if req.method() == actix_web::http::Method::POST {
        let body = super::read_body(req, payload, state.max_body_bytes).await?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| FhirError::new(ErrorCode::Structure, format!("the lock file is not JSON: {e}")))?;
        if v["resourceType"] != "Parameters" {
            return Err(FhirError::invalid("$verify-lock takes the lock file $lock answered (a Parameters resource)")
                .at("resourceType"));
        }
        v
    } else {
        stored_lock(state, study)?
    };
    let mut problems: Vec<String> = Vec::new();
    let mut out = vec![part("lock", "resource", file.clone())];
    let trusted = {
        let mut keys = state.repo.ledger().member_keys();
        keys.push(state.repo.signer().verifying_key());
        keys
    };
    match lock::check(&file, &trusted, 1) {
        Err(e) => problems.push(e),
        Ok(locked) if locked.study != study => {
            problems.push(format!("the lock file locks ResearchStudy/{}, not ResearchStudy/{study}", locked.study));
        }
        Ok(locked) => {
            let entries = locked.entries().map_err(FhirError::internal)?;
            let now = super::ledger::signed_head(&state.repo).await?;
            out.push(json!({"name": "currentHead", "part": Json::Array(now.to_parts()).to_serde()}));
            let view = state.repo.view();
            let path = (locked.head.size <= now.size)
                .then(|| consensus::proof::consistency_proof(view, locked.head.size, now.size))
                .flatten()
                .unwrap_or_default();
            out.extend(path.iter().map(|h| part("consistencyPath", "valueBase64Binary", json!(b64(h)))));
            if let Err(e) = lock::check_extends(&locked, &now, &path) {
                problems.push(e);
                problems.extend(changed(state, &entries)?);
            } else {
                let amendments = amendments(state, &caller, &entries, now.size)?;
                out.push(part("entries", "valueInteger", json!(entries.len())));
                // Subjects whose data is locked and who have left the study since: what was
                // locked stays locked, and the answer says so.
                let book = {
                    let idx = state.search.current()?;
                    state.auth.books.get(&state.repo, &idx)?
                };
                let enrolled: std::collections::HashSet<&str> = book.research.enrolled(study).collect();
                for e in entries.iter().filter(|e| e.rtype == "Patient" && !enrolled.contains(e.id.as_str())) {
                    out.push(part(
                        "withdrawn",
                        "valueString",
                        json!(format!("Patient/{}: no longer enrolled; the versions locked before stay locked", e.id)),
                    ));
                }
                out.push(part("amendments", "valueInteger", json!(amendments.len())));
                out.extend(amendments);
            }
        }
    }
    let ok = problems.is_empty();
    out.insert(0, part("result", "valueBoolean", json!(ok)));
    let issues: Vec<Value> = if ok {
        vec![json!({"severity": "information", "code": "informational",
                    "diagnostics": "every locked version is in the ledger unchanged, and the ledger only grew since the lock"})]
    } else {
        problems.iter().map(|p| json!({"severity": "error", "code": "invariant", "diagnostics": p})).collect()
    };
    out.push(part("outcome", "resource", json!({"resourceType": "OperationOutcome", "issue": issues})));
    Ok(json_response(200, &Json::from(json!({"resourceType": "Parameters", "parameter": out})), f))
}

/// The locked versions whose leaf no longer holds what was locked.
fn changed(state: &AppState, entries: &[lock::Entry]) -> Result<Vec<String>, FhirError> {
    let view = state.repo.view();
    let mut out = Vec::new();
    for e in entries {
        let now: Option<Hash> = view.record(e.leaf)?.map(|r| consensus::merkle::leaf_hash(&r.header.encode()));
        if now != Some(e.hash) {
            out.push(format!("{} (leaf {}) is not in the ledger as it was locked", e.reference(), e.leaf));
        }
    }
    Ok(out)
}

/// Every later version of a locked resource: who, when, what and why, with the leaf's data and
/// its inclusion proof at the current head (`size` leaves).
fn amendments(state: &AppState, caller: &Caller, entries: &[lock::Entry], size: u64) -> Result<Vec<Value>, FhirError> {
    let view = state.repo.view();
    let mut out = Vec::new();
    for e in entries {
        let Some(cur) = view.current(&e.rtype, &e.id)? else { continue };
        for v in e.version + 1..=cur.version {
            let Some(&leaf) = cur.leaves.get(usize::try_from(v - 1).unwrap_or(usize::MAX)) else { continue };
            if leaf >= size {
                continue;
            }
            let Some(r) = view.record(leaf)? else { continue };
            let reason = if r.header.op == consensus::Op::Erase.as_str() {
                ERASED.to_string()
            } else {
                // The reason is part of the version: shown to whoever may read that version.
                let stored = state.repo.vread(&e.rtype, &e.id, v)?;
                match authz::version_visible(state, caller, &stored) {
                    Ok(Some(_)) => stored
                        .body
                        .as_deref()
                        .and_then(|b| crate::fhir::json::parse(b.as_bytes(), usize::MAX).ok())
                        .and_then(|j| crate::research::amendment_reason(&j).map(str::to_string))
                        .unwrap_or_else(|| "(none stated)".into()),
                    Ok(None) | Err(_) => "(withheld: the version is not visible to the caller)".into(),
                }
            };
            let path = consensus::proof::inclusion_proof(view, leaf, size).unwrap_or_default();
            let mut parts = vec![
                part("locked", "valueString", json!(e.reference())),
                part("resource", "valueString", json!(format!("{}/{}/_history/{v}", e.rtype, e.id))),
                part("operation", "valueString", json!(r.header.op)),
                part("actor", "valueString", json!(r.header.actor)),
                part("recorded", "valueInstant", json!(crate::fhir::instant(r.header.last_updated_ms))),
                part("reason", "valueString", json!(reason)),
                part("leafIndex", "valueString", json!(leaf.to_string())),
                part("leafData", "valueBase64Binary", json!(b64(&r.header.encode()))),
            ];
            parts.extend(path.iter().map(|h| part("auditPath", "valueBase64Binary", json!(b64(h)))));
            out.push(json!({"name": "amendment", "part": parts}));
        }
    }
    Ok(out)
}

/// `GET /ResearchStudy/{id}/$access-report`: for the study's monitor, who accessed what for
/// the study and how often (its AuditEvents), and every change to a subject's enrolment or
/// research Consent after the subject was enrolled.
pub async fn access_report(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (req, state, study) = (&req, &**state, path.as_str());
    let (caller, f) = study_request(req, state, study).await?;
    let f = &f;
    if !caller.may_audit() {
        locker(&caller, study)?;
    }
    state.auth.disclosures.flush().await;
    let (total, accessors) = crate::disclosure::study_report(&state.search, study)?;
    let changes = consent_changes(state, study)?;
    let report = crate::disclosure::report_of("study", &format!("ResearchStudy/{study}"), total, &accessors, changes);
    Ok(json_response(200, &report, f))
}

/// Each version of a subject's ResearchSubject or research Consent written after the
/// subject's enrolment (its first version).
fn consent_changes(state: &AppState, study: &str) -> Result<Vec<Value>, FhirError> {
    let subjects: Vec<String> = {
        let idx = state.search.current()?;
        let docs = idx.of("ResearchSubject");
        let mut out = Vec::new();
        for k in docs.posting("study", &format!("ResearchStudy/{study}"))? {
            out.extend(docs.get(k)?.map(|d| d.id.clone()));
        }
        out
    };
    let view = state.repo.view();
    let mut out = Vec::new();
    for sid in subjects {
        let Some(cur) = view.current("ResearchSubject", &sid)? else { continue };
        let Some(&first) = cur.leaves.first() else { continue };
        let enrolled_ms = view.record(first)?.map_or(0, |r| r.header.last_updated_ms);
        let body = state.repo.read("ResearchSubject", &sid).ok().and_then(|s| s.parsed().ok().flatten());
        let patient = body.as_ref().and_then(|b| b.str_at(&["individual", "reference"]).map(str::to_string));
        let consent = body.as_ref().and_then(|b| b.str_at(&["consent", "reference"]).map(str::to_string));
        let mut watched = vec![("ResearchSubject".to_string(), sid.clone())];
        if let Some((t, id)) = consent.as_deref().and_then(|c| c.rsplit_once('/')) {
            watched.push((t.rsplit('/').next().unwrap_or(t).to_string(), id.to_string()));
        }
        for (rtype, id) in watched {
            let Some(c) = view.current(&rtype, &id)? else { continue };
            for (i, &leaf) in c.leaves.iter().enumerate() {
                let Some(r) = view.record(leaf)? else { continue };
                if r.header.last_updated_ms <= enrolled_ms {
                    continue;
                }
                let version = i as u64 + 1;
                let status = state
                    .repo
                    .vread(&rtype, &id, version)
                    .ok()
                    .and_then(|s| s.parsed().ok().flatten())
                    .and_then(|b| b.str_at(&["status"]).map(str::to_string))
                    .unwrap_or_else(|| r.header.op.clone());
                out.push(json!({"name": "change", "part": [
                    part("subject", "valueReference", json!({"reference": format!("ResearchSubject/{sid}")})),
                    part("patient", "valueString", json!(patient.clone().unwrap_or_default())),
                    part("resource", "valueString", json!(format!("{rtype}/{id}/_history/{version}"))),
                    part("status", "valueString", json!(status)),
                    part("actor", "valueString", json!(r.header.actor)),
                    part("recorded", "valueInstant", json!(crate::fhir::instant(r.header.last_updated_ms))),
                ]}));
            }
        }
    }
    Ok(out)
}
