//! Tamper evidence end to end: real server processes write, the `fhir-ledger verify` binary
//! checks data directories, proof files and saved tree heads, and the tests play the attacker.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::Digest;

use crate::support::Server;

/// Runs `fhir-ledger <args>`: (exit code, stdout and stderr).
fn cli<I: AsRef<OsStr>>(args: impl IntoIterator<Item = I>) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-ledger")).args(args).output().expect("run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// `verify consistency --old <saved> <--proof FILE | --data-dir DIR> --trusted-key <key>`.
fn consistency(saved: &Path, against: (&str, &Path), key: &Path) -> (i32, String) {
    let (flag, path) = against;
    cli([
        OsStr::new("verify"),
        OsStr::new("consistency"),
        OsStr::new("--old"),
        saved.as_os_str(),
        OsStr::new(flag),
        path.as_os_str(),
        OsStr::new("--trusted-key"),
        key.as_os_str(),
    ])
}

fn verify_dir(dir: &Path) -> (i32, String) {
    cli([OsStr::new("verify"), OsStr::new("--data-dir"), dir.as_os_str()])
}

async fn post(base: &str, rtype: &str, body: Value) -> Value {
    let r = reqwest::Client::new()
        .post(format!("{base}/{rtype}"))
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    r.json().await.unwrap()
}

async fn patients(base: &str, family: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let p =
            post(base, "Patient", json!({"resourceType":"Patient","name":[{"family":format!("{family}{i}")}]})).await;
        ids.push(p["id"].as_str().unwrap().to_string());
    }
    ids
}

