//! `fhir-ledger-bench load`: a load generator against a running server (a real process), with an
//! optional PostgreSQL JSONB baseline measured in the same run.
//!
//! Phases: (a) Synthea transaction ingest, (b) single-resource creates from many clients,
//! (c) reads by id at a fixed arrival rate (open loop: latency counts from the scheduled send
//! time, so a slow server cannot hide behind fewer requests), (d) the same Synthea resources
//! bulk-inserted into PostgreSQL as JSONB, one transaction per bundle, `synchronous_commit=on`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde_json::Value;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// FHIR base URL of the server under test.
    #[arg(long)]
    pub base: String,
    /// Directory of Synthea transaction bundles.
    #[arg(long, default_value = "../shared/data/synthea")]
    pub synthea: PathBuf,
    /// Concurrent clients posting transaction bundles.
    #[arg(long, default_value_t = 4)]
    pub ingest_clients: usize,
    /// How many times each bundle is posted (its entries are POSTs, so each repeat stores new resources).
    #[arg(long, default_value_t = 1)]
    pub ingest_repeat: usize,
    /// Concurrent clients for single-resource creates.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Single-resource creates to send.
    #[arg(long, default_value_t = 20_000)]
    pub creates: usize,
    /// Reads by id to send.
    #[arg(long, default_value_t = 20_000)]
    pub reads: usize,
    /// Read arrival rate per second.
    #[arg(long, default_value_t = 2_000)]
    pub read_rate: u64,
    /// PostgreSQL connection string for the baseline (e.g. "host=127.0.0.1 port=5433 user=postgres").
    #[arg(long)]
    pub postgres: Option<String>,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// Seconds a request may take (a slow peer's largest ingest bundle can need minutes).
    #[arg(long, default_value_t = 120)]
    pub timeout_secs: u64,
}

pub(crate) fn hist() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits; bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

pub(crate) fn latency_json(h: &Histogram<u64>) -> Value {
    serde_json::json!({
        "p50_ms": ms(h.value_at_quantile(0.50)), "p95_ms": ms(h.value_at_quantile(0.95)),
        "p99_ms": ms(h.value_at_quantile(0.99)), "p999_ms": ms(h.value_at_quantile(0.999)), "max_ms": ms(h.max()),
    })
}

pub(crate) fn print_latency(name: &str, h: &Histogram<u64>) {
    println!(
        "  {name} latency ms: p50 {:.2}  p95 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    );
}

struct Bundle {
    raw: bytes::Bytes,
    value: Value,
    entries: usize,
}

fn load_bundles(dir: &PathBuf) -> anyhow::Result<Vec<Bundle>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let raw = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        let value: Value = serde_json::from_slice(&raw).with_context(|| format!("parsing {}", p.display()))?;
        let entries = value["entry"].as_array().map_or(0, Vec::len);
        out.push(Bundle { raw: raw.into(), value, entries });
    }
    if out.is_empty() {
        bail!("no bundles in {}", dir.display());
    }
    Ok(out)
}

pub async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let base = args.base.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(args.timeout_secs))
        .build()?;
    let bundles = Arc::new(load_bundles(&args.synthea)?);
    let total_entries: usize = bundles.iter().map(|b| b.entries).sum::<usize>() * args.ingest_repeat;
    println!(
        "fhir-ledger-bench load against {base}: {} bundles x{} = {total_entries} resources",
        bundles.len(),
        args.ingest_repeat
    );
    let mut report = serde_json::Map::new();

    // (a) Synthea transactions.
    let (ingest, locations) = ingest(&client, &base, &bundles, &args).await?;
    report.insert("synthea_ingest".into(), ingest.clone());

    // (b) single-resource creates.
    let patients: Vec<String> = locations.iter().filter(|l| l.starts_with("Patient/")).cloned().collect();
    let creates = creates(&client, &base, &bundles, &patients, &args).await?;
    report.insert("single_creates".into(), creates);

    // (c) reads at a fixed rate.
    let reads = reads(&client, &base, &locations, &args).await?;
    report.insert("reads_by_id".into(), reads);

    // (d) PostgreSQL baseline.
    if let Some(conn) = &args.postgres {
        let pg = postgres_baseline(conn, &bundles, &args).await?;
        let ratio =
            ingest["resources_per_s"].as_f64().unwrap_or(0.0) / pg["resources_per_s"].as_f64().unwrap_or(f64::NAN);
        println!("  => ledger / PostgreSQL ingest ratio: {ratio:.2}x");
        report.insert("postgres_jsonb_ingest".into(), pg);
        report.insert("ingest_ratio_vs_postgres".into(), serde_json::json!(ratio));
    }
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(report))?)?;
    }
    Ok(())
}

