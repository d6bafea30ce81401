//! `fhir-ledger-bench supply`: EPCIS 2.0 capture throughput, then `$verify-product` and
//! `$trace` latency with the whole population stored, beside PostgreSQL holding the same events
//! as JSONB under a GIN index (the layout open EPCIS repositories use), in one invocation.
//!
//! The population is `--chains` custody chains of ten events each (10^6 events by default),
//! each chain one case of ten serialised packs through three partners of one of three supply
//! lines: the manufacturer commissions the packs, packs them into the case and ships it; the
//! wholesaler receives, stores and ships the case; the hospital pharmacy receives and unpacks
//! it, stocks the packs and dispenses one. Every event carries its CBV 2.0 Event Hash ID and
//! its partner's Ed25519 signature; documents hold 100 events of one partner. The trace of a
//! dispensed pack has ten steps, five of them reached through its case.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use ed25519_dalek::{Signer, SigningKey};
use rand::Rng;
use serde_json::{json, Value};

use crate::load::{hist, latency_json, print_latency};

#[derive(clap::Args, Debug, Clone)]
pub struct SupplyArgs {
    /// Base URL of the server under test (auth off: every event is checked by its signature).
    #[arg(long)]
    pub base: String,
    /// PostgreSQL connection string for the JSONB + GIN baseline.
    #[arg(long)]
    pub postgres: Option<String>,
    /// Custody chains to store (ten events each).
    #[arg(long, default_value_t = 100_000)]
    pub chains: usize,
    /// Chains whose capture is the measured throughput (the first ones).
    #[arg(long, default_value_t = 10_000)]
    pub measured_chains: usize,
    /// Concurrent capture clients.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Sequential `$verify-product` and `$trace` requests measured.
    #[arg(long, default_value_t = 2_000)]
    pub samples: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// The server's pid: before the latency phase, wait until it has settled (finished
    /// folding and compacting after the load: under 5% of a core for 2 s), as `scale.sh` does.
    #[arg(long)]
    pub server_pid: Option<u32>,
}

/// CPU seconds process `pid` has used (user + system), from `/proc/{pid}/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Waits until `pid` uses under 5% of a core over 2 s (at most 10 minutes); the seconds waited.
async fn settle(pid: u32) -> f64 {
    let start = Instant::now();
    let mut last = cpu_seconds(pid).unwrap_or_default();
    while start.elapsed().as_secs() < 600 {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let now = cpu_seconds(pid).unwrap_or_default();
        if now - last < 0.1 {
            break;
        }
        last = now;
    }
    start.elapsed().as_secs_f64()
}

const PREFIX: &str = "0312345";
const NS: &str = "https://fhir-ledger.dev/epcis/";
const CHAIN_EVENTS: usize = 10;
const LINES: usize = 3;

fn check_digit(digits: &str) -> char {
    let sum: u32 =
        digits.bytes().rev().enumerate().map(|(i, c)| u32::from(c - b'0') * if i % 2 == 0 { 3 } else { 1 }).sum();
    char::from_digit((10 - sum % 10) % 10, 10).unwrap_or('0')
}

fn with_check(body: &str) -> String {
    let c = check_digit(body);
    format!("{body}{c}")
}

fn gtin(c: usize) -> String {
    with_check(&format!("0{PREFIX}{:05}", c % 50))
}

fn pack(c: usize, k: usize) -> String {
    format!("https://id.gs1.org/01/{}/21/{c}-{k}", gtin(c))
}

fn case(c: usize) -> String {
    format!("https://id.gs1.org/00/{}", with_check(&format!("1{PREFIX}{c:09}")))
}

struct Party {
    id: String,
    gln: String,
    key: SigningKey,
}

