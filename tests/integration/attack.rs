//! The attacker's suite of issue 15 ("Authorization that no interaction can bypass"): real
//! `fhir-ledger serve --auth smart` processes, two patients (alice and bob), a RelatedPerson
//! user linked to alice only, a practitioner, and every path that does not go through the plain
//! read and search handlers: conditional create, update, patch and delete (single and inside
//! batch and transaction Bundles), resources outside the R4 Patient compartment that point at a
//! patient, scopes a user of each kind may not hold, the consent page, revocation and
//! introspection, the disclosure log and the public ledger, vread and history across a
//! compartment move, `$erase`, and the lesser holes (CSRF, throttling, cookies, caching, file
//! modes, example configs).
//!
//! Each test function starts its own server and plays many attacks against it. An attack that
//! succeeds is recorded as a hole (with the issue's item number) and the test goes on, so one
//! run lists every hole a server has; the test fails at its end when any was found. What
//! counts is what a user relies on: bob's data is not disclosed, counted, changed or deleted,
//! and a resource alice may not see answers exactly like a missing one.
//!
//! Every resource of bob's carries [`SECRET`]: no answer to alice may contain it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_TYPE, COOKIE};
use reqwest::Method;
use serde_json::{json, Value};

use crate::smart::{
    self, access_token, attr, cookie, fhir, get, send, tags, Admin, Backend, ClientKey, Resp, ADMIN_TOKEN, REDIRECT,
};
use crate::support::Server;

const ALICE: &str = "pat-alice";
const BOB: &str = "pat-bob";
/// A RelatedPerson of alice's (RelatedPerson.patient = alice), never linked to bob.
const RP: &str = "rp-alice";
const PRAC: &str = "prac-1";
/// In every resource of bob's; no answer to alice (or to a token confined to alice) may
/// contain it.
const SECRET: &str = "BOB-SECRET";
const ATTACK: &str = "urn:fhir-ledger:attack";
/// Bob's Observations: one per attack that targets a single resource, so that an attack that
/// succeeds on one does not make the next one look like a hole (or hide one).
const BOB_OBS: &[&str] = &[
    "obs-bob-1",
    "obs-bob-cc",
    "obs-bob-cu1",
    "obs-bob-cu2",
    "obs-bob-cu3",
    "obs-bob-cu4",
    "obs-bob-p",
    "obs-bob-d1",
    "obs-bob-d2",
    "obs-bob-v",
    "obs-bob-r",
];
/// The resources of bob's outside the R4 Patient compartment (issue item 5).
const BOB_OUTSIDE: &[&str] = &["Device/dev-bob", "Contract/con-bob", "GuidanceResponse/gr-bob"];
/// Patient users, practitioners and RelatedPersons ask for these; only backend clients may
/// hold `system/`, only practitioners `user/`. (Without `openid`: an id_token makes a debug
/// build derive its RSA key, tens of seconds, and has nothing to do with the scopes.)
const ESCALATE: &[&str] = &["fhirUser", "system/*.cruds", "user/*.cruds", "patient/*.cruds"];
const EVIL: &str = "https://evil.example";

// ---------------------------------------------------------------------------------------------
// Holes found

/// The holes an attack run found: each failed check, named with the issue's item number.
struct Holes {
    test: &'static str,
    found: Vec<String>,
    checks: usize,
    started: Instant,
}

impl Holes {
    fn new(test: &'static str) -> Holes {
        Holes { test, found: Vec::new(), checks: 0, started: Instant::now() }
    }

    /// Records a hole unless `ok`.
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        self.checks += 1;
        if !ok {
            let what = what.into();
            eprintln!("[{}] HOLE: {what}", self.test);
            self.found.push(what);
        }
    }

    /// Records a hole when an answer to a caller who may not see bob carries bob's data.
    fn no_secret(&mut self, r: &Resp, what: &str) {
        let ok = !r.text.contains(SECRET);
        self.check(ok, format!("{what}: discloses bob's data ({} {})", r.status, clip(&r.text)));
    }

    fn finish(self) {
        let took = self.started.elapsed().as_secs_f64();
        eprintln!("[{}] {} checks, {} holes, {took:.1} s of attacks", self.test, self.checks, self.found.len());
        assert!(
            self.found.is_empty(),
            "{}: {} of {} checks found a hole:\n- {}",
            self.test,
            self.found.len(),
            self.checks,
            self.found.join("\n- ")
        );
    }
}

/// The first 300 characters of a body, for messages.
fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

fn js(r: &Resp) -> Value {
    serde_json::from_str(&r.text).unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------------
// A server and its data

/// A `fhir-ledger serve --auth smart` process that can be restarted on the same data directory
/// and address.
struct Node {
    /// Killed on drop, before `dir` is removed.
    server: Option<Server>,
    dir: tempfile::TempDir,
    args: Vec<String>,
    base: String,
    http: reqwest::Client,
    admin: Admin,
}

impl Node {
    /// `fixed_port`: listen on a port chosen now, so that a restart keeps the public URL (and
    /// with it the `aud` of client assertions).
    fn start(extra: &[&str], fixed_port: bool) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut args: Vec<String> = extra.iter().map(ToString::to_string).collect();
        if fixed_port {
            let port =
                std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("addr").port();
            args.extend(["--listen".to_string(), format!("127.0.0.1:{port}")]);
        }
        let server = Self::spawn(dir.path(), &args);
        let base = server.base.clone();
        let http = smart::http_client();
        let admin = Admin::new(&http, &base, ADMIN_TOKEN);
        Node { server: Some(server), dir, args, base, http, admin }
    }

    fn spawn(dir: &Path, args: &[String]) -> Server {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::launch_auth(dir, &args, &[("FHIR_LEDGER_ADMIN_TOKEN", ADMIN_TOKEN)])
    }

    /// `kill -9` and start again on the same data directory and address.
    fn restart(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill9();
        }
        let server = Self::spawn(self.dir.path(), &self.args);
        assert_eq!(server.base, self.base, "restarted on the same address");
        self.server = Some(server);
    }

    fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }
}

fn reference(t: &str, id: &str) -> Value {
    json!({ "reference": format!("{t}/{id}") })
}

fn patient(id: &str) -> Value {
    let family = if id == BOB { format!("{SECRET} Bobson") } else { "Alison".to_string() };
    json!({ "resourceType": "Patient", "id": id, "name": [{ "family": family, "given": [id] }], "birthDate": "1970-01-01" })
}

