//! The Raft log: entries in segment files of our own ([`SegmentLog`]: checksummed records,
//! group fsync, a torn final write cut off and any other damage refused at open), and vote,
//! committed and last-purged ids in a small [`KvStore`]. `append` reports completion only
//! after an fsync.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};

use crate::kv::{KvStore, WriteBatch};
use crate::segment_log::SegmentLog;
use crate::{NodeId, TypeConfig};

const VOTE: &[u8] = b"m/vote";
const COMMITTED: &[u8] = b"m/committed";
const PURGED: &[u8] = b"m/purged";
/// The log's directory inside the ledger directory.
pub(crate) const DIR: &str = "raft-log";
/// Segments rotate past this size, so purging after a snapshot frees whole files.
const SEGMENT_BYTES: u64 = 64 << 20;

fn rerr(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_logs(&io::Error::other(e.to_string())).into()
}
fn werr(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(&io::Error::other(e.to_string())).into()
}

/// Reads version bodies where the state references them: in the Raft log entry that wrote
/// them (bodies are written once, issue 17). Shared by the log, which keeps every segment
/// holding such a body, and the state machine, which says from which entry on it references
/// the log (`from`: entries before it came with an installed snapshot, inline).
#[derive(Clone)]
pub(crate) struct Bodies {
    log: Arc<Mutex<SegmentLog>>,
    from: Arc<AtomicU64>,
    /// The entries appended and not yet applied (see [`Recent`]).
    recent: Recent,
}

impl Debug for Bodies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bodies").field("from", &self.from.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Bodies {
    /// Over a log opened for reading only (the offline verifier).
    pub(crate) fn of(log: SegmentLog) -> Self {
        Self { log: Arc::new(Mutex::new(log)), from: Arc::default(), recent: Recent::default() }
    }

    fn log(&self) -> std::sync::MutexGuard<'_, SegmentLog> {
        self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `len` bytes from `offset` of entry `index`'s encoding. The log's lock is held only to
    /// find the file; the read is outside it.
    pub(crate) fn read(&self, index: u64, offset: u32, len: u32) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_into(index, offset, len, &mut buf)?;
        Ok(buf)
    }

    /// [`Bodies::read`] into `buf`, whose capacity is reused.
    pub(crate) fn read_into(&self, index: u64, offset: u32, len: u32, buf: &mut Vec<u8>) -> io::Result<()> {
        let at = self.log().locate(index);
        let at = at.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("raft log entry {index}, which holds a body, is missing"),
            )
        })?;
        at.read_into(offset, len, buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("raft log entry {index}: {e}")))
    }

    /// Appends an entry's encoding as openraft would have before applying it (tests and
    /// benchmarks of the state machine, which apply without a Raft).
    #[cfg(any(test, feature = "bench"))]
    pub(crate) fn append(&self, entry: &Entry<TypeConfig>) -> io::Result<()> {
        let mut log = self.log();
        if log.last_index().is_none_or(|last| entry.log_id.index > last) {
            let bytes = bincode::serialize(entry).map_err(io::Error::other)?;
            log.append(entry.log_id.index, &bytes).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Makes the appends durable.
    #[cfg(feature = "bench")]
    pub(crate) fn sync(&self) -> io::Result<()> {
        let pending = self.log().pending_sync();
        pending.run().map_err(io::Error::other)
    }

    /// Entries up to `index` are applied: the log no longer keeps them in memory.
    pub(crate) fn applied(&self, index: u64) {
        self.recent.drop_through(index);
    }

    /// The indexes of the entries the log holds (compacted ones included).
    pub(crate) fn indexes(&self) -> std::ops::Range<u64> {
        let log = self.log();
        log.first_index()..log.next_index()
    }

    /// Entry `index`'s encoding, if the log holds it (read outside the lock, like a body).
    pub(crate) fn entry(&self, index: u64) -> io::Result<Option<Vec<u8>>> {
        let at = self.log().locate(index);
        at.map(|at| at.read(0, at.size())).transpose().map_err(io::Error::other)
    }

    /// [`Bodies::entry`] into the front of `buf` (see [`crate::segment_log::Located::read_front`]):
    /// its length, or None if the log does not hold it.
    pub(crate) fn entry_into(&self, index: u64, buf: &mut Vec<u8>) -> io::Result<Option<usize>> {
        let Some(at) = self.log().locate(index) else { return Ok(None) };
        at.read_front(buf).map(Some).map_err(io::Error::other)
    }

    /// The length of the longest entry's encoding.
    pub(crate) fn largest_entry(&self) -> usize {
        self.log().largest() as usize
    }

    /// The first entry whose bodies the state references in place.
    pub(crate) fn referenced_from(&self) -> u64 {
        self.from.load(Ordering::Acquire)
    }

    pub(crate) fn set_referenced_from(&self, index: u64) {
        self.from.store(index, Ordering::Release);
    }
}

#[derive(Clone)]
pub struct LogStore {
    /// The entries, shared with the state machine's body reads; also says which segments
    /// purging must keep.
    bodies: Bodies,
    meta: Arc<dyn KvStore>,
    /// The first index not purged: purging keeps whole segments, so entries below it may
    /// still be in a file, but they are no longer part of the log.
    readable_from: Arc<AtomicU64>,
    /// Whether a stored leadership may be resumed at start-up (see [`LogStore::no_resumed_leadership`]).
    resume_leadership: bool,
}

/// Payload bytes of the entries [`Recent`] keeps.
const RECENT_BYTES: usize = 64 << 20;

/// The entries appended and not yet applied, kept so that apply and replication, which read
/// an entry right after it is appended, neither read back nor decode again the megabytes just
/// written (a payload is shared, not copied). Consecutive indexes only; bounded by payload
/// bytes, oldest dropped first; an entry larger than the bound is not kept; apply drops what
/// it applied (a follower lagging behind reads those from the files). A pure cache: every
/// entry in it is, byte for byte, the one the log holds at its index (truncation drops it
/// here too).
#[derive(Clone, Default)]
struct Recent(Arc<Mutex<RecentEntries>>);

#[derive(Default)]
struct RecentEntries {
    entries: std::collections::VecDeque<Entry<TypeConfig>>,
    bytes: usize,
}

fn weight(entry: &Entry<TypeConfig>) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(signed) => signed.payload.len() + signed.signature.len(),
        _ => 0,
    }
}

