//! Offline verification of a node's data directory (the server must be stopped).
//!
//! The state is derived from the signed Raft log, so the log is the reference: every batch's
//! signature is checked against its proposer's key in the committed membership, and every leaf
//! is compared field by field (and its ciphertext byte by byte) with the write the signed log
//! carried. An attacker who rewrites a record *and* recomputes its digest, the subtree hashes
//! and the root is still caught by that comparison; one who also rewrites the log cannot
//! re-sign it. Besides, each record must match the digest its leaf committed to, the leaves
//! must rebuild the stored root and subtree hashes, and a stored snapshot must rebuild the same
//! tree as the live state up to its size.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use openraft::{Entry, EntryPayload};
use sha2::{Digest, Sha256};

use crate::command::Write;
use crate::kv::{read_be, KvStore};
use crate::merkle::{leaf_hash, Frontier, Hash};
use crate::sled_store::SledDb;
use crate::state_machine::{StateMachine, StateView, VersionRecord, META_FRONTIER, STORED_NODE_LEVEL};
use crate::TypeConfig;

/// One problem found, located precisely enough to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Where: `leaf 12 (Patient/x/_history/2)`, `raft log entry 7`, `merkle root`, `snapshot …`.
    pub location: String,
    pub problem: String,
}

#[derive(Debug, Default)]
pub struct Report {
    pub leaves: u64,
    /// Bytes of version records and log entries read (and hashed).
    pub bytes: u64,
    pub log_entries: u64,
    pub signatures: u64,
    /// Leaves compared with the write their signed log entry carried.
    pub cross_checked: u64,
    pub snapshot_leaves: u64,
    pub findings: Vec<Finding>,
}

impl Report {
    fn find(&mut self, location: impl Into<String>, problem: impl Into<String>) {
        self.findings.push(Finding { location: location.into(), problem: problem.into() });
    }
}

/// The write a signed log entry carried, by `(type, id, version)`, with its command's actor.
type LogWrites = BTreeMap<(String, String, u64), (Write, String)>;

/// Opens the ledger under `dir` (the `ledger` directory inside a data directory).
pub fn open_view(dir: &Path) -> io::Result<(StateMachine, std::sync::Arc<dyn KvStore>)> {
    if !dir.join("db").exists() && !dir.join("conf").exists() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no ledger in {}", dir.display())));
    }
    let db = SledDb::open(dir)?;
    Ok((StateMachine::new(db.tree("state")?), db.tree("raft_log")?))
}

/// Verifies the ledger under `dir`. `progress(done, total)` is called as leaves are checked.
pub fn verify_dir(dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> io::Result<Report> {
    let (sm, log) = open_view(dir)?;
    let view = sm.view();
    let stored = view.frontier()?;
    let mut walk = LeafWalk { view: &view, size: stored.size, next: 0, rebuilt: Frontier::default(), peeked: None };
    let mut report = Report::default();
    let membership = sm.stored_membership()?;
    // Entries before the first one still in the log were compacted into a snapshot.
    let mut first_in_log = None;
    for kv in log.scan_prefix(b"e") {
        let (k, v) = kv?;
        let index = read_be(&k[1..]).unwrap_or(u64::MAX);
        let first = *first_in_log.get_or_insert(index);
        report.log_entries += 1;
        report.bytes += v.len() as u64;
        let at = format!("raft log entry {index}");
        let entry: Entry<TypeConfig> = match bincode::deserialize(&v) {
            Ok(e) => e,
            Err(e) => {
                report.find(at, format!("does not decode ({} bytes): {e}", v.len()));
                continue;
            }
        };
        let mut writes = LogWrites::new();
        if let EntryPayload::Normal(signed) = &entry.payload {
            let Some(key) = StateMachine::proposer_key(&membership, signed.node_id) else {
                report.find(at, format!("proposed by node {}, which has no key in the membership", signed.node_id));
                continue;
            };
            match signed.open(&key) {
                Ok(batch) => {
                    report.signatures += 1;
                    for cmd in batch.commands {
                        for w in cmd.writes {
                            writes.insert((w.rtype.clone(), w.id.clone(), w.version), (w, cmd.actor.clone()));
                        }
                    }
                }
                Err(e) => report.find(at, format!("{e} (payload of {} bytes)", signed.payload.len())),
            }
        }
        walk.check_until(index, &mut report, progress, |leaf, rec, report| {
            if rec.header.log_index == index {
                cross_check(leaf, rec, index, &mut writes, report);
            } else if rec.header.log_index >= first {
                report.find(
                    leaf_location(leaf, rec),
                    format!("its header names raft log entry {}, out of order", rec.header.log_index),
                );
            }
            // Else its entry was compacted into a snapshot: there is no log to compare it
            // with, but it is still hashed into the tree and checked against the root.
        })?;
    }
    walk.check_until(u64::MAX, &mut report, progress, |leaf, rec, report| {
        report.find(
            leaf_location(leaf, rec),
            format!("its header names raft log entry {}, which the log does not hold in order", rec.header.log_index),
        );
    })?;
    progress(stored.size, stored.size);
    if walk.rebuilt.root() != stored.root() {
        report.find("merkle root", "the leaves do not rebuild the stored root");
    }
    verify_snapshot(&view, &mut report)?;
    Ok(report)
}

fn leaf_location(leaf: u64, rec: &VersionRecord) -> String {
    let h = &rec.header;
    format!("leaf {leaf} ({}/{}/_history/{})", h.rtype, h.id, h.version)
}

/// The leaves in order, each checked against its digest and hashed into a rebuilt tree whose
/// subtree hashes are compared with the stored ones.
struct LeafWalk<'a> {
    view: &'a StateView,
    size: u64,
    next: u64,
    rebuilt: Frontier,
    peeked: Option<Option<VersionRecord>>,
}

