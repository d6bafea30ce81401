//! `fhir-ledger-bench cluster`: commit throughput and latency of single-resource creates on a
//! 3-node cluster, beside the same workload (same value bytes, same concurrency, clients spread
//! over the same number of nodes) against an etcd cluster through its v3 JSON gateway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use base64::Engine;
use serde_json::{json, Value};

use crate::load::{hist, latency_json, merge, print_latency};

#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    /// FHIR base URLs of the cluster's nodes (clients are spread over them round-robin).
    #[arg(long, value_delimiter = ',', required = true)]
    pub fhir: Vec<String>,
    /// etcd client URLs of the baseline cluster.
    #[arg(long, value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Concurrency levels to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub clients: Vec<usize>,
    /// Seconds per level and system.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Bytes of each written value (a Patient padded to this size; etcd stores the same bytes).
    #[arg(long, default_value_t = 1024)]
    pub value_bytes: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

/// A Patient of about `size` bytes of JSON.
pub(crate) fn patient_body(size: usize) -> String {
    let base = json!({"resourceType": "Patient", "active": true, "name": [{"family": "Bench", "given": ["Load"]}],
        "text": {"status": "generated", "div": ""}});
    let overhead = base.to_string().len() + "<div xmlns=\"http://www.w3.org/1999/xhtml\"></div>".len();
    let pad = "x".repeat(size.saturating_sub(overhead));
    let mut v = base;
    v["text"]["div"] = json!(format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{pad}</div>"));
    v.to_string()
}

/// One `POST {url}/Patient` of `body`, answered without the resource: whether it was created.
pub(crate) async fn create_patient(http: &reqwest::Client, url: &str, body: &str) -> bool {
    http.post(format!("{url}/Patient"))
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=minimal")
        .body(body.to_string())
        .send()
        .await
        .is_ok_and(|r| r.status().as_u16() == 201)
}

#[derive(Clone, Copy)]
enum System {
    Ledger,
    Etcd,
}

async fn level(system: System, urls: &[String], clients: usize, args: &ClusterArgs) -> anyhow::Result<Value> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).timeout(Duration::from_secs(30)).build()?;
    let body = patient_body(args.value_bytes);
    let value_b64 = base64::engine::general_purpose::STANDARD.encode(&body);
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url, stop) = (http.clone(), urls[c % urls.len()].trim_end_matches('/').to_string(), stop.clone());
        let (body, value_b64) = (body.clone(), value_b64.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut errors = 0;
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let t = Instant::now();
                let ok = match system {
                    System::Ledger => create_patient(&http, &url, &body).await,
                    System::Etcd => {
                        let key = base64::engine::general_purpose::STANDARD.encode(format!("bench/{c}/{seq}"));
                        http.post(format!("{url}/v3/kv/put"))
                            .json(&json!({"key": key, "value": value_b64}))
                            .send()
                            .await
                            .is_ok_and(|r| r.status().is_success())
                    }
                };
                let _ = h.record(t.elapsed().as_micros() as u64);
                if !ok {
                    errors += 1;
                }
            }
            (h, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let (h, errors) = merge(tasks).await?;
    let secs = start.elapsed().as_secs_f64();
    if errors > 0 {
        bail!("{errors} writes failed");
    }
    let n = h.len();
    let rate = n as f64 / secs;
    let name = match system {
        System::Ledger => "fhir-ledger",
        System::Etcd => "etcd",
    };
    println!("{name:>11}, {clients:>2} clients: {n} writes in {secs:.1} s = {rate:.0} writes/s");
    print_latency("write", &h);
    Ok(
        json!({"system": name, "clients": clients, "writes": n, "seconds": secs, "writes_per_s": rate, "latency": latency_json(&h)}),
    )
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    println!(
        "value: {} bytes (a Patient); {} s per level; clients spread over the nodes",
        args.value_bytes, args.seconds
    );
    let mut results = vec![];
    for &c in &args.clients {
        let ledger = level(System::Ledger, &args.fhir, c, &args).await?;
        let mut row = json!({"clients": c, "ledger": ledger});
        if !args.etcd.is_empty() {
            let etcd = level(System::Etcd, &args.etcd, c, &args).await?;
            let ratio =
                row["ledger"]["writes_per_s"].as_f64().unwrap_or(0.0) / etcd["writes_per_s"].as_f64().unwrap_or(1.0);
            println!("  ratio at {c} clients: {ratio:.2}x etcd's throughput");
            row["etcd"] = etcd;
            row["throughput_ratio"] = json!(ratio);
        }
        results.push(row);
    }
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}
