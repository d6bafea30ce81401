//! The token endpoint: client authentication (secret or `private_key_jwt`, the JWKS fetched
//! when registered by URL), the authorization code (PKCE), refresh and client credentials
//! grants, and the access and id tokens they issue. Apart from authorize as the app's
//! back-channel; revocation and introspection reuse its client authentication.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::authorize::{linked_patient, related_person_permitted, Code};
use super::{get, json_ok, oauth_error};
use crate::api::AppState;
use crate::auth::jose::{self, Alg};
use crate::auth::scopes::{self, Holder, UserKind};
use crate::auth::store::{self, Client, Grant};
use crate::auth::{seal, Auth};
use crate::error::FhirError;

const ASSERTION_MAX_S: i64 = 300;
const BACKEND_TTL_S: i64 = 300;

/// An RFC 6749 error, turned into a response where it is answered.
pub(super) struct OAuthError {
    status: u16,
    error: &'static str,
    why: String,
}

impl OAuthError {
    pub(super) fn response(&self) -> HttpResponse {
        oauth_error(self.status, self.error, &self.why)
    }
}

/// The client a token-endpoint request authenticates as (RFC 6749 2.3, RFC 7523).
pub(super) async fn authenticate_client(
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
        let decoded = crate::codec::unb64(basic.trim()).map_err(|_| bad("malformed Basic credentials"))?;
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

pub(super) async fn token(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    if !state.auth.enabled {
        return oauth_error(404, "not_found", "authorization is off on this server");
    }
    let p = crate::codec::parse_form(&body);
    let client = match authenticate_client(&state, &req, &p).await {
        Ok(c) => c,
        Err(e) => return e.response(),
    };
    let grant = get(&p, "grant_type");
    let res = match grant {
        Some("authorization_code") => code_grant(&state, &client, &p).await,
        Some("refresh_token") => refresh_grant(&state, &client, &p).await,
        Some("client_credentials") => client_credentials(&state, &client, &p).await,
        other => Ok(oauth_error(400, "unsupported_grant_type", &format!("grant_type {other:?} is not supported"))),
    }
    .unwrap_or_else(|e| oauth_error(503, "temporarily_unavailable", &e.issues[0].diagnostics));
    if let (true, Some(g)) = (res.status().is_success(), grant) {
        metrics::counter!(crate::telemetry::TOKENS_ISSUED, "grant" => g.to_string()).increment(1);
    }
    res
}

fn invalid_grant(why: &str) -> HttpResponse {
    tracing::warn!("token endpoint: invalid_grant: {why}");
    oauth_error(400, "invalid_grant", why)
}

async fn code_grant(state: &AppState, client: &Client, p: &[(String, String)]) -> Result<HttpResponse, FhirError> {
    let auth = &state.auth;
    let code: Code = match get(p, "code").map(|c| seal::open(&auth.seal_key, "code", c)) {
        Some(Ok(c)) => c,
        Some(Err(why)) => return Ok(invalid_grant(&format!("the code is {why}"))),
        None => return Ok(invalid_grant("code is missing")),
    };
    if code.client_id != client.client_id {
        return Ok(invalid_grant("the code was issued to another client"));
    }
    match get(p, "redirect_uri") {
        Some(r) if r != code.redirect_uri => {
            return Ok(invalid_grant("redirect_uri differs from the authorization request's"))
        }
        None if code.redirect_given => {
            return Ok(invalid_grant("redirect_uri is required: the authorization request had one (RFC 6749 4.1.3)"))
        }
        _ => {}
    }
    let verifier = get(p, "code_verifier").unwrap_or("");
    let computed = crate::codec::b64url(&Sha256::digest(verifier.as_bytes()));
    if verifier.is_empty() || computed != code.code_challenge {
        return Ok(invalid_grant("code_verifier does not match the code_challenge (PKCE)"));
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
        Err(e) if e.status() == 409 => return Ok(invalid_grant("the code was already used")),
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
    let Some(presented) = get(p, "refresh_token") else { return Ok(invalid_grant("refresh_token is missing")) };
    let Some((grant_id, _)) = presented.split_once('.') else {
        return Ok(invalid_grant("not a refresh token of this server"));
    };
    let Some((mut grant, version)) = store::get::<Grant>(&state.repo, store::GRANT, grant_id)? else {
        return Ok(invalid_grant("unknown refresh token"));
    };
    if grant.client_id != client.client_id {
        return Ok(invalid_grant("the refresh token was issued to another client"));
    }
    if grant.revoked {
        return Ok(invalid_grant("the grant has been revoked"));
    }
    if grant.refresh_sha256.as_deref() != Some(crate::auth::sha256_hex(presented).as_str()) {
        // A rotated-out refresh token came back: someone holds a copy. Revoke the whole grant
        // (OAuth 2.0 Security BCP, 4.14.2).
        grant.revoked = true;
        store::put(&state.repo, store::GRANT, grant_id, &grant, Some(version)).await?;
        tracing::warn!("refresh token reuse on grant {grant_id}: grant revoked");
        return Ok(invalid_grant("this refresh token was already used; the grant is revoked"));
    }
    if let Some(c) = &grant.consent {
        let id = c.strip_prefix("Consent/").unwrap_or(c);
        // The same rule as every request's token check: active and within its period.
        let idx = state.search.current()?;
        let active = crate::auth::caller::consent_active(&idx, id);
        drop(idx);
        if !active {
            return Ok(invalid_grant("the patient withdrew the consent this grant rests on"));
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
                return Ok(invalid_grant("the related person is no longer linked to or permitted by the patient"));
            }
        }
    }
    let next = format!("{grant_id}.{}", crate::auth::random_id());
    grant.refresh_sha256 = Some(crate::auth::sha256_hex(&next));
    grant.rotated += 1;
    match store::put(&state.repo, store::GRANT, grant_id, &grant, Some(version)).await {
        Ok(()) => {}
        Err(e) if e.status() == 412 => return Ok(invalid_grant("the refresh token was used concurrently")),
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