/// An Observation of `patient`; `note` is its identifier value and code text.
fn observation(id: Option<&str>, patient: &str, note: &str) -> Value {
    let mut v = json!({
        "resourceType": "Observation",
        "status": "final",
        "identifier": [{ "system": ATTACK, "value": note }],
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4", "display": "Heart rate" }], "text": note },
        "subject": reference("Patient", patient),
        "valueQuantity": { "value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min" },
    });
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

fn bob_obs(id: &str) -> Value {
    observation(Some(id), BOB, &format!("{SECRET} {id}"))
}

/// A new Observation of alice's (no id).
fn alice_obs(note: &str) -> Value {
    observation(None, ALICE, note)
}

/// Everything the attacks need: alice, bob, a practitioner, a RelatedPerson of alice's; two
/// Observations of alice's and one that links to bob's data (`hasMember`, `derivedFrom`,
/// `focus`), bob's Observations, and bob's Device, Contract and GuidanceResponse.
fn seed() -> Vec<Value> {
    let mut v = vec![
        patient(ALICE),
        patient(BOB),
        json!({ "resourceType": "Practitioner", "id": PRAC, "name": [{ "family": "Smith" }] }),
        json!({ "resourceType": "RelatedPerson", "id": RP, "patient": reference("Patient", ALICE),
                "name": [{ "family": "Alison", "given": ["Rel"] }] }),
        observation(Some("obs-alice-1"), ALICE, "alice 1"),
        observation(Some("obs-alice-2"), ALICE, "alice 2"),
    ];
    let mut link = observation(Some("obs-alice-link"), ALICE, "alice link");
    link["hasMember"] = json!([reference("Observation", "obs-bob-1")]);
    link["derivedFrom"] = json!([reference("Observation", "obs-bob-1")]);
    link["focus"] = json!([reference("Patient", BOB)]);
    v.push(link);
    v.extend(BOB_OBS.iter().map(|id| bob_obs(id)));
    let ident = |id: &str| json!([{ "system": ATTACK, "value": format!("{SECRET} {id}") }]);
    v.push(json!({ "resourceType": "Device", "id": "dev-bob", "identifier": ident("dev-bob"),
                   "manufacturer": format!("{SECRET} devices"), "patient": reference("Patient", BOB) }));
    v.push(json!({ "resourceType": "Contract", "id": "con-bob", "identifier": ident("con-bob"), "status": "executed",
                   "title": format!("{SECRET} contract"), "subject": [reference("Patient", BOB)] }));
    v.push(json!({ "resourceType": "GuidanceResponse", "id": "gr-bob", "identifier": ident("gr-bob"),
                   "moduleUri": "http://example.org/decision-support", "status": "success",
                   "subject": reference("Patient", BOB) }));
    v
}

/// A server with the seed, an app registered without a scope ceiling, the users `alice`
/// (Patient/pat-alice), `drsmith` (Practitioner/prac-1) and `relly` (RelatedPerson/rp-alice),
/// and tokens from the real login and consent pages.
struct World {
    node: Node,
    /// A backend client's `system/*.cruds`: seeding and checking what is really stored.
    sys: String,
    /// The app without a scope ceiling (the default registration).
    app: String,
    /// alice's `launch/patient patient/*.cruds`.
    alice: String,
    alice_session: String,
    /// drsmith's `user/*.cruds`.
    prac: String,
    prac_session: String,
}

impl World {
    async fn start(extra: &[&str], fixed_port: bool) -> World {
        let started = Instant::now();
        let node = Node::start(extra, fixed_port);
        let backend = Backend::register(&node.admin, ClientKey::ed25519(), "system/*.cruds").await;
        let sys = backend.token(&node.http, "system/*.cruds").await;
        // One transaction: one ledger commit for the whole seed.
        let entries = seed()
            .into_iter()
            .map(|r| {
                let url = format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap_or_default(),
                    r["id"].as_str().unwrap_or_default()
                );
                entry("PUT", &url, Some(r))
            })
            .collect();
        let r = fhir(&node.http, Method::POST, &node.url("/"), Some(&sys), Some(&bundle("transaction", entries))).await;
        assert_eq!(r.status, 200, "the seed: {}", r.text);
        let app = node.admin.public_client("Attack App", None).await;
        node.admin.user("alice", &format!("Patient/{ALICE}")).await;
        node.admin.user("drsmith", &format!("Practitioner/{PRAC}")).await;
        node.admin.user("relly", &format!("RelatedPerson/{RP}")).await;
        // No openid here: the first id_token makes a debug-build server derive its RSA key
        // (tens of seconds); only the escalation attack asks for it.
        let scopes = ["launch/patient", "patient/*.cruds"];
        let (t, alice_session) = token(&node, &app, &scopes, "alice", None, None).await;
        let t = t.unwrap_or_else(|e| panic!("alice's token: {e}"));
        assert_eq!(t["patient"], ALICE, "{t}");
        let alice = access_token(&t);
        let (t, prac_session) = token(&node, &app, &["user/*.cruds"], "drsmith", None, None).await;
        let prac = access_token(&t.unwrap_or_else(|e| panic!("drsmith's token: {e}")));
        eprintln!("server, seed and two logins: {:.1} s", started.elapsed().as_secs_f64());
        World { node, sys, app, alice, alice_session, prac, prac_session }
    }

    fn url(&self, path: &str) -> String {
        self.node.url(path)
    }

    fn http(&self) -> &reqwest::Client {
        &self.node.http
    }

    async fn req(&self, method: Method, path: &str, token: &str, body: Option<&Value>) -> Resp {
        fhir(&self.node.http, method, &self.url(path), Some(token), body).await
    }

    async fn get(&self, path: &str, token: &str) -> Resp {
        get(&self.node.http, &self.url(path), token).await
    }

    /// What is stored at `Type/id`, as the system client reads it: status, version and body
    /// (without `meta`). Equal before and after an attack = the attack changed nothing.
    async fn stored(&self, path: &str) -> String {
        let r = self.get(path, &self.sys).await;
        if r.status != 200 {
            return format!("{} (no resource)", r.status);
        }
        let mut v = js(&r);
        let version = v["meta"]["versionId"].as_str().unwrap_or_default().to_string();
        if let Some(o) = v.as_object_mut() {
            o.remove("meta");
        }
        format!("200 v{version} {v}")
    }

    /// How many resources a search matches, as the system client counts them.
    async fn count(&self, query: &str) -> u64 {
        let sep = if query.contains('?') { '&' } else { '?' };
        let r = self.get(&format!("{query}{sep}_summary=count"), &self.sys).await;
        assert_eq!(r.status, 200, "count {query}: {}", r.text);
        js(&r)["total"].as_u64().unwrap_or_else(|| panic!("no total: {}", r.text))
    }

    /// Puts bob's Observations back as seeded (recreating deleted ones).
    async fn reseed_bob(&self) {
        for id in BOB_OBS {
            smart::put_resource(&self.node.http, &self.node.base, &self.sys, &bob_obs(id)).await;
        }
    }

    /// POSTs a batch or transaction Bundle, asking for the resources back.
    async fn bundle(&self, token: &str, bundle: &Value) -> Resp {
        send(
            self.http()
                .post(self.url("/"))
                .bearer_auth(token)
                .header(CONTENT_TYPE, "application/fhir+json")
                .header("Prefer", "return=representation")
                .body(bundle.to_string()),
        )
        .await
    }

    /// A conditional create: `POST /{rtype}` with `If-None-Exist: {criteria}`.
    async fn create_if_none_exist(&self, token: &str, rtype: &str, criteria: &str, body: &Value) -> Resp {
        send(
            self.http()
                .post(self.url(rtype))
                .bearer_auth(token)
                .header(CONTENT_TYPE, "application/fhir+json")
                .header("If-None-Exist", criteria)
                .header("Prefer", "return=representation")
                .body(body.to_string()),
        )
        .await
    }

    async fn with_purpose(&self, path: &str, token: &str, purpose: &str) -> Resp {
        send(self.http().get(self.url(path)).bearer_auth(token).header("X-Purpose-Of-Use", purpose)).await
    }

    /// `GET /Patient/{patient}/$access-report` (asserted 200).
    async fn report(&self, token: &str, patient: &str) -> Report {
        let r = self.get(&format!("Patient/{patient}/$access-report"), token).await;
        assert_eq!(r.status, 200, "access report of {patient}: {}", r.text);
        Report::parse(&js(&r))
    }
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    let mut b = json!({ "resourceType": "Bundle", "type": kind });
    b["entry"] = Value::Array(entries);
    b
}

fn entry(method: &str, url: &str, resource: Option<Value>) -> Value {
    let mut e = json!({ "request": { "method": method, "url": url } });
    if let Some(r) = resource {
        e["resource"] = r;
    }
    e
}

fn entry_if_none_exist(url: &str, resource: Value, criteria: &str) -> Value {
    let mut e = json!({ "request": { "method": "POST", "url": url, "ifNoneExist": criteria } });
    e["resource"] = resource;
    e
}

/// `response.status` of each entry of a batch or transaction response.
fn entry_statuses(b: &Value) -> Vec<String> {
    b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["response"]["status"].as_str().unwrap_or("").to_string())
        .collect()
}

/// `Type/id` of every entry of a Bundle (matches and includes alike).
fn entry_ids(b: &Value) -> Vec<String> {
    b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| !e["resource"].is_null())
        .map(|e| {
            let r = &e["resource"];
            format!("{}/{}", r["resourceType"].as_str().unwrap_or_default(), r["id"].as_str().unwrap_or_default())
        })
        .collect()
}

/// An access report: the total and, per accessor, (count, denied).
struct Report {
    total: i64,
    accessors: BTreeMap<String, (i64, i64)>,
}

impl Report {
    fn parse(p: &Value) -> Report {
        let params = p["parameter"].as_array().cloned().unwrap_or_default();
        let total = params.iter().find(|x| x["name"] == "total").and_then(|x| x["valueInteger"].as_i64()).unwrap_or(0);
        let part = |x: &Value, name: &str| -> Value {
            x["part"].as_array().and_then(|ps| ps.iter().find(|y| y["name"] == name)).cloned().unwrap_or(Value::Null)
        };
        let accessors = params
            .iter()
            .filter(|x| x["name"] == "accessor")
            .map(|x| {
                let who = part(x, "who")["valueString"].as_str().unwrap_or_default().to_string();
                let count = part(x, "count")["valueInteger"].as_i64().unwrap_or(0);
                let denied = part(x, "denied")["valueInteger"].as_i64().unwrap_or(0);
                (who, (count, denied))
            })
            .collect();
        Report { total, accessors }
    }

    fn count(&self, who: &str) -> i64 {
        self.accessors.get(who).map_or(0, |a| a.0)
    }
}

// ---------------------------------------------------------------------------------------------
// The browser: login and consent pages, carrying every hidden field (a CSRF token included)

/// The named inputs of the form whose `action` ends with `action`: (type, name, value).
fn form_inputs(html: &str, action: &str) -> Vec<(String, String, String)> {
    let Some(at) = html.find(&format!("{action}\"")).or_else(|| html.find(&format!("{action}'"))) else {
        return Vec::new();
    };
    let end = html[at..].find("</form>").map_or(html.len(), |e| at + e);
    tags(&html[at..end], "input")
        .into_iter()
        .filter_map(|t| {
            let name = attr(&t, "name")?.to_string();
            let kind = attr(&t, "type").unwrap_or("text").to_ascii_lowercase();
            Some((kind, name, attr(&t, "value").unwrap_or_default().to_string()))
        })
        .collect()
}

/// The consent page of one authorize request, and the PKCE verifier of that request.
struct ConsentPage {
    html: String,
    /// `fl_session=..`
    session: String,
    verifier: String,
}

/// `GET /auth/authorize` (as `user`, signing in unless `session` is given) up to the consent
/// page; `Err` with what the server answered instead.
async fn open_consent(
    node: &Node,
    client_id: &str,
    scopes: &[&str],
    user: &str,
    session: Option<&str>,
) -> Result<ConsentPage, String> {
    let (verifier, challenge) = smart::pkce();
    let url = smart::authorize_url(&node.base, client_id, scopes, &challenge, &smart::random_hex(8), None);
    let mut req = node.http.get(&url);
    if let Some(s) = session {
        req = req.header(COOKIE, s);
    }
    let r = send(req).await;
    if r.status != 200 {
        return Err(format!("authorize: {} {} {}", r.status, r.header("location"), clip(&r.text)));
    }
    let (html, session) = if r.text.contains(r#"id="login""#) {
        let mut form: Vec<(String, String)> = form_inputs(&r.text, "/auth/login")
            .into_iter()
            .filter(|(k, n, _)| k == "hidden" && n != "username" && n != "password")
            .map(|(_, n, v)| (n, v))
            .collect();
        form.push(("username".into(), user.into()));
        form.push(("password".into(), smart::PASSWORD.into()));
        let r = send(node.http.post(node.url("/auth/login")).header("Origin", &node.base).form(&form)).await;
        if r.status != 200 {
            return Err(format!("login as {user}: {} {}", r.status, clip(&r.text)));
        }
        let session = cookie(&r.headers, "fl_session").ok_or("a login without a session cookie")?;
        (r.text, session)
    } else {
        let s = session.map(str::to_string).ok_or("no login page and no session")?;
        (r.text.clone(), cookie(&r.headers, "fl_session").unwrap_or(s))
    };
    if !html.contains(r#"id="consent""#) {
        return Err(format!("not the consent page: {}", clip(&html)));
    }
    Ok(ConsentPage { html, session, verifier })
}