impl Party {
    fn new(id: String, n: usize) -> Party {
        Party { id, gln: with_check(&format!("{PREFIX}{n:05}")), key: SigningKey::generate(&mut rand::rngs::OsRng) }
    }
    fn location(&self) -> String {
        format!("https://id.gs1.org/414/{}", self.gln)
    }
    fn thumbprint(&self) -> String {
        fhir_ledger::jws::thumbprint(&self.key.verifying_key())
    }
    fn sign(&self, typ: &str, payload: &[u8]) -> String {
        let header = b64url(json!({"alg": "EdDSA", "kid": self.thumbprint(), "typ": typ}).to_string().as_bytes());
        let input = format!("{header}.{}", b64url(payload));
        format!("{header}..{}", b64url(&self.key.sign(input.as_bytes()).to_bytes()))
    }
    fn organization(&self) -> Value {
        json!({"resourceType": "Organization", "id": self.id, "name": self.id,
               "identifier": [{"system": "https://www.gs1.org/gln", "value": self.gln},
                              {"system": "urn:ietf:rfc:7638", "value": self.thumbprint()}],
               "extension": [{"url": "urn:fhir-ledger:StructureDefinition/partner-key",
                              "valueString": b64url(self.key.verifying_key().as_bytes())}]})
    }
    fn licence(&self, board: &Party) -> Value {
        let target = format!("Organization/{}", self.id);
        let statement =
            fhir_ledger::supply::certs::statement("wholesale-licence", &target, "2020-01-01", "2040-01-01", &self.id);
        let sig = board.sign(fhir_ledger::supply::certs::CERT_JWS_TYPE, statement.as_bytes());
        json!({"resourceType": "VerificationResult", "id": format!("licence-{}", self.id), "target": [{"reference": target}],
               "status": "validated",
               "validationProcess": [{"coding": [{"system": "urn:fhir-ledger:certificate-kind", "code": "wholesale-licence"}]}],
               "extension": [{"url": "urn:fhir-ledger:StructureDefinition/certificate-period",
                              "valuePeriod": {"start": "2020-01-01", "end": "2040-01-01"}}],
               "validator": [{"organization": {"reference": format!("Organization/{}", board.id)}, "identityCertificate": self.id,
                              "attestationSignature": {"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5"}],
                                                       "when": "2020-01-01T00:00:00Z", "who": {"reference": format!("Organization/{}", board.id)},
                                                       "sigFormat": "application/jose", "data": b64(sig.as_bytes())}}]})
    }
}

fn b64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The three partners of each supply line: manufacturer, wholesaler, hospital pharmacy.
struct Parties {
    board: Party,
    lines: Vec<[Party; 3]>,
}

fn parties() -> Parties {
    let lines = (0..LINES)
        .map(|l| {
            [
                Party::new(format!("bench-mfr-{l}"), 10 * l + 1),
                Party::new(format!("bench-whs-{l}"), 10 * l + 2),
                Party::new(format!("bench-hosp-{l}"), 10 * l + 3),
            ]
        })
        .collect();
    Parties { board: Party::new("bench-board".into(), 99), lines }
}

