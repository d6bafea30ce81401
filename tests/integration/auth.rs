//! SMART-on-FHIR authorization of real `fhir-ledger serve --auth smart` processes, written
//! against the HTTP contract in src/auth/CONTRACT.md: the authorization-code flow with PKCE
//! driven by the `oauth2` crate (id_token verified against /auth/jwks, refresh rotation and
//! reuse detection), backend services with RS384 and ES384 client assertions, forged, expired
//! and revoked tokens (each refusal logged), the scope matrix (SMART v1 and v2, a v2 query
//! restriction, patient / user / system scopes, EHR launch), and Consent: a deny for one
//! practitioner, break the glass, and the patient's access report.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthUrl, AuthorizationCode, ClientId, CsrfToken, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl,
    RequestTokenError, Scope, StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use reqwest::Method;
use serde_json::{json, Value};

use crate::smart::{
    self, access_token, approve, assert_invalid_token, fhir, get, parse_jwt, put_resource, send, user_token, Backend,
    ClientKey, Login, Resp, SmartServer, REDIRECT,
};

const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";
const LAB: &str = "laboratory";
const VITAL: &str = "vital-signs";
/// A SMART v2 scope with a query restriction: laboratory results only.
const LAB_ONLY: &str =
    "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
const NONE: &[&str] = &[];

fn observation(id: Option<&str>, patient: &str, category: &str) -> Value {
    let (code, display) = if category == LAB { ("2345-7", "Glucose") } else { ("8867-4", "Heart rate") };
    let mut v = json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{ "coding": [{ "system": CATEGORY, "code": category }] }],
        "code": { "coding": [{ "system": "http://loinc.org", "code": code, "display": display }] },
        "subject": { "reference": format!("Patient/{patient}") },
        "valueQuantity": { "value": 90, "unit": "1", "system": "http://unitsofmeasure.org", "code": "1" },
    });
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

fn practitioner(id: &str) -> Value {
    json!({ "resourceType": "Practitioner", "id": id, "name": [{ "family": format!("Doctor-{id}") }] })
}

fn encounter(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Encounter",
        "id": id,
        "status": "finished",
        "class": { "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB" },
        "subject": { "reference": format!("Patient/{patient}") },
    })
}

/// Asserts a 403 OperationOutcome with an issue of code `forbidden`.
fn assert_forbidden(r: &Resp, what: &str) {
    assert_eq!(r.status, 403, "{what}: {}", r.text);
    let oo = r.json();
    assert_eq!(oo["resourceType"], "OperationOutcome", "{what}: {oo}");
    assert!(oo["issue"].as_array().into_iter().flatten().any(|i| i["code"] == "forbidden"), "{what}: {oo}");
}

/// `Type/id` of the entries of a searchset with `search.mode` = `mode`, sorted.
fn entries(bundle: &Value, mode: &str) -> Vec<String> {
    let mut v: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == mode)
        .map(|e| {
            let r = &e["resource"];
            format!("{}/{}", r["resourceType"].as_str().unwrap_or_default(), r["id"].as_str().unwrap_or_default())
        })
        .collect();
    v.sort();
    v
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

/// Every `code` string anywhere under `v` (codings of a CodeableConcept, a list of them, ...).
fn codes(v: &Value) -> Vec<String> {
    match v {
        Value::Object(o) => o
            .iter()
            .flat_map(|(k, x)| match (k.as_str(), x) {
                ("code", Value::String(c)) => vec![c.clone()],
                _ => codes(x),
            })
            .collect(),
        Value::Array(a) => a.iter().flat_map(codes).collect(),
        _ => vec![],
    }
}

/// `grant_type=refresh_token` for a public client.
async fn refresh(http: &reqwest::Client, base: &str, client_id: &str, refresh_token: &str) -> Resp {
    let form = [("grant_type", "refresh_token"), ("refresh_token", refresh_token), ("client_id", client_id)];
    send(http.post(format!("{base}/auth/token")).form(&form)).await
}

// ---------------------------------------------------------------------------------------------
// The authorization-code flow through the oauth2 crate

/// The SMART fields of a token response beyond RFC 6749.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
struct SmartFields {
    patient: Option<String>,
    encounter: Option<String>,
    id_token: Option<String>,
    consent: Option<String>,
}

impl oauth2::ExtraTokenFields for SmartFields {}

type SmartTokenResponse = StandardTokenResponse<SmartFields, BasicTokenType>;

type SmartClient = oauth2::Client<
    BasicErrorResponse,
    SmartTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
>;

fn assert_invalid_grant<T: std::fmt::Debug, E: std::error::Error + 'static>(
    result: Result<T, RequestTokenError<E, BasicErrorResponse>>,
    what: &str,
) {
    match result {
        Err(RequestTokenError::ServerResponse(e)) => {
            assert_eq!(e.error(), &BasicErrorResponseType::InvalidGrant, "{what}: {e}");
        }
        other => panic!("{what}: expected invalid_grant, got {other:?}"),
    }
}

/// `params` with `name` set to `value` (None: left out).
fn tweak<'a>(params: &[(&'a str, &'a str)], name: &str, value: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    params.iter().filter_map(|&(k, v)| if k == name { value.map(|nv| (k, nv)) } else { Some((k, v)) }).collect()
}

