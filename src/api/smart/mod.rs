//! The OAuth 2 / SMART App Launch endpoints: this file holds the route table, CORS and the
//! small response and form helpers they share. Each endpoint family is a file of its own
//! (`discovery`, `authorize` with the sign-in `session` it shares with the portal, `token`,
//! `revoke` with introspection), so each reads without the others.

pub(crate) mod authorize;
mod discovery;
pub mod pages;
mod revoke;
pub(crate) mod session;
mod token;

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/.well-known/smart-configuration", web::get().to(discovery::smart_configuration))
        .route("/.well-known/smart-configuration", web::method(actix_web::http::Method::OPTIONS).to(preflight))
        .route("/auth/jwks", web::get().to(discovery::jwks))
        .route("/auth/authorize", web::get().to(authorize::authorize_get))
        .route("/auth/authorize", web::post().to(authorize::authorize_post))
        .route("/auth/login", web::post().to(authorize::login))
        .route("/auth/consent", web::post().to(authorize::consent))
        .route("/auth/token", web::post().to(token::token))
        .route("/auth/token", web::method(actix_web::http::Method::OPTIONS).to(preflight))
        .route("/auth/revoke", web::post().to(revoke::revoke))
        .route("/auth/introspect", web::post().to(revoke::introspect));
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
fn oauth_error(status: u16, error: &'static str, description: &str) -> HttpResponse {
    metrics::counter!(crate::telemetry::AUTH_REFUSALS, "reason" => error).increment(1);
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

fn get<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty())
}

fn redirect_with(uri: &str, params: &[(&str, &str)]) -> HttpResponse {
    let q: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", crate::api::resource::enc(v))).collect();
    let sep = if uri.contains('?') { '&' } else { '?' };
    HttpResponse::Found().insert_header((header::LOCATION, format!("{uri}{sep}{}", q.join("&")))).finish()
}
