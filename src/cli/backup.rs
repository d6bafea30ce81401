//! `fhir-ledger backup --node URL --to DIR` and `fhir-ledger restore --from DIR --data-dir D`.
//!
//! A backup directory holds three files: `ledger.snapshot` (the node's state at one applied
//! entry, bodies inline and encrypted, with a SHA-256 trailer), `head.json` (the tree head
//! signed, in a cluster cosigned, at exactly the snapshot's tree size) and `backup.json` (what
//! was taken, from where, when). No key is in it: the bodies stay sealed under the compartment
//! keys, which the KEK wraps, and the KEK never leaves the nodes' secrets directories.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ed25519_dalek::VerifyingKey;
use serde_json::{json, Value};

use crate::treehead::TreeHead;

pub const SNAPSHOT: &str = "ledger.snapshot";
pub const HEAD: &str = "head.json";
pub const MANIFEST: &str = "backup.json";

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// The node to back up (its API URL, e.g. http://127.0.0.1:8080).
    #[arg(long)]
    node: String,
    /// The directory to write the backup into (created; must not hold one already).
    #[arg(long)]
    to: PathBuf,
    /// The node's admin token (its <data dir>/admin.token).
    #[arg(long, env = "FHIR_LEDGER_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// A directory `fhir-ledger backup` wrote.
    #[arg(long)]
    from: PathBuf,
    /// The data directory of the node to rebuild (must hold no ledger).
    #[arg(long)]
    data_dir: PathBuf,
    /// A directory with the node's secrets to copy in: `kek.key` and `index.key` (which every
    /// node of the cluster shares) and, to restore a node as the member it was, its `node.key`.
    /// Without it, start the node with `--secrets-dir` pointing at them.
    #[arg(long)]
    keys_from: Option<PathBuf>,
    /// A node key to trust beyond the backup's own membership when checking its tree head
    /// (hex, or a `node.pub` file). When given, only these keys are trusted.
    #[arg(long = "trusted-key")]
    trusted: Vec<String>,
}

fn http(token: &str) -> anyhow::Result<(reqwest::Client, String)> {
    // A large state takes a while to stream; the download itself has no deadline.
    let client = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?;
    Ok((client, format!("Bearer {token}")))
}

pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if args.to.join(SNAPSHOT).exists() {
        bail!("{} already holds a backup", args.to.display());
    }
    std::fs::create_dir_all(&args.to).with_context(|| args.to.display().to_string())?;
    let base = super::cluster::url(&args.node);
    let (client, auth) = http(&args.token)?;
    let resp = client.post(format!("{base}/admin/backups")).header("Authorization", &auth).send().await?;
    let status = resp.status();
    if !status.is_success() {
        let record: Value = resp.json().await.unwrap_or(Value::Null);
        let why = record.pointer("/issue/0/diagnostics").and_then(Value::as_str).unwrap_or("");
        bail!("{base}: the node refused the backup: {status}: {why}");
    }
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let id = header(crate::api::admin::backup::ID_HEADER).context("the node's answer names no backup")?;
    let head_json: Value = header(crate::api::admin::backup::HEAD_HEADER)
        .and_then(|h| crate::codec::unb64url(&h).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .context("the node's answer carries no tree head")?;
    let part = args.to.join(format!("{SNAPSHOT}.part"));
    let (summary, bytes) = save(resp, &part).await.with_context(|| format!("{base}: backup {id}"))?;
    // The stream ended: the node's record says whether it sent all of it.
    let record = loop {
        let r: Value = client
            .get(format!("{base}/admin/backups/{id}"))
            .header("Authorization", &auth)
            .send()
            .await?
            .json()
            .await?;
        if r["status"] != "running" {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if record["status"] != "complete" || record["bytes"].as_u64() != Some(bytes) {
        bail!("{base}: backup {id} is {} after {} bytes; {bytes} were received", record["status"], record["bytes"]);
    }
    let checked = check(summary, &head_json, &[])?;
    let manifest = json!({
        "format": 1,
        "node": base,
        "backup": id,
        "started": crate::fhir::instant(record["started_ms"].as_i64().unwrap_or_default()),
        "snapshot": { "file": SNAPSHOT, "bytes": bytes, "lastLogIndex": record["last_log_index"] },
        "treeSize": checked.size,
        "root": hex::encode(checked.root),
    });
    write_json(&args.to.join(HEAD), &head_json)?;
    write_json(&args.to.join(MANIFEST), &manifest)?;
    // Last, and durable: a directory with `ledger.snapshot` holds a whole backup.
    std::fs::rename(&part, args.to.join(SNAPSHOT))?;
    std::fs::File::open(&args.to)?.sync_all()?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "backup {id}: {} leaves, {:.1} MB in {secs:.2} s ({:.0} MB/s), head signed by {} of {} voters",
        checked.size,
        mb(bytes),
        mb(bytes) / secs.max(1e-9),
        checked.signers,
        checked.voters,
    );
    println!("saved in {}: {SNAPSHOT}, {HEAD}, {MANIFEST}", args.to.display());
    Ok(())
}

#[allow(clippy::cast_precision_loss)] // sizes for display
fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Saves the streamed backup into `to` and checks it as it arrives (a thread reads the same
/// bytes through the snapshot reader), so the check costs no second pass over the disk.
/// Returns what the file holds and its length.
async fn save(mut resp: reqwest::Response, to: &Path) -> anyhow::Result<(consensus::backup::Summary, u64)> {
    let bar = crate::telemetry::progress_bytes(None);
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(64);
    let checker = std::thread::spawn(move || {
        consensus::backup::inspect_from(Chunks { rx, current: bytes::Bytes::new() }, &mut |_| {})
    });
    let mut out = std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(to)?);
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        out.write_all(&chunk)?;
        got += chunk.len() as u64;
        bar.set_position(got);
        // A checker that stopped early found the damage; its error says what.
        let _ = tx.send(chunk);
    }
    drop(tx);
    bar.finish_and_clear();
    out.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()?;
    let summary = checker.join().map_err(|_| anyhow::anyhow!("the snapshot check panicked"))?;
    Ok((summary.context("not an intact snapshot")?, got))
}

