//! A trial data lock: the versions a study may see of its enrolled subjects, frozen at a
//! signed tree head.
//!
//! The lock is a `List` (mode `snapshot`) of version-specific references, each with the
//! Merkle leaf that wrote it and that leaf's hash, and a detached JWS by the locking node over
//! the list and the tree head; the lock file carries both with the head's signatures and one
//! multiproof of every listed leaf at that head. Whoever holds the node keys checks, offline:
//! the head (a quorum of keys), the signature (the file was not altered), the multiproof (every
//! listed version is in the tree the head signs) and, given a later head and a consistency
//! proof, that the ledger only grew since (no version was rewritten). Later versions of locked
//! resources are amendments: refused without a reason, listed with who, when and why.

use std::collections::HashSet;

use consensus::merkle::{leaf_hash, Hash};
use consensus::proof;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde_json::{json, Value};

use crate::auth::access::{guard_for, Access};
use crate::codec::{b64, unb64};
use crate::error::FhirError;
use crate::search::index::Engine;
use crate::search::Visibility as _;
use crate::treehead::TreeHead;

pub const FORMAT: &str = "fhir-ledger-data-lock/1";
/// The JWS `typ` of a lock signature.
pub const TYP: &str = "fhir-ledger-data-lock+jws";
/// The List code of a data lock.
pub const CODE_SYSTEM: &str = "urn:fhir-ledger:CodeSystem/research";
pub const DATA_LOCK: &str = "data-lock";
/// The lock List's identifier system; the value is the study's id.
pub const STUDY_SYSTEM: &str = "urn:fhir-ledger:research-study";
/// On each List entry: `leaf:base64(leaf hash)`.
pub const LEAF_EXTENSION: &str = "urn:fhir-ledger:StructureDefinition/ledger-leaf";
/// In a new version's `meta.extension`: why locked data changes (21 CFR 11.10(e)).
pub const AMENDMENT_REASON: &str = "urn:fhir-ledger:StructureDefinition/amendment-reason";

/// One locked version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub rtype: String,
    pub id: String,
    pub version: u64,
    pub leaf: u64,
    pub hash: Hash,
}

impl Entry {
    pub fn reference(&self) -> String {
        format!("{}/{}/_history/{}", self.rtype, self.id, self.version)
    }
}

/// Every current resource of the study's enrolled subjects that `access`'s caller (reading
/// for the study) may see, in leaf order, with its leaf hash.
pub fn select(engine: &Engine, access: &Access<'_>, study: &str) -> Result<Vec<Entry>, FhirError> {
    let mut picked = Vec::new();
    {
        let idx = engine.current()?;
        let book = access.books.get(engine.repo(), &idx)?;
        let enrolled: HashSet<&str> = book.research.enrolled(study).collect();
        let guard = guard_for(engine, &idx, access, false)?;
        let comps = engine.compartments();
        for rtype in idx.type_names() {
            for item in idx.of(rtype).scan(0) {
                let (key, doc) = item?;
                let theirs = comps.patient_ids(rtype, &doc).iter().any(|p| enrolled.contains(p));
                if theirs && guard.visible(rtype, key, &doc) {
                    picked.push((rtype.to_string(), doc.id.clone(), doc.version, doc.leaf));
                }
            }
        }
    }
    picked.sort_by_key(|p| p.3);
    let view = engine.repo().view();
    picked
        .into_iter()
        .map(|(rtype, id, version, leaf)| {
            let r = view.record(leaf)?.ok_or_else(|| FhirError::internal(format!("leaf {leaf} has no record")))?;
            Ok(Entry { rtype, id, version, leaf, hash: leaf_hash(&r.header.encode()) })
        })
        .collect()
}

