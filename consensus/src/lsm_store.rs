//! The only module that imports fjall: an LSM tree (journal, memtables, sorted tables merged
//! in the background) behind [`KvStore`], for data written at random places that can be derived
//! again from the ledger. Two stores use it: the state's lookup tables (current records and
//! conditional postings, `state_machine`) and the search index (`local/search`, the server's).
//!
//! Why not sled: a resource adds small keys at random places (its id, its postings), and sled
//! answered each with a copy of the node it lands in, writing and later recovering several
//! times the live data. An LSM tree appends them to a journal and sorts them in the background.
//!
//! Crash safety: each batch reaches the operating system's cache before `apply` returns (a
//! killed process loses nothing); a power loss loses a suffix of batches, never part of one.
//! Each user writes its own watermark in the same batch as what it changed, and catches up
//! from the ledger (or steps back) at open.

use std::path::Path;

use crate::kv::{KvIter, KvStore, WriteBatch};
use fjall::{Database, Keyspace, KeyspaceCreateOptions};

/// Journals kept before memtables are flushed: bounds what a restart replays.
const MAX_JOURNAL: u64 = 64 << 20;
/// The bytes written into one memtable before it is sealed and written out as a sorted table.
const MEMTABLE: u64 = 16 << 20;

/// Sealed memtables at which fjall 3.1 halts a writer after its commit (hard-coded there).
const SEALED_HALT: usize = 4;

/// The version of the keyspace options below, part of the keyspace's name: fjall keeps the
/// options a keyspace was created with, so a keyspace of older options is dropped at open
/// and its user folds it again from the ledger (both users can).
const OPTIONS: u32 = 2;

/// One keyspace of a fjall database, with its own journal and block cache.
pub struct Tree {
    db: Database,
    ks: Keyspace,
    /// Names the store in errors.
    name: &'static str,
    /// Bytes written since the memtable was last sealed here (see [`Tree::apply`]).
    unsealed: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lsm_store::Tree({})", self.name)
    }
}

/// A key and its value.
pub type Kv = (Vec<u8>, Vec<u8>);

/// Options of a new keyspace ([`OPTIONS`] names their version).
///
/// Filters and block indexes are cut into partitions in every level below L0 (fjall does so
/// from L3 on): a point read then loads a few KiB of each, where a whole table's filter or
/// index is megabytes. On a store larger than its block cache those whole blocks were evicted
/// and read and checksummed again and again (issue 17: `_include` p95 7 -> 110 ms at 10x with
/// `--cache-mb 256`).
fn options(reads: PointReads) -> KeyspaceCreateOptions {
    use fjall::config::PartitioningPolicy as Partitioned;
    KeyspaceCreateOptions::default()
        .max_memtable_size(MEMTABLE)
        .filter_block_partitioning_policy(Partitioned::new([false, true]))
        .index_block_partitioning_policy(Partitioned::new([false, true]))
        .expect_point_read_hits(reads == PointReads::Hit)
}

/// What a store's point reads find, which decides where its tables carry Bloom filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointReads {
    /// Often nothing (the id a create is about to take): filters in every level spare those
    /// reads the tables' blocks.
    MayMiss,
    /// Nearly always a record (a document a posting names): the last level, which holds most
    /// keys, has no filter, so a compaction into it hashes no key for one. A filter only
    /// answers "absent", which these reads never hear (issue 17: filters were an eighth of the
    /// search index's compaction time).
    Hit,
}

fn err(name: &str, e: &fjall::Error) -> std::io::Error {
    std::io::Error::other(format!("store {name:?}: {e}"))
}

impl Tree {
    /// Opens (or creates) the store in `dir`, its keyspace `name`, with a block cache of
    /// `cache_bytes`, for point reads that may find nothing.
    pub fn open(dir: &Path, name: &'static str, cache_bytes: u64) -> std::io::Result<Self> {
        Self::open_for(dir, name, cache_bytes, PointReads::MayMiss)
    }

