//! Shared helpers of the SMART-on-FHIR tests (auth.rs, cluster.rs), written against
//! src/auth/CONTRACT.md: JOSE by hand (base64url, JWS signing and parsing, the server's
//! access-token key derived from the KEK), the admin API, backend-services clients with
//! EdDSA / RS384 / ES384 keys, and a scripted browser for the authorization-code flow (the
//! login and consent forms, the `fl_session` cookie kept by hand: reqwest has no cookie store
//! here and follows no redirects).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::header::{HeaderMap, CONTENT_TYPE, COOKIE, SET_COOKIE};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::Server;

/// The admin bearer token the test servers are given (`FHIR_LEDGER_ADMIN_TOKEN`).
pub const ADMIN_TOKEN: &str = "auth-test-admin-token";
/// The redirect URI of every test app: never contacted, the 302 to it is read, not followed.
pub const REDIRECT: &str = "http://127.0.0.1:9/callback";
/// The password of every test user.
pub const PASSWORD: &str = "correct horse battery staple";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A client that follows no redirect (the 302s of the flow are the answers under test). The
/// timeout is generous: the first id_token makes the server derive an RSA key, slow in a debug
/// build.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_mins(2))
        .build()
        .expect("http client")
}

/// A `fhir-ledger serve --auth smart` process in its own temp dir, with the admin API.
pub struct SmartServer {
    /// The process, killed on drop (declared before `dir`: before its data dir is removed).
    server: Server,
    extra: Vec<String>,
    pub dir: tempfile::TempDir,
    /// The base URL, also the public URL (`--public-url` defaults to the bound address).
    pub base: String,
    pub http: reqwest::Client,
    pub admin: Admin,
}

impl SmartServer {
    pub fn start(extra: &[&str]) -> SmartServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = Server::launch_auth(dir.path(), extra, &[("FHIR_LEDGER_ADMIN_TOKEN", ADMIN_TOKEN)]);
        let base = server.base.clone();
        let http = http_client();
        let admin = Admin::new(&http, &base, ADMIN_TOKEN);
        let extra = extra.iter().map(ToString::to_string).collect();
        SmartServer { server, extra, dir, base, http, admin }
    }

    /// Kills the process (SIGKILL: what it acknowledged must survive).
    pub fn stop(&mut self) {
        self.server.kill9();
    }

    /// Starts the process again on the same data directory. It listens on a new port, so
    /// tokens must be taken again (their audience is the old base URL).
    pub fn restart(&mut self) {
        self.server.kill9();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.server = Server::launch_auth(self.dir.path(), &extra, &[("FHIR_LEDGER_ADMIN_TOKEN", ADMIN_TOKEN)]);
        self.base = self.server.base.clone();
        self.admin = Admin::new(&self.http, &self.base, ADMIN_TOKEN);
    }

    /// `<base>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// The key the server signs access tokens with (CONTRACT.md "Keys").
    pub fn access_token_key(&self) -> ServerKey {
        server_key(self.dir.path())
    }

    /// A backend-services client registered with an EdDSA key and `scope` as its ceiling,
    /// and an access token for `scope`.
    pub async fn system_token(&self, scope: &str) -> String {
        let backend = Backend::register(&self.admin, ClientKey::ed25519(), scope).await;
        backend.token(&self.http, scope).await
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// A whole response: status, headers and body text.
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text))
    }

    /// A header's value ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
    }
}

