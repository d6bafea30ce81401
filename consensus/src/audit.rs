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

use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::command::{Op, SignedBatch};
use crate::entry_ref::{BatchRef, EntryRef, PayloadRef};
use crate::kv::read_be;
use crate::log_store::Bodies;
use crate::merkle::{leaf_hash, Frontier, Hash};
use crate::sled_store::SledDb;
use crate::state_machine::{StateMachine, StateView, META_FRONTIER, STORED_NODE_LEVEL};

pub use crate::sled_store::is_corruption;

/// One problem found, located precisely enough to look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Where: `leaf 12 (Patient/x/_history/2)`, `raft log entry 7`, `merkle root`, `snapshot …`.
    pub location: String,
    /// What is wrong there.
    pub problem: String,
}

/// What [`verify_dir`] checked and found.
#[derive(Debug, Default)]
pub struct Report {
    /// Leaves (resource versions) checked.
    pub leaves: u64,
    /// Bytes of version records and log entries read (and hashed).
    pub bytes: u64,
    /// Raft log entries read.
    pub log_entries: u64,
    /// Batch signatures verified.
    pub signatures: u64,
    /// Merkle node hashes computed to rebuild the tree (and the snapshot's): short messages,
    /// each its own SHA-256, which the bulk rate of `bytes` does not price.
    pub nodes: u64,
    /// Leaves compared with the write their signed log entry carried.
    pub cross_checked: u64,
    /// Leaves of the stored snapshot rebuilt and compared with the live tree.
    pub snapshot_leaves: u64,
    /// Every problem found; empty means the ledger is intact.
    pub findings: Vec<Finding>,
}

impl Report {
    fn find(&mut self, location: impl Into<String>, problem: impl Into<String>) {
        self.findings.push(Finding { location: location.into(), problem: problem.into() });
    }
}

/// What the log thread hands the leaf walk for one Raft log entry, in log order.
enum LogItem {
    /// An entry whose batch signature verified: its bytes and its writes in apply order,
    /// located in them (the leaf walk compares records with them without decoding again).
    Batch { index: u64, entry: EntryBuf, writes: Vec<WriteAt> },
    /// A blank or membership entry (no writes), or one the log thread already reported; its
    /// bytes only to be handed back for reuse.
    Other { index: u64, entry: EntryBuf },
    /// The log could not be read past this point (reported): later leaves have no log to be
    /// compared with, which is not a finding of its own.
    Unreadable,
}

impl LogItem {
    fn index(&self) -> u64 {
        match self {
            LogItem::Batch { index, .. } | LogItem::Other { index, .. } => *index,
            LogItem::Unreadable => u64::MAX,
        }
    }

    /// The entry's buffer, for the log thread to read the next entry into.
    fn into_buffer(self) -> Option<Vec<u8>> {
        match self {
            LogItem::Batch { entry, .. } | LogItem::Other { entry, .. } => Some(entry.buf),
            LogItem::Unreadable => None,
        }
    }
}

/// An entry's encoding at the front of a reused buffer (which keeps the length of the
/// longest entry read into it: neither zeroed nor reallocated again).
struct EntryBuf {
    buf: Vec<u8>,
    len: usize,
}

