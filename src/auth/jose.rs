//! The thin adapter between this server and the `jsonwebtoken` crate, which parses, signs and
//! verifies every JWS here: EdDSA access tokens, RS256 id_tokens, RS384/ES384/EdDSA client
//! assertions and the tokens of external issuers.
//!
//! The crate does the cryptography (RustCrypto backend: the same `ed25519-dalek`, `rsa` and
//! `p384` this server already builds), the compact-form parsing and the algorithm rules:
//! `alg: none` does not even parse, and a key of one family never verifies an algorithm of
//! another (so an RSA or Ed25519 public key can never be used as an HMAC secret).
//!
//! What stays here, each a few lines and each on purpose:
//! - the list of algorithms accepted per use (`accepted` in [`verify`]), checked before any key
//!   is touched, so a message says which `alg` was refused;
//! - [`from_jwk`]: the crate turns any JWK into a key, `oct` (HMAC) ones included, and its
//!   Ed25519 verifier indexes the key bytes without a length check (a short `x` would panic).
//!   Keys from clients and external issuers are untrusted input, so this checks them first:
//!   OKP Ed25519 (32 bytes, not a weak point), RSA of at least 2048 bits, EC P-384 on the
//!   curve; nothing else. (The crate verifies Ed25519 with dalek's `verify`, not
//!   `verify_strict`: refusing small-order keys here closes the gap that matters, and our own
//!   key is derived, never weak);
//! - `crit` headers are refused (RFC 7515 4.1.11: we understand no extension; the crate parses
//!   `crit` but does not act on it);
//! - [`kid`], the key id format that CONTRACT.md documents (clients derive it);
//! - the claims checks (times, issuer, audience) live with their callers
//!   (`caller::check_times_and_parties`, the client-assertion rules in `endpoints`): the
//!   crate's `Validation` has no trailing-'/' tolerance on `aud`, no `iat` fallback for `nbf`,
//!   and only generic error names, so it is used here for the signature alone.

use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType,
    PublicKeyUse, RSAKeyParameters, RSAKeyType,
};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use jsonwebtoken::Algorithm as Alg;

use crate::codec::{b64url, unb64url};

/// A verifying key from a JWK that [`from_jwk`] accepted.
#[derive(Clone)]
pub struct PublicKey(DecodingKey);

impl PublicKey {
    pub fn ed25519(key: &ed25519_dalek::VerifyingKey) -> Self {
        Self(DecodingKey::from_ed_der(key.as_bytes()))
    }
}

/// A token's header and claims before its signature is checked: only for choosing the key
/// (`iss`, `kid`). Never act on these claims; [`verify`] returns the ones to use.
pub struct Unverified {
    pub header: Header,
    pub claims: Map<String, Value>,
}

impl Unverified {
    pub fn kid(&self) -> Option<&str> {
        self.header.kid.as_deref()
    }

    pub fn str_claim(&self, k: &str) -> Option<&str> {
        self.claims.get(k).and_then(Value::as_str)
    }
}

fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidToken => "not a compact JWS (three dot-separated parts)".into(),
        K::InvalidSignature => "the signature does not verify".into(),
        K::InvalidAlgorithm | K::InvalidKeyFormat | K::InvalidEddsaKey | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
            "the token's alg does not fit the key".into()
        }
        K::Base64(_) | K::Json(_) | K::Utf8(_) => format!("the token is malformed: {e}"),
        _ => format!("the token does not verify: {e}"),
    }
}

/// Splits a compact JWS and decodes its header and claims. Nothing is trusted until [`verify`]
/// says so; `alg: none` and unknown algorithms fail here already.
pub fn peek(token: &str) -> Result<Unverified, String> {
    let data = jsonwebtoken::dangerous::insecure_decode::<Map<String, Value>>(token).map_err(|e| match e.kind() {
        jsonwebtoken::errors::ErrorKind::Json(_) => format!("the token's header or payload is not a JWT: {e}"),
        _ => describe(&e),
    })?;
    Ok(Unverified { header: data.header, claims: data.claims })
}

