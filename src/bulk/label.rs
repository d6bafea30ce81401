//! The trust label of an export: a JSON document naming the signed tree head the export is
//! pinned to and each file's SHA-256, line count and size, with detached JWS signatures
//! (RFC 7515 appendix F, EdDSA) by the exporting nodes' keys, identified by their RFC 7638
//! thumbprints. A receiver holding the node keys checks it without the sender
//! (`fhir-ledger verify export`).

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{Job, Kind};
use crate::codec::{b64url, unb64url};
use crate::error::FhirError;

pub const FORMAT: &str = "fhir-ledger-trust-label/1";
/// The JWS `typ` of a trust label signature.
pub const TYP: &str = "fhir-ledger-trust-label+jws";
/// The name of the label file beside the data, and of the manifest extension that carries it.
pub const FILE: &str = "trust-label.json";
pub const EXTENSION: &str = "urn:fhir-ledger:bulk:trust-label";

fn kind(k: Kind) -> &'static str {
    match k {
        Kind::Output => "output",
        Kind::Deleted => "deleted",
        Kind::Error => "error",
    }
}

/// The label's unsigned content (keys sorted: `serde_json` maps are ordered).
pub fn content(job: &Job, id: &str) -> Value {
    let files: Vec<Value> = job
        .files
        .iter()
        .map(|f| {
            json!({"name": f.name, "type": f.rtype, "kind": kind(f.kind), "count": f.count, "bytes": f.bytes,
                   "sha256": f.sha256})
        })
        .collect();
    json!({
        "format": FORMAT,
        "export": id,
        "request": job.request,
        "transactionTime": crate::fhir::instant(job.transaction_time_ms),
        "treeHead": job.head,
        "files": files,
        // `_elements` exports hold parts of resources, which no leaf commits to.
        "subsetted": job.params.elements.is_some(),
    })
}

/// The exact bytes the signatures cover: the compact serialization of [`content`].
pub fn payload(content: &Value) -> Vec<u8> {
    serde_json::to_vec(content).unwrap_or_default()
}

/// The label file: its content and signatures.
pub fn document(job: &Job, id: &str) -> Value {
    json!({"label": content(job, id), "signatures": job.signatures})
}

/// RFC 7638 thumbprint of an Ed25519 public key (as an OKP JWK).
pub fn thumbprint(key: &VerifyingKey) -> String {
    let jwk = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, b64url(key.as_bytes()));
    b64url(&Sha256::digest(jwk.as_bytes()))
}

/// A detached compact JWS over job `id`'s label by `key` (node `node`).
pub fn sign(job: &Job, id: &str, key: &SigningKey, node: &str) -> Result<String, FhirError> {
    let header = json!({"alg": "EdDSA", "kid": thumbprint(&key.verifying_key()), "typ": TYP, "node": node});
    let h = b64url(&serde_json::to_vec(&header).map_err(FhirError::internal)?);
    let input = format!("{h}.{}", b64url(&payload(&content(job, id))));
    Ok(format!("{h}..{}", b64url(&key.sign(input.as_bytes()).to_bytes())))
}

/// Checks detached `jws` over `payload`: the key it names by thumbprint must be one of
/// `trusted`. Returns that key.
pub fn check(jws: &str, payload: &[u8], trusted: &[VerifyingKey]) -> Result<VerifyingKey, String> {
    let mut it = jws.split('.');
    let (Some(h), Some(""), Some(sig), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err("a trust label signature is not a detached compact JWS".into());
    };
    let header: Value = unb64url(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("a trust label signature's header is not JSON")?;
    if header["alg"] != "EdDSA" || header["typ"] != TYP {
        return Err(format!("a trust label signature has alg {} and typ {}", header["alg"], header["typ"]));
    }
    let kid = header["kid"].as_str().unwrap_or_default();
    let key = trusted
        .iter()
        .find(|k| thumbprint(k) == kid)
        .ok_or_else(|| format!("the trust label is signed by key {kid}, which is not trusted"))?;
    let sig: [u8; 64] =
        unb64url(sig).ok().and_then(|s| s.try_into().ok()).ok_or("a trust label signature is not 64 bytes")?;
    let input = format!("{h}.{}", b64url(payload));
    key.verify(input.as_bytes(), &Signature::from_bytes(&sig))
        .map_err(|_| format!("the trust label signature by {kid} does not verify"))?;
    Ok(*key)
}
