//! Da Vinci PDex payer-to-payer on the old payer's side: `POST /Patient/$member-match`
//! (HRex 1.1.0). Only a registered client acting for an Organization (the requesting payer)
//! may ask; the answer names the one matched member or nothing at all.

use actix_web::{web, HttpRequest, HttpResponse};

use super::{authz, json_response, read_barrier, AppState, Format};
use crate::auth::access::Disclosed;
use crate::auth::scopes::Perm;
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::payer;

/// The v2 identifier type of a member number.
const V2_0203: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";

pub async fn member_match(
    req: HttpRequest,
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, FhirError> {
    read_barrier(&req, &state.repo).await?;
    let caller = authz::caller(&req);
    let f = Format::negotiate(&req)?;
    let requester = caller.client_actor.clone().filter(|a| a.starts_with("Organization/"));
    if requester.is_none() && !caller.unrestricted {
        return Err(authz::forbidden_logged(
            &state,
            &caller,
            "operation",
            "$member-match is for a payer's client, registered with an Organization as its actor",
        ));
    }
    authz::require(&state, &caller, "Patient", Perm::S, "operation")?;
    let body = super::read_body(&req, payload, state.max_body_bytes).await?;
    let params = super::parse_resource(&body)?;
    if params.str_at(&["resourceType"]) != Some("Parameters") {
        return Err(FhirError::invalid("$member-match takes a Parameters resource").at("resourceType"));
    }
    let member = payer::part(&params, "MemberPatient")?;
    let coverage = payer::part(&params, "CoverageToMatch")?;
    let consent = payer::part(&params, "Consent")?;
    for (name, rtype, res) in [
        ("MemberPatient", "Patient", member),
        ("CoverageToMatch", "Coverage", coverage),
        ("Consent", "Consent", consent),
    ] {
        if res.str_at(&["resourceType"]) != Some(rtype) {
            return Err(FhirError::invalid(format!("$member-match: {name} must be a {rtype}")).at(name));
        }
        crate::search::validate::validate(&state.search, rtype, res, Some(name))?;
    }
    // Without authorization (development) the Consent's own recipient stands for the caller.
    let requester = requester.unwrap_or_default();
    let identifiers: Vec<String> = match requester.strip_prefix("Organization/") {
        Some(id) => match state.repo.read("Organization", id) {
            Ok(s) => s.parsed()?.map_or_else(Vec::new, |o| {
                o.items(&["identifier"]).filter_map(|i| i.str_at(&["value"])).map(str::to_string).collect()
            }),
            Err(_) => Vec::new(),
        },
        None => Vec::new(),
    };
    let now = crate::fhir::now_ms();
    let regular = if caller.unrestricted {
        payer::check_consent(consent, &payer::recipient(consent).unwrap_or_default(), &identifiers, now)?
    } else {
        payer::check_consent(consent, &requester, &identifiers, now)?
    };
    let patient = payer::match_member(&state.search, member, coverage)?;
    let stored = payer::consent_to_store(consent, &patient, regular);
    crate::search::validate::validate(&state.search, "Consent", &stored, None)?;
    let consent_id = uuid::Uuid::new_v4().to_string();
    let actor = format!("client:{} $member-match", caller.claims.client_id);
    state
        .repo
        .commit(&crate::repo::System::new(actor), |plan| plan.put_new("Consent", &consent_id, &stored).map(|_| ()))
        .await?;
    let mut d = Disclosed::default();
    d.patients.insert(("Patient".into(), patient.clone()), vec![patient.clone()]);
    authz::disclosed(&state, &caller, "operation", &[("Patient".into(), patient.clone(), 0)], &d);
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
    let out = Json::obj(vec![
        ("resourceType", Json::str("Parameters")),
        (
            "parameter",
            Json::Array(vec![
                Json::obj(vec![("name", Json::str("MemberIdentifier")), ("valueIdentifier", identifier)]),
                Json::obj(vec![
                    ("name", Json::str("MemberId")),
                    ("valueReference", Json::obj(vec![("reference", Json::str(format!("Patient/{patient}")))])),
                ]),
                Json::obj(vec![
                    ("name", Json::str("Consent")),
                    ("valueReference", Json::obj(vec![("reference", Json::str(format!("Consent/{consent_id}")))])),
                ]),
            ]),
        ),
    ]);
    Ok(json_response(200, &out, &f))
}
