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

use consensus::CurrentRecord;

use super::{AppState, Format};
use crate::auth::access::{Disclosed, Restriction, Subject};
use crate::auth::scopes::Perm;
use crate::auth::Caller;
use crate::consent::research::Standing;
use crate::disclosure::Event;
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::repo::{Policy, Stored};

/// Marks a request whose read barrier the middleware already passed (before checking the
/// token against the grant and Consent, so a revocation anywhere in the cluster is seen).
#[derive(Clone, Copy)]
pub struct Barriered;

/// Paths anyone may call: discovery, liveness, and the ledger's signed tree heads and
/// consistency proofs (sizes, roots and signatures: nothing names a patient, user or actor).
fn public(path: &str) -> bool {
    matches!(path, "/metadata" | "/health" | "/ledger/head" | "/ledger/consistency")
}

/// Paths where the node's admin token stands for an administrator: the ledger's entries and
/// proofs (auditors) and `$erase` (which docs/authorization.md reserves to the patient and them).
fn admin_path(path: &str) -> bool {
    path.starts_with("/ledger/") || path.ends_with("/$erase")
}

fn is_admin_token(state: &AppState, authorization: Option<&str>) -> bool {
    use sha2::Digest;
    let Some(token) = authorization.and_then(|h| h.strip_prefix("Bearer ")) else { return false };
    // Digest against digest, so the comparison's timing says nothing about the token.
    let digest: [u8; 32] = sha2::Sha256::digest(token.trim().as_bytes()).into();
    digest == state.admin.token_sha256
}

pub async fn middleware(
    mut req: ServiceRequest,
    next: Next<BoxBody>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else { return next.call(req).await };
    if !state.auth.enabled || public(req.path()) || req.method() == actix_web::http::Method::OPTIONS {
        req.extensions_mut().insert(Arc::new(Caller::unrestricted()));
        return next.call(req).await;
    }
    if let Err(e) = super::read_barrier(req.request(), &state.repo).await {
        let f = Format::negotiate(req.request()).unwrap_or_else(|_| Format::plain());
        return Ok(req.into_response(e.render(f.content_type, f.pretty)));
    }
    req.extensions_mut().insert(Barriered);
    let authorization = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let purpose = req.headers().get("x-purpose-of-use").and_then(|v| v.to_str().ok()).map(str::to_string);
    let study = req.headers().get("x-research-study").and_then(|v| v.to_str().ok()).map(str::to_string);
    if admin_path(req.path()) && is_admin_token(&state, authorization.as_deref()) {
        req.extensions_mut().insert(Arc::new(Caller::administrator()));
        return next.call(req).await;
    }
    match state.auth.caller(&state.search, authorization.as_deref(), purpose.as_deref(), study.as_deref()).await {
        Ok(c) => {
            req.extensions_mut().insert(Arc::new(c));
            next.call(req).await
        }
        Err(e) => {
            let source = req.connection_info().realip_remote_addr().unwrap_or("unknown").to_string();
            let path = crate::disclosure::truncate(req.path(), 128);
            let why = e.issues.first().map_or("", |i| i.diagnostics.as_str());
            state.auth.disclosures.refused(
                &source,
                Event {
                    recorded_ms: crate::fhir::now_ms(),
                    interaction: interaction_of(req.method()),
                    success: false,
                    detail: Some(format!("401 {} {path} from {source}: {why}", req.method())),
                    purpose: purpose.map(|p| crate::disclosure::truncate(&p, 32)),
                    study: None,
                    deidentified: None,
                    broke_glass: false,
                    client_id: "unauthenticated".into(),
                    client_name: String::new(),
                    user: None,
                    patient: None,
                    entities: Vec::new(),
                    requests: 1,
                },
            );
            drain(&mut req).await;
            let f = Format::negotiate(req.request()).unwrap_or_else(|_| Format::plain());
            Ok(req.into_response(e.render(f.content_type, f.pretty)))
        }
    }
}

/// Reads (and drops) a refused request's body, up to a bound: closing a socket with unread
/// data resets it, and the client would see a broken connection instead of the 401.
async fn drain(req: &mut ServiceRequest) {
    use futures::StreamExt;
    const DRAIN_LIMIT: usize = 1 << 20;
    let mut payload = req.take_payload();
    let mut seen = 0;
    while let Some(Ok(chunk)) = payload.next().await {
        seen += chunk.len();
        if seen > DRAIN_LIMIT {
            break;
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

/// The request's caller, as the middleware established it. A route the middleware did not
/// wrap gets a caller with no rights at all, so a handler mounted outside it fails closed.
pub fn caller(req: &HttpRequest) -> Arc<Caller> {
    req.extensions().get::<Arc<Caller>>().cloned().unwrap_or_else(|| Arc::new(Caller::nobody()))
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
        study: match &caller.research {
            Standing::Study(s) => Some(s.clone()),
            _ => None,
        },
        deidentified: caller.deidentify.as_ref().map(|r| r.name.clone()),
        broke_glass,
        client_id: caller.claims.client_id.clone(),
        client_name: caller.client_name.clone(),
        user: caller.user.as_ref().map(|(t, id)| format!("{t}/{id}")),
        patient,
        entities,
        requests: 1,
    }
}

/// Logs what a request disclosed: one AuditEvent per patient whose data it showed (and one
/// for resources of no patient), and one denial per patient whose data a Consent withheld.
pub fn disclosed(
    state: &AppState,
    caller: &Caller,
    interaction: &'static str,
    shown: &[(String, String, u64)],
    d: &Disclosed,
) {
    if !state.auth.logs_disclosures_of(caller) {
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
) -> Result<Disclosed, FhirError> {
    let Some(access) = state.auth.access(caller) else { return Ok(Disclosed::default()) };
    let (ok, d) = crate::auth::access::visible(&state.search, &access, rtype, id)?;
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
                &FhirError::forbidden(format!("{rtype}/{id} withheld by the patient's consent")),
            );
        }
    }
    Err(e)
}