/// Chain `c`'s ten events, each with the index of the partner (0..3) that captures it.
fn chain(c: usize, line: &[Party; 3]) -> Vec<(usize, Value)> {
    let t0 = 1_767_225_600_000_i64 + i64::try_from(c).unwrap_or_default() * 1000; // 2026-01-01 + c s
    let at = |h: i64| fhir_ledger::fhir::instant(t0 + h * 3_600_000);
    let packs: Vec<String> = (0..10).map(|k| pack(c, k)).collect();
    let cs = case(c);
    let ev = |kind: &str, h: i64, step: &str, p: usize, extra: Value| {
        let loc = line[p].location();
        let mut e = json!({"type": kind, "eventTime": at(h), "eventTimeZoneOffset": "+00:00", "bizStep": step,
                           "readPoint": {"id": loc}, "bizLocation": {"id": loc}});
        if let (Some(o), Some(x)) = (e.as_object_mut(), extra.as_object()) {
            o.extend(x.clone());
        }
        (p, e)
    };
    let ship = |to: usize| {
        json!({"action": "OBSERVE", "disposition": "in_transit", "epcList": [cs],
               "destinationList": [{"type": "location", "destination": line[to].location()}]})
    };
    vec![
        ev(
            "ObjectEvent",
            0,
            "commissioning",
            0,
            json!({"action": "ADD", "disposition": "active", "epcList": packs,
            "ilmd": {"cbvmda:lotNumber": format!("L{}", c / 100), "cbvmda:itemExpirationDate": "2030-01-31"}}),
        ),
        ev("AggregationEvent", 1, "packing", 0, json!({"action": "ADD", "parentID": cs, "childEPCs": packs})),
        ev("ObjectEvent", 2, "shipping", 0, ship(1)),
        ev(
            "ObjectEvent",
            30,
            "receiving",
            1,
            json!({"action": "OBSERVE", "disposition": "in_progress", "epcList": [cs]}),
        ),
        ev(
            "ObjectEvent",
            31,
            "storing",
            1,
            json!({"action": "OBSERVE", "disposition": "sellable_not_accessible", "epcList": [cs]}),
        ),
        ev("ObjectEvent", 60, "shipping", 1, ship(2)),
        ev(
            "ObjectEvent",
            80,
            "receiving",
            2,
            json!({"action": "OBSERVE", "disposition": "in_progress", "epcList": [cs]}),
        ),
        ev("AggregationEvent", 81, "unpacking", 2, json!({"action": "DELETE", "parentID": cs, "childEPCs": packs})),
        ev(
            "ObjectEvent",
            82,
            "stocking",
            2,
            json!({"action": "OBSERVE", "disposition": "sellable_accessible", "epcList": packs}),
        ),
        ev(
            "ObjectEvent",
            200,
            "dispensing",
            2,
            json!({"action": "OBSERVE", "disposition": "dispensed", "epcList": [pack(c, 0)]}),
        ),
    ]
}

/// The capture documents (100 events of one partner each) of chains `range`, as bodies, with
/// each document's events for the PostgreSQL baseline.
fn documents(parties: &Parties, range: std::ops::Range<usize>) -> Vec<(bytes::Bytes, Vec<Value>)> {
    let ctx = json!({"fl": NS});
    let mut buffers: Vec<Vec<(Value, String)>> = (0..LINES * 3).map(|_| Vec::new()).collect();
    let mut out = Vec::new();
    let flush = |events: &mut Vec<(Value, String)>, out: &mut Vec<(bytes::Bytes, Vec<Value>)>| {
        if events.is_empty() {
            return;
        }
        let sigs: Vec<Value> = events.iter().map(|(e, j)| json!({"eventID": e["eventID"], "jws": j})).collect();
        let list: Vec<Value> = events.drain(..).map(|(e, _)| e).collect();
        let doc = json!({"@context": [fhir_ledger::epcis::CONTEXT, ctx], "type": "EPCISDocument", "schemaVersion": "2.0",
                         "creationDate": "2026-01-01T00:00:00Z", "epcisHeader": {"fl:eventSignatures": sigs},
                         "epcisBody": {"eventList": list}});
        let body = bytes::Bytes::from(doc.to_string());
        out.push((body, list));
    };
    for c in range {
        let l = c % LINES;
        for (p, mut e) in chain(c, &parties.lines[l]) {
            let id = fhir_ledger::epcis::hash::event_hash_id(&e, &[&ctx]).unwrap_or_default();
            let jws = parties.lines[l][p].sign(fhir_ledger::supply::EVENT_JWS_TYPE, id.as_bytes());
            e["eventID"] = json!(id);
            let b = &mut buffers[l * 3 + p];
            b.push((e, jws));
            if b.len() == 100 {
                flush(b, &mut out);
            }
        }
    }
    for b in &mut buffers {
        flush(b, &mut out);
    }
    out
}

