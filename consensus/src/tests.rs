//! Tests of the storage layer through its internal API: openraft's own storage suite against
//! our sled stores, and the state machine's determinism and precondition semantics. (Unit
//! tests rather than `tests/`: the stores and the state machine are not part of the crate's
//! public API.)

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::command::{Batch, BatchOutcome, SignedBatch, COMMAND_FORMAT};
use crate::kv::KvStore;
use crate::log_store::{Bodies, LogStore};
use crate::segment_log::SegmentLog;
use crate::sled_store::SledDb;
use crate::state_machine::StateMachine;
use crate::{Command, Node, Op, Outcome, Precondition, TypeConfig, Write};
use ed25519_dalek::SigningKey;
use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{Entry, EntryPayload, LogId, Membership, StorageError};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| openraft::StorageIOError::write(&e))?;
        let db = SledDb::open(dir.path()).map_err(|e| openraft::StorageIOError::write(&e))?;
        let segments = crate::log_store::open_segments(&dir.path().join("raft-log"))
            .map_err(|e| openraft::StorageIOError::write(&std::io::Error::other(e.to_string())))?;
        let log = LogStore::open(segments, db.tree("raft_meta").map_err(|e| openraft::StorageIOError::write(&e))?)
            .map_err(|e| openraft::StorageIOError::write(&std::io::Error::other(e.to_string())))?;
        let state = db.tree("state").map_err(|e| openraft::StorageIOError::write(&e))?;
        let sm = StateMachine::open(state, dir.path().join("snapshots"), log.bodies())
            .map_err(|e| openraft::StorageIOError::write(&e))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).unwrap();
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn membership_entry(index: u64, key: &SigningKey) -> Entry<TypeConfig> {
    let node =
        Node { api_addr: "a".into(), raft_addr: "r".into(), public_key: hex::encode(key.verifying_key().as_bytes()) };
    let m = Membership::new(vec![std::collections::BTreeSet::from([1u64])], BTreeMap::from([(1u64, node)]));
    Entry { log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Membership(m) }
}

fn batch_entry(index: u64, key: &SigningKey, node_id: u64, commands: Vec<Command>) -> Entry<TypeConfig> {
    let signed = SignedBatch::sign(&Batch { format: COMMAND_FORMAT, node_id, commands }, key).unwrap();
    Entry { log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(signed) }
}

fn write(id: &str, version: u64, body: &[u8]) -> Write {
    Write {
        rtype: "Patient".into(),
        id: id.into(),
        version,
        op: if version == 1 { Op::Create } else { Op::Update },
        last_updated_ms: 1_700_000_000_000 + version.cast_signed(),
        compartment: format!("Patient/{id}"),
        body: body.to_vec(),
        content_sha256: [0; 32],
        index: vec![[version as u8; 32]],
    }
}

fn cmd(pre: Vec<Precondition>, writes: Vec<Write>) -> Command {
    Command { actor: "test".into(), preconditions: pre, new_keys: vec![], writes }
}

/// A state machine with the Raft log it reads bodies from: `apply` appends the entries to
/// the log first, as openraft does before it applies them.
struct Logged {
    sm: StateMachine,
    bodies: Bodies,
}

impl Logged {
    fn open(dir: &std::path::Path, state: Arc<dyn KvStore>) -> Self {
        let log = SegmentLog::open(&dir.join("raft-log"), 1 << 20).unwrap();
        let bodies = Bodies::of(log);
        Self { sm: StateMachine::open(state, dir.join("snapshots"), bodies.clone()).unwrap(), bodies }
    }

