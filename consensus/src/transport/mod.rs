//! The inter-node transport: openraft's RPCs plus write forwarding and read-index requests,
//! over TCP on a listener separate from the FHIR API, every frame signed (see [`wire`]).

pub mod client;
pub mod server;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use ed25519_dalek::{SigningKey, VerifyingKey};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::LogId;
use serde::{Deserialize, Serialize};

use crate::command::{BatchOutcome, SignedBatch};
use crate::{NodeId, TypeConfig};

/// What one node asks another.
#[derive(Serialize, Deserialize, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Rpc {
    /// openraft: replicate entries (or heartbeat).
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// openraft: a candidate asks for a vote.
    Vote(VoteRequest<NodeId>),
    /// openraft: one chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A follower's signed batch for the leader to propose.
    Forward(SignedBatch),
    /// A follower asks the leader for a log id that a linearizable read must wait for.
    ReadIndex,
    /// Asks a member to cosign a tree head: it signs only if its own tree has this root at
    /// this size and the time is near its own clock.
    Cosign {
        /// Tree size of the head.
        size: u64,
        /// Root at that size.
        root: [u8; 32],
        /// The head's time, ms since the epoch.
        timestamp_ms: i64,
    },
}

/// The answer to an [`Rpc`].
#[derive(Serialize, Deserialize, Debug)]
pub enum Reply {
    /// openraft's answer to [`Rpc::AppendEntries`].
    AppendEntries(AppendEntriesResponse<NodeId>),
    /// openraft's answer to [`Rpc::Vote`].
    Vote(VoteResponse<NodeId>),
    /// openraft's answer to [`Rpc::InstallSnapshot`].
    InstallSnapshot(InstallSnapshotResponse<NodeId>),
    /// A forwarded batch was committed and applied on the leader.
    Written {
        /// The entry that carried it (the follower waits until it applied this far).
        log_id: LogId<NodeId>,
        /// One outcome per command.
        outcome: BatchOutcome,
    },
    /// The leader's read index (confirmed by a quorum).
    ReadIndex(Option<LogId<NodeId>>),
    /// The member's ed25519 signature of the tree head.
    Cosigned {
        /// Signature over [`crate::merkle::tree_head_message`].
        signature: Vec<u8>,
    },
    /// The receiver is not the leader; it names the one it knows of.
    NotLeader {
        /// The leader the receiver knows of.
        leader: Option<NodeId>,
    },
    /// The request failed on the receiver (the message says why).
    Failed(String),
}

/// State the client and server halves share.
pub struct Shared {
    /// This node's id.
    pub me: NodeId,
    /// This node's key: signs handshakes.
    pub key: SigningKey,
    /// Keys an uninitialized node trusts until it holds a membership of its own (set by the
    /// admin `trust` call when a node is about to be added).
    bootstrap: RwLock<BTreeMap<NodeId, VerifyingKey>>,
    /// Peers this node neither sends to nor accepts from (fault injection for partition tests;
    /// only settable when the node was started with fault injection enabled).
    isolated: RwLock<BTreeSet<NodeId>>,
    started: Instant,
    /// Milliseconds after `started` when an AppendEntries from a leader last succeeded.
    leader_contact_ms: AtomicU64,
    /// Milliseconds after `started` when each peer last answered a Raft RPC of this node's.
    peer_contact_ms: std::sync::Mutex<BTreeMap<NodeId, u64>>,
    /// RPCs and handshakes refused (bad signature, unknown node, replay, isolation).
    pub refused: AtomicU64,
}

impl Shared {
    /// The state of node `me` holding `key`, trusting no one yet and isolated from no one.
    // Liveness bookkeeping (how stale a follower is), never part of apply().
    #[allow(clippy::disallowed_methods)]
    pub fn new(me: NodeId, key: SigningKey) -> Arc<Self> {
        Arc::new(Self {
            me,
            key,
            bootstrap: RwLock::default(),
            isolated: RwLock::default(),
            started: Instant::now(),
            leader_contact_ms: AtomicU64::new(u64::MAX),
            peer_contact_ms: std::sync::Mutex::default(),
            refused: AtomicU64::new(0),
        })
    }

    /// Accept `node` holding `key` before this node has a membership of its own.
    pub fn trust(&self, node: NodeId, key: VerifyingKey) {
        if let Ok(mut b) = self.bootstrap.write() {
            b.insert(node, key);
        }
    }

    pub(crate) fn bootstrap_key(&self, node: NodeId) -> Option<VerifyingKey> {
        self.bootstrap.read().ok()?.get(&node).copied()
    }

    /// Fault injection: stop talking to `peers` (empty heals); see [`crate::Ledger::set_isolated`].
    pub fn set_isolated(&self, peers: BTreeSet<NodeId>) {
        if let Ok(mut i) = self.isolated.write() {
            *i = peers;
        }
    }

    /// Whether fault injection cut this node off from `peer`.
    pub fn is_isolated(&self, peer: NodeId) -> bool {
        self.isolated.read().is_ok_and(|i| i.contains(&peer))
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(crate) fn heard_from_leader(&self) {
        self.leader_contact_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    pub(crate) fn heard_from_peer(&self, peer: NodeId) {
        let now = self.now_ms();
        self.peer_contact_ms.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(peer, now);
    }

    /// How long ago each peer last answered a Raft RPC of this node's (a leader's followers).
    pub fn since_peer_contact(&self) -> BTreeMap<NodeId, std::time::Duration> {
        let now = self.now_ms();
        let at = self.peer_contact_ms.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        at.iter().map(|(p, ms)| (*p, std::time::Duration::from_millis(now.saturating_sub(*ms)))).collect()
    }

    /// How long ago a leader last replicated to (or heartbeated) this node; None if never.
    pub fn since_leader_contact(&self) -> Option<std::time::Duration> {
        let at = self.leader_contact_ms.load(Ordering::Relaxed);
        (at != u64::MAX).then(|| std::time::Duration::from_millis(self.now_ms().saturating_sub(at)))
    }
}
