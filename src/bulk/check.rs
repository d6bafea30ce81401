//! A Bulk export as a client saved it (`manifest.json` and every file it links, under the
//! last segment of its URL) checked against its trust label, trusting only the node keys
//! given: the label's signature, the tree head's quorum, each file's SHA-256 and line count,
//! every line's leaf and content commitment, and each file's multiproof of its leaves. Names
//! the file and line of the first thing that fails. `fhir-ledger verify export`, `transfer pull` and `$import`
//! run it, on a directory or on files held in memory ([`Files`]).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use consensus::merkle::{leaf_hash, Hash};
use consensus::LeafHeader;
use ed25519_dalek::VerifyingKey;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::label;
use super::render::proofs_name;
use crate::codec::unb64;
use crate::treehead::TreeHead;

/// Why an export did not verify: the evidence failed (tampering), or it could not be read.
#[derive(Debug)]
pub enum Failure {
    Invalid(String),
    Unchecked(String),
}

use Failure::{Invalid, Unchecked};

/// What a verified export holds: the head it is pinned to, and each data file's leaves,
/// line for line.
pub struct Verified {
    pub head: TreeHead,
    pub cosigners: usize,
    pub signers: usize,
    pub lines: u64,
    /// `(file name, kind, leaf of each line)` of the output and deletion files.
    pub files: Vec<(String, String, Vec<u64>)>,
    /// The export was reduced by `_elements`: its lines are not bound to their leaves.
    pub subsetted: bool,
    /// What the check hashed, the Merkle nodes it computed and how many signatures it
    /// verified (its cryptographic floor).
    pub bytes_hashed: u64,
    pub nodes_hashed: u64,
    pub signatures: u64,
    /// The output files as [`check_keeping`] read them, in the label's order (empty after
    /// [`check`]): an import then reads no file and parses no proof a second time.
    pub kept: Vec<Kept>,
    /// Every subtree hash the files' multiproofs gave or implied, by (offset, width), after
    /// [`check_keeping`]: enough to prove any subset of the export's leaves
    /// ([`Verified::multi_proof`]).
    pub known: HashMap<(u64, u64), Hash>,
}

impl Verified {
    /// One multiproof of `leaves` (sorted, distinct, all in the export) to the export's head,
    /// from the subtrees its files' multiproofs gave; `None` if one is missing.
    pub fn multi_proof(&self, leaves: &[u64]) -> Option<Vec<Hash>> {
        consensus::proof::multi_proof_by(leaves, self.head.size, &|offset, n| self.known.get(&(offset, n)).copied())
    }
}

/// An output file as the check read it: its text, and each line's source, line for line.
pub struct Kept {
    pub name: String,
    pub text: String,
    pub sources: Vec<Source>,
}

/// The source version of a verified line: `type/id` from its leaf header (as references
/// name it), the leaf, and the leaf's data.
pub struct Source {
    pub key: String,
    pub leaf: u64,
    pub leaf_data: Vec<u8>,
}

impl Source {
    /// The resource type (a type name holds no `/`).
    pub fn rtype(&self) -> &str {
        self.key.split_once('/').map_or(self.key.as_str(), |(t, _)| t)
    }

    pub fn id(&self) -> &str {
        self.key.split_once('/').map_or("", |(_, id)| id)
    }
}

/// A downloaded export's files by name. A file the label names but the download lacks is
/// `Invalid` (something dropped it).
pub trait Files: Sync {
    fn read(&self, name: &str) -> Result<Vec<u8>, Failure>;
}

/// The files of a directory.
pub struct Dir<'a>(pub &'a Path);

impl Files for Dir<'_> {
    fn read(&self, name: &str) -> Result<Vec<u8>, Failure> {
        let path = self.0.join(name);
        std::fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Invalid(format!("{}: missing", path.display())),
            _ => Unchecked(format!("{}: {e}", path.display())),
        })
    }
}

/// Files held in memory (a server's `$import` keeps no plaintext on disk).
impl<S: std::hash::BuildHasher + Sync> Files for HashMap<String, Vec<u8>, S> {
    fn read(&self, name: &str) -> Result<Vec<u8>, Failure> {
        self.get(name).cloned().ok_or_else(|| Invalid(format!("{name}: missing")))
    }
}

