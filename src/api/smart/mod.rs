//! The OAuth 2 / SMART endpoints: discovery, authorize (login and consent pages), token
//! (authorization code with PKCE, refresh with rotation, client credentials with
//! `private_key_jwt`), revocation (RFC 7009), introspection (RFC 7662) and the key set.

pub mod pages;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::api::AppState;
use crate::auth::jose::{self, Alg};
use crate::auth::scopes::{self, Holder, Scope, UserKind};
use crate::auth::store::{self, Client, Grant, User};
use crate::auth::{seal, Auth};
use crate::error::FhirError;

pub const SESSION_COOKIE: &str = "fl_session";
const CODE_TTL_S: i64 = 60;
const REQUEST_TTL_S: i64 = 1800;
const SESSION_TTL_S: i64 = 8 * 3600;
const ASSERTION_MAX_S: i64 = 300;
const BACKEND_TTL_S: i64 = 300;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/.well-known/smart-configuration", web::get().to(smart_configuration))
        .route("/.well-known/smart-configuration", web::method(actix_web::http::Method::OPTIONS).to(preflight))
        .route("/auth/jwks", web::get().to(jwks))
        .route("/auth/authorize", web::get().to(authorize_get))
        .route("/auth/authorize", web::post().to(authorize_post))
        .route("/auth/login", web::post().to(login))
        .route("/auth/consent", web::post().to(consent))
        .route("/auth/token", web::post().to(token))
        .route("/auth/token", web::method(actix_web::http::Method::OPTIONS).to(preflight))
        .route("/auth/revoke", web::post().to(revoke))
        .route("/auth/introspect", web::post().to(introspect));
}

fn cors(b: &mut actix_web::HttpResponseBuilder) {
    b.insert_header(("Access-Control-Allow-Origin", "*"));
    b.insert_header(("Access-Control-Allow-Methods", "GET, POST, OPTIONS"));
    b.insert_header(("Access-Control-Allow-Headers", "Authorization, Content-Type, Accept"));
}

async fn preflight() -> HttpResponse {
    let mut b = HttpResponse::NoContent();
    cors(&mut b);
    b.insert_header(("Access-Control-Max-Age", "86400"));
    b.finish()
}

fn json_ok(v: &Value) -> HttpResponse {
    let mut b = HttpResponse::Ok();
    cors(&mut b);
    b.insert_header((header::CACHE_CONTROL, "no-store"));
    b.content_type("application/json").body(v.to_string())
}

/// An RFC 6749 error answer.
fn oauth_error(status: u16, error: &str, description: &str) -> HttpResponse {
    let mut b = HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    );
    cors(&mut b);
    b.insert_header((header::CACHE_CONTROL, "no-store"));
    if status == 401 {
        b.insert_header((header::WWW_AUTHENTICATE, "Basic realm=\"fhir-ledger\""));
    }
    b.content_type("application/json").body(json!({"error": error, "error_description": description}).to_string())
}

pub(crate) fn html(status: u16, body: String) -> HttpResponse {
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Frame-Options", "DENY"))
        .content_type("text/html; charset=utf-8")
        .body(body)
}

/// The wildcard resource scopes advertised beside the identity and launch scopes.
const RESOURCE_SCOPES_SUPPORTED: &[&str] = &[
    "patient/*.read",
    "patient/*.rs",
    "patient/*.cruds",
    "user/*.read",
    "user/*.rs",
    "user/*.cruds",
    "system/*.read",
    "system/*.rs",
    "system/*.cruds",
];