impl LeafWalk<'_> {
    /// Checks the leaves whose header names a log index up to `log_index`, handing each to
    /// `at_entry` too.
    fn check_until(
        &mut self,
        log_index: u64,
        report: &mut Report,
        progress: &mut dyn FnMut(u64, u64),
        mut at_entry: impl FnMut(u64, &VersionRecord, &mut Report),
    ) -> io::Result<()> {
        while self.next < self.size {
            let leaf = self.next;
            let rec = match self.peeked.take() {
                Some(r) => r,
                None => self.read(leaf, report)?,
            };
            let Some(rec) = rec else {
                report.find(format!("leaf {leaf}"), "version record is missing or does not decode");
                self.next += 1;
                continue;
            };
            if rec.header.log_index > log_index {
                self.peeked = Some(Some(rec));
                return Ok(());
            }
            if leaf.is_multiple_of(4096) {
                progress(leaf, self.size);
            }
            at_entry(leaf, &rec, report);
            self.check(leaf, &rec, report)?;
            self.next += 1;
        }
        Ok(())
    }

    fn read(&self, leaf: u64, report: &mut Report) -> io::Result<Option<VersionRecord>> {
        let Some(raw) = self.view.raw(&crate::state_machine::record_key(leaf))? else { return Ok(None) };
        report.bytes += raw.len() as u64;
        Ok(bincode::deserialize(&raw).ok())
    }

    fn check(&mut self, leaf: u64, rec: &VersionRecord, report: &mut Report) -> io::Result<()> {
        let at = leaf_location(leaf, rec);
        let digest: Hash = Sha256::digest(&rec.body).into();
        if digest != rec.header.body_sha256 {
            report.find(&at, "stored ciphertext does not match the digest its leaf committed to");
        }
        if rec.leaf != leaf {
            report.find(&at, format!("record claims leaf {}", rec.leaf));
        }
        let mut node_mismatch = None;
        let view = self.view;
        self.rebuilt.append_nodes(leaf_hash(&rec.header.encode()), |level, index, hash| {
            if level >= STORED_NODE_LEVEL && node_mismatch.is_none() {
                match view.node(level, index) {
                    Ok(Some(stored)) if stored == hash => {}
                    _ => node_mismatch = Some((level, index)),
                }
            }
        });
        if let Some((level, index)) = node_mismatch {
            let span = 1u64 << level;
            report.find(
                &at,
                format!(
                    "stored subtree hash over leaves {}..{} differs from the one the records rebuild",
                    index * span,
                    (index + 1) * span
                ),
            );
        }
        report.leaves += 1;
        Ok(())
    }
}

