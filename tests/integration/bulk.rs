//! Bulk Data `$export` against a real server process with SMART on: kick-off at every level,
//! polling, files, the trust label, `_since`/`deleted`, `_typeFilter`, `_elements`, cancel,
//! errors, and the one door: a patient's token, another client and a token without scopes
//! never reach another patient's data through an export.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::smart::{self, fhir, get, put_resource, Resp, SmartServer};

/// A finished export: its manifest and every file it links, by name.
pub struct Export {
    pub manifest: Value,
    pub files: BTreeMap<String, String>,
}

impl Export {
    /// Every resource of the outputs.
    pub fn resources(&self) -> Vec<Value> {
        self.manifest["output"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|o| self.lines(o["url"].as_str().unwrap_or_default()))
            .collect()
    }

    pub fn lines(&self, url: &str) -> Vec<Value> {
        let name = url.rsplit('/').next().unwrap_or_default();
        self.files[name].lines().map(|l| serde_json::from_str(l).expect("an NDJSON line")).collect()
    }

    pub fn ids(&self, rtype: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .resources()
            .iter()
            .filter(|r| r["resourceType"] == rtype)
            .map(|r| r["id"].as_str().unwrap_or_default().to_string())
            .collect();
        ids.sort();
        ids
    }
}

pub async fn kickoff(s: &SmartServer, method: Method, path: &str, token: &str, body: Option<&Value>) -> Resp {
    let mut req = s.http.request(method, s.url(path)).bearer_auth(token).header("prefer", "respond-async");
    if let Some(b) = body {
        req = req.header("content-type", "application/fhir+json").body(b.to_string());
    }
    smart::send(req).await
}

/// Polls `status_url` as the IG's clients do (waiting `Retry-After`) until it answers 200;
/// the manifest.
pub async fn completed(s: &SmartServer, status_url: &str, token: &str) -> Value {
    let mut manifest = Value::Null;
    for _ in 0..120 {
        let r = get(&s.http, status_url, token).await;
        match r.status {
            200 => {
                manifest = r.json();
                assert!(!r.header("expires").is_empty(), "a manifest says when it expires");
                break;
            }
            202 => {
                assert!(!r.header("x-progress").is_empty(), "a 202 says how far the export got");
                let wait: u64 = r.header("retry-after").parse().expect("Retry-After in seconds");
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            other => panic!("polling {status_url}: {other} {}", r.text),
        }
    }
    assert!(manifest.is_object(), "the export finished within two minutes");
    manifest
}

/// [`completed`], then every file of the manifest downloaded and checked against its count
/// and digest.
pub async fn finish(s: &SmartServer, status_url: &str, token: &str) -> Export {
    let manifest = completed(s, status_url, token).await;
    let mut files = BTreeMap::new();
    for kind in ["output", "deleted", "error"] {
        for item in manifest[kind].as_array().expect("an array per kind") {
            let url = item["url"].as_str().expect("url");
            let r = get(&s.http, url, token).await;
            assert_eq!(r.status, 200, "{url}: {}", r.text);
            assert_eq!(r.header("content-type"), "application/fhir+ndjson", "{url}");
            assert_eq!(r.text.lines().count() as u64, item["count"].as_u64().expect("count"), "{url}");
            let digest = hex::encode(Sha256::digest(r.text.as_bytes()));
            assert_eq!(item["extension"]["urn:fhir-ledger:bulk:sha256"], json!(digest), "{url}");
            files.insert(url.rsplit('/').next().unwrap_or_default().to_string(), r.text);
        }
    }
    Export { manifest, files }
}

pub async fn export(s: &SmartServer, path: &str, token: &str) -> Export {
    let r = kickoff(s, Method::GET, path, token, None).await;
    assert_eq!(r.status, 202, "kick-off {path}: {}", r.text);
    finish(s, &r.header("content-location"), token).await
}

fn observation(id: &str, patient: &str, code: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": format!("obs {id}")},
           "subject": {"reference": format!("Patient/{patient}")}, "valueString": format!("secret of {patient}")})
}

