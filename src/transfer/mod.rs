//! A peer's export brought over and checked before anything is stored: the peer's access
//! token (client credentials with a `private_key_jwt` assertion, through the `oauth2`
//! crate), the download ([`fetch`]), the offline check against the peer's node keys, the
//! consistency of its head with one seen before, and the transaction that imports it with a
//! PDex transmitter Provenance. `fhir-ledger transfer` and `POST /$import` both use it.

mod bundle;
pub mod fetch;

pub use bundle::{import_bundle, write_import};

use anyhow::{bail, Context};
use ed25519_dalek::SigningKey;
use oauth2::{AuthType, ClientId, Scope, TokenResponse, TokenUrl};
use serde_json::{json, Value};

use crate::bulk::check;
use crate::config::TrustedPeer;

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// PDex's Provenance agent type of the payer that sent the data.
const PDEX_AGENT_TYPE: &str = "http://hl7.org/fhir/us/davinci-pdex/CodeSystem/ProvenanceAgentType";
/// Extensions on the transfer Provenance: the signed head its targets' sources are in, and
/// the targets' source leaves (see [`push_source_leaf`]).
pub const HEAD_EXTENSION: &str = "urn:fhir-ledger:transfer:source-head";
pub const LEAVES_EXTENSION: &str = "urn:fhir-ledger:transfer:source-leaves";
/// One RFC 9162 multiproof of every target's source leaf at the source head, on the Provenance.
pub const MULTIPROOF_EXTENSION: &str = "urn:fhir-ledger:transfer:source-multiproof";
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

