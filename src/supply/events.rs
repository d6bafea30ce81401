//! The recorded events: Provenances of the EPCIS mapping found through the search index
//! (custom parameters `epc`, `epcis-event`, `biz-step` of `fhir-profiles/search-parameters-supply.json`)
//! and read back, with the event bytes each one holds.

use serde_json::Value;

use super::{map, URI_SYSTEM};
use crate::codec::unb64;
use crate::epcis::Facts;
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::search::index::{Engine, Head, Index};

/// One event as the ledger holds it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub provenance: String,
    pub version: u64,
    pub leaf: u64,
    pub event: Value,
    pub facts: Facts,
    pub event_id: String,
    /// The Event Hash ID recorded at capture.
    pub hash_id: String,
    /// `Organization/{id}` of the partner that vouched for it.
    pub partner: Option<String>,
    pub jws: Option<String>,
    pub record_time: String,
    /// The reason of an error declaration (the record declares `event_id` wrong).
    pub declared: Option<String>,
}

impl Recorded {
    pub fn from_provenance(id: &str, version: u64, leaf: u64, p: &Json) -> Option<Recorded> {
        let data = p.items(&["contained"]).find(|c| c.str_at(&["id"]) == Some("event"))?.str_at(&["data"])?;
        let bytes = unb64(data).ok()?;
        let event: Value = serde_json::from_slice(&bytes).ok()?;
        let facts = Facts::of(&event);
        let jws = p
            .items(&["signature"])
            .find_map(|s| s.str_at(&["data"]))
            .and_then(|d| unb64(d).ok())
            .and_then(|b| String::from_utf8(b).ok());
        let declared = p
            .items(&["extension"])
            .find(|x| x.str_at(&["url"]) == Some(map::ERROR_REASON))
            .and_then(|x| x.str_at(&["valueString"]))
            .map(String::from);
        Some(Recorded {
            provenance: id.to_string(),
            version,
            leaf,
            event_id: event.get("eventID").and_then(Value::as_str).unwrap_or_default().to_string(),
            record_time: event.get("recordTime").and_then(Value::as_str).unwrap_or_default().to_string(),
            hash_id: map::recorded_hash(p).unwrap_or_default().to_string(),
            partner: p.items(&["agent"]).find_map(|a| a.str_at(&["who", "reference"])).map(String::from),
            jws,
            declared,
            event,
            facts,
        })
    }
}

/// The recorded events (current Provenance versions) holding `value` under search parameter
/// `code`, each admitted by `admit` (the caller's view), in event time order.
pub fn find(
    engine: &Engine,
    code: &str,
    value: &str,
    admit: &dyn Fn(&str) -> Result<bool, FhirError>,
) -> Result<Vec<Recorded>, FhirError> {
    find_all(engine, &[(code, value)], admit)
}

/// The recorded events holding every `(code, value)` of `all` (postings intersected).
pub fn find_all(
    engine: &Engine,
    all: &[(&str, &str)],
    admit: &dyn Fn(&str) -> Result<bool, FhirError>,
) -> Result<Vec<Recorded>, FhirError> {
    let heads = matching(&*engine.current()?, "Provenance", all)?;
    let leaves: Vec<u64> = heads.iter().map(|h| h.leaf).collect();
    let mut out = Vec::with_capacity(heads.len());
    for (h, stored) in heads.iter().zip(engine.repo().read_leaves(&leaves)) {
        if !admit(&h.id)? {
            continue;
        }
        let Some(p) = stored?.parsed()? else { continue };
        if let Some(r) = Recorded::from_provenance(&h.id, h.version, h.leaf, &p) {
            out.push(r);
        }
    }
    out.sort_by(|a, b| (a.facts.time_ms, &a.record_time).cmp(&(b.facts.time_ms, &b.record_time)));
    Ok(out)
}

/// The current `rtype` documents holding every `(code, value)` of `all` (postings intersected).
pub fn matching(idx: &Index, rtype: &str, all: &[(&str, &str)]) -> Result<Vec<Head>, FhirError> {
    let docs = idx.of(rtype);
    let mut keys: Option<Vec<_>> = None;
    for (code, value) in all {
        let posting = docs.posting(code, value)?;
        keys = Some(match keys {
            None => posting,
            Some(k) => k.into_iter().filter(|x| posting.binary_search(x).is_ok()).collect(),
        });
    }
    let mut heads = Vec::new();
    for k in keys.unwrap_or_default() {
        if let Some(h) = docs.head(k)? {
            heads.push(h);
        }
    }
    Ok(heads)
}

/// Events naming identifier `id` (normalised) in any role.
pub fn naming(
    engine: &Engine,
    id: &str,
    admit: &dyn Fn(&str) -> Result<bool, FhirError>,
) -> Result<Vec<Recorded>, FhirError> {
    find(engine, "epc", &format!("{URI_SYSTEM}|{id}"), admit)
}

/// The records of one event id (the event and any error declaration of it).
pub fn by_event_id(
    engine: &Engine,
    event_id: &str,
    admit: &dyn Fn(&str) -> Result<bool, FhirError>,
) -> Result<Vec<Recorded>, FhirError> {
    let system = if event_id.starts_with("ni:///") { super::HASH_SYSTEM } else { URI_SYSTEM };
    find(engine, "epcis-event", &format!("{system}|{event_id}"), admit)
}
