//! The browser session and sign-in: the sealed session cookie, its CSRF token, the refusal
//! of forged form posts and the throttled password check. Shared by the authorize pages and
//! the patient portal (`api/portal.rs`), so it stands apart from the OAuth flow.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use super::{get, pages};
use crate::api::AppState;
use crate::auth::store::{self, User};
use crate::auth::{seal, Auth};
use crate::error::FhirError;

const SESSION_COOKIE: &str = "fl_session";
const SESSION_TTL_S: i64 = 8 * 3600;

pub(crate) fn html(status: u16, body: String) -> HttpResponse {
    HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("X-Frame-Options", "DENY"))
        .content_type("text/html; charset=utf-8")
        .body(body)
}

#[derive(Serialize, Deserialize)]
pub(super) struct Session {
    pub(super) user_id: String,
    pub(super) username: String,
    pub(super) fhir_user: String,
    /// Random per sign-in: the CSRF token of the session's forms derives from it.
    #[serde(default)]
    nonce: String,
}

impl Session {
    pub(super) fn new(user_id: String, user: &User) -> Self {
        Session {
            user_id,
            username: user.username.clone(),
            fhir_user: user.fhir_user.clone(),
            nonce: crate::auth::random_id(),
        }
    }

    pub(super) fn csrf(&self, auth: &Auth) -> String {
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
pub(crate) fn session_csrf(auth: &Auth, req: &HttpRequest) -> Option<String> {
    session_of(auth, req).map(|s| s.csrf(auth))
}

pub(super) fn session_of(auth: &Auth, req: &HttpRequest) -> Option<Session> {
    let c = req.cookie(SESSION_COOKIE)?;
    seal::open(&auth.seal_key, "session", c.value()).ok()
}

pub(crate) fn session_user(auth: &Auth, req: &HttpRequest) -> Option<(String, String)> {
    session_of(auth, req).map(|s| (s.username, s.fhir_user))
}

pub(super) fn session_cookie(auth: &Auth, s: &Session) -> actix_web::cookie::Cookie<'static> {
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
fn check_login(state: &AppState, username: &str, password: &str) -> Result<Option<(String, User)>, FhirError> {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let id = state.auth.user_id(username);
    let user: Option<(User, u64)> = store::get(&state.repo, store::USER, &id)?;
    if let Some((u, _)) = user {
        Ok(store::check_password(&u.password_hash, password).then_some((id, u)))
    } else {
        let dummy = DUMMY.get_or_init(|| store::hash_password("fhir-ledger: no such user").unwrap_or_default());
        let _ = store::check_password(dummy, password);
        Ok(None)
    }
}

/// The outcome of a sign-in attempt.
pub(crate) enum SignIn {
    User(String, User),
    Wrong,
    /// Too many failures for the account or from the source: retry after this many seconds.
    Throttled(i64),
}

/// A sign-in, throttled per account and per source address (see `throttle.rs`): refused
/// without a password check while either is over the limit.
pub(crate) async fn sign_in(
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
pub(crate) fn throttled(wait: i64, request: &str, action: &str) -> HttpResponse {
    let mut r =
        html(429, pages::login("fhir-ledger", request, Some("Too many failed sign-ins. Try again later."), action));
    r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from(wait.max(1)));
    r
}

/// A portal session for a user who signed in at `/portal`.
pub(crate) fn portal_cookie(auth: &Auth, user_id: String, user: &User) -> actix_web::cookie::Cookie<'static> {
    session_cookie(auth, &Session::new(user_id, user))
}
