//! The FHIR side of an EPCIS event (ARCHITECTURE.md, "Supply chain: EPCIS on FHIR"):
//!
//! - every event is one `Provenance`: the partner as author agent, `occurredDateTime` the
//!   event time, `recorded` the capture time, `activity` the CBV business step, `reason` the
//!   disposition, `location` the business location, each identifier the event names as a
//!   `target` (canonical Digital Links), the Event Hash ID as an `entity`, the partner's JWS as
//!   the `signature`, and the event as recorded (with its `eventID`, `recordTime` and the
//!   prefixes in scope) as a contained `Binary`;
//! - shipping and receiving are also a `SupplyDelivery` (`in-progress` when shipped,
//!   `completed` when received), the delivery the EHR's supply workflow sees;
//! - a commissioning with a lot makes the lot a `Medication` (`batch` lot and expiry, `code`
//!   the GTIN), or, for a GTIN a `DeviceDefinition` names, one `Device` per serial (UDI, lot,
//!   serial, expiry): what a dispense, an administration or an implant then references.

use std::fmt::Write as _;

use serde_json::{json, Value};

use super::partners::Partner;
use super::{
    derived_id, BIZ_STEP_SYSTEM, DISPOSITION_SYSTEM, EVENT_TAG, GTIN_SYSTEM, HASH_SYSTEM, TAG_SYSTEM, URI_SYSTEM,
};
use crate::codec::b64;
use crate::epcis::{epc, Facts};

/// The extension on a `SupplyDelivery` saying which stage of the delivery the event records
/// (the stage IHE SUPPLY tracks): `shipped` or `received`.
pub const DELIVERY_STAGE: &str = "urn:fhir-ledger:StructureDefinition/delivery-stage";
/// On an error declaration's Provenance: the declared reason (CBV error reason).
pub const ERROR_REASON: &str = "urn:fhir-ledger:StructureDefinition/epcis-error-declaration";

/// One resource of the mapping: type, id, body. Every one is created once and never
/// overwritten by a capture (a lot's Medication commissioned again stays as it was).
pub struct Mapped {
    pub rtype: &'static str,
    pub id: String,
    pub body: Value,
}

/// What is known of one event when it is mapped.
pub struct Input<'a> {
    /// The event as recorded (with `eventID` and `recordTime`), serialised.
    pub event_bytes: &'a [u8],
    pub event_id: &'a str,
    pub hash_id: &'a str,
    pub facts: &'a Facts,
    pub partner: &'a Partner,
    pub jws: Option<&'a str>,
    pub recorded: &'a str,
    pub event_time: &'a str,
    /// GTINs a `DeviceDefinition` on this server names (devices are tracked per instance).
    pub device_gtins: &'a [String],
}

fn tag() -> Value {
    json!({"tag": [{"system": TAG_SYSTEM, "code": EVENT_TAG}]})
}

fn uri(value: &str) -> Value {
    json!({"system": URI_SYSTEM, "value": value})
}

/// The Provenance id of event `event_id` (an error declaration, which shares the id of the
/// event it declares wrong, gets its own from its declaration time).
pub fn provenance_id(event_id: &str, declaration: Option<&str>) -> String {
    match declaration {
        None => derived_id(&["epcis-event", event_id]),
        Some(at) => derived_id(&["epcis-error-declaration", event_id, at]),
    }
}

fn gtin_of(id: &str) -> Option<String> {
    epc::parse(id).and_then(|k| k.gtin)
}