/// Compares a leaf with the write its signed log entry carried.
fn cross_check(leaf: u64, rec: &VersionRecord, log_index: u64, writes: &mut LogWrites, report: &mut Report) {
    let h = &rec.header;
    let at = leaf_location(leaf, rec);
    let Some((w, actor)) = writes.remove(&(h.rtype.clone(), h.id.clone(), h.version)) else {
        report.find(at, format!("the signed raft log entry {log_index} carries no such write"));
        return;
    };
    report.cross_checked += 1;
    let mut differs: Vec<&str> = Vec::new();
    for (field, same) in [
        ("operation", w.op.as_str() == h.op),
        ("lastUpdated", w.last_updated_ms == h.last_updated_ms),
        ("actor", actor == h.actor),
        ("compartment", w.compartment == h.compartment),
    ] {
        if !same {
            differs.push(field);
        }
    }
    if !differs.is_empty() {
        report
            .find(&at, format!("header differs from the signed raft log entry {log_index} in {}", differs.join(", ")));
    }
    if let Some(first) = rec.body.iter().zip(&w.body).position(|(a, b)| a != b) {
        let last = rec.body.iter().zip(&w.body).rposition(|(a, b)| a != b).unwrap_or(first);
        report.find(
            &at,
            format!(
                "ciphertext bytes {first}..{} (of {}) differ from the signed raft log entry {log_index}",
                last + 1,
                rec.body.len()
            ),
        );
    } else if rec.body.len() != w.body.len() {
        report.find(
            &at,
            format!(
                "ciphertext is {} bytes, the signed raft log entry {log_index} has {}",
                rec.body.len(),
                w.body.len()
            ),
        );
    }
}

/// A stored snapshot must rebuild, from its own records, the root its frontier names, and that
/// root must be the live tree's root at the snapshot's size.
fn verify_snapshot(view: &StateView, report: &mut Report) -> io::Result<()> {
    let (meta, pairs) = match view.snapshot() {
        Ok(Some(s)) => s,
        Ok(None) => return Ok(()),
        Err(e) => {
            report.find("snapshot", format!("does not decode: {e}"));
            return Ok(());
        }
    };
    let at =
        format!("snapshot {} (up to raft log entry {})", meta.snapshot_id, meta.last_log_id.map_or(0, |l| l.index));
    let mut rebuilt = Frontier::default();
    let mut claimed = None;
    for (k, v) in &pairs {
        if k.as_slice() == META_FRONTIER {
            claimed = bincode::deserialize::<Frontier>(v).ok();
        }
        if k.first() != Some(&b'r') {
            continue;
        }
        let leaf = read_be(&k[1..]).unwrap_or(u64::MAX);
        match bincode::deserialize::<VersionRecord>(v) {
            Ok(rec) => {
                if rec.leaf != rebuilt.size || leaf != rebuilt.size {
                    report.find(&at, format!("record of leaf {leaf} is out of place"));
                }
                let digest: Hash = Sha256::digest(&rec.body).into();
                if digest != rec.header.body_sha256 {
                    report.find(&at, format!("{}: ciphertext does not match its digest", leaf_location(leaf, &rec)));
                }
                rebuilt.append(leaf_hash(&rec.header.encode()));
                report.snapshot_leaves += 1;
            }
            Err(e) => report.find(&at, format!("record of leaf {leaf} does not decode: {e}")),
        }
    }
    let Some(claimed) = claimed else {
        report.find(&at, "holds no Merkle frontier");
        return Ok(());
    };
    if claimed.size != rebuilt.size || claimed.root() != rebuilt.root() {
        report.find(&at, "its records do not rebuild the root its frontier names");
    } else if crate::proof::root_at(view, claimed.size) != Some(claimed.root()) {
        report.find(&at, format!("its tree of {} leaves is not the live tree's first {0} leaves", claimed.size));
    }
    Ok(())
}

/// The size of the tree under `dir` and its root as it was at `size` leaves (None if the tree
/// is smaller): what a saved tree head is checked against.
pub fn root_at(dir: &Path, size: u64) -> io::Result<(u64, Option<Hash>)> {
    let (sm, _) = open_view(dir)?;
    let view = sm.view();
    let now = view.frontier()?.size;
    Ok((now, if size <= now { crate::proof::root_at(&view, size) } else { None }))
}