impl Recent {
    fn lock(&self) -> std::sync::MutexGuard<'_, RecentEntries> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, entry: Entry<TypeConfig>) {
        let mut r = self.lock();
        if r.entries.back().is_some_and(|last| last.log_id.index + 1 != entry.log_id.index) {
            r.entries.clear();
            r.bytes = 0;
        }
        r.bytes += weight(&entry);
        r.entries.push_back(entry);
        while r.bytes > RECENT_BYTES {
            let Some(first) = r.entries.pop_front() else { break };
            r.bytes -= weight(&first);
        }
    }

    fn get(&self, index: u64) -> Option<Entry<TypeConfig>> {
        let r = self.lock();
        let first = r.entries.front()?.log_id.index;
        r.entries.get(usize::try_from(index.checked_sub(first)?).ok()?).cloned()
    }

    /// Forgets the entries up to `index` (applied).
    fn drop_through(&self, index: u64) {
        let mut r = self.lock();
        while let Some(first) = r.entries.pop_front_if(|e| e.log_id.index <= index) {
            r.bytes -= weight(&first);
        }
    }

    /// Forgets the entries from `index` on (the log truncated them).
    fn truncate(&self, index: u64) {
        let mut r = self.lock();
        while let Some(last) = r.entries.pop_back_if(|e| e.log_id.index >= index) {
            r.bytes -= weight(&last);
        }
    }
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