impl EntryBuf {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Where a byte string lies in an entry: start and length.
#[derive(Clone, Copy)]
struct Span(usize, usize);

/// One write of a verified batch, its byte strings located in the entry's bytes.
struct WriteAt {
    rtype: Span,
    id: Span,
    version: u64,
    op: Op,
    last_updated_ms: i64,
    actor: Span,
    compartment: Span,
    terms: Vec<Hash>,
    body: Span,
    /// The body's SHA-256, computed once for the batch signature.
    digest: Hash,
}

impl WriteAt {
    /// The writes of `batch`, decoded in place from `entry`, with their bodies' digests.
    fn locate(entry: &[u8], batch: BatchRef<'_>, digests: &[crate::command::BodyDigest]) -> Option<Vec<Self>> {
        let base = entry.as_ptr() as usize;
        let span = |s: &[u8]| Some(Span((s.as_ptr() as usize).checked_sub(base)?, s.len()));
        let mut digests = digests.iter();
        let mut out = Vec::with_capacity(digests.len());
        for c in batch.commands {
            let actor = span(c.actor.as_bytes())?;
            for w in c.writes {
                out.push(WriteAt {
                    rtype: span(w.rtype.as_bytes())?,
                    id: span(w.id.as_bytes())?,
                    version: w.version,
                    op: w.op,
                    last_updated_ms: w.last_updated_ms,
                    actor,
                    compartment: span(w.compartment.as_bytes())?,
                    terms: w.index,
                    body: span(w.body)?,
                    digest: digests.next()?.sha256,
                });
            }
        }
        Some(out)
    }
}

/// Opens the ledger under `dir` (the `ledger` directory inside a data directory).
pub(crate) fn open_view(dir: &Path) -> io::Result<(StateMachine, RaftLog)> {
    if !dir.join("db").exists() && !dir.join("conf").exists() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no ledger in {}", dir.display())));
    }
    let db = SledDb::open_with_cache(dir, 32 * 1024 * 1024)?;
    let log_dir = dir.join(crate::log_store::DIR);
    let (log, damage) = if log_dir.exists() {
        crate::segment_log::SegmentLog::inspect(&log_dir).map_err(io::Error::other)?
    } else {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no raft log in {}", log_dir.display())));
    };
    let bodies = Bodies::of(log);
    Ok((StateMachine::new(db.tree("state")?, dir.join("snapshots"), bodies.clone())?, (bodies, damage)))
}

/// The Raft log as the verifier reads it: the records before any damage, and the damage.
pub(crate) type RaftLog = (Bodies, Option<crate::segment_log::Corruption>);

/// Verifies the ledger under `dir`. `progress(done, total)` is called as leaves are checked.
///
/// Two threads: one reads the Raft log, checks each batch's signature (hashing every payload)
/// and hashes each write's body; the other walks the leaves in order and compares each record
/// with the write its entry carried (equal bytes share that digest; records without a log
/// entry are hashed there). Leaves are in log order, so both advance in lockstep through a
/// short channel.
pub fn verify_dir(dir: &Path, progress: &mut dyn FnMut(u64, u64)) -> io::Result<Report> {
    let (sm, log) = open_view(dir)?;
    let view = sm.view();
    let stored = view.frontier()?;
    let membership = sm.stored_membership()?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<LogItem>(4);
    // Entries go back to the log thread to be read into again: memory reused at once, where a
    // cross-thread free left the reader faulting in fresh pages.
    let (back_tx, back_rx) = std::sync::mpsc::channel::<LogItem>();
    let (records_tx, records_rx) = std::sync::mpsc::sync_channel::<Vec<RawRecord>>(4);
    let (leaves, logged) = std::thread::scope(|scope| {
        let log_thread = scope.spawn(move || walk_log(&log, &membership, &tx, &back_rx));
        let view = &view;
        scope.spawn(move || scan_ahead(view, &records_tx));
        let leaves = walk_leaves(view, stored.size, records_rx.into_iter().flatten(), rx, &back_tx, progress);
        (leaves, log_thread.join().unwrap_or_else(|_| Err(io::Error::other("the log walk panicked"))))
    });
    let ((mut report, rebuilt), logged) = (leaves?, logged?);
    report.findings.extend(logged.findings);
    report.log_entries = logged.log_entries;
    report.signatures = logged.signatures;
    report.bytes += logged.bytes;
    progress(stored.size, stored.size);
    if rebuilt.root() != stored.root() {
        report.find("merkle root", "the leaves do not rebuild the stored root");
    }
    verify_snapshot(&view, &mut report);
    Ok(report)
}

