//! The search index's own store: one keyspace of a fjall LSM tree under the node's
//! `local/search` directory.
//!
//! Why not the state's sled: a resource adds some forty small keys at random places (postings,
//! buckets, its document), and sled answered that with page rewrites, node clones and cache
//! churn that took most of ingest's time and fell behind at a million resources. An LSM tree
//! appends them to a journal and sorts them in the background.
//!
//! Crash safety: each batch reaches the operating system's cache before `apply` returns (a
//! killed process loses nothing), and the first leaf not folded in is written in the same batch
//! as what folding it changed, so after a power loss the index is some earlier fold, complete,
//! and folds on from there. The index may be ahead of the state after a crash (sled writes the
//! state lazily): the state then replays those same entries from the Raft log, producing the
//! same leaves, before a linearized search reads them.

use std::path::Path;

use consensus::WriteBatch;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};

/// Journals kept before memtables are flushed: bounds what a restart replays.
const MAX_JOURNAL: u64 = 64 << 20;
/// One memtable's size before it is written out as a sorted table.
const MEMTABLE: u64 = 16 << 20;

pub struct Tree {
    db: Database,
    ks: Keyspace,
}

pub type Kv = (Vec<u8>, Vec<u8>);

fn err(e: &fjall::Error) -> std::io::Error {
    std::io::Error::other(format!("search index store: {e}"))
}

impl Tree {
    /// Opens (or creates) the store in `dir` with a block cache of `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let db = Database::builder(dir)
            .cache_size(cache_bytes)
            .max_journaling_size(MAX_JOURNAL)
            // One worker: with two, fjall 3.1's first worker hands every compaction request
            // back to the queue and takes it again, spinning a core while the other compacts.
            .worker_threads(1)
            .open()
            .map_err(|e| err(&e))?;
        let ks = db
            .keyspace("index", || KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE))
            .map_err(|e| err(&e))?;
        Ok(Self { db, ks })
    }

    pub fn get(&self, key: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.ks.get(key).map_err(|e| err(&e))?.map(|v| v.to_vec()))
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(&'a self, prefix: &[u8]) -> impl Iterator<Item = std::io::Result<Kv>> + 'a {
        self.ks.prefix(prefix).map(pair)
    }

    /// Entries in `[from, to)`, in key order.
    pub fn range<'a>(&'a self, from: &[u8], to: &[u8]) -> impl Iterator<Item = std::io::Result<Kv>> + 'a {
        self.ks.range(from.to_vec()..to.to_vec()).map(pair)
    }

    /// Applies `batch` atomically.
    pub fn apply(&self, batch: WriteBatch) -> std::io::Result<()> {
        let mut b = self.db.batch();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(&self.ks, k, v),
                None => b.remove(&self.ks, k),
            }
        }
        b.commit().map_err(|e| err(&e))
    }

    /// Removes every entry.
    pub fn clear(&self) -> std::io::Result<()> {
        self.ks.clear().map_err(|e| err(&e))
    }
}

fn pair(g: fjall::Guard) -> std::io::Result<Kv> {
    let (k, v) = g.into_inner().map_err(|e| err(&e))?;
    Ok((k.to_vec(), v.to_vec()))
}
