//! Supply-chain traceability with real processes and auth on: a realistic custody chain in
//! EPCIS 2.0 JSON-LD (commissioning, packing into a case and a pallet, shipping to a
//! wholesaler, receiving, unpacking, shipping to a hospital pharmacy, receiving, dispensing to
//! a Synthea patient, and an implanted device with a UDI), each event signed by its partner,
//! traced end to end with proofs, and every counterfeit scenario detected and named.

use ed25519_dalek::{Signer, SigningKey};
use reqwest::Method;
use serde_json::{json, Value};

use crate::smart::{self, b64, fhir, get, put_resource, SmartServer};

const PREFIX: &str = "0312345";
const ISSUER: &str = "state-board";

/// GS1 mod-10 check digit of `digits`.
fn check_digit(digits: &str) -> char {
    let sum: u32 =
        digits.chars().rev().enumerate().map(|(i, c)| c.to_digit(10).unwrap() * if i % 2 == 0 { 3 } else { 1 }).sum();
    char::from_digit((10 - sum % 10) % 10, 10).unwrap()
}

/// GTIN-14 of item reference `item` (indicator digit first) under the company prefix.
fn gtin(item: &str) -> String {
    let body = format!("{}{PREFIX}{}", &item[..1], &item[1..]);
    format!("{body}{}", check_digit(&body))
}

fn sgtin_urn(item: &str, serial: &str) -> String {
    format!("urn:epc:id:sgtin:{PREFIX}.{item}.{serial}")
}

fn sgtin_link(item: &str, serial: &str) -> String {
    format!("https://id.gs1.org/01/{}/21/{serial}", gtin(item))
}

fn sscc(n: u32) -> String {
    format!("urn:epc:id:sscc:{PREFIX}.1{n:09}")
}

fn gln(location: u32) -> String {
    let body = format!("{PREFIX}{location:05}");
    format!("{body}{}", check_digit(&body))
}

fn sgln(location: u32) -> String {
    format!("urn:epc:id:sgln:{PREFIX}.{location:05}.0")
}

struct Partner {
    id: &'static str,
    location: u32,
    key: SigningKey,
}

fn thumbprint(key: &SigningKey) -> String {
    fhir_ledger::jws::thumbprint(&key.verifying_key())
}

fn jws(key: &SigningKey, typ: &str, payload: &[u8]) -> String {
    let header = b64url(json!({"alg": "EdDSA", "kid": thumbprint(key), "typ": typ}).to_string().as_bytes());
    let input = format!("{header}.{}", b64url(payload));
    format!("{header}..{}", b64url(&key.sign(input.as_bytes()).to_bytes()))
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Partner {
    fn new(id: &'static str, location: u32) -> Partner {
        Partner { id, location, key: SigningKey::generate(&mut rand::rngs::OsRng) }
    }

    fn organization(&self, client: Option<&str>) -> Value {
        let mut identifier = vec![
            json!({"system": "https://www.gs1.org/gln", "value": gln(self.location)}),
            json!({"system": "urn:ietf:rfc:7638", "value": thumbprint(&self.key)}),
        ];
        if let Some(c) = client {
            identifier.push(json!({"system": "urn:fhir-ledger:client", "value": c}));
        }
        json!({"resourceType": "Organization", "id": self.id, "name": self.id, "identifier": identifier,
               "extension": [{"url": "urn:fhir-ledger:StructureDefinition/partner-key",
                              "valueString": b64url(self.key.verifying_key().as_bytes())}]})
    }

    /// A licence of `kind` from the issuer for `[start, end)`.
    fn licence(&self, issuer: &Partner, kind: &str, start: &str, end: &str) -> Value {
        let target = format!("Organization/{}", self.id);
        let number = format!("LIC-{}", self.id);
        let statement = fhir_ledger::supply::certs::statement(kind, &target, start, end, &number);
        let sig = jws(&issuer.key, fhir_ledger::supply::certs::CERT_JWS_TYPE, statement.as_bytes());
        json!({"resourceType": "VerificationResult", "id": format!("licence-{}", self.id),
               "target": [{"reference": target}], "status": "validated",
               "validationProcess": [{"coding": [{"system": "urn:fhir-ledger:certificate-kind", "code": kind}]}],
               "extension": [{"url": "urn:fhir-ledger:StructureDefinition/certificate-period", "valuePeriod": {"start": start, "end": end}}],
               "validator": [{"organization": {"reference": format!("Organization/{}", issuer.id)}, "identityCertificate": number,
                              "attestationSignature": {"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.5"}],
                                                       "when": "2026-01-01T00:00:00Z", "who": {"reference": format!("Organization/{}", issuer.id)},
                                                       "sigFormat": "application/jose", "data": b64(sig)}}]})
    }
}

