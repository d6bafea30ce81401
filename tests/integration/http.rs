//! In-process HTTP tests (actix test service over a real ledger on disk): every FHIR
//! interaction, its headers, and the errors bad input must get.

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use serde_json::{json, Value};

use crate::support;

struct Resp {
    status: StatusCode,
    headers: actix_web::http::header::HeaderMap,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
    fn header(&self, name: &str) -> String {
        self.headers.get(name).map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
    }
    /// Asserts a 4xx OperationOutcome and returns its first issue.
    fn outcome(&self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        let v = self.json();
        assert_eq!(v["resourceType"], "OperationOutcome", "{}", self.text);
        v["issue"][0].clone()
    }
}

macro_rules! call {
    ($app:expr, $req:expr) => {{
        let resp = test::call_service(&$app, $req.to_request()).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = test::read_body(resp).await;
        Resp { status, headers, text: String::from_utf8_lossy(&body).into_owned() }
    }};
}

fn post(path: &str, body: &str) -> TestRequest {
    TestRequest::post().uri(path).insert_header(("content-type", "application/fhir+json")).set_payload(body.to_string())
}
fn put(path: &str, body: &str) -> TestRequest {
    TestRequest::put().uri(path).insert_header(("content-type", "application/fhir+json")).set_payload(body.to_string())
}

const PATIENT: &str = r#"{"resourceType":"Patient","identifier":[{"system":"urn:mrn","value":"42"}],"name":[{"family":"Chalmers","given":["Peter"]}],"gender":"male","birthDate":"1974-12-25"}"#;

#[actix_web::test]
async fn crud_lifecycle_with_versions_headers_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;

    let created = call!(app, post("/Patient", PATIENT));
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let loc = created.header("location");
    assert!(loc.contains("/Patient/") && loc.ends_with("/_history/1"), "{loc}");
    assert_eq!(created.header("etag"), "W/\"1\"");
    assert!(!created.header("last-modified").is_empty());
    assert!(!created.header("x-ledger-leaf").is_empty());
    let body = created.json();
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(body["meta"]["versionId"], "1");
    assert_eq!(body["name"][0]["family"], "Chalmers");

    let read = call!(app, TestRequest::get().uri(&format!("/Patient/{id}")));
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.header("content-type"), "application/fhir+json; charset=utf-8");
    assert_eq!(read.json(), body);

    // Conditional read.
    let same =
        call!(app, TestRequest::get().uri(&format!("/Patient/{id}")).insert_header(("if-none-match", "W/\"1\"")));
    assert_eq!(same.status, StatusCode::NOT_MODIFIED);
    assert_eq!(same.header("etag"), "W/\"1\"");
    let other =
        call!(app, TestRequest::get().uri(&format!("/Patient/{id}")).insert_header(("if-none-match", "W/\"7\"")));
    assert_eq!(other.status, StatusCode::OK);
    let lm = created.header("last-modified");
    let since =
        call!(app, TestRequest::get().uri(&format!("/Patient/{id}")).insert_header(("if-modified-since", lm.as_str())));
    assert_eq!(since.status, StatusCode::NOT_MODIFIED);
    let old = call!(
        app,
        TestRequest::get()
            .uri(&format!("/Patient/{id}"))
            .insert_header(("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT"))
    );
    assert_eq!(old.status, StatusCode::OK);

    let mut updated = body.clone();
    updated["gender"] = json!("female");
    let up = call!(app, put(&format!("/Patient/{id}"), &updated.to_string()).insert_header(("if-match", "W/\"1\"")));
    assert_eq!(up.status, StatusCode::OK, "{}", up.text);
    assert_eq!(up.header("etag"), "W/\"2\"");
    let stale = call!(app, put(&format!("/Patient/{id}"), &updated.to_string()).insert_header(("if-match", "W/\"1\"")));
    stale.outcome(412);

    let v1 = call!(app, TestRequest::get().uri(&format!("/Patient/{id}/_history/1")));
    assert_eq!(v1.json()["gender"], "male");
    let minimal =
        call!(app, put(&format!("/Patient/{id}"), &updated.to_string()).insert_header(("prefer", "return=minimal")));
    assert_eq!(minimal.status, StatusCode::OK);
    assert!(minimal.text.is_empty());

    let del = call!(app, TestRequest::delete().uri(&format!("/Patient/{id}")));
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    let gone = call!(app, TestRequest::get().uri(&format!("/Patient/{id}")));
    gone.outcome(410);
    let hist = call!(app, TestRequest::get().uri(&format!("/Patient/{id}/_history")));
    let h = hist.json();
    assert_eq!(h["type"], "history");
    assert_eq!(h["total"], 4);
    assert_eq!(h["entry"][0]["request"]["method"], "DELETE");
    assert_eq!(h["entry"][3]["resource"]["meta"]["versionId"], "1");
    let type_hist = call!(app, TestRequest::get().uri("/Patient/_history?_count=2"));
    let th = type_hist.json();
    assert_eq!(th["entry"].as_array().unwrap().len(), 2);
    let next = th["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let path = next.split_once("://").unwrap().1.split_once('/').unwrap().1;
    let page2 = call!(app, TestRequest::get().uri(&format!("/{path}")));
    assert_eq!(page2.json()["entry"].as_array().unwrap().len(), 2);
    let sys = call!(app, TestRequest::get().uri("/_history"));
    assert_eq!(sys.json()["entry"].as_array().unwrap().len(), 4);

    // Update-as-create with a client-assigned id.
    let mut client = serde_json::from_str::<Value>(PATIENT).unwrap();
    client["id"] = json!("client-1");
    let uc = call!(app, put("/Patient/client-1", &client.to_string()));
    assert_eq!(uc.status, StatusCode::CREATED, "{}", uc.text);
}

