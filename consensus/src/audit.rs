//! Offline verification of a node's data directory (the server must be stopped): every
//! version record must match the digest its leaf committed to, the leaves must rebuild the
//! stored Merkle root and subtree hashes, and every batch in the Raft log must carry a valid
//! signature of a member's key.

use std::io;
use std::path::Path;

use openraft::{Entry, EntryPayload};
use sha2::{Digest, Sha256};

use crate::kv::{read_be, KvStore};
use crate::merkle::{leaf_hash, Frontier};
use crate::sled_store::SledDb;
use crate::state_machine::{StateMachine, VersionRecord, STORED_NODE_LEVEL};
use crate::TypeConfig;

/// One problem found, located precisely enough to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Where: `leaf 12 (Patient/x/_history/2)`, `raft log entry 7`, `merkle root`.
    pub location: String,
    pub problem: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub leaves: u64,
    pub bytes: u64,
    pub log_entries: u64,
    pub signatures: u64,
    pub findings: Vec<Finding>,
}

fn finding(report: &mut Report, location: impl Into<String>, problem: impl Into<String>) {
    report.findings.push(Finding { location: location.into(), problem: problem.into() });
}

/// Verifies the ledger under `dir` (the `ledger` directory inside a data directory).
/// `progress(done, total)` is called as leaves are checked.
pub fn verify_dir(dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> io::Result<Report> {
    let db = SledDb::open(dir)?;
    let state = db.tree("state")?;
    let log = db.tree("raft_log")?;
    let sm = StateMachine::new(state.clone());
    let view = sm.view();
    let stored = view.frontier()?;
    let mut report = Report::default();
    let mut rebuilt = Frontier::default();
    for leaf in 0..stored.size {
        progress(leaf, stored.size);
        let Some(raw) = state.get(&crate::state_machine::record_key(leaf))? else {
            finding(&mut report, format!("leaf {leaf}"), "version record is missing");
            continue;
        };
        report.bytes += raw.len() as u64;
        let record: VersionRecord = match bincode::deserialize(&raw) {
            Ok(r) => r,
            Err(e) => {
                finding(&mut report, format!("leaf {leaf}"), format!("version record does not decode: {e}"));
                continue;
            }
        };
        let h = &record.header;
        let at = format!("leaf {leaf} ({}/{}/_history/{})", h.rtype, h.id, h.version);
        let digest: [u8; 32] = Sha256::digest(&record.body).into();
        if digest != h.body_sha256 {
            finding(&mut report, &at, "stored ciphertext does not match the digest its leaf committed to");
        }
        if record.leaf != leaf {
            finding(&mut report, &at, format!("record claims leaf {}", record.leaf));
        }
        let mut node_mismatch = None;
        rebuilt.append_nodes(leaf_hash(&h.encode()), |level, index, hash| {
            if level >= STORED_NODE_LEVEL && node_mismatch.is_none() {
                match view.node(level, index) {
                    Ok(Some(stored)) if stored == hash => {}
                    _ => node_mismatch = Some((level, index)),
                }
            }
        });
        if let Some((level, index)) = node_mismatch {
            finding(&mut report, &at, format!("stored subtree hash (level {level}, index {index}) differs"));
        }
        report.leaves += 1;
    }
    progress(stored.size, stored.size);
    if rebuilt.root() != stored.root() {
        finding(&mut report, "merkle root", "the leaves do not rebuild the stored root");
    }
    verify_log(&log, &sm, &mut report)?;
    Ok(report)
}

fn verify_log(log: &std::sync::Arc<dyn KvStore>, sm: &StateMachine, report: &mut Report) -> io::Result<()> {
    let membership = sm.stored_membership()?;
    for kv in log.scan_prefix(b"e") {
        let (k, v) = kv?;
        let index = read_be(&k[1..]).unwrap_or(u64::MAX);
        report.log_entries += 1;
        let entry: Entry<TypeConfig> = match bincode::deserialize(&v) {
            Ok(e) => e,
            Err(e) => {
                finding(report, format!("raft log entry {index}"), format!("does not decode: {e}"));
                continue;
            }
        };
        if let EntryPayload::Normal(signed) = &entry.payload {
            match StateMachine::proposer_key(&membership, signed.node_id) {
                Some(key) => match signed.open(&key) {
                    Ok(_) => report.signatures += 1,
                    Err(e) => finding(report, format!("raft log entry {index}"), e.to_string()),
                },
                None => {
                    finding(report, format!("raft log entry {index}"), format!("unknown proposer {}", signed.node_id))
                }
            }
        }
    }
    Ok(())
}
