//! `fhir-ledger-bench auth`: what authorization costs. The same reads and searches against a
//! server with `--auth off` and one with SMART on (a clinician's token: scopes, the consent
//! engine and the disclosure log on every request), alternating in one invocation: an open
//! loop at a fixed rate (latency, as the read benchmark measures it) and a closed loop (how
//! many requests the 2 cores serve, i.e. CPU cost per request).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::load::{hist, latency_json, merge, print_latency};

#[derive(clap::Args, Debug)]
pub struct AuthArgs {
    /// Base URL of the server with `--auth off`.
    #[arg(long)]
    pub plain: String,
    /// Base URL of the server with SMART authorization on.
    #[arg(long)]
    pub smart: String,
    /// Access token for the SMART server.
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Files of request paths (one per line, e.g. `Observation/123`), per server.
    #[arg(long)]
    pub plain_reads: PathBuf,
    #[arg(long)]
    pub smart_reads: PathBuf,
    #[arg(long)]
    pub plain_searches: PathBuf,
    #[arg(long)]
    pub smart_searches: PathBuf,
    /// Requests per open-loop run.
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Open-loop arrival rate per second (reads; searches run at a fifth of it).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Seconds per closed-loop run.
    #[arg(long, default_value_t = 8)]
    pub seconds: u64,
    /// Concurrent clients of the closed loop.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Alternating rounds (plain, smart) per measurement.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// What to call the two servers in the report (the same bench compares `--no-metrics`
    /// with metrics on).
    #[arg(long, default_value = "auth off")]
    pub plain_name: String,
    #[arg(long, default_value = "SMART+consent")]
    pub smart_name: String,
}

fn lines(p: &PathBuf) -> anyhow::Result<Arc<Vec<String>>> {
    let text = std::fs::read_to_string(p).with_context(|| p.display().to_string())?;
    let v: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if v.is_empty() {
        bail!("{}: no paths", p.display());
    }
    Ok(Arc::new(v))
}

#[derive(Clone)]
struct Target {
    base: String,
    token: Option<String>,
    paths: Arc<Vec<String>>,
}

async fn one(client: &reqwest::Client, t: &Target, i: usize) -> bool {
    let path = &t.paths[i % t.paths.len()];
    let mut req = client.get(format!("{}/{path}", t.base));
    if let Some(tok) = &t.token {
        req = req.bearer_auth(tok);
    }
    match req.send().await {
        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
        _ => false,
    }
}

async fn open_loop(client: &reqwest::Client, t: &Target, n: usize, rate: u64) -> anyhow::Result<Histogram<u64>> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, t, next) = (client.clone(), t.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let scheduled = start + interval * i as u32;
                tokio::time::sleep_until(scheduled).await;
                if !one(&client, &t, i.wrapping_mul(7919)).await {
                    errors += 1;
                }
                let _ = h.record(scheduled.elapsed().as_micros() as u64);
            }
            (h, errors)
        }));
    }
    let (h, errors) = merge(tasks).await?;
    if errors > 0 {
        bail!("{errors} requests to {} failed", t.base);
    }
    Ok(h)
}

async fn closed_loop(client: &reqwest::Client, t: &Target, clients: usize, secs: u64) -> anyhow::Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, t, stop, done) = (client.clone(), t.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = c * 104_729;
            let mut errors = 0usize;
            while !stop.load(Ordering::Relaxed) {
                if one(&client, &t, i).await {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors += 1;
                }
                i += 1;
            }
            errors
        }));
    }
    let start = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for t in tasks {
        errors += t.await?;
    }
    if errors > 0 {
        bail!("{errors} requests to {} failed", t.base);
    }
    Ok(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

pub async fn run(args: AuthArgs) -> anyhow::Result<()> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build()?;
    let mut report = serde_json::Map::new();
    for (kind, plain_paths, smart_paths, rate) in [
        ("read", &args.plain_reads, &args.smart_reads, args.rate),
        ("search", &args.plain_searches, &args.smart_searches, (args.rate / 5).max(1)),
    ] {
        let plain = Target { base: args.plain.clone(), token: None, paths: lines(plain_paths)? };
        let smart = Target { base: args.smart.clone(), token: Some(args.token.clone()), paths: lines(smart_paths)? };
        // Warm both (caches, connections) before measuring.
        closed_loop(&client, &plain, args.clients, 2).await?;
        closed_loop(&client, &smart, args.clients, 2).await?;
        let (mut hp, mut hs) = (hist(), hist());
        let (mut tp, mut ts) = (Vec::new(), Vec::new());
        for round in 0..args.rounds {
            // Alternate which side goes first, so drift (caches, page cache, CPU clock) is shared.
            for smart_side in if round % 2 == 0 { [false, true] } else { [true, false] } {
                let (t, h) = if smart_side { (&smart, &mut hs) } else { (&plain, &mut hp) };
                h.add(open_loop(&client, t, args.requests, rate).await?)?;
            }
            for smart_side in if round % 2 == 0 { [false, true] } else { [true, false] } {
                let (t, v) = if smart_side { (&smart, &mut ts) } else { (&plain, &mut tp) };
                v.push(closed_loop(&client, t, args.clients, args.seconds).await?);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (tp, ts) = (mean(&tp), mean(&ts));
        let q = |h: &Histogram<u64>, x: f64| h.value_at_quantile(x) as f64;
        println!("{kind}s, open loop at {rate}/s ({} requests x {} rounds each):", args.requests, args.rounds);
        let (off, on) = (&args.plain_name, &args.smart_name);
        print_latency(&format!("{kind} {off}"), &hp);
        print_latency(&format!("{kind} {on}"), &hs);
        println!(
            "  latency ratio {on}/{off}: p50 {:.2}x  p95 {:.2}x  p99 {:.2}x",
            q(&hs, 0.5) / q(&hp, 0.5),
            q(&hs, 0.95) / q(&hp, 0.95),
            q(&hs, 0.99) / q(&hp, 0.99)
        );
        println!(
            "{kind}s, closed loop ({} clients, {} s x {} rounds): {off} {tp:.0}/s, {on} {ts:.0}/s: cost per request {:.2}x",
            args.clients,
            args.seconds,
            args.rounds,
            tp / ts
        );
        report.insert(
            kind.to_string(),
            json!({"rate": rate, "off": latency_json(&hp), "smart": latency_json(&hs),
                   "p50_ratio": q(&hs, 0.5) / q(&hp, 0.5), "p95_ratio": q(&hs, 0.95) / q(&hp, 0.95),
                   "throughput_off": tp, "throughput_smart": ts, "cost_ratio": tp / ts}),
        );
    }
    if let Some(p) = &args.json_out {
        std::fs::write(p, serde_json::to_string_pretty(&Value::Object(report))?)?;
    }
    Ok(())
}
