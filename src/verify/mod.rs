//! `fhir-ledger verify`: checks that need no server and trust none.
//!
//! - `verify [data-dir] --data-dir D`: a stopped node's data directory (see `consensus::audit`).
//! - `verify proof FILE --trusted-key K…`: an inclusion proof (what `$proof` and `/ledger/proof`
//!   serve) against a tree head signed by a quorum of the keys the verifier trusts.
//! - `verify consistency --old HEAD (--proof FILE [--new HEAD] | --data-dir D) --trusted-key K…`:
//!   that a tree head the auditor saved earlier is a prefix of a later one (or of the ledger in a
//!   data directory), so history was only appended to, never rewritten.
//!
//! - `verify export DIR --trusted-key K…`: a downloaded Bulk export against its trust label
//!   (`export.rs`).
//! - `verify lock FILE --trusted-key K…`: a trial data lock (`lock.rs`).
//!
//! Exit codes for scripts: 0 verified, 1 tampering or inconsistency found, 2 could not check
//! (unreadable or malformed input, a running server holding the data directory).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use consensus::merkle::{leaf_hash, Hash};
use consensus::proof;
use ed25519_dalek::VerifyingKey;
use serde_json::Value;

use crate::treehead::{self, TreeHead};

mod export;
mod lock;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct VerifyArgs {
    #[command(subcommand)]
    what: Option<What>,
    #[command(flatten)]
    dir: DirArgs,
}

#[derive(clap::Subcommand)]
enum What {
    /// A stopped node's data directory (the default): record digests against the signed Raft
    /// log, Merkle root and subtree hashes, snapshot, batch signatures.
    DataDir(DirArgs),
    /// An inclusion proof file against a tree head signed by a quorum of trusted node keys.
    Proof(ProofArgs),
    /// A saved tree head against a consistency proof file or a data directory.
    Consistency(ConsistencyArgs),
    /// A downloaded Bulk export (manifest.json and every file it links) against its trust
    /// label: signatures, tree head, file digests, and each line's leaf and inclusion proof.
    Export(export::ExportArgs),
    /// A trial data lock file (what `$lock` answered) or a `$verify-lock` answer: the lock's
    /// signature and head, every locked version in that tree, and that the ledger only grew.
    Lock(lock::LockArgs),
}

#[derive(clap::Args)]
struct DirArgs {
    /// The node's data directory (the one given to `serve`).
    #[arg(long, env = "FHIR_LEDGER_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Also measure this machine's raw SHA-256 and ed25519 verification rates and report how
    /// close the check came to that bound.
    #[arg(long)]
    crypto_bound: bool,
}

#[derive(clap::Args)]
struct Trust {
    /// A node public key the verifier trusts: a file holding its hex (a node's `node.pub`) or
    /// the 64 hex digits themselves. Repeat for each node.
    #[arg(long = "trusted-key", required = true)]
    keys: Vec<String>,
    /// How many distinct trusted keys must have signed the tree head (default: a majority).
    #[arg(long)]
    quorum: Option<usize>,
}

#[derive(clap::Args)]
struct ProofArgs {
    /// The saved response of `GET /{type}/{id}/_history/{vid}/$proof` or `/ledger/proof?leaf=N`.
    file: PathBuf,
    /// The version's exact bytes as the server serves them (`GET …/_history/{vid}`): checked
    /// against the leaf's content commitment with the proof's `contentSalt`, so the proof
    /// shows that this content existed at that time.
    #[arg(long)]
    resource: Option<PathBuf>,
    #[command(flatten)]
    trust: Trust,
}

#[derive(clap::Args)]
struct ConsistencyArgs {
    /// A tree head saved earlier (the response of `GET /ledger/head`, or a proof file).
    #[arg(long)]
    old: PathBuf,
    /// The response of `GET /ledger/consistency?first=<old size>&second=<new size>` (it carries
    /// the head it was computed against).
    #[arg(long, conflicts_with = "data_dir", required_unless_present = "data_dir")]
    proof: Option<PathBuf>,
    /// A second saved tree head to check the old one against, instead of the head the proof
    /// file carries (with --proof).
    #[arg(long, requires = "proof")]
    new: Option<PathBuf>,
    /// Check against a stopped node's data directory instead of a proof file.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    trust: Trust,
}

