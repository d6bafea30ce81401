//! Registering clients and user accounts, and minting EHR launch contexts: `/admin/auth/...`
//! under the node's admin token (the `fhir-ledger auth` CLI calls these).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::admin::Administrator;
use crate::api::smart::authorize::Launch;
use crate::api::AppState;
use crate::auth::store::{self, Client, User};
use crate::auth::{scopes, seal};
use crate::error::{ErrorCode, FhirError};

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/admin/auth")
            .route("/clients", web::post().to(add_client))
            .route("/clients", web::get().to(list_clients))
            .route("/clients/{id}", web::delete().to(delete_client))
            .route("/users", web::post().to(add_user))
            .route("/launch", web::post().to(launch)),
    );
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, FhirError> {
    serde_json::from_slice(body).map_err(|e| FhirError::invalid(format!("malformed request body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewClient {
    client_name: String,
    #[serde(default)]
    redirect_uris: Vec<String>,
    #[serde(default = "default_method")]
    token_endpoint_auth_method: String,
    scope: Option<String>,
    jwks: Option<Value>,
    jwks_uri: Option<String>,
    actor: Option<String>,
    #[serde(default)]
    consent_required: bool,
    #[serde(default)]
    grant_types: Vec<String>,
}

fn default_method() -> String {
    "none".into()
}

async fn add_client(_: Administrator, body: web::Bytes, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let n: NewClient = parse(&body)?;
    if n.client_name.trim().is_empty() {
        return Err(FhirError::invalid("client_name is empty").at("client_name"));
    }
    let method = n.token_endpoint_auth_method.as_str();
    if !matches!(method, "none" | "client_secret_basic" | "client_secret_post" | "private_key_jwt") {
        return Err(FhirError::invalid(format!("token_endpoint_auth_method {method:?} is not supported"))
            .at("token_endpoint_auth_method"));
    }
    for u in &n.redirect_uris {
        if !(u.starts_with("https://") || u.starts_with("http://")) || u.contains('#') {
            return Err(FhirError::invalid(format!(
                "redirect_uri {u:?} must be an absolute http(s) URL without a fragment"
            ))
            .at("redirect_uris"));
        }
    }
    if method == "none" && n.redirect_uris.is_empty() {
        return Err(FhirError::invalid("an app that signs users in needs redirect_uris").at("redirect_uris"));
    }
    if let Some(s) = &n.scope {
        scopes::parse_all(s).map_err(|e| FhirError::invalid(e).at("scope"))?;
    }
    if method == "private_key_jwt" {
        match (&n.jwks, &n.jwks_uri) {
            (Some(j), _) => {
                let keys = j
                    .get("keys")
                    .and_then(Value::as_array)
                    .ok_or_else(|| FhirError::invalid("jwks has no keys array").at("jwks"))?;
                for k in keys {
                    crate::auth::jose::from_jwk(k).map_err(|e| FhirError::invalid(format!("jwks: {e}")).at("jwks"))?;
                }
            }
            (None, Some(_)) => {}
            (None, None) => return Err(FhirError::invalid("private_key_jwt needs jwks or jwks_uri").at("jwks")),
        }
    }
    // RFC 7591 clients send grant_types; the auth method decides which grants work.
    let _ = n.grant_types;
    let client_id = uuid::Uuid::new_v4().to_string();
    let secret = (method == "client_secret_basic" || method == "client_secret_post").then(crate::auth::random_id);
    let client = Client {
        client_id: client_id.clone(),
        client_name: n.client_name,
        redirect_uris: n.redirect_uris,
        token_endpoint_auth_method: if method == "client_secret_post" {
            "client_secret_basic".into()
        } else {
            method.into()
        },
        secret_sha256: secret.as_deref().map(crate::auth::sha256_hex),
        jwks: n.jwks,
        jwks_uri: n.jwks_uri,
        scope: n.scope,
        actor: n.actor,
        consent_required: n.consent_required,
    };
    store::put(&state.repo, store::CLIENT, &client_id, &client, Some(0)).await?;
    let mut v = serde_json::to_value(&client).map_err(FhirError::internal)?;
    if let Some(obj) = v.as_object_mut() {
        obj.remove("secret_sha256");
    }
    if let Some(s) = secret {
        v["client_secret"] = json!(s);
    }
    Ok(HttpResponse::Created().content_type("application/json").body(v.to_string()))
}

async fn list_clients(_: Administrator, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let clients: Vec<(String, Client)> = store::all(&state.search, store::CLIENT)?;
    let out: Vec<Value> = clients
        .into_iter()
        .map(|(_, c)| {
            json!({"client_id": c.client_id, "client_name": c.client_name, "redirect_uris": c.redirect_uris,
                              "token_endpoint_auth_method": c.token_endpoint_auth_method, "scope": c.scope})
        })
        .collect();
    Ok(HttpResponse::Ok().content_type("application/json").body(Value::Array(out).to_string()))
}

async fn delete_client(
    _: Administrator,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let id = path.into_inner();
    if store::delete(&state.repo, store::CLIENT, &id).await? {
        Ok(HttpResponse::NoContent().finish())
    } else {
        Err(FhirError::not_found(&format!("client {id}")))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    password: String,
    #[serde(rename = "fhirUser")]
    fhir_user: String,
}

async fn add_user(_: Administrator, body: web::Bytes, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let n: NewUser = parse(&body)?;
    if n.username.trim().is_empty() || n.password.len() < 8 {
        return Err(FhirError::invalid("username must not be empty and password must have at least 8 characters"));
    }
    let (t, id) =
        n.fhir_user.split_once('/').ok_or_else(|| FhirError::invalid("fhirUser must be Type/id").at("fhirUser"))?;
    if !matches!(t, "Patient" | "Practitioner" | "RelatedPerson" | "PractitionerRole") {
        return Err(FhirError::invalid("fhirUser must be a Patient, Practitioner, PractitionerRole or RelatedPerson")
            .at("fhirUser"));
    }
    if !crate::fhir::is_valid_id(id) {
        return Err(FhirError::invalid(format!("{id:?} is not a valid id")).at("fhirUser"));
    }
    let password = n.password.clone();
    let hash = web::block(move || store::hash_password(&password)).await.map_err(FhirError::internal)??;
    let user = User { username: n.username.clone(), password_hash: hash, fhir_user: n.fhir_user.clone() };
    store::put(&state.repo, store::USER, &state.auth.user_id(&n.username), &user, Some(0)).await.map_err(|e| {
        if e.status() == 409 {
            FhirError::new(ErrorCode::Duplicate, format!("user {:?} exists already", n.username))
        } else {
            e
        }
    })?;
    Ok(HttpResponse::Created()
        .content_type("application/json")
        .body(json!({"username": n.username, "fhirUser": n.fhir_user}).to_string()))
}

async fn launch(_: Administrator, body: web::Bytes, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let l: Launch = parse(&body)?;
    let sealed = seal::seal(&state.auth.seal_key, "launch", 600, &l);
    Ok(HttpResponse::Created().content_type("application/json").body(json!({"launch": sealed}).to_string()))
}