#[actix_web::test]
async fn decimals_and_timestamps_round_trip_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let obs = r#"{"resourceType":"Observation","status":"final","code":{"text":"height"},"effectiveDateTime":"2020-01-01T10:00:00+00:00","valueQuantity":{"value":170.10,"unit":"cm","system":"http://unitsofmeasure.org","code":"cm"},"component":[{"code":{"text":"x"},"valueQuantity":{"value":1.0e2}}]}"#;
    let created = call!(app, post("/Observation", obs));
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let read = call!(app, TestRequest::get().uri(&format!("/Observation/{id}")));
    assert!(read.text.contains(r#""value":170.10"#), "{}", read.text);
    assert!(read.text.contains("2020-01-01T10:00:00+00:00"), "{}", read.text);
    assert!(read.text.contains(r#""value":1.0e2"#), "{}", read.text);
    // Nothing but id and meta differs from what was sent.
    let mut back = read.json();
    back.as_object_mut().unwrap().remove("id");
    back.as_object_mut().unwrap().remove("meta");
    assert_eq!(back, serde_json::from_str::<Value>(obs).unwrap());
}

#[actix_web::test]
async fn conditional_create_update_delete_and_patch() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let first = call!(app, post("/Patient", PATIENT).insert_header(("if-none-exist", "identifier=urn:mrn|42")));
    assert_eq!(first.status, StatusCode::CREATED);
    let again = call!(app, post("/Patient", PATIENT).insert_header(("if-none-exist", "identifier=urn:mrn|42")));
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(first.json()["id"], again.json()["id"]);
    let id = first.json()["id"].as_str().unwrap().to_string();
    let by_id = call!(app, post("/Patient", PATIENT).insert_header(("if-none-exist", format!("_id={id}"))));
    assert_eq!(by_id.status, StatusCode::OK, "{}", by_id.text);
    assert_eq!(by_id.json()["id"], id.as_str());

    // References are conditional criteria too: a second Observation of this subject finds the first.
    let obs = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},
        "subject":{"reference":format!("Patient/{id}")}})
    .to_string();
    let criteria = format!("subject=Patient/{id}");
    let o1 = call!(app, post("/Observation", &obs).insert_header(("if-none-exist", criteria.as_str())));
    assert_eq!(o1.status, StatusCode::CREATED, "{}", o1.text);
    let o2 = call!(app, post("/Observation", &obs).insert_header(("if-none-exist", criteria.as_str())));
    assert_eq!((o2.status, o2.json()["id"].clone()), (StatusCode::OK, o1.json()["id"].clone()), "{}", o2.text);
    // `patient` is `subject` restricted to Patients: its criteria find the same Observation
    // (the state keeps `subject`'s term for both), by reference or bare id; a non-Patient
    // reference of the same id matches nothing.
    for criteria in [format!("patient=Patient/{id}"), format!("patient={id}"), format!("patient:Patient={id}")] {
        let o = call!(app, post("/Observation", &obs).insert_header(("if-none-exist", criteria.as_str())));
        assert_eq!((o.status, o.json()["id"].clone()), (StatusCode::OK, o1.json()["id"].clone()), "{criteria}");
    }
    let grp = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},
        "subject":{"reference":format!("Group/{id}")}})
    .to_string();
    let criteria = format!("patient=Group/{id}");
    let g1 = call!(app, post("/Observation", &grp).insert_header(("if-none-exist", criteria.as_str())));
    assert_eq!(g1.status, StatusCode::CREATED, "{}", g1.text);
    let g2 = call!(app, post("/Observation", &grp).insert_header(("if-none-exist", criteria.as_str())));
    assert_eq!(g2.status, StatusCode::CREATED, "patient=Group/.. names no Observation: {}", g2.text);
    let criteria = format!("subject=Group/{id}");
    let g3 = call!(app, post("/Observation", &grp).insert_header(("if-none-exist", criteria.as_str())));
    assert_eq!(g3.status, StatusCode::PRECONDITION_FAILED, "two match subject=Group/..: {}", g3.text);
    // Criteria `apply` cannot re-check are refused, naming the parameter and what is accepted,
    // and nothing is written.
    let count = |text: String| serde_json::from_str::<Value>(&text).unwrap()["total"].clone();
    let before = count(call!(app, TestRequest::get().uri("/Patient?_summary=count")).text);
    let refused = call!(app, post("/Patient", PATIENT).insert_header(("if-none-exist", "gender=male")));
    let issue = refused.outcome(400).to_string();
    assert!(issue.contains("gender") && issue.contains("_id, identifier, patient, subject"), "{issue}");
    let refused = call!(app, put("/Observation?code=x", &obs));
    assert!(refused.outcome(400).to_string().contains("code"), "{}", refused.text);
    assert_eq!(count(call!(app, TestRequest::get().uri("/Patient?_summary=count")).text), before);

    let mut changed: Value = serde_json::from_str(PATIENT).unwrap();
    changed["birthDate"] = json!("1974-12-24");
    let cu = call!(app, put("/Patient?identifier=urn:mrn|42", &changed.to_string()));
    assert_eq!(cu.status, StatusCode::OK, "{}", cu.text);
    assert_eq!(cu.json()["id"], id.as_str());
    let mut other = changed.clone();
    other["identifier"][0]["value"] = json!("43");
    let cu_new = call!(app, put("/Patient?identifier=urn:mrn|43", &other.to_string()));
    assert_eq!(cu_new.status, StatusCode::CREATED, "{}", cu_new.text);

    let patch = r#"[{"op":"replace","path":"/gender","value":"other"},{"op":"add","path":"/active","value":true}]"#;
    let p = call!(
        app,
        TestRequest::patch()
            .uri(&format!("/Patient/{id}"))
            .insert_header(("content-type", "application/json-patch+json"))
            .set_payload(patch)
    );
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    assert_eq!(p.json()["gender"], "other");
    assert_eq!(p.json()["meta"]["versionId"], "3");
    let bad_patch = call!(
        app,
        TestRequest::patch()
            .uri(&format!("/Patient/{id}"))
            .insert_header(("content-type", "application/json-patch+json"))
            .set_payload(r#"[{"op":"replace","path":"/gender","value":"robot"}]"#)
    );
    bad_patch.outcome(422);

    let cd = call!(app, TestRequest::delete().uri("/Patient?identifier=urn:mrn|42"));
    assert_eq!(cd.status, StatusCode::NO_CONTENT);
    call!(app, TestRequest::get().uri(&format!("/Patient/{id}"))).outcome(410);
}