async fn ingest(
    client: &reqwest::Client,
    base: &str,
    bundles: &Arc<Vec<Bundle>>,
    args: &LoadArgs,
) -> anyhow::Result<(Value, Vec<String>)> {
    let jobs: Vec<usize> = (0..args.ingest_repeat).flat_map(|_| 0..bundles.len()).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let locations = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.ingest_clients {
        let (client, base, bundles, jobs, next, locations) =
            (client.clone(), base.to_string(), bundles.clone(), jobs.clone(), next.clone(), locations.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&b) = jobs.get(i) else { break };
                let t = Instant::now();
                let resp = client
                    .post(format!("{base}/"))
                    .header("content-type", "application/fhir+json")
                    .body(bundles[b].raw.clone())
                    .send()
                    .await;
                let ok = match resp {
                    Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                        Ok(v) => {
                            let mut found: Vec<String> = v["entry"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|e| e["response"]["location"].as_str())
                                .map(|l| l.split("/_history").next().unwrap_or(l).to_string())
                                .collect();
                            if let Ok(mut all) = locations.lock() {
                                all.append(&mut found);
                            }
                            true
                        }
                        Err(_) => false,
                    },
                    _ => false,
                };
                let _ = h.record(t.elapsed().as_micros() as u64);
                if !ok {
                    errors += 1;
                }
            }
            (h, errors)
        }));
    }
    let (h, errors) = merge(tasks).await?;
    let secs = start.elapsed().as_secs_f64();
    let resources = jobs.iter().map(|&b| bundles[b].entries).sum::<usize>();
    if errors > 0 {
        bail!("{errors} transaction bundles failed");
    }
    let rps = resources as f64 / secs;
    println!("(a) Synthea transactions, {} clients: {resources} resources in {secs:.2} s = {rps:.0} resources/s, {:.1} bundles/s", args.ingest_clients, jobs.len() as f64 / secs);
    print_latency("per bundle", &h);
    let locations = std::mem::take(&mut *locations.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    let mut v = serde_json::json!({"resources": resources, "seconds": secs, "resources_per_s": rps, "clients": args.ingest_clients});
    v["latency_per_bundle"] = latency_json(&h);
    Ok((v, locations))
}

pub(crate) async fn merge(
    tasks: Vec<tokio::task::JoinHandle<(Histogram<u64>, usize)>>,
) -> anyhow::Result<(Histogram<u64>, usize)> {
    let mut h = hist();
    let mut errors = 0;
    for t in tasks {
        let (th, e) = t.await?;
        h.add(th)?;
        errors += e;
    }
    Ok((h, errors))
}

/// Small Observations from the Synthea data, re-pointed at patients that exist on the server.
fn observation_bodies(bundles: &[Bundle], patients: &[String]) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    for b in bundles {
        for e in b.value["entry"].as_array().into_iter().flatten() {
            let r = &e["resource"];
            if r["resourceType"] != "Observation" || out.len() >= 2000 {
                continue;
            }
            let mut r = r.clone();
            if let Some(o) = r.as_object_mut() {
                o.remove("id");
                o.remove("encounter");
                match patients.get(out.len() % patients.len().max(1)) {
                    Some(p) => {
                        o.insert("subject".into(), serde_json::json!({ "reference": p }));
                    }
                    None => {
                        o.remove("subject");
                    }
                }
            }
            out.push(serde_json::to_vec(&r).unwrap_or_default().into());
        }
    }
    out
}

async fn creates(
    client: &reqwest::Client,
    base: &str,
    bundles: &Arc<Vec<Bundle>>,
    patients: &[String],
    args: &LoadArgs,
) -> anyhow::Result<Value> {
    let bodies = Arc::new(observation_bodies(bundles, patients));
    if bodies.is_empty() {
        bail!("no Observations in the Synthea data");
    }
    let avg = bodies.iter().map(bytes::Bytes::len).sum::<usize>() / bodies.len();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (client, base, bodies, next, total) =
            (client.clone(), base.to_string(), bodies.clone(), next.clone(), args.creates);
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let t = Instant::now();
                let r = client
                    .post(format!("{base}/Observation"))
                    .header("content-type", "application/fhir+json")
                    .header("prefer", "return=minimal")
                    .body(bodies[i % bodies.len()].clone())
                    .send()
                    .await;
                let ok = matches!(r, Ok(r) if r.status().as_u16() == 201);
                let _ = h.record(t.elapsed().as_micros() as u64);
                if !ok {
                    errors += 1;
                }
            }
            (h, errors)
        }));
    }
    let (h, errors) = merge(tasks).await?;
    let secs = start.elapsed().as_secs_f64();
    if errors > 0 {
        bail!("{errors} creates failed");
    }
    let rps = args.creates as f64 / secs;
    println!(
        "(b) single-resource creates, {} clients, ~{avg} B Observations: {} in {secs:.2} s = {rps:.0} requests/s",
        args.clients, args.creates
    );
    print_latency("create", &h);
    let mut v = serde_json::json!({"requests": args.creates, "seconds": secs, "requests_per_s": rps, "clients": args.clients, "body_bytes_avg": avg});
    v["latency"] = latency_json(&h);
    Ok(v)
}