async fn get(url: String) -> (u16, Value) {
    let r = reqwest::get(url).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Saves a GET response as a file, as an auditor would with curl.
async fn save(url: String, to: PathBuf) -> PathBuf {
    let (status, body) = get(url).await;
    assert_eq!(status, 200, "{body}");
    std::fs::write(&to, body.to_string()).unwrap();
    to
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The entries of a store tree, as a tamperer sees them.
type Entries = [(Vec<u8>, Vec<u8>)];

/// Rewrites one stored value the way an attacker with write access to the store would (sled's
/// own checksums stay valid): `pick` chooses the entry of `tree`, `change` alters its value.
fn tamper(dir: &Path, tree: &str, pick: impl Fn(&Entries) -> usize, change: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let db = consensus::test_hooks::SledDb::open(&dir.join("ledger")).unwrap();
    let t = db.tree(tree).unwrap();
    let all: Vec<_> = t.scan_prefix(b"").map(|kv| kv.unwrap()).collect();
    let (k, mut v) = all[pick(&all)].clone();
    change(&mut v);
    let mut wb = consensus::test_hooks::WriteBatch::default();
    wb.put(k.clone(), v);
    t.apply(wb).unwrap();
    t.flush().unwrap();
    k
}

/// The entry with the greatest key starting with `prefix`.
fn last_with(prefix: &'static [u8]) -> impl Fn(&Entries) -> usize {
    move |all| all.iter().rposition(|(k, _)| k.starts_with(prefix)).expect("an entry with the prefix")
}

fn flip_last(v: &mut Vec<u8>) {
    #![allow(clippy::ptr_arg)] // passed where a `FnOnce(&mut Vec<u8>)` is expected
    let last = v.len() - 1;
    v[last] ^= 0x01;
}

/// `verify` passes an intact data directory (with a snapshot and a compacted log), then finds
/// and names a changed byte in each place a ledger keeps: a stored resource version, a ledger
/// record's header, the Raft log and the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_names_each_tampered_place() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_with(dir.path(), &["--snapshot-every", "8"]);
    patients(&server.base, "V", 20).await;
    // The cases below tamper with the one snapshot file: wait for the last build to finish
    // and for the file it replaced to be removed (gradually, after the build), which a
    // SIGKILL right after the creates can interrupt (one CI run found two files).
    let snaps = dir.path().join("ledger/snapshots");
    let settled = || {
        std::fs::read_dir(&snaps).map_or(0, Iterator::count) == 1
            && std::fs::read_dir(&snaps).unwrap().all(|e| e.unwrap().file_name().to_string_lossy().ends_with(".bin"))
    };
    let (waited, mut stable) = (std::time::Instant::now(), 0);
    while stable < 10 {
        assert!(waited.elapsed() < std::time::Duration::from_mins(1), "snapshot directory never settled");
        stable = if settled() { stable + 1 } else { 0 };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    server.kill9();
    let (code, out) = verify_dir(dir.path());
    assert_eq!(code, 0, "{out}");
    // 20 creates and the initial membership entries: a snapshot was built and the log
    // compacted, so some leaves are checked against the snapshot and the rest against the log.
    assert!(out.contains("ledger intact"), "{out}");
    assert!(!out.contains(" 0 in the snapshot") && !out.contains("(0 against"), "{out}");

    let case = |name: &str| {
        let d = dir.path().join(format!("case-{name}"));
        copy_dir(&dir.path().join("ledger"), &d.join("ledger"));
        d
    };

    // A stored resource version. Its ciphertext is kept once, in the signed log entry that
    // wrote it (the log cases below change it there); the version record says where. Moved
    // by a byte, the record points at other bytes of the entry.
    let d = case("resource");
    tamper(&d, "state", last_with(b"r"), |v| {
        let mut rec: consensus::test_hooks::StoredRecord = bincode::deserialize(v).unwrap();
        let consensus::test_hooks::BodyAt::Log { offset, .. } = &mut rec.body else { panic!("a body in the log") };
        *offset += 1;
        *v = bincode::serialize(&rec).unwrap();
    });
    let (code, out) = verify_dir(&d);
    assert_eq!(code, 1, "{out}");
    // (After SIGKILL the state may trail the durable log by the last entries; which leaf is
    // newest varies, so the test names none.)
    assert!(out.contains("TAMPERED leaf ") && out.contains("(Patient/"), "{out}");
    assert!(out.contains("does not match the digest its leaf committed to"), "{out}");
    // Compared with the signed log, the moved reference is named exactly.
    assert!(out.contains("ciphertext reference") && out.contains("is not where the signed raft log entry"), "{out}");

    // A ledger record: the actor in a leaf's header, with the body digest left intact.
    let d = case("header");
    tamper(&d, "state", last_with(b"r"), |v| {
        let mut rec: consensus::test_hooks::StoredRecord = bincode::deserialize(v).unwrap();
        rec.header.actor = "mallory".into();
        *v = bincode::serialize(&rec).unwrap();
    });
    let (code, out) = verify_dir(&d);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TAMPERED leaf ") && out.contains("header differs from the signed raft log entry"), "{out}");
    assert!(out.contains("in actor") && out.contains("TAMPERED merkle root"), "{out}");

    // The Raft log: the last byte of a batch, the record's checksums recomputed.
    let d = case("log");
    consensus::test_hooks::rewrite_last_log_record(&d.join("ledger"), flip_last).unwrap();
    let (code, out) = verify_dir(&d);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TAMPERED raft log entry") && out.contains("signature does not verify"), "{out}");

    // The Raft log damaged on disk (checksums not recomputed): a flipped byte in the middle
    // of a segment is named by file and offset, never taken for a shorter log.
    let d = case("log-damaged");
    let seg_dir = d.join("ledger/raft-log");
    let mut segs: Vec<_> = std::fs::read_dir(&seg_dir).unwrap().map(|e| e.unwrap().path()).collect();
    segs.sort();
    let seg = segs.pop().expect("a log segment");
    let mut bytes = std::fs::read(&seg).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();
    let (code, out) = verify_dir(&d);
    assert_eq!(code, 1, "{out}");
    let name = seg.file_name().unwrap().to_string_lossy().to_string();
    assert!(out.contains("TAMPERED raft log") && out.contains(&name) && out.contains("at byte"), "{out}");

    // The snapshot file: a byte in its middle, where the version records are. The attacker
    // also recomputes the file's checksum trailer, so only the records' own digests and the
    // Merkle root can tell.
    let snapshot_file = |d: &Path| {
        let snaps = d.join("ledger/snapshots");
        let mut files: Vec<_> = std::fs::read_dir(&snaps).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(files.len(), 1, "one current snapshot in {}", snaps.display());
        files.remove(0)
    };
    let d = case("snapshot");
    let path = snapshot_file(&d);
    let mut bytes = std::fs::read(&path).unwrap();
    let body = bytes.len() - 32;
    bytes[body / 2] ^= 0x01;
    let trailer: [u8; 32] = sha2::Sha256::digest(&bytes[..body]).into();
    bytes[body..].copy_from_slice(&trailer);
    std::fs::write(&path, &bytes).unwrap();
    let (code, out) = verify_dir(&d);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TAMPERED snapshot"), "{out}");
    // A damaged file (checksum not recomputed) is named as such.
    let d = case("snapshot-damaged");
    let path = snapshot_file(&d);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (code, out) = verify_dir(&d);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TAMPERED snapshot") && out.contains("is damaged"), "{out}");

    // Something that is no ledger at all cannot be checked.
    let (code, out) = verify_dir(&dir.path().join("nothing-here"));
    assert_eq!(code, 2, "{out}");
}

/// A byte flipped in the files themselves (not through the store): the Raft log's segment
/// files checksum every record, so a damaged record is never taken for a torn final write
/// (sled did that, and silently dropped it and everything after). The node refuses to start,
/// naming the file and offset; `verify` names them too and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_flipped_in_a_log_segment_refuses_the_node_and_fails_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let bundle = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea/patient-01.json"))
        .expect("../shared/data/synthea/patient-01.json");
    let r = reqwest::Client::new()
        .post(format!("{}/", server.base))
        .header("content-type", "application/fhir+json")
        .body(bundle)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    patients(&server.base, "After", 2).await;
    server.kill9();
    let segments = dir.path().join("ledger/raft-log");
    let largest = std::fs::read_dir(&segments)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .expect("a log segment");
    let mut bytes = std::fs::read(&largest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&largest, bytes).unwrap();
    let name = largest.file_name().unwrap().to_string_lossy().into_owned();

    let (code, out) = verify_dir(dir.path());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("TAMPERED raft log") && out.contains(&name) && out.contains("at byte"), "{out}");

    let out = std::process::Command::new(crate::support::binary())
        .args(["serve", "--auth", "off", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--profiles-dir")
        .arg(crate::support::profiles_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the node started on a damaged log: {stderr}");
    assert!(stderr.contains(&name) && stderr.contains("at byte"), "{stderr}");
}

/// An operator restores a backup and appends different entries (a history rewrite). The data
/// directory is internally consistent, so only a tree head an auditor saved earlier can tell:
/// its consistency check fails against the rewritten ledger and passes against the honest one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_history_fails_the_consistency_check_against_a_saved_head() {
    let tmp = tempfile::tempdir().unwrap();
    let (honest, rewritten) = (tmp.path().join("honest"), tmp.path().join("rewritten"));
    let key = honest.join("node.pub");
    let mut server = Server::start(&honest);
    patients(&server.base, "Kept", 6).await;
    server.kill9();
    copy_dir(&honest, &rewritten); // the backup at 6 leaves

    let server = Server::start(&honest);
    patients(&server.base, "Later", 4).await;
    let saved = save(format!("{}/ledger/head", server.base), tmp.path().join("head-10.json")).await;

    let forged = Server::start(&rewritten);
    patients(&forged.base, "Forged", 6).await;
    let proof = save(format!("{}/ledger/consistency?first=10", forged.base), tmp.path().join("forged.json")).await;
    let (code, out) = consistency(&saved, ("--proof", &proof), &key);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("INVALID") && out.contains("history was rewritten"), "{out}");

    patients(&server.base, "More", 2).await;
    let proof = save(format!("{}/ledger/consistency?first=10", server.base), tmp.path().join("honest.json")).await;
    let (code, out) = consistency(&saved, ("--proof", &proof), &key);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("VALID: the ledger of 12 leaves"), "{out}");
    // Between two saved heads: the proof must connect exactly those two.
    let later = save(format!("{}/ledger/head", server.base), tmp.path().join("head-12.json")).await;
    let with_new = |new: &Path| {
        let (old, proof) = (saved.as_os_str(), proof.as_os_str());
        cli([OsStr::new("verify"), OsStr::new("consistency"), OsStr::new("--old"), old, OsStr::new("--proof"), proof]
            .into_iter()
            .chain([OsStr::new("--new"), new.as_os_str(), OsStr::new("--trusted-key"), key.as_os_str()]))
    };
    let (code, out) = with_new(&later);
    assert_eq!(code, 0, "{out}");
    let forged_head = save(format!("{}/ledger/head", forged.base), tmp.path().join("forged-head.json")).await;
    let (code, out) = with_new(&forged_head);
    assert_eq!(code, 1, "the honest proof does not lead to the forged head: {out}");

    // Offline, against the stopped nodes' data directories.
    drop(server);
    drop(forged);
    let against = |dir: &Path| consistency(&saved, ("--data-dir", dir), &key);
    let (code, out) = against(&honest);
    assert_eq!(code, 0, "{out}");
    let (code, out) = against(&rewritten);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("history was rewritten"), "{out}");
    // The rewritten directory is internally consistent: the saved head is what caught it.
    let (code, out) = verify_dir(&rewritten);
    assert_eq!(code, 0, "{out}");
}