#[actix_web::test]
async fn transactions_are_all_or_nothing_and_rewrite_references() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let tx = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":"urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a","resource":{"resourceType":"Patient","identifier":[{"system":"urn:t","value":"1"}]},"request":{"method":"POST","url":"Patient"}},
        {"fullUrl":"urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059","resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"}},"request":{"method":"POST","url":"Observation"}}
    ]});
    let r = call!(app, post("/", &tx.to_string()));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let b = r.json();
    assert_eq!(b["type"], "transaction-response");
    let ploc = b["entry"][0]["response"]["location"].as_str().unwrap().to_string();
    assert_eq!(b["entry"][0]["response"]["status"], "201 Created");
    let pid = ploc.split('/').nth(1).unwrap().to_string();
    // Each entry names its version's Merkle leaf, as X-Ledger-Leaf does for a single write.
    let leaf = |i: usize| {
        let ext = &b["entry"][i]["response"]["extension"][0];
        assert_eq!(ext["url"], fhir_ledger::api::bundle::LEAF_EXTENSION);
        ext["valueString"].as_str().unwrap().parse::<u64>().unwrap()
    };
    assert_eq!((leaf(0), leaf(1)), (0, 1));
    let proof = call!(app, TestRequest::get().uri("/ledger/proof?leaf=1"));
    assert!(proof.text.contains(r#""valueString":"1""#), "{}", proof.text);
    let oloc = b["entry"][1]["response"]["location"].as_str().unwrap().to_string();
    let obs = call!(app, TestRequest::get().uri(&format!("/{}", oloc.split("/_history").next().unwrap())));
    assert_eq!(obs.json()["subject"]["reference"], format!("Patient/{pid}"));
    let by_patient = call!(app, TestRequest::get().uri(&format!("/Observation?patient={pid}")));
    assert_eq!(by_patient.json()["total"], 1);

    // The second entry is invalid: nothing of the transaction may remain.
    let bad = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"resource":{"resourceType":"Patient","identifier":[{"system":"urn:t","value":"2"}]},"request":{"method":"POST","url":"Patient"}},
        {"resource":{"resourceType":"Patient","gender":"robot"},"request":{"method":"POST","url":"Patient"}}
    ]});
    let r = call!(app, post("/", &bad.to_string()));
    let issue = r.outcome(400);
    assert!(issue["expression"][0].as_str().unwrap().starts_with("Bundle.entry[1].resource.gender"), "{issue}");
    let count = call!(app, TestRequest::get().uri("/Patient?identifier=urn:t|2&_summary=count"));
    assert_eq!(count.json()["total"], 0);

    // A batch: entries succeed or fail on their own.
    let batch = json!({"resourceType":"Bundle","type":"batch","entry":[
        {"resource":{"resourceType":"Patient","identifier":[{"system":"urn:t","value":"3"}]},"request":{"method":"POST","url":"Patient"}},
        {"resource":{"resourceType":"Patient","gender":"robot"},"request":{"method":"POST","url":"Patient"}},
        {"request":{"method":"GET","url":format!("Patient/{pid}")}}
    ]});
    let r = call!(app, post("/", &batch.to_string()));
    let b = r.json();
    assert_eq!(b["type"], "batch-response");
    assert_eq!(b["entry"][0]["response"]["status"], "201 Created");
    assert_eq!(b["entry"][1]["response"]["status"], "400");
    assert_eq!(b["entry"][2]["resource"]["id"], pid.as_str());
}

