//! `fhir-ledger transfer pull`: the new payer's side of a Da Vinci PDex payer-to-payer
//! transfer, end to end. Authenticates to the old payer as a backend-services client (the
//! `oauth2` crate, client credentials with a `private_key_jwt` assertion), asks
//! `$member-match` with the member's Consent, kicks off a Patient-level export of the matched
//! member (`_since` five years back), downloads it, verifies it against the old payer's node
//! keys (and, given a head seen before, that the ledger only grew since), and only then
//! imports it into this server as one transaction: new ids, references rewritten, and a PDex
//! transmitter Provenance that carries the signed head and each resource's source leaf with
//! its inclusion proof. Any failed check refuses the whole transfer; nothing is half-imported.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use serde_json::{json, Value};

use crate::bulk::check;
use crate::config::TrustedPeer;
use crate::transfer::{consistent, head_parameters, peer_keys, peer_token, verify, write_import, FIVE_YEARS_MS};

/// `verify_provenance` stays reachable where it was first published.
pub use crate::transfer::verify_provenance;

#[derive(clap::Args)]
pub struct TransferArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Pull one member's records from a trusted peer and import them here.
    Pull(PullArgs),
    /// Verify an export already downloaded from a trusted peer (`export download`) and
    /// import it here as one transaction, as `pull` does after its download.
    Import(ImportArgs),
    /// Make this payer's client key for a peer: writes the hex seed to OUT (mode 0600) and
    /// prints the JWKS to register at the peer (`auth add-client --jwks-file`).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct PullArgs {
    /// The config file with the `[[trusted_peer]]` entries.
    #[arg(long, default_value = "config/single.toml")]
    config: PathBuf,
    /// The peer's name in the config.
    #[arg(long)]
    from: String,
    /// The member as this payer knows them (a Patient resource, JSON).
    #[arg(long)]
    member: PathBuf,
    /// The member's coverage at the old payer (a Coverage resource, JSON).
    #[arg(long)]
    coverage: PathBuf,
    /// The member's HRex Consent naming this payer as recipient (JSON).
    #[arg(long)]
    consent: PathBuf,
    /// This server's base URL, where the transfer is imported.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    into: String,
    /// An access token of this server allowed to create what is imported.
    #[arg(long, env = "FHIR_LEDGER_TOKEN")]
    token: Option<String>,
    /// Where the download is kept (default: a temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// A tree head of the peer seen before (a saved `GET /ledger/head`): the export's head
    /// must be consistent with it. Replaced by the new head after a successful transfer.
    #[arg(long)]
    known_head: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The config file with the `[[trusted_peer]]` entries.
    #[arg(long, default_value = "config/single.toml")]
    config: PathBuf,
    /// The peer's name in the config.
    #[arg(long)]
    from: String,
    /// The downloaded export (manifest.json and every file it links).
    dir: PathBuf,
    /// This server's base URL, where the transfer is imported.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    into: String,
    /// An access token of this server allowed to create what is imported.
    #[arg(long, env = "FHIR_LEDGER_TOKEN")]
    token: Option<String>,
}

pub async fn run(args: TransferArgs) -> anyhow::Result<()> {
    match args.command {
        Command::Pull(p) => {
            let summary = pull(&p).await?;
            println!("{summary}");
            Ok(())
        }
        Command::Import(i) => {
            let peer = peer_named(&i.config, &i.from)?;
            let (keys, quorum) = peer_keys(&peer)?;
            let http = reqwest::Client::builder().timeout(Duration::from_hours(1)).build()?;
            let verified = Arc::new(verify(&check::Dir(&i.dir), &keys, quorum)?);
            let n = import(&http, Arc::clone(&verified), &peer, &i.into, i.token.as_deref()).await?;
            println!(
                "import from {}: {} resources verified against tree head {}; {} imported with a transmitter Provenance",
                peer.name,
                verified.lines,
                verified.head.size,
                n.saturating_sub(1)
            );
            Ok(())
        }
        Command::Keygen { out } => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&out)
                .with_context(|| format!("creating {}", out.display()))?;
            f.write_all(hex::encode(key.to_bytes()).as_bytes())?;
            let vk = key.verifying_key();
            let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": crate::codec::b64url(vk.as_bytes()),
                             "kid": crate::bulk::label::thumbprint(&vk), "alg": "EdDSA", "use": "sig"});
            println!("{}", json!({"keys": [jwk]}));
            Ok(())
        }
    }
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))
}

fn peer_named(config: &Path, name: &str) -> anyhow::Result<TrustedPeer> {
    crate::config::trusted_peers(config)?
        .into_iter()
        .find(|p| p.name == name)
        .with_context(|| format!("no [[trusted_peer]] named {name:?} in {}", config.display()))
}

/// A transaction's answer, of which only the entries are counted (a location per entry,
/// not built as a tree).
#[derive(serde::Deserialize)]
struct Answer {
    #[serde(default)]
    entry: Vec<serde::de::IgnoredAny>,
}

