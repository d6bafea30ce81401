//! In-process HTTP tests of FHIR R4 search (http://hl7.org/fhir/R4/search.html): every
//! parameter type with its prefixes and modifiers, the result parameters (`_sort`, `_count`,
//! `_total`, `_summary`, `_elements`, `_include`, `_revinclude`), chaining, `_has`,
//! compartments, system-level search, paging, custom SearchParameters and the errors a bad
//! search gets. Each test seeds a small hand-made data set under client-chosen ids (PUT
//! update-as-create) and checks the exact set, or the exact order, of the matches.

use std::fmt::Write as _;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use serde_json::{json, Value};

use crate::support;

struct Resp {
    status: StatusCode,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

macro_rules! call {
    ($app:expr, $req:expr) => {{
        let resp = test::call_service(&$app, $req.to_request()).await;
        let status = resp.status();
        let body = test::read_body(resp).await;
        Resp { status, text: String::from_utf8_lossy(&body).into_owned() }
    }};
}

/// GET `uri`; asserts a 200 searchset Bundle and returns it.
macro_rules! search {
    ($app:expr, $uri:expr) => {{
        let uri = $uri.to_string();
        let r = call!($app, TestRequest::get().uri(&uri));
        assert_eq!(r.status, StatusCode::OK, "GET {uri}: {}", r.text);
        let b = r.json();
        assert_eq!(b["resourceType"], "Bundle", "GET {uri}: {}", r.text);
        assert_eq!(b["type"], "searchset", "GET {uri}: {}", r.text);
        b
    }};
}

/// Asserts the ids of the matches of GET `uri`, as a set (order not checked).
macro_rules! assert_ids {
    ($app:expr, $uri:expr, [$($id:expr),* $(,)?]) => {
        assert_ids!($app, $uri, [$($id),*], "")
    };
    ($app:expr, $uri:expr, [$($id:expr),* $(,)?], $why:expr) => {{
        let uri = $uri.to_string();
        let b = search!($app, uri);
        let mut got = ids(&b);
        got.sort();
        let mut want: Vec<String> = vec![$($id.to_string()),*];
        want.sort();
        assert_eq!(got, want, "GET {uri} {}", $why);
    }};
}

/// Asserts the ids of the matches of GET `uri`, in order.
macro_rules! assert_order {
    ($app:expr, $uri:expr, [$($id:expr),* $(,)?]) => {
        assert_order!($app, $uri, [$($id),*], "")
    };
    ($app:expr, $uri:expr, [$($id:expr),* $(,)?], $why:expr) => {{
        let uri = $uri.to_string();
        let b = search!($app, uri);
        let want: Vec<String> = vec![$($id.to_string()),*];
        assert_eq!(ids(&b), want, "GET {uri} {}", $why);
    }};
}

/// Asserts that GET `uri` is a 400 OperationOutcome that names `what` (in an issue's
/// diagnostics or expression).
macro_rules! rejects {
    ($app:expr, $uri:expr, $what:expr) => {{
        let uri = $uri.to_string();
        let r = call!($app, TestRequest::get().uri(&uri));
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "GET {uri}: {}", r.text);
        let v = r.json();
        assert_eq!(v["resourceType"], "OperationOutcome", "GET {uri}: {}", r.text);
        assert!(names(&v, $what), "GET {uri}: the OperationOutcome should name {:?}: {}", $what, r.text);
    }};
}

/// PUTs each resource (update-as-create under its `id`), in order; creation order is the
/// order given.
macro_rules! seed {
    ($app:expr, $($res:expr),+ $(,)?) => {{
        $({
            let body: Value = $res;
            let path = format!("/{}/{}", body["resourceType"].as_str().unwrap(), body["id"].as_str().unwrap());
            let r = call!($app, put(&path, &body.to_string()));
            assert!(r.status == StatusCode::CREATED || r.status == StatusCode::OK, "PUT {path}: {}", r.text);
        })+
    }};
}

/// Follows `next` links from GET `uri`; the ids of every page's matches, in order.
macro_rules! all_pages {
    ($app:expr, $uri:expr) => {{
        let mut uri: String = $uri.to_string();
        let mut seen: Vec<String> = Vec::new();
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(pages < 100, "too many pages from {uri}");
            let b = search!($app, uri);
            seen.extend(ids(&b));
            match link(&b, "next") {
                Some(next) => uri = next,
                None => break,
            }
        }
        seen
    }};
}

fn post(path: &str, body: &str) -> TestRequest {
    TestRequest::post().uri(path).insert_header(("content-type", "application/fhir+json")).set_payload(body.to_string())
}

fn put(path: &str, body: &str) -> TestRequest {
    TestRequest::put().uri(path).insert_header(("content-type", "application/fhir+json")).set_payload(body.to_string())
}

/// Percent-encodes what may not appear raw in a query value (space, `+`, `#`, `&`, `\`,
/// brackets, non-ASCII); keeps the FHIR syntax characters (`|`, `$`, `,`, `:`) readable.
fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~|:/,$*!'()=;@?".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}"); // cannot fail on a String
        }
    }
    out
}

fn entries<'a>(bundle: &'a Value, mode: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    bundle["entry"].as_array().into_iter().flatten().filter(move |e| e["search"]["mode"] == mode)
}

/// Ids of the entries with `search.mode` = `match`, in bundle order.
fn ids(bundle: &Value) -> Vec<String> {
    entries(bundle, "match").map(|e| e["resource"]["id"].as_str().unwrap_or_default().to_string()).collect()
}

/// `Type/id` of the entries with `search.mode` = `include`, sorted (duplicates kept).
fn included(bundle: &Value) -> Vec<String> {
    let mut v: Vec<String> = entries(bundle, "include")
        .map(|e| {
            let r = &e["resource"];
            format!("{}/{}", r["resourceType"].as_str().unwrap_or_default(), r["id"].as_str().unwrap_or_default())
        })
        .collect();
    v.sort();
    v
}

/// The path and query of the bundle link with `relation`, ready for another request.
fn link(bundle: &Value, relation: &str) -> Option<String> {
    let url = bundle["link"].as_array()?.iter().find(|l| l["relation"] == relation)?["url"].as_str()?;
    Some(match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or_else(|| "/".to_string(), |i| rest[i..].to_string()),
        None => url.to_string(),
    })
}

/// Does any issue of the OperationOutcome mention `what`?
fn names(outcome: &Value, what: &str) -> bool {
    outcome["issue"].as_array().into_iter().flatten().any(|i| {
        i["diagnostics"].as_str().is_some_and(|d| d.contains(what))
            || i["expression"].as_array().into_iter().flatten().any(|e| e.as_str().is_some_and(|e| e.contains(what)))
    })
}

/// Is the resource marked as a subset (meta.tag SUBSETTED)?
fn subsetted(res: &Value) -> bool {
    res["meta"]["tag"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["system"] == "http://terminology.hl7.org/CodeSystem/v3-ObservationValue" && t["code"] == "SUBSETTED")
}

/// The top-level element names of a resource, sorted.
fn keys(res: &Value) -> Vec<String> {
    let mut k: Vec<String> = res.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    k.sort();
    k
}

/// The matched resource with `id` in a bundle.
fn resource<'a>(bundle: &'a Value, id: &str) -> &'a Value {
    entries(bundle, "match")
        .map(|e| &e["resource"])
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{id} is not among the matches: {bundle}"))
}

/// `{"resourceType": rtype, "id": id}` with the members of `body`.
fn res(rtype: &str, id: &str, body: Value) -> Value {
    with(json!({"resourceType": rtype, "id": id}), body)
}

/// `base` with the members of `more` added (or replaced).
fn with(mut base: Value, more: Value) -> Value {
    let Value::Object(more) = more else { panic!("an object") };
    for (k, v) in more {
        base[k] = v;
    }
    base
}

/// A final Observation with `code` and the members of `extra`.
fn obs(id: &str, code: Value, extra: Value) -> Value {
    let mut body = json!({"status": "final"});
    body["code"] = code;
    with(res("Observation", id, body), extra)
}

fn loinc(code: &str, display: &str) -> Value {
    json!({"coding": [{"system": "http://loinc.org", "code": code, "display": display}], "text": display})
}

fn reference(r: &str) -> Value {
    json!({"reference": r})
}

/// A UCUM quantity.
fn ucum(value: f64, code: &str) -> Value {
    json!({"value": value, "unit": code, "system": "http://unitsofmeasure.org", "code": code})
}

fn patient(id: &str, family: &str) -> Value {
    res("Patient", id, json!({"name": [{"family": family}]}))
}

fn div(text: &str) -> String {
    format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{text}</div>")
}