/// A transaction large enough to be rewritten and planned on every core (64 entries or more)
/// answers as one planned entry by entry: every reference resolves to its entry's new id, the
/// versions' leaves follow the Bundle's order, and the first entry refused (here, one into an
/// erased compartment, past the middle) is the one named, with nothing written.
#[actix_web::test]
async fn a_large_transaction_resolves_and_refuses_as_entry_by_entry() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let patient = |i: usize| json!({"fullUrl":format!("urn:uuid:00000000-0000-4000-8000-{i:012}"),"resource":{"resourceType":"Patient","identifier":[{"system":"urn:large","value":format!("p{i}")}]},"request":{"method":"POST","url":"Patient"}});
    let obs = |i: usize, subject: String| json!({"resource":{"resourceType":"Observation","status":"final","code":{"text":format!("o{i}")},"identifier":[{"system":"urn:large","value":format!("o{i}")}],"subject":{"reference":subject}},"request":{"method":"POST","url":"Observation"}});
    let entries: Vec<Value> = (0..60)
        .map(patient)
        .chain((0..60).map(|i| obs(i, format!("urn:uuid:00000000-0000-4000-8000-{:012}", 59 - i))))
        .collect();
    let r = call!(app, post("/", &json!({"resourceType":"Bundle","type":"transaction","entry":entries}).to_string()));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let b = r.json();
    let id_at =
        |i: usize| b["entry"][i]["response"]["location"].as_str().unwrap().split('/').nth(1).unwrap().to_string();
    let leaves: Vec<u64> = (0..120)
        .map(|i| b["entry"][i]["response"]["extension"][0]["valueString"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(leaves, (0..120).collect::<Vec<u64>>(), "leaves in the Bundle's order");
    for i in [0, 31, 59] {
        let o = call!(app, TestRequest::get().uri(&format!("/Observation/{}", id_at(60 + i)))).json();
        assert_eq!(o["subject"]["reference"], format!("Patient/{}", id_at(59 - i)), "observation {i}");
        assert_eq!(o["code"]["text"], format!("o{i}"));
        let found = call!(app, TestRequest::get().uri(&format!("/Observation?patient={}", id_at(59 - i)))).json();
        assert_eq!(found["total"], 1, "observation {i} by its patient");
    }

    let erased = id_at(7);
    assert_eq!(call!(app, TestRequest::post().uri(&format!("/Patient/{erased}/$erase"))).status, StatusCode::OK);
    let mut entries: Vec<Value> = (100..170).map(|i| obs(i, format!("Patient/{}", id_at(0)))).collect();
    entries[50] = obs(150, format!("Patient/{erased}"));
    entries[60] = obs(160, format!("Patient/{erased}"));
    let r = call!(app, post("/", &json!({"resourceType":"Bundle","type":"transaction","entry":entries}).to_string()));
    let issue = r.outcome(410);
    assert_eq!(issue["expression"][0], "Bundle.entry[50]", "{issue}");
    let count = call!(app, TestRequest::get().uri("/Observation?identifier=urn:large|o100&_summary=count"));
    assert_eq!(count.json()["total"], 0, "nothing of the refused transaction is written");
}

/// FHIR's rules for references in a Bundle (R4 bundle.html#references): a relative reference
/// in a resource whose `fullUrl` is RESTful is read against that server's base, finds the
/// entry sent under that absolute `fullUrl`, and when no entry matches still names the other
/// server's resource (stored absolute), unless that server is this one.
#[actix_web::test]
async fn relative_references_resolve_against_a_restful_full_url() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let org = call!(app, post("/Organization", r#"{"resourceType":"Organization","name":"here"}"#)).json();
    let org_id = org["id"].as_str().unwrap().to_string();
    let probe = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"resource":{"resourceType":"Basic","code":{"text":"probe"}},"request":{"method":"POST","url":"Basic"}}]});
    let probe = call!(app, post("/", &probe.to_string())).json();
    let full = probe["entry"][0]["fullUrl"].as_str().unwrap().to_string();
    let own_base = &full[..full.find("/Basic/").unwrap()];

    let old = "https://old.example/fhir";
    let tx = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":format!("{old}/Patient/p1"),"resource":{"resourceType":"Patient","id":"p1","meta":{"versionId":"7"},
            "managingOrganization":{"reference":"Organization/elsewhere"}},"request":{"method":"POST","url":"Patient"}},
        {"fullUrl":format!("{old}/Observation/o1"),"resource":{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},
            "subject":{"reference":"Patient/p1"},"performer":[{"reference":"Practitioner/dr1"},{"reference":format!("{old}/Patient/p1")}],
            "hasMember":[{"reference":"#contained"},{"reference":"urn:uuid:8d4a3a3e-5d7e-4c27-9a0e-6ad3d0c1b1a2"}]},
            "request":{"method":"POST","url":"Observation"}},
        {"fullUrl":format!("{own_base}/Observation/o2"),"resource":{"resourceType":"Observation","status":"final","code":{"text":"y"},
            "subject":{"reference":"Patient/p1"},"performer":[{"reference":format!("Organization/{org_id}")}]},
            "request":{"method":"POST","url":"Observation"}}
    ]});
    let r = call!(app, post("/", &tx.to_string()));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let b = r.json();
    let read = |i: usize| {
        let loc = b["entry"][i]["response"]["location"].as_str().unwrap().to_string();
        TestRequest::get().uri(&format!("/{}", loc.split("/_history").next().unwrap()))
    };
    let patient = call!(app, read(0)).json();
    let pid = patient["id"].as_str().unwrap().to_string();
    assert_ne!(pid, "p1", "a POST gets an id of this server");
    assert_eq!(patient["meta"]["versionId"], "1");
    assert_eq!(patient["managingOrganization"]["reference"], format!("{old}/Organization/elsewhere"));
    let o1 = call!(app, read(1)).json();
    assert_eq!(o1["subject"]["reference"], format!("Patient/{pid}"), "found by the old server's base");
    assert_eq!(o1["performer"][0]["reference"], format!("{old}/Practitioner/dr1"), "still the old server's");
    assert_eq!(o1["performer"][1]["reference"], format!("Patient/{pid}"), "an absolute fullUrl");
    assert_eq!(o1["hasMember"][0]["reference"], "#contained");
    assert_eq!(o1["hasMember"][1]["reference"], "urn:uuid:8d4a3a3e-5d7e-4c27-9a0e-6ad3d0c1b1a2");
    let o2 = call!(app, read(2)).json();
    assert_eq!(o2["subject"]["reference"], "Patient/p1", "this server's base: a reference of its own");
    assert_eq!(o2["performer"][0]["reference"], format!("Organization/{org_id}"));
    let by_patient = call!(app, TestRequest::get().uri(&format!("/Observation?subject=Patient/{pid}")));
    assert_eq!(by_patient.json()["total"], 1);
}