pub async fn send(req: reqwest::RequestBuilder) -> Resp {
    let r = req.send().await.expect("HTTP request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("response body");
    Resp { status, headers, text }
}

/// A FHIR request with an optional bearer token and an optional JSON body.
pub async fn fhir(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Resp {
    let mut req = http.request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header(CONTENT_TYPE, "application/fhir+json").body(b.to_string());
    }
    send(req).await
}

pub async fn get(http: &reqwest::Client, url: &str, token: &str) -> Resp {
    fhir(http, Method::GET, url, Some(token), None).await
}

/// PUTs `resource` (update-as-create under its `id`); asserts 200 or 201.
pub async fn put_resource(http: &reqwest::Client, base: &str, token: &str, resource: &Value) {
    let path = format!(
        "{}/{}",
        resource["resourceType"].as_str().expect("resourceType"),
        resource["id"].as_str().expect("id")
    );
    let r = fhir(http, Method::PUT, &format!("{base}/{path}"), Some(token), Some(resource)).await;
    assert!(r.status == 200 || r.status == 201, "PUT {path}: {} {}", r.status, r.text);
}

/// Every match of a search, following `next` links.
pub async fn search_all(http: &reqwest::Client, base: &str, token: &str, query: &str) -> Vec<Value> {
    let mut url = format!("{base}/{query}");
    let mut found = vec![];
    for _ in 0..100 {
        let r = get(http, &url, token).await;
        assert_eq!(r.status, 200, "GET {url}: {}", r.text);
        let b = r.json();
        let matches = b["entry"].as_array().into_iter().flatten().filter(|e| e["search"]["mode"] == "match");
        found.extend(matches.map(|e| e["resource"].clone()));
        let next = b["link"].as_array().and_then(|ls| ls.iter().find(|l| l["relation"] == "next"));
        match next.and_then(|l| l["url"].as_str()) {
            Some(next) => url = next.to_string(),
            None => return found,
        }
    }
    panic!("more than 100 pages of {query}");
}

/// Asserts the 401 of a bad token: `WWW-Authenticate: Bearer realm=.., error="invalid_token"`
/// and an OperationOutcome.
pub fn assert_invalid_token(r: &Resp, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text);
    let www = r.header("www-authenticate");
    assert!(
        www.starts_with("Bearer") && www.contains(r#"realm="fhir-ledger""#) && www.contains(r#"error="invalid_token""#),
        "{what}: WWW-Authenticate {www:?}"
    );
    assert_eq!(r.json()["resourceType"], "OperationOutcome", "{what}: {}", r.text);
}

/// The value of query parameter `name` of `url`.
pub fn query_param(url: &reqwest::Url, name: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// `name=value` of the `Set-Cookie` named `name`, ready for a `Cookie` header.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(SET_COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|c| {
        let pair = c.split(';').next()?.trim();
        let (n, v) = pair.split_once('=')?;
        (n.trim() == name && !v.is_empty()).then(|| format!("{name}={v}"))
    })
}

// ---------------------------------------------------------------------------------------------
// JOSE

pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).unwrap_or_else(|e| panic!("base64url {s:?}: {e}"))
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs().cast_signed()
}

pub fn random_hex(bytes: usize) -> String {
    hex::encode((0..bytes).map(|_| rand::random::<u8>()).collect::<Vec<u8>>())
}

pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any HMAC key length");
    mac.update(msg);
    mac.finalize().into_bytes().to_vec()
}

/// A JWS compact serialization: `b64(header).b64(claims).b64(sign(signing input))`.
pub fn jws(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
    let signature = sign(input.as_bytes());
    format!("{input}.{}", b64(signature))
}

/// A decoded JWS (nothing verified).
pub struct Jwt {
    pub header: Value,
    pub claims: Value,
    /// `<header>.<payload>` as received: what the signature covers.
    pub signing_input: String,
    pub signature: Vec<u8>,
}

pub fn parse_jwt(token: &str) -> Jwt {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWS compact serialization: {token}");
    let json = |p: &str| -> Value {
        serde_json::from_slice(&unb64(p)).unwrap_or_else(|e| panic!("JWT part {p:?} is not JSON: {e}"))
    };
    Jwt {
        header: json(parts[0]),
        claims: json(parts[1]),
        signing_input: format!("{}.{}", parts[0], parts[1]),
        signature: unb64(parts[2]),
    }
}

/// Is `aud` (a string or an array of strings) or does it contain `who`?
pub fn aud_has(aud: &Value, who: &str) -> bool {
    aud == who || aud.as_array().is_some_and(|a| a.iter().any(|x| x == who))
}

/// The server's access-token signing key, derived as CONTRACT.md "Keys" says: the ed25519
/// seed is HMAC-SHA256(KEK, "fhir-ledger auth access-token signing v1"), the kid the first 16
/// hex digits of SHA-256 of the public key.
pub struct ServerKey {
    pub signing: ed25519_dalek::SigningKey,
    pub kid: String,
}