fn encounter(id: &str, extra: Value) -> Value {
    with(
        res(
            "Encounter",
            id,
            json!({"status": "finished", "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}}),
        ),
        extra,
    )
}

fn category(code: &str) -> Value {
    json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": code}]}])
}

/// `number`: a value without prefix means the range its precision implies (`0.8` is
/// [0.75, 0.85), `0.80` is [0.795, 0.805)); `gt`/`lt`/`ge`/`le` compare with the value; `ne`
/// is the complement of the implied range; a resource with several values matches if any
/// value does.
#[actix_web::test]
async fn number_search_honours_implicit_precision_and_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let risk = |id: &str, p: &[f64]| {
        let prediction: Vec<Value> = p.iter().map(|x| json!({"probabilityDecimal": x})).collect();
        res(
            "RiskAssessment",
            id,
            json!({"status": "final", "subject": reference("Patient/p1"), "prediction": prediction}),
        )
    };
    seed!(
        app,
        risk("r50", &[0.5]),
        risk("r75", &[0.75]),
        risk("r80", &[0.8]),
        risk("r81", &[0.81]),
        risk("r85", &[0.85]),
        risk("r90", &[0.9]),
        risk("rm", &[0.1, 0.97]),
        res("RiskAssessment", "rnone", json!({"status": "final", "subject": reference("Patient/p1")})),
    );
    assert_ids!(app, "/RiskAssessment?probability=0.8", ["r75", "r80", "r81"]);
    assert_ids!(app, "/RiskAssessment?probability=eq0.8", ["r75", "r80", "r81"]);
    assert_ids!(app, "/RiskAssessment?probability=0.80", ["r80"]);
    assert_ids!(app, "/RiskAssessment?probability=0.1", ["rm"]);
    assert_ids!(app, "/RiskAssessment?probability=0.97", ["rm"]);
    assert_ids!(app, "/RiskAssessment?probability=gt0.80", ["r81", "r85", "r90", "rm"]);
    assert_ids!(app, "/RiskAssessment?probability=lt0.80", ["r50", "r75", "rm"]);
    assert_ids!(app, "/RiskAssessment?probability=ge0.80", ["r80", "r81", "r85", "r90", "rm"]);
    assert_ids!(app, "/RiskAssessment?probability=le0.80", ["r50", "r75", "r80", "rm"]);
    assert_ids!(app, "/RiskAssessment?probability=ne0.8", ["r50", "r85", "r90", "rm"]);
    assert_ids!(app, "/RiskAssessment?probability=ne0.80", ["r50", "r75", "r81", "r85", "r90", "rm"]);
    assert_ids!(app, "/RiskAssessment?probability=gt0.9", ["rm"]);
    assert_ids!(app, "/RiskAssessment?probability=lt0.2", ["rm"]);
    assert_ids!(app, "/RiskAssessment?probability=gt0.99", []);
    assert_ids!(app, "/RiskAssessment?probability=0.5,0.90", ["r50", "r90"]);
    // `ap` is "approximately" (10% recommended): 0.8 and 0.81 are, 0.5 is not.
    let ap = ids(&search!(app, "/RiskAssessment?probability=ap0.8"));
    assert!(ap.contains(&"r80".to_string()) && ap.contains(&"r81".to_string()), "ap0.8: {ap:?}");
    assert!(!ap.contains(&"r50".to_string()) && !ap.contains(&"rnone".to_string()), "ap0.8: {ap:?}");
    assert_ids!(app, "/RiskAssessment?probability:missing=true", ["rnone"]);
    rejects!(app, "/RiskAssessment?probability=abc", "probability");
    rejects!(app, "/RiskAssessment?probability=xx0.5", "probability");
}

/// `date`: values and search values are ranges (a year, a month, a day, a second); `eq` means
/// the search range contains the target's, `gt`/`lt` that the target reaches above/below it,
/// `sa`/`eb` that it starts after/ends before it. Periods may be open on either side. Time
/// zones are honoured. A malformed date is a 400 naming the parameter.
#[actix_web::test]
async fn date_search_compares_ranges_with_every_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        encounter("e1", json!({"period": {"start": "2020-01-02T10:00:00Z", "end": "2020-01-02T12:00:00Z"}})),
        encounter("e2", json!({"period": {"start": "2020-01-10", "end": "2020-02-10"}})),
        // Ongoing: no end.
        encounter("e3", json!({"period": {"start": "2021-06-01"}})),
        // No start.
        encounter("e4", json!({"period": {"end": "2019-12-30T23:00:00Z"}})),
        encounter("e5", json!({})),
    );
    assert_ids!(app, "/Encounter?date=2020", ["e1", "e2"]);
    assert_ids!(app, "/Encounter?date=eq2020", ["e1", "e2"]);
    assert_ids!(app, "/Encounter?date=2020-01", ["e1"]);
    assert_ids!(app, "/Encounter?date=2020-01-02", ["e1"]);
    // A second does not contain a two-hour period.
    assert_ids!(app, "/Encounter?date=2020-01-02T10:00:00Z", []);
    assert_ids!(app, "/Encounter?date=ne2020", ["e3", "e4"]);
    assert_ids!(app, "/Encounter?date=gt2020", ["e3"]);
    assert_ids!(app, "/Encounter?date=lt2020", ["e4"]);
    assert_ids!(app, "/Encounter?date=ge2020", ["e1", "e2", "e3"]);
    assert_ids!(app, "/Encounter?date=le2020", ["e1", "e2", "e4"]);
    assert_ids!(app, "/Encounter?date=sa2020", ["e3"]);
    assert_ids!(app, "/Encounter?date=eb2020", ["e4"]);
    assert_ids!(app, "/Encounter?date=sa2020-01-05", ["e2", "e3"]);
    assert_ids!(app, "/Encounter?date=eb2020-01-05", ["e1", "e4"]);
    assert_ids!(app, "/Encounter?date=gt2020-01-15", ["e2", "e3"]);
    assert_ids!(app, "/Encounter?date=lt2020-01-15", ["e1", "e2", "e4"]);
    assert_ids!(app, "/Encounter?date=ge2020-01-01&date=le2020-12-31", ["e1", "e2"]);
    // Open ends reach to infinity.
    assert_ids!(app, "/Encounter?date=gt2030", ["e3"]);
    assert_ids!(app, "/Encounter?date=lt1990", ["e4"]);
    let ap = ids(&search!(app, "/Encounter?date=ap2020-01-02"));
    assert!(ap.contains(&"e1".to_string()) && !ap.contains(&"e5".to_string()), "ap2020-01-02: {ap:?}");
    assert_ids!(app, "/Encounter?date:missing=true", ["e5"]);

    seed!(
        app,
        // 2020-03-02T04:30:00Z
        obs("od1", loinc("8867-4", "Heart rate"), json!({"effectiveDateTime": "2020-03-01T23:30:00-05:00"})),
        obs("od2", loinc("8867-4", "Heart rate"), json!({"effectiveDateTime": "2020-03"})),
        obs(
            "od3",
            loinc("8867-4", "Heart rate"),
            json!({"effectivePeriod": {"start": "2020-03-10T08:00:00+01:00", "end": "2020-03-10T09:00:00+01:00"}}),
        ),
        obs("od4", loinc("8867-4", "Heart rate"), json!({"effectiveInstant": "2020-03-15T12:00:00Z"})),
    );
    assert_ids!(app, "/Observation?date=2020-03-02T04:30:00Z", ["od1"]);
    assert_ids!(app, "/Observation?date=2020-03-01T23:30:00-05:00", ["od1"]);
    assert_ids!(app, format!("/Observation?date={}", enc("2020-03-02T05:30:00+01:00")), ["od1"]);
    // od1 is on 2 March in UTC, whatever its local date says.
    assert_ids!(app, "/Observation?date=lt2020-03-02T00:00:00Z", ["od2"]);
    assert_ids!(app, "/Observation?date=2020-03", ["od1", "od2", "od3", "od4"]);
    // A day does not contain a month.
    assert_ids!(app, "/Observation?date=2020-03-15", ["od4"]);
    assert_ids!(app, "/Observation?date=ne2020-03-15", ["od1", "od2", "od3"]);
    assert_ids!(app, "/Observation?date=2020-03-10", ["od3"]);
    assert_ids!(app, "/Observation?date=ge2020-03-10T07:30:00Z", ["od2", "od3", "od4"]);

    seed!(
        app,
        res("Patient", "b1", json!({"birthDate": "1974-12-25"})),
        res("Patient", "b2", json!({"birthDate": "1980"})),
        res("Patient", "b3", json!({"birthDate": "1980-06"})),
    );
    assert_ids!(app, "/Patient?birthdate=1980", ["b2", "b3"]);
    assert_ids!(app, "/Patient?birthdate=1980-06", ["b3"]);
    assert_ids!(app, "/Patient?birthdate=1980-06-15", []);
    assert_ids!(app, "/Patient?birthdate=1974-12-25", ["b1"]);
    assert_ids!(app, "/Patient?birthdate=lt1980", ["b1"]);
    assert_ids!(app, "/Patient?birthdate=ge1980-06", ["b2", "b3"]);
    assert_ids!(app, "/Patient?birthdate=eb1980-06", ["b1"]);
    assert_ids!(app, "/Patient?birthdate=sa1975", ["b2", "b3"]);

    seed!(
        app,
        res("Condition", "c1", json!({"subject": reference("Patient/b1"), "onsetDateTime": "2019-05-05"})),
        res("Condition", "c2", json!({"subject": reference("Patient/b1"), "onsetDateTime": "2021-01-01"})),
    );
    assert_ids!(app, "/Condition?onset-date=lt2020", ["c1"]);
    assert_ids!(app, "/Condition?onset-date=ge2020", ["c2"]);

    for bad in ["1980-13", "notadate", "2020-02-30", "1980-06-15T25:00:00Z", "2020-01-01T10:00:00+25:00"] {
        rejects!(app, format!("/Patient?birthdate={}", enc(bad)), "birthdate");
    }
    rejects!(app, "/Encounter?date=2020-1-1", "date");
    rejects!(app, "/Condition?onset-date=xx2020", "onset-date");
}

/// `string`: by default a case- and accent-insensitive match of the start of any part;
/// `:exact` the whole string, case and accents included; `:contains` anywhere. Prefixes up to
/// six characters are answered by postings, longer ones checked on the documents they find.
#[actix_web::test]
async fn string_search_prefix_exact_contains_case_and_accents() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        res(
            "Patient",
            "n1",
            json!({"name": [{"family": "Smith", "given": ["John", "Jacob"]}],
                   "address": [{"line": ["12 Elm Street"], "city": "Springfield", "postalCode": "12345", "country": "US"}]}),
        ),
        res(
            "Patient",
            "n2",
            json!({"name": [{"family": "Smithson", "given": ["Anna"]}], "address": [{"city": "Shelbyville"}]}),
        ),
        res("Patient", "n3", json!({"name": [{"family": "Müller", "given": ["Zoë"]}]})),
        res("Patient", "n4", json!({"name": [{"family": "Blacksmith", "given": ["Eve"]}]})),
        res("Patient", "n5", json!({"name": [{"family": "SMITH", "given": ["Bob"]}]})),
    );
    assert_ids!(app, "/Patient?name=smith", ["n1", "n2", "n5"]);
    assert_ids!(app, "/Patient?name=SMITH", ["n1", "n2", "n5"]);
    assert_ids!(app, "/Patient?name=smi", ["n1", "n2", "n5"]);
    assert_ids!(app, "/Patient?name=jacob", ["n1"]);
    assert_ids!(app, "/Patient?name=eve", ["n4"]);
    assert_ids!(app, "/Patient?family=smith", ["n1", "n2", "n5"]);
    assert_ids!(app, "/Patient?family:exact=Smith", ["n1"]);
    assert_ids!(app, "/Patient?family:exact=smith", []);
    assert_ids!(app, "/Patient?family:exact=SMITH", ["n5"]);
    assert_ids!(app, "/Patient?family:exact=Smit", []);
    assert_ids!(app, "/Patient?name:contains=mith", ["n1", "n2", "n4", "n5"]);
    assert_ids!(app, "/Patient?family:contains=SMITH", ["n1", "n2", "n4", "n5"]);
    assert_ids!(app, "/Patient?given=j", ["n1"]);
    assert_ids!(app, "/Patient?given=ann", ["n2"]);
    // Accents: "Zoë" is found by "zoe" and "ZOË", "Müller" by "muller".
    assert_ids!(app, "/Patient?name=zoe", ["n3"]);
    assert_ids!(app, "/Patient?given=zoe", ["n3"]);
    assert_ids!(app, format!("/Patient?name={}", enc("ZOË")), ["n3"]);
    assert_ids!(app, "/Patient?family=muller", ["n3"]);
    assert_ids!(app, format!("/Patient?family={}", enc("mül")), ["n3"]);
    assert_ids!(app, format!("/Patient?family:exact={}", enc("Müller")), ["n3"]);
    assert_ids!(app, "/Patient?family:exact=Muller", []);
    // Address: any part, or the city alone.
    assert_ids!(app, "/Patient?address=spring", ["n1"]);
    assert_ids!(app, format!("/Patient?address={}", enc("12 elm")), ["n1"]);
    assert_ids!(app, "/Patient?address=elm", []);
    assert_ids!(app, "/Patient?address:contains=elm", ["n1"]);
    assert_ids!(app, "/Patient?address=12345", ["n1"]);
    assert_ids!(app, "/Patient?address-city=springfield", ["n1"]);
    assert_ids!(app, "/Patient?address-city=shelby", ["n2"]);
    assert_ids!(app, "/Patient?address-city:exact=Springfield", ["n1"]);
    assert_ids!(app, "/Patient?address-city:exact=springfield", []);
    assert_ids!(app, "/Patient?address-city:contains=field", ["n1"]);
    assert_ids!(app, "/Patient?name=nobody", []);
    // Values are posted under their first six characters: longer prefixes are checked on
    // those documents, and a changed name leaves its old prefixes.
    assert_ids!(app, "/Patient?name=smithso", ["n2"]);
    assert_ids!(app, "/Patient?name=smithsonian", []);
    assert_ids!(app, "/Patient?family:exact=Smithson", ["n2"]);
    assert_ids!(app, "/Patient?name=blacksm", ["n4"]);
    seed!(app, res("Patient", "n4", json!({"name": [{"family": "Smithers", "given": ["Eve"]}]})));
    assert_ids!(app, "/Patient?name=black", []);
    assert_ids!(app, "/Patient?name=smithe", ["n4"]);
    assert_ids!(app, "/Patient?name=smi", ["n1", "n2", "n4", "n5"]);

    seed!(
        app,
        obs("vs1", loinc("5778-6", "Color of Urine"), json!({"valueString": "Pale yellow"})),
        obs("vs2", loinc("5778-6", "Color of Urine"), json!({"valueString": "Amber"})),
    );
    assert_ids!(app, "/Observation?value-string=pale", ["vs1"]);
    assert_ids!(app, format!("/Observation?value-string:exact={}", enc("Pale yellow")), ["vs1"]);
    assert_ids!(app, "/Observation?value-string:contains=yell", ["vs1"]);
}

