//! Payer-to-payer exchange on the old payer's side (Da Vinci PDex 2.1.0, HRex 1.1.0):
//! `$member-match` finds the one member the requesting payer describes, and stores the
//! member's HRex Consent on the ledger, naming the requester, which is what then lets that
//! payer's client (registered with `consent_required`) read that member's data and no one
//! else's: the consent engine and the guard do the confining, as for every other read.

use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::Json;
use crate::search::Engine;

/// The HRex Consent policies: `#regular` (no sensitive data) and `#sensitive` (all of it).
pub const HREX_CONSENT: &str = "http://hl7.org/fhir/us/davinci-hrex/StructureDefinition-hrex-consent.html";
/// Security labels of data a `#regular` Consent withholds (v3 Confidentiality and
/// ActCode sensitivity codes).
pub const SENSITIVE: &[&str] = &["R", "V", "PSY", "PSYTHPN", "HIV", "SUD", "ETH", "ETHUD", "SDV", "SEX", "STD", "BH"];

fn unprocessable(why: impl Into<String>) -> FhirError {
    FhirError::new(ErrorCode::Unprocessable, why.into())
}

/// `Type/id` of a reference (absolute or relative).
fn reference_key(r: &str) -> Option<String> {
    let mut it = r.rsplit('/');
    let id = it.next()?;
    let t = it.next()?;
    Some(format!("{t}/{id}"))
}

/// `Type/id` of the first recipient (`IRCP`) a Consent names by reference.
pub fn recipient(consent: &Json) -> Option<String> {
    consent
        .items(&["provision", "actor"])
        .filter(|a| has_role(a, "IRCP"))
        .find_map(|a| a.str_at(&["reference", "reference"]).and_then(reference_key))
}

fn has_role(actor: &Json, code: &str) -> bool {
    actor.items(&["role", "coding"]).any(|c| c.str_at(&["code"]) == Some(code))
}

/// Checks an HRex Consent for the requester `requester` (`Organization/…`, with its
/// identifiers): active, an HRex policy, one permit provision with a current period, and the
/// requester as recipient (`IRCP`). Returns whether it is `#regular` (sensitive data withheld).
pub fn check_consent(consent: &Json, requester: &str, identifiers: &[String], now_ms: i64) -> Result<bool, FhirError> {
    if consent.str_at(&["resourceType"]) != Some("Consent") || consent.str_at(&["status"]) != Some("active") {
        return Err(unprocessable("the Consent cannot be honoured: it must be an active Consent"));
    }
    let policy = consent.items(&["policy"]).filter_map(|p| p.str_at(&["uri"])).find(|u| u.starts_with(HREX_CONSENT));
    let regular = match policy.and_then(|u| u.split_once('#')).map(|(_, f)| f) {
        Some("regular") => true,
        Some("sensitive") => false,
        _ => {
            return Err(unprocessable(format!(
                "the Consent cannot be honoured: its policy must be {HREX_CONSENT}#regular or #sensitive"
            )))
        }
    };
    let provision = consent.get("provision").unwrap_or(&Json::Null);
    if provision.str_at(&["type"]) != Some("permit") {
        return Err(unprocessable("the Consent cannot be honoured: its provision must permit"));
    }
    let (Some(start), Some(end)) = (
        provision.str_at(&["period", "start"]).and_then(crate::fhir::date_range_ms),
        provision.str_at(&["period", "end"]).and_then(crate::fhir::date_range_ms),
    ) else {
        return Err(unprocessable(
            "the Consent cannot be honoured: its provision needs a period with a start and an end",
        ));
    };
    if now_ms < start.0 || now_ms >= end.1 {
        return Err(unprocessable("the Consent cannot be honoured: its period is not current"));
    }
    let recipient = provision.items(&["actor"]).filter(|a| has_role(a, "IRCP")).any(|a| {
        let by_ref = a.str_at(&["reference", "reference"]).and_then(reference_key).is_some_and(|k| k == requester);
        let by_id = a.str_at(&["reference", "identifier", "value"]).is_some_and(|v| identifiers.iter().any(|i| i == v));
        by_ref || by_id
    });
    if !recipient {
        return Err(unprocessable(
            "the Consent cannot be honoured: it does not name the requesting payer as recipient (IRCP)",
        ));
    }
    Ok(regular)
}

fn lower(s: &str) -> String {
    s.trim().to_lowercase()
}