/// The oauth2 crate builds the authorize URL (PKCE S256, `aud`, `nonce`) and exchanges the
/// code; the scripted browser logs in as a patient user and approves. The token response
/// carries the patient context, a Consent and an RS256 id_token that verifies against
/// /auth/jwks; the access token reads the patient's own record and nothing of another
/// patient's; the refresh token rotates and replaying the old one kills the whole grant; a
/// code is single use and bound to its verifier; authorize without S256 PKCE (or with a wrong
/// `aud`) redirects with `invalid_request`, and never to an unregistered redirect URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_code_with_pkce_via_oauth2_crate() {
    let s = SmartServer::start(&[]);
    let (http, base) = (&s.http, s.base.as_str());

    // Discovery: JSON whatever Accept, CORS, the endpoints under the public URL, S256 only.
    let r = send(http.get(s.url("/.well-known/smart-configuration")).header("accept", "text/html")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.header("content-type").starts_with("application/json"), "{}", r.header("content-type"));
    assert_eq!(r.header("access-control-allow-origin"), "*");
    let conf = r.json();
    assert_eq!(conf["authorization_endpoint"], s.url("/auth/authorize"), "{conf}");
    assert_eq!(conf["token_endpoint"], s.url("/auth/token"), "{conf}");
    assert_eq!(conf["jwks_uri"], s.url("/auth/jwks"), "{conf}");
    assert_eq!(conf["code_challenge_methods_supported"], json!(["S256"]), "{conf}");

    let sys = s.system_token("system/*.cruds").await;
    for id in ["pat-a", "pat-b"] {
        put_resource(http, base, &sys, &smart::patient(id)).await;
    }
    let ceiling = "launch/patient openid fhirUser offline_access patient/*.rs";
    let client_id = s.admin.public_client("PKCE App", Some(ceiling)).await;
    s.admin.user("alice", "Patient/pat-a").await;

    let client = SmartClient::new(ClientId::new(client_id.clone()))
        .set_auth_uri(AuthUrl::new(s.url("/auth/authorize")).expect("authorize URL"))
        .set_token_uri(TokenUrl::new(s.url("/auth/token")).expect("token URL"))
        .set_redirect_uri(RedirectUrl::new(REDIRECT.to_string()).expect("redirect URL"));
    let scopes = ["launch/patient", "openid", "fhirUser", "offline_access", "patient/*.rs"];
    let nonce = smart::random_hex(12);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let verifier_secret = verifier.secret().clone();
    let (url, csrf) = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(scopes.iter().map(|sc| Scope::new(sc.to_string())))
        .add_extra_param("aud", base.to_string())
        .add_extra_param("nonce", nonce.clone())
        .set_pkce_challenge(challenge)
        .url();
    assert!(url.as_str().contains("code_challenge_method=S256"), "{url}");
    let approval = approve(http, base, url.as_str(), &Login::new("alice")).await;
    assert_eq!(&approval.state, csrf.secret());
    assert_eq!(approval.offered, scopes, "one checkbox per requested scope, in request order");

    let token = client
        .exchange_code(AuthorizationCode::new(approval.code.clone()))
        .set_pkce_verifier(verifier)
        .request_async(http)
        .await
        .expect("the code exchange");
    assert_eq!(token.token_type(), &BasicTokenType::Bearer);
    let fields = token.extra_fields();
    assert_eq!(fields.patient.as_deref(), Some("pat-a"), "{token:?}");
    assert_eq!(fields.encounter, None, "a standalone launch has no encounter: {token:?}");
    let consent = fields.consent.clone().expect("a patient's approval is recorded as a Consent");
    assert!(consent.starts_with("Consent/"), "{consent}");
    let granted: Vec<String> = token.scopes().into_iter().flatten().map(|sc| sc.as_str().to_string()).collect();
    assert!(granted.iter().any(|sc| sc == "patient/*.rs"), "{granted:?}");
    let at1 = token.access_token().secret().clone();
    let rt1 = token.refresh_token().expect("offline_access gives a refresh token").clone();

    // The access token: an EdDSA at+jwt for the public URL, in the patient's context.
    let jwt = parse_jwt(&at1);
    assert_eq!(jwt.header["alg"], "EdDSA", "{}", jwt.header);
    assert_eq!(jwt.header["typ"], "at+jwt", "{}", jwt.header);
    assert_eq!(jwt.claims["iss"], base, "{}", jwt.claims);
    assert!(smart::aud_has(&jwt.claims["aud"], base), "{}", jwt.claims);
    assert_eq!(jwt.claims["client_id"], client_id.as_str(), "{}", jwt.claims);
    assert_eq!(jwt.claims["patient"], "pat-a", "{}", jwt.claims);
    assert!(jwt.claims["fhirUser"].as_str().is_some_and(|u| u.ends_with("Patient/pat-a")), "{}", jwt.claims);
    assert!(!jwt.claims["consent"].is_null(), "{}", jwt.claims);

    // The id_token: RS256, signed by the RSA key in /auth/jwks, about the user, for the app.
    let id_token = fields.id_token.clone().expect("openid + fhirUser give an id_token");
    let idt = parse_jwt(&id_token);
    assert_eq!(idt.header["alg"], "RS256", "{}", idt.header);
    let jwks = send(http.get(s.url("/auth/jwks"))).await;
    assert_eq!(jwks.status, 200, "{}", jwks.text);
    let jwks = jwks.json();
    let jwk = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["kty"] == "RSA" && (idt.header["kid"].is_null() || k["kid"] == idt.header["kid"]))
        .unwrap_or_else(|| panic!("no RSA key for the id_token {} in {jwks}", idt.header));
    let n = rsa::BigUint::from_bytes_be(&smart::unb64(jwk["n"].as_str().expect("n")));
    let e = rsa::BigUint::from_bytes_be(&smart::unb64(jwk["e"].as_str().expect("e")));
    let rsa_key = rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(rsa::RsaPublicKey::new(n, e).expect("RSA key"));
    let signature = rsa::pkcs1v15::Signature::try_from(idt.signature.as_slice()).expect("an RSA signature");
    {
        use rsa::signature::Verifier;
        rsa_key.verify(idt.signing_input.as_bytes(), &signature).expect("the id_token verifies against /auth/jwks");
        let altered = format!("{}x", idt.signing_input);
        assert!(rsa_key.verify(altered.as_bytes(), &signature).is_err(), "the check can fail");
    }
    let claims = &idt.claims;
    assert!(claims["fhirUser"].as_str().is_some_and(|u| u.ends_with("Patient/pat-a")), "{claims}");
    assert!(smart::aud_has(&claims["aud"], &client_id), "an id_token is for the app: {claims}");
    assert_eq!(claims["iss"], conf["issuer"], "{claims}");
    assert_eq!(claims["nonce"], nonce.as_str(), "the nonce comes back: {claims}");
    assert!(claims["exp"].as_i64().is_some_and(|exp| exp > smart::now()), "{claims}");

    // The patient's own record, and another patient's is as missing as a missing one.
    let r = get(http, &s.url("Patient/pat-a"), &at1).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["id"], "pat-a");
    let r = get(http, &s.url("Patient/pat-b"), &at1).await;
    assert_eq!(r.status, 404, "{}", r.text);

    // Refresh: a new access token and a new refresh token.
    let refreshed = client.exchange_refresh_token(&rt1).request_async(http).await.expect("refresh");
    let at2 = refreshed.access_token().secret().clone();
    let rt2 = refreshed.refresh_token().expect("a rotated refresh token").clone();
    assert_ne!(rt2.secret(), rt1.secret(), "the refresh token rotates");
    assert_eq!(refreshed.extra_fields().patient.as_deref(), Some("pat-a"));
    let r = get(http, &s.url("Patient/pat-a"), &at2).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The rotated-out refresh token: 400 invalid_grant, and the whole grant is revoked.
    let r = refresh(http, base, &client_id, rt1.secret()).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    for (what, at) in [("the first access token", &at1), ("the refreshed access token", &at2)] {
        assert_invalid_token(&get(http, &s.url("Patient/pat-a"), at).await, what);
    }
    let r = client.exchange_refresh_token(&rt2).request_async(http).await;
    assert_invalid_grant(r, "the newest refresh token of a revoked grant");

    // A code is single use.
    let r = client
        .exchange_code(AuthorizationCode::new(approval.code.clone()))
        .set_pkce_verifier(PkceCodeVerifier::new(verifier_secret))
        .request_async(http)
        .await;
    assert_invalid_grant(r, "a second exchange of the same code");

    // A code is bound to its challenge. (The browser still has its session: consent directly.)
    let (challenge, _right) = PkceCodeChallenge::new_random_sha256();
    let (url, _) = client
        .authorize_url(CsrfToken::new_random)
        .add_scope(Scope::new("launch/patient".to_string()))
        .add_scope(Scope::new("patient/*.rs".to_string()))
        .add_extra_param("aud", base.to_string())
        .set_pkce_challenge(challenge)
        .url();
    let login = Login { session: Some(approval.session.as_str()), ..Login::new("alice") };
    let again = approve(http, base, url.as_str(), &login).await;
    let (_, wrong) = PkceCodeChallenge::new_random_sha256();
    let r = client.exchange_code(AuthorizationCode::new(again.code)).set_pkce_verifier(wrong).request_async(http).await;
    assert_invalid_grant(r, "a code_verifier that does not match the code_challenge");

    // Authorize errors after the client and redirect URI are known go back to the app.
    let (_, challenge) = smart::pkce();
    let good: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", client_id.as_str()),
        ("redirect_uri", REDIRECT),
        ("scope", "launch/patient patient/*.rs"),
        ("state", "st-1"),
        ("aud", base),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let authorize = format!("{base}/auth/authorize");
    for (what, params) in [
        ("no code_challenge", tweak(&good, "code_challenge", None)),
        ("code_challenge_method=plain", tweak(&good, "code_challenge_method", Some("plain"))),
        ("an aud that is not this server", tweak(&good, "aud", Some("http://127.0.0.1:1/fhir"))),
    ] {
        let url = reqwest::Url::parse_with_params(&authorize, &params).expect("authorize URL");
        let r = send(http.get(url)).await;
        assert_eq!(r.status, 302, "{what}: {}", r.text);
        let location = r.header("location");
        assert!(location.starts_with(REDIRECT), "{what}: {location}");
        let to = reqwest::Url::parse(&location).expect("Location");
        assert_eq!(smart::query_param(&to, "error").as_deref(), Some("invalid_request"), "{what}: {location}");
        assert_eq!(smart::query_param(&to, "state").as_deref(), Some("st-1"), "{what}: {location}");
    }
    for (what, params) in [
        ("an unregistered redirect_uri", tweak(&good, "redirect_uri", Some("http://127.0.0.1:9/elsewhere"))),
        ("an unknown client", tweak(&good, "client_id", Some("no-such-client"))),
    ] {
        let url = reqwest::Url::parse_with_params(&authorize, &params).expect("authorize URL");
        let r = send(http.get(url)).await;
        assert_eq!(r.status, 400, "{what}: a page, never a redirect: {}", r.text);
        assert!(r.header("location").is_empty(), "{what}: {}", r.header("location"));
    }
}