/// Checks the signature of `token` with `key`: its `alg` must be one of `accepted` and of the
/// key's family. Returns the verified claims; times, issuer and audience are the caller's.
pub fn verify(token: &str, key: &PublicKey, accepted: &[Alg]) -> Result<Map<String, Value>, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| describe(&e))?;
    if !accepted.contains(&header.alg) {
        return Err(format!("alg {:?} is not accepted", header.alg));
    }
    if header.alg.family() != key.0.family() {
        return Err(format!("alg {:?} does not fit the key", header.alg));
    }
    if header.crit.is_some() {
        return Err("the token header has crit extensions, which this server does not understand".into());
    }
    let mut v = Validation::new(header.alg);
    // Signature only: see the module comment for where the claims are checked.
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    jsonwebtoken::decode::<Map<String, Value>>(token, &key.0, &v).map(|d| d.claims).map_err(|e| describe(&e))
}

/// An EdDSA signing key for [`sign`].
pub fn ed25519_signing(key: &ed25519_dalek::SigningKey) -> EncodingKey {
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    match key.to_pkcs8_der() {
        Ok(der) => EncodingKey::from_ed_der(der.as_bytes()),
        Err(e) => unreachable!("an Ed25519 key always encodes as PKCS#8: {e}"),
    }
}

/// An RS256 signing key for [`sign`].
pub fn rsa_signing(key: &rsa::RsaPrivateKey) -> EncodingKey {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    match key.to_pkcs1_der() {
        Ok(der) => EncodingKey::from_rsa_der(der.as_bytes()),
        Err(e) => unreachable!("an RSA key always encodes as PKCS#1: {e}"),
    }
}

/// Signs `claims` with one of this server's own keys.
pub fn sign(alg: Alg, key: &EncodingKey, kid: &str, typ: &str, claims: &Value) -> String {
    let header = Header { typ: Some(typ.to_string()), kid: Some(kid.to_string()), ..Header::new(alg) };
    // Our keys are built by this process for their algorithm and a JSON value always
    // serializes, so signing cannot fail.
    match jsonwebtoken::encode(&header, claims, key) {
        Ok(t) => t,
        Err(e) => unreachable!("signing with the server's own {alg:?} key failed: {e}"),
    }
}

