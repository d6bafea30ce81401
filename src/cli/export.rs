//! `fhir-ledger export download STATUS_URL DIR`: polls a Bulk export's status URL as the IG's
//! clients do (waiting `Retry-After`, printing `X-Progress`), then saves the manifest as
//! `manifest.json` and every file it links (outputs, deletions, errors, the trust label and
//! the proof files) under the last segment of its URL, streaming each to disk. That directory
//! is what `fhir-ledger verify export` checks.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use futures::StreamExt;
use serde_json::Value;

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Wait for an export to finish and download it into a directory.
    Download {
        /// The export's status URL (the kick-off's `Content-Location`).
        url: String,
        /// Where to save it (created if missing).
        dir: PathBuf,
        /// The access token the export was kicked off with.
        #[arg(long, env = "FHIR_LEDGER_TOKEN")]
        token: Option<String>,
    },
}

pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    match args.command {
        Command::Download { url, dir, token } => download(&url, &dir, token.as_deref()).await.map(|_| ()),
    }
}

fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> reqwest::RequestBuilder {
    let req = http.get(url);
    match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    }
}

/// Files downloaded at once.
const PARALLEL: usize = 4;

/// Streams `url` to the file named by its last segment in `dir`; returns that name.
async fn fetch_to(http: &reqwest::Client, url: &str, dir: &Path, token: Option<&str>) -> anyhow::Result<String> {
    let name = url.rsplit('/').next().unwrap_or_default().to_string();
    let mut r = get(http, url, token).send().await.with_context(|| format!("GET {url}"))?;
    if !r.status().is_success() {
        bail!("GET {url}: {}", r.status());
    }
    let mut out = std::fs::File::create(dir.join(&name))?;
    while let Some(chunk) = r.chunk().await.with_context(|| format!("reading {url}"))? {
        out.write_all(&chunk)?;
    }
    Ok(name)
}

/// Polls `url` until the manifest comes, then downloads everything; returns the manifest.
pub async fn download(url: &str, dir: &Path, token: Option<&str>) -> anyhow::Result<Value> {
    let http = reqwest::Client::builder().timeout(Duration::from_hours(1)).build()?;
    let manifest = loop {
        let r = get(&http, url, token).send().await.with_context(|| format!("GET {url}"))?;
        let status = r.status().as_u16();
        let wait = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(1);
        match status {
            200 => break r.json::<Value>().await.context("the manifest is not JSON")?,
            202 | 429 => {
                if let Some(p) = r.headers().get("x-progress").and_then(|v| v.to_str().ok()) {
                    eprintln!("export: {p}");
                }
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            _ => bail!("GET {url}: {status} {}", r.text().await.unwrap_or_default()),
        }
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(&manifest)?)?;
    let mut urls: Vec<String> = Vec::new();
    for kind in ["output", "deleted", "error"] {
        urls.extend(
            manifest[kind].as_array().into_iter().flatten().filter_map(|i| i["url"].as_str().map(str::to_string)),
        );
    }
    if let Some(trust) = manifest["extension"].as_object().and_then(|e| e.values().find(|v| v.get("url").is_some())) {
        urls.extend(trust["url"].as_str().map(str::to_string));
        urls.extend(
            trust["proofs"].as_array().into_iter().flatten().filter_map(|p| p["url"].as_str().map(str::to_string)),
        );
    }
    for url in &urls {
        let name = url.rsplit('/').next().unwrap_or_default();
        if name.is_empty() || name.starts_with('.') {
            bail!("the manifest links {url}, which has no file name");
        }
    }
    // A few files at a time: the server makes each one on a single core.
    let total = urls.len();
    let mut fetches =
        futures::stream::iter(urls.iter().map(|u| fetch_to(&http, u, dir, token))).buffer_unordered(PARALLEL);
    let mut done = 0;
    while let Some(name) = fetches.next().await {
        done += 1;
        eprintln!("export: {done}/{total} {}", name?);
    }
    Ok(manifest)
}
