//! The authorize endpoint and its sign-in and consent pages, up to the sealed authorization
//! code: the scopes and patient a user may approve (a RelatedPerson's link and the patient's
//! Consents checked) and a patient's grant Consent on the ledger. Apart from the token
//! endpoint, which redeems the code and reuses only `Code` and the RelatedPerson checks.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::pages;
use super::session::{forged_post, html, session_cookie, session_of, sign_in, throttled, Session, SignIn};
use super::{get, redirect_with};
use crate::api::AppState;
use crate::auth::scopes::{self, Holder, Scope, UserKind};
use crate::auth::store::{self, Client};
use crate::auth::{seal, Auth};
use crate::error::FhirError;

const CODE_TTL_S: i64 = 60;
const REQUEST_TTL_S: i64 = 1800;

/// EHR launch context, sealed into the opaque `launch` value.
#[derive(Serialize, Deserialize, Clone, Default)]
pub(crate) struct Launch {
    pub patient: Option<String>,
    pub encounter: Option<String>,
}

/// An authorize request in flight between the pages.
#[derive(Serialize, Deserialize, Clone)]
struct Pending {
    client_id: String,
    redirect_uri: String,
    /// The authorize request named its redirect_uri: the token request must too (RFC 6749 4.1.3).
    #[serde(default)]
    redirect_given: bool,
    scope: Vec<String>,
    state: Option<String>,
    code_challenge: String,
    nonce: Option<String>,
    launch: Launch,
}

#[derive(Serialize, Deserialize)]
pub(super) struct Code {
    pub(super) id: String,
    pub(super) client_id: String,
    pub(super) redirect_uri: String,
    #[serde(default)]
    pub(super) redirect_given: bool,
    // PKCE's own name (RFC 7636), and the stored form's key: the lint's rename would change both.
    #[allow(clippy::struct_field_names)]
    pub(super) code_challenge: String,
    pub(super) scope: String,
    pub(super) sub: String,
    pub(super) fhir_user: String,
    pub(super) patient: Option<String>,
    pub(super) encounter: Option<String>,
    pub(super) consent: Option<String>,
    pub(super) nonce: Option<String>,
}

pub(super) async fn authorize_get(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let params = crate::codec::parse_query(req.query_string());
    authorize(&req, &state, &params)
}

pub(super) async fn authorize_post(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    authorize(&req, &state, &crate::codec::parse_form(&body))
}

fn authorize(req: &HttpRequest, state: &AppState, p: &[(String, String)]) -> HttpResponse {
    let auth = &state.auth;
    if !auth.enabled {
        return html(404, pages::error("Not available", "authorization is off on this server"));
    }
    let Some(client_id) = get(p, "client_id") else {
        return html(400, pages::error("Bad request", "client_id is missing"));
    };
    let client: Option<(Client, u64)> = match store::get(&state.repo, store::CLIENT, client_id) {
        Ok(c) => c,
        Err(e) => return html(503, pages::error("Unavailable", &e.issues[0].diagnostics)),
    };
    let Some((client, _)) = client else {
        return html(400, pages::error("Unknown app", &format!("no app is registered as {client_id:?}")));
    };
    let redirect_uri = match get(p, "redirect_uri") {
        Some(r) if client.redirect_uris.iter().any(|x| x == r) => r.to_string(),
        None if client.redirect_uris.len() == 1 => client.redirect_uris[0].clone(),
        _ => return html(400, pages::error("Bad request", "redirect_uri is not one this app registered")),
    };
    let st = get(p, "state");
    let fail = |error: &str, why: &str| {
        let mut q = vec![("error", error), ("error_description", why)];
        if let Some(s) = st {
            q.push(("state", s));
        }
        redirect_with(&redirect_uri, &q)
    };
    if get(p, "response_type") != Some("code") {
        return fail("unsupported_response_type", "response_type must be code");
    }
    let Some(challenge) = get(p, "code_challenge") else {
        return fail("invalid_request", "PKCE is required: send code_challenge with code_challenge_method=S256");
    };
    if get(p, "code_challenge_method") != Some("S256") {
        return fail("invalid_request", "code_challenge_method must be S256");
    }
    if get(p, "aud").map(|a| a.trim_end_matches('/')) != Some(auth.public_url.as_str()) {
        return fail("invalid_request", &format!("aud must be this FHIR server's base URL, {}", auth.public_url));
    }
    let requested = get(p, "scope").unwrap_or("");
    if let Err(why) = scopes::parse_all(requested) {
        return fail("invalid_scope", &why);
    }
    // Within the client's ceiling, and never `system/` through a user's authorization; the
    // consent page and the approval narrow further to what the signed-in user may hold.
    let scope = scopes::grantable(requested.split_whitespace(), client.scope.as_deref(), Holder::AnyUser);
    let launch = match get(p, "launch") {
        Some(l) => match seal::open::<Launch>(&auth.seal_key, "launch", l) {
            Ok(l) => l,
            Err(why) => return fail("invalid_request", &format!("launch: {why}")),
        },
        None => Launch::default(),
    };
    let pending = Pending {
        client_id: client_id.to_string(),
        redirect_uri: redirect_uri.clone(),
        redirect_given: get(p, "redirect_uri").is_some(),
        scope,
        state: st.map(str::to_string),
        code_challenge: challenge.to_string(),
        nonce: get(p, "nonce").map(str::to_string),
        launch,
    };
    let sealed = seal::seal(&auth.seal_key, "authorize", REQUEST_TTL_S, &pending);
    match session_of(auth, req) {
        Some(s) => consent_page(auth, &client, &s, &sealed, &pending),
        None => html(200, pages::login(&client.client_name, &sealed, None, "/auth/login")),
    }
}