/// The consent form as a browser submits it: every hidden field, every offered scope ticked,
/// `patient` = `pick` when given, decision approve.
fn consent_form(html: &str, pick: Option<&str>) -> Vec<(String, String)> {
    let mut form = Vec::new();
    for (kind, name, value) in form_inputs(html, "/auth/consent") {
        match (kind.as_str(), name.as_str()) {
            (_, "patient" | "decision") => {}
            ("checkbox" | "hidden", _) => form.push((name, value)),
            _ => {}
        }
    }
    if let Some(p) = pick {
        form.push(("patient".into(), p.into()));
    }
    form.push(("decision".into(), "approve".into()));
    form
}

async fn post_consent(node: &Node, session: &str, form: &[(String, String)], origin: Option<&str>) -> Resp {
    let mut req = node.http.post(node.url("/auth/consent")).header(COOKIE, session).form(form);
    if let Some(o) = origin {
        req = req.header("Origin", o);
    }
    send(req).await
}

/// The code of the consent answer's redirect; `Err` for an error redirect or another answer.
fn code_of(r: &Resp) -> Result<String, String> {
    if r.status != 302 {
        return Err(format!("consent: {} {}", r.status, clip(&r.text)));
    }
    let location = r.header("location");
    let to = reqwest::Url::parse(&location).map_err(|e| format!("Location {location:?}: {e}"))?;
    match smart::query_param(&to, "code") {
        Some(c) => Ok(c),
        None => Err(format!("consent redirected with {location}")),
    }
}

/// The whole flow (authorize, login, consent, code exchange with `redirect_uri`): the token
/// response, or why there is none; and the session cookie.
async fn token(
    node: &Node,
    client_id: &str,
    scopes: &[&str],
    user: &str,
    session: Option<&str>,
    pick: Option<&str>,
) -> (Result<Value, String>, String) {
    let page = match open_consent(node, client_id, scopes, user, session).await {
        Ok(p) => p,
        Err(e) => return (Err(e), session.unwrap_or_default().to_string()),
    };
    let r = post_consent(node, &page.session, &consent_form(&page.html, pick), Some(&node.base)).await;
    let result = match code_of(&r) {
        Ok(code) => {
            let r = smart::exchange(&node.http, &node.base, client_id, &code, &page.verifier).await;
            if r.status == 200 {
                Ok(js(&r))
            } else {
                Err(format!("code exchange: {} {}", r.status, r.text))
            }
        }
        Err(e) => Err(e),
    };
    (result, page.session)
}

fn scopes_of(token_response: &Value) -> Vec<String> {
    token_response["scope"].as_str().unwrap_or_default().split_whitespace().map(str::to_string).collect()
}

// ---------------------------------------------------------------------------------------------
// Conditional interactions, Bundles, resources outside the compartment (items 1, 2, 3, 5)

