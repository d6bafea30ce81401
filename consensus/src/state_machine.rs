//! The replicated state machine: applies signed batches deterministically.
//!
//! Invariant: `apply` reads no clock, no randomness and iterates no hash map; its output is
//! a function of the log alone, so every node computes the same state and Merkle root.
//! Everything an entry changes (resources, index postings, leaves, last-applied) is written
//! in one atomic store batch.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::command::{Batch, BatchOutcome, Command, IndexKey, Outcome, Precondition, SignedBatch, Write};
use crate::kv::{be, KvStore, WriteBatch};
use crate::log_store::Bodies;
use crate::merkle::{leaf_hash, Frontier, Hash};
use crate::{invalid_data, Node, NodeId, TypeConfig};

const META_APPLIED: &[u8] = b"m/applied";
const META_MEMBERSHIP: &[u8] = b"m/membership";
pub(crate) const META_FRONTIER: &[u8] = b"m/frontier";
const META_SNAPSHOT: &[u8] = b"m/snapshot";
/// The first Raft log entry whose bodies the records reference in place (those before it
/// came with an installed snapshot); absent: 0.
const META_BODIES_FROM: &[u8] = b"m/bodies-from";

/// Version of [`LeafHeader`]'s encoding; part of every leaf so that verifiers can evolve.
pub const LEAF_FORMAT: u16 = 2;

/// What a Merkle leaf commits to: the header of a version and the digest of its ciphertext,
/// never the plaintext, so shredding a compartment key keeps every proof valid.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeafHeader {
    /// Layout version of this header (`LEAF_FORMAT`).
    pub format: u16,
    /// The resource type.
    pub rtype: String,
    /// The resource id.
    pub id: String,
    /// The version this leaf records.
    pub version: u64,
    /// Its `meta.lastUpdated`, ms since the epoch.
    pub last_updated_ms: i64,
    /// Who wrote it ([`crate::Command::actor`]).
    pub actor: String,
    /// [`crate::Op::as_str`] of the write.
    pub op: String,
    /// Whose data key encrypted the body.
    pub compartment: String,
    /// SHA-256 of the stored ciphertext. (Hashes are read as four words: bincode only, like
    /// every encoding of these records; see [`crate::entry_ref::hash`].)
    #[serde(deserialize_with = "crate::entry_ref::hash")]
    pub body_sha256: Hash,
    /// The Raft log index of the entry that carried this change.
    pub log_index: u64,
    /// The writer's commitment to the exact plaintext stored (leaf format 2):
    /// SHA-256(`"fhir-ledger content v1\0"` || salt || plaintext), the salt an HMAC of the
    /// version under the compartment's data key. A Bulk export hands out the salt, so a
    /// receiver binds the bytes it got to this leaf, while to anyone without the salt the
    /// commitment reveals nothing (and after an erasure no salt can be made). Zero for
    /// deletes.
    #[serde(deserialize_with = "crate::entry_ref::hash")]
    pub content_sha256: Hash,
}

/// The content commitment of leaf format 2 (see [`LeafHeader::content_sha256`]).
pub fn content_commitment(salt: &[u8], plaintext: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update(b"fhir-ledger content v1\0");
    h.update(salt);
    h.update(plaintext);
    h.finalize().into()
}

impl LeafHeader {
    /// The leaf data the Merkle tree hashes (bincode).
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).unwrap_or_default()
    }

    /// The header a leaf's data encodes (what an inclusion proof proves), if it is one.
    pub fn decode(leaf_data: &[u8]) -> Option<Self> {
        bincode::deserialize(leaf_data).ok()
    }
}

/// One resource version as read: the leaf header in the clear, the body encrypted.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VersionRecord {
    /// What the leaf commits to.
    pub header: LeafHeader,
    /// Its Merkle leaf index.
    pub leaf: u64,
    /// Nonce-prefixed ciphertext under the compartment's data key (empty for a delete).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Where a stored version's ciphertext is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyAt {
    /// In the record: deletes (empty), and versions that came with an installed snapshot
    /// (whose log entries this node never had).
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// In the Raft log entry that wrote it, which the log keeps: `len` bytes from `offset` of
    /// entry `index`'s encoding. Bodies are written once (issue 17).
    Log {
        /// The entry (the header's `log_index`).
        index: u64,
        /// Where the body starts in the entry's encoding.
        offset: u32,
        /// Its length.
        len: u32,
    },
}

/// One resource version as the state stores it (key `r` + leaf): the header first, so that
/// its encoding, which the leaf hashes, is the record's prefix.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredRecord {
    /// What the leaf commits to.
    pub header: LeafHeader,
    /// Its Merkle leaf index.
    pub leaf: u64,
    /// Where its ciphertext is.
    pub body: BodyAt,
    /// The version's conditional-interaction terms ([`crate::Write::index`]; none for a
    /// delete): what the lookup tables' postings are rebuilt from.
    #[serde(deserialize_with = "crate::entry_ref::hashes")]
    pub terms: Vec<IndexKey>,
}

/// The current state of one resource id.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CurrentRecord {
    /// The newest version.
    pub version: u64,
    /// Whether the newest version is a delete (or erase).
    pub deleted: bool,
    /// The newest version's `meta.lastUpdated`, ms since the epoch.
    pub last_updated_ms: i64,
    /// The newest version's index terms (its postings).
    #[serde(deserialize_with = "crate::entry_ref::hashes")]
    pub index: Vec<[u8; 32]>,
    /// The Merkle leaf of every version, oldest first (`leaves[v - 1]` holds version `v`).
    pub leaves: Vec<u64>,
}

/// One entry of the global history (the leaf with the same index).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// The resource type.
    pub rtype: String,
    /// The resource id.
    pub id: String,
    /// The version.
    pub version: u64,
    /// Its `meta.lastUpdated`, ms since the epoch.
    pub last_updated_ms: i64,
}

fn sep_key(prefix: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = vec![prefix];
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p);
    }
    k
}

