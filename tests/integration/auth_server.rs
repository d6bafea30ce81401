//! The authorization server played by an attacker (issue 15), against real
//! `fhir-ledger serve --auth smart` processes: who may hold which scopes, which patient a
//! related person may act for, a patient's approval that must not extend to other users of
//! the app (opt-in), revocation and introspection without credentials, CSRF and Origin on the
//! consent and portal forms, login throttling, a client assertion replayed after a restart, and
//! a code exchanged without its `redirect_uri`. Each test failed on the code before the fix.

use reqwest::header::COOKIE;
use reqwest::Method;
use serde_json::{json, Value};

use crate::smart::{
    self, attr, cookie, exchange, fhir, get, input_value, put_resource, send, tags, user_token, Login, Resp,
    SmartServer, PASSWORD,
};

fn observation(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Observation", "id": id, "status": "final",
        "code": { "coding": [{ "system": "http://loinc.org", "code": "8867-4" }] },
        "subject": { "reference": format!("Patient/{patient}") },
    })
}

fn practitioner(id: &str) -> Value {
    json!({ "resourceType": "Practitioner", "id": id, "name": [{ "family": format!("Doctor-{id}") }] })
}

fn related_person(id: &str, patient: &str) -> Value {
    json!({ "resourceType": "RelatedPerson", "id": id, "patient": { "reference": format!("Patient/{patient}") } })
}

/// A consent page reached by signing in (or with `session`): the page, the session cookie
/// and the PKCE verifier of its authorize request.
struct ConsentPage {
    text: String,
    session: String,
    verifier: String,
}

