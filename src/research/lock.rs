//! A trial data lock: the versions a study may see of its enrolled subjects, frozen at a
//! signed tree head.
//!
//! The lock is a `List` (mode `snapshot`) of version-specific references and, beside it, a
//! leaf table (each entry's Merkle leaf and leaf hash); the locking node signs a small
//! statement (study, the List's digest, the table's digest, the tree head) as a detached JWS.
//! The lock file carries the List's exact bytes, the table, the head with its signatures, the
//! signature and one multiproof of every listed leaf at that head. Whoever holds the node keys
//! checks, offline: the head (a quorum of keys), the signature (the file was not altered), the
//! multiproof (every listed version is in the tree the head signs) and, given a later head
//! and a consistency proof, that the ledger only grew since (no version was rewritten). Later versions of locked
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

/// Records of the patient's choices and of who saw what, never trial data: a lock must not
/// stand between a patient and withdrawing (a Consent or an enrolment changes without a
/// reason), and the disclosure log is the server's own. The monitor's report follows them.
const NOT_LOCKED: [&str; 3] = ["AuditEvent", "Consent", "ResearchSubject"];

/// Every current resource of the study's enrolled subjects that `access`'s caller (reading
/// for the study) may see, in leaf order, with its leaf hash (but no [`NOT_LOCKED`] type).
pub fn select(engine: &Engine, access: &Access<'_>, study: &str) -> Result<Vec<Entry>, FhirError> {
    let mut picked = Vec::new();
    {
        let idx = engine.current()?;
        let book = access.books.get(engine.repo(), &idx)?;
        let enrolled: HashSet<&str> = book.research.enrolled(study).collect();
        let guard = guard_for(engine, &idx, access, false)?;
        let comps = engine.compartments();
        for rtype in idx.type_names().filter(|t| !NOT_LOCKED.contains(t)) {
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
    let entries: Vec<Value> = entries.iter().map(|e| json!({"item": {"reference": e.reference()}})).collect();
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

/// The List's canonical bytes: compact, keys sorted, without `meta` (what the server adds
/// when it stores it), so the List as stored gives the bytes that were signed.
pub fn list_bytes(list: &Value) -> Vec<u8> {
    match list.as_object() {
        Some(o) if o.contains_key("meta") => {
            let mut l = list.clone();
            if let Some(o) = l.as_object_mut() {
                o.remove("meta");
            }
            serde_json::to_vec(&l).unwrap_or_default()
        }
        _ => serde_json::to_vec(list).unwrap_or_default(),
    }
}

/// The leaf table: per List entry, in order, its leaf (8 bytes, big-endian) and leaf hash.
pub fn leaf_table(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 40);
    for e in entries {
        out.extend_from_slice(&e.leaf.to_be_bytes());
        out.extend_from_slice(&e.hash);
    }
    out
}

/// What a lock signature covers: a small statement of the study, the digests of the List's
/// canonical bytes and of the leaf table, and the tree head.
pub fn statement(study: &str, list: &[u8], table: &[u8], head: &Value) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let statement = json!({
        "format": FORMAT,
        "study": study,
        "listSha256": b64(&Sha256::digest(list)),
        "leavesSha256": b64(&Sha256::digest(table)),
        "treeHead": head,
    });
    serde_json::to_vec(&statement).unwrap_or_default()
}

pub fn sign(statement: &[u8], key: &SigningKey, node: &str) -> String {
    crate::jws::sign(TYP, statement, key, node)
}

/// The lock file: the study, the List's canonical bytes (as text: hashed as they are, never
/// re-serialized), the leaf table and the multiproof of its leaves at the head, the head and
/// the signature.
pub fn file(study: &str, list: &[u8], table: &[u8], head: &Value, signature: &str, multiproof: &[Hash]) -> Value {
    json!({"resourceType": "Parameters", "parameter": [
        {"name": "format", "valueString": FORMAT},
        {"name": "study", "valueString": study},
        {"name": "lock", "valueString": String::from_utf8_lossy(list)},
        {"name": "leaves", "valueBase64Binary": b64(table)},
        {"name": "treeHead", "part": head},
        {"name": "signature", "valueString": signature},
        {"name": "multiproof", "valueBase64Binary": b64(&multiproof.concat())},
    ]})
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
pub struct Locked<'f> {
    pub study: &'f str,
    /// The List's canonical bytes, as signed (borrowed from the file: tens of MB).
    pub list: &'f str,
    pub head: TreeHead,
    /// The leaf table: `(leaf, leaf hash)` per List entry, in leaf order, 40 bytes each.
    pub table: Vec<u8>,
    pub cosigners: usize,
    /// What the check hashed in bulk (List, leaf table, the signed statement), how many
    /// Merkle nodes (65-byte SHA-256 messages) and how many signatures it verified: the work
    /// the machine's crypto bound is measured against.
    pub bytes_hashed: u64,
    pub nodes: u64,
    pub signatures: u64,
}

/// Entry `i` of a leaf table.
fn leaf_at(table: &[u8], i: usize) -> (u64, Hash) {
    let row = &table[i * 40..i * 40 + 40];
    let (leaf, hash) = row.split_at(8);
    (u64::from_be_bytes(leaf.try_into().unwrap_or_default()), hash.try_into().unwrap_or_default())
}

impl Locked<'_> {
    /// How many versions the lock holds.
    pub fn len(&self) -> usize {
        self.table.len() / 40
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The locked versions: the List's references beside the leaf table.
    pub fn entries(&self) -> Result<Vec<Entry>, String> {
        let list: Value = serde_json::from_str(self.list).map_err(|e| format!("the lock List is not JSON: {e}"))?;
        let items = list["entry"].as_array().map_or(&[][..], Vec::as_slice);
        if items.len() != self.len() {
            return Err(format!("the lock List has {} entries and its leaf table {}", items.len(), self.len()));
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, e) in items.iter().enumerate() {
            let (leaf, hash) = leaf_at(&self.table, i);
            let r = e["item"]["reference"].as_str().ok_or_else(|| format!("List.entry[{i}] has no reference"))?;
            let (what, version) =
                r.rsplit_once("/_history/").ok_or_else(|| format!("List.entry[{i}] {r} names no version"))?;
            let (rtype, id) = what.split_once('/').ok_or_else(|| format!("List.entry[{i}] {r} is not Type/id"))?;
            let version = version.parse().map_err(|_| format!("List.entry[{i}] version {version:?}"))?;
            out.push(Entry { rtype: rtype.to_string(), id: id.to_string(), version, leaf, hash });
        }
        Ok(out)
    }
}

fn part<'a>(params: &'a Value, name: &str) -> Option<&'a Value> {
    params["parameter"].as_array().into_iter().flatten().find(|p| p["name"] == name)
}