/// Maps one event; the Provenance comes last and targets the others.
pub fn map(i: &Input<'_>, declaration: Option<(&str, Option<&str>)>) -> Vec<Mapped> {
    let f = i.facts;
    let mut out = Vec::new();
    let mut targets: Vec<Value> = i.facts.identifiers().iter().map(|id| json!({"identifier": uri(id)})).collect();
    let pid = provenance_id(i.event_id, declaration.map(|d| d.0));
    let step = f.biz_step.as_deref();
    if declaration.is_none() {
        if matches!(step, Some("shipping" | "receiving")) {
            let d = delivery(i, &pid);
            targets.push(json!({"reference": format!("SupplyDelivery/{}", d.id)}));
            out.push(d);
        }
        if step == Some("commissioning") {
            for m in products(i) {
                targets.push(json!({"reference": format!("{}/{}", m.rtype, m.id)}));
                out.push(m);
            }
        }
    }
    if targets.is_empty() {
        // An event naming no identifier (sensor readings at a place, say) is about itself:
        // Provenance.target is 1..*.
        targets.push(json!({"reference": "#event"}));
    }
    let mut entity = vec![
        json!({"role": "source", "what": {"reference": "#event", "identifier": {"system": HASH_SYSTEM, "value": i.hash_id}}}),
    ];
    if i.event_id != i.hash_id {
        entity.push(json!({"role": "source", "what": {"identifier": uri(i.event_id)}}));
    }
    let author = json!({"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}]},
                        "who": {"reference": i.partner.reference(), "display": i.partner.name}});
    let mut p = json!({
        "resourceType": "Provenance",
        "id": pid,
        "meta": tag(),
        "contained": [{"resourceType": "Binary", "id": "event", "contentType": "application/ld+json", "data": b64(i.event_bytes)}],
        "target": targets,
        "occurredDateTime": i.event_time,
        "recorded": i.recorded,
        "agent": [author],
        "entity": entity,
    });
    if let Some(s) = step {
        p["activity"] = json!({"coding": [{"system": BIZ_STEP_SYSTEM, "code": s}]});
    }
    if let Some(d) = &f.disposition {
        p["reason"] = json!([{"coding": [{"system": DISPOSITION_SYSTEM, "code": d}]}]);
    }
    if let Some(l) = f.biz_location.as_ref().or(f.read_point.as_ref()) {
        p["location"] = json!({"identifier": uri(l)});
    }
    if let Some((_, reason)) = declaration {
        p["extension"] = json!([{"url": ERROR_REASON, "valueString": reason.unwrap_or("declared in error")}]);
    }
    if let Some(jws) = i.jws {
        p["signature"] = json!([{
            "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1", "display": "Author's Signature"}],
            "when": i.recorded,
            "who": {"reference": i.partner.reference()},
            "sigFormat": "application/jose",
            "targetFormat": "text/plain",
            "data": b64(jws.as_bytes()),
        }]);
    }
    out.push(Mapped { rtype: "Provenance", id: pid, body: p });
    out
}

fn delivery(i: &Input<'_>, pid: &str) -> Mapped {
    let f = i.facts;
    let shipped = f.biz_step.as_deref() == Some("shipping");
    let mut ids: Vec<&String> = f.epcs.iter().chain(f.parent.iter()).collect();
    if ids.is_empty() {
        ids = f.classes.iter().collect();
    }
    let gtins: Vec<String> = {
        let mut g: Vec<String> = ids.iter().filter_map(|e| gtin_of(e)).collect();
        g.sort();
        g.dedup();
        g
    };
    let mut item = json!({"quantity": {"value": ids.len().max(1)}});
    if let [gtin] = gtins.as_slice() {
        item["itemCodeableConcept"] = json!({"coding": [{"system": GTIN_SYSTEM, "code": gtin}]});
    } else {
        item["itemCodeableConcept"] = json!({"text": format!("{} identified items or logistic units", ids.len())});
    }
    let mut d = json!({
        "resourceType": "SupplyDelivery",
        "id": pid,
        "meta": tag(),
        "extension": [{"url": DELIVERY_STAGE, "valueCode": if shipped { "shipped" } else { "received" }}],
        "identifier": [{"system": HASH_SYSTEM, "value": i.hash_id}],
        "status": if shipped { "in-progress" } else { "completed" },
        "suppliedItem": item,
        "occurrenceDateTime": i.event_time,
    });
    if shipped {
        d["supplier"] = json!({"reference": i.partner.reference(), "display": i.partner.name});
        let to = f.destinations.iter().find(|(t, _)| t == "location").or_else(|| f.destinations.first());
        if let Some((_, to)) = to {
            d["destination"] = json!({"identifier": uri(to)});
        }
    } else if let Some(at) = f.biz_location.as_ref().or(f.read_point.as_ref()) {
        d["destination"] = json!({"identifier": uri(at)});
    }
    Mapped { rtype: "SupplyDelivery", id: pid.to_string(), body: d }
}