/// `token`: `code`, `system|code`, `|code` (no system), `system|`; `:text`, `:not` (which
/// includes resources without the element), `:of-type`, `:in`/`:not-in` with R4 value sets;
/// booleans, ContactPoints and identifiers.
#[actix_web::test]
async fn token_search_systems_codes_and_modifiers() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let v2 = "http://terminology.hl7.org/CodeSystem/v2-0203";
    seed!(
        app,
        obs("oa", loinc("8867-4", "Heart rate"), json!({"category": category("vital-signs")})),
        obs(
            "ob",
            json!({"coding": [{"system": "http://example.org/codes", "code": "8867-4", "display": "Pulse rate"}]}),
            json!({"category": category("laboratory")}),
        ),
        obs("oc", json!({"coding": [{"code": "8867-4"}]}), json!({"status": "preliminary"})),
        obs("od", loinc("29463-7", "Body weight"), json!({"status": "amended", "category": category("vital-signs")})),
        obs(
            "oe",
            loinc("2339-0", "Glucose"),
            json!({"category": [{"coding": [{"system": "http://example.org/cat", "code": "custom"}]}],
                   "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "260385009"}], "text": "Negative"}}),
        ),
    );
    assert_ids!(app, "/Observation?code=8867-4", ["oa", "ob", "oc"]);
    assert_ids!(app, "/Observation?code=http://loinc.org|8867-4", ["oa"]);
    assert_ids!(app, "/Observation?code=http://example.org/codes|8867-4", ["ob"]);
    assert_ids!(app, "/Observation?code=|8867-4", ["oc"]);
    assert_ids!(app, "/Observation?code=http://loinc.org|", ["oa", "od", "oe"]);
    assert_ids!(app, "/Observation?code=http://loinc.org|8867-4,http://example.org/codes|8867-4", ["oa", "ob"]);
    assert_ids!(app, "/Observation?code=8867", [], "a token is not a prefix match");
    assert_ids!(app, "/Observation?code:text=heart", ["oa"]);
    assert_ids!(app, "/Observation?code:text=pulse", ["ob"]);
    assert_ids!(app, "/Observation?code:text=body", ["od"]);
    assert_ids!(app, "/Observation?code:in=http://hl7.org/fhir/ValueSet/observation-vitalsignresult", ["oa", "od"]);
    assert_ids!(
        app,
        "/Observation?code:not-in=http://hl7.org/fhir/ValueSet/observation-vitalsignresult",
        ["ob", "oc", "oe"]
    );
    let vital = "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";
    assert_ids!(app, format!("/Observation?category={vital}"), ["oa", "od"]);
    assert_ids!(app, format!("/Observation?category:not={vital}"), ["ob", "oc", "oe"]);
    assert_ids!(app, "/Observation?category:in=http://hl7.org/fhir/ValueSet/observation-category", ["oa", "ob", "od"]);
    let not_in = ids(&search!(app, "/Observation?category:not-in=http://hl7.org/fhir/ValueSet/observation-category"));
    assert!(not_in.contains(&"oe".to_string()), "a category outside the value set: {not_in:?}");
    assert!(!["oa", "ob", "od"].iter().any(|id| not_in.contains(&id.to_string())), "{not_in:?}");
    assert_ids!(app, "/Observation?status=final", ["oa", "ob", "oe"]);
    assert_ids!(app, "/Observation?status:not=final", ["oc", "od"]);
    assert_ids!(app, "/Observation?status=final,amended", ["oa", "ob", "od", "oe"]);
    assert_ids!(app, "/Observation?status=http://hl7.org/fhir/observation-status|amended", ["od"]);
    assert_ids!(app, "/Observation?value-concept=http://snomed.info/sct|260385009", ["oe"]);
    assert_ids!(app, "/Observation?value-concept:text=negative", ["oe"]);

    seed!(
        app,
        res(
            "Patient",
            "t1",
            json!({"gender": "male", "active": true, "deceasedBoolean": false,
                   "identifier": [{"type": {"coding": [{"system": v2, "code": "MR"}]}, "system": "urn:mrn", "value": "12345"}],
                   "telecom": [{"system": "phone", "value": "555-0101"}, {"system": "email", "value": "a@example.org"}]}),
        ),
        res(
            "Patient",
            "t2",
            json!({"gender": "female", "active": false, "deceasedDateTime": "2020-01-01",
                   "identifier": [{"type": {"coding": [{"system": v2, "code": "DL"}]}, "system": "urn:dl", "value": "12345"}]}),
        ),
        res(
            "Patient",
            "t3",
            json!({"deceasedBoolean": true, "identifier": [{"system": "urn:mrn", "value": "999"}],
                   "telecom": [{"system": "email", "value": "555-0101"}]}),
        ),
        res("Patient", "t4", json!({"gender": "other", "active": true})),
    );
    assert_ids!(app, "/Patient?gender=male", ["t1"]);
    assert_ids!(app, "/Patient?gender=http://hl7.org/fhir/administrative-gender|female", ["t2"]);
    assert_ids!(app, "/Patient?gender=male,female", ["t1", "t2"]);
    assert_ids!(app, "/Patient?gender:not=male", ["t2", "t3", "t4"]);
    assert_ids!(app, "/Patient?gender:in=http://hl7.org/fhir/ValueSet/administrative-gender", ["t1", "t2", "t4"]);
    assert_ids!(app, "/Patient?active=true", ["t1", "t4"]);
    assert_ids!(app, "/Patient?active=false", ["t2"]);
    assert_ids!(app, "/Patient?active:missing=true", ["t3"]);
    // `deceased` is `deceased.exists() and deceased != false`: a date counts as deceased; a
    // patient without the element evaluates to false.
    assert_ids!(app, "/Patient?deceased=true", ["t2", "t3"]);
    assert_ids!(app, "/Patient?deceased=false", ["t1", "t4"]);
    assert_ids!(app, "/Patient?identifier=urn:mrn|12345", ["t1"]);
    assert_ids!(app, "/Patient?identifier=12345", ["t1", "t2"]);
    assert_ids!(app, "/Patient?identifier=urn:mrn|", ["t1", "t3"]);
    assert_ids!(app, format!("/Patient?identifier:of-type={v2}|MR|12345"), ["t1"]);
    assert_ids!(app, format!("/Patient?identifier:of-type={v2}|DL|12345"), ["t2"]);
    assert_ids!(app, format!("/Patient?identifier:of-type={v2}|MR|999"), []);
    assert_ids!(app, "/Patient?phone=555-0101", ["t1"]);
    assert_ids!(app, "/Patient?email=555-0101", ["t3"]);
    assert_ids!(app, "/Patient?telecom=phone|555-0101", ["t1"]);
    assert_ids!(app, "/Patient?telecom=555-0101", ["t1", "t3"]);
    assert_ids!(app, format!("/Patient?email={}", enc("a@example.org")), ["t1"]);
}

/// `reference`: an id alone, `Type/id`, an absolute URL on this server's base, `:Type`,
/// `:identifier` on a logical reference; a reference elsewhere is not a local one, and a type
/// the parameter cannot point at finds nothing.
#[actix_web::test]
async fn reference_search_forms_and_modifiers() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        patient("p1", "Smith"),
        patient("p2", "Jones"),
        res("Group", "g1", json!({"type": "person", "actual": true})),
        res("Practitioner", "pr1", json!({"name": [{"family": "House"}]})),
        obs("r1", loinc("8867-4", "Heart rate"), json!({"subject": reference("Patient/p1")})),
        obs("r2", loinc("8867-4", "Heart rate"), json!({"subject": reference("Group/g1")})),
        obs(
            "r3",
            loinc("8867-4", "Heart rate"),
            json!({"subject": reference("http://other.example.org/fhir/Patient/x9")}),
        ),
        obs(
            "r4",
            loinc("8867-4", "Heart rate"),
            json!({"subject": {"identifier": {"system": "urn:mrn", "value": "42"}, "display": "A. Patient"}}),
        ),
        obs(
            "r5",
            loinc("8867-4", "Heart rate"),
            json!({"subject": reference("Patient/p2"), "performer": [reference("Practitioner/pr1")]}),
        ),
    );
    assert_ids!(app, "/Observation?subject=p1", ["r1"]);
    assert_ids!(app, "/Observation?subject=Patient/p1", ["r1"]);
    assert_ids!(app, "/Observation?subject:Patient=p1", ["r1"]);
    assert_ids!(app, "/Observation?subject=g1", ["r2"]);
    assert_ids!(app, "/Observation?subject=Group/g1", ["r2"]);
    assert_ids!(app, "/Observation?subject:Group=g1", ["r2"]);
    assert_ids!(app, "/Observation?subject:Patient=g1", []);
    assert_ids!(app, "/Observation?subject=Patient/p1,Group/g1", ["r1", "r2"]);
    assert_ids!(app, "/Observation?subject=http://other.example.org/fhir/Patient/x9", ["r3"]);
    assert_ids!(app, "/Observation?subject=Patient/x9", [], "a reference to another server is not a local one");
    assert_ids!(app, "/Observation?subject:identifier=urn:mrn|42", ["r4"]);
    assert_ids!(app, "/Observation?subject:identifier=urn:mrn|43", []);
    assert_ids!(app, "/Observation?patient=p1", ["r1"]);
    assert_ids!(app, "/Observation?patient=Patient/p2", ["r5"]);
    // `patient` only points at Patients; Encounter is no target of `subject`.
    assert_ids!(app, "/Observation?patient=Group/g1", []);
    assert_ids!(app, "/Observation?subject=Encounter/p1", []);
    assert_ids!(app, "/Observation?performer=Practitioner/pr1", ["r5"]);
    assert_ids!(app, "/Observation?performer:Practitioner=pr1", ["r5"]);
    assert_ids!(app, "/Observation?performer=pr1", ["r5"]);

    // A bare id finds a reference of a type the parameter does not allow (the data is not
    // refused for it), and one of a parameter that allows any type (posted differently:
    // docs/search.md, "Postings").
    seed!(
        app,
        res("Medication", "m1", json!({})),
        obs("r6", loinc("8867-4", "Heart rate"), json!({"subject": reference("Medication/m1")})),
        res(
            "Provenance",
            "pv1",
            json!({"target": [reference("Observation/r1"), reference("Patient/p2")],
                   "recorded": "2024-01-01T00:00:00Z",
                   "agent": [{"who": reference("Practitioner/pr1")}]}),
        ),
    );
    assert_ids!(app, "/Observation?subject=m1", ["r6"]);
    assert_ids!(app, "/Observation?subject=Medication/m1", ["r6"]);
    assert_ids!(app, "/Provenance?target=r1", ["pv1"]);
    assert_ids!(app, "/Provenance?target=Observation/r1", ["pv1"]);
    assert_ids!(app, "/Provenance?target=p2", ["pv1"]);
    assert_ids!(app, "/Provenance?target=Patient/r1", []);
    assert_ids!(app, "/Provenance?agent=pr1", ["pv1"]);

    // An absolute URL on this server's own base is the local reference.
    let found = search!(app, "/Patient?_id=p1");
    let full = found["entry"][0]["fullUrl"].as_str().expect("fullUrl").to_string();
    let base = full.strip_suffix("/Patient/p1").expect("fullUrl is base/Patient/p1").to_string();
    assert_ids!(app, format!("/Observation?subject={}", enc(&format!("{base}/Patient/p1"))), ["r1"]);

    // A reference changed by an update is found under the new target only.
    seed!(app, obs("r1", loinc("8867-4", "Heart rate"), json!({"subject": reference("Patient/p2")})));
    assert_ids!(app, "/Observation?subject=p1", []);
    assert_ids!(app, "/Observation?subject=Patient/p1", []);
    assert_ids!(app, "/Observation?subject=p2", ["r1", "r5"]);
    assert_ids!(app, "/Observation?patient=p2", ["r1", "r5"]);
}