/// The request's caller as the repository's write policy: every plan made for a request
/// goes through it (see `repo::Policy`).
pub struct CallerPolicy<'a> {
    state: &'a AppState,
    caller: &'a Caller,
    /// Writing what `/epcis/capture` checked: the only way EPCIS records are written.
    capture: bool,
}

pub fn policy<'a>(state: &'a AppState, caller: &'a Caller) -> CallerPolicy<'a> {
    CallerPolicy { state, caller, capture: false }
}

/// The policy of an EPCIS capture: the caller's, and the records of the events it checked.
pub fn capture_policy<'a>(state: &'a AppState, caller: &'a Caller) -> CallerPolicy<'a> {
    CallerPolicy { state, caller, capture: true }
}

/// Only the server writes AuditEvents: they are the disclosure log patients rely on.
pub const AUDIT_EVENT: &str = "AuditEvent";

impl Policy for CallerPolicy<'_> {
    fn actor(&self) -> String {
        self.caller.actor()
    }

    fn sees(&self, rtype: &str, id: &str) -> Result<bool, FhirError> {
        let Some(access) = self.state.auth.access(self.caller) else { return Ok(true) };
        Ok(crate::auth::access::visible(&self.state.search, &access, rtype, id)?.0)
    }

    fn may_write(
        &self,
        rtype: &str,
        id: &str,
        current: Option<&CurrentRecord>,
        new: Option<&Json>,
    ) -> Result<(), FhirError> {
        self.authorized(rtype, id, current, new)?;
        if !self.capture && crate::supply::RECORD_TYPES.contains(&rtype) {
            let stored = match current {
                Some(_) => self.state.repo.read(rtype, id)?.parsed()?,
                None => None,
            };
            crate::supply::refuse_edit(rtype, id, stored.as_ref(), new)?;
        }
        // A data lock holds for every writer, after the caller's rights (so a hidden resource
        // still answers as missing).
        if current.is_some() {
            crate::research::may_change(&self.state.search, rtype, id, new)?;
        }
        Ok(())
    }

    fn may_erase(&self, patient: &str) -> Result<(), FhirError> {
        self.erasable(patient)
    }
}

impl CallerPolicy<'_> {
    /// [`Policy::may_write`] as far as the caller's scopes and the patients' Consents go.
    fn authorized(
        &self,
        rtype: &str,
        id: &str,
        current: Option<&CurrentRecord>,
        new: Option<&Json>,
    ) -> Result<(), FhirError> {
        let (state, caller) = (self.state, self.caller);
        if caller.unrestricted {
            return Ok(());
        }
        let (perm, interaction) = match (current, new) {
            (None, _) => (Perm::C, "create"),
            (Some(_), Some(_)) => (Perm::U, "update"),
            (Some(_), None) => (Perm::D, "delete"),
        };
        if rtype == AUDIT_EVENT {
            return Err(forbidden_logged(
                state,
                caller,
                interaction,
                "AuditEvents are the server's disclosure log: clients cannot create, change or delete them",
            ));
        }
        require(state, caller, rtype, perm, interaction)?;
        let Some(access) = state.auth.access(caller) else { return Ok(()) };
        if let Some(body) = new {
            // What it leaves there, judged first: a resource moves between compartments only if
            // the caller may write both, and judging the body before the stored version means a
            // write of another patient's resource answers as one at an id nobody holds would
            // (no existence oracle).
            let subject = Subject::Body { id, version: 0, body, restriction: Restriction::Unchecked };
            if !crate::auth::access::admits(&state.search, &access, rtype, subject, Some(perm))?.0 {
                return Err(forbidden_logged(
                    state,
                    caller,
                    interaction,
                    &format!(
                        "the access token may not write this {rtype}: a patient-scoped token writes only resources \
                         of its own patient, and the patient's consent must permit the change"
                    ),
                ));
            }
        }
        if current.is_some() {
            // What is there: hidden answers as missing; visible but not the caller's to change
            // (another patient's, or a Consent's "correct" denial) is a 403.
            if !crate::auth::access::visible(&state.search, &access, rtype, id)?.0 {
                return Err(FhirError::not_found(&format!("{rtype}/{id}")));
            }
            if !crate::auth::access::admits(&state.search, &access, rtype, Subject::Current(id), Some(perm))?.0 {
                return Err(forbidden_logged(
                    state,
                    caller,
                    interaction,
                    &format!("the access token may not {interaction} {rtype}/{id} as it is stored"),
                ));
            }
        }
        Ok(())
    }

    fn erasable(&self, patient: &str) -> Result<(), FhirError> {
        let caller = self.caller;
        let own = caller.is_patient(patient) && caller.covering("Patient", Perm::D).next().is_some();
        if caller.unrestricted || own {
            return Ok(());
        }
        Err(forbidden_logged(
            self.state,
            caller,
            "operation",
            "$erase is reserved to the patient themself and the administrators (admin token)",
        ))
    }
}

