//! `fhir-ledger epcis ...`: what a trading partner needs to take part, offline, with the same
//! code the server checks with:
//!
//! - `partner`: an Ed25519 key (created in a 0600 file when absent) and the partner's
//!   `Organization` (GLN, key, thumbprint) to register;
//! - `sign`: an EPCIS document with every event's CBV 2.0 Event Hash ID as its `eventID` and
//!   the partner's signature over it in `epcisHeader` (`fl:eventSignatures`);
//! - `certify`: an issuer's signed certificate of a partner, as a `VerificationResult`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};

use crate::codec::{b64, b64url, unb64url};
use crate::supply::{capture::NAMESPACE, certs, partners, EVENT_JWS_TYPE, GLN_SYSTEM};

#[derive(clap::Args)]
pub struct EpcisArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Print a partner's Organization (creating its key file when absent), to PUT on the server.
    Partner {
        /// The Organization id.
        #[arg(long)]
        id: String,
        /// The partner's GLNs (13 digits), one per location or party.
        #[arg(long, required = true)]
        gln: Vec<String>,
        /// The partner's Ed25519 key file.
        #[arg(long)]
        key: PathBuf,
    },
    /// Set each event's eventID to its CBV 2.0 Event Hash ID and sign it with the partner's key.
    Sign {
        /// The EPCIS 2.0 JSON-LD document.
        document: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
    /// Print a certificate of `target`, signed by the issuer.
    Certify {
        /// The issuer's Organization id.
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        issuer_key: PathBuf,
        /// What is certified, e.g. `Organization/acme`.
        #[arg(long)]
        target: String,
        /// e.g. manufacturing-licence, wholesale-licence, 3pl-licence, dispenser-licence, gmp.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        number: String,
    },
}

fn key_file(path: &Path) -> anyhow::Result<SigningKey> {
    if path.exists() {
        let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
        let seed: [u8; 32] = unb64url(text.trim())
            .map_err(anyhow::Error::msg)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("{}: not a 32-byte Ed25519 seed", path.display()))?;
        return Ok(SigningKey::from_bytes(&seed));
    }
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let mut f = std::fs::OpenOptions::new();
    f.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
    f.open(path)?.write_all(b64url(key.as_bytes()).as_bytes())?;
    Ok(key)
}

fn detached(key: &SigningKey, typ: &str, payload: &[u8]) -> String {
    let kid = crate::jws::thumbprint(&key.verifying_key());
    let header = b64url(json!({"alg": "EdDSA", "kid": kid, "typ": typ}).to_string().as_bytes());
    let input = format!("{header}.{}", b64url(payload));
    format!("{header}..{}", b64url(&key.sign(input.as_bytes()).to_bytes()))
}

/// The document with hashed, signed events.
pub fn sign(mut doc: Value, key: &SigningKey) -> anyhow::Result<Value> {
    let mut ctx: Vec<Value> = match doc.get("@context").cloned() {
        Some(Value::Array(a)) => a,
        Some(c) => vec![c],
        None => vec![json!(crate::epcis::CONTEXT)],
    };
    if !ctx.iter().any(|c| c.get("fl").is_some()) {
        ctx.push(json!({ "fl": NAMESPACE }));
    }
    doc["@context"] = Value::Array(ctx.clone());
    let objects: Vec<&Value> = ctx.iter().filter(|c| c.is_object()).collect();
    let mut sigs = Vec::new();
    let Some(events) = doc.pointer_mut("/epcisBody/eventList").and_then(Value::as_array_mut) else {
        bail!("not an EPCISDocument with epcisBody.eventList");
    };
    for (n, e) in events.iter_mut().enumerate() {
        let id = crate::epcis::hash::event_hash_id(e, &objects).map_err(|err| anyhow::anyhow!("event {n}: {err}"))?;
        sigs.push(json!({"eventID": id, "jws": detached(key, EVENT_JWS_TYPE, id.as_bytes())}));
        e["eventID"] = json!(id);
    }
    if !doc["epcisHeader"].is_object() {
        doc["epcisHeader"] = json!({});
    }
    doc["epcisHeader"]["fl:eventSignatures"] = Value::Array(sigs);
    Ok(doc)
}

pub fn run(args: EpcisArgs) -> anyhow::Result<()> {
    let out = match args.command {
        Command::Partner { id, gln, key } => {
            let k = key_file(&key)?.verifying_key();
            let mut identifier: Vec<Value> = gln.iter().map(|g| json!({"system": GLN_SYSTEM, "value": g})).collect();
            identifier.push(json!({"system": partners::THUMBPRINT_SYSTEM, "value": crate::jws::thumbprint(&k)}));
            json!({"resourceType": "Organization", "id": id, "name": id, "identifier": identifier,
                   "extension": [{"url": partners::PARTNER_KEY, "valueString": b64url(k.as_bytes())}]})
        }
        Command::Sign { document, key } => {
            let text = std::fs::read(&document).with_context(|| document.display().to_string())?;
            sign(serde_json::from_slice(&text)?, &key_file(&key)?)?
        }
        Command::Certify { issuer, issuer_key, target, kind, from, to, number } => {
            let statement = certs::statement(&kind, &target, &from, &to, &number);
            let jws = detached(&key_file(&issuer_key)?, certs::CERT_JWS_TYPE, statement.as_bytes());
            let issuer = format!("Organization/{issuer}");
            json!({"resourceType": "VerificationResult", "target": [{"reference": target}], "status": "validated",
                   "validationProcess": [{"coding": [{"system": certs::KIND_SYSTEM, "code": kind}]}],
                   "extension": [{"url": certs::PERIOD, "valuePeriod": {"start": from, "end": to}}],
                   "validator": [{"organization": {"reference": issuer}, "identityCertificate": number,
                                  "attestationSignature": {"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5"}],
                                                           "when": crate::fhir::instant(crate::fhir::now_ms()), "who": {"reference": issuer},
                                                           "sigFormat": "application/jose", "data": b64(jws.as_bytes())}}]})
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