/// The label and the manifest: without them nothing can be checked (not a sign of tampering).
fn read_json(files: &dyn Files, name: &str) -> Result<Value, Failure> {
    let bytes = files.read(name).map_err(|(Invalid(e) | Unchecked(e))| Unchecked(e))?;
    serde_json::from_slice(&bytes).map_err(|e| Unchecked(format!("{name}: not JSON: {e}")))
}

/// Checks the export in `dir` against `trusted` node keys, `quorum` of which must have
/// signed its tree head.
pub fn check_dir(dir: &Path, trusted: &[VerifyingKey], quorum: usize) -> Result<Verified, Failure> {
    check(&Dir(dir), trusted, quorum)
}

/// [`check_dir`] over any [`Files`].
pub fn check(dir: &dyn Files, trusted: &[VerifyingKey], quorum: usize) -> Result<Verified, Failure> {
    check_with(dir, trusted, quorum, false)
}

/// [`check`], keeping the output files and their lines' sources for an import ([`Verified::kept`]).
pub fn check_keeping(dir: &dyn Files, trusted: &[VerifyingKey], quorum: usize) -> Result<Verified, Failure> {
    check_with(dir, trusted, quorum, true)
}

fn check_with(dir: &dyn Files, trusted: &[VerifyingKey], quorum: usize, keep: bool) -> Result<Verified, Failure> {
    let doc = read_json(dir, label::FILE)?;
    let content = &doc["label"];
    if content["format"] != label::FORMAT {
        return Err(Unchecked(format!("{}: not a trust label of format {}", label::FILE, label::FORMAT)));
    }
    let payload = label::payload(content);
    let mut signers = 0;
    let mut why = String::from("no signatures");
    for jws in doc["signatures"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        match label::check(jws, &payload, trusted) {
            Ok(_) => signers += 1,
            Err(e) => why = e,
        }
    }
    if signers == 0 {
        return Err(Invalid(format!("{}: not signed by a trusted key ({why})", label::FILE)));
    }
    let parts = content["treeHead"].as_array().ok_or_else(|| Unchecked("the trust label has no treeHead".into()))?;
    let head = TreeHead::from_parts(parts).map_err(|e| Unchecked(format!("the trust label's tree head: {e}")))?;
    let cosigners = head.check_quorum(trusted, quorum).map_err(|e| Invalid(format!("the export's tree head: {e}")))?;
    let files = content["files"].as_array().ok_or_else(|| Unchecked("the trust label has no files".into()))?;
    check_manifest(dir, files)?;
    let subsetted = content["subsetted"] == true;
    let signatures = (signers + head.signatures.len()) as u64;
    // Files are checked on every core, the longest first; the first failure in the label's
    // order is reported.
    let results = crate::parallel::on_every_core_longest_first(
        files,
        |f| f["count"].as_u64().unwrap_or(0),
        |f| check_file(dir, f, &head, subsetted, keep),
    );
    let mut seen: HashSet<u64> = HashSet::new();
    let mut lines = 0u64;
    let mut bound = Vec::new();
    let mut kept = Vec::new();
    let mut bytes_hashed = payload.len() as u64;
    let mut nodes_hashed = 0;
    let mut known = HashMap::new();
    for r in results {
        let c = r.ok_or_else(|| Unchecked("a checking thread failed".into()))??;
        bytes_hashed += c.hashed;
        nodes_hashed += c.nodes;
        kept.extend(c.kept);
        known.extend(c.known);
        let Some((name, kind, leaves)) = c.file else { continue };
        for (i, &leaf) in leaves.iter().enumerate() {
            if !seen.insert(leaf) {
                return Err(Invalid(format!("{name} line {}: leaf {leaf} appears a second time in the export", i + 1)));
            }
        }
        lines += leaves.len() as u64;
        bound.push((name, kind, leaves));
    }
    Ok(Verified {
        head,
        cosigners,
        signers,
        lines,
        files: bound,
        subsetted,
        bytes_hashed,
        nodes_hashed,
        signatures,
        kept,
        known,
    })
}

/// One file checked: the bytes and Merkle nodes hashed, for data files their name, kind and
/// leaves, an output file kept for an import and the subtree hashes its multiproof gave.
#[derive(Default)]
struct Checked {
    hashed: u64,
    nodes: u64,
    file: Option<(String, String, Vec<u64>)>,
    kept: Option<Kept>,
    known: Vec<((u64, u64), Hash)>,
}

