//! The `fhir-ledger-bench` binary: the benchmarks behind `tests/bench/*.sh`. `load`, `cluster`,
//! `snapshot` and `auth` drive running servers over HTTP (and PostgreSQL or etcd beside them); `proofs`
//! builds a synthetic ledger with the `consensus` crate in process. Results: BENCHMARKS.md.

mod auth;
mod cluster;
mod load;
mod proofs;
mod snapshot;
mod supply;

use clap::{Parser, Subcommand};

/// The same allocator as the server, so in-process figures (`proofs`) match what it sees.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fhir-ledger-bench", version, about = "Benchmarks for fhir-ledger")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load-test a running server (and a PostgreSQL baseline).
    Load(load::LoadArgs),
    /// Commit throughput and latency of creates on a cluster, beside an etcd cluster.
    Cluster(cluster::ClusterArgs),
    /// What SMART authorization costs: reads and searches on an auth-off and an auth-on server.
    Auth(auth::AuthArgs),
    /// Time inclusion and consistency proof generation on a synthetic ledger of N leaves.
    Proofs(proofs::ProofsArgs),
    /// Write latency while the nodes build Raft snapshots, against the same writes outside builds.
    Snapshot(snapshot::SnapshotArgs),
    /// EPCIS capture throughput, `$verify-product` and `$trace` latency, beside PostgreSQL JSONB.
    Supply(supply::SupplyArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FHIR_LEDGER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Cmd::Load(args) => rt.block_on(load::run(args)),
        Cmd::Cluster(args) => rt.block_on(cluster::run(args)),
        Cmd::Auth(args) => rt.block_on(auth::run(args)),
        Cmd::Proofs(args) => rt.block_on(proofs::run(args)),
        Cmd::Snapshot(args) => rt.block_on(snapshot::run(args)),
        Cmd::Supply(args) => rt.block_on(supply::run(args)),
    }
}
