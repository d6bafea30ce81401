//! One door: every route of the FHIR API (read from the route table in `src/api/mod.rs`, so a
//! new route fails this test until it is listed here) is called without a token and with a
//! valid token whose scopes grant nothing on the data behind it. Only the public routes may
//! answer 2xx; every other answer is a 401, 403 or 404, or a search with nothing in it; and
//! afterwards the data is exactly as it was.

use reqwest::Method;
use serde_json::{json, Value};

use crate::smart::{self, fhir, get, put_resource, SmartServer, ADMIN_TOKEN};

/// Routes anyone may call (they name no patient).
const PUBLIC: &[&str] = &["/metadata", "/health", "/ledger/head", "/ledger/consistency"];

/// One call per route of the table: (route pattern, method, concrete path, body).
fn calls() -> Vec<(&'static str, Method, &'static str, Option<Value>)> {
    let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                     "subject": {"reference": "Patient/pat-b"}});
    let obs_b = json!({"resourceType": "Observation", "id": "obs-b", "status": "final", "code": {"text": "changed"},
                       "subject": {"reference": "Patient/pat-b"}});
    let bundle = |kind: &str| {
        json!({"resourceType": "Bundle", "type": kind, "entry": [
            {"request": {"method": "DELETE", "url": "Observation?_id=obs-b"}},
            {"request": {"method": "PUT", "url": "Observation/obs-b"}, "resource": obs_b.clone()},
            {"request": {"method": "GET", "url": "Observation/obs-b"}}
        ]})
    };
    let export_params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Observation"},
        {"name": "patient", "valueReference": {"reference": "Patient/pat-b"}}]});
    vec![
        ("/metadata", Method::GET, "/metadata", None),
        ("/health", Method::GET, "/health", None),
        ("/", Method::POST, "/", Some(bundle("transaction"))),
        ("/", Method::POST, "/", Some(bundle("batch"))),
        ("/", Method::GET, "/?_type=Observation,Patient", None),
        ("/_search", Method::POST, "/_search?_type=Observation", None),
        ("/_history", Method::GET, "/_history", None),
        ("/ledger/head", Method::GET, "/ledger/head", None),
        ("/ledger/proof", Method::GET, "/ledger/proof?leaf=1", None),
        ("/ledger/consistency", Method::GET, "/ledger/consistency?first=1", None),
        ("/ledger/entries", Method::GET, "/ledger/entries", None),
        (
            "/$import",
            Method::POST,
            "/$import",
            Some(json!({"resourceType": "Parameters", "parameter": [
            {"name": "manifestUrl", "valueUrl": "http://127.0.0.1:9/bulk/x"}]})),
        ),
        ("/$export", Method::GET, "/$export?_type=Observation,Patient", None),
        (
            "/$export",
            Method::POST,
            "/$export",
            Some(json!({"resourceType": "Parameters", "parameter": [
            {"name": "_type", "valueString": "Observation"}]})),
        ),
        ("/Patient/$export", Method::GET, "/Patient/$export?_type=Observation", None),
        ("/Patient/$export", Method::POST, "/Patient/$export", Some(export_params.clone())),
        (
            "/Patient/$member-match",
            Method::POST,
            "/Patient/$member-match",
            Some(json!({"resourceType": "Parameters", "parameter": [
            {"name": "MemberPatient", "resource": {"resourceType": "Patient", "name": [{"family": "Family-pat-b"}], "birthDate": "2000-01-01"}}]})),
        ),
        (
            "/Group/$bulk-member-match",
            Method::POST,
            "/Group/$bulk-member-match",
            Some(json!({"resourceType": "Parameters", "parameter": [{"name": "MemberBundle", "part": [
            {"name": "MemberPatient", "resource": {"resourceType": "Patient", "name": [{"family": "Family-pat-b"}]}}]}]})),
        ),
        ("/Group/{id}/$davinci-data-export", Method::GET, "/Group/grp-b/$davinci-data-export", None),
        ("/Group/{id}/$davinci-data-export", Method::POST, "/Group/grp-b/$davinci-data-export", None),
        ("/Group/{id}/$export", Method::GET, "/Group/grp-b/$export", None),
        ("/Group/{id}/$export", Method::POST, "/Group/grp-b/$export", Some(export_params)),
        ("/bulk/{job}", Method::GET, "/bulk/4f1c0d6e-0000-4000-8000-000000000000", None),
        ("/bulk/{job}", Method::DELETE, "/bulk/4f1c0d6e-0000-4000-8000-000000000000", None),
        ("/bulk/{job}/{file}", Method::GET, "/bulk/4f1c0d6e-0000-4000-8000-000000000000/Observation-1.ndjson", None),
        ("/{type}", Method::GET, "/Observation?subject=Patient/pat-b", None),
        ("/{type}", Method::POST, "/Observation", Some(obs.clone())),
        ("/{type}", Method::PUT, "/Observation?_id=obs-b", Some(obs.clone())),
        ("/{type}", Method::DELETE, "/Observation?patient=pat-b", None),
        ("/{type}/_search", Method::POST, "/Observation/_search", None),
        ("/{type}/_history", Method::GET, "/Observation/_history", None),
        ("/{type}/{id}", Method::GET, "/Observation/obs-b", None),
        ("/{type}/{id}", Method::PUT, "/Observation/obs-b", Some(obs_b.clone())),
        ("/{type}/{id}", Method::PATCH, "/Observation/obs-b", None),
        ("/{type}/{id}", Method::DELETE, "/Observation/obs-b", None),
        ("/{type}/{id}/{op}", Method::POST, "/Patient/pat-b/$erase", None),
        ("/{type}/{id}/_history", Method::GET, "/Observation/obs-b/_history", None),
        ("/{compartment}/{id}/{type}", Method::GET, "/Patient/pat-b/Observation", None),
        ("/{compartment}/{id}/{type}", Method::GET, "/Patient/pat-b/*", None),
        ("/{compartment}/{id}/{type}", Method::GET, "/Patient/pat-b/$access-report", None),
        ("/Patient/{id}/$everything", Method::GET, "/Patient/pat-b/$everything", None),
        ("/ResearchStudy/{id}/$lock", Method::POST, "/ResearchStudy/study-b/$lock", None),
        ("/ResearchStudy/{id}/$access-report", Method::GET, "/ResearchStudy/study-b/$access-report", None),
        ("/ResearchStudy/{id}/$verify-lock", Method::GET, "/ResearchStudy/study-b/$verify-lock", None),
        (
            "/ResearchStudy/{id}/$verify-lock",
            Method::POST,
            "/ResearchStudy/study-b/$verify-lock",
            Some(json!({"resourceType": "Parameters", "parameter": []})),
        ),
        (
            "/epcis/capture",
            Method::POST,
            "/epcis/capture",
            Some(json!({"@context": ["https://ref.gs1.org/standards/epcis/2.0.0/epcis-context.jsonld"],
                "type": "EPCISDocument", "schemaVersion": "2.0", "creationDate": "2026-10-01T00:00:00Z",
                "epcisBody": {"eventList": [{"type": "ObjectEvent", "eventTime": "2026-10-01T00:00:00Z",
                    "eventTimeZoneOffset": "+00:00", "action": "OBSERVE", "bizStep": "dispensing",
                    "epcList": ["urn:epc:id:sgtin:0312345.067890.1001"]}]}})),
        ),
        ("/epcis/capture/{id}", Method::GET, "/epcis/capture/4f1c0d6e-0000-4000-8000-000000000000", None),
        ("/epcis/events", Method::GET, "/epcis/events?EQ_bizStep=dispensing", None),
        ("/epcis/events/{tail:.+}", Method::GET, "/epcis/events/urn%3Auuid%3A1", None),
        ("/epcis/epcs/{tail:.+}", Method::GET, "/epcis/epcs/urn%3Aepc%3Aid%3Asgtin%3A0312345.067890.1001/events", None),
        ("/$verify-product", Method::GET, "/$verify-product?gtin=00312345678906&serial=1001", None),
        ("/$trace", Method::GET, "/$trace?gtin=00312345678906&lot=LOT-B", None),
        ("/01/{gtin}/21/{serial}", Method::GET, "/01/00312345678906/21/1001?linkType=verificationService", None),
        ("/{type:Device|Medication}/{id}/$trace", Method::GET, "/Device/dev-b/$trace", None),
        ("/{type}/{id}/_history/{vid}", Method::GET, "/Observation/obs-b/_history/1", None),
        ("/{type}/{id}/_history/{vid}/{op}", Method::GET, "/Observation/obs-b/_history/1/$proof", None),
    ]
}

