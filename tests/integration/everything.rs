//! `GET /Patient/{id}/$everything` over HTTP: the patient first, its whole compartment paged
//! across types without repeats, what it references as includes, `_since` and `_type`, and a
//! patient token that can neither reach another patient nor see them as an include (nor
//! through the payer operations beside it).

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::smart::{self, fhir, get, put_resource, SmartServer};

/// Every entry of every page, and how many pages there were.
async fn walk(http: &reqwest::Client, url: &str, token: &str) -> (Vec<Value>, usize) {
    let (mut url, mut entries, mut pages) = (url.to_string(), Vec::new(), 0);
    loop {
        let r = get(http, &url, token).await;
        assert_eq!(r.status, 200, "GET {url}: {}", r.text);
        let b = r.json();
        pages += 1;
        let page = b["entry"].as_array().cloned().unwrap_or_default();
        let mut on_page = BTreeSet::new();
        for e in &page {
            let key = format!("{}/{}", e["resource"]["resourceType"], e["resource"]["id"]);
            assert!(on_page.insert(key.clone()), "{key} twice on one page (bdl-7): {url}");
        }
        entries.extend(page);
        let next = b["link"].as_array().and_then(|ls| ls.iter().find(|l| l["relation"] == "next").cloned());
        match next.and_then(|l| l["url"].as_str().map(str::to_string)) {
            Some(n) => url = n,
            None => return (entries, pages),
        }
        assert!(pages < 50, "paging does not end");
    }
}

