//! A synthetic ledger for the proof benchmark (`fhir-ledger-bench proofs`): real sled, real
//! signed batches applied by the real state machine, without the Raft round trips that proofs
//! do not depend on. Deterministic, like everything in this crate.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::Path;

use ed25519_dalek::SigningKey;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Membership};

use crate::command::{Batch, Command, Op, SignedBatch, Write, COMMAND_FORMAT};
use crate::sled_store::SledDb;
use crate::state_machine::{StateMachine, StateView};
use crate::Node;

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// Applies `leaves` creates (bodies of `body_bytes`, `per_entry` per signed batch) to a fresh
/// state machine under `dir`; `progress(done)` after each entry.
pub async fn synthetic_ledger(
    dir: &Path,
    leaves: u64,
    per_entry: u64,
    body_bytes: usize,
    progress: &mut dyn FnMut(u64),
) -> io::Result<StateView> {
    let db = SledDb::open(dir)?;
    let tree = db.tree("state")?;
    let log =
        crate::segment_log::SegmentLog::open(&dir.join(crate::log_store::DIR), 64 << 20).map_err(io::Error::other)?;
    let bodies = crate::log_store::Bodies::of(log);
    let mut sm = StateMachine::new(tree.clone(), dir.join("snapshots"), bodies.clone())?;
    let key = SigningKey::from_bytes(&[11; 32]);
    let node = Node { public_key: hex::encode(key.verifying_key().as_bytes()), ..Default::default() };
    let m = Membership::new(vec![BTreeSet::from([1u64])], BTreeMap::from([(1u64, node)]));
    let io_err = |e: openraft::StorageError<u64>| io::Error::other(e.to_string());
    let membership = Entry { log_id: log_id(1), payload: EntryPayload::Membership(m) };
    bodies.append(&membership)?;
    sm.apply(vec![membership]).await.map_err(io_err)?;
    // Incompressible filler standing in for ciphertext (xorshift; no randomness needed).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let (mut done, mut index) = (0, 1);
    while done < leaves {
        let n = per_entry.min(leaves - done);
        let writes = (0..n)
            .map(|i| {
                let body = (0..body_bytes)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        state as u8
                    })
                    .collect();
                Write {
                    rtype: "Observation".into(),
                    id: format!("{:016x}", done + i),
                    version: 1,
                    op: Op::Create,
                    last_updated_ms: 1_700_000_000_000 + (done + i).cast_signed(),
                    compartment: "_shared".into(),
                    body,
                    content_sha256: [0; 32],
                    index: Vec::new(),
                }
            })
            .collect();
        let cmd = Command { actor: "bench".into(), preconditions: Vec::new(), new_keys: Vec::new(), writes };
        let batch = Batch { format: COMMAND_FORMAT, node_id: 1, commands: vec![cmd] };
        let signed = SignedBatch::sign(&batch, &key).map_err(io::Error::other)?;
        index += 1;
        let entry = Entry { log_id: log_id(index), payload: EntryPayload::Normal(signed) };
        bodies.append(&entry)?;
        sm.apply(vec![entry]).await.map_err(io_err)?;
        done += n;
        progress(done);
    }
    bodies.sync()?;
    tree.flush()?;
    Ok(sm.view())
}