/// A key id: the first 16 hex digits of the SHA-256 of the key's public bytes.
pub fn kid(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

fn published(kid: &str, alg: KeyAlgorithm, algorithm: AlgorithmParameters) -> Value {
    let common = CommonParameters {
        public_key_use: Some(PublicKeyUse::Signature),
        key_algorithm: Some(alg),
        key_id: Some(kid.to_string()),
        ..Default::default()
    };
    serde_json::to_value(Jwk { common, algorithm }).unwrap_or_else(|e| unreachable!("a JWK serializes: {e}"))
}

pub fn ed25519_jwk(key: &ed25519_dalek::VerifyingKey, kid: &str) -> Value {
    let okp = OctetKeyPairParameters {
        key_type: OctetKeyPairType::OctetKeyPair,
        curve: EllipticCurve::Ed25519,
        x: b64url(key.as_bytes()),
    };
    published(kid, KeyAlgorithm::EdDSA, AlgorithmParameters::OctetKeyPair(okp))
}

pub fn rsa_jwk(key: &rsa::RsaPublicKey, kid: &str) -> Value {
    use rsa::traits::PublicKeyParts;
    let params = RSAKeyParameters {
        key_type: RSAKeyType::RSA,
        n: b64url(&key.n().to_bytes_be()),
        e: b64url(&key.e().to_bytes_be()),
    };
    published(kid, KeyAlgorithm::RS256, AlgorithmParameters::RSA(params))
}

/// A verifying key from one JWK (OKP Ed25519, RSA of 2048 bits or more, or EC P-384), checked
/// as the module comment says before the crate sees it.
pub fn from_jwk(jwk: &Value) -> Result<PublicKey, String> {
    use rsa::traits::PublicKeyParts;
    let unsupported = || {
        format!(
            "unsupported JWK key type {:?} (use OKP Ed25519, RSA or EC P-384)",
            jwk.get("kty").and_then(Value::as_str)
        )
    };
    if !matches!(jwk.get("kty").and_then(Value::as_str), Some("OKP" | "RSA" | "EC")) {
        return Err(unsupported());
    }
    let parsed: Jwk = serde_json::from_value(jwk.clone()).map_err(|e| format!("malformed JWK: {e}"))?;
    let key = match &parsed.algorithm {
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            let x: [u8; 32] = unb64url(&p.x)?.try_into().map_err(|_| "an Ed25519 x must be 32 bytes")?;
            let k = ed25519_dalek::VerifyingKey::from_bytes(&x).map_err(|e| format!("bad Ed25519 key: {e}"))?;
            if k.is_weak() {
                return Err("bad Ed25519 key: a point of small order".into());
            }
            DecodingKey::from_ed_der(&x)
        }
        AlgorithmParameters::RSA(p) => {
            let n = rsa::BigUint::from_bytes_be(&unb64url(&p.n)?);
            let e = rsa::BigUint::from_bytes_be(&unb64url(&p.e)?);
            let key = rsa::RsaPublicKey::new(n, e).map_err(|e| format!("bad RSA key: {e}"))?;
            if key.size() < 256 {
                return Err("RSA keys must have at least 2048 bits".into());
            }
            DecodingKey::from_rsa_raw_components(&key.n().to_bytes_be(), &key.e().to_bytes_be())
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => {
            let (x, y) = (unb64url(&p.x)?, unb64url(&p.y)?);
            if x.len() != 48 || y.len() != 48 {
                return Err("P-384 coordinates must be 48 bytes".into());
            }
            let mut sec1 = Vec::with_capacity(97);
            sec1.push(4u8);
            sec1.extend(x);
            sec1.extend(y);
            p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).map_err(|e| format!("bad P-384 key: {e}"))?;
            DecodingKey::from_ec_der(&sec1)
        }
        _ => return Err(unsupported()),
    };
    Ok(PublicKey(key))
}