pub fn server_key(secrets_dir: &Path) -> ServerKey {
    let text = std::fs::read_to_string(secrets_dir.join("kek.key")).expect("read kek.key");
    let kek = hex::decode(text.trim()).expect("kek.key is hex");
    assert_eq!(kek.len(), 32, "a 32-byte KEK");
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&hmac_sha256(&kek, b"fhir-ledger auth access-token signing v1"));
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    let kid = hex::encode(Sha256::digest(signing.verifying_key().as_bytes()))[..16].to_string();
    ServerKey { signing, kid }
}

impl ServerKey {
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use ed25519_dalek::Signer;
        let signature: ed25519_dalek::Signature = self.signing.sign(msg);
        signature.to_bytes().to_vec()
    }

    /// A token as the server would sign it.
    pub fn mint(&self, header: &Value, claims: &Value) -> String {
        jws(header, claims, |m| self.sign(m))
    }
}

// ---------------------------------------------------------------------------------------------
// Admin API and backend services

/// The admin API of one node (bearer = the admin token).
#[derive(Clone)]
pub struct Admin {
    http: reqwest::Client,
    pub base: String,
    token: String,
}

impl Admin {
    pub fn new(http: &reqwest::Client, base: &str, token: &str) -> Admin {
        Admin { http: http.clone(), base: base.to_string(), token: token.to_string() }
    }

    /// POSTs `body` to `path`; asserts 201 and returns the JSON answer.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let r = send(self.http.post(format!("{}{path}", self.base)).bearer_auth(&self.token).json(&body)).await;
        assert_eq!(r.status, 201, "POST {path} {body}: {}", r.text);
        r.json()
    }

    /// Registers a client (RFC 7591 names); returns the answer (`client_id`, ...).
    pub async fn register_client(&self, body: Value) -> Value {
        let v = self.post("/admin/auth/clients", body).await;
        assert!(v["client_id"].as_str().is_some_and(|c| !c.is_empty()), "a client_id: {v}");
        v
    }

    /// Registers a public app (`token_endpoint_auth_method: none`) redirecting to
    /// [`REDIRECT`]; `scope` is its ceiling (None: any scope). Returns its client_id.
    pub async fn public_client(&self, name: &str, scope: Option<&str>) -> String {
        let mut body = json!({
            "client_name": name,
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "none",
        });
        if let Some(s) = scope {
            body["scope"] = json!(s);
        }
        self.register_client(body).await["client_id"].as_str().expect("client_id").to_string()
    }

    /// A user with [`PASSWORD`] who is `fhir_user` (`Patient/..`, `Practitioner/..`).
    pub async fn user(&self, username: &str, fhir_user: &str) {
        let body = json!({ "username": username, "password": PASSWORD, "fhirUser": fhir_user });
        self.post("/admin/auth/users", body).await;
    }

    /// An EHR launch context; returns the opaque `launch` value.
    pub async fn launch(&self, patient: &str, encounter: Option<&str>) -> String {
        let mut body = json!({ "patient": patient });
        if let Some(e) = encounter {
            body["encounter"] = json!(e);
        }
        self.post("/admin/auth/launch", body).await["launch"].as_str().expect("launch").to_string()
    }
}

/// A private key of a backend-services client.
pub enum ClientKey {
    Ed25519(ed25519_dalek::SigningKey),
    Rs384(Box<rsa::RsaPrivateKey>),
    Es384(p384::ecdsa::SigningKey),
}

