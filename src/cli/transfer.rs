//! `fhir-ledger transfer pull`: the new payer's side of a Da Vinci PDex payer-to-payer
//! transfer, end to end. Authenticates to the old payer as a backend-services client (the
//! `oauth2` crate, client credentials with a `private_key_jwt` assertion), asks
//! `$member-match` with the member's Consent, kicks off a Patient-level export of the matched
//! member (`_since` five years back), downloads it, verifies it against the old payer's node
//! keys (and, given a head seen before, that the ledger only grew since), and only then
//! imports it into this server as one transaction: new ids, references rewritten, and a PDex
//! transmitter Provenance that carries the signed head and each resource's source leaf with
//! its inclusion proof. Any failed check refuses the whole transfer; nothing is half-imported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use oauth2::{AuthType, ClientId, Scope, TokenResponse, TokenUrl};
use serde_json::{json, Value};

use crate::bulk::check;
use crate::config::TrustedPeer;

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// PDex's Provenance agent type of the payer that sent the data.
const PDEX_AGENT_TYPE: &str = "http://hl7.org/fhir/us/davinci-pdex/CodeSystem/ProvenanceAgentType";
/// Extensions on each Provenance target, and on the Provenance.
pub const SOURCE_EXTENSION: &str = "urn:fhir-ledger:transfer:source";
pub const LEAF_EXTENSION: &str = "urn:fhir-ledger:transfer:source-leaf";
pub const HEAD_EXTENSION: &str = "urn:fhir-ledger:transfer:source-head";
/// Five years, the history CMS-0057-F asks payers to exchange.
const FIVE_YEARS_MS: i64 = 5 * 365 * 86_400_000 + 86_400_000;

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
            let verified = verify_dir(&i.dir, &keys, quorum)?;
            let n = import(&http, &i.dir, &verified, &peer, &i.into, i.token.as_deref()).await?;
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