/// The id of the one live Patient matching `member` (family and given names, birth date,
/// gender when given) whose Coverage matches `coverage` (subscriber id or an identifier).
/// No match or several is a 422 that names no patient.
pub fn match_member(engine: &Engine, member: &Json, coverage: &Json) -> Result<String, FhirError> {
    let none = || unprocessable("no unique member matches the MemberPatient and CoverageToMatch given");
    let family = member.items(&["name"]).find_map(|n| n.str_at(&["family"])).ok_or_else(|| {
        FhirError::invalid("$member-match: MemberPatient needs a name with a family name").at("MemberPatient.name")
    })?;
    let birth = member.str_at(&["birthDate"]).ok_or_else(|| {
        FhirError::invalid("$member-match: MemberPatient needs a birthDate").at("MemberPatient.birthDate")
    })?;
    let mut coverage_ids: Vec<String> = coverage.str_at(&["subscriberId"]).map(str::to_string).into_iter().collect();
    coverage_ids.extend(coverage.items(&["identifier"]).filter_map(|i| i.str_at(&["value"])).map(str::to_string));
    if coverage_ids.is_empty() {
        return Err(FhirError::invalid("$member-match: CoverageToMatch needs a subscriberId or an identifier")
            .at("CoverageToMatch"));
    }
    let givens: Vec<String> =
        member.items(&["name"]).flat_map(|n| n.items(&["given"])).filter_map(Json::as_str).map(lower).collect();
    let repo = engine.repo();
    let idx = engine.current()?;
    let query = vec![("family:exact".to_string(), family.to_string()), ("birthdate".to_string(), birth.to_string())];
    let mut found = Vec::new();
    let patients = idx.of("Patient");
    for key in crate::search::matching(engine, &idx, "Patient", &query)? {
        let Some(doc) = patients.get(key)? else { continue };
        let Some(p) = repo.read("Patient", &doc.id)?.parsed()? else { continue };
        let names_match = givens.is_empty()
            || p.items(&["name"])
                .flat_map(|n| n.items(&["given"]))
                .filter_map(Json::as_str)
                .any(|g| givens.contains(&lower(g)));
        let gender_match = member.str_at(&["gender"]).is_none_or(|g| p.str_at(&["gender"]) == Some(g));
        if !names_match || !gender_match {
            continue;
        }
        let q = vec![("beneficiary".to_string(), format!("Patient/{}", doc.id))];
        let covered = crate::search::matching(engine, &idx, "Coverage", &q)?.into_iter().any(|k| {
            let Ok(Some(c)) = idx.of("Coverage").get(k) else { return false };
            let Ok(Some(c)) = repo.read("Coverage", &c.id).and_then(|s| s.parsed()) else { return false };
            let mut ids: Vec<&str> = c.str_at(&["subscriberId"]).into_iter().collect();
            ids.extend(c.items(&["identifier"]).filter_map(|i| i.str_at(&["value"])));
            ids.iter().any(|i| coverage_ids.iter().any(|w| w == i))
        });
        if covered {
            found.push(doc.id.clone());
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(none()),
    }
}

/// The Consent as stored for member `patient`: its `patient` set, and for a `#regular`
/// policy a nested deny of sensitive data (so the consent engine withholds it).
pub fn consent_to_store(consent: &Json, patient: &str, regular: bool) -> Json {
    let mut c = consent.clone();
    c.remove("id");
    c.remove("meta");
    c.set("patient", Json::obj(vec![("reference", Json::str(format!("Patient/{patient}")))]));
    if regular {
        let labels: Vec<Json> = SENSITIVE.iter().map(|code| Json::obj(vec![("code", Json::str(*code))])).collect();
        let deny = Json::obj(vec![("type", Json::str("deny")), ("securityLabel", Json::Array(labels))]);
        if let Some(p) = c.get_mut("provision") {
            let mut nested: Vec<Json> = p.get("provision").and_then(Json::as_array).cloned().unwrap_or_default();
            nested.push(deny);
            p.set("provision", Json::Array(nested));
        }
    }
    c
}

/// The codes of PDex's multi-member match result groups (`match`, `nomatch`, `consentconstraint`).
pub const MATCH_RESULT: &str = "http://hl7.org/fhir/us/davinci-pdex/CodeSystem/PdexMultiMemberMatchResultCS";

fn result_code(code: &str) -> Json {
    Json::obj(vec![(
        "coding",
        Json::Array(vec![Json::obj(vec![("system", Json::str(MATCH_RESULT)), ("code", Json::str(code))])]),
    )])
}

/// The `MatchedMembers` Group of a `$bulk-member-match` (PDex Member Match Group): the
/// matched patients, managed by the requesting payer `org`, which alone may export it.
pub fn matched_group(org: &str, patients: &[String], now_ms: i64) -> Json {
    let members: Vec<Json> = patients
        .iter()
        .map(|p| Json::obj(vec![("entity", Json::obj(vec![("reference", Json::str(format!("Patient/{p}")))]))]))
        .collect();
    let mut g = vec![
        ("resourceType", Json::str("Group")),
        ("type", Json::str("person")),
        ("actual", Json::Bool(true)),
        ("code", result_code("match")),
        ("name", Json::str("Members matched by $bulk-member-match")),
    ];
    if !org.is_empty() {
        let by = Json::obj(vec![("reference", Json::str(org))]);
        g.push(("managingEntity", by.clone()));
        g.push((
            "characteristic",
            Json::Array(vec![Json::obj(vec![
                ("code", result_code("match")),
                ("valueReference", by),
                ("exclude", Json::Bool(false)),
                ("period", Json::obj(vec![("start", Json::str(crate::fhir::instant(now_ms)))])),
            ])]),
        ));
    }
    g.push(("quantity", Json::Number(patients.len().to_string())));
    if !members.is_empty() {
        g.push(("member", Json::Array(members)));
    }
    Json::obj(g)
}

/// A `NonMatchedMembers` or `ConsentConstrainedMembers` Group (PDex Member No Match Group):
/// the submitted demographics as contained Patients. It names no patient of this server, and
/// is not stored beyond the job's answer.
pub fn unmatched_group(code: &str, submitted: &[Json]) -> Json {
    let mut contained = Vec::new();
    let mut members = Vec::new();
    for (n, p) in submitted.iter().enumerate() {
        let mut p = p.clone();
        p.set("id", Json::str(format!("m{}", n + 1)));
        contained.push(p);
        members.push(Json::obj(vec![("entity", Json::obj(vec![("reference", Json::str(format!("#m{}", n + 1)))]))]));
    }
    let mut g = vec![("resourceType", Json::str("Group"))];
    if !contained.is_empty() {
        g.push(("contained", Json::Array(contained)));
    }
    g.extend([
        ("type", Json::str("person")),
        ("actual", Json::Bool(true)),
        ("code", result_code(code)),
        ("quantity", Json::Number(submitted.len().to_string())),
    ]);
    if !members.is_empty() {
        g.push(("member", Json::Array(members)));
    }
    Json::obj(g)
}
