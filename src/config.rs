//! Configuration: defaults < TOML file < environment < command line, merged once into a
//! [`Config`] that the rest of the server trusts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::definitions::Definitions;

/// `fhir-ledger serve` flags; each also reads an environment variable.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct ServeArgs {
    /// TOML config file (default: config/single.toml when it exists).
    #[arg(long, env = "FHIR_LEDGER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address of the FHIR API, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long, env = "FHIR_LEDGER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory holding keys, the Raft log and the state machine.
    #[arg(long, env = "FHIR_LEDGER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Read the R4 definitions from this directory (the files of the checkout's
    /// `fhir-profiles/`) instead of the copy compiled into the binary.
    #[arg(long, env = "FHIR_LEDGER_PROFILES_DIR")]
    pub profiles_dir: Option<PathBuf>,
    /// Largest accepted request body in bytes.
    #[arg(long, env = "FHIR_LEDGER_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// This node's Raft id.
    #[arg(long, env = "FHIR_LEDGER_NODE_ID")]
    pub node_id: Option<u64>,
    /// Authorization: `smart` (the default: SMART-on-FHIR tokens and patient consent on every
    /// request) or `off` (local development only: no tokens, no disclosure log).
    #[arg(long, env = "FHIR_LEDGER_AUTH")]
    pub auth: Option<String>,
    /// The FHIR base URL clients use (token issuer and audience); every node of a cluster
    /// needs the same one. Default: http://<listen address>.
    #[arg(long, env = "FHIR_LEDGER_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Where no Consent of the patient speaks: `opt-out` (permit) or `opt-in` (deny).
    #[arg(long, env = "FHIR_LEDGER_CONSENT_DEFAULT")]
    pub consent_default: Option<String>,
    /// Lifetime of access tokens in seconds (default 3600).
    #[arg(long, env = "FHIR_LEDGER_ACCESS_TOKEN_TTL")]
    pub access_token_ttl: Option<i64>,
    /// HTTP worker threads (default: number of cores).
    #[arg(long, env = "FHIR_LEDGER_WORKERS")]
    pub workers: Option<usize>,
    /// Snapshot the state and compact the Raft log every N entries (default: never on a
    /// single node, 100000 in a cluster).
    #[arg(long, env = "FHIR_LEDGER_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,
    /// Memory for caches in MiB: the storage engine's pages, decoded search-index documents
    /// and decrypted bodies share it (default: a thirty-second of RAM, at most 256).
    #[arg(long, env = "FHIR_LEDGER_CACHE_MB")]
    pub cache_mb: Option<u64>,
    /// Disk in MiB for the files of finished Bulk exports, kept (encrypted) for their
    /// downloads; the oldest jobs' files go first when it is full, and are then made again
    /// from the ledger. 0 keeps none (default 4096).
    #[arg(long, env = "FHIR_LEDGER_EXPORT_SPOOL_MB")]
    pub export_spool_mb: Option<u64>,
    /// Inter-node (Raft) listener, e.g. 127.0.0.1:9080. Given: this node is a cluster member
    /// that waits for `fhir-ledger cluster init` or to be added; absent: the embedded single node.
    #[arg(long, env = "FHIR_LEDGER_RAFT_LISTEN")]
    pub raft_listen: Option<SocketAddr>,
    /// Directory with the secrets every node of a cluster shares (kek.key, index.key);
    /// default: the data directory.
    #[arg(long, env = "FHIR_LEDGER_SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// Bearer token of the admin API (default: generated into <data dir>/admin.token).
    #[arg(long, env = "FHIR_LEDGER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Allow `PUT /admin/faults` to cut this node off from peers (partition tests only).
    #[arg(long, env = "FHIR_LEDGER_FAULT_INJECTION")]
    pub fault_injection: bool,
    /// Record no metrics and serve no `/metrics` (to measure what recording them costs).
    #[arg(long, env = "FHIR_LEDGER_NO_METRICS")]
    pub no_metrics: bool,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    /// Other servers whose exports this one imports (`fhir-ledger transfer pull`).
    #[serde(default)]
    trusted_peer: Vec<TrustedPeer>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    profiles_dir: Option<PathBuf>,
    max_body_bytes: Option<usize>,
    node_id: Option<u64>,
    auth: Option<String>,
    public_url: Option<String>,
    consent_default: Option<String>,
    access_token_ttl: Option<i64>,
    #[serde(default)]
    external_issuer: Vec<ExternalIssuer>,
    workers: Option<usize>,
    snapshot_every: Option<u64>,
    cache_mb: Option<u64>,
    export_spool_mb: Option<u64>,
    raft_listen: Option<SocketAddr>,
    secrets_dir: Option<PathBuf>,
    admin_token: Option<String>,
    fault_injection: Option<bool>,
    metrics: Option<bool>,
}

