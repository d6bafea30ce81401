//! `fhir-ledger-bench proofs`: proof generation latency at a given ledger size (the issue's
//! target: p99 < 1 ms at 10^6 leaves), on a synthetic ledger built by the real state machine
//! on real sled. Every generated proof is also verified, so a fast wrong proof cannot pass.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use consensus::proof;
use rand::Rng;

#[derive(clap::Args, Debug)]
pub struct ProofsArgs {
    /// Leaves in the synthetic ledger.
    #[arg(long, default_value_t = 1_000_000)]
    leaves: u64,
    /// Creates per signed batch while building it.
    #[arg(long, default_value_t = 1000)]
    per_entry: u64,
    /// Ciphertext bytes per version.
    #[arg(long, default_value_t = 256)]
    body_bytes: usize,
    /// Proofs of each kind to time.
    #[arg(long, default_value_t = 20_000)]
    samples: usize,
    /// Where to build the ledger (default: a temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn percentiles(name: &str, mut d: Vec<Duration>) {
    d.sort();
    let at = |percent: usize| d[(d.len() * percent / 100).min(d.len() - 1)].as_secs_f64() * 1e3;
    println!(
        "{name}: n={} p50 {:.3} ms, p95 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        d.len(),
        at(50),
        at(95),
        at(99),
        at(100)
    );
}

pub async fn run(args: ProofsArgs) -> anyhow::Result<()> {
    let tmp = ledger_dir(&args)?;
    let start = Instant::now();
    let mut shown = 0;
    let view = consensus::bench::synthetic_ledger(&tmp, args.leaves, args.per_entry, args.body_bytes, &mut |done| {
        if done * 10 / args.leaves.max(1) != shown {
            shown = done * 10 / args.leaves.max(1);
            eprint!("\rbuilding: {done}/{}", args.leaves);
        }
    })
    .await?;
    eprintln!();
    let frontier = view.frontier()?;
    let (size, root) = (frontier.size, frontier.root());
    println!(
        "built a ledger of {size} leaves ({} B bodies) in {:.1} s",
        args.body_bytes,
        start.elapsed().as_secs_f64()
    );
    let mut rng = rand::thread_rng();
    let (mut inclusion, mut consistency) = (Vec::new(), Vec::new());
    for _ in 0..args.samples {
        let leaf = rng.gen_range(0..size);
        let t = Instant::now();
        let path = proof::inclusion_proof(&view, leaf, size);
        let hash = view.leaf_hash(leaf)?;
        inclusion.push(t.elapsed());
        let ok = matches!((path, hash), (Some(p), Some(h)) if proof::verify_inclusion(leaf, size, &h, &p, &root));
        anyhow::ensure!(ok, "inclusion proof of leaf {leaf} does not verify");

        let first = rng.gen_range(1..=size);
        let t = Instant::now();
        let path = proof::consistency_proof(&view, first, size);
        let first_root = proof::root_at(&view, first);
        consistency.push(t.elapsed());
        let ok =
            matches!((path, first_root), (Some(p), Some(r)) if proof::verify_consistency(first, size, &r, &root, &p));
        anyhow::ensure!(ok, "consistency proof {first} -> {size} does not verify");
    }
    percentiles("inclusion proof (audit path + leaf hash)", inclusion);
    percentiles("consistency proof (path + old root)", consistency);
    if args.dir.is_none() {
        std::fs::remove_dir_all(&tmp)?;
    }
    Ok(())
}

fn ledger_dir(args: &ProofsArgs) -> anyhow::Result<PathBuf> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("fhir-ledger-bench-proofs-{}", std::process::id())),
    };
    anyhow::ensure!(!dir.join("db").exists(), "{} already holds a ledger", dir.display());
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