    async fn apply(&mut self, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<BatchOutcome>, StorageError<u64>> {
        for e in &entries {
            self.bodies.append(e).unwrap();
        }
        self.sm.apply(entries).await
    }
}

impl std::ops::Deref for Logged {
    type Target = StateMachine;
    fn deref(&self) -> &StateMachine {
        &self.sm
    }
}

fn fresh() -> (tempfile::TempDir, Logged, Arc<dyn KvStore>) {
    let dir = tempfile::tempdir().unwrap();
    let db = SledDb::open(dir.path()).unwrap();
    let tree = db.tree("state").unwrap();
    let sm = Logged::open(dir.path(), tree.clone());
    (dir, sm, tree)
}

fn scenario(k: &SigningKey) -> Vec<Entry<TypeConfig>> {
    let v = |id: &str, c: u64| Precondition::Version { rtype: "Patient".into(), id: id.into(), current: c };
    vec![
        membership_entry(1, k),
        batch_entry(
            2,
            k,
            1,
            vec![
                cmd(vec![v("a", 0)], vec![write("a", 1, b"a1")]),
                // Same precondition again in the same batch: the first write won, so this conflicts.
                cmd(vec![v("a", 0)], vec![write("a", 1, b"a1-again")]),
                cmd(vec![v("a", 1)], vec![write("a", 2, b"a2")]),
            ],
        ),
        // Signed by a key the membership does not list: refused as a whole.
        batch_entry(3, &SigningKey::from_bytes(&[1; 32]), 1, vec![cmd(vec![], vec![write("b", 1, b"forged")])]),
        // A transaction whose second precondition fails leaves nothing behind.
        batch_entry(4, k, 1, vec![cmd(vec![v("c", 0), v("a", 1)], vec![write("c", 1, b"c1")])]),
    ]
}

#[tokio::test]
async fn apply_checks_preconditions_signatures_and_is_atomic_per_command() {
    let k = key();
    let (_d, mut sm, _) = fresh();
    let out: Vec<BatchOutcome> = sm.apply(scenario(&k)).await.unwrap();
    assert_eq!(out[1].outcomes[0], Outcome::Applied { leaves: vec![0] });
    assert_eq!(out[1].outcomes[1], Outcome::Conflict { index: 0 });
    assert_eq!(out[1].outcomes[2], Outcome::Applied { leaves: vec![1] });
    assert!(matches!(out[2].outcomes[0], Outcome::Refused { .. }));
    assert_eq!(out[3].outcomes[0], Outcome::Conflict { index: 1 });
    let view = sm.view();
    assert_eq!(view.current("Patient", "a").unwrap().unwrap().version, 2);
    assert!(view.current("Patient", "b").unwrap().is_none(), "forged batch must not apply");
    assert!(view.current("Patient", "c").unwrap().is_none(), "failed transaction must leave nothing");
    assert_eq!(view.postings(&[2; 32], "Patient").unwrap(), vec!["a".to_string()]);
    assert!(view.postings(&[1; 32], "Patient").unwrap().is_empty(), "old version's terms are removed");
    assert_eq!(view.versions("Patient", "a").unwrap().len(), 2);
    assert_eq!(view.frontier().unwrap().size, 2);
}

#[tokio::test]
async fn two_nodes_applying_the_same_log_reach_the_same_root_and_state() {
    let k = key();
    let (_d1, mut a, ta) = fresh();
    let (_d2, mut b, tb) = fresh();
    let entries = scenario(&k);
    a.apply(entries.clone()).await.unwrap();
    // The second node applies the same log in smaller pieces.
    for e in entries {
        b.apply(vec![e]).await.unwrap();
    }
    assert_eq!(a.view().frontier().unwrap(), b.view().frontier().unwrap());
    let dump = |t: &Arc<dyn KvStore>| t.scan_prefix(b"").map(|kv| kv.unwrap()).collect::<Vec<_>>();
    assert_eq!(dump(&ta), dump(&tb));
}

/// A snapshot is the state at its point even while apply changes, deletes and adds keys
/// during the build: what it loads equals a node that applied only up to the point.
#[tokio::test]
async fn a_snapshot_is_its_point_in_time_while_apply_goes_on() {
    let k = key();
    let (_d, mut sm, _) = fresh();
    let (_r, mut reference, rtree) = fresh();
    let create = |n: u64, id: String| batch_entry(n, &k, 1, vec![cmd(vec![], vec![write(&id, 1, b"v1")])]);
    // Up to the point: 40 patients, so subtree hashes are stored too.
    let mut entries = vec![membership_entry(1, &k)];
    entries.extend((0..40).map(|i| create(2 + i, format!("p{i}"))));
    sm.apply(entries.clone()).await.unwrap();
    reference.apply(entries).await.unwrap();
    let (meta, frontier) = sm.snapshot_point().await.unwrap();
    // After it, before the stream reads anything: updates (current records change, postings
    // move), an erasure (a key tombstone appears), and new patients (records, subtrees).
    let mut later = Vec::new();
    for i in 0..10u64 {
        later.push(batch_entry(42 + i, &k, 1, vec![cmd(vec![], vec![write(&format!("p{i}"), 2, b"v2")])]));
    }
    let mut erase = write("p20", 2, b"");
    erase.op = Op::Erase;
    later.push(batch_entry(52, &k, 1, vec![cmd(vec![], vec![erase])]));
    later.extend((0..30).map(|i| create(53 + i, format!("q{i}"))));
    sm.apply(later).await.unwrap();
    let path = sm.write_snapshot(&meta, &frontier).unwrap();

    let (_l, _, loaded) = fresh();
    crate::state_machine::load_snapshot(loaded.as_ref(), &path, &meta, "test", &mut |_| {}).unwrap();
    // A snapshot carries the bodies (a follower installing it has not the log entries that
    // hold them), so records compare with their bodies read.
    let dump = |t: &Arc<dyn KvStore>, sm: &StateMachine| {
        t.scan_prefix(b"")
            .map(|kv| kv.unwrap())
            .filter(|(k, _)| !k.starts_with(b"m/") || k == b"m/frontier")
            .map(|(k, v)| if k.first() == Some(&b'r') { (k, sm.inlined(&v).unwrap()) } else { (k, v) })
            .collect::<Vec<_>>()
    };
    let (want, got) = (dump(&rtree, &reference), dump(&loaded, &reference));
    assert!(want.len() > 100, "a real state: {} keys", want.len());
    assert_eq!(got.len(), want.len(), "same keys");
    assert!(got == want, "the snapshot holds the state at its point, not a mix");
}

#[tokio::test]
async fn matches_precondition_guards_conditional_creates() {
    let k = key();
    let (_d, mut sm, _) = fresh();
    let term = [1u8; 32];
    let matches = |ids: Vec<&str>| Precondition::Matches {
        rtype: "Patient".into(),
        all_of: vec![vec![term]],
        ids: ids.into_iter().map(String::from).collect(),
    };
    let out = sm
        .apply(vec![
            membership_entry(1, &k),
            batch_entry(
                2,
                &k,
                1,
                vec![
                    // Two racing "create if none exists" commands: only the first may apply.
                    cmd(vec![matches(vec![])], vec![write("x", 1, b"x")]),
                    cmd(vec![matches(vec![])], vec![write("y", 1, b"y")]),
                    cmd(vec![matches(vec!["x"])], vec![]),
                ],
            ),
        ])
        .await
        .unwrap();
    assert_eq!(out[1].outcomes[0], Outcome::Applied { leaves: vec![0] });
    assert_eq!(out[1].outcomes[1], Outcome::Conflict { index: 0 });
    assert_eq!(out[1].outcomes[2], Outcome::Applied { leaves: vec![] });
}

#[tokio::test]
async fn a_command_writing_one_id_twice_is_refused() {
    let k = key();
    let (_d, mut sm, _) = fresh();
    let out = sm
        .apply(vec![
            membership_entry(1, &k),
            batch_entry(2, &k, 1, vec![cmd(vec![], vec![write("a", 1, b"x"), write("a", 1, b"y")])]),
        ])
        .await
        .unwrap();
    assert_eq!(out[1].outcomes[0], Outcome::Conflict { index: 1 });
    assert!(sm.view().current("Patient", "a").unwrap().is_none());
}

mod model {
    //! The state machine against a `BTreeMap` model, with reboots (reopening sled from disk)
    //! between batches, as sled's own tests do.
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Write resource `id` with the given index term, expecting version `expect` (or the
        /// model's current version when `None`).
        Put {
            id: u8,
            term: u8,
            expect: Option<u8>,
        },
        Delete {
            id: u8,
        },
        Reboot,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..4, 0u8..3, proptest::option::of(0u8..4)).prop_map(|(id, term, expect)| Op::Put { id, term, expect }),
            2 => (0u8..4).prop_map(|id| Op::Delete { id }),
            1 => Just(Op::Reboot),
        ]
    }

    #[derive(Default, Clone, Debug)]
    struct Res {
        version: u64,
        deleted: bool,
        term: u8,
    }

    fn open(dir: &std::path::Path) -> Logged {
        // sled releases its file lock when its background flusher lets go of the old handle,
        // a moment after the last one is dropped: a reboot waits for that, as a restarted
        // process would find the lock free.
        let mut attempts = 0;
        let db = loop {
            match SledDb::open(dir) {
                Ok(db) => break db,
                Err(e) if e.to_string().contains("could not acquire lock") && attempts < 500 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopening the store: {e}"),
            }
        };
        Logged::open(dir, db.tree("state").unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn matches_a_btreemap_model_across_reboots(ops in proptest::collection::vec(op(), 1..40)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let k = key();
                let dir = tempfile::tempdir().unwrap();
                let mut sm = open(dir.path());
                sm.apply(vec![membership_entry(1, &k)]).await.unwrap();
                let mut model: BTreeMap<u8, Res> = BTreeMap::new();
                let mut leaves = 0u64;
                // Raft log indexes are consecutive: a reboot or a skipped delete takes none.
                let mut index = 1;
                for op in ops {
                    match op {
                        Op::Reboot => {
                            drop(sm);
                            sm = open(dir.path());
                        }
                        Op::Put { id, term, expect } => {
                            let cur = model.get(&id).map_or(0, |r| r.version);
                            let expect = expect.map_or(cur, u64::from);
                            let w = Write {
                                rtype: "Patient".into(),
                                id: id.to_string(),
                                version: expect + 1,
                                op: crate::Op::Update,
                                last_updated_ms: 0,
                                compartment: "c".into(),
                                body: vec![id, term],
                                content_sha256: [0; 32],
                                index: vec![[term; 32]],
                            };
                            let pre = vec![Precondition::Version { rtype: "Patient".into(), id: id.to_string(), current: expect }];
                            index += 1;
                            let out = sm.apply(vec![batch_entry(index, &k, 1, vec![cmd(pre, vec![w])])]).await.unwrap();
                            if expect == cur {
                                prop_assert_eq!(&out[0].outcomes[0], &Outcome::Applied { leaves: vec![leaves] });
                                leaves += 1;
                                model.insert(id, Res { version: cur + 1, deleted: false, term });
                            } else {
                                let conflict = matches!(out[0].outcomes[0], Outcome::Conflict { .. });
                                prop_assert!(conflict, "stale version must conflict");
                            }
                        }
                        Op::Delete { id } => {
                            let Some(r) = model.get(&id).cloned().filter(|r| !r.deleted) else { continue };
                            let mut w = write(&id.to_string(), r.version + 1, b"");
                            w.op = crate::Op::Delete;
                            let pre = vec![Precondition::Version { rtype: "Patient".into(), id: id.to_string(), current: r.version }];
                            index += 1;
                            sm.apply(vec![batch_entry(index, &k, 1, vec![cmd(pre, vec![w])])]).await.unwrap();
                            leaves += 1;
                            model.insert(id, Res { version: r.version + 1, deleted: true, term: r.term });
                        }
                    }
                }
                let view = sm.view();
                prop_assert_eq!(view.frontier().unwrap().size, leaves);
                // Every leaf's inclusion proof, built from the stored subtree hashes, verifies
                // against the root, and every earlier tree size is consistent with this one.
                let root = view.frontier().unwrap().root();
                for leaf in 0..leaves {
                    let proof = crate::proof::inclusion_proof(&view, leaf, leaves).unwrap();
                    let hash = view.leaf_hash(leaf).unwrap().unwrap();
                    prop_assert!(crate::proof::verify_inclusion(leaf, leaves, &hash, &proof, &root));
                }
                // Proofs made many at a time, as an export's proof file makes them, equal those
                // made one at a time, at every earlier tree size too.
                for size in 1..=leaves {
                    let paths = crate::PathsAt::new(&view, size);
                    for leaf in 0..size {
                        let (header, data, path) = paths.proof(leaf).unwrap().unwrap();
                        prop_assert_eq!(Some(path), crate::proof::inclusion_proof(&view, leaf, size));
                        prop_assert_eq!(data, header.encode());
                        prop_assert_eq!(header, view.record(leaf).unwrap().unwrap().header);
                    }
                    prop_assert!(paths.proof(size).unwrap().is_none());
                }
                // The borrowed header fields a selection reads equal the records' headers.
                let mut fields = Vec::new();
                view.for_each_header_below(leaves, |leaf, h| {
                    fields.push((leaf, h.rtype.to_string(), h.id.to_string(), h.version, h.last_updated_ms, h.op.to_string(), h.compartment.to_string()));
                })
                .unwrap();
                let expected: Vec<_> = (0..leaves)
                    .map(|l| {
                        let h = view.record(l).unwrap().unwrap().header;
                        (l, h.rtype, h.id, h.version, h.last_updated_ms, h.op, h.compartment)
                    })
                    .collect();
                prop_assert_eq!(fields, expected);
                // Records streamed equal records read one by one: every leaf (one range scan),
                // every third, and all in descending order (read one at a time).
                for want in [(0..leaves).collect::<Vec<_>>(), (0..leaves).step_by(3).collect(), (0..leaves).rev().collect()] {
                    let mut got = Vec::new();
                    view.for_each_record(&want, &mut |leaf, h, body| {
                        got.push((leaf, h.clone(), body.to_vec()));
                        Ok(())
                    })
                    .unwrap();
                    let expected: Vec<_> = want
                        .iter()
                        .map(|&l| {
                            let r = view.record(l).unwrap().unwrap();
                            (l, r.header, r.body)
                        })
                        .collect();
                    prop_assert_eq!(got, expected);
                }
                for first in 1..leaves {
                    let proof = crate::proof::consistency_proof(&view, first, leaves).unwrap();
                    let first_root = crate::proof::root_at(&view, first).unwrap();
                    prop_assert!(crate::proof::verify_consistency(first, leaves, &first_root, &root, &proof));
                }
                for term in 0u8..3 {
                    let expected: Vec<String> =
                        model.iter().filter(|(_, r)| !r.deleted && r.term == term).map(|(id, _)| id.to_string()).collect();
                    prop_assert_eq!(view.postings(&[term; 32], "Patient").unwrap(), expected);
                }
                for (id, r) in &model {
                    let cur = view.current("Patient", &id.to_string()).unwrap().unwrap();
                    prop_assert_eq!(cur.version, r.version);
                    prop_assert_eq!(cur.deleted, r.deleted);
                    prop_assert_eq!(view.versions("Patient", &id.to_string()).unwrap().len() as u64, r.version);
                }
                Ok(())
            })?;
        }
    }
}

