//! Self-contained, sealed values the server hands out and takes back: authorization codes,
//! pending authorize requests, browser sessions and EHR launch contexts. Sealed with a key
//! derived from the KEK (XChaCha20-Poly1305), so any node can open what another sealed, and
//! a client can neither read nor forge them. Each carries its purpose (the AAD) and expiry.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    exp: i64,
    v: T,
}

pub fn seal<T: Serialize>(key: &[u8; 32], purpose: &str, ttl_s: i64, value: &T) -> String {
    let env = Envelope { exp: super::now_s() + ttl_s, v: value };
    let plain = serde_json::to_vec(&env).unwrap_or_default();
    crate::crypto::seal_text(key, &plain, purpose.as_bytes())
}

/// Opens a sealed value; `Err` says whether it was expired or not ours.
pub fn open<T: DeserializeOwned>(key: &[u8; 32], purpose: &str, sealed: &str) -> Result<T, &'static str> {
    let plain = crate::crypto::open_text(key, sealed, purpose.as_bytes()).ok_or("not a value this server issued")?;
    let env: Envelope<T> = serde_json::from_slice(&plain).map_err(|_| "not a value this server issued")?;
    if env.exp < super::now_s() {
        return Err("expired");
    }
    Ok(env.v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_purpose_and_expiry() {
        let k = [3u8; 32];
        let s = super::seal(&k, "code", 60, &("a", 1));
        assert_eq!(super::open::<(String, i32)>(&k, "code", &s).unwrap(), ("a".to_string(), 1));
        assert!(super::open::<(String, i32)>(&k, "session", &s).is_err());
        assert!(super::open::<(String, i32)>(&[4u8; 32], "code", &s).is_err());
        let old = super::seal(&k, "code", -5, &1);
        assert_eq!(super::open::<i32>(&k, "code", &old), Err("expired"));
    }
}