    /// [`Tree::open`] for point reads that find what `reads` says.
    pub fn open_for(dir: &Path, name: &'static str, cache_bytes: u64, reads: PointReads) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let db = Database::builder(dir)
            .cache_size(cache_bytes)
            .max_journaling_size(MAX_JOURNAL)
            // One worker: with two, fjall 3.1's first worker hands every compaction request
            // back to the queue and takes it again, spinning a core while the other compacts.
            .worker_threads(1)
            .open()
            .map_err(|e| err(name, &e))?;
        let named = match reads {
            PointReads::MayMiss => format!("{name}.{OPTIONS}"),
            PointReads::Hit => format!("{name}.{OPTIONS}.hits"),
        };
        for old in db.list_keyspace_names() {
            if *old != *named {
                let stale = db.keyspace(&old, KeyspaceCreateOptions::default).map_err(|e| err(name, &e))?;
                db.delete_keyspace(stale).map_err(|e| err(name, &e))?;
            }
        }
        let ks = db.keyspace(&named, || options(reads)).map_err(|e| err(name, &e))?;
        Ok(Self { db, ks, name, unsealed: std::sync::atomic::AtomicU64::new(0) })
    }

    /// The value under `key`.
    pub fn get(&self, key: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        Ok(self.ks.get(key).map_err(|e| err(self.name, &e))?.map(|v| v.to_vec()))
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix<'a>(&'a self, prefix: &[u8]) -> impl Iterator<Item = std::io::Result<Kv>> + 'a {
        self.ks.prefix(prefix).map(|g| pair(self.name, g))
    }

    /// Entries in `[from, to)`, in key order.
    pub fn range<'a>(&'a self, from: &[u8], to: &[u8]) -> impl Iterator<Item = std::io::Result<Kv>> + 'a {
        self.ks.range(from.to_vec()..to.to_vec()).map(|g| pair(self.name, g))
    }

    /// Applies `batch` atomically.
    ///
    /// The memtable is sealed here, in the writer's thread, once [`MEMTABLE`] bytes went into
    /// it. fjall asks its one worker to do that, and the request waits behind a running
    /// compaction (seconds on a large store) while the memtable grows without bound (600 MB
    /// of index writes were seen waiting). Sealed here, four memtables waiting for their flush
    /// make fjall hold the writer instead, so memory stays bounded whatever the store's size.
    pub fn apply(&self, batch: WriteBatch) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut b = self.db.batch();
        let mut bytes = 0;
        // Into the memtable in key order (a stable sort: a key written twice keeps its last
        // value): each skip-list search then walks down near the one before, in cache,
        // where a batch's postings in document order land at random places.
        let mut ops = batch.ops;
        ops.sort_by(|x, y| x.0.cmp(&y.0));
        for (k, v) in ops {
            bytes += (k.len() + v.as_ref().map_or(0, Vec::len)) as u64;
            match v {
                Some(v) => b.insert(&self.ks, k, v),
                None => b.remove(&self.ks, k),
            }
        }
        b.commit().map_err(|e| err(self.name, &e))?;
        if self.unsealed.fetch_add(bytes, Relaxed) + bytes >= MEMTABLE {
            self.unsealed.store(0, Relaxed);
            self.ks.rotate_memtable().map_err(|e| err(self.name, &e))?;
        }
        Ok(())
    }

    /// Waits while the next commit would be held by fjall's backpressure (its
    /// `local_backpressure`: [`SEALED_HALT`] sealed memtables waiting for the flush worker,
    /// which stays behind a compaction of seconds on a large store). fjall holds the writer
    /// *after* its commit, inside whatever locks the caller holds; a caller that waits here
    /// first holds none of them meanwhile.
    pub fn wait_for_room(&self) {
        while self.ks.sealed_memtable_count() >= SEALED_HALT {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Removes every entry.
    pub fn clear(&self) -> std::io::Result<()> {
        self.ks.clear().map_err(|e| err(self.name, &e))
    }
}

fn pair(name: &str, g: fjall::Guard) -> std::io::Result<Kv> {
    let (k, v) = g.into_inner().map_err(|e| err(name, &e))?;
    Ok((k.to_vec(), v.to_vec()))
}

impl KvStore for Tree {
    fn get(&self, key: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
        Tree::get(self, key)
    }
    fn scan_prefix(&self, prefix: &[u8]) -> KvIter<'_> {
        Box::new(Tree::scan_prefix(self, prefix))
    }
    fn range(&self, from: &[u8], to: &[u8], rev: bool) -> KvIter<'_> {
        if rev {
            Box::new(self.ks.range(from.to_vec()..to.to_vec()).rev().map(|g| pair(self.name, g)))
        } else {
            Box::new(Tree::range(self, from, to))
        }
    }
    fn apply(&self, batch: WriteBatch) -> std::io::Result<()> {
        Tree::apply(self, batch)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.db.persist(fjall::PersistMode::SyncAll).map_err(|e| err(self.name, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keyspace_of_older_options_is_dropped_and_a_current_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What a data directory before OPTIONS 2 holds: the keyspace under its bare name.
            let db = Database::builder(dir.path()).open().unwrap();
            let ks = db.keyspace("test", KeyspaceCreateOptions::default).unwrap();
            ks.insert(b"old", b"1").unwrap();
            db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        {
            let tree = Tree::open(dir.path(), "test", 1 << 20).unwrap();
            assert_eq!(tree.get(b"old").unwrap(), None, "written under older options: folded again instead");
            let mut b = WriteBatch::default();
            b.put(b"new".to_vec(), b"2".to_vec());
            tree.apply(b).unwrap();
            tree.flush().unwrap();
        }
        let tree = Tree::open(dir.path(), "test", 1 << 20).unwrap();
        assert_eq!(tree.get(b"new").unwrap().as_deref(), Some(&b"2"[..]), "a current keyspace survives a reopen");
        assert_eq!(tree.db.list_keyspace_names().len(), 1, "the old keyspace is gone, not kept beside");
    }

    #[test]
    fn a_store_opened_for_other_point_reads_starts_empty_and_then_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let put = |tree: &Tree, k: &[u8]| {
            let mut b = WriteBatch::default();
            b.put(k.to_vec(), b"v".to_vec());
            tree.apply(b).unwrap();
            tree.flush().unwrap();
        };
        {
            let tree = Tree::open(dir.path(), "test", 1 << 20).unwrap();
            put(&tree, b"filtered");
        }
        {
            // Tables of the other policy are dropped: their user folds them again.
            let tree = Tree::open_for(dir.path(), "test", 1 << 20, PointReads::Hit).unwrap();
            assert_eq!(tree.get(b"filtered").unwrap(), None);
            put(&tree, b"unfiltered");
        }
        let tree = Tree::open_for(dir.path(), "test", 1 << 20, PointReads::Hit).unwrap();
        assert_eq!(tree.get(b"unfiltered").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(tree.get(b"absent").unwrap(), None, "a miss without a filter is still a miss");
        assert_eq!(tree.db.list_keyspace_names().len(), 1);
    }

    #[test]
    fn a_batch_applies_in_order_though_its_keys_go_in_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let tree = Tree::open(dir.path(), "test", 1 << 20).unwrap();
        let mut b = WriteBatch::default();
        b.put(b"z".to_vec(), b"1".to_vec());
        b.put(b"k".to_vec(), b"first".to_vec());
        b.delete(b"k".to_vec());
        b.put(b"k".to_vec(), b"last".to_vec());
        b.put(b"a".to_vec(), b"kept".to_vec());
        b.put(b"gone".to_vec(), b"x".to_vec());
        b.delete(b"gone".to_vec());
        tree.apply(b).unwrap();
        assert_eq!(tree.get(b"k").unwrap().as_deref(), Some(&b"last"[..]), "the last write of a key wins");
        assert_eq!(tree.get(b"gone").unwrap(), None, "a put then a delete leaves nothing");
        let keys: Vec<Vec<u8>> = tree.range(b"", b"\xff").map(|kv| kv.unwrap().0).collect();
        assert_eq!(keys, vec![b"a".to_vec(), b"k".to_vec(), b"z".to_vec()]);
    }
}
