//! What operators rely on, against the real binary: it runs from any directory with the
//! definitions compiled in; `/metrics` (admin token only) and `/health/*`; a request id in the
//! response and in every JSON log line of the request; no path or query (which can name a
//! patient) in the logs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

const ADMIN: &str = "operators-test-admin-token";

/// `fhir-ledger serve` started in `cwd` with `args`, its stderr lines kept.
struct Proc {
    child: Child,
    base: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn start(cwd: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut child = Command::new(crate::support::binary())
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(cwd)
            .env("FHIR_LEDGER_ADMIN_TOKEN", ADMIN)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fhir-ledger");
        let stderr = child.stderr.take().expect("stderr");
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("fhir-ledger: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
                kept.lock().unwrap().push(line);
            }
        });
        let base = rx.recv_timeout(Duration::from_mins(1)).unwrap_or_else(|_| {
            panic!("the server did not start:\n{}", lines.lock().unwrap().join("\n"));
        });
        Proc { child, base, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get(url: &str, token: Option<&str>) -> (u16, String) {
    let mut r = reqwest::Client::new().get(url);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.expect("request");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// From an empty directory outside the checkout, with no flags but a port: the definitions
/// are the ones compiled in, the data directory is `./data`, and README's smoke test holds
/// (metadata, create, read, search).
#[tokio::test]
async fn serve_runs_from_any_directory_with_the_definitions_compiled_in() {
    let cwd = tempfile::tempdir().unwrap();
    let p = Proc::start(cwd.path(), &["--auth", "off"], &[]);
    let (status, body) = get(&format!("{}/metadata", p.base), None).await;
    assert_eq!(status, 200, "{body}");
    let http = reqwest::Client::new();
    let created = http
        .post(format!("{}/Patient", p.base))
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType": "Patient", "name": [{"family": "Anywhere"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let (status, body) = get(&format!("{}/Patient/{id}", p.base), None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(&format!("{}/Patient?family=Anywhere", p.base), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["total"], 1, "{body}");
    assert!(cwd.path().join("data").is_dir(), "the default data directory is ./data");
}

/// `/metrics` answers the admin token only, in Prometheus text, with the requests just made
/// (by interaction, type and status), the Raft and ledger gauges and the cache counters;
/// `/health/live` and `/health/ready` answer a single node that leads itself.
#[tokio::test]
async fn metrics_for_operators_and_health_for_orchestrators() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let p = Proc::start(dir.path(), &["--auth", "smart", "--data-dir", data.to_str().unwrap()], &[]);
    assert_eq!(get(&format!("{}/metrics", p.base), None).await.0, 401, "no token");
    assert_eq!(get(&format!("{}/metrics", p.base), Some("wrong")).await.0, 403, "a wrong token");
    // A refused read, to be counted.
    assert_eq!(get(&format!("{}/Patient/x", p.base), None).await.0, 401);
    let (status, live) = get(&format!("{}/health/live", p.base), None).await;
    assert_eq!(status, 200, "{live}");
    let (status, ready) = get(&format!("{}/health/ready", p.base), None).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(serde_json::from_str::<Value>(&ready).unwrap()["status"], "ready", "{ready}");

    let (status, text) = get(&format!("{}/metrics", p.base), Some(ADMIN)).await;
    assert_eq!(status, 200, "{text}");
    for expected in [
        r#"fhir_ledger_http_requests_total{interaction="read",type="Patient",status="401"} 1"#,
        r#"fhir_ledger_http_requests_total{interaction="monitoring",type="-",status="200"}"#,
        r#"fhir_ledger_http_request_duration_seconds_bucket{interaction="read",type="Patient",le="0.00025"}"#,
        r#"fhir_ledger_auth_refusals_total{reason="unauthenticated"}"#,
        "fhir_ledger_raft_term 1",
        "fhir_ledger_raft_is_leader 1",
        "fhir_ledger_raft_applied_index ",
        "fhir_ledger_ledger_leaves ",
        "fhir_ledger_ledger_disk_bytes ",
        r#"fhir_ledger_cache_lookups_total{cache="bodies",result="hit"}"#,
        r#"fhir_ledger_cache_lookups_total{cache="documents",result="miss"}"#,
    ] {
        assert!(text.contains(expected), "/metrics lacks {expected:?}:\n{text}");
    }
    assert!(text.contains("# TYPE fhir_ledger_http_request_duration_seconds histogram"), "{text}");
}

/// Every request gets an id: a caller's plain one is kept, anything else replaced; it comes
/// back in `X-Request-Id` and is on each JSON log line of the request, and those lines carry
/// the route pattern, never the path or the query (a search by name would put it in the log).
#[tokio::test]
async fn request_ids_in_responses_and_json_logs_without_paths() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let p = Proc::start(
        dir.path(),
        &["--auth", "off", "--log-format", "json", "--data-dir", data.to_str().unwrap()],
        &[("FHIR_LEDGER_LOG", "info")],
    );
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/Patient?family=Secretname", p.base))
        .header("x-request-id", "trace-4711")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "trace-4711");
    let r = http.get(format!("{}/metadata", p.base)).header("x-request-id", "not plain!").send().await.unwrap();
    let made = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(made.len() == 32 && made.bytes().all(|b| b.is_ascii_hexdigit()), "a fresh id, not the caller's: {made}");

    // The log line is written as the response goes out; give the writer a moment.
    let mut line = None;
    for _ in 0..50 {
        line = p.lines().into_iter().find(|l| l.contains("trace-4711"));
        if line.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = line.unwrap_or_else(|| panic!("no log line names the request id:\n{}", p.lines().join("\n")));
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["span"]["request_id"], "trace-4711", "{line}");
    assert_eq!(v["fields"]["route"], "/{type}", "{line}");
    assert_eq!(v["fields"]["status"], 200, "{line}");
    let all = p.lines().join("\n");
    assert!(!all.contains("Secretname"), "a search value reached the log:\n{all}");
}

