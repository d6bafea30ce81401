//! Signed tree heads: `(tree size, root hash, time)` signed by node keys, in the Parameters form
//! that `GET /ledger/head` serves and that proofs embed, and the quorum check a verifier runs
//! against the node keys it trusts (never against the keys the head itself names).

use consensus::merkle::Hash;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::Value;

use crate::fhir::json::Json;

pub use consensus::merkle::tree_head_message as message;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadSignature {
    pub node: String,
    pub public_key: [u8; 32],
    pub signature: [u8; 64],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeHead {
    pub size: u64,
    pub root: Hash,
    pub timestamp_ms: i64,
    /// One per cosigning node; a single node publishes its own alone.
    pub signatures: Vec<HeadSignature>,
}

fn param(name: &str, kind: &str, value: Json) -> Json {
    Json::obj(vec![("name", Json::String(name.into())), (kind, value)])
}

impl TreeHead {
    /// A head of `(size, root)` at `timestamp_ms`, signed by `key` as node `node`.
    pub fn signed(size: u64, root: Hash, timestamp_ms: i64, node: &str, key: &SigningKey) -> Self {
        let signature = key.sign(&message(size, &root, timestamp_ms)).to_bytes();
        let sig = HeadSignature { node: node.to_string(), public_key: key.verifying_key().to_bytes(), signature };
        Self { size, root, timestamp_ms, signatures: vec![sig] }
    }

    /// The head as Parameters parts (`treeSize`, `rootHash`, `timestamp`, one `signature` each).
    pub fn to_parts(&self) -> Vec<Json> {
        let mut parts = vec![
            param("treeSize", "valueString", Json::String(self.size.to_string())),
            param("rootHash", "valueBase64Binary", Json::base64(&self.root)),
            param("timestamp", "valueInstant", Json::String(crate::fhir::instant(self.timestamp_ms))),
        ];
        for s in &self.signatures {
            parts.push(Json::obj(vec![
                ("name", Json::String("signature".into())),
                (
                    "part",
                    Json::Array(vec![
                        param("node", "valueString", Json::String(s.node.clone())),
                        param("publicKey", "valueBase64Binary", Json::base64(&s.public_key)),
                        param("signature", "valueBase64Binary", Json::base64(&s.signature)),
                    ]),
                ),
            ]));
        }
        parts
    }

    /// Reads a head from a list of Parameters parts: the `parameter` array of a saved
    /// `GET /ledger/head`, or the `part` array of a proof's `treeHead`.
    pub fn from_parts(parts: &[Value]) -> Result<Self, String> {
        let size = string(parts, "treeSize", "valueString")?
            .parse()
            .map_err(|_| "treeSize is not a non-negative integer".to_string())?;
        let root = bytes::<32>(parts, "rootHash")?;
        let ts = string(parts, "timestamp", "valueInstant")?;
        let timestamp_ms = crate::fhir::date_range_ms(&ts)
            .map(|(start, _)| start)
            .ok_or_else(|| format!("timestamp {ts:?} is not an instant"))?;
        let mut signatures = Vec::new();
        for p in parts.iter().filter(|p| p["name"] == "signature") {
            let sub = p["part"].as_array().ok_or("a signature has no parts")?;
            signatures.push(HeadSignature {
                node: string(sub, "node", "valueString")?,
                public_key: bytes::<32>(sub, "publicKey")?,
                signature: bytes::<64>(sub, "signature")?,
            });
        }
        Ok(Self { size, root, timestamp_ms, signatures })
    }

    /// Counts the distinct `trusted` keys whose valid signature this head carries and checks
    /// that they reach `quorum`. Signatures by keys outside `trusted` count for nothing.
    pub fn check_quorum(&self, trusted: &[VerifyingKey], quorum: usize) -> Result<usize, String> {
        let msg = message(self.size, &self.root, self.timestamp_ms);
        let mut signers: Vec<[u8; 32]> = Vec::new();
        for s in &self.signatures {
            let Some(key) = trusted.iter().find(|k| k.as_bytes() == &s.public_key) else { continue };
            if key.verify(&msg, &Signature::from_bytes(&s.signature)).is_err() {
                return Err(format!("the signature of node {} does not verify: the head was altered", s.node));
            }
            if !signers.contains(&s.public_key) {
                signers.push(s.public_key);
            }
        }
        if signers.len() < quorum {
            return Err(format!(
                "signed by {} of the trusted keys, {quorum} required ({} signature(s) in all)",
                signers.len(),
                self.signatures.len()
            ));
        }
        Ok(signers.len())
    }
}

/// A node public key given on a command line: a file holding its hex (a node's `node.pub`) or
/// the 64 hex digits themselves.
pub fn read_key(given: &str) -> Result<VerifyingKey, String> {
    let text = if std::path::Path::new(given).exists() {
        std::fs::read_to_string(given).map_err(|e| format!("{given}: {e}"))?
    } else {
        given.to_string()
    };
    parse_key(&text).ok_or_else(|| format!("{given}: not a file or 64 hex digits of an ed25519 public key"))
}

/// An ed25519 public key from its hex.
pub fn parse_key(hex_text: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_text.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// The value of the first part named `name`.
pub fn part<'a>(parts: &'a [Value], name: &str) -> Option<&'a Value> {
    parts.iter().find(|p| p["name"] == name)
}

