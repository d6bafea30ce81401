//! The cluster under faults: 3-node clusters of real `fhir-ledger serve` processes on
//! 127.0.0.1, formed and grown with the real `fhir-ledger cluster` CLI. Leaders are killed with
//! SIGKILL, partitioned through the nodes' fault-injecting transport, impersonated and replayed
//! to; every history is checked for lost acknowledged writes and for linearizability.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::lincheck::{self, Kind, Op};
use crate::smart;
use crate::support::Server;

const TOKEN: &str = "cluster-test-admin-token";

/// One cluster test at a time: each runs 3-5 server processes, and on a 2-core machine two
/// clusters at once would turn election timeouts into noise.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Member {
    id: u64,
    dir: PathBuf,
    server: Option<Server>,
    api: String,
    raft: String,
}

struct Cluster {
    root: tempfile::TempDir,
    members: Vec<Member>,
    extra: Vec<String>,
    http: reqwest::Client,
    /// Nodes run with `--auth smart` (else `--auth off`).
    auth: bool,
    /// Keep `root` (data directories, the history of a failing run) when the test ends.
    keep: AtomicBool,
}

/// `n` distinct free ports on 127.0.0.1 (`127.0.0.1:port`): all bound at once, then released.
fn free_addrs(n: usize) -> Vec<String> {
    let listeners: Vec<std::net::TcpListener> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local address").to_string()).collect()
}

