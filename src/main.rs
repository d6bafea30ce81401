//! The `fhir-ledger` binary: `serve`, `cluster` (admin), `auth` (admin), `verify`. The
//! benchmarks are the `fhir-ledger-bench` binary of the `bench/` crate.

use clap::{Parser, Subcommand};

/// JSON trees and ledger batches allocate heavily; mimalloc measured faster than glibc here.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fhir-ledger", version, about = "FHIR R4 server over a signed, encrypted, Raft-replicated ledger")]
struct Cli {
    /// Log lines as text or as JSON objects (with the request id of each request's lines).
    #[arg(long, global = true, value_enum, env = "FHIR_LEDGER_LOG_FORMAT", default_value = "text")]
    log_format: fhir_ledger::telemetry::LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the server (embedded single node by default).
    Serve(fhir_ledger::config::ServeArgs),
    /// Verify a stopped node's data directory, an inclusion proof, or a saved tree head's
    /// consistency, trusting only the node keys given.
    /// Exit code 0: verified; 1: tampering or inconsistency found; 2: could not be checked.
    Verify(fhir_ledger::verify::VerifyArgs),
    /// Administer a cluster through its nodes' admin API: init, join, promote, remove, status.
    Cluster(fhir_ledger::cli::cluster::ClusterArgs),
    /// SMART authorization admin: register apps and user accounts, mint EHR launch contexts.
    Auth(fhir_ledger::cli::auth::AuthArgs),
    /// Bulk Data exports: download one (manifest, files, trust label, proofs) into a directory.
    Export(fhir_ledger::cli::export::ExportArgs),
    /// Payer-to-payer transfers: pull a member's records from a trusted peer, verify, import.
    Transfer(fhir_ledger::cli::transfer::TransferArgs),
    /// Supply-chain partners, offline: a key and Organization, signed EPCIS documents, certificates.
    Epcis(fhir_ledger::cli::epcis::EpcisArgs),
    /// Load transaction bundles and NDJSON files into a running node, with progress.
    Load(fhir_ledger::cli::load::LoadArgs),
    /// Take an online backup of a running node, pinned to a signed tree head.
    Backup(fhir_ledger::cli::backup::BackupArgs),
    /// Rebuild a node's data directory from a backup (offline; checks it against its head).
    Restore(fhir_ledger::cli::backup::RestoreArgs),
}

fn main() -> anyhow::Result<std::process::ExitCode> {
    // No transparent huge pages: mimalloc asks for them, and each first touch of a fresh
    // 2 MiB page zeroes all of it. A large transaction or import then spent a third of its
    // time in the kernel clearing pages (ARCHITECTURE.md, "No transparent huge pages").
    // Best effort; FHIR_LEDGER_THP=1 keeps them (for comparisons).
    if std::env::var_os("FHIR_LEDGER_THP").is_none_or(|v| v != "1") {
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
    let cli = Cli::parse();
    fhir_ledger::telemetry::init_logs(cli.log_format);
    // Raft, sled and the proposer run on a multi-threaded runtime; actix-web starts its own
    // per-worker runtimes and talks to them through channels.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command.unwrap_or(Cmd::Serve(fhir_ledger::config::ServeArgs::default())) {
        Cmd::Serve(args) => {
            let cfg = fhir_ledger::config::Config::resolve(&args)?;
            fhir_ledger::server::run(cfg, &rt)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Verify(args) => Ok(fhir_ledger::verify::run(&args)),
        Cmd::Cluster(args) => {
            rt.block_on(fhir_ledger::cli::cluster::run(args))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Auth(args) => {
            rt.block_on(fhir_ledger::cli::auth::run(args))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Export(args) => {
            rt.block_on(fhir_ledger::cli::export::run(args))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Transfer(args) => {
            rt.block_on(fhir_ledger::cli::transfer::run(args))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Epcis(args) => {
            fhir_ledger::cli::epcis::run(args)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Load(args) => rt.block_on(fhir_ledger::cli::load::run(args)),
        Cmd::Backup(args) => {
            rt.block_on(fhir_ledger::cli::backup::backup(args))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Cmd::Restore(args) => {
            fhir_ledger::cli::backup::restore(&args)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}