// ---------------------------------------------------------------------------------------------
// Backend services

/// A client_credentials token for `scope`, with the response checked.
async fn backend_token(http: &reqwest::Client, b: &Backend, scope: &str) -> String {
    let r = b.request(http, scope, &b.assertion()).await;
    assert_eq!(r.status, 200, "{} client_credentials {scope}: {}", b.key.alg(), r.text);
    let v = r.json();
    assert_eq!(v["token_type"], "Bearer", "{v}");
    assert_eq!(v["expires_in"], 300, "{v}");
    assert!(v["scope"].as_str().is_some_and(|sc| sc.split(' ').any(|x| x == scope)), "{v}");
    access_token(&v)
}

/// Two backend-services clients with inline JWKS, one RS384 (RSA 2048) and one ES384
/// (P-384), sign their own client assertions; their system tokens do what their scopes
/// cover and get 403 for the rest. Replayed `jti`, wrong `aud`, unknown `kid` and a foreign
/// signature are 401 `invalid_client`; the registered scope is a ceiling; introspection
/// tells a live token from garbage; deleting a client kills its tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_services_rs384_and_es384() {
    // (key algorithm, token, method, path, body, expected status)
    type Check<'a> = (&'a str, &'a str, Method, &'a str, Option<&'a Value>, u16);
    // RSA key generation is slow in a debug build: overlap it with the server's start.
    let rsa_key = tokio::task::spawn_blocking(ClientKey::rs384);
    let s = SmartServer::start(&[]);
    let (http, base) = (&s.http, s.base.as_str());
    let seeder = s.system_token("system/*.cruds").await;
    put_resource(http, base, &seeder, &smart::patient("pat-a")).await;
    put_resource(http, base, &seeder, &observation(Some("obs-a-lab"), "pat-a", LAB)).await;

    let rs = Backend::register(&s.admin, rsa_key.await.expect("RSA key generation"), "system/Patient.rs").await;
    let es = Backend::register(&s.admin, ClientKey::es384(), "system/Observation.rs").await;
    let rs_token = backend_token(http, &rs, "system/Patient.rs").await;
    let es_token = backend_token(http, &es, "system/Observation.rs").await;
    assert_eq!(parse_jwt(&rs_token).claims["client_id"], rs.client_id.as_str());

    let new_patient = json!({ "resourceType": "Patient", "name": [{ "family": "New" }] });
    let obs = observation(Some("obs-a-lab"), "pat-a", LAB);
    let checks: Vec<Check> = vec![
        ("RS384", rs_token.as_str(), Method::GET, "Patient/pat-a", None, 200),
        ("RS384", rs_token.as_str(), Method::GET, "Patient?_id=pat-a", None, 200),
        ("RS384", rs_token.as_str(), Method::GET, "Patient/pat-a/_history", None, 200),
        ("RS384", rs_token.as_str(), Method::GET, "Observation/obs-a-lab", None, 403),
        ("RS384", rs_token.as_str(), Method::POST, "Patient", Some(&new_patient), 403),
        ("RS384", rs_token.as_str(), Method::DELETE, "Patient/pat-a", None, 403),
        ("ES384", es_token.as_str(), Method::GET, "Observation/obs-a-lab", None, 200),
        ("ES384", es_token.as_str(), Method::GET, "Observation?subject=Patient/pat-a", None, 200),
        ("ES384", es_token.as_str(), Method::GET, "Patient/pat-a", None, 403),
        ("ES384", es_token.as_str(), Method::PUT, "Observation/obs-a-lab", Some(&obs), 403),
    ];
    for (alg, token, method, path, body, want) in checks {
        let what = format!("{alg} token, {method} {path}");
        let r = fhir(http, method, &s.url(path), Some(token), body).await;
        if want == 403 {
            assert_forbidden(&r, &what);
        } else {
            assert_eq!(r.status, want, "{what}: {}", r.text);
        }
    }

    // The registered scope is a ceiling: asking for more grants no more.
    let r = rs.request(http, "system/Patient.rs system/Observation.rs", &rs.assertion()).await;
    if r.status == 200 {
        let v = r.json();
        assert!(!v["scope"].as_str().unwrap_or_default().contains("Observation"), "beyond the ceiling: {v}");
        let r = get(http, &s.url("Observation/obs-a-lab"), &access_token(&v)).await;
        assert_forbidden(&r, "a scope beyond the client's ceiling");
    } else {
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.json()["error"], "invalid_scope", "{}", r.text);
    }

    // Bad client assertions.
    let replayed = es.assertion();
    let r = es.request(http, "system/Observation.rs", &replayed).await;
    assert_eq!(r.status, 200, "first use of an assertion: {}", r.text);
    let impostor = Backend {
        client_id: es.client_id.clone(),
        key: ClientKey::es384(),
        kid: es.kid.clone(),
        token_url: es.token_url.clone(),
    };
    let jti = || smart::random_hex(16);
    let bad = [
        ("a replayed jti", &es, replayed.clone()),
        ("aud = the FHIR base, not the token endpoint", &rs, rs.assertion_with(&rs.kid, base, &jti(), 240)),
        ("aud = another server", &rs, rs.assertion_with(&rs.kid, "http://127.0.0.1:1/auth/token", &jti(), 240)),
        ("an unknown kid", &rs, rs.assertion_with("no-such-kid", &rs.token_url, &jti(), 240)),
        ("a signature by a key not in the JWKS", &es, impostor.assertion()),
    ];
    for (what, b, assertion) in bad {
        let scope = if b.client_id == rs.client_id { "system/Patient.rs" } else { "system/Observation.rs" };
        let r = b.request(http, scope, &assertion).await;
        assert_eq!(r.status, 401, "{what}: {}", r.text);
        assert_eq!(r.json()["error"], "invalid_client", "{what}: {}", r.text);
    }
    let far = rs.assertion_with(&rs.kid, &rs.token_url, &jti(), 3600);
    let r = rs.request(http, "system/Patient.rs", &far).await;
    assert!(r.status == 400 || r.status == 401, "exp an hour ahead (at most 5 minutes): {}", r.text);
    assert!(r.json()["access_token"].is_null(), "{}", r.text);

    // Introspection with a system token as the caller's credentials.
    let r = send(http.post(s.url("/auth/introspect")).bearer_auth(&seeder).form(&[("token", es_token.as_str())])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(v["client_id"], es.client_id.as_str(), "{v}");
    assert!(v["scope"].as_str().is_some_and(|sc| sc.contains("system/Observation.rs")), "{v}");
    let r = send(http.post(s.url("/auth/introspect")).bearer_auth(&seeder).form(&[("token", "not-a-token")])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["active"], false, "{}", r.text);

    // Deleting a client stops its tokens on the next request, and only its tokens.
    let url = s.url(&format!("/admin/auth/clients/{}", es.client_id));
    let r = send(http.delete(url).bearer_auth(smart::ADMIN_TOKEN)).await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_invalid_token(&get(http, &s.url("Observation/obs-a-lab"), &es_token).await, "a deleted client's token");
    assert_eq!(get(http, &s.url("Patient/pat-a"), &rs_token).await.status, 200, "another client's token");
}

// ---------------------------------------------------------------------------------------------
// Forged and revoked tokens