/// alice's `patient/*.cruds` token against bob through conditional create (If-None-Exist),
/// conditional update and patch, conditional delete by `_id` and by `patient`, each single and
/// as batch and transaction entries; a transaction writing into bob's compartment; bob's
/// Device, Contract and GuidanceResponse; compartment searches, `_include` / `_revinclude` and
/// bob's access report. Holes on the code before issue 15: items 1, 2, 3 and 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_conditional_and_bundle_paths() {
    let w = World::start(&[], false).await;
    let mut holes = Holes::new("conditional_and_bundle_paths");
    let alice = w.alice.clone();

    // 1. Conditional create matching bob's resource: "no match" (201, a new resource of alice's),
    //    never 200 with bob's resource, never 412 with a count of bob's.
    let r = w.create_if_none_exist(&alice, "Observation", "_id=obs-bob-cc", &alice_obs("cc by id")).await;
    holes.no_secret(&r, "1: POST Observation, If-None-Exist: _id=<bob's>");
    holes.check(
        r.status == 201,
        format!("1: If-None-Exist _id=<bob's> answers {} (a hidden match is no match: 201)", r.status),
    );
    holes.check(js(&r)["id"] != "obs-bob-cc", "1: If-None-Exist _id=<bob's> answers with bob's id");
    let r = w
        .create_if_none_exist(&alice, "Observation", &format!("patient=Patient/{BOB}"), &alice_obs("cc by patient"))
        .await;
    holes.no_secret(&r, "1: If-None-Exist: patient=<bob>");
    holes.check(
        r.status != 412,
        format!("1: If-None-Exist patient=<bob> answers 412 (counts bob's): {}", clip(&r.text)),
    );
    holes.check(r.status == 201, format!("1: If-None-Exist patient=<bob> answers {} (expected 201)", r.status));
    for kind in ["transaction", "batch"] {
        for (criteria, note) in
            [("_id=obs-bob-cc".to_string(), "by id"), (format!("patient=Patient/{BOB}"), "by patient")]
        {
            let b = bundle(
                kind,
                vec![entry_if_none_exist("Observation", alice_obs(&format!("{kind} cc {note}")), &criteria)],
            );
            let r = w.bundle(&alice, &b).await;
            let what = format!("1: {kind} entry POST Observation ifNoneExist {criteria}");
            holes.no_secret(&r, &what);
            let statuses = entry_statuses(&js(&r));
            holes.check(
                r.status == 200 && statuses.len() == 1 && statuses[0].starts_with("201"),
                format!("{what}: answers {} {statuses:?} (expected a 201 entry): {}", r.status, clip(&r.text)),
            );
            holes.check(!r.text.contains("matched"), format!("{what}: reveals a count: {}", clip(&r.text)));
        }
    }
    // The disclosure of a conditional create that matches alice's own resource is logged.
    let me = format!("Patient/{ALICE}");
    let before = w.report(&alice, ALICE).await.count(&me);
    assert_eq!(w.get("Observation/obs-alice-1", &alice).await.status, 200);
    let read = w.report(&alice, ALICE).await.count(&me);
    assert!(read > before, "alice's own read is in her access report ({before} -> {read})");
    let before = read;
    let r = w.create_if_none_exist(&alice, "Observation", "_id=obs-alice-1", &alice_obs("cc own")).await;
    assert_eq!(r.status, 200, "a conditional create matching alice's own Observation: {}", r.text);
    let after = w.report(&alice, ALICE).await.count(&me);
    holes.check(
        after > before,
        format!("1: a conditional create that showed alice her own Observation is not in her access report ({before} -> {after})"),
    );

    // 2. Conditional update of bob's: alice's body creates a new resource; bob's is unchanged.
    let target = "Observation/obs-bob-cu1";
    let before = w.stored(target).await;
    let r = w.req(Method::PUT, "Observation?_id=obs-bob-cu1", &alice, Some(&alice_obs("cu no id"))).await;
    holes.no_secret(&r, "2: PUT Observation?_id=<bob's>");
    holes.check(
        w.stored(target).await == before,
        format!(
            "2: PUT Observation?_id=<bob's> (alice body, no id) changed bob's Observation: {} {}",
            r.status,
            clip(&r.text)
        ),
    );
    holes.check(
        r.status == 201,
        format!("2: PUT Observation?_id=<bob's> answers {} (a hidden match is no match: 201)", r.status),
    );
    let target = "Observation/obs-bob-cu2";
    let before = w.stored(target).await;
    let r = w
        .req(
            Method::PUT,
            "Observation?_id=obs-bob-cu2",
            &alice,
            Some(&observation(Some("obs-bob-cu2"), ALICE, "cu with id")),
        )
        .await;
    holes.no_secret(&r, "2: PUT Observation?_id=<bob's> with id");
    holes.check(
        w.stored(target).await == before,
        format!("2: PUT Observation?_id=<bob's> with body id = bob's changed it: {} {}", r.status, clip(&r.text)),
    );
    holes.check(
        r.status == 404 || r.status == 403,
        format!("2: PUT Observation?_id=<bob's> with bob's id answers {} (expected 404 or 403)", r.status),
    );
    for (kind, id) in [("transaction", "obs-bob-cu3"), ("batch", "obs-bob-cu4")] {
        let target = format!("Observation/{id}");
        let before = w.stored(&target).await;
        let b =
            bundle(kind, vec![entry("PUT", &format!("Observation?_id={id}"), Some(alice_obs(&format!("{kind} cu"))))]);
        let r = w.bundle(&alice, &b).await;
        holes.no_secret(&r, &format!("2: {kind} PUT Observation?_id=<bob's>"));
        holes.check(
            w.stored(&target).await == before,
            format!("2: {kind} PUT Observation?_id=<bob's> changed bob's Observation: {} {}", r.status, clip(&r.text)),
        );
    }
    // Conditional patch: never applied to bob's.
    let target = "Observation/obs-bob-p";
    let before = w.stored(target).await;
    let patch = json!([{ "op": "replace", "path": "/subject/reference", "value": format!("Patient/{ALICE}") }]);
    for path in ["Observation?_id=obs-bob-p", "Observation/obs-bob-p"] {
        let r = send(
            w.http()
                .patch(w.url(path))
                .bearer_auth(&alice)
                .header(CONTENT_TYPE, "application/json-patch+json")
                .body(patch.to_string()),
        )
        .await;
        holes.no_secret(&r, &format!("PATCH {path}"));
        holes.check(!(200..300).contains(&r.status), format!("variant: PATCH {path} answers {}", r.status));
        holes.check(w.stored(target).await == before, format!("variant: PATCH {path} changed bob's Observation"));
    }

    // A transaction that writes into bob's compartment: 403, and none of it is written.
    let marker = format!("tx-mixed-{}", smart::random_hex(4));
    let mut into_bob = observation(None, BOB, &marker);
    into_bob["identifier"][0]["value"] = json!(marker);
    let b = bundle(
        "transaction",
        vec![
            entry("POST", "Observation", Some(observation(None, ALICE, &marker))),
            entry("POST", "Observation", Some(into_bob)),
        ],
    );
    let r = w.bundle(&alice, &b).await;
    holes.check(r.status == 403, format!("variant: a transaction writing into bob's compartment answers {}", r.status));
    let written = w.count(&format!("Observation?identifier={ATTACK}|{marker}")).await;
    holes.check(written == 0, format!("variant: a refused transaction wrote {written} resources"));
    // The same in a transaction large enough to have its entries checked on every core (64
    // or more), with a deletion of bob's among them: refused, none of it written, bob's
    // unchanged.
    let marker = format!("tx-large-{}", smart::random_hex(4));
    let into_bob = observation(None, BOB, &marker);
    smart::put_resource(w.http(), &w.node.base, &w.sys, &bob_obs("obs-bob-d1")).await;
    let before = w.stored("Observation/obs-bob-d1").await;
    let mut entries: Vec<Value> =
        (0..70).map(|_| entry("POST", "Observation", Some(observation(None, ALICE, &marker)))).collect();
    entries.insert(35, entry("DELETE", "Observation/obs-bob-d1", None));
    entries.push(entry("POST", "Observation", Some(into_bob)));
    let r = w.bundle(&alice, &bundle("transaction", entries)).await;
    holes.no_secret(&r, "variant: a 72-entry transaction into bob's compartment");
    holes.check(
        !(200..300).contains(&r.status),
        format!("variant: a 72-entry transaction writing into bob's compartment answers {}", r.status),
    );
    let written = w.count(&format!("Observation?identifier={ATTACK}|{marker}")).await;
    holes.check(written == 0, format!("variant: a refused 72-entry transaction wrote {written} resources"));
    holes.check(
        w.stored("Observation/obs-bob-d1").await == before,
        "variant: a refused 72-entry transaction deleted bob's Observation".to_string(),
    );

    // Variant, bundle paths with RESTful fullUrls: a relative `Patient/<bob>` read against this server's base stays
    //    bob's (and the write is refused as any write into his compartment); read against
    //    another server's base it names that server's patient, never bob here.
    let bobs = format!("Observation?subject=Patient/{BOB}");
    for (kind, base) in [
        ("transaction", w.node.base.clone()),
        ("batch", w.node.base.clone()),
        ("transaction", "https://elsewhere.example/fhir".to_string()),
        ("batch", "https://elsewhere.example/fhir".to_string()),
    ] {
        let before = w.count(&bobs).await;
        let mut e = entry("POST", "Observation", Some(observation(None, BOB, &format!("{kind} full url {base}"))));
        e["fullUrl"] = json!(format!("{base}/Observation/by-alice"));
        let r = w.bundle(&alice, &bundle(kind, vec![e])).await;
        let what = format!("variant: {kind} POST Observation of Patient/<bob> under fullUrl {base}/Observation/..");
        holes.no_secret(&r, &what);
        holes.check(
            w.count(&bobs).await == before,
            format!("{what} wrote into bob's compartment: {} {}", r.status, clip(&r.text)),
        );
    }

    // 3. Transaction and batch DELETE Observation?_id=<bob's>, with patient=<bob> criteria
    //    matching one, and by plain id. (The target is put back before each.)
    for (kind, id) in [("transaction", "obs-bob-d1"), ("batch", "obs-bob-d2")] {
        let target = format!("Observation/{id}");
        for url in
            [format!("Observation?_id={id}"), format!("Observation?patient=Patient/{BOB}&_id={id}"), target.clone()]
        {
            smart::put_resource(w.http(), &w.node.base, &w.sys, &bob_obs(id)).await;
            let before = w.stored(&target).await;
            let r = w.bundle(&alice, &bundle(kind, vec![entry("DELETE", &url, None)])).await;
            holes.no_secret(&r, &format!("3: {kind} DELETE {url}"));
            holes.check(
                w.stored(&target).await == before,
                format!("3: {kind} DELETE {url} deleted bob's Observation: {} {}", r.status, clip(&r.text)),
            );
        }
    }

    // A hidden resource answers exactly like a missing one (status and body, ids aside).
    for (hidden, missing) in [
        ("Observation/obs-bob-1", "Observation/obs-nobody"),
        ("Observation/obs-bob-1/_history/1", "Observation/obs-nobody/_history/1"),
        ("Observation/obs-bob-1/_history", "Observation/obs-nobody/_history"),
        ("Patient/pat-bob", "Patient/pat-nobody"),
        ("Device/dev-bob", "Device/dev-nobody"),
        ("Contract/con-bob", "Contract/con-nobody"),
        ("GuidanceResponse/gr-bob", "GuidanceResponse/gr-nobody"),
    ] {
        let a = w.get(hidden, &alice).await;
        let b = w.get(missing, &alice).await;
        let id = |p: &str| p.split('/').nth(1).unwrap_or_default().to_string();
        let (ha, hb) = (a.text.replace(&id(hidden), "ID"), b.text.replace(&id(missing), "ID"));
        holes.check(
            a.status == b.status && ha == hb,
            format!(
                "5/hidden: GET {hidden} answers {} {}, unlike a missing one: {} {}",
                a.status,
                clip(&ha),
                b.status,
                clip(&hb)
            ),
        );
    }

    // 5. Bob's Device, Contract and GuidanceResponse: as missing to alice.
    for path in BOB_OUTSIDE {
        let rtype = path.split('/').next().unwrap_or_default();
        let r = w.get(path, &alice).await;
        holes.no_secret(&r, &format!("5: GET {path}"));
        holes.check(r.status == 404, format!("5: alice reads bob's {path}: {}", r.status));
        for q in [
            rtype.to_string(),
            format!("{rtype}?patient=Patient/{BOB}"),
            format!("{rtype}?_id={}", path.rsplit('/').next().unwrap_or_default()),
        ] {
            let r = w.get(&q, &alice).await;
            holes.no_secret(&r, &format!("5: GET {q}"));
            holes.check(!entry_ids(&js(&r)).contains(&path.to_string()), format!("5: GET {q} finds bob's {path}"));
        }
        let r = w.get(&format!("{rtype}?_summary=count"), &alice).await;
        holes.check(js(&r)["total"] == 0, format!("5: GET {rtype}?_summary=count counts bob's: {}", clip(&r.text)));
    }
    for path in BOB_OUTSIDE {
        let before = w.stored(path).await;
        let mut body = js(&w.get(path, &w.sys).await);
        if let Some(o) = body.as_object_mut() {
            o.remove("meta");
        }
        body["identifier"] = json!([{ "system": ATTACK, "value": "overwritten by alice" }]);
        let r = w.req(Method::PUT, path, &alice, Some(&body)).await;
        holes.no_secret(&r, &format!("5: PUT {path}"));
        holes.check(r.status == 404 || r.status == 403, format!("5: alice PUTs bob's {path}: {}", r.status));
        holes.check(w.stored(path).await == before, format!("5: alice's PUT changed bob's {path}"));
        // No existence oracle: the same body PUT at an id nobody holds answers alike.
        let (rtype, bob_id) = path.split_once('/').unwrap_or_default();
        let unused = format!("{rtype}/never-used-{bob_id}");
        body["id"] = json!(unused.rsplit('/').next().unwrap_or_default());
        let fresh = w.req(Method::PUT, &unused, &alice, Some(&body)).await;
        holes.check(
            fresh.status == r.status,
            format!("5: alice's PUT of bob's {path} answers {}, at an unused id {}", r.status, fresh.status),
        );
        let r = w.req(Method::DELETE, path, &alice, None).await;
        holes.check(r.status == 404 || r.status == 403, format!("5: alice DELETEs bob's {path}: {}", r.status));
        holes.check(w.get(path, &w.sys).await.status == 200, format!("5: alice deleted bob's {path}"));
    }

    // Bob's compartment, includes from alice's own resources, bob's access report.
    for path in [
        format!("Patient/{BOB}/*"),
        format!("Patient/{BOB}/Observation"),
        format!("Patient/{BOB}/Device"),
        format!("Patient/{BOB}/Observation?_summary=count"),
    ] {
        let r = w.get(&path, &alice).await;
        holes.no_secret(&r, &format!("variant: GET {path}"));
        let b = js(&r);
        let empty = entry_ids(&b).is_empty() && b["total"].as_u64().unwrap_or(0) == 0;
        holes.check(
            [400, 403, 404].contains(&r.status) || (r.status == 200 && empty),
            format!("variant: GET {path}: {} {}", r.status, clip(&r.text)),
        );
    }
    for q in [
        "Observation?_include=Observation:has-member&_include=Observation:derived-from&_include=Observation:focus".to_string(),
        "Observation?_id=obs-alice-link&_include=Observation:has-member&_include=Observation:focus".to_string(),
        "Observation?_id=obs-alice-link&_include:iterate=Observation:has-member&_include:iterate=Observation:subject".to_string(),
        format!("Patient?_id={ALICE}&_revinclude=Device:patient&_revinclude=Contract:patient&_revinclude=GuidanceResponse:patient"),
        "Device?_include=Device:patient".to_string(),
        "Observation?_id=obs-bob-1&_revinclude=Observation:has-member".to_string(),
    ] {
        let r = w.get(&q, &alice).await;
        holes.no_secret(&r, &format!("variant: GET {q}"));
        let ids = entry_ids(&js(&r));
        let bobs: Vec<&String> = ids
            .iter()
            .filter(|id| *id == "Observation/obs-bob-1" || *id == "Patient/pat-bob" || BOB_OUTSIDE.contains(&id.as_str()))
            .collect();
        holes.check(bobs.is_empty(), format!("variant: GET {q} includes {bobs:?}"));
    }
    let r = w.get(&format!("Patient/{BOB}/$access-report"), &alice).await;
    holes.check(r.status == 403 || r.status == 404, format!("variant: alice reads bob's $access-report: {}", r.status));

    // 3. By patient: single, transaction and batch DELETE Observation?patient=<bob>. (Last:
    //    where one succeeds it deletes every Observation of bob's; they are put back between.)
    let bobs = format!("Observation?subject=Patient/{BOB}");
    let url = format!("Observation?patient=Patient/{BOB}");
    for url in [url.clone(), format!("{url}&_id=obs-bob-1")] {
        let before = w.count(&bobs).await;
        let r = w.req(Method::DELETE, &url, &alice, None).await;
        holes.check(
            w.count(&bobs).await == before,
            format!("3: DELETE {url} deleted bob's Observations: {} {}", r.status, clip(&r.text)),
        );
    }
    for kind in ["transaction", "batch"] {
        w.reseed_bob().await;
        let before = w.count(&bobs).await;
        assert_eq!(before, BOB_OBS.len() as u64, "bob's Observations are back");
        let r = w.bundle(&alice, &bundle(kind, vec![entry("DELETE", &url, None)])).await;
        holes.no_secret(&r, &format!("3: {kind} DELETE {url}"));
        let after = w.count(&bobs).await;
        holes.check(
            after == before,
            format!(
                "3: {kind} DELETE {url} deleted {} of bob's Observations: {} {}",
                before - after.min(before),
                r.status,
                clip(&r.text)
            ),
        );
    }
    holes.finish();
}