/// Checks every batch's signature and sends the entries on, in log order.
fn walk_log(
    (log, damage): &RaftLog,
    membership: &openraft::StoredMembership<crate::NodeId, crate::Node>,
    tx: &std::sync::mpsc::SyncSender<LogItem>,
    back: &std::sync::mpsc::Receiver<LogItem>,
) -> io::Result<Report> {
    let mut report = Report::default();
    let mut spare = Vec::new();
    let largest = log.largest_entry();
    for index in log.indexes() {
        spare.extend(back.try_iter().filter_map(LogItem::into_buffer));
        let mut buf = spare.pop().unwrap_or_else(|| Vec::with_capacity(largest));
        let Some(len) = log.entry_into(index, &mut buf)? else { continue };
        let entry = EntryBuf { buf, len };
        let bytes = entry.bytes();
        report.log_entries += 1;
        report.bytes += bytes.len() as u64;
        let at = format!("raft log entry {index}");
        // The signature check decodes the batch and hashes each body once; the leaf walk gets
        // the writes located in the entry with those digests.
        let verified = match bincode::deserialize::<EntryRef<'_>>(bytes) {
            Err(e) => Err(format!("does not decode ({} bytes): {e}", bytes.len())),
            Ok(EntryRef { payload: PayloadRef::Normal(signed), .. }) => {
                match StateMachine::proposer_key(membership, signed.node_id) {
                    None => Err(format!("proposed by node {}, which has no key in the membership", signed.node_id)),
                    Some(key) => SignedBatch::verify_ref(signed.node_id, signed.payload, signed.signature, &key)
                        .map_err(|e| format!("{e} (payload of {} bytes)", signed.payload.len()))
                        .and_then(|(batch, digests)| {
                            WriteAt::locate(bytes, batch, &digests)
                                .map(Some)
                                .ok_or_else(|| "its writes do not lie within the entry".to_string())
                        }),
                }
            }
            Ok(_) => Ok(None),
        };
        let item = match verified {
            Ok(Some(writes)) => {
                report.signatures += 1;
                LogItem::Batch { index, entry, writes }
            }
            Ok(None) => LogItem::Other { index, entry },
            Err(problem) => {
                report.find(at, problem);
                LogItem::Other { index, entry }
            }
        };
        if tx.send(item).is_err() {
            return Ok(report); // the leaf walk stopped early (it failed); its error is reported
        }
    }
    if let Some(c) = damage {
        report.find("raft log", format!("{c}; the entries after it are not checked"));
        let _ = tx.send(LogItem::Unreadable);
    }
    Ok(report)
}

/// A version record decoded in place ([`crate::state_machine::StoredRecord`] borrowed: no
/// allocation per leaf but its terms), read field by field ([`crate::wire`]). The header comes
/// first in the record, so its encoding, which the leaf hashes, is the record's own prefix
/// (`header_bytes`); a test pins both to the owned types.
struct RecordRef<'a> {
    header: HeaderRef<'a>,
    leaf: u64,
    body: BodyRef<'a>,
    /// The version's conditional terms, checked against the write's.
    terms: Vec<Hash>,
}

/// [`crate::state_machine::BodyAt`], borrowed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BodyRef<'a> {
    Inline(&'a [u8]),
    Log { index: u64, offset: u32, len: u32 },
}

impl BodyRef<'_> {
    /// The ciphertext's SHA-256, read from the log where the record references it.
    fn digest(&self, view: &StateView) -> io::Result<Hash> {
        Ok(match *self {
            BodyRef::Inline(b) => Sha256::digest(b).into(),
            BodyRef::Log { index, offset, len } => Sha256::digest(view.bodies.read(index, offset, len)?).into(),
        })
    }
}

/// [`crate::state_machine::LeafHeader`], borrowed; strings as their bytes (compared with the
/// log's, never read as text but in a finding). Its format and content commitment are part
/// of what the leaf hashes, but nothing here compares them.
struct HeaderRef<'a> {
    rtype: &'a [u8],
    id: &'a [u8],
    version: u64,
    last_updated_ms: i64,
    actor: &'a [u8],
    op: &'a [u8],
    compartment: &'a [u8],
    body_sha256: Hash,
    log_index: u64,
}

impl<'a> RecordRef<'a> {
    /// The record and the bytes of its header.
    fn decode(raw: &'a [u8]) -> Result<(Self, &'a [u8]), String> {
        let mut c = crate::wire::Cursor::new(raw);
        c.u16()?; // the header's format
        let (rtype, id, version, last_updated_ms) = (c.bytes()?, c.bytes()?, c.u64()?, c.i64()?);
        let (actor, op, compartment, body_sha256, log_index) =
            (c.bytes()?, c.bytes()?, c.bytes()?, c.hash()?, c.u64()?);
        c.hash()?; // the content commitment
        let header_end = c.position();
        let leaf = c.u64()?;
        let body = match c.u32()? {
            0 => BodyRef::Inline(c.bytes()?),
            1 => BodyRef::Log { index: c.u64()?, offset: c.u32()?, len: c.u32()? },
            other => return Err(format!("body variant {other} is neither inline nor in the log")),
        };
        let terms = c.hashes()?;
        if c.remaining() > 0 {
            return Err(format!("{} bytes after its parts", c.remaining()));
        }
        let header = HeaderRef { rtype, id, version, last_updated_ms, actor, op, compartment, body_sha256, log_index };
        Ok((Self { header, leaf, body, terms }, &raw[..header_end]))
    }

