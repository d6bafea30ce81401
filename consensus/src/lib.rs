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
#![deny(missing_docs)]

pub mod audit;
pub mod background;
pub mod backup;
#[cfg(feature = "bench")]
pub mod bench;
mod cluster;
mod command;
mod entry_ref;
mod kv;
mod log_store;
pub mod lsm_store;
pub mod merkle;
mod paths;
pub mod proof;
mod proposer;
mod segment_log;
mod sled_store;
mod snapshot;
mod split_store;
mod state_machine;
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub mod test_hooks;
mod transport;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

pub use cluster::{AdminError, Replication, Status};
pub use command::{Command, IndexKey, Op, Outcome, Precondition, Write};
pub use kv::{KvStore, WriteBatch};
pub use paths::PathsAt;
pub use proposer::ProposeError;
use proposer::Proposer;
pub use state_machine::{
    content_commitment, CurrentRecord, HeaderFields, HistoryRecord, LeafHeader, StateView, VersionRecord,
};

/// A node's id in the cluster (openraft's `NodeId`).
pub type NodeId = u64;

/// A cluster member as the committed membership lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Where its FHIR API listens (clients and forwarded requests are sent there).
    pub api_addr: String,
    /// Where its inter-node transport listens (empty for the embedded single node).
    pub raft_addr: String,
    /// Hex ed25519 public key; batches this node proposes must verify against it.
    pub public_key: String,
}

impl Node {
    /// This node's batch-signing and transport key, if `public_key` is a valid one.
    pub(crate) fn verifying_key(&self) -> Option<VerifyingKey> {
        parse_key(&self.public_key)
    }
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (raft {})", self.api_addr, self.raft_addr)
    }
}

mod raft_types {
    openraft::declare_raft_types!(
        /// openraft's type configuration: what an entry carries and what applying it returns.
        /// Crate-internal (re-exported only by `test_hooks`).
        pub TypeConfig:
            D = crate::command::SignedBatch,
            R = crate::command::BatchOutcome,
            Node = crate::Node,
            SnapshotData = tokio::fs::File,
    );
}
pub(crate) use raft_types::TypeConfig;

pub(crate) type Raft = openraft::Raft<TypeConfig>;

/// Seconds a snapshot took to build or install (`kind`), for the server's `/metrics`.
pub const SNAPSHOT_DURATION: &str = "fhir_ledger_raft_snapshot_duration_seconds";

/// A running ledger node: Raft, its stores, the group-commit proposer and the transport.
#[derive(Clone)]
pub struct Ledger {
    raft: Raft,
    node_id: NodeId,
    view: StateView,
    proposer: Proposer,
    transport: Arc<transport::Shared>,
    pool: transport::client::Pool,
    me: Node,
    dir: std::path::PathBuf,
    /// A handle on the state machine Raft drives, for backups.
    sm: state_machine::StateMachine,
}

/// Where a read barrier left a read: which node serves it, at which term, and what it waited
/// for. Reported with every read so that a history that is not linearizable names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadPoint {
    /// The serving node.
    pub node: NodeId,
    /// Its Raft term when the barrier passed.
    pub term: u64,
    /// The leader that confirmed the read index with a quorum (this node when it leads); None
    /// for a bounded-staleness read.
    pub leader: Option<NodeId>,
    /// The log index the state had to reach (None: empty log, or a bounded-staleness read).
    pub read_index: Option<u64>,
    /// The serving node's applied index when the barrier passed (at least `read_index`).
    pub applied: Option<u64>,
    /// Bounded-staleness reads: how long ago a leader last replicated to this node.
    pub staleness: Option<std::time::Duration>,
}

