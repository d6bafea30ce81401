//! Raw access to the store and the transport for the root crate's integration tests, behind
//! the `test-hooks` feature (a dev-dependency feature; never enabled in a build that ships).
//! The tamper tests rewrite stored values as an attacker with write access to the disk would;
//! the transport tests speak the inter-node protocol directly to check that forged and
//! replayed frames are refused. Not API: anything here may change with the internals.

pub use crate::kv::{KvStore, WriteBatch};
pub use crate::raft_types::TypeConfig;
pub use crate::sled_store::SledDb;
pub use crate::state_machine::{BodyAt, StoredRecord};
pub use crate::transport::client::Conn;
pub use crate::transport::{Reply, Rpc, Shared};
/// The openraft the transport's messages are made of (to build one by hand).
pub use openraft;

/// Rewrites the payload of the last record of the Raft log under `ledger` (a ledger directory)
/// with `change`, recomputing the record's checksums as an attacker who knows the format
/// would: only the batch signature can tell. Returns the record's index.
pub fn rewrite_last_log_record(ledger: &std::path::Path, change: impl FnOnce(&mut Vec<u8>)) -> std::io::Result<u64> {
    crate::segment_log::rewrite_last(&ledger.join(crate::log_store::DIR), change)
}