/// Runs `fhir-ledger cluster <args>` against the cluster: (success, stdout and stderr).
fn cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-ledger"))
        .arg("cluster")
        .args(args)
        .env("FHIR_LEDGER_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("run fhir-ledger cluster");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

impl Cluster {
    /// Starts `n` nodes and forms a cluster of them with `fhir-ledger cluster init`.
    fn start(n: u64, extra: &[&str]) -> Cluster {
        let apis = vec!["127.0.0.1:0".to_string(); n as usize];
        Self::form(extra.iter().map(ToString::to_string).collect(), false, &apis)
    }

    /// [`Cluster::start`] with SMART authorization on. The API ports are picked before the
    /// start so that every node is given node 1's URL as `--public-url`.
    fn start_auth(n: u64, extra: &[&str]) -> Cluster {
        let apis = free_addrs(n as usize);
        let mut extra: Vec<String> = extra.iter().map(ToString::to_string).collect();
        extra.extend(["--public-url".to_string(), format!("http://{}", apis[0])]);
        Self::form(extra, true, &apis)
    }

    /// Starts a node on each of `apis` and forms a cluster of them.
    fn form(extra: Vec<String>, auth: bool, apis: &[String]) -> Cluster {
        let root = tempfile::tempdir().unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
        let mut c = Cluster { root, members: vec![], extra, http, auth, keep: AtomicBool::new(false) };
        for (id, api) in (1..).zip(apis) {
            c.launch_at(id, api);
        }
        let mut args = vec!["init", "--node", &c.members[0].api];
        for m in &c.members[1..] {
            args.extend(["--member", &m.api]);
        }
        let (ok, out) = cli(&args);
        assert!(ok, "cluster init: {out}");
        c
    }

    /// Starts a new, empty node (not yet a member).
    fn launch(&mut self, id: u64) -> usize {
        self.launch_at(id, "127.0.0.1:0")
    }

    /// [`Cluster::launch`] with its API on `api`.
    fn launch_at(&mut self, id: u64, api: &str) -> usize {
        let dir = self.root.path().join(format!("node{id}"));
        let server = self.spawn(id, &dir, api, "127.0.0.1:0");
        let api = server.base.clone();
        let raft = server.raft.clone().expect("a raft address");
        self.members.push(Member { id, dir, server: Some(server), api, raft });
        self.members.len() - 1
    }

    fn spawn(&self, id: u64, dir: &Path, api: &str, raft: &str) -> Server {
        let secrets = self.root.path().join("secrets");
        let id = id.to_string();
        let api = api.trim_start_matches("http://");
        let mut args = vec!["--node-id", &id, "--listen", api, "--raft-listen", raft, "--fault-injection"];
        args.extend(["--secrets-dir", secrets.to_str().unwrap()]);
        args.extend(self.extra.iter().map(String::as_str));
        let env = [("FHIR_LEDGER_ADMIN_TOKEN", TOKEN)];
        if self.auth {
            Server::launch_auth(dir, &args, &env)
        } else {
            Server::launch(dir, &args, &env)
        }
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut s) = self.members[i].server.take() {
            s.kill9();
        }
    }

    /// Restarts a killed node from its data directory on its old addresses.
    fn restart(&mut self, i: usize) {
        let m = &self.members[i];
        let server = self.spawn(m.id, &m.dir, &m.api, &m.raft);
        self.members[i].server = Some(server);
    }

    /// An HTTP client, node 1's admin API, and a `system/*.cruds` token of a backend client
    /// registered there (valid on every node).
    async fn system_access(&self) -> (reqwest::Client, smart::Admin, String) {
        let http = smart::http_client();
        let admin = smart::Admin::new(&http, &self.members[0].api, TOKEN);
        let backend = smart::Backend::register(&admin, smart::ClientKey::ed25519(), "system/*.cruds").await;
        let sys = backend.token(&http, "system/*.cruds").await;
        (http, admin, sys)
    }

    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.members.len()).filter(|&i| self.members[i].server.is_some())
    }

    async fn admin(&self, i: usize, method: reqwest::Method, path: &str, body: Option<Value>) -> Option<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.members[i].api)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.timeout(Duration::from_secs(5)).send().await.ok()?;
        resp.status().is_success().then_some(())?;
        resp.json().await.ok()
    }

    async fn status(&self, i: usize) -> Option<Value> {
        self.admin(i, reqwest::Method::GET, "/admin/cluster", None).await
    }

    /// The member that a live node reports as leader and that agrees it leads.
    async fn leader(&self) -> usize {
        self.leader_except(usize::MAX).await
    }

    /// [`Cluster::leader`] among all members but `except` (one cut off still thinks it leads).
    async fn leader_except(&self, except: usize) -> usize {
        for _ in 0..300 {
            for i in self.live().filter(|&i| i != except).collect::<Vec<_>>() {
                let Some(s) = self.status(i).await else { continue };
                if s["state"] == "Leader" && s["leader"] == json!(self.members[i].id) {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no leader within 30 s");
    }

    /// Cuts member `i` off from every other node, both ways.
    async fn isolate(&self, i: usize) {
        let others: Vec<u64> = self.members.iter().filter(|m| m.id != self.members[i].id).map(|m| m.id).collect();
        self.admin(i, reqwest::Method::PUT, "/admin/faults", Some(json!({ "isolate": others }))).await.unwrap();
        for j in self.live().filter(|&j| j != i).collect::<Vec<_>>() {
            let body = json!({ "isolate": [self.members[i].id] });
            self.admin(j, reqwest::Method::PUT, "/admin/faults", Some(body)).await.unwrap();
        }
    }

    async fn heal(&self) {
        for j in self.live().collect::<Vec<_>>() {
            self.admin(j, reqwest::Method::PUT, "/admin/faults", Some(json!({ "isolate": [] }))).await.unwrap();
        }
    }

    /// Waits until every live node has applied the same log and publishes the same tree head;
    /// returns (tree size, root).
    async fn converged(&self) -> (String, String) {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let mut heads = vec![];
            for i in self.live().collect::<Vec<_>>() {
                let applied = self.status(i).await.map(|s| s["last_applied"].clone());
                let head: Option<Value> = async {
                    let r = self.http.get(format!("{}/ledger/head", self.members[i].api)).send().await.ok()?;
                    r.json().await.ok()
                }
                .await;
                let param = |h: &Value, name: &str| {
                    h["parameter"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == name)).cloned()
                };
                heads.push(head.map(|h| {
                    let size = param(&h, "treeSize").map(|p| p["valueString"].to_string()).unwrap_or_default();
                    let root = param(&h, "rootHash").map(|p| p["valueBase64Binary"].to_string()).unwrap_or_default();
                    (size, root, applied)
                }));
            }
            if let Some(Some(first)) = heads.first() {
                if heads.iter().all(|h| h.as_ref() == Some(first)) {
                    return (first.0.clone(), first.1.clone());
                }
            }
            assert!(Instant::now() < deadline, "nodes did not converge: {heads:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
        }
        if self.keep.load(Ordering::Relaxed) {
            self.root.disable_cleanup(true);
        }
    }
}

/// Recorded operations on per-key registers (Patient resources), and the writes acknowledged.
struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    /// (id, version, value) of every acknowledged write.
    acked: Mutex<Vec<(String, u64, u64)>>,
}

impl History {
    fn new() -> Arc<Self> {
        Arc::new(Self { start: Instant::now(), ops: Mutex::default(), acked: Mutex::default() })
    }
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
    fn record(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }
}

const SYSTEM: &str = "urn:fhir-ledger:test:register";

fn register_value(resource: &Value) -> Option<u64> {
    resource["identifier"].as_array()?.iter().find(|i| i["system"] == SYSTEM)?["value"].as_str()?.parse().ok()
}

/// A response header as text, `-` when absent.
fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_string()
}

fn version_of(resp: &reqwest::Response) -> Option<u64> {
    let etag = resp.headers().get("etag")?.to_str().ok()?;
    etag.trim_start_matches("W/").trim_matches('"').parse().ok()
}