pub(crate) fn current_key(rtype: &str, id: &str) -> Vec<u8> {
    sep_key(b'c', &[rtype.as_bytes(), id.as_bytes()])
}
pub(crate) fn posting_prefix(term: &[u8; 32], rtype: &str) -> Vec<u8> {
    let mut k = vec![b'x'];
    k.extend_from_slice(term);
    k.extend_from_slice(rtype.as_bytes());
    k.push(0);
    k
}
/// Version records live under their leaf number: appends go to the right edge of the tree
/// instead of random places (ids are random), which keeps sled from rewriting large nodes.
pub(crate) fn record_key(leaf: u64) -> Vec<u8> {
    let mut k = vec![b'r'];
    k.extend_from_slice(&be(leaf));
    k
}
/// Which ids the leaves from `first` on wrote, one record per applied batch (lookup store):
/// what stepping the lookup tables back to an earlier leaf must restore. One key per batch
/// rather than per leaf: a quarter of the lookup store's keys were these, rewritten by every
/// compaction they passed through (issue 17). The count in the key lets a reader tell the
/// leaves a record covers without decoding it.
pub(crate) fn touched_key(first: u64, count: u64) -> Vec<u8> {
    let mut k = touched_from(first);
    k.extend_from_slice(&be(count));
    k
}
/// Where the touched records of leaves from `leaf` on start (a range bound). Data directories
/// written before batch records hold one record of this shape per leaf, its value one id.
pub(crate) fn touched_from(leaf: u64) -> Vec<u8> {
    let mut k = vec![b't'];
    k.extend_from_slice(&be(leaf));
    k
}
/// Appends one leaf's id to a touched record's value.
fn push_touched(value: &mut Vec<u8>, rtype: &str, id: &str) -> io::Result<()> {
    bincode::serialize_into(value, &(rtype, id)).map_err(|e| invalid_data(e.to_string()))
}
/// The first leaf and the ids, leaf by leaf, of a touched record.
pub(crate) fn touched_ids(key: &[u8], value: &[u8]) -> io::Result<(u64, Vec<(String, String)>)> {
    let bad = || invalid_data(format!("touched record {key:02x?} is malformed"));
    let first = key.get(1..9).and_then(crate::kv::read_be).ok_or_else(bad)?;
    let count = match key.len() {
        9 => 1,
        17 => key.get(9..).and_then(crate::kv::read_be).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let mut rest = value;
    let ids = (0..count)
        .map(|_| bincode::deserialize_from(&mut rest).map_err(|e| invalid_data(e.to_string())))
        .collect::<io::Result<Vec<(String, String)>>>()?;
    if !rest.is_empty() {
        return Err(bad());
    }
    Ok((first, ids))
}
/// The number of leaves the lookup tables reflect, written with them (lookup store).
const LOOKUP_LEAVES: &[u8] = b"u";
/// Subtrees of 16 leaves and up are stored (about one key per 8 leaves); smaller ones are
/// recomputed from at most 8 version records. Storing every level cost ~15% of ingest.
pub const STORED_NODE_LEVEL: u32 = 4;

/// A perfect Merkle subtree: `level` (one byte) and its index at that level.
pub(crate) fn node_key(level: u32, index: u64) -> Vec<u8> {
    let mut k = vec![b'n', level as u8];
    k.extend_from_slice(&be(index));
    k
}

pub(crate) fn data_key_key(compartment: &str) -> Vec<u8> {
    sep_key(b'k', &[compartment.as_bytes()])
}

pub(crate) fn decode<T: for<'a> Deserialize<'a>>(bytes: &[u8]) -> io::Result<T> {
    bincode::deserialize(bytes).map_err(|e| invalid_data(e.to_string()))
}
fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    bincode::serialize(v).map_err(|e| invalid_data(e.to_string()))
}

/// Reads through the writes staged for the current entry, so later commands of a batch see
/// earlier ones.
struct Overlay<'a> {
    base: &'a dyn KvStore,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// The first leaf folded in, how many since, and their ids, each encoded as a
    /// (type, id) pair, in leaf order ([`Overlay::seal_touched`]).
    touched: Option<(u64, u64, Vec<u8>)>,
}

impl<'a> Overlay<'a> {
    fn new(base: &'a dyn KvStore) -> Self {
        Self { base, pending: BTreeMap::new(), touched: None }
    }
    /// Notes that `leaf` (the one after the last noted) wrote `rtype`/`id`.
    fn touch(&mut self, leaf: u64, rtype: &str, id: &str) -> io::Result<()> {
        let (_, count, ids) = self.touched.get_or_insert_with(|| (leaf, 0, Vec::new()));
        *count += 1;
        push_touched(ids, rtype, id)
    }
    /// Stages the touched record of the leaves noted since the last one.
    fn seal_touched(&mut self) {
        if let Some((first, count, ids)) = self.touched.take() {
            self.put(touched_key(first, count), ids);
        }
    }
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.base.get(key),
        }
    }
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }
    fn delete(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }
    /// Keys under `prefix`, merged from the store and the staged writes (sorted, deduplicated).
    fn keys_with_prefix(&self, prefix: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        let mut keys: BTreeMap<Vec<u8>, bool> = BTreeMap::new();
        for kv in self.base.scan_prefix(prefix) {
            keys.insert(kv?.0, true);
        }
        for (k, v) in self.pending.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            keys.insert(k.clone(), v.is_some());
        }
        Ok(keys.into_iter().filter(|(_, live)| *live).map(|(k, _)| k).collect())
    }
}

/// Whether a version with this operation ends its resource (a delete or an erasure).
fn ends(op: &str) -> bool {
    op == crate::command::Op::Delete.as_str() || op == crate::command::Op::Erase.as_str()
}

/// What one version record changes in the lookup tables: its id's current record, the
/// postings that change, and which id its leaf touched. `old`: the id's current record before.
fn fold_record(ov: &mut Overlay<'_>, rec: &StoredRecord, old: Option<CurrentRecord>) -> io::Result<()> {
    let h = &rec.header;
    let (old_terms, mut leaves) = old.map(|o| (o.index, o.leaves)).unwrap_or_default();
    leaves.push(rec.leaf);
    let new = CurrentRecord {
        version: h.version,
        deleted: ends(&h.op),
        last_updated_ms: h.last_updated_ms,
        index: rec.terms.clone(),
        leaves,
    };
    set_current(ov, &h.rtype, &h.id, &old_terms, Some(&new))?;
    ov.touch(rec.leaf, &h.rtype, &h.id)
}

/// Writes `new` as the current record of `rtype`/`id` (None: removes it), touching only the
/// postings that differ from `old_terms`: an update that keeps its terms writes none.
fn set_current(
    ov: &mut Overlay<'_>,
    rtype: &str,
    id: &str,
    old_terms: &[IndexKey],
    new: Option<&CurrentRecord>,
) -> io::Result<()> {
    let new_terms = new.map_or(&[][..], |n| n.index.as_slice());
    let posting = |term: &IndexKey| {
        let mut k = posting_prefix(term, rtype);
        k.extend_from_slice(id.as_bytes());
        k
    };
    for term in old_terms.iter().filter(|t| !new_terms.contains(t)) {
        ov.delete(posting(term));
    }
    for term in new_terms.iter().filter(|t| !old_terms.contains(t)) {
        ov.put(posting(term), Vec::new());
    }
    match new {
        Some(n) => ov.put(current_key(rtype, id), encode(n)?),
        None => ov.delete(current_key(rtype, id)),
    }
    Ok(())
}

/// Leaves folded per write while reconciling (bounds memory).
const RECONCILE_CHUNK: u64 = 4096;

