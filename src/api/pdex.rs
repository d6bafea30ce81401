//! Da Vinci PDex payer-to-payer on the old payer's side: `POST /Patient/$member-match`
//! (HRex 1.1.0) for one member, and `POST /Group/$bulk-member-match` (PDex 2.1.0, async) for
//! many. Only a registered client acting for an Organization (the requesting payer) may ask;
//! an answer names matched members only, and only with a Consent that names the requester.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use super::{authz, json_response, read_barrier, AppState, Format};
use crate::auth::access::Disclosed;
use crate::auth::scopes::Perm;
use crate::auth::Caller;
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::payer;

/// The v2 identifier type of a member number.
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";

/// The requesting payer: its Organization (empty for an unrestricted caller, whose Consent's
/// recipient then stands for it) and that Organization's identifiers.
struct Requester {
    org: String,
    identifiers: Vec<String>,
}

/// One member's request, matched and checked.
enum Verdict {
    /// The member and the Consent to store for them.
    Matched {
        patient: String,
        consent: Json,
    },
    NoMatch(FhirError),
    /// Matched, but the Consent cannot be honoured (the member is not named).
    Constrained(FhirError),
}

fn requester(state: &AppState, caller: &Caller, op: &str) -> Result<Requester, FhirError> {
    let org = caller.client_actor.clone().filter(|a| a.starts_with("Organization/"));
    if org.is_none() && !caller.unrestricted {
        return Err(authz::forbidden_logged(
            state,
            caller,
            "operation",
            &format!("{op} is for a payer's client, registered with an Organization as its actor"),
        ));
    }
    authz::require(state, caller, "Patient", Perm::S, "operation")?;
    let org = org.unwrap_or_default();
    let identifiers = match org.strip_prefix("Organization/").map(|id| state.repo.read("Organization", id)) {
        Some(Ok(s)) => s.parsed()?.map_or_else(Vec::new, |o| {
            o.items(&["identifier"]).filter_map(|i| i.str_at(&["value"])).map(str::to_string).collect()
        }),
        _ => Vec::new(),
    };
    Ok(Requester { org, identifiers })
}

/// The member's three resources from `parts` (a Parameters or a `MemberBundle`'s parts),
/// each of its type and valid; errors are located under `at`.
fn member_parts<'a>(state: &AppState, parts: &'a [Json], at: &str) -> Result<[&'a Json; 3], FhirError> {
    let mut out = [&Json::Null; 3];
    for (slot, (name, rtype)) in
        out.iter_mut().zip([("MemberPatient", "Patient"), ("CoverageToMatch", "Coverage"), ("Consent", "Consent")])
    {
        let here = format!("{at}{name}");
        let res =
            parts.iter().find(|p| p.str_at(&["name"]) == Some(name)).and_then(|p| p.get("resource")).ok_or_else(
                || FhirError::invalid(format!("parameter {name} (a {rtype}) is required")).at(here.clone()),
            )?;
        if res.str_at(&["resourceType"]) != Some(rtype) {
            return Err(FhirError::invalid(format!("{name} must be a {rtype}")).at(here));
        }
        crate::search::validate::validate(&state.search, rtype, res, Some(&here))?;
        *slot = res;
    }
    Ok(out)
}

fn evaluate(state: &AppState, caller: &Caller, who: &Requester, parts: [&Json; 3]) -> Result<Verdict, FhirError> {
    let [member, coverage, consent] = parts;
    let recipient = if caller.unrestricted { payer::recipient(consent).unwrap_or_default() } else { who.org.clone() };
    let patient = match payer::match_member(&state.search, member, coverage) {
        Ok(p) => p,
        Err(e) if e.status() == 422 => return Ok(Verdict::NoMatch(e)),
        Err(e) => return Err(e),
    };
    let regular = match payer::check_consent(consent, &recipient, &who.identifiers, crate::fhir::now_ms()) {
        Ok(r) => r,
        Err(e) if e.status() == 422 => return Ok(Verdict::Constrained(e)),
        Err(e) => return Err(e),
    };
    let consent = payer::consent_to_store(consent, &patient, regular);
    crate::search::validate::validate(&state.search, "Consent", &consent, None)?;
    Ok(Verdict::Matched { patient, consent })
}

/// Logs that the requester learned which patient each matched member is.
fn log_matches(state: &AppState, caller: &Caller, patients: &[String]) {
    let mut d = Disclosed::default();
    for p in patients {
        d.patients.insert(("Patient".into(), p.clone()), vec![p.clone()]);
    }
    let shown: Vec<(String, String, u64)> = patients.iter().map(|p| ("Patient".into(), p.clone(), 0)).collect();
    authz::disclosed(state, caller, "operation", &shown, &d);
}

async fn parameters_body(req: &HttpRequest, state: &AppState, payload: web::Payload) -> Result<Json, FhirError> {
    let body = super::read_body(req, payload, state.max_body_bytes).await?;
    let params = super::parse_resource(&body)?;
    if params.str_at(&["resourceType"]) != Some("Parameters") {
        return Err(FhirError::invalid("the operation takes a Parameters resource").at("resourceType"));
    }
    Ok(params)
}

fn reference(r: impl Into<String>) -> Json {
    Json::obj(vec![("reference", Json::str(r))])
}