/// Checks one file the label names (digest, count) and, for data files, every line against
/// its proof.
fn check_file(dir: &dyn Files, f: &Value, head: &TreeHead, subsetted: bool, keep: bool) -> Result<Checked, Failure> {
    let name = f["name"].as_str().unwrap_or_default();
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(Invalid(format!("the trust label names a file {name:?}")));
    }
    let bytes = dir.read(name)?;
    let mut hashed = bytes.len() as u64;
    if hex::encode(Sha256::digest(&bytes)) != f["sha256"].as_str().unwrap_or_default() {
        return Err(Invalid(format!("{name}: its SHA-256 is not the one the trust label signs")));
    }
    let text = String::from_utf8(bytes).map_err(|_| Invalid(format!("{name}: not UTF-8")))?;
    let data: Vec<&str> = text.lines().collect();
    if data.len() as u64 != f["count"].as_u64().unwrap_or(u64::MAX) {
        return Err(Invalid(format!("{name}: {} lines, the trust label says {}", data.len(), f["count"])));
    }
    if f["kind"] == "error" {
        return Ok(Checked { hashed, ..Checked::default() });
    }
    let proofs_file = proofs_name(name);
    let proofs_bytes = dir.read(&proofs_file)?;
    let proofs: Vec<&str> =
        std::str::from_utf8(&proofs_bytes).map_err(|_| Invalid(format!("{proofs_file}: not UTF-8")))?.lines().collect();
    let Some((multiproof, proofs)) = proofs.split_last().filter(|(_, p)| p.len() == data.len()) else {
        return Err(Invalid(format!(
            "{proofs_file}: {} lines for {} lines of {name} and a multiproof",
            proofs.len(),
            data.len()
        )));
    };
    let deletion = f["kind"] == "deleted";
    let keep = keep && f["kind"] == "output";
    let mut leaves: Vec<(u64, Hash)> = Vec::with_capacity(data.len());
    let mut sources = Vec::with_capacity(if keep { data.len() } else { 0 });
    for (i, (line, proof)) in data.iter().zip(proofs).enumerate() {
        let checked =
            check_line(line, proof, deletion, subsetted).map_err(|e| Invalid(format!("{name} line {}: {e}", i + 1)))?;
        if leaves.last().is_some_and(|&(l, _)| l >= checked.leaf) {
            return Err(Invalid(format!("{proofs_file} line {}: leaf {} is out of order", i + 1, checked.leaf)));
        }
        hashed += checked.hashed;
        leaves.push((checked.leaf, checked.hash));
        if keep {
            sources.push(checked.source());
        }
    }
    let multiproof =
        multiproof_of(multiproof).map_err(|e| Invalid(format!("{proofs_file} line {}: {e}", proofs.len() + 1)))?;
    let mut known = Vec::new();
    let mut nodes = 0u64;
    let root = consensus::proof::multi_root_seeing(&leaves, head.size, &multiproof, &mut |offset, n, h| {
        nodes += 1;
        if keep {
            known.push(((offset, n), *h));
        }
    });
    let rebuilt = if leaves.is_empty() { multiproof.is_empty() } else { root == Some(head.root) };
    if !rebuilt {
        return Err(Invalid(format!(
            "{proofs_file} line {}: the leaves of {name} and this multiproof do not rebuild the tree head of size {}",
            proofs.len() + 1,
            head.size
        )));
    }
    // Of the subtrees met, the proof's and the leaves were given, the rest hashed.
    nodes = nodes.saturating_sub((multiproof.len() + leaves.len()) as u64);
    let kind = f["kind"].as_str().unwrap_or_default().to_string();
    drop(data); // its lines borrow `text`, which the import keeps
    let kept = keep.then(|| Kept { name: name.to_string(), text, sources });
    let leaves = leaves.into_iter().map(|(l, _)| l).collect();
    Ok(Checked { hashed, nodes, file: Some((name.to_string(), kind, leaves)), kept, known })
}

/// The last line of a proof file: `{"multiproof":"…"}`, base64 of 32-byte hashes.
fn multiproof_of(line: &str) -> Result<Vec<Hash>, String> {
    #[derive(serde::Deserialize)]
    struct Last<'a> {
        #[serde(borrow)]
        multiproof: Cow<'a, str>,
    }
    let l: Last<'_> = serde_json::from_str(line).map_err(|_| "not the file's multiproof".to_string())?;
    let bytes = b64(Some(&l.multiproof), "the multiproof")?;
    if bytes.len() % 32 != 0 {
        return Err("the multiproof is not a list of 32-byte hashes".into());
    }
    Ok(bytes.chunks_exact(32).filter_map(|c| c.try_into().ok()).collect())
}