/// Brings the lookup tables to the ledger's leaf count. The two are written one after the
/// other (`split_store`), so after a crash the tables may lag (their last batches lost: the
/// missing records are folded in again) or lead (the ledger's last batches lost, to be
/// re-applied from the Raft log: every id those leaves touched steps back to its newest
/// version the ledger holds). Tables that are missing altogether are rebuilt from every
/// record. Returns how many leaves it folded or stepped back.
pub(crate) fn reconcile_lookup(kv: &dyn KvStore) -> io::Result<u64> {
    let leaves: u64 = kv.get(META_FRONTIER)?.map(|b| decode::<Frontier>(&b)).transpose()?.map_or(0, |f| f.size);
    let upto = kv.get(LOOKUP_LEAVES)?.and_then(|v| crate::kv::read_be(&v)).unwrap_or(0);
    if upto < leaves {
        let mut from = upto;
        while from < leaves {
            let to = leaves.min(from + RECONCILE_CHUNK);
            let mut ov = Overlay::new(kv);
            for item in kv.range(&record_key(from), &record_key(to), false) {
                let (_, bytes) = item?;
                let rec: StoredRecord = decode(&bytes)?;
                let old = ov.get(&current_key(&rec.header.rtype, &rec.header.id))?.map(|b| decode(&b)).transpose()?;
                fold_record(&mut ov, &rec, old)?;
            }
            ov.seal_touched();
            ov.put(LOOKUP_LEAVES.to_vec(), be(to).to_vec());
            kv.apply(WriteBatch { ops: ov.pending.into_iter().collect() })?;
            from = to;
        }
    } else if upto > leaves {
        let mut ov = Overlay::new(kv);
        let mut ids = BTreeSet::new();
        // Newest record first, back to one that ends at `leaves`. Records follow the batches
        // both stores were written in, so none should straddle it; one that did would keep
        // its leaves below.
        for item in kv.range(&touched_from(0), &touched_from(upto), true) {
            let (k, v) = item?;
            let (first, touched) = touched_ids(&k, &v)?;
            let keep = usize::try_from(leaves.saturating_sub(first)).unwrap_or(usize::MAX).min(touched.len());
            if keep == touched.len() {
                break;
            }
            ov.delete(k);
            if keep > 0 {
                let mut kept = Vec::new();
                for (rtype, id) in &touched[..keep] {
                    push_touched(&mut kept, rtype, id)?;
                }
                ov.put(touched_key(first, keep as u64), kept);
            }
            ids.extend(touched.into_iter().skip(keep));
        }
        for (rtype, id) in ids {
            let Some(cur) = ov.get(&current_key(&rtype, &id))?.map(|b| decode::<CurrentRecord>(&b)).transpose()? else {
                continue;
            };
            let kept: Vec<u64> = cur.leaves.iter().copied().filter(|l| *l < leaves).collect();
            let restored = match kept.last() {
                None => None,
                Some(&last) => {
                    let bytes = kv.get(&record_key(last))?.ok_or_else(|| {
                        invalid_data(format!(
                            "{rtype}/{id}: leaf {last} is in its current record but not in the ledger"
                        ))
                    })?;
                    let rec: StoredRecord = decode(&bytes)?;
                    let h = rec.header;
                    Some(CurrentRecord {
                        version: h.version,
                        deleted: ends(&h.op),
                        last_updated_ms: h.last_updated_ms,
                        index: rec.terms,
                        leaves: kept,
                    })
                }
            };
            set_current(&mut ov, &rtype, &id, &cur.index, restored.as_ref())?;
        }
        ov.put(LOOKUP_LEAVES.to_vec(), be(leaves).to_vec());
        kv.apply(WriteBatch { ops: ov.pending.into_iter().collect() })?;
    }
    Ok(upto.abs_diff(leaves))
}

/// The fields of a leaf header a selection over every version reads (a Bulk export's),
/// borrowed from the stored record: nothing is allocated and the digests after them are not
/// read. Its fields mirror [`LeafHeader`]'s first eight, in order (a test pins them).
#[derive(Deserialize, Debug)]
pub struct HeaderFields<'a> {
    #[allow(dead_code)] // part of the layout; read to get past it
    format: u16,
    /// [`LeafHeader::rtype`].
    pub rtype: &'a str,
    /// [`LeafHeader::id`].
    pub id: &'a str,
    /// [`LeafHeader::version`].
    pub version: u64,
    /// [`LeafHeader::last_updated_ms`].
    pub last_updated_ms: i64,
    #[allow(dead_code)] // part of the layout; read to get past it
    actor: &'a str,
    /// [`LeafHeader::op`].
    pub op: &'a str,
    /// [`LeafHeader::compartment`].
    pub compartment: &'a str,
}

/// Records [`StateView::for_each_record`] reads before reading their bodies.
const READ_BATCH: usize = 64;
/// The most bytes between two bodies read with one read (other records' bodies, read and
/// skipped: a copy from the page cache costs less than a read of its own).
const READ_GAP: u32 = 16 << 10;
/// The most bytes one read of bodies takes.
const READ_SPAN: u32 = 4 << 20;

/// What [`StateView::for_each_record`] hands each record to: its leaf, header and ciphertext.
pub type RecordReader<'a> = dyn FnMut(u64, &LeafHeader, &mut [u8]) -> io::Result<()> + 'a;

/// Read-only access to the applied state, shared with the API layer.
#[derive(Clone, Debug)]
pub struct StateView {
    pub(crate) kv: Arc<dyn KvStore>,
    /// Where bodies the records reference are read.
    pub(crate) bodies: Bodies,
    /// Where snapshot files live (`m/snapshot` names one of them).
    pub(crate) snap_dir: Arc<PathBuf>,
}

impl StateView {
    /// The current record of one resource id (None: never written).
    pub fn current(&self, rtype: &str, id: &str) -> io::Result<Option<CurrentRecord>> {
        self.kv.get(&current_key(rtype, id))?.map(|b| decode(&b)).transpose()
    }
    /// One version of one resource (None: no such version).
    pub fn version(&self, rtype: &str, id: &str, version: u64) -> io::Result<Option<VersionRecord>> {
        let leaf = self.current(rtype, id)?.and_then(|c| c.leaves.get((version as usize).wrapping_sub(1)).copied());
        match leaf {
            Some(leaf) => self.record(leaf),
            None => Ok(None),
        }
    }
    /// The version record committed as Merkle leaf `leaf`.
    pub fn record(&self, leaf: u64) -> io::Result<Option<VersionRecord>> {
        let Some(bytes) = self.kv.get(&record_key(leaf))? else { return Ok(None) };
        let StoredRecord { header, leaf, body, .. } = decode(&bytes)?;
        Ok(Some(VersionRecord { header, leaf, body: self.body(body)? }))
    }
    /// The version records of `leaves` (ascending) one at a time, each ciphertext read into
    /// one reused buffer: `f(leaf, header, ciphertext)` for each that exists (a Bulk export's
    /// files are streamed through this). `f` may change the ciphertext in place (decrypt it).
    pub fn for_each_record(&self, leaves: &[u64], f: &mut RecordReader<'_>) -> io::Result<()> {
        let (mut buf, mut batch) = (Vec::new(), Vec::new());
        self.for_each_stored(leaves, &mut |leaf, bytes| {
            let StoredRecord { header, body, .. } = decode(bytes)?;
            match body {
                BodyAt::Inline(mut b) => {
                    self.read_batch(&mut batch, &mut buf, f)?; // the records before it first
                    f(leaf, &header, &mut b)
                }
                BodyAt::Log { index, offset, len } => {
                    batch.push((leaf, header, index, offset, len));
                    if batch.len() == READ_BATCH {
                        self.read_batch(&mut batch, &mut buf, f)?;
                    }
                    Ok(())
                }
            }
        })?;
        self.read_batch(&mut batch, &mut buf, f)
    }