/// Two patients with Observations, a Practitioner, a Group of one, a Provenance.
async fn seed(s: &SmartServer, sys: &str) {
    let mut all = vec![smart::patient("pat-a"), smart::patient("pat-b")];
    for (id, p, code) in [("obs-a1", "pat-a", "1-1"), ("obs-a2", "pat-a", "2-2"), ("obs-b1", "pat-b", "1-1")] {
        all.push(observation(id, p, code));
    }
    all.push(json!({"resourceType": "Practitioner", "id": "doc-1", "name": [{"family": "Who"}]}));
    all.push(json!({"resourceType": "Group", "id": "grp-b", "type": "person", "actual": true,
                    "member": [{"entity": {"reference": "Patient/pat-b"}}]}));
    all.push(json!({"resourceType": "Provenance", "id": "prov-a1", "recorded": "2024-01-01T00:00:00Z",
                    "target": [{"reference": "Observation/obs-a1"}],
                    "agent": [{"who": {"reference": "Practitioner/doc-1"}}]}));
    for r in &all {
        put_resource(&s.http, &s.base, sys, r).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_follow_the_bulk_data_ig_and_stay_inside_the_callers_rights() {
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    seed(&s, &sys).await;

    // System level: everything, one file per type, each checked against its digest.
    let all = export(&s, "/$export", &sys).await;
    assert_eq!(all.ids("Patient"), ["pat-a", "pat-b"]);
    assert_eq!(all.ids("Observation"), ["obs-a1", "obs-a2", "obs-b1"]);
    assert_eq!(all.ids("Practitioner"), ["doc-1"]);
    assert_eq!(all.manifest["requiresAccessToken"], true);
    assert!(all.manifest["request"].as_str().is_some_and(|r| r.ends_with("/$export")), "{}", all.manifest);
    let head = &all.manifest["extension"]["urn:fhir-ledger:bulk:trust-label"]["label"]["treeHead"];
    assert!(head.as_array().is_some_and(|p| p.iter().any(|x| x["name"] == "treeSize")), "{head}");

    // Patient level with _type, _typeFilter and _elements.
    let r = kickoff(
        &s,
        Method::GET,
        "/Patient/$export?_type=Observation&_typeFilter=Observation%3Fcode%3D1-1&_elements=Observation.code",
        &sys,
        None,
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.text);
    // The first poll waits for a job running on this node (long polling): a small export is
    // answered with its manifest, not a 202 that makes the client wait `Retry-After`.
    let first = get(&s.http, &r.header("content-location"), &sys).await;
    assert_eq!(first.status, 200, "the first poll of a small export gets its manifest: {}", first.text);
    let lab = finish(&s, &r.header("content-location"), &sys).await;
    assert_eq!(lab.ids("Observation"), ["obs-a1", "obs-b1"], "only code 1-1");
    for o in lab.resources() {
        assert!(o.get("valueString").is_none() && o.get("code").is_some(), "_elements kept code only: {o}");
        assert!(o["meta"]["tag"].to_string().contains("SUBSETTED"), "{o}");
    }

    // Group level: the group's member only; Provenance of exported resources when asked.
    let grp = export(&s, "/Group/grp-b/$export", &sys).await;
    assert_eq!(grp.ids("Patient"), ["pat-b"]);
    assert_eq!(grp.ids("Observation"), ["obs-b1"]);
    let prov =
        export(&s, "/Patient/$export?_type=Observation&includeAssociatedData=LatestProvenanceResources", &sys).await;
    assert_eq!(prov.ids("Provenance"), ["prov-a1"]);

    // _since: the changed resource, and the deletion in `deleted`.
    // The newest write so far: the seed's last resource.
    let last = get(&s.http, &s.url("/Provenance/prov-a1"), &sys).await.json();
    let since = last["meta"]["lastUpdated"].as_str().expect("lastUpdated").replace('+', "%2B");
    tokio::time::sleep(Duration::from_millis(5)).await;
    put_resource(&s.http, &s.base, &sys, &observation("obs-a2", "pat-a", "3-3")).await;
    let r = fhir(&s.http, Method::DELETE, &s.url("/Observation/obs-b1"), Some(&sys), None).await;
    assert!(r.status < 300, "{}", r.text);
    let delta = export(&s, &format!("/$export?_since={since}"), &sys).await;
    assert_eq!(delta.ids("Observation"), ["obs-a2"]);
    assert_eq!(delta.ids("Patient"), Vec::<String>::new());
    let deleted: Vec<Value> = delta.manifest["deleted"]
        .as_array()
        .expect("deleted")
        .iter()
        .flat_map(|d| delta.lines(d["url"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0]["entry"][0]["request"], json!({"method": "DELETE", "url": "Observation/obs-b1"}));

    // Errors: without respond-async, an unknown parameter or a result parameter in a type
    // filter is a 400 naming it; lenient handling reports it in the error file instead.
    let r = get(&s.http, &s.url("/$export"), &sys).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("respond-async"), "{}", r.text);
    for (path, names) in [
        ("/$export?_outputFormat=text/csv", "_outputFormat"),
        ("/$export?_typeFilter=Observation%3F_sort%3Ddate", "_sort"),
        ("/$export?_type=Nothing", "Nothing"),
        ("/$export?foo=1", "foo"),
    ] {
        let r = kickoff(&s, Method::GET, path, &sys, None).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text);
        assert!(r.text.contains(names) && r.json()["resourceType"] == "OperationOutcome", "{path}: {}", r.text);
    }
    let r = s
        .http
        .get(s.url("/$export?_type=Practitioner&foo=1"))
        .bearer_auth(&sys)
        .header("prefer", "respond-async, handling=lenient")
        .send()
        .await
        .expect("kick-off");
    assert_eq!(r.status(), 202);
    let url = r.headers()["content-location"].to_str().expect("url").to_string();
    let lenient = finish(&s, &url, &sys).await;
    let errors: Vec<Value> = lenient.manifest["error"]
        .as_array()
        .expect("error")
        .iter()
        .flat_map(|e| lenient.lines(e["url"].as_str().unwrap_or_default()))
        .collect();
    assert!(errors.iter().any(|e| e.to_string().contains("foo")), "{errors:?}");

    // POST kick-off with Parameters.
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Observation"},
        {"name": "patient", "valueReference": {"reference": "Patient/pat-a"}}]});
    let r = kickoff(&s, Method::POST, "/Patient/$export", &sys, Some(&params)).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let one = finish(&s, &r.header("content-location"), &sys).await;
    assert_eq!(one.ids("Patient"), ["pat-a"]);
    assert_eq!(one.ids("Observation"), ["obs-a1", "obs-a2"]);

    // Cancel: 202, then the job is gone.
    let r = kickoff(&s, Method::GET, "/$export", &sys, None).await;
    let job = r.header("content-location");
    let r = fhir(&s.http, Method::DELETE, &job, Some(&sys), None).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = get(&s.http, &job, &sys).await;
    assert_eq!(r.status, 404, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_never_reaches_another_patients_data() {
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    seed(&s, &sys).await;
    let client_id = s.admin.public_client("Bulk App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    let tok = smart::user_token(
        &s.http,
        &s.base,
        &client_id,
        &["launch/patient", "patient/*.rs"],
        &smart::Login::new("alice"),
    )
    .await;
    let alice = tok["access_token"].as_str().expect("token").to_string();

    // Alice's own exports hold her data and shared resources, never pat-b's.
    for path in ["/$export", "/Patient/$export", "/Patient/$export?includeAssociatedData=RelevantProvenanceResources"] {
        let e = export(&s, path, &alice).await;
        assert_eq!(e.ids("Patient"), ["pat-a"], "{path}");
        assert_eq!(e.ids("Observation"), ["obs-a1", "obs-a2"], "{path}");
        for f in e.files.values() {
            assert!(!f.contains("pat-b") && !f.contains("obs-b1"), "{path}: {f}");
        }
    }
    // Naming pat-b changes nothing: an error line that names no data, no pat-b resource.
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": "Patient/pat-b"}}]});
    let r = kickoff(&s, Method::POST, "/Patient/$export", &alice, Some(&params)).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let e = finish(&s, &r.header("content-location"), &alice).await;
    assert!(e.resources().is_empty(), "{:?}", e.resources());
    assert!(e.files.values().all(|f| !f.contains("Family-pat-b") && !f.contains("secret of pat-b")));
    // Group grp-b (pat-b's group) is hidden from alice: 404 like a missing group.
    let r = kickoff(&s, Method::GET, "/Group/grp-b/$export", &alice, None).await;
    assert_eq!(r.status, 404, "{}", r.text);

    // A token with no read scope on what is asked is refused at kick-off.
    let none = s.system_token("system/Practitioner.rs").await;
    let r = kickoff(&s, Method::GET, "/$export?_type=Observation", &none, None).await;
    assert_eq!(r.status, 403, "{}", r.text);

    // Another client can neither poll, download nor cancel the system client's export.
    let r = kickoff(&s, Method::GET, "/$export", &sys, None).await;
    let job = r.header("content-location");
    let full = finish(&s, &job, &sys).await;
    let file = full.manifest["output"][0]["url"].as_str().expect("url").to_string();
    for token in [&alice, &none] {
        assert_eq!(get(&s.http, &job, token).await.status, 404);
        assert_eq!(get(&s.http, &file, token).await.status, 404);
        assert_eq!(fhir(&s.http, Method::DELETE, &job, Some(token), None).await.status, 404);
    }
    assert_eq!(get(&s.http, &file, &sys).await.status, 200, "the owner still can");
    // Without a token: 401.
    let r = s.http.get(&file).send().await.expect("GET");
    assert_eq!(r.status(), 401);

    // The disclosure log records what alice's exports showed her, under her patient.
    let mut logged = false;
    for _ in 0..100 {
        let log = smart::search_all(&s.http, &s.base, &sys, "AuditEvent?patient=Patient/pat-a&_count=1000").await;
        logged = log.iter().any(|a| a.to_string().contains("Observation/obs-a1/_history"));
        if logged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logged, "the export's disclosures reach the log");
}

type Tamper = Box<dyn Fn(&std::path::Path)>;

/// Runs the `fhir-ledger` binary; returns its exit code and stdout + stderr.
pub fn ledger_cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(crate::support::binary()).args(args).output().expect("run fhir-ledger");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn copy_dir(from: &std::path::Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().expect("temp dir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.path().join(e.file_name())).expect("copy");
    }
    to
}

fn edit(dir: &std::path::Path, name: &str, f: impl FnOnce(Vec<String>) -> Vec<String>) {
    let path = dir.join(name);
    let lines: Vec<String> = std::fs::read_to_string(&path).expect("file").lines().map(str::to_string).collect();
    let mut text = f(lines).join("\n");
    text.push('\n');
    std::fs::write(path, text).expect("write");
}

fn drop_last_line(dir: &std::path::Path, name: &str) {
    edit(dir, name, |mut l| {
        l.pop();
        l
    });
}

/// Re-signs `dir`'s trust label with `key` after `name` changed, as a node whose key leaked
/// could: its digest and count put right, a valid signature by a trusted key.
fn resign(dir: &std::path::Path, name: &str, key: &ed25519_dalek::SigningKey) {
    use ed25519_dalek::Signer;
    use fhir_ledger::bulk::label;
    let bytes = std::fs::read(dir.join(name)).expect("file");
    let path = dir.join(label::FILE);
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&path).expect("label")).expect("json");
    for f in doc["label"]["files"].as_array_mut().expect("files") {
        if f["name"] == name {
            f["sha256"] = json!(hex::encode(Sha256::digest(&bytes)));
            f["count"] = json!(String::from_utf8_lossy(&bytes).lines().count());
        }
    }
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
    let header =
        json!({"alg": "EdDSA", "kid": label::thumbprint(&key.verifying_key()), "typ": label::TYP, "node": "1"});
    let h = b64(header.to_string().as_bytes());
    let input = format!("{h}.{}", b64(&label::payload(&doc["label"])));
    doc["signatures"] = json!([format!("{h}..{}", b64(&key.sign(input.as_bytes()).to_bytes()))]);
    std::fs::write(path, doc.to_string()).expect("write label");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloaded_export_verifies_offline_and_tampering_is_named() {
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    seed(&s, &sys).await;
    let r = fhir(&s.http, Method::DELETE, &s.url("/Observation/obs-a2"), Some(&sys), None).await;
    assert!(r.status < 300, "{}", r.text);
    let kick = |path: &'static str| {
        let (s, sys) = (&s, &sys);
        async move {
            let r = kickoff(s, Method::GET, path, sys, None).await;
            assert_eq!(r.status, 202, "{}", r.text);
            r.header("content-location")
        }
    };
    let url = kick("/$export?_since=2000-01-01T00:00:00Z").await;
    // The job keeps the files it made for their downloads, encrypted only.
    completed(&s, &url, &sys).await;
    let job = url.rsplit('/').next().expect("job id");
    let spool_dir = s.dir.path().join("export-spool").join(job);
    let spooled: Vec<Vec<u8>> = std::fs::read_dir(&spool_dir)
        .expect("the job's spool")
        .map(|e| std::fs::read(e.expect("entry").path()).expect("spooled file"))
        .collect();
    assert!(spooled.len() >= 2, "the Observation and deletion files are spooled");
    assert!(spooled.iter().all(|f| !f.windows(9).any(|w| w == b"secret of")), "no plaintext in the spool");
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().to_str().expect("path").to_string();
    let (code, out) = ledger_cli(&["export", "download", &url, &d, "--token", &sys]);
    assert_eq!(code, 0, "{out}");
    // Each spooled file served its download and left the spool (a later one is made again).
    assert_eq!(std::fs::read_dir(&spool_dir).expect("the job's spool").count(), 0);
    for name in
        ["manifest.json", "trust-label.json", "Observation-1.ndjson", "Observation-1.proofs.ndjson", "deleted-1.ndjson"]
    {
        assert!(dir.path().join(name).exists(), "{name}: {out}");
    }
    let node_pub = s.dir.path().join("node.pub");
    let trust = node_pub.to_str().expect("path").to_string();
    let verify = |d: &std::path::Path, key: &str| {
        ledger_cli(&["verify", "export", d.to_str().expect("path"), "--trusted-key", key])
    };
    let (code, out) = verify(dir.path(), &trust);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("VALID"), "{out}");

    // Another export, for a line to splice in.
    put_resource(&s.http, &s.base, &sys, &observation("obs-new", "pat-a", "9-9")).await;
    let other = tempfile::tempdir().expect("temp dir");
    let url2 = kick("/$export?_type=Observation").await;
    let (code, out) = ledger_cli(&["export", "download", &url2, other.path().to_str().expect("path"), "--token", &sys]);
    assert_eq!(code, 0, "{out}");
    let foreign = std::fs::read_to_string(other.path().join("Observation-1.ndjson")).expect("file");
    let foreign_line = foreign.lines().find(|l| l.contains("obs-new")).expect("obs-new").to_string();

    let key_hex = std::fs::read_to_string(s.dir.path().join("node.key")).expect("node.key");
    let key_bytes: [u8; 32] = hex::decode(key_hex.trim()).expect("hex").try_into().expect("32 bytes");
    let node_key = ed25519_dalek::SigningKey::from_bytes(&key_bytes);
    let forger = node_key.clone();
    let reorderer = node_key.clone();
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "a flipped byte",
            Box::new(|d| {
                edit(d, "Observation-1.ndjson", |mut l| {
                    l[0] = l[0].replacen("secret", "secreT", 1);
                    l
                });
            }),
            "Observation-1.ndjson",
        ),
        ("a dropped line", Box::new(|d| drop_last_line(d, "Observation-1.ndjson")), "Observation-1.ndjson"),
        (
            "lines swapped between files",
            Box::new(|d| {
                let p = std::fs::read_to_string(d.join("Patient-1.ndjson")).expect("patients");
                let first_patient = p.lines().next().expect("a patient").to_string();
                let o = std::fs::read_to_string(d.join("Observation-1.ndjson")).expect("obs");
                let first_obs = o.lines().next().expect("an observation").to_string();
                edit(d, "Patient-1.ndjson", |mut l| {
                    l[0] = first_obs.clone();
                    l
                });
                edit(d, "Observation-1.ndjson", |mut l| {
                    l[0] = first_patient.clone();
                    l
                });
            }),
            "-1.ndjson",
        ),
        (
            "a resource from another export spliced in",
            Box::new(move |d| {
                edit(d, "Observation-1.ndjson", |mut l| {
                    l.push(foreign_line.clone());
                    l
                });
            }),
            "Observation-1.ndjson",
        ),
        (
            "a changed line under a label re-signed with a leaked node key",
            Box::new(move |d| {
                edit(d, "Observation-1.ndjson", |mut l| {
                    l[0] = l[0].replacen("secret", "SECRET", 1);
                    l
                });
                resign(d, "Observation-1.ndjson", &node_key);
            }),
            "Observation-1.ndjson line 1",
        ),
        (
            "a changed line whose leaf data was forged to commit to it, under a re-signed label",
            Box::new(move |d| {
                edit(d, "Observation-1.ndjson", |mut l| {
                    l[0] = l[0].replacen("secret", "SECRET", 1);
                    l
                });
                let changed = std::fs::read_to_string(d.join("Observation-1.ndjson")).expect("file");
                let changed = changed.lines().next().expect("a line").to_string();
                edit(d, "Observation-1.proofs.ndjson", |mut l| {
                    let mut proof: Value = serde_json::from_str(&l[0]).expect("a proof line");
                    let b64 = base64::engine::general_purpose::STANDARD;
                    let salt = base64::Engine::decode(&b64, proof["salt"].as_str().expect("salt")).expect("b64");
                    let data = base64::Engine::decode(&b64, proof["leafData"].as_str().expect("data")).expect("b64");
                    let mut header = consensus::LeafHeader::decode(&data).expect("a leaf header");
                    header.content_sha256 = consensus::content_commitment(&salt, changed.as_bytes());
                    proof["leafData"] = json!(base64::Engine::encode(&b64, header.encode()));
                    l[0] = proof.to_string();
                    l
                });
                resign(d, "Observation-1.ndjson", &forger);
            }),
            "Observation-1.proofs.ndjson",
        ),
        (
            "the proof file's multiproof cut off",
            Box::new(|d| drop_last_line(d, "Observation-1.proofs.ndjson")),
            "Observation-1.proofs.ndjson",
        ),
        (
            "two lines swapped within a file, their proof lines with them, under a re-signed label",
            Box::new(move |d| {
                for name in ["Observation-1.ndjson", "Observation-1.proofs.ndjson"] {
                    edit(d, name, |mut l| {
                        assert!(l.len() >= 2, "{name} has two lines to swap");
                        l.swap(0, 1);
                        l
                    });
                }
                resign(d, "Observation-1.ndjson", &reorderer);
            }),
            "Observation-1.proofs.ndjson line 2",
        ),
        (
            "a deletion that never happened",
            Box::new(|d| {
                edit(d, "deleted-1.ndjson", |mut l| {
                    l[0] = l[0].replace("obs-a2", "obs-a1");
                    l
                });
            }),
            "deleted-1.ndjson",
        ),
    ];
    for (what, tamper, names) in cases {
        let copy = copy_dir(dir.path());
        tamper(copy.path());
        let (code, out) = verify(copy.path(), &trust);
        assert_eq!(code, 1, "{what}: {out}");
        assert!(out.contains("INVALID") && out.contains(names), "{what}: names {names}: {out}");
    }
    // Signed by a key the receiver does not trust.
    let stranger = hex::encode(ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key().to_bytes());
    let (code, out) = verify(dir.path(), &stranger);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not signed by a trusted key") || out.contains("tree head"), "{out}");
}

