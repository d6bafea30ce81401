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
    // The monitor's view: who read for the study and how often, and the consent changes
    // after enrolment (the withdrawal, the Consent active again, the subject leaving).
    let r = researcher.get("ResearchStudy/s1/$access-report").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let report = r.json();
    let accessor = parts(&report, "accessor");
    let pi_row = accessor.iter().find(|a| a["part"][0]["valueString"] == "Practitioner/pi").expect("the PI's row");
    let count =
        pi_row["part"].as_array().unwrap().iter().find(|p| p["name"] == "count").unwrap()["valueInteger"].as_u64();
    assert!(count.is_some_and(|c| c >= 3), "{pi_row}");
    let changes: Vec<String> = parts(&report, "change")
        .iter()
        .map(|c| {
            c["part"].as_array().unwrap().iter().find(|p| p["name"] == "resource").unwrap()["valueString"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for expected in ["Consent/rc-1/_history/2", "Consent/rc-1/_history/3", "ResearchSubject/rs-1/_history/2"] {
        assert!(changes.iter().any(|c| c == expected), "{expected} in {changes:?}");
    }
    assert_eq!(as_(&rival, Some("HRESCH"), Some("s1")).get("ResearchStudy/s1/$access-report").await.status, 403);
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

/// A research Consent permitting the study everything of the patient (for `HRESCH`).
fn consent_to_everything(patient: &str, study: &str, id: &str) -> Value {
    let mut c = research_consent(patient, study, &[], ("1900-01-01", "2100-01-01"));
    c["id"] = json!(id);
    c["provision"] = json!({"type": "permit", "purpose": [
        {"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]});
    c
}

fn observation(id: &str, patient: &str, value: f64) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "trial endpoint"},
           "subject": {"reference": format!("Patient/{patient}")}, "effectiveDateTime": "2024-06-01",
           "valueQuantity": {"value": value, "unit": "mg/dL"}})
}

fn put_entry(r: &Value) -> Value {
    let url = format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
    json!({"resource": r, "request": {"method": "PUT", "url": url}})
}

async fn transaction(s: &SmartServer, token: &str, entries: Vec<Value>) {
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let r = fhir(&s.http, Method::POST, &s.base, Some(token), Some(&bundle)).await;
    assert_eq!(r.status, 200, "transaction: {}", r.text);
}

/// `cp -a from/. to` (the data directory holds subdirectories).
fn copy_all(from: &Path, to: &Path) {
    let status =
        std::process::Command::new("cp").arg("-a").arg(format!("{}/.", from.display())).arg(to).status().expect("cp");
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

fn parts<'a>(p: &'a Value, name: &str) -> Vec<&'a Value> {
    p["parameter"].as_array().into_iter().flatten().filter(|x| x["name"] == name).collect()
}

fn verdict(report: &Value) -> (bool, String) {
    let ok = parts(report, "result").first().and_then(|r| r["valueBoolean"].as_bool()).expect("result");
    let outcome = parts(report, "outcome").first().map(|o| o["resource"]["issue"].to_string()).unwrap_or_default();
    (ok, outcome)
}

async fn verify_lock(s: &SmartServer, token: &str, file: Option<&Value>) -> Value {
    let url = s.url("ResearchStudy/trial/$verify-lock");
    let req = match file {
        Some(f) => s.http.post(url).header("Content-Type", "application/fhir+json").body(f.to_string()),
        None => s.http.get(url),
    };
    let r = send(req.bearer_auth(token).header("X-Purpose-Of-Use", "HRESCH")).await;
    assert_eq!(r.status, 200, "$verify-lock: {}", r.text);
    r.json()
}

/// Runs `fhir-ledger verify lock` on `doc` saved to a file, trusting the node's key.
fn offline(s: &SmartServer, doc: &Value) -> (i32, String) {
    let file = s.dir.path().join(format!("lock-{}.json", rand_suffix()));
    std::fs::write(&file, doc.to_string()).expect("write the lock file");
    let key = s.dir.path().join("node.pub");
    crate::bulk::ledger_cli(&["verify", "lock", file.to_str().unwrap(), "--trusted-key", key.to_str().unwrap()])
}

fn rand_suffix() -> String {
    smart::random_hex(6)
}

/// A lock over the 25 Synthea patients verifies on the server and offline; an update without
/// a reason is refused, an amendment is listed with who, when and why (and the lock still
/// verifies), a tampered lock file and a history rewritten from a backup are each named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_lock_over_25_patients_verifies_and_names_every_change() {
    let mut s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    let mut patients = Vec::new();
    for n in 1..=25 {
        patients.push(load(&s, &sys, n).await);
    }
    let mut setup =
        vec![put_entry(&json!({"resourceType": "Practitioner", "id": "pi"})), put_entry(&study("trial", "pi"))];
    for (i, p) in patients.iter().enumerate() {
        setup.push(put_entry(&consent_to_everything(p, "trial", &format!("rc-{i}"))));
        setup.push(put_entry(&subject(&format!("rs-{i}"), "trial", p, &format!("rc-{i}"), "on-study")));
    }
    setup.push(put_entry(&smart::patient("outsider")));
    setup.push(put_entry(&observation("outsider-obs", "outsider", 1.0)));
    transaction(&s, &sys, setup).await;
    let client_id = s.admin.public_client("Trial App", None).await;
    s.admin.user("pi", "Practitioner/pi").await;

    // A backup of the ledger as it is now, then more data for patient 1 after it.
    s.stop();
    let backup = tempfile::tempdir().expect("temp dir");
    copy_all(s.dir.path(), backup.path());
    s.restart();
    let sys = s.system_token("system/*.cruds").await;
    let p1 = patients[0].clone();
    transaction(&s, &sys, (0..30).map(|i| put_entry(&observation(&format!("late-{i}"), &p1, f64::from(i)))).collect())
        .await;
    let pi = access_token(&user_token(&s.http, &s.base, &client_id, &["user/*.rs"], &Login::new("pi")).await);

    // The lock: every resource of the 25 subjects, nothing of the outsider.
    let r = send(s.http.post(s.url("ResearchStudy/trial/$lock")).bearer_auth(&pi)).await;
    assert_eq!(r.status, 403, "a lock without HRESCH: {}", r.text);
    // A patient of the study, with every patient scope, cannot lock, verify or monitor it.
    s.admin.user("subject-25", &format!("Patient/{}", patients[24])).await;
    let scopes = ["launch/patient", "patient/*.cruds"];
    let subject_token =
        access_token(&user_token(&s.http, &s.base, &client_id, &scopes, &Login::new("subject-25")).await);
    let ops = [
        (Method::POST, "$lock"),
        (Method::GET, "$verify-lock"),
        (Method::POST, "$verify-lock"),
        (Method::GET, "$access-report"),
    ];
    for (method, op) in ops {
        let url = s.url(&format!("ResearchStudy/trial/{op}"));
        let r =
            send(s.http.request(method.clone(), url).bearer_auth(&subject_token).header("X-Purpose-Of-Use", "HRESCH"))
                .await;
        assert!([403, 404].contains(&r.status), "a patient's {method} {op}: {} {}", r.status, r.text);
        assert!(!r.text.contains(&p1), "{}", r.text);
    }
    let r = send(s.http.post(s.url("ResearchStudy/trial/$lock")).bearer_auth(&pi).header("X-Purpose-Of-Use", "HRESCH"))
        .await;
    assert_eq!(r.status, 200, "$lock: {}", r.text);
    let file = r.json();
    // The lock file carries the List's exact bytes (as signed) as text.
    let list: Value = serde_json::from_str(parts(&file, "lock")[0]["valueString"].as_str().unwrap()).unwrap();
    assert_eq!(list["resourceType"], "List");
    let locked: BTreeSet<String> = list["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["item"]["reference"].as_str().unwrap().split("/_history/").next().unwrap().to_string())
        .collect();
    let system = Reader { s: &s, token: sys.clone(), purpose: None, study: None };
    for p in &patients {
        assert!(locked.contains(&format!("Patient/{p}")), "Patient/{p} is locked");
    }
    let p1_obs = system.search(&format!("Observation?subject=Patient/{p1}")).await;
    assert!(p1_obs.len() > 30 && p1_obs.is_subset(&locked), "every Observation of patient 1 is locked");
    assert!(!locked.contains("Observation/outsider-obs") && !locked.contains("Patient/outsider"));
    // The patients' choices stay theirs to change: Consents and enrolments are not locked.
    assert!(!locked.iter().any(|r| r.starts_with("Consent/") || r.starts_with("ResearchSubject/")));
    assert!(locked.len() > 10_000, "the 25 patients' data: {} versions", locked.len());
    let (code, out) = offline(&s, &file);
    assert_eq!(code, 0, "verify lock of the lock file: {out}");
    let report = verify_lock(&s, &pi, None).await;
    assert!(verdict(&report).0, "{}", verdict(&report).1);
    assert_eq!(parts(&report, "amendments")[0]["valueInteger"], 0);

    // An update of locked data without a reason is refused, and so is a delete.
    let mut obs = system.get("Observation/late-0").await.json();
    obs["valueQuantity"]["value"] = json!(99.0);
    let r = fhir(&s.http, Method::PUT, &s.url("Observation/late-0"), Some(&sys), Some(&obs)).await;
    assert_eq!(r.status, 422, "an unexplained change of locked data: {}", r.text);
    assert!(r.text.contains("data lock") && r.text.contains("reason"), "{}", r.text);
    let r = fhir(&s.http, Method::DELETE, &s.url("Observation/late-0"), Some(&sys), None).await;
    assert_eq!(r.status, 422, "a delete of locked data: {}", r.text);
    // An amendment states why: a new version; the locked one stays, and the lock lists it.
    let why = "transcription error corrected against the source document";
    obs["meta"] =
        json!({"extension": [{"url": "urn:fhir-ledger:StructureDefinition/amendment-reason", "valueString": why}]});
    let r = fhir(&s.http, Method::PUT, &s.url("Observation/late-0"), Some(&sys), Some(&obs)).await;
    assert_eq!(r.status, 200, "an amendment: {}", r.text);
    let report = verify_lock(&s, &pi, None).await;
    assert!(verdict(&report).0, "amended, the lock still verifies: {}", verdict(&report).1);
    let amendments = parts(&report, "amendment");
    assert_eq!(amendments.len(), 1, "{report}");
    let a = amendments[0]["part"].to_string();
    assert!(a.contains("Observation/late-0/_history/2") && a.contains(why), "who, when and why: {a}");
    let (code, out) = offline(&s, &report);
    assert_eq!(code, 0, "verify lock of the $verify-lock answer: {out}");
    assert!(out.contains("amended 1 time(s)") && out.contains(why), "{out}");

    // A tampered lock file: one locked version swapped for another.
    let mut bad = file.clone();
    let text = bad["parameter"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["name"] == "lock")
        .map(|p| &mut p["valueString"])
        .unwrap();
    *text = json!(text.as_str().unwrap().replacen("/_history/1\"", "/_history/2\"", 1));
    assert_ne!(bad, file, "the tampered file differs");
    let report = verify_lock(&s, &pi, Some(&bad)).await;
    let (ok, why_not) = verdict(&report);
    assert!(!ok && why_not.contains("altered"), "a tampered lock file: {why_not}");
    let (code, out) = offline(&s, &bad);
    assert!(code == 1 && out.contains("altered"), "offline, a tampered lock file: {code} {out}");

    // A subject withdraws and has their data erased: the lock survives as a proof without
    // content, and says so.
    let p25 = patients[24].clone();
    smart::put_resource(&s.http, &s.base, &sys, &subject("rs-24", "trial", &p25, "rc-24", "withdrawn")).await;
    let r = send(s.http.post(s.url(&format!("Patient/{p25}/$erase"))).bearer_auth(smart::ADMIN_TOKEN)).await;
    assert_eq!(r.status, 200, "$erase: {}", r.text);
    let report = verify_lock(&s, &pi, None).await;
    let (ok, why_not) = verdict(&report);
    assert!(ok, "the lock verifies after an erasure: {why_not}");
    let withdrawn: Vec<&str> = parts(&report, "withdrawn").iter().filter_map(|w| w["valueString"].as_str()).collect();
    assert!(withdrawn.iter().any(|w| w.contains(&p25) && w.contains("stay locked")), "{withdrawn:?}");
    let erased =
        parts(&report, "amendment").iter().filter(|a| a["part"].to_string().contains("crypto-shredded")).count();
    assert!(erased > 100, "each erased locked resource is listed: {erased}");
    let (code, out) = offline(&s, &report);
    assert_eq!(code, 0, "offline, after the erasure: {out}");

    // History rewritten from the backup: the kept lock file no longer fits the ledger.
    s.stop();
    for e in std::fs::read_dir(s.dir.path()).unwrap() {
        let path = e.unwrap().path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    copy_all(backup.path(), s.dir.path());
    s.restart();
    let sys = s.system_token("system/*.cruds").await;
    transaction(&s, &sys, (0..60).map(|i| put_entry(&observation(&format!("other-{i}"), &p1, 7.0))).collect()).await;
    let pi = access_token(&user_token(&s.http, &s.base, &client_id, &["user/*.rs"], &Login::new("pi")).await);
    let report = verify_lock(&s, &pi, Some(&file)).await;
    let (ok, why_not) = verdict(&report);
    assert!(!ok && why_not.contains("consistency fails"), "a rewritten history: {why_not}");
    let (code, out) = offline(&s, &report);
    assert!(code == 1 && out.contains("consistency fails"), "offline, a rewritten history: {code} {out}");
}

/// Every string of a Synthea patient that Safe Harbor counts as an identifier: names (with
/// the mother's maiden name), phone numbers, street lines, cities, full ZIP codes,
/// identifier values (SSN, MRN, licences, passports) and attachment URLs.
fn identifiers(bundle: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut urls = Vec::new();
    let mut add = |v: &Value| {
        if let Some(s) = v.as_str().filter(|s| s.len() > 3) {
            out.insert(s.to_string());
        }
    };
    for e in bundle["entry"].as_array().unwrap() {
        let r = &e["resource"];
        if r["resourceType"] == "Patient" {
            for n in r["name"].as_array().into_iter().flatten() {
                add(&n["family"]);
                n["given"].as_array().into_iter().flatten().for_each(&mut add);
            }
            r["telecom"].as_array().into_iter().flatten().for_each(|t| add(&t["value"]));
            for a in r["address"].as_array().into_iter().flatten() {
                a["line"].as_array().into_iter().flatten().for_each(&mut add);
                add(&a["city"]);
                add(&a["postalCode"]);
            }
            r["identifier"].as_array().into_iter().flatten().for_each(|i| add(&i["value"]));
            for x in r["extension"].as_array().into_iter().flatten() {
                add(&x["valueString"]);
                add(&x["valueAddress"]["city"]);
            }
        }
        walk_strings(r, &mut |k, v| {
            if k == "url" && v.starts_with("http") && !v.contains("hl7.org") && !v.contains("synthetichealth") {
                urls.push(v.to_string());
            }
        });
    }
    out.extend(urls);
    out
}

fn walk_strings(v: &Value, f: &mut dyn FnMut(&str, &str)) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if let Value::String(s) = x {
                    f(k, s);
                }
                walk_strings(x, f);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| walk_strings(x, f)),
        _ => {}
    }
}