/// `composite`: both parts must hold for the same value — for `component-code-value-quantity`
/// within the same component.
#[actix_web::test]
async fn composite_search_matches_within_one_component() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let bp = |id: &str, sys: f64, dia: f64| {
        obs(
            id,
            loinc("85354-9", "Blood pressure panel"),
            json!({"subject": reference("Patient/p1"), "component": [
                {"code": loinc("8480-6", "Systolic blood pressure"), "valueQuantity": ucum(sys, "mm[Hg]")},
                {"code": loinc("8462-4", "Diastolic blood pressure"), "valueQuantity": ucum(dia, "mm[Hg]")}
            ]}),
        )
    };
    seed!(
        app,
        bp("bp1", 120.0, 80.0),
        bp("bp2", 150.0, 95.0),
        obs("sys1", loinc("8480-6", "Systolic blood pressure"), json!({"valueQuantity": ucum(130.0, "mm[Hg]")})),
        obs("hr", loinc("8867-4", "Heart rate"), json!({"valueQuantity": ucum(72.0, "/min")})),
        obs(
            "urine",
            loinc("5792-7", "Glucose [Mass/volume] in Urine"),
            json!({"valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "260385009"}]}}),
        ),
    );
    let q = |param: &str, value: &str| format!("/Observation?{param}={}", enc(value));
    assert_ids!(app, q("code-value-quantity", "http://loinc.org|8480-6$gt100"), ["sys1"]);
    assert_ids!(app, q("code-value-quantity", "http://loinc.org|8480-6$gt140"), []);
    assert_ids!(app, q("code-value-quantity", "8480-6$130"), ["sys1"]);
    assert_ids!(app, q("code-value-quantity", "http://loinc.org|8867-4$lt100"), ["hr"]);
    assert_ids!(app, q("component-code-value-quantity", "http://loinc.org|8480-6$gt100"), ["bp1", "bp2"]);
    assert_ids!(app, q("component-code-value-quantity", "http://loinc.org|8480-6$gt140"), ["bp2"]);
    // bp1 and bp2 have a value above 100, but not in their diastolic component.
    assert_ids!(app, q("component-code-value-quantity", "http://loinc.org|8462-4$gt100"), []);
    assert_ids!(app, q("component-code-value-quantity", "http://loinc.org|8462-4$gt90"), ["bp2"]);
    assert_ids!(app, q("component-code-value-quantity", "http://loinc.org|8462-4$lt85"), ["bp1"]);
    assert_ids!(
        app,
        q("component-code-value-quantity", "http://loinc.org|8480-6$gt140|http://unitsofmeasure.org|mm[Hg]"),
        ["bp2"]
    );
    // OR within a parameter, AND across repeats (each part within one component).
    assert_ids!(
        app,
        q("component-code-value-quantity", "http://loinc.org|8462-4$gt90,http://loinc.org|8480-6$lt125"),
        ["bp1", "bp2"]
    );
    let both = |a: &str, b: &str| {
        format!("/Observation?component-code-value-quantity={}&component-code-value-quantity={}", enc(a), enc(b))
    };
    assert_ids!(app, both("http://loinc.org|8480-6$gt140", "http://loinc.org|8462-4$lt85"), []);
    assert_ids!(app, both("http://loinc.org|8480-6$gt110", "http://loinc.org|8462-4$lt85"), ["bp1"]);
    assert_ids!(app, q("combo-code-value-quantity", "http://loinc.org|8480-6$gt125"), ["bp2", "sys1"]);
    assert_ids!(app, q("component-code", "http://loinc.org|8480-6"), ["bp1", "bp2"]);
    assert_ids!(app, q("combo-code", "http://loinc.org|8480-6"), ["bp1", "bp2", "sys1"]);
    assert_ids!(app, q("component-value-quantity", "gt140"), ["bp2"]);
    // `combo-value-quantity` is `value-quantity` and `component-value-quantity` together, and
    // searched through their postings (docs/search.md): each of two conditions may hold by a
    // value of another branch, so neither reads the other's range.
    assert_ids!(app, q("combo-value-quantity", "gt140"), ["bp2"]);
    assert_ids!(app, q("combo-value-quantity", "lt75"), ["hr"]);
    assert_ids!(app, q("combo-value-quantity", "ge125"), ["bp2", "sys1"]);
    assert_ids!(app, "/Observation?combo-value-quantity=gt140&combo-value-quantity=lt100", ["bp2"]);
    assert_ids!(app, "/Observation?combo-value-quantity=gt125&combo-value-quantity=lt125", ["bp2"]);
    assert_ids!(app, "/Observation?combo-value-quantity=gt200&combo-value-quantity=lt90", []);
    assert_ids!(app, q("combo-value-concept", "http://snomed.info/sct|260385009"), ["urine"]);
    assert_ids!(app, "/Observation?combo-code=8480-6&combo-value-quantity=lt125", ["bp1", "bp2"]);
    seed!(
        app,
        obs(
            "mixed",
            loinc("2339-0", "Glucose"),
            json!({"valueQuantity": ucum(200.0, "mg"),
                   "component": [{"code": loinc("2345-7", "Glucose"), "valueQuantity": ucum(10.0, "mg")}]}),
        ),
    );
    assert_ids!(app, "/Observation?combo-value-quantity=gt150&combo-value-quantity=lt20", ["mixed"]);
    assert_ids!(app, "/Observation?value-quantity=gt150&value-quantity=lt20", []);
    assert_ids!(app, "/Observation?combo-code=2345-7", ["mixed"]);
    assert_ids!(app, q("code-value-concept", "http://loinc.org|5792-7$http://snomed.info/sct|260385009"), ["urine"]);
    assert_ids!(app, q("code-value-concept", "http://loinc.org|5792-7$http://snomed.info/sct|0"), []);
    rejects!(app, q("component-code-value-quantity", "http://loinc.org|8480-6"), "component-code-value-quantity");
}

/// A range over many buckets (more postings than a union once read as streams) pages through
/// every match exactly once, alone and intersected with a second such range.
#[actix_web::test]
async fn a_range_over_many_buckets_pages_through_every_match_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let code = loinc("2339-0", "Glucose");
    // Half an octave apart: each value in a bucket of its own, three resources in each. Created
    // out of value order and round by round, so every bucket's keys are spread among the others'
    // and one page's scan moves each posting on more than once.
    let value = |i: i32| 2f64.powf(f64::from(i) / 2.0);
    for round in 0..3 {
        for i in (0..40).map(|n| (n * 17) % 40) {
            let id = format!("v{i:02}-{round}");
            seed!(app, obs(&id, code.clone(), json!({"valueQuantity": ucum(value(i), "mg")})));
        }
    }
    let expect = |keep: &dyn Fn(f64) -> bool| {
        let mut v: Vec<String> = (0..40)
            .filter(|&i| keep(value(i)))
            .flat_map(|i| (0..3).map(move |round| format!("v{i:02}-{round}")))
            .collect();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<String>| {
        let n = v.len();
        v.sort();
        v.dedup();
        assert_eq!(v.len(), n, "no match twice");
        v
    };
    let unit = "http://unitsofmeasure.org|mg";
    let above =
        sorted(all_pages!(app, format!("/Observation?value-quantity={}&_count=50", enc(&format!("gt1|{unit}")))));
    assert_eq!(above, expect(&|x| x > 1.0));
    let between = sorted(all_pages!(
        app,
        format!(
            "/Observation?value-quantity={}&value-quantity={}&_count=20",
            enc(&format!("ge4|{unit}")),
            enc(&format!("lt1000|{unit}"))
        )
    ));
    assert_eq!(between, expect(&|x| (4.0..1000.0).contains(&x)));
    assert_eq!(between.len(), 48);
}

/// `quantity`: `value`, `value|system|code`, `value||code` (code or unit), prefixes, and
/// the implied precision of the number.
#[actix_web::test]
async fn quantity_search_values_units_and_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let code = loinc("2339-0", "Glucose");
    seed!(
        app,
        obs("q1", code.clone(), json!({"valueQuantity": ucum(5.4, "mg")})),
        obs(
            "q2",
            code.clone(),
            json!({"valueQuantity": {"value": 5.4, "unit": "mg", "system": "http://example.org/units", "code": "milligram"}}),
        ),
        obs("q3", code.clone(), json!({"valueQuantity": ucum(5.4, "%")})),
        obs("q4", code.clone(), json!({"valueQuantity": ucum(10.0, "mg")})),
        obs("q5", code.clone(), json!({"valueQuantity": ucum(5.38, "mg")})),
        obs("q6", code.clone(), json!({"valueString": "not measured"})),
    );
    let q = |v: &str| format!("/Observation?value-quantity={}", enc(v));
    assert_ids!(app, q("5.4"), ["q1", "q2", "q3", "q5"]);
    assert_ids!(app, q("5.40"), ["q1", "q2", "q3"]);
    assert_ids!(app, q("eq5.4"), ["q1", "q2", "q3", "q5"]);
    assert_ids!(app, q("5.4|http://unitsofmeasure.org|mg"), ["q1", "q5"]);
    // `||mg`: the code or the unit is mg, whatever the system.
    assert_ids!(app, q("5.4||mg"), ["q1", "q2", "q5"]);
    assert_ids!(app, q("5.4|http://example.org/units|milligram"), ["q2"]);
    assert_ids!(app, q("5.4|http://unitsofmeasure.org|%"), ["q3"]);
    assert_ids!(app, q("10|http://unitsofmeasure.org|mg"), ["q4"]);
    assert_ids!(app, q("gt5.40"), ["q4"]);
    assert_ids!(app, q("gt5.40||mg"), ["q4"]);
    assert_ids!(app, q("gt5.40|http://unitsofmeasure.org|%"), []);
    assert_ids!(app, q("lt5.40"), ["q5"]);
    assert_ids!(app, q("ge5.40"), ["q1", "q2", "q3", "q4"]);
    assert_ids!(app, q("le5.40||mg"), ["q1", "q2", "q5"]);
    assert_ids!(app, q("ne5.4"), ["q4"]);
    assert_ids!(app, "/Observation?value-quantity=gt5.00&value-quantity=lt6.00", ["q1", "q2", "q3", "q5"]);
    let ap = ids(&search!(app, q("ap5.4|http://unitsofmeasure.org|mg")));
    assert!(ap.contains(&"q1".to_string()) && ap.contains(&"q5".to_string()), "ap5.4 mg: {ap:?}");
    assert!(!ap.contains(&"q4".to_string()) && !ap.contains(&"q3".to_string()), "ap5.4 mg: {ap:?}");
    assert_ids!(app, "/Observation?value-quantity:missing=true", ["q6"]);
    rejects!(app, q("abc"), "value-quantity");
    rejects!(app, q("xx5.4"), "value-quantity");
}

/// `uri`: exact (case-sensitive) match, `:below` (the URL starts with the value) and `:above`
/// (the value starts with the URL).
#[actix_web::test]
async fn uri_search_exact_below_and_above() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let vs = |id: &str, url: &str| res("ValueSet", id, json!({"url": url, "status": "active"}));
    seed!(
        app,
        vs("v1", "http://example.org/fhir/ValueSet/abc"),
        vs("v2", "http://example.org/fhir/ValueSet/abc/123"),
        vs("v3", "http://example.org/fhir/ValueSet/xyz"),
        vs("v4", "http://other.org/ValueSet/abc"),
        res("ValueSet", "v5", json!({"status": "draft"})),
        res(
            "CodeSystem",
            "cs1",
            json!({"url": "http://example.org/fhir/CodeSystem/colors", "status": "active", "content": "complete"}),
        ),
    );
    assert_ids!(app, "/ValueSet?url=http://example.org/fhir/ValueSet/abc", ["v1"]);
    assert_ids!(app, "/ValueSet?url=http://example.org/fhir/ValueSet/ABC", []);
    assert_ids!(app, "/ValueSet?url=http://example.org/fhir/ValueSet", [], "uri is not a prefix match");
    assert_ids!(app, "/ValueSet?url:below=http://example.org/fhir/ValueSet/", ["v1", "v2", "v3"]);
    assert_ids!(app, "/ValueSet?url:below=http://example.org/fhir/ValueSet/abc", ["v1", "v2"]);
    assert_ids!(app, "/ValueSet?url:below=http://example.org/fhir/", ["v1", "v2", "v3"]);
    assert_ids!(app, "/ValueSet?url:above=http://example.org/fhir/ValueSet/abc/123", ["v1", "v2"]);
    assert_ids!(app, "/ValueSet?url:above=http://example.org/fhir/ValueSet/abc/123/456", ["v1", "v2"]);
    assert_ids!(app, "/ValueSet?url:above=http://example.org/fhir/ValueSet/xyz", ["v3"]);
    assert_ids!(app, "/ValueSet?url:missing=true", ["v5"]);
    assert_ids!(app, "/ValueSet?url=http://other.org/ValueSet/abc,http://example.org/fhir/ValueSet/xyz", ["v3", "v4"]);
    assert_ids!(app, "/CodeSystem?url=http://example.org/fhir/CodeSystem/colors", ["cs1"]);
    assert_ids!(app, "/CodeSystem?system=http://example.org/fhir/CodeSystem/colors", ["cs1"]);
    assert_ids!(app, "/CodeSystem?url:below=http://example.org/fhir/", ["cs1"]);
}

