//! Online backup and restore against real processes: a backup taken while 32 clients write,
//! restored into an empty directory, checked offline (`verify`, the consistency proof from the
//! backup's head), served again; and the progress bars of long commands on a terminal only.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::Server;

const TOKEN: &str = "backup-test-admin-token";

fn run(args: &[&str]) -> Output {
    Command::new(crate::support::binary())
        .args(args)
        .env("FHIR_LEDGER_ADMIN_TOKEN", TOKEN)
        .output()
        .expect("run fhir-ledger")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// One acknowledged create: its id, its leaf, and whether it was acknowledged before the
/// backup was asked for.
struct Acked {
    id: String,
    leaf: u64,
    before_backup: bool,
}

/// 32 clients create Patients until told to stop; each acknowledgement is recorded.
fn writers(
    base: &str,
    stop: &Arc<AtomicBool>,
    backup_asked: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Acked>>> {
    let http = reqwest::Client::new();
    (0..32)
        .map(|w| {
            let (http, base, stop, requested) = (http.clone(), base.to_string(), stop.clone(), backup_asked.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let body = json!({"resourceType": "Patient", "name": [{"family": format!("Writer{w}"), "given": [n.to_string()]}]});
                    n += 1;
                    let r = http
                        .post(format!("{base}/Patient"))
                        .header("content-type", "application/fhir+json")
                        .body(body.to_string())
                        .send()
                        .await
                        .expect("create");
                    assert_eq!(r.status(), 201, "a create under backup");
                    let leaf = r.headers()["x-ledger-leaf"].to_str().unwrap().parse().unwrap();
                    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
                    // Read once the acknowledgement is in hand.
                    let before_backup = !requested.load(Ordering::SeqCst);
                    acked.push(Acked { id, leaf, before_backup });
                }
                acked
            })
        })
        .collect()
}