/// Why a check did not pass: the evidence failed (exit 1), or it could not be read (exit 2).
enum Failure {
    Invalid(String),
    Unchecked(String),
}

use Failure::{Invalid, Unchecked};

pub fn run(args: &VerifyArgs) -> ExitCode {
    let result = match &args.what {
        None => return data_dir(&args.dir),
        Some(What::DataDir(d)) => return data_dir(d),
        Some(What::Proof(p)) => inclusion(p),
        Some(What::Consistency(c)) => consistency(c),
        Some(What::Export(e)) => export::export(e),
        Some(What::Lock(l)) => lock::lock(l),
    };
    match result {
        Ok(message) => {
            println!("VALID: {message}");
            ExitCode::SUCCESS
        }
        Err(Invalid(why)) => {
            println!("INVALID: {why}");
            ExitCode::from(1)
        }
        Err(Unchecked(why)) => {
            eprintln!("fhir-ledger verify: cannot check: {why}");
            ExitCode::from(2)
        }
    }
}

fn read_json(path: &Path) -> Result<Value, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| Unchecked(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Unchecked(format!("{}: not JSON: {e}", path.display())))
}

/// The `parameter` array of a Parameters resource.
fn parameters<'a>(doc: &'a Value, path: &Path) -> Result<&'a [Value], Failure> {
    doc["parameter"]
        .as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| Unchecked(format!("{}: not a Parameters resource", path.display())))
}

/// A tree head file: a saved `/ledger/head` (the head's parts at top level) or any proof
/// (the head under `treeHead`).
fn head_of(params: &[Value], path: &Path) -> Result<TreeHead, Failure> {
    let parts = match treehead::part(params, "treeHead").and_then(|p| p["part"].as_array()) {
        Some(parts) => parts.as_slice(),
        None => params,
    };
    TreeHead::from_parts(parts).map_err(|e| Unchecked(format!("{}: tree head: {e}", path.display())))
}

/// The keys a verifier trusts and how many of them must have signed a head.
struct Trusted {
    keys: Vec<VerifyingKey>,
    quorum: usize,
}

impl Trusted {
    fn check(&self, head: &TreeHead, what: &str) -> Result<usize, Failure> {
        head.check_quorum(&self.keys, self.quorum).map_err(|e| Invalid(format!("{what}: {e}")))
    }
}

fn trusted_keys(trust: &Trust) -> Result<Trusted, Failure> {
    let mut keys = Vec::new();
    for k in &trust.keys {
        let key = treehead::read_key(k).map_err(Unchecked)?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let quorum = trust.quorum.unwrap_or(keys.len() / 2 + 1);
    if quorum == 0 || quorum > keys.len() {
        return Err(Unchecked(format!("--quorum {quorum} must be between 1 and the {} trusted keys", keys.len())));
    }
    Ok(Trusted { keys, quorum })
}

fn hashes(params: &[Value], name: &str) -> Result<Vec<Hash>, Failure> {
    params
        .iter()
        .filter(|p| p["name"] == name)
        .map(|p| {
            treehead::base64_of(p, name)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| Unchecked(format!("{name}: every hash must be 32 bytes of base64")))
        })
        .collect()
}

fn number(params: &[Value], name: &str) -> Result<u64, Failure> {
    treehead::string(params, name, "valueString")
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Unchecked(format!("{name} is missing or not a number")))
}

