//! `fhir-ledger-bench snapshot`: write latency while nodes build their Raft snapshots.
//! Closed-loop clients create Patients; after a warm-up a control task has every node build a
//! snapshot (`POST /admin/snapshot`, all nodes at once, as the snapshot policy has them do at
//! the same log positions), waits for the last, pauses, and asks again until the end. A write
//! whose time overlapped a build's counts as written during one; the two sets of writes are
//! reported apart, beside the builds' durations.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::cluster::{create_patient, patient_body};
use crate::load::{hist, latency_json, print_latency};

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// FHIR base URLs of the nodes (clients are spread over them round-robin; every node builds).
    #[arg(long, value_delimiter = ',', required = true)]
    pub fhir: Vec<String>,
    /// The nodes' admin bearer token.
    #[arg(long, env = "FHIR_LEDGER_ADMIN_TOKEN")]
    pub admin_token: String,
    /// Concurrent writers.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 30)]
    pub seconds: u64,
    /// Seconds of writes before the first build, not counted.
    #[arg(long, default_value_t = 5)]
    pub warmup: u64,
    /// Seconds between the end of one build and the request for the next.
    #[arg(long, default_value_t = 2)]
    pub pause: u64,
    /// Bytes of each written Patient.
    #[arg(long, default_value_t = 1024)]
    pub value_bytes: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
    /// Also write every write's and every build's span (µs since the start) as JSON here, to
    /// see where in a build the slow writes fall.
    #[arg(long)]
    pub spans_out: Option<std::path::PathBuf>,
}

/// One write: when it began and ended, in microseconds since the run began.
type Span = (u64, u64);

/// Closed-loop creates until `stop`; every write's span.
async fn writer(http: reqwest::Client, url: String, body: String, t0: Instant, stop: Arc<AtomicBool>) -> Vec<Span> {
    let mut spans = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let began = t0.elapsed().as_micros() as u64;
        let ok = create_patient(&http, &url, &body).await;
        // A failed write ends this writer's record with a zero-length span, counted below.
        spans.push(if ok { (began, t0.elapsed().as_micros() as u64) } else { (began, began) });
    }
    spans
}

/// Builds on every node at once until `until`; each round's span (first request to last answer).
async fn builder(args: &SnapshotArgs, http: reqwest::Client, t0: Instant, until: Instant) -> anyhow::Result<Vec<Span>> {
    let mut builds = Vec::new();
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    while Instant::now() < until {
        let began = t0.elapsed().as_micros() as u64;
        let asks: Vec<_> = args
            .fhir
            .iter()
            .map(|url| {
                let ask = http
                    .post(format!("{}/admin/snapshot", url.trim_end_matches('/')))
                    .bearer_auth(&args.admin_token)
                    .timeout(Duration::from_mins(10))
                    .send();
                tokio::spawn(ask)
            })
            .collect();
        for (url, ask) in args.fhir.iter().zip(asks) {
            let answer = ask.await?.with_context(|| format!("POST {url}/admin/snapshot"))?;
            if !answer.status().is_success() {
                bail!(
                    "POST {url}/admin/snapshot: HTTP {}: {}",
                    answer.status(),
                    answer.text().await.unwrap_or_default()
                );
            }
        }
        builds.push((began, t0.elapsed().as_micros() as u64));
        tokio::time::sleep(Duration::from_secs(args.pause)).await;
    }
    Ok(builds)
}

fn overlaps(w: Span, b: Span) -> bool {
    w.0 < b.1 && w.1 > b.0
}

fn report(name: &str, h: &Histogram<u64>, secs: f64) -> Value {
    let rate = h.len() as f64 / secs.max(1e-9);
    println!("{name}: {} writes in {secs:.1} s = {rate:.0} writes/s", h.len());
    print_latency("write", h);
    json!({"writes": h.len(), "seconds": secs, "writes_per_s": rate, "latency": latency_json(h)})
}

pub async fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    let http =
        reqwest::Client::builder().pool_max_idle_per_host(args.clients).timeout(Duration::from_secs(30)).build()?;
    let body = patient_body(args.value_bytes);
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(args.warmup + args.seconds);
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let url = args.fhir[c % args.fhir.len()].trim_end_matches('/').to_string();
        tasks.push(tokio::spawn(writer(http.clone(), url, body.clone(), t0, stop.clone())));
    }
    // The writers stop at the end whatever the builds are doing (the last one may outlast them).
    let stopping = async {
        tokio::time::sleep_until(until.into()).await;
        stop.store(true, Ordering::Relaxed);
    };
    let (builds, ()) = tokio::join!(builder(&args, http.clone(), t0, until), stopping);
    let mut spans = Vec::new();
    for t in tasks {
        spans.extend(t.await?);
    }
    let builds = builds?;
    let failed = spans.iter().filter(|w| w.0 == w.1).count();
    if failed > 0 {
        bail!("{failed} writes failed");
    }
    let from = args.warmup * 1_000_000;
    let end = (args.warmup + args.seconds) * 1_000_000;
    let (mut during, mut outside) = (hist(), hist());
    for &w in spans.iter().filter(|w| w.0 >= from) {
        let h = if builds.iter().any(|&b| overlaps(w, b)) { &mut during } else { &mut outside };
        h.record(w.1 - w.0)?;
    }
    let build_ms: Vec<u64> = builds.iter().map(|b| (b.1 - b.0) / 1000).collect();
    // Time under a build while writers ran (a build may outlast them).
    let build_secs: f64 = builds.iter().map(|b| b.1.min(end).saturating_sub(b.0.max(from)) as f64 / 1e6).sum();
    let measured = (end.saturating_sub(from)) as f64 / 1e6;
    println!(
        "{} clients over {} node(s), {} s measured after {} s; {} snapshot builds, ms: {:?}",
        args.clients,
        args.fhir.len(),
        args.seconds,
        args.warmup,
        build_ms.len(),
        build_ms
    );
    let during = report("during a build", &during, build_secs);
    let outside = report("outside builds", &outside, measured - build_secs);
    if let Some(path) = &args.spans_out {
        std::fs::write(path, serde_json::to_string(&json!({"builds": builds, "writes": spans}))?)?;
    }
    if let Some(path) = &args.json_out {
        let out = json!({"clients": args.clients, "nodes": args.fhir.len(), "builds_ms": build_ms,
            "during_build": during, "outside_builds": outside});
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}