    /// Hands `f` the records of `batch` in order, emptying it; bodies that lie close together
    /// in one log entry are read with one read (a read a body was a tenth of an export).
    fn read_batch(
        &self,
        batch: &mut Vec<(u64, LeafHeader, u64, u32, u32)>,
        buf: &mut Vec<u8>,
        f: &mut RecordReader<'_>,
    ) -> io::Result<()> {
        let mut rest = &batch[..];
        while let Some(&(_, _, index, start, len)) = rest.first() {
            let mut end = start + len;
            let span = rest
                .iter()
                .skip(1)
                .take_while(|&&(_, _, i, o, l)| {
                    let joins = i == index
                        && o >= end
                        && o - end <= READ_GAP
                        && u64::from(o) + u64::from(l) - u64::from(start) <= u64::from(READ_SPAN);
                    if joins {
                        end = o + l;
                    }
                    joins
                })
                .count()
                + 1;
            self.bodies.read_into(index, start, end - start, buf)?;
            for (leaf, header, _, offset, len) in &rest[..span] {
                let at = (offset - start) as usize;
                f(*leaf, header, &mut buf[at..at + *len as usize])?;
            }
            rest = &rest[span..];
        }
        batch.clear();
        Ok(())
    }
    /// [`HeaderFields`] of every leaf below `size`, in leaf order.
    pub fn for_each_header_below(&self, size: u64, f: impl FnMut(u64, &HeaderFields<'_>)) -> io::Result<()> {
        self.for_each_header_in(0..size, f)
    }

    /// [`HeaderFields`] of the leaves in `leaves`, in leaf order.
    pub fn for_each_header_in(
        &self,
        leaves: std::ops::Range<u64>,
        mut f: impl FnMut(u64, &HeaderFields<'_>),
    ) -> io::Result<()> {
        for kv in self.kv.range(&record_key(leaves.start), &record_key(leaves.end), false) {
            let (k, v) = kv?;
            let Some(leaf) = crate::kv::read_be(&k[1..]) else { continue };
            let fields: HeaderFields<'_> = bincode::deserialize(&v).map_err(|e| invalid_data(e.to_string()))?;
            f(leaf, &fields);
        }
        Ok(())
    }
    /// The stored records of `leaves` that exist: dense ascending runs of leaves read with
    /// one range scan, others a record at a time.
    fn for_each_stored(&self, leaves: &[u64], one: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>) -> io::Result<()> {
        const RUN: usize = 256;
        for run in leaves.chunks(RUN) {
            let (Some(&first), Some(&last)) = (run.first(), run.last()) else { continue };
            if run.is_sorted() && last - first < 2 * RUN as u64 {
                let mut want = run.iter().peekable();
                for kv in self.kv.range(&record_key(first), &record_key(last + 1), false) {
                    let (k, v) = kv?;
                    let Some(leaf) = crate::kv::read_be(&k[1..]) else { continue };
                    while want.next_if(|&&w| w < leaf).is_some() {}
                    if want.next_if(|&&w| w == leaf).is_some() {
                        one(leaf, &v)?;
                    }
                }
            } else {
                for &leaf in run {
                    if let Some(v) = self.kv.get(&record_key(leaf))? {
                        one(leaf, &v)?;
                    }
                }
            }
        }
        Ok(())
    }
    /// A stored body's bytes, read from the log when it is there.
    pub(crate) fn body(&self, at: BodyAt) -> io::Result<Vec<u8>> {
        match at {
            BodyAt::Inline(body) => Ok(body),
            BodyAt::Log { index, offset, len } => self.bodies.read(index, offset, len),
        }
    }
    /// Every version of one resource, newest first.
    pub fn versions(&self, rtype: &str, id: &str) -> io::Result<Vec<VersionRecord>> {
        let mut out = Vec::new();
        for leaf in self.current(rtype, id)?.map(|c| c.leaves).unwrap_or_default().into_iter().rev() {
            if let Some(r) = self.record(leaf)? {
                out.push(r);
            }
        }
        Ok(out)
    }
    /// Live ids of `rtype` having index term `term`, in id order.
    pub fn postings(&self, term: &[u8; 32], rtype: &str) -> io::Result<Vec<String>> {
        let prefix = posting_prefix(term, rtype);
        let mut out = Vec::new();
        for kv in self.kv.scan_prefix(&prefix) {
            let (k, _) = kv?;
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }
    /// Current records of `rtype` with ids after `after` (exclusive), in id order.
    pub fn scan_type<'a>(
        &'a self,
        rtype: &str,
        after: Option<&str>,
    ) -> impl Iterator<Item = io::Result<(String, CurrentRecord)>> + 'a {
        let mut prefix = current_key(rtype, "");
        let plen = prefix.len();
        let from = match after {
            Some(a) => {
                let mut k = current_key(rtype, a);
                k.push(0);
                k
            }
            None => prefix.clone(),
        };
        prefix.pop();
        prefix.push(1); // one past the separator: the end of this type's range
        self.kv.range(&from, &prefix, false).map(move |kv| {
            let (k, v) = kv?;
            Ok((String::from_utf8_lossy(&k[plen..]).into_owned(), decode(&v)?))
        })
    }
    /// Global history, newest first, starting below leaf `before` (exclusive).
    pub fn history(&self, before: Option<u64>) -> impl Iterator<Item = io::Result<(u64, HistoryRecord)>> + '_ {
        let to = match before {
            Some(b) => record_key(b),
            None => vec![b'r' + 1],
        };
        self.kv.range(b"r", &to, true).map(|kv| {
            let (k, v) = kv?;
            let leaf = crate::kv::read_be(&k[1..]).unwrap_or_default();
            // The header alone: the record's prefix.
            let h = decode::<LeafHeader>(&v)?;
            Ok((
                leaf,
                HistoryRecord { rtype: h.rtype, id: h.id, version: h.version, last_updated_ms: h.last_updated_ms },
            ))
        })
    }
    /// The ids whose newest version was encrypted under `compartment`, in (type, id) order:
    /// what erasing the compartment must delete. Reads every version record once.
    pub fn compartment_members(&self, compartment: &str) -> io::Result<Vec<(String, String)>> {
        let mut newest: BTreeMap<(String, String), bool> = BTreeMap::new();
        for kv in self.kv.scan_prefix(b"r") {
            let (_, v) = kv?;
            // The header is the record's prefix (bincode allows trailing bytes): decoding it
            // alone spares copying every body of the ledger.
            let h = decode::<LeafHeader>(&v)?;
            // Deletes carry no compartment; they do not move a resource out of one.
            if h.op != crate::command::Op::Delete.as_str() {
                newest.insert((h.rtype, h.id), h.compartment == compartment);
            }
        }
        Ok(newest.into_iter().filter(|(_, inside)| *inside).map(|(k, _)| k).collect())
    }
    /// The compartment's data key as wrapped by the KEK (None: never registered; empty:
    /// erased).
    pub fn data_key(&self, compartment: &str) -> io::Result<Option<Vec<u8>>> {
        self.kv.get(&data_key_key(compartment))
    }
    /// The leaf hash, recomputed from the stored header.
    pub fn leaf_hash(&self, leaf: u64) -> io::Result<Option<Hash>> {
        // The header alone (the record's prefix): a proof reads no bodies.
        let Some(bytes) = self.kv.get(&record_key(leaf))? else { return Ok(None) };
        Ok(Some(leaf_hash(&decode::<LeafHeader>(&bytes)?.encode())))
    }