/// Where no Consent of a patient speaks to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentDefault {
    /// Permit (clinicians see a patient's data unless a Consent denies it).
    OptOut,
    /// Deny (only what a Consent permits).
    OptIn,
}

/// An identity provider whose access tokens this server accepts (`[[external_issuer]]`).
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ExternalIssuer {
    pub issuer: String,
    pub jwks_url: String,
    /// Expected `aud` (default: the public URL).
    pub audience: Option<String>,
    #[serde(default = "claim_scope")]
    pub scope_claim: String,
    #[serde(default = "claim_patient")]
    pub patient_claim: String,
    #[serde(default = "claim_fhir_user")]
    pub fhir_user_claim: String,
    #[serde(default = "claim_client")]
    pub client_claim: String,
}

fn claim_scope() -> String {
    "scope".into()
}
fn claim_patient() -> String {
    "patient".into()
}
fn claim_fhir_user() -> String {
    "fhirUser".into()
}
fn claim_client() -> String {
    "client_id".into()
}

#[derive(Debug, Clone)]
pub struct Config {
    /// SMART authorization on (the default) or off (local development).
    pub auth: bool,
    pub public_url: Option<String>,
    pub consent_default: ConsentDefault,
    pub access_token_ttl: i64,
    pub external_issuers: Vec<ExternalIssuer>,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// The R4 definitions: compiled in, or `--profiles-dir`.
    pub definitions: Definitions,
    pub max_body_bytes: usize,
    pub node_id: u64,
    pub workers: usize,
    pub snapshot_every: Option<u64>,
    /// Cache memory in bytes (see [`ServeArgs::cache_mb`]).
    pub cache_bytes: u64,
    /// Disk for spooled export files in bytes (see [`ServeArgs::export_spool_mb`]).
    pub export_spool_bytes: u64,
    pub raft_listen: Option<SocketAddr>,
    pub secrets_dir: PathBuf,
    pub admin_token: Option<String>,
    pub fault_injection: bool,
    /// Whether requests, Raft and caches are recorded for `/metrics` (default on).
    pub metrics: bool,
    /// The servers whose exports `$import` pulls (`[[trusted_peer]]`).
    pub trusted_peers: Vec<TrustedPeer>,
}

pub const DEFAULT_MAX_BODY: usize = 16 * 1024 * 1024;

impl Config {
    pub fn resolve(args: &ServeArgs) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(p) => Some(read_file(p)?),
            None if Path::new("config/single.toml").exists() => Some(read_file(Path::new("config/single.toml"))?),
            None => None,
        }
        .unwrap_or_default();
        let auth = match args.auth.clone().or(file.auth).as_deref().unwrap_or("smart") {
            "smart" | "on" => true,
            "off" => false,
            other => anyhow::bail!("auth = {other:?}: expected \"smart\" (the default) or \"off\""),
        };
        let consent_default =
            match args.consent_default.clone().or(file.consent_default).as_deref().unwrap_or("opt-out") {
                "opt-out" => ConsentDefault::OptOut,
                "opt-in" => ConsentDefault::OptIn,
                other => anyhow::bail!("consent_default = {other:?}: expected \"opt-out\" or \"opt-in\""),
            };
        let access_token_ttl = args.access_token_ttl.or(file.access_token_ttl).unwrap_or(3600);
        if access_token_ttl <= 0 {
            anyhow::bail!("access_token_ttl must be positive");
        }
        let definitions = args.profiles_dir.clone().or(file.profiles_dir).map(Definitions::Dir).unwrap_or_default();
        let data_dir = args.data_dir.clone().or(file.data_dir).unwrap_or_else(|| PathBuf::from("./data"));
        let raft_listen = args.raft_listen.or(file.raft_listen);
        // A cluster needs snapshots: a new or long-gone member catches up from one.
        let snapshot_every =
            args.snapshot_every.or(file.snapshot_every).or(raft_listen.map(|_| 100_000)).filter(|&n| n > 0);
        let cfg = Self {
            auth,
            public_url: args.public_url.clone().or(file.public_url).map(|u| u.trim_end_matches('/').to_string()),
            consent_default,
            access_token_ttl,
            external_issuers: file.external_issuer,
            listen: args.listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            secrets_dir: args.secrets_dir.clone().or(file.secrets_dir).unwrap_or_else(|| data_dir.clone()),
            data_dir,
            definitions,
            max_body_bytes: args.max_body_bytes.or(file.max_body_bytes).unwrap_or(DEFAULT_MAX_BODY),
            node_id: args.node_id.or(file.node_id).unwrap_or(1),
            workers: args
                .workers
                .or(file.workers)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)),
            snapshot_every,
            cache_bytes: args.cache_mb.or(file.cache_mb).unwrap_or_else(default_cache_mb) << 20,
            export_spool_bytes: args.export_spool_mb.or(file.export_spool_mb).unwrap_or(4096) << 20,
            raft_listen,
            admin_token: args.admin_token.clone().or(file.admin_token).filter(|t| !t.is_empty()),
            fault_injection: args.fault_injection || file.fault_injection.unwrap_or(false),
            metrics: !args.no_metrics && file.metrics.unwrap_or(true),
            trusted_peers: file.trusted_peer,
        };
        if cfg.max_body_bytes == 0 || cfg.workers == 0 || cfg.node_id == 0 || cfg.cache_bytes == 0 {
            anyhow::bail!("max_body_bytes, workers, node_id and cache_mb must be positive");
        }
        Ok(cfg)
    }
}