/// `:missing=true` finds resources without a value for the parameter, `:missing=false` those
/// with one, for every parameter type.
#[actix_web::test]
async fn missing_modifier_on_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        res("Organization", "org1", json!({"name": "Acme"})),
        res(
            "Patient",
            "m1",
            json!({"name": [{"family": "Full"}], "gender": "female", "birthDate": "1990-01-01",
                   "managingOrganization": reference("Organization/org1")}),
        ),
        res("Patient", "m2", json!({"active": true})),
        res("Patient", "m3", json!({"name": [{"family": "Named"}]})),
        obs(
            "x1",
            loinc("2339-0", "Glucose"),
            json!({"valueQuantity": ucum(5.0, "mg"), "effectiveDateTime": "2020-01-01", "subject": reference("Patient/m1")}),
        ),
        obs("x2", loinc("2339-0", "Glucose"), json!({"valueString": "n/a"})),
    );
    assert_ids!(app, "/Patient?name:missing=true", ["m2"]);
    assert_ids!(app, "/Patient?name:missing=false", ["m1", "m3"]);
    assert_ids!(app, "/Patient?family:missing=true", ["m2"]);
    assert_ids!(app, "/Patient?gender:missing=true", ["m2", "m3"]);
    assert_ids!(app, "/Patient?gender:missing=false", ["m1"]);
    assert_ids!(app, "/Patient?birthdate:missing=true", ["m2", "m3"]);
    assert_ids!(app, "/Patient?birthdate:missing=false", ["m1"]);
    assert_ids!(app, "/Patient?organization:missing=true", ["m2", "m3"]);
    assert_ids!(app, "/Patient?organization:missing=false", ["m1"]);
    assert_ids!(app, "/Patient?identifier:missing=true", ["m1", "m2", "m3"]);
    assert_ids!(app, "/Patient?identifier:missing=false", []);
    assert_ids!(app, "/Observation?value-quantity:missing=true", ["x2"]);
    assert_ids!(app, "/Observation?value-quantity:missing=false", ["x1"]);
    assert_ids!(app, "/Observation?date:missing=true", ["x2"]);
    assert_ids!(app, "/Observation?subject:missing=true", ["x2"]);
    assert_ids!(app, "/Observation?subject:missing=false", ["x1"]);
    assert_ids!(app, "/Observation?value-string:missing=false", ["x2"]);
    assert_ids!(app, "/Patient?gender:missing=true&name:missing=false", ["m3"]);
    rejects!(app, "/Patient?gender:missing=maybe", "gender");
}

/// A comma is OR within one parameter, a repeated parameter is AND; `\,` is a literal comma.
#[actix_web::test]
async fn comma_is_or_and_repetition_is_and() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        res("Patient", "a1", json!({"name": [{"family": "Smith", "given": ["John", "Jacob"]}]})),
        res("Patient", "a2", json!({"name": [{"family": "Smith", "given": ["Anna"]}]})),
        res("Patient", "a3", json!({"name": [{"family": "Jones", "given": ["John"]}]})),
        res("Patient", "a4", json!({"name": [{"family": "Doe,Jr", "given": ["Jim"]}]})),
    );
    assert_ids!(app, "/Patient?given=john,anna", ["a1", "a2", "a3"]);
    assert_ids!(app, "/Patient?given=john&given=jacob", ["a1"]);
    assert_ids!(app, "/Patient?given=john&family=smith", ["a1"]);
    assert_ids!(app, "/Patient?given=anna&given=john", []);
    assert_ids!(app, "/Patient?family=smith,jones&given=jacob", ["a1"]);
    assert_ids!(app, "/Patient?family=smith,jones&given=john,anna", ["a1", "a2", "a3"]);
    assert_ids!(app, "/Patient?family=doe,jones", ["a3", "a4"]);
    assert_ids!(app, format!("/Patient?family={}", enc("doe\\,jr")), ["a4"]);
    assert_ids!(app, format!("/Patient?family={}", enc("jones\\,jr")), []);
    assert_ids!(app, "/Patient?_id=a1,a3", ["a1", "a3"]);
    assert_ids!(app, "/Patient?_id=a1&_id=a3", []);
    assert_ids!(app, "/Patient?_id=a1,a3&given=jacob", ["a1"]);
}

/// `_sort`: one key, descending, several keys, `_lastUpdated`, `_id`; equal keys are ordered
/// by id (docs/search.md); a search without `_sort` keeps creation order.
#[actix_web::test]
async fn sort_orders_by_keys_with_id_order_for_ties() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let p = |id: &str, family: &str, birth: &str| {
        res("Patient", id, json!({"name": [{"family": family}], "birthDate": birth}))
    };
    // Creation order: c, e, a, d, b; a few milliseconds apart, so `_lastUpdated` has no ties.
    for patient in [
        p("c", "Brown", "1980-01-01"),
        p("e", "Adams", "1990-05-05"),
        p("a", "Brown", "1985-03-03"),
        p("d", "Clark", "1970-07-07"),
        p("b", "Adams", "1990-05-05"),
    ] {
        seed!(app, patient);
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    assert_order!(app, "/Patient", ["c", "e", "a", "d", "b"]);
    assert_order!(app, "/Patient?_sort=family", ["b", "e", "a", "c", "d"]);
    assert_order!(app, "/Patient?_sort=-family", ["d", "a", "c", "b", "e"]);
    assert_order!(app, "/Patient?_sort=family,-birthdate", ["b", "e", "a", "c", "d"]);
    assert_order!(app, "/Patient?_sort=family,birthdate", ["b", "e", "c", "a", "d"]);
    assert_order!(app, "/Patient?_sort=birthdate", ["d", "c", "a", "b", "e"]);
    assert_order!(app, "/Patient?_sort=-birthdate", ["b", "e", "a", "c", "d"]);
    assert_order!(app, "/Patient?_sort=-birthdate,family", ["b", "e", "a", "c", "d"]);
    assert_order!(app, "/Patient?_sort=_id", ["a", "b", "c", "d", "e"]);
    assert_order!(app, "/Patient?_sort=-_id", ["e", "d", "c", "b", "a"]);
    assert_order!(app, "/Patient?family=brown&_sort=-birthdate", ["a", "c"]);
    assert_order!(app, "/Patient?_sort=_lastUpdated", ["c", "e", "a", "d", "b"]);
    assert_eq!(all_pages!(app, "/Patient?_sort=family&_count=2"), ["b", "e", "a", "c", "d"], "sorted pages");

    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    seed!(app, with(p("a", "Brown", "1985-03-03"), json!({"active": true})));
    assert_order!(app, "/Patient?_sort=_lastUpdated", ["c", "e", "d", "b", "a"]);
    assert_order!(app, "/Patient?_sort=-_lastUpdated", ["a", "b", "d", "e", "c"]);
    assert_order!(app, "/Patient", ["c", "e", "a", "d", "b"], "an update keeps the creation order");
}

/// `_sort` on a date, number or quantity parameter reads each match's sort record, not its
/// document: with several values a resource sorts by its least one ascending and its greatest
/// one descending, and one without a value comes last either way; a changed resource sorts by
/// what it holds now; a quantity sorts by value.
#[actix_web::test]
async fn sort_by_a_date_with_several_values_uses_the_least_or_the_greatest() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let goal = |id: &str, dues: &[&str]| {
        let target: Vec<Value> = dues.iter().map(|d| json!({"dueDate": d})).collect();
        let mut g =
            json!({"lifecycleStatus": "active", "description": {"text": id}, "subject": {"reference": "Patient/p"}});
        if !target.is_empty() {
            g["target"] = Value::Array(target);
        }
        res("Goal", id, g)
    };
    for g in [
        goal("wide", &["2020-01-01", "2024-01-01"]),
        goal("mid", &["2022-01-01"]),
        goal("none", &[]),
        goal("late", &["2023-06-01"]),
    ] {
        seed!(app, g);
    }
    assert_order!(app, "/Goal?_sort=target-date", ["wide", "mid", "late", "none"]);
    assert_order!(app, "/Goal?_sort=-target-date", ["wide", "late", "mid", "none"]);
    assert_order!(app, "/Goal?subject=Patient/p&_sort=-target-date&_count=2", ["wide", "late"]);
    // A changed value moves the resource.
    seed!(app, goal("mid", &["2025-01-01"]));
    assert_order!(app, "/Goal?_sort=-target-date", ["mid", "wide", "late", "none"]);

    let obs = |id: &str, v: f64| {
        res(
            "Observation",
            id,
            json!({"status": "final", "code": {"text": "w"}, "valueQuantity": {"value": v, "unit": "kg"}}),
        )
    };
    for o in [obs("o1", 70.5), obs("o2", 8.0), obs("o3", 100.0)] {
        seed!(app, o);
    }
    assert_order!(app, "/Observation?_sort=value-quantity", ["o2", "o1", "o3"]);
    assert_order!(app, "/Observation?_sort=-value-quantity", ["o3", "o1", "o2"]);
}

/// Paging: `_count` pages, `next` links that cover every match exactly once even when
/// resources are created between pages, `previous` and `self` links, `_count=0`.
#[actix_web::test]
async fn paging_is_complete_stable_and_navigable() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        patient("pa", "Adams"),
        patient("pb", "Baker"),
        patient("pc", "Clark"),
        patient("pd", "Davis"),
        patient("pe", "Evans"),
    );
    // Without _sort or _total=accurate a search stops at its page, so the total is left out
    // (R4 allows it); asking for it counts every match.
    let lazy = search!(app, "/Patient?_count=2");
    assert_eq!(ids(&lazy), ["pa", "pb"]);
    assert!(lazy.get("total").is_none(), "{lazy}");
    assert_eq!(search!(app, "/Patient?_count=2&_sort=family")["total"], 5, "a sorted search counts");
    let first = search!(app, "/Patient?_count=2&_total=accurate");
    assert_eq!(ids(&first), ["pa", "pb"]);
    assert_eq!(first["total"], 5);
    let own = link(&first, "self").expect("a self link");
    assert!(own.starts_with("/Patient"), "{own}");
    let second = search!(app, link(&first, "next").expect("a next link"));
    assert_eq!(ids(&second), ["pc", "pd"]);
    let back = link(&second, "previous").or_else(|| link(&second, "prev")).expect("a previous link");
    assert_eq!(ids(&search!(app, back)), ["pa", "pb"], "previous goes back to the first page");
    let third = search!(app, link(&second, "next").expect("a next link"));
    assert_eq!(ids(&third), ["pe"]);
    assert!(link(&third, "next").is_none(), "the last page has no next link: {third}");
    assert_eq!(all_pages!(app, "/Patient?_count=2"), ["pa", "pb", "pc", "pd", "pe"]);
    assert_eq!(all_pages!(app, "/Patient?_count=1&family=a,b,c"), ["pa", "pb", "pc"]);

    let none = search!(app, "/Patient?_count=0");
    assert_eq!(none["total"], 5);
    assert!(ids(&none).is_empty(), "_count=0 returns no entries: {none}");

    // Creations between pages neither repeat nor hide what existed, whatever the order: in
    // creation order the newcomer comes last, sorted by family it sorts first.
    let first = search!(app, "/Patient?_count=2");
    seed!(app, patient("pf", "Aaron"));
    let mut seen = ids(&first);
    seen.extend(all_pages!(app, link(&first, "next").expect("a next link")));
    seen.retain(|id| id != "pf");
    assert_eq!(seen, ["pa", "pb", "pc", "pd", "pe"]);

    let first = search!(app, "/Patient?_sort=family&_count=2");
    assert_eq!(ids(&first), ["pf", "pa"]);
    seed!(app, patient("pg", "Aa"), patient("ph", "Bz"));
    let mut seen = ids(&first);
    seen.extend(all_pages!(app, link(&first, "next").expect("a next link")));
    seen.retain(|id| id != "pg" && id != "ph");
    assert_eq!(seen, ["pf", "pa", "pb", "pc", "pd", "pe"], "sorted paging across concurrent creations");
}

/// A subset that lost more than its narrative stops claiming the resource's profiles (it no
/// longer conforms to them); one that lost only the narrative keeps them.
#[actix_web::test]
async fn a_subset_claims_a_profile_only_while_it_still_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let profile = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient";
    seed!(
        app,
        res(
            "Patient",
            "pp1",
            json!({"meta": {"profile": [profile]}, "text": {"status": "generated", "div": div("Peter")},
                   "name": [{"family": "Chalmers"}], "gender": "male"}),
        ),
    );
    let b = search!(app, "/Patient?_id=pp1&_summary=data");
    assert_eq!(resource(&b, "pp1")["meta"]["profile"][0], profile, "{b}");
    for q in ["/Patient?_id=pp1&_elements=name", "/Patient?_id=pp1&_summary=text"] {
        let b = search!(app, q);
        let p = resource(&b, "pp1");
        assert!(subsetted(p) && p["meta"].get("profile").is_none(), "{q}: {p}");
    }
    let p = call!(app, TestRequest::get().uri("/Patient/pp1")).json();
    assert_eq!(p["meta"]["profile"][0], profile, "the stored resource keeps its claim: {p}");
}