/// Every `.route("pattern", web::method())` of the FHIR route table.
fn route_table() -> Vec<(String, String)> {
    let src = include_str!("../../src/api/mod.rs");
    let mut out = Vec::new();
    for line in src.lines().map(str::trim).filter(|l| l.starts_with(".route(\"")) {
        let pattern = line.trim_start_matches(".route(\"").split('"').next().unwrap_or_default().to_string();
        let method = line.split("web::").nth(1).and_then(|m| m.split('(').next()).unwrap_or_default();
        if pattern == "/{tail:.*}" {
            continue; // CORS preflight: answers headers only
        }
        out.push((pattern, method.to_ascii_uppercase()));
    }
    out
}

/// Whether a 2xx answer disclosed and did nothing: a search or history Bundle without
/// entries, or a batch response whose every entry was refused.
fn empty_bundle(body: &Value) -> bool {
    let entries = body["entry"].as_array();
    body["resourceType"] == "Bundle"
        && match body["type"].as_str() {
            Some("searchset" | "history") => {
                entries.is_none_or(|e| e.iter().all(|x| x["search"]["mode"] == "outcome"))
                    && body["total"].as_u64().unwrap_or(0) == 0
            }
            Some("batch-response") => entries.is_some_and(|e| {
                e.iter().all(|x| x["response"]["status"].as_str().is_some_and(|s| s.starts_with('4')))
            }),
            _ => false,
        }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_refuses_a_caller_without_the_needed_scope() {
    let table = route_table();
    assert!(table.len() >= 20, "the route table was not found: {table:?}");
    let listed: Vec<(String, String)> = calls().iter().map(|(p, m, _, _)| (p.to_string(), m.to_string())).collect();
    for route in &table {
        assert!(listed.contains(route), "route {route:?} is not exercised by this test: add it to calls()");
    }

    let s = SmartServer::start(&[]);
    let (http, base) = (&s.http, s.base.as_str());
    let sys = s.system_token("system/*.cruds").await;
    let obs_b = json!({"resourceType": "Observation", "id": "obs-b", "status": "final", "code": {"text": "original"},
                       "subject": {"reference": "Patient/pat-b"}});
    // pat-b is enrolled in study-b with a research Consent: what the study routes would reach.
    let study = json!({"resourceType": "ResearchStudy", "id": "study-b", "status": "active"});
    let consent = crate::research::research_consent("pat-b", "study-b", &["Observation"], ("2000-01-01", "2100-01-01"));
    let mut consent = consent;
    consent["id"] = json!("rc-b");
    let subject = crate::research::subject("rs-b", "study-b", "pat-b", "rc-b", "on-study");
    for r in [smart::patient("pat-a"), smart::patient("pat-b"), obs_b, study, consent, subject] {
        put_resource(http, base, &sys, &r).await;
    }
    // Valid tokens that grant nothing on Observation, Patient or AuditEvent data.
    let unrelated = s.system_token("system/Practitioner.rs").await;
    let client_id = s.admin.public_client("Door App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    let tok = smart::user_token(
        http,
        base,
        &client_id,
        &["launch/patient", "patient/Practitioner.rs"],
        &smart::Login::new("alice"),
    )
    .await;
    let alice = tok["access_token"].as_str().unwrap_or_default().to_string();

    for (token_name, token) in [
        ("no token", None),
        ("system/Practitioner.rs", Some(unrelated.as_str())),
        ("alice patient/Practitioner.rs", Some(alice.as_str())),
    ] {
        for (pattern, method, path, body) in calls() {
            let r = fhir(http, method.clone(), &format!("{base}{path}"), token, body.as_ref()).await;
            let what = format!("{token_name}: {method} {path} (route {pattern})");
            if PUBLIC.contains(&pattern) {
                assert!(r.status < 300, "{what}: a public route answers: {} {}", r.status, r.text);
                continue;
            }
            if token.is_none() {
                assert_eq!(r.status, 401, "{what}: {}", r.text);
                continue;
            }
            let refused = matches!(r.status, 403 | 404);
            let empty = r.status == 200 && empty_bundle(&r.json());
            assert!(refused || empty, "{what}: {} {}", r.status, r.text);
            assert!(!r.text.contains("original"), "{what}: leaked the resource: {}", r.text);
        }
    }

    // The operators' routes reach every patient's data at once (a backup is the whole ledger):
    // no SMART token opens them, a patient's least of all; the console shows its sign-in page.
    for (token_name, token) in [
        ("no token", None),
        ("system/Practitioner.rs", Some(unrelated.as_str())),
        ("alice patient/Practitioner.rs", Some(alice.as_str())),
    ] {
        for (method, path) in [
            (Method::POST, "/admin/backups"),
            (Method::GET, "/admin/backups"),
            (Method::GET, "/metrics"),
            (Method::POST, "/admin/reindex"),
            (Method::POST, "/admin/snapshot"),
            (Method::GET, "/admin/cluster"),
        ] {
            let r = fhir(http, method.clone(), &format!("{base}{path}"), token, None).await;
            assert!(matches!(r.status, 401 | 403), "{token_name}: {method} {path}: {} {}", r.status, r.text);
            assert!(!r.text.contains("FHLSNAP") && !r.text.contains("original"), "{token_name}: {path} leaked data");
        }
        let r = fhir(http, Method::GET, &format!("{base}/console"), token, None).await;
        assert!(r.status == 200 && r.text.contains("console-login"), "{token_name}: the sign-in page: {}", r.text);
        assert!(!r.text.contains("recent-leaves"), "{token_name}: the console opened");
    }

    // Nothing changed: pat-b's Observation is still version 1 with its original content.
    let r = get(http, &format!("{base}/Observation/obs-b"), &sys).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["meta"]["versionId"], "1", "{}", r.text);
    assert_eq!(r.json()["code"]["text"], "original", "{}", r.text);
    let r = get(http, &format!("{base}/Patient/pat-b"), &sys).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["meta"]["versionId"], "1", "{}", r.text);
    // The auditors' routes do answer the administrator.
    let r = get(http, &format!("{base}/ledger/entries"), ADMIN_TOKEN).await;
    assert_eq!(r.status, 200, "{}", r.text);
}
