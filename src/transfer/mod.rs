//! A peer's export brought over and checked before anything is stored: the peer's access
//! token (client credentials with a `private_key_jwt` assertion, through the `oauth2`
//! crate), the download ([`fetch`]), the offline check against the peer's node keys, the
//! consistency of its head with one seen before, and the transaction that imports it with a
//! PDex transmitter Provenance. `fhir-ledger transfer` and `POST /$import` both use it.

pub mod fetch;

use std::collections::HashMap;

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
pub const FIVE_YEARS_MS: i64 = 5 * 365 * 86_400_000 + 86_400_000;

pub fn peer_keys(peer: &TrustedPeer) -> anyhow::Result<(Vec<ed25519_dalek::VerifyingKey>, usize)> {
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
pub async fn peer_token(http: &reqwest::Client, peer: &TrustedPeer) -> anyhow::Result<String> {
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

/// The offline check of a downloaded export, as a refusal when anything fails.
pub fn verify(
    files: &dyn check::Files,
    keys: &[ed25519_dalek::VerifyingKey],
    quorum: usize,
) -> anyhow::Result<check::Verified> {
    let verified = check::check(files, keys, quorum).map_err(|e| match e {
        check::Failure::Invalid(why) => anyhow::anyhow!("the transfer is refused: {why}"),
        check::Failure::Unchecked(why) => anyhow::anyhow!("the transfer could not be checked: {why}"),
    })?;
    if verified.subsetted {
        bail!("the transfer is refused: the export was reduced by _elements");
    }
    Ok(verified)
}

/// The export's head must extend a head of the same peer seen before.
pub async fn consistent(
    http: &reqwest::Client,
    base: &str,
    known: &Value,
    head: &crate::treehead::TreeHead,
    keys: &[ed25519_dalek::VerifyingKey],
    quorum: usize,
) -> anyhow::Result<()> {
    let parts = known["parameter"].as_array().context("the known head is not a Parameters resource")?;
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

fn read(files: &dyn check::Files, name: &str) -> anyhow::Result<Vec<u8>> {
    files.read(name).map_err(|(check::Failure::Invalid(e) | check::Failure::Unchecked(e))| anyhow::anyhow!(e))
}

/// The transaction that imports a verified export, as the text of a Bundle: each resource
/// POSTed under a fresh `urn:uuid:` (so this server assigns ids and rewrites the references
/// between them), references to what the export does not hold made absolute at the peer, and
/// a PDex transmitter Provenance naming every source version, its leaf and inclusion proof.
///
/// Written one resource at a time through the lossless `fhir::json` (decimals stay as sent):
/// the ids come from the proofs' leaf headers first, so no resource is held longer than it
/// takes to rewrite and write it.
pub fn import_bundle(
    dir: &dyn check::Files,
    v: &check::Verified,
    peer_base: &str,
    peer_name: &str,
) -> anyhow::Result<String> {
    use crate::fhir::json::{self, Json};
    let mut files = Vec::new();
    for (name, kind, _) in &v.files {
        if kind == "output" {
            let proofs = read(dir, &crate::bulk::render::proofs_name(name))?;
            files.push((name, String::from_utf8(proofs)?));
        }
    }
    // Every imported resource's new id, from the leaf each proof line names.
    let mut new_ids: HashMap<String, String> = HashMap::new();
    let mut sources = Vec::with_capacity(files.len());
    for (_, proofs) in &files {
        let mut of_file = Vec::new();
        for proof in proofs.lines() {
            let (rtype, id) = proof_source(proof)?;
            // The old payer's disclosure log about the member is its own record, not the
            // member's data: it stays there (and this server would refuse it anyway).
            if rtype != "AuditEvent" {
                new_ids.insert(format!("{rtype}/{id}"), format!("urn:uuid:{}", uuid::Uuid::new_v4()));
            }
            of_file.push((rtype, id));
        }
        sources.push(of_file);
    }
    let mut out = String::from(r#"{"resourceType":"Bundle","type":"transaction","entry":["#);
    let mut targets = Vec::new();
    for ((name, proofs), of_file) in files.iter().zip(&sources) {
        let text = String::from_utf8(read(dir, name)?)?;
        for ((line, proof), (rtype, id)) in text.lines().zip(proofs.lines()).zip(of_file) {
            let Some(full_url) = new_ids.get(&format!("{rtype}/{id}")) else { continue };
            let mut r = json::parse(line.as_bytes(), usize::MAX).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            crate::fhir::refs::for_each_reference_mut(&mut r, &mut |s| rewrite(s, &new_ids, peer_base));
            r.remove("id");
            let meta_left = r.get_mut("meta").map(|meta| {
                meta.remove("versionId");
                meta.remove("lastUpdated");
                meta.as_object().is_some_and(|m| !m.is_empty())
            });
            if meta_left == Some(false) {
                r.remove("meta");
            }
            if !out.ends_with('[') {
                out.push(',');
            }
            out.push_str(r#"{"fullUrl":"#);
            Json::str(full_url.as_str()).write_compact(&mut out);
            out.push_str(r#","resource":"#);
            r.write_compact(&mut out);
            out.push_str(r#","request":{"method":"POST","url":"#);
            Json::str(rtype.as_str()).write_compact(&mut out);
            out.push_str("}}");
            // The proof line as the export served it: leaf, leaf data, salt and path.
            let leaf = proof.to_string();
            targets.push(Json::obj(vec![
                ("reference", Json::str(full_url.as_str())),
                (
                    "extension",
                    Json::Array(vec![
                        Json::obj(vec![
                            ("url", Json::str(SOURCE_EXTENSION)),
                            ("valueUri", Json::str(format!("{peer_base}/{rtype}/{id}"))),
                        ]),
                        Json::obj(vec![("url", Json::str(LEAF_EXTENSION)), ("valueString", Json::str(leaf))]),
                    ]),
                ),
            ]));
        }
    }
    let source = || {
        Json::obj(vec![
            (
                "identifier",
                Json::obj(vec![("system", Json::str("urn:ietf:rfc:3986")), ("value", Json::str(peer_base))]),
            ),
            ("display", Json::str(peer_name)),
        ])
    };
    let mut what = source();
    what.set("display", Json::str(format!("{peer_name}'s ledger at tree size {}", v.head.size)));
    let provenance = Json::obj(vec![
        ("resourceType", Json::str("Provenance")),
        (
            "extension",
            Json::Array(vec![Json::obj(vec![
                ("url", Json::str(HEAD_EXTENSION)),
                ("valueString", Json::str(head_parameters(&v.head).to_string())),
            ])]),
        ),
        ("target", Json::Array(targets)),
        ("recorded", Json::str(crate::fhir::instant(crate::fhir::now_ms()))),
        (
            "agent",
            Json::Array(vec![Json::obj(vec![
                (
                    "type",
                    Json::obj(vec![(
                        "coding",
                        Json::Array(vec![Json::obj(vec![
                            ("system", Json::str(PDEX_AGENT_TYPE)),
                            ("code", Json::str("transmitter")),
                        ])]),
                    )]),
                ),
                ("who", source()),
            ])]),
        ),
        ("entity", Json::Array(vec![Json::obj(vec![("role", Json::str("source")), ("what", what)])])),
    ]);
    if !out.ends_with('[') {
        out.push(',');
    }
    out.push_str(r#"{"fullUrl":"#);
    Json::str(format!("urn:uuid:{}", uuid::Uuid::new_v4())).write_compact(&mut out);
    out.push_str(r#","resource":"#);
    provenance.write_compact(&mut out);
    out.push_str(r#","request":{"method":"POST","url":"Provenance"}}]}"#);
    Ok(out)
}

/// The `Type` and `id` of the leaf a proof line names.
fn proof_source(proof: &str) -> anyhow::Result<(String, String)> {
    #[derive(serde::Deserialize)]
    struct Leaf<'a> {
        #[serde(rename = "leafData", borrow)]
        leaf_data: std::borrow::Cow<'a, str>,
    }
    let p: Leaf<'_> = serde_json::from_str(proof)?;
    let data = crate::codec::unb64(&p.leaf_data).map_err(|_| anyhow::anyhow!("a proof's leafData is not base64"))?;
    let h = consensus::LeafHeader::decode(&data).context("a proof's leafData is not a leaf header")?;
    Ok((h.rtype, h.id))
}

/// A tree head as `GET /ledger/head` serves it (a Parameters resource).
pub fn head_parameters(head: &crate::treehead::TreeHead) -> Value {
    let parts: Vec<Value> = head.to_parts().iter().map(crate::fhir::json::Json::to_serde).collect();
    json!({"resourceType": "Parameters", "parameter": parts})
}

/// Points a `reference` at the import's own entries, or absolutely at the peer.
fn rewrite(s: &mut String, new_ids: &HashMap<String, String>, peer_base: &str) {
    let local = s.strip_prefix(peer_base).map_or(s.as_str(), |r| r.trim_start_matches('/'));
    let relative = !local.contains(':') && !local.starts_with('#') && local.split('/').count() == 2;
    if let Some(n) = new_ids.get(local) {
        *s = n.clone();
    } else if relative {
        *s = format!("{peer_base}/{local}");
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
