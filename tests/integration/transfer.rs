//! Payer-to-payer with two real servers: the old payer holds a Synthea member (Claims,
//! ExplanationOfBenefits, Coverage, clinical data); the new payer runs `fhir-ledger transfer
//! pull`: `$member-match` with the member's HRex Consent, a Bulk export pinned to a signed
//! head, offline verification, one atomic import with a Provenance that verifies against the
//! old payer's head. Then what must be refused: no consent, a withdrawn consent, an untrusted
//! key, a head that does not extend one seen before, and a peer reading a member it never
//! matched.

use std::path::Path;

use reqwest::Method;
use serde_json::{json, Value};

use crate::bulk::{finish, kickoff, ledger_cli};
use crate::smart::{self, fhir, get, put_resource, SmartServer};

fn synthea(n: u32) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../shared/data/synthea/patient-{n:02}.json"));
    serde_json::from_slice(&std::fs::read(&path).expect("Synthea bundle")).expect("JSON")
}

/// Everything of `Patient/{id}`'s compartment on a server (plus the Patient), by `Type/id`.
async fn compartment(s: &SmartServer, token: &str, id: &str) -> Vec<Value> {
    let mut all = smart::search_all(&s.http, &s.base, token, &format!("Patient/{id}/*?_count=500")).await;
    all.push(get(&s.http, &s.url(&format!("/Patient/{id}")), token).await.json());
    all
}

/// Removes every `reference` in `v`.
fn strip(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("reference");
            for x in m.values_mut() {
                strip(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

/// A resource without what a transfer may change: ids, meta, and every reference.
fn normalized(r: &Value) -> Value {
    let mut r = r.clone();
    if let Some(o) = r.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    strip(&mut r);
    r
}

fn hrex_consent(recipient: &str, policy: &str) -> Value {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    let year = 1970 + now / 31_557_600;
    json!({
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "64292-6"}]}],
        "policy": [{"uri": format!("http://hl7.org/fhir/us/davinci-hrex/StructureDefinition-hrex-consent.html#{policy}")}],
        "provision": {"type": "permit",
            "period": {"start": format!("{}-01-01", year - 1), "end": format!("{}-12-31", year + 1)},
            "actor": [
                {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP"}]},
                 "reference": {"reference": recipient}},
                {"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "performer"}]},
                 "reference": {"reference": "Organization/old-payer"}}]}
    })
}

struct Peer {
    client_id: String,
    key: ed25519_dalek::SigningKey,
}

impl Peer {
    /// Registers the new payer at the old one: private_key_jwt, acting for
    /// Organization/new-payer, confined to the members whose Consent names it.
    async fn register(old: &SmartServer) -> Peer {
        Self::register_as(old, "Organization/new-payer").await
    }

    async fn register_as(old: &SmartServer, actor: &str) -> Peer {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand_seed());
        let kid = fhir_ledger::bulk::label::thumbprint(&key.verifying_key());
        let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64(key.verifying_key().as_bytes()), "kid": kid, "alg": "EdDSA"});
        let v = old
            .admin
            .register_client(json!({
                "client_name": "New Payer", "token_endpoint_auth_method": "private_key_jwt",
                "scope": "system/*.rs", "jwks": {"keys": [jwk]},
                "actor": actor, "consent_required": true}))
            .await;
        Peer { client_id: v["client_id"].as_str().expect("client_id").to_string(), key }
    }

    async fn token(&self, old: &SmartServer) -> String {
        use ed25519_dalek::Signer;
        let aud = old.url("/auth/token");
        let now = smart::now();
        let header = json!({"alg": "EdDSA", "typ": "JWT", "kid": fhir_ledger::bulk::label::thumbprint(&self.key.verifying_key())});
        let claims = json!({"iss": self.client_id, "sub": self.client_id, "aud": aud, "exp": now + 240, "iat": now,
                            "jti": smart::random_hex(16)});
        let assertion = smart::jws(&header, &claims, |m| self.key.sign(m).to_bytes().to_vec());
        let form = [
            ("grant_type", "client_credentials"),
            ("scope", "system/*.rs"),
            ("client_assertion_type", smart::JWT_BEARER),
            ("client_assertion", assertion.as_str()),
        ];
        let r = smart::send(old.http.post(&aud).form(&form)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.json()["access_token"].as_str().expect("token").to_string()
    }
}

