//! Wiring: keys, ledger, repository and the HTTP server.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::{web, App, HttpServer};

use crate::api::admin::AdminConfig;
use crate::api::{self, AppState};
use crate::config::Config;
use crate::config::IndexCaches;
use crate::definitions::Definitions;
use crate::fhir::profiles::Profiles;
use crate::fhir::searchparams::SearchParams;
use crate::identity::Identity;
use crate::repo::Repo;
use crate::search::Engine;

/// Everything a running node needs, built once.
pub struct Node {
    pub repo: Arc<Repo>,
    /// The search index over `repo`, kept current in the background.
    pub search: Arc<Engine>,
    pub admin: AdminConfig,
    pub auth: Arc<crate::auth::Auth>,
}

/// The embedded single node over `cfg` (in-process tests use it).
pub async fn open_repo(cfg: &Config) -> anyhow::Result<Arc<Repo>> {
    Ok(open_keys_and_repo(cfg, &cfg.listen.to_string(), None).await?.1)
}

/// Makes what this process creates from now on readable by its owner only (files 0600,
/// directories 0700: sled, snapshots, keys) and tightens what `dir` already holds.
fn owner_only(dir: &std::path::Path) -> anyhow::Result<()> {
    use nix::sys::stat::{umask, Mode};
    use std::os::unix::fs::PermissionsExt;
    umask(Mode::from_bits_truncate(0o077));
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
        for e in entries {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(0o600))?;
            }
        }
    }
    Ok(())
}

/// The search index over `repo` (R4 and US Core parameters, the Patient compartment),
/// kept current by a background thread.
pub fn search_engine(defs: &Definitions, repo: Arc<Repo>, caches: IndexCaches) -> anyhow::Result<Arc<Engine>> {
    let profiles = repo.profiles.clone();
    let registry =
        crate::search::params::Registry::load(defs, profiles.resource_types()).map_err(anyhow::Error::msg)?;
    let compartments = crate::search::Compartments::load(defs)
        .map_err(anyhow::Error::msg)?
        .with_references(&registry, profiles.resource_types());
    let search = Engine::new(repo, profiles, registry, compartments, crate::auth::store::INTERNAL_TYPES, caches)
        .map_err(|e| anyhow::anyhow!("search index: {}", e.issues.first().map_or("", |i| i.diagnostics.as_str())))?;
    let search = Arc::new(search);
    let leaves = repo_leaves(&search);
    if search.folded() < leaves {
        eprintln!("fhir-ledger: search index at leaf {} of {leaves}; folding the rest", search.folded());
    }
    crate::search::index::keep_current(&search);
    Ok(search)
}

fn repo_leaves(search: &Engine) -> u64 {
    search.repo().view().leaf_count().unwrap_or(0)
}

/// Opens the node's keys, ledger and repository; `raft` is the bound inter-node listener of a
/// cluster node.
async fn open_keys_and_repo(
    cfg: &Config,
    api_addr: &str,
    raft: Option<TcpListener>,
) -> anyhow::Result<(Identity, Arc<Repo>)> {
    owner_only(&cfg.data_dir)?;
    owner_only(&cfg.secrets_dir)?;
    let id = Identity::load_or_create(&cfg.data_dir, &cfg.secrets_dir)?;
    let profiles = Arc::new(Profiles::load(&cfg.definitions).map_err(anyhow::Error::msg)?);
    let params = Arc::new(SearchParams::load(&cfg.definitions).map_err(anyhow::Error::msg)?);
    let shares = cfg.cache_shares();
    let ledger = consensus::Ledger::open(consensus::Options {
        dir: &cfg.data_dir.join("ledger"),
        node_id: cfg.node_id,
        key: id.signing.clone(),
        api_addr: api_addr.to_string(),
        snapshot_every: cfg.snapshot_every,
        raft_listener: raft,
        state_cache_bytes: shares.state_pages,
        lookup_cache_bytes: shares.lookups,
    })
    .await?;
    let repo = Repo::new(ledger, id.signing.clone(), id.kek, id.index_key, profiles, params, shares.bodies);
    Ok((id, Arc::new(repo)))
}

