//! Cluster administration over openraft's joint consensus: initialize a cluster, trust a node
//! about to join, add a learner, promote it, remove a node, and report status.

use std::collections::{BTreeMap, BTreeSet};

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::ChangeMembers;
use serde::Serialize;

use crate::{Ledger, Node, NodeId};

/// Why an admin call did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Membership changes go through the leader; this names it when known.
    #[error("this node is not the leader; ask node {leader:?} at {api_addr:?}")]
    NotLeader {
        /// The leader's id, when this node knows one.
        leader: Option<NodeId>,
        /// The leader's FHIR API address, to send the call to.
        api_addr: Option<String>,
    },
    /// The request itself is wrong (bad key, missing member, last voter, already a member).
    #[error("{0}")]
    Invalid(String),
    /// Raft could not carry it out (stopped, timed out, storage failure).
    #[error("{0}")]
    Failed(String),
}

/// One member's replication as the leader sees it.
#[derive(Serialize, Debug)]
pub struct Replication {
    /// Highest log index known to be on that node.
    pub matched: Option<u64>,
    /// Entries it is behind the leader's log.
    pub lag: Option<u64>,
}

/// What `cluster status` shows for one node.
#[derive(Serialize, Debug)]
pub struct Status {
    /// This node.
    pub node_id: NodeId,
    /// Its Raft role: `Leader`, `Follower`, `Candidate` or `Learner`.
    pub state: String,
    /// Its current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// That leader's FHIR API address.
    pub leader_api: Option<String>,
    /// Index of the last entry in its log.
    pub last_log_index: Option<u64>,
    /// Index of the last entry it applied.
    pub last_applied: Option<u64>,
    /// Last log index covered by this node's snapshot (built or installed).
    pub snapshot: Option<u64>,
    /// Log entries up to this index were compacted away.
    pub purged: Option<u64>,
    /// Bytes received so far of a snapshot being streamed to this node (catch-up progress).
    pub receiving_snapshot_bytes: Option<u64>,
    /// Voters of the effective membership.
    pub voters: BTreeSet<NodeId>,
    /// Learners of the effective membership (replicated to, not voting).
    pub learners: BTreeSet<NodeId>,
    /// True while a membership change is between its two configurations.
    pub joint: bool,
    /// Every member's addresses and key.
    pub nodes: BTreeMap<NodeId, Node>,
    /// Leader only: each member's matched index and lag.
    pub replication: Option<BTreeMap<NodeId, Replication>>,
    /// Follower: ms since a leader last replicated to it (see [`Ledger::staleness`]).
    pub staleness_ms: Option<u64>,
    /// Ms since each peer last answered a Raft RPC of this node's (on a leader: its followers).
    pub last_contact_ms: BTreeMap<NodeId, u64>,
    /// Inter-node connections and frames refused (bad key, not a member, replay).
    pub refused_rpcs: u64,
}

fn write_err(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> AdminError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            AdminError::NotLeader { leader: f.leader_id, api_addr: f.leader_node.map(|n| n.api_addr) }
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => AdminError::Invalid(c.to_string()),
        e => AdminError::Failed(e.to_string()),
    }
}

impl Ledger {
    /// This node as a membership would list it.
    pub fn this_node(&self) -> Node {
        self.me.clone()
    }

    /// Creates the cluster with `members` as its voters (this node must be one of them). Run
    /// once, on one node; the others must trust this node's key first (see [`Ledger::trust`]).
    pub async fn initialize(&self, members: BTreeMap<NodeId, Node>) -> Result<(), AdminError> {
        if !members.contains_key(&self.node_id) {
            return Err(AdminError::Invalid(format!("the members must include this node ({})", self.node_id)));
        }
        for (id, n) in &members {
            if n.verifying_key().is_none() || n.raft_addr.is_empty() {
                return Err(AdminError::Invalid(format!("node {id} needs a raft address and a valid public key")));
            }
        }
        self.raft.initialize(members).await.map_err(|e| match e {
            RaftError::APIError(InitializeError::NotAllowed(n)) => {
                AdminError::Invalid(format!("this node already belongs to a cluster: {n}"))
            }
            e => AdminError::Failed(e.to_string()),
        })
    }

    /// Lets a node that has no membership yet accept RPCs from `id` holding `public_key`
    /// (the leader that will add it, or the node that will initialize the cluster).
    pub fn trust(&self, id: NodeId, public_key: &str) -> Result<(), AdminError> {
        let key = crate::parse_key(public_key)
            .ok_or_else(|| AdminError::Invalid("public_key must be 64 hex digits of an ed25519 key".into()))?;
        self.transport.trust(id, key);
        Ok(())
    }