fn inclusion(args: &ProofArgs) -> Result<String, Failure> {
    let doc = read_json(&args.file)?;
    let params = parameters(&doc, &args.file)?;
    let head = head_of(params, &args.file)?;
    let signers = trusted_keys(&args.trust)?.check(&head, "tree head")?;
    let leaf = number(params, "leafIndex")?;
    let data = treehead::part(params, "leafData")
        .ok_or_else(|| Unchecked("leafData is missing".into()))
        .and_then(|p| treehead::base64_of(p, "leafData").map_err(Unchecked))?;
    let path = hashes(params, "auditPath")?;
    if !proof::verify_inclusion(leaf, head.size, &leaf_hash(&data), &path, &head.root) {
        return Err(Invalid(format!(
            "leaf {leaf} with this data is not in the tree of {} leaves the signed head names",
            head.size
        )));
    }
    let h =
        consensus::LeafHeader::decode(&data).ok_or_else(|| Invalid("the proven leaf is not a ledger header".into()))?;
    let version = format!("{}/{}/_history/{}", h.rtype, h.id, h.version);
    // The proof must be about what it says it is about.
    if let Ok(claimed) = treehead::string(params, "resource", "valueString") {
        if claimed != version {
            return Err(Invalid(format!("the proof names {claimed}, but its leaf is {version}")));
        }
    }
    let content = match &args.resource {
        None => String::new(),
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| Unchecked(format!("{}: {e}", path.display())))?;
            let salt = treehead::part(params, "contentSalt")
                .ok_or_else(|| Unchecked("the proof carries no contentSalt to check content with".into()))
                .and_then(|p| treehead::base64_of(p, "contentSalt").map_err(Unchecked))?;
            if consensus::content_commitment(&salt, &bytes) != h.content_sha256 {
                return Err(Invalid(format!(
                    "{} is not the content {version} recorded: it was changed, or is another version",
                    path.display()
                )));
            }
            format!("; {} is exactly its content", path.display())
        }
    };
    Ok(format!(
        "{version} ({} by {} at {}, ciphertext SHA-256 {}) is leaf {leaf} of the ledger of {} leaves, root {}, signed at {} by {signers} trusted key(s){content}",
        h.op,
        h.actor,
        crate::fhir::instant(h.last_updated_ms),
        hex::encode(h.body_sha256),
        head.size,
        hex::encode(head.root),
        crate::fhir::instant(head.timestamp_ms),
    ))
}

fn consistency(args: &ConsistencyArgs) -> Result<String, Failure> {
    let old_doc = read_json(&args.old)?;
    let old = head_of(parameters(&old_doc, &args.old)?, &args.old)?;
    let trusted = trusted_keys(&args.trust)?;
    trusted.check(&old, "saved head")?;
    if let Some(dir) = &args.data_dir {
        let (now, root) = consensus::audit::root_at(&dir.join("ledger"), old.size).map_err(|e| {
            let what = format!("{}: {}", dir.display(), describe(&e));
            if consensus::audit::is_corruption(&e) {
                Invalid(what)
            } else {
                Unchecked(what)
            }
        })?;
        return match root {
            None => Err(Invalid(format!(
                "the saved head has {} leaves but the ledger holds only {now}: history was truncated",
                old.size
            ))),
            Some(root) if root != old.root => Err(Invalid(format!(
                "the ledger's first {} leaves no longer hash to the saved root: history was rewritten",
                old.size
            ))),
            Some(_) => Ok(format!(
                "the saved head ({} leaves) is a prefix of the ledger in {} ({now} leaves)",
                old.size,
                dir.display()
            )),
        };
    }
    let file = args.proof.as_deref().ok_or_else(|| Unchecked("--proof or --data-dir is required".into()))?;
    let doc = read_json(file)?;
    let params = parameters(&doc, file)?;
    let new = match &args.new {
        Some(path) => head_of(parameters(&read_json(path)?, path)?, path)?,
        None => head_of(params, file)?,
    };
    let signers = trusted.check(&new, "new head")?;
    let (first, second) = (number(params, "first")?, number(params, "second")?);
    if first != old.size || second != new.size {
        return Err(Unchecked(format!(
            "the proof goes from {first} to {second} leaves; ask for first={}&second={}",
            old.size, new.size
        )));
    }
    // Only the signed heads' roots count; the roots the proof file repeats are not trusted.
    let path = hashes(params, "consistencyPath")?;
    if !proof::verify_consistency(old.size, new.size, &old.root, &new.root, &path) {
        return Err(Invalid(format!(
            "the ledger of {} leaves does not extend the saved head of {} leaves: history was rewritten",
            new.size, old.size
        )));
    }
    Ok(format!(
        "the ledger of {} leaves (signed by {signers} trusted key(s)) extends the saved head of {} leaves",
        new.size, old.size
    ))
}