/// The stale read after failover (issue 17): a leader commits V, a follower serves V, and the
/// leader crashes before its commit index and applied state reach disk (sled flushes them
/// lazily; only the log is fsynced). It restarts within the election timeout. openraft 0.9
/// restores a node whose stored vote is its own committed leadership as leader of that term at
/// once, and a leader's read index is max(its first entry of the term, its commit index): both
/// older than V here, so the restored leader confirmed its leadership with a quorum and then
/// granted a read index that V is not under, and served (and handed followers) the value
/// before V. Each node runs on its own runtime and thread, so that a crash drops every task of
/// it, listener included; the crash image is the node's sled files from before V plus its
/// log from after.
mod failover {
    use std::collections::BTreeMap;
    use std::future::Future;
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use ed25519_dalek::SigningKey;

    use crate::{Command, Ledger, Options, Outcome, Precondition};

    /// One node's "process": a single-threaded runtime on a thread of its own.
    struct Proc {
        handle: tokio::runtime::Handle,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Proc {
        fn start() -> Self {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                handle_tx.send(rt.handle().clone()).unwrap();
                let _ = rt.block_on(stopped);
                // Dropping the runtime drops every task of this node: the crash.
            });
            Proc { handle: handle_rx.recv().unwrap(), stop: Some(stop), thread: Some(thread) }
        }

        fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
            futures::executor::block_on(self.handle.spawn(f)).unwrap()
        }

        fn crash(mut self) {
            drop(self.stop.take());
            if let Some(t) = self.thread.take() {
                t.join().unwrap();
            }
        }
    }

    fn node_key(id: u64) -> SigningKey {
        SigningKey::from_bytes(&[id as u8 + 100; 32])
    }

    /// Opens node `id` on `proc`, retrying while sled still holds the lock of a crashed
    /// instance (its flusher thread lets go a moment after the runtime is gone).
    fn open(proc: &Proc, id: u64, dir: &Path, raft_addr: &str) -> Ledger {
        let (dir, raft_addr) = (dir.to_path_buf(), raft_addr.to_string());
        proc.run(async move {
            for _ in 0..500 {
                let listener = std::net::TcpListener::bind(&raft_addr).unwrap();
                let opts = Options {
                    dir: &dir,
                    node_id: id,
                    key: node_key(id),
                    api_addr: format!("node{id}"),
                    snapshot_every: None,
                    raft_listener: Some(listener),
                    state_cache_bytes: 12 << 20,
                    lookup_cache_bytes: 4 << 20,
                };
                match Ledger::open(opts).await {
                    Ok(l) => return l,
                    Err(e) if e.to_string().contains("could not acquire lock") => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("opening node {id}: {e}"),
                }
            }
            panic!("node {id}: sled kept its lock");
        })
    }

    fn copy_dir(from: &Path, to: &Path, skip: &[&str]) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let name = e.file_name();
            if skip.iter().any(|s| name == *s) {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(&name), &[]);
            } else {
                std::fs::copy(e.path(), to.join(&name)).unwrap();
            }
        }
    }

    fn put(version: u64, body: &[u8]) -> Command {
        let pre = Precondition::Version { rtype: "Patient".into(), id: "reg".into(), current: version - 1 };
        super::cmd(vec![pre], vec![super::write("reg", version, body)])
    }

    fn current_version(l: &Ledger) -> Option<u64> {
        l.view().current("Patient", "reg").unwrap().map(|c| c.version)
    }

    fn proc(procs: &[Option<Proc>], i: usize) -> &Proc {
        procs[i].as_ref().unwrap()
    }

    fn is_leader(l: &Ledger) -> bool {
        l.raft.metrics().borrow().state == openraft::ServerState::Leader
    }

    #[test]
    fn a_restarted_leader_grants_no_read_index_below_what_it_committed() {
        let root = tempfile::tempdir().unwrap();
        let addrs: Vec<String> = {
            let ls: Vec<_> = (0..3).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
            ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect()
        };
        let dirs: Vec<PathBuf> = (1..=3).map(|id| root.path().join(format!("node{id}"))).collect();
        let mut procs: Vec<Option<Proc>> = (0..3).map(|_| Some(Proc::start())).collect();
        let mut nodes: Vec<Option<Ledger>> =
            (0..3).map(|i| Some(open(proc(&procs, i), i as u64 + 1, &dirs[i], &addrs[i]))).collect();
        let node = |nodes: &[Option<Ledger>], i: usize| -> Ledger { nodes[i].clone().unwrap() };

        // Form the cluster from node 1.
        let members: BTreeMap<u64, crate::Node> = (0..3).map(|i| (i as u64 + 1, node(&nodes, i).this_node())).collect();
        for i in 1..3 {
            node(&nodes, i).trust(1, &members[&1].public_key).unwrap();
        }
        let n1 = node(&nodes, 0);
        proc(&procs, 0).run(async move { n1.initialize(members).await.unwrap() });
        let mut waited = 0;
        let leader = loop {
            if let Some(i) = (0..3).find(|&i| is_leader(&node(&nodes, i))) {
                break i;
            }
            waited += 1;
            assert!(waited < 1000, "no leader within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        };
        let (f1, f2) = ((leader + 1) % 3, (leader + 2) % 3);

        // A is committed and applied everywhere.
        let l = node(&nodes, leader);
        let out = proc(&procs, leader).run(async move { l.submit(put(1, b"A")).await.unwrap() });
        assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
        // Quiescent (sled flushes every 500 ms): the leader's sled files as a crash would leave
        // them if nothing reached them after this point.
        std::thread::sleep(Duration::from_millis(1500));
        let image = root.path().join("crash-image");
        copy_dir(&dirs[leader], &image, &[crate::log_store::DIR]);

        // No follower may campaign while the leader is down: the restart happens within the
        // election timeout, and this makes it so on a slow machine too.
        for f in [f1, f2] {
            node(&nodes, f).raft.runtime_config().elect(false);
        }
        // V, written through a follower, is committed and applied on the leader and the follower,
        // and a linearizable read on the follower returns it.
        let follower = node(&nodes, f1);
        let out = proc(&procs, f1).run(async move {
            let out = follower.submit(put(2, b"V")).await.unwrap();
            follower.linearize().await.unwrap();
            out
        });
        assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
        assert_eq!(current_version(&node(&nodes, f1)), Some(2), "the follower serves V");
        let v_index = node(&nodes, f1).raft.metrics().borrow().last_applied.map(|l| l.index).unwrap();
        let term = node(&nodes, leader).raft.metrics().borrow().current_term;

        // The leader crashes: its log (fsynced) has V; its sled files are from before V.
        nodes[leader] = None;
        procs[leader].take().unwrap().crash();
        copy_dir(&dirs[leader].join(crate::log_store::DIR), &image.join(crate::log_store::DIR), &[]);

        // It restarts and is asked for a linearizable read at once.
        procs[leader] = Some(Proc::start());
        let restarted = open(proc(&procs, leader), leader as u64 + 1, &image, &addrs[leader]);
        let r = restarted.clone();
        let point = proc(&procs, leader).handle.spawn(async move { r.linearize().await });
        // Elections may go on now (the fixed node must win one before it serves reads).
        for f in [f1, f2] {
            node(&nodes, f).raft.runtime_config().elect(true);
        }
        let point = futures::executor::block_on(point).unwrap().expect("a linearizable read after the restart");
        assert!(
            point.read_index >= Some(v_index),
            "node {} (term {}, {}leader of term {term} before the crash) granted read index {:?} below V's \
             entry {v_index}, which a follower had already served",
            point.node,
            point.term,
            if point.term == term { "still " } else { "" },
            point.read_index,
        );
        assert_eq!(current_version(&restarted), Some(2), "the read after the restart sees V");

        drop((restarted, nodes));
        for p in procs.into_iter().flatten() {
            p.crash();
        }
    }
}

/// Bodies are written once: the record says where in its log entry the body lies, reads
/// find it there, and a snapshot carries it inline for a node that has not the log.
#[tokio::test]
async fn records_reference_their_bodies_in_the_log_and_snapshots_carry_them() {
    use crate::state_machine::{BodyAt, StoredRecord};
    let k = key();
    let (_d, mut sm, tree) = fresh();
    sm.apply(scenario(&k)).await.unwrap();
    let stored: StoredRecord =
        bincode::deserialize(&tree.get(&[b"r".as_slice(), &0u64.to_be_bytes()].concat()).unwrap().unwrap()).unwrap();
    assert!(matches!(stored.body, BodyAt::Log { index: 2, len: 2, .. }), "{:?}", stored.body);
    let view = sm.view();
    assert_eq!(view.version("Patient", "a", 1).unwrap().unwrap().body, b"a1");
    assert_eq!(view.version("Patient", "a", 2).unwrap().unwrap().body, b"a2");

    let (meta, frontier) = sm.snapshot_point().await.unwrap();
    let path = sm.write_snapshot(&meta, &frontier).unwrap();
    // Another node with an empty log loads the snapshot and reads the same bodies.
    let (_o, other, otree) = fresh();
    crate::state_machine::load_snapshot(otree.as_ref(), &path, &meta, "test", &mut |_| {}).unwrap();
    let stored: StoredRecord =
        bincode::deserialize(&otree.get(&[b"r".as_slice(), &1u64.to_be_bytes()].concat()).unwrap().unwrap()).unwrap();
    assert_eq!(stored.body, BodyAt::Inline(b"a2".to_vec()));
    assert_eq!(other.view().version("Patient", "a", 2).unwrap().unwrap().body, b"a2");
}

/// Bodies of one log entry streamed together (read with one read where they lie close, the
/// gaps skipped) equal records read one at a time: every leaf, every other leaf, runs on both
/// sides of bodies larger than a read may skip, and the same leaves in descending order.
#[tokio::test]
async fn bodies_of_one_entry_stream_as_they_read_one_by_one() {
    let k = key();
    let (_d, mut sm, _tree) = fresh();
    sm.apply(vec![membership_entry(1, &k)]).await.unwrap();
    let body = |i: usize| -> Vec<u8> {
        let len = if i % 40 == 7 { 40_000 } else { 1 + (i * 37) % 3_000 };
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    };
    let writes: Vec<Write> = (0..150).map(|i| write(&format!("p{i}"), 1, &body(i))).collect();
    sm.apply(vec![batch_entry(2, &k, 1, vec![cmd(vec![], writes)])]).await.unwrap();
    let view = sm.view();
    let one_by_one = |want: &[u64]| -> Vec<(u64, crate::LeafHeader, Vec<u8>)> {
        want.iter()
            .map(|&l| {
                let r = view.record(l).unwrap().unwrap();
                (l, r.header, r.body)
            })
            .collect()
    };
    let wants: Vec<Vec<u64>> = vec![
        (0..150).collect(),
        (0..150).step_by(2).collect(),
        vec![3, 4, 5, 6, 7, 8, 9, 46, 47, 48, 149],
        (0..150).rev().collect(),
    ];
    for want in &wants {
        let mut got = Vec::new();
        view.for_each_record(want, &mut |leaf, h, b| {
            got.push((leaf, h.clone(), b.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, one_by_one(want), "leaves {want:?}");
        assert!(got.iter().all(|(l, _, b)| *b == body(*l as usize)));
    }
}

/// Which id each leaf touched.
type Touched = Vec<(u64, (String, String))>;

/// The lookup tables (current records, postings, their leaf count) as stored, and which id
/// each leaf touched (stored one record per batch: a catch-up folds other batches than apply).
fn lookup_tables(kv: &dyn KvStore) -> (Vec<crate::lsm_store::Kv>, Touched) {
    let tables = [&b"c"[..], b"u", b"x"]
        .iter()
        .flat_map(|p| kv.scan_prefix(p).map(Result::unwrap).collect::<Vec<_>>())
        .collect();
    let mut touched = Vec::new();
    for (k, v) in kv.scan_prefix(b"t").map(Result::unwrap) {
        let (first, ids) = crate::state_machine::touched_ids(&k, &v).unwrap();
        touched.extend((first..).zip(ids));
    }
    (tables, touched)
}

/// A touched record reads back as written, old one-leaf records too, and a malformed one is an
/// error, not a shorter list (a step back would restore too few ids).
#[test]
fn touched_records_read_back_and_malformed_ones_are_refused() {
    use crate::state_machine::{touched_from, touched_ids, touched_key};
    let pair = |t: &str, i: &str| bincode::serialize(&(t, i)).unwrap();
    let two = [pair("Patient", "a"), pair("Observation", "b")].concat();
    let ids = vec![("Patient".to_string(), "a".to_string()), ("Observation".to_string(), "b".to_string())];
    assert_eq!(touched_ids(&touched_key(7, 2), &two).unwrap(), (7, ids.clone()));
    assert_eq!(touched_ids(&touched_from(9), &pair("Patient", "a")).unwrap(), (9, ids[..1].to_vec()));
    assert!(touched_ids(&touched_key(7, 3), &two).is_err(), "fewer ids than the key counts");
    assert!(touched_ids(&touched_key(7, 1), &two).is_err(), "bytes after the ids the key counts");
    assert!(touched_ids(&touched_from(7)[..5], &two).is_err(), "a key of no known length");
}

/// A crash can leave the lookup tables behind the ledger (their last batches lost) or ahead
/// of it (the ledger's last batches lost, to be re-applied from the Raft log); or they may be
/// gone. Opening the state brings them to exactly what applying the ledger's leaves gives.
#[tokio::test]
async fn lookup_tables_catch_up_or_step_back_to_the_ledger_at_open() {
    use crate::lsm_store::Tree;
    use crate::split_store::SplitStore;
    let k = key();
    let v = |id: &str, c: u64| Precondition::Version { rtype: "Patient".into(), id: id.into(), current: c };
    let first = vec![
        membership_entry(1, &k),
        batch_entry(2, &k, 1, vec![cmd(vec![v("a", 0)], vec![write("a", 1, b"a1"), write("b", 1, b"b1")])]),
    ];
    let mut delete_b = write("b", 2, b"");
    (delete_b.op, delete_b.index) = (Op::Delete, vec![]);
    let second = vec![batch_entry(
        3,
        &k,
        1,
        vec![
            cmd(vec![v("a", 1)], vec![write("a", 2, b"a2"), delete_b, write("c", 1, b"c1")]),
            cmd(vec![v("a", 2)], vec![write("a", 3, b"a3")]),
        ],
    )];
    // One node that applied both batches, one that applied the first only: real sled for the
    // ledger, a real LSM tree for the lookup, as a node has them.
    let node = || {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SledDb::open(dir.path()).unwrap().tree("state").unwrap();
        let lookup: Arc<dyn KvStore> = Arc::new(Tree::open(&dir.path().join("lookup"), "lookup", 8 << 20).unwrap());
        let split: Arc<dyn KvStore> = Arc::new(SplitStore::new(ledger.clone(), lookup.clone()));
        (dir, split, ledger, lookup)
    };
    let (both_dir, both, both_ledger, both_lookup) = node();
    let mut sm = Logged::open(both_dir.path(), both.clone());
    sm.apply(first.clone()).await.unwrap();
    sm.apply(second).await.unwrap();
    let (first_dir, first_only, first_ledger, first_lookup) = node();
    let mut sm1 = Logged::open(first_dir.path(), first_only.clone());
    sm1.apply(first).await.unwrap();
    let after_both = lookup_tables(both.as_ref());
    let after_first = lookup_tables(first_only.as_ref());
    assert_ne!(after_both, after_first);
    let reopen = |dir: &std::path::Path, ledger: &Arc<dyn KvStore>, lookup: &Arc<dyn KvStore>| {
        let split: Arc<dyn KvStore> = Arc::new(SplitStore::new(ledger.clone(), lookup.clone()));
        let bodies = Bodies::of(SegmentLog::open(&dir.join("raft-log"), 1 << 20).unwrap());
        StateMachine::open(split.clone(), dir.join("snapshots"), bodies).unwrap();
        lookup_tables(split.as_ref())
    };
    drop((sm, sm1));

    // Ahead: the first node's ledger with the tables that saw both batches steps back.
    assert_eq!(reopen(first_dir.path(), &first_ledger, &both_lookup), after_first);
    // Behind: the second batch's ledger with tables of the first folds the rest in.
    assert_eq!(reopen(both_dir.path(), &both_ledger, &first_lookup), after_both);
    // Gone: rebuilt from every version record.
    let empty: Arc<dyn KvStore> = Arc::new(Tree::open(&both_dir.path().join("fresh"), "lookup", 8 << 20).unwrap());
    assert_eq!(reopen(both_dir.path(), &both_ledger, &empty), after_both);
    // Ahead again, from tables rebuilt in one catch-up: the step back ends inside its record.
    assert_eq!(reopen(first_dir.path(), &first_ledger, &empty), after_first);
}