impl ClientKey {
    pub fn ed25519() -> ClientKey {
        ClientKey::Ed25519(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// An RSA 2048 key (slow in a debug build: call it from `spawn_blocking`).
    pub fn rs384() -> ClientKey {
        let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key generation");
        ClientKey::Rs384(Box::new(key))
    }

    pub fn es384() -> ClientKey {
        ClientKey::Es384(p384::ecdsa::SigningKey::random(&mut rand::rngs::OsRng))
    }

    pub fn alg(&self) -> &'static str {
        match self {
            ClientKey::Ed25519(_) => "EdDSA",
            ClientKey::Rs384(_) => "RS384",
            ClientKey::Es384(_) => "ES384",
        }
    }

    /// The public JWK (RFC 7517 / 8037) with `kid`.
    pub fn jwk(&self, kid: &str) -> Value {
        match self {
            ClientKey::Ed25519(k) => json!({
                "kty": "OKP", "crv": "Ed25519", "x": b64(k.verifying_key().to_bytes()),
                "kid": kid, "alg": "EdDSA", "use": "sig",
            }),
            ClientKey::Rs384(k) => {
                use rsa::traits::PublicKeyParts;
                json!({
                    "kty": "RSA", "n": b64(k.n().to_bytes_be()), "e": b64(k.e().to_bytes_be()),
                    "kid": kid, "alg": "RS384", "use": "sig",
                })
            }
            ClientKey::Es384(k) => {
                let point = k.verifying_key().to_encoded_point(false);
                json!({
                    "kty": "EC", "crv": "P-384",
                    "x": b64(point.x().expect("an uncompressed point has x")),
                    "y": b64(point.y().expect("an uncompressed point has y")),
                    "kid": kid, "alg": "ES384", "use": "sig",
                })
            }
        }
    }

    /// The JWS signature of `msg` (RS384: PKCS#1 v1.5 with SHA-384; ES384: raw r||s, 96 bytes).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        use rsa::signature::{SignatureEncoding, Signer};
        match self {
            ClientKey::Ed25519(k) => {
                let signature: ed25519_dalek::Signature = k.sign(msg);
                signature.to_bytes().to_vec()
            }
            ClientKey::Rs384(k) => {
                let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha384>::new((**k).clone());
                let signature: rsa::pkcs1v15::Signature = signer.sign(msg);
                signature.to_bytes().to_vec()
            }
            ClientKey::Es384(k) => {
                let signature: p384::ecdsa::Signature = k.sign(msg);
                signature.to_bytes().to_vec()
            }
        }
    }
}

/// A registered backend-services client (`private_key_jwt`, inline JWKS).
pub struct Backend {
    pub client_id: String,
    pub key: ClientKey,
    pub kid: String,
    /// The token endpoint, `<public url>/auth/token`: the `aud` of its assertions.
    pub token_url: String,
}

impl Backend {
    /// Registers a client whose JWKS holds `key`'s public half; `scope` is its ceiling.
    pub async fn register(admin: &Admin, key: ClientKey, scope: &str) -> Backend {
        let kid = format!("{}-{}", key.alg().to_ascii_lowercase(), random_hex(4));
        let body = json!({
            "client_name": format!("backend {kid}"),
            "redirect_uris": [REDIRECT],
            "token_endpoint_auth_method": "private_key_jwt",
            "scope": scope,
            "jwks": { "keys": [key.jwk(&kid)] },
        });
        let v = admin.register_client(body).await;
        let client_id = v["client_id"].as_str().expect("client_id").to_string();
        Backend { client_id, key, kid, token_url: format!("{}/auth/token", admin.base) }
    }

    /// A fresh, valid client assertion (unique `jti`, 4 minutes).
    pub fn assertion(&self) -> String {
        self.assertion_with(&self.kid, &self.token_url, &random_hex(16), 240)
    }

    /// A client assertion with the given `kid`, `aud`, `jti`, and `exp` = now + `ttl` s.
    pub fn assertion_with(&self, kid: &str, aud: &str, jti: &str, ttl: i64) -> String {
        let header = json!({ "alg": self.key.alg(), "typ": "JWT", "kid": kid });
        let now = now();
        let claims = json!({
            "iss": self.client_id, "sub": self.client_id, "aud": aud,
            "exp": now + ttl, "iat": now, "jti": jti,
        });
        jws(&header, &claims, |m| self.key.sign(m))
    }

