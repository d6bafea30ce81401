//! The Raft log over a [`KvStore`]: entries under big-endian indexes, plus vote, committed
//! and last-purged ids. `append` reports completion only after an fsync.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};

use crate::kv::{be, KvStore, WriteBatch};
use crate::{NodeId, TypeConfig};

const VOTE: &[u8] = b"m/vote";
const COMMITTED: &[u8] = b"m/committed";
const PURGED: &[u8] = b"m/purged";
const ENTRY: u8 = b'e';

fn entry_key(index: u64) -> Vec<u8> {
    let mut k = vec![ENTRY];
    k.extend_from_slice(&be(index));
    k
}

fn rerr(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read_logs(&io::Error::other(e.to_string())).into()
}
fn werr(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(&io::Error::other(e.to_string())).into()
}

#[derive(Clone, Debug)]
pub struct LogStore {
    kv: Arc<dyn KvStore>,
    /// Vote, committed and purged ids live apart from the entries: sled rewrites a whole node
    /// on update, and the node holding the newest (large) entries is the last place for them.
    meta: Arc<dyn KvStore>,
}

impl LogStore {
    pub fn new(kv: Arc<dyn KvStore>, meta: Arc<dyn KvStore>) -> Self {
        Self { kv, meta }
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

    async fn flush(&self) -> Result<(), StorageError<NodeId>> {
        let kv = self.kv.clone();
        tokio::task::spawn_blocking(move || kv.flush()).await.map_err(werr)?.map_err(werr)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => entry_key(x.saturating_add(1)),
            Bound::Excluded(x) => entry_key(*x),
            Bound::Unbounded => vec![ENTRY + 1],
        };
        let mut out = Vec::new();
        for kv in self.kv.range(&entry_key(start), &end, false) {
            let (_, v) = kv.map_err(rerr)?;
            out.push(bincode::deserialize(&v).map_err(rerr)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id = self.get_meta::<Option<LogId<NodeId>>>(PURGED)?.flatten();
        let last = match self.kv.last_with_prefix(&[ENTRY]).map_err(rerr)? {
            Some((_, v)) => Some(bincode::deserialize::<Entry<TypeConfig>>(&v).map_err(rerr)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(VOTE, vote)?;
        // A vote must be durable before it is acted on, or a node could vote twice in a term.
        self.flush().await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(VOTE)
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
        let mut wb = WriteBatch::default();
        for entry in entries {
            let size = bincode::serialized_size(&entry).map_err(werr)?;
            let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            bincode::serialize_into(&mut bytes, &entry).map_err(werr)?;
            wb.put(entry_key(entry.log_id.index), bytes);
        }
        self.kv.apply(wb).map_err(werr)?;
        // Durability point of the whole system: entries are fsynced before openraft is told
        // they are persisted, so nothing is acknowledged that a crash could lose.
        let res = self.flush().await;
        callback.log_io_completed(res.as_ref().copied().map_err(|e| io::Error::other(e.to_string())));
        res
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut wb = WriteBatch::default();
        for kv in self.kv.range(&entry_key(log_id.index), &[ENTRY + 1], false) {
            wb.delete(kv.map_err(rerr)?.0);
        }
        self.kv.apply(wb).map_err(werr)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(PURGED, &Some(log_id))?;
        let mut wb = WriteBatch::default();
        for kv in self.kv.range(&entry_key(0), &entry_key(log_id.index.saturating_add(1)), false) {
            wb.delete(kv.map_err(rerr)?.0);
        }
        self.kv.apply(wb).map_err(werr)
    }
}
