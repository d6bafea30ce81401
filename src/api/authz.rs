//! Authorization in the FHIR routes: a middleware that turns every request's bearer token
//! into a [`Caller`] (or answers 401) before any handler runs, and the checks handlers make
//! with it: scopes per interaction (403), visibility per resource (hidden = 404), and the
//! disclosure log entry of what was shown or refused.

use std::collections::BTreeMap;
use std::sync::Arc;

use actix_web::body::BoxBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest};

use super::{error_response, AppState, Format};
use crate::auth::scopes::Perm;
use crate::auth::Caller;
use crate::disclosure::Event;
use crate::error::FhirError;
use crate::fhir::json::Json;

/// Marks a request whose read barrier the middleware already passed (before checking the
/// token against the grant and Consent, so a revocation anywhere in the cluster is seen).
#[derive(Clone, Copy)]
pub struct Barriered;

/// Paths anyone may call: discovery, liveness and the auditors' ledger endpoints (headers
/// and proofs only, no PHI).
fn public(path: &str) -> bool {
    matches!(path, "/metadata" | "/health") || path.starts_with("/ledger/")
}

pub async fn middleware(
    req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else { return next.call(req).await };
    if !state.auth.enabled || public(req.path()) || req.method() == actix_web::http::Method::OPTIONS {
        req.extensions_mut().insert(Arc::new(Caller::unrestricted()));
        return next.call(req).await;
    }
    if let Err(e) = super::read_barrier(req.request(), &state.repo).await {
        let f = Format::negotiate(req.request()).unwrap_or_else(|_| Format::plain());
        return Ok(req.into_response(error_response(&e, &f)));
    }
    req.extensions_mut().insert(Barriered);
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let purpose = req.headers().get("x-purpose-of-use").and_then(|v| v.to_str().ok()).map(str::to_string);
    match state.auth.caller(&state.repo, authorization.as_deref(), purpose.as_deref()).await {
        Ok(c) => {
            req.extensions_mut().insert(Arc::new(c));
            next.call(req).await
        }
        Err(e) => {
            state.auth.disclosures.record(Event {
                recorded_ms: crate::fhir::now_ms(),
                interaction: interaction_of(req.method()),
                success: false,
                detail: Some(format!("401 {} {}: {}", req.method(), req.path(), e.issues[0].diagnostics)),
                purpose,
                broke_glass: false,
                client_id: "unauthenticated".into(),
                client_name: String::new(),
                user: None,
                patient: None,
                entities: Vec::new(),
            });
            let f = Format::negotiate(req.request()).unwrap_or_else(|_| Format::plain());
            Ok(req.into_response(error_response(&e, &f)))
        }
    }
}

fn interaction_of(m: &actix_web::http::Method) -> &'static str {
    match m.as_str() {
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "read",
    }
}

/// The request's caller (unrestricted where the middleware did not run: in-process tests
/// that mount single handlers).
pub fn caller(req: &HttpRequest) -> Arc<Caller> {
    req.extensions().get::<Arc<Caller>>().cloned().unwrap_or_else(|| Arc::new(Caller::unrestricted()))
}

/// Records a refusal (403, or a resource hidden by policy) in the disclosure log.
pub fn denied(state: &AppState, caller: &Caller, interaction: &'static str, patient: Option<String>, e: &FhirError) {
    if caller.unrestricted {
        return;
    }
    state.auth.disclosures.record(event(
        caller,
        interaction,
        false,
        Some(e.issues[0].diagnostics.clone()),
        patient,
        Vec::new(),
        false,
    ));
}

fn event(
    caller: &Caller,
    interaction: &'static str,
    success: bool,
    detail: Option<String>,
    patient: Option<String>,
    entities: Vec<String>,
    broke_glass: bool,
) -> Event {
    Event {
        recorded_ms: crate::fhir::now_ms(),
        interaction,
        success,
        detail,
        purpose: caller.purpose.clone(),
        broke_glass,
        client_id: caller.claims.client_id.clone(),
        client_name: caller.client_name.clone(),
        user: caller.user.as_ref().map(|(t, id)| format!("{t}/{id}")),
        patient,
        entities,
    }
}