/// How to open a node.
pub struct Options<'a> {
    /// The ledger directory (sled stores and `snapshots/`); created if missing.
    pub dir: &'a Path,
    /// This node's id in the cluster.
    pub node_id: NodeId,
    /// This node's ed25519 key: signs its batches and authenticates its transport sessions.
    pub key: SigningKey,
    /// The FHIR API address other nodes and clients are sent to.
    pub api_addr: String,
    /// Build a snapshot and compact the log every that many entries (None: never).
    pub snapshot_every: Option<u64>,
    /// The inter-node listener. None: the embedded single node, initialized on first start.
    /// Some: a cluster node, which waits for `cluster init` or to be added by a leader.
    pub raft_listener: Option<std::net::TcpListener>,
    /// sled's page cache (the state's trees: version records, subtree hashes, data keys).
    pub state_cache_bytes: u64,
    /// The lookup tables' block cache (current records, conditional postings).
    pub lookup_cache_bytes: u64,
}

/// The state's lookup tables (current records, conditional postings) under the ledger dir.
pub const LOOKUP_DIR: &str = "lookup";

/// How long a write may wait for a leader (election, forwarding) before it is refused.
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Ledger {
    /// The embedded single-node default (see [`Options::raft_listener`]).
    pub async fn open_single(
        dir: &Path,
        node_id: NodeId,
        key: SigningKey,
        api_addr: &str,
        snapshot_every: Option<u64>,
    ) -> anyhow::Result<Self> {
        let api_addr = api_addr.into();
        Self::open(Options {
            dir,
            node_id,
            key,
            api_addr,
            snapshot_every,
            raft_listener: None,
            state_cache_bytes: 48 << 20,
            lookup_cache_bytes: 16 << 20,
        })
        .await
    }

    /// Opens the node's stores under `dir` and starts Raft.
    pub async fn open(opts: Options<'_>) -> anyhow::Result<Self> {
        let Options {
            dir,
            node_id,
            key,
            api_addr,
            snapshot_every,
            raft_listener,
            state_cache_bytes,
            lookup_cache_bytes,
        } = opts;
        std::fs::create_dir_all(dir)?;
        // Checking the Raft log reads every segment, and sled's recovery its own file: neither
        // needs the other, so they overlap (together, most of a restart at millions of
        // resources).
        let log_dir = dir.join(log_store::DIR);
        let check = std::thread::Builder::new()
            .name("raft-log-check".into())
            .spawn(move || log_store::open_segments(&log_dir))?;
        let db = sled_store::SledDb::open_with_cache(dir, state_cache_bytes)?;
        let segments = check.join().map_err(|_| anyhow::anyhow!("the Raft log check panicked"))?;
        // Before the index had a store of its own it lived in this tree.
        db.drop_tree("local/search")?;
        let single = raft_listener.is_none();
        let mut log = log_store::LogStore::open(segments?, db.tree("raft_meta")?)?;
        // One node alone commits nothing it has not fsynced itself, and recommits its whole log
        // the moment it resumes leading; in a cluster, a restarted leader must be elected anew.
        if !single {
            log = log.no_resumed_leadership();
        }
        // The ledger's keys in sled, the lookup tables derived from them in an LSM tree
        // (`split_store`).
        let lookup = lsm_store::Tree::open(&dir.join(LOOKUP_DIR), "lookup", lookup_cache_bytes)?;
        let state = split_store::SplitStore::new(db.tree("state")?, Arc::new(lookup));
        let sm = state_machine::StateMachine::open(Arc::new(state), dir.join("snapshots"), log.bodies())?;
        let view = sm.view();
        let sm_handle = sm.clone();
        let config = openraft::Config {
            cluster_name: "fhir-ledger".into(),
            heartbeat_interval: 250,
            election_timeout_min: 1000,
            election_timeout_max: 2000,
            // Entries per append; large enough for group commit to amortize one fsync over many
            // writes, small enough to bound a replication frame.
            max_payload_entries: if single { 1024 } else { 256 },
            snapshot_policy: snapshot_every
                .map_or(openraft::SnapshotPolicy::Never, openraft::SnapshotPolicy::LogsSinceLast),
            // One node has no follower to catch up from the log: compact everything snapshotted.
            // A cluster keeps one snapshot interval of log, so that a follower lagging less than
            // that catches up from the log rather than by a whole snapshot.
            max_in_snapshot_log_to_keep: if single { 0 } else { snapshot_every.unwrap_or(1000) },
            install_snapshot_timeout: 10_000,
            ..Default::default()
        };
        let config = Arc::new(config.validate()?);
        let shared = transport::Shared::new(node_id, key.clone());
        let network = transport::client::Network { shared: shared.clone() };
        let raft = openraft::Raft::new(node_id, config, network, log, sm).await?;
        let me = Node {
            api_addr: api_addr.clone(),
            raft_addr: raft_listener
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map_or(String::new(), |a| a.to_string()),
            public_key: hex::encode(key.verifying_key().as_bytes()),
        };
        match raft_listener {
            None => {
                if !raft.is_initialized().await? {
                    raft.initialize(BTreeMap::from([(node_id, me.clone())])).await?;
                }
                raft.wait(Some(std::time::Duration::from_secs(30)))
                    .state(openraft::ServerState::Leader, "single node becomes leader")
                    .await?;
            }
            Some(listener) => {
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                transport::server::spawn(listener, shared.clone(), raft.clone(), view.clone());
            }
        }
        let pool = transport::client::Pool::new(shared.clone());
        let proposer = Proposer::start(raft.clone(), node_id, key, pool.clone());
        Ok(Self { raft, node_id, view, proposer, transport: shared, pool, me, dir: dir.to_path_buf(), sm: sm_handle })
    }

    /// A directory of this node's own beside its stores (`local/<name>`), for data the node
    /// derives from its state and keeps in a store of its own (the search index): neither
    /// replicated nor part of snapshots nor read by `verify`.
    pub fn local_dir(&self, name: &str) -> std::path::PathBuf {
        self.dir.join("local").join(name)
    }

    /// The directory of this node's ledger (stores, log segments, snapshots).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// A read-only handle on this node's applied state.
    pub fn view(&self) -> StateView {
        self.view.clone()
    }

    /// Proposes one command (group-committed with concurrent ones; forwarded to the leader when
    /// this node is a follower) and waits until this node has applied it; the outcome says
    /// whether its preconditions held.
    pub async fn submit(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        self.proposer.submit(cmd).await
    }

    /// Waits until this node's state reflects every write committed before the call (the
    /// leader's read index, asked over the transport on a follower), so a read is linearizable.
    /// Says which leader granted which read index, for the response headers and histories.
    pub async fn linearize(&self) -> Result<ReadPoint, ProposeError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let no_quorum =
            || ProposeError::Unavailable("no quorum confirmed the leader in time for a linearizable read".into());
        loop {
            let confirmed =
                tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await.map_err(|_| no_quorum())?;
            let leader = match confirmed {
                Ok(log_id) => return Ok(self.read_point(Some(self.node_id), log_id.map(|l| l.index), None)),
                Err(openraft::error::RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                    f.leader_id.zip(f.leader_node)
                }
                Err(e) => return Err(ProposeError::Unavailable(e.to_string())),
            };
            if let Some((id, node)) = leader {
                match self.pool.call(id, &node, &transport::Rpc::ReadIndex, LEADER_WAIT).await {
                    Ok(transport::Reply::ReadIndex(log_id)) => {
                        let index = log_id.map(|l| l.index);
                        wait_applied(&self.raft, index).await?;
                        return Ok(self.read_point(Some(id), index, None));
                    }
                    // Asking for a read index changes nothing, so any failure is worth a retry.
                    Ok(transport::Reply::NotLeader { .. }) | Err(_) => {}
                    Ok(other) => return Err(ProposeError::Unavailable(format!("read index: {other:?}"))),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProposeError::Unavailable("no leader is reachable for a linearizable read".into()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// A read barrier that accepts state at most `max_stale` old when this node can vouch for
    /// that (a follower that heard from the leader that recently); otherwise a linearizable
    /// read. The [`ReadPoint`] says which it was.
    pub async fn read_barrier(&self, max_stale: Option<std::time::Duration>) -> Result<ReadPoint, ProposeError> {
        if let (Some(bound), Some(stale)) = (max_stale, self.staleness()) {
            if stale <= bound {
                return Ok(self.read_point(None, None, Some(stale)));
            }
        }
        self.linearize().await
    }

    fn read_point(
        &self,
        leader: Option<NodeId>,
        read_index: Option<u64>,
        staleness: Option<std::time::Duration>,
    ) -> ReadPoint {
        let m = self.raft.metrics();
        let m = m.borrow();
        ReadPoint {
            node: self.node_id,
            term: m.current_term,
            leader,
            read_index,
            applied: m.last_applied.map(|l| l.index),
            staleness,
        }
    }

    /// How far behind the cluster a follower's state may be: the time since a leader last
    /// replicated to it (each append carries the commit index, which the follower then applies).
    /// None on a leader, which cannot vouch for itself without a quorum round (a deposed leader
    /// cut off from the others still believes it leads), on a node never reached, and while a
    /// snapshot is being loaded (the state is partial until then).
    pub fn staleness(&self) -> Option<std::time::Duration> {
        if self.raft.metrics().borrow().state != openraft::ServerState::Follower || self.view.installing() {
            return None;
        }
        self.transport.since_leader_contact()
    }

    /// The public keys of every node of the committed membership.
    pub fn member_keys(&self) -> Vec<VerifyingKey> {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        membership.membership().nodes().filter_map(|(_, n)| n.verifying_key()).collect()
    }

    /// Asks every other voter to cosign the head `(size, root, timestamp_ms)`; returns the
    /// cosignatures that came back within a second, as (node, public key, signature). Each
    /// voter signs only if its own tree has that root at that size.
    pub async fn cosign_head(&self, size: u64, root: [u8; 32], timestamp_ms: i64) -> Vec<(NodeId, String, Vec<u8>)> {
        let membership = self.raft.metrics().borrow().membership_config.clone();
        let voters: Vec<(NodeId, Node)> = membership
            .membership()
            .voter_ids()
            .filter(|id| *id != self.node_id)
            .filter_map(|id| membership.membership().get_node(&id).map(|n| (id, n.clone())))
            .collect();
        let rpc = transport::Rpc::Cosign { size, root, timestamp_ms };
        let asks = voters.into_iter().map(|(id, node)| {
            let (pool, rpc) = (self.pool.clone(), &rpc);
            async move {
                match pool.call(id, &node, rpc, std::time::Duration::from_secs(1)).await {
                    Ok(transport::Reply::Cosigned { signature }) => Some((id, node.public_key, signature)),
                    Ok(other) => {
                        tracing::debug!(node = id, reply = ?other, "no cosignature");
                        None
                    }
                    Err(e) => {
                        tracing::debug!(node = id, error = %e, "no cosignature");
                        None
                    }
                }
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }

    /// Stops Raft (replication, elections, apply); the stores stay as they are on disk.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}

pub(crate) async fn wait_applied(raft: &Raft, index: Option<u64>) -> Result<(), ProposeError> {
    raft.wait(Some(LEADER_WAIT))
        .applied_index_at_least(index, "apply up to the read index")
        .await
        .map(|_| ())
        .map_err(|e| ProposeError::Unavailable(format!("this node is not catching up: {e}")))
}

/// An ed25519 public key from the 64 hex digits a [`Node`] (or an admin call) carries.
pub(crate) fn parse_key(hex: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

/// The `invalid data` I/O error every decoder here returns for malformed input.
pub(crate) fn invalid_data(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}
