//! The receiving half: accepts authenticated sessions from members and hands their RPCs to Raft.

use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::raft::AppendEntriesResponse;
use tokio::io::BufStream;
use tokio::net::{TcpListener, TcpStream};

use super::wire;
use super::{Reply, Rpc, Shared};
use crate::parse_key;
use crate::state_machine::StateView;
use crate::{NodeId, Raft};

/// How far a tree head's time may be from this node's clock for it to cosign.
const COSIGN_CLOCK_SKEW_MS: i64 = 60_000;
/// How long a cosigner waits to apply up to the head's size.
const COSIGN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a connecting peer has to complete the mutual challenge-response.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves inter-node RPCs on `listener` until the process exits.
pub fn spawn(listener: TcpListener, shared: Arc<Shared>, raft: Raft, view: StateView) {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else { continue };
            let (shared, raft, view) = (shared.clone(), raft.clone(), view.clone());
            tokio::spawn(async move {
                if let Err(e) = serve(tcp, &shared, &raft, &view).await {
                    tracing::debug!(%peer, error = %e, "raft session ended");
                }
            });
        }
    });
}

/// How this node knows `node`: the membership's entry for it, or, while this node has no
/// membership yet, the key an operator told it to trust.
enum Known {
    Member(String),
    Trusted(VerifyingKey),
}

fn known(shared: &Shared, raft: &Raft, node: NodeId) -> Option<Known> {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    if membership.nodes().next().is_none() {
        return shared.bootstrap_key(node).map(Known::Trusted);
    }
    membership.get_node(&node).map(|n| Known::Member(n.public_key.clone()))
}

/// The key a node may open a session with.
fn trusted_key(shared: &Shared, raft: &Raft, node: NodeId) -> Option<VerifyingKey> {
    match known(shared, raft, node)? {
        Known::Member(hex) => parse_key(&hex),
        Known::Trusted(key) => Some(key),
    }
}

/// Whether `node` is still one this node talks to (checked on every frame, so no key parse).
fn still_member(shared: &Shared, raft: &Raft, node: NodeId) -> bool {
    known(shared, raft, node).is_some()
}

async fn serve(tcp: TcpStream, shared: &Shared, raft: &Raft, view: &StateView) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut stream = BufStream::new(tcp);
    let handshake = wire::server_handshake(&mut stream, shared.me, &shared.key, |n| {
        if shared.is_isolated(n) {
            return None;
        }
        trusted_key(shared, raft, n)
    });
    // A peer that connects and says nothing must not hold a task and a socket for ever.
    let handshake = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no handshake within the timeout")),
    };
    let mut session = match handshake {
        Ok(s) => s,
        Err(e) => {
            shared.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "refused a raft connection");
            return Err(e);
        }
    };
    let mut buf = Vec::new();
    loop {
        let (seq, mac) = wire::read_frame(&mut stream, &mut buf).await?;
        if shared.is_isolated(session.peer) {
            return Ok(());
        }
        // Membership is checked per frame, not only at the handshake: a node removed from the
        // cluster (even the leader that removed itself) loses its open sessions too.
        if !still_member(shared, raft, session.peer) {
            shared.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(peer = session.peer, "node is no longer a member; closing its session");
            return Ok(());
        }
        match session.check(seq, &mac, &buf) {
            Ok(()) => {}
            Err(e) => {
                shared.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(peer = session.peer, error = %e, "refused a raft frame; closing the session");
                return Err(e);
            }
        }
        let reply = match bincode::deserialize::<Rpc>(&buf) {
            Ok(rpc) => dispatch(rpc, session.peer, shared, raft, view).await,
            Err(e) => Reply::Failed(format!("undecodable request: {e}")),
        };
        let body = bincode::serialize(&reply).map_err(|e| std::io::Error::other(e.to_string()))?;
        let frame = session.seal(body);
        wire::write_frame(&mut stream, &frame).await?;
    }
}

async fn dispatch(rpc: Rpc, peer: NodeId, shared: &Shared, raft: &Raft, view: &StateView) -> Reply {
    match rpc {
        Rpc::AppendEntries(req) => match raft.append_entries(req).await {
            Ok(resp) => {
                if matches!(resp, AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_)) {
                    shared.heard_from_leader();
                }
                Reply::AppendEntries(resp)
            }
            Err(e) => Reply::Failed(e.to_string()),
        },
        Rpc::Vote(req) => raft.vote(req).await.map_or_else(|e| Reply::Failed(e.to_string()), Reply::Vote),
        Rpc::InstallSnapshot(req) => {
            raft.install_snapshot(req).await.map_or_else(|e| Reply::Failed(e.to_string()), Reply::InstallSnapshot)
        }
        Rpc::Forward(batch) => {
            // A member proposes only batches it signed itself; apply checks the signature too.
            if batch.node_id != peer {
                return Reply::Failed(format!("node {peer} forwarded a batch of node {}", batch.node_id));
            }
            match raft.client_write(batch).await {
                Ok(resp) => Reply::Written { log_id: resp.log_id, outcome: resp.data },
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    Reply::NotLeader { leader: f.leader_id }
                }
                Err(e) => Reply::Failed(e.to_string()),
            }
        }
        Rpc::Cosign { size, root, timestamp_ms } => cosign(shared, view, size, root, timestamp_ms).await,
        Rpc::ReadIndex => match raft.ensure_linearizable().await {
            Ok(log_id) => Reply::ReadIndex(log_id),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Reply::NotLeader { leader: f.leader_id }
            }
            Err(e) => Reply::Failed(e.to_string()),
        },
    }
}

/// Signs a tree head only if this node's own tree had `root` at `size` (waiting briefly to apply
/// that far) and the time is near this node's clock, so a cosignature vouches for what this
/// node holds, not for what the asker claims.
async fn cosign(shared: &Shared, view: &StateView, size: u64, root: [u8; 32], timestamp_ms: i64) -> Reply {
    use ed25519_dalek::Signer;
    #[allow(clippy::disallowed_methods)] // a wall-clock check of a head's time, not apply()
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    if (now - timestamp_ms).abs() > COSIGN_CLOCK_SKEW_MS {
        return Reply::Failed(format!("head time {timestamp_ms} is more than a minute from this node's clock"));
    }
    let deadline = tokio::time::Instant::now() + COSIGN_WAIT;
    while view.frontier().map_or(0, |f| f.size) < size {
        if tokio::time::Instant::now() >= deadline {
            return Reply::Failed(format!("this node has not applied {size} leaves yet"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    if crate::proof::root_at(view, size) != Some(root) {
        return Reply::Failed(format!("this node's tree has another root at size {size}"));
    }
    let msg = crate::merkle::tree_head_message(size, &root, timestamp_ms);
    Reply::Cosigned { signature: shared.key.sign(&msg).to_bytes().to_vec() }
}