/// An error opening a data directory, with the likely cause when it is a common one.
fn describe(e: &std::io::Error) -> String {
    // sled reports its lock file taken as an `Other` error with this text.
    if e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock") {
        return format!("{e} (the data directory is in use: stop the server first)");
    }
    e.to_string()
}

fn data_dir(args: &DirArgs) -> ExitCode {
    // The first findings locate the damage; thousands of consequences of it would bury them.
    const SHOWN: usize = 50;
    let start = Instant::now();
    // A progress bar only for people watching; logs and scripts get the summary alone.
    let bar = crate::telemetry::progress_bar(0, "leaves");
    let mut progress = |done: u64, total: u64| {
        bar.set_length(total);
        bar.set_position(done);
    };
    let report = match consensus::audit::verify_dir(&args.data_dir.join("ledger"), &mut progress) {
        Ok(r) => r,
        Err(e) if consensus::audit::is_corruption(&e) => {
            println!("TAMPERED store: {e}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("\nfhir-ledger verify: cannot check {}: {}", args.data_dir.display(), describe(&e));
            return ExitCode::from(2);
        }
    };
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    bar.finish_and_clear();
    for f in report.findings.iter().take(SHOWN) {
        println!("TAMPERED {}: {}", f.location, f.problem);
    }
    if report.findings.len() > SHOWN {
        println!("... and {} more", report.findings.len() - SHOWN);
    }
    let mb = report.bytes as f64 / 1e6;
    println!(
        "checked {} leaves ({} against the signed log, {} in the snapshot), {} raft log entries, {} batch signatures, {mb:.1} MB and {} Merkle nodes hashed in {secs:.2} s: {:.0} leaves/s, {:.1} MB/s",
        report.leaves,
        report.cross_checked,
        report.snapshot_leaves,
        report.log_entries,
        report.signatures,
        report.nodes,
        report.leaves as f64 / secs,
        mb / secs
    );
    if args.crypto_bound {
        // The tree's node hashes are cryptography every verifier pays, as in `verify export`
        // and `verify lock`; the share without them is printed too, to compare with figures
        // from before they were counted.
        let bound = crypto_bound_with_nodes(report.bytes, report.nodes, report.signatures);
        let without_nodes = bound.seconds - report.nodes as f64 / bound.nodes_per_s.max(1.0);
        println!(
            "crypto bound on this machine: SHA-256 {:.0} MB/s, {:.2} M Merkle node hashes/s, ed25519 batch verify {:.0} signatures/s: {:.2} s for this data; verify ran at {:.0}% of it ({:.0}% of the {:.2} s without the node hashes)",
            bound.sha256_mb_s,
            bound.nodes_per_s / 1e6,
            bound.ed25519_per_s,
            bound.seconds,
            100.0 * bound.seconds / secs,
            100.0 * without_nodes / secs,
            without_nodes
        );
    }
    if report.findings.is_empty() {
        println!("ledger intact");
        ExitCode::SUCCESS
    } else {
        println!("{} problem(s) found", report.findings.len());
        ExitCode::from(1)
    }
}

struct CryptoBound {
    sha256_mb_s: f64,
    ed25519_per_s: f64,
    /// Merkle node hashes (65-byte messages) per second, when any were counted.
    nodes_per_s: f64,
    seconds: f64,
}

/// What the cryptography alone would cost for `bytes` hashed once, `signatures` verified in
/// a batch and `nodes` Merkle node hashes, at the rates this machine reaches now on one core:
/// the floor any verifier pays. A node hash is one 65-byte SHA-256 message, timed as such (a
/// short message costs its padding block and finalization, which the bulk rate of 1 MiB
/// buffers does not show).
fn crypto_bound_with_nodes(bytes: u64, nodes: u64, signatures: u64) -> CryptoBound {
    use ed25519_dalek::{Signer, SigningKey};
    use sha2::{Digest, Sha256};
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut hashed = 0u64;
    while start.elapsed().as_secs_f64() < 0.5 {
        std::hint::black_box(Sha256::digest(&buf));
        hashed += buf.len() as u64;
    }
    let sha256_mb_s = hashed as f64 / 1e6 / start.elapsed().as_secs_f64();
    let key = SigningKey::from_bytes(&[3; 32]);
    let messages: Vec<[u8; 32]> = (0..256u32).map(|i| Sha256::digest(i.to_be_bytes()).into()).collect();
    let sigs: Vec<_> = messages.iter().map(|m| key.sign(m)).collect();
    let keys = vec![key.verifying_key(); messages.len()];
    let refs: Vec<&[u8]> = messages.iter().map(<[u8; 32]>::as_slice).collect();
    let start = Instant::now();
    let mut verified = 0u64;
    while start.elapsed().as_secs_f64() < 0.5 {
        let ok = ed25519_dalek::verify_batch(&refs, &sigs, &keys).is_ok();
        std::hint::black_box(ok);
        verified += messages.len() as u64;
    }
    let ed25519_per_s = verified as f64 / start.elapsed().as_secs_f64();
    let mut seconds = bytes as f64 / 1e6 / sha256_mb_s + signatures as f64 / ed25519_per_s;
    let mut nodes_per_s = 0.0;
    if nodes > 0 {
        let (left, right) = ([1u8; 32], [2u8; 32]);
        let start = Instant::now();
        let mut hashed = 0u64;
        while start.elapsed().as_secs_f64() < 0.5 {
            for _ in 0..4096 {
                std::hint::black_box(consensus::merkle::node_hash(std::hint::black_box(&left), &right));
            }
            hashed += 4096;
        }
        nodes_per_s = hashed as f64 / start.elapsed().as_secs_f64();
        seconds += nodes as f64 / nodes_per_s;
    }
    CryptoBound { sha256_mb_s, ed25519_per_s, nodes_per_s, seconds }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust(keys: &[&str], quorum: Option<usize>) -> Trust {
        Trust { keys: keys.iter().map(ToString::to_string).collect(), quorum }
    }

    fn key_hex(seed: u8) -> String {
        hex::encode(ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key().as_bytes())
    }

    #[test]
    fn trusted_keys_dedupe_default_to_a_majority_and_refuse_bad_input() {
        let (a, b, c) = (key_hex(1), key_hex(2), key_hex(3));
        let t = trusted_keys(&trust(&[&a, &b, &c, &a], None)).ok().unwrap();
        assert_eq!((t.keys.len(), t.quorum), (3, 2), "a key given twice is one key; 2 of 3 is a majority");
        for bad in [trust(&["not-hex"], None), trust(&["abcd"], None), trust(&[&a], Some(2)), trust(&[&a], Some(0))] {
            assert!(matches!(trusted_keys(&bad), Err(Unchecked(_))), "{:?}", bad.keys);
        }
    }

    /// A proof between other sizes than the two heads' cannot be checked (exit 2), rather than
    /// passing or failing on the wrong question.
    #[test]
    fn a_consistency_proof_between_other_sizes_is_not_checked() {
        let dir = tempfile::tempdir().unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let head = |size| {
            let h = TreeHead::signed(size, [size as u8; 32], 1_700_000_000_000, "1", &key);
            crate::fhir::json::Json::obj(vec![
                ("resourceType", crate::fhir::json::Json::String("Parameters".into())),
                ("parameter", crate::fhir::json::Json::Array(h.to_parts())),
            ])
            .to_compact()
        };
        let old = dir.path().join("old.json");
        std::fs::write(&old, head(2)).unwrap();
        let mut proof: Value = serde_json::from_str(&head(4)).unwrap();
        let tree_head = serde_json::json!({"name": "treeHead", "part": proof["parameter"].take()});
        proof["parameter"] = serde_json::json!([
            {"name": "first", "valueString": "3"}, {"name": "second", "valueString": "4"}, tree_head
        ]);
        let file = dir.path().join("proof.json");
        std::fs::write(&file, proof.to_string()).unwrap();
        let args =
            ConsistencyArgs { old, proof: Some(file), new: None, data_dir: None, trust: trust(&[&key_hex(1)], None) };
        assert!(matches!(consistency(&args), Err(Unchecked(why)) if why.contains("ask for first=2&second=4")));
    }
}