/// A FHIR date, dateTime or instant that says more than the year.
fn finer_than_year(s: &str) -> bool {
    let b = s.as_bytes();
    let dated = b.len() >= 7 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[5].is_ascii_digit();
    dated && !(s.len() == 20 && s.ends_with("-01-01T00:00:00Z"))
}

/// A de-identified study over the 25 Synthea patients: its search, read and Bulk export carry
/// no Safe Harbor identifier of any of them and no date finer than the year, its exported
/// cohort's references resolve inside the cohort, and every such disclosure is logged as a
/// de-identification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deidentified_study_receives_no_safe_harbor_identifier() {
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    let mut patients = Vec::new();
    let mut secrets = BTreeSet::new();
    for n in 1..=25 {
        let bundle = synthea(n);
        secrets.extend(identifiers(&bundle));
        let r = fhir(&s.http, Method::POST, &s.base, Some(&sys), Some(&bundle)).await;
        assert_eq!(r.status, 200, "Synthea patient {n}: {}", r.text);
        for e in r.json()["entry"].as_array().unwrap() {
            let location = e["response"]["location"].as_str().unwrap();
            let id = location.split('/').nth(1).unwrap().to_string();
            if location.starts_with("Patient/") {
                patients.push(id.clone());
            }
            secrets.insert(id); // every server id is a record number
        }
    }
    assert!(secrets.len() > 10_000, "{} identifiers", secrets.len());
    let mut cohort = study("cohort", "analyst");
    cohort["extension"] =
        json!([{"url": "urn:fhir-ledger:StructureDefinition/deidentify", "valueString": "safe-harbor"}]);
    let mut setup = vec![put_entry(&json!({"resourceType": "Practitioner", "id": "analyst"})), put_entry(&cohort)];
    for (i, p) in patients.iter().enumerate() {
        setup.push(put_entry(&consent_to_everything(p, "cohort", &format!("rc-{i}"))));
        setup.push(put_entry(&subject(&format!("rs-{i}"), "cohort", p, &format!("rc-{i}"), "on-study")));
    }
    transaction(&s, &sys, setup).await;
    let client_id = s.admin.public_client("Cohort App", None).await;
    s.admin.user("analyst", "Practitioner/analyst").await;
    let analyst = access_token(&user_token(&s.http, &s.base, &client_id, &["user/*.rs"], &Login::new("analyst")).await);
    let reader = Reader { s: &s, token: analyst.clone(), purpose: Some("HRESCH"), study: None };

    // What the study receives: a search, a read and the Bulk export of its cohort.
    let mut texts =
        vec![reader.get("Patient?_count=100").await.text, reader.get(&format!("Patient/{}", patients[0])).await.text];
    let r = send(
        s.http
            .get(s.url("Patient/$export"))
            .bearer_auth(&analyst)
            .header("X-Purpose-Of-Use", "HRESCH")
            .header("Prefer", "respond-async"),
    )
    .await;
    assert_eq!(r.status, 202, "the study's export: {}", r.text);
    let export = crate::bulk::finish(&s, &r.header("content-location"), &analyst).await;
    assert!(export.manifest.get("extension").is_none_or(|x| x.get("urn:fhir-ledger:bulk:trust-label").is_none()));
    let resources = export.resources();
    assert!(resources.len() > 10_000, "the cohort: {} resources", resources.len());
    texts.extend(export.files.values().cloned());

    // No identifier survives, anywhere: no string value is one, nor holds one as a word.
    let mut checked = 0;
    for text in &texts {
        let docs: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        assert!(!docs.is_empty(), "JSON out: {}", &text[..text.len().min(300)]);
        for doc in &docs {
            walk_strings(doc, &mut |k, v| {
                checked += 1;
                assert!(!finer_than_year(v), "{k}: {v:?} says more than the year");
                let words = v.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '.'));
                for w in std::iter::once(v).chain(words) {
                    assert!(!secrets.contains(w), "{k}: {w:?} of {v:?} survived de-identification");
                }
            });
        }
    }
    assert!(checked > 100_000, "{checked} strings checked");
    // Inside the cohort, references resolve: every reference to an exported type names an
    // exported resource.
    let mut ids: BTreeSet<String> = BTreeSet::new();
    for r in &resources {
        ids.insert(format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap()));
    }
    let types: BTreeSet<&str> = resources.iter().filter_map(|r| r["resourceType"].as_str()).collect();
    let (mut resolved, mut dangling) = (0, Vec::new());
    for r in &resources {
        walk_strings(r, &mut |k, v| {
            if k == "reference" && types.contains(v.split('/').next().unwrap_or_default()) {
                if ids.contains(v) {
                    resolved += 1;
                } else {
                    dangling.push(v.to_string());
                }
            }
        });
    }
    assert!(
        resolved > 10_000 && dangling.is_empty(),
        "{resolved} resolved, dangling: {:?}",
        &dangling[..dangling.len().min(5)]
    );

    // Each de-identified disclosure is a de-identification AuditEvent.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let events =
            smart::search_all(&s.http, &s.base, &sys, "AuditEvent?entity=ResearchStudy/cohort&_count=500").await;
        let logged = events.iter().any(|e| {
            e["subtype"].as_array().into_iter().flatten().any(|t| t["code"] == "deidentify")
                && e["purposeOfEvent"][0]["coding"][0]["code"] == "HRESCH"
                && e["entity"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|x| x["description"] == "de-identification algorithm")
        });
        if logged {
            break;
        }
        assert!(Instant::now() < deadline, "no de-identification AuditEvent after 15 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Registering a study, attaching its protocol and statistical analysis plan and amending it
/// record each on the ledger: `$proof` of each version, with the version's exact bytes, is a
/// proof of existence at that time that `fhir-ledger verify proof --resource` checks offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_and_its_amendments_are_proven_to_exist_offline() {
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    let sap = crate::smart::b64("Statistical analysis plan v1: primary endpoint HbA1c at 26 weeks, ANCOVA.");
    let resources = [
        json!({"resourceType": "PlanDefinition", "id": "protocol-7", "status": "active", "title": "Protocol 7",
               "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/plan-definition-type", "code": "protocol"}]}}),
        json!({"resourceType": "DocumentReference", "id": "sap-7", "status": "current",
               "type": {"text": "statistical analysis plan"},
               "content": [{"attachment": {"contentType": "text/plain", "data": sap}}]}),
        json!({"resourceType": "ResearchStudy", "id": "trial", "status": "active", "title": "Trial 7",
               "protocol": [{"reference": "PlanDefinition/protocol-7"}]}),
        // The amendment: a new version, the registered one stays.
        json!({"resourceType": "ResearchStudy", "id": "trial", "status": "active", "title": "Trial 7 (amendment 1)",
               "protocol": [{"reference": "PlanDefinition/protocol-7"}],
               "relatedArtifact": [{"type": "documentation", "display": "statistical analysis plan", "url": "DocumentReference/sap-7"}]}),
    ];
    for r in &resources {
        smart::put_resource(&s.http, &s.base, &sys, r).await;
    }
    let key = s.dir.path().join("node.pub");
    for version in [
        "PlanDefinition/protocol-7/_history/1",
        "DocumentReference/sap-7/_history/1",
        "ResearchStudy/trial/_history/1",
        "ResearchStudy/trial/_history/2",
    ] {
        let body = smart::get(&s.http, &s.url(version), &sys).await;
        assert_eq!(body.status, 200, "{version}: {}", body.text);
        let proof = smart::get(&s.http, &s.url(&format!("{version}/$proof")), &sys).await;
        assert_eq!(proof.status, 200, "{version}/$proof: {}", proof.text);
        let name = version.replace('/', "-");
        let (proof_file, body_file) =
            (s.dir.path().join(format!("{name}.proof.json")), s.dir.path().join(format!("{name}.json")));
        std::fs::write(&proof_file, &proof.text).unwrap();
        std::fs::write(&body_file, &body.text).unwrap();
        let args = |b: &Path| {
            vec![
                "verify".to_string(),
                "proof".into(),
                proof_file.display().to_string(),
                "--resource".into(),
                b.display().to_string(),
                "--trusted-key".into(),
                key.display().to_string(),
            ]
        };
        let run = |a: Vec<String>| crate::bulk::ledger_cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let (code, out) = run(args(&body_file));
        assert!(
            code == 0 && out.contains("is exactly its content") && out.contains(version),
            "{version}: {code} {out}"
        );
        // The same version with one word changed is not what was recorded.
        let forged = s.dir.path().join(format!("{name}.forged.json"));
        std::fs::write(&forged, body.text.replacen("active", "retired", 1).replacen("current", "superseded", 1))
            .unwrap();
        let (code, out) = run(args(&forged));
        assert!(code == 1 && out.contains("is not the content"), "{version} forged: {code} {out}");
    }
}