/// The scopes of a pending request the signed-in user may hold (the consent page offers
/// these and the approval grants no others).
fn offered(s: &Session, p: &Pending) -> Vec<String> {
    scopes::grantable(p.scope.iter().map(String::as_str), None, Holder::User(UserKind::of(&s.fhir_user)))
}

fn consent_page(auth: &Auth, client: &Client, s: &Session, sealed: &str, p: &Pending) -> HttpResponse {
    let offered = offered(s, p);
    // Only a clinician picks a patient; a patient is their own, a related person's is the
    // patient their RelatedPerson links to.
    let ask_patient = offered.iter().any(|x| x == "launch/patient")
        && p.launch.patient.is_none()
        && UserKind::of(&s.fhir_user) == UserKind::Practitioner;
    html(
        200,
        pages::consent(
            &client.client_name,
            &format!("{} ({})", s.username, s.fhir_user),
            sealed,
            &offered,
            ask_patient,
            &s.csrf(auth),
        ),
    )
}

pub(super) async fn login(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let auth = &state.auth;
    let p = crate::codec::parse_form(&body);
    if let Some(refused) = forged_post(auth, &req, &p, None) {
        return refused;
    }
    let sealed = get(&p, "request").unwrap_or("");
    let next = get(&p, "next");
    let (username, password) = (get(&p, "username").unwrap_or(""), get(&p, "password").unwrap_or(""));
    let action = if next.is_some() { "/portal/login" } else { "/auth/login" };
    let (user_id, user) = match sign_in(&state, &req, username, password).await {
        Ok(SignIn::User(id, u)) => (id, u),
        Ok(SignIn::Wrong) => {
            return html(401, pages::login("fhir-ledger", sealed, Some("Wrong user name or password."), action))
        }
        Ok(SignIn::Throttled(wait)) => return throttled(wait, sealed, action),
        Err(why) => return html(503, pages::error("Unavailable", &why)),
    };
    let session = Session::new(user_id, &user);
    let cookie = session_cookie(auth, &session);
    if next.is_some() {
        return HttpResponse::SeeOther().cookie(cookie).insert_header((header::LOCATION, "/portal")).finish();
    }
    let pending: Pending = match seal::open(&auth.seal_key, "authorize", sealed) {
        Ok(p) => p,
        Err(why) => {
            return html(
                400,
                pages::error("Sign-in expired", &format!("the sign-in request is {why}; start again from the app")),
            )
        }
    };
    let client: Option<(Client, u64)> = store::get(&state.repo, store::CLIENT, &pending.client_id).unwrap_or(None);
    let Some((client, _)) = client else {
        return html(400, pages::error("Unknown app", "the app is no longer registered"));
    };
    let mut r = consent_page(auth, &client, &session, sealed, &pending);
    let _ = r.add_cookie(&cookie);
    r
}

pub(super) async fn consent(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let auth = &state.auth;
    let p = crate::codec::parse_form(&body);
    let sealed = get(&p, "request").unwrap_or("");
    let pending: Pending = match seal::open(&auth.seal_key, "authorize", sealed) {
        Ok(p) => p,
        Err(why) => {
            return html(
                400,
                pages::error("Request expired", &format!("the request is {why}; start again from the app")),
            )
        }
    };
    if let Some(refused) = forged_post(auth, &req, &p, None) {
        return refused;
    }
    let Some(session) = session_of(auth, &req) else {
        return html(401, pages::login("fhir-ledger", sealed, Some("Please sign in first."), "/auth/login"));
    };
    if let Some(refused) = forged_post(auth, &req, &p, Some(&session.csrf(auth))) {
        return refused;
    }
    let mut q: Vec<(&str, String)> = Vec::new();
    if get(&p, "decision") == Some("approve") {
        match approve(&state, &session, &pending, &p).await {
            Ok(code) => q.push(("code", code)),
            Err(e) => {
                let error = match e.status() {
                    403 => "access_denied",
                    s if s >= 500 => "temporarily_unavailable",
                    _ => "invalid_request",
                };
                q.push(("error", error.into()));
                q.push(("error_description", e.issues[0].diagnostics.clone()));
            }
        }
    } else {
        q.push(("error", "access_denied".into()));
        q.push(("error_description", "the user denied the request".into()));
    }
    if let Some(s) = &pending.state {
        q.push(("state", s.clone()));
    }
    let q: Vec<(&str, &str)> = q.iter().map(|(k, v)| (*k, v.as_str())).collect();
    redirect_with(&pending.redirect_uri, &q)
}