/// `fhir-ledger load` puts a directory of a Synthea transaction bundle and an NDJSON file into
/// a node (the NDJSON lines become PUTs under their own ids), says how much it loaded, and a
/// file the server refuses is named with the server's reason, with exit code 1.
#[tokio::test]
async fn load_puts_bundles_and_ndjson_into_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let p = Proc::start(dir.path(), &["--auth", "off", "--data-dir", data.to_str().unwrap()], &[]);
    let input = dir.path().join("input");
    std::fs::create_dir(&input).unwrap();
    let synthea = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea");
    let mut bundles: Vec<_> = std::fs::read_dir(&synthea).unwrap().map(|e| e.unwrap().path()).collect();
    bundles.sort();
    let bundle = &bundles[0];
    let entries =
        serde_json::from_slice::<Value>(&std::fs::read(bundle).unwrap()).unwrap()["entry"].as_array().unwrap().len();
    std::fs::copy(bundle, input.join("a-patient.json")).unwrap();
    let lines: Vec<String> = (0..7)
        .map(|i| {
            json!({"resourceType": "Practitioner", "id": format!("load-{i}"), "name": [{"family": "Loaded"}]})
                .to_string()
        })
        .collect();
    std::fs::write(input.join("b-practitioners.ndjson"), lines.join("\n") + "\n").unwrap();

    let out = Command::new(crate::support::binary())
        .args(["load", "--node", &p.base, "--batch", "3"])
        .arg(&input)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let total = entries + 7;
    assert!(
        stdout.contains(&format!("loaded {total} of {total} resources from 2 file(s) in 4 request(s)")),
        "{stdout}"
    );
    assert!(
        out.stderr.is_empty(),
        "no progress bar when stderr is not a terminal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = get(&format!("{}/Practitioner?family=Loaded&_total=accurate", p.base), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["total"], 7, "{body}");
    let (status, _) = get(&format!("{}/Practitioner/load-6", p.base), None).await;
    assert_eq!(status, 200, "an NDJSON line keeps its id");

    // A resource the server refuses: named, with the server's reason, and exit code 1.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, json!({"resourceType": "Observation", "id": "o1", "status": "nonsense"}).to_string()).unwrap();
    let out = Command::new(crate::support::binary()).args(["load", "--node", &p.base]).arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.json") && stderr.contains("HTTP 400") && stderr.contains("Observation.status"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 request(s) failed"));
}

