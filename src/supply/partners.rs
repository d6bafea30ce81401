//! Trading partners: manufacturers, wholesalers, 3PLs, pharmacies and hospitals, each an
//! `Organization` that lists its GLNs (`identifier` system [`GLN_SYSTEM`]), its ed25519 public
//! keys (the [`PARTNER_KEY`] extension, base64url, with the key's RFC 7638 thumbprint as an
//! identifier so a signature's `kid` finds its partner through the index) and, for a partner
//! that submits with a Backend Services token, its client (`urn:fhir-ledger:client`).

use ed25519_dalek::VerifyingKey;

use super::GLN_SYSTEM;
use crate::codec::unb64url;
use crate::epcis::epc;
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::search::index::Engine;

/// The extension holding one of a partner's ed25519 public keys (base64url, 32 bytes).
pub const PARTNER_KEY: &str = "urn:fhir-ledger:StructureDefinition/partner-key";
/// Identifier system of a key's RFC 7638 thumbprint.
pub const THUMBPRINT_SYSTEM: &str = "urn:ietf:rfc:7638";
/// Identifier system naming the SMART client a partner submits with.
pub const CLIENT_SYSTEM: &str = "urn:fhir-ledger:client";

#[derive(Clone, Debug)]
pub struct Partner {
    pub id: String,
    pub name: String,
    pub keys: Vec<VerifyingKey>,
    pub glns: Vec<String>,
}

impl Partner {
    pub fn reference(&self) -> String {
        format!("Organization/{}", self.id)
    }

    pub fn from_json(id: &str, org: &Json) -> Partner {
        let keys = org
            .items(&["extension"])
            .filter(|x| x.str_at(&["url"]) == Some(PARTNER_KEY))
            .filter_map(|x| x.str_at(&["valueString"]))
            .filter_map(|k| unb64url(k).ok())
            .filter_map(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
            .filter_map(|k| VerifyingKey::from_bytes(&k).ok())
            .collect();
        let glns = org
            .items(&["identifier"])
            .filter(|x| x.str_at(&["system"]) == Some(GLN_SYSTEM))
            .filter_map(|x| x.str_at(&["value"]).map(String::from))
            .collect();
        Partner { id: id.to_string(), name: org.str_at(&["name"]).unwrap_or(id).to_string(), keys, glns }
    }
}

/// The ids of the live Organizations holding identifier `system|value`.
pub fn ids_by_identifier(engine: &Engine, system: &str, value: &str) -> Result<Vec<String>, FhirError> {
    let ids: Vec<String> = {
        let idx = engine.current()?;
        let orgs = idx.of("Organization");
        let mut ids = Vec::new();
        for k in orgs.posting("identifier", &format!("{system}|{value}"))? {
            if let Some(h) = orgs.head(k)? {
                ids.push(h.id);
            }
        }
        ids
    };
    Ok(ids)
}

/// The live Organizations holding identifier `system|value`.
fn by_identifier(engine: &Engine, system: &str, value: &str) -> Result<Vec<Partner>, FhirError> {
    let mut out = Vec::new();
    for id in ids_by_identifier(engine, system, value)? {
        if let Some(p) = partner(engine, &id)? {
            out.push(p);
        }
    }
    Ok(out)
}

/// `Organization/{id}` as a partner, if it exists.
pub fn partner(engine: &Engine, id: &str) -> Result<Option<Partner>, FhirError> {
    match engine.repo().read("Organization", id) {
        Ok(stored) => Ok(stored.parsed()?.map(|org| Partner::from_json(id, &org))),
        Err(e) if e.is_absent() => Ok(None),
        Err(e) => Err(e),
    }
}

/// The partner holding the key with RFC 7638 thumbprint `kid` (a JWS header's `kid`).
pub fn by_thumbprint(engine: &Engine, kid: &str) -> Result<Option<Partner>, FhirError> {
    let found = by_identifier(engine, THUMBPRINT_SYSTEM, kid)?;
    Ok(found.into_iter().find(|p| p.keys.iter().any(|k| crate::jws::thumbprint(k) == kid)))
}

/// The partner a SMART client submits for.
pub fn by_client(engine: &Engine, client_id: &str) -> Result<Option<Partner>, FhirError> {
    Ok(by_identifier(engine, CLIENT_SYSTEM, client_id)?.into_iter().next())
}

/// The partner owning a location or party identifier (an SGLN, a PGLN, or their Digital
/// Links): the Organization listing its GLN.
pub fn by_location(engine: &Engine, id: &str) -> Result<Option<Partner>, FhirError> {
    let Some(gln) = gln_of(id) else { return Ok(None) };
    Ok(by_identifier(engine, GLN_SYSTEM, &gln)?.into_iter().next())
}

/// The GLN of a location or party identifier.
pub fn gln_of(id: &str) -> Option<String> {
    epc::parse(id).and_then(|k| k.gln.or(k.pgln))
}
