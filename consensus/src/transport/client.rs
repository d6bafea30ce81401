//! The sending half: openraft's network factory over signed TCP sessions, and a small pool of
//! sessions for forwarding writes and read-index requests to the leader.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use tokio::io::BufStream;
use tokio::net::TcpStream;

use super::wire::{self, Session};
use super::{Reply, Rpc, Shared};
use crate::{Node, NodeId, TypeConfig};

/// One authenticated connection to a peer.
pub struct Conn {
    stream: BufStream<TcpStream>,
    session: Session,
    /// Reply bodies land here, reused across calls.
    buf: Vec<u8>,
}

impl Conn {
    /// Connects to `target` at `node.raft_addr` and runs the handshake as `shared.me`,
    /// checking that the peer holds `node.public_key`.
    pub async fn connect(shared: &Shared, target: NodeId, node: &Node) -> io::Result<Self> {
        if shared.is_isolated(target) {
            return Err(io::Error::new(io::ErrorKind::NotConnected, format!("node {target} is isolated")));
        }
        let key = node
            .verifying_key()
            .ok_or_else(|| crate::invalid_data(format!("node {target} has no valid public key in membership")))?;
        let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&node.raft_addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connect to {}", node.raft_addr)))??;
        tcp.set_nodelay(true)?;
        let mut stream = BufStream::new(tcp);
        let session = wire::client_handshake(&mut stream, shared.me, &shared.key, target, &key).await?;
        Ok(Self { stream, session, buf: Vec::new() })
    }

    /// Sends one request and reads its reply (requests on one connection are sequential).
    pub async fn call(&mut self, rpc: &Rpc) -> io::Result<Reply> {
        let body = bincode::serialize(rpc).map_err(|e| crate::invalid_data(e.to_string()))?;
        let frame = self.session.seal(body);
        self.send_frame(&frame).await?;
        self.read_reply().await
    }

    /// [`Conn::call`] with a deadline; after an error the session's state is unknown, so
    /// callers drop it.
    async fn call_within(&mut self, rpc: &Rpc, ttl: Duration, peer: NodeId) -> io::Result<Reply> {
        let late = || io::Error::new(io::ErrorKind::TimedOut, format!("no reply from node {peer} within {ttl:?}"));
        tokio::time::timeout(ttl, self.call(rpc)).await.map_err(|_| late())?
    }

    /// Sends an already sealed frame as is (tests replay frames through this).
    pub async fn send_frame(&mut self, frame: &wire::Frame) -> io::Result<()> {
        wire::write_frame(&mut self.stream, frame).await
    }

    /// Whether the peer closed this idle connection (a restarted or killed node): reading
    /// would return end-of-file or an error now rather than block.
    fn is_closed(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.stream.get_ref().try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// This connection's session, to seal a frame by hand (the replay tests).
    #[cfg(feature = "test-hooks")]
    pub fn session(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Reads one reply frame without interpreting it.
    pub async fn read_reply(&mut self) -> io::Result<Reply> {
        let (seq, mac) = wire::read_frame(&mut self.stream, &mut self.buf).await?;
        self.session.check(seq, &mac, &self.buf)?;
        bincode::deserialize(&self.buf).map_err(|e| crate::invalid_data(e.to_string()))
    }
}

/// openraft's factory: one [`PeerClient`] per replication stream.
#[derive(Clone)]
pub struct Network {
    pub shared: Arc<Shared>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;
    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient { shared: self.shared.clone(), target, node: node.clone(), conn: None }
    }
}

pub struct PeerClient {
    shared: Arc<Shared>,
    target: NodeId,
    node: Node,
    conn: Option<Conn>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Remote(String);

impl PeerClient {
    async fn call<E: std::error::Error>(
        &mut self,
        rpc: Rpc,
        ttl: Duration,
    ) -> Result<Reply, RPCError<NodeId, Node, E>> {
        let conn = match self.conn.take() {
            Some(c) if !self.shared.is_isolated(self.target) => c,
            _ => Conn::connect(&self.shared, self.target, &self.node)
                .await
                .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?,
        };
        let mut conn = conn;
        let reply =
            conn.call_within(&rpc, ttl, self.target).await.map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.shared.heard_from_peer(self.target);
        self.conn = Some(conn);
        Ok(reply)
    }
}

fn unexpected<E: std::error::Error>(reply: Reply) -> RPCError<NodeId, Node, E> {
    let msg = match reply {
        Reply::Failed(m) => m,
        other => format!("unexpected reply {other:?}"),
    };
    RPCError::Network(NetworkError::new(&Remote(msg)))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(Rpc::AppendEntries(rpc), option.hard_ttl()).await? {
            Reply::AppendEntries(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>> {
        match self.call(Rpc::InstallSnapshot(rpc), option.hard_ttl()).await? {
            Reply::InstallSnapshot(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self.call(Rpc::Vote(rpc), option.hard_ttl()).await? {
            Reply::Vote(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }
}

/// Idle sessions per peer for requests that are not openraft's (forwarded writes, read index).
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
    idle: Arc<Mutex<BTreeMap<NodeId, Vec<Conn>>>>,
}

/// Most idle sessions kept per peer.
const IDLE_PER_PEER: usize = 16;

impl Pool {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared, idle: Arc::default() }
    }

    /// One request to `target`. An error means the outcome is unknown (the request may have been
    /// delivered), except for a connect error, after which nothing was sent.
    pub async fn call(&self, target: NodeId, node: &Node, rpc: &Rpc, ttl: Duration) -> Result<Reply, CallError> {
        // A pooled session whose peer has since closed it would turn a request that was never
        // delivered into one of unknown outcome: skip those.
        let idle = self.idle.lock().ok().and_then(|mut m| {
            let v = m.get_mut(&target)?;
            std::iter::from_fn(|| v.pop()).find(|c| !c.is_closed())
        });
        let mut conn = match idle {
            Some(c) if !self.shared.is_isolated(target) => c,
            _ => Conn::connect(&self.shared, target, node).await.map_err(CallError::NotSent)?,
        };
        let reply = conn.call_within(rpc, ttl, target).await.map_err(|e| CallError::Unknown(e.to_string()))?;
        if let Ok(mut m) = self.idle.lock() {
            let v = m.entry(target).or_default();
            if v.len() < IDLE_PER_PEER {
                v.push(conn);
            }
        }
        Ok(reply)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("could not reach the node: {0}")]
    NotSent(io::Error),
    #[error("{0}")]
    Unknown(String),
}