/// The lock List (no id or meta yet) of `entries` for `study`, locked by `who` at `now_ms`.
pub fn list(study: &str, entries: &[Entry], who: Option<&str>, now_ms: i64) -> Value {
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({"item": {"reference": e.reference()},
                   "extension": [{"url": LEAF_EXTENSION, "valueString": format!("{}:{}", e.leaf, b64(&e.hash))}]})
        })
        .collect();
    let mut l = json!({
        "resourceType": "List",
        "status": "current",
        "mode": "snapshot",
        "title": format!("Data lock of ResearchStudy/{study}"),
        "code": {"coding": [{"system": CODE_SYSTEM, "code": DATA_LOCK, "display": "trial data lock"}]},
        "identifier": [{"system": STUDY_SYSTEM, "value": study}],
        "date": crate::fhir::instant(now_ms),
        "entry": entries,
    });
    if let Some(w) = who {
        l["source"] = json!({"reference": w});
    }
    if l["entry"].as_array().is_some_and(Vec::is_empty) {
        l["emptyReason"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/list-empty-reason", "code": "nilknown"}]});
    }
    l
}

/// The bytes a lock signature covers: the list without `meta`, and the head's parts.
pub fn payload(list: &Value, head: &Value) -> Vec<u8> {
    let mut list = list.clone();
    if let Some(o) = list.as_object_mut() {
        o.remove("meta");
    }
    serde_json::to_vec(&json!({"format": FORMAT, "list": list, "treeHead": head})).unwrap_or_default()
}

pub fn sign(list: &Value, head: &Value, key: &SigningKey, node: &str) -> String {
    crate::jws::sign(TYP, &payload(list, head), key, node)
}

/// The lock file: the List as stored, the head, the signature, and the multiproof of every
/// listed leaf at that head.
pub fn file(list: &Value, head: &Value, signature: &str, multiproof: &[Hash]) -> Value {
    let mut parameter = vec![
        json!({"name": "format", "valueString": FORMAT}),
        json!({"name": "lock", "resource": list}),
        json!({"name": "treeHead", "part": head}),
        json!({"name": "signature", "valueString": signature}),
    ];
    parameter.extend(multiproof.iter().map(|h| json!({"name": "multiproof", "valueBase64Binary": b64(h)})));
    json!({"resourceType": "Parameters", "parameter": parameter})
}

/// The multiproof of `entries` (in leaf order) at a tree of `size` leaves.
pub fn multiproof(engine: &Engine, entries: &[Entry], size: u64) -> Result<Vec<Hash>, FhirError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let leaves: Vec<u64> = entries.iter().map(|e| e.leaf).collect();
    proof::multi_proof(engine.repo().view(), &leaves, size)
        .ok_or_else(|| FhirError::internal("no multiproof of the locked leaves"))
}

/// A lock file whose signature, head and multiproof hold.
#[derive(Debug)]
pub struct Locked {
    pub study: String,
    pub list: Value,
    pub head: TreeHead,
    pub entries: Vec<Entry>,
    pub cosigners: usize,
    /// What the check hashed (Merkle nodes, the signed payload) and how many signatures it
    /// verified: the work the machine's crypto bound is measured against.
    pub bytes_hashed: u64,
    pub signatures: u64,
}

fn part<'a>(params: &'a Value, name: &str) -> impl Iterator<Item = &'a Value> + 'a {
    let name = name.to_string();
    params["parameter"].as_array().into_iter().flatten().filter(move |p| p["name"] == name.as_str())
}

/// The entries a lock List names, in its order.
pub fn entries_of(list: &Value) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (i, e) in list["entry"].as_array().into_iter().flatten().enumerate() {
        let at = || format!("List.entry[{i}]");
        let r = e["item"]["reference"].as_str().ok_or_else(|| format!("{} has no reference", at()))?;
        let (what, version) = r.rsplit_once("/_history/").ok_or_else(|| format!("{} {r} names no version", at()))?;
        let (rtype, id) = what.split_once('/').ok_or_else(|| format!("{} {r} is not Type/id", at()))?;
        let leaf = e["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["url"] == LEAF_EXTENSION)
            .and_then(|x| x["valueString"].as_str())
            .ok_or_else(|| format!("{} has no leaf", at()))?;
        let (index, hash) = leaf.split_once(':').ok_or_else(|| format!("{} leaf {leaf:?} is not index:hash", at()))?;
        let hash: Hash = unb64(hash)
            .ok()
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| format!("{} leaf hash is not 32 bytes", at()))?;
        out.push(Entry {
            rtype: rtype.to_string(),
            id: id.to_string(),
            version: version.parse().map_err(|_| format!("{} version {version:?}", at()))?,
            leaf: index.parse().map_err(|_| format!("{} leaf index {index:?}", at()))?,
            hash,
        });
    }
    Ok(out)
}