/// An EPCIS 2.0 event at partner `at`'s location.
fn event(kind: &str, time: &str, step: &str, at: &Partner, fields: Value) -> Value {
    let mut e = json!({"type": kind, "eventTime": time, "eventTimeZoneOffset": "+00:00", "bizStep": step,
                       "readPoint": {"id": sgln(at.location)}, "bizLocation": {"id": sgln(at.location)}});
    if let Value::Object(fields) = fields {
        for (k, v) in fields {
            e[k] = v;
        }
    }
    e
}

fn hash_id(e: &Value) -> String {
    let ctx = json!({"example": "https://ns.example.com/epcis/"});
    fhir_ledger::epcis::hash::event_hash_id(e, &[&ctx]).unwrap()
}

/// A capture document of `events`, each signed by `signer` over its Event Hash ID.
fn document(events: &[Value], signer: Option<&Partner>) -> Value {
    let mut sigs = Vec::new();
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let id = hash_id(&e);
            e["eventID"] = json!(id);
            if let Some(p) = signer {
                sigs.push(json!({"eventID": id, "jws": jws(&p.key, "epcis-event-hash+jws", id.as_bytes())}));
            }
            e
        })
        .collect();
    json!({"@context": ["https://ref.gs1.org/standards/epcis/2.0.0/epcis-context.jsonld",
                        {"example": "https://ns.example.com/epcis/", "fl": "https://fhir-ledger.dev/epcis/"}],
           "type": "EPCISDocument", "schemaVersion": "2.0", "creationDate": "2026-10-01T00:00:00Z",
           "epcisHeader": {"fl:eventSignatures": sigs},
           "epcisBody": {"eventList": events}})
}

async fn capture(s: &SmartServer, token: &str, doc: &Value) -> smart::Resp {
    smart::send(
        s.http
            .post(s.url("epcis/capture"))
            .bearer_auth(token)
            .header("Content-Type", "application/ld+json")
            .body(doc.to_string()),
    )
    .await
}

async fn captured(s: &SmartServer, token: &str, events: &[Value], signer: &Partner) {
    let r = capture(s, token, &document(events, Some(signer))).await;
    assert_eq!(r.status, 202, "capture by {}: {}", signer.id, r.text);
}

fn params<'a>(p: &'a Value, name: &str) -> Vec<&'a Value> {
    p["parameter"].as_array().into_iter().flatten().filter(|x| x["name"] == name).collect()
}

fn part<'a>(p: &'a Value, name: &str) -> Option<&'a Value> {
    p["part"].as_array().into_iter().flatten().find(|x| x["name"] == name)
}

fn codes(p: &Value) -> Vec<String> {
    params(p, "finding").iter().filter_map(|f| part(f, "code")?["valueCode"].as_str().map(String::from)).collect()
}

async fn verify(s: &SmartServer, token: &str, item: &str, serial: &str, extra: &str) -> Value {
    let r = get(&s.http, &s.url(&format!("$verify-product?gtin={}&serial={serial}{extra}", gtin(item))), token).await;
    assert_eq!(r.status, 200, "verify {serial}: {}", r.text);
    r.json()
}