    /// The hash of a perfect subtree (`level` 0 = a leaf): stored from
    /// [`STORED_NODE_LEVEL`] up, recomputed below it.
    pub(crate) fn node(&self, level: u32, index: u64) -> io::Result<Option<Hash>> {
        if level >= STORED_NODE_LEVEL {
            return Ok(self.kv.get(&node_key(level, index))?.and_then(|v| v.try_into().ok()));
        }
        if level == 0 {
            return self.leaf_hash(index);
        }
        let (Some(l), Some(r)) = (self.node(level - 1, index * 2)?, self.node(level - 1, index * 2 + 1)?) else {
            return Ok(None);
        };
        Ok(Some(crate::merkle::node_hash(&l, &r)))
    }
    /// The tree's size and right edge (its root is the ledger's root).
    pub fn frontier(&self) -> io::Result<Frontier> {
        Ok(self.kv.get(META_FRONTIER)?.map(|b| decode(&b)).transpose()?.unwrap_or_default())
    }
    /// The number of leaves: the last leaf record's index plus one. Cheaper than
    /// [`StateView::frontier`] (no subtree hashes to decode), for callers that poll it.
    pub fn leaf_count(&self) -> io::Result<u64> {
        match self.kv.range(&record_key(0), &[b'r' + 1], true).next() {
            Some(kv) => {
                let (k, _) = kv?;
                Ok(crate::kv::read_be(&k[1..]).map_or(0, |n| n + 1))
            }
            None => Ok(0),
        }
    }
    /// The headers of the leaves from `from` on, in leaf order (decoding no bodies): what a
    /// derived index folds over to catch up with the state.
    pub fn headers_from(&self, from: u64) -> impl Iterator<Item = io::Result<(u64, LeafHeader)>> + '_ {
        self.kv.range(&record_key(from), &[b'r' + 1], false).map(|kv| {
            let (k, v) = kv?;
            Ok((crate::kv::read_be(&k[1..]).unwrap_or(u64::MAX), decode::<LeafHeader>(&v)?))
        })
    }
    /// Every version record as stored, in leaf order (for the offline verifier).
    pub(crate) fn scan_records(&self) -> impl Iterator<Item = io::Result<(u64, Vec<u8>)>> + '_ {
        self.kv.scan_prefix(b"r").map(|kv| kv.map(|(k, v)| (crate::kv::read_be(&k[1..]).unwrap_or(u64::MAX), v)))
    }
    /// Whether a received snapshot is being loaded (the state is partial until it finishes).
    pub(crate) fn installing(&self) -> bool {
        self.kv.get(META_INSTALLING).map_or(true, |v| v.is_some())
    }

    /// Bytes of a snapshot this node is receiving right now (None when it receives none):
    /// the progress of a catch-up by snapshot.
    pub(crate) fn receiving_snapshot_bytes(&self) -> Option<u64> {
        let entries = std::fs::read_dir(self.snap_dir.as_path()).ok()?;
        let sizes: Vec<u64> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("recv-"))
            .filter_map(|e| e.metadata().ok().map(|m| m.len()))
            .collect();
        (!sizes.is_empty()).then(|| sizes.iter().sum())
    }

    /// The last snapshot built or installed: its meta and its file.
    pub(crate) fn snapshot(&self) -> io::Result<Option<(SnapshotMeta<NodeId, Node>, PathBuf)>> {
        let Some(bytes) = self.kv.get(META_SNAPSHOT)? else { return Ok(None) };
        let stored: StoredSnapshot = decode(&bytes)?;
        Ok(Some((stored.meta, self.snap_dir.join(stored.file))))
    }
    pub(crate) fn last_applied(&self) -> io::Result<Option<LogId<NodeId>>> {
        Ok(self.kv.get(META_APPLIED)?.map(|b| decode(&b)).transpose()?.flatten())
    }
}

impl crate::proof::Nodes for StateView {
    fn node(&self, level: u32, index: u64) -> Option<Hash> {
        StateView::node(self, level, index).ok().flatten()
    }
}

/// The current snapshot: its meta and the name of its file in the snapshot directory.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    file: String,
}

/// Set while a received snapshot is being loaded: names the file, so that a crash midway is
/// finished by loading it again at the next open.
pub(crate) const META_INSTALLING: &[u8] = b"m/installing";
/// Bytes of state written per batch while loading or clearing (bounds memory).
const LOAD_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// The openraft state machine over a [`KvStore`].
#[derive(Clone, Debug)]
pub struct StateMachine {
    view: StateView,
    /// Serializes apply against the start of a snapshot build and against installs.
    lock: Arc<Mutex<()>>,
    /// While a snapshot is being built: the value every key apply changed had at the
    /// snapshot's point (`None`: absent then), kept before apply's first write to it.
    undo: Undo,
    /// One build at a time (openraft's snapshots and backups): each has its point and its undo.
    build: Arc<Mutex<()>>,
}

type Undo = Arc<std::sync::Mutex<Option<BTreeMap<Vec<u8>, Option<Vec<u8>>>>>>;

/// Keys that only ever appear, never change: version records and stored subtree hashes. A
/// snapshot tells those of its point by their leaf, so apply keeps no undo for them.
fn append_only(key: &[u8]) -> bool {
    matches!(key.first(), Some(b'r' | b'n' | b't'))
}

/// Whether an append-only key belongs to a state of `leaves` leaves: a record of a leaf below
/// it, or a subtree that ends at or below it.
fn within(key: &[u8], leaves: u64) -> bool {
    match key.first() {
        Some(b'r' | b't') => key.get(1..).and_then(crate::kv::read_be).is_some_and(|leaf| leaf < leaves),
        Some(b'n') => {
            let level = key.get(1).copied().map_or(64, u32::from);
            let index = key.get(2..).and_then(crate::kv::read_be);
            index.and_then(|i| i.checked_add(1)).and_then(|i| i.checked_shl(level)).is_some_and(|end| end <= leaves)
        }
        _ => true,
    }
}

// By value so that it reads `.map_err(sio)`; openraft only borrows the error.
#[allow(clippy::needless_pass_by_value)]
fn sio(e: io::Error) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(&e).into()
}

impl StateMachine {
    /// A state machine over `kv` with snapshot files in `snap_dir` and the bodies it
    /// references in `bodies`, as it is on disk (for read-only use such as the offline
    /// verifier).
    pub(crate) fn new(kv: Arc<dyn KvStore>, snap_dir: PathBuf, bodies: Bodies) -> io::Result<Self> {
        let from = kv.get(META_BODIES_FROM)?.map(|b| decode::<u64>(&b)).transpose()?.unwrap_or(0);
        bodies.set_referenced_from(from);
        Ok(Self {
            view: StateView { kv, snap_dir: Arc::new(snap_dir), bodies },
            lock: Arc::new(Mutex::new(())),
            undo: Arc::default(),
            build: Arc::new(Mutex::new(())),
        })
    }

    /// [`StateMachine::new`] for a running node: finishes a snapshot load a crash interrupted
    /// and removes partial snapshot files.
    pub(crate) fn open(kv: Arc<dyn KvStore>, snap_dir: PathBuf, bodies: Bodies) -> io::Result<Self> {
        std::fs::create_dir_all(&snap_dir)?;
        let sm = Self::new(kv, snap_dir, bodies)?;
        if let Some(bytes) = sm.view.kv.get(META_INSTALLING)? {
            let file: String = decode(&bytes)?;
            tracing::warn!(%file, "finishing a snapshot install that a crash interrupted");
            let path = sm.view.snap_dir.join(&file);
            let meta = crate::snapshot::check(&path)?;
            load_snapshot(sm.view.kv.as_ref(), &path, &meta, &file, &mut |_| {})?;
            sm.view.bodies.set_referenced_from(bodies_from(&meta));
        }
        let moved = reconcile_lookup(sm.view.kv.as_ref())?;
        if moved > 0 {
            tracing::warn!(
                leaves = moved,
                "lookup tables brought to the ledger's leaf count (an unclean stop, or tables rebuilt)"
            );
        }
        sm.remove_stale_files()?;
        Ok(sm)
    }