/// The downloaded chunks as one stream of bytes.
struct Chunks {
    rx: std::sync::mpsc::Receiver<bytes::Bytes>,
    current: bytes::Bytes,
}

impl std::io::Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.recv() {
                Ok(chunk) => self.current = chunk,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    let mut f = std::fs::File::create(path).with_context(|| path.display().to_string())?;
    f.write_all(&serde_json::to_vec_pretty(value)?)?;
    f.sync_all().with_context(|| path.display().to_string())
}

/// What checking a backup file against its head found.
struct Checked {
    size: u64,
    root: consensus::merkle::Hash,
    signers: usize,
    voters: usize,
    summary: consensus::backup::Summary,
}

/// Reads the snapshot file through (its trailer), on a progress bar.
fn inspect(file: &Path) -> anyhow::Result<consensus::backup::Summary> {
    let total = std::fs::metadata(file).with_context(|| file.display().to_string())?.len();
    let bar = crate::telemetry::progress_bytes(Some(total));
    let summary = consensus::backup::inspect(file, &mut |done| bar.set_position(done))
        .with_context(|| format!("{}: not an intact snapshot", file.display()))?;
    bar.finish_and_clear();
    Ok(summary)
}

/// Checks that the head names the snapshot's tree and is signed by a majority of the voters
/// its membership lists (or of `trusted`, when given).
fn check(summary: consensus::backup::Summary, head_json: &Value, trusted: &[VerifyingKey]) -> anyhow::Result<Checked> {
    let parts = head_json["parameter"].as_array().context("head.json is not a tree head (Parameters)")?;
    let head = TreeHead::from_parts(parts).map_err(anyhow::Error::msg).context("head.json")?;
    if head.size != summary.size || head.root != summary.root {
        bail!(
            "the snapshot holds a tree of {} leaves with root {}, its head names {} leaves with root {}",
            summary.size,
            hex::encode(summary.root),
            head.size,
            hex::encode(head.root)
        );
    }
    let members = consensus::backup::members(&summary.meta);
    let voter_keys: Vec<VerifyingKey> =
        members.iter().filter(|m| m.voter).filter_map(|m| crate::treehead::parse_key(&m.node.public_key)).collect();
    let (keys, voters) = if trusted.is_empty() {
        (voter_keys, members.iter().filter(|m| m.voter).count())
    } else {
        (trusted.to_vec(), trusted.len())
    };
    let signers =
        head.check_quorum(&keys, voters / 2 + 1).map_err(anyhow::Error::msg).context("the backup's tree head")?;
    Ok(Checked { size: summary.size, root: summary.root, signers, voters, summary })
}

pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let file = args.from.join(SNAPSHOT);
    let head_json: Value =
        serde_json::from_slice(&std::fs::read(args.from.join(HEAD)).context("the backup's head.json")?)
            .context("head.json")?;
    let trusted = args
        .trusted
        .iter()
        .map(|k| crate::treehead::read_key(k))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let checked = check(inspect(&file)?, &head_json, &trusted)?;
    let ledger = args.data_dir.join("ledger");
    if ledger.exists() && std::fs::read_dir(&ledger)?.next().is_some() {
        bail!("{} already holds a ledger; restore into an empty data directory", ledger.display());
    }
    let (last, members) =
        (consensus::backup::last_entry(&checked.summary.meta), consensus::backup::members(&checked.summary.meta));
    let member = copy_keys(args, &members)?;
    let total = std::fs::metadata(&file)?.len();
    let bar = crate::telemetry::progress_bytes(Some(total));
    consensus::backup::restore(&file, &ledger, &mut |done| bar.set_position(done))
        .with_context(|| format!("restoring into {}", ledger.display()))?;
    bar.finish_and_clear();
    // Kept beside the ledger: the head later consistency proofs start from.
    write_json(&args.data_dir.join("restored-head.json"), &head_json)?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "restored {} leaves (root {}, raft entry {}) into {} in {secs:.2} s ({:.0} MB/s); the head was signed by {} of {} voters",
        checked.size,
        hex::encode(checked.root),
        last.map_or(0, |(_, i)| i),
        args.data_dir.display(),
        mb(total) / secs.max(1e-9),
        checked.signers,
        checked.voters,
    );
    match member {
        Some(id) => println!("start it as node {id}: fhir-ledger serve --data-dir {} --node-id {id}", args.data_dir.display()),
        None => println!(
            "it has no member's node.key: start it with --raft-listen and add it to the cluster (fhir-ledger cluster join), \
             which catches it up from the backup's entry on"
        ),
    }
    println!(
        "check it: fhir-ledger verify --data-dir {0}; fhir-ledger verify consistency --old {0}/restored-head.json --data-dir {0} --trusted-key …",
        args.data_dir.display()
    );
    Ok(())
}

/// Copies the secrets from `--keys-from` and tells which member the node key is (None: none
/// given). Everything is checked before anything is written.
fn copy_keys(args: &RestoreArgs, members: &[consensus::backup::Member]) -> anyhow::Result<Option<consensus::NodeId>> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let single = "the backup is of a single node: --keys-from must hold its node.key, kek.key and index.key \
                  (it can only go on as that node)";
    let Some(from) = &args.keys_from else {
        if members.len() == 1 {
            bail!(single);
        }
        return Ok(None);
    };
    let mut files = Vec::new();
    let mut member = None;
    for name in ["kek.key", "index.key", "node.key"] {
        let src = from.join(name);
        if !src.exists() && name == "node.key" {
            continue;
        }
        let text = std::fs::read_to_string(&src)
            .with_context(|| format!("{} (without it the restored node cannot decrypt the bodies)", src.display()))?;
        let bytes: [u8; 32] = hex::decode(text.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("{}: not 32 bytes of hex", src.display()))?;
        if name == "node.key" {
            let public = hex::encode(ed25519_dalek::SigningKey::from_bytes(&bytes).verifying_key().as_bytes());
            let found = members.iter().find(|m| m.node.public_key == public);
            member = Some(
                found
                    .map(|m| m.id)
                    .with_context(|| format!("{}: no member of the backup's cluster has this key", src.display()))?,
            );
        }
        files.push((name, text));
    }
    if member.is_none() && members.len() == 1 {
        bail!(single);
    }
    std::fs::create_dir_all(&args.data_dir)?;
    std::fs::set_permissions(&args.data_dir, std::fs::Permissions::from_mode(0o700))?;
    for (name, text) in files {
        let dst = args.data_dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&dst)
            .with_context(|| format!("{} (restore into an empty data directory)", dst.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    Ok(member)
}