fn lvm(v: &Value) -> (bool, String, String, String) {
    (
        v["data"]["verified"].as_bool().unwrap(),
        v["data"]["verificationFailureReason"].as_str().unwrap_or_default().to_string(),
        v["data"]["additionalInfo"].as_str().unwrap_or_default().to_string(),
        v["fhirLedger"]["status"].as_str().unwrap_or_default().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custody_chain_traces_end_to_end_and_every_counterfeit_is_named() {
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    let (mfr, whs, hosp, corner, rogue, old_whs) = (
        Partner::new("acme-pharma", 1),
        Partner::new("big-wholesale", 2),
        Partner::new("st-mary-pharmacy", 3),
        Partner::new("corner-pharmacy", 4),
        Partner::new("unexpected-pharmacy", 5),
        Partner::new("lapsed-wholesale", 6),
    );
    let board = Partner::new(ISSUER, 9);
    // The hospital pharmacy submits with its own Backend Services token instead of signing.
    let hosp_backend = smart::Backend::register(&s.admin, smart::ClientKey::ed25519(), "system/*.cruds").await;
    let hosp_token = hosp_backend.token(&s.http, "system/*.cruds").await;
    put_resource(&s.http, &s.base, &sys, &board.organization(None)).await;
    put_resource(&s.http, &s.base, &sys, &hosp.organization(Some(&hosp_backend.client_id))).await;
    for p in [&mfr, &whs, &corner, &rogue, &old_whs] {
        put_resource(&s.http, &s.base, &sys, &p.organization(None)).await;
    }
    put_resource(&s.http, &s.base, &sys, &mfr.licence(&board, "manufacturing-licence", "2020-01-01", "2030-01-01"))
        .await;
    for (p, kind) in [
        (&whs, "wholesale-licence"),
        (&hosp, "dispenser-licence"),
        (&corner, "dispenser-licence"),
        (&rogue, "dispenser-licence"),
    ] {
        put_resource(&s.http, &s.base, &sys, &p.licence(&board, kind, "2026-01-01", "2028-01-01")).await;
    }
    // The lapsed wholesaler's licence ended before it handled anything.
    put_resource(&s.http, &s.base, &sys, &old_whs.licence(&board, "wholesale-licence", "2025-01-01", "2026-06-30"))
        .await;
    // Devices of this GTIN are tracked per instance.
    put_resource(&s.http, &s.base, &sys, &json!({"resourceType": "DeviceDefinition", "id": "hip-implant",
        "identifier": [{"system": "https://www.gs1.org/gtin", "value": gtin("077777")}],
        "udiDeviceIdentifier": [{"deviceIdentifier": gtin("077777"), "issuer": "http://hl7.org/fhir/NamingSystem/gs1-di", "jurisdiction": "http://hl7.org/fhir/NamingSystem/fda-udi"}]})).await;
    let p1 = crate::research::load(&s, &sys, 1).await;
    let p2 = crate::research::load(&s, &sys, 2).await;

    // ---- The chain: lot LOT-A1 (serials 1001-1004, URNs at commissioning, Digital Links later).
    let drug = "067890";
    let lot = |lot: &str, expiry: &str| json!({"cbvmda:lotNumber": lot, "cbvmda:itemExpirationDate": expiry});
    let commission = |t: &str, serials: &[&str], l: &str, exp: &str| {
        event(
            "ObjectEvent",
            t,
            "commissioning",
            &mfr,
            json!({"action": "ADD", "disposition": "active",
            "epcList": serials.iter().map(|x| sgtin_urn(drug, x)).collect::<Vec<_>>(), "ilmd": lot(l, exp)}),
        )
    };
    let pack = |t: &str, at: &Partner, parent: &str, children: Vec<String>| {
        event("AggregationEvent", t, "packing", at, json!({"action": "ADD", "parentID": parent, "childEPCs": children}))
    };
    let unpack = |t: &str, at: &Partner, parent: &str, children: Vec<String>| {
        event(
            "AggregationEvent",
            t,
            "unpacking",
            at,
            json!({"action": "DELETE", "parentID": parent, "childEPCs": children}),
        )
    };
    let ship = |t: &str, at: &Partner, what: Vec<String>, to: &Partner| {
        event(
            "ObjectEvent",
            t,
            "shipping",
            at,
            json!({"action": "OBSERVE", "disposition": "in_transit", "epcList": what,
            "sourceList": [{"type": "location", "source": sgln(at.location)}],
            "destinationList": [{"type": "location", "destination": sgln(to.location)}]}),
        )
    };
    let receive = |t: &str, at: &Partner, what: Vec<String>| {
        event(
            "ObjectEvent",
            t,
            "receiving",
            at,
            json!({"action": "OBSERVE", "disposition": "in_progress", "epcList": what}),
        )
    };
    let dispense = |t: &str, at: &Partner, what: Vec<String>| {
        event(
            "ObjectEvent",
            t,
            "dispensing",
            at,
            json!({"action": "OBSERVE", "disposition": "dispensed", "epcList": what}),
        )
    };
    let (case1, pallet1) = (sscc(1), sscc(2));
    let items: Vec<String> = ["1001", "1002", "1003"].iter().map(|x| sgtin_link(drug, x)).collect();
    captured(
        &s,
        &sys,
        &[
            commission("2026-10-01T08:00:00Z", &["1001", "1002", "1003", "1004"], "LOT-A1", "2028-12-31"),
            pack("2026-10-02T08:00:00Z", &mfr, &case1, items.clone()),
            pack("2026-10-02T09:00:00Z", &mfr, &pallet1, vec![case1.clone()]),
            ship("2026-10-03T08:00:00Z", &mfr, vec![pallet1.clone()], &whs),
        ],
        &mfr,
    )
    .await;
    captured(
        &s,
        &sys,
        &[
            receive("2026-10-05T08:00:00Z", &whs, vec![pallet1.clone()]),
            unpack("2026-10-06T08:00:00Z", &whs, &pallet1, vec![case1.clone()]),
            ship("2026-10-07T08:00:00Z", &whs, vec![case1.clone()], &hosp),
        ],
        &whs,
    )
    .await;
    // The hospital's events come with its token, unsigned.
    let hosp_doc = document(
        &[
            receive("2026-10-08T08:00:00Z", &hosp, vec![case1.clone()]),
            unpack("2026-10-09T08:00:00Z", &hosp, &case1, vec![]),
            dispense("2026-10-10T08:00:00Z", &hosp, vec![sgtin_link(drug, "1001")]),
        ],
        None,
    );
    let r = capture(&s, &hosp_token, &hosp_doc).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let job = r.header("location");
    let j = get(&s.http, &s.url(&job), &hosp_token).await;
    assert_eq!((j.status, j.json()["success"].clone()), (200, json!(true)), "{}", j.text);
    // Capturing the same document again records nothing twice.
    let again = capture(&s, &hosp_token, &hosp_doc).await;
    assert_eq!(again.json()["duplicates"], 3, "{}", again.text);

    // The commissioning made the lot a Medication; the pharmacy dispenses it to patient 1.
    let meds = smart::search_all(&s.http, &s.base, &sys, "Medication?lot-number=LOT-A1").await;
    assert_eq!(meds.len(), 1, "one Medication for the lot: {meds:?}");
    let med = meds[0]["id"].as_str().unwrap().to_string();
    assert_eq!(meds[0]["code"]["coding"][0]["code"], gtin(drug));
    let md = json!({"resourceType": "MedicationDispense", "id": "md-1", "status": "completed",
        "medicationReference": {"reference": format!("Medication/{med}")},
        "subject": {"reference": format!("Patient/{p1}")}, "whenHandedOver": "2026-10-10T08:05:00Z"});
    put_resource(&s.http, &s.base, &sys, &md).await;

    // ---- The trace of 1001: every step, through the case and the pallet, with proofs.
    let r = get(&s.http, &s.url(&format!("$trace?gtin={}&serial=1001", gtin(drug))), &sys).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let t = r.json();
    let steps = params(&t, "step");
    let biz: Vec<&str> = steps.iter().map(|st| part(st, "bizStep").unwrap()["valueCode"].as_str().unwrap()).collect();
    assert_eq!(
        biz,
        [
            "commissioning",
            "packing",
            "packing",
            "shipping",
            "receiving",
            "unpacking",
            "shipping",
            "receiving",
            "unpacking",
            "dispensing"
        ],
        "{t}"
    );
    let partners: Vec<&str> =
        steps.iter().map(|st| part(st, "partner").unwrap()["valueReference"]["reference"].as_str().unwrap()).collect();
    assert_eq!(&partners[..4], ["Organization/acme-pharma"; 4]);
    assert_eq!(&partners[4..7], ["Organization/big-wholesale"; 3]);
    assert_eq!(&partners[7..], ["Organization/st-mary-pharmacy"; 3]);
    let via: Vec<Option<&str>> = steps.iter().map(|st| part(st, "via").and_then(|v| v["valueUri"].as_str())).collect();
    assert!(via[3].is_some_and(|v| v.contains("/00/")), "the shipping reached 1001 through its pallet: {via:?}");
    for st in &steps {
        let sig = part(st, "signature").unwrap()["valueCode"].as_str().unwrap();
        let by_hosp = part(st, "partner").unwrap()["valueReference"]["reference"] == "Organization/st-mary-pharmacy";
        assert_eq!(sig, if by_hosp { "token" } else { "verified" }, "{st}");
        assert_eq!(part(st, "licence").unwrap()["valueCode"], "valid", "{st}");
        let proof = part(st, "proof").unwrap();
        assert!(part(proof, "leafIndex").is_some() && part(proof, "leafData").is_some(), "{st}");
    }
    assert_eq!(codes(&t), ["dispensed"], "{t}");
    assert_eq!(params(&t, "status")[0]["valueCode"], "dispensed");
    // The proofs hold against the signed tree head the answer carries.
    check_proofs(&t);

    // Verification of the sibling still in the hospital's stock: verified, lot and expiry match.
    let v = verify(&s, &sys, drug, "1003", "&lot=LOT-A1&expiry=281231").await;
    assert_eq!(lvm(&v), (true, String::new(), String::new(), "verified".into()), "{v}");
    let v = verify(&s, &sys, drug, "1003", "&lot=LOT-B9").await;
    assert_eq!(lvm(&v).1, "No_match_GTIN_Serial_Lot", "{v}");
    let v = verify(&s, &sys, drug, "1003", "&expiry=290101").await;
    assert_eq!(lvm(&v).1, "No_match_GTIN_Serial_Expiry", "{v}");
    // The Digital Link form answers the same.
    let r = get(
        &s.http,
        &s.url(&format!("01/{}/21/1003?10=LOT-A1&17=281231&linkType=verificationService", gtin(drug))),
        &sys,
    )
    .await;
    assert_eq!(lvm(&r.json()), (true, String::new(), String::new(), "verified".into()), "{}", r.text);
    let v = verify(&s, &sys, drug, "1001", "").await;
    assert_eq!(lvm(&v), (false, "Not_for_re-distribution".into(), "Suspect".into(), "dispensed".into()), "{v}");

    // ---- Counterfeits.
    // 1. A serial never commissioned.
    let v = verify(&s, &sys, drug, "9999", "").await;
    assert_eq!(lvm(&v), (false, "No_match_GTIN_Serial".into(), String::new(), "unknown-serial".into()), "{v}");
    captured(&s, &sys, &[receive("2026-10-11T08:00:00Z", &corner, vec![sgtin_link(drug, "9998")])], &corner).await;
    let r = get(&s.http, &s.url(&format!("$trace?gtin={}&serial=9998", gtin(drug))), &sys).await;
    assert_eq!(codes(&r.json())[0], "never-commissioned", "{}", r.text);
    // 2. A cloned serial: 1002 is in the hospital's stock, and the corner pharmacy dispenses it.
    captured(&s, &sys, &[dispense("2026-10-12T08:00:00Z", &corner, vec![sgtin_link(drug, "1002")])], &corner).await;
    let v = verify(&s, &sys, drug, "1002", "").await;
    assert_eq!(lvm(&v).3, "cloned-serial", "{v}");
    // 3. A diverted lot: shipped to the hospital, received by a pharmacy it was never shipped to.
    captured(
        &s,
        &sys,
        &[
            commission("2026-10-01T09:00:00Z", &["2001"], "LOT-A2", "2028-12-31"),
            ship("2026-10-03T09:00:00Z", &mfr, vec![sgtin_link(drug, "2001")], &hosp),
        ],
        &mfr,
    )
    .await;
    captured(&s, &sys, &[receive("2026-10-04T09:00:00Z", &rogue, vec![sgtin_link(drug, "2001")])], &rogue).await;
    let v = verify(&s, &sys, drug, "2001", "").await;
    assert_eq!(lvm(&v).3, "custody-gap", "{v}");
    // 4a. An expired lot.
    captured(&s, &sys, &[commission("2024-01-01T09:00:00Z", &["3001"], "LOT-A0", "2025-01-31")], &mfr).await;
    let v = verify(&s, &sys, drug, "3001", "").await;
    assert_eq!(lvm(&v), (true, String::new(), "Expired".into(), "expired".into()), "{v}");
    // 4b. A recalled lot: the manufacturer recalls LOT-A3 as a class.
    captured(
        &s,
        &sys,
        &[
            commission("2026-10-01T10:00:00Z", &["4001"], "LOT-A3", "2028-12-31"),
            event(
                "ObjectEvent",
                "2026-10-20T10:00:00Z",
                "holding",
                &mfr,
                json!({"action": "OBSERVE", "disposition": "recalled",
            "quantityList": [{"epcClass": format!("urn:epc:class:lgtin:{PREFIX}.{drug}.LOT-A3"), "quantity": 1}]}),
            ),
        ],
        &mfr,
    )
    .await;
    let v = verify(&s, &sys, drug, "4001", "").await;
    assert_eq!(lvm(&v), (true, String::new(), "Recalled".into(), "recalled".into()), "{v}");
    // 5. An event signed by a key that is not the partner's: refused at capture.
    let impostor = Partner { id: "big-wholesale", location: 2, key: SigningKey::generate(&mut rand::rngs::OsRng) };
    let mut forged =
        document(&[ship("2026-10-13T08:00:00Z", &whs, vec![sgtin_link(drug, "1004")], &corner)], Some(&impostor));
    let r = capture(&s, &sys, &forged).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("signature-key-unknown"), "{}", r.text);
    // ... nor with the wholesaler's kid over another key's signature.
    let id = forged["epcisBody"]["eventList"][0]["eventID"].as_str().unwrap().to_string();
    let real = jws(&whs.key, "epcis-event-hash+jws", id.as_bytes());
    let fake = jws(&impostor.key, "epcis-event-hash+jws", id.as_bytes());
    let spliced = format!("{}..{}", real.split('.').next().unwrap(), fake.split('.').nth(2).unwrap());
    forged["epcisHeader"]["fl:eventSignatures"][0]["jws"] = json!(spliced);
    let r = capture(&s, &sys, &forged).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("signature-invalid"), "{}", r.text);
    // 6. An event altered after capture: its hash no longer matches its eventID (and signature).
    let mut altered =
        document(&[ship("2026-10-13T08:00:00Z", &whs, vec![sgtin_link(drug, "1004")], &hosp)], Some(&whs));
    altered["epcisBody"]["eventList"][0]["destinationList"][0]["destination"] = json!(sgln(corner.location));
    let r = capture(&s, &sys, &altered).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("event-hash-mismatch"), "{}", r.text);
    // ... and recorded events cannot be edited through the FHIR API either.
    let prov = params(&t, "step")[0];
    let prov_ref = part(prov, "provenance").unwrap()["valueReference"]["reference"].as_str().unwrap();
    let prov_path = prov_ref.split("/_history").next().unwrap();
    let mut body = get(&s.http, &s.url(prov_path), &sys).await.json();
    body["occurredDateTime"] = json!("2026-01-01T00:00:00Z");
    let r = fhir(&s.http, Method::PUT, &s.url(prov_path), Some(&sys), Some(&body)).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = fhir(&s.http, Method::DELETE, &s.url(prov_path), Some(&sys), None).await;
    assert_eq!(r.status, 403, "{}", r.text);
    // 7. A partner whose licence had expired at the time of the step.
    captured(
        &s,
        &sys,
        &[
            commission("2026-10-01T11:00:00Z", &["6001"], "LOT-A5", "2028-12-31"),
            ship("2026-10-03T11:00:00Z", &mfr, vec![sgtin_link(drug, "6001")], &old_whs),
        ],
        &mfr,
    )
    .await;
    captured(&s, &sys, &[receive("2026-10-05T11:00:00Z", &old_whs, vec![sgtin_link(drug, "6001")])], &old_whs).await;
    let v = verify(&s, &sys, drug, "6001", "").await;
    assert_eq!(lvm(&v).3, "unlicensed-partner", "{v}");

    // ---- The implant: a device commissioned per instance, implanted in patient 2.
    let implant = "077777";
    captured(
        &s,
        &sys,
        &[
            event(
                "ObjectEvent",
                "2026-09-01T08:00:00Z",
                "commissioning",
                &mfr,
                json!({"action": "ADD",
        "epcList": [sgtin_urn(implant, "7001")], "ilmd": lot("DLOT-1", "2031-01-31")}),
            ),
            ship("2026-09-02T08:00:00Z", &mfr, vec![sgtin_link(implant, "7001")], &hosp),
        ],
        &mfr,
    )
    .await;
    let devices = smart::search_all(&s.http, &s.base, &sys, "Device?serial-number=7001").await;
    assert_eq!(devices.len(), 1, "{devices:?}");
    let mut device = devices[0].clone();
    assert_eq!(device["udiCarrier"][0]["deviceIdentifier"], gtin(implant));
    assert_eq!(device["lotNumber"], "DLOT-1");
    device["patient"] = json!({"reference": format!("Patient/{p2}")});
    put_resource(&s.http, &s.base, &sys, &device).await;
    let r = get(&s.http, &s.url(&format!("Device/{}/$trace", device["id"].as_str().unwrap())), &sys).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(params(&r.json(), "step").len(), 2, "{}", r.text);

    // ---- Recall reach: the lot's patients, only for callers who may see them.
    let reach = |t: &Value| -> Vec<String> {
        params(t, "patient")
            .iter()
            .map(|p| part(p, "patient").unwrap()["valueReference"]["reference"].as_str().unwrap().to_string())
            .collect()
    };
    let r = get(&s.http, &s.url(&format!("$trace?gtin={}&lot=LOT-A1", gtin(drug))), &sys).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(reach(&r.json()), [format!("Patient/{p1}")], "{}", r.text);
    assert_eq!(params(&r.json(), "instance").len(), 4, "{}", r.text);
    let r = get(&s.http, &s.url(&format!("$trace?gtin={}&lot=DLOT-1", gtin(implant))), &sys).await;
    assert_eq!(reach(&r.json()), [format!("Patient/{p2}")], "{}", r.text);
    // Patient 2's own app: sees neither patient 1 nor the supply chain's records.
    let client = s.admin.public_client("Patient App", None).await;
    s.admin.user("p2", &format!("Patient/{p2}")).await;
    let tok =
        smart::user_token(&s.http, &s.base, &client, &["launch/patient", "patient/*.cruds"], &smart::Login::new("p2"))
            .await;
    let p2_token = tok["access_token"].as_str().unwrap().to_string();
    let r = get(&s.http, &s.url(&format!("$trace?gtin={}&lot=LOT-A1", gtin(drug))), &p2_token).await;
    assert!(!r.text.contains(&p1), "patient 2 must not learn of patient 1: {}", r.text);
    let r = capture(
        &s,
        &p2_token,
        &document(&[dispense("2026-10-14T08:00:00Z", &hosp, vec![sgtin_link(drug, "1003")])], Some(&hosp)),
    )
    .await;
    assert!(matches!(r.status, 403 | 404), "a patient cannot capture custody events: {} {}", r.status, r.text);

    // ---- The EPCIS query interface.
    let r = get(
        &s.http,
        &s.url(&format!("epcis/events?MATCH_anyEPC={}&EQ_bizStep=shipping", sgtin_urn(drug, "2001"))),
        &sys,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let list = r.json()["epcisBody"]["queryResults"]["resultsBody"]["eventList"].clone();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    let eid = list[0]["eventID"].as_str().unwrap();
    let r = get(&s.http, &s.url(&format!("epcis/events/{}", urlencode(eid))), &sys).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = get(&s.http, &s.url(&format!("epcis/epcs/{}/events", urlencode(&sgtin_link(drug, "1001")))), &sys).await;
    // The events naming 1001 itself: commissioning, packing and dispensing (the rest name its case or pallet).
    assert_eq!(
        r.json()["epcisBody"]["queryResults"]["resultsBody"]["eventList"].as_array().map(Vec::len),
        Some(3),
        "{}",
        r.text
    );
    let r = get(&s.http, &s.url("epcis/events?EQ_quantity=3"), &sys).await;
    assert_eq!(r.status, 400, "{}", r.text);
    // The FHIR side is searchable with the ordinary search.
    let deliveries = smart::search_all(&s.http, &s.base, &sys, "SupplyDelivery?status=completed").await;
    assert!(deliveries.len() >= 3, "receivings as completed deliveries: {}", deliveries.len());
    let provs =
        smart::search_all(&s.http, &s.base, &sys, "Provenance?biz-step=dispensing&agent=Organization/st-mary-pharmacy")
            .await;
    assert_eq!(provs.len(), 1);
}

fn std_b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

fn urlencode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Every step's inclusion proof leads to the root of the tree head the trace carries.
fn check_proofs(t: &Value) {
    let head = params(t, "treeHead")[0]["part"].as_array().unwrap().clone();
    let head = fhir_ledger::treehead::TreeHead::from_parts(&head).unwrap();
    for st in params(t, "step") {
        let proof = part(st, "proof").unwrap();
        let leaf: u64 = part(proof, "leafIndex").unwrap()["valueString"].as_str().unwrap().parse().unwrap();
        let data = std_b64(part(proof, "leafData").unwrap()["valueBase64Binary"].as_str().unwrap());
        let path: Vec<[u8; 32]> = proof["part"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "auditPath")
            .map(|p| std_b64(p["valueBase64Binary"].as_str().unwrap()).try_into().unwrap())
            .collect();
        let leaf_hash = consensus::merkle::leaf_hash(&data);
        assert!(consensus::proof::verify_inclusion(leaf, head.size, &leaf_hash, &path, &head.root), "step {leaf}");
    }
}