// ---------------------------------------------------------------------------------------------
// Scopes, the consent page, revocation and introspection, break the glass (items 4, 6, 10)

/// Users asking for scopes their kind may not hold (a Patient user, a RelatedPerson and a
/// practitioner asking for `system/` and `user/`), a RelatedPerson picking a patient they are
/// not linked to, revocation by a forged refresh token and introspection without client
/// authentication, and break-the-glass by a RelatedPerson and a Patient user. Holes on the
/// code before issue 15: items 4, 6 and 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_scopes_and_consent_page() {
    let w = World::start(&[], false).await;
    let mut holes = Holes::new("scopes_and_consent_page");
    let node = &w.node;

    // 4. alice asks for system/ and user/ scopes from an app without a ceiling.
    let mut scopes = vec!["launch/patient"];
    scopes.extend(ESCALATE);
    let (t, _) = token(node, &w.app, &scopes, "alice", Some(&w.alice_session), None).await;
    let escalated = match t {
        Ok(t) => {
            let granted = scopes_of(&t);
            holes.check(
                !granted.iter().any(|s| s.starts_with("system/") || s.starts_with("user/")),
                format!("4: a Patient user was granted {granted:?}"),
            );
            Some(access_token(&t))
        }
        Err(e) => {
            eprintln!("alice's escalation request was refused: {e}");
            None
        }
    };
    if let Some(t) = &escalated {
        let r = w.get(&format!("Patient/{BOB}"), t).await;
        holes.no_secret(&r, "4: alice's escalated token reads Patient/<bob>");
        holes.check(r.status == 404, format!("4: alice's escalated token reads Patient/<bob>: {}", r.status));
        let r = w.get(&format!("Observation?subject=Patient/{BOB}"), t).await;
        holes.no_secret(&r, "4: alice's escalated token searches bob's Observations");
        let r = w.req(Method::DELETE, &format!("Patient/{BOB}"), t, None).await;
        holes.check(
            r.status == 403 || r.status == 404,
            format!("4: alice's escalated token DELETEs Patient/<bob>: {}", r.status),
        );
        let exists = w.get(&format!("Patient/{BOB}"), &w.sys).await.status == 200;
        holes.check(exists, "4: alice's escalated token deleted bob's Patient");
        if !exists {
            smart::put_resource(&node.http, &node.base, &w.sys, &patient(BOB)).await;
        }
    }
    // A practitioner may get user/, nobody system/ through the authorization-code flow.
    let (t, _) = token(node, &w.app, ESCALATE, "drsmith", Some(&w.prac_session), None).await;
    if let Ok(t) = t {
        let granted = scopes_of(&t);
        holes.check(
            !granted.iter().any(|s| s.starts_with("system/")),
            format!("4: a practitioner was granted {granted:?}"),
        );
    }
    // A RelatedPerson gets neither.
    let (t, relly_session) = token(node, &w.app, &scopes, "relly", None, Some(ALICE)).await;
    if let Ok(t) = &t {
        let granted = scopes_of(t);
        holes.check(
            !granted.iter().any(|s| s.starts_with("system/") || s.starts_with("user/")),
            format!("4: a RelatedPerson was granted {granted:?}"),
        );
        let r = w.get("Observation/obs-bob-1", &access_token(t)).await;
        holes.no_secret(&r, "4: the RelatedPerson's escalated token reads bob's Observation");
    }

    // 10. The RelatedPerson (linked to alice only) picks bob on the consent page.
    let (t, _) =
        token(node, &w.app, &["launch/patient", "patient/*.rs"], "relly", Some(&relly_session), Some(BOB)).await;
    match t {
        Err(e) => eprintln!("the RelatedPerson's pick of bob was refused: {e}"),
        Ok(t) => {
            holes.check(t["patient"] != BOB, format!("10: a RelatedPerson not linked to bob got a token for bob: {t}"));
            let rp = access_token(&t);
            for path in [format!("Patient/{BOB}"), "Observation/obs-bob-1".to_string(), "Device/dev-bob".to_string()] {
                let r = w.get(&path, &rp).await;
                holes.no_secret(&r, &format!("10: the RelatedPerson's token for bob reads {path}"));
            }
            let r = w.get(&format!("Observation?subject=Patient/{BOB}"), &rp).await;
            holes.no_secret(&r, "10: the RelatedPerson's token for bob searches");
        }
    }
    // The RelatedPerson picks alice, whom they are linked to: allowed.
    let (t, _) =
        token(node, &w.app, &["launch/patient", "patient/*.rs"], "relly", Some(&relly_session), Some(ALICE)).await;
    let relly =
        access_token(&t.unwrap_or_else(|e| panic!("the RelatedPerson picks alice, whom they are linked to: {e}")));
    assert_eq!(w.get("Observation/obs-alice-1", &relly).await.status, 200, "the RelatedPerson reads alice's data");

    // 6. Revocation without authentication: a forged refresh token naming alice's grant.
    let (t, _) = token(node, &w.app, &["launch/patient", "patient/*.rs"], "alice", Some(&w.alice_session), None).await;
    let victim = access_token(&t.expect("another token of alice's"));
    let grant = smart::parse_jwt(&victim).claims["grant"].as_str().expect("a grant claim").to_string();
    let form = [("token", format!("{grant}.anything")), ("client_id", w.app.clone())];
    let r = send(w.http().post(w.url("/auth/revoke")).form(&form)).await;
    let still = w.get(&format!("Patient/{ALICE}"), &victim).await;
    holes.check(
        still.status == 200,
        format!(
            "6: POST /auth/revoke token=<alice's grant id>.anything ({}) revoked alice's token: {}",
            r.status, still.status
        ),
    );
    // Introspection with only a public client_id.
    let form = [("token", w.alice.as_str()), ("client_id", w.app.as_str())];
    let r = send(w.http().post(w.url("/auth/introspect")).form(&form)).await;
    holes.check(
        r.status == 401 && js(&r)["error"] == "invalid_client",
        format!("6: introspection with a bare public client_id answers {} {}", r.status, clip(&r.text)),
    );

    // 10. Break the glass is for practitioners: alice's Consent denies the RelatedPerson and
    //     the practitioner; only the practitioner's ETREAT overrides it.
    let consent = json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": reference("Patient", ALICE),
        "policyRule": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN" }] },
        "provision": { "type": "permit", "provision": [{ "type": "deny", "actor": [
            { "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
              "reference": reference("RelatedPerson", RP) },
            { "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
              "reference": reference("Practitioner", PRAC) },
        ] }] },
    });
    let r = w.req(Method::POST, "Consent", &w.alice, Some(&consent)).await;
    assert_eq!(r.status, 201, "alice writes a Consent: {}", r.text);
    let path = "Observation/obs-alice-1";
    let r = w.get(path, &relly).await;
    assert!(r.status != 200, "the Consent hides alice's data from the RelatedPerson: {}", r.status);
    let r = w.with_purpose(path, &relly, "ETREAT").await;
    holes.check(
        [401, 403, 404].contains(&r.status) && !r.text.contains("alice 1"),
        format!(
            "10: a RelatedPerson breaks the glass (X-Purpose-Of-Use: ETREAT) through alice's Consent: {}",
            r.status
        ),
    );
    assert_eq!(w.get(path, &w.prac).await.status, 404, "the Consent hides alice's data from the practitioner");
    let r = w.with_purpose(path, &w.prac, "ETREAT").await;
    assert_eq!(r.status, 200, "a practitioner may break the glass: {}", r.text);
    // A Patient user breaks the glass through bob's Consent (denying everyone).
    let deny_all = json!({
        "resourceType": "Consent",
        "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": reference("Patient", BOB),
        "policyRule": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT" }] },
        "provision": { "type": "deny" },
    });
    let r = w.req(Method::POST, "Consent", &w.sys, Some(&deny_all)).await;
    assert_eq!(r.status, 201, "bob's Consent: {}", r.text);
    for (who, t) in [("alice's patient token", Some(&w.alice)), ("alice's escalated token", escalated.as_ref())] {
        let Some(t) = t else { continue };
        let r = w.with_purpose("Observation/obs-bob-1", t, "ETREAT").await;
        holes.no_secret(&r, &format!("10: {who} breaks the glass through bob's Consent"));
        holes.check(
            r.status == 404,
            format!("10: {who} with X-Purpose-Of-Use: ETREAT reads bob's Observation: {}", r.status),
        );
    }

    // Every route refuses a token without the scope it needs: a token for alice's Patient
    // resource only, against each way to reach her Observations.
    let scopes = ["launch/patient", "patient/Patient.rs"];
    let (t, _) = token(node, &w.app, &scopes, "alice", Some(&w.alice_session), None).await;
    let narrow = access_token(&t.expect("alice's token for her Patient resource only"));
    let target = "Observation/obs-alice-1";
    let before = w.stored(target).await;
    let mine = observation(Some("obs-alice-1"), ALICE, "narrow");
    let new = alice_obs("narrow");
    let routes: Vec<(Method, &str, Option<&Value>)> = vec![
        (Method::GET, "Observation/obs-alice-1", None),
        (Method::GET, "Observation/obs-alice-1/_history/1", None),
        (Method::GET, "Observation/obs-alice-1/_history", None),
        (Method::GET, "Observation/obs-alice-1/_history/1/$proof", None),
        (Method::GET, "Observation", None),
        (Method::GET, "Observation?_id=obs-alice-1", None),
        (Method::POST, "Observation/_search", None),
        (Method::GET, "Observation/_history", None),
        (Method::GET, "Patient/pat-alice/Observation", None),
        (Method::POST, "Observation", Some(&new)),
        (Method::PUT, "Observation/obs-alice-1", Some(&mine)),
        (Method::PUT, "Observation?_id=obs-alice-1", Some(&mine)),
        (Method::DELETE, "Observation/obs-alice-1", None),
        (Method::DELETE, "Observation?_id=obs-alice-1", None),
        (Method::GET, "Patient/pat-alice/$access-report", None),
        (Method::POST, "Patient/pat-alice/$erase", None),
    ];
    for (method, path, body) in routes {
        let r = w.req(method.clone(), path, &narrow, body).await;
        holes.check(
            r.status == 403,
            format!("route: {method} {path} with patient/Patient.rs only answers {}", r.status),
        );
    }
    let operations = json!([{ "op": "replace", "path": "/status", "value": "amended" }]);
    let r = send(
        w.http()
            .patch(w.url(target))
            .bearer_auth(&narrow)
            .header(CONTENT_TYPE, "application/json-patch+json")
            .body(operations.to_string()),
    )
    .await;
    holes.check(r.status == 403, format!("route: PATCH {target} with patient/Patient.rs only answers {}", r.status));
    for q in ["?_type=Observation", "_history", "Patient?_revinclude=Observation:subject"] {
        let r = w.get(q, &narrow).await;
        holes.check(
            !r.text.contains(r#""resourceType":"Observation""#),
            format!("route: GET {q} with patient/Patient.rs only shows Observations ({})", r.status),
        );
    }
    for kind in ["batch", "transaction"] {
        let entries = vec![
            entry("GET", target, None),
            entry("PUT", target, Some(mine.clone())),
            entry("DELETE", "Observation?_id=obs-alice-1", None),
        ];
        let r = w.bundle(&narrow, &bundle(kind, entries)).await;
        holes.check(
            !r.text.contains(r#""resourceType":"Observation""#),
            format!("route: a {kind} with patient/Patient.rs only shows an Observation ({})", r.status),
        );
    }
    holes.check(
        w.stored(target).await == before,
        "route: a token without Observation scopes changed alice's Observation",
    );
    holes.finish();
}

/// Under `consent_default = "opt-in"` alice's approval of an app permits that app for alice
/// only: a practitioner using the same app sees none of alice's data. Hole on the code before
/// issue 15: item 11 (the grant Consent's actor is only the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_opt_in_approval_is_not_for_every_user_of_the_app() {
    // `--consent-default opt-in` (config key `consent_default`).
    let w = World::start(&["--consent-default", "opt-in"], false).await;
    let mut holes = Holes::new("opt_in_approval");
    // World::start had alice approve the app (her grant Consent) and drsmith use it.
    let r = w.get("Observation/obs-alice-1", &w.alice).await;
    assert_eq!(r.status, 200, "alice's own token reads her data: {}", r.text);
    let r = w.get("Observation/obs-alice-1", &w.prac).await;
    holes.check(
        r.status == 404,
        format!("11: a practitioner using the app alice approved reads her Observation: {}", r.status),
    );
    for q in [
        format!("Observation?subject=Patient/{ALICE}"),
        "Observation".to_string(),
        format!("Patient/{ALICE}/Observation"),
    ] {
        let r = w.get(&q, &w.prac).await;
        let alices: Vec<String> = entry_ids(&js(&r)).into_iter().filter(|id| id.contains("alice")).collect();
        holes.check(alices.is_empty(), format!("11: the practitioner's GET {q} finds {alices:?}"));
    }
    // Another app, not approved by alice: nothing (as before).
    let other = w.node.admin.public_client("Other App", None).await;
    let (t, _) = token(&w.node, &other, &["user/*.rs"], "drsmith", Some(&w.prac_session), None).await;
    let t = access_token(&t.expect("drsmith's token for the other app"));
    assert_eq!(w.get("Observation/obs-alice-1", &t).await.status, 404, "opt-in: no Consent, no access");
    holes.finish();
}