/// Checks a lock file against the node keys one trusts: the head's quorum, the signature over
/// list and head, and that every listed leaf is in the tree the head signs.
pub fn check(file: &Value, trusted: &[VerifyingKey], quorum: usize) -> Result<Locked, String> {
    if part(file, "format").next().and_then(|p| p["valueString"].as_str()) != Some(FORMAT) {
        return Err(format!("not a data lock file (format {FORMAT} expected)"));
    }
    let list = part(file, "lock").next().map(|p| p["resource"].clone()).ok_or("the lock file holds no lock List")?;
    let head_parts =
        part(file, "treeHead").next().map(|p| p["part"].clone()).ok_or("the lock file holds no tree head")?;
    let head = TreeHead::from_parts(head_parts.as_array().map_or(&[][..], Vec::as_slice))
        .map_err(|e| format!("the lock's tree head: {e}"))?;
    let cosigners = head.check_quorum(trusted, quorum).map_err(|e| format!("the lock's tree head: {e}"))?;
    let jws = part(file, "signature").next().and_then(|p| p["valueString"].as_str()).ok_or("the lock is not signed")?;
    let signed = payload(&list, &head_parts);
    crate::jws::check(jws, TYP, &signed, trusted, "the lock")
        .map_err(|e| format!("{e}: the lock file was altered after it was signed"))?;
    // ed25519 hashes the base64url signing input; each Merkle node is a 65-byte SHA-256 input.
    let mut bytes_hashed = signed.len() as u64 * 4 / 3;
    let signatures = 1 + head.signatures.len() as u64;
    let study = list["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["system"] == STUDY_SYSTEM)
        .and_then(|i| i["value"].as_str())
        .ok_or("the lock List names no study")?
        .to_string();
    let entries = entries_of(&list)?;
    if !entries.is_empty() {
        let mut leaves: Vec<(u64, Hash)> = entries.iter().map(|e| (e.leaf, e.hash)).collect();
        leaves.sort_by_key(|l| l.0);
        let mut path = Vec::new();
        for p in part(file, "multiproof") {
            let h = p["valueBase64Binary"].as_str().and_then(|s| unb64(s).ok()).and_then(|h| h.try_into().ok());
            path.push(h.ok_or("a multiproof hash is not 32 bytes of base64")?);
        }
        bytes_hashed += 65 * (leaves.len() + path.len()).saturating_sub(1) as u64;
        if proof::multi_root(&leaves, head.size, &path) != Some(head.root) {
            return Err(format!(
                "the {} locked versions are not all in the tree of {} leaves the lock's head signs",
                entries.len(),
                head.size
            ));
        }
    }
    Ok(Locked { study, list, head, entries, cosigners, bytes_hashed, signatures })
}

/// Checks that the tree `now` (already checked against trusted keys) extends the lock's tree.
pub fn check_extends(lock: &Locked, now: &TreeHead, consistency: &[Hash]) -> Result<(), String> {
    if proof::verify_consistency(lock.head.size, now.size, &lock.head.root, &now.root, consistency) {
        return Ok(());
    }
    Err(format!(
        "consistency fails: the ledger of {} leaves is not an append-only extension of the {} leaves locked at {}; \
         its history was rewritten",
        now.size,
        lock.head.size,
        crate::fhir::instant(lock.head.timestamp_ms)
    ))
}