#[actix_web::test]
async fn search_filters_pages_and_refuses_unknown_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let p = call!(app, post("/Patient", PATIENT)).json();
    let pid = p["id"].as_str().unwrap().to_string();
    for i in 0..5 {
        let o = json!({"resourceType":"Observation","status":"final","code":{"text":"x"},"identifier":[{"system":"urn:o","value":i.to_string()}],"subject":{"reference":format!("Patient/{pid}")}});
        assert_eq!(call!(app, post("/Observation", &o.to_string())).status, StatusCode::CREATED);
    }
    let q = |uri: String| TestRequest::get().uri(&uri);
    assert_eq!(call!(app, q(format!("/Observation?subject=Patient/{pid}"))).json()["total"], 5);
    assert_eq!(call!(app, q(format!("/Observation?subject:Patient={pid}"))).json()["total"], 5);
    assert_eq!(
        call!(app, q(format!("/Observation?subject={pid}"))).json()["total"],
        5,
        "an id alone means any target type"
    );
    assert_eq!(call!(app, q(format!("/Observation?subject=Group/{pid}"))).json()["total"], 0);
    assert_eq!(call!(app, q(format!("/Observation?_id=nope,{}&patient={pid}", "x"))).json()["total"], 0);
    assert_eq!(call!(app, q(format!("/Observation?patient={pid}&identifier=urn:o|1,urn:o|2"))).json()["total"], 2);
    assert_eq!(call!(app, q("/Observation?identifier=3".into())).json()["total"], 1);
    assert_eq!(call!(app, q("/Observation?identifier=urn:o|".into())).json()["total"], 5);
    assert_eq!(call!(app, q(format!("/Patient?_id={pid}"))).json()["total"], 1);
    assert_eq!(call!(app, q("/Observation?_lastUpdated=gt2020-01-01".into())).json()["total"], 5);
    assert_eq!(call!(app, q("/Observation?_lastUpdated=lt2020-01-01".into())).json()["total"], 0);
    let counted = call!(app, q("/Observation?_summary=count".into())).json();
    assert_eq!(counted["total"], 5);
    assert!(counted.get("entry").is_none());

    let mut seen = Vec::new();
    let mut uri = "/Observation?_count=2".to_string();
    loop {
        let page = call!(app, q(uri.clone())).json();
        for e in page["entry"].as_array().into_iter().flatten() {
            seen.push(e["resource"]["id"].as_str().unwrap().to_string());
        }
        match page["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next") {
            Some(l) => {
                uri =
                    format!("/{}", l["url"].as_str().unwrap().split_once("://").unwrap().1.split_once('/').unwrap().1);
            }
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 5, "paging returns every match once: {seen:?}");

    let issue = call!(app, q("/Observation?robot=1234".into())).outcome(400);
    assert!(issue["diagnostics"].as_str().unwrap().contains("robot"), "{issue}");
    assert_eq!(issue["expression"][0], "robot");
    call!(app, q("/Observation?_lastUpdated=2020-13-45".into())).outcome(400);
    call!(app, q("/Observation?_lastUpdated=xx2020".into())).outcome(400);
    let lenient = call!(app, q("/Observation?robot=1234".into()).insert_header(("prefer", "handling=lenient"))).json();
    assert_eq!(lenient["total"], 5);
    let last = lenient["entry"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["search"]["mode"], "outcome");
}