    fn location(&self, leaf: u64) -> String {
        let h = &self.header;
        let text = String::from_utf8_lossy;
        format!("leaf {leaf} ({}/{}/_history/{})", text(h.rtype), text(h.id), h.version)
    }
}

/// The leaves in order, read one ahead (as raw records: decoding in place is cheap).
struct Leaves<'v, I> {
    records: I,
    next: u64,
    size: u64,
    /// A record read but not yet checked, with the log index its header names.
    ahead: Option<(u64, Vec<u8>)>,
    view: &'v StateView,
    rebuilt: Frontier,
    report: Report,
    /// Where the log's readable entries end, when damage cut it short.
    log_ends: Option<u64>,
}

impl<I: Iterator<Item = RawRecord>> Leaves<'_, I> {
    /// The next decodable record, unless it belongs to a log entry after `upto`.
    fn next_upto(&mut self, upto: u64) -> io::Result<Option<Vec<u8>>> {
        let raw = match self.ahead.take() {
            Some(ahead) => ahead,
            None => loop {
                if self.next >= self.size {
                    return Ok(None);
                }
                let leaf = self.next;
                let next = match self.records.next().transpose() {
                    Err(e) if crate::sled_store::is_corruption(&e) => {
                        self.report.find(format!("leaf {leaf}"), format!("{e}; later leaves are not checked"));
                        self.next = self.size;
                        return Ok(None);
                    }
                    next => next?,
                };
                match next {
                    Some((at, raw)) if at == leaf => {
                        self.report.bytes += raw.len() as u64;
                        match RecordRef::decode(&raw) {
                            Ok((rec, _)) => break (rec.header.log_index, raw),
                            Err(e) => {
                                self.report
                                    .find(format!("leaf {leaf}"), format!("version record does not decode: {e}"));
                                self.next += 1;
                            }
                        }
                    }
                    _ => {
                        self.report
                            .find(format!("leaf {leaf}"), "version record is missing; later leaves are not checked");
                        self.next = self.size;
                        return Ok(None);
                    }
                }
            },
        };
        let (log_index, raw) = raw;
        if log_index > upto {
            self.ahead = Some((log_index, raw));
            return Ok(None);
        }
        Ok(Some(raw))
    }

    /// Checks a record against its digest and hashes it into the rebuilt tree.
    fn check(&mut self, rec: &RecordRef<'_>, header_bytes: &[u8], known: Option<&Hash>) {
        // A body in the log past its damage cannot be read; the damage is the finding.
        let lost = matches!((rec.body, self.log_ends), (BodyRef::Log { index, .. }, Some(end)) if index >= end);
        let digest = match known {
            Some(d) => BodyDigest::Known(d),
            None if lost => BodyDigest::Lost,
            None => BodyDigest::Read,
        };
        check_leaf(self.next, rec, header_bytes, digest, self.view, &mut self.rebuilt, &mut self.report);
        self.next += 1;
    }
}

/// The writes of one signed log entry in the order they were applied (so in leaf order).
/// Commands refused at apply left no leaves: their writes are skipped.
struct LogWrites<'a> {
    writes: &'a [WriteAt],
    /// The entry's encoding, which the writes' byte strings lie in.
    entry: &'a [u8],
    next: usize,
}

impl<'a> LogWrites<'a> {
    fn bytes(&self, span: Span) -> &'a [u8] {
        self.entry.get(span.0..span.0 + span.1).unwrap_or_default()
    }

    /// The write of `(rtype, id, version)`, searched from where the last one was found.
    fn find(&mut self, h: &HeaderRef<'_>) -> Option<&'a WriteAt> {
        let at = self.writes[self.next..]
            .iter()
            .position(|w| w.version == h.version && self.bytes(w.id) == h.id && self.bytes(w.rtype) == h.rtype)?;
        self.next += at + 1;
        Some(&self.writes[self.next - 1])
    }
}

