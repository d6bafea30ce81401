//! JSON Web Signatures, compact form, for exactly the algorithms this server uses: EdDSA
//! (access tokens, client assertions), RS256 (id_tokens, as SMART requires), RS384 and ES384
//! (client assertions). Anything else, `none` and every HMAC algorithm included, is refused
//! before a key is even looked at: the caller names the algorithms it accepts.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    EdDsa,
    Rs256,
    Rs384,
    Es384,
}

impl Alg {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "EdDSA" => Self::EdDsa,
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "ES384" => Self::Es384,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::EdDsa => "EdDSA",
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Es384 => "ES384",
        }
    }
}

/// A public key from a JWK.
#[derive(Clone, Debug)]
pub enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    Rsa(rsa::RsaPublicKey),
    P384(p384::ecdsa::VerifyingKey),
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

pub fn unb64(s: &str) -> Result<Vec<u8>, String> {
    B64.decode(s.trim_end_matches('=')).map_err(|e| format!("bad base64url: {e}"))
}

/// A token split and decoded, signature not yet checked.
pub struct Parsed<'a> {
    pub header: Map<String, Value>,
    pub claims: Map<String, Value>,
    signing_input: &'a str,
    signature: Vec<u8>,
}

impl Parsed<'_> {
    pub fn alg(&self) -> Option<&str> {
        self.header.get("alg").and_then(Value::as_str)
    }

    pub fn kid(&self) -> Option<&str> {
        self.header.get("kid").and_then(Value::as_str)
    }

    /// Checks the signature with `key`; the header's `alg` must be one of `accepted` and fit
    /// the key's type.
    pub fn verify(&self, key: &PublicKey, accepted: &[Alg]) -> Result<(), String> {
        let name = self.alg().ok_or("the token header has no alg")?;
        let alg =
            Alg::parse(name).filter(|a| accepted.contains(a)).ok_or_else(|| format!("alg {name} is not accepted"))?;
        let msg = self.signing_input.as_bytes();
        let ok = match (alg, key) {
            (Alg::EdDsa, PublicKey::Ed25519(k)) => ed25519_dalek::Signature::from_slice(&self.signature)
                .map(|s| k.verify_strict(msg, &s).is_ok())
                .unwrap_or(false),
            (Alg::Rs256, PublicKey::Rsa(k)) => {
                use rsa::signature::Verifier;
                let vk = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(k.clone());
                rsa::pkcs1v15::Signature::try_from(self.signature.as_slice()).is_ok_and(|s| vk.verify(msg, &s).is_ok())
            }
            (Alg::Rs384, PublicKey::Rsa(k)) => {
                use rsa::signature::Verifier;
                let vk = rsa::pkcs1v15::VerifyingKey::<sha2::Sha384>::new(k.clone());
                rsa::pkcs1v15::Signature::try_from(self.signature.as_slice()).is_ok_and(|s| vk.verify(msg, &s).is_ok())
            }
            (Alg::Es384, PublicKey::P384(k)) => {
                use p384::ecdsa::signature::Verifier;
                p384::ecdsa::Signature::from_slice(&self.signature).is_ok_and(|s| k.verify(msg, &s).is_ok())
            }
            _ => return Err(format!("alg {name} does not fit the key")),
        };
        if ok {
            Ok(())
        } else {
            Err("the signature does not verify".into())
        }
    }
}

/// Splits a compact JWS. Nothing is trusted until [`Parsed::verify`] says so.
pub fn parse(token: &str) -> Result<Parsed<'_>, String> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not a compact JWS (three dot-separated parts)".into());
    };
    let obj = |part: &str, what: &str| -> Result<Map<String, Value>, String> {
        match serde_json::from_slice(&unb64(part)?) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(format!("the token {what} is not a JSON object")),
        }
    };
    let header = obj(h, "header")?;
    let claims = obj(c, "payload")?;
    let signing_input = &token[..h.len() + 1 + c.len()];
    Ok(Parsed { header, claims, signing_input, signature: unb64(s)? })
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

pub fn sign_eddsa(key: &ed25519_dalek::SigningKey, kid: &str, typ: &str, claims: &Value) -> String {
    use ed25519_dalek::Signer;
    let input = signing_input(&json!({"alg": "EdDSA", "typ": typ, "kid": kid}), claims);
    let sig = key.sign(input.as_bytes());
    format!("{input}.{}", b64(&sig.to_bytes()))
}

pub fn sign_rs256(key: &rsa::RsaPrivateKey, kid: &str, claims: &Value) -> String {
    use rsa::signature::{SignatureEncoding, Signer};
    let input = signing_input(&json!({"alg": "RS256", "typ": "JWT", "kid": kid}), claims);
    let sk = rsa::pkcs1v15::SigningKey::<Sha256>::new(key.clone());
    format!("{input}.{}", b64(&sk.sign(input.as_bytes()).to_bytes()))
}