/// `_total`, `_summary` (count, true, text, data, false) and `_elements`; subsets are tagged
/// SUBSETTED and the stored resource is untouched.
#[actix_web::test]
async fn total_summary_and_elements_shape_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        res(
            "Patient",
            "sm1",
            json!({"text": {"status": "generated", "div": div("Peter Chalmers")},
                   "name": [{"family": "Chalmers", "given": ["Peter"]}], "gender": "male", "birthDate": "1974-12-25",
                   "contact": [{"name": {"family": "Chalmers", "given": ["Mum"]}}],
                   "communication": [{"language": {"text": "English"}}]}),
        ),
        patient("sm2", "Other"),
        patient("sm3", "Third"),
        obs(
            "so1",
            loinc("2339-0", "Glucose"),
            json!({"text": {"status": "generated", "div": div("Glucose 5.4 mg")},
                   "subject": reference("Patient/sm1"), "valueQuantity": ucum(5.4, "mg"),
                   "category": category("laboratory"), "note": [{"text": "fasting"}],
                   "interpretation": [{"text": "normal"}]}),
        ),
    );
    let b = search!(app, "/Patient?_total=none");
    assert!(b.get("total").is_none(), "_total=none: {b}");
    assert_eq!(ids(&b).len(), 3);
    let b = search!(app, "/Patient?_total=accurate");
    assert_eq!(b["total"], 3);
    let b = search!(app, "/Patient?_total=accurate&_count=1");
    assert_eq!(b["total"], 3, "the total counts every match, not the page");
    let b = search!(app, "/Patient?_summary=count");
    assert_eq!(b["total"], 3);
    assert!(b["entry"].as_array().is_none_or(Vec::is_empty), "_summary=count has no entries: {b}");

    let b = search!(app, "/Patient?_id=sm1&_summary=true");
    let p = resource(&b, "sm1");
    assert!(subsetted(p), "_summary=true is SUBSETTED: {p}");
    assert_eq!(p["name"][0]["family"], "Chalmers");
    assert_eq!(p["gender"], "male");
    assert_eq!(p["birthDate"], "1974-12-25");
    assert!(p.get("contact").is_none() && p.get("communication").is_none(), "not summary elements: {p}");

    let b = search!(app, "/Observation?_id=so1&_summary=true");
    let o = resource(&b, "so1");
    assert!(subsetted(o), "{o}");
    for present in ["status", "code", "subject", "valueQuantity"] {
        assert!(o.get(present).is_some(), "{present} is a summary element: {o}");
    }
    for absent in ["category", "note", "interpretation"] {
        assert!(o.get(absent).is_none(), "{absent} is not a summary element: {o}");
    }

    let b = search!(app, "/Patient?_id=sm1&_summary=text");
    let p = resource(&b, "sm1");
    assert_eq!(keys(p), ["id", "meta", "resourceType", "text"]);
    assert!(subsetted(p), "{p}");
    let b = search!(app, "/Observation?_id=so1&_summary=text");
    assert_eq!(
        keys(resource(&b, "so1")),
        ["code", "id", "meta", "resourceType", "status", "text"],
        "text and mandatory"
    );

    let b = search!(app, "/Patient?_id=sm1&_summary=data");
    let p = resource(&b, "sm1");
    assert!(p.get("text").is_none(), "_summary=data drops the narrative: {p}");
    assert!(p.get("contact").is_some() && p.get("name").is_some(), "{p}");
    assert!(subsetted(p), "{p}");

    let b = search!(app, "/Patient?_id=sm1&_summary=false");
    let p = resource(&b, "sm1");
    assert!(p.get("contact").is_some() && p.get("text").is_some(), "{p}");
    assert!(!subsetted(p), "the full resource is not SUBSETTED: {p}");

    let b = search!(app, "/Patient?_id=sm1&_elements=name,gender");
    let p = resource(&b, "sm1");
    assert_eq!(keys(p), ["gender", "id", "meta", "name", "resourceType"]);
    assert!(subsetted(p), "{p}");
    // Mandatory elements come back unasked (R4 search, _elements): an Observation without its
    // status (1..1) would not be an Observation any validator accepts.
    let b = search!(app, "/Observation?_id=so1&_elements=subject");
    assert_eq!(keys(resource(&b, "so1")), ["code", "id", "meta", "resourceType", "status", "subject"]);

    let read = call!(app, TestRequest::get().uri("/Patient/sm1"));
    let stored = read.json();
    assert!(stored.get("contact").is_some() && !subsetted(&stored), "the stored resource is untouched: {stored}");
    rejects!(app, "/Patient?_summary=maybe", "_summary");
    rejects!(app, "/Patient?_total=some", "_total");
}

/// `_include` (`:Type`, `*`, `:iterate`) and `_revinclude` add resources with search mode
/// `include`, once each, without changing the matches or the total.
#[actix_web::test]
async fn include_and_revinclude_with_iterate() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        patient("p1", "Smith"),
        patient("p2", "Jones"),
        res("Group", "g1", json!({"type": "person", "actual": true})),
        res("Practitioner", "pr1", json!({"name": [{"family": "House"}]})),
        res("Organization", "org1", json!({"name": "Acme"})),
        encounter(
            "e1",
            json!({"subject": reference("Patient/p1"), "serviceProvider": reference("Organization/org1"),
                   "participant": [{"individual": reference("Practitioner/pr1")}]}),
        ),
        res("Medication", "med1", json!({"code": {"text": "Aspirin"}})),
        obs(
            "o1",
            loinc("8867-4", "Heart rate"),
            json!({"subject": reference("Patient/p1"), "encounter": reference("Encounter/e1"),
                   "performer": [reference("Practitioner/pr1")]}),
        ),
        obs("o2", loinc("8867-4", "Heart rate"), json!({"subject": reference("Group/g1")})),
        obs("o3", loinc("8867-4", "Heart rate"), json!({"subject": reference("Patient/p1")})),
        // A dangling reference includes nothing.
        obs("o4", loinc("8867-4", "Heart rate"), json!({"subject": reference("Patient/ghost")})),
        res(
            "MedicationRequest",
            "mr1",
            json!({"status": "active", "intent": "order", "medicationReference": reference("Medication/med1"),
                   "subject": reference("Patient/p1"), "requester": reference("Practitioner/pr1")}),
        ),
    );
    let b = search!(app, "/Observation?_include=Observation:subject");
    let mut matched = ids(&b);
    matched.sort();
    assert_eq!(matched, ["o1", "o2", "o3", "o4"]);
    assert_eq!(included(&b), ["Group/g1", "Patient/p1"], "each included once");
    assert_eq!(b["total"], 4, "includes do not count in the total");
    let inc = entries(&b, "include").next().expect("an include entry");
    assert!(inc["fullUrl"].as_str().is_some_and(|u| u.contains(inc["resource"]["id"].as_str().unwrap())), "{inc}");

    let b = search!(app, "/Observation?_include=Observation:subject:Patient");
    assert_eq!(included(&b), ["Patient/p1"]);
    let b = search!(app, "/Observation?_id=o1&_include=*");
    assert_eq!(included(&b), ["Encounter/e1", "Patient/p1", "Practitioner/pr1"]);
    let b = search!(app, "/Observation?_id=o1&_include=Observation:subject&_include=Observation:encounter");
    assert_eq!(included(&b), ["Encounter/e1", "Patient/p1"]);
    // Without :iterate an include applies to the matches only.
    let b = search!(app, "/Observation?_id=o1&_include=Observation:encounter&_include=Encounter:service-provider");
    assert_eq!(included(&b), ["Encounter/e1"]);
    let b =
        search!(app, "/Observation?_id=o1&_include=Observation:encounter&_include:iterate=Encounter:service-provider");
    assert_eq!(included(&b), ["Encounter/e1", "Organization/org1"]);
    let b = search!(app, "/MedicationRequest?_include=MedicationRequest:medication");
    assert_eq!(ids(&b), ["mr1"]);
    assert_eq!(included(&b), ["Medication/med1"]);
    let b = search!(app, "/Observation?_id=o2&_include=Observation:subject:Patient");
    assert!(included(&b).is_empty(), "o2's subject is a Group: {b}");

    let b = search!(app, "/Patient?_id=p1&_revinclude=Observation:subject");
    assert_eq!(ids(&b), ["p1"]);
    assert_eq!(included(&b), ["Observation/o1", "Observation/o3"]);
    let b = search!(app, "/Patient?_revinclude=Observation:subject");
    assert_eq!(ids(&b), ["p1", "p2"]);
    assert_eq!(included(&b), ["Observation/o1", "Observation/o3"]);
    let b = search!(app, "/Patient?_id=p1&_revinclude=Observation:subject&_revinclude=MedicationRequest:subject");
    assert_eq!(included(&b), ["MedicationRequest/mr1", "Observation/o1", "Observation/o3"]);
    let b = search!(app, "/Patient?_id=p1&_revinclude=Encounter:subject&_include:iterate=Encounter:service-provider");
    assert_eq!(included(&b), ["Encounter/e1", "Organization/org1"]);
    let b =
        search!(app, "/MedicationRequest?_include=MedicationRequest:patient&_revinclude:iterate=Observation:patient");
    assert_eq!(included(&b), ["Observation/o1", "Observation/o3", "Patient/p1"]);
    let b = search!(app, "/Patient?_id=p2&_revinclude=Observation:subject");
    assert_eq!(ids(&b), ["p2"]);
    assert!(included(&b).is_empty(), "{b}");
}

/// A match that another match on the page references stays a match, not an include too
/// (includes start from the page's own document keys), whether the page stops when full or
/// counts every match first.
#[actix_web::test]
async fn a_match_referenced_by_another_is_not_included_again() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        patient("p1", "Smith"),
        obs(
            "o1",
            loinc("8867-4", "Heart rate"),
            json!({"subject": reference("Patient/p1"), "hasMember": [reference("Observation/o2")]}),
        ),
        obs("o2", loinc("8867-4", "Heart rate"), json!({"subject": reference("Patient/p1")})),
    );
    for total in ["", "&_total=accurate"] {
        let b =
            search!(app, &format!("/Observation?_include=Observation:has-member&_include=Observation:subject{total}"));
        let mut matched = ids(&b);
        matched.sort();
        assert_eq!(matched, ["o1", "o2"], "{total}");
        assert_eq!(included(&b), ["Patient/p1"], "o2 is a match already ({total})");
    }
}

/// Chaining: `subject:Patient.name`, `subject.name` over every target type with a `name`,
/// two levels; a chain through an unknown parameter or a non-reference is a 400.
#[actix_web::test]
async fn chained_parameters_follow_references() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        res("Organization", "org1", json!({"name": "Acme Hospital"})),
        res("Organization", "org2", json!({"name": "Beta Clinic"})),
        res(
            "Patient",
            "p1",
            json!({"name": [{"family": "Smith"}], "managingOrganization": reference("Organization/org1"),
                   "identifier": [{"system": "urn:mrn", "value": "1"}]}),
        ),
        res(
            "Patient",
            "p2",
            json!({"name": [{"family": "Jones"}], "managingOrganization": reference("Organization/org2")})
        ),
        res("Location", "loc1", json!({"name": "Smith Ward"})),
        encounter("e1", json!({"subject": reference("Patient/p1"), "serviceProvider": reference("Organization/org1")})),
        encounter("e2", json!({"subject": reference("Patient/p2"), "serviceProvider": reference("Organization/org2")})),
        obs(
            "o1",
            loinc("8867-4", "Heart rate"),
            json!({"subject": reference("Patient/p1"), "encounter": reference("Encounter/e1")}),
        ),
        obs(
            "o2",
            loinc("8867-4", "Heart rate"),
            json!({"subject": reference("Patient/p2"), "encounter": reference("Encounter/e2")}),
        ),
        obs("o3", loinc("8867-4", "Heart rate"), json!({"subject": reference("Location/loc1")})),
        obs("o4", loinc("8867-4", "Heart rate"), json!({"subject": reference("Patient/p1")})),
    );
    assert_ids!(app, "/Observation?subject:Patient.name=Smith", ["o1", "o4"]);
    assert_ids!(app, "/Observation?subject:Patient.name=smi", ["o1", "o4"]);
    assert_ids!(app, "/Observation?subject:Patient.name:exact=Smith", ["o1", "o4"]);
    assert_ids!(app, "/Observation?subject:Location.name=Smith", ["o3"]);
    // Without a type, every target type with a `name` parameter (Patient, Location).
    assert_ids!(app, "/Observation?subject.name=Smith", ["o1", "o3", "o4"]);
    assert_ids!(app, "/Observation?patient.name=smith", ["o1", "o4"]);
    assert_ids!(app, "/Observation?patient.identifier=urn:mrn|1", ["o1", "o4"]);
    assert_ids!(app, "/Observation?subject:Patient.name=Nobody", []);
    assert_ids!(app, "/Observation?subject:Patient.name=Smith,Jones", ["o1", "o2", "o4"]);
    assert_ids!(app, "/Observation?encounter.service-provider.name=Acme", ["o1"]);
    assert_ids!(app, "/Observation?patient.organization.name=Beta", ["o2"]);
    assert_ids!(app, "/Observation?patient.organization.name=Acme&encounter.service-provider.name=Acme", ["o1"]);
    assert_ids!(app, "/Encounter?service-provider.name=acme", ["e1"]);
    assert_ids!(app, "/Encounter?subject:Patient.organization:Organization.name=Beta", ["e2"]);
    rejects!(app, "/Observation?subject:Patient.foo=x", "foo");
    rejects!(app, "/Observation?code.name=x", "code");
    rejects!(app, "/Observation?encounter.service-provider.nope=x", "nope");
}

