//! Real-process tests: the `fhir-ledger` binary on 127.0.0.1, real HTTP, `kill -9`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::Server;

#[derive(Default)]
struct Log {
    /// Acknowledged creates and updates: (type/id, version, the body sent).
    acked: Vec<(String, u64, Value)>,
    /// Every transaction attempted: (identifier value, acknowledged?).
    transactions: Vec<(String, bool)>,
}

async fn writer(client: reqwest::Client, base: String, n: usize, stop: Arc<AtomicBool>, log: Arc<Mutex<Log>>) {
    let mut i = 0;
    let mut mine: Option<(String, u64, Value)> = None;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let tag = format!("w{n}-{i}");
        match i % 3 {
            0 => {
                let tx = json!({"resourceType":"Bundle","type":"transaction","entry":(0..3).map(|k| json!({
                    "resource":{"resourceType":"Observation","status":"final","code":{"text":format!("{k}")},"identifier":[{"system":"urn:crash","value":tag}],"valueQuantity":{"value":1.10}},
                    "request":{"method":"POST","url":"Observation"}})).collect::<Vec<_>>()});
                log.lock().unwrap().transactions.push((tag.clone(), false));
                let ok = matches!(client.post(format!("{base}/")).header("content-type", "application/fhir+json").body(tx.to_string()).send().await, Ok(r) if r.status().is_success());
                if ok {
                    let mut l = log.lock().unwrap();
                    if let Some(t) = l.transactions.iter_mut().rev().find(|t| t.0 == tag) {
                        t.1 = true;
                    }
                }
            }
            1 if mine.is_some() => {
                let (path, _, body) = mine.clone().unwrap_or_default();
                let mut body = body;
                body["name"] = json!([{"family": tag}]);
                if let Ok(r) = client
                    .put(format!("{base}/{path}"))
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string())
                    .send()
                    .await
                {
                    if r.status().is_success() {
                        let v: Value = r.json().await.unwrap_or_default();
                        let version = v["meta"]["versionId"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
                        log.lock().unwrap().acked.push((path.clone(), version, body.clone()));
                        mine = Some((path, version, body));
                    }
                }
            }
            _ => {
                let body = json!({"resourceType":"Patient","identifier":[{"system":"urn:crash","value":tag}],"name":[{"family":tag}],"birthDate":"1970-01-01"});
                if let Ok(r) = client
                    .post(format!("{base}/Patient"))
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string())
                    .send()
                    .await
                {
                    if r.status().as_u16() == 201 {
                        let v: Value = r.json().await.unwrap_or_default();
                        let id = v["id"].as_str().unwrap_or_default().to_string();
                        let mut body = body;
                        body["id"] = json!(id);
                        log.lock().unwrap().acked.push((format!("Patient/{id}"), 1, body.clone()));
                        mine = Some((format!("Patient/{id}"), 1, body));
                    }
                }
            }
        }
    }
}

fn strip_meta(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("meta");
    }
    v
}