    /// `grant_type=client_credentials` with `assertion`.
    pub async fn request(&self, http: &reqwest::Client, scope: &str, assertion: &str) -> Resp {
        let form = [
            ("grant_type", "client_credentials"),
            ("scope", scope),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion),
        ];
        send(http.post(&self.token_url).form(&form)).await
    }

    /// An access token for `scope`; asserts the 200.
    pub async fn token(&self, http: &reqwest::Client, scope: &str) -> String {
        let r = self.request(http, scope, &self.assertion()).await;
        assert_eq!(r.status, 200, "client_credentials {scope}: {}", r.text);
        r.json()["access_token"].as_str().expect("access_token").to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// HTML

/// Decodes the character references of an attribute value (`&amp;`, `&quot;`, `&#39;`, ...).
pub fn html_unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let decoded = rest.find(';').filter(|&end| end <= 10).and_then(|end| {
            let entity = &rest[1..end];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let code = if let Some(h) = entity.strip_prefix("#x").or_else(|| entity.strip_prefix("#X")) {
                        u32::from_str_radix(h, 16).ok()
                    } else {
                        entity.strip_prefix('#').and_then(|d| d.parse().ok())
                    };
                    code.and_then(char::from_u32)
                }
            };
            c.map(|c| (c, end))
        });
        if let Some((c, end)) = decoded {
            out.push(c);
            rest = &rest[end + 1..];
        } else {
            out.push('&');
            rest = &rest[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The attributes (lower-case names, unescaped values) of every `<tag ...>` in `html`.
pub fn tags(html: &str, tag: &str) -> Vec<Vec<(String, String)>> {
    // ASCII lower-casing keeps every byte offset.
    let lower = html.to_ascii_lowercase();
    let bytes = html.as_bytes();
    let open = format!("<{}", tag.to_ascii_lowercase());
    let mut found = vec![];
    let mut from = 0;
    while let Some(i) = lower[from..].find(&open) {
        let mut j = from + i + open.len();
        from = j;
        // `<input` must not be the start of `<inputs`.
        if !bytes.get(j).is_some_and(|b| b.is_ascii_whitespace() || *b == b'>' || *b == b'/') {
            continue;
        }
        let mut attrs = vec![];
        loop {
            while j < bytes.len() && (bytes[j].is_ascii_whitespace() || bytes[j] == b'/') {
                j += 1;
            }
            if j >= bytes.len() || bytes[j] == b'>' {
                break;
            }
            let start = j;
            while j < bytes.len() && !bytes[j].is_ascii_whitespace() && !matches!(bytes[j], b'=' | b'>' | b'/') {
                j += 1;
            }
            let name = lower[start..j].to_string();
            while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                j += 1;
            }
            let mut value = String::new();
            if bytes.get(j) == Some(&b'=') {
                j += 1;
                while j < bytes.len() && bytes[j].is_ascii_whitespace() {
                    j += 1;
                }
                match bytes.get(j) {
                    Some(&q) if q == b'"' || q == b'\'' => {
                        let end = html[j + 1..].find(q as char).map_or(bytes.len(), |e| j + 1 + e);
                        value = html_unescape(&html[j + 1..end]);
                        j = (end + 1).min(bytes.len());
                    }
                    _ => {
                        let start = j;
                        while j < bytes.len() && !bytes[j].is_ascii_whitespace() && bytes[j] != b'>' {
                            j += 1;
                        }
                        value = html_unescape(&html[start..j]);
                    }
                }
            }
            attrs.push((name, value));
        }
        from = j;
        found.push(attrs);
    }
    found
}

/// The value of attribute `name` of a tag from [`tags`].
pub fn attr<'a>(tag: &'a [(String, String)], name: &str) -> Option<&'a str> {
    tag.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The `value` of the first `<input name="{name}">`.
pub fn input_value(html: &str, name: &str) -> Option<String> {
    let inputs = tags(html, "input");
    let input = inputs.iter().find(|t| attr(t, "name") == Some(name))?;
    Some(attr(input, "value").unwrap_or_default().to_string())
}

/// The named inputs (name, value) of the form whose `action` ends with `action`.
pub fn form_fields(html: &str, action: &str) -> Option<Vec<(String, String)>> {
    let at = html.find(&format!("{action}\"")).or_else(|| html.find(&format!("{action}'")))?;
    let end = html[at..].find("</form>").map_or(html.len(), |e| at + e);
    let fields = tags(&html[at..end], "input")
        .into_iter()
        .filter(|t| attr(t, "type") != Some("submit"))
        .filter_map(|t| Some((attr(&t, "name")?.to_string(), attr(&t, "value").unwrap_or_default().to_string())))
        .collect();
    Some(fields)
}