/// Imports a verified export into `into` as one transaction; returns its entry count. The
/// transaction is written on every core while its first parts are already uploading; a
/// failure while writing ends the upload in an error, so the server reads no whole Bundle
/// and stores nothing.
async fn import(
    http: &reqwest::Client,
    verified: Arc<check::Verified>,
    peer: &TrustedPeer,
    into: &str,
    token: Option<&str>,
) -> anyhow::Result<usize> {
    let (base, name) = (peer.base_url.trim_end_matches('/').to_string(), peer.name.clone());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let writer = tokio::task::spawn_blocking(move || {
        let written = write_import(&verified, &base, &name, |part| {
            tx.blocking_send(Ok(part.into())).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe).into())
        });
        if let Err(e) = &written {
            let _ = tx.blocking_send(Err(std::io::Error::other(format!("{e:#}"))));
        }
        written
    });
    let parts = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|part| (part, rx)) });
    let mut req = http
        .post(format!("{}/", into.trim_end_matches('/')))
        .header("content-type", "application/fhir+json")
        .body(reqwest::Body::wrap_stream(parts));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let sent = req.send().await;
    let written = writer.await.map_err(|e| anyhow::anyhow!("writing the transaction: {e}"))?;
    // What the server answered, or why the upload stopped, says more than the writing it cut short.
    let cut_short = |e: &anyhow::Error| {
        e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    };
    let r = match (sent, written) {
        (Ok(r), _) if !r.status().is_success() => r,
        (Err(e), Err(w)) if cut_short(&w) => return Err(e.into()),
        (_, Err(e)) => return Err(e),
        (Err(e), Ok(())) => return Err(e.into()),
        (Ok(r), Ok(())) => r,
    };
    let status = r.status();
    let bytes = r.bytes().await?;
    if !status.is_success() {
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        bail!("the import was refused by {into}: {status}: {}", diagnostics(&body));
    }
    Ok(serde_json::from_slice::<Answer>(&bytes).map_or(0, |a| a.entry.len()))
}

async fn pull(a: &PullArgs) -> anyhow::Result<String> {
    let peer = &peer_named(&a.config, &a.from)?;
    let (keys, quorum) = peer_keys(peer)?;
    let base = peer.base_url.trim_end_matches('/').to_string();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_mins(10))
        .build()?;
    let token = peer_token(&http, peer).await?;

    // $member-match with the member's Consent.
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "MemberPatient", "resource": read_json(&a.member)?},
        {"name": "CoverageToMatch", "resource": read_json(&a.coverage)?},
        {"name": "Consent", "resource": read_json(&a.consent)?}]});
    let r = http
        .post(format!("{base}/Patient/$member-match"))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .body(params.to_string())
        .send()
        .await?;
    let status = r.status();
    let matched: Value = r.json().await.context("$member-match answered no JSON")?;
    if !status.is_success() {
        bail!("$member-match at {}: {status}: {}", peer.name, diagnostics(&matched));
    }
    let member = matched["parameter"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "MemberId"))
        .and_then(|p| p["valueReference"]["reference"].as_str())
        .context("$member-match returned no MemberId")?
        .to_string();
    eprintln!("transfer: {} matched the member as {member}", peer.name);

    // The member's last five years, as a Bulk export pinned to a signed head.
    let since = crate::fhir::instant(crate::fhir::now_ms() - FIVE_YEARS_MS);
    let kick = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueReference": {"reference": member}},
        {"name": "_since", "valueInstant": since}]});
    let r = http
        .post(format!("{base}/Patient/$export"))
        .bearer_auth(&token)
        .header("content-type", "application/fhir+json")
        .header("prefer", "respond-async")
        .body(kick.to_string())
        .send()
        .await?;
    if r.status().as_u16() != 202 {
        let status = r.status();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        bail!("export kick-off at {}: {status}: {}", peer.name, diagnostics(&body));
    }
    let status_url = r
        .headers()
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .context("the export kick-off gave no Content-Location")?
        .to_string();
    let temp = tempfile_dir()?;
    let dir = a.dir.clone().unwrap_or_else(|| temp.clone());
    crate::transfer::fetch::download(&status_url, &dir, Some(&token)).await?;

    // Verified before anything is stored.
    let verified = Arc::new(verify(&check::Dir(&dir), &keys, quorum)?);
    if let Some(known) = a.known_head.as_deref().filter(|k| k.exists()) {
        consistent(&http, &base, &read_json(known)?, &verified.head, &keys, quorum).await?;
    }
    let n = import(&http, Arc::clone(&verified), peer, &a.into, a.token.as_deref()).await?;
    if let Some(known) = &a.known_head {
        let head = head_parameters(&verified.head);
        std::fs::write(known, head.to_string())?;
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    Ok(format!(
        "transfer from {}: {} resources of {member} verified against tree head {}; {} imported with a transmitter Provenance \
         (the old payer's AuditEvents of the member stay there)",
        peer.name,
        verified.lines,
        verified.head.size,
        n.saturating_sub(1)
    ))
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("fhir-ledger-transfer-{}", crate::auth::random_id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn diagnostics(v: &Value) -> String {
    v["issue"]
        .as_array()
        .map(|is| is.iter().filter_map(|i| i["diagnostics"].as_str()).collect::<Vec<_>>().join("; "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| v.to_string())
}