/// Opens the node: keys, ledger, repository, search index and authorization.
pub async fn open_node(cfg: &Config, api_addr: &str, raft: Option<TcpListener>) -> anyhow::Result<Node> {
    let (id, repo) = open_keys_and_repo(cfg, api_addr, raft).await?;
    let token = cfg.admin_token.clone().unwrap_or_else(|| id.admin_token.clone());
    let admin = AdminConfig::new(&token, cfg.fault_injection, id.secrets_id());
    let kek = id.kek;
    let search = search_engine(&cfg.definitions, repo.clone(), cfg.cache_shares().index)?;
    let auth = if cfg.auth {
        let settings = crate::auth::Settings {
            enabled: true,
            public_url: cfg.public_url.clone().unwrap_or_else(|| format!("http://{api_addr}")),
            consent_default: cfg.consent_default,
            access_ttl_secs: cfg.access_token_ttl,
            external: cfg.external_issuers.clone(),
        };
        crate::auth::Auth::new(settings, &kek, crate::disclosure::Log::start(search.clone()))
    } else {
        crate::auth::Auth::disabled()
    };
    Ok(Node { repo, search, admin, auth: Arc::new(auth) })
}

/// Binds the API (and, for a cluster node, the Raft) listener, opens the node and serves until
/// the process is stopped. Binding first lets port 0 work: the membership records real ports.
pub fn run(cfg: Config, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let api = TcpListener::bind(cfg.listen)?;
    let api_addr = api.local_addr()?;
    let raft = cfg.raft_listen.map(TcpListener::bind).transpose()?;
    if let Some(r) = &raft {
        eprintln!("fhir-ledger: raft listening on {}", r.local_addr()?);
    }
    // `rt` runs Raft, sled and the proposer; actix-web runs its own per-worker runtimes.
    let node = rt.block_on(open_node(&cfg, &api_addr.to_string(), raft))?;
    actix_web::rt::System::new().block_on(serve(cfg, node, api))
}

const AUTH_OFF_WARNING: &str = "fhir-ledger: WARNING: AUTHORIZATION IS OFF (--auth off, local development only): \
     no token is checked, every caller may read, change and erase every patient's data, and nothing is logged";

/// Serves the FHIR API over an opened node.
pub async fn serve(cfg: Config, node: Node, listener: TcpListener) -> anyhow::Result<()> {
    if node.auth.enabled {
        eprintln!("fhir-ledger: SMART authorization on, issuer {}", node.auth.public_url);
    } else {
        eprintln!("{AUTH_OFF_WARNING}");
        // Repeated, so that a node left running like this keeps saying so in its log.
        actix_web::rt::spawn(async {
            loop {
                tokio::time::sleep(std::time::Duration::from_mins(1)).await;
                eprintln!("{AUTH_OFF_WARNING}");
            }
        });
    }
    let state = web::Data::new(AppState {
        repo: node.repo,
        search: node.search,
        max_body_bytes: cfg.max_body_bytes,
        admin: node.admin,
        auth: node.auth,
        exports: Arc::new(crate::bulk::Exports::with_spool(
            &cfg.data_dir.join("export-spool"),
            cfg.export_spool_bytes,
        )?),
        trusted_peers: cfg.trusted_peers.clone(),
        supply: std::sync::Arc::new(crate::supply::capture::Supply::new().map_err(anyhow::Error::msg)?),
    });
    if cfg.metrics {
        crate::telemetry::prometheus();
    }
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .wrap(actix_web::middleware::from_fn(api::monitor::middleware))
            .configure(api::configure)
    })
    .workers(cfg.workers)
    .backlog(2048)
    // Clients pool connections; a short keep-alive races their reuse of an idle socket
    // (the client sends just as the server closes). 75 s is nginx's default.
    .keep_alive(std::time::Duration::from_secs(75))
    .listen(listener)?;
    for addr in server.addrs() {
        eprintln!("fhir-ledger: listening on http://{addr}");
    }
    server.run().await?;
    Ok(())
}