/// Writes `value` to register `key` through `base`: PUT creates or updates the Patient.
async fn write(http: &reqwest::Client, h: &History, client: usize, base: &str, key: &str, value: u64) {
    let body = json!({ "resourceType": "Patient", "id": key, "identifier": [{ "system": SYSTEM, "value": value.to_string() }] });
    let call = h.now();
    let resp = http
        .put(format!("{base}/Patient/{key}"))
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await;
    let (ret, note) = match resp {
        Ok(r) if r.status().is_success() => {
            let version = version_of(&r).expect("an acknowledged write has an ETag");
            h.acked.lock().unwrap().push((key.to_string(), version, value));
            (
                Some(h.now()),
                format!("via {base}: {} v{version} leaf {}", r.status().as_u16(), header(&r, "x-ledger-leaf")),
            )
        }
        // 4xx (409 after losing races): certainly not written, nothing to record.
        Ok(r) if r.status().is_client_error() => return,
        // 503, a reset connection, a timeout: the write may or may not have happened.
        Ok(r) => (None, format!("via {base}: {}", r.status().as_u16())),
        Err(e) => (None, format!("via {base}: {e}")),
    };
    h.record(Op { client, key: key.to_string(), kind: Kind::Write(value), call, ret, note });
}

async fn read(http: &reqwest::Client, h: &History, client: usize, base: &str, key: &str) {
    let call = h.now();
    let Ok(resp) = http.get(format!("{base}/Patient/{key}")).send().await else { return };
    // Where the read was served, so that a history that is not linearizable names them.
    let note = format!(
        "via {base}: node {} term {} read index {} (from leader {}) applied {}",
        header(&resp, "x-ledger-node"),
        header(&resp, "x-ledger-term"),
        header(&resp, "x-ledger-read-index"),
        header(&resp, "x-ledger-read-leader"),
        header(&resp, "x-ledger-applied"),
    );
    let observed = match resp.status().as_u16() {
        200 => {
            let v: Value = resp.json().await.expect("a Patient");
            Some(register_value(&v).expect("a register value"))
        }
        404 => None,
        _ => return, // unavailable: the read tells nothing
    };
    h.record(Op { client, key: key.to_string(), kind: Kind::Read(observed), call, ret: Some(h.now()), note });
}

/// One client: random reads and writes on `keys` registers through random nodes until stopped.
async fn client(c: usize, bases: Vec<String>, keys: u64, stop: Arc<AtomicBool>, h: Arc<History>) {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("reg-{}", next() % keys);
        let base = &bases[(next() % bases.len() as u64) as usize];
        if next() % 2 == 0 {
            seq += 1;
            write(&http, &h, c, base, &key, ((c as u64) << 32) | seq).await;
        } else {
            read(&http, &h, c, base, &key).await;
        }
    }
}

/// After the run: a final read of every register on every node, the linearizability check,
/// and every acknowledged write read back (by version) from every node.
async fn check_history(cluster: &Cluster, h: &History, keys: u64) {
    let http = &cluster.http;
    for i in cluster.live().collect::<Vec<_>>() {
        for k in 0..keys {
            read(http, h, 1000 + i, &cluster.members[i].api, &format!("reg-{k}")).await;
        }
    }
    let ops = h.ops.lock().unwrap().clone();
    let violations = lincheck::check(&ops);
    if !violations.is_empty() {
        let path = keep_history(cluster, &ops, &violations);
        panic!("not linearizable (whole history in {}): {violations:#?}", path.display());
    }
    let acked = h.acked.lock().unwrap().clone();
    assert!(!acked.is_empty(), "the run acknowledged no write");
    for i in cluster.live().collect::<Vec<_>>() {
        for (key, version, value) in &acked {
            let url = format!("{}/Patient/{key}/_history/{version}", cluster.members[i].api);
            let resp = http.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200, "acknowledged write {key} v{version} missing on node {}", i + 1);
            let v: Value = resp.json().await.unwrap();
            assert_eq!(register_value(&v), Some(*value), "{key} v{version} on node {}", i + 1);
        }
    }
    eprintln!(
        "history: {} operations ({} acknowledged writes, {} with unknown outcome) linearizable",
        ops.len(),
        acked.len(),
        ops.iter().filter(|o| o.ret.is_none()).count()
    );
}

