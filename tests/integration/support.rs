//! Shared helpers: an in-process app over a real ledger in a temp dir, and a real server
//! process on 127.0.0.1 with a port chosen by the OS.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::{test, web, App};
use fhir_ledger::api::{self, AppState};
use fhir_ledger::config::{Config, ServeArgs};
use fhir_ledger::repo::Repo;

pub fn profiles_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fhir-profiles")
}

pub fn config(dir: &Path) -> Config {
    let args = ServeArgs {
        config: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/single.toml")),
        data_dir: Some(dir.to_path_buf()),
        profiles_dir: Some(profiles_dir()),
        max_body_bytes: Some(1024 * 1024),
        auth: Some("off".into()),
        ..Default::default()
    };
    Config::resolve(&args).expect("test config")
}

pub async fn repo(dir: &Path) -> Arc<Repo> {
    fhir_ledger::server::open_repo(&config(dir)).await.expect("open repo")
}

pub async fn app(
    repo: Arc<Repo>,
) -> impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error> {
    app_with_admin(repo, fhir_ledger::api::admin::AdminConfig::default()).await
}

/// [`app`] with an admin API configuration (token, fault injection).
pub async fn app_with_admin(
    repo: Arc<Repo>,
    admin: fhir_ledger::api::admin::AdminConfig,
) -> impl Service<actix_http::Request, Response = ServiceResponse, Error = actix_web::Error> {
    let auth = std::sync::Arc::new(fhir_ledger::auth::Auth::disabled());
    let defs = fhir_ledger::definitions::Definitions::Dir(profiles_dir());
    let caches = fhir_ledger::config::CacheShares::of(64 << 20).index;
    let search = fhir_ledger::server::search_engine(&defs, repo.clone(), caches).expect("search index");
    let state = web::Data::new(AppState {
        repo,
        search,
        max_body_bytes: 1024 * 1024,
        admin,
        auth,
        exports: std::sync::Arc::default(),
        trusted_peers: Vec::new(),
        supply: std::sync::Arc::new(fhir_ledger::supply::capture::Supply::new().expect("EPCIS schema")),
    });
    fhir_ledger::telemetry::prometheus();
    test::init_service(
        App::new()
            .app_data(state)
            .wrap(actix_web::middleware::from_fn(api::monitor::middleware))
            .configure(api::configure),
    )
    .await
}

/// The `fhir-ledger` binary the process tests run: `FHIR_LEDGER_BIN` when set (a binary
/// built elsewhere, e.g. the code before a change, or when several worktrees share one
/// `CARGO_TARGET_DIR` and the uplifted `target/debug/fhir-ledger` may be another worktree's),
/// else this build's.
pub fn binary() -> std::ffi::OsString {
    std::env::var_os("FHIR_LEDGER_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_fhir-ledger").into())
}

/// A `fhir-ledger serve` child process.
pub struct Server {
    pub child: Child,
    pub base: String,
    /// The inter-node address, for a node started with `--raft-listen`.
    pub raft: Option<String>,
}

impl Server {
    pub fn start(data_dir: &Path) -> Server {
        Self::start_with(data_dir, &[])
    }

    /// A server with extra `serve` flags.
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Server {
        Self::launch(data_dir, extra, &[])
    }

    /// A server with extra flags and environment variables; waits until it listens.
    pub fn launch(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn_with(data_dir, "off", extra, env)
    }

    /// [`Server::launch`] with SMART-on-FHIR authorization on (`--auth smart`).
    pub fn launch_auth(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn_with(data_dir, "smart", extra, env)
    }

    fn spawn_with(data_dir: &Path, auth: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let listen = if extra.contains(&"--listen") { &[][..] } else { &["--listen", "127.0.0.1:0"][..] };
        let mut child = Command::new(binary())
            .args(["serve", "--auth", auth])
            .args(listen)
            .args(extra)
            .arg("--data-dir")
            .arg(data_dir)
            // Outside the checkout, with the definitions compiled into the binary: as an
            // installed binary runs.
            .current_dir(std::env::temp_dir())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fhir-ledger");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut raft = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("fhir-ledger: raft listening on ") {
                    raft = Some(addr.to_string());
                } else if let Some(addr) = line.strip_prefix("fhir-ledger: listening on ") {
                    let _ = tx.send((addr.to_string(), raft.clone()));
                } else if std::env::var_os("FHIR_LEDGER_TEST_LOG").is_some() {
                    eprintln!("[server] {line}");
                }
            }
        });
        let (base, raft) = rx.recv_timeout(Duration::from_mins(1)).expect("server did not report its address");
        Server { child, base, raft }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}