// ---------------------------------------------------------------------------------------------
// The disclosure log and the ledger (items 7, 8, 9)

/// `GET /ledger/head`'s tree size.
async fn tree_size(node: &Node) -> u64 {
    let r = send(node.http.get(node.url("/ledger/head"))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let v = js(&r);
    let p = v["parameter"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == "treeSize")).cloned();
    p.and_then(|p| p["valueString"].as_str().and_then(|s| s.parse().ok()).or(p["valueInteger"].as_u64()))
        .unwrap_or_else(|| panic!("no treeSize in {v}"))
}

/// The tree size once it has stopped growing (the same for a second).
async fn settled_tree_size(node: &Node) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = tree_size(node).await;
    let mut same_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = tree_size(node).await;
        if now != last {
            last = now;
            same_since = Instant::now();
        } else if same_since.elapsed() >= Duration::from_millis(1200) {
            return now;
        }
        assert!(Instant::now() < deadline, "the ledger kept growing for 20 s");
    }
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}

/// Server-written AuditEvents about `patient`, once the index has them.
async fn server_audit_events(w: &World, patient: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = smart::search_all(
            w.http(),
            &w.node.base,
            &w.sys,
            &format!("AuditEvent?patient=Patient/{patient}&outcome=0"),
        )
        .await;
        if !events.is_empty() {
            return events;
        }
        assert!(Instant::now() < deadline, "no AuditEvent about {patient} after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ledger's endpoints for auditors leak no patient to anonymous callers or to alice; the
/// disclosure log cannot be written, changed or deleted by a client with `user/*.cruds`, nor
/// counted into alice's access report; unauthenticated requests cannot grow the ledger. Holes
/// on the code before issue 15: items 7, 8 and 9.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_disclosure_log_and_ledger() {
    let w = World::start(&[], false).await;
    let mut holes = Holes::new("disclosure_log_and_ledger");
    let node = &w.node;

    // 9. /ledger/entries and /ledger/proof need a caller who may see what they name.
    let r = send(w.http().get(w.url("/ledger/entries?_count=1000"))).await;
    holes.check(r.status == 401, format!("9: GET /ledger/entries without a token: {}", r.status));
    holes.check(
        !r.text.contains(BOB) && !r.text.contains("Patient/"),
        "9: GET /ledger/entries without a token names patients",
    );
    let r = w.get("/ledger/entries?_count=1000", &w.alice).await;
    holes.check(r.status == 403, format!("9: GET /ledger/entries with alice's patient token: {}", r.status));
    holes.check(
        !r.text.contains(BOB) && !r.text.contains("Patient/"),
        "9: GET /ledger/entries with alice's token names patients",
    );
    for leaf in [0, 5] {
        let r = send(w.http().get(w.url(&format!("/ledger/proof?leaf={leaf}")))).await;
        holes.check(r.status == 401, format!("9: GET /ledger/proof?leaf={leaf} without a token: {}", r.status));
    }
    let r = send(w.http().get(w.url("/ledger/head"))).await;
    assert_eq!(r.status, 200, "/ledger/head stays public: {}", r.text);
    holes.check(!r.text.contains("Patient") && !r.text.contains(BOB), "9: /ledger/head names a patient");
    let r = w.get("Observation/obs-bob-1/_history/1/$proof", &w.alice).await;
    holes.check(r.status == 404, format!("9: alice asks for the $proof of bob's Observation: {}", r.status));

    // 8. The disclosure log belongs to the server.
    for id in ["obs-alice-1", "obs-alice-2"] {
        assert_eq!(w.get(&format!("Observation/{id}"), &w.alice).await.status, 200);
    }
    let before = w.report(&w.alice, ALICE).await;
    let events = server_audit_events(&w, ALICE).await;
    let victim = events[0].clone();
    let vid = victim["id"].as_str().expect("an AuditEvent id").to_string();
    let vpath = format!("AuditEvent/{vid}");
    let stored = w.stored(&vpath).await;
    let forged = |who: &str| {
        let mut e = victim.clone();
        if let Some(o) = e.as_object_mut() {
            o.remove("id");
            o.remove("meta");
        }
        e["agent"] = json!([{ "who": reference("Practitioner", who), "requestor": true }]);
        e["outcome"] = json!("0");
        e["extension"] =
            json!([{ "url": "urn:fhir-ledger:StructureDefinition/disclosure-requests", "valueInteger": 1000 }]);
        e
    };
    let mut attempts = 0;
    let r = w.req(Method::POST, "AuditEvent", &w.prac, Some(&forged("forger-post"))).await;
    attempts += 1;
    holes.check(r.status == 403, format!("8: a practitioner POSTs an AuditEvent: {}", r.status));
    let mut changed = forged("forger-put");
    changed["id"] = json!(vid);
    let r = w.req(Method::PUT, &vpath, &w.prac, Some(&changed)).await;
    attempts += 1;
    holes.check(r.status == 403, format!("8: a practitioner PUTs a server-written AuditEvent: {}", r.status));
    holes.check(w.stored(&vpath).await == stored, "8: a practitioner changed a server-written AuditEvent");
    let r =
        w.bundle(&w.prac, &bundle("transaction", vec![entry("POST", "AuditEvent", Some(forged("forger-tx")))])).await;
    attempts += 1;
    holes.check(r.status == 403, format!("8: a practitioner's transaction POSTs an AuditEvent: {}", r.status));
    let n = w.count("AuditEvent?agent=Practitioner/forger-tx").await;
    holes.check(n == 0, format!("8: a practitioner's transaction wrote {n} AuditEvents"));
    let r = w.bundle(&w.prac, &bundle("transaction", vec![entry("DELETE", &vpath, None)])).await;
    attempts += 1;
    holes.check(r.status == 403, format!("8: a practitioner's transaction DELETEs an AuditEvent: {}", r.status));
    let r = w.req(Method::DELETE, &vpath, &w.prac, None).await;
    attempts += 1;
    holes.check(r.status == 403, format!("8: a practitioner DELETEs a server-written AuditEvent: {}", r.status));
    holes.check(w.stored(&vpath).await == stored, "8: a server-written AuditEvent was changed or deleted by a client");
    let after = w.report(&w.alice, ALICE).await;
    let forgers: Vec<&String> = after.accessors.keys().filter(|k| k.contains("forger")).collect();
    holes.check(forgers.is_empty(), format!("8: alice's access report counts forged AuditEvents of {forgers:?}"));
    holes.check(
        after.total >= before.total && after.total <= before.total + attempts,
        format!(
            "8: alice's access report total went {} -> {} over {attempts} refused attempts",
            before.total, after.total
        ),
    );
    for (who, (count, _)) in &before.accessors {
        holes.check(after.count(who) >= *count, format!("8: alice's access report lost disclosures by {who}"));
    }

    // 7. 500 unauthenticated requests with 15 KB paths grow the ledger by a handful of leaves.
    w.report(&w.alice, ALICE).await; // flushes the disclosure log's queue
    let leaves = settled_tree_size(node).await;
    let bytes = dir_bytes(node.dir.path());
    let pad = "a".repeat(15 * 1024);
    let flood: Vec<String> = (0..500).map(|i| w.url(&format!("Patient/x{i}-{}{pad}", smart::random_hex(4)))).collect();
    let mut sent = 0;
    for chunk in flood.chunks(25) {
        let answers = futures::future::join_all(chunk.iter().map(|u| w.http().get(u).send())).await;
        sent += answers.iter().filter(|a| a.is_ok()).count();
    }
    assert!(sent >= 450, "the flood reached the server: {sent} of 500 answered");
    w.report(&w.alice, ALICE).await;
    let grown = settled_tree_size(node).await - leaves;
    let grew = dir_bytes(node.dir.path()).saturating_sub(bytes);
    eprintln!("the flood of {sent} requests added {grown} leaves and {grew} bytes");
    holes.check(grown <= 5, format!("7: 500 unauthenticated requests with 15 KB paths appended {grown} leaves"));
    // Generous (sled grows its files by segments of up to 512 KiB); the code before issue 15
    // grew them by ~33 MB here.
    holes.check(
        grew <= 1024 * 1024,
        format!("7: 500 unauthenticated requests with 15 KB paths grew the data directory by {grew} bytes"),
    );
    holes.finish();
}

// ---------------------------------------------------------------------------------------------
// Versions, history and $erase (items 12 and 13)

/// The practitioner moves bob's Observation into alice's compartment; an Observation of bob's
/// is deleted and re-created by alice under the same id: alice sees none of bob's versions by
/// vread, instance, type or system history (with and without `_since`) or `$proof`. A
/// practitioner's `$erase` of bob is refused. Holes on the code before issue 15: items 12, 13.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_versions_and_erase() {
    let w = World::start(&[], false).await;
    let mut holes = Holes::new("versions_and_erase");
    let alice = w.alice.clone();

    // 12. A move into alice's compartment by someone who may write both.
    let moved = observation(Some("obs-bob-v"), ALICE, "moved to alice");
    let r = w.req(Method::PUT, "Observation/obs-bob-v", &w.prac, Some(&moved)).await;
    assert_eq!(r.status, 200, "the practitioner moves bob's Observation to alice: {}", r.text);
    assert_eq!(w.get("Observation/obs-bob-v", &alice).await.status, 200, "version 2 is alice's");
    let r = w.get("Observation/obs-bob-v/_history/1", &alice).await;
    holes.no_secret(&r, "12: alice's vread of version 1 (bob's) of a moved Observation");
    holes.check(r.status == 404, format!("12: alice's vread of bob's version 1 of a moved Observation: {}", r.status));
    let r = w.get("Observation/obs-bob-v/_history/1/$proof", &alice).await;
    holes.check(r.status == 404, format!("12: alice's $proof of bob's version 1: {}", r.status));
    let r = w.get("Observation/obs-bob-v/_history", &alice).await;
    holes.no_secret(&r, "12: alice's instance history of a moved Observation");
    let versions: Vec<String> = js(&r)["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["meta"]["versionId"].as_str().map(str::to_string))
        .collect();
    holes.check(
        !versions.contains(&"1".to_string()),
        format!("12: alice's instance history shows versions {versions:?}"),
    );
    for q in [
        "Observation/_history",
        "Observation/_history?_since=2000-01-01T00:00:00Z",
        "_history",
        "_history?_since=2000-01-01T00:00:00Z",
    ] {
        let r = w.get(q, &alice).await;
        holes.no_secret(&r, &format!("12: alice's GET {q}"));
        let page = js(&r);
        let subject = format!("Patient/{BOB}");
        let bobs = page["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["resource"]["subject"]["reference"] == subject.as_str())
            .count();
        holes.check(bobs == 0, format!("12: alice's GET {q} shows {bobs} versions of bob's"));
    }

    // 12. A re-create over bob's deleted id.
    let r = w.req(Method::DELETE, "Observation/obs-bob-r", &w.prac, None).await;
    assert!(r.status == 200 || r.status == 204, "the practitioner deletes bob's Observation: {}", r.text);
    let mine = observation(Some("obs-bob-r"), ALICE, "alice re-creates");
    let r = w.req(Method::PUT, "Observation/obs-bob-r", &alice, Some(&mine)).await;
    holes.no_secret(&r, "12: alice re-creates a deleted id of bob's");
    holes.check(
        r.status == 200 || r.status == 201,
        format!(
            "12: alice's PUT over a deleted id answers {} (expected allowed: version 3 in her compartment)",
            r.status
        ),
    );
    for v in [1, 2] {
        let r = w.get(&format!("Observation/obs-bob-r/_history/{v}"), &alice).await;
        holes.no_secret(&r, &format!("12: alice's vread of version {v} of a re-created id"));
        holes
            .check(r.status != 200, format!("12: alice's vread of bob's version {v} of a re-created id: {}", r.status));
    }
    let r = w.get("Observation/obs-bob-r/_history", &alice).await;
    holes.no_secret(&r, "12: alice's instance history of a re-created id");

    // 13. $erase is for the patient and administrators, not for user/*.cruds.
    let r = w.req(Method::POST, &format!("Patient/{BOB}/$erase"), &w.prac, None).await;
    holes.check(r.status == 403, format!("13: a practitioner with user/*.cruds erases bob: {}", r.status));
    let r = w.get("Observation/obs-bob-1", &w.prac).await;
    holes.check(
        r.status == 200 && r.text.contains(SECRET),
        format!("13: bob's data is gone after a practitioner's $erase: {}", r.status),
    );
    let r = w.get(&format!("Patient/{BOB}"), &w.prac).await;
    holes.check(
        r.status == 200 && r.text.contains(SECRET),
        format!("13: bob's Patient is gone after a practitioner's $erase: {}", r.status),
    );
    holes.finish();
}

// ---------------------------------------------------------------------------------------------
// The lesser holes (item 14)

/// Modes of the files and directories under `dir` that others than the owner may use.
fn open_modes(dir: &Path, out: &mut Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            out.push(format!("{} {mode:o}", e.path().display()));
        }
        if m.is_dir() {
            open_modes(&e.path(), out);
        }
    }
}