    /// Deletes every snapshot file but the current one (older snapshots, partial transfers).
    fn remove_stale_files(&self) -> io::Result<()> {
        let current = self.view.snapshot()?.map(|(_, p)| p);
        for entry in std::fs::read_dir(self.view.snap_dir.as_path())? {
            let path = entry?.path();
            if Some(&path) != current.as_ref() {
                let _ = crate::snapshot::remove_gradually(&path);
            }
        }
        Ok(())
    }

    pub fn view(&self) -> StateView {
        self.view.clone()
    }

    /// The committed membership as last applied (names the keys batches must verify against).
    pub fn stored_membership(&self) -> io::Result<StoredMembership<NodeId, Node>> {
        self.membership()
    }

    fn membership(&self) -> io::Result<StoredMembership<NodeId, Node>> {
        Ok(self.view.kv.get(META_MEMBERSHIP)?.map(|b| decode(&b)).transpose()?.unwrap_or_default())
    }

    pub(crate) fn proposer_key(membership: &StoredMembership<NodeId, Node>, node_id: NodeId) -> Option<VerifyingKey> {
        membership.membership().get_node(&node_id)?.verifying_key()
    }

    /// While a snapshot is being built, keeps what each key `wb` changes held at the
    /// snapshot's point, before the first write to it (see [`RaftSnapshotBuilder`] below).
    fn keep_undo(&self, kv: &dyn KvStore, wb: &WriteBatch) -> io::Result<()> {
        let mut undo = self.undo.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(undo) = undo.as_mut() else { return Ok(()) };
        for (k, _) in &wb.ops {
            if !append_only(k) && !k.starts_with(b"m/") && !undo.contains_key(k) {
                undo.insert(k.clone(), kv.get(k)?);
            }
        }
        Ok(())
    }

    /// Applies a batch decoded in place: `digests` are its writes' bodies in order, which lie
    /// in the entry's encoding from `start` on (None: not known, the bodies are stored inline).
    fn apply_batch(
        ov: &mut Overlay<'_>,
        frontier: &mut Frontier,
        batch: crate::entry_ref::BatchRef<'_>,
        log_index: u64,
        start: Option<u64>,
        digests: &[crate::command::BodyDigest],
    ) -> io::Result<BatchOutcome> {
        let mut outcomes = Vec::with_capacity(batch.commands.len());
        let mut at = digests.iter();
        for cmd in batch.commands {
            let (cmd, bytes) = cmd.detach();
            let bodies = bytes
                .into_iter()
                .zip(at.by_ref())
                .map(|(bytes, d)| BodyIn {
                    offset: start.and_then(|s| u32::try_from(s + d.at as u64).ok()),
                    sha256: d.sha256,
                    bytes,
                })
                .collect();
            outcomes.push(Self::apply_command(ov, frontier, cmd, log_index, bodies)?);
        }
        Ok(BatchOutcome { outcomes })
    }

    /// Current records of the ids a command touches, read once per command.
    fn current_of<'c>(
        ov: &Overlay<'_>,
        cache: &'c mut BTreeMap<(String, String), Option<CurrentRecord>>,
        rtype: &str,
        id: &str,
    ) -> io::Result<&'c Option<CurrentRecord>> {
        let key = (rtype.to_string(), id.to_string());
        if !cache.contains_key(&key) {
            let cur = ov.get(&current_key(rtype, id))?.map(|b| decode(&b)).transpose()?;
            cache.insert(key.clone(), cur);
        }
        Ok(cache.get(&key).unwrap_or(&None))
    }

    fn check(
        ov: &Overlay<'_>,
        cmd: &Command,
        cache: &mut BTreeMap<(String, String), Option<CurrentRecord>>,
    ) -> io::Result<Option<usize>> {
        for (i, pre) in cmd.preconditions.iter().enumerate() {
            let holds = match pre {
                Precondition::Version { rtype, id, current } => {
                    Self::current_of(ov, cache, rtype, id)?.as_ref().map_or(0, |c| c.version) == *current
                }
                Precondition::KeyAbsent { compartment } => ov.get(&data_key_key(compartment))?.is_none(),
                Precondition::KeyIs { compartment, sha256 } => ov
                    .get(&data_key_key(compartment))?
                    .is_some_and(|wrapped| <[u8; 32]>::from(Sha256::digest(&wrapped)) == *sha256),
                Precondition::Matches { rtype, all_of, ids } => {
                    let mut result: Option<Vec<String>> = None;
                    for group in all_of {
                        let mut hits: Vec<String> = Vec::new();
                        for term in group {
                            let prefix = posting_prefix(term, rtype);
                            for k in ov.keys_with_prefix(&prefix)? {
                                hits.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
                            }
                        }
                        hits.sort();
                        hits.dedup();
                        result = Some(match result {
                            None => hits,
                            Some(prev) => prev.into_iter().filter(|id| hits.binary_search(id).is_ok()).collect(),
                        });
                    }
                    result.unwrap_or_default() == *ids
                }
            };
            if !holds {
                return Ok(Some(i));
            }
        }
        // A write must extend the current version by exactly one, and a command may write an
        // id only once (otherwise the second write would not see the first).
        let mut seen = std::collections::BTreeSet::new();
        for (i, w) in cmd.writes.iter().enumerate() {
            if !seen.insert((w.rtype.as_str(), w.id.as_str())) {
                return Ok(Some(cmd.preconditions.len() + i));
            }
            if Self::current_of(ov, cache, &w.rtype, &w.id)?.as_ref().map_or(0, |c| c.version) + 1 != w.version {
                return Ok(Some(cmd.preconditions.len() + i));
            }
        }
        Ok(None)
    }

    fn apply_command(
        ov: &mut Overlay<'_>,
        frontier: &mut Frontier,
        cmd: Command,
        log_index: u64,
        bodies: Vec<BodyIn<'_>>,
    ) -> io::Result<Outcome> {
        let mut cache = BTreeMap::new();
        if let Some(index) = Self::check(ov, &cmd, &mut cache)? {
            return Ok(Outcome::Conflict { index });
        }
        for (compartment, wrapped) in cmd.new_keys {
            ov.put(data_key_key(&compartment), wrapped);
        }
        let mut leaves = Vec::with_capacity(cmd.writes.len());
        for (w, body_at) in cmd.writes.into_iter().zip(bodies) {
            // `check` refused commands that write an id twice, so the cached record is the one
            // before this write.
            let old = cache.remove(&(w.rtype.clone(), w.id.clone())).flatten();
            leaves.push(Self::apply_write(ov, frontier, &cmd.actor, w, old, (log_index, body_at))?);
        }
        Ok(Outcome::Applied { leaves })
    }

    fn apply_write(
        ov: &mut Overlay<'_>,
        frontier: &mut Frontier,
        actor: &str,
        w: Write,
        old: Option<CurrentRecord>,
        (log_index, body): (u64, BodyIn<'_>),
    ) -> io::Result<u64> {
        let deleted = matches!(w.op, crate::command::Op::Delete | crate::command::Op::Erase);
        if w.op == crate::command::Op::Erase {
            // A tombstone, not a removal: an erased compartment never gets a new key, so no
            // later write can be mistaken for data that survived the erasure.
            ov.put(data_key_key(&w.compartment), Vec::new());
        }
        let terms = if deleted { Vec::new() } else { w.index };
        let header = LeafHeader {
            format: LEAF_FORMAT,
            rtype: w.rtype.clone(),
            id: w.id.clone(),
            version: w.version,
            last_updated_ms: w.last_updated_ms,
            actor: actor.to_string(),
            op: w.op.as_str().to_string(),
            compartment: w.compartment.clone(),
            body_sha256: body.sha256,
            log_index,
            content_sha256: w.content_sha256,
        };
        let leaf = frontier.size;
        frontier.append_nodes(leaf_hash(&header.encode()), |level, index, hash| {
            if level >= STORED_NODE_LEVEL {
                ov.put(node_key(level, index), hash.to_vec());
            }
        });
        // The body stays where the log entry holds it; the record says where.
        let body = match (body.offset, u32::try_from(body.bytes.len())) {
            (Some(offset), Ok(len)) if len > 0 => BodyAt::Log { index: log_index, offset, len },
            _ => BodyAt::Inline(body.bytes.to_vec()),
        };
        let record = StoredRecord { header, leaf, body, terms };
        ov.put(record_key(leaf), encode(&record)?);
        fold_record(ov, &record, old)?;
        Ok(leaf)
    }
}

