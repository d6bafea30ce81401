//! Replicates opaque, signed, versioned ledger commands with openraft and applies them
//! deterministically to a store that keeps resource versions, index postings and an RFC 9162
//! Merkle log.
//!
//! Architecture invariant: this crate knows nothing of HTTP, FHIR JSON or SMART. It sees
//! resource types and ids as strings, bodies as ciphertext and index terms as 32-byte digests.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
//! let ledger = consensus::Ledger::open_single(std::path::Path::new("./data/ledger"), 1, key, "127.0.0.1:8080", None).await?;
//! let view = ledger.view(); // read the applied state
//! # Ok(()) }
//! ```

// openraft's `StorageError` is large by design; boxing it at every call would only add noise.
#![allow(clippy::result_large_err)]

pub mod audit;
pub mod bench;
pub mod command;
pub mod kv;
pub mod log_store;
pub mod merkle;
mod network;
pub mod proof;
mod proposer;
pub mod sled_store;
pub mod state_machine;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

pub use command::{Command, Op, Outcome, Precondition, Write};
pub use proposer::{ProposeError, Proposer};
pub use state_machine::{CurrentRecord, HistoryRecord, LeafHeader, StateView, VersionRecord};

pub type NodeId = u64;

/// A cluster member as the committed membership lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub api_addr: String,
    pub raft_addr: String,
    /// Hex ed25519 public key; batches this node proposes must verify against it.
    pub public_key: String,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (raft {})", self.api_addr, self.raft_addr)
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = command::SignedBatch,
        R = command::BatchOutcome,
        Node = Node,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// A running ledger node: Raft, its stores, and the group-commit proposer.
#[derive(Clone)]
pub struct Ledger {
    pub raft: Raft,
    pub node_id: NodeId,
    view: StateView,
    proposer: Proposer,
}

impl Ledger {
    /// Opens the node's stores under `dir` and starts a one-member cluster, initializing it on
    /// first start. The embedded single-node default.
    ///
    /// `snapshot_every`: build a snapshot of the state and compact the Raft log every that many
    /// entries (None: never). Snapshots are copied whole in memory until the cluster issue
    /// streams them, so this suits small ledgers and the tests that tamper with a snapshot.
    pub async fn open_single(
        dir: &Path,
        node_id: NodeId,
        key: SigningKey,
        api_addr: &str,
        snapshot_every: Option<u64>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let db = sled_store::SledDb::open(dir)?;
        let log = log_store::LogStore::new(db.tree("raft_log")?, db.tree("raft_meta")?);
        let sm = state_machine::StateMachine::new(db.tree("state")?);
        let view = sm.view();
        let config = openraft::Config {
            cluster_name: "fhir-ledger".into(),
            heartbeat_interval: 250,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            // Entries per append; large to let group commit amortize one fsync over many writes.
            max_payload_entries: 1024,
            snapshot_policy: snapshot_every
                .map_or(openraft::SnapshotPolicy::Never, openraft::SnapshotPolicy::LogsSinceLast),
            // One node has no follower to catch up from the log: compact everything snapshotted.
            max_in_snapshot_log_to_keep: 0,
            ..Default::default()
        };
        let config = Arc::new(config.validate()?);
        let raft = openraft::Raft::new(node_id, config, network::Unconnected, log, sm).await?;
        if !raft.is_initialized().await? {
            let me = Node {
                api_addr: api_addr.to_string(),
                raft_addr: String::new(),
                public_key: hex(key.verifying_key().as_bytes()),
            };
            raft.initialize(BTreeMap::from([(node_id, me)])).await?;
        }
        raft.wait(Some(std::time::Duration::from_secs(30)))
            .state(openraft::ServerState::Leader, "single node becomes leader")
            .await?;
        let proposer = Proposer::start(raft.clone(), node_id, key);
        Ok(Self { raft, node_id, view, proposer })
    }

    pub fn view(&self) -> StateView {
        self.view.clone()
    }

    /// Proposes one command (group-committed with concurrent ones) and waits until it is
    /// applied; the outcome says whether its preconditions held.
    pub async fn submit(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        self.proposer.submit(cmd).await
    }

    /// Waits until this node's state reflects every write committed before the call
    /// (openraft read-index), so a read is linearizable.
    pub async fn linearize(&self) -> Result<(), ProposeError> {
        self.raft.ensure_linearizable().await.map(|_| ()).map_err(|e| ProposeError::Unavailable(e.to_string()))
    }

    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