fn ig_example(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bulk-data-ig").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts that `ours` has every member of the IG's `example`, of the same JSON type, and
/// every array item the shape of the example's first item. The example's `extension` is the
/// IG's illustration of a free-form object: ours need only be an object.
fn assert_shape(example: &Value, ours: &Value, at: &str) {
    match (example, ours) {
        (Value::Object(e), Value::Object(o)) => {
            for (k, v) in e {
                let here = format!("{at}.{k}");
                let mine = o.get(k).unwrap_or_else(|| panic!("{here} is missing: {ours}"));
                if k == "extension" {
                    assert!(mine.is_object(), "{here} is not an object");
                } else {
                    assert_shape(v, mine, &here);
                }
            }
        }
        (Value::Array(e), Value::Array(o)) => {
            if let Some(first) = e.first() {
                for (i, item) in o.iter().enumerate() {
                    assert_shape(first, item, &format!("{at}[{i}]"));
                }
            }
        }
        (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_)) => {}
        _ => panic!("{at}: the IG has {example}, we answer {ours}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bulk_data_igs_examples_are_honoured() {
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    let mut all = vec![smart::patient("123"), smart::patient("456"), smart::patient("789")];
    all.push(json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/123"}}, {"entity": {"reference": "Patient/456"}},
                   {"entity": {"reference": "Patient/789"}}]}));
    // R4's MedicationRequest `date` is the dosage's timing (the IG's example predates R4).
    let med = |id: &str, patient: &str, status: &str, when: &str| {
        json!({"resourceType": "MedicationRequest", "id": id, "status": status, "intent": "order",
               "medicationCodeableConcept": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")},
               "dosageInstruction": [{"timing": {"event": [when]}}]})
    };
    all.extend([
        med("active", "123", "active", "2017-01-01"),
        med("completed-2019", "123", "completed", "2019-03-01"),
        med("completed-2017", "123", "completed", "2017-03-01"),
        med("stopped", "456", "stopped", "2020-01-01"),
    ]);
    for (id, p) in [("c-123", "123"), ("c-456", "456"), ("c-789", "789")] {
        all.push(json!({"resourceType": "Condition", "id": id, "subject": {"reference": format!("Patient/{p}")}}));
    }
    for r in &all {
        put_resource(&s.http, &s.base, &sys, r).await;
    }

    // The _typeFilter example request: active MedicationRequests, completed ones after
    // 2018-07-01, and every Condition.
    let e = export(&s, &format!("/{}", ig_example("typefilter-request.txt").trim()), &sys).await;
    assert_eq!(e.ids("MedicationRequest"), ["active", "completed-2019"]);
    assert_eq!(e.ids("Condition"), ["c-123", "c-456", "c-789"]);
    assert!(e.ids("Patient").is_empty(), "only the types asked for");

    // The Group membership pattern's POST: only the listed members' compartments.
    let body: Value = serde_json::from_str(&ig_example("group-patients-parameters.json")).expect("JSON");
    let r = kickoff(&s, Method::POST, "/Group/g/$export?_type=Patient,Condition", &sys, Some(&body)).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let e = finish(&s, &r.header("content-location"), &sys).await;
    assert_eq!(e.ids("Patient"), ["123", "456"]);
    assert_eq!(e.ids("Condition"), ["c-123", "c-456"]);

    // The complete-status manifest and a deleted line have the IG's shape.
    let since = crate::smart::now() * 1000;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = fhir(&s.http, Method::DELETE, &s.url("/Condition/c-789"), Some(&sys), None).await;
    assert!(r.status < 300, "{}", r.text);
    let since = fhir_ledger::fhir::instant(since);
    let e = export(
        &s,
        &format!(
            "/Patient/$export?_type=Patient,Condition&_since={}&_typeFilter=Patient%3F_id%3Dnobody",
            since.replace('+', "%2B")
        ),
        &sys,
    )
    .await;
    let example: Value = serde_json::from_str(&ig_example("complete-status-manifest.json")).expect("JSON");
    assert_shape(&example, &e.manifest, "manifest");
    let deleted: Vec<Value> = e.manifest["deleted"]
        .as_array()
        .expect("deleted")
        .iter()
        .flat_map(|d| e.lines(d["url"].as_str().unwrap_or_default()))
        .collect();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    let example: Value = serde_json::from_str(&ig_example("deleted-bundle.json")).expect("JSON");
    assert_shape(&example, &deleted[0], "deleted line");
    assert_eq!(deleted[0]["entry"][0]["request"], json!({"method": "DELETE", "url": "Condition/c-789"}));
}