fn peer_keys(peer: &TrustedPeer) -> anyhow::Result<(Vec<ed25519_dalek::VerifyingKey>, usize)> {
    let mut keys = Vec::new();
    for k in &peer.node_keys {
        let bytes: [u8; 32] = hex::decode(k.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .with_context(|| format!("peer {}: node key {k} is not 64 hex digits", peer.name))?;
        keys.push(ed25519_dalek::VerifyingKey::from_bytes(&bytes)?);
    }
    let quorum = peer.quorum.unwrap_or(keys.len() / 2 + 1);
    if quorum == 0 || quorum > keys.len() {
        bail!("peer {}: quorum {quorum} of {} keys", peer.name, keys.len());
    }
    Ok((keys, quorum))
}

/// An access token from the peer: client credentials with a `private_key_jwt` assertion.
async fn peer_token(http: &reqwest::Client, peer: &TrustedPeer) -> anyhow::Result<String> {
    let seed =
        std::fs::read_to_string(&peer.client_key).with_context(|| format!("reading {}", peer.client_key.display()))?;
    let seed: [u8; 32] = hex::decode(seed.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{}: not the hex of a 32-byte ed25519 seed", peer.client_key.display()))?;
    let key = SigningKey::from_bytes(&seed);
    let base = peer.base_url.trim_end_matches('/');
    let token_url = format!("{base}/auth/token");
    let now = crate::auth::now_s();
    let claims = json!({"iss": peer.client_id, "sub": peer.client_id, "aud": token_url, "exp": now + 240,
                        "iat": now, "jti": crate::auth::random_id()});
    let kid = crate::bulk::label::thumbprint(&key.verifying_key());
    let assertion = crate::auth::jose::sign(
        jsonwebtoken::Algorithm::EdDSA,
        &crate::auth::jose::ed25519_signing(&key),
        &kid,
        "JWT",
        &claims,
    );
    let client = oauth2::basic::BasicClient::new(ClientId::new(peer.client_id.clone()))
        .set_auth_type(AuthType::RequestBody)
        .set_token_uri(TokenUrl::new(token_url)?);
    let scope = peer.scope.clone().unwrap_or_else(|| "system/*.rs".into());
    let token = client
        .exchange_client_credentials()
        .add_scopes(scope.split_whitespace().map(|s| Scope::new(s.to_string())))
        .add_extra_param("client_assertion_type", JWT_BEARER)
        .add_extra_param("client_assertion", assertion)
        .request_async(http)
        .await
        .map_err(|e| anyhow::anyhow!("token from {}: {e:?}", peer.name))?;
    Ok(token.access_token().secret().clone())
}

fn peer_named(config: &Path, name: &str) -> anyhow::Result<TrustedPeer> {
    crate::config::trusted_peers(config)?
        .into_iter()
        .find(|p| p.name == name)
        .with_context(|| format!("no [[trusted_peer]] named {name:?} in {}", config.display()))
}

/// The offline check of a downloaded export, as a refusal when anything fails.
fn verify_dir(dir: &Path, keys: &[ed25519_dalek::VerifyingKey], quorum: usize) -> anyhow::Result<check::Verified> {
    let verified = check::check_dir(dir, keys, quorum).map_err(|e| match e {
        check::Failure::Invalid(why) => anyhow::anyhow!("the transfer is refused: {why}"),
        check::Failure::Unchecked(why) => anyhow::anyhow!("the transfer could not be checked: {why}"),
    })?;
    if verified.subsetted {
        bail!("the transfer is refused: the export was reduced by _elements");
    }
    Ok(verified)
}

/// Imports a verified export into `into` as one transaction; returns its entry count.
async fn import(
    http: &reqwest::Client,
    dir: &Path,
    verified: &check::Verified,
    peer: &TrustedPeer,
    into: &str,
    token: Option<&str>,
) -> anyhow::Result<usize> {
    let base = peer.base_url.trim_end_matches('/');
    let bundle = import_bundle(dir, verified, base, &peer.name)?;
    let n = bundle["entry"].as_array().map_or(0, Vec::len);
    let mut req = http
        .post(format!("{}/", into.trim_end_matches('/')))
        .header("content-type", "application/fhir+json")
        .body(bundle.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("the import was refused by {into}: {status}: {}", diagnostics(&body));
    }
    Ok(n)
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
    super::export::download(&status_url, &dir, Some(&token)).await?;

    // Verified before anything is stored.
    let verified = verify_dir(&dir, &keys, quorum)?;
    if let Some(known) = &a.known_head {
        consistent(&http, &base, known, &verified.head, &keys, quorum).await?;
    }
    let n = import(&http, &dir, &verified, peer, &a.into, a.token.as_deref()).await?;
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

/// The export's head must extend a head of the same peer seen before.
async fn consistent(
    http: &reqwest::Client,
    base: &str,
    known: &Path,
    head: &crate::treehead::TreeHead,
    keys: &[ed25519_dalek::VerifyingKey],
    quorum: usize,
) -> anyhow::Result<()> {
    let old = read_json(known)?;
    let parts = old["parameter"].as_array().context("the known head is not a Parameters resource")?;
    let old = crate::treehead::TreeHead::from_parts(parts).map_err(|e| anyhow::anyhow!("the known head: {e}"))?;
    old.check_quorum(keys, quorum).map_err(|e| anyhow::anyhow!("the known head: {e}"))?;
    if old.size > head.size {
        bail!(
            "the transfer is refused: the export's tree head ({}) is older than one seen before ({})",
            head.size,
            old.size
        );
    }
    let url = format!("{base}/ledger/consistency?first={}&second={}", old.size, head.size);
    let proof: Value = http.get(&url).send().await?.json().await.context("the consistency proof is not JSON")?;
    let hashes: Vec<[u8; 32]> = proof["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "consistencyPath")
        .filter_map(|p| p["valueBase64Binary"].as_str())
        .filter_map(|s| crate::codec::unb64(s).ok()?.try_into().ok())
        .collect();
    if !consensus::proof::verify_consistency(old.size, head.size, &old.root, &head.root, &hashes) {
        bail!(
            "the transfer is refused: the export's tree head ({}) is not consistent with the head of size {} seen before",
            head.size,
            old.size
        );
    }
    Ok(())
}

/// The transaction that imports a verified export: each resource POSTed under a fresh
/// `urn:uuid:` (so this server assigns ids and rewrites the references between them),
/// references to what the export does not hold made absolute at the peer, and a PDex
/// transmitter Provenance naming every source version, its leaf and inclusion proof.
pub fn import_bundle(dir: &Path, v: &check::Verified, peer_base: &str, peer_name: &str) -> anyhow::Result<Value> {
    let mut resources: Vec<(Value, u64, String)> = Vec::new();
    for (name, kind, leaves) in &v.files {
        if kind != "output" {
            continue;
        }
        let text = std::fs::read_to_string(dir.join(name))?;
        let proofs = std::fs::read_to_string(dir.join(crate::bulk::render::proofs_name(name)))?;
        for ((line, leaf), proof) in text.lines().zip(leaves).zip(proofs.lines()) {
            let r: Value = serde_json::from_str(line)?;
            // The old payer's disclosure log about the member is its own record, not the
            // member's data: it stays there (and this server would refuse it anyway).
            if r["resourceType"] == "AuditEvent" {
                continue;
            }
            resources.push((r, *leaf, proof.to_string()));
        }
    }
    let mut new_ids: HashMap<String, String> = HashMap::new();
    for (r, _, _) in &resources {
        let key =
            format!("{}/{}", r["resourceType"].as_str().unwrap_or_default(), r["id"].as_str().unwrap_or_default());
        new_ids.insert(key, format!("urn:uuid:{}", uuid::Uuid::new_v4()));
    }
    let mut entries = Vec::new();
    let mut targets = Vec::new();
    for (mut r, leaf, proof) in resources {
        let rtype = r["resourceType"].as_str().unwrap_or_default().to_string();
        let source = format!("{rtype}/{}", r["id"].as_str().unwrap_or_default());
        let full_url = new_ids[&source].clone();
        rewrite(&mut r, &new_ids, peer_base);
        if let Some(obj) = r.as_object_mut() {
            obj.remove("id");
            if let Some(meta) = obj.get_mut("meta").and_then(Value::as_object_mut) {
                meta.remove("versionId");
                meta.remove("lastUpdated");
                if meta.is_empty() {
                    obj.remove("meta");
                }
            }
        }
        let p: Value = serde_json::from_str(&proof)?;
        targets.push(json!({"reference": full_url, "extension": [
            {"url": SOURCE_EXTENSION, "valueUri": format!("{peer_base}/{source}")},
            {"url": LEAF_EXTENSION, "valueString": json!({"leaf": leaf, "leafData": p["leafData"], "path": p["path"]}).to_string()}]}));
        entries.push(json!({"fullUrl": full_url, "resource": r, "request": {"method": "POST", "url": rtype}}));
    }
    let head = head_parameters(&v.head);
    let provenance = json!({
        "resourceType": "Provenance",
        "target": targets,
        "recorded": crate::fhir::instant(crate::fhir::now_ms()),
        "extension": [{"url": HEAD_EXTENSION, "valueString": head.to_string()}],
        "agent": [{
            "type": {"coding": [{"system": PDEX_AGENT_TYPE, "code": "transmitter"}]},
            "who": {"identifier": {"system": "urn:ietf:rfc:3986", "value": peer_base}, "display": peer_name}
        }],
        "entity": [{"role": "source", "what": {"identifier": {"system": "urn:ietf:rfc:3986", "value": peer_base}, "display": format!("{peer_name}'s ledger at tree size {}", v.head.size)}}]
    });
    entries.push(json!({"fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()), "resource": provenance,
                        "request": {"method": "POST", "url": "Provenance"}}));
    Ok(json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}))
}

/// A tree head as `GET /ledger/head` serves it (a Parameters resource).
fn head_parameters(head: &crate::treehead::TreeHead) -> Value {
    let parts: Vec<Value> = head.to_parts().iter().map(crate::fhir::json::Json::to_serde).collect();
    json!({"resourceType": "Parameters", "parameter": parts})
}

/// Points every `reference` at the import's own entries, or absolutely at the peer.
fn rewrite(v: &mut Value, new_ids: &HashMap<String, String>, peer_base: &str) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                if k == "reference" {
                    if let Some(s) = x.as_str() {
                        let local = s.strip_prefix(peer_base).map_or(s, |r| r.trim_start_matches('/'));
                        let relative = !local.contains(':') && !local.starts_with('#') && local.split('/').count() == 2;
                        if let Some(n) = new_ids.get(local) {
                            *x = json!(n);
                        } else if relative {
                            *x = json!(format!("{peer_base}/{local}"));
                        }
                    }
                } else {
                    rewrite(x, new_ids, peer_base);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rewrite(i, new_ids, peer_base)),
        _ => {}
    }
}