/// [`documents`] on two threads.
fn generate(parties: &Parties, range: std::ops::Range<usize>) -> Vec<(bytes::Bytes, Vec<Value>)> {
    let mid = range.start + (range.end - range.start) / 2;
    std::thread::scope(|s| {
        let second = s.spawn(|| documents(parties, mid..range.end));
        let mut out = documents(parties, range.start..mid);
        out.extend(second.join().unwrap_or_default());
        out
    })
}

async fn put(http: &reqwest::Client, base: &str, r: &Value) -> anyhow::Result<()> {
    let url =
        format!("{base}/{}/{}", r["resourceType"].as_str().unwrap_or_default(), r["id"].as_str().unwrap_or_default());
    let resp = http.put(url).header("content-type", "application/fhir+json").body(r.to_string()).send().await?;
    if !resp.status().is_success() {
        bail!("PUT {}: {} {}", r["id"], resp.status(), resp.text().await?);
    }
    Ok(())
}

/// Captures `docs` with `clients` concurrent clients: the seconds until the last one was
/// acknowledged (recorded and fsynced), and until its last event was searchable.
async fn capture(
    http: &reqwest::Client,
    base: &str,
    docs: &Arc<Vec<(bytes::Bytes, Vec<Value>)>>,
    clients: usize,
) -> anyhow::Result<(f64, f64)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, docs, next) = (http.clone(), format!("{base}/epcis/capture"), docs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((body, _)) = docs.get(i) else { break };
                let r = http.post(&url).header("content-type", "application/ld+json").body(body.clone()).send().await?;
                if r.status().as_u16() != 202 {
                    bail!("capture: {} {}", r.status(), r.text().await?);
                }
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let acknowledged = start.elapsed().as_secs_f64();
    // Until it is searchable: the index folds captured events behind the commits; a query
    // of the last document's last event waits for it, so the rate includes the indexing.
    if let Some((_, events)) = docs.last() {
        let id = events.last().and_then(|e| e["eventID"].as_str()).unwrap_or_default();
        let encoded: String = url_encode(id);
        let r = http.get(format!("{base}/epcis/events/{encoded}")).send().await?;
        if r.status().as_u16() != 200 {
            bail!("the last captured event is not found: {} {}", r.status(), r.text().await?);
        }
    }
    Ok((acknowledged, start.elapsed().as_secs_f64()))
}

fn url_encode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

async fn pg_insert(c: &mut tokio_postgres::Client, events: &[Value]) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let tx = c.transaction().await?;
    let mut sql = String::from("INSERT INTO epcis_events (event) VALUES ");
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        let _ = write!(sql, "(${})", i + 1);
        params.push(e);
    }
    tx.execute(sql.as_str(), &params).await?;
    tx.commit().await?;
    Ok(())
}

async fn pg_connect(conn: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (c, connection) =
        tokio_postgres::connect(conn, tokio_postgres::NoTls).await.context("connecting to PostgreSQL")?;
    tokio::spawn(connection);
    c.batch_execute("SET synchronous_commit = on").await?;
    Ok(c)
}

async fn pg_capture(conn: &str, docs: &Arc<Vec<(bytes::Bytes, Vec<Value>)>>, clients: usize) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut c = pg_connect(conn).await?;
        let (docs, next) = (docs.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((_, events)) = docs.get(i) else { break };
                pg_insert(&mut c, events).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The events of `epc` in PostgreSQL: what names it in `epcList` or `childEPCs` (GIN `@>`).
async fn pg_events(c: &tokio_postgres::Client, epc: &str) -> anyhow::Result<Vec<Value>> {
    let rows = c
        .query(
            "SELECT event FROM epcis_events WHERE event @> $1 OR event @> $2 OR event @> $3",
            &[&json!({"epcList": [epc]}), &json!({"childEPCs": [epc]}), &json!({"parentID": epc})],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, Value>(0)).collect())
}

