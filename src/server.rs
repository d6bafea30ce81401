//! Wiring: keys, ledger, repository and the HTTP server.

use std::sync::Arc;

use actix_web::{web, App, HttpServer};

use crate::api::{self, AppState};
use crate::config::Config;
use crate::fhir::profiles::Profiles;
use crate::fhir::searchparams::SearchParams;
use crate::identity::Identity;
use crate::repo::Repo;

/// Everything a running node needs, built once.
pub async fn open_repo(cfg: &Config) -> anyhow::Result<Arc<Repo>> {
    let id = Identity::load_or_create(&cfg.data_dir)?;
    let profiles = Arc::new(Profiles::load(&cfg.profiles_dir).map_err(anyhow::Error::msg)?);
    let params = Arc::new(SearchParams::load(&cfg.profiles_dir).map_err(anyhow::Error::msg)?);
    let ledger = consensus::Ledger::open_single(
        &cfg.data_dir.join("ledger"),
        cfg.node_id,
        id.signing.clone(),
        &cfg.listen.to_string(),
        cfg.snapshot_every,
    )
    .await?;
    Ok(Arc::new(Repo::new(ledger, id.signing, id.kek, id.index_key, profiles, params)))
}

/// Opens the node and serves until the process is stopped.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let repo = open_repo(&cfg).await?;
    serve(cfg, repo).await
}

/// Serves the FHIR API over an opened repository.
pub async fn serve(cfg: Config, repo: Arc<Repo>) -> anyhow::Result<()> {
    let state = web::Data::new(AppState { repo, max_body_bytes: cfg.max_body_bytes });
    let server = HttpServer::new(move || App::new().app_data(state.clone()).configure(api::configure))
        .workers(cfg.workers)
        .backlog(2048)
        // Clients pool connections; a short keep-alive races their reuse of an idle socket
        // (the client sends just as the server closes). 75 s is nginx's default.
        .keep_alive(std::time::Duration::from_secs(75))
        .bind(cfg.listen)?;
    for addr in server.addrs() {
        eprintln!("fhir-ledger: listening on http://{addr}");
    }
    server.run().await?;
    Ok(())
}