/// The operator console: a sign-in page for anyone without the admin token (a wrong token is
/// a 401); the token (form or bearer) opens the page with every section; its cookie is
/// HttpOnly and SameSite=Strict, opens the admin API's reads (`GET /admin/backups`) but never
/// a change (`POST` stays 401).
#[tokio::test]
async fn operator_console_behind_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let p = Proc::start(dir.path(), &["--auth", "off", "--data-dir", data.to_str().unwrap()], &[]);
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let (status, body) = get(&format!("{}/console", p.base), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("console-login") && !body.contains("id=\"members\""), "a sign-in page only: {body}");
    let wrong = http.post(format!("{}/console/login", p.base)).form(&[("token", "nope")]).send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let ok = http.post(format!("{}/console/login", p.base)).form(&[("token", ADMIN)]).send().await.unwrap();
    assert_eq!(ok.status(), 303);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
    let session = cookie.split(';').next().unwrap().to_string();
    let page = http.get(format!("{}/console", p.base)).header("cookie", &session).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    for section in ["summary", "members", "tree-head", "metrics", "recent-leaves", "backups"] {
        assert!(page.contains(&format!("id=\"{section}\"")), "section {section} missing: {page}");
    }
    let (status, body) = get(&format!("{}/console", p.base), Some(ADMIN)).await;
    assert!(status == 200 && body.contains("id=\"tree-head\""), "the bearer token opens it too");
    let (status, _) = get(&format!("{}/console", p.base), Some("wrong")).await;
    assert_eq!(status, 200, "a wrong bearer token gets the sign-in page");
    let read = http.get(format!("{}/admin/backups", p.base)).header("cookie", &session).send().await.unwrap();
    assert_eq!(read.status(), 200, "the session reads the admin API");
    let change = http.post(format!("{}/admin/backups", p.base)).header("cookie", &session).send().await.unwrap();
    assert_eq!(change.status(), 401, "the session changes nothing");
    let forged = http
        .get(format!("{}/admin/backups", p.base))
        .header("cookie", "fl_console=99999999999999.00")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401, "a forged session reads nothing");
}

/// The sum of the samples of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

/// A node started for a cluster and not yet initialized knows no leader: `/health/ready` is
/// 503 and says why, then 200 once `cluster init` made it one. Scraped while `fhir-ledger load`
/// posts Synthea transactions, the transaction counter moves as they are made and ends at
/// exactly the requests the load made, and the leaf gauge grows with them.
#[tokio::test]
async fn metrics_move_under_load_and_ready_waits_for_a_leader() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let p = Proc::start(
        dir.path(),
        &["--auth", "off", "--data-dir", data.to_str().unwrap(), "--raft-listen", "127.0.0.1:0"],
        &[],
    );
    let (status, body) = get(&format!("{}/health/ready", p.base), None).await;
    assert_eq!(status, 503, "no leader yet: {body}");
    assert!(body.contains("leader"), "{body}");
    let out = Command::new(crate::support::binary())
        .args(["cluster", "init", "--node", &p.base])
        .env("FHIR_LEDGER_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut ready = 0;
    for _ in 0..100 {
        ready = get(&format!("{}/health/ready", p.base), None).await.0;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 200, "ready once it leads");

    let tx = |text: &str| {
        sample(text, "fhir_ledger_http_requests_total", &[r#"interaction="batch-transaction""#, r#"status="200""#])
    };
    let leaves = |text: &str| {
        text.lines().find_map(|l| l.strip_prefix("fhir_ledger_ledger_leaves ")).and_then(|v| v.parse::<f64>().ok())
    };
    let before = get(&format!("{}/metrics", p.base), Some(ADMIN)).await.1;
    let synthea = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/synthea");
    let mut load = tokio::process::Command::new(crate::support::binary())
        .args(["load", "--node", &p.base, "--clients", "1"])
        .arg(&synthea)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = vec![tx(&before)];
    while load.try_wait().unwrap().is_none() {
        seen.push(tx(&get(&format!("{}/metrics", p.base), Some(ADMIN)).await.1));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(load.wait().await.unwrap().success());
    let after = get(&format!("{}/metrics", p.base), Some(ADMIN)).await.1;
    let files = std::fs::read_dir(&synthea).unwrap().count();
    let counted = format!("{:.0}", tx(&after) - tx(&before));
    assert_eq!(counted, files.to_string(), "one counted transaction per bundle");
    let between: Vec<f64> = seen.iter().copied().filter(|&v| v > tx(&before) && v < tx(&after)).collect();
    assert!(!between.is_empty(), "a scrape during the load saw the counter part way: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "a counter never goes back: {seen:?}");
    assert!(leaves(&after) > leaves(&before), "the leaf gauge grew");
}