/// A trace the way a JSONB repository answers it: the pack's events, its case from the
/// packing, the case's events in the packing window.
async fn pg_trace(c: &tokio_postgres::Client, epc: &str) -> anyhow::Result<usize> {
    let own = pg_events(c, epc).await?;
    let mut steps = own.len();
    let packed = own.iter().find(|e| e["type"] == "AggregationEvent" && e["action"] == "ADD");
    if let Some(parent) = packed.and_then(|e| e["parentID"].as_str()) {
        let from = packed.and_then(|e| e["eventTime"].as_str()).unwrap_or_default();
        let until = own
            .iter()
            .find(|e| e["type"] == "AggregationEvent" && e["action"] == "DELETE")
            .and_then(|e| e["eventTime"].as_str())
            .unwrap_or("9999");
        let theirs = pg_events(c, parent).await?;
        steps += theirs
            .iter()
            .filter(|e| e["type"] != "AggregationEvent")
            .filter(|e| e["eventTime"].as_str().is_some_and(|t| t > from && t < until))
            .count();
    }
    Ok(steps)
}

pub async fn run(args: SupplyArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let base = args.base.trim_end_matches('/').to_string();
    let parties = parties();
    put(&http, &base, &parties.board.organization()).await?;
    for line in &parties.lines {
        for p in line {
            put(&http, &base, &p.organization()).await?;
            put(&http, &base, &p.licence(&parties.board)).await?;
        }
    }
    let mut report = serde_json::Map::new();
    let measured = args.measured_chains.min(args.chains);
    let docs = Arc::new(generate(&parties, 0..measured));
    let events = measured * CHAIN_EVENTS;
    println!(
        "(a) EPCIS capture: {events} events in {} documents of <= 100, {} clients, each event's schema, CBV \
              vocabularies, Event Hash ID and partner signature checked, one fsynced commit per document",
        docs.len(),
        args.clients
    );
    let (acked, secs) = capture(&http, &base, &docs, args.clients).await?;
    let (acked_rate, rate) = (events as f64 / acked, events as f64 / secs);
    println!("  fhir-ledger, until the last document is acknowledged (recorded, fsynced): {acked:.2} s = {acked_rate:.0} events/s");
    println!("  fhir-ledger, until its last event is searchable (the index folded everything): {secs:.2} s = {rate:.0} events/s");
    report.insert(
        "capture".into(),
        json!({"events": events, "acknowledged_seconds": acked, "acknowledged_events_per_s": acked_rate,
               "searchable_seconds": secs, "searchable_events_per_s": rate, "clients": args.clients}),
    );
    let pg = match &args.postgres {
        Some(conn) => {
            let setup = pg_connect(conn).await?;
            setup
                .batch_execute(
                    "DROP TABLE IF EXISTS epcis_events; CREATE TABLE epcis_events (id bigserial PRIMARY KEY, event jsonb NOT NULL); \
                     CREATE INDEX epcis_events_gin ON epcis_events USING gin (event jsonb_path_ops);",
                )
                .await?;
            let pg_secs = pg_capture(conn, &docs, args.clients).await?;
            let pg_rate = events as f64 / pg_secs;
            println!(
                "  PostgreSQL JSONB + GIN (jsonb_path_ops), synchronous_commit=on, one transaction per document: \
                 {pg_secs:.2} s = {pg_rate:.0} events/s; fhir-ledger/PostgreSQL {:.2}x acknowledged, {:.2}x searchable",
                acked_rate / pg_rate,
                rate / pg_rate
            );
            report.insert(
                "postgres_capture".into(),
                json!({"seconds": pg_secs, "events_per_s": pg_rate, "ratio_acknowledged": acked_rate / pg_rate,
                       "ratio_searchable": rate / pg_rate}),
            );
            Some((conn.clone(), setup))
        }
        None => None,
    };
    drop(docs);
    // The rest of the population, 10,000 chains at a time (not part of the measured rate).
    let load_start = Instant::now();
    let mut from = measured;
    while from < args.chains {
        let to = (from + 10_000).min(args.chains);
        let docs = Arc::new(generate(&parties, from..to));
        capture(&http, &base, &docs, args.clients).await?;
        if let Some((conn, _)) = &pg {
            pg_capture(conn, &docs, args.clients).await?;
        }
        from = to;
        eprintln!("  loaded {} events ({:.0} s)", to * CHAIN_EVENTS, load_start.elapsed().as_secs_f64());
    }
    let stored = args.chains * CHAIN_EVENTS;
    println!(
        "(b) population: {stored} events stored (both stores loaded in {:.0} s)",
        load_start.elapsed().as_secs_f64()
    );
    if let Some((_, setup)) = &pg {
        setup.batch_execute("VACUUM ANALYZE epcis_events").await?;
    }
    if let Some(pid) = args.server_pid {
        let waited = settle(pid).await;
        println!("  the server settled (index folded, compactions done) {waited:.0} s after the load");
        report.insert("settle_seconds".into(), json!(waited));
    }

    // Latency, sequential, one client, at random chains.
    let mut rng = rand::thread_rng();
    let (mut verify_h, mut trace_h, mut pg_verify_h, mut pg_trace_h) = (hist(), hist(), hist(), hist());
    for i in 0..args.samples + 100 {
        let c = rng.gen_range(0..args.chains);
        let url = format!("{base}/$verify-product?gtin={}&serial={c}-1&lot=L{}&expiry=300131", gtin(c), c / 100);
        let t = Instant::now();
        let r = http.get(&url).send().await?;
        let v: Value = r.json().await?;
        let us = t.elapsed().as_micros() as u64;
        if v["data"]["verified"] != true {
            bail!("pack {c}-1 not verified: {v}");
        }
        let url = format!("{base}/$trace?gtin={}&serial={c}-0", gtin(c));
        let t = Instant::now();
        let r = http.get(&url).send().await?;
        let tr: Value = r.json().await?;
        let trace_us = t.elapsed().as_micros() as u64;
        let steps = tr["parameter"].as_array().map_or(0, |p| p.iter().filter(|x| x["name"] == "step").count());
        if steps != CHAIN_EVENTS {
            bail!("the trace of pack {c}-0 has {steps} steps, not {CHAIN_EVENTS}: {tr}");
        }
        if i >= 100 {
            let _ = verify_h.record(us);
            let _ = trace_h.record(trace_us);
        }
        if let Some((_, setup)) = &pg {
            let t = Instant::now();
            let own = pg_events(setup, &pack(c, 1)).await?;
            let pg_us = t.elapsed().as_micros() as u64;
            let t = Instant::now();
            let steps = pg_trace(setup, &pack(c, 0)).await?;
            let pg_trace_us = t.elapsed().as_micros() as u64;
            if own.is_empty() || steps != CHAIN_EVENTS {
                bail!("PostgreSQL trace of pack {c}-0: {steps} steps");
            }
            if i >= 100 {
                let _ = pg_verify_h.record(pg_us);
                let _ = pg_trace_h.record(pg_trace_us);
            }
        }
    }
    println!("(c) with {stored} events stored, {} sequential requests each:", args.samples);
    print_latency("$verify-product (fhir-ledger)", &verify_h);
    print_latency("$trace, 10 steps with proofs (fhir-ledger)", &trace_h);
    report.insert("verify_product".into(), latency_json(&verify_h));
    report.insert("trace".into(), latency_json(&trace_h));
    if pg.is_some() {
        print_latency("a pack's events by GIN @> (PostgreSQL)", &pg_verify_h);
        print_latency("a pack's trace through its case, 2 GIN queries (PostgreSQL)", &pg_trace_h);
        report.insert("postgres_events_of_pack".into(), latency_json(&pg_verify_h));
        report.insert("postgres_trace".into(), latency_json(&pg_trace_h));
    }
    report.insert("stored_events".into(), json!(stored));
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&Value::Object(report))?)?;
    }
    Ok(())
}
