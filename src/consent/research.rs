//! Research access: studies (`ResearchStudy`) and their teams, enrolled subjects
//! (`ResearchSubject`) and each subject's research `Consent`, read from the ledger with the
//! patients' other Consents.
//!
//! A research Consent (`scope` `research`) is kept apart from the patient's other Consents: it
//! decides nothing for clinicians, and for a study's team it is the only thing that can permit.
//! A team member reads a patient's data only with purpose of use `HRESCH`, for one study, while
//! the patient is an enrolled subject of that study whose `ResearchSubject.consent` is an
//! active research Consent permitting the request (class, data period, actor); a deny in any
//! of the patient's Consents still wins.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::{reference_key, root_provision, Decision, Request, Rule};
use crate::fhir::deid::Rules;
use crate::fhir::json::Json;

/// Purpose of use for research (v3-ActReason).
pub const RESEARCH: &str = "HRESCH";
/// On a ResearchStudy: the people, teams, organizations and clients (references, or client
/// identifiers as in a Consent's actor) who work on it besides the principal investigator.
pub const TEAM_EXTENSION: &str = "urn:fhir-ledger:StructureDefinition/research-team";
/// On a research Consent: the study it was given for (R4 has no element for it).
pub const STUDY_EXTENSION: &str = "urn:fhir-ledger:StructureDefinition/research-study";
/// On a ResearchStudy: the study receives de-identified data only. `valueString` `safe-harbor`
/// for the built-in HIPAA Safe Harbor rules, or sub-extensions `rule` (`valueString`, one
/// `PATH METHOD` each, see `fhir::deid`) and an optional `name`.
pub const DEIDENTIFY_EXTENSION: &str = "urn:fhir-ledger:StructureDefinition/deidentify";
/// The consentscope code of a research Consent.
pub const SCOPE: &str = "research";

/// ResearchSubject statuses of an enrolled subject (R4 `research-subject-status`).
const ENROLLED: [&str; 4] = ["on-study", "on-study-intervention", "on-study-observation", "follow-up"];
/// ResearchStudy statuses under which a study reads nothing (not yet approved, or stopped).
const CLOSED: [&str; 3] = ["in-review", "disapproved", "withdrawn"];

/// One study as the ledger holds it now.
#[derive(Debug, Default)]
pub struct Study {
    pub team: Vec<String>,
    open: bool,
    /// The de-identification every read for the study passes through, if it is marked so.
    pub deidentify: Option<Arc<Rules>>,
    /// The enrolled subjects' patients, each with the research Consents its subject records name.
    subjects: HashMap<String, Vec<String>>,
}

/// A research Consent: its patient, the study it names (if any) and its rules.
#[derive(Debug)]
pub struct ResearchConsent {
    patient: String,
    study: Option<String>,
    rule: Rule,
}

/// Where a caller stands towards research, for one request.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Standing {
    /// Not on any study's team, and no research purpose stated: the ordinary rules apply.
    #[default]
    Clinical,
    /// Reading for this study (`HRESCH`, and on its team).
    Study(String),
    /// A team member without `HRESCH`, or `HRESCH` outside any study of theirs: no patient's
    /// data at all.
    Barred,
}

/// The research part of a consent book.
#[derive(Debug, Default)]
pub struct Research {
    studies: BTreeMap<String, Study>,
    consents: HashMap<String, ResearchConsent>,
}

/// Whether a Consent is a research Consent (`scope` `research`).
pub fn is_research(consent: &Json) -> bool {
    consent.items(&["scope", "coding"]).any(|c| c.str_at(&["code"]) == Some(SCOPE))
}

fn id_of<'a>(reference: Option<&'a str>, rtype: &str) -> Option<&'a str> {
    reference?.rsplit_once('/').filter(|(t, _)| t.rsplit('/').next() == Some(rtype)).map(|(_, id)| id)
}