pub fn configuration(auth: &Auth) -> Value {
    json!({
        "issuer": auth.public_url,
        "jwks_uri": auth.endpoint("/auth/jwks"),
        "authorization_endpoint": auth.endpoint("/auth/authorize"),
        "token_endpoint": auth.endpoint("/auth/token"),
        "revocation_endpoint": auth.endpoint("/auth/revoke"),
        "introspection_endpoint": auth.endpoint("/auth/introspect"),
        "management_endpoint": auth.endpoint("/portal"),
        "grant_types_supported": ["authorization_code", "client_credentials", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384", "EdDSA"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": scopes::IDENTITY_AND_LAUNCH.iter().chain(RESOURCE_SCOPES_SUPPORTED).collect::<Vec<_>>(),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "capabilities": ["launch-ehr", "launch-standalone", "authorize-post", "client-public",
            "client-confidential-symmetric", "client-confidential-asymmetric", "context-ehr-patient",
            "context-ehr-encounter", "context-standalone-patient", "permission-offline", "permission-online",
            "permission-patient", "permission-user", "permission-v1", "permission-v2", "sso-openid-connect"],
    })
}

async fn smart_configuration(state: web::Data<AppState>) -> HttpResponse {
    if !state.auth.enabled {
        return oauth_error(404, "not_found", "authorization is off on this server (--auth off)");
    }
    json_ok(&configuration(&state.auth))
}

async fn jwks(state: web::Data<AppState>) -> HttpResponse {
    if !state.auth.enabled {
        return oauth_error(404, "not_found", "authorization is off on this server");
    }
    json_ok(&state.auth.jwks())
}

/// EHR launch context, sealed into the opaque `launch` value.
#[derive(Serialize, Deserialize, Clone, Default)]
pub struct Launch {
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
struct Session {
    user_id: String,
    username: String,
    fhir_user: String,
    /// Random per sign-in: the CSRF token of the session's forms derives from it.
    #[serde(default)]
    nonce: String,
}

impl Session {
    fn new(user_id: String, user: &User) -> Self {
        Session {
            user_id,
            username: user.username.clone(),
            fhir_user: user.fhir_user.clone(),
            nonce: crate::auth::random_id(),
        }
    }

    fn csrf(&self, auth: &Auth) -> String {
        auth.csrf_token(&self.nonce, &self.user_id)
    }
}

/// Refuses a state-changing form post from another origin (`Origin` present and not the
/// public URL's) or, when `session` is given, without that session's CSRF token.
pub(crate) fn forged_post(
    auth: &Auth,
    req: &HttpRequest,
    form: &[(String, String)],
    session: Option<&str>,
) -> Option<HttpResponse> {
    let origin = req.headers().get(header::ORIGIN).map(|o| o.to_str().unwrap_or("null"));
    if !auth.origin_ok(origin) {
        tracing::warn!("refused a form post from origin {origin:?}");
        return Some(html(403, pages::error("Refused", "this form was not sent from this server's pages")));
    }
    if let Some(expected) = session {
        let given = get(form, "csrf").unwrap_or("");
        if !crate::auth::constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            tracing::warn!("refused a form post without its session's CSRF token");
            return Some(html(
                403,
                pages::error("Refused", "this form is not from your current session; reload the page and try again"),
            ));
        }
    }
    None
}

/// The CSRF token of the browser's session, if it has one.
pub fn session_csrf(auth: &Auth, req: &HttpRequest) -> Option<String> {
    session_of(auth, req).map(|s| s.csrf(auth))
}

#[derive(Serialize, Deserialize)]
struct Code {
    id: String,
    client_id: String,
    redirect_uri: String,
    #[serde(default)]
    redirect_given: bool,
    code_challenge: String,
    scope: String,
    sub: String,
    fhir_user: String,
    patient: Option<String>,
    encounter: Option<String>,
    consent: Option<String>,
    nonce: Option<String>,
}

fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    crate::codec::parse_query(&String::from_utf8_lossy(body))
}

fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

fn redirect_with(uri: &str, params: &[(&str, &str)]) -> HttpResponse {
    let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", crate::api::resource::enc(v))).collect();
    let sep = if uri.contains('?') { '&' } else { '?' };
    HttpResponse::Found().insert_header((header::LOCATION, format!("{uri}{sep}{}", q.join("&")))).finish()
}

fn session_of(auth: &Auth, req: &HttpRequest) -> Option<Session> {
    let c = req.cookie(SESSION_COOKIE)?;
    seal::open(&auth.seal_key, "session", c.value()).ok()
}

pub fn session_user(auth: &Auth, req: &HttpRequest) -> Option<(String, String)> {
    session_of(auth, req).map(|s| (s.username, s.fhir_user))
}

async fn authorize_get(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let params = crate::codec::parse_query(req.query_string());
    authorize(&req, &state, &params)
}