/// The approved scopes, the patient context and (for a patient) the Consent on the ledger;
/// returns the authorization code. Only scopes the user may hold are granted, and the patient
/// context is checked here, whatever the form says: a patient is only themself, a related
/// person only the patient their RelatedPerson links to (and whose Consents permit them), a
/// clinician any patient.
async fn approve(
    state: &AppState,
    s: &Session,
    pending: &Pending,
    form: &[(String, String)],
) -> Result<String, FhirError> {
    let auth = &state.auth;
    let kind = UserKind::of(&s.fhir_user);
    let ticked: Vec<&str> = form.iter().filter(|(k, _)| k == "scope").map(|(_, v)| v.as_str()).collect();
    let mut scope: Vec<String> = offered(s, pending).into_iter().filter(|x| ticked.contains(&x.as_str())).collect();
    let wants_patient = |scope: &[String]| scope.iter().any(|x| x == "launch/patient" || x.starts_with("patient/"));
    let chosen = get(form, "patient").map(str::to_string);
    let own_patient = s.fhir_user.strip_prefix("Patient/").map(str::to_string);
    let patient = match kind {
        UserKind::Patient => {
            for other in [&pending.launch.patient, &chosen].into_iter().flatten() {
                if Some(other) != own_patient.as_ref() {
                    return Err(FhirError::forbidden(format!(
                        "a patient may act only for themself, not Patient/{other}"
                    )));
                }
            }
            own_patient.clone().filter(|_| pending.launch.patient.is_some() || wants_patient(&scope))
        }
        UserKind::RelatedPerson => {
            let rp = s.fhir_user.strip_prefix("RelatedPerson/").unwrap_or_default();
            let linked = linked_patient(state, rp)?;
            let asked = pending.launch.patient.clone().or(chosen);
            if let Some(p) = &asked {
                if linked.as_ref() != Some(p) {
                    return Err(FhirError::forbidden(format!("{} is not linked to Patient/{p}", s.fhir_user)));
                }
            }
            let patient = asked.or(linked.filter(|_| wants_patient(&scope)));
            match &patient {
                Some(p) => {
                    if !related_person_permitted(state, &s.fhir_user, &pending.client_id, p)? {
                        return Err(FhirError::forbidden(format!(
                            "Patient/{p}'s Consents do not permit {} to access their record",
                            s.fhir_user
                        )));
                    }
                }
                // No linked patient: patient/ scopes would reach no one.
                None => scope.retain(|x| !x.starts_with("patient/")),
            }
            patient
        }
        UserKind::Practitioner => pending.launch.patient.clone().or(chosen.filter(|_| wants_patient(&scope))),
        UserKind::Other => None,
    };
    if patient.is_none() && scope.iter().any(|x| x == "launch/patient") {
        return Err(FhirError::invalid("launch/patient: choose a patient"));
    }
    if let Some(pid) = &patient {
        if state.repo.read("Patient", pid).is_err() {
            return Err(FhirError::invalid(format!("Patient/{pid} does not exist")));
        }
    }
    // A patient's approval is a Consent on the ledger; the token rests on it.
    let consent = match (&own_patient, &patient) {
        (Some(me), Some(p)) if me == p => {
            let client: Option<(Client, u64)> = store::get(&state.repo, store::CLIENT, &pending.client_id)?;
            let name = client.map(|(c, _)| c.client_name).unwrap_or_default();
            Some(write_grant_consent(state, me, &s.fhir_user, &pending.client_id, &name, &scope).await?)
        }
        _ => None,
    };
    let code = Code {
        id: crate::auth::random_id(),
        client_id: pending.client_id.clone(),
        redirect_uri: pending.redirect_uri.clone(),
        redirect_given: pending.redirect_given,
        code_challenge: pending.code_challenge.clone(),
        scope: scope.join(" "),
        sub: s.user_id.clone(),
        fhir_user: s.fhir_user.clone(),
        patient,
        encounter: pending.launch.encounter.clone(),
        consent,
        nonce: pending.nonce.clone(),
    };
    Ok(seal::seal(&auth.seal_key, "code", CODE_TTL_S, &code))
}