/// A study's de-identification rules. Rules that do not parse leave the study with the
/// built-in Safe Harbor set, never with none.
fn deidentify(study: &Json) -> Option<Rules> {
    let x = study.items(&["extension"]).find(|x| x.str_at(&["url"]) == Some(DEIDENTIFY_EXTENSION))?;
    let rules: Vec<&str> = x
        .items(&["extension"])
        .filter(|r| r.str_at(&["url"]) == Some("rule"))
        .filter_map(|r| r.str_at(&["valueString"]))
        .collect();
    if rules.is_empty() {
        return Some(Rules::safe_harbor());
    }
    let name = x
        .items(&["extension"])
        .find(|r| r.str_at(&["url"]) == Some("name"))
        .and_then(|r| r.str_at(&["valueString"]))
        .unwrap_or("study-specific de-identification rules");
    Some(Rules::parse(name, &rules).unwrap_or_else(|_| Rules::safe_harbor()))
}

impl Research {
    pub fn add_study(&mut self, id: &str, v: &Json) {
        let mut team: Vec<String> = v.get("principalInvestigator").and_then(reference_key).into_iter().collect();
        for x in v.items(&["extension"]).filter(|x| x.str_at(&["url"]) == Some(TEAM_EXTENSION)) {
            team.extend(x.get("valueReference").and_then(reference_key));
        }
        let open = v.str_at(&["status"]).is_some_and(|s| !CLOSED.contains(&s));
        let study = self.studies.entry(id.to_string()).or_default();
        study.team = team;
        study.open = open;
        study.deidentify = deidentify(v).map(Arc::new);
    }

    pub fn add_subject(&mut self, v: &Json) {
        let enrolled = v.str_at(&["status"]).is_some_and(|s| ENROLLED.contains(&s));
        let study = id_of(v.str_at(&["study", "reference"]), "ResearchStudy");
        let patient = id_of(v.str_at(&["individual", "reference"]), "Patient");
        let consent = id_of(v.str_at(&["consent", "reference"]), "Consent");
        if let (true, Some(s), Some(p), Some(c)) = (enrolled, study, patient, consent) {
            let subjects = &mut self.studies.entry(s.to_string()).or_default().subjects;
            subjects.entry(p.to_string()).or_default().push(c.to_string());
        }
    }

    pub fn add_consent(&mut self, id: &str, patient: &str, v: &Json) {
        let study = v
            .items(&["extension"])
            .find(|x| x.str_at(&["url"]) == Some(STUDY_EXTENSION))
            .and_then(|x| id_of(x.str_at(&["valueReference", "reference"]), "ResearchStudy"))
            .map(str::to_string);
        let rule = Rule { id: id.to_string(), root: root_provision(v) };
        self.consents.insert(id.to_string(), ResearchConsent { patient: patient.to_string(), study, rule });
    }

    /// Where a caller acting as `actors` stands, stating `purpose` and naming `requested`
    /// (`X-Research-Study`); an error when a team member of several studies names none.
    pub fn standing(
        &self,
        actors: &[String],
        purpose: Option<&str>,
        requested: Option<&str>,
    ) -> Result<Standing, String> {
        let mine: Vec<&String> =
            self.studies.iter().filter(|(_, s)| s.team.iter().any(|t| actors.contains(t))).map(|(id, _)| id).collect();
        if purpose != Some(RESEARCH) {
            return Ok(if mine.is_empty() { Standing::Clinical } else { Standing::Barred });
        }
        let requested = requested.map(|r| r.strip_prefix("ResearchStudy/").unwrap_or(r));
        Ok(match (requested, mine.as_slice()) {
            (Some(r), _) if mine.iter().any(|m| *m == r) => Standing::Study(r.to_string()),
            (Some(_), _) | (None, []) => Standing::Barred,
            (None, [one]) => Standing::Study((*one).clone()),
            (None, many) => {
                let names = many.iter().map(|m| format!("ResearchStudy/{m}")).collect::<Vec<_>>().join(", ");
                return Err(format!(
                    "you work on {names}: name the study this request is for with the X-Research-Study header"
                ));
            }
        })
    }