/// The offline check of a downloaded export, as a refusal when anything fails; keeps the
/// output files and their lines' sources for [`write_import`].
pub fn verify(
    files: &dyn check::Files,
    keys: &[ed25519_dalek::VerifyingKey],
    quorum: usize,
) -> anyhow::Result<check::Verified> {
    let verified = check::check_keeping(files, keys, quorum).map_err(|e| match e {
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

/// A tree head as `GET /ledger/head` serves it (a Parameters resource).
pub fn head_parameters(head: &crate::treehead::TreeHead) -> Value {
    let parts: Vec<Value> = head.to_parts().iter().map(crate::fhir::json::Json::to_serde).collect();
    json!({"resourceType": "Parameters", "parameter": parts})
}

/// Appends a target's source leaf to the Provenance's source leaves: the leaf's number
/// (u64, little-endian), its data's length (u32, little-endian) and the data (the leaf
/// header, which names the source's type, id, version and time), target after target.
pub fn push_source_leaf(out: &mut Vec<u8>, leaf: u64, data: &[u8]) {
    out.extend_from_slice(&leaf.to_le_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(data);
}

/// The source leaves [`push_source_leaf`] wrote, in order.
fn source_leaves(mut bytes: &[u8]) -> Result<Vec<(u64, &[u8])>, String> {
    let bad = || "the source leaves are cut short".to_string();
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (leaf, rest) = bytes.split_first_chunk::<8>().ok_or_else(bad)?;
        let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = usize::try_from(u32::from_le_bytes(*len)).map_err(|_| bad())?;
        let (data, rest) = rest.split_at_checked(len).ok_or_else(bad)?;
        out.push((u64::from_le_bytes(*leaf), data));
        bytes = rest;
    }
    Ok(out)
}

/// Checks a transfer Provenance (as imported here) against the peer's node keys: its head
/// is signed by a quorum, each target is of the type its source leaf names, and every
/// source leaf is in that head, by the Provenance's one multiproof.
pub fn verify_provenance(
    provenance: &Value,
    keys: &[ed25519_dalek::VerifyingKey],
    quorum: usize,
) -> Result<usize, String> {
    let extension = |url: &str, field: &str| {
        provenance["extension"]
            .as_array()
            .and_then(|e| e.iter().find(|x| x["url"] == url))
            .and_then(|x| x[field].as_str())
            .map(str::to_string)
    };
    let head = extension(HEAD_EXTENSION, "valueString")
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .ok_or("the Provenance carries no source head")?;
    let parts = head["parameter"].as_array().ok_or("the source head is not a Parameters resource")?;
    let head = crate::treehead::TreeHead::from_parts(parts)?;
    head.check_quorum(keys, quorum)?;
    let leaves = extension(LEAVES_EXTENSION, "valueBase64Binary")
        .and_then(|s| crate::codec::unb64(&s).ok())
        .ok_or("the Provenance carries no source leaves (base64)")?;
    let leaves = source_leaves(&leaves)?;
    let targets = provenance["target"].as_array().map_or(&[][..], Vec::as_slice);
    if targets.len() != leaves.len() {
        return Err(format!("{} targets, {} source leaves", targets.len(), leaves.len()));
    }
    let mut together: Vec<(u64, consensus::merkle::Hash)> = Vec::with_capacity(leaves.len());
    for (t, (leaf, data)) in targets.iter().zip(&leaves) {
        let header = consensus::LeafHeader::decode(data).ok_or_else(|| format!("leaf {leaf}: bad leaf data"))?;
        let target = t["reference"].as_str().unwrap_or_default();
        if !target.starts_with(&format!("{}/", header.rtype)) {
            return Err(format!("target {target} names leaf {leaf} of {}/{}", header.rtype, header.id));
        }
        together.push((*leaf, consensus::merkle::leaf_hash(data)));
    }
    let proof = extension(MULTIPROOF_EXTENSION, "valueBase64Binary")
        .and_then(|s| crate::codec::unb64(&s).ok())
        .filter(|p| p.len() % 32 == 0)
        .ok_or("the Provenance carries no multiproof of its targets (base64 of 32-byte hashes)")?;
    let proof: Vec<consensus::merkle::Hash> = proof.chunks(32).filter_map(|c| c.try_into().ok()).collect();
    together.sort_unstable_by_key(|t| t.0);
    if let Some(w) = together.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(format!("leaf {} is the source of two targets", w[0].0));
    }
    if consensus::proof::multi_root(&together, head.size, &proof) != Some(head.root) {
        return Err(format!(
            "the targets' source leaves and the multiproof do not rebuild the source head of size {}",
            head.size
        ));
    }
    Ok(together.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use consensus::merkle::{leaf_hash, root_of, Hash};
    use consensus::proof::LeafNodes;

    /// The leaves of a tree of 9 Observations, o0 to o8, and its head signed by `key`.
    fn tree(key: &ed25519_dalek::SigningKey) -> (Vec<Vec<u8>>, Vec<Hash>, crate::treehead::TreeHead) {
        let data: Vec<Vec<u8>> = (0..9u64)
            .map(|i| {
                let h = consensus::LeafHeader {
                    rtype: "Observation".into(),
                    id: format!("o{i}"),
                    version: 1,
                    ..Default::default()
                };
                h.encode()
            })
            .collect();
        let hashes: Vec<Hash> = data.iter().map(|d| leaf_hash(d)).collect();
        let head = crate::treehead::TreeHead::signed(9, root_of(&hashes), 1, "node-1", key);
        (data, hashes, head)
    }

    /// A Provenance as `import_bundle` writes it (and the importing server stores it) over the
    /// tree of [`tree`]: a target per leaf of `sources`, the multiproof of `proven`.
    fn provenance_of(key: &ed25519_dalek::SigningKey, sources: &[u64], proven: &[u64]) -> Value {
        let (data, hashes, head) = tree(key);
        let multiproof = consensus::proof::multi_proof(&LeafNodes(&hashes), proven, 9).unwrap();
        let mut leaves = Vec::new();
        for &i in sources {
            push_source_leaf(&mut leaves, i, &data[i as usize]);
        }
        let targets: Vec<Value> = sources.iter().map(|i| json!({"reference": format!("Observation/new{i}")})).collect();
        json!({"resourceType": "Provenance", "target": targets, "extension": [
            {"url": HEAD_EXTENSION, "valueString": head_parameters(&head).to_string()},
            {"url": MULTIPROOF_EXTENSION, "valueBase64Binary": crate::codec::b64(&multiproof.concat())},
            {"url": LEAVES_EXTENSION, "valueBase64Binary": crate::codec::b64(&leaves)}]})
    }

    /// A verified export of `kept` under a head of `size` leaves.
    fn verified(size: u64, kept: Vec<check::Kept>) -> check::Verified {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let head = crate::treehead::TreeHead::signed(size, [0; 32], 1, "node-1", &key);
        check::Verified {
            head,
            cosigners: 1,
            signers: 1,
            lines: 0,
            files: Vec::new(),
            subsetted: false,
            bytes_hashed: 0,
            nodes_hashed: 0,
            signatures: 0,
            kept,
            known: std::collections::HashMap::new(),
        }
    }

    #[test]
    fn an_export_with_nothing_to_import_is_refused_by_name() {
        let e = import_bundle(&verified(1, Vec::new()), "https://old.example", "old").unwrap_err();
        assert_eq!(e.to_string(), "the export holds no resource to import");
    }

    /// Lines go into the import's Bundle as they are: one that would close its entry and add
    /// entries of its own (here a DELETE) is refused, even under a trusted peer's signature.
    #[test]
    fn a_line_that_would_add_entries_to_the_import_is_refused() {
        let source = |id: &str, leaf| check::Source { key: format!("Observation/{id}"), leaf, leaf_data: Vec::new() };
        let good = r#"{"resourceType":"Observation","id":"a"}"#;
        let breaking = r#"{"resourceType":"Observation","id":"b"}},{"request":{"method":"DELETE","url":"Patient/x"}"#;
        let kept = |second: &str| check::Kept {
            name: "Observation-1.ndjson".into(),
            text: format!("{good}\n{second}\n"),
            sources: vec![source("a", 0), source("b", 1)],
        };
        let e = import_bundle(&verified(2, vec![kept(breaking)]), "https://old.example", "old").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Observation-1.ndjson: a line that is not one JSON object (the resource Observation/b)"
        );
        let bundle = import_bundle(&verified(2, vec![kept(good)]), "https://old.example", "old").unwrap();
        let bundle: Value = serde_json::from_str(&bundle).unwrap();
        assert_eq!(bundle["entry"][0]["fullUrl"], "https://old.example/Observation/a");
        assert_eq!(bundle["entry"][0]["resource"], serde_json::from_str::<Value>(good).unwrap(), "sent as exported");
        assert_eq!(bundle["entry"][2]["resource"]["target"][1]["reference"], "https://old.example/Observation/b");
    }

    #[test]
    fn a_provenance_verifies_by_its_multiproof_and_refuses_what_was_changed() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let trusted = [key.verifying_key()];
        let picked = [1u64, 4, 7];
        let good = provenance_of(&key, &picked, &picked);
        assert_eq!(verify_provenance(&good, &trusted, 1), Ok(3));

        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]).verifying_key();
        assert!(verify_provenance(&good, &[other], 1).is_err(), "a head signed by another key");

        let dropped = provenance_of(&key, &[1, 7], &picked);
        let e = verify_provenance(&dropped, &trusted, 1).unwrap_err();
        assert!(e.contains("do not rebuild the source head"), "a target left out: {e}");

        let e = verify_provenance(&provenance_of(&key, &[1, 1, 7], &picked), &trusted, 1).unwrap_err();
        assert!(e.contains("source of two targets"), "{e}");

        let mut unmatched = good.clone();
        unmatched["target"].as_array_mut().unwrap().pop();
        let e = verify_provenance(&unmatched, &trusted, 1).unwrap_err();
        assert_eq!(e, "2 targets, 3 source leaves");

        let mut cut = good.clone();
        let leaves = crate::codec::unb64(cut["extension"][2]["valueBase64Binary"].as_str().unwrap()).unwrap();
        cut["extension"][2]["valueBase64Binary"] = json!(crate::codec::b64(&leaves[..leaves.len() - 1]));
        let e = verify_provenance(&cut, &trusted, 1).unwrap_err();
        assert_eq!(e, "the source leaves are cut short");

        let mut short = good.clone();
        let proof = crate::codec::unb64(short["extension"][1]["valueBase64Binary"].as_str().unwrap()).unwrap();
        short["extension"][1]["valueBase64Binary"] = json!(crate::codec::b64(&proof[32..]));
        assert!(verify_provenance(&short, &trusted, 1).is_err(), "a multiproof one hash short");
        short["extension"][1]["valueBase64Binary"] = json!(crate::codec::b64(&proof[1..]));
        let e = verify_provenance(&short, &trusted, 1).unwrap_err();
        assert!(e.contains("32-byte hashes"), "{e}");

        let mut retyped = good.clone();
        retyped["target"][2]["reference"] = json!("Patient/new7");
        let e = verify_provenance(&retyped, &trusted, 1).unwrap_err();
        assert_eq!(e, "target Patient/new7 names leaf 7 of Observation/o7", "a target claiming another source");
    }
}