pub fn string(parts: &[Value], name: &str, kind: &str) -> Result<String, String> {
    part(parts, name).and_then(|p| p[kind].as_str()).map(str::to_string).ok_or_else(|| format!("{name} is missing"))
}

pub fn base64_of(value: &Value, name: &str) -> Result<Vec<u8>, String> {
    let s = value["valueBase64Binary"].as_str().ok_or_else(|| format!("{name} is not base64Binary"))?;
    crate::codec::unb64(s).map_err(|e| format!("{name}: {e}"))
}

pub fn bytes<const N: usize>(parts: &[Value], name: &str) -> Result<[u8; N], String> {
    let v = base64_of(part(parts, name).ok_or_else(|| format!("{name} is missing"))?, name)?;
    v.try_into().map_err(|_| format!("{name} must be {N} bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(head: &TreeHead) -> Vec<Value> {
        let json = Json::Array(head.to_parts()).to_compact();
        serde_json::from_str::<Value>(&json).unwrap().as_array().unwrap().clone()
    }

    #[test]
    fn round_trips_and_needs_a_quorum_of_trusted_keys() {
        let keys: Vec<SigningKey> = (1..=3u8).map(|i| SigningKey::from_bytes(&[i; 32])).collect();
        let trusted: Vec<VerifyingKey> = keys.iter().map(SigningKey::verifying_key).collect();
        let mut head = TreeHead::signed(7, [5; 32], 1_700_000_000_123, "1", &keys[0]);
        let cosigned = TreeHead::signed(7, [5; 32], 1_700_000_000_123, "2", &keys[1]);
        assert_eq!(TreeHead::from_parts(&parts(&head)).unwrap(), head);
        assert_eq!(head.check_quorum(&trusted, 1), Ok(1));
        assert!(head.check_quorum(&trusted, 2).is_err(), "one signature is not a majority of three");
        head.signatures.extend(cosigned.signatures);
        assert_eq!(head.check_quorum(&trusted, 2), Ok(2));
        // The same key twice is one signer.
        let twice = TreeHead { signatures: vec![head.signatures[0].clone(); 2], ..head.clone() };
        assert!(twice.check_quorum(&trusted, 2).is_err());
        // An untrusted key's valid signature counts for nothing.
        let stranger = TreeHead::signed(7, [5; 32], 1_700_000_000_123, "9", &SigningKey::from_bytes(&[9; 32]));
        assert!(stranger.check_quorum(&trusted, 1).is_err());
        // Any altered field breaks the signatures.
        for altered in [
            TreeHead { size: 8, ..head.clone() },
            TreeHead { root: [6; 32], ..head.clone() },
            TreeHead { timestamp_ms: 1, ..head.clone() },
        ] {
            assert!(altered.check_quorum(&trusted, 1).is_err());
        }
    }
}
