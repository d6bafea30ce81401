//! Discovery: `/.well-known/smart-configuration` and the JWKS that access and id tokens
//! verify against. Public, stateless documents, apart from the flows that use them.

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::{json_ok, oauth_error};
use crate::api::AppState;
use crate::auth::scopes;
use crate::auth::Auth;

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

fn configuration(auth: &Auth) -> Value {
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

pub(super) async fn smart_configuration(state: web::Data<AppState>) -> HttpResponse {
    if !state.auth.enabled {
        return oauth_error(404, "not_found", "authorization is off on this server (--auth off)");
    }
    json_ok(&configuration(&state.auth))
}

pub(super) async fn jwks(state: web::Data<AppState>) -> HttpResponse {
    if !state.auth.enabled {
        return oauth_error(404, "not_found", "authorization is off on this server");
    }
    json_ok(&state.auth.jwks())
}