    /// The study's decision on `patient`'s data: permit only while the patient is enrolled and
    /// a research Consent of theirs that the enrolment names permits the request.
    pub fn decide(&self, study: &str, patient: &str, r: &Request) -> Decision {
        let Some(s) = self.studies.get(study).filter(|s| s.open) else { return Decision::Deny };
        let mut out = Decision::Deny;
        for id in s.subjects.get(patient).into_iter().flatten() {
            let Some(c) = self.consents.get(id) else { continue };
            if c.patient != patient || c.study.as_deref().is_some_and(|cs| cs != study) {
                continue;
            }
            match c.rule.root.decide(r, None) {
                Some(Decision::Deny) => return Decision::Deny,
                Some(Decision::Permit) => out = Decision::Permit,
                None => {}
            }
        }
        out
    }

    /// The de-identification of `study`'s reads, if it receives de-identified data only.
    pub fn deidentify(&self, study: &str) -> Option<Arc<Rules>> {
        self.studies.get(study).and_then(|s| s.deidentify.clone())
    }

    /// The patients enrolled in `study` now (whatever their Consents say).
    pub fn enrolled(&self, study: &str) -> impl Iterator<Item = &str> {
        self.studies.get(study).into_iter().flat_map(|s| s.subjects.keys().map(String::as_str))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn research() -> Research {
        let mut r = Research::default();
        r.add_study(
            "s1",
            &Json::from(json!({"status": "active", "principalInvestigator": {"reference": "Practitioner/pi"},
                "extension": [{"url": TEAM_EXTENSION, "valueReference": {"identifier": {"system": "urn:fhir-ledger:client", "value": "etl"}}}]})),
        );
        r.add_study(
            "s2",
            &Json::from(json!({"status": "active", "principalInvestigator": {"reference": "Practitioner/other"}})),
        );
        r.add_subject(&Json::from(json!({"status": "on-study", "study": {"reference": "ResearchStudy/s1"},
            "individual": {"reference": "Patient/p"}, "consent": {"reference": "Consent/c"}})));
        r.add_consent(
            "c",
            "p",
            &Json::from(json!({"provision": {"type": "permit", "purpose": [{"code": "HRESCH"}],
                "class": [{"code": "Observation"}], "dataPeriod": {"start": "2000-01-01", "end": "2010-01-01"}}})),
        );
        r
    }

    fn req(rtype: &str, year: i64) -> Request<'static> {
        let at = (year - 1970) * 365 * 86_400_000;
        Request {
            actors: &[],
            purpose: Some(RESEARCH),
            action: "access",
            rtype: Box::leak(rtype.to_string().into_boxed_str()),
            id: "x",
            labels: &[],
            date_ms: Some((at, at + 1)),
            now_ms: 0,
        }
    }

    #[test]
    fn standing_needs_the_purpose_and_a_study_of_ones_own() {
        let r = research();
        let pi = vec!["Practitioner/pi".to_string()];
        let etl = vec!["client:etl".to_string()];
        let doc = vec!["Practitioner/doc".to_string()];
        assert_eq!(r.standing(&pi, Some(RESEARCH), None), Ok(Standing::Study("s1".into())));
        assert_eq!(r.standing(&etl, Some(RESEARCH), Some("ResearchStudy/s1")), Ok(Standing::Study("s1".into())));
        assert_eq!(r.standing(&pi, None, None), Ok(Standing::Barred));
        assert_eq!(r.standing(&pi, Some(RESEARCH), Some("s2")), Ok(Standing::Barred));
        assert_eq!(r.standing(&doc, None, None), Ok(Standing::Clinical));
        assert_eq!(r.standing(&doc, Some(RESEARCH), None), Ok(Standing::Barred));
        let both = vec!["Practitioner/pi".to_string(), "Practitioner/other".to_string()];
        assert!(r.standing(&both, Some(RESEARCH), None).is_err());
    }

    #[test]
    fn the_enrolment_and_its_consent_decide_class_and_period() {
        let r = research();
        assert_eq!(r.decide("s1", "p", &req("Observation", 2005)), Decision::Permit);
        assert_eq!(r.decide("s1", "p", &req("Observation", 2015)), Decision::Deny, "outside the data period");
        assert_eq!(r.decide("s1", "p", &req("Condition", 2005)), Decision::Deny, "a class not consented");
        assert_eq!(r.decide("s1", "q", &req("Observation", 2005)), Decision::Deny, "not enrolled");
        assert_eq!(r.decide("s2", "p", &req("Observation", 2005)), Decision::Deny, "another study");
    }
}