/// A write's body as apply learns it from the signed entry: where it lies in the entry's
/// encoding (None if past what a u32 offset reaches: the body is then stored inline), its
/// SHA-256, computed once for the signature and the leaf, and its bytes there.
#[derive(Clone, Copy)]
struct BodyIn<'a> {
    offset: Option<u32>,
    sha256: Hash,
    bytes: &'a [u8],
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let applied = self.view.last_applied().map_err(sio)?;
        Ok((applied, self.membership().map_err(sio)?))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<BatchOutcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let _guard = self.lock.lock().await;
        let kv = self.view.kv.clone();
        let mut ov = Overlay::new(kv.as_ref());
        let mut frontier = self.view.frontier().map_err(sio)?;
        let mut membership = self.membership().map_err(sio)?;
        let mut replies = Vec::new();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id);
            // What the log holds for this entry: its bincode encoding, where bodies are found.
            let entry_len = bincode::serialized_size(&entry).unwrap_or(0);
            match entry.payload {
                EntryPayload::Blank => replies.push(BatchOutcome::default()),
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(entry.log_id), m);
                    ov.put(META_MEMBERSHIP.to_vec(), encode(&membership).map_err(sio)?);
                    replies.push(BatchOutcome::default());
                }
                EntryPayload::Normal(signed) => {
                    // Checked and decoded once, in place: the bodies are not copied out of the
                    // entry, where the state references them.
                    let opened = match Self::proposer_key(&membership, signed.node_id) {
                        Some(key) => SignedBatch::verify_ref(signed.node_id, &signed.payload, &signed.signature, &key)
                            .map_err(|e| e.to_string()),
                        None => Err(format!("node {} is not a member with a known key", signed.node_id)),
                    };
                    let outcome = match opened {
                        Ok((batch, digests)) => {
                            let start = crate::entry_ref::payload_start(entry_len, &signed);
                            let index = entry.log_id.index;
                            Self::apply_batch(&mut ov, &mut frontier, batch, index, start, &digests).map_err(sio)?
                        }
                        Err(reason) => {
                            tracing::warn!(%reason, "refusing ledger batch");
                            let n = bincode::deserialize::<Batch>(&signed.payload).map_or(1, |b| b.commands.len());
                            BatchOutcome { outcomes: vec![Outcome::Refused { reason }; n] }
                        }
                    };
                    replies.push(outcome);
                }
            }
        }
        if let Some(last) = last {
            ov.put(META_APPLIED.to_vec(), encode(&Some(last)).map_err(sio)?);
            ov.put(META_FRONTIER.to_vec(), encode(&frontier).map_err(sio)?);
            ov.seal_touched();
            ov.put(LOOKUP_LEAVES.to_vec(), be(frontier.size).to_vec());
            let wb = WriteBatch { ops: ov.pending.into_iter().collect() };
            self.keep_undo(kv.as_ref(), &wb).map_err(sio)?;
            // Not flushed here: the Raft log is durable before commit, and a state machine that
            // lags after a crash is brought forward by re-applying the log from `m/applied`.
            kv.apply(wb).map_err(sio)?;
            self.view.bodies.applied(last.index);
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        let path = self.view.snap_dir.join(format!("recv-{}.part", uuid_ish()));
        let file =
            tokio::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).await.map_err(sio)?;
        Ok(Box::new(file))
    }

    /// Copies the received file to its final name (checking its trailer before anything is
    /// cleared), then loads it; see [`load_snapshot`] for crash safety.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<NodeId>> {
        let started = tokio::time::Instant::now(); // timing only: the state never sees it
        let guard = self.lock.clone().lock_owned().await;
        let mut received = snapshot.into_std().await;
        let (kv, dir, meta) = (self.view.kv.clone(), self.view.snap_dir.clone(), meta.clone());
        let sm = self.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            use std::io::Seek;
            let _guard = guard;
            received.seek(io::SeekFrom::Start(0))?;
            let name = crate::snapshot::file_name(&meta);
            let path = dir.join(&name);
            let tmp = path.with_extension("tmp");
            let mut out = std::fs::File::create(&tmp)?;
            io::copy(&mut received, &mut out)?;
            out.sync_all()?;
            crate::snapshot::check(&tmp)?;
            std::fs::rename(&tmp, &path)?;
            crate::snapshot::sync_dir(&dir)?;
            let mut wb = WriteBatch::default();
            wb.put(META_INSTALLING.to_vec(), encode(&name)?);
            kv.apply(wb)?;
            kv.flush()?;
            load_snapshot(kv.as_ref(), &path, &meta, &name, &mut |_| {})?;
            // Flushed: the log may now drop the segments before the snapshot.
            sm.view.bodies.set_referenced_from(bodies_from(&meta));
            sm.remove_stale_files()
        })
        .await
        .map_err(|e| sio(io::Error::other(e.to_string())))?
        .map_err(sio)?;
        metrics::histogram!(crate::SNAPSHOT_DURATION, "kind" => "install").record(started.elapsed());
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let Some((meta, path)) = self.view.snapshot().map_err(sio)? else { return Ok(None) };
        let file = tokio::fs::File::open(&path).await.map_err(sio)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(file) }))
    }
}

/// A name for a partial transfer that no other one shares.
fn uuid_ish() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// After installing the snapshot `meta`: bodies before its end are inline.
fn bodies_from(meta: &SnapshotMeta<NodeId, Node>) -> u64 {
    meta.last_log_id.map_or(0, |l| l.index + 1)
}

