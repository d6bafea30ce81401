//! The storage boundary: everything in this crate reads and writes through [`KvStore`],
//! so the engine (sled today, see `sled_store`) can be replaced without touching the
//! log store or the state machine.

use std::io;

/// One atomic group of writes: either all of them reach the store or none do.
#[derive(Default, Debug)]
pub struct WriteBatch {
    /// Puts (`Some` value) and deletes (`None`), applied in order.
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteBatch {
    /// Sets `key` to `value`.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }
    /// Removes `key`.
    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }
}

/// What ordered scans yield.
pub type KvIter<'a> = Box<dyn Iterator<Item = io::Result<(Vec<u8>, Vec<u8>)>> + 'a>;

/// A stored value shared rather than copied (the engine's own buffer), for readers that pass
/// megabyte values between threads.
pub type SharedValue = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// What [`KvStore::scan_prefix_shared`] yields.
pub type SharedIter<'a> = Box<dyn Iterator<Item = io::Result<(Vec<u8>, SharedValue)>> + 'a>;

/// An ordered key-value tree. Keys compare as bytes, so big-endian integers sort numerically.
pub trait KvStore: Send + Sync + std::fmt::Debug {
    /// The value under `key`.
    fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>>;
    /// Entries whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> KvIter<'_>;
    /// [`KvStore::scan_prefix`] without copying values out of the engine.
    fn scan_prefix_shared(&self, prefix: &[u8]) -> SharedIter<'_> {
        Box::new(self.scan_prefix(prefix).map(|kv| kv.map(|(k, v)| (k, std::sync::Arc::new(v) as SharedValue))))
    }
    /// Entries in `[from, to)`, in key order (`rev` for descending).
    fn range(&self, from: &[u8], to: &[u8], rev: bool) -> KvIter<'_>;
    /// Applies `batch` atomically.
    fn apply(&self, batch: WriteBatch) -> io::Result<()>;
    /// Makes every write applied so far durable (fsync).
    fn flush(&self) -> io::Result<()>;
}

/// A big-endian key fragment, so that byte order is numeric order.
pub fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn read_be(bytes: &[u8]) -> Option<u64> {
    let arr: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(arr))
}