/// A key id: the first 16 hex digits of the SHA-256 of the key's public bytes.
pub fn kid(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

pub fn ed25519_jwk(key: &ed25519_dalek::VerifyingKey, kid: &str) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "x": b64(key.as_bytes()), "kid": kid, "alg": "EdDSA", "use": "sig"})
}

pub fn rsa_jwk(key: &rsa::RsaPublicKey, kid: &str) -> Value {
    use rsa::traits::PublicKeyParts;
    json!({"kty": "RSA", "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be()),
           "kid": kid, "alg": "RS256", "use": "sig"})
}

/// A verifying key from one JWK (OKP Ed25519, RSA, or EC P-384).
pub fn from_jwk(jwk: &Value) -> Result<PublicKey, String> {
    let field = |k: &str| -> Result<Vec<u8>, String> {
        unb64(jwk.get(k).and_then(Value::as_str).ok_or_else(|| format!("the JWK has no {k}"))?)
    };
    match jwk.get("kty").and_then(Value::as_str) {
        Some("OKP") if jwk.get("crv").and_then(Value::as_str) == Some("Ed25519") => {
            let x: [u8; 32] = field("x")?.try_into().map_err(|_| "an Ed25519 x must be 32 bytes")?;
            ed25519_dalek::VerifyingKey::from_bytes(&x).map(PublicKey::Ed25519).map_err(|e| e.to_string())
        }
        Some("RSA") => {
            let n = rsa::BigUint::from_bytes_be(&field("n")?);
            let e = rsa::BigUint::from_bytes_be(&field("e")?);
            let key = rsa::RsaPublicKey::new(n, e).map_err(|e| format!("bad RSA key: {e}"))?;
            use rsa::traits::PublicKeyParts;
            if key.size() < 256 {
                return Err("RSA keys must have at least 2048 bits".into());
            }
            Ok(PublicKey::Rsa(key))
        }
        Some("EC") if jwk.get("crv").and_then(Value::as_str) == Some("P-384") => {
            let (x, y) = (field("x")?, field("y")?);
            if x.len() != 48 || y.len() != 48 {
                return Err("P-384 coordinates must be 48 bytes".into());
            }
            let mut sec1 = vec![4u8];
            sec1.extend(x);
            sec1.extend(y);
            p384::ecdsa::VerifyingKey::from_sec1_bytes(&sec1).map(PublicKey::P384).map_err(|e| e.to_string())
        }
        other => Err(format!("unsupported JWK key type {other:?} (use OKP Ed25519, RSA or EC P-384)")),
    }
}

/// The key `kid` names in a JWKS (`{"keys": [...]}`), or its only key when `kid` is absent.
pub fn key_in_jwks(jwks: &Value, kid: Option<&str>) -> Result<PublicKey, String> {
    let keys = jwks.get("keys").and_then(Value::as_array).ok_or("the JWKS has no keys array")?;
    let found = match kid {
        Some(k) => keys.iter().find(|j| j.get("kid").and_then(Value::as_str) == Some(k)),
        None if keys.len() == 1 => keys.first(),
        None => None,
    };
    from_jwk(found.ok_or_else(|| format!("no key with kid {kid:?} in the client's JWKS"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ed_key() -> ed25519_dalek::SigningKey {
        ed25519_dalek::SigningKey::from_bytes(&[7; 32])
    }

    #[test]
    fn eddsa_round_trip_and_tamper() {
        let k = ed_key();
        let t = sign_eddsa(&k, "k1", "at+jwt", &json!({"sub": "a"}));
        let pk = PublicKey::Ed25519(k.verifying_key());
        let p = parse(&t).unwrap();
        assert!(p.verify(&pk, &[Alg::EdDsa]).is_ok());
        assert!(p.verify(&pk, &[Alg::Rs256]).is_err(), "alg not accepted");
        let mut parts: Vec<&str> = t.split('.').collect();
        let forged = b64(br#"{"sub":"b"}"#);
        parts[1] = &forged;
        let forged = parts.join(".");
        assert!(parse(&forged).unwrap().verify(&pk, &[Alg::EdDsa]).is_err());
    }

    #[test]
    fn none_and_hmac_are_refused() {
        let pk = PublicKey::Ed25519(ed_key().verifying_key());
        for alg in ["none", "HS256", "HS384"] {
            let t = format!("{}.{}.", b64(format!(r#"{{"alg":"{alg}"}}"#).as_bytes()), b64(b"{}"));
            let p = parse(&t).unwrap();
            assert!(p.verify(&pk, &[Alg::EdDsa, Alg::Rs256, Alg::Rs384, Alg::Es384]).is_err(), "{alg}");
        }
        assert!(parse("a.b").is_err());
    }

    #[test]
    fn jwk_round_trip() {
        let k = ed_key();
        let jwk = ed25519_jwk(&k.verifying_key(), "x");
        assert!(matches!(from_jwk(&jwk), Ok(PublicKey::Ed25519(_))));
        let jwks = json!({"keys": [jwk]});
        assert!(key_in_jwks(&jwks, Some("x")).is_ok());
        assert!(key_in_jwks(&jwks, Some("y")).is_err());
    }
}