/// Every file the manifest lists must be one the label signs, with the same count.
fn check_manifest(dir: &dyn Files, files: &[Value]) -> Result<(), Failure> {
    let manifest = read_json(dir, "manifest.json")?;
    for kind in ["output", "deleted", "error"] {
        for item in manifest[kind].as_array().into_iter().flatten() {
            let name = item["url"].as_str().and_then(|u| u.rsplit('/').next()).unwrap_or_default();
            let signed = files.iter().find(|f| f["name"] == name);
            if signed.is_none_or(|f| f["count"] != item["count"]) {
                return Err(Invalid(format!(
                    "manifest.json lists {name}, which the trust label does not sign as such"
                )));
            }
        }
    }
    Ok(())
}

fn b64(s: Option<&str>, what: &str) -> Result<Vec<u8>, String> {
    s.and_then(|s| unb64(s).ok()).ok_or_else(|| format!("{what} is not base64"))
}

/// A line of a proof file (`render::write_proofs`), read without building a JSON tree.
#[derive(serde::Deserialize)]
struct ProofLine<'a> {
    leaf: u64,
    #[serde(rename = "leafData", borrow)]
    leaf_data: Cow<'a, str>,
    #[serde(borrow, default)]
    salt: Option<Cow<'a, str>>,
}

/// A line checked: its leaf, leaf data and leaf hash, the bytes hashed to check it, and its
/// header.
struct Line {
    leaf: u64,
    data: Vec<u8>,
    hash: Hash,
    hashed: u64,
    header: LeafHeader,
}

impl Line {
    /// What an import keeps of the line.
    fn source(self) -> Source {
        Source { key: format!("{}/{}", self.header.rtype, self.header.id), leaf: self.leaf, leaf_data: self.data }
    }
}

/// One line against its proof line: the leaf's header names this resource version (or this
/// deletion) and its content commitment matches the line's bytes. That the leaf is in the
/// tree, its file's multiproof shows.
fn check_line(line: &str, proof: &str, deletion: bool, subsetted: bool) -> Result<Line, String> {
    let p: ProofLine<'_> = serde_json::from_str(proof).map_err(|_| "its proof is not a proof line".to_string())?;
    let leaf = p.leaf;
    let data = b64(Some(&p.leaf_data), "leafData")?;
    let h = LeafHeader::decode(&data).ok_or("its leafData is not a leaf header")?;
    if deletion {
        let r: Value = serde_json::from_str(line).map_err(|_| "not JSON".to_string())?;
        let url = format!("{}/{}", h.rtype, h.id);
        let when = crate::fhir::instant(h.last_updated_ms);
        if h.op != consensus::Op::Delete.as_str()
            || r["entry"][0]["request"]["url"] != url.as_str()
            || r["meta"]["lastUpdated"] != when.as_str()
        {
            return Err(format!("the deletion does not match leaf {leaf} ({} of {url})", h.op));
        }
    } else if subsetted {
        // `_elements` lines are not what the leaf commits to: only who they claim to be.
        let r: Value = serde_json::from_str(line).map_err(|_| "not JSON".to_string())?;
        let version = r["meta"]["versionId"].as_str().and_then(|v| v.parse::<u64>().ok());
        if r["resourceType"] != h.rtype.as_str() || r["id"] != h.id.as_str() || version != Some(h.version) {
            return Err(format!("the resource is not {}/{} version {} of leaf {leaf}", h.rtype, h.id, h.version));
        }
    } else {
        // The commitment binds these exact bytes to the leaf, and the leaf names the type, id
        // and version: nothing in the line needs reading.
        let salt = b64(p.salt.as_deref(), "salt")?;
        if consensus::content_commitment(&salt, line.as_bytes()) != h.content_sha256 {
            return Err(format!("its bytes are not the content leaf {leaf} commits to"));
        }
    }
    // The content commitment (prefix, salt, line) and the leaf hash.
    let hashed = if deletion { 0 } else { 55 + line.len() as u64 } + 1 + data.len() as u64;
    Ok(Line { leaf, hash: leaf_hash(&data), data, hashed, header: h })
}
