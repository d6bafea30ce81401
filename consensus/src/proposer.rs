//! Group commit: concurrent commands are gathered into one signed batch, one Raft entry and
//! (through openraft's own batching of appends) one fsync.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, oneshot, Semaphore};

use openraft::error::{ClientWriteError, RaftError};

use crate::command::{Batch, BatchOutcome, Command, Outcome, SignedBatch, COMMAND_FORMAT};
use crate::transport::client::{CallError, Pool};
use crate::transport::{Reply, Rpc};
use crate::{NodeId, Raft, LEADER_WAIT};

/// Most commands folded into one entry; bounds entry size and tail latency.
const MAX_BATCH: usize = 256;
/// Batches in flight at once, so the next batch forms while the previous one is fsynced.
const IN_FLIGHT: usize = 4;

/// Why a write or a read barrier could not be served. The outcome of a write is unknown: it may
/// still apply.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// No leader or quorum in time, or this node is not catching up (a 503 for the client).
    #[error("{0}")]
    Unavailable(String),
}

type Pending = (Command, oneshot::Sender<Result<Outcome, ProposeError>>);

#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
}

impl Proposer {
    pub fn start(raft: Raft, node_id: NodeId, key: SigningKey, pool: Pool) -> Self {
        let (tx, rx) = mpsc::channel::<Pending>(8192);
        tokio::spawn(run(raft, node_id, Arc::new(key), pool, rx));
        Self { tx }
    }

    pub async fn submit(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((cmd, tx)).await.map_err(|_| ProposeError::Unavailable("proposer stopped".into()))?;
        rx.await.map_err(|_| ProposeError::Unavailable("proposal dropped".into()))?
    }
}

async fn run(raft: Raft, node_id: NodeId, key: Arc<SigningKey>, pool: Pool, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        // Whatever arrived while we waited for a slot joins this batch.
        let mut pending = vec![first];
        while pending.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => pending.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        let key = key.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let (commands, replies): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
            let batch = Batch { format: COMMAND_FORMAT, node_id, commands };
            let signed = SignedBatch::sign(&batch, &key);
            // Its bodies are in the signed payload now: freed before the write, whose log
            // encoding and apply reuse the memory instead of touching fresh pages (megabytes
            // for a large transaction).
            drop(batch);
            let result = match signed {
                Ok(signed) => propose(&raft, &pool, signed).await,
                Err(e) => Err(ProposeError::Unavailable(e.to_string())),
            };
            drop(permit);
            match result {
                Ok(outcome) => {
                    let mut outcomes = outcome.outcomes.into_iter();
                    for reply in replies {
                        let o = outcomes.next().ok_or_else(|| ProposeError::Unavailable("missing outcome".into()));
                        let _ = reply.send(o);
                    }
                }
                Err(e) => {
                    for reply in replies {
                        let _ = reply.send(Err(ProposeError::Unavailable(e.to_string())));
                    }
                }
            }
        });
    }
}

/// Appends `signed` through the leader: locally when this node leads, else forwarded over the
/// transport. Retries only while the batch was certainly not appended (no leader yet, or the
/// addressee said it is not the leader); after that, waits until this node applied it so that
/// a read on this node sees the write.
async fn propose(raft: &Raft, pool: &Pool, signed: SignedBatch) -> Result<BatchOutcome, ProposeError> {
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    let unknown = |e: String| ProposeError::Unavailable(format!("the write's outcome is unknown: {e}"));
    let rpc = Rpc::Forward(signed);
    loop {
        let (state, leader) = {
            let m = raft.metrics();
            let m = m.borrow();
            let leader =
                m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).map(|n| (id, n.clone())));
            (m.state, leader)
        };
        if state == openraft::ServerState::Leader {
            // The batch moves into the log without a copy; if leadership moved in between, it
            // was not appended and the caller hears so.
            let Rpc::Forward(signed) = rpc else {
                return Err(ProposeError::Unavailable("internal: the proposal is not a batch".into()));
            };
            return match tokio::time::timeout_at(deadline, raft.client_write(signed)).await {
                Err(_) => Err(unknown("not committed in time (no quorum reachable?)".into())),
                Ok(Ok(resp)) => Ok(resp.data),
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                    Err(ProposeError::Unavailable("leadership moved while proposing; the write was not made".into()))
                }
                Ok(Err(e)) => Err(ProposeError::Unavailable(e.to_string())),
            };
        }
        if let Some((id, node)) = leader {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match pool.call(id, &node, &rpc, left).await {
                Ok(Reply::Written { log_id, outcome }) => {
                    crate::wait_applied(raft, Some(log_id.index)).await?;
                    return Ok(outcome);
                }
                Ok(Reply::NotLeader { .. }) | Err(CallError::NotSent(_)) => {}
                Ok(Reply::Failed(e)) | Err(CallError::Unknown(e)) => return Err(unknown(e)),
                Ok(other) => return Err(unknown(format!("unexpected reply {other:?}"))),
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ProposeError::Unavailable("no leader is reachable; the write was not made".into()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