async fn authorize_post(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    authorize(&req, &state, &form_pairs(&body))
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

fn session_cookie(auth: &Auth, s: &Session) -> actix_web::cookie::Cookie<'static> {
    actix_web::cookie::Cookie::build(SESSION_COOKIE, seal::seal(&auth.seal_key, "session", SESSION_TTL_S, s))
        .path("/")
        .http_only(true)
        .same_site(actix_web::cookie::SameSite::Lax)
        .secure(auth.public_url.starts_with("https://"))
        .finish()
}

/// Checks a user's password; `None` for an unknown user or a wrong password alike, in the same
/// time: an unknown user's attempt is checked against a dummy hash, so timing does not tell
/// which user names exist.
pub fn check_login(state: &AppState, username: &str, password: &str) -> Result<Option<(String, User)>, FhirError> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let id = state.auth.user_id(username);
    let user: Option<(User, u64)> = store::get(&state.repo, store::USER, &id)?;
    match user {
        Some((u, _)) => Ok(store::check_password(&u.password_hash, password).then_some((id, u))),
        None => {
            let dummy = DUMMY.get_or_init(|| store::hash_password("fhir-ledger: no such user").unwrap_or_default());
            let _ = store::check_password(dummy, password);
            Ok(None)
        }
    }
}

/// The outcome of a sign-in attempt.
pub enum SignIn {
    User(String, User),
    Wrong,
    /// Too many failures for the account or from the source: retry after this many seconds.
    Throttled(i64),
}

/// A sign-in, throttled per account and per source address (see `throttle.rs`): refused
/// without a password check while either is over the limit.
pub async fn sign_in(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    username: &str,
    password: &str,
) -> Result<SignIn, String> {
    let auth = &state.auth;
    let keys = crate::auth::throttle::keys(username, req.peer_addr().map(|a| a.ip()));
    if let Some(wait) = auth.logins.blocked(&keys, crate::auth::now_s()) {
        tracing::warn!("sign-in for user {username:?} throttled ({wait} s left)");
        return Ok(SignIn::Throttled(wait));
    }
    let checked = {
        let state = state.clone();
        let (u, pw) = (username.to_string(), password.to_string());
        // Argon2 is deliberately slow: keep it off the HTTP worker.
        web::block(move || check_login(&state, &u, &pw)).await
    };
    match checked {
        Ok(Ok(Some((id, user)))) => {
            auth.logins.succeeded(username);
            Ok(SignIn::User(id, user))
        }
        Ok(Ok(None)) => {
            tracing::warn!("failed login for user {username:?}");
            auth.logins.failed(&keys, crate::auth::now_s());
            Ok(SignIn::Wrong)
        }
        Ok(Err(e)) => Err(e.issues[0].diagnostics.clone()),
        Err(e) => Err(e.to_string()),
    }
}

/// 429 with `Retry-After` and the sign-in form again.
pub fn throttled(wait: i64, request: &str, action: &str) -> HttpResponse {
    let mut r =
        html(429, pages::login("fhir-ledger", request, Some("Too many failed sign-ins. Try again later."), action));
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(wait.max(1)));
    r
}