/// After a patient's compartment is erased (its data key destroyed), its versions no longer
/// read, yet their inclusion proofs still verify offline against the node's key; the proof
/// checker trusts only the keys it is given and notices any change to a proof file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_compartment_keeps_valid_proofs() {
    type Edit = fn(&mut Value);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("node.pub");
    let server = Server::start(dir.path());
    let base = server.base.clone();
    let pid = patients(&base, "Erased", 1).await.remove(0);
    let other = patients(&base, "Kept", 1).await.remove(0);
    let obs = post(
        &base,
        "Observation",
        json!({"resourceType":"Observation","status":"final","code":{"text":"glucose"},"subject":{"reference":format!("Patient/{pid}")}}),
    )
    .await;
    let oid = obs["id"].as_str().unwrap();
    let before_erasure = obs["meta"]["lastUpdated"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;

    let r = reqwest::Client::new().post(format!("{base}/Patient/{pid}/$erase")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let erased: Value = r.json().await.unwrap();
    assert_eq!(erased["parameter"][0]["valueString"], "2", "the patient and the observation: {erased}");

    // An export of the ledger as it was before the erasure (`_until`) finds those versions
    // current, yet holds none of them: no key opens them any more. What it holds verifies.
    let r = reqwest::Client::new()
        .get(format!("{base}/$export?_until={before_erasure}"))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let status = r.headers()["content-location"].to_str().unwrap().to_string();
    let export = dir.path().join("export");
    let (code, out) = cli([OsStr::new("export"), OsStr::new("download"), OsStr::new(&status), export.as_os_str()]);
    assert_eq!(code, 0, "{out}");
    let exported = std::fs::read_to_string(export.join("Patient-1.ndjson")).unwrap();
    assert!(exported.contains(&other) && !exported.contains(&pid), "{exported}");
    assert!(!export.join("Observation-1.ndjson").exists(), "the only Observation was erased: {out}");
    let (code, out) = cli([
        OsStr::new("verify"),
        OsStr::new("export"),
        export.as_os_str(),
        OsStr::new("--trusted-key"),
        key.as_os_str(),
    ]);
    assert_eq!(code, 0, "{out}");

    for path in [format!("Patient/{pid}"), format!("Observation/{oid}"), format!("Observation/{oid}/_history/1")] {
        let (status, body) = get(format!("{base}/{path}")).await;
        assert_eq!(status, 410, "{path}: {body}");
    }
    let (status, _) = get(format!("{base}/Patient/{other}")).await;
    assert_eq!(status, 200, "other patients are untouched");
    // Nothing new can be written into an erased compartment.
    let r = reqwest::Client::new()
        .post(format!("{base}/Observation"))
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":format!("Patient/{pid}")}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 410);

    let proof = save(format!("{base}/Observation/{oid}/_history/1/$proof"), dir.path().join("proof.json")).await;
    let check = |extra: &[&OsStr]| {
        let mut args = vec![OsStr::new("verify"), OsStr::new("proof"), proof.as_os_str()];
        args.extend_from_slice(extra);
        cli(args)
    };
    let (code, out) = check(&[OsStr::new("--trusted-key"), key.as_os_str()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("VALID: Observation/{oid}/_history/1 (create by")), "{out}");
    let erasure = save(format!("{base}/Observation/{oid}/_history/2/$proof"), dir.path().join("erasure.json")).await;
    let (code, out) = cli([
        OsStr::new("verify"),
        OsStr::new("proof"),
        erasure.as_os_str(),
        OsStr::new("--trusted-key"),
        key.as_os_str(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("_history/2 (erase by"), "the erasure is itself on the ledger: {out}");

    // Only the given keys count: a stranger's key, or a quorum the head does not reach, fails.
    let stranger = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
    let stranger = hex::encode(stranger.as_bytes());
    let (code, out) = check(&[OsStr::new("--trusted-key"), OsStr::new(&stranger)]);
    assert_eq!(code, 1, "{out}");
    let both = [OsStr::new("--trusted-key"), key.as_os_str(), OsStr::new("--trusted-key"), OsStr::new(&stranger)];
    let (code, out) = check(&both);
    assert_eq!(code, 1, "one signature is not a majority of two trusted keys: {out}");
    let mut quorum_one = both.to_vec();
    quorum_one.extend([OsStr::new("--quorum"), OsStr::new("1")]);
    let (code, out) = check(&quorum_one);
    assert_eq!(code, 0, "{out}");

    // Any change to the proof file is caught: a path hash, the root, the resource it names.
    let original: Value = serde_json::from_str(&std::fs::read_to_string(&proof).unwrap()).unwrap();
    let edits: [(&str, Edit); 3] = [
        ("audit path", |v| flip_b64(find(v, "auditPath"))),
        ("root", |v| flip_b64(&mut find_in(find(v, "treeHead"), "rootHash")["valueBase64Binary"])),
        ("resource", |v| find(v, "resource")["valueString"] = json!("Observation/someone-else/_history/1")),
    ];
    for (what, edit) in edits {
        let mut v = original.clone();
        edit(&mut v);
        std::fs::write(&proof, v.to_string()).unwrap();
        let (code, out) = check(&[OsStr::new("--trusted-key"), key.as_os_str()]);
        assert_eq!(code, 1, "a changed {what} must fail: {out}");
    }
    std::fs::write(&proof, "not json").unwrap();
    assert_eq!(check(&[OsStr::new("--trusted-key"), key.as_os_str()]).0, 2);

    // A running node's directory cannot be checked (sled holds its lock), and verify says why.
    let (code, out) = verify_dir(dir.path());
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("stop the server first"), "{out}");

    // The erasure keeps the data directory verifiable, and once the node has applied its whole
    // log, no wrapped key of the compartment remains in the state.
    drop(server);
    let (code, out) = verify_dir(dir.path());
    assert_eq!(code, 0, "{out}");
    let repo = crate::support::repo(dir.path()).await;
    repo.linearize().await.unwrap();
    assert_eq!(repo.view().data_key(&format!("Patient/{pid}")).unwrap(), Some(Vec::new()), "a tombstone, no key");
}

fn find<'a>(v: &'a mut Value, name: &str) -> &'a mut Value {
    find_in(v, name)
}

fn find_in<'a>(v: &'a mut Value, name: &str) -> &'a mut Value {
    let list = if v["parameter"].is_array() { &mut v["parameter"] } else { &mut v["part"] };
    list.as_array_mut().unwrap().iter_mut().find(|p| p["name"] == name).unwrap()
}

fn flip_b64(v: &mut Value) {
    use base64::Engine;
    let v = if v.is_object() { &mut v["valueBase64Binary"] } else { v };
    let mut bytes = base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap();
    bytes[0] ^= 1;
    *v = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
}