/// Replaces the whole state with the snapshot in `path`, in bounded batches. Not atomic as a
/// whole: `m/installing` (written by the caller, removed by the last batch here) makes a crash
/// midway redo the load at the next open, so the state ends up exactly the snapshot's.
pub(crate) fn load_snapshot(
    kv: &dyn KvStore,
    path: &std::path::Path,
    meta: &SnapshotMeta<NodeId, Node>,
    name: &str,
    progress: &mut dyn FnMut(u64),
) -> io::Result<()> {
    let mut wb = WriteBatch::default();
    let mut bytes = 0;
    for entry in kv.scan_prefix(b"") {
        let (k, _) = entry?;
        if k.as_slice() == META_INSTALLING {
            continue;
        }
        bytes += k.len();
        wb.delete(k);
        if bytes >= LOAD_BATCH_BYTES {
            kv.apply(std::mem::take(&mut wb))?;
            bytes = 0;
        }
    }
    kv.apply(std::mem::take(&mut wb))?;
    bytes = 0;
    let (mut reader, _) = crate::snapshot::Reader::new(std::fs::File::open(path)?)?;
    let mut loaded = 0u64;
    while let Some((k, v)) = reader.next_record()? {
        bytes += k.len() + v.len();
        wb.put(k, v);
        if bytes >= LOAD_BATCH_BYTES {
            kv.apply(std::mem::take(&mut wb))?;
            loaded += bytes as u64;
            progress(loaded);
            bytes = 0;
        }
    }
    wb.put(META_APPLIED.to_vec(), encode(&meta.last_log_id)?);
    wb.put(META_MEMBERSHIP.to_vec(), encode(&meta.last_membership)?);
    wb.put(META_SNAPSHOT.to_vec(), encode(&StoredSnapshot { meta: meta.clone(), file: name.to_string() })?);
    wb.put(META_BODIES_FROM.to_vec(), encode(&bodies_from(meta))?);
    wb.delete(META_INSTALLING.to_vec());
    kv.apply(wb)?;
    kv.flush()
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    /// Streams the state as it was at the last applied entry into a file while apply goes on
    /// (sled has no point-in-time iterator, so the build makes one): apply stops only while
    /// the point is taken. Version records and subtree hashes are only ever added, so those
    /// of later leaves are left out; every other key apply changes meanwhile has its value at
    /// the point kept first (`undo`), and the stream takes that value instead.
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let started = tokio::time::Instant::now(); // timing only: the state never sees it
        let (meta, _, path) = self.build_into(None, |_, _| {}).await.map_err(sio)?;
        let path = path.ok_or_else(|| sio(io::Error::other("a snapshot build wrote no file")))?;
        let file = tokio::fs::File::open(&path).await.map_err(sio)?;
        metrics::histogram!(crate::SNAPSHOT_DURATION, "kind" => "build").record(started.elapsed());
        Ok(Snapshot { meta, snapshot: Box::new(file) })
    }
}

impl StateMachine {
    /// Builds a snapshot of the last applied state while apply goes on: into the snapshot
    /// directory as the node's current snapshot (`backup` None: the file is returned), or onto
    /// the stream `backup`, leaving the node's snapshots as they are. `point` hears of the
    /// point once it is taken.
    pub(crate) async fn build_into(
        &self,
        backup: Option<Box<dyn io::Write + Send>>,
        point: impl FnOnce(&SnapshotMeta<NodeId, Node>, &Frontier),
    ) -> io::Result<(SnapshotMeta<NodeId, Node>, Frontier, Option<PathBuf>)> {
        let _one = self.build.clone().lock_owned().await;
        let (meta, frontier) = self.snapshot_point().await?;
        point(&meta, &frontier);
        let (sm, m, f) = (self.clone(), meta.clone(), frontier.clone());
        // On a thread of its own, at background priority (`crate::background`): a pooled
        // blocking thread would keep the lowered priority for whatever it runs next.
        let (done, built) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new().name("snapshot-build".into()).spawn(move || {
            crate::background::lower_this_thread();
            let write = || match backup {
                None => sm.write_snapshot(&m, &f).map(Some),
                Some(out) => sm.stream_snapshot(crate::snapshot::Writer::stream(out, &m)?, &f)?.seal().map(|_| None),
            };
            let _ = done.send(write());
        });
        let built = match spawned {
            Ok(_) => built.await.unwrap_or_else(|_| Err(io::Error::other("the snapshot build thread panicked"))),
            Err(e) => Err(e),
        };
        *self.undo.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        let path = built?;
        Ok((meta, frontier, path))
    }

    /// Takes a snapshot's point between two applies, and has apply keep undo from then on.
    pub(crate) async fn snapshot_point(&self) -> io::Result<(SnapshotMeta<NodeId, Node>, Frontier)> {
        let _guard = self.lock.lock().await;
        let last = self.view.last_applied()?;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: self.membership()?,
            snapshot_id: format!("{}-{}", last.map_or(0, |l| l.index), last.map_or(0, |l| l.leader_id.term)),
        };
        *self.undo.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(BTreeMap::new());
        Ok((meta, self.view.frontier()?))
    }

    /// A stored record with its body inline.
    pub(crate) fn inlined(&self, stored: &[u8]) -> io::Result<Vec<u8>> {
        let mut rec: StoredRecord = decode(stored)?;
        if let BodyAt::Log { .. } = rec.body {
            rec.body = BodyAt::Inline(self.view.body(rec.body)?);
        }
        encode(&rec)
    }

    /// The state at `m`'s point into a snapshot file, recorded as the current snapshot.
    pub(crate) fn write_snapshot(&self, m: &SnapshotMeta<NodeId, Node>, frontier: &Frontier) -> io::Result<PathBuf> {
        let path =
            self.stream_snapshot(crate::snapshot::Writer::create(&self.view.snap_dir, m)?, frontier)?.finish()?;
        let mut wb = WriteBatch::default();
        let file = crate::snapshot::file_name(m);
        wb.put(META_SNAPSHOT.to_vec(), encode(&StoredSnapshot { meta: m.clone(), file })?);
        let kv = self.view.kv.as_ref();
        kv.apply(wb)?;
        kv.flush()?;
        self.remove_stale_files()?;
        Ok(path)
    }

    /// The state at the point `frontier` belongs to into `w` (still to be sealed).
    fn stream_snapshot<W: io::Write>(
        &self,
        mut w: crate::snapshot::Writer<W>,
        frontier: &Frontier,
    ) -> io::Result<crate::snapshot::Writer<W>> {
        let kv = self.view.kv.as_ref();
        let undo = || self.undo.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut taken = BTreeSet::new();
        for entry in kv.scan_prefix_shared(b"") {
            let (k, v) = entry?;
            if k.starts_with(b"m/") || (append_only(&k) && !within(&k, frontier.size)) {
                continue;
            }
            // Read after the value: apply keeps the undo before it writes, so a value read
            // after a change always finds that change's undo here.
            let before = if append_only(&k) { None } else { undo().as_ref().and_then(|u| u.get(&k).cloned()) };
            match before {
                // A snapshot is self-contained: a follower installing it has none of the
                // log entries holding the bodies.
                None if k.first() == Some(&b'r') => w.record(&k, &self.inlined((*v).as_ref())?)?,
                None => w.record(&k, (*v).as_ref())?,
                Some(Some(old)) => {
                    w.record(&k, &old)?;
                    taken.insert(k);
                }
                Some(None) => {} // created after the point
            }
        }
        // Keys deleted after the point before the scan reached them. A key changed only after
        // the scan passed it comes again with the same value, which loads the same.
        let missed: Vec<(Vec<u8>, Vec<u8>)> = undo()
            .iter()
            .flatten()
            .filter(|(k, _)| !taken.contains(*k))
            .filter_map(|(k, old)| old.clone().map(|o| (k.clone(), o)))
            .collect();
        for (k, old) in missed {
            w.record(&k, &old)?;
        }
        // The frontier is state too (not a snapshot-meta key): keep it.
        w.record(META_FRONTIER, &encode(frontier)?)?;
        Ok(w)
    }
}
