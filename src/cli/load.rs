//! `fhir-ledger load FILE|DIR...`: loads FHIR data into a running node over its REST API, as
//! an EHR's migration would: `.json` files (a transaction or batch Bundle, posted as it is; any
//! other resource, PUT when it has an id, else POST) and `.ndjson` files (Bulk Data's format:
//! one resource per line, sent as transactions of `--batch` PUTs, or POSTs for lines without
//! an id). A progress bar (resources, rate, time left) on a terminal; a summary line always;
//! every failure named with its file and the server's OperationOutcome.

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct LoadArgs {
    /// The node's FHIR base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    node: String,
    /// A bearer token allowed to write (a SMART system token); none for a node run with
    /// `--auth off`.
    #[arg(long, env = "FHIR_LEDGER_TOKEN")]
    token: Option<String>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Resources per transaction made from NDJSON lines.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Files (`.json`, `.ndjson`) and directories of them (read in name order, not recursively).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

/// One request to make: where its resources came from, how many, and the request itself.
struct Unit {
    source: String,
    resources: u64,
    method: reqwest::Method,
    path: String,
    body: Vec<u8>,
}

pub async fn run(args: LoadArgs) -> anyhow::Result<std::process::ExitCode> {
    let files = files(&args.paths)?;
    let mut units = Vec::new();
    for f in &files {
        units.extend(units_of(f, args.batch.max(1))?);
    }
    let total: u64 = units.iter().map(|u| u.resources).sum();
    let bar = crate::telemetry::progress_bar(total, "resources");
    let http = reqwest::Client::new();
    let base = args.node.trim_end_matches('/').to_string();
    let started = Instant::now();
    let (requests, mut loaded, mut failed) = (units.len(), 0u64, Vec::new());
    let mut answers = futures::stream::iter(units)
        .map(|u| {
            let (http, base, token) = (http.clone(), base.clone(), args.token.clone());
            async move {
                let result = send(&http, &base, token.as_deref(), &u).await;
                (u.source, u.resources, result)
            }
        })
        .buffer_unordered(args.clients.max(1));
    while let Some((source, n, result)) = answers.next().await {
        match result {
            Ok(()) => loaded += n,
            Err(why) => {
                bar.suspend(|| eprintln!("fhir-ledger load: {source}: {why}"));
                failed.push(source);
            }
        }
        bar.inc(n);
    }
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    println!(
        "loaded {loaded} of {total} resources from {} file(s) in {requests} request(s), {secs:.1} s: {:.0} resources/s{}",
        files.len(),
        loaded as f64 / secs,
        if failed.is_empty() { String::new() } else { format!("; {} request(s) failed", failed.len()) }
    );
    Ok(if failed.is_empty() { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) })
}

/// The `.json` and `.ndjson` files named, directories expanded one level, in name order.
fn files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let wanted = |p: &Path| p.extension().is_some_and(|e| e == "json" || e == "ndjson");
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.is_file() && wanted(f))
                .collect();
            inner.sort();
            out.extend(inner);
        } else if wanted(p) {
            out.push(p.clone());
        } else {
            anyhow::bail!("{}: not a .json or .ndjson file, nor a directory", p.display());
        }
    }
    if out.is_empty() {
        anyhow::bail!(
            "no .json or .ndjson files in {}",
            paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(out)
}

/// The requests that load `file`. A file that is not what its name says is refused before
/// anything is sent, naming the file and, for NDJSON, the line.
fn units_of(file: &Path, batch: usize) -> anyhow::Result<Vec<Unit>> {
    let source = file.display().to_string();
    let bytes = std::fs::read(file).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    if file.extension().is_some_and(|e| e == "ndjson") {
        let mut resources = Vec::new();
        for (no, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let r: Value = serde_json::from_slice(line).map_err(|e| anyhow::anyhow!("{source}:{}: {e}", no + 1))?;
            let (rtype, id) = identity(&r).map_err(|why| anyhow::anyhow!("{source}:{}: {why}", no + 1))?;
            resources.push((r, rtype, id));
        }
        return Ok(resources
            .chunks(batch)
            .enumerate()
            .map(|(i, chunk)| {
                let entries: Vec<Value> = chunk
                    .iter()
                    .map(|(r, rtype, id)| match id {
                        Some(id) => {
                            json!({"resource": r, "request": {"method": "PUT", "url": format!("{rtype}/{id}")}})
                        }
                        None => json!({"resource": r, "request": {"method": "POST", "url": rtype}}),
                    })
                    .collect();
                let first = i * batch + 1;
                Unit {
                    source: format!("{source} (lines {first}-{})", first + chunk.len() - 1),
                    resources: chunk.len() as u64,
                    method: reqwest::Method::POST,
                    path: String::new(),
                    body: json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
                        .to_string()
                        .into_bytes(),
                }
            })
            .collect());
    }
    let r: Value = serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
    let (rtype, id) = identity(&r).map_err(|why| anyhow::anyhow!("{source}: {why}"))?;
    let (method, path, resources) = match (rtype.as_str(), id) {
        ("Bundle", _) if matches!(r["type"].as_str(), Some("transaction" | "batch")) => {
            (reqwest::Method::POST, String::new(), r["entry"].as_array().map_or(0, Vec::len) as u64)
        }
        (_, Some(id)) => (reqwest::Method::PUT, format!("{rtype}/{id}"), 1),
        (_, None) => (reqwest::Method::POST, rtype, 1),
    };
    // The file's own bytes: the server sees exactly what was given (decimals and all).
    Ok(vec![Unit { source, resources, method, path, body: bytes }])
}

fn identity(r: &Value) -> Result<(String, Option<String>), String> {
    let rtype = r["resourceType"].as_str().ok_or("not a FHIR resource (no resourceType)")?;
    Ok((rtype.to_string(), r["id"].as_str().map(str::to_string)))
}

/// Sends one request; an error says what the server answered.
async fn send(http: &reqwest::Client, base: &str, token: Option<&str>, u: &Unit) -> Result<(), String> {
    let mut req = http
        .request(u.method.clone(), format!("{base}/{}", u.path))
        .header("content-type", "application/fhir+json")
        .header("accept", "application/fhir+json")
        .header("prefer", "return=minimal")
        .body(u.body.clone());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.map_err(|e| format!("{} {base}/{}: {e}", u.method, u.path))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    let diagnostics = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|o| {
            let issues = o["issue"].as_array()?;
            Some(
                issues
                    .iter()
                    .map(|i| {
                        let at = i["expression"][0].as_str().unwrap_or("");
                        format!(
                            "{} {}",
                            i["diagnostics"].as_str().unwrap_or(""),
                            if at.is_empty() { String::new() } else { format!("(at {at})") }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })
        .unwrap_or(text);
    Err(format!("HTTP {status}: {}", diagnostics.trim()))
}