// ---------------------------------------------------------------------------------------------
// The authorization-code flow in a scripted browser

/// A PKCE S256 pair: (code_verifier, code_challenge).
pub fn pkce() -> (String, String) {
    let verifier = b64(rand::random::<[u8; 32]>());
    let challenge = b64(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// `GET /auth/authorize` for a public app redirecting to [`REDIRECT`], `aud` = `base`.
pub fn authorize_url(
    base: &str,
    client_id: &str,
    scopes: &[&str],
    challenge: &str,
    state: &str,
    launch: Option<&str>,
) -> String {
    let mut query: Vec<(&str, String)> = vec![
        ("response_type", "code".into()),
        ("client_id", client_id.into()),
        ("redirect_uri", REDIRECT.into()),
        ("scope", scopes.join(" ")),
        ("state", state.into()),
        ("aud", base.into()),
        ("code_challenge", challenge.into()),
        ("code_challenge_method", "S256".into()),
    ];
    if let Some(l) = launch {
        query.push(("launch", l.into()));
    }
    reqwest::Url::parse_with_params(&format!("{base}/auth/authorize"), &query).expect("authorize URL").to_string()
}

/// What the user does in the browser.
#[derive(Clone, Copy)]
pub struct Login<'a> {
    pub username: &'a str,
    pub password: &'a str,
    /// An `fl_session` cookie (`fl_session=..`) from an earlier login: the authorize request
    /// then goes straight to the consent page.
    pub session: Option<&'a str>,
    /// Scopes to untick on the consent page.
    pub untick: &'a [&'a str],
    /// The patient a practitioner picks on the consent page (`launch/patient`).
    pub patient: Option<&'a str>,
    /// An EHR launch context (`launch=` of the authorize request).
    pub launch: Option<&'a str>,
}