/// The patient a RelatedPerson is linked to (`RelatedPerson.patient`), if it exists and is
/// not marked inactive.
pub(super) fn linked_patient(state: &AppState, related_person: &str) -> Result<Option<String>, FhirError> {
    if !crate::fhir::is_valid_id(related_person) {
        return Ok(None);
    }
    let body = match state.repo.read("RelatedPerson", related_person) {
        Ok(s) => s.body,
        Err(e) if e.is_absent() => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(body) = body else { return Ok(None) };
    let v = crate::fhir::json::parse(body.as_bytes(), usize::MAX).map_err(FhirError::internal)?;
    if v.get("active") == Some(&crate::fhir::json::Json::Bool(false)) {
        return Ok(None);
    }
    Ok(v.str_at(&["patient", "reference"])
        .and_then(|r| r.strip_prefix("Patient/"))
        .filter(|id| crate::fhir::is_valid_id(id))
        .map(str::to_string))
}

/// Whether the patient's Consents let a related person (through this app) at their record:
/// the consent engine's decision for the whole record (the Patient resource, action
/// `access`), or the configured default where no Consent speaks (`opt-out`: permitted unless
/// an active Consent denies them; `opt-in`: only where one permits them). Each request is
/// still decided per resource by the same engine.
pub(super) fn related_person_permitted(
    state: &AppState,
    user: &str,
    client_id: &str,
    patient: &str,
) -> Result<bool, FhirError> {
    use crate::consent::{Decision, Request};
    let repo = &state.repo;
    let idx = state.search.current()?;
    let book = state.auth.books.get(repo, &idx)?;
    drop(idx);
    let mut actors = vec![user.to_string(), format!("client:{client_id}")];
    if let Some((c, _)) = store::get::<Client>(repo, store::CLIENT, client_id)? {
        actors.extend(c.actor);
    }
    let req = Request {
        actors: &actors,
        purpose: None,
        action: "access",
        rtype: "Patient",
        id: patient,
        labels: &[],
        date_ms: None,
        now_ms: crate::fhir::now_ms(),
    };
    let default = match state.auth.consent_default {
        crate::config::ConsentDefault::OptOut => Decision::Permit,
        crate::config::ConsentDefault::OptIn => Decision::Deny,
    };
    Ok(book.decide(patient, &req).unwrap_or(default) == Decision::Permit)
}

pub(crate) const CLIENT_SYSTEM: &str = "urn:fhir-ledger:client";

/// The Consent a patient's approval writes: a permit for the app *and* the approving user
/// together (the consent engine requires every actor of a grant Consent, marked by the
/// scopes extension, so it permits no other user of the same app).
async fn write_grant_consent(
    state: &AppState,
    patient: &str,
    user: &str,
    client_id: &str,
    app: &str,
    scope: &[String],
) -> Result<String, FhirError> {
    let mut classes = Vec::new();
    let mut write = false;
    for s in scope {
        if let Ok(Scope::Resource(r)) = scopes::parse(s) {
            if r.rtype != "*" && !classes.contains(&r.rtype) {
                classes.push(r.rtype.clone());
            }
            write |= r.allows(scopes::Perm::C) || r.allows(scopes::Perm::U) || r.allows(scopes::Perm::D);
        }
    }
    let wildcard = scope.iter().any(|s| matches!(scopes::parse(s), Ok(Scope::Resource(r)) if r.rtype == "*"));
    let now = crate::fhir::instant(crate::fhir::now_ms());
    let mut actions =
        vec![json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "access"}]})];
    if write {
        actions.push(
            json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "correct"}]}),
        );
    }
    let mut provision = json!({
        "type": "permit",
        "period": {"start": now},
        "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                   "reference": {"identifier": {"system": CLIENT_SYSTEM, "value": client_id}, "display": app}},
                  {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                   "reference": {"reference": user}}],
        "action": actions,
    });
    if !wildcard && !classes.is_empty() {
        provision["class"] = json!(classes
            .iter()
            .map(|c| json!({"system": "http://hl7.org/fhir/resource-types", "code": c}))
            .collect::<Vec<_>>());
    }
    let consent = json!({
        "resourceType": "Consent",
        "extension": [{"url": crate::consent::SCOPES_EXTENSION, "valueString": scope.join(" ")}],
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0", "display": "Patient Consent"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "dateTime": now,
        "performer": [{"reference": format!("Patient/{patient}")}],
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": provision,
    });
    let res = crate::fhir::json::parse(consent.to_string().as_bytes(), usize::MAX).map_err(FhirError::internal)?;
    crate::search::validate::validate(&state.search, "Consent", &res, None)?;
    let id = uuid::Uuid::new_v4().to_string();
    let actor = format!("Patient/{patient} via {client_id}");
    state.repo.commit(&crate::repo::System::new(actor), |plan| plan.put_new("Consent", &id, &res).map(|_| ())).await?;
    Ok(format!("Consent/{id}"))
}
