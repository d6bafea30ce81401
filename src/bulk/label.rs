//! The trust label of an export: a JSON document naming the signed tree head the export is
//! pinned to and each file's SHA-256, line count and size, with detached JWS signatures
//! (RFC 7515 appendix F, EdDSA) by the exporting nodes' keys, identified by their RFC 7638
//! thumbprints. A receiver holding the node keys checks it without the sender
//! (`fhir-ledger verify export`).

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde_json::{json, Value};

use super::{Job, Kind};
use crate::error::FhirError;

/// Format 2: each proof file ends in one multiproof of its leaves (format 1 gave every line
/// its own path).
pub const FORMAT: &str = "fhir-ledger-trust-label/2";
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

pub use crate::jws::thumbprint;

/// A detached compact JWS over job `id`'s label by `key` (node `node`).
pub fn sign(job: &Job, id: &str, key: &SigningKey, node: &str) -> Result<String, FhirError> {
    Ok(crate::jws::sign(TYP, &payload(&content(job, id)), key, node))
}

/// Checks detached `jws` over `payload`: the key it names by thumbprint must be one of
/// `trusted`. Returns that key.
pub fn check(jws: &str, payload: &[u8], trusted: &[VerifyingKey]) -> Result<VerifyingKey, String> {
    crate::jws::check(jws, TYP, payload, trusted, "a trust label")
}