/// A leaf's body digest for [`check_leaf`].
#[derive(Clone, Copy)]
enum BodyDigest<'a> {
    /// Of bytes equal to the body (its signed log write's), so not hashed again.
    Known(&'a Hash),
    /// To be read and hashed.
    Read,
    /// In the log past damage already reported: not checked.
    Lost,
}

/// A version record as the store returned it, with its leaf number.
type RawRecord = io::Result<(u64, Vec<u8>)>;

/// Reads the version records in leaf order on a thread of its own, a chunk at a time: the
/// store's iteration is a third of the walk, and overlaps the checks this way.
fn scan_ahead(view: &StateView, tx: &std::sync::mpsc::SyncSender<Vec<RawRecord>>) {
    const CHUNK: usize = 4096;
    let mut chunk = Vec::with_capacity(CHUNK);
    for record in view.scan_records() {
        let failed = record.is_err();
        chunk.push(record);
        if chunk.len() < CHUNK && !failed {
            continue;
        }
        let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
        // Stop when the walk did, or the store cannot be read past here (the walk reports it).
        if tx.send(full).is_err() || failed {
            return;
        }
    }
    let _ = tx.send(chunk);
}

/// Walks the leaves in order: each record against its digest, the stored subtree hashes and
/// the write its signed log entry carried.
fn walk_leaves(
    view: &StateView,
    size: u64,
    records: impl Iterator<Item = RawRecord>,
    log: std::sync::mpsc::Receiver<LogItem>,
    back: &std::sync::mpsc::Sender<LogItem>,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<(Report, Frontier)> {
    let mut leaves = Leaves {
        records,
        next: 0,
        size,
        ahead: None,
        view,
        rebuilt: Frontier::default(),
        report: Report::default(),
        log_ends: None,
    };
    // Entries before the first one still in the log were compacted into a snapshot: their
    // leaves have no log to compare with, but are still hashed into the tree.
    let mut first_in_log = None;
    let mut log_complete = true;
    for item in log {
        if matches!(item, LogItem::Unreadable) {
            log_complete = false;
            leaves.log_ends = Some(view.bodies.indexes().end);
            break;
        }
        let index = item.index();
        let first = *first_in_log.get_or_insert(index);
        let mut writes = match &item {
            LogItem::Batch { entry, writes, .. } => Some(LogWrites { writes, entry: entry.bytes(), next: 0 }),
            LogItem::Other { .. } | LogItem::Unreadable => None,
        };
        while let Some(raw) = leaves.next_upto(index)? {
            let Ok((rec, header_bytes)) = RecordRef::decode(&raw) else { continue };
            let wanted = rec.header.log_index;
            let mut known = None;
            match writes.as_mut() {
                Some(writes) if wanted == index => {
                    known = cross_check(leaves.next, &rec, index, writes, &mut leaves.report);
                }
                _ if wanted >= first && wanted != index => {
                    let problem = format!("its header names raft log entry {wanted}, out of order");
                    leaves.report.find(rec.location(leaves.next), problem);
                }
                _ => {}
            }
            leaves.check(&rec, header_bytes, known);
            progress_every(leaves.next, size, progress);
        }
        let _ = back.send(item); // if the log thread is done, the item is freed here instead
    }
    let first = first_in_log.unwrap_or(u64::MAX);
    while let Some(raw) = leaves.next_upto(u64::MAX)? {
        let Ok((rec, header_bytes)) = RecordRef::decode(&raw) else { continue };
        if log_complete && rec.header.log_index >= first {
            let problem =
                format!("its header names raft log entry {}, which the log does not hold", rec.header.log_index);
            leaves.report.find(rec.location(leaves.next), problem);
        }
        leaves.check(&rec, header_bytes, None);
        progress_every(leaves.next, size, progress);
    }
    Ok((leaves.report, leaves.rebuilt))
}

fn progress_every(done: u64, size: u64, progress: &mut dyn FnMut(u64, u64)) {
    if done.is_multiple_of(4096) {
        progress(done, size);
    }
}

/// A record against the digest its leaf committed to, and its leaf hashed into the rebuilt
/// tree, whose completed subtrees must match the stored ones. `digest`: how to learn the
/// body's SHA-256.
fn check_leaf(
    leaf: u64,
    rec: &RecordRef<'_>,
    header_bytes: &[u8],
    digest: BodyDigest<'_>,
    view: &StateView,
    rebuilt: &mut Frontier,
    report: &mut Report,
) {
    let digest = match digest {
        BodyDigest::Known(d) => Ok(*d),
        BodyDigest::Read => rec.body.digest(view),
        BodyDigest::Lost => Ok(rec.header.body_sha256),
    };
    match digest {
        Ok(digest) if digest == rec.header.body_sha256 => {}
        Ok(_) => report.find(rec.location(leaf), "stored ciphertext does not match the digest its leaf committed to"),
        Err(e) => report.find(rec.location(leaf), format!("its ciphertext cannot be read: {e}")),
    }
    if rec.leaf != leaf {
        report.find(rec.location(leaf), format!("record claims leaf {}", rec.leaf));
    }
    let mut node_mismatch = None;
    rebuilt.append_nodes(leaf_hash(header_bytes), |level, index, hash| {
        report.nodes += u64::from(level > 0);
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
            rec.location(leaf),
            format!(
                "stored subtree hash over leaves {}..{} differs from the one the records rebuild",
                index * span,
                (index + 1) * span
            ),
        );
    }
    report.leaves += 1;
}

/// Compares a leaf with the write its signed log entry carried; when the bodies are equal,
/// the digest of the log's body is the record's too.
fn cross_check<'a>(
    leaf: u64,
    rec: &RecordRef<'_>,
    log_index: u64,
    writes: &mut LogWrites<'a>,
    report: &mut Report,
) -> Option<&'a Hash> {
    let h = &rec.header;
    let Some(w) = writes.find(h) else {
        report.find(rec.location(leaf), format!("the signed raft log entry {log_index} carries no such write"));
        return None;
    };
    report.cross_checked += 1;
    let mut differs: Vec<&str> = Vec::new();
    for (field, same) in [
        ("operation", w.op.as_str().as_bytes() == h.op),
        ("lastUpdated", w.last_updated_ms == h.last_updated_ms),
        ("actor", writes.bytes(w.actor) == h.actor),
        ("compartment", writes.bytes(w.compartment) == h.compartment),
        // A delete keeps none: it ends the resource's postings.
        ("conditional terms", rec.terms == w.terms || rec.terms.is_empty() && matches!(w.op, Op::Delete | Op::Erase)),
    ] {
        if !same {
            differs.push(field);
        }
    }
    if !differs.is_empty() {
        let problem = format!("header differs from the signed raft log entry {log_index} in {}", differs.join(", "));
        report.find(rec.location(leaf), problem);
    }
    let problem = match rec.body {
        BodyRef::Log { index, offset, len } => {
            let (start, end) = (w.body.0 as u64, (w.body.0 + w.body.1) as u64);
            if (index, u64::from(offset), u64::from(offset) + u64::from(len)) == (log_index, start, end) {
                return Some(&w.digest);
            }
            format!(
                "its ciphertext reference (raft log entry {index}, bytes {offset}..{}) is not where the signed raft \
                 log entry {log_index} carries it (bytes {start}..{end})",
                u64::from(offset) + u64::from(len)
            )
        }
        BodyRef::Inline(body) if body == writes.bytes(w.body) => return Some(&w.digest),
        BodyRef::Inline(body) => match body.iter().zip(writes.bytes(w.body)).position(|(a, b)| a != b) {
            Some(first) => {
                let last = body.iter().zip(writes.bytes(w.body)).rposition(|(a, b)| a != b).unwrap_or(first);
                format!(
                    "ciphertext bytes {first}..{} (of {}) differ from the signed raft log entry {log_index}",
                    last + 1,
                    body.len()
                )
            }
            None => {
                format!("ciphertext is {} bytes, the signed raft log entry {log_index} has {}", body.len(), w.body.1)
            }
        },
    };
    report.find(rec.location(leaf), problem);
    None
}

