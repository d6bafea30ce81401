//! Revocation (RFC 7009) and introspection (RFC 7662) of a token a client holds, each by
//! looking its grant up on the ledger. They issue nothing, so they sit apart from the token
//! endpoint, whose client authentication they reuse.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::token::authenticate_client;
use super::{cors, get, json_ok, oauth_error};
use crate::api::AppState;
use crate::auth::jose::{self, Alg};
use crate::auth::scopes;
use crate::auth::store::{self, Grant};

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

pub(super) async fn revoke(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let p = crate::codec::parse_form(&body);
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

pub(super) async fn introspect(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let p = crate::codec::parse_form(&body);
    // RFC 7662 2.1: the caller must be authorized; a client, or a system-scoped bearer.
    let bearer =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).filter(|v| v.starts_with("Bearer "));
    if let Some(b) = bearer {
        match state.auth.caller(&state.search, Some(b), None, None).await {
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
        let Ok(c) = state.auth.caller(&state.search, Some(&format!("Bearer {token}")), None, None).await else {
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