/// `Cache-Control: no-store` on PHI, CSRF token and Origin check on the consent page and the
/// portal's withdraw, `redirect_uri` required at the token endpoint, user ids that are not a
/// hash of the username, `Secure` cookies behind https, a client assertion's `jti` remembered
/// across a restart, a handshake timeout on the Raft listener, data files 0600 and directories
/// 0700, example configs with auth on, and login throttling. Holes on the code before issue
/// 15: item 14.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_lesser_holes() {
    let mut w = World::start(&[], true).await;
    let mut holes = Holes::new("lesser_holes");

    // Cache-Control: no-store on PHI.
    for q in [
        "Observation/obs-alice-1".to_string(),
        format!("Observation?subject=Patient/{ALICE}"),
        format!("Patient/{ALICE}"),
    ] {
        let r = w.get(&q, &w.alice).await;
        assert_eq!(r.status, 200, "{q}: {}", r.text);
        let cc = r.header("cache-control");
        holes.check(cc.contains("no-store"), format!("14: GET {q} answers Cache-Control {cc:?}"));
    }

    // CSRF: the consent form without its hidden fields (but `request`), and from a foreign
    // Origin with them. (The CSRF token's field name is the fix's; a browser page on another
    // site can read neither it nor the session.)
    let scopes = ["launch/patient", "patient/*.rs"];
    let page = open_consent(&w.node, &w.app, &scopes, "alice", Some(&w.alice_session)).await.expect("the consent page");
    let bare: Vec<(String, String)> = consent_form(&page.html, None)
        .into_iter()
        .filter(|(k, _)| k == "request" || k == "scope" || k == "decision")
        .collect();
    let r = post_consent(&w.node, &page.session, &bare, Some(&w.node.base)).await;
    holes.check(
        r.status == 403,
        format!("14: POST /auth/consent without the CSRF token answers {} {}", r.status, r.header("location")),
    );
    let page = open_consent(&w.node, &w.app, &scopes, "alice", Some(&w.alice_session)).await.expect("the consent page");
    let r = post_consent(&w.node, &page.session, &consent_form(&page.html, None), Some(EVIL)).await;
    holes.check(
        r.status == 403,
        format!("14: POST /auth/consent with Origin {EVIL} answers {} {}", r.status, r.header("location")),
    );
    // The portal's withdraw from a foreign Origin.
    let (t, _) = token(&w.node, &w.app, &scopes, "alice", Some(&w.alice_session), None).await;
    let t = t.expect("another token of alice's");
    let granted = access_token(&t);
    let consent = t["consent"].as_str().expect("a patient's grant Consent").trim_start_matches("Consent/").to_string();
    let r = send(
        w.http()
            .post(w.url(&format!("/portal/apps/{consent}/withdraw")))
            .header(COOKIE, &w.alice_session)
            .header("Origin", EVIL)
            .form(&[("x", "y")]),
    )
    .await;
    holes.check(r.status == 403, format!("14: the portal's withdraw from Origin {EVIL} answers {}", r.status));
    let still = w.get(&format!("Patient/{ALICE}"), &granted).await.status;
    holes.check(still == 200, format!("14: a withdraw from Origin {EVIL} revoked alice's grant ({still})"));

    // redirect_uri is required at the token endpoint when the authorize request had one.
    let page = open_consent(&w.node, &w.app, &scopes, "alice", Some(&w.alice_session)).await.expect("the consent page");
    let r = post_consent(&w.node, &page.session, &consent_form(&page.html, None), Some(&w.node.base)).await;
    let code = code_of(&r).expect("a code");
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("code_verifier", page.verifier.as_str()),
        ("client_id", w.app.as_str()),
    ];
    let r = send(w.http().post(w.url("/auth/token")).form(&form)).await;
    holes.check(
        r.status == 400 && js(&r)["error"] == "invalid_grant",
        format!("14: a code exchange without redirect_uri answers {} {}", r.status, clip(&r.text)),
    );

    // User ids are not a hash of the username.
    let sub = smart::parse_jwt(&w.alice).claims["sub"].as_str().unwrap_or_default().to_string();
    let hash = |s: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()));
    holes.check(
        !sub.is_empty() && !hash("fhir-ledger user alice").starts_with(&sub) && !hash("alice").starts_with(&sub),
        format!("14: alice's user id {sub} is a hash of her username"),
    );

    // Secure cookies behind an https public URL.
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let public = "https://fhir.example.test";
        let server =
            Server::launch_auth(dir.path(), &["--public-url", public], &[("FHIR_LEDGER_ADMIN_TOKEN", ADMIN_TOKEN)]);
        let http = smart::http_client();
        let admin = Admin::new(&http, &server.base, ADMIN_TOKEN);
        let client_id = admin.public_client("Https App", None).await;
        admin.user("carol", "Practitioner/prac-9").await;
        let (_, challenge) = smart::pkce();
        let query = [
            ("response_type", "code"),
            ("client_id", client_id.as_str()),
            ("redirect_uri", REDIRECT),
            ("scope", "user/*.rs"),
            ("state", "s"),
            ("aud", public),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        let url = reqwest::Url::parse_with_params(&format!("{}/auth/authorize", server.base), &query).expect("URL");
        let r = send(http.get(url)).await;
        assert_eq!(r.status, 200, "the login page behind https: {}", r.text);
        let mut form: Vec<(String, String)> = form_inputs(&r.text, "/auth/login")
            .into_iter()
            .filter(|(k, _, _)| k == "hidden")
            .map(|(_, n, v)| (n, v))
            .collect();
        form.push(("username".into(), "carol".into()));
        form.push(("password".into(), smart::PASSWORD.into()));
        let r = send(http.post(format!("{}/auth/login", server.base)).header("Origin", public).form(&form)).await;
        let set: Vec<String> = r
            .headers
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter(|c| c.starts_with("fl_session="))
            .map(str::to_string)
            .collect();
        assert!(!set.is_empty(), "a login behind https sets the session cookie: {} {}", r.status, clip(&r.text));
        holes.check(
            set.iter().all(|c| c.split(';').any(|a| a.trim().eq_ignore_ascii_case("secure"))),
            format!("14: the session cookie behind an https public URL is not Secure: {set:?}"),
        );
        drop(server);
    }

    // A client assertion's jti is remembered across a restart.
    let backend = Backend::register(&w.node.admin, ClientKey::ed25519(), "system/Patient.rs").await;
    let assertion = backend.assertion();
    let r = backend.request(w.http(), "system/Patient.rs", &assertion).await;
    assert_eq!(r.status, 200, "the assertion's first use: {}", r.text);
    w.node.restart();
    let r = backend.request(w.http(), "system/Patient.rs", &assertion).await;
    holes.check(
        r.status == 401 && js(&r)["error"] == "invalid_client",
        format!("14: a client assertion replayed after a restart answers {} {}", r.status, clip(&r.text)),
    );

    // The Raft listener drops a connection that never completes its handshake (one that
    // stays silent here), rather than holding it open for ever.
    let raft_dir = tempfile::tempdir().expect("temp dir");
    let raft_node = Server::launch_auth(raft_dir.path(), &["--raft-listen", "127.0.0.1:0"], &[]);
    let raft = raft_node.raft.clone().expect("the Raft listener's address");
    let mut idle = tokio::net::TcpStream::connect(&raft).await.expect("connect to the Raft listener");
    let deadline = Instant::now() + Duration::from_secs(12);
    let dropped = loop {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout_at(deadline.into(), idle.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break true,
            Ok(Ok(_)) => {}
            Err(_) => break false,
        }
    };
    holes.check(dropped, "14: the Raft listener holds a connection without a handshake open for 12 s");
    drop(raft_node);

    // Data files 0600, directories 0700.
    let mut open = Vec::new();
    open_modes(w.node.dir.path(), &mut open);
    holes.check(
        open.is_empty(),
        format!("14: {} data files or directories others may read: {:?}", open.len(), &open[..open.len().min(8)]),
    );

    // The example cluster configs keep auth on.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for e in std::fs::read_dir(&config).expect("config/").flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !(name.starts_with("cluster-node") && Path::new(&name).extension().is_some_and(|x| x == "toml")) {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).expect("read a config");
        let v: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let auth = v.get("auth").and_then(|a| a.as_str()).unwrap_or("smart");
        holes.check(auth != "off", format!("14: config/{name} sets auth = \"off\""));
    }

    // Login throttling (last: it may throttle this source too). After 10 wrong passwords for
    // one account, even the right one is refused with 429 for a while.
    w.node.admin.user("victim", "Practitioner/prac-1").await;
    let (_, challenge) = smart::pkce();
    let url = smart::authorize_url(&w.node.base, &w.app, &["user/*.rs"], &challenge, "s", None);
    let r = send(w.http().get(url)).await;
    assert_eq!(r.status, 200, "the login page: {}", r.text);
    let hidden: Vec<(String, String)> = form_inputs(&r.text, "/auth/login")
        .into_iter()
        .filter(|(k, _, _)| k == "hidden")
        .map(|(_, n, v)| (n, v))
        .collect();
    let login = |password: &str| {
        let mut form = hidden.clone();
        form.push(("username".into(), "victim".into()));
        form.push(("password".into(), password.into()));
        send(w.http().post(w.url("/auth/login")).header("Origin", &w.node.base).form(&form))
    };
    for i in 0..10 {
        let r = login(&format!("wrong {i}")).await;
        assert!(r.status != 200 || !r.text.contains(r#"id="consent""#), "a wrong password signs in");
    }
    let r = login(smart::PASSWORD).await;
    holes.check(r.status == 429, format!("14: after 10 wrong passwords the right one answers {}", r.status));
    holes.finish();
}