/// `--cache-mb` divided by what scans it (ARCHITECTURE.md, "`--cache-mb` is split by what scans
/// it"): the one place the shares are set; each store is opened with its own byte count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheShares {
    /// sled's pages of the state (half): every read, page, history and export walks them, and
    /// an export scans the state three times.
    pub state_pages: u64,
    /// The state's lookup tables, current records and conditional postings (an eighth).
    pub lookups: u64,
    /// Decrypted bodies (an eighth).
    pub bodies: usize,
    /// The search index's blocks (an eighth) and decoded documents (a sixteenth).
    pub index: IndexCaches,
}

/// The search index's shares of `--cache-mb`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexCaches {
    /// The index store's blocks (the LSM tree's block cache).
    pub blocks: u64,
    /// Decoded documents (`search::index`'s document cache).
    pub documents: usize,
}

impl CacheShares {
    pub fn of(total_bytes: u64) -> Self {
        let eighth = total_bytes / 8;
        let bytes = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Self {
            state_pages: total_bytes / 2,
            lookups: eighth,
            bodies: bytes(eighth),
            index: IndexCaches { blocks: eighth, documents: bytes(total_bytes / 16) },
        }
    }
}

impl Config {
    /// This node's [`CacheShares`].
    pub fn cache_shares(&self) -> CacheShares {
        CacheShares::of(self.cache_bytes)
    }
}

/// A thirty-second of the machine's memory, between 64 and 256 MiB. The operating system's
/// page cache holds the stores' files either way; ours saves decoding them again. At 2.25
/// million resources 256 MiB answered every search class as fast as 512 did, with 300 MB
/// less resident (BENCHMARKS.md, 2026-12-07 evening).
fn default_cache_mb() -> u64 {
    let total_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
    });
    total_kb.map_or(256, |kb| (kb / 1024 / 32).clamp(64, 256))
}

/// A server this one takes transfers from (a payer's old payer): where it is, the node keys
/// whose quorum its exports must carry, and the backend-services client this server is
/// registered as there (`private_key_jwt` with an ed25519 key).
#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct TrustedPeer {
    pub name: String,
    pub base_url: String,
    /// Hex ed25519 public keys of its nodes (`node.pub`).
    pub node_keys: Vec<String>,
    /// How many of them must sign a tree head (default: a majority).
    pub quorum: Option<usize>,
    pub client_id: String,
    /// A file with the hex seed of the client's ed25519 key.
    pub client_key: PathBuf,
    /// The scopes to ask for (default `system/*.rs`).
    pub scope: Option<String>,
}

/// The `[[trusted_peer]]` entries of a config file.
pub fn trusted_peers(path: &Path) -> anyhow::Result<Vec<TrustedPeer>> {
    Ok(read_file(path)?.trusted_peer)
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_shares_stay_within_cache_mb() {
        for mb in [1, 64, 256, 1000] {
            let total = mb << 20;
            let s = CacheShares::of(total);
            let sum = s.state_pages + s.lookups + s.bodies as u64 + s.index.blocks + s.index.documents as u64;
            assert!(sum <= total, "{mb} MiB split into {sum} bytes");
            assert_eq!(s.state_pages, total / 2, "sled's pages keep half: the export scans them");
        }
    }

    #[test]
    fn every_file_in_config_parses() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config"));
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let args = ServeArgs { config: Some(path.clone()), ..Default::default() };
                Config::resolve(&args).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n > 0);
    }

    #[test]
    fn cli_overrides_file() {
        let args = ServeArgs {
            config: Some(PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/config/single.toml"))),
            listen: Some("127.0.0.1:9999".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(Config::resolve(&args).unwrap().listen.port(), 9999);
    }
}
