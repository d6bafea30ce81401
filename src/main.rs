//! The `fhir-ledger` binary: `serve` (the embedded single node) and `bench`.

use clap::{Parser, Subcommand};

/// JSON trees and ledger batches allocate heavily; mimalloc measured faster than glibc here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fhir-ledger", version, about = "FHIR R4 server over a signed, encrypted, Raft-replicated ledger")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the server (embedded single node by default).
    Serve(fhir_ledger::config::ServeArgs),
    /// Load-test a running server (and a PostgreSQL baseline).
    Bench(fhir_ledger::bench::BenchArgs),
    /// Verify a stopped node's data directory: record digests, Merkle root, batch signatures.
    /// Exit code 0: intact; 1: tampering or corruption found; 2: could not be checked.
    Verify(VerifyArgs),
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// The node's data directory (the one given to `serve`).
    #[arg(long, env = "FHIR_LEDGER_DATA_DIR", default_value = "./data")]
    data_dir: std::path::PathBuf,
}

fn verify(args: &VerifyArgs) -> std::process::ExitCode {
    use std::io::IsTerminal;
    let start = std::time::Instant::now();
    let mut shown = u64::MAX;
    // A progress bar only for people watching; logs and scripts get the summary alone.
    let tty = std::io::stderr().is_terminal();
    let mut progress = |done: u64, total: u64| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if tty && pct != shown {
            shown = pct;
            eprint!("\rverifying leaves: {pct:>3}% ({done}/{total})");
        }
    };
    let report = match consensus::audit::verify_dir(&args.data_dir.join("ledger"), &mut progress) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("\nfhir-ledger verify: cannot check {}: {e}", args.data_dir.display());
            return std::process::ExitCode::from(2);
        }
    };
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    if tty {
        eprintln!();
    }
    for f in &report.findings {
        println!("TAMPERED {}: {}", f.location, f.problem);
    }
    println!(
        "checked {} leaves ({:.1} MB), {} raft log entries, {} batch signatures in {secs:.2} s: {:.0} leaves/s, {:.1} MB/s",
        report.leaves,
        report.bytes as f64 / 1e6,
        report.log_entries,
        report.signatures,
        report.leaves as f64 / secs,
        report.bytes as f64 / 1e6 / secs
    );
    if report.findings.is_empty() {
        println!("ledger intact");
        std::process::ExitCode::SUCCESS
    } else {
        println!("{} problem(s) found", report.findings.len());
        std::process::ExitCode::from(1)
    }
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FHIR_LEDGER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Raft, sled and the proposer run on a multi-threaded runtime; actix-web starts its own
    // per-worker runtimes and talks to them through channels.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command.unwrap_or(Cmd::Serve(Default::default())) {
        Cmd::Serve(args) => {
            let cfg = fhir_ledger::config::Config::resolve(&args)?;
            let repo = rt.block_on(fhir_ledger::server::open_repo(&cfg))?;
            // `rt` stays alive (and its threads keep running Raft) while actix serves.
            actix_web::rt::System::new().block_on(fhir_ledger::server::serve(cfg, repo))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Bench(args) => {
            rt.block_on(fhir_ledger::bench::run(args))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Verify(args) => Ok(verify(&args)),
    }
}