impl<'a> Login<'a> {
    /// `username` with [`PASSWORD`], who approves every scope.
    pub fn new(username: &'a str) -> Login<'a> {
        Login { username, password: PASSWORD, session: None, untick: &[], patient: None, launch: None }
    }
}

/// The outcome of an approved authorization request.
pub struct Approval {
    pub code: String,
    pub state: String,
    /// The `fl_session` cookie (`fl_session=..`).
    pub session: String,
    /// The scopes the consent page offered, in its order.
    pub offered: Vec<String>,
}

/// Drives the browser from `authorize_url` through login (unless `login.session` is given)
/// and consent (approving all offered scopes but `login.untick`) to the 302 to the app;
/// returns its code and state.
pub async fn approve(http: &reqwest::Client, base: &str, authorize_url: &str, login: &Login<'_>) -> Approval {
    let mut req = http.get(authorize_url);
    if let Some(s) = login.session {
        req = req.header(COOKIE, s);
    }
    let r = send(req).await;
    assert_eq!(r.status, 200, "GET {authorize_url}: {}", r.text);
    let (page, session) = if let Some(s) = login.session {
        (r.text, cookie(&r.headers, "fl_session").unwrap_or_else(|| s.to_string()))
    } else {
        assert!(r.text.contains(r#"id="login""#), "the login page: {}", r.text);
        let request = input_value(&r.text, "request").expect("the login form's hidden request");
        let form = [("username", login.username), ("password", login.password), ("request", request.as_str())];
        let r = send(http.post(format!("{base}/auth/login")).form(&form)).await;
        assert_eq!(r.status, 200, "POST /auth/login as {}: {}", login.username, r.text);
        let session = cookie(&r.headers, "fl_session").expect("a successful login sets fl_session");
        (r.text, session)
    };
    assert!(page.contains(r#"id="consent""#), "the consent page: {page}");
    let offered: Vec<String> = tags(&page, "input")
        .iter()
        .filter(|t| attr(t, "type") == Some("checkbox") && attr(t, "name") == Some("scope"))
        .map(|t| attr(t, "value").unwrap_or_default().to_string())
        .collect();
    for n in 0..offered.len() {
        assert!(page.contains(&format!(r#"id="scope-{n}""#)), "checkbox scope-{n}: {page}");
        assert!(page.contains(&format!(r#"for="scope-{n}""#)), "a label for scope-{n}: {page}");
    }
    let request = input_value(&page, "request").expect("the consent form's hidden request");
    let csrf = input_value(&page, "csrf").expect("the consent form's CSRF token");
    let mut form: Vec<(&str, &str)> = vec![("request", request.as_str()), ("csrf", csrf.as_str())];
    form.extend(offered.iter().filter(|s| !login.untick.contains(&s.as_str())).map(|s| ("scope", s.as_str())));
    form.push(("decision", "approve"));
    if let Some(p) = login.patient {
        form.push(("patient", p));
    }
    let r = send(http.post(format!("{base}/auth/consent")).header(COOKIE, &session).form(&form)).await;
    assert_eq!(r.status, 302, "POST /auth/consent: {}", r.text);
    let location = r.header("location");
    let asked = reqwest::Url::parse(authorize_url).expect("authorize URL");
    if let Some(redirect) = query_param(&asked, "redirect_uri") {
        assert!(location.starts_with(&redirect), "redirected to the registered URI: {location}");
    }
    let to = reqwest::Url::parse(&location).unwrap_or_else(|e| panic!("Location {location:?}: {e}"));
    let code = query_param(&to, "code").unwrap_or_else(|| panic!("no code in {location}"));
    let state = query_param(&to, "state").unwrap_or_default();
    if let Some(sent) = query_param(&asked, "state") {
        assert_eq!(state, sent, "the state comes back");
    }
    Approval { code, state, session, offered }
}

/// One run of the flow with a fresh PKCE pair.
pub struct Flow {
    pub code: String,
    pub verifier: String,
    /// The `fl_session` cookie (`fl_session=..`).
    pub session: String,
}

/// Authorizes `scopes` for public app `client_id` (PKCE S256, `aud` = `base`) as `login`.
pub async fn browser_flow(
    http: &reqwest::Client,
    base: &str,
    client_id: &str,
    scopes: &[&str],
    login: &Login<'_>,
) -> Flow {
    let (verifier, challenge) = pkce();
    let url = authorize_url(base, client_id, scopes, &challenge, &random_hex(8), login.launch);
    let a = approve(http, base, &url, login).await;
    assert_eq!(a.offered, scopes, "one checkbox per requested scope, in request order");
    Flow { code: a.code, verifier, session: a.session }
}

/// `grant_type=authorization_code` for a public client.
pub async fn exchange(http: &reqwest::Client, base: &str, client_id: &str, code: &str, verifier: &str) -> Resp {
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier),
        ("client_id", client_id),
    ];
    send(http.post(format!("{base}/auth/token")).form(&form)).await
}

/// [`browser_flow`] and [`exchange`]: the token response (asserted 200), with the session
/// cookie added as `fl_session`.
/// The access token of a token response.
pub fn access_token(token_response: &Value) -> String {
    token_response["access_token"].as_str().unwrap_or_else(|| panic!("no access_token: {token_response}")).to_string()
}

pub async fn user_token(
    http: &reqwest::Client,
    base: &str,
    client_id: &str,
    scopes: &[&str],
    login: &Login<'_>,
) -> Value {
    let flow = browser_flow(http, base, client_id, scopes, login).await;
    let r = exchange(http, base, client_id, &flow.code, &flow.verifier).await;
    assert_eq!(r.status, 200, "token for {} {scopes:?}: {}", login.username, r.text);
    let mut v = r.json();
    assert!(v["access_token"].as_str().is_some_and(|t| !t.is_empty()), "an access token: {v}");
    v["fl_session"] = json!(flow.session);
    v
}

// ---------------------------------------------------------------------------------------------
// Data

pub fn patient(id: &str) -> Value {
    json!({ "resourceType": "Patient", "id": id, "name": [{ "family": format!("Family-{id}") }] })
}
