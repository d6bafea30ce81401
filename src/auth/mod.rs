//! SMART App Launch 2.x: the embedded authorization server and the checks every FHIR request
//! passes. The HTTP contract is in `CONTRACT.md` beside this file.
//!
//! `jose` adapts the `jsonwebtoken` crate, which signs and verifies JWTs; `scopes` parses SMART scopes; `store` keeps clients, users
//! and grants as records on the ledger (so every node of a cluster sees them); `caller` turns
//! a bearer token into a [`Caller`]; `access` decides what a caller may see; `endpoints` and
//! `pages` serve the OAuth endpoints and the HTML the patient sees; `admin` registers clients
//! and users.

pub mod access;
pub mod caller;
pub mod jose;
pub mod scopes;
pub mod seal;
pub mod store;
pub mod throttle;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub use self::caller::Caller;
use crate::config::{ConsentDefault, ExternalIssuer};

/// What a node needs to issue and check tokens; one per process, shared by the workers.
pub struct Auth {
    pub enabled: bool,
    /// The FHIR base URL clients use: the token `iss` and `aud`.
    pub public_url: String,
    pub consent_default: ConsentDefault,
    pub access_ttl_secs: i64,
    access_key: ed25519_dalek::SigningKey,
    /// The same key, in the form `jsonwebtoken` signs with.
    access_signing: jsonwebtoken::EncodingKey,
    pub access_kid: String,
    /// Derives the RS256 id_token key the first time one is needed (generation takes a while).
    id_seed: [u8; 32],
    id_key: OnceLock<IdKey>,
    /// Seals authorization codes, sessions, launch contexts and pending requests.
    pub seal_key: [u8; 32],
    /// Keys the CSRF tokens of login sessions.
    csrf_key: [u8; 32],
    /// Keys user record ids (an HMAC of the user name).
    user_id_key: [u8; 32],
    /// Derives each de-identified study's key (its pseudonyms and date shifts).
    deid_key: [u8; 32],
    pub external: Vec<ExternalIssuer>,
    /// Verified tokens by SHA-256, so a token's signature is checked once, not per request.
    verified: Mutex<HashMap<[u8; 32], Arc<caller::Claims>>>,
    /// External issuers' key sets, fetched on first use.
    external_keys: Mutex<HashMap<String, serde_json::Value>>,
    pub disclosures: crate::disclosure::Log,
    pub books: crate::consent::Books,
    /// Failed sign-ins per account and source.
    pub logins: throttle::Throttle,
    records: caller::Records<store::Client>,
    grants: caller::Records<store::Grant>,
}

/// The RS256 id_token key: its signing form, key id and public JWK.
pub struct IdKey {
    pub signing: jsonwebtoken::EncodingKey,
    pub kid: String,
    pub jwk: serde_json::Value,
}