/// Writes the whole history of a failing run (every op with where it was served, by key and
/// call time) and its violations to `history.txt` in the cluster's directory, which is then
/// kept, data directories included; prints and returns the file's path.
fn keep_history(cluster: &Cluster, ops: &[Op], violations: &[lincheck::Violation]) -> PathBuf {
    let mut out = String::from("nodes:\n");
    for m in &cluster.members {
        let _ = writeln!(out, "  node {}: api {} raft {} data {}", m.id, m.api, m.raft, m.dir.display());
    }
    let _ = writeln!(out, "\nviolations:");
    for v in violations {
        let _ = writeln!(out, "key {}:\n{}", v.key, v.explanation);
    }
    let _ = writeln!(out, "\nhistory (ns since the start; ret ? = unknown outcome):");
    let mut sorted: Vec<&Op> = ops.iter().collect();
    sorted.sort_by(|a, b| (&a.key, a.call).cmp(&(&b.key, b.call)));
    for op in sorted {
        let ret = op.ret.map_or_else(|| "?".to_string(), |r| r.to_string());
        let _ = writeln!(out, "{} client {} {:?} call={} ret={ret} {}", op.key, op.client, op.kind, op.call, op.note);
    }
    let path = cluster.root.path().join("history.txt");
    std::fs::write(&path, out).expect("write the history");
    cluster.keep.store(true, Ordering::Relaxed);
    eprintln!("history of the failing run: {}", path.display());
    path
}

/// 16 clients write and read through all three nodes while the leader is killed with SIGKILL
/// every few seconds for a minute and restarted; afterwards every node holds every
/// acknowledged write, the Merkle roots agree and the history is linearizable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kills_lose_no_acknowledged_write() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3, &[]);
    let h = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    let bases: Vec<String> = cluster.members.iter().map(|m| m.api.clone()).collect();
    let keys = 24;
    let clients: Vec<_> =
        (0..16).map(|c| tokio::spawn(client(c, bases.clone(), keys, stop.clone(), h.clone()))).collect();
    let until = Instant::now() + Duration::from_mins(1);
    let mut kills = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let leader = cluster.leader().await;
        cluster.kill9(leader);
        kills += 1;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        cluster.restart(leader);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert!(kills >= 10, "{kills} kills");
    cluster.converged().await;
    // Every kill forced an election: a killed leader restarted within the election timeout
    // must not resume its old term (its commit index on disk may be behind what it had
    // committed, so it would grant stale read indexes: issue 17).
    let term = cluster.status(cluster.leader().await).await.and_then(|s| s["term"].as_u64()).unwrap_or(0);
    assert!(term > kills, "term {term} after {kills} leader kills");
    eprintln!("{kills} leader kills, final term {term}");
    check_history(&cluster, &h, keys).await;
}

/// The leader is cut off from the other two: it stops acknowledging writes, the majority elects
/// a new leader and goes on, and after healing the old leader's unacknowledged entries are gone
/// and all roots agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_acknowledges_nothing_and_its_entries_are_dropped() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3, &[]);
    let h = History::new();
    let http = &cluster.http;
    for k in 0..4 {
        write(http, &h, 0, &cluster.members[k % 3].api, &format!("reg-{k}"), k as u64).await;
    }
    let old = cluster.leader().await;
    // A follower serves a bounded-staleness read from its own state and says how stale.
    let follower = &cluster.members[(old + 1) % 3].api;
    let r = http.get(format!("{follower}/Patient/reg-0")).header("cache-control", "max-stale=5").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let stale: u64 = r.headers()["x-ledger-staleness-ms"].to_str().unwrap().parse().unwrap();
    assert!(stale < 5000, "{stale} ms");
    assert!(r.headers().get("x-ledger-read-index").is_none(), "a bounded-staleness read waits for no read index");
    // A linearizable read on a follower names the leader that granted its read index.
    let r = http.get(format!("{follower}/Patient/reg-0")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ledger-read-leader"), cluster.members[old].id.to_string());
    assert_eq!(header(&r, "x-ledger-node"), cluster.members[(old + 1) % 3].id.to_string());
    cluster.isolate(old).await;
    let old_api = cluster.members[old].api.clone();
    // Writes to the isolated leader: none may be acknowledged.
    let minority: Vec<_> = (0..4)
        .map(|k| {
            let (http, h, api) = (http.clone(), h.clone(), old_api.clone());
            tokio::spawn(async move { write(&http, &h, 10 + k, &api, &format!("lost-{k}"), 100 + k as u64).await })
        })
        .collect();
    // The majority goes on.
    let new = cluster.leader_except(old).await;
    let other = (0..3).find(|&i| i != old && i != new).unwrap();
    for k in 0..4u64 {
        let base = &cluster.members[if k % 2 == 0 { new } else { other }].api;
        write(http, &h, 1, base, &format!("reg-{k}"), 10 + k).await;
    }
    // A linearizable read on the minority side cannot be served.
    let r = http.get(format!("{old_api}/Patient/reg-0")).send().await.unwrap();
    assert_eq!(r.status(), 503, "a read on the isolated node must not pretend to be current");
    // Nor a bounded-staleness one: a leader cut off cannot vouch for how stale it is.
    let r =
        http.get(format!("{old_api}/Patient/reg-0")).header("cache-control", "max-stale=3600").send().await.unwrap();
    assert_eq!(r.status(), 503);
    for m in minority {
        m.await.unwrap();
    }
    let acked = h.acked.lock().unwrap().clone();
    assert!(acked.iter().all(|(k, _, _)| !k.starts_with("lost-")), "the minority acknowledged a write: {acked:?}");
    assert_eq!(acked.len(), 8);
    cluster.heal().await;
    cluster.converged().await;
    for i in 0..3 {
        for k in 0..4 {
            let r = http.get(format!("{}/Patient/lost-{k}", cluster.members[i].api)).send().await.unwrap();
            assert_eq!(r.status(), 404, "an unacknowledged write of the old leader survived on node {}", i + 1);
        }
    }
    check_history(&cluster, &h, 4).await;
}