/// Opens the entries in `dir`, refusing a damaged log.
pub fn open_segments(dir: &Path) -> Result<SegmentLog, crate::segment_log::Error> {
    SegmentLog::open(dir, SEGMENT_BYTES)
}

impl LogStore {
    /// The store over `segments` (see [`open_segments`]) and the ids in `meta`.
    pub fn open(segments: SegmentLog, meta: Arc<dyn KvStore>) -> anyhow::Result<Self> {
        let mut store =
            Self { bodies: Bodies::of(segments), meta, readable_from: Arc::default(), resume_leadership: true };
        let purged = store.get_meta::<Option<LogId<NodeId>>>(PURGED)?.flatten();
        store.readable_from = Arc::new(AtomicU64::new(purged.map_or(0, |p| p.index + 1)));
        Ok(store)
    }

    /// A node restarted from this store must win an election before it leads again.
    ///
    /// openraft 0.9 restores a node whose stored vote is its own committed leadership as leader
    /// of that term at once, and a leader's read index is max(its first entry of the term, its
    /// commit index). After a crash both can be behind what it committed before: the commit
    /// index is not flushed (`save_committed`), nor is the applied state, only the log is. The
    /// restored leader then confirms its leadership with a quorum (the followers still hold
    /// its term) and grants read indexes below entries that followers have already served
    /// (issue 17, the stale read after failover). Forgetting that the vote was granted keeps
    /// the term and whom this node voted for, so it still votes for no one else in the term;
    /// only the claim to lead is dropped. A new leadership appends a blank entry of its own
    /// term and commits it before it serves a read, which covers everything committed before.
    pub fn no_resumed_leadership(mut self) -> Self {
        self.resume_leadership = false;
        self
    }