fn derive(kek: &[u8; 32], label: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(kek).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The settings [`Auth::new`] takes.
pub struct Settings {
    pub enabled: bool,
    pub public_url: String,
    pub consent_default: ConsentDefault,
    pub access_ttl_secs: i64,
    pub external: Vec<ExternalIssuer>,
}

impl Auth {
    /// Whether what `caller` is shown goes to the disclosure log: not for an unrestricted
    /// caller (the administrator, or a node without authorization), nor with the log off.
    pub fn logs_disclosures_of(&self, caller: &Caller) -> bool {
        !caller.unrestricted && self.disclosures.enabled()
    }

    /// Keys derive from the cluster-wide KEK, so every node issues and accepts the same tokens
    /// without another secret to distribute.
    pub fn new(s: Settings, kek: &[u8; 32], disclosures: crate::disclosure::Log) -> Self {
        let access_key =
            ed25519_dalek::SigningKey::from_bytes(&derive(kek, "fhir-ledger auth access-token signing v1"));
        let access_kid = jose::kid(access_key.verifying_key().as_bytes());
        Self {
            enabled: s.enabled,
            public_url: s.public_url.trim_end_matches('/').to_string(),
            consent_default: s.consent_default,
            access_ttl_secs: s.access_ttl_secs,
            access_signing: jose::ed25519_signing(&access_key),
            access_key,
            access_kid,
            id_seed: derive(kek, "fhir-ledger auth id-token rsa v1"),
            id_key: OnceLock::new(),
            seal_key: derive(kek, "fhir-ledger auth sealing v1"),
            csrf_key: derive(kek, "fhir-ledger auth csrf v1"),
            user_id_key: derive(kek, "fhir-ledger auth user id v1"),
            deid_key: derive(kek, "fhir-ledger research de-identification v1"),
            external: s.external,
            verified: Mutex::new(HashMap::new()),
            external_keys: Mutex::new(HashMap::new()),
            disclosures,
            books: crate::consent::Books::default(),
            logins: throttle::Throttle::default(),
            records: caller::Records::default(),
            grants: caller::Records::default(),
        }
    }

    /// Authorization off: every request is an unrestricted caller and nothing is logged.
    pub fn disabled() -> Self {
        let s = Settings {
            enabled: false,
            public_url: String::new(),
            consent_default: ConsentDefault::OptOut,
            access_ttl_secs: 3600,
            external: Vec::new(),
        };
        Self::new(s, &[0; 32], crate::disclosure::Log::disabled())
    }

    pub fn access_public(&self) -> ed25519_dalek::VerifyingKey {
        self.access_key.verifying_key()
    }

    pub fn sign_access(&self, claims: &serde_json::Value) -> String {
        jose::sign(jose::Alg::EdDSA, &self.access_signing, &self.access_kid, "at+jwt", claims)
    }

    /// The RS256 key for id_tokens: RSA-2048 generated from a seed derived from the KEK, so every
    /// node derives the same key.
    pub fn id_key(&self) -> &IdKey {
        self.id_key.get_or_init(|| {
            use rand::SeedableRng;
            use rsa::traits::PublicKeyParts;
            let mut rng = rand_chacha::ChaCha20Rng::from_seed(self.id_seed);
            let key = match rsa::RsaPrivateKey::new(&mut rng, 2048) {
                Ok(k) => k,
                Err(e) => unreachable!("RSA key generation from a seeded RNG cannot fail: {e}"),
            };
            let kid = jose::kid(&key.n().to_bytes_be());
            IdKey { signing: jose::rsa_signing(&key), jwk: jose::rsa_jwk(&key.to_public_key(), &kid), kid }
        })
    }

    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({"keys": [
            jose::ed25519_jwk(&self.access_public(), &self.access_kid),
            self.id_key().jwk,
        ]})
    }

    /// The visibility context of one caller's request, or `None` when nothing is restricted.
    pub fn access<'a>(&'a self, caller: &'a Caller) -> Option<access::Access<'a>> {
        (!caller.unrestricted).then_some(access::Access { caller, books: &self.books, default: self.consent_default })
    }

    /// A study's de-identification key: the same on every node, different for every study, so
    /// pseudonyms link inside a study and not across studies.
    pub fn study_key(&self, study: &str) -> [u8; 32] {
        derive(&self.deid_key, study)
    }

    /// The id of a user's record: HMAC-SHA256 of the user name under a KEK-derived key (40 hex
    /// digits). Every node computes the same id, so a sign-in is one lookup, but the ids the
    /// ledger's headers carry reveal no user name to anyone without the KEK (an unsalted hash
    /// could be reversed by hashing guessed names).
    pub fn user_id(&self, username: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.user_id_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key"));
        mac.update(username.as_bytes());
        hex::encode(mac.finalize().into_bytes())[..40].to_string()
    }

    /// The CSRF token of a login session (its random nonce and user): the forms a session may
    /// post carry it, and a post without the session's own token is refused.
    pub fn csrf_token(&self, session_nonce: &str, user_id: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.csrf_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key"));
        mac.update(session_nonce.as_bytes());
        mac.update(b"\0");
        mac.update(user_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Whether a state-changing form post may come from where it says: no `Origin` header (a
    /// non-browser client), or exactly the public URL's origin.
    pub fn origin_ok(&self, origin: Option<&str>) -> bool {
        origin.is_none_or(|o| origin_of(o).is_some_and(|o| Some(o) == origin_of(&self.public_url)))
    }

    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.public_url)
    }

    fn cached(&self, token: &str) -> (Option<Arc<caller::Claims>>, [u8; 32]) {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let hit = self.verified.lock().unwrap_or_else(PoisonError::into_inner).get(&digest).cloned();
        (hit, digest)
    }

    fn remember(&self, digest: [u8; 32], claims: Arc<caller::Claims>) {
        let mut v = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if v.len() > 50_000 {
            let now = now_s();
            v.retain(|_, c| c.exp > now);
            if v.len() > 50_000 {
                v.clear();
            }
        }
        v.insert(digest, claims);
    }
}

/// `scheme://host[:port]` of a URL, lower-cased, without a default port; `None` for anything
/// else (`null`, a path).
pub fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default().to_ascii_lowercase();
    if authority.is_empty() || authority.contains('@') || !matches!(scheme.as_str(), "http" | "https") {
        return None;
    }
    let default_port = if scheme == "https" { ":443" } else { ":80" };
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    Some(format!("{scheme}://{authority}"))
}

/// Equality of secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn now_s() -> i64 {
    crate::fhir::now_ms().div_euclid(1000)
}

/// A fresh random identifier (128 bits, hex).
pub fn random_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        assert_eq!(origin_of("https://Fhir.Example:443/r4/").as_deref(), Some("https://fhir.example"));
        assert_eq!(origin_of("http://127.0.0.1:8080").as_deref(), Some("http://127.0.0.1:8080"));
        assert_eq!(origin_of("null"), None);
        assert_eq!(origin_of("ftp://x"), None);
        let auth = Auth::new(
            Settings {
                enabled: true,
                public_url: "http://127.0.0.1:8080/fhir".into(),
                consent_default: ConsentDefault::OptOut,
                access_ttl_secs: 60,
                external: vec![],
            },
            &[7; 32],
            crate::disclosure::Log::disabled(),
        );
        assert!(auth.origin_ok(None));
        assert!(auth.origin_ok(Some("http://127.0.0.1:8080")));
        assert!(!auth.origin_ok(Some("http://127.0.0.1:8081")));
        assert!(!auth.origin_ok(Some("https://127.0.0.1:8080")));
        assert!(!auth.origin_ok(Some("null")));
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"ab", b"abc")
        );
    }
}