/// The transport refuses a node that does not hold a member's key, a stranger, and a replayed
/// append-entries frame (on its own session and on another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_rpcs_are_refused() {
    use consensus::test_hooks::{openraft, Conn, Reply, Rpc, Shared, TypeConfig};
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(3, &[]);
    cluster.leader().await;
    let target = &cluster.members[1];
    let node = consensus::Node {
        api_addr: String::new(),
        raft_addr: target.raft.clone(),
        public_key: std::fs::read_to_string(target.dir.join("node.pub")).unwrap(),
    };
    let refused = |s: Value| s["refused_rpcs"].as_u64().unwrap();
    let before = refused(cluster.status(1).await.unwrap());

    // Node 1's id with a key that is not node 1's.
    let forger = Shared::new(1, ed25519_dalek::SigningKey::from_bytes(&[42; 32]));
    let err = Conn::connect(&forger, 2, &node).await.err().expect("a forged key is refused");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    // A node the membership does not list.
    let stranger = Shared::new(9, ed25519_dalek::SigningKey::from_bytes(&[43; 32]));
    assert!(Conn::connect(&stranger, 2, &node).await.is_err());

    // Node 1's real key: a frame is accepted once, and its replay is refused.
    let key_hex = std::fs::read_to_string(cluster.members[0].dir.join("node.key")).unwrap();
    let key: [u8; 32] = hex::decode(key_hex.trim()).unwrap().try_into().unwrap();
    let node1 = Shared::new(1, ed25519_dalek::SigningKey::from_bytes(&key));
    let stale = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: openraft::Vote::new_committed(0, 1),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    let body = bincode::serialize(&Rpc::AppendEntries(stale)).unwrap();
    let mut conn = Conn::connect(&node1, 2, &node).await.unwrap();
    let frame = conn.session().seal(body);
    conn.send_frame(&frame).await.unwrap();
    let reply = conn.read_reply().await.unwrap();
    assert!(matches!(reply, Reply::AppendEntries(_)), "{reply:?}");
    conn.send_frame(&frame).await.unwrap();
    assert!(conn.read_reply().await.is_err(), "a replayed frame is answered by closing the session");
    let mut other = Conn::connect(&node1, 2, &node).await.unwrap();
    other.send_frame(&frame).await.unwrap();
    assert!(other.read_reply().await.is_err(), "a frame of another session is refused");

    let after = refused(cluster.status(1).await.unwrap());
    assert!(after >= before + 4, "refusals are counted: {before} -> {after}");

    // Tree heads are cosigned by every voter holding the same tree: a proof fetched from one
    // node verifies offline against all three node keys with a quorum of three.
    let http = &cluster.http;
    let h = History::new();
    write(http, &h, 0, &cluster.members[2].api, "cosigned", 1).await;
    let proof =
        http.get(format!("{}/Patient/cosigned/_history/1/$proof", cluster.members[2].api)).send().await.unwrap();
    let path = cluster.root.path().join("proof.json");
    std::fs::write(&path, proof.bytes().await.unwrap()).unwrap();
    let keys: Vec<PathBuf> = cluster.members.iter().map(|m| m.dir.join("node.pub")).collect();
    let verify = |quorum: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-ledger"));
        cmd.args(["verify", "proof"]).arg(&path).args(["--quorum", quorum]);
        for k in &keys {
            cmd.arg("--trusted-key").arg(k);
        }
        let out = cmd.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, out) = verify("3");
    assert_eq!(code, Some(0), "{out}");
    // The cluster is unharmed.
    let (ok, out) = cli(&["status", "--node", &cluster.members[1].api]);
    assert!(ok && out.contains("Follower"), "{out}");
}