/// `_has`: reverse chaining, also nested.
#[actix_web::test]
async fn has_selects_by_resources_that_refer() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        patient("p1", "One"),
        patient("p2", "Two"),
        patient("p3", "Three"),
        patient("p4", "Four"),
        encounter("e1", json!({"subject": reference("Patient/p1")})),
        encounter("e2", json!({"subject": reference("Patient/p2")})),
        obs(
            "o1",
            loinc("1234-5", "Test"),
            json!({"subject": reference("Patient/p1"), "encounter": reference("Encounter/e1")}),
        ),
        obs(
            "o2",
            loinc("9999-9", "Other"),
            json!({"subject": reference("Patient/p2"), "encounter": reference("Encounter/e2")}),
        ),
        obs("o3", loinc("1234-5", "Test"), json!({"subject": reference("Patient/p3")})),
    );
    assert_ids!(app, "/Patient?_has:Observation:patient:code=1234-5", ["p1", "p3"]);
    assert_ids!(app, "/Patient?_has:Observation:subject:code=http://loinc.org|9999-9", ["p2"]);
    assert_ids!(app, "/Patient?_has:Observation:patient:code=1234-5,9999-9", ["p1", "p2", "p3"]);
    assert_ids!(app, "/Patient?_has:Observation:patient:code=0000-0", []);
    assert_ids!(app, "/Patient?_has:Observation:patient:code=1234-5&family=three", ["p3"]);
    assert_ids!(app, "/Patient?_has:Encounter:patient:_has:Observation:encounter:code=1234-5", ["p1"]);
    assert_ids!(app, "/Patient?_has:Encounter:subject:status=finished", ["p1", "p2"]);
    assert_ids!(app, "/Encounter?_has:Observation:encounter:code=9999-9", ["e2"]);
    rejects!(app, "/Patient?_has:Observation:patient:foo=x", "foo");
}

/// The parameters of every resource: `_id`, `_lastUpdated`, `_tag`, `_profile`,
/// `_security`, `_source`, `_text`, `_content`, `_list`.
#[actix_web::test]
async fn common_parameters_meta_text_content_and_list() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        res(
            "Patient",
            "k1",
            json!({"meta": {"tag": [{"system": "http://example.org/tags", "code": "vip"}],
                            "profile": ["http://example.org/StructureDefinition/special"],
                            "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
                            "source": "http://example.org/feeder"},
                   "text": {"status": "generated", "div": div("Heavy smoker since 1990")},
                   "name": [{"family": "Alpha"}]}),
        ),
        res(
            "Patient",
            "k2",
            json!({"text": {"status": "generated", "div": div("Occasional drinker")},
                   "name": [{"family": "Quixote"}]}),
        ),
        res(
            "Patient",
            "k3",
            json!({"meta": {"tag": [{"system": "http://other.org/tags", "code": "vip"}],
                            "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "N"}]},
                   "name": [{"family": "Gamma"}]}),
        ),
        res(
            "List",
            "abc",
            json!({"status": "current", "mode": "working",
                   "entry": [{"item": reference("Patient/k1")}, {"item": reference("Patient/k3")}]}),
        ),
    );
    assert_ids!(app, "/Patient?_id=k1", ["k1"]);
    assert_ids!(app, "/Patient?_id=k1,k2,nope", ["k1", "k2"]);
    assert_ids!(app, "/Patient?_tag=http://example.org/tags|vip", ["k1"]);
    assert_ids!(app, "/Patient?_tag=vip", ["k1", "k3"]);
    assert_ids!(app, "/Patient?_tag:not=http://example.org/tags|vip", ["k2", "k3"]);
    assert_ids!(app, "/Patient?_profile=http://example.org/StructureDefinition/special", ["k1"]);
    assert_ids!(app, "/Patient?_security=http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R", ["k1"]);
    assert_ids!(app, "/Patient?_security=N", ["k3"]);
    assert_ids!(app, "/Patient?_source=http://example.org/feeder", ["k1"]);
    assert_ids!(app, "/Patient?_text=smoker", ["k1"]);
    assert_ids!(app, "/Patient?_text=drinker", ["k2"]);
    assert_ids!(app, "/Patient?_text=quixote", [], "_text searches the narrative only");
    assert_ids!(app, "/Patient?_content=quixote", ["k2"]);
    assert_ids!(app, "/Patient?_content=gamma", ["k3"]);
    assert_ids!(app, "/Patient?_list=abc", ["k1", "k3"]);
    assert_ids!(app, "/Patient?_list=abc&_tag=vip&_security=R", ["k1"]);
    assert_ids!(app, "/Observation?_list=abc", []);
    assert_ids!(app, "/Patient?_list=nope", []);

    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let r = call!(app, put("/Patient/k4", &patient("k4", "Delta").to_string()));
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let lu = r.json()["meta"]["lastUpdated"].as_str().expect("meta.lastUpdated").to_string();
    assert_ids!(app, format!("/Patient?_lastUpdated={}", enc(&lu)), ["k4"]);
    assert_ids!(app, format!("/Patient?_lastUpdated=ge{}", enc(&lu)), ["k4"]);
    assert_ids!(app, format!("/Patient?_lastUpdated=gt{}", enc(&lu)), []);
    assert_ids!(app, format!("/Patient?_lastUpdated=lt{}", enc(&lu)), ["k1", "k2", "k3"]);
    assert_ids!(app, format!("/Patient?_lastUpdated=le{}", enc(&lu)), ["k1", "k2", "k3", "k4"]);
    assert_ids!(app, "/Patient?_lastUpdated=gt2000", ["k1", "k2", "k3", "k4"]);
    assert_ids!(app, "/Patient?_lastUpdated=le2000-01-01", []);
}

/// Compartment search (`/Patient/{id}/Observation`, by the Patient CompartmentDefinition's
/// parameters), system-level search (`/?_type=`), and POST `_search` with a form body.
#[actix_web::test]
async fn compartment_system_level_and_post_search() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        patient("p1", "Smith"),
        patient("p2", "Jones"),
        res("Organization", "org1", json!({"name": "Acme"})),
        obs("o1", loinc("8867-4", "Heart rate"), json!({"subject": reference("Patient/p1")})),
        obs("o2", loinc("8867-4", "Heart rate"), json!({"subject": reference("Patient/p2")})),
        // In p1's compartment through `performer`.
        obs(
            "o3",
            loinc("29463-7", "Body weight"),
            json!({"subject": reference("Patient/p2"), "performer": [reference("Patient/p1")]}),
        ),
        obs("o4", loinc("29463-7", "Body weight"), json!({"subject": reference("Patient/p1"), "status": "amended"})),
        encounter("e1", json!({"subject": reference("Patient/p1")})),
    );
    assert_ids!(app, "/Patient/p1/Observation", ["o1", "o3", "o4"]);
    assert_ids!(app, "/Patient/p1/Observation?code=http://loinc.org|29463-7", ["o3", "o4"]);
    assert_ids!(app, "/Patient/p1/Observation?code=http://loinc.org|29463-7&status=final", ["o3"]);
    assert_ids!(app, "/Patient/p2/Observation", ["o2", "o3"]);
    assert_ids!(app, "/Patient/p1/Encounter", ["e1"]);
    assert_ids!(app, "/Patient/p2/Encounter", []);
    assert_order!(app, "/Patient/p1/Observation?_sort=-_id", ["o4", "o3", "o1"]);
    let all = ids(&search!(app, "/Patient/p1/*"));
    for id in ["o1", "o3", "o4", "e1"] {
        assert!(all.contains(&id.to_string()), "{id} is in p1's compartment: {all:?}");
    }
    assert!(!all.contains(&"o2".to_string()) && !all.contains(&"org1".to_string()), "{all:?}");
    for bad in ["/Observation/o1/Patient", "/Patient/p1/Robot", "/Robot/x/Observation"] {
        let r = call!(app, TestRequest::get().uri(bad));
        assert!(r.status.is_client_error(), "GET {bad}: {} {}", r.status, r.text);
        assert_eq!(r.json()["resourceType"], "OperationOutcome", "GET {bad}");
    }
    rejects!(app, "/Patient/p1/Observation?foo=bar", "foo");

    assert_ids!(app, "/?_type=Patient,Observation&_lastUpdated=gt2000", ["p1", "p2", "o1", "o2", "o3", "o4"]);
    assert_ids!(app, "/?_type=Encounter", ["e1"]);
    assert_ids!(app, "/?_id=p1,o2", ["p1", "o2"]);
    assert_ids!(app, "/?_type=Patient,Organization&_id=p1,org1,o1", ["p1", "org1"]);
    let b = search!(app, "/?_type=Patient,Observation&_count=3");
    assert_eq!(ids(&b).len(), 3);
    assert_eq!(b["total"], 6);
    rejects!(app, "/?_type=Robot", "Robot");

    let get = search!(app, "/Observation?code=http://loinc.org|29463-7&subject=Patient/p2");
    let form = |uri: &str, body: &str| {
        TestRequest::post()
            .uri(uri)
            .insert_header(("content-type", "application/x-www-form-urlencoded"))
            .set_payload(body.to_string())
    };
    let posted = call!(app, form("/Observation/_search", "code=http%3A%2F%2Floinc.org%7C29463-7&subject=Patient%2Fp2"));
    assert_eq!(posted.status, StatusCode::OK, "{}", posted.text);
    assert_eq!(ids(&posted.json()), ids(&get));
    assert_eq!(ids(&get), ["o3"]);
    // Parameters from the URL and the body combine.
    let mixed = call!(app, form("/Observation/_search?status=final", "code=http%3A%2F%2Floinc.org%7C29463-7"));
    assert_eq!(mixed.status, StatusCode::OK, "{}", mixed.text);
    assert_eq!(ids(&mixed.json()), ["o3"]);
    let bad = call!(app, form("/Observation/_search", "foo=bar"));
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.text);
    assert!(names(&bad.json(), "foo"), "{}", bad.text);
}

/// Every bad search is a 400 OperationOutcome naming what is wrong, never a 500; under
/// `Prefer: handling=lenient` unknown parameters are ignored and reported in an `outcome`
/// entry.
#[actix_web::test]
async fn bad_searches_are_400s_that_name_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(app, res("Patient", "p1", json!({"name": [{"family": "Smith"}], "birthDate": "1980-01-01"})));
    rejects!(app, "/Patient?foo=bar", "foo");
    rejects!(app, "/Patient?birthdate=xx2020", "birthdate");
    rejects!(app, "/Patient?birthdate=2020-13", "birthdate");
    rejects!(app, "/Patient?name:foo=x", "name");
    rejects!(app, "/Patient?gender:contains=male", "gender");
    rejects!(app, "/Patient?_sort=foo", "foo");
    rejects!(app, "/Patient?_sort=-", "_sort");
    rejects!(app, "/Patient?_count=abc", "_count");
    rejects!(app, "/Patient?_count=-1", "_count");
    rejects!(app, "/Observation?value-quantity=abc", "value-quantity");
    rejects!(app, "/Observation?value-quantity=5.4|a|b|c", "value-quantity");
    rejects!(app, "/RiskAssessment?probability=1.2.3", "probability");
    rejects!(app, "/Observation?subject:Patient.foo=x", "foo");
    rejects!(app, "/Patient?_summary=foo", "_summary");
    rejects!(app, "/Patient?_has:Observation:patient:foo=x", "foo");
    rejects!(app, "/Patient?active=maybe", "active");

    let lenient = call!(
        app,
        TestRequest::get().uri("/Patient?foo=bar&family=smith").insert_header(("prefer", "handling=lenient"))
    );
    assert_eq!(lenient.status, StatusCode::OK, "{}", lenient.text);
    let b = lenient.json();
    assert_eq!(ids(&b), ["p1"], "the known parameters still apply");
    let outcome = entries(&b, "outcome").next().unwrap_or_else(|| panic!("an outcome entry: {b}"));
    assert_eq!(outcome["resource"]["resourceType"], "OperationOutcome");
    assert!(names(&outcome["resource"], "foo"), "{outcome}");
    let own = link(&b, "self").unwrap_or_default();
    assert!(!own.contains("foo"), "the self link shows what was used, not the ignored parameter: {own}");
}