/// The id of the one Patient of family `family`, after giving their Coverages subscriber id `sub`.
async fn member(old: &SmartServer, token: &str, family: &str, sub: &str) -> String {
    let p = smart::search_all(&old.http, &old.base, token, &format!("Patient?family={family}")).await;
    let id = p[0]["id"].as_str().expect("id").to_string();
    for mut cov in smart::search_all(&old.http, &old.base, token, &format!("Coverage?beneficiary=Patient/{id}")).await {
        cov["subscriberId"] = json!(sub);
        put_resource(&old.http, &old.base, token, &cov).await;
    }
    id
}

fn rand_seed() -> [u8; 32] {
    let hexed = smart::random_hex(32);
    hex::decode(hexed).expect("hex").try_into().expect("32 bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_moves_to_a_new_payer_with_verified_data_and_nothing_else_moves() {
    let old = SmartServer::start(&[]);
    let new = SmartServer::start(&[]);
    let old_sys = old.system_token("system/*.cruds").await;
    let new_sys = new.system_token("system/*.cruds").await;
    for n in [1, 2] {
        let r = fhir(&old.http, Method::POST, &old.base, Some(&old_sys), Some(&synthea(n))).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    put_resource(
        &old.http,
        &old.base,
        &old_sys,
        &json!({"resourceType": "Organization", "id": "new-payer", "name": "New Payer"}),
    )
    .await;
    put_resource(
        &old.http,
        &old.base,
        &old_sys,
        &json!({"resourceType": "Organization", "id": "old-payer", "name": "Old Payer"}),
    )
    .await;
    // The member, and a subscriber id on their coverage.
    let amy_id = member(&old, &old_sys, "Nader", "M-0001").await;
    let other = smart::search_all(&old.http, &old.base, &old_sys, "Patient?_count=10").await;
    let other_id = other
        .iter()
        .map(|p| p["id"].as_str().unwrap_or_default())
        .find(|i| *i != amy_id)
        .expect("a second patient")
        .to_string();

    // The new payer's configuration and the member's documents.
    let peer = Peer::register(&old).await;
    let work = tempfile::tempdir().expect("temp dir");
    let w = |name: &str| work.path().join(name);
    std::fs::write(w("client.key"), hex::encode(peer.key.to_bytes())).expect("key");
    let node_pub = std::fs::read_to_string(old.dir.path().join("node.pub")).expect("node.pub");
    let config = |keys: &str| {
        format!(
            "[[trusted_peer]]\nname = \"old\"\nbase_url = \"{}\"\nnode_keys = [\"{}\"]\nclient_id = \"{}\"\nclient_key = \"{}\"\n",
            old.base, keys.trim(), peer.client_id, w("client.key").display())
    };
    std::fs::write(w("peer.toml"), config(&node_pub)).expect("config");
    let stranger = hex::encode(ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key().to_bytes());
    std::fs::write(w("untrusted.toml"), config(&stranger)).expect("config");
    let member = json!({"resourceType": "Patient", "name": [{"family": "Nader", "given": ["Amy"]}], "birthDate": "2017-07-11", "gender": "female"});
    std::fs::write(w("member.json"), member.to_string()).expect("member");
    std::fs::write(
        w("coverage.json"),
        json!({"resourceType": "Coverage", "status": "active", "subscriberId": "M-0001",
        "beneficiary": {"reference": "Patient/x"}, "payor": [{"reference": "Organization/old-payer"}]})
        .to_string(),
    )
    .expect("coverage");
    std::fs::write(w("consent.json"), hrex_consent("Organization/new-payer", "sensitive").to_string())
        .expect("consent");
    std::fs::write(w("bad-consent.json"), hrex_consent("Organization/someone-else", "sensitive").to_string())
        .expect("consent");
    let s = |p: std::path::PathBuf| p.to_str().expect("path").to_string();
    let pull = |cfg: &str, consent: &str, extra: &[&str]| {
        let mut args = vec!["transfer", "pull", "--config", cfg, "--from", "old"];
        let (m, c, k) = (s(w("member.json")), s(w("coverage.json")), s(w(consent)));
        let owned: Vec<String> = vec![
            "--member".into(),
            m,
            "--coverage".into(),
            c,
            "--consent".into(),
            k,
            "--into".into(),
            new.base.clone(),
            "--token".into(),
            new_sys.clone(),
        ];
        let mut all: Vec<String> = args.drain(..).map(str::to_string).collect();
        all.extend(owned);
        all.extend(extra.iter().map(ToString::to_string));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        ledger_cli(&refs)
    };

    // Refused, with nothing imported: a consent that does not name this payer; an untrusted
    // node key.
    let (code, out) = pull(&s(w("peer.toml")), "bad-consent.json", &[]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("422") && out.contains("recipient"), "{out}");
    let (code, out) = pull(&s(w("untrusted.toml")), "consent.json", &[]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("refused") && out.contains("not signed by a trusted key"), "{out}");
    let transfers = smart::search_all(&new.http, &new.base, &new_sys, "Provenance?agent-type=transmitter").await;
    assert!(transfers.is_empty(), "nothing was imported");
    let everything = smart::search_all(&new.http, &new.base, &new_sys, "?_type=Patient,Observation,Claim").await;
    assert!(everything.is_empty(), "nothing was imported: {}", everything.len());

    // The transfer.
    let head = get(&old.http, &old.url("/ledger/head"), &old_sys).await;
    std::fs::write(w("head.json"), &head.text).expect("head");
    let (code, out) = pull(&s(w("peer.toml")), "consent.json", &["--known-head", &s(w("head.json"))]);
    assert_eq!(code, 0, "{out}");
    let provs = smart::search_all(&new.http, &new.base, &new_sys, "Provenance?agent-type=transmitter").await;
    assert!(!provs.is_empty(), "{out}");
    let prov = provs.last().expect("the transfer's Provenance").clone();
    let old_key = ed25519_dalek::VerifyingKey::from_bytes(
        &hex::decode(node_pub.trim()).expect("hex").try_into().expect("32 bytes"),
    )
    .expect("key");
    let n = fhir_ledger::cli::transfer::verify_provenance(&prov, &[old_key], 1).expect("the Provenance verifies");
    // Every imported resource equals its source apart from ids and references.
    let source = compartment(&old, &old_sys, &amy_id).await;
    // The old payer's disclosure log about the member stays with the old payer.
    let mut wanted: Vec<Value> = source.iter().filter(|r| r["resourceType"] != "AuditEvent").map(normalized).collect();
    let mut got = Vec::new();
    for t in prov["target"].as_array().expect("targets") {
        let r = get(&new.http, &new.url(t["reference"].as_str().expect("ref")), &new_sys).await;
        assert_eq!(r.status, 200, "{}", r.text);
        got.push(normalized(&r.json()));
    }
    assert_eq!(n, got.len());
    let key = |v: &Value| v.to_string();
    wanted.sort_by_key(key);
    got.sort_by_key(key);
    // Synthea's own Provenance targets both patients' data: it is the other patient's too,
    // and a consent-confined export leaves out what is not wholly this member's.
    wanted.retain(|r| got.contains(r) || r["resourceType"] != "Provenance");
    assert_eq!(got.len(), wanted.len(), "every resource of the member moved");
    assert_eq!(got, wanted);
    for r in &got {
        assert!(!r.to_string().contains(&other_id), "the other patient's data never moves");
    }

    // A head the old payer showed before that this ledger does not extend (a fork: signed by
    // its own key, with another root): the transfer is refused, nothing more is imported.
    let node_key = std::fs::read_to_string(old.dir.path().join("node.key")).expect("node.key");
    let node_key: [u8; 32] = hex::decode(node_key.trim()).expect("hex").try_into().expect("32 bytes");
    let node_key = ed25519_dalek::SigningKey::from_bytes(&node_key);
    let fork = fhir_ledger::treehead::TreeHead::signed(n as u64 / 2, [0x42; 32], smart::now() * 1000, "1", &node_key);
    let parts: Vec<Value> = fork.to_parts().iter().map(fhir_ledger::fhir::json::Json::to_serde).collect();
    std::fs::write(w("fork.json"), json!({"resourceType": "Parameters", "parameter": parts}).to_string())
        .expect("fork");
    let before = smart::search_all(&new.http, &new.base, &new_sys, "Provenance?agent-type=transmitter").await.len();
    let (code, out) = pull(&s(w("peer.toml")), "consent.json", &["--known-head", &s(w("fork.json"))]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not consistent"), "{out}");
    let after = smart::search_all(&new.http, &new.base, &new_sys, "Provenance?agent-type=transmitter").await.len();
    assert_eq!(before, after, "nothing more was imported");

    // The peer's token reaches the matched member only.
    let tok = peer.token(&old).await;
    let params = json!({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueReference": {"reference": format!("Patient/{other_id}")}}]});
    let r = kickoff(&old, Method::POST, "/Patient/$export", &tok, Some(&params)).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let e = finish(&old, &r.header("content-location"), &tok).await;
    assert!(e.resources().is_empty(), "an unmatched member's data: {:?}", e.resources().len());
    let r = get(&old.http, &old.url(&format!("/Patient/{other_id}")), &tok).await;
    assert_eq!(r.status, 404, "{}", r.text);

    // A consent withdrawn after the match: the next export holds nothing of the member.
    let consents =
        smart::search_all(&old.http, &old.base, &old_sys, &format!("Consent?patient=Patient/{amy_id}")).await;
    for mut c in consents {
        c["status"] = json!("inactive");
        put_resource(&old.http, &old.base, &old_sys, &c).await;
    }
    let params = json!({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueReference": {"reference": format!("Patient/{amy_id}")}}]});
    let r = kickoff(&old, Method::POST, "/Patient/$export", &tok, Some(&params)).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let e = finish(&old, &r.header("content-location"), &tok).await;
    assert!(e.resources().is_empty(), "a withdrawn consent: {:?}", e.resources().len());
    let errors: Vec<Value> = e.manifest["error"]
        .as_array()
        .expect("error")
        .iter()
        .flat_map(|x| e.lines(x["url"].as_str().unwrap_or_default()))
        .collect();
    assert!(errors.iter().any(|x| x["resourceType"] == "OperationOutcome"), "an OperationOutcome says why: {errors:?}");

    // A member-match without a consent is a 400 and stores nothing.
    let no_consent = json!({"resourceType": "Parameters", "parameter": [
        {"name": "MemberPatient", "resource": member}, {"name": "CoverageToMatch", "resource": {"resourceType": "Coverage", "status": "active", "subscriberId": "M-0001", "beneficiary": {"reference": "Patient/x"}, "payor": [{"reference": "Organization/old-payer"}]}}]});
    let r = fhir(&old.http, Method::POST, &old.url("/Patient/$member-match"), Some(&tok), Some(&no_consent)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("Consent"), "{}", r.text);
}

/// One `$bulk-member-match` part: the member, their coverage, their HRex Consent.
fn member_bundle(member: &Value, subscriber: &str, consent: &Value) -> Value {
    let coverage = json!({"resourceType": "Coverage", "status": "active", "subscriberId": subscriber,
        "beneficiary": {"reference": "Patient/x"}, "payor": [{"reference": "Organization/old-payer"}]});
    json!({"name": "MemberBundle", "part": [
        {"name": "MemberPatient", "resource": member},
        {"name": "CoverageToMatch", "resource": coverage},
        {"name": "Consent", "resource": consent}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_member_match_groups_members_and_the_group_export_follows_each_consent() {
    let old = SmartServer::start(&[]);
    let old_sys = old.system_token("system/*.cruds").await;
    for n in [1, 2, 4] {
        let r = fhir(&old.http, Method::POST, &old.base, Some(&old_sys), Some(&synthea(n))).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    for org in ["new-payer", "old-payer", "third-payer"] {
        put_resource(&old.http, &old.base, &old_sys, &json!({"resourceType": "Organization", "id": org})).await;
    }
    // Three members with subscriber ids on their coverage.
    let mut ids = Vec::new();
    for (family, sub) in [("Nader", "M-0001"), ("O'Connell", "M-0002"), ("Waelchi", "M-0004")] {
        ids.push(member(&old, &old_sys, family, sub).await);
    }
    let (amy, antoine, colby) = (&ids[0], &ids[1], &ids[2]);
    let peer = Peer::register(&old).await;
    let tok = peer.token(&old).await;
    let person = |family: &str, given: &str, birth: &str, gender: &str| json!({"resourceType": "Patient", "name": [{"family": family, "given": [given]}], "birthDate": birth, "gender": gender});
    let ours = hrex_consent("Organization/new-payer", "sensitive");
    let request = json!({"resourceType": "Parameters", "parameter": [
        member_bundle(&person("Nader", "Amy", "2017-07-11", "female"), "M-0001", &ours),
        member_bundle(&person("O'Connell", "Antoine", "2009-05-30", "male"), "M-0002", &ours),
        member_bundle(&person("Waelchi", "Colby", "1967-11-09", "male"), "M-0004",
                      &hrex_consent("Organization/someone-else", "sensitive")),
        member_bundle(&person("Nobody", "Nemo", "1990-01-01", "male"), "M-9999", &ours)]});

    // Asynchronous only; then 202, and the status URL answers the three Groups.
    let url = old.url("/Group/$bulk-member-match");
    let r = fhir(&old.http, Method::POST, &url, Some(&tok), Some(&request)).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let r = kickoff(&old, Method::POST, "/Group/$bulk-member-match", &tok, Some(&request)).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = get(&old.http, &r.header("content-location"), &tok).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let out = r.json();
    let group = |name: &str| -> Value {
        out["parameter"].as_array().expect("parameter").iter().find(|p| p["name"] == name).expect(name)["resource"]
            .clone()
    };
    let members = |g: &Value| -> Vec<String> {
        g["member"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| m["entity"]["reference"].as_str().expect("ref").to_string())
            .collect()
    };
    let matched = group("MatchedMembers");
    assert_eq!(members(&matched), [format!("Patient/{amy}"), format!("Patient/{antoine}")]);
    assert_eq!(matched["code"]["coding"][0]["code"], "match");
    assert_eq!(matched["managingEntity"]["reference"], "Organization/new-payer");
    let unmatched = group("NonMatchedMembers");
    assert_eq!(unmatched["contained"][0]["name"][0]["family"], "Nobody", "{unmatched}");
    let constrained = group("ConsentConstrainedMembers");
    assert_eq!(constrained["contained"][0]["name"][0]["family"], "Waelchi", "{constrained}");
    assert!(!r.text.contains(colby.as_str()), "a member whose consent cannot be honoured is not identified");
    let gid = matched["id"].as_str().expect("group id");
    // Another payer's client cannot export this group, nor can a request without consent.
    let export = format!("/Group/{gid}/$davinci-data-export?exportType=hl7.fhir.us.davinci-pdex%23payertopayer");
    let third = Peer::register_as(&old, "Organization/third-payer").await.token(&old).await;
    for path in [export.clone(), format!("/Group/{gid}/$export")] {
        let r = kickoff(&old, Method::GET, &path, &third, None).await;
        assert_eq!(r.status, 404, "{path}: {}", r.text);
    }
    let r =
        kickoff(&old, Method::GET, &format!("/Group/{gid}/$davinci-data-export?exportType=provider-delta"), &tok, None)
            .await;
    assert_eq!(r.status, 400, "{}", r.text);

    // The group's export holds the two matched members, as far back as five years.
    let r = kickoff(&old, Method::GET, &format!("{export}&_since=1990-01-01T00:00:00Z"), &tok, None).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let e = finish(&old, &r.header("content-location"), &tok).await;
    let exported: std::collections::BTreeSet<String> = e.ids("Patient").into_iter().collect();
    assert_eq!(exported, [amy.clone(), antoine.clone()].into_iter().collect());
    let eobs = e.ids("ExplanationOfBenefit").len();
    assert!(eobs > 0, "claims data moves");
    assert!(!e.resources().iter().any(|r| r.to_string().contains(colby.as_str())), "an unmatched member's data");

    // Antoine withdraws: the next export of the same group leaves him out and says so.
    for mut c in smart::search_all(&old.http, &old.base, &old_sys, &format!("Consent?patient=Patient/{antoine}")).await
    {
        c["status"] = json!("inactive");
        put_resource(&old.http, &old.base, &old_sys, &c).await;
    }
    let r = kickoff(&old, Method::POST, &export, &tok, None).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let e = finish(&old, &r.header("content-location"), &tok).await;
    assert_eq!(e.ids("Patient"), std::slice::from_ref(amy));
    assert!(!e.resources().iter().any(|r| r.to_string().contains(antoine.as_str())), "a withdrawn member's data");
    let errors: Vec<Value> = e.manifest["error"]
        .as_array()
        .expect("error")
        .iter()
        .flat_map(|o| e.lines(o["url"].as_str().unwrap_or_default()))
        .collect();
    assert!(
        errors.iter().any(|oo| oo.to_string().contains(antoine.as_str())),
        "the left-out member is named: {errors:?}"
    );
}

/// Polls an operation's status URL until it answers something other than 202.
async fn settle(s: &SmartServer, url: &str, token: &str) -> smart::Resp {
    for _ in 0..120 {
        let r = get(&s.http, url, token).await;
        if r.status != 202 {
            return r;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    panic!("{url} never finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_pulls_a_trusted_peers_export_verifies_it_and_imports_it_whole() {
    let old = SmartServer::start(&[]);
    let old_sys = old.system_token("system/*.cruds").await;
    let r = fhir(&old.http, Method::POST, &old.base, Some(&old_sys), Some(&synthea(1))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    for org in ["new-payer", "old-payer"] {
        put_resource(&old.http, &old.base, &old_sys, &json!({"resourceType": "Organization", "id": org})).await;
    }
    let amy_id = member(&old, &old_sys, "Nader", "M-0001").await;

    // The new payer matches the member at the old one and has the export made there.
    let peer = Peer::register(&old).await;
    let tok = peer.token(&old).await;
    let matched = json!({"resourceType": "Parameters", "parameter": [
        {"name": "MemberPatient", "resource": {"resourceType": "Patient", "name": [{"family": "Nader", "given": ["Amy"]}], "birthDate": "2017-07-11"}},
        {"name": "CoverageToMatch", "resource": {"resourceType": "Coverage", "status": "active", "subscriberId": "M-0001",
            "beneficiary": {"reference": "Patient/x"}, "payor": [{"reference": "Organization/old-payer"}]}},
        {"name": "Consent", "resource": hrex_consent("Organization/new-payer", "sensitive")}]});
    let r = fhir(&old.http, Method::POST, &old.url("/Patient/$member-match"), Some(&tok), Some(&matched)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let export = |tok: String| {
        let old = &old;
        let amy_id = amy_id.clone();
        async move {
            let body = json!({"resourceType": "Parameters", "parameter": [
                {"name": "patient", "valueReference": {"reference": format!("Patient/{amy_id}")}}]});
            let r = kickoff(old, Method::POST, "/Patient/$export", &tok, Some(&body)).await;
            assert_eq!(r.status, 202, "{}", r.text);
            let status = r.header("content-location");
            finish(old, &status, &tok).await;
            status
        }
    };
    let status_url = export(tok.clone()).await;

    // The new payer's server trusts the old one and is its client there.
    let work = tempfile::tempdir().expect("temp dir");
    let key_file = work.path().join("client.key");
    std::fs::write(&key_file, hex::encode(peer.key.to_bytes())).expect("key");
    let node_pub = std::fs::read_to_string(old.dir.path().join("node.pub")).expect("node.pub");
    let cfg = work.path().join("new.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[trusted_peer]]\nname = \"old\"\nbase_url = \"{}\"\nnode_keys = [\"{}\"]\nclient_id = \"{}\"\nclient_key = \"{}\"\n",
            old.base, node_pub.trim(), peer.client_id, key_file.display()),
    )
    .expect("config");
    let new = SmartServer::start(&["--config", cfg.to_str().expect("path")]);
    let new_sys = new.system_token("system/*.cruds").await;
    let ask =
        |url: &str| json!({"resourceType": "Parameters", "parameter": [{"name": "manifestUrl", "valueUrl": url}]});

    // Only a trusted peer's exports are pulled; only asynchronously.
    let r = kickoff(&new, Method::POST, "/$import", &new_sys, Some(&ask("http://127.0.0.1:9/bulk/x"))).await;
    assert_eq!(r.status, 422, "{}", r.text);
    let r = fhir(&new.http, Method::POST, &new.url("/$import"), Some(&new_sys), Some(&ask(&status_url))).await;
    assert_eq!(r.status, 400, "{}", r.text);
    // A caller without create scopes is refused before anything is pulled.
    let reader = new.system_token("system/*.rs").await;
    let r = kickoff(&new, Method::POST, "/$import", &reader, Some(&ask(&status_url))).await;
    assert_eq!(r.status, 403, "{}", r.text);

    // The import: verified, then one transaction with a Provenance that verifies.
    let r = kickoff(&new, Method::POST, "/$import", &new_sys, Some(&ask(&status_url))).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let done = settle(&new, &r.header("content-location"), &new_sys).await;
    assert_eq!(done.status, 200, "{}", done.text);
    let result = done.json();
    let provenance = result["extension"]["urn:fhir-ledger:import:provenance"].as_str().expect("provenance").to_string();
    let prov = get(&new.http, &new.url(&provenance), &new_sys).await.json();
    let old_key = ed25519_dalek::VerifyingKey::from_bytes(
        &hex::decode(node_pub.trim()).expect("hex").try_into().expect("32 bytes"),
    )
    .expect("key");
    let n = fhir_ledger::transfer::verify_provenance(&prov, &[old_key], 1).expect("the Provenance verifies");
    assert_eq!(Some(n as u64), result["extension"]["urn:fhir-ledger:import:resources"].as_u64(), "{result}");
    let source = compartment(&old, &old_sys, &amy_id).await;
    assert!(n > 100 && n <= source.len(), "{n} of {} resources imported", source.len());
    let patients = smart::search_all(&new.http, &new.base, &new_sys, "Patient?family=Nader").await;
    assert_eq!(patients.len(), 1);

    // Another export later: its head extends the one imported before, and it imports too.
    // (Its text carries a decimal with a trailing zero: an import moves the exact bytes.)
    let obs = format!(
        r#"{{"resourceType":"Observation","id":"later-obs","status":"final","code":{{"text":"later"}},"subject":{{"reference":"Patient/{amy_id}"}},"valueQuantity":{{"value":98.60,"unit":"F"}}}}"#
    );
    let r = smart::send(
        old.http
            .put(old.url("/Observation/later-obs"))
            .bearer_auth(&old_sys)
            .header("content-type", "application/fhir+json")
            .body(obs),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let status_url = export(tok).await;
    let r = kickoff(&new, Method::POST, "/$import", &new_sys, Some(&ask(&status_url))).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let done = settle(&new, &r.header("content-location"), &new_sys).await;
    assert_eq!(done.status, 200, "{}", done.text);
    let provs = smart::search_all(&new.http, &new.base, &new_sys, "Provenance?agent-type=transmitter").await;
    assert_eq!(provs.len(), 2);
    let later = get(&new.http, &new.url("/Observation?code:text=later"), &new_sys).await;
    assert!(later.text.contains(r#""value":98.60"#), "the decimal as sent: {}", later.text);

    // A peer's export that is no longer there is refused at its status URL, nothing imported.
    let r = fhir(&old.http, Method::DELETE, &status_url, Some(&peer.token(&old).await), None).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let r = kickoff(&new, Method::POST, "/$import", &new_sys, Some(&ask(&status_url))).await;
    assert_eq!(r.status, 202, "{}", r.text);
    let done = settle(&new, &r.header("content-location"), &new_sys).await;
    assert_eq!(done.status, 422, "{}", done.text);
    assert!(done.text.contains("refused"), "{}", done.text);
    let provs = smart::search_all(&new.http, &new.base, &new_sys, "Provenance?agent-type=transmitter").await;
    assert_eq!(provs.len(), 2, "nothing more was imported");
}

/// `transfer import` uploads its transaction while it is still being written, and a failure
/// while writing ends the upload in an error: the server must then store nothing of what
/// arrived, and a whole upload in parts is one transaction like any other.
#[tokio::test]
async fn a_transaction_whose_upload_breaks_off_stores_nothing() {
    let s = SmartServer::start(&[]);
    let sys = s.system_token("system/*.cruds").await;
    let entry = |system: &str, n: u32| {
        json!({"fullUrl": format!("urn:uuid:00000000-0000-4000-8000-{n:012}"),
               "resource": {"resourceType": "Patient", "identifier": [{"system": system, "value": n.to_string()}]},
               "request": {"method": "POST", "url": "Patient"}})
        .to_string()
    };
    let upload = |parts: Vec<std::io::Result<String>>| {
        let body =
            reqwest::Body::wrap_stream(futures::stream::iter(parts.into_iter().map(|p| p.map(bytes::Bytes::from))));
        s.http
            .post(format!("{}/", s.base))
            .bearer_auth(&sys)
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
    };
    let opening = r#"{"resourceType":"Bundle","type":"transaction","entry":["#;
    let cut = upload(vec![
        Ok(format!("{opening}{}", entry("urn:cut", 1))),
        Ok(format!(",{}", entry("urn:cut", 2))),
        Err(std::io::Error::other("the writer failed")),
    ])
    .await;
    if let Ok(r) = cut {
        assert!(!r.status().is_success(), "a cut upload was answered {}", r.status());
    }
    let whole = upload(vec![
        Ok(format!("{opening}{}", entry("urn:whole", 1))),
        Ok(format!(",{}", entry("urn:whole", 2))),
        Ok("]}".to_string()),
    ])
    .await
    .expect("a whole upload in parts");
    assert_eq!(whole.status(), 200, "{}", whole.text().await.unwrap_or_default());
    // Transactions commit in order: the whole one is in, and nothing of the cut one.
    for (system, expected) in [("urn:whole", 2), ("urn:cut", 0)] {
        let r = get(&s.http, &s.url(&format!("/Patient?identifier={system}|&_summary=count")), &sys).await;
        assert_eq!(r.json()["total"], expected, "{system}: {}", r.text);
    }
}
