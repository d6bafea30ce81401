//! Research access with real processes and auth on: a study's researcher reads an enrolled,
//! consenting Synthea patient's permitted classes in the permitted period with purpose of use
//! `HRESCH`, and nothing else, exactly as if the rest did not exist; the disclosure log names
//! the study.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};

use crate::smart::{self, access_token, fhir, send, user_token, Login, SmartServer};

pub fn synthea(n: u32) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../shared/data/synthea/patient-{n:02}.json"));
    serde_json::from_slice(&std::fs::read(&path).expect("Synthea bundle")).expect("JSON")
}

/// Loads Synthea patient `n` as its transaction; the server's id of its Patient.
pub async fn load(s: &SmartServer, token: &str, n: u32) -> String {
    let r = fhir(&s.http, Method::POST, &s.base, Some(token), Some(&synthea(n))).await;
    assert_eq!(r.status, 200, "Synthea patient {n}: {}", r.text);
    let b = r.json();
    let location = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["response"]["location"].as_str())
        .find(|l| l.starts_with("Patient/"))
        .expect("the Patient's location")
        .to_string();
    location.split('/').nth(1).expect("Patient/id").to_string()
}

/// A research Consent of `patient` for `study`: HRESCH, the Patient resource, and the classes'
/// data of the period.
pub fn research_consent(patient: &str, study: &str, classes: &[&str], period: (&str, &str)) -> Value {
    json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "policy": [{"uri": "https://example.org/irb/protocol-7"}],
        "extension": [{"url": "urn:fhir-ledger:StructureDefinition/research-study",
                       "valueReference": {"reference": format!("ResearchStudy/{study}")}}],
        // For research: nothing, except the Patient resource and the classes' data of the period.
        "provision": {
            "type": "deny",
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}],
            "provision": [
                {"type": "permit", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Patient"}]},
                {"type": "permit", "class": classes.iter().map(|c| json!({"system": "http://hl7.org/fhir/resource-types", "code": c})).collect::<Vec<_>>(),
                 "dataPeriod": {"start": period.0, "end": period.1}}
            ]
        }
    })
}

pub fn study(id: &str, pi: &str) -> Value {
    json!({"resourceType": "ResearchStudy", "id": id, "status": "active", "title": format!("Study {id}"),
           "principalInvestigator": {"reference": format!("Practitioner/{pi}")}})
}

pub fn subject(id: &str, study: &str, patient: &str, consent: &str, status: &str) -> Value {
    json!({"resourceType": "ResearchSubject", "id": id, "status": status,
           "study": {"reference": format!("ResearchStudy/{study}")},
           "individual": {"reference": format!("Patient/{patient}")},
           "consent": {"reference": format!("Consent/{consent}")}})
}

fn ids(bundle: &Value) -> BTreeSet<String> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] != "outcome")
        .map(|e| {
            format!("{}/{}", e["resource"]["resourceType"].as_str().unwrap(), e["resource"]["id"].as_str().unwrap())
        })
        .collect()
}

struct Reader<'a> {
    s: &'a SmartServer,
    token: String,
    purpose: Option<&'a str>,
    study: Option<&'a str>,
}