/// 32 clients write (creates, updates, 3-resource transactions); the server is killed with
/// SIGKILL mid-stream and restarted on the same data directory. Every acknowledged write must
/// read back, and every transaction must be wholly present or wholly absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_32_writers_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let base = server.base.clone();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Log::default()));
    let tasks: Vec<_> =
        (0..32).map(|n| tokio::spawn(writer(client.clone(), base.clone(), n, stop.clone(), log.clone()))).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let log = std::mem::take(&mut *log.lock().unwrap());
    assert!(log.acked.len() > 100, "the load was real: {} acknowledged writes", log.acked.len());

    let server = Server::start(dir.path());
    let base = server.base.clone();
    // The newest acknowledged version of each resource.
    let mut latest = std::collections::BTreeMap::new();
    for (path, version, body) in &log.acked {
        let e = latest.entry(path.clone()).or_insert((0, Value::Null));
        if *version >= e.0 {
            *e = (*version, body.clone());
        }
    }
    for (path, (version, body)) in &latest {
        let r = client.get(format!("{base}/{path}/_history/{version}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "acknowledged {path} v{version} lost");
        let got: Value = r.json().await.unwrap();
        assert_eq!(strip_meta(got), strip_meta(body.clone()), "{path} v{version} reads back as sent");
    }
    let mut acked_tx = 0;
    for (tag, acked) in &log.transactions {
        let r: Value = client
            .get(format!("{base}/Observation?identifier=urn:crash|{tag}&_summary=count"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let n = r["total"].as_u64().unwrap();
        assert!(n == 0 || n == 3, "transaction {tag} is half-visible: {n} of 3");
        if *acked {
            acked_tx += 1;
            assert_eq!(n, 3, "acknowledged transaction {tag} lost");
        }
    }
    assert!(acked_tx > 10, "transactions were exercised: {acked_tx}");
    drop(server);
}

/// The binary's defaults: a fresh data dir gets 0600 key files, announced on stderr.
#[test]
fn first_start_creates_private_keys() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    for f in ["node.key", "kek.key", "index.key"] {
        let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    drop(server);
}

/// The ids a search returns on its first page.
async fn ids_of(client: &reqwest::Client, base: &str, query: &str) -> Vec<String> {
    let r = client.get(format!("{base}/{query}")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{query}");
    let b: Value = r.json().await.unwrap();
    b["entry"]
        .as_array()
        .map(|es| es.iter().filter_map(|e| e["resource"]["id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// The search index lives on disk: a node killed with SIGKILL answers every kind of search
/// as before once restarted (what the index had not persisted is folded again), and goes on
/// indexing new writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_index_survives_kill9_and_answers_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let client = reqwest::Client::new();
    let create = |base: String, body: Value| {
        let client = client.clone();
        async move {
            let r = client.post(format!("{base}/{}", body["resourceType"].as_str().unwrap())).json(&body).send().await;
            let r = r.unwrap();
            assert_eq!(r.status().as_u16(), 201);
            r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
        }
    };
    let mut patients = Vec::new();
    for (i, family) in ["Smith", "Smythe", "Jones"].iter().enumerate() {
        let p = json!({"resourceType": "Patient", "name": [{"family": family}], "birthDate": format!("197{i}-0{}-15", i + 1)});
        patients.push(create(server.base.clone(), p).await);
    }
    for n in 0..60u32 {
        let code = if n % 2 == 0 { "8867-4" } else { "29463-7" };
        let o = json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": format!("Patient/{}", patients[n as usize % 3])},
            "effectiveDateTime": format!("2020-01-{:02}T10:00:00Z", n % 28 + 1),
            "valueQuantity": {"value": n, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}});
        create(server.base.clone(), o).await;
    }
    let queries = [
        format!("Observation?subject=Patient/{}&_sort=-date&_count=100", patients[0]),
        "Observation?date=ge2020-01-10&date=lt2020-01-20&_count=100".to_string(),
        "Observation?value-quantity=gt41|http://unitsofmeasure.org|kg&_count=100".to_string(),
        "Observation?code=http://loinc.org|8867-4&_count=100".to_string(),
        "Observation?_sort=value-quantity&_count=100".to_string(),
        "Patient?name=sm&birthdate=le1971-12-31".to_string(),
        format!("Patient?_id={}&_revinclude=Observation:subject", patients[2]),
    ];
    let mut before = Vec::new();
    for q in &queries {
        before.push(ids_of(&client, &server.base, q).await);
    }
    assert!(before.iter().all(|ids| !ids.is_empty()), "every query finds something: {before:?}");
    assert_eq!(before[5].len(), 2, "Smith and Smythe, born by 1971");

    server.kill9();
    let server = Server::start(dir.path());
    for (q, was) in queries.iter().zip(&before) {
        assert_eq!(&ids_of(&client, &server.base, q).await, was, "{q} after the restart");
    }
    let late = json!({"resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "effectiveDateTime": "2020-01-15T10:00:00Z"});
    let id = create(server.base.clone(), late).await;
    assert!(ids_of(&client, &server.base, &queries[1]).await.contains(&id), "a write after the restart is indexed");
}

/// A search answers with every write acknowledged before it began while others fold the
/// same leaves: the background thread (which gives way to a waiting request between its
/// chunks) and other searches take turns chunk by chunk. Writers each create Observations
/// under codes of their own and search for each right after its 201, while a Synthea
/// patient's transaction (523 resources) posted again and again keeps the index behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_during_a_load_sees_every_write_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(dir.path(), &["--max-body-bytes", "16777216"]);
    let client = reqwest::Client::new();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea/patient-01.json");
    let bundle: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loaders = Vec::new();
    for _ in 0..2 {
        let (client, base, bundle, stop) = (client.clone(), server.base.clone(), bundle.clone(), stop.clone());
        loaders.push(tokio::spawn(async move {
            let mut posted = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = client.post(&base).json(&bundle).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap_or_default());
                posted += 1;
            }
            posted
        }));
    }
    let mut writers = Vec::new();
    for w in 0..3 {
        let (client, base) = (client.clone(), server.base.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..30 {
                let code = format!("w{w}-{i}");
                let o = json!({"resourceType": "Observation", "status": "final",
                    "code": {"coding": [{"system": "urn:test:fold", "code": code}]}});
                let r = client.post(format!("{base}/Observation")).json(&o).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 201);
                let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
                let found = ids_of(&client, &base, &format!("Observation?code=urn:test:fold|{code}")).await;
                assert_eq!(found, vec![id], "the search for {code}, begun after its create was acknowledged");
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut posted = 0;
    for l in loaders {
        posted += l.await.unwrap();
    }
    assert!(posted > 0, "the load ran beside the searches");
    drop(server);
}