#[actix_web::test]
async fn bad_input_gets_an_operation_outcome_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let cases: Vec<(&str, TestRequest, u16, &str)> = vec![
        ("malformed JSON", post("/Patient", "{\"resourceType\":"), 400, ""),
        ("wrong type for URL", post("/Patient", r#"{"resourceType":"Observation"}"#), 400, "resourceType"),
        ("unknown element", post("/Patient", r#"{"resourceType":"Patient","robot":true}"#), 400, "Patient.robot"),
        ("invalid code", post("/Patient", r#"{"resourceType":"Patient","gender":"robot"}"#), 400, "Patient.gender"),
        (
            "bad date",
            post("/Patient", r#"{"resourceType":"Patient","birthDate":"1974-13-45"}"#),
            400,
            "Patient.birthDate",
        ),
        ("wrong JSON type", post("/Patient", r#"{"resourceType":"Patient","active":"yes"}"#), 400, "Patient.active"),
        ("id mismatch", put("/Patient/a", r#"{"resourceType":"Patient","id":"b"}"#), 400, "Patient.id"),
        ("bad id", put("/Patient/a_b", r#"{"resourceType":"Patient","id":"a_b"}"#), 400, ""),
        ("not an object", post("/Patient", "[1,2]"), 400, ""),
        ("unknown type", post("/Robot", r#"{"resourceType":"Robot"}"#), 404, ""),
        ("XML body", post("/Patient", "<Patient/>").insert_header(("content-type", "application/fhir+xml")), 415, ""),
        ("XML wanted", TestRequest::get().uri("/metadata").insert_header(("accept", "application/fhir+xml")), 406, ""),
        ("XML _format", TestRequest::get().uri("/metadata?_format=xml"), 406, ""),
    ];
    for (what, req, status, expr) in cases {
        let r = call!(app, req);
        let issue = r.outcome(status);
        if !expr.is_empty() {
            let e = issue["expression"][0].as_str().unwrap_or_default();
            assert!(e.starts_with(expr), "{what}: expression {e:?} in {}", r.text);
        }
    }
    let invalid_utf8 = call!(
        app,
        TestRequest::post()
            .uri("/Patient")
            .insert_header(("content-type", "application/fhir+json"))
            .set_payload(b"{\"resourceType\":\"Patient\",\"id\":\"\xff\"}".to_vec())
    );
    assert!(invalid_utf8.outcome(400)["diagnostics"].as_str().unwrap().contains("UTF-8"), "{}", invalid_utf8.text);
    let deep = format!("{{\"resourceType\":\"Patient\",\"x\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    call!(app, post("/Patient", &deep)).outcome(400);
    let big = format!("{{\"resourceType\":\"Patient\",\"text\":{{\"div\":\"{}\"}}}}", "a".repeat(2 * 1024 * 1024));
    call!(app, post("/Patient", &big)).outcome(413);
    assert_eq!(call!(app, TestRequest::get().uri("/Patient?_summary=count")).json()["total"], 0, "nothing was written");
    assert_eq!(call!(app, TestRequest::get().uri("/_history")).json().get("entry"), None);
}

#[actix_web::test]
async fn capability_statement_lists_what_works() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let r = call!(app, TestRequest::get().uri("/metadata?_pretty=true"));
    assert!(r.text.contains("\n  \"resourceType\""), "pretty printed");
    let cs = r.json();
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    assert!(resources.len() >= 145, "every R4 resource type: {}", resources.len());
    let obs = resources.iter().find(|r| r["type"] == "Observation").unwrap();
    let params: Vec<&str> =
        obs["searchParam"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert!(params.contains(&"patient") && params.contains(&"subject") && params.contains(&"identifier"), "{params:?}");
    assert!(params.contains(&"code") && params.contains(&"value-quantity"), "{params:?}");
    assert!(!params.contains(&"robot"), "only real parameters are claimed");
    let ops = |r: &Value| -> Vec<String> {
        r["operation"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(ops(obs), ["proof"]);
    assert_eq!(
        ops(resources.iter().find(|r| r["type"] == "Patient").unwrap()),
        ["proof", "access-report", "export", "member-match", "everything", "erase"]
    );
    assert_eq!(
        ops(resources.iter().find(|r| r["type"] == "Group").unwrap()),
        ["proof", "export", "bulk-member-match", "davinci-data-export"]
    );
    assert_eq!(
        ops(resources.iter().find(|r| r["type"] == "ResearchStudy").unwrap()),
        ["proof", "lock", "access-report", "verify-lock"]
    );
    for t in ["Device", "Medication"] {
        assert_eq!(ops(resources.iter().find(|r| r["type"] == t).unwrap()), ["proof", "trace"]);
    }
    // The system-level Bulk export, the supply chain's trace and verification, and import; the
    // IG's capability statement they instantiate.
    assert_eq!(ops(&cs["rest"][0]), ["export", "trace", "verify-product", "import"]);
    assert!(cs["rest"][0]["documentation"].as_str().unwrap().contains("POST /epcis/capture"));
    assert_eq!(cs["instantiates"][0], "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data");
    let json = call!(app, TestRequest::get().uri("/metadata").insert_header(("accept", "application/json")));
    assert_eq!(json.header("content-type"), "application/json; charset=utf-8");
}

/// `$erase` shreds one patient's compartment and nothing else; history and the search index
/// stay consistent, and every misuse is a 4xx OperationOutcome.
#[actix_web::test]
async fn erase_shreds_one_compartment_and_refuses_misuse() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let pid = call!(app, post("/Patient", PATIENT)).json()["id"].as_str().unwrap().to_string();
    let other = call!(app, post("/Patient", PATIENT)).json()["id"].as_str().unwrap().to_string();
    let obs = |p: &str| {
        format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},"subject":{{"reference":"Patient/{p}"}}}}"#
        )
    };
    let mine = call!(app, post("/Observation", &obs(&pid))).json()["id"].as_str().unwrap().to_string();
    call!(app, post("/Observation", &obs(&other)));

    let erased = call!(app, TestRequest::post().uri(&format!("/Patient/{pid}/$erase")));
    assert_eq!(erased.status, StatusCode::OK, "{}", erased.text);
    let names: Vec<String> = param(&erased.json(), "version")
        .iter()
        .map(|v| v["part"][0]["valueString"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, [format!("Observation/{mine}/_history/2"), format!("Patient/{pid}/_history/2")]);
    // The erased are gone from reads and searches; the other patient's data is not.
    call!(app, TestRequest::get().uri(&format!("/Observation/{mine}"))).outcome(410);
    let found = call!(app, TestRequest::get().uri(&format!("/Observation?subject=Patient/{pid}"))).json();
    assert_eq!(found["total"], 0);
    let found = call!(app, TestRequest::get().uri(&format!("/Observation?subject=Patient/{other}"))).json();
    assert_eq!(found["total"], 1);
    // History lists the erased versions without content, and still reads.
    let history = call!(app, TestRequest::get().uri("/_history"));
    assert_eq!(history.status, StatusCode::OK, "{}", history.text);
    assert!(!history.text.contains(&format!(r#""subject":{{"reference":"Patient/{pid}"}}"#)), "{}", history.text);
    // Erasing again is a no-op; misuse is refused.
    let again = call!(app, TestRequest::post().uri(&format!("/Patient/{pid}/$erase"))).json();
    assert_eq!(param(&again, "erased")[0]["valueString"], "0");
    call!(app, TestRequest::post().uri("/Patient/nobody/$erase")).outcome(404);
    call!(app, TestRequest::post().uri(&format!("/Observation/{mine}/$erase"))).outcome(400);
    call!(app, TestRequest::post().uri(&format!("/Patient/{other}/$shred"))).outcome(404);
    call!(app, TestRequest::post().uri("/Patient/bad%20id/$erase")).outcome(400);
    let kept = call!(app, TestRequest::get().uri(&format!("/Patient/{other}")));
    assert_eq!(kept.status, StatusCode::OK, "the other patient still reads: {}", kept.text);
}

#[actix_web::test]
async fn no_plaintext_phi_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let marker = "Zyxwvutsrqfamilyname";
    let p = json!({"resourceType":"Patient","name":[{"family":marker}],"identifier":[{"system":"urn:ssn","value":"999-88-7777"}]});
    assert_eq!(call!(app, post("/Patient", &p.to_string())).status, StatusCode::CREATED);
    // Make sure everything reached the files.
    drop(app);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let mut found = Vec::new();
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        for needle in [marker.as_bytes(), b"999-88-7777".as_slice()] {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(entry.display().to_string());
            }
        }
    }
    assert!(found.is_empty(), "plaintext PHI found in {found:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Parameters named `name` in a Parameters resource or in a `part` array.
fn param<'a>(params: &'a Value, name: &str) -> Vec<&'a Value> {
    let list = params.as_array().or_else(|| params["parameter"].as_array()).unwrap();
    list.iter().filter(|p| p["name"] == name).collect()
}

fn b64(v: &Value, kind: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(v[kind].as_str().unwrap()).unwrap()
}

fn hash(v: &Value) -> [u8; 32] {
    b64(v, "valueBase64Binary").try_into().unwrap()
}

#[actix_web::test]
async fn merkle_proofs_verify_against_the_signed_tree_head() {
    use consensus::proof::{verify_consistency, verify_inclusion};
    use ed25519_dalek::Verifier;

    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let created = call!(app, post("/Patient", PATIENT));
    let id = created.json()["id"].as_str().unwrap().to_string();
    for _ in 0..4 {
        call!(app, post("/Observation", r#"{"resourceType":"Observation","status":"final","code":{"text":"x"}}"#));
    }
    let mut body = created.json();
    body["gender"] = json!("female");
    let up = call!(app, put(&format!("/Patient/{id}"), &body.to_string()));
    let leaf: u64 = up.header("x-ledger-leaf").parse().unwrap();

    let p = call!(app, TestRequest::get().uri(&format!("/Patient/{id}/_history/2/$proof")));
    assert_eq!(p.status, StatusCode::OK, "{}", p.text);
    let p = p.json();
    assert_eq!(p["resourceType"], "Parameters");
    assert_eq!(param(&p, "leafIndex")[0]["valueString"], leaf.to_string());
    let head = &param(&p, "treeHead")[0]["part"];
    let size: u64 = param(head, "treeSize")[0]["valueString"].as_str().unwrap().parse().unwrap();
    assert_eq!(size, 6);
    let root = hash(param(head, "rootHash")[0]);
    let leaf_hash = consensus::merkle::leaf_hash(&b64(param(&p, "leafData")[0], "valueBase64Binary"));
    let path: Vec<[u8; 32]> = param(&p, "auditPath").into_iter().map(hash).collect();
    assert!(verify_inclusion(leaf, size, &leaf_hash, &path, &root));
    let mut forged = path.clone();
    forged[0][0] ^= 1;
    assert!(!verify_inclusion(leaf, size, &leaf_hash, &forged, &root));

    // The head is signed by the node key written to the data directory.
    let sig = &param(head, "signature")[0]["part"];
    let key_bytes: [u8; 32] =
        hex::decode(std::fs::read_to_string(dir.path().join("node.pub")).unwrap()).unwrap().try_into().unwrap();
    assert_eq!(b64(param(sig, "publicKey")[0], "valueBase64Binary"), key_bytes);
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key_bytes).unwrap();
    let ts = param(head, "timestamp")[0]["valueInstant"].as_str().unwrap();
    let ts_ms = fhir_ledger::fhir::date_range_ms(ts).unwrap().0;
    let msg = fhir_ledger::treehead::message(size, &root, ts_ms);
    let signature =
        ed25519_dalek::Signature::from_slice(&b64(param(sig, "signature")[0], "valueBase64Binary")).unwrap();
    assert!(key.verify(&msg, &signature).is_ok());

    let c = call!(app, TestRequest::get().uri("/ledger/consistency?first=2"));
    assert_eq!(c.status, StatusCode::OK, "{}", c.text);
    let c = c.json();
    let first_root = hash(param(&c, "firstRootHash")[0]);
    let second_root = hash(param(&c, "secondRootHash")[0]);
    assert_eq!(second_root, root);
    let cpath: Vec<[u8; 32]> = param(&c, "consistencyPath").into_iter().map(hash).collect();
    assert!(verify_consistency(2, size, &first_root, &second_root, &cpath));

    let by_leaf = call!(app, TestRequest::get().uri("/ledger/proof?leaf=0"));
    assert_eq!(by_leaf.status, StatusCode::OK);
    call!(app, TestRequest::get().uri("/ledger/proof?leaf=99")).outcome(404);
    call!(app, TestRequest::get().uri("/ledger/consistency?first=0")).outcome(400);
    call!(app, TestRequest::get().uri("/ledger/consistency?first=x")).outcome(400);
    call!(app, TestRequest::get().uri(&format!("/Patient/{id}/_history/9/$proof"))).outcome(404);
    let head = call!(app, TestRequest::get().uri("/ledger/head")).json();
    assert_eq!(param(&head, "treeSize")[0]["valueString"], "6");

    // The audit trail pages through leaf headers, and never carries resource content.
    let page = call!(app, TestRequest::get().uri("/ledger/entries?from=4&_count=1"));
    assert_eq!(page.header("content-type"), "application/json");
    assert!(!page.text.contains("Chalmers"), "no PHI in the audit trail: {}", page.text);
    let page = page.json();
    assert_eq!(page["entries"][0]["leaf"], 4);
    assert!(page["next"].as_str().unwrap().ends_with("/ledger/entries?from=5&_count=1"));
    let last = call!(app, TestRequest::get().uri("/ledger/entries?from=5")).json();
    assert_eq!(last["entries"][0]["resource"], format!("Patient/{id}/_history/2"));
    assert_eq!(last["entries"][0]["operation"], "update");
    assert!(last.get("next").is_none());
    let all = call!(app, TestRequest::get().uri("/ledger/entries")).json();
    let leaf_hashes: Vec<[u8; 32]> = all["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(e["leafHash"].as_str().unwrap())
                .unwrap()
                .try_into()
                .unwrap()
        })
        .collect();
    assert_eq!(consensus::merkle::root_of(&leaf_hashes), root, "the listed leaves make up the signed root");
}

/// The admin API: bearer token required (401 without, 403 wrong), JSON status, and each misuse
/// a 4xx OperationOutcome that says what is wrong.
#[actix_web::test]
async fn admin_api_needs_its_token_and_refuses_misuse() {
    let dir = tempfile::tempdir().unwrap();
    let admin = fhir_ledger::api::admin::AdminConfig::new("s3cret", false, "fp".into());
    let app = support::app_with_admin(support::repo(dir.path()).await, admin).await;
    let get = |path: &str| TestRequest::get().uri(path);
    let auth = ("authorization", "Bearer s3cret");

    let r = call!(app, get("/admin/cluster"));
    r.outcome(401);
    assert_eq!(r.header("www-authenticate"), "Bearer");
    call!(app, get("/admin/cluster").insert_header(("authorization", "Bearer nope"))).outcome(403);

    let r = call!(app, get("/admin/cluster").insert_header(auth));
    assert_eq!(r.status, 200, "{}", r.text);
    let s = r.json();
    assert_eq!((s["node_id"].as_u64(), s["state"].as_str(), s["leader"].as_u64()), (Some(1), Some("Leader"), Some(1)));
    assert_eq!(s["voters"], json!([1]));
    let node = call!(app, get("/admin/node").insert_header(auth)).json();
    assert_eq!((node["secrets_id"].as_str(), node["initialized"].as_bool()), (Some("fp"), Some(true)));

    let post_admin = |path: &str, body: &str| {
        TestRequest::post()
            .uri(path)
            .insert_header(auth)
            .insert_header(("content-type", "application/json"))
            .set_payload(body.to_string())
    };
    let issue = call!(app, post_admin("/admin/cluster/trust", "{")).outcome(400);
    assert!(issue["diagnostics"].as_str().unwrap().contains("request body"), "{issue}");
    let issue = call!(app, post_admin("/admin/cluster/trust", r#"{"node_id":2,"public_key":"zz"}"#)).outcome(400);
    assert!(issue["diagnostics"].as_str().unwrap().contains("64 hex digits"), "{issue}");
    let me = node["public_key"].as_str().unwrap();
    let members = json!({"members": {"1": {"api_addr": "x", "raft_addr": "127.0.0.1:1", "public_key": me}}});
    let issue = call!(app, post_admin("/admin/cluster/init", &members.to_string())).outcome(400);
    assert!(issue["diagnostics"].as_str().unwrap().contains("already belongs to a cluster"), "{issue}");
    let learner = json!({"node_id": 2, "api_addr": "x", "raft_addr": "", "public_key": me});
    let issue = call!(app, post_admin("/admin/cluster/learners", &learner.to_string())).outcome(400);
    assert!(issue["diagnostics"].as_str().unwrap().contains("raft address"), "{issue}");
    let del = TestRequest::delete().uri("/admin/cluster/nodes/abc").insert_header(auth);
    call!(app, del).outcome(400);
    let del = TestRequest::delete().uri("/admin/cluster/nodes/1").insert_header(auth);
    let issue = call!(app, del).outcome(400);
    assert!(issue["diagnostics"].as_str().unwrap().contains("last voter"), "{issue}");
    let faults = TestRequest::put().uri("/admin/faults").insert_header(auth).set_payload(r#"{"isolate":[2]}"#);
    let issue = call!(app, faults).outcome(403);
    assert!(issue["diagnostics"].as_str().unwrap().contains("fault injection is off"), "{issue}");
    call!(app, get("/admin/nothing").insert_header(auth)).outcome(404);
}

/// `Cache-Control: max-stale` with a value that is not seconds is a 400 naming it; on the
/// single node (its own leader) a bounded-staleness read falls back to a linearizable one and
/// so claims no staleness.
#[actix_web::test]
async fn max_stale_is_checked_and_a_leader_serves_current_reads() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    call!(app, put("/Patient/ms", r#"{"resourceType":"Patient","id":"ms"}"#));
    let get = || TestRequest::get().uri("/Patient/ms");
    let issue = call!(app, get().insert_header(("cache-control", "max-stale=soon"))).outcome(400);
    assert!(issue["diagnostics"].as_str().unwrap().contains("max-stale=soon"), "{issue}");
    let r = call!(app, get().insert_header(("cache-control", "no-cache, max-stale=5")));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-ledger-staleness-ms"), "", "a leader never serves a stale read");
    // Where the read was served: this node, its term, itself as the leader that confirmed the
    // read index, and an applied index at least that far.
    let node = r.header("x-ledger-node");
    assert!(!node.is_empty() && r.header("x-ledger-term").parse::<u64>().unwrap() >= 1, "{:?}", r.text);
    assert_eq!(r.header("x-ledger-read-leader"), node);
    let index: u64 = r.header("x-ledger-read-index").parse().unwrap();
    assert!(r.header("x-ledger-applied").parse::<u64>().unwrap() >= index);
}

/// Errors answer in the format the request negotiated, like any other answer (one place renders
/// them), and without negotiation in FHIR JSON; the admin API's errors are FHIR JSON too.
#[actix_web::test]
async fn errors_answer_in_the_negotiated_format() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let r = call!(
        app,
        TestRequest::get().uri("/Patient/nobody?_pretty=true").insert_header(("accept", "application/json"))
    );
    assert_eq!(r.status.as_u16(), 404);
    assert_eq!(r.header("content-type"), "application/json; charset=utf-8");
    assert!(r.text.contains("\n  \"resourceType\": \"OperationOutcome\""), "pretty printed: {}", r.text);
    let r = call!(app, TestRequest::get().uri("/Patient/nobody"));
    assert_eq!(r.header("content-type"), "application/fhir+json; charset=utf-8");
    assert!(r.text.starts_with("{\"resourceType\":\"OperationOutcome\""), "{}", r.text);
    let r = call!(app, TestRequest::get().uri("/admin/node"));
    assert_eq!(r.status.as_u16(), 401);
    assert_eq!(r.header("content-type"), "application/fhir+json; charset=utf-8");
}