/// Logs what a request disclosed: one AuditEvent per patient whose data it showed (and one
/// for resources of no patient), and one denial per patient whose data a Consent withheld.
pub fn disclosed(
    state: &AppState,
    caller: &Caller,
    interaction: &'static str,
    shown: &[(String, String, u64)],
    d: &crate::search::Disclosed,
) {
    if caller.unrestricted || !state.auth.disclosures.enabled() {
        return;
    }
    // Reading the log is not itself logged: the log would grow with every look at it.
    if !shown.is_empty() && shown.iter().all(|(t, _, _)| t == "AuditEvent") {
        return;
    }
    let mut by_patient: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for (t, id, v) in shown {
        let patients = d.patients.get(&(t.clone(), id.clone())).cloned().unwrap_or_default();
        let entity = format!("{t}/{id}/_history/{v}");
        if patients.is_empty() {
            by_patient.entry(None).or_default().push(entity);
        } else {
            for p in patients {
                by_patient.entry(Some(p)).or_default().push(entity.clone());
            }
        }
    }
    for (patient, entities) in by_patient {
        state.auth.disclosures.record(event(caller, interaction, true, None, patient, entities, d.broke_glass));
    }
}

/// 403 unless the caller's scopes grant `perm` on `rtype`; the refusal is logged.
pub fn require(
    state: &AppState,
    caller: &Caller,
    rtype: &str,
    perm: Perm,
    interaction: &'static str,
) -> Result<(), FhirError> {
    caller
        .require(rtype, perm)
        .inspect_err(|e| denied(state, caller, interaction, caller.patient().map(str::to_string), e))
}

/// For a read of `rtype/id`: `Ok` with what to log when the caller may see it; a 404 exactly
/// like a missing resource's when not.
pub fn check_visible(
    state: &AppState,
    caller: &Caller,
    rtype: &str,
    id: &str,
    interaction: &'static str,
) -> Result<crate::search::Disclosed, FhirError> {
    let Some(access) = state.auth.access(caller) else { return Ok(Default::default()) };
    let (ok, d) = crate::search::visible(&state.repo, &access, rtype, id)?;
    if ok {
        return Ok(d);
    }
    let e = FhirError::not_found(&format!("{rtype}/{id}"));
    if d.consent_hid {
        let patients = d.patients.values().flatten().cloned().collect::<Vec<_>>();
        for p in patients {
            denied(
                state,
                caller,
                interaction,
                Some(p),
                &FhirError::new(403, "forbidden", format!("{rtype}/{id} withheld by the patient's consent")),
            );
        }
    }
    Err(e)
}

/// For a write: the resource as it will be stored must stay within a `patient/` caller's
/// compartment (403 otherwise).
pub fn check_write(
    state: &AppState,
    caller: &Caller,
    rtype: &str,
    id: &str,
    perm: Perm,
    res: &Json,
) -> Result<(), FhirError> {
    if caller.unrestricted {
        return Ok(());
    }
    let compartment = state.repo.compartment_of(rtype, id, res);
    let patients: Vec<String> = compartment.strip_prefix("Patient/").map(|p| vec![p.to_string()]).unwrap_or_default();
    let within = caller.covering(rtype, perm).any(|s| {
        s.context != crate::auth::scopes::Context::Patient
            || (rtype != "Patient" && patients.is_empty() && !state.repo.compartments().patient.contains_key(rtype))
            || caller.patient().is_some_and(|p| patients.iter().any(|x| x == p))
    });
    if within {
        Ok(())
    } else {
        let e = FhirError::new(
            403,
            "forbidden",
            format!("a patient-scoped token may only write {rtype} resources in its patient's compartment"),
        );
        denied(state, caller, "update", caller.patient().map(str::to_string), &e);
        Err(e)
    }
}

/// A 403 for a refusal that is not about scopes (logged like one).
pub fn forbidden_logged(state: &AppState, caller: &Caller, interaction: &'static str, why: &str) -> FhirError {
    let e = FhirError::new(403, "forbidden", why);
    denied(state, caller, interaction, caller.patient().map(str::to_string), &e);
    e
}