impl Reader<'_> {
    async fn get(&self, path: &str) -> smart::Resp {
        let mut req = self.s.http.get(self.s.url(path)).bearer_auth(&self.token);
        if let Some(p) = self.purpose {
            req = req.header("X-Purpose-Of-Use", p);
        }
        if let Some(st) = self.study {
            req = req.header("X-Research-Study", st);
        }
        send(req).await
    }

    /// Every id a search finds, over all its pages.
    async fn search(&self, query: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut path = format!("{query}&_count=500");
        loop {
            let r = self.get(&path).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text);
            let b = r.json();
            out.extend(ids(&b));
            let next = b["link"].as_array().and_then(|l| l.iter().find(|l| l["relation"] == "next").cloned());
            match next.and_then(|l| l["url"].as_str().map(str::to_string)) {
                Some(n) => path = n.split_once(&format!("{}/", self.s.base)).map_or(n.clone(), |(_, p)| p.to_string()),
                None => return out,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_study_reads_only_what_its_enrolled_subjects_consented_to() {
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    let (p1, p2) = (load(&s, &sys, 1).await, load(&s, &sys, 2).await);
    for pr in ["pi", "rival", "clinician"] {
        smart::put_resource(&s.http, &s.base, &sys, &json!({"resourceType": "Practitioner", "id": pr})).await;
    }
    smart::put_resource(&s.http, &s.base, &sys, &study("s1", "pi")).await;
    smart::put_resource(&s.http, &s.base, &sys, &study("s2", "rival")).await;
    // Patient 1 consents to study 1 reading Patient and Observation of 2019-2020, and is enrolled.
    let mut consent = research_consent(&p1, "s1", &["Observation"], ("2019-01-01", "2020-12-31"));
    consent["id"] = json!("rc-1");
    smart::put_resource(&s.http, &s.base, &sys, &consent).await;
    smart::put_resource(&s.http, &s.base, &sys, &subject("rs-1", "s1", &p1, "rc-1", "on-study")).await;
    // Patient 2 consents too, but is not enrolled.
    let mut consent2 = research_consent(&p2, "s1", &["Observation"], ("2000-01-01", "2030-12-31"));
    consent2["id"] = json!("rc-2");
    smart::put_resource(&s.http, &s.base, &sys, &consent2).await;

    let client_id = s.admin.public_client("Research App", None).await;
    for (user, who) in
        [("pi", "Practitioner/pi"), ("rival", "Practitioner/rival"), ("clinician", "Practitioner/clinician")]
    {
        s.admin.user(user, who).await;
    }
    let token = |user: &'static str| {
        let (http, base, client_id) = (s.http.clone(), s.base.clone(), client_id.clone());
        async move { access_token(&user_token(&http, &base, &client_id, &["user/*.rs"], &Login::new(user)).await) }
    };
    let as_ = |token: &String, purpose: Option<&'static str>, study: Option<&'static str>| Reader {
        s: &s,
        token: token.clone(),
        purpose,
        study,
    };
    let (pi, rival, clinician) = (token("pi").await, token("rival").await, token("clinician").await);
    let researcher = as_(&pi, Some("HRESCH"), None);
    let system = Reader { s: &s, token: sys.clone(), purpose: None, study: None };

    // What the study may see: patient 1, and their Observations of 2019-2020.
    let in_period =
        system.search(&format!("Observation?subject=Patient/{p1}&date=ge2019-01-01&date=le2020-12-31")).await;
    let all_p1 = system.search(&format!("Observation?subject=Patient/{p1}")).await;
    assert!(!in_period.is_empty() && in_period.len() < all_p1.len(), "the data period splits patient 1's data");
    let seen = researcher.search(&format!("Observation?subject=Patient/{p1}")).await;
    assert_eq!(seen, in_period, "the researcher sees exactly the consented period");
    let everything = researcher.search("Observation?_total=accurate").await;
    assert_eq!(everything, in_period, "nothing of the non-enrolled patient 2");
    assert_eq!(researcher.get(&format!("Patient/{p1}")).await.status, 200, "the consented Patient class");
    assert!(researcher.search("Condition?_id:missing=false").await.is_empty(), "Condition is not a consented class");
    let outside = all_p1.difference(&in_period).next().expect("an Observation outside the period").clone();
    let inside = in_period.iter().next().expect("an Observation inside").clone();
    assert_eq!(researcher.get(&inside).await.status, 200, "{inside} inside the period");
    let condition = system.search(&format!("Condition?subject=Patient/{p1}")).await;
    let condition = condition.iter().next().expect("patient 1 has Conditions").clone();
    let p2_obs = system.search(&format!("Observation?subject=Patient/{p2}")).await;
    let p2_obs = p2_obs.iter().next().expect("patient 2 has Observations").clone();

    // Every way around is the same 404 as a missing resource, and an empty search.
    let missing = researcher.get("Observation/no-such-observation").await;
    assert_eq!(missing.status, 404);
    let refusals = [
        ("outside the data period", as_(&pi, Some("HRESCH"), None), outside.clone()),
        ("a class not consented", as_(&pi, Some("HRESCH"), None), condition.clone()),
        ("a patient not enrolled", as_(&pi, Some("HRESCH"), None), p2_obs.clone()),
        ("without HRESCH", as_(&pi, None, None), inside.clone()),
        ("with another purpose", as_(&pi, Some("TREAT"), None), inside.clone()),
        ("another study's researcher", as_(&rival, Some("HRESCH"), None), inside.clone()),
        ("another study's researcher naming this study", as_(&rival, Some("HRESCH"), Some("s1")), inside.clone()),
        ("a clinician stating HRESCH", as_(&clinician, Some("HRESCH"), None), inside.clone()),
    ];
    for (why, reader, path) in &refusals {
        let r = reader.get(path).await;
        assert_eq!(
            (r.status, r.json()["issue"][0]["code"].clone()),
            (404, json!("not-found")),
            "{why}: {path}: {}",
            r.text
        );
        let search = reader.search(&format!("Observation?subject=Patient/{p1}")).await;
        assert!(
            search.is_subset(&in_period)
                && (search.is_empty()
                    || *why == "a class not consented"
                    || *why == "outside the data period"
                    || *why == "a patient not enrolled"),
            "{why}: a search shows {}",
            search.len()
        );
    }
    // A clinician without a research purpose is not a researcher: the ordinary opt-out rules.
    assert_eq!(as_(&clinician, None, None).get(&inside).await.status, 200);

    // The disclosure log names the study.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let events = smart::search_all(&s.http, &s.base, &sys, "AuditEvent?entity=ResearchStudy/s1&_count=500").await;
        let named = events.iter().any(|e| {
            e["purposeOfEvent"][0]["coding"][0]["code"] == "HRESCH"
                && e["entity"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|x| x["what"]["reference"] == format!("Patient/{p1}"))
        });
        if named {
            break;
        }
        assert!(Instant::now() < deadline, "no AuditEvent naming ResearchStudy/s1 and patient 1 after 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Withdrawal stops access on the next request.
    let mut withdrawn = consent.clone();
    withdrawn["status"] = json!("inactive");
    smart::put_resource(&s.http, &s.base, &sys, &withdrawn).await;
    assert_eq!(researcher.get(&inside).await.status, 404, "after the Consent is withdrawn");
    assert!(researcher.search("Observation?_count=10").await.is_empty());
    smart::put_resource(&s.http, &s.base, &sys, &consent).await;
    assert_eq!(researcher.get(&inside).await.status, 200, "the Consent active again");
    smart::put_resource(&s.http, &s.base, &sys, &subject("rs-1", "s1", &p1, "rc-1", "withdrawn")).await;
    assert_eq!(researcher.get(&inside).await.status, 404, "after the subject withdraws from the study");
    // Research standing reads; it never writes, whatever the token's scopes.
    smart::put_resource(&s.http, &s.base, &sys, &subject("rs-1", "s1", &p1, "rc-1", "on-study")).await;
    let writer = access_token(&user_token(&s.http, &s.base, &client_id, &["user/*.cruds"], &Login::new("pi")).await);
    let body = system.get(&inside).await.json();
    assert_eq!(as_(&writer, Some("HRESCH"), None).get(&inside).await.status, 200, "enrolled again");
    let r = send(
        s.http
            .put(s.url(&inside))
            .bearer_auth(&writer)
            .header("X-Purpose-Of-Use", "HRESCH")
            .header("Content-Type", "application/fhir+json")
            .body(body.to_string()),
    )
    .await;
    assert!([403, 404].contains(&r.status), "a researcher's write: {} {}", r.status, r.text);
}