/// For one stored version read outside a search (vread, history, a bundle's `_history/v`
/// entry, `$proof`): what to log when the caller may see it, judged by that version's own
/// content (its patients and their Consents) and a deletion by the last version before it;
/// `None` when hidden.
pub fn version_visible(state: &AppState, caller: &Caller, s: &Stored) -> Result<Option<Disclosed>, FhirError> {
    let Some(access) = state.auth.access(caller) else { return Ok(Some(Disclosed::default())) };
    let repo = &state.repo;
    let current = repo.view().current(&s.rtype, &s.id)?.is_some_and(|c| c.version == s.version);
    if current && !s.deleted {
        let (ok, d) = crate::auth::access::visible(&state.search, &access, &s.rtype, &s.id)?;
        return Ok(ok.then_some(d));
    }
    let (mut body, mut version) = (s.body.clone(), s.version);
    while body.is_none() && version > 1 {
        version -= 1;
        body = repo.vread(&s.rtype, &s.id, version)?.body;
    }
    let Some(text) = body else { return Ok(None) };
    let json = crate::fhir::json::parse(text.as_bytes(), usize::MAX).map_err(FhirError::internal)?;
    let subject = Subject::Body { id: &s.id, version, body: &json, restriction: Restriction::Unknown };
    let (ok, d) = crate::auth::access::admits(&state.search, &access, &s.rtype, subject, None)?;
    Ok(ok.then_some(d))
}

/// Whether every scope that lets the caller read `rtype` is a `patient/` one: then a version
/// encrypted under another patient's compartment can be skipped without decrypting it.
pub fn patient_confined(caller: &Caller, rtype: &str) -> bool {
    !caller.unrestricted
        && caller
            .scopes
            .iter()
            .filter(|s| s.covers(rtype) && (s.allows(Perm::R) || s.allows(Perm::S)))
            .all(|s| s.context == crate::auth::scopes::Context::Patient)
}

/// A 403 for a refusal that is not about scopes (logged like one).
pub fn forbidden_logged(state: &AppState, caller: &Caller, interaction: &'static str, why: &str) -> FhirError {
    let e = FhirError::forbidden(why);
    denied(state, caller, interaction, caller.patient().map(str::to_string), &e);
    e
}

/// What a de-identified study's caller receives instead of `resource`; anyone else gets it
/// unchanged. A body that does not parse is withheld, never passed through.
pub fn present(state: &AppState, caller: &Caller, resource: Json) -> Json {
    let (Some(rules), Standing::Study(study)) = (&caller.deidentify, &caller.research) else { return resource };
    let mut v = match resource {
        Json::Raw(text) => match crate::fhir::json::parse(text.as_bytes(), usize::MAX) {
            Ok(v) => v,
            Err(_) => return Json::Null,
        },
        other => other,
    };
    let key = state.auth.study_key(study);
    let patient = crate::fhir::deid::patient_of(&v).map(str::to_string);
    let keys = crate::fhir::deid::Keys { study: &key, patient: patient.as_deref(), now_ms: crate::fhir::now_ms() };
    crate::fhir::deid::apply(&state.repo.profiles, rules, &keys, &mut v);
    v
}

/// [`present`] over the entries of a Bundle: each resource, and the id in each `fullUrl`.
pub fn present_entries(state: &AppState, caller: &Caller, entries: &mut [Json]) {
    let Standing::Study(study) = &caller.research else { return };
    if caller.deidentify.is_none() {
        return;
    }
    let key = state.auth.study_key(study);
    for e in entries.iter_mut() {
        if let Some(r) = e.remove("resource") {
            e.set("resource", present(state, caller, r));
        }
        if let Some(url) = e.str_at(&["fullUrl"]).map(str::to_string) {
            if let Some((head, id)) = url.rsplit_once('/') {
                e.set("fullUrl", Json::str(format!("{head}/{}", crate::fhir::deid::pseudonym(&key, id))));
            }
        }
    }
}

/// 403 for an interaction a de-identified study is not offered (history, proofs and batch
/// reads name the original ids and versions, which the de-identification replaces).
pub fn refuse_deidentified(caller: &Caller, interaction: &str) -> Result<(), FhirError> {
    match &caller.deidentify {
        Some(_) => Err(FhirError::forbidden(format!(
            "{interaction} is not offered to a study that receives de-identified data: read, search, $everything and \
             Bulk export are"
        ))),
        None => Ok(()),
    }
}