async fn login(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let auth = &state.auth;
    let p = form_pairs(&body);
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

async fn consent(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let auth = &state.auth;
    let p = form_pairs(&body);
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
    if get(&p, "decision") != Some("approve") {
        q.push(("error", "access_denied".into()));
        q.push(("error_description", "the user denied the request".into()));
    } else {
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
fn linked_patient(state: &AppState, related_person: &str) -> Result<Option<String>, FhirError> {
    if !crate::fhir::is_valid_id(related_person) {
        return Ok(None);
    }
    let body = match state.repo.read("RelatedPerson", related_person) {
        Ok(s) => s.body,
        Err(e) if e.is_absent() => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(body) = body else { return Ok(None) };
    let v: Value = serde_json::from_str(&body).map_err(FhirError::internal)?;
    if v["active"] == false {
        return Ok(None);
    }
    Ok(v["patient"]["reference"]
        .as_str()
        .and_then(|r| r.strip_prefix("Patient/"))
        .filter(|id| crate::fhir::is_valid_id(id))
        .map(str::to_string))
}

/// Whether the patient's Consents let a related person (through this app) at their record:
/// the consent engine's decision for the whole record (the Patient resource, action
/// `access`), or the configured default where no Consent speaks (`opt-out`: permitted unless
/// an active Consent denies them; `opt-in`: only where one permits them). Each request is
/// still decided per resource by the same engine.
fn related_person_permitted(state: &AppState, user: &str, client_id: &str, patient: &str) -> Result<bool, FhirError> {
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

pub const CLIENT_SYSTEM: &str = "urn:fhir-ledger:client";

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

/// An RFC 6749 error, turned into a response where it is answered.
struct OAuthError {
    status: u16,
    error: &'static str,
    why: String,
}

impl OAuthError {
    fn response(&self) -> HttpResponse {
        oauth_error(self.status, self.error, &self.why)
    }
}

/// The client a token-endpoint request authenticates as (RFC 6749 2.3, RFC 7523).
async fn authenticate_client(
    state: &AppState,
    req: &HttpRequest,
    p: &[(String, String)],
) -> Result<Client, OAuthError> {
    let bad = |why: &str| OAuthError { status: 401, error: "invalid_client", why: why.to_string() };
    let lookup = |id: &str| -> Result<Client, OAuthError> {
        match store::get::<Client>(&state.repo, store::CLIENT, id) {
            Ok(Some((c, _))) => Ok(c),
            Ok(None) => Err(bad("unknown client")),
            Err(e) => {
                Err(OAuthError { status: 503, error: "temporarily_unavailable", why: e.issues[0].diagnostics.clone() })
            }
        }
    };
    if let Some(basic) =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Basic "))
    {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.trim())
            .map_err(|_| bad("malformed Basic credentials"))?;
        let text = String::from_utf8(decoded).map_err(|_| bad("malformed Basic credentials"))?;
        let (id, secret) = text.split_once(':').ok_or_else(|| bad("malformed Basic credentials"))?;
        let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy().to_string();
        let secret = percent_encoding::percent_decode_str(secret).decode_utf8_lossy().to_string();
        return check_secret(lookup(&id)?, &secret).ok_or_else(|| bad("wrong client secret"));
    }
    if let Some(assertion) = get(p, "client_assertion") {
        if get(p, "client_assertion_type") != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer") {
            return Err(bad("client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer"));
        }
        // The unverified iss only names the client whose keys to use; the checks below read the
        // verified claims.
        let peeked = jose::peek(assertion).map_err(|e| bad(&e))?;
        let iss = peeked.str_claim("iss").unwrap_or("").to_string();
        if peeked.str_claim("sub") != Some(iss.as_str()) {
            return Err(bad("the assertion's iss and sub must both be the client_id"));
        }
        let client = lookup(&iss)?;
        if client.token_endpoint_auth_method != "private_key_jwt" {
            return Err(bad("this client is not registered for private_key_jwt"));
        }
        let jwks = match (&client.jwks, &client.jwks_uri) {
            (Some(j), _) => j.clone(),
            (None, Some(u)) => fetch_jwks(u).await.map_err(|e| bad(&e))?,
            (None, None) => return Err(bad("the client has no keys registered")),
        };
        let key = jose::key_in_jwks(&jwks, peeked.kid()).map_err(|e| bad(&e))?;
        let claims = jose::verify(assertion, &key, &[Alg::RS384, Alg::ES384, Alg::EdDSA]).map_err(|e| bad(&e))?;
        if claims.get("iss").and_then(Value::as_str) != Some(iss.as_str())
            || claims.get("sub").and_then(Value::as_str) != Some(iss.as_str())
        {
            return Err(bad("the assertion's iss and sub must both be the client_id"));
        }
        let token_url = state.auth.endpoint("/auth/token");
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => *a == token_url,
            Some(Value::Array(a)) => a.iter().any(|x| x.as_str() == Some(token_url.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(bad(&format!("the assertion's aud must be {token_url}")));
        }
        let now = crate::auth::now_s();
        let exp = claims.get("exp").and_then(Value::as_i64).ok_or_else(|| bad("the assertion has no exp"))?;
        if exp < now || exp > now + ASSERTION_MAX_S + 60 {
            return Err(bad("the assertion is expired or lives longer than 5 minutes"));
        }
        let jti = claims.get("jti").and_then(Value::as_str).ok_or_else(|| bad("the assertion has no jti"))?;
        // Remembered on the ledger, create-only: a replay fails on any node, even after a
        // restart.
        let record = store::Jti { client_id: iss.clone(), exp_s: exp };
        match store::put(&state.repo, store::JTI, &store::jti_id(&iss, jti), &record, Some(0)).await {
            Ok(()) => {}
            Err(e) if e.status() == 409 => return Err(bad("this assertion's jti was used before")),
            Err(e) => {
                return Err(OAuthError {
                    status: 503,
                    error: "temporarily_unavailable",
                    why: e.issues[0].diagnostics.clone(),
                })
            }
        }
        return Ok(client);
    }
    let id = get(p, "client_id").ok_or_else(|| bad("no client authentication and no client_id"))?;
    let client = lookup(id)?;
    if let Some(secret) = get(p, "client_secret") {
        return check_secret(client, secret).ok_or_else(|| bad("wrong client secret"));
    }
    if client.token_endpoint_auth_method != "none" {
        return Err(bad("this client must authenticate"));
    }
    Ok(client)
}

fn check_secret(c: Client, secret: &str) -> Option<Client> {
    let given = hex::encode(Sha256::digest(secret.as_bytes()));
    (c.secret_sha256.as_deref() == Some(given.as_str())).then_some(c)
}

async fn fetch_jwks(url: &str) -> Result<Value, String> {
    reqwest::Client::new()
        .get(url)
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| format!("fetching the client's jwks_uri: {e}"))?
        .json()
        .await
        .map_err(|e| format!("reading the client's jwks_uri: {e}"))
}

async fn token(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    if !state.auth.enabled {
        return oauth_error(404, "not_found", "authorization is off on this server");
    }
    let p = form_pairs(&body);
    let client = match authenticate_client(&state, &req, &p).await {
        Ok(c) => c,
        Err(e) => return e.response(),
    };
    match get(&p, "grant_type") {
        Some("authorization_code") => code_grant(&state, &client, &p).await,
        Some("refresh_token") => refresh_grant(&state, &client, &p).await,
        Some("client_credentials") => client_credentials(&state, &client, &p).await,
        other => Ok(oauth_error(400, "unsupported_grant_type", &format!("grant_type {other:?} is not supported"))),
    }
    .unwrap_or_else(|e| oauth_error(503, "temporarily_unavailable", &e.issues[0].diagnostics))
}

fn invalid_grant(why: &str) -> Result<HttpResponse, FhirError> {
    tracing::warn!("token endpoint: invalid_grant: {why}");
    Ok(oauth_error(400, "invalid_grant", why))
}

async fn code_grant(state: &AppState, client: &Client, p: &[(String, String)]) -> Result<HttpResponse, FhirError> {
    let auth = &state.auth;
    let code: Code = match get(p, "code").map(|c| seal::open(&auth.seal_key, "code", c)) {
        Some(Ok(c)) => c,
        Some(Err(why)) => return invalid_grant(&format!("the code is {why}")),
        None => return invalid_grant("code is missing"),
    };
    if code.client_id != client.client_id {
        return invalid_grant("the code was issued to another client");
    }
    match get(p, "redirect_uri") {
        Some(r) if r != code.redirect_uri => {
            return invalid_grant("redirect_uri differs from the authorization request's")
        }
        None if code.redirect_given => {
            return invalid_grant("redirect_uri is required: the authorization request had one (RFC 6749 4.1.3)")
        }
        _ => {}
    }
    let verifier = get(p, "code_verifier").unwrap_or("");
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    if verifier.is_empty() || computed != code.code_challenge {
        return invalid_grant("code_verifier does not match the code_challenge (PKCE)");
    }
    let refresh = code.scope.split_whitespace().any(|s| s == "offline_access" || s == "online_access");
    let refresh_token = refresh.then(|| format!("{}.{}", code.id, crate::auth::random_id()));
    let grant = Grant {
        client_id: client.client_id.clone(),
        sub: code.sub.clone(),
        fhir_user: Some(code.fhir_user.clone()),
        patient: code.patient.clone(),
        encounter: code.encounter.clone(),
        scope: code.scope.clone(),
        consent: code.consent.clone(),
        refresh_sha256: refresh_token.as_deref().map(crate::auth::sha256_hex),
        rotated: 0,
        revoked: false,
        created_s: crate::auth::now_s(),
    };
    // The grant's id is the code's: creating it twice fails, so a code is redeemed once
    // cluster-wide.
    match store::put(&state.repo, store::GRANT, &code.id, &grant, Some(0)).await {
        Ok(()) => {}
        Err(e) if e.status() == 409 => return invalid_grant("the code was already used"),
        Err(e) => return Err(e),
    }
    let mut body = issue(auth, &code.id, &grant);
    if let Some(r) = refresh_token {
        body["refresh_token"] = json!(r);
    }
    let scopes: Vec<&str> = code.scope.split_whitespace().collect();
    if scopes.contains(&"openid") && (scopes.contains(&"fhirUser") || scopes.contains(&"profile")) {
        body["id_token"] = json!(id_token(auth, &grant, code.nonce.as_deref()));
    }
    Ok(json_ok(&body))
}

/// The access token (and context) of a grant.
fn issue(auth: &Auth, grant_id: &str, g: &Grant) -> Value {
    let now = crate::auth::now_s();
    let mut claims = json!({
        "iss": auth.public_url, "aud": auth.public_url, "sub": g.sub, "client_id": g.client_id,
        "scope": g.scope, "iat": now, "nbf": now, "exp": now + auth.access_ttl_secs,
        "jti": crate::auth::random_id(), "grant": grant_id,
    });
    let mut body = json!({"token_type": "Bearer", "expires_in": auth.access_ttl_secs, "scope": g.scope,
                          "need_patient_banner": g.fhir_user.as_deref().is_some_and(|u| !u.starts_with("Patient/")),
                          "smart_style_url": auth.endpoint("/auth/style.json")});
    for (k, v) in
        [("patient", &g.patient), ("encounter", &g.encounter), ("fhirUser", &g.fhir_user), ("consent", &g.consent)]
    {
        if let Some(v) = v {
            claims[k] = json!(v);
            if k != "fhirUser" {
                body[k] = json!(v);
            }
        }
    }
    body["access_token"] = json!(auth.sign_access(&claims));
    body
}

fn id_token(auth: &Auth, g: &Grant, nonce: Option<&str>) -> String {
    let now = crate::auth::now_s();
    let key = auth.id_key();
    let mut claims = json!({"iss": auth.public_url, "sub": g.sub, "aud": g.client_id, "iat": now,
                            "exp": now + auth.access_ttl_secs,
                            "fhirUser": format!("{}/{}", auth.public_url, g.fhir_user.as_deref().unwrap_or(""))});
    if let Some(n) = nonce {
        claims["nonce"] = json!(n);
    }
    jose::sign(Alg::RS256, &key.signing, &key.kid, "JWT", &claims)
}

async fn refresh_grant(state: &AppState, client: &Client, p: &[(String, String)]) -> Result<HttpResponse, FhirError> {
    let Some(presented) = get(p, "refresh_token") else { return invalid_grant("refresh_token is missing") };
    let Some((grant_id, _)) = presented.split_once('.') else {
        return invalid_grant("not a refresh token of this server");
    };
    let Some((mut grant, version)) = store::get::<Grant>(&state.repo, store::GRANT, grant_id)? else {
        return invalid_grant("unknown refresh token");
    };
    if grant.client_id != client.client_id {
        return invalid_grant("the refresh token was issued to another client");
    }
    if grant.revoked {
        return invalid_grant("the grant has been revoked");
    }
    if grant.refresh_sha256.as_deref() != Some(crate::auth::sha256_hex(presented).as_str()) {
        // A rotated-out refresh token came back: someone holds a copy. Revoke the whole grant
        // (OAuth 2.0 Security BCP, 4.14.2).
        grant.revoked = true;
        store::put(&state.repo, store::GRANT, grant_id, &grant, Some(version)).await?;
        tracing::warn!("refresh token reuse on grant {grant_id}: grant revoked");
        return invalid_grant("this refresh token was already used; the grant is revoked");
    }
    if let Some(c) = &grant.consent {
        let id = c.strip_prefix("Consent/").unwrap_or(c);
        // The same rule as every request's token check: active and within its period.
        let idx = state.search.current()?;
        let active = crate::auth::caller::consent_active(&idx, id);
        drop(idx);
        if !active {
            return invalid_grant("the patient withdrew the consent this grant rests on");
        }
    }
    // What the grant may still carry: the client's ceiling and the user's kind may have
    // narrowed since, and a related person must still be linked to and permitted by the patient.
    let holder = grant.fhir_user.as_deref().map_or(Holder::Backend, |u| Holder::User(UserKind::of(u)));
    grant.scope = scopes::grantable(grant.scope.split_whitespace(), client.scope.as_deref(), holder).join(" ");
    if let (Some(user), Some(p)) = (grant.fhir_user.clone(), grant.patient.clone()) {
        if let Some(rp) = user.strip_prefix("RelatedPerson/") {
            if linked_patient(state, rp)?.as_deref() != Some(p.as_str())
                || !related_person_permitted(state, &user, &client.client_id, &p)?
            {
                return invalid_grant("the related person is no longer linked to or permitted by the patient");
            }
        }
    }
    let next = format!("{grant_id}.{}", crate::auth::random_id());
    grant.refresh_sha256 = Some(crate::auth::sha256_hex(&next));
    grant.rotated += 1;
    match store::put(&state.repo, store::GRANT, grant_id, &grant, Some(version)).await {
        Ok(()) => {}
        Err(e) if e.status() == 412 => return invalid_grant("the refresh token was used concurrently"),
        Err(e) => return Err(e),
    }
    let mut body = issue(&state.auth, grant_id, &grant);
    body["refresh_token"] = json!(next);
    Ok(json_ok(&body))
}

async fn client_credentials(
    state: &AppState,
    client: &Client,
    p: &[(String, String)],
) -> Result<HttpResponse, FhirError> {
    if client.token_endpoint_auth_method != "private_key_jwt"
        && client.token_endpoint_auth_method != "client_secret_basic"
    {
        return Ok(oauth_error(400, "unauthorized_client", "client_credentials needs a confidential client"));
    }
    let requested = get(p, "scope").unwrap_or("");
    if let Err(why) = scopes::parse_all(requested) {
        return Ok(oauth_error(400, "invalid_scope", &why));
    }
    let granted = scopes::grantable(requested.split_whitespace(), client.scope.as_deref(), Holder::Backend);
    if granted.is_empty() {
        return Ok(oauth_error(
            400,
            "invalid_scope",
            "client_credentials grants system/ scopes only, within the client's registration",
        ));
    }
    let grant = Grant {
        client_id: client.client_id.clone(),
        sub: client.client_id.clone(),
        scope: granted.join(" "),
        created_s: crate::auth::now_s(),
        ..Default::default()
    };
    let id = crate::auth::random_id();
    store::put(&state.repo, store::GRANT, &id, &grant, Some(0)).await?;
    let now = crate::auth::now_s();
    let claims = json!({"iss": state.auth.public_url, "aud": state.auth.public_url, "sub": client.client_id,
        "client_id": client.client_id, "scope": grant.scope, "iat": now, "nbf": now, "exp": now + BACKEND_TTL_S,
        "jti": crate::auth::random_id(), "grant": id});
    Ok(json_ok(&json!({"access_token": state.auth.sign_access(&claims), "token_type": "Bearer",
                       "expires_in": BACKEND_TTL_S, "scope": grant.scope})))
}

/// The grant of a presented token, only if the token is a live one of ours: an access token
/// whose signature verifies (issued by this server), or the grant's current refresh token
/// (its hash matches the one the grant keeps). Anything else names no grant.
fn grant_of(state: &AppState, token: &str) -> Option<(String, Grant, u64)> {
    let auth = &state.auth;
    if jose::peek(token).is_ok() {
        let claims = jose::verify(token, &jose::PublicKey::ed25519(&auth.access_public()), &[Alg::EdDSA]).ok()?;
        if claims.get("iss").and_then(Value::as_str) != Some(auth.public_url.as_str()) {
            return None;
        }
        let gid = claims.get("grant").and_then(Value::as_str)?.to_string();
        let (g, v) = store::get::<Grant>(&state.repo, store::GRANT, &gid).ok()??;
        let client = claims.get("client_id").and_then(Value::as_str);
        return (client == Some(g.client_id.as_str())).then_some((gid, g, v));
    }
    let (gid, _) = token.split_once('.')?;
    let (g, v) = store::get::<Grant>(&state.repo, store::GRANT, gid).ok()??;
    (g.refresh_sha256.as_deref() == Some(crate::auth::sha256_hex(token).as_str())).then(|| (gid.to_string(), g, v))
}

async fn revoke(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let p = form_pairs(&body);
    // Confidential clients authenticate; a public client names itself and may revoke only a
    // token issued to it, which it must present whole.
    let client = match authenticate_client(&state, &req, &p).await {
        Ok(c) => c,
        Err(e) => return e.response(),
    };
    let Some(token) = get(&p, "token") else { return oauth_error(400, "invalid_request", "token is missing") };
    if let Some((gid, mut g, v)) = grant_of(&state, token) {
        // RFC 7009 2.1: a client may revoke only its own tokens; others are ignored.
        if g.client_id == client.client_id && !g.revoked {
            g.revoked = true;
            if let Err(e) = store::put(&state.repo, store::GRANT, &gid, &g, Some(v)).await {
                return oauth_error(503, "temporarily_unavailable", &e.issues[0].diagnostics);
            }
        }
    }
    // RFC 7009 2.2: an invalid token is answered 200 as well; it changes nothing.
    let mut b = HttpResponse::Ok();
    cors(&mut b);
    b.finish()
}

async fn introspect(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let p = form_pairs(&body);
    // RFC 7662 2.1: the caller must be authorized; a client, or a system-scoped bearer.
    let bearer =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).filter(|v| v.starts_with("Bearer "));
    if let Some(b) = bearer {
        match state.auth.caller(&state.search, Some(b), None).await {
            Ok(c) if c.scopes.iter().any(|s| s.context == scopes::Context::System) => {}
            _ => {
                return oauth_error(
                    401,
                    "invalid_client",
                    "introspection needs client authentication or a system-scoped token",
                )
            }
        }
    } else {
        match authenticate_client(&state, &req, &p).await {
            Err(e) => return e.response(),
            // A public client's bare client_id proves nothing.
            Ok(c) if c.token_endpoint_auth_method == "none" => {
                return oauth_error(
                    401,
                    "invalid_client",
                    "introspection needs client authentication (a client secret or a private_key_jwt assertion) \
                     or a system-scoped bearer token",
                )
            }
            Ok(_) => {}
        }
    }
    let Some(token) = get(&p, "token") else { return oauth_error(400, "invalid_request", "token is missing") };
    let inactive = || json_ok(&json!({"active": false}));
    if jose::peek(token).is_ok() {
        let Ok(c) = state.auth.caller(&state.search, Some(&format!("Bearer {token}")), None).await else {
            return inactive();
        };
        let cl = &c.claims;
        let mut v = json!({"active": true, "scope": cl.scope, "client_id": cl.client_id, "sub": cl.sub, "exp": cl.exp,
                           "iss": state.auth.public_url, "aud": state.auth.public_url, "token_type": "Bearer"});
        for (k, x) in [("patient", &cl.patient), ("fhirUser", &cl.fhir_user), ("encounter", &cl.encounter)] {
            if let Some(x) = x {
                v[k] = json!(x);
            }
        }
        return json_ok(&v);
    }
    let Some((gid, _)) = token.split_once('.') else { return inactive() };
    match store::get::<Grant>(&state.repo, store::GRANT, gid) {
        Ok(Some((g, _)))
            if !g.revoked && g.refresh_sha256.as_deref() == Some(crate::auth::sha256_hex(token).as_str()) =>
        {
            json_ok(
                &json!({"active": true, "scope": g.scope, "client_id": g.client_id, "sub": g.sub, "token_type": "refresh_token"}),
            )
        }
        _ => inactive(),
    }
}

/// A portal session for a user who signed in at `/portal`.
pub fn portal_cookie(auth: &Auth, user_id: String, user: User) -> actix_web::cookie::Cookie<'static> {
    session_cookie(auth, &Session::new(user_id, &user))
}