/// The key `kid` names in a JWKS (`{"keys": [...]}`), or its only key when `kid` is absent.
pub fn key_in_jwks(jwks: &Value, kid: Option<&str>) -> Result<PublicKey, String> {
    let keys = jwks.get("keys").and_then(Value::as_array).ok_or("the JWKS has no keys array")?;
    let found = match kid {
        Some(k) => keys.iter().find(|j| j.get("kid").and_then(Value::as_str) == Some(k)),
        None if keys.len() == 1 => keys.first(),
        None => None,
    };
    from_jwk(found.ok_or_else(|| format!("no key with kid {kid:?} in the JWKS"))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ed_key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[7; 32])
    }

    fn claims() -> Value {
        json!({"iss": "https://as.example", "sub": "a", "exp": 4_000_000_000i64})
    }

    fn all() -> [Alg; 4] {
        [Alg::EdDSA, Alg::RS256, Alg::RS384, Alg::ES384]
    }

    /// A token with `header` and `claims`, signed by `sign` over the signing input.
    fn forge(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
        let sig = sign(input.as_bytes());
        format!("{input}.{}", b64url(&sig))
    }

    fn tampered(token: &str) -> String {
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = b64url(br#"{"iss":"https://as.example","sub":"b","exp":4000000000}"#);
        parts[1] = &forged;
        parts.join(".")
    }

    fn rsa_key() -> rsa::RsaPrivateKey {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::from_seed([3; 32]);
        rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA key")
    }

    #[test]
    fn eddsa_round_trip_and_tamper() {
        let k = ed_key();
        let t = sign(Alg::EdDSA, &ed25519_signing(&k), "k1", "at+jwt", &claims());
        let pk = from_jwk(&ed25519_jwk(&k.verifying_key(), "k1")).expect("our JWK");
        let peeked = peek(&t).expect("peek");
        assert_eq!((peeked.kid(), peeked.header.typ.as_deref()), (Some("k1"), Some("at+jwt")));
        assert_eq!(verify(&t, &pk, &[Alg::EdDSA]).expect("verifies")["sub"], "a");
        assert_eq!(verify(&t, &PublicKey::ed25519(&k.verifying_key()), &[Alg::EdDSA]).expect("verifies")["sub"], "a");
        assert!(verify(&t, &pk, &[Alg::RS256]).is_err(), "alg not accepted");
        assert!(verify(&tampered(&t), &pk, &[Alg::EdDSA]).is_err(), "tampered claims");
        let other = PublicKey::ed25519(&ed25519_dalek::SigningKey::from_bytes(&[8; 32]).verifying_key());
        assert!(verify(&t, &other, &[Alg::EdDSA]).is_err(), "another key");
    }

    #[test]
    fn rs256_round_trip_and_jwk() {
        let k = rsa_key();
        let t = sign(Alg::RS256, &rsa_signing(&k), "r1", "JWT", &claims());
        let jwk = rsa_jwk(&k.to_public_key(), "r1");
        assert_eq!(
            (jwk["kty"].as_str(), jwk["alg"].as_str(), jwk["use"].as_str()),
            (Some("RSA"), Some("RS256"), Some("sig"))
        );
        let pk = from_jwk(&jwk).expect("our JWK");
        assert_eq!(verify(&t, &pk, &[Alg::RS256]).expect("verifies")["sub"], "a");
        assert!(verify(&t, &pk, &[Alg::RS384]).is_err(), "only the accepted algorithms");
        assert!(verify(&tampered(&t), &pk, &[Alg::RS256]).is_err());
    }

    #[test]
    fn rs384_round_trip() {
        use rsa::signature::{SignatureEncoding, Signer};
        let k = rsa_key();
        let sk = rsa::pkcs1v15::SigningKey::<sha2::Sha384>::new(k.clone());
        let t = forge(&json!({"alg": "RS384", "kid": "c1"}), &claims(), |m| sk.sign(m).to_vec());
        let pk = key_in_jwks(&json!({"keys": [rsa_jwk(&k.to_public_key(), "c1")]}), Some("c1")).expect("key");
        assert_eq!(verify(&t, &pk, &[Alg::RS384, Alg::ES384, Alg::EdDSA]).expect("verifies")["sub"], "a");
        assert!(verify(&tampered(&t), &pk, &[Alg::RS384]).is_err());
        // The same key with the header changed to RS256: the signature no longer matches.
        let relabelled = forge(&json!({"alg": "RS256", "kid": "c1"}), &claims(), |m| sk.sign(m).to_vec());
        assert!(verify(&relabelled, &pk, &all()).is_err());
    }

    #[test]
    fn es384_round_trip() {
        use p384::ecdsa::signature::Signer;
        let sk = p384::ecdsa::SigningKey::from_slice(&[5; 48]).expect("P-384 key");
        let point = sk.verifying_key().to_encoded_point(false);
        let (x, y) = (point.x().expect("x"), point.y().expect("y"));
        let jwk = json!({"kty": "EC", "crv": "P-384", "x": b64url(x), "y": b64url(y), "kid": "e1"});
        let pk = from_jwk(&jwk).expect("P-384 JWK");
        let sign = |m: &[u8]| {
            let s: p384::ecdsa::Signature = sk.sign(m);
            s.to_bytes().to_vec()
        };
        let t = forge(&json!({"alg": "ES384", "kid": "e1"}), &claims(), sign);
        assert_eq!(verify(&t, &pk, &[Alg::RS384, Alg::ES384, Alg::EdDSA]).expect("verifies")["sub"], "a");
        assert!(verify(&tampered(&t), &pk, &[Alg::ES384]).is_err());
        assert!(verify(&t, &pk, &[Alg::RS384, Alg::EdDSA]).is_err(), "ES384 not accepted");
        let p256 = json!({"kty": "EC", "crv": "P-256", "x": b64url(&[1; 32]), "y": b64url(&[2; 32])});
        assert!(from_jwk(&p256).is_err(), "only P-384");
    }

    #[test]
    fn none_and_hmac_are_refused() {
        fn hmac(secret: &[u8]) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
            move |m: &[u8]| {
                use hmac::Mac;
                let mut mac = <hmac::Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC key");
                mac.update(m);
                mac.finalize().into_bytes().to_vec()
            }
        }
        let k = ed_key();
        let public = k.verifying_key().to_bytes();
        let keys =
            [PublicKey::ed25519(&k.verifying_key()), from_jwk(&rsa_jwk(&rsa_key().to_public_key(), "r")).expect("RSA")];
        let mut tokens = Vec::new();
        for alg in ["none", "HS256", "HS384", "HS512", "None", "NONE"] {
            tokens.push((alg, format!("{}.{}.", b64url(format!(r#"{{"alg":"{alg}"}}"#).as_bytes()), b64url(b"{}"))));
        }
        // Algorithm confusion: HMAC keyed with the public key's bytes or its JWK `x`.
        tokens.push(("HS256 keyed with the public key", forge(&json!({"alg": "HS256"}), &claims(), hmac(&public))));
        let x = b64url(&public);
        tokens.push(("HS256 keyed with the JWK x", forge(&json!({"alg": "HS256"}), &claims(), hmac(x.as_bytes()))));
        for (what, t) in &tokens {
            for pk in &keys {
                assert!(verify(t, pk, &all()).is_err(), "{what}");
            }
        }
        let hs = verify(&tokens[1].1, &keys[0], &all()).expect_err("HS256");
        assert!(hs.contains("HS256 is not accepted"), "{hs}");
        assert!(peek("a.b").is_err());
        assert!(peek("not-a-token").is_err());
        assert!(from_jwk(&json!({"kty": "oct", "k": b64url(b"secret")})).is_err(), "no HMAC keys from a JWKS");
        // An Ed25519-signed token relabelled RS256 is refused for the Ed25519 key.
        let t = sign(Alg::EdDSA, &ed25519_signing(&k), "k", "JWT", &claims());
        let parts: Vec<&str> = t.split('.').collect();
        let relabelled = format!("{}.{}.{}", b64url(br#"{"alg":"RS256"}"#), parts[1], parts[2]);
        assert!(verify(&relabelled, &keys[0], &all()).is_err());
        let crit = forge(&json!({"alg": "EdDSA", "crit": ["exp"]}), &claims(), |m| {
            use ed25519_dalek::Signer;
            k.sign(m).to_bytes().to_vec()
        });
        assert!(verify(&crit, &keys[0], &all()).is_err(), "crit extensions");
    }

    #[test]
    fn jwk_checks() {
        let k = ed_key();
        let jwk = ed25519_jwk(&k.verifying_key(), "x");
        assert_eq!(
            jwk,
            json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(k.verifying_key().as_bytes()), "kid": "x", "alg": "EdDSA", "use": "sig"})
        );
        assert!(from_jwk(&jwk).is_ok());
        let jwks = json!({"keys": [jwk]});
        assert!(key_in_jwks(&jwks, Some("x")).is_ok());
        assert!(key_in_jwks(&jwks, None).is_ok(), "the only key");
        assert!(key_in_jwks(&jwks, Some("y")).is_err());
        let short = json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(&[1; 16])});
        assert!(from_jwk(&short).is_err(), "a short Ed25519 x is refused (the crate would panic on it)");
        let small = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).expect("RSA key");
        assert!(from_jwk(&rsa_jwk(&small.to_public_key(), "s")).is_err(), "RSA-1024");
        assert!(
            from_jwk(&json!({"kty": "EC", "crv": "P-384", "x": b64url(&[1; 48]), "y": b64url(&[2; 48])})).is_err(),
            "off the curve"
        );
    }
}