fn keys(entries: &[Value], mode: &str) -> Vec<String> {
    entries
        .iter()
        .filter(|e| e["search"]["mode"] == mode)
        .map(|e| {
            format!("{}/{}", e["resource"]["resourceType"].as_str().unwrap(), e["resource"]["id"].as_str().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_pages_the_compartment_and_confines_patients() {
    let s = SmartServer::start(&[]);
    let (http, base) = (&s.http, s.base.as_str());
    let sys = s.system_token("system/*.cruds").await;
    put_resource(http, base, &sys, &json!({"resourceType": "Practitioner", "id": "dr-1"})).await;
    for r in [smart::patient("pat-a"), smart::patient("pat-b")] {
        put_resource(http, base, &sys, &r).await;
    }
    let mut expected = BTreeSet::from(["Patient/pat-a".to_string()]);
    for i in 0..12 {
        // Performed by a practitioner and, for one, by the other patient (a reference out of
        // the compartment that a patient token must not follow).
        let performer = if i == 0 { "Patient/pat-b" } else { "Practitioner/dr-1" };
        let id = format!("obs-a{i}");
        put_resource(
            http,
            base,
            &sys,
            &json!({"resourceType": "Observation", "id": id, "status": "final",
            "code": {"text": "hr"}, "subject": {"reference": "Patient/pat-a"},
            "performer": [{"reference": performer}]}),
        )
        .await;
        expected.insert(format!("Observation/{id}"));
    }
    for i in 0..3 {
        let id = format!("cond-a{i}");
        put_resource(
            http,
            base,
            &sys,
            // Each cites the first Observation, which the first page also has as a match.
            &json!({"resourceType": "Condition", "id": id,
            "subject": {"reference": "Patient/pat-a"},
            "evidence": [{"detail": [{"reference": "Observation/obs-a0"}]}]}),
        )
        .await;
        expected.insert(format!("Condition/{id}"));
    }
    // obs-b is written last, apart in time from pat-a's data: its time starts the `_since` check.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    put_resource(
        http,
        base,
        &sys,
        &json!({"resourceType": "Observation", "id": "obs-b", "status": "final",
        "code": {"text": "secret-of-b"}, "subject": {"reference": "Patient/pat-b"}}),
    )
    .await;

    // Pages of 5 across Patient, Condition and Observation: every match once, the patient first.
    let (entries, pages) = walk(http, &format!("{base}/Patient/pat-a/$everything?_count=5"), &sys).await;
    let matches = keys(&entries, "match");
    assert_eq!(matches.first().map(String::as_str), Some("Patient/pat-a"), "{matches:?}");
    assert_eq!(matches.len(), expected.len(), "a match repeated or missing: {matches:?}");
    assert_eq!(matches.iter().cloned().collect::<BTreeSet<_>>(), expected);
    assert!(pages >= 4, "{} matches in pages of 5 came in {pages} pages", matches.len());
    let included = keys(&entries, "include");
    assert!(included.contains(&"Practitioner/dr-1".to_string()), "{included:?}");
    assert!(included.contains(&"Patient/pat-b".to_string()), "a system token follows every reference: {included:?}");
    assert!(!entries.iter().any(|e| e["resource"]["id"] == "obs-b"), "another patient's data in pat-a's $everything");

    // _type narrows; _since keeps what changed after it.
    let (entries, _) = walk(http, &format!("{base}/Patient/pat-a/$everything?_type=Condition"), &sys).await;
    assert_eq!(keys(&entries, "match"), ["Condition/cond-a0", "Condition/cond-a1", "Condition/cond-a2"]);
    let r = get(http, &format!("{base}/Observation/obs-b"), &sys).await;
    let since = r.json()["meta"]["lastUpdated"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    put_resource(
        http,
        base,
        &sys,
        &json!({"resourceType": "Condition", "id": "cond-a0",
        "subject": {"reference": "Patient/pat-a"}, "note": [{"text": "revised"}]}),
    )
    .await;
    let url = format!("{base}/Patient/pat-a/$everything?_since={}", since.replace('+', "%2B"));
    let (entries, _) = walk(http, &url, &sys).await;
    assert_eq!(keys(&entries, "match"), ["Condition/cond-a0"], "only what changed since {since}");

    // Bad input names the parameter.
    for (q, at) in [("_since=yesterday", "_since"), ("_type=Practitioner", "_type"), ("start=2020", "start")] {
        let r = get(http, &format!("{base}/Patient/pat-a/$everything?{q}"), &sys).await;
        assert_eq!(r.status, 400, "{q}: {}", r.text);
        assert_eq!(r.json()["issue"][0]["expression"][0], at, "{q}: {}", r.text);
    }
    let r = get(http, &format!("{base}/Patient/pat-a/$everything?_cursor=7.garbage"), &sys).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = get(http, &format!("{base}/Patient/nobody/$everything"), &sys).await;
    assert_eq!(r.status, 404, "{}", r.text);

    // A patient token: its own patient without the other patient as an include; the other
    // patient answers as if unknown, whatever the parameters.
    let client_id = s.admin.public_client("Everything App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    let tok =
        smart::user_token(http, base, &client_id, &["launch/patient", "patient/*.rs"], &smart::Login::new("alice"))
            .await;
    let alice = tok["access_token"].as_str().unwrap().to_string();
    let (entries, _) = walk(http, &format!("{base}/Patient/pat-a/$everything?_count=4"), &alice).await;
    let all: BTreeSet<String> = keys(&entries, "match").into_iter().chain(keys(&entries, "include")).collect();
    assert!(all.contains("Patient/pat-a") && all.contains("Observation/obs-a0"), "{all:?}");
    assert!(!all.contains("Patient/pat-b"), "a patient token followed a reference to another patient: {all:?}");
    for q in ["", "?_type=Observation", "?_count=1&_since=2000-01-01"] {
        let r = fhir(http, Method::GET, &format!("{base}/Patient/pat-b/$everything{q}"), Some(&alice), None).await;
        assert_eq!(r.status, 404, "{q}: {}", r.text);
        assert!(!r.text.contains("secret-of-b") && !r.text.contains("Family-pat-b"), "{}", r.text);
    }
    // Nor through the payer operations: a match names no one to her, and a Group holding pat-b
    // exports nothing of pat-b.
    put_resource(
        http,
        base,
        &sys,
        &json!({"resourceType": "Group", "id": "grp-b", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/pat-b"}}]}),
    )
    .await;
    let match_b = json!({"resourceType": "Parameters", "parameter": [{"name": "MemberBundle", "part": [
        {"name": "MemberPatient", "resource": {"resourceType": "Patient", "name": [{"family": "Family-pat-b"}]}}]}]});
    for (method, path, body) in [
        (Method::POST, "/Group/$bulk-member-match", Some(&match_b)),
        (Method::GET, "/Group/grp-b/$davinci-data-export", None),
        (Method::GET, "/Group/grp-b/$export", None),
    ] {
        let req = http.request(method, format!("{base}{path}")).bearer_auth(&alice).header("prefer", "respond-async");
        let req = match body {
            Some(b) => req.header("content-type", "application/fhir+json").body(b.to_string()),
            None => req,
        };
        let r = smart::send(req).await;
        assert!(matches!(r.status, 403 | 404), "{path}: {} {}", r.status, r.text);
    }
    // And the server logged what alice was shown.
    let r = get(http, &format!("{base}/Patient/pat-a/$access-report"), &sys).await;
    assert_eq!(r.status, 200, "{}", r.text);
}
