//! The only module that imports sled. On-disk format version lives under [`FORMAT_KEY`].

use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::kv::{KvIter, KvStore, SharedIter, SharedValue, WriteBatch};

/// Bumped whenever the byte layout of any tree changes; checked at open. 2: the Raft log
/// moved out of sled into segment files (`raft-log/`). 3: version records reference their
/// bodies in the Raft log instead of holding a copy. 4: current records and postings moved to
/// the lookup store (`split_store`); version records carry their conditional terms.
pub const FORMAT_VERSION: u32 = 5;
const FORMAT_KEY: &[u8] = b"__format_version";

fn io_err(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(e) => e,
        sled::Error::Corruption { at, .. } => {
            io::Error::new(io::ErrorKind::InvalidData, corruption_at(&format!("{at:?}")))
        }
        other => io::Error::other(other.to_string()),
    }
}

/// Where sled found bytes failing its checksum, in file terms. sled does not export its disk
/// pointer type, only its `Debug` form: `Some(Inline(offset))` or `Some(Blob(offset, n))`.
fn corruption_at(pointer: &str) -> String {
    let number = |after: &str| {
        let rest = pointer.split(after).nth(1).unwrap_or_default();
        rest.split(|c: char| !c.is_ascii_digit()).find(|s| !s.is_empty()).unwrap_or("?").to_string()
    };
    if pointer.contains("Blob(") {
        format!("blob file blobs/{} fails its checksum", number(", "))
    } else if pointer.contains("Inline(") {
        format!("bytes at offset {} of the db file fail their checksum", number("Inline("))
    } else {
        "the store fails its own checksum".to_string()
    }
}

/// Whether an error from this store means bytes on disk were changed (as opposed to an I/O
/// failure): for the verifier, tampering or corruption found.
pub fn is_corruption(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData
}

/// A sled database holding the ledger's trees.
#[derive(Clone, Debug)]
pub struct SledDb {
    db: sled::Db,
}

impl SledDb {
    /// Opens (or creates) the database and checks its on-disk format version.
    #[cfg(any(test, feature = "bench"))]
    pub fn open(dir: &Path) -> io::Result<Self> {
        Self::open_with_cache(dir, 512 * 1024 * 1024)
    }

    /// [`SledDb::open`] with a page cache of `cache_bytes`. A one-pass reader (the offline
    /// verifier) wants a small one: a large cache fills with what is never read again, and
    /// every fresh page of it costs a page fault.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> io::Result<Self> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(io_err)?;
        match db.get(FORMAT_KEY).map_err(io_err)? {
            None => {
                db.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes()).map_err(io_err)?;
                db.flush().map_err(io_err)?;
            }
            Some(v) if v.as_ref() == FORMAT_VERSION.to_be_bytes() => {}
            Some(v) if [1u32, 2, 3, 4].iter().any(|old| v.as_ref() == old.to_be_bytes()) => {
                let was = match v.as_ref() {
                    [0, 0, 0, 1] => "1 keeps the Raft log inside sled",
                    [0, 0, 0, 2] => "2 keeps a second copy of every body in the state",
                    [0, 0, 0, 3] => "3 keeps current records and postings in sled",
                    _ => "4 has leaves without a commitment to the plaintext (leaf format 1)",
                };
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: on-disk format {was}; this version keeps bodies once, in the Raft log's \
                         segment files, and its lookup tables beside sled, and its leaves commit to the plaintext (format {FORMAT_VERSION}). Start a new data directory and load the \
                         resources again (README, \"Upgrading\")",
                        dir.display()
                    ),
                ));
            }
            Some(v) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{}: on-disk format {:?} is not the supported version {FORMAT_VERSION}",
                        dir.display(),
                        v.as_ref()
                    ),
                ))
            }
        }
        Ok(Self { db })
    }

    /// Removes the named tree if it exists.
    pub fn drop_tree(&self, name: &str) -> io::Result<()> {
        self.db.drop_tree(name).map(|_| ()).map_err(io_err)
    }

    /// The named tree (created if missing) behind [`KvStore`].
    pub fn tree(&self, name: &str) -> io::Result<Arc<dyn KvStore>> {
        let tree = self.db.open_tree(name).map_err(io_err)?;
        Ok(Arc::new(SledTree { tree, db: self.db.clone() }))
    }
}

#[derive(Debug)]
struct SledTree {
    tree: sled::Tree,
    db: sled::Db,
}

fn map_item(r: sled::Result<(sled::IVec, sled::IVec)>) -> io::Result<(Vec<u8>, Vec<u8>)> {
    r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(io_err)
}

impl KvStore for SledTree {
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        Ok(self.tree.get(key).map_err(io_err)?.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, prefix: &[u8]) -> KvIter<'_> {
        Box::new(self.tree.scan_prefix(prefix).map(map_item))
    }

    fn scan_prefix_shared(&self, prefix: &[u8]) -> SharedIter<'_> {
        Box::new(
            self.tree
                .scan_prefix(prefix)
                .map(|r| r.map(|(k, v)| (k.to_vec(), std::sync::Arc::new(v) as SharedValue)).map_err(io_err)),
        )
    }

    fn range(&self, from: &[u8], to: &[u8], rev: bool) -> KvIter<'_> {
        let it = self.tree.range(from.to_vec()..to.to_vec());
        if rev {
            Box::new(it.rev().map(map_item))
        } else {
            Box::new(it.map(map_item))
        }
    }

    fn apply(&self, batch: WriteBatch) -> io::Result<()> {
        let mut b = sled::Batch::default();
        for (k, v) in batch.ops {
            match v {
                Some(v) => b.insert(k, v),
                None => b.remove(k),
            }
        }
        self.tree.apply_batch(b).map_err(io_err)
    }

    fn flush(&self) -> io::Result<()> {
        // sled flushes the whole database: log and state machine share one write-ahead log.
        self.db.flush().map(|_| ()).map_err(io_err)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn corruption_is_located_in_file_terms() {
        assert_eq!(super::corruption_at("Some(Blob(0, 1020000457))"), "blob file blobs/1020000457 fails its checksum");
        assert_eq!(
            super::corruption_at("Some(Inline(4096))"),
            "bytes at offset 4096 of the db file fail their checksum"
        );
        assert_eq!(super::corruption_at("None"), "the store fails its own checksum");
    }
}
