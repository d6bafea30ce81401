//! Group commit: concurrent commands are gathered into one signed batch, one Raft entry and
//! (through openraft's own batching of appends) one fsync.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::command::{Batch, Command, Outcome, SignedBatch, COMMAND_FORMAT};
use crate::{NodeId, Raft};

/// Most commands folded into one entry; bounds entry size and tail latency.
const MAX_BATCH: usize = 256;
/// Batches in flight at once, so the next batch forms while the previous one is fsynced.
const IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("the ledger is unavailable: {0}")]
    Unavailable(String),
}

type Pending = (Command, oneshot::Sender<Result<Outcome, ProposeError>>);

#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
}

impl Proposer {
    pub fn start(raft: Raft, node_id: NodeId, key: SigningKey) -> Self {
        let (tx, rx) = mpsc::channel::<Pending>(8192);
        tokio::spawn(run(raft, node_id, Arc::new(key), rx));
        Self { tx }
    }

    pub async fn submit(&self, cmd: Command) -> Result<Outcome, ProposeError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send((cmd, tx)).await.map_err(|_| ProposeError::Unavailable("proposer stopped".into()))?;
        rx.await.map_err(|_| ProposeError::Unavailable("proposal dropped".into()))?
    }
}

async fn run(raft: Raft, node_id: NodeId, key: Arc<SigningKey>, mut rx: mpsc::Receiver<Pending>) {
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
        tokio::spawn(async move {
            let (commands, replies): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
            let batch = Batch { format: COMMAND_FORMAT, node_id, commands };
            let result = match SignedBatch::sign(&batch, &key) {
                Ok(signed) => raft.client_write(signed).await.map_err(|e| ProposeError::Unavailable(e.to_string())),
                Err(e) => Err(ProposeError::Unavailable(e.to_string())),
            };
            drop(permit);
            match result {
                Ok(resp) => {
                    let mut outcomes = resp.data.outcomes.into_iter();
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