/// Checks a transfer Provenance (as imported here) against the peer's node keys: its head
/// is signed by a quorum, and every target's source leaf is in that head.
pub fn verify_provenance(
    provenance: &Value,
    keys: &[ed25519_dalek::VerifyingKey],
    quorum: usize,
) -> Result<usize, String> {
    let head = provenance["extension"]
        .as_array()
        .and_then(|e| e.iter().find(|x| x["url"] == HEAD_EXTENSION))
        .and_then(|x| x["valueString"].as_str())
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .ok_or("the Provenance carries no source head")?;
    let parts = head["parameter"].as_array().ok_or("the source head is not a Parameters resource")?;
    let head = crate::treehead::TreeHead::from_parts(parts)?;
    head.check_quorum(keys, quorum)?;
    let mut n = 0;
    for t in provenance["target"].as_array().into_iter().flatten() {
        let ext = t["extension"].as_array().ok_or("a target has no source")?;
        let leaf: Value = ext
            .iter()
            .find(|x| x["url"] == LEAF_EXTENSION)
            .and_then(|x| x["valueString"].as_str())
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or("a target has no source leaf")?;
        let source =
            ext.iter().find(|x| x["url"] == SOURCE_EXTENSION).and_then(|x| x["valueUri"].as_str()).unwrap_or_default();
        let data = leaf["leafData"].as_str().and_then(|s| crate::codec::unb64(s).ok()).ok_or("bad leafData")?;
        let header = consensus::LeafHeader::decode(&data).ok_or("bad leafData")?;
        if !source.ends_with(&format!("/{}/{}", header.rtype, header.id)) {
            return Err(format!("target {source} names leaf {} of {}/{}", leaf["leaf"], header.rtype, header.id));
        }
        let path: Vec<[u8; 32]> = leaf["path"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str().and_then(|s| crate::codec::unb64(s).ok()?.try_into().ok()))
            .collect();
        let index = leaf["leaf"].as_u64().ok_or("bad leaf")?;
        if !consensus::proof::verify_inclusion(
            index,
            head.size,
            &consensus::merkle::leaf_hash(&data),
            &path,
            &head.root,
        ) {
            return Err(format!("{source}: leaf {index} is not in the source head"));
        }
        n += 1;
    }
    Ok(n)
}