    fn log(&self) -> std::sync::MutexGuard<'_, SegmentLog> {
        self.bodies.log()
    }

    fn get_meta<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, StorageError<NodeId>> {
        match self.meta.get(key).map_err(rerr)? {
            Some(b) => Ok(Some(bincode::deserialize(&b).map_err(rerr)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError<NodeId>> {
        let mut wb = WriteBatch::default();
        wb.put(key.to_vec(), bincode::serialize(v).map_err(werr)?);
        self.meta.apply(wb).map_err(werr)
    }

    async fn flush_meta(&self) -> Result<(), StorageError<NodeId>> {
        let kv = self.meta.clone();
        tokio::task::spawn_blocking(move || kv.flush()).await.map_err(werr)?.map_err(werr)
    }

    fn entry(&self, index: u64) -> Result<Option<Entry<TypeConfig>>, StorageError<NodeId>> {
        match self.bodies.entry(index).map_err(rerr)? {
            Some(bytes) => Ok(Some(bincode::deserialize(&bytes).map_err(rerr)?)),
            None => Ok(None),
        }
    }

    /// Reads bodies where the state references them in this log.
    pub(crate) fn bodies(&self) -> Bodies {
        self.bodies.clone()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (first, next) = {
            let log = self.log();
            (log.first_index(), log.next_index())
        };
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(first)
        .max(self.readable_from.load(Ordering::Acquire));
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => next,
        }
        .min(next);
        let mut out = Vec::new();
        for i in start..end {
            if let Some(e) = self.bodies.recent.get(i) {
                out.push(e);
            } else if let Some(e) = self.entry(i)? {
                out.push(e);
            }
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id = self.get_meta::<Option<LogId<NodeId>>>(PURGED)?.flatten();
        let last_index = self.log().last_index();
        let last = match last_index {
            Some(i) => self.entry(i)?.map(|e| e.log_id),
            None => None,
        };
        // Purging keeps whole segments, so entries at or below the purged id may remain.
        let last = match (last, last_purged_log_id) {
            (Some(l), Some(p)) if l.index <= p.index => Some(p),
            (None, p) => p,
            (l, _) => l,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(VOTE, vote)?;
        // A vote must be durable before it is acted on, or a node could vote twice in a term.
        self.flush_meta().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        // openraft reads the vote only at start-up.
        let vote: Option<Vote<NodeId>> = self.get_meta(VOTE)?;
        Ok(vote.map(|mut v| {
            v.committed &= self.resume_leadership;
            v
        }))
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Not flushed: losing it only means re-deriving the commit index from a quorum.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Vec::new();
        let mut appended = Vec::new();
        for entry in entries {
            batch.push((entry.log_id.index, crate::entry_ref::EntryParts::of(&entry).map_err(werr)?));
            appended.push(entry);
        }
        let entries = self.bodies.log.clone();
        // Durability point of the whole system: entries are fsynced before openraft is told
        // they are persisted, so nothing is acknowledged that a crash could lose.
        let res = tokio::task::spawn_blocking(move || {
            let pending = {
                let mut log = entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for (index, parts) in &batch {
                    log.append_parts(*index, &parts.parts())?;
                }
                log.pending_sync()
            };
            // Outside the lock: reads of bodies and of entries to replicate go on meanwhile.
            pending.run()
        })
        .await
        .map_err(werr)
        .and_then(|r| r.map_err(werr));
        if res.is_ok() {
            // Before openraft learns they are durable, which is when it may apply them.
            for entry in appended {
                self.bodies.recent.push(entry);
            }
        }
        callback.log_io_completed(res.as_ref().copied().map_err(|e| io::Error::other(e.to_string())));
        res
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.bodies.recent.truncate(log_id.index);
        self.log().truncate(log_id.index).map_err(werr)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(PURGED, &Some(log_id))?;
        self.flush_meta().await?;
        self.readable_from.fetch_max(log_id.index + 1, Ordering::AcqRel);
        // Compacted entries leave the log, not the disk, while the state references bodies in
        // them: only segments before the first referenced entry (those an installed snapshot
        // replaced) are deleted.
        match self.bodies.referenced_from().checked_sub(1) {
            Some(before) => self.log().purge(log_id.index.min(before)).map_err(werr),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64, term: u64, payload_bytes: usize) -> Entry<TypeConfig> {
        let signed = crate::command::SignedBatch {
            node_id: 1,
            payload: vec![u8::try_from(term).unwrap(); payload_bytes].into(),
            signature: vec![0; 64],
        };
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, 1), index), payload: EntryPayload::Normal(signed) }
    }

    fn held(r: &Recent) -> Vec<(u64, u64)> {
        r.lock().entries.iter().map(|e| (e.log_id.index, e.log_id.leader_id.term)).collect()
    }

    /// The entries kept in memory are always the ones the log holds at their indexes: a
    /// truncated suffix is forgotten (the entry appended again in its place is the one
    /// served), a gap starts over, applied entries leave, and the bytes stay bounded.
    #[test]
    fn recent_entries_are_what_the_log_holds() {
        let r = Recent::default();
        for i in 1..=5 {
            r.push(entry(i, 1, 100));
        }
        r.truncate(3);
        r.push(entry(3, 2, 100));
        assert_eq!(held(&r), [(1, 1), (2, 1), (3, 2)]);
        assert_eq!(r.get(3).map(|e| e.log_id.leader_id.term), Some(2));
        assert!(r.get(4).is_none() && r.get(0).is_none());
        r.drop_through(2);
        assert_eq!(held(&r), [(3, 2)]);
        assert!(r.get(2).is_none(), "applied entries are read from the files");
        r.push(entry(9, 2, 100));
        assert_eq!(held(&r), [(9, 2)], "after a gap only consecutive entries are kept");
        for i in 10..=14 {
            r.push(entry(i, 2, RECENT_BYTES / 4 - 64)); // with its signature, a quarter of the bound
        }
        assert!(r.lock().bytes <= RECENT_BYTES);
        assert_eq!(held(&r).first(), Some(&(11, 2)), "the oldest go first");
        r.push(entry(15, 2, RECENT_BYTES + 1));
        assert!(held(&r).is_empty(), "an entry larger than the bound is not kept");
    }
}