/// A backup taken while 32 clients write holds exactly the tree its signed head names:
/// every write acknowledged before the backup was asked for, and of the writes racing it
/// those whose leaf is below the head's size and no other. Restored into an empty
/// directory, `verify` passes, the head is a prefix of the restored ledger, and a consistency
/// proof from the live node ties the backup to the node's later history; the restored node
/// serves it and takes new writes. The backup streams off the node: nothing of it stays there.
#[tokio::test]
async fn backup_under_writers_restores_into_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (d1, saved, d2) = (dir.path().join("node"), dir.path().join("backup"), dir.path().join("restored"));
    let node = Server::launch(&d1, &[], &[("FHIR_LEDGER_ADMIN_TOKEN", TOKEN)]);
    let synthea = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea");
    let out = run(&["load", "--node", &node.base, p(&synthea)]);
    assert!(out.status.success(), "{}", text(&out));

    let (stop, requested) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let tasks = writers(&node.base, &stop, &requested);
    tokio::time::sleep(Duration::from_millis(700)).await;
    requested.store(true, Ordering::SeqCst);
    let (base, to) = (node.base.clone(), p(&saved).to_string());
    let backup = tokio::task::spawn_blocking(move || run(&["backup", "--node", &base, "--to", &to])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(backup.status.success(), "{}", text(&backup));
    assert!(String::from_utf8_lossy(&backup.stdout).contains("head signed by 1 of 1 voters"), "{}", text(&backup));
    assert!(backup.stderr.is_empty(), "no progress bar when stderr is not a terminal: {}", text(&backup));
    let head: Value = serde_json::from_slice(&std::fs::read(saved.join("head.json")).unwrap()).unwrap();
    let size: u64 = head["parameter"][0]["valueString"].as_str().unwrap().parse().unwrap();
    assert!(acked.iter().any(|a| a.leaf >= size), "writes went on during the backup");
    assert!(acked.iter().filter(|a| a.before_backup).count() > 32, "writes were acknowledged before it");
    for a in acked.iter().filter(|a| a.before_backup) {
        assert!(a.leaf < size, "acknowledged before the backup, leaf {} is not in its {size} leaves", a.leaf);
    }
    let list: Value = reqwest::Client::new()
        .get(format!("{}/admin/backups", node.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["status"], "complete", "{list}");
    let sent = list[0]["bytes"].as_u64().unwrap();
    assert_eq!(
        sent,
        std::fs::metadata(saved.join("ledger.snapshot")).unwrap().len(),
        "what the node sent is what was saved"
    );
    assert!(!d1.join("ledger/local/backups").exists(), "nothing of it stays on the node's disk");

    // A damaged copy is refused before anything is written: a flipped byte fails the trailer;
    // a head of another tree (the live node's now) does not name the snapshot's root.
    let damaged = dir.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    for f in ["ledger.snapshot", "head.json", "backup.json"] {
        std::fs::copy(saved.join(f), damaged.join(f)).unwrap();
    }
    let mut bytes = std::fs::read(damaged.join("ledger.snapshot")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(damaged.join("ledger.snapshot"), &bytes).unwrap();
    let out = run(&["restore", "--from", p(&damaged), "--data-dir", p(&d2), "--keys-from", p(&d1)]);
    assert!(!out.status.success() && text(&out).contains("not an intact snapshot"), "{}", text(&out));
    std::fs::copy(saved.join("ledger.snapshot"), damaged.join("ledger.snapshot")).unwrap();
    let now = reqwest::get(format!("{}/ledger/head", node.base)).await.unwrap().text().await.unwrap();
    std::fs::write(damaged.join("head.json"), now).unwrap();
    let out = run(&["restore", "--from", p(&damaged), "--data-dir", p(&d2), "--keys-from", p(&d1)]);
    assert!(!out.status.success() && text(&out).contains("its head names"), "{}", text(&out));
    assert!(!d2.exists(), "a refused restore writes nothing");

    // Restoring needs the node's secrets; into a directory that holds a ledger, never.
    let out = run(&["restore", "--from", p(&saved), "--data-dir", p(&d2)]);
    assert!(!out.status.success() && text(&out).contains("node.key"), "{}", text(&out));
    assert!(!d2.exists(), "a refused restore writes nothing");
    let out = run(&["restore", "--from", p(&saved), "--data-dir", p(&d2), "--keys-from", p(&d1)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("restored {size} leaves")), "{}", text(&out));
    let out = run(&["restore", "--from", p(&saved), "--data-dir", p(&d2), "--keys-from", p(&d1)]);
    assert!(!out.status.success() && text(&out).contains("empty data directory"), "{}", text(&out));

    let out = run(&["verify", "--data-dir", p(&d2)]);
    assert!(out.status.success(), "verify on the restored copy: {}", text(&out));
    let node_pub = d1.join("node.pub");
    let out = run(&[
        "verify",
        "consistency",
        "--old",
        p(&saved.join("head.json")),
        "--data-dir",
        p(&d2),
        "--trusted-key",
        p(&node_pub),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // The live node went on: its ledger extends the backup's head.
    let proof =
        reqwest::get(format!("{}/ledger/consistency?first={size}", node.base)).await.unwrap().text().await.unwrap();
    let proof_file = dir.path().join("consistency.json");
    std::fs::write(&proof_file, proof).unwrap();
    let out = run(&[
        "verify",
        "consistency",
        "--old",
        p(&saved.join("head.json")),
        "--proof",
        p(&proof_file),
        "--trusted-key",
        p(&node_pub),
    ]);
    assert!(out.status.success() && text(&out).contains("extends the saved head"), "{}", text(&out));
    drop(node);

    let restored = Server::launch(&d2, &[], &[]);
    let http = reqwest::Client::new();
    for a in &acked {
        let status = http.get(format!("{}/Patient/{}", restored.base, a.id)).send().await.unwrap().status().as_u16();
        let wanted = if a.leaf < size { 200 } else { 404 };
        assert_eq!(status, wanted, "Patient/{} (leaf {}) on the node restored to {size} leaves", a.id, a.leaf);
    }
    let created = http
        .post(format!("{}/Patient", restored.base))
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType": "Patient", "name": [{"family": "AfterRestore"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "the restored node takes writes");
    assert_eq!(created.headers()["x-ledger-leaf"].to_str().unwrap(), size.to_string(), "the next leaf");
}

/// `POST /admin/snapshot` builds the node's Raft snapshot while 32 clients write (none of
/// them refused or stalled past the client's timeout), answers with the log index it covers
/// once it is built, and compacts the log behind it: a restart serves every acknowledged
/// write, `verify` passes over the compacted directory, and the node takes writes on. Only
/// the admin token opens it.
#[tokio::test]
async fn snapshot_on_demand_under_writers_compacts_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = Server::launch(&data, &[], &[("FHIR_LEDGER_ADMIN_TOKEN", TOKEN)]);
    let synthea = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea");
    let out = run(&["load", "--node", &node.base, p(&synthea)]);
    assert!(out.status.success(), "{}", text(&out));
    let http = reqwest::Client::new();
    let url = format!("{}/admin/snapshot", node.base);
    for (token, refused) in [(None, 401), (Some("not-the-token"), 403)] {
        let mut ask = http.post(&url);
        if let Some(t) = token {
            ask = ask.bearer_auth(t);
        }
        assert_eq!(ask.send().await.unwrap().status(), refused, "without the admin token ({token:?})");
    }
    let status = |http: reqwest::Client, base: String| async move {
        let r = http.get(format!("{base}/admin/cluster")).bearer_auth(TOKEN).send().await.unwrap();
        r.json::<Value>().await.unwrap()
    };
    let before = status(http.clone(), node.base.clone()).await;
    assert!(before["snapshot"].is_null(), "no snapshot yet: {before}");
    let applied = before["last_applied"].as_u64().unwrap();

    let (stop, requested) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let tasks = writers(&node.base, &stop, &requested);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let built = http.post(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(built.status(), 200);
    let built: Value = built.json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let covered = built["lastLogIndex"].as_u64().unwrap();
    assert!(covered >= applied, "the snapshot covers what was applied when asked: {built}, {before}");
    let after = status(http.clone(), node.base.clone()).await;
    assert_eq!(after["snapshot"].as_u64(), Some(covered), "{after}");
    assert!(after["purged"].as_u64().is_some_and(|p| p > 0), "the log was compacted: {after}");
    assert!(acked.len() > 32, "writes went on during the build");

    node.kill9();
    let out = run(&["verify", "--data-dir", p(&data)]);
    assert!(out.status.success(), "verify over the compacted directory: {}", text(&out));
    let node = Server::launch(&data, &[], &[("FHIR_LEDGER_ADMIN_TOKEN", TOKEN)]);
    for a in &acked {
        let r = http.get(format!("{}/Patient/{}", node.base, a.id)).send().await.unwrap();
        assert_eq!(r.status(), 200, "Patient/{} (leaf {}) after the restart", a.id, a.leaf);
    }
    let created = http
        .post(format!("{}/Patient", node.base))
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType": "Patient", "name": [{"family": "AfterSnapshot"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201, "the node takes writes after the snapshot and restart");
}

/// Long commands draw a progress bar (rate, time left) when stderr is a terminal, and leave
/// piped output alone: `load` under a pseudo-terminal (util-linux `script`), and piped.
#[tokio::test]
async fn progress_bars_on_a_terminal_and_not_in_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let node = Server::launch(&dir.path().join("node"), &[], &[]);
    let synthea = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea");
    let bin = crate::support::binary();
    let command = format!("{} load --node {} {}", bin.to_string_lossy(), node.base, synthea.display());
    let tty = tokio::task::spawn_blocking(move || {
        Command::new("script").args(["-qec", &command, "/dev/null"]).output().expect("run script(1)")
    })
    .await
    .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(
        shown.contains("resources") && shown.contains("ETA") && shown.contains("/s"),
        "a bar on a terminal: {shown}"
    );
    let piped = run(&["load", "--node", &node.base, p(&synthea)]);
    assert!(piped.status.success(), "{}", text(&piped));
    assert!(piped.stderr.is_empty(), "no bar in a pipe: {}", String::from_utf8_lossy(&piped.stderr));
    assert!(!String::from_utf8_lossy(&piped.stdout).contains("ETA"), "{}", text(&piped));
}
