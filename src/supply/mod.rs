//! Supply-chain traceability: GS1 EPCIS 2.0 custody events recorded on the ledger as FHIR
//! resources, signed by the trading partner that captured them.
//!
//! - [`partners`]: trading partners are Organizations with their own ed25519 keys and GLNs;
//! - [`capture`]: an EPCIS document becomes one commit (validation, Event Hash IDs, partner
//!   signatures, the FHIR mapping of [`map`]);
//! - [`events`]: the recorded events, found through the search index;
//! - [`trace`]: a product's custody chain and what is wrong with it;
//! - [`certs`]: issuer-signed certificates of partners and products; [`directory`]: partners
//!   and certificates remembered by version;
//! - [`verify`]: the GS1 Lightweight Verification Messaging answer built from a trace.

pub mod capture;
pub mod certs;
pub mod directory;
pub mod events;
pub mod map;
pub mod partners;
pub mod trace;
pub mod verify;

/// `meta.tag` of every resource the EPCIS mapping writes.
pub const TAG_SYSTEM: &str = "urn:fhir-ledger:supply";
/// The tag code of an event's Provenance.
pub const EVENT_TAG: &str = "epcis-event";
/// Identifier system of identifiers written as URIs (EPCs as canonical Digital Links, event ids).
pub const URI_SYSTEM: &str = "urn:ietf:rfc:3986";
/// Identifier system of an RFC 6920 named-information URI: the CBV 2.0 Event Hash ID.
pub const HASH_SYSTEM: &str = "urn:ietf:rfc:6920";
/// Coding system of CBV business steps on a Provenance's `activity`.
pub const BIZ_STEP_SYSTEM: &str = "urn:epcglobal:cbv:bizstep";
/// Coding system of CBV dispositions on a Provenance's `reason`.
pub const DISPOSITION_SYSTEM: &str = "urn:epcglobal:cbv:disp";
/// The GS1 GTIN as a FHIR coding and identifier system.
pub const GTIN_SYSTEM: &str = "https://www.gs1.org/gtin";
/// The GS1 GLN as a FHIR identifier system.
pub const GLN_SYSTEM: &str = "https://www.gs1.org/gln";
/// `typ` of a partner's detached JWS over an Event Hash ID.
pub const EVENT_JWS_TYPE: &str = "epcis-event-hash+jws";

/// The `id` a resource of the mapping gets from what identifies it (64 hex characters: a
/// FHIR id's maximum), so one event or one product is one resource on every node and retry.
pub fn derived_id(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// The types whose EPCIS records only a capture writes.
pub const RECORD_TYPES: [&str; 2] = ["Provenance", "SupplyDelivery"];

fn tagged(r: &crate::fhir::json::Json) -> bool {
    r.items(&["meta", "tag"]).any(|t| t.str_at(&["system"]) == Some(TAG_SYSTEM))
}

/// An EPCIS record (an event's Provenance or SupplyDelivery) is the partner's signed claim:
/// no FHIR write changes, deletes or forges one (the ledger would keep the original, but a
/// trace reads the current version).
pub fn refuse_edit(
    rtype: &str,
    id: &str,
    stored: Option<&crate::fhir::json::Json>,
    new: Option<&crate::fhir::json::Json>,
) -> Result<(), crate::error::FhirError> {
    if stored.is_some_and(tagged) || new.is_some_and(tagged) {
        return Err(crate::error::FhirError::forbidden(format!(
            "{rtype}/{id} is an EPCIS record: custody events are recorded by POST /epcis/capture, signed by their \
             partner, and never edited or deleted"
        )));
    }
    Ok(())
}