    /// Adds `node` as a learner and waits until it has caught up (by log or by snapshot).
    pub async fn add_learner(&self, id: NodeId, node: Node) -> Result<(), AdminError> {
        if node.verifying_key().is_none() || node.raft_addr.is_empty() {
            return Err(AdminError::Invalid(format!("node {id} needs a raft address and a valid public key")));
        }
        self.raft.add_learner(id, node, true).await.map(|_| ()).map_err(write_err)
    }

    /// Makes learners voters (joint consensus: old and new voter sets both agree on the change).
    pub async fn promote(&self, ids: BTreeSet<NodeId>) -> Result<(), AdminError> {
        self.raft.change_membership(ChangeMembers::AddVoterIds(ids), true).await.map(|_| ()).map_err(write_err)
    }

    /// Removes a node: first from the voters (if it is one), then from the membership.
    pub async fn remove(&self, id: NodeId) -> Result<(), AdminError> {
        let voters: BTreeSet<NodeId> =
            self.raft.metrics().borrow().membership_config.membership().voter_ids().collect();
        if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(AdminError::Invalid("cannot remove the last voter".into()));
            }
            self.raft
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(write_err)?;
        } else {
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(write_err)?;
        }
        Ok(())
    }

    /// Whether this node belongs to a cluster yet (it has a membership: it initialized one,
    /// or a leader added it).
    pub async fn is_initialized(&self) -> Result<bool, AdminError> {
        self.raft.is_initialized().await.map_err(|e| AdminError::Failed(e.to_string()))
    }

    /// Fault injection for partition tests: this node stops sending to and accepting from
    /// `peers` (an empty set heals). Whether it may be called is the caller's policy (the
    /// server allows it only when started with `--fault-injection`).
    pub fn set_isolated(&self, peers: BTreeSet<NodeId>) {
        self.transport.set_isolated(peers);
    }

    /// Builds a snapshot of everything applied so far, as the snapshot policy would (the log
    /// is compacted after it as after any snapshot), and answers once one covers that point,
    /// with the last log index it covers. A build already under way that stops short of the
    /// point is followed by another. Apply and reads go on meanwhile (`build_snapshot`).
    pub async fn snapshot_now(&self, timeout: std::time::Duration) -> Result<Option<u64>, AdminError> {
        let started = tokio::time::Instant::now(); // timing only: the state never sees it
        let point = self.raft.metrics().borrow().last_applied.map(|l| l.index);
        loop {
            self.raft.trigger().snapshot().await.map_err(|e| AdminError::Failed(e.to_string()))?;
            // openraft ignores a trigger while it builds: ask again after a while.
            let wait = self.raft.wait(Some(std::time::Duration::from_secs(1)));
            match wait.metrics(|m| m.snapshot.map(|s| s.index) >= point, "a snapshot covers the point").await {
                Ok(m) => return Ok(m.snapshot.map(|s| s.index)),
                Err(openraft::metrics::WaitError::Timeout(..)) if started.elapsed() < timeout => {}
                Err(e) => return Err(AdminError::Failed(e.to_string())),
            }
        }
    }

    /// Membership, leader, term, log and snapshot positions, and replication lag as this node
    /// sees them.
    pub fn status(&self) -> Status {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let nodes: BTreeMap<NodeId, Node> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let last = m.last_log_index;
        let replication = m.replication.as_ref().map(|r| {
            r.iter()
                .map(|(id, matched)| {
                    let matched = matched.map(|l| l.index);
                    let lag = last.map(|l| l.saturating_sub(matched.unwrap_or(0)));
                    (*id, Replication { matched, lag })
                })
                .collect()
        });
        Status {
            node_id: self.node_id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader: m.current_leader,
            leader_api: m.current_leader.and_then(|l| nodes.get(&l)).map(|n| n.api_addr.clone()),
            last_log_index: last,
            last_applied: m.last_applied.map(|l| l.index),
            snapshot: m.snapshot.map(|l| l.index),
            purged: m.purged.map(|l| l.index),
            receiving_snapshot_bytes: self.view().receiving_snapshot_bytes(),
            voters: membership.voter_ids().collect(),
            learners: membership.learner_ids().collect(),
            joint: membership.get_joint_config().len() > 1,
            nodes,
            replication,
            staleness_ms: self.staleness().map(|d| d.as_millis() as u64),
            last_contact_ms: self
                .transport
                .since_peer_contact()
                .into_iter()
                .map(|(p, d)| (p, d.as_millis() as u64))
                .collect(),
            refused_rpcs: self.transport.refused.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}
