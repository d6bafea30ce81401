//! `fhir-ledger verify lock FILE --trusted-key K…`: a trial data lock, offline. FILE is the lock
//! file `$lock` answered, or what `$verify-lock` answered (the lock file, a later head, the
//! consistency proof and each amendment's leaf with its inclusion proof).

use std::fmt::Write as _;
use std::path::PathBuf;

use consensus::merkle::leaf_hash;
use consensus::proof;
use serde_json::Value;

use super::{hashes, number, read_json, trusted_keys, Failure, Invalid, Trust, Unchecked};
use crate::research::lock;
use crate::treehead::{self, TreeHead};

#[derive(clap::Args)]
pub struct LockArgs {
    /// The saved answer of `POST /ResearchStudy/{id}/$lock` or `GET|POST …/$verify-lock`.
    file: PathBuf,
    #[command(flatten)]
    trust: Trust,
    /// Also measure this machine's raw SHA-256 and ed25519 rates and report how close the
    /// check of the lock came to that bound.
    #[arg(long)]
    crypto_bound: bool,
}

fn params(v: &Value) -> &[Value] {
    v["parameter"].as_array().map_or(&[][..], Vec::as_slice)
}

pub fn lock(args: &LockArgs) -> Result<String, Failure> {
    let doc = read_json(&args.file)?;
    let report = treehead::part(params(&doc), "format").is_none();
    let file = if report {
        treehead::part(params(&doc), "lock").map(|p| p["resource"].clone()).ok_or_else(|| {
            Unchecked(format!("{}: neither a lock file nor a $verify-lock answer", args.file.display()))
        })?
    } else {
        doc.clone()
    };
    let trusted = trusted_keys(&args.trust)?;
    let start = std::time::Instant::now();
    let locked = lock::check(&file, &trusted.keys, trusted.quorum).map_err(Invalid)?;
    if args.crypto_bound {
        let secs = start.elapsed().as_secs_f64();
        let bound = super::crypto_bound_with_nodes(locked.bytes_hashed, locked.nodes, locked.signatures);
        println!(
            "checked {} locked versions ({:.1} MB hashed, {} Merkle nodes, {} signatures) in {secs:.3} s; crypto bound \
             on this machine: SHA-256 {:.0} MB/s, {:.2} M node hashes/s, ed25519 {:.0} signatures/s: {:.3} s; the \
             check ran at {:.0}% of it",
            locked.len(),
            locked.bytes_hashed as f64 / 1e6,
            locked.nodes,
            locked.signatures,
            bound.sha256_mb_s,
            bound.nodes_per_s / 1e6,
            bound.ed25519_per_s,
            bound.seconds,
            100.0 * bound.seconds / secs
        );
    }
    let mut message = format!(
        "the data lock of ResearchStudy/{} holds {} version(s), all in the tree of {} leaves signed at {} by {} trusted key(s)",
        locked.study,
        locked.len(),
        locked.head.size,
        crate::fhir::instant(locked.head.timestamp_ms),
        locked.cosigners
    );
    if !report {
        return Ok(message);
    }
    let top = params(&doc);
    let now_parts = treehead::part(top, "currentHead").and_then(|p| p["part"].as_array()).ok_or_else(|| {
        Invalid(
            "the $verify-lock answer carries no current head: the server could not show the ledger extends the lock"
                .into(),
        )
    })?;
    let now = TreeHead::from_parts(now_parts).map_err(|e| Unchecked(format!("currentHead: {e}")))?;
    trusted.check(&now, "the current tree head")?;
    let path = hashes(top, "consistencyPath")?;
    lock::check_extends(&locked, &now, &path).map_err(Invalid)?;
    let _ = write!(message, "; the ledger of {} leaves extends it", now.size);
    let entries = locked.entries().map_err(Invalid)?;
    let mut amended = Vec::new();
    for a in top.iter().filter(|p| p["name"] == "amendment") {
        let parts = a["part"].as_array().map_or(&[][..], Vec::as_slice);
        let leaf = number(parts, "leafIndex")?;
        let data = treehead::part(parts, "leafData")
            .ok_or_else(|| Unchecked("an amendment has no leafData".into()))
            .and_then(|p| treehead::base64_of(p, "leafData").map_err(Unchecked))?;
        if !proof::verify_inclusion(leaf, now.size, &leaf_hash(&data), &hashes(parts, "auditPath")?, &now.root) {
            return Err(Invalid(format!("the amendment at leaf {leaf} is not in the ledger the current head signs")));
        }
        let h = consensus::LeafHeader::decode(&data)
            .ok_or_else(|| Invalid(format!("the amendment at leaf {leaf} is not a ledger header")))?;
        let locked_version = entries.iter().find(|e| e.rtype == h.rtype && e.id == h.id);
        if locked_version.is_none_or(|e| e.version >= h.version) {
            return Err(Invalid(format!(
                "leaf {leaf} ({}/{}/_history/{}) is listed as an amendment but is no later version of a locked resource",
                h.rtype, h.id, h.version
            )));
        }
        let reason = treehead::string(parts, "reason", "valueString").unwrap_or_default();
        amended.push(format!(
            "{}/{}/_history/{} ({} by {} at {}: {reason})",
            h.rtype,
            h.id,
            h.version,
            h.op,
            h.actor,
            crate::fhir::instant(h.last_updated_ms)
        ));
    }
    if amended.is_empty() {
        message.push_str("; no amendments");
    } else {
        let _ = write!(message, "; amended {} time(s): {}", amended.len(), amended.join("; "));
    }
    Ok(message)
}