async fn reads(client: &reqwest::Client, base: &str, locations: &[String], args: &LoadArgs) -> anyhow::Result<Value> {
    if locations.is_empty() {
        bail!("nothing to read");
    }
    let locations = Arc::new(locations.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / args.read_rate as f64);
    // Enough workers that the schedule holds even if each read took ~30 ms.
    let workers = ((args.read_rate as usize) / 30).clamp(16, 256);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (client, base, locations, next, total) =
            (client.clone(), base.to_string(), locations.clone(), next.clone(), args.reads);
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            let mut errors = 0;
            let mut x = w as u64 * 7919 + 1;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let scheduled = start + interval * i as u32;
                tokio::time::sleep_until(scheduled).await;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let loc = &locations[(x % locations.len() as u64) as usize];
                let r = client.get(format!("{base}/{loc}")).send().await;
                let ok = match r {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                let _ = h.record(scheduled.elapsed().as_micros() as u64);
                if !ok {
                    errors += 1;
                }
            }
            (h, errors)
        }));
    }
    let (h, errors) = merge(tasks).await?;
    let secs = start.elapsed().as_secs_f64();
    if errors > 0 {
        bail!("{errors} reads failed");
    }
    let achieved = args.reads as f64 / secs;
    println!("(c) reads by id, open loop at {}/s: {} reads, achieved {achieved:.0}/s", args.read_rate, args.reads);
    print_latency("read", &h);
    let mut v = serde_json::json!({"requests": args.reads, "target_rate": args.read_rate, "achieved_rate": achieved});
    v["latency"] = latency_json(&h);
    Ok(v)
}

async fn postgres_baseline(conn: &str, bundles: &Arc<Vec<Bundle>>, args: &LoadArgs) -> anyhow::Result<Value> {
    let connect = || async {
        let (c, connection) =
            tokio_postgres::connect(conn, tokio_postgres::NoTls).await.context("connecting to PostgreSQL")?;
        tokio::spawn(connection);
        c.batch_execute("SET synchronous_commit = on").await?;
        anyhow::Ok(c)
    };
    let setup = connect().await?;
    setup
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS resources (id text PRIMARY KEY, type text NOT NULL, version int NOT NULL, \
             last_updated timestamptz NOT NULL, content jsonb NOT NULL); TRUNCATE resources;",
        )
        .await?;
    let sc: String = setup.query_one("SHOW synchronous_commit", &[]).await?.get(0);
    let fsync: String = setup.query_one("SHOW fsync", &[]).await?.get(0);
    if sc != "on" || fsync != "on" {
        bail!("PostgreSQL must run with synchronous_commit=on and fsync=on (got {sc}, {fsync})");
    }
    let jobs: Vec<usize> = (0..args.ingest_repeat).flat_map(|_| 0..bundles.len()).collect();
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.ingest_clients {
        let mut c = connect().await?;
        let (bundles, jobs, next) = (bundles.clone(), jobs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = hist();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&b) = jobs.get(i) else { break };
                let t = Instant::now();
                insert_bundle(&mut c, &bundles[b].value).await?;
                let _ = h.record(t.elapsed().as_micros() as u64);
            }
            anyhow::Ok(h)
        }));
    }
    let mut h = hist();
    for t in tasks {
        h.add(t.await??)?;
    }
    let secs = start.elapsed().as_secs_f64();
    let resources = jobs.iter().map(|&b| bundles[b].entries).sum::<usize>();
    let stored: i64 = setup.query_one("SELECT count(*) FROM resources", &[]).await?.get(0);
    if usize::try_from(stored).ok() != Some(resources) {
        bail!("PostgreSQL holds {stored} rows, expected {resources}");
    }
    let rps = resources as f64 / secs;
    println!("(d) PostgreSQL JSONB baseline (synchronous_commit=on, one transaction per bundle, multi-row INSERT), {} clients: {resources} resources in {secs:.2} s = {rps:.0} resources/s", args.ingest_clients);
    print_latency("per bundle", &h);
    let mut v = serde_json::json!({"resources": resources, "seconds": secs, "resources_per_s": rps, "clients": args.ingest_clients});
    v["latency_per_bundle"] = latency_json(&h);
    Ok(v)
}

/// One bundle as one transaction of multi-row INSERTs (1000 rows a statement), as an
/// application that stores FHIR resources in JSONB would write a transaction bundle.
async fn insert_bundle(c: &mut tokio_postgres::Client, bundle: &Value) -> anyhow::Result<()> {
    let tx = c.transaction().await?;
    let rows: Vec<(String, String, Value)> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let mut r = e["resource"].clone();
            let id = uuid::Uuid::new_v4().to_string();
            let rtype = r["resourceType"].as_str().unwrap_or_default().to_string();
            r["id"] = Value::String(id.clone());
            (id, rtype, r)
        })
        .collect();
    for chunk in rows.chunks(1000) {
        let mut sql = String::from("INSERT INTO resources (id, type, version, last_updated, content) VALUES ");
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::with_capacity(chunk.len() * 3);
        for (i, (id, rtype, content)) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(',');
            }
            let _ = write!(sql, "(${}, ${}, 1, now(), ${})", i * 3 + 1, i * 3 + 2, i * 3 + 3); // cannot fail on a String
            params.push(id);
            params.push(rtype);
            params.push(content);
        }
        tx.execute(sql.as_str(), &params).await?;
    }
    tx.commit().await?;
    Ok(())
}