fn string<'a>(params: &'a Value, name: &str, kind: &str) -> Result<&'a str, String> {
    part(params, name).and_then(|p| p[kind].as_str()).ok_or_else(|| format!("the lock file has no {name}"))
}

/// Checks a lock file against the node keys one trusts: the head's quorum, the signature over
/// the statement, the List and the leaf table against their digests in it, and that every
/// listed leaf is in the tree the head signs. The List is hashed, not parsed.
pub fn check<'f>(file: &'f Value, trusted: &[VerifyingKey], quorum: usize) -> Result<Locked<'f>, String> {
    if part(file, "format").and_then(|p| p["valueString"].as_str()) != Some(FORMAT) {
        return Err(format!("not a data lock file (format {FORMAT} expected)"));
    }
    let study = string(file, "study", "valueString")?;
    let list = string(file, "lock", "valueString")?;
    let head_parts = part(file, "treeHead").map(|p| p["part"].clone()).ok_or("the lock file holds no tree head")?;
    let head = TreeHead::from_parts(head_parts.as_array().map_or(&[][..], Vec::as_slice))
        .map_err(|e| format!("the lock's tree head: {e}"))?;
    let cosigners = head.check_quorum(trusted, quorum).map_err(|e| format!("the lock's tree head: {e}"))?;
    let table = unb64(string(file, "leaves", "valueBase64Binary")?).map_err(|e| format!("the leaf table: {e}"))?;
    let signed = statement(study, list.as_bytes(), &table, &head_parts);
    let jws = string(file, "signature", "valueString")?;
    crate::jws::check(jws, TYP, &signed, trusted, "the lock")
        .map_err(|e| format!("{e}: the lock file was altered after it was signed"))?;
    if table.len() % 40 != 0 {
        return Err("the leaf table is not whole (leaf, hash) pairs".into());
    }
    let n = table.len() / 40;
    let path: Vec<Hash> = {
        let blob =
            unb64(string(file, "multiproof", "valueBase64Binary")?).map_err(|e| format!("the multiproof: {e}"))?;
        if blob.len() % 32 != 0 {
            return Err("the multiproof is not whole hashes".into());
        }
        blob.chunks_exact(32).map(|c| c.try_into().unwrap_or_default()).collect()
    };
    // ed25519 hashes the base64url signing input; the digests cover List and table; each
    // Merkle node is one 65-byte SHA-256 message.
    let bytes_hashed = signed.len() as u64 * 4 / 3 + list.len() as u64 + table.len() as u64;
    let nodes = (n + path.len()).saturating_sub(1) as u64;
    let signatures = 1 + head.signatures.len() as u64;
    let leaves: Vec<(u64, Hash)> = (0..n).map(|i| leaf_at(&table, i)).collect();
    if n > 0 && proof::multi_root(&leaves, head.size, &path) != Some(head.root) {
        return Err(format!(
            "the {n} locked versions are not all in the tree of {} leaves the lock's head signs",
            head.size
        ));
    }
    Ok(Locked { study, list, head, table, cosigners, bytes_hashed, nodes, signatures })
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