/// A stored snapshot must rebuild, from its own records, the root its frontier names, and that
/// root must be the live tree's root at the snapshot's size.
fn verify_snapshot(view: &StateView, report: &mut Report) {
    let (meta, path) = match view.snapshot() {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            report.find("snapshot", format!("does not decode: {e}"));
            return;
        }
    };
    let at = format!(
        "snapshot {} ({}, up to raft log entry {})",
        meta.snapshot_id,
        path.display(),
        meta.last_log_id.map_or(0, |l| l.index)
    );
    let mut reader = match std::fs::File::open(&path).and_then(crate::snapshot::Reader::new) {
        Ok((r, file_meta)) => {
            if file_meta != meta {
                report.find(&at, "the file's meta is not the snapshot the ledger recorded");
            }
            r
        }
        Err(e) => {
            report.find(&at, format!("cannot be read: {e}"));
            return;
        }
    };
    let mut rebuilt = Frontier::default();
    let mut claimed = None;
    loop {
        let (k, v) = match reader.next_record() {
            Ok(Some(kv)) => kv,
            Ok(None) => break,
            Err(e) => {
                report.find(&at, format!("is damaged: {e}"));
                break;
            }
        };
        if k.as_slice() == META_FRONTIER {
            claimed = bincode::deserialize::<Frontier>(&v).ok();
        }
        if k.first() != Some(&b'r') {
            continue;
        }
        let leaf = read_be(&k[1..]).unwrap_or(u64::MAX);
        match RecordRef::decode(&v) {
            Ok((rec, header_bytes)) => {
                if rec.leaf != rebuilt.size || leaf != rebuilt.size {
                    report.find(&at, format!("record of leaf {leaf} is out of place"));
                }
                // A snapshot carries its bodies: the node installing it has not their log.
                match rec.body {
                    BodyRef::Inline(body) if Sha256::digest(body)[..] == rec.header.body_sha256[..] => {}
                    BodyRef::Inline(_) => {
                        report.find(&at, format!("{}: ciphertext does not match its digest", rec.location(leaf)));
                    }
                    BodyRef::Log { .. } => {
                        report.find(&at, format!("{}: holds no ciphertext, only a log position", rec.location(leaf)));
                    }
                }
                rebuilt.append_nodes(leaf_hash(header_bytes), |level, _, _| report.nodes += u64::from(level > 0));
                report.snapshot_leaves += 1;
            }
            Err(e) => report.find(&at, format!("record of leaf {leaf} does not decode: {e}")),
        }
    }
    let Some(claimed) = claimed else {
        report.find(&at, "holds no Merkle frontier");
        return;
    };
    if claimed.size != rebuilt.size || claimed.root() != rebuilt.root() {
        report.find(&at, "its records do not rebuild the root its frontier names");
    } else if crate::proof::root_at(view, claimed.size) != Some(claimed.root()) {
        report.find(&at, format!("its tree of {} leaves is not the live tree's first {0} leaves", claimed.size));
    }
}