/// A Parameters resource of `(name, value[x] member, value)` parts.
fn parameters(parts: Vec<(&str, &str, Json)>) -> Json {
    let parts = parts.into_iter().map(|(name, key, v)| Json::obj(vec![("name", Json::str(name)), (key, v)])).collect();
    Json::obj(vec![("resourceType", Json::str("Parameters")), ("parameter", Json::Array(parts))])
}

pub async fn member_match(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, FhirError> {
    read_barrier(&req, &state.repo).await?;
    let caller = authz::caller(&req);
    let f = Format::negotiate(&req)?;
    let who = requester(&state, &caller, "$member-match")?;
    let params = parameters_body(&req, &state, payload).await?;
    let parts: Vec<Json> = params.items(&["parameter"]).cloned().collect();
    let (patient, stored) = match evaluate(&state, &caller, &who, member_parts(&state, &parts, "")?)? {
        Verdict::Matched { patient, consent } => (patient, consent),
        Verdict::NoMatch(e) | Verdict::Constrained(e) => return Err(e),
    };
    let consent_id = uuid::Uuid::new_v4().to_string();
    let actor = format!("client:{} $member-match", caller.claims.client_id);
    state
        .repo
        .commit(&crate::repo::System::new(actor), |plan| plan.put_new("Consent", &consent_id, &stored).map(|_| ()))
        .await?;
    log_matches(&state, &caller, std::slice::from_ref(&patient));
    let identifier = Json::obj(vec![
        (
            "type",
            Json::obj(vec![(
                "coding",
                Json::Array(vec![Json::obj(vec![("system", Json::str(V2_0203)), ("code", Json::str("UMB"))])]),
            )]),
        ),
        ("system", Json::str(format!("{}/Patient", super::base_url(&req)))),
        ("value", Json::str(patient.clone())),
    ]);
    let out = parameters(vec![
        ("MemberIdentifier", "valueIdentifier", identifier),
        ("MemberId", "valueReference", reference(format!("Patient/{patient}"))),
        ("Consent", "valueReference", reference(format!("Consent/{consent_id}"))),
    ]);
    Ok(json_response(200, &out, &f))
}

/// `POST /Group/$bulk-member-match` (`Prefer: respond-async`): each `MemberBundle` is
/// matched and its Consent checked as by `$member-match`. The matched members' Consents and
/// the `MatchedMembers` Group (managed by the requester, the input of
/// `$davinci-data-export`) are stored in one commit; the answer, three Groups in a
/// Parameters, is the result of an async job at `/bulk/{job}`.
pub async fn bulk_member_match(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, FhirError> {
    read_barrier(&req, &state.repo).await?;
    let caller = authz::caller(&req);
    let who = requester(&state, &caller, "$bulk-member-match")?;
    if !super::bulk::respond_async(&req) {
        return Err(
            FhirError::invalid("$bulk-member-match runs asynchronously: send Prefer: respond-async").at("Prefer")
        );
    }
    let params = parameters_body(&req, &state, payload).await?;
    let bundles: Vec<&Json> =
        params.items(&["parameter"]).filter(|p| p.str_at(&["name"]) == Some("MemberBundle")).collect();
    if bundles.is_empty() {
        return Err(FhirError::invalid("$bulk-member-match needs at least one MemberBundle").at("MemberBundle"));
    }
    let (mut matched, mut unmatched, mut constrained) = (Vec::new(), Vec::new(), Vec::new());
    for (n, b) in bundles.iter().enumerate() {
        let parts: Vec<Json> = b.items(&["part"]).cloned().collect();
        let [member, coverage, consent] = member_parts(&state, &parts, &format!("MemberBundle[{n}]."))?;
        match evaluate(&state, &caller, &who, [member, coverage, consent])? {
            Verdict::Matched { patient, consent } => matched.push((patient, consent)),
            Verdict::NoMatch(_) => unmatched.push(member.clone()),
            Verdict::Constrained(_) => constrained.push(member.clone()),
        }
    }
    let group_id = uuid::Uuid::new_v4().to_string();
    let patients: Vec<String> = matched.iter().map(|(p, _)| p.clone()).collect();
    let group = payer::matched_group(&who.org, &patients, crate::fhir::now_ms());
    crate::search::validate::validate(&state.search, "Group", &group, None)?;
    let actor = format!("client:{} $bulk-member-match", caller.claims.client_id);
    state
        .repo
        .commit(&crate::repo::System::new(actor), |plan| {
            for (_, c) in &matched {
                plan.put_new("Consent", &uuid::Uuid::new_v4().to_string(), c)?;
            }
            plan.put_new("Group", &group_id, &group).map(|_| ())
        })
        .await?;
    log_matches(&state, &caller, &patients);
    let mut stored = group;
    stored.set("id", Json::str(group_id));
    let out = parameters(vec![
        ("MatchedMembers", "resource", stored),
        ("NonMatchedMembers", "resource", payer::unmatched_group("nomatch", &unmatched)),
        ("ConsentConstrainedMembers", "resource", payer::unmatched_group("consentconstraint", &constrained)),
    ]);
    let job = super::bulk::operation_job(&req, &state, &caller, "$bulk-member-match", Some(out.to_serde())).await?;
    Ok(HttpResponse::Accepted()
        .insert_header((header::CONTENT_LOCATION, format!("{}/bulk/{job}", super::base_url(&req))))
        .finish())
}