/// The product records a commissioning creates.
fn products(i: &Input<'_>) -> Vec<Mapped> {
    let f = i.facts;
    let mut out = Vec::new();
    let mut lots_done: Vec<String> = Vec::new();
    for e in &f.epcs {
        let Some(key) = epc::parse(e) else { continue };
        let (Some(gtin), Some(serial)) = (key.gtin.clone(), key.serial.clone()) else { continue };
        if i.device_gtins.contains(&gtin) {
            let mut hrf = format!("(01){gtin}(21){serial}");
            let mut d = json!({
                "resourceType": "Device",
                "id": derived_id(&["gs1-device", &gtin, &serial]),
                "meta": tag(),
                "identifier": [uri(e)],
                "status": "active",
                "manufacturer": i.partner.name,
                "serialNumber": serial,
            });
            if let Some(lot) = &f.lot {
                d["lotNumber"] = json!(lot);
                let _ = write!(hrf, "(10){lot}"); // writing to a String cannot fail
            }
            if let Some(x) = &f.expiry {
                d["expirationDate"] = json!(x);
            }
            d["udiCarrier"] = json!([{"deviceIdentifier": gtin, "issuer": "http://hl7.org/fhir/NamingSystem/gs1-di", "carrierHRF": hrf}]);
            out.push(Mapped { rtype: "Device", id: derived_id(&["gs1-device", &gtin, &serial]), body: d });
        } else if let Some(lot) = &f.lot {
            if lots_done.contains(&gtin) {
                continue;
            }
            lots_done.push(gtin.clone());
            let id = derived_id(&["gs1-lot", &gtin, lot]);
            let mut batch = json!({"lotNumber": lot});
            if let Some(x) = &f.expiry {
                batch["expirationDate"] = json!(x);
            }
            let m = json!({
                "resourceType": "Medication",
                "id": id,
                "meta": tag(),
                "identifier": [uri(&epc::lgtin_link(&gtin, lot))],
                "code": {"coding": [{"system": GTIN_SYSTEM, "code": gtin}]},
                "status": "active",
                "manufacturer": {"reference": i.partner.reference(), "display": i.partner.name},
                "batch": batch,
            });
            out.push(Mapped { rtype: "Medication", id, body: m });
        }
    }
    out
}

/// The Event Hash ID a recorded event's Provenance names.
pub fn recorded_hash(provenance: &crate::fhir::json::Json) -> Option<&str> {
    provenance
        .items(&["entity"])
        .find(|e| e.str_at(&["what", "identifier", "system"]) == Some(HASH_SYSTEM))
        .and_then(|e| e.str_at(&["what", "identifier", "value"]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::json::Json;

    /// Every event of the EPCIS 2.0 standard's examples maps to resources the R4 definitions
    /// accept (the conformance suite's validators found a Provenance without a target once).
    #[test]
    fn the_standards_examples_map_to_valid_resources() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let profiles = crate::fhir::profiles::Profiles::load(&crate::definitions::Definitions::Embedded).unwrap();
        let partner = Partner { id: "p".into(), name: "p".into(), keys: Vec::new(), glns: Vec::new() };
        let mut dirs = vec![root.join("tests/fixtures/epcis-examples")];
        let mut mapped = 0;
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                if path.extension().is_none_or(|x| x != "jsonld") {
                    continue;
                }
                let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                let list = doc
                    .pointer("/epcisBody/eventList")
                    .or_else(|| doc.pointer("/epcisBody/queryResults/resultsBody/eventList"));
                for event in list.and_then(Value::as_array).into_iter().flatten() {
                    let facts = Facts::of(event);
                    let bytes = serde_json::to_vec(event).unwrap();
                    let input = Input {
                        event_bytes: &bytes,
                        event_id: "ni:///sha-256;00?ver=CBV2.0",
                        hash_id: "ni:///sha-256;00?ver=CBV2.0",
                        facts: &facts,
                        partner: &partner,
                        jws: Some("a..b"),
                        recorded: "2026-12-05T00:00:00Z",
                        event_time: event["eventTime"].as_str().unwrap(),
                        device_gtins: &[],
                    };
                    for m in map(&input, None) {
                        let issues = crate::fhir::validate::validate(&profiles, &Json::from(m.body.clone()));
                        let errors: Vec<_> =
                            issues.iter().filter(|i| i.severity == crate::fhir::validate::Severity::Error).collect();
                        assert!(errors.is_empty(), "{}: {} {}: {errors:?}", path.display(), m.rtype, m.body);
                        mapped += 1;
                    }
                }
            }
        }
        assert!(mapped > 50, "{mapped} resources mapped");
    }
}