impl ConsentPage {
    async fn open(s: &SmartServer, client_id: &str, scopes: &[&str], user: &str, launch: Option<&str>) -> ConsentPage {
        let (verifier, challenge) = smart::pkce();
        let url = smart::authorize_url(&s.base, client_id, scopes, &challenge, "st", launch);
        let r = send(s.http.get(&url)).await;
        assert_eq!(r.status, 200, "authorize: {}", r.text);
        let request = input_value(&r.text, "request").expect("the login form's request");
        let form = [("username", user), ("password", PASSWORD), ("request", request.as_str())];
        let r = send(s.http.post(s.url("/auth/login")).form(&form)).await;
        assert_eq!(r.status, 200, "login as {user}: {}", r.text);
        let session = cookie(&r.headers, "fl_session").expect("fl_session");
        assert!(r.text.contains(r#"id="consent""#), "the consent page: {}", r.text);
        ConsentPage { text: r.text, session, verifier }
    }

    /// The scopes the page offers (its checkboxes), in order.
    fn offered(&self) -> Vec<String> {
        tags(&self.text, "input")
            .iter()
            .filter(|t| attr(t, "type") == Some("checkbox") && attr(t, "name") == Some("scope"))
            .map(|t| attr(t, "value").unwrap_or_default().to_string())
            .collect()
    }

    /// The hidden fields of the consent form (`request`, and the CSRF token where there is one).
    fn hidden(&self) -> Vec<(String, String)> {
        tags(&self.text, "input")
            .iter()
            .filter(|t| attr(t, "type") == Some("hidden"))
            .filter_map(|t| Some((attr(t, "name")?.to_string(), attr(t, "value").unwrap_or_default().to_string())))
            .collect()
    }

    /// POSTs the consent form: its hidden fields, `scopes` ticked, `extra` fields, approve.
    async fn approve(&self, s: &SmartServer, scopes: &[&str], extra: &[(&str, &str)]) -> Resp {
        let mut form: Vec<(String, String)> = self.hidden();
        form.extend(scopes.iter().map(|sc| ("scope".to_string(), sc.to_string())));
        form.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        form.push(("decision".into(), "approve".into()));
        send(s.http.post(s.url("/auth/consent")).header(COOKIE, &self.session).form(&form)).await
    }
}

/// The query parameters of a 302's Location.
fn redirect_params(r: &Resp) -> Vec<(String, String)> {
    assert_eq!(r.status, 302, "{}", r.text);
    let to = reqwest::Url::parse(&r.header("location")).expect("Location");
    to.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The code of an approval's redirect, exchanged for a token response (asserted 200).
async fn redeem(s: &SmartServer, client_id: &str, page: &ConsentPage, r: &Resp) -> Value {
    let q = redirect_params(r);
    let code = param(&q, "code").unwrap_or_else(|| panic!("no code: {q:?}"));
    let t = exchange(&s.http, &s.base, client_id, code, &page.verifier).await;
    assert_eq!(t.status, 200, "{}", t.text);
    t.json()
}

/// Item 4: a Patient user authorizing an app registered without a scope ceiling is offered
/// and granted only `patient/` scopes for themself (plus identity and launch scopes), never
/// `user/` or `system/`, even when the form ticks them; a practitioner gets `user/` but never
/// `system/`. Before the fix alice got `system/*.cruds` and read and deleted bob's Patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_user_gets_no_user_or_system_scopes() {
    let s = SmartServer::start(&[]);
    let http = &s.http;
    let sys = s.system_token("system/*.cruds").await;
    for r in [smart::patient("pat-a"), smart::patient("pat-b"), practitioner("prac-1")] {
        put_resource(http, &s.base, &sys, &r).await;
    }
    let client_id = s.admin.public_client("No Ceiling App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    s.admin.user("drsmith", "Practitioner/prac-1").await;

    let asked = ["launch/patient", "openid", "fhirUser", "patient/*.rs", "user/*.cruds", "system/*.cruds"];
    let page = ConsentPage::open(&s, &client_id, &asked, "alice", None).await;
    assert_eq!(page.offered(), ["launch/patient", "openid", "fhirUser", "patient/*.rs"], "what alice is offered");
    // The attacker ticks what the page did not offer, and names another patient.
    let r = page.approve(&s, &asked, &[]).await;
    let t = redeem(&s, &client_id, &page, &r).await;
    let granted: Vec<&str> = t["scope"].as_str().unwrap_or_default().split(' ').collect();
    assert_eq!(granted, ["launch/patient", "openid", "fhirUser", "patient/*.rs"], "{t}");
    assert_eq!(t["patient"], "pat-a", "{t}");
    let at = t["access_token"].as_str().expect("access_token");
    assert_eq!(get(http, &s.url("Patient/pat-b"), at).await.status, 404, "bob is hidden");
    let r = fhir(http, Method::DELETE, &s.url("Patient/pat-b"), Some(at), None).await;
    assert!(r.status == 403 || r.status == 404, "alice deletes bob: {} {}", r.status, r.text);
    assert_eq!(get(http, &s.url("Patient/pat-b"), &sys).await.status, 200, "bob is still there");
    let page = ConsentPage::open(&s, &client_id, &["launch/patient", "patient/*.rs"], "alice", None).await;
    let r = page.approve(&s, &["launch/patient", "patient/*.rs"], &[("patient", "pat-b")]).await;
    assert_eq!(param(&redirect_params(&r), "error"), Some("access_denied"), "alice picks bob");

    // A clinician: user/ scopes, never system/.
    let page = ConsentPage::open(&s, &client_id, &["user/*.rs", "system/*.cruds"], "drsmith", None).await;
    assert_eq!(page.offered(), ["user/*.rs"]);
    let r = page.approve(&s, &["user/*.rs", "system/*.cruds"], &[]).await;
    let t = redeem(&s, &client_id, &page, &r).await;
    assert_eq!(t["scope"], "user/*.rs", "{t}");
    let at = t["access_token"].as_str().expect("access_token");
    let r = fhir(http, Method::DELETE, &s.url("Patient/pat-b"), Some(at), None).await;
    assert_eq!(r.status, 403, "user/*.rs deletes nothing: {}", r.text);
}

/// Item 10 and item 4: a RelatedPerson user acts only for the patient their RelatedPerson
/// links to: the patient context defaults to that patient, picking another one (in the form
/// or through an EHR launch) is refused, and so is the linked patient once their Consent
/// denies the related person. Before the fix any patient id typed in the form was granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_related_person_acts_only_for_a_linked_patient() {
    let s = SmartServer::start(&[]);
    let http = &s.http;
    let sys = s.system_token("system/*.cruds").await;
    for r in [
        smart::patient("pat-a"),
        smart::patient("pat-b"),
        related_person("rp-1", "pat-a"),
        observation("obs-a", "pat-a"),
        observation("obs-b", "pat-b"),
    ] {
        put_resource(http, &s.base, &sys, &r).await;
    }
    let client_id = s.admin.public_client("Family App", None).await;
    s.admin.user("rita", "RelatedPerson/rp-1").await;
    s.admin.user("alice", "Patient/pat-a").await;
    let scopes = ["launch/patient", "patient/Observation.rs", "user/*.rs"];

    let page = ConsentPage::open(&s, &client_id, &scopes, "rita", None).await;
    let r = page.approve(&s, &scopes, &[("patient", "pat-b")]).await;
    let q = redirect_params(&r);
    assert_eq!(param(&q, "error"), Some("access_denied"), "rita picks bob: {q:?}");
    assert!(param(&q, "code").is_none(), "{q:?}");
    assert_eq!(page.offered(), ["launch/patient", "patient/Observation.rs"], "no user/ scope for a related person");
    let launch_b = s.admin.launch("pat-b", None).await;
    let page = ConsentPage::open(&s, &client_id, &["launch", "patient/Observation.rs"], "rita", Some(&launch_b)).await;
    let r = page.approve(&s, &["launch", "patient/Observation.rs"], &[]).await;
    assert_eq!(param(&redirect_params(&r), "error"), Some("access_denied"), "an EHR launch for bob");

    // The linked patient: granted, and confined to alice.
    let page = ConsentPage::open(&s, &client_id, &scopes, "rita", None).await;
    let r = page.approve(&s, &scopes, &[]).await;
    let t = redeem(&s, &client_id, &page, &r).await;
    assert_eq!(t["patient"], "pat-a", "{t}");
    assert_eq!(t["scope"], "launch/patient patient/Observation.rs", "{t}");
    let at = t["access_token"].as_str().expect("access_token");
    assert_eq!(get(http, &s.url("Observation/obs-a"), at).await.status, 200);
    assert_eq!(get(http, &s.url("Observation/obs-b"), at).await.status, 404);

    // Alice's Consent denies rita: no new authorization for alice's record.
    let alice =
        user_token(http, &s.base, &client_id, &["launch/patient", "patient/Consent.cruds"], &Login::new("alice")).await;
    let deny = json!({
        "resourceType": "Consent", "status": "active",
        "scope": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy" }] },
        "category": [{ "coding": [{ "system": "http://loinc.org", "code": "59284-0" }] }],
        "patient": { "reference": "Patient/pat-a" },
        "policyRule": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN" }] },
        "provision": { "type": "deny", "actor": [{
            "role": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP" }] },
            "reference": { "reference": "RelatedPerson/rp-1" } }] },
    });
    let at_alice = alice["access_token"].as_str().expect("access_token");
    let r = fhir(http, Method::POST, &s.url("Consent"), Some(at_alice), Some(&deny)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let page = ConsentPage::open(&s, &client_id, &scopes, "rita", None).await;
    let r = page.approve(&s, &scopes, &[]).await;
    assert_eq!(param(&redirect_params(&r), "error"), Some("access_denied"), "after alice's denial");
}

/// Item 11: under `opt-in`, alice's approval of an app is a grant Consent naming the app and
/// alice; it does not permit a practitioner using the same app to see alice's data (before
/// the fix it did: the Consent's only actor was the client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opt_in_approval_is_for_the_approving_user_only() {
    let s = SmartServer::start(&["--consent-default", "opt-in"]);
    let http = &s.http;
    let sys = s.system_token("system/*.cruds").await;
    for r in [smart::patient("pat-a"), practitioner("prac-1"), observation("obs-a", "pat-a")] {
        put_resource(http, &s.base, &sys, &r).await;
    }
    let client_id = s.admin.public_client("Shared App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    s.admin.user("drsmith", "Practitioner/prac-1").await;

    let t = user_token(http, &s.base, &client_id, &["launch/patient", "patient/*.rs"], &Login::new("alice")).await;
    let consent = t["consent"].as_str().expect("a grant Consent").to_string();
    let alice = t["access_token"].as_str().expect("access_token").to_string();
    assert_eq!(get(http, &s.url("Observation/obs-a"), &alice).await.status, 200, "alice through the app");
    let doc = user_token(http, &s.base, &client_id, &["user/*.rs"], &Login::new("drsmith")).await;
    let doc = doc["access_token"].as_str().expect("access_token");
    assert_eq!(get(http, &s.url("Observation/obs-a"), doc).await.status, 404, "another user of the same app");
    let r = get(http, &s.url("Observation?subject=Patient/pat-a&_total=accurate"), doc).await;
    assert_eq!(r.json()["total"], 0, "{}", r.text);

    let c = get(http, &s.url(&consent), &alice).await.json();
    let actors = c["provision"]["actor"].to_string();
    assert!(actors.contains("Patient/pat-a") && actors.contains(&client_id), "the app and alice: {c}");
}

/// Item 6: `POST /auth/revoke` revokes only a token that verifies: `<grant id>.anything` and an
/// access token signed by a stranger (both naming alice's grant, with her app's public
/// client_id) change nothing (before the fix the first revoked her grant), another app cannot
/// revoke her token, and her own app revoking her refresh token does. Introspection refuses a
/// bare public client_id (401 `invalid_client`) and answers a confidential client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_introspection_need_real_credentials() {
    let s = SmartServer::start(&[]);
    let http = &s.http;
    let sys = s.system_token("system/*.cruds").await;
    put_resource(http, &s.base, &sys, &smart::patient("pat-a")).await;
    let client_id = s.admin.public_client("Alice's App", None).await;
    let other_app = s.admin.public_client("Other App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    let scopes = ["launch/patient", "offline_access", "patient/*.rs"];
    let t = user_token(http, &s.base, &client_id, &scopes, &Login::new("alice")).await;
    let at = t["access_token"].as_str().expect("access_token").to_string();
    let rt = t["refresh_token"].as_str().expect("refresh_token").to_string();
    let jwt = smart::parse_jwt(&at);
    let grant = jwt.claims["grant"].as_str().expect("a grant claim").to_string();
    let url = s.url("Patient/pat-a");

    let stranger = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let forged = smart::jws(&jwt.header, &jwt.claims, |m| {
        use ed25519_dalek::Signer;
        let signature: ed25519_dalek::Signature = stranger.sign(m);
        signature.to_bytes().to_vec()
    });
    let attempts = [
        ("the grant id and anything", format!("{grant}.anything"), client_id.as_str()),
        ("the grant id and two dots", format!("{grant}.x.y"), client_id.as_str()),
        ("an access token signed by a stranger", forged, client_id.as_str()),
        ("alice's real access token, by another app", at.clone(), other_app.as_str()),
        ("alice's real refresh token, by another app", rt.clone(), other_app.as_str()),
    ];
    for (what, token, cid) in &attempts {
        let r = send(http.post(s.url("/auth/revoke")).form(&[("token", token.as_str()), ("client_id", cid)])).await;
        assert_eq!(r.status, 200, "{what}: RFC 7009 answers 200: {}", r.text);
        assert_eq!(get(http, &url, &at).await.status, 200, "{what} revoked nothing");
    }

    // Introspection: a bare public client_id is no client authentication.
    let r = send(http.post(s.url("/auth/introspect")).form(&[("token", at.as_str()), ("client_id", &client_id)])).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.json()["error"], "invalid_client", "{}", r.text);
    let r = send(http.post(s.url("/auth/introspect")).form(&[("token", at.as_str())])).await;
    assert_eq!(r.status, 401, "no credentials at all: {}", r.text);
    let conf = s
        .admin
        .register_client(json!({ "client_name": "Resource Server", "redirect_uris": [smart::REDIRECT],
                                 "token_endpoint_auth_method": "client_secret_basic" }))
        .await;
    let (cid, secret) = (conf["client_id"].as_str().expect("id"), conf["client_secret"].as_str().expect("secret"));
    let r =
        send(http.post(s.url("/auth/introspect")).basic_auth(cid, Some(secret)).form(&[("token", at.as_str())])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["active"], true, "{}", r.text);
    let r =
        send(http.post(s.url("/auth/introspect")).basic_auth(cid, Some("wrong")).form(&[("token", at.as_str())])).await;
    assert_eq!(r.status, 401, "a wrong secret: {}", r.text);

    // Alice's app revokes with her refresh token: the grant is gone.
    let r = send(http.post(s.url("/auth/revoke")).form(&[("token", rt.as_str()), ("client_id", &client_id)])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    smart::assert_invalid_token(&get(http, &url, &at).await, "after the app revoked its refresh token");
}

/// Item 14: the authorize request named its redirect_uri, so a code exchange without one is
/// 400 `invalid_grant` (before the fix it was accepted); the same code with it then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_exchange_without_redirect_uri_is_refused() {
    let s = SmartServer::start(&[]);
    let http = &s.http;
    let sys = s.system_token("system/*.cruds").await;
    put_resource(http, &s.base, &sys, &smart::patient("pat-a")).await;
    let client_id = s.admin.public_client("App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    let flow =
        smart::browser_flow(http, &s.base, &client_id, &["launch/patient", "patient/*.rs"], &Login::new("alice")).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", flow.code.as_str()),
        ("code_verifier", flow.verifier.as_str()),
        ("client_id", client_id.as_str()),
    ];
    let r = send(http.post(s.url("/auth/token")).form(&form)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.json()["error"], "invalid_grant", "{}", r.text);
    let r = exchange(http, &s.base, &client_id, &flow.code, &flow.verifier).await;
    assert_eq!(r.status, 200, "with redirect_uri: {}", r.text);
}

/// Item 14: the consent form and the portal's withdraw form carry a CSRF token bound to the
/// sign-in session; a post without it, with a wrong one, with another session's, or from
/// another `Origin` is a 403 and changes nothing (before the fix each was accepted). The
/// session cookie is `Secure` when the public URL is https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_need_their_sessions_csrf_token_and_origin() {
    let s = SmartServer::start(&[]);
    let http = &s.http;
    let sys = s.system_token("system/*.cruds").await;
    for id in ["pat-a", "pat-b"] {
        put_resource(http, &s.base, &sys, &smart::patient(id)).await;
    }
    let client_id = s.admin.public_client("App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    s.admin.user("bob", "Patient/pat-b").await;
    let scopes = ["launch/patient", "patient/*.rs"];
    let page = ConsentPage::open(&s, &client_id, &scopes, "alice", None).await;
    let bobs = ConsentPage::open(&s, &client_id, &scopes, "bob", None).await;
    let csrf = page.hidden().into_iter().find(|(k, _)| k == "csrf").expect("a CSRF token").1;
    let bobs_csrf = bobs.hidden().into_iter().find(|(k, _)| k == "csrf").expect("a CSRF token").1;
    assert_ne!(csrf, bobs_csrf);
    let request = input_value(&page.text, "request").expect("request");
    let post = |fields: Vec<(&'static str, String)>, origin: Option<&'static str>| {
        let mut form = vec![("request", request.clone()), ("decision", "approve".to_string())];
        form.extend(scopes.iter().map(|sc| ("scope", sc.to_string())));
        form.extend(fields);
        let mut r = http.post(s.url("/auth/consent")).header(COOKIE, &page.session).form(&form);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        send(r)
    };
    for (what, fields, origin) in [
        ("no CSRF token", vec![], None),
        ("a wrong CSRF token", vec![("csrf", "0".repeat(64))], None),
        ("another session's CSRF token", vec![("csrf", bobs_csrf.clone())], None),
        ("another origin", vec![("csrf", csrf.clone())], Some("http://evil.example")),
        ("an opaque origin", vec![("csrf", csrf.clone())], Some("null")),
    ] {
        let r = post(fields, origin).await;
        assert_eq!(r.status, 403, "{what}: {}", r.text);
        assert!(r.header("location").is_empty(), "{what}: no redirect with a code");
    }
    let same_origin: &'static str = Box::leak(s.base.clone().into_boxed_str());
    let r = post(vec![("csrf", csrf.clone())], Some(same_origin)).await;
    let t = redeem(&s, &client_id, &page, &r).await;
    let consent = t["consent"].as_str().expect("a grant Consent").trim_start_matches("Consent/").to_string();
    let at = t["access_token"].as_str().expect("access_token").to_string();

    // The portal's withdraw form.
    let portal = send(http.get(s.url("/portal")).header(COOKIE, &page.session)).await;
    assert_eq!(portal.status, 200, "{}", portal.text);
    let action = format!("/portal/apps/{consent}/withdraw");
    let fields = smart::form_fields(&portal.text, &action).unwrap_or_else(|| panic!("no form {action}"));
    assert!(fields.iter().any(|(k, v)| k == "csrf" && !v.is_empty()), "the withdraw form's CSRF token: {fields:?}");
    let withdraw = |form: Vec<(String, String)>, origin: Option<&'static str>| {
        let mut r = http.post(s.url(&action)).header(COOKIE, &page.session).form(&form);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        send(r)
    };
    let r = withdraw(vec![], None).await;
    assert_eq!(r.status, 403, "withdraw without the CSRF token: {}", r.text);
    let r = withdraw(fields.clone(), Some("http://evil.example")).await;
    assert_eq!(r.status, 403, "withdraw from another origin: {}", r.text);
    assert_eq!(get(http, &s.url("Patient/pat-a"), &at).await.status, 200, "the app still has access");
    let r = withdraw(fields, Some(same_origin)).await;
    assert!((200..400).contains(&r.status), "withdraw: {} {}", r.status, r.text);
    smart::assert_invalid_token(&get(http, &s.url("Patient/pat-a"), &at).await, "after the withdrawal");

    // Sign-in from another origin is refused too; the cookie has no Secure flag over http.
    let form = [("username", "alice"), ("password", PASSWORD)];
    let r = send(http.post(s.url("/portal/login")).header("origin", "http://evil.example").form(&form)).await;
    assert_eq!(r.status, 403, "{}", r.text);
    let r = send(http.post(s.url("/portal/login")).form(&form)).await;
    let set = r.header("set-cookie");
    assert!(set.starts_with("fl_session=") && !set.to_ascii_lowercase().contains("secure"), "{set}");

    // Behind an https public URL the session cookie is Secure.
    let tls = SmartServer::start(&["--public-url", "https://fhir.example"]);
    tls.admin.user("carol", "Practitioner/prac-1").await;
    let r = send(tls.http.post(tls.url("/portal/login")).form(&[("username", "carol"), ("password", PASSWORD)])).await;
    let set = r.header("set-cookie");
    assert!(set.starts_with("fl_session=") && set.to_ascii_lowercase().contains("; secure"), "{set}");
}

/// Item 14: ten failed sign-ins for an account lock that account from every source, and ten
/// from one source lock that source for every account: 429 with `Retry-After`, before any
/// password is checked (the right password too), on the portal's and the authorize flow's
/// sign-in alike; other accounts and sources are unaffected. (Sources are distinct loopback
/// addresses.) Before the fix nothing was throttled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_is_throttled_per_account_and_per_source() {
    let s = SmartServer::start(&[]);
    s.admin.user("alice", "Patient/pat-a").await;
    s.admin.user("bob", "Patient/pat-b").await;
    let from = |last: u8| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, last]))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_mins(2))
            .build()
            .expect("http client")
    };
    let login = |http: reqwest::Client, user: String, password: &'static str| {
        let url = s.url("/portal/login");
        async move { send(http.post(url).form(&[("username", user.as_str()), ("password", password)])).await }
    };
    let assert_throttled = |r: &Resp, what: &str| {
        assert_eq!(r.status, 429, "{what}: {}", r.text);
        let wait: i64 = r.header("retry-after").parse().unwrap_or_else(|_| panic!("{what}: Retry-After"));
        assert!((1..=900).contains(&wait), "{what}: Retry-After {wait}");
    };
    let limit = 10;

    let a = from(2);
    for i in 0..limit {
        let r = login(a.clone(), "alice".into(), "wrong").await;
        assert_eq!(r.status, 401, "failure {i}: {}", r.text);
    }
    assert_throttled(&login(a.clone(), "alice".into(), PASSWORD).await, "alice, the right password, same source");
    assert_throttled(&login(from(3), "alice".into(), PASSWORD).await, "alice from another source");
    assert_eq!(login(from(3), "bob".into(), PASSWORD).await.status, 303, "bob from another source");

    let c = from(4);
    for i in 0..limit {
        let r = login(c.clone(), format!("nobody-{i}"), "x").await;
        assert_eq!(r.status, 401, "unknown user {i}: {}", r.text);
    }
    assert_throttled(&login(c.clone(), "bob".into(), PASSWORD).await, "bob from a throttled source");
    let form = [("username", "bob"), ("password", PASSWORD), ("request", "")];
    assert_throttled(&send(c.post(s.url("/auth/login")).form(&form)).await, "the authorize flow's sign-in");
    assert_eq!(login(from(5), "bob".into(), PASSWORD).await.status, 303, "bob from a fresh source");
}

/// Item 14: a client assertion's `jti` is remembered on the ledger, not in one process's
/// memory: replayed after the server restarts (same data, same public URL), it is still 401
/// `invalid_client` (before the fix the restarted server accepted it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_assertion_replayed_after_a_restart_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let public = "http://fhir-ledger.test";
    let start = || {
        crate::support::Server::launch_auth(
            dir.path(),
            &["--public-url", public],
            &[("FHIR_LEDGER_ADMIN_TOKEN", smart::ADMIN_TOKEN)],
        )
    };
    let http = smart::http_client();
    let request = |base: String, assertion: String| {
        let http = http.clone();
        async move {
            let form = [
                ("grant_type", "client_credentials"),
                ("scope", "system/Patient.rs"),
                ("client_assertion_type", smart::JWT_BEARER),
                ("client_assertion", assertion.as_str()),
            ];
            send(http.post(format!("{base}/auth/token")).form(&form)).await
        }
    };
    let aud = format!("{public}/auth/token");
    let server = start();
    let admin = smart::Admin::new(&http, &server.base, smart::ADMIN_TOKEN);
    let b = smart::Backend::register(&admin, smart::ClientKey::ed25519(), "system/Patient.rs").await;
    let assertion = b.assertion_with(&b.kid, &aud, &smart::random_hex(16), 240);
    let r = request(server.base.clone(), assertion.clone()).await;
    assert_eq!(r.status, 200, "first use: {}", r.text);
    let r = request(server.base.clone(), assertion.clone()).await;
    assert_eq!(r.status, 401, "a replay: {}", r.text);
    drop(server);

    let server = start();
    let r = request(server.base.clone(), assertion).await;
    assert_eq!(r.status, 401, "a replay after the restart: {}", r.text);
    assert_eq!(r.json()["error"], "invalid_client", "{}", r.text);
    let fresh = b.assertion_with(&b.kid, &aud, &smart::random_hex(16), 240);
    let r = request(server.base.clone(), fresh).await;
    assert_eq!(r.status, 200, "a fresh assertion after the restart: {}", r.text);
}

/// Item 14: a user's id (the token's `sub`, the id of the user record the ledger's public
/// headers carry) is an HMAC of the user name under a key derived from the KEK, not the
/// unsalted hash anyone could compute from a guessed name (as before the fix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_ids_do_not_reveal_user_names() {
    use sha2::{Digest, Sha256};
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    put_resource(&s.http, &s.base, &sys, &smart::patient("pat-a")).await;
    let client_id = s.admin.public_client("App", None).await;
    s.admin.user("alice", "Patient/pat-a").await;
    let t = user_token(&s.http, &s.base, &client_id, &["launch/patient", "patient/*.rs"], &Login::new("alice")).await;
    let sub = smart::parse_jwt(t["access_token"].as_str().expect("access_token")).claims["sub"].clone();
    let sub = sub.as_str().expect("sub").to_string();
    let unsalted = hex::encode(Sha256::digest(b"fhir-ledger user alice"))[..40].to_string();
    assert_ne!(sub, unsalted, "the old, guessable id");
    let kek = hex::decode(std::fs::read_to_string(s.dir.path().join("kek.key")).expect("kek").trim()).expect("hex");
    let key = smart::hmac_sha256(&kek, b"fhir-ledger auth user id v1");
    assert_eq!(sub, hex::encode(smart::hmac_sha256(&key, b"alice"))[..40], "HMAC under the KEK-derived key");
    // Where the ledger's headers are readable, the user record is there under that id only.
    let r = send(s.http.get(s.url("/ledger/entries?_count=1000")).bearer_auth(&sys)).await;
    if r.status == 200 {
        let users: Vec<String> = r.json()["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["resource"].as_str().filter(|x| x.starts_with("_auth.User/")).map(str::to_string))
            .collect();
        assert_eq!(users, [format!("_auth.User/{sub}/_history/1")], "{}", r.text);
        assert!(!r.text.contains("alice") && !r.text.contains(&unsalted), "{}", r.text);
    }
}