/// Tokens that are missing, garbage, expired, not yet valid, for another audience or issuer,
/// `alg: none`, HS256 keyed with the public key, tampered with, signed by a stranger, revoked,
/// or of a grant whose rotated-out refresh token was replayed: each is a 401 with
/// `WWW-Authenticate` (`invalid_token` unless the token is missing) and an OperationOutcome,
/// and each refusal is logged as an AuditEvent with outcome 4. The expired and misaddressed
/// tokens are signed with the server's real key, derived from the KEK as CONTRACT.md says
/// (checked: it reproduces a real token's signature, and a re-minted real token is accepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_attacks_are_refused_with_401() {
    let s = SmartServer::start(&[]);
    let (http, base) = (&s.http, s.base.as_str());
    let sys = s.system_token("system/*.cruds").await;
    for id in ["pat-a", "pat-b"] {
        put_resource(http, base, &sys, &smart::patient(id)).await;
    }
    let client_id = s.admin.public_client("Attack App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    let scopes = ["launch/patient", "offline_access", "patient/*.rs"];
    let tok = user_token(http, base, &client_id, &scopes, &Login::new("alice")).await;
    let access = access_token(&tok);
    let refresh_token = tok["refresh_token"].as_str().expect("offline_access gives a refresh token").to_string();
    let url = s.url("Patient/pat-a");
    assert_eq!(get(http, &url, &access).await.status, 200);
    let mut refusals = 0u64;

    // No token at all.
    let r = send(http.get(&url)).await;
    assert_eq!(r.status, 401, "no token: {}", r.text);
    let www = r.header("www-authenticate");
    assert!(www.starts_with("Bearer") && www.contains(r#"realm="fhir-ledger""#), "{www}");
    assert!(!www.contains("error="), "no error code when no token was sent (RFC 6750 3.1): {www}");
    assert_eq!(r.json()["resourceType"], "OperationOutcome", "{}", r.text);
    refusals += 1;

    // The server's key, as CONTRACT.md derives it.
    let key = s.access_token_key();
    let real = parse_jwt(&access);
    assert_eq!(real.header["kid"], key.kid.as_str(), "kid = the first 16 hex digits of SHA-256(public key)");
    assert_eq!(key.sign(real.signing_input.as_bytes()), real.signature, "the derived key signs as the server does");
    assert_eq!(real.claims["patient"], "pat-a", "{}", real.claims);
    let control = key.mint(&real.header, &real.claims);
    let r = get(http, &url, &control).await;
    assert_eq!(r.status, 200, "a re-minted real token is accepted, so each refusal below is for what it changes");

    let now = smart::now();
    let with = |changes: Value| -> Value {
        let mut claims = real.claims.clone();
        for (k, v) in changes.as_object().expect("claims to change") {
            claims[k] = v.clone();
        }
        claims
    };
    let public = key.signing.verifying_key().to_bytes();
    let hs256 = |secret: &[u8]| {
        let header = json!({ "alg": "HS256", "typ": "at+jwt", "kid": key.kid });
        smart::jws(&header, &real.claims, |m| smart::hmac_sha256(secret, m))
    };
    let parts: Vec<&str> = access.split('.').collect();
    let mut tampered = real.claims.clone();
    tampered["patient"] = json!("pat-b");
    let stranger = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let by_stranger = |m: &[u8]| {
        use ed25519_dalek::Signer;
        let signature: ed25519_dalek::Signature = stranger.sign(m);
        signature.to_bytes().to_vec()
    };
    let forged: Vec<(&str, String)> = vec![
        ("garbage", "not-a-token".to_string()),
        ("expired", key.mint(&real.header, &with(json!({ "exp": now - 600, "iat": now - 4200, "nbf": now - 4200 })))),
        (
            "not yet valid",
            key.mint(&real.header, &with(json!({ "nbf": now + 600, "iat": now + 600, "exp": now + 4200 }))),
        ),
        ("another audience", key.mint(&real.header, &with(json!({ "aud": "http://127.0.0.1:1/fhir" })))),
        ("another issuer", key.mint(&real.header, &with(json!({ "iss": "http://127.0.0.1:1/fhir" })))),
        ("alg none", format!("{}.{}.", smart::b64(json!({ "alg": "none", "typ": "at+jwt" }).to_string()), parts[1])),
        ("HS256 keyed with the public key", hs256(public.as_slice())),
        ("HS256 keyed with the public key's JWK x", hs256(smart::b64(public).as_bytes())),
        ("tampered patient claim", format!("{}.{}.{}", parts[0], smart::b64(tampered.to_string()), parts[2])),
        ("signed by another key", smart::jws(&real.header, &real.claims, by_stranger)),
    ];
    for (what, token) in &forged {
        assert_invalid_token(&get(http, &url, token).await, what);
        refusals += 1;
    }

    // A revoked token (another grant of the same user and app, SSO through the session).
    let login = Login { session: tok["fl_session"].as_str(), ..Login::new("alice") };
    let other = user_token(http, base, &client_id, &["launch/patient", "patient/*.rs"], &login).await;
    let revoked = access_token(&other);
    assert_eq!(get(http, &url, &revoked).await.status, 200);
    let form = [("token", revoked.as_str()), ("client_id", client_id.as_str())];
    let r = send(http.post(s.url("/auth/revoke")).form(&form)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_invalid_token(&get(http, &url, &revoked).await, "a revoked token");
    refusals += 1;
    let form = [("token", "not-a-token"), ("client_id", client_id.as_str())];
    let r = send(http.post(s.url("/auth/revoke")).form(&form)).await;
    assert_eq!(r.status, 200, "revocation answers 200 whatever the token (RFC 7009): {}", r.text);

    // A refresh token reused after rotation revokes its grant.
    let r = refresh(http, base, &client_id, &refresh_token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let rotated = r.json();
    let access2 = access_token(&rotated);
    assert!(rotated["refresh_token"].as_str().is_some_and(|t| t != refresh_token), "a new refresh token: {rotated}");
    assert_eq!(get(http, &url, &access2).await.status, 200);
    let r = refresh(http, base, &client_id, &refresh_token).await;
    assert_eq!(r.status, 400, "a rotated-out refresh token: {}", r.text);
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    for (what, token) in [
        ("the first access token of a grant whose old refresh token was replayed", &access),
        ("the refreshed access token of that grant", &access2),
        ("a token minted with the real key for that grant", &control),
    ] {
        assert_invalid_token(&get(http, &url, token).await, what);
        refusals += 1;
    }

    // Every refusal is in the disclosure log (flushed in batches every 200 ms; an
    // unauthenticated source's refusals after the first of a 5 s window when it ends).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(http, &s.url("AuditEvent?outcome=4&_total=accurate&_count=1000"), &sys).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let b = r.json();
        // Refusals of unauthenticated requests are aggregated per source and window: an
        // AuditEvent's count extension says how many requests it stands for.
        let logged: u64 = b["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                e["resource"]["extension"]
                    .as_array()
                    .and_then(|x| {
                        x.iter().find(|x| x["url"] == "urn:fhir-ledger:StructureDefinition/disclosure-requests")
                    })
                    .and_then(|x| x["valueInteger"].as_u64())
                    .unwrap_or(1)
            })
            .sum();
        if logged >= refusals {
            for e in b["entry"].as_array().into_iter().flatten().filter(|e| e["search"]["mode"] == "match") {
                assert_eq!(e["resource"]["outcome"], "4", "{e}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "{logged} of {refusals} refusals logged with outcome 4 after 20 s: {b}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The scope matrix

/// How a request must be answered.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Exactly this status.
    Status(u16),
    /// 403 OperationOutcome `forbidden`: no scope covers the type and interaction.
    Forbidden,
    /// 404: outside the token's compartment or query restriction (as if missing).
    Hidden,
    /// 403 OperationOutcome: a write under a patient scope that would leave the compartment.
    OutOfCompartment,
    /// 403 or 404: a write to a resource outside the compartment.
    Refused,
    /// A 200 searchset: exactly these matches (`Type/id`), `total` their number, and when
    /// given exactly these included resources.
    Found(&'static [&'static str], Option<&'static [&'static str]>),
}

/// A request; `$new` in a path or body stands for the id of the last resource created.
enum Op {
    Get(&'static str),
    Post(&'static str, Value),
    Put(&'static str, Value),
    Delete(&'static str),
}

/// A token of the matrix: how it is obtained and what it must never disclose.
struct Grant {
    name: &'static str,
    user: &'static str,
    scopes: &'static [&'static str],
    /// The patient a practitioner picks on the consent page.
    pick: Option<&'static str>,
    /// Started with the EHR launch context.
    ehr_launch: bool,
    /// The patient context the token response must carry.
    patient: Option<&'static str>,
    /// Ids that no successful answer to this token may contain.
    foreign: &'static [&'static str],
}

struct Matrix<'a> {
    http: &'a reqwest::Client,
    base: &'a str,
    /// name → (access token, ids it must never disclose)
    tokens: HashMap<&'static str, (String, &'static [&'static str])>,
    /// The id of the last resource created (`$new`).
    created: Option<String>,
}

impl Matrix<'_> {
    async fn check(&mut self, who: &str, op: &Op, expect: Expect) {
        let (token, foreign) = self.tokens.get(who).cloned().unwrap_or_else(|| panic!("no token {who}"));
        let new = self.created.clone().unwrap_or_else(|| "$new".to_string());
        let (method, path, body) = match op {
            Op::Get(p) => (Method::GET, p.replace("$new", &new), None),
            Op::Post(p, b) => (Method::POST, p.replace("$new", &new), Some(b)),
            Op::Put(p, b) => (Method::PUT, p.replace("$new", &new), Some(b)),
            Op::Delete(p) => (Method::DELETE, p.replace("$new", &new), None),
        };
        let body: Option<Value> =
            body.map(|b| serde_json::from_str(&b.to_string().replace("$new", &new)).expect("a JSON body"));
        let mut path = path;
        if matches!(expect, Expect::Found(..)) {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str("_total=accurate");
        }
        let what = format!("{who}: {method} {path}");
        let r = fhir(self.http, method, &format!("{}/{path}", self.base), Some(token.as_str()), body.as_ref()).await;
        match expect {
            Expect::Status(status) => assert_eq!(r.status, status, "{what}: {}", r.text),
            Expect::Forbidden => assert_forbidden(&r, &what),
            Expect::Hidden => assert_eq!(r.status, 404, "{what}: {}", r.text),
            Expect::OutOfCompartment => {
                assert_eq!(r.status, 403, "{what}: {}", r.text);
                assert_eq!(r.json()["resourceType"], "OperationOutcome", "{what}: {}", r.text);
            }
            Expect::Refused => assert!(r.status == 403 || r.status == 404, "{what}: {} {}", r.status, r.text),
            Expect::Found(matches, included) => {
                assert_eq!(r.status, 200, "{what}: {}", r.text);
                let b = r.json();
                assert_eq!(b["type"], "searchset", "{what}: {b}");
                assert_eq!(entries(&b, "match"), sorted(matches), "{what}: the matches");
                assert_eq!(b["total"], json!(matches.len()), "{what}: the total");
                if let Some(included) = included {
                    assert_eq!(entries(&b, "include"), sorted(included), "{what}: the included resources");
                }
            }
        }
        if (200..300).contains(&r.status) && !r.text.trim().is_empty() {
            let v = r.json();
            let disclosed = if v["resourceType"] == "Bundle" { v["entry"].to_string() } else { v.to_string() };
            for id in foreign {
                assert!(!disclosed.contains(id), "{what} discloses {id}: {disclosed}");
            }
        }
        if r.status == 201 {
            let location = r.header("location");
            let id = location.split("/_history").next().and_then(|p| p.rsplit('/').next()).unwrap_or_default();
            assert!(!id.is_empty(), "{what}: Location {location:?}");
            self.created = Some(id.to_string());
        }
    }
}

const A_OBS: &[&str] = &["Observation/obs-a-lab", "Observation/obs-a-vital"];
const B_OBS: &[&str] = &["Observation/obs-b-lab", "Observation/obs-b-vital"];
const ALL_OBS: &[&str] =
    &["Observation/obs-a-lab", "Observation/obs-a-vital", "Observation/obs-b-lab", "Observation/obs-b-vital"];
const PAT_A: &[&str] = &["Patient/pat-a"];
const BOTH_PATIENTS: &[&str] = &["Patient/pat-a", "Patient/pat-b"];
const NOT_A: &[&str] = &["pat-a", "obs-a", "enc-a"];
const NOT_B: &[&str] = &["pat-b", "obs-b", "enc-b"];

/// Tokens from the browser flow (a patient user with SMART v1 `patient/*.read`, v2
/// `patient/Observation.rs`, a v2 query restriction to laboratory results, v2
/// `patient/Observation.cruds`; a practitioner with `user/*.cruds`, `user/Observation.read`,
/// a patient picked at consent, an EHR launch) and a `system/Patient.r` backend token, each
/// put through reads, vreads, searches with `_include` / `_revinclude`, histories, creates,
/// updates and deletes: allowed where a scope covers it, 403 where none does, and outside the
/// compartment as missing: 404, left out of searches, totals, includes and histories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_matrix() {
    use Expect::{Forbidden, Found, Hidden, OutOfCompartment, Refused, Status};
    use Op::{Delete, Get, Post, Put};
    let s = SmartServer::start(&[]);
    let (http, base) = (&s.http, s.base.as_str());
    let sys = s.system_token("system/*.cruds").await;
    let seed = [
        smart::patient("pat-a"),
        smart::patient("pat-b"),
        practitioner("prac-1"),
        encounter("enc-a", "pat-a"),
        encounter("enc-b", "pat-b"),
        observation(Some("obs-a-lab"), "pat-a", LAB),
        observation(Some("obs-a-vital"), "pat-a", VITAL),
        observation(Some("obs-b-lab"), "pat-b", LAB),
        observation(Some("obs-b-vital"), "pat-b", VITAL),
    ];
    for r in &seed {
        put_resource(http, base, &sys, r).await;
    }
    let client_id = s.admin.public_client("Matrix App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    s.admin.user("drsmith", "Practitioner/prac-1").await;
    let launch_b = s.admin.launch("pat-b", Some("enc-b")).await;

    let grants = [
        Grant {
            name: "patient-v1",
            user: "alice",
            scopes: &["launch/patient", "patient/*.read"],
            pick: None,
            ehr_launch: false,
            patient: Some("pat-a"),
            foreign: NOT_B,
        },
        Grant {
            name: "patient-v2",
            user: "alice",
            scopes: &["launch/patient", "patient/Observation.rs"],
            pick: None,
            ehr_launch: false,
            patient: Some("pat-a"),
            foreign: NOT_B,
        },
        Grant {
            name: "lab-only",
            user: "alice",
            scopes: &["launch/patient", LAB_ONLY],
            pick: None,
            ehr_launch: false,
            patient: Some("pat-a"),
            foreign: NOT_B,
        },
        Grant {
            name: "patient-writer",
            user: "alice",
            scopes: &["launch/patient", "patient/Observation.cruds"],
            pick: None,
            ehr_launch: false,
            patient: Some("pat-a"),
            foreign: NOT_B,
        },
        Grant {
            name: "user-all",
            user: "drsmith",
            scopes: &["user/*.cruds"],
            pick: None,
            ehr_launch: false,
            patient: None,
            foreign: NONE,
        },
        Grant {
            name: "user-obs-read",
            user: "drsmith",
            scopes: &["user/Observation.read"],
            pick: None,
            ehr_launch: false,
            patient: None,
            foreign: NONE,
        },
        Grant {
            name: "practitioner-picks-a",
            user: "drsmith",
            scopes: &["launch/patient", "patient/Observation.rs"],
            pick: Some("pat-a"),
            ehr_launch: false,
            patient: Some("pat-a"),
            foreign: NOT_B,
        },
        Grant {
            name: "ehr-launch-b",
            user: "drsmith",
            scopes: &["launch", "patient/Observation.rs"],
            pick: None,
            ehr_launch: true,
            patient: Some("pat-b"),
            foreign: NOT_A,
        },
    ];
    let mut tokens: HashMap<&'static str, (String, &'static [&'static str])> = HashMap::new();
    let mut sessions: HashMap<&str, String> = HashMap::new();
    for g in &grants {
        let session = sessions.get(g.user).cloned();
        let launch = if g.ehr_launch { Some(launch_b.as_str()) } else { None };
        let login = Login { session: session.as_deref(), patient: g.pick, launch, ..Login::new(g.user) };
        let tok = user_token(http, base, &client_id, g.scopes, &login).await;
        assert_eq!(tok["patient"].as_str(), g.patient, "{}: the patient context: {tok}", g.name);
        if g.ehr_launch {
            assert_eq!(tok["encounter"], "enc-b", "{}: the launch's encounter: {tok}", g.name);
        }
        let granted: Vec<&str> = tok["scope"].as_str().unwrap_or_default().split(' ').collect();
        for sc in g.scopes.iter().filter(|sc| sc.contains('/') && !sc.starts_with("launch")) {
            assert!(granted.contains(sc), "{}: {sc} is granted: {tok}", g.name);
        }
        sessions.insert(g.user, tok["fl_session"].as_str().expect("the session").to_string());
        tokens.insert(g.name, (access_token(&tok), g.foreign));
    }
    tokens.insert("system-patient-r", (s.system_token("system/Patient.r").await, NONE));

    let new_obs = |patient: &str, category: &str| observation(None, patient, category);
    let obs = |id: &str, patient: &str, category: &str| observation(Some(id), patient, category);
    let cases: Vec<(&str, Op, Expect)> = vec![
        // Reads and searches first: the writes below must not change what they see.
        ("patient-v1", Get("Patient/pat-a"), Status(200)),
        ("patient-v1", Get("Patient/pat-b"), Hidden),
        ("patient-v1", Get("Observation/obs-a-lab"), Status(200)),
        ("patient-v1", Get("Observation/obs-b-lab"), Hidden),
        ("patient-v1", Get("Observation/obs-a-lab/_history/1"), Status(200)),
        ("patient-v1", Get("Observation/obs-b-lab/_history/1"), Hidden),
        ("patient-v1", Get("Encounter/enc-a"), Status(200)),
        ("patient-v1", Get("Encounter/enc-b"), Hidden),
        ("patient-v1", Get("Practitioner/prac-1"), Status(200)),
        ("patient-v1", Get("Observation"), Found(A_OBS, None)),
        ("patient-v1", Get("Observation?subject=Patient/pat-b"), Found(&[], None)),
        ("patient-v1", Get("Observation?_include=Observation:subject"), Found(A_OBS, Some(PAT_A))),
        ("patient-v1", Get("Patient"), Found(&["Patient/pat-a"], None)),
        ("patient-v1", Get("Patient?_revinclude=Observation:subject"), Found(PAT_A, Some(A_OBS))),
        ("patient-v1", Get("Encounter"), Found(&["Encounter/enc-a"], None)),
        ("patient-v1", Get("Observation/obs-a-lab/_history"), Status(200)),
        ("patient-v1", Get("Observation/obs-b-lab/_history"), Hidden),
        ("patient-v1", Get("Observation/_history"), Status(200)),
        ("patient-v2", Get("Observation/obs-a-vital"), Status(200)),
        ("patient-v2", Get("Observation/obs-b-vital"), Hidden),
        ("patient-v2", Get("Observation"), Found(A_OBS, None)),
        ("patient-v2", Get("Observation?_include=Observation:subject"), Found(A_OBS, None)),
        ("patient-v2", Get("Observation/obs-a-vital/_history"), Status(200)),
        ("patient-v2", Get("Observation/obs-b-vital/_history"), Hidden),
        ("patient-v2", Get("Patient/pat-a"), Forbidden),
        ("patient-v2", Get("Patient?_revinclude=Observation:subject"), Forbidden),
        ("patient-v2", Get("Encounter/enc-a"), Forbidden),
        ("lab-only", Get("Observation"), Found(&["Observation/obs-a-lab"], None)),
        (
            "lab-only",
            Get("Observation?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"),
            Found(&[], None),
        ),
        ("lab-only", Get("Observation/obs-a-lab"), Status(200)),
        ("lab-only", Get("Observation/obs-a-vital"), Hidden),
        ("lab-only", Get("Observation/obs-b-lab"), Hidden),
        ("lab-only", Get("Patient/pat-a"), Forbidden),
        ("user-all", Get("Observation"), Found(ALL_OBS, None)),
        ("user-all", Get("Observation/obs-b-lab"), Status(200)),
        ("user-all", Get("Observation?_include=Observation:subject"), Found(ALL_OBS, Some(BOTH_PATIENTS))),
        ("user-all", Get("Patient?_revinclude=Observation:subject"), Found(BOTH_PATIENTS, Some(ALL_OBS))),
        ("user-all", Get("Observation/obs-b-lab/_history"), Status(200)),
        ("user-obs-read", Get("Observation"), Found(ALL_OBS, None)),
        ("user-obs-read", Get("Observation/obs-b-vital"), Status(200)),
        ("user-obs-read", Get("Observation/obs-a-lab/_history"), Status(200)),
        ("user-obs-read", Get("Patient/pat-a"), Forbidden),
        ("user-obs-read", Get("Patient?_revinclude=Observation:subject"), Forbidden),
        ("practitioner-picks-a", Get("Observation"), Found(A_OBS, None)),
        ("practitioner-picks-a", Get("Observation/obs-b-lab"), Hidden),
        ("practitioner-picks-a", Get("Patient/pat-a"), Forbidden),
        ("ehr-launch-b", Get("Observation"), Found(B_OBS, None)),
        ("ehr-launch-b", Get("Observation/obs-b-vital"), Status(200)),
        ("ehr-launch-b", Get("Observation/obs-a-lab"), Hidden),
        ("ehr-launch-b", Get("Encounter/enc-b"), Forbidden),
        ("system-patient-r", Get("Patient/pat-a"), Status(200)),
        ("system-patient-r", Get("Patient/pat-b"), Status(200)),
        ("system-patient-r", Get("Patient/pat-b/_history"), Status(200)),
        ("system-patient-r", Get("Patient"), Forbidden),
        ("system-patient-r", Get("Patient/_history"), Forbidden),
        ("system-patient-r", Get("Observation/obs-a-lab"), Forbidden),
        // Writes.
        ("patient-v1", Post("Observation", new_obs("pat-a", LAB)), Forbidden),
        ("patient-v1", Put("Observation/obs-a-lab", obs("obs-a-lab", "pat-a", LAB)), Forbidden),
        ("patient-v1", Delete("Observation/obs-a-lab"), Forbidden),
        ("patient-v2", Post("Observation", new_obs("pat-a", LAB)), Forbidden),
        ("lab-only", Post("Observation", new_obs("pat-a", LAB)), Forbidden),
        ("ehr-launch-b", Post("Observation", new_obs("pat-b", LAB)), Forbidden),
        ("patient-writer", Post("Observation", new_obs("pat-b", LAB)), OutOfCompartment),
        ("patient-writer", Post("Observation", new_obs("pat-a", LAB)), Status(201)),
        ("patient-writer", Get("Observation/$new"), Status(200)),
        ("patient-writer", Put("Observation/$new", obs("$new", "pat-a", VITAL)), Status(200)),
        ("patient-writer", Put("Observation/$new", obs("$new", "pat-b", VITAL)), OutOfCompartment),
        ("patient-writer", Put("Observation/obs-b-lab", obs("obs-b-lab", "pat-b", VITAL)), Refused),
        ("patient-writer", Delete("Observation/obs-b-lab"), Refused),
        ("patient-writer", Delete("Observation/$new"), Status(204)),
        ("user-all", Post("Observation", new_obs("pat-b", LAB)), Status(201)),
        ("user-all", Put("Observation/$new", obs("$new", "pat-b", VITAL)), Status(200)),
        ("user-all", Get("Observation/$new/_history"), Status(200)),
        ("user-all", Delete("Observation/$new"), Status(204)),
        ("user-obs-read", Post("Observation", new_obs("pat-b", LAB)), Forbidden),
        ("user-obs-read", Put("Observation/obs-b-lab", obs("obs-b-lab", "pat-b", VITAL)), Forbidden),
        ("user-obs-read", Delete("Observation/obs-b-lab"), Forbidden),
        ("system-patient-r", Post("Patient", json!({ "resourceType": "Patient" })), Forbidden),
        ("system-patient-r", Delete("Patient/pat-b"), Forbidden),
    ];
    let mut m = Matrix { http, base, tokens, created: None };
    for (who, op, expect) in &cases {
        m.check(who, op, *expect).await;
    }

    // No refused write changed anything.
    for path in ["Observation/obs-a-lab", "Observation/obs-b-lab", "Patient/pat-b"] {
        let r = get(http, &s.url(path), &sys).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        assert_eq!(r.json()["meta"]["versionId"], "1", "{path} is unchanged: {}", r.text);
    }
}

// ---------------------------------------------------------------------------------------------
// Consent, break the glass, the access report

/// The part `name` of a Parameters parameter.
fn part<'a>(p: &'a Value, name: &str) -> &'a Value {
    p["part"].as_array().and_then(|ps| ps.iter().find(|x| x["name"] == name)).unwrap_or(&Value::Null)
}

/// A Consent of `patient` permitting all but what `actor` (a reference) would see: the deny is
/// nested in a permit, as patients write them on the consent page.
fn deny_consent(patient: &str, actor: &str) -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": patient },
        "policyRule": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN" }] },
        "provision": {
            "type": "permit",
            "provision": [{
                "type": "deny",
                "actor": [{
                    "role": { "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP",
                    }] },
                    "reference": { "reference": actor },
                }],
            }],
        },
    })
}

/// Patient A's Consent denies practitioner P1 (nested in a permit): P1's reads of A's data are
/// 404 and its searches leave A out (total too) while P2 sees everything; P1 breaking the
/// glass (`X-Purpose-Of-Use: ETREAT`) reads, and that AuditEvent is flagged; A's access
/// report counts exactly the requests each practitioner made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_deny_for_one_practitioner() {
    let s = SmartServer::start(&[]);
    let (http, base) = (&s.http, s.base.as_str());
    let sys = s.system_token("system/*.cruds").await;
    let seed = [
        smart::patient("pat-a"),
        smart::patient("pat-b"),
        practitioner("prac-1"),
        practitioner("prac-2"),
        observation(Some("obs-a-lab"), "pat-a", LAB),
        observation(Some("obs-a-vital"), "pat-a", VITAL),
        observation(Some("obs-b-lab"), "pat-b", LAB),
    ];
    for r in &seed {
        put_resource(http, base, &sys, r).await;
    }
    let client_id = s.admin.public_client("Consent App", None).await;
    for (user, who) in [("alice", "Patient/pat-a"), ("p1", "Practitioner/prac-1"), ("p2", "Practitioner/prac-2")] {
        s.admin.user(user, who).await;
    }
    let alice_scopes = ["launch/patient", "patient/Consent.cruds", "patient/AuditEvent.rs"];
    let alice = access_token(&user_token(http, base, &client_id, &alice_scopes, &Login::new("alice")).await);
    let p1 = access_token(&user_token(http, base, &client_id, &["user/*.rs"], &Login::new("p1")).await);
    let p2 = access_token(&user_token(http, base, &client_id, &["user/*.rs"], &Login::new("p2")).await);
    let search = |b: &Value| (entries(b, "match"), b["total"].clone());

    // Opt-out by default: before any Consent, P1 sees A's data. (P1: 1 disclosure of A.)
    let r = get(http, &s.url("Observation/obs-a-lab"), &p1).await;
    assert_eq!(r.status, 200, "P1 before the Consent: {}", r.text);

    // A denies P1, by a Consent written with A's own token.
    let consent = deny_consent("Patient/pat-a", "Practitioner/prac-1");
    let r = fhir(http, Method::POST, &s.url("Consent"), Some(alice.as_str()), Some(&consent)).await;
    assert_eq!(r.status, 201, "A writes a Consent in A's compartment: {}", r.text);

    // P1: A's data is invisible. (P1: 1 denial, and searches that disclose nothing of A.)
    let r = get(http, &s.url("Observation/obs-a-lab"), &p1).await;
    assert_eq!(r.status, 404, "P1 after the Consent: {}", r.text);
    let r = get(http, &s.url("Observation?subject=Patient/pat-a&_total=accurate"), &p1).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(search(&r.json()), (vec![], json!(0)), "P1's search of A's observations");
    let r = get(http, &s.url("Observation?_total=accurate"), &p1).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(search(&r.json()), (vec!["Observation/obs-b-lab".to_string()], json!(1)), "P1's search of all");

    // P2 sees everything. (P2: 3 disclosures of A, 4 resources, 2 of them distinct.)
    for id in ["obs-a-lab", "obs-a-vital"] {
        let r = get(http, &s.url(&format!("Observation/{id}")), &p2).await;
        assert_eq!(r.status, 200, "P2 reads {id}: {}", r.text);
    }
    let r = get(http, &s.url("Observation?subject=Patient/pat-a&_total=accurate"), &p2).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(search(&r.json()), (sorted(A_OBS), json!(2)), "P2's search of A's observations");

    // P1 breaks the glass. (P1: 2 disclosures of A, 1 of them breaking the glass.)
    let r = send(http.get(s.url("Observation/obs-a-lab")).bearer_auth(&p1).header("X-Purpose-Of-Use", "ETREAT")).await;
    assert_eq!(r.status, 200, "P1 breaking the glass: {}", r.text);

    // A's access report counts every request answered before it.
    let r = get(http, &s.url("Patient/pat-a/$access-report"), &alice).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let report = r.json();
    assert_eq!(report["resourceType"], "Parameters", "{report}");
    let params = report["parameter"].as_array().cloned().unwrap_or_default();
    let param = |name: &str| params.iter().find(|p| p["name"] == name).cloned().unwrap_or(Value::Null);
    assert!(param("patient").to_string().contains("pat-a"), "{report}");
    let accessor = |who: &str| -> Value {
        let found = params.iter().find(|p| p["name"] == "accessor" && part(p, "who")["valueString"] == who);
        found.cloned().unwrap_or_else(|| panic!("no accessor {who} in {report}"))
    };
    let int = |p: &Value, name: &str| -> i64 {
        part(p, name)["valueInteger"].as_i64().unwrap_or_else(|| panic!("no integer {name} in {p}"))
    };
    let p2r = accessor("Practitioner/prac-2");
    assert_eq!(int(&p2r, "count"), 3, "P2: two reads and a search disclosed A's data: {p2r}");
    assert!((2..=4).contains(&int(&p2r, "resources")), "P2 was shown obs-a-lab and obs-a-vital: {p2r}");
    assert_eq!(int(&p2r, "denied"), 0, "{p2r}");
    assert_eq!(int(&p2r, "breakTheGlass"), 0, "{p2r}");
    assert_eq!(part(&p2r, "client")["valueString"], client_id.as_str(), "{p2r}");
    assert!(part(&p2r, "last")["valueInstant"].is_string(), "{p2r}");
    let p1r = accessor("Practitioner/prac-1");
    assert_eq!(int(&p1r, "count"), 2, "P1: the read before the Consent and the break-the-glass read: {p1r}");
    assert!(int(&p1r, "denied") >= 1, "P1's read after the Consent was denied: {p1r}");
    assert_eq!(int(&p1r, "breakTheGlass"), 1, "{p1r}");
    assert!(param("total")["valueInteger"].as_i64().is_some_and(|t| t >= 5), "{report}");

    // The break-the-glass AuditEvent: purposeOfEvent ETREAT and security label BTG.
    let deadline = Instant::now() + Duration::from_secs(10);
    let btg = loop {
        let events = smart::search_all(http, base, &sys, "AuditEvent?_count=1000").await;
        let by =
            |e: &Value, who: &str| e["agent"].as_array().into_iter().flatten().any(|a| a["who"]["reference"] == who);
        assert!(
            !events
                .iter()
                .any(|e| by(e, "Practitioner/prac-2") && codes(&e["purposeOfEvent"]).iter().any(|c| c == "ETREAT")),
            "P2 never broke the glass"
        );
        let flagged = events
            .iter()
            .find(|e| by(e, "Practitioner/prac-1") && codes(&e["purposeOfEvent"]).iter().any(|c| c == "ETREAT"));
        if let Some(e) = flagged {
            break e.clone();
        }
        assert!(Instant::now() < deadline, "no AuditEvent of P1 with purposeOfEvent ETREAT after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(codes(&btg["meta"]["security"]).iter().any(|c| c == "BTG"), "labelled BTG: {btg}");
    let what: Vec<&str> =
        btg["entity"].as_array().into_iter().flatten().filter_map(|e| e["what"]["reference"].as_str()).collect();
    assert!(what.contains(&"Patient/pat-a"), "the patient is an entity: {btg}");
    assert!(what.iter().any(|w| w.starts_with("Observation/obs-a-lab")), "the disclosed resource: {btg}");

    // A's token is no key to another patient's report.
    let r = get(http, &s.url("Patient/pat-b/$access-report"), &alice).await;
    assert!(r.status == 403 || r.status == 404, "A asks for B's report: {} {}", r.status, r.text);
}

/// A Consent that denies a CareTeam denies its members: a practitioner acts for every
/// CareTeam that lists them as a participant, so A's deny of the team hides A's data from P1
/// (a member) and not from P2; once the team no longer lists P1, P1 sees A's data again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_deny_for_a_care_team_reaches_its_members() {
    let s = SmartServer::start(&[]);
    let (http, base) = (&s.http, s.base.as_str());
    let sys = s.system_token("system/*.cruds").await;
    let team = |members: &[&str]| {
        let participants: Vec<Value> =
            members.iter().map(|m| json!({ "member": { "reference": format!("Practitioner/{m}") } })).collect();
        json!({ "resourceType": "CareTeam", "id": "team-1", "status": "active", "participant": participants })
    };
    let seed = [
        smart::patient("pat-a"),
        smart::patient("pat-b"),
        practitioner("prac-1"),
        practitioner("prac-2"),
        team(&["prac-1"]),
        observation(Some("obs-a-lab"), "pat-a", LAB),
        observation(Some("obs-b-lab"), "pat-b", LAB),
    ];
    for r in &seed {
        put_resource(http, base, &sys, r).await;
    }
    let client_id = s.admin.public_client("Team App", None).await;
    for (user, who) in [("alice", "Patient/pat-a"), ("p1", "Practitioner/prac-1"), ("p2", "Practitioner/prac-2")] {
        s.admin.user(user, who).await;
    }
    let alice_scopes = ["launch/patient", "patient/Consent.cruds"];
    let alice = access_token(&user_token(http, base, &client_id, &alice_scopes, &Login::new("alice")).await);
    let p1 = access_token(&user_token(http, base, &client_id, &["user/*.rs"], &Login::new("p1")).await);
    let p2 = access_token(&user_token(http, base, &client_id, &["user/*.rs"], &Login::new("p2")).await);
    let consent = deny_consent("Patient/pat-a", "CareTeam/team-1");
    let r = fhir(http, Method::POST, &s.url("Consent"), Some(alice.as_str()), Some(&consent)).await;
    assert_eq!(r.status, 201, "A writes a Consent in A's compartment: {}", r.text);

    let visible = |b: &Value| entries(b, "match");
    let r = get(http, &s.url("Observation/obs-a-lab"), &p1).await;
    assert_eq!(r.status, 404, "P1, a member of the denied team: {}", r.text);
    let r = get(http, &s.url("Observation?_total=accurate"), &p1).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(visible(&r.json()), ["Observation/obs-b-lab"], "P1's search leaves A out");
    assert_eq!(r.json()["total"], 1, "and so does its total");
    let r = get(http, &s.url("Observation/obs-a-lab"), &p2).await;
    assert_eq!(r.status, 200, "P2 is in no denied team: {}", r.text);

    // The team no longer lists P1: the deny no longer reaches P1, on the next request.
    put_resource(http, base, &sys, &team(&["prac-2"])).await;
    let r = get(http, &s.url("Observation/obs-a-lab"), &p1).await;
    assert_eq!(r.status, 200, "P1 left the team: {}", r.text);
    let r = get(http, &s.url("Observation/obs-a-lab"), &p2).await;
    assert_eq!(r.status, 404, "P2 joined the denied team: {}", r.text);
}

/// A patient searches a code that over a thousand of another patient's resources share: the
/// candidates are streamed past the size counted whole, and the guard still leaves every one of
/// the other patient's resources out of the pages, the total and `_summary=count`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_counts_only_their_own_among_thousands_of_matches() {
    let s = SmartServer::start(&[]);
    let (http, base) = (&s.http, s.base.as_str());
    let sys = s.system_token("system/*.cruds").await;
    for p in [smart::patient("pat-a"), smart::patient("pat-b")] {
        put_resource(http, base, &sys, &p).await;
    }
    let mut own = Vec::new();
    let puts: Vec<Value> = (0..1_100)
        .map(|i| {
            let (patient, id) =
                if i % 400 == 0 { ("pat-a", format!("obs-a-{i}")) } else { ("pat-b", format!("obs-b-{i}")) };
            if patient == "pat-a" {
                own.push(format!("Observation/{id}"));
            }
            let body = observation(Some(&id), patient, LAB);
            json!({ "resource": body, "request": { "method": "PUT", "url": format!("Observation/{id}") } })
        })
        .collect();
    let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": puts });
    let r = fhir(http, Method::POST, &s.url("/"), Some(sys.as_str()), Some(&bundle)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let client_id = s.admin.public_client("Many App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    let scopes = ["launch/patient", "patient/Observation.rs"];
    let alice = access_token(&user_token(http, base, &client_id, &scopes, &Login::new("alice")).await);

    let code = "Observation?code=http://loinc.org|2345-7";
    let mut url = s.url(&format!("{code}&_count=2"));
    let mut seen = Vec::new();
    for _ in 0..10 {
        let r = get(http, &url, &alice).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let page = r.json();
        seen.extend(entries(&page, "match"));
        let next = page["link"].as_array().into_iter().flatten().find(|l| l["relation"] == "next");
        match next.and_then(|l| l["url"].as_str()) {
            Some(n) => url = n.to_string(),
            None => break,
        }
    }
    assert_eq!(seen, own, "A's pages hold A's observations only");
    for q in ["_total=accurate", "_summary=count"] {
        let r = get(http, &s.url(&format!("{code}&{q}")), &alice).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json()["total"], own.len(), "{q} counts A's observations only");
    }
}

/// A site's own identity provider: its tokens (ES384 here, keys from its JWKS URL, scopes and
/// client in mapped claims) are accepted beside ours and enforced the same way; a token it did
/// not sign, or one for another audience, is a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_issuer_tokens_are_accepted() {
    use std::io::{Read, Write};
    let idp = ClientKey::es384();
    let body = json!({ "keys": [idp.jwk("idp-1")] }).to_string();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the IdP's JWKS server");
    let jwks_url = format!("http://{}/jwks", listener.local_addr().expect("address"));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        }
    });
    let cfg_dir = tempfile::tempdir().expect("temp dir");
    let cfg = cfg_dir.path().join("idp.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[external_issuer]]\nissuer = \"https://idp.example\"\njwks_url = \"{jwks_url}\"\nscope_claim = \"scp\"\nclient_claim = \"azp\"\n"
        ),
    )
    .expect("write the config");
    let s = SmartServer::start(&["--config", cfg.to_str().expect("utf-8 path")]);
    let http = &s.http;
    let system = s.system_token("system/*.cruds").await;
    let created = send(
        http.post(s.url("Patient"))
            .bearer_auth(&system)
            .header("content-type", "application/fhir+json")
            .body(json!({ "resourceType": "Patient", "name": [{ "family": "External" }] }).to_string()),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let pid = created.json()["id"].as_str().expect("id").to_string();

    let now = smart::now();
    let claims = |aud: &str| {
        json!({ "iss": "https://idp.example", "aud": aud, "sub": "svc-1", "azp": "site-app",
                "scp": "system/Patient.rs", "iat": now, "exp": now + 300 })
    };
    let mint = |key: &ClientKey, claims: &Value| {
        smart::jws(&json!({ "alg": key.alg(), "kid": "idp-1", "typ": "JWT" }), claims, |m| key.sign(m))
    };
    let token = mint(&idp, &claims(&s.base));
    let r = get(http, &s.url(&format!("Patient/{pid}")), &token).await;
    assert_eq!(r.status, 200, "the IdP's token reads what its scope grants: {}", r.text);
    let r = get(http, &s.url("Observation"), &token).await;
    assert_eq!(r.status, 403, "and nothing else: {}", r.text);
    let forged = mint(&ClientKey::es384(), &claims(&s.base));
    assert_invalid_token(&get(http, &s.url(&format!("Patient/{pid}")), &forged).await, "a key the IdP does not hold");
    let elsewhere = mint(&idp, &claims("https://other.example/fhir"));
    assert_invalid_token(&get(http, &s.url(&format!("Patient/{pid}")), &elsewhere).await, "another audience");
}