/// A SearchParameter created at run time is indexed for resources written after it and,
/// after an automatic reindex, before it; the CapabilityStatement lists it.
#[actix_web::test]
async fn custom_search_parameter_indexes_old_and_new_resources() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let eyes = |id: &str, color: &str| {
        res("Patient", id, json!({"extension": [{"url": "http://example.org/eye-color", "valueCode": color}]}))
    };
    seed!(app, eyes("before", "blue"), patient("plain", "Plain"));
    rejects!(app, "/Patient?eye-color=blue", "eye-color");

    let sp = json!({
        "resourceType": "SearchParameter",
        "url": "http://example.org/fhir/SearchParameter/patient-eye-color",
        "name": "EyeColor",
        "status": "active",
        "description": "The colour of a patient's eyes",
        "code": "eye-color",
        "base": ["Patient"],
        "type": "token",
        "expression": "Patient.extension('http://example.org/eye-color').value"
    });
    let created = call!(app, post("/SearchParameter", &sp.to_string()));
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    seed!(app, eyes("after", "blue"), eyes("brown", "brown"));

    let mut found = Vec::new();
    for _ in 0..100 {
        let mut got = ids(&search!(app, "/Patient?eye-color=blue"));
        got.sort();
        found = got;
        if found == ["after", "before"] {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(found, ["after", "before"], "written before and after the SearchParameter");
    assert_ids!(app, "/Patient?eye-color=brown", ["brown"]);
    assert_ids!(app, "/Patient?eye-color=blue,brown", ["after", "before", "brown"]);
    assert_ids!(app, "/Patient?eye-color:missing=true", ["plain"]);

    let cs = call!(app, TestRequest::get().uri("/metadata")).json();
    let patient_res =
        cs["rest"][0]["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Patient").expect("Patient");
    let p = patient_res["searchParam"].as_array().unwrap().iter().find(|p| p["name"] == "eye-color");
    assert_eq!(p.map(|p| p["type"].clone()), Some(json!("token")), "eye-color is listed: {patient_res}");
}

/// The CapabilityStatement lists each type's search parameters with their types.
#[actix_web::test]
async fn capability_statement_lists_search_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let cs = call!(app, TestRequest::get().uri("/metadata")).json();
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    let params = |t: &str| -> Vec<(String, String)> {
        let r = resources.iter().find(|r| r["type"] == t).unwrap_or_else(|| panic!("{t} is listed"));
        r["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_string(), p["type"].as_str().unwrap().to_string()))
            .collect()
    };
    let expect = [
        ("Observation", "code", "token"),
        ("Observation", "date", "date"),
        ("Observation", "value-quantity", "quantity"),
        ("Observation", "value-string", "string"),
        ("Observation", "subject", "reference"),
        ("Observation", "patient", "reference"),
        ("Observation", "component-code-value-quantity", "composite"),
        ("Observation", "code-value-quantity", "composite"),
        ("Observation", "_id", "token"),
        ("Observation", "_lastUpdated", "date"),
        ("Patient", "name", "string"),
        ("Patient", "family", "string"),
        ("Patient", "birthdate", "date"),
        ("Patient", "gender", "token"),
        ("Patient", "identifier", "token"),
        ("Patient", "organization", "reference"),
        ("Patient", "_tag", "token"),
        ("Patient", "_profile", "uri"),
        ("RiskAssessment", "probability", "number"),
        ("ValueSet", "url", "uri"),
        ("Encounter", "date", "date"),
        ("Encounter", "service-provider", "reference"),
    ];
    for (t, name, kind) in expect {
        let ps = params(t);
        assert!(ps.iter().any(|(n, k)| n == name && k == kind), "{t} lists {name} ({kind}): {ps:?}");
    }
    let allowed = ["number", "date", "string", "token", "reference", "composite", "quantity", "uri", "special"];
    for r in resources {
        let mut names = Vec::new();
        for p in r["searchParam"].as_array().into_iter().flatten() {
            let kind = p["type"].as_str().unwrap_or_default();
            assert!(allowed.contains(&kind), "{}: {p}", r["type"]);
            names.push(p["name"].as_str().unwrap_or_default().to_string());
        }
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n, "{} lists each parameter once", r["type"]);
    }
}

/// A page serves each match's current version, read from the index's head records (the
/// search below is answered by postings alone, so no document is decoded): an update
/// replaces the head, a deletion removes it, across pages.
#[actix_web::test]
async fn pages_serve_the_current_version_of_each_match() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(app, patient("p1", "Heads"), patient("p2", "Heads"), patient("p3", "Heads"));
    seed!(app, with(patient("p1", "Heads"), json!({"birthDate": "1970-01-01"})));
    seed!(app, with(patient("p1", "Heads"), json!({"birthDate": "1971-02-03"})));
    seed!(app, with(patient("p3", "Heads"), json!({"gender": "female"})));
    call!(app, TestRequest::delete().uri("/Patient/p2"));
    let mut served = Vec::new();
    let mut uri = "/Patient?family=heads&_count=1".to_string();
    loop {
        let b = search!(app, uri);
        for e in entries(&b, "match") {
            let r = &e["resource"];
            served.push((r["id"].as_str().unwrap().to_string(), r["meta"]["versionId"].as_str().unwrap().to_string()));
            match r["id"].as_str().unwrap() {
                "p1" => assert_eq!(r["birthDate"], "1971-02-03", "p1's latest body: {r}"),
                _ => assert_eq!(r["gender"], "female", "p3's latest body: {r}"),
            }
        }
        match link(&b, "next") {
            Some(next) => uri = next,
            None => break,
        }
    }
    assert_eq!(served, [("p1".to_string(), "3".to_string()), ("p3".to_string(), "2".to_string())]);
}

/// `POST /admin/reindex` (and `fhir-ledger cluster reindex`) rebuilds the node's index from
/// its state: it counts every live resource and every search answers as before.
#[actix_web::test]
async fn reindex_rebuilds_the_index_with_the_same_answers() {
    let dir = tempfile::tempdir().unwrap();
    let admin = fhir_ledger::api::admin::AdminConfig::new("s3cret", false, "fp".into());
    let app = support::app_with_admin(support::repo(dir.path()).await, admin).await;
    seed!(
        app,
        json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Rebuild"}]}),
        json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Other"}]}),
        json!({"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"},
               "subject": {"reference": "Patient/p1"}}),
    );
    call!(app, TestRequest::delete().uri("/Patient/p2"));
    assert_eq!(call!(app, TestRequest::post().uri("/admin/reindex")).status, StatusCode::UNAUTHORIZED);
    let r = call!(app, TestRequest::post().uri("/admin/reindex").insert_header(("authorization", "Bearer s3cret")));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["resources"], 2, "the deleted patient is not indexed: {}", r.text);
    assert_ids!(app, "/Patient?name=rebuild", ["p1"]);
    assert_ids!(app, "/Observation?subject:Patient.name=rebuild", ["o1"]);
    assert_ids!(app, "/Patient?name=other", []);
}

/// Crypto-shredding reaches search: after `$erase`, nothing of the patient is found or
/// served, though its bodies were read (and kept in memory for pages) just before.
#[actix_web::test]
async fn erased_patients_vanish_from_search() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        json!({"resourceType": "Patient", "id": "gone", "name": [{"family": "Shredded"}]}),
        json!({"resourceType": "Observation", "id": "og", "status": "final", "code": {"text": "x"},
               "subject": {"reference": "Patient/gone"}}),
        json!({"resourceType": "Patient", "id": "kept", "name": [{"family": "Shredded"}]}),
    );
    assert_ids!(app, "/Patient?name=shredded", ["gone", "kept"]);
    assert_ids!(app, "/Observation?subject=Patient/gone&_include=Observation:subject", ["og"]);
    let r = call!(app, TestRequest::post().uri("/Patient/gone/$erase"));
    assert!(r.status.is_success(), "{}", r.text);
    assert_ids!(app, "/Patient?name=shredded", ["kept"]);
    assert_ids!(app, "/Observation?subject=Patient/gone", []);
    let b = search!(app, "/Observation?_content=x&_revinclude=Observation:subject");
    assert!(!b.to_string().contains("Shredded"), "{b}");
}

/// `_contained`: the default (`false`: contained resources are not searched on their own) is
/// accepted; `true` and `both` are refused with a 400 that names the parameter rather than
/// answered as if they had been honoured.
#[actix_web::test]
async fn contained_searches_are_refused_not_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(
        app,
        json!({"resourceType": "Observation", "id": "oc1", "status": "final", "code": {"text": "x"},
               "contained": [{"resourceType": "Patient", "id": "inner", "name": [{"family": "Inside"}]}],
               "subject": {"reference": "#inner"}}),
    );
    assert_ids!(app, "/Observation?_contained=false", ["oc1"]);
    assert_ids!(app, "/Patient?name=inside", [], "a contained Patient is not a Patient of the server");
    rejects!(app, "/Patient?name=inside&_contained=true", "_contained");
    rejects!(app, "/Patient?_contained=both", "_contained");
    rejects!(app, "/Observation?_containedType=contained", "_containedType");
}

/// A `_cursor` is only what this server issued for this search: an altered one, or one
/// reused with another `_sort`, is a 400 naming `_cursor`, never a wrong page.
#[actix_web::test]
async fn cursors_that_were_not_issued_for_the_search_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    seed!(app, patient("c1", "Adams"), patient("c2", "Baker"), patient("c3", "Clark"));
    let first = search!(app, "/Patient?_sort=family&_count=1");
    let next = link(&first, "next").expect("a next link");
    let cursor = next.split("cursor=").nth(1).expect("a cursor").to_string();
    rejects!(app, format!("/Patient?_sort=family&_count=1&_cursor=x{cursor}"), "_cursor");
    rejects!(app, "/Patient?_cursor=bm90LWEtY3Vyc29y", "_cursor");
    rejects!(app, format!("/Patient?_sort=family,given&_count=1&_cursor={cursor}"), "_cursor");
    assert_ids!(app, next, ["c2"]);
}

/// A match set larger than what is counted whole (1,000) is read only as far as each page,
/// yet paging through it is complete and in order; intersections and ranges over it are exact.
#[actix_web::test]
async fn large_match_sets_page_completely_and_intersect_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let app = support::app(support::repo(dir.path()).await).await;
    let n = 1_200;
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            let subject = if i % 40 == 0 { "Patient/few" } else { "Patient/many" };
            let day = 1 + i % 28;
            let body = obs(
                &format!("o{i:04}"),
                loinc("1111-1", "Many"),
                json!({"subject": reference(subject), "effectiveDateTime": format!("2020-02-{day:02}")}),
            );
            json!({"resource": body, "request": {"method": "PUT", "url": format!("Observation/o{i:04}")}})
        })
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let r = call!(app, post("/", &bundle.to_string()));
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let all: Vec<String> = (0..n).map(|i| format!("o{i:04}")).collect();

    let code = "/Observation?code=http://loinc.org|1111-1";
    let first = search!(app, format!("{code}&_count=500"));
    assert!(first.get("total").is_none(), "a large set is not counted unless asked: {}", first["total"]);
    assert_eq!(all_pages!(app, format!("{code}&_count=500")), all, "every match once, in creation order");
    assert_eq!(search!(app, format!("{code}&_count=5&_total=accurate"))["total"], n);

    let few: Vec<String> = (0..n).step_by(40).map(|i| format!("o{i:04}")).collect();
    let both = search!(app, format!("{code}&subject=Patient/few&_count=100"));
    assert_eq!(both["total"], few.len(), "a small intersection comes back whole, with its total");
    assert_eq!(ids(&both), few);
    assert_eq!(all_pages!(app, format!("{code}&subject=Patient/few&_count=7")), few);

    // Days 10 to 19 of every 28: a range over the buckets of ten days, checked per document.
    let window: Vec<String> = (0..n).filter(|i| (10..20).contains(&(1 + i % 28))).map(|i| format!("o{i:04}")).collect();
    let ranged = format!("{code}&date=ge2020-02-10&date=lt2020-02-20&_count=100");
    assert_eq!(all_pages!(app, ranged), window);
    let both_ranged = "/Observation?subject=Patient/many&date=ge2020-02-10&date=lt2020-02-20&_count=100";
    let want: Vec<String> = window.iter().filter(|id| !few.contains(id)).cloned().collect();
    assert_eq!(all_pages!(app, both_ranged), want);
}