/// The size of the tree under `dir` and its root as it was at `size` leaves (None if the tree
/// is smaller): what a saved tree head is checked against.
pub fn root_at(dir: &Path, size: u64) -> io::Result<(u64, Option<Hash>)> {
    let (sm, _) = open_view(dir)?;
    let view = sm.view();
    let now = view.frontier()?.size;
    Ok((now, if size <= now { crate::proof::root_at(&view, size) } else { None }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Batch, Op, COMMAND_FORMAT};
    use crate::state_machine::{BodyAt, StoredRecord};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership};

    /// The in-place decoding must read exactly what openraft wrote.
    #[test]
    fn borrowed_entries_decode_openraft_entries() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        let batch = Batch { format: COMMAND_FORMAT, node_id: 3, commands: vec![] };
        let signed = SignedBatch::sign(&batch, &key).unwrap();
        let log_id = LogId::new(CommittedLeaderId::new(2, 3), 9);
        let normal: Entry<crate::TypeConfig> = Entry { log_id, payload: EntryPayload::Normal(signed.clone()) };
        let bytes = bincode::serialize(&normal).unwrap();
        let EntryRef { log_id: got, payload: PayloadRef::Normal(r) } = bincode::deserialize(&bytes).unwrap() else {
            panic!("not a batch")
        };
        assert_eq!((got, r.node_id, r.payload, r.signature), (log_id, 3, &signed.payload[..], &signed.signature[..]));
        // The batch inside, borrowed, reads what `Batch` wrote.
        let cmd = crate::command::Command {
            actor: "alice".into(),
            preconditions: vec![crate::command::Precondition::KeyAbsent { compartment: "Patient/1".into() }],
            new_keys: vec![("Patient/1".into(), vec![1, 2, 3])],
            writes: vec![crate::command::Write {
                rtype: "Patient".into(),
                id: "1".into(),
                version: 2,
                op: Op::Update,
                last_updated_ms: -5,
                compartment: "Patient/1".into(),
                body: vec![9; 40],
                content_sha256: [7; 32],
                index: vec![[4; 32]],
            }],
        };
        let full = Batch { format: COMMAND_FORMAT, node_id: 3, commands: vec![cmd.clone(), cmd] };
        let payload = bincode::serialize(&full).unwrap();
        let b: BatchRef<'_> = bincode::deserialize(&payload).unwrap();
        assert_eq!((b.format, b.node_id, b.commands.len()), (COMMAND_FORMAT, 3, 2));
        let (c, w) = (&b.commands[1], &b.commands[1].writes[0]);
        assert_eq!((c.actor, c.new_keys[0], c.preconditions.len()), ("alice", ("Patient/1", &[1u8, 2, 3][..]), 1));
        assert_eq!((w.rtype, w.id, w.version, w.op.clone(), w.last_updated_ms), ("Patient", "1", 2, Op::Update, -5));
        assert_eq!((w.compartment, w.body, w.index.clone()), ("Patient/1", &[9u8; 40][..], vec![[4; 32]]));

        // A stored version record, borrowed: its fields, and its header's encoding as a prefix.
        let header = crate::state_machine::LeafHeader {
            format: 1,
            rtype: "Patient".into(),
            id: "1".into(),
            version: 2,
            last_updated_ms: 7,
            actor: "alice".into(),
            op: "update".into(),
            compartment: "Patient/1".into(),
            body_sha256: [8; 32],
            log_index: 9,
            content_sha256: [6; 32],
        };
        for (body, borrowed) in [
            (BodyAt::Inline(vec![5; 33]), BodyRef::Inline(&[5; 33])),
            (BodyAt::Log { index: 9, offset: 77, len: 33 }, BodyRef::Log { index: 9, offset: 77, len: 33 }),
        ] {
            let record = StoredRecord { header: header.clone(), leaf: 4, body, terms: vec![[3; 32], [4; 32]] };
            let raw = bincode::serialize(&record).unwrap();
            let (r, header_bytes) = RecordRef::decode(&raw).unwrap();
            assert_eq!(header_bytes, header.encode());
            let h = &r.header;
            assert_eq!(
                (h.rtype, h.id, h.version, h.last_updated_ms, h.actor),
                (&b"Patient"[..], &b"1"[..], 2, 7, &b"alice"[..])
            );
            assert_eq!(
                (h.op, h.compartment, h.body_sha256, h.log_index),
                (&b"update"[..], &b"Patient/1"[..], [8; 32], 9)
            );
            assert_eq!((r.leaf, r.body, r.terms), (4, borrowed, vec![[3; 32], [4; 32]]));
            // A record cut short or with bytes after its parts is refused, not misread.
            assert!(RecordRef::decode(&raw[..raw.len() - 1]).is_err());
            assert!(RecordRef::decode(&[&raw[..], &[0]].concat()).is_err());
            // A body that is neither inline nor in the log (its variant follows the leaf number).
            let mut unknown = raw.clone();
            unknown[header_bytes.len() + 8] = 2;
            assert!(RecordRef::decode(&unknown).err().is_some_and(|e| e.contains("body variant 2")));
        }

        let m = Membership::new(vec![std::collections::BTreeSet::from([1u64])], ());
        for (payload, blank) in [(EntryPayload::Blank, true), (EntryPayload::Membership(m), false)] {
            let e: Entry<crate::TypeConfig> = Entry { log_id, payload };
            match bincode::deserialize::<EntryRef<'_>>(&bincode::serialize(&e).unwrap()).unwrap().payload {
                PayloadRef::Blank => assert!(blank),
                PayloadRef::Membership(_) => assert!(!blank),
                PayloadRef::Normal(_) => panic!("misread"),
            }
        }
    }
}