/// A 4th node added to a cluster that holds Synthea data and has compacted its log catches up
/// by snapshot install and serves identical reads; a node whose disk was wiped rejoins as a
/// new member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_node_catches_up_by_snapshot() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3, &["--snapshot-every", "20"]);
    let http = cluster.http.clone();
    let synthea = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea");
    let mut loaded = vec![];
    for name in ["patient-01.json", "patient-02.json"] {
        let bundle = std::fs::read_to_string(synthea.join(name)).unwrap();
        let base = &cluster.members[loaded.len() % 3].api;
        let r = http
            .post(format!("{base}/"))
            .header("content-type", "application/fhir+json")
            .body(bundle)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        for e in b["entry"].as_array().unwrap() {
            loaded.push(e["response"]["location"].as_str().unwrap().split("/_history").next().unwrap().to_string());
        }
    }
    // An online backup of a follower, before the log is compacted past it.
    let saved = cluster.root.path().join("backup-of-2");
    let (ok, out) = backup_cli(&["backup", "--node", &cluster.members[1].api, "--to", saved.to_str().unwrap()]);
    assert!(ok && out.contains("head signed by 3 of 3 voters"), "backup: {out}");
    let h = History::new();
    for k in 0..40 {
        write(&http, &h, 0, &cluster.members[k % 3].api, &format!("reg-{k}"), k as u64).await;
    }
    // Snapshots are built and the log compacted in the background after apply: wait for it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        let leader = cluster.leader().await;
        let s = cluster.status(leader).await.unwrap();
        if s["purged"].as_u64().is_some() || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(s["purged"].as_u64().is_some(), "the leader compacted its log within 30 s: {s}");

    let four = cluster.launch(4);
    let (ok, out) = cli(&["join", "--node", &cluster.members[0].api, "--new", &cluster.members[four].api, "--voter"]);
    assert!(ok, "join: {out}");
    assert!(out.contains("   4  voter"), "{out}");
    let s4 = cluster.status(four).await.unwrap();
    assert!(s4["snapshot"].as_u64().is_some(), "node 4 installed a snapshot: {s4}");
    cluster.converged().await;
    // Identical reads: every loaded resource, byte for byte, on node 4 and on node 1.
    for (n, loc) in loaded.iter().enumerate().step_by(7) {
        let path = loc.rsplitn(3, '/').take(2).collect::<Vec<_>>();
        let rel = format!("{}/{}", path[1], path[0]);
        let a = http.get(format!("{}/{rel}", cluster.members[0].api)).send().await.unwrap().text().await.unwrap();
        let b = http.get(format!("{}/{rel}", cluster.members[four].api)).send().await.unwrap().text().await.unwrap();
        assert_eq!(a, b, "resource {n} ({rel}) differs on node 4");
    }
    // The search index is derived from the ledger: the node that installed a snapshot answers
    // the same searches in the same order, and a page cursor issued by one node pages on the
    // other.
    let ids = |b: &Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["fullUrl"].as_str().unwrap().rsplitn(3, '/').take(2).collect::<Vec<_>>().join("<"))
            .collect()
    };
    let search = |node: usize, q: String| {
        let url = format!("{}/{q}", cluster.members[node].api);
        let http = http.clone();
        async move { http.get(url).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    for q in [
        "Observation?date=ge2010&_sort=-date,code&_count=30",
        "Condition?_count=500",
        "Patient?_revinclude=Encounter:patient&_count=2",
        "Observation?subject:Patient.gender=male,female&value-quantity=gt50&_count=100",
    ] {
        let (a, b) = (search(0, q.to_string()).await, search(four, q.to_string()).await);
        assert_eq!((a["total"].clone(), ids(&a)), (b["total"].clone(), ids(&b)), "{q} differs on node 4");
        assert!(!ids(&a).is_empty(), "{q} finds something");
    }
    let first = search(0, "Observation?_sort=date&_count=7".into()).await;
    let next = first["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let q = next.split_once("/Observation?").unwrap().1;
    let (a, b) = (search(0, format!("Observation?{q}")).await, search(four, format!("Observation?{q}")).await);
    assert_eq!(ids(&a), ids(&b), "node 1's cursor pages the same on node 4");

    // Wipe node 4's disk: it is removed, and rejoins as node 5.
    cluster.kill9(four);
    let (ok, out) = cli(&["remove", "--node", &cluster.members[0].api, "--id", "4"]);
    assert!(ok && !out.contains("   4  "), "remove: {out}");
    std::fs::remove_dir_all(&cluster.members[four].dir).unwrap();
    let five = cluster.launch(5);
    let (ok, out) = cli(&["join", "--node", &cluster.members[1].api, "--new", &cluster.members[five].api, "--voter"]);
    assert!(ok && out.contains("   5  voter"), "rejoin: {out}");
    cluster.converged().await;
    write(&http, &h, 0, &cluster.members[five].api, "reg-0", 99).await;

    // A node restored from the backup (the cluster's secrets, a key of its own) joins as a new
    // member: the leader compacted past the backup's last entry, so it catches up by snapshot.
    let six = cluster.root.path().join("node6");
    let secrets = cluster.root.path().join("secrets");
    let (ok, out) = backup_cli(&[
        "restore",
        "--from",
        saved.to_str().unwrap(),
        "--data-dir",
        six.to_str().unwrap(),
        "--keys-from",
        secrets.to_str().unwrap(),
    ]);
    assert!(ok && out.contains("cluster join"), "restore: {out}");
    let backed_up: Value = serde_json::from_slice(&std::fs::read(saved.join("backup.json")).unwrap()).unwrap();
    let backed_up = backed_up["snapshot"]["lastLogIndex"].as_u64().unwrap();
    let six = cluster.launch(6);
    let s6 = cluster.status(six).await.unwrap();
    assert_eq!(s6["snapshot"].as_u64(), Some(backed_up), "node 6 starts from the backup: {s6}");
    let (ok, out) = cli(&["join", "--node", &cluster.members[0].api, "--new", &cluster.members[six].api]);
    assert!(ok && out.contains("   6  learner"), "join of the restored node: {out}");
    let s6 = cluster.status(six).await.unwrap();
    assert!(s6["snapshot"].as_u64() > Some(backed_up), "node 6 caught up by a snapshot: {s6}");
    cluster.converged().await;
    let (a, b) = (&cluster.members[0].api, &cluster.members[six].api);
    for loc in loaded.iter().step_by(11) {
        let rel = loc.rsplitn(3, '/').take(2).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("/");
        let x = http.get(format!("{a}/{rel}")).send().await.unwrap().text().await.unwrap();
        let y = http.get(format!("{b}/{rel}")).send().await.unwrap().text().await.unwrap();
        assert_eq!(x, y, "{rel} on the restored node");
    }
    check_history(&cluster, &h, 40).await;
}

/// `fhir-ledger backup|restore …` with the cluster's admin token: (success, stdout and stderr).
fn backup_cli(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-ledger"))
        .args(args)
        .env("FHIR_LEDGER_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("run fhir-ledger");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A follower that forwarded to a leader before it was killed forwards to the new leader
/// without turning the first request after the kill into a 503 (its pooled session to the dead
/// leader must not be used), and the restarted node serves what was written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_writes_through_a_leader_change() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(3, &[]);
    let http = cluster.http.clone();
    let leader = cluster.leader().await;
    let follower = (leader + 1) % 3;
    let api = cluster.members[follower].api.clone();
    let put = |id: &str| {
        let body = json!({ "resourceType": "Patient", "id": id });
        http.put(format!("{api}/Patient/{id}")).header("content-type", "application/fhir+json").body(body.to_string())
    };
    assert_eq!(put("before").send().await.unwrap().status(), 201);
    assert_eq!(http.get(format!("{api}/Patient/before")).send().await.unwrap().status(), 200);
    cluster.kill9(leader);
    assert_eq!(put("during").send().await.unwrap().status(), 201, "the write waits for the new leader");
    assert_eq!(http.get(format!("{api}/Patient/during")).send().await.unwrap().status(), 200);
    cluster.restart(leader);
    cluster.converged().await;
    let old = &cluster.members[leader].api;
    assert_eq!(http.get(format!("{old}/Patient/during")).send().await.unwrap().status(), 200);

    // Removing the leader itself: the removal commits, the removed node loses its sessions,
    // the other two elect a leader between them and go on.
    let current = cluster.leader().await;
    let id = cluster.members[current].id.to_string();
    let other = (current + 1) % 3;
    let (ok, out) = cli(&["remove", "--node", &cluster.members[other].api, "--id", &id]);
    assert!(ok, "remove the leader: {out}");
    let next = cluster.leader_except(current).await;
    let s = cluster.status(next).await.unwrap();
    assert_eq!(s["voters"].as_array().map(Vec::len), Some(2), "{s}");
    let follower = (0..3).find(|&i| i != current && i != next).unwrap();
    let api = &cluster.members[follower].api;
    let r = http
        .put(format!("{api}/Patient/after"))
        .header("content-type", "application/fhir+json")
        .body(json!({ "resourceType": "Patient", "id": "after" }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "the two remaining nodes take writes");
}

/// SMART on a cluster: every node has node 1's URL as `--public-url`; a token issued by node 1
/// through the browser flow works on nodes 2 and 3, and when the patient withdraws the app in
/// node 1's portal (the app's Consent becomes inactive), the very next request with that token
/// on node 2 and on node 3 is a 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_revocation_stops_a_token_on_every_node() {
    use reqwest::header::COOKIE;
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start_auth(3, &[]);
    cluster.leader().await;
    let api: Vec<String> = cluster.members.iter().map(|m| m.api.clone()).collect();
    let (http, admin, sys) = cluster.system_access().await;
    smart::put_resource(&http, &api[0], &sys, &smart::patient("pat-a")).await;
    let client_id = admin.public_client("Cluster App", None).await;
    admin.user("alice", "Patient/pat-a").await;

    let scopes = ["launch/patient", "patient/*.rs"];
    let flow = smart::browser_flow(&http, &api[0], &client_id, &scopes, &smart::Login::new("alice")).await;
    let r = smart::exchange(&http, &api[0], &client_id, &flow.code, &flow.verifier).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let token = r.json();
    let access = token["access_token"].as_str().expect("access_token").to_string();
    let consent = token["consent"].as_str().expect("the approval's Consent").trim_start_matches("Consent/").to_string();
    for i in [1, 2] {
        let r = smart::get(&http, &format!("{}/Patient/pat-a", api[i]), &access).await;
        assert_eq!(r.status, 200, "node {}: {}", i + 1, r.text);
    }

    // The patient withdraws the app in the portal of node 1.
    let portal = smart::send(http.get(format!("{}/portal", api[0])).header(COOKIE, &flow.session)).await;
    assert_eq!(portal.status, 200, "{}", portal.text);
    assert!(portal.text.contains(&format!(r#"id="withdraw-{consent}""#)), "{}", portal.text);
    let action = format!("/portal/apps/{consent}/withdraw");
    let fields =
        smart::form_fields(&portal.text, &action).unwrap_or_else(|| panic!("no form {action}: {}", portal.text));
    let r = smart::send(http.post(format!("{}{action}", api[0])).header(COOKIE, &flow.session).form(&fields)).await;
    assert!((200..400).contains(&r.status), "withdraw: {} {}", r.status, r.text);

    for i in [1, 2] {
        let r = smart::get(&http, &format!("{}/Patient/pat-a", api[i]), &access).await;
        smart::assert_invalid_token(&r, &format!("the next request on node {} after the withdrawal", i + 1));
    }
    let r = smart::get(&http, &format!("{}/Consent/{consent}", api[2]), &sys).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "inactive", "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_is_polled_and_downloaded_on_any_node_and_outlives_the_node_that_ran_it() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start_auth(3, &[]);
    cluster.leader().await;
    let api: Vec<String> = cluster.members.iter().map(|m| m.api.clone()).collect();
    let (http, _, sys) = cluster.system_access().await;
    let bundle: Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea/patient-01.json")).unwrap(),
    )
    .unwrap();
    let r = smart::fhir(&http, reqwest::Method::POST, &api[0], Some(&sys), Some(&bundle)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let expected = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| matches!(e["resource"]["resourceType"].as_str(), Some("Patient" | "Observation")))
        .count() as u64;

    // Kicked off on node 1; its status and files answered by nodes 2 and 3.
    let r = smart::send(
        http.get(format!("{}/$export?_type=Patient,Observation", api[0]))
            .bearer_auth(&sys)
            .header("prefer", "respond-async"),
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text);
    let status = r.header("content-location");
    let job = status.rsplit('/').next().unwrap().to_string();
    let keys: Vec<ed25519_dalek::VerifyingKey> = cluster
        .members
        .iter()
        .map(|m| {
            let hex_key = std::fs::read_to_string(m.dir.join("node.pub")).unwrap();
            ed25519_dalek::VerifyingKey::from_bytes(&hex::decode(hex_key.trim()).unwrap().try_into().unwrap()).unwrap()
        })
        .collect();
    let keys = &keys;
    let download = |node: usize| {
        let (url, sys) = (format!("{}/bulk/{job}", api[node]), sys.clone());
        async move {
            let dir = tempfile::tempdir().unwrap();
            let manifest = fhir_ledger::transfer::fetch::download(&url, dir.path(), Some(&sys)).await.unwrap();
            // Trusting the three node keys, two of which must have signed the export's head.
            let v = fhir_ledger::bulk::check::check_dir(dir.path(), keys, 2)
                .unwrap_or_else(|e| panic!("node {}'s download does not verify: {e:?}", node + 1));
            (manifest, v.lines, v.head.size)
        }
    };
    let (manifest, lines, size) = download(1).await;
    assert_eq!(lines, expected, "{manifest}");
    assert!(manifest["output"][0]["url"].as_str().unwrap().starts_with(&api[1]), "{manifest}");

    // The node that ran it goes away: the job, its files and their digests stay.
    cluster.kill9(0);
    cluster.leader().await;
    let (again, lines_again, size_again) = download(2).await;
    assert_eq!((lines_again, size_again), (lines, size), "the same export, pinned to the same head");
    let digests = |m: &Value| -> Vec<Value> {
        m["output"].as_array().unwrap().iter().map(|o| o["extension"]["urn:fhir-ledger:bulk:sha256"].clone()).collect()
    };
    assert_eq!(digests(&again), digests(&manifest), "every download of a file is the same bytes");
}
