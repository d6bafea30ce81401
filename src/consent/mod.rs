//! The consent engine: a patient's active `Consent` resources, read from the ledger, decide
//! whether a caller may see a resource of that patient.
//!
//! A Consent's root provision and its nested provisions each apply when all their conditions
//! hold (actor, purpose, class, security label, data period, data, action, period). The
//! deepest applying provision decides (nested provisions are exceptions to their parent);
//! across a patient's Consents, deny wins over permit; where none applies, the configured
//! default (opt-out: permit, opt-in: deny).

pub mod research;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::fhir::json::{self, Json};

use crate::error::FhirError;
use crate::repo::Repo;

/// The extension on a grant Consent that records the scopes the patient approved.
pub const SCOPES_EXTENSION: &str = "urn:fhir-ledger:StructureDefinition/smart-scopes";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Permit,
    Deny,
}

#[derive(Debug, Default)]
pub(crate) struct Provision {
    kind: Option<Decision>,
    period: Option<(i64, i64)>,
    actors: Vec<String>,
    purposes: Vec<String>,
    classes: Vec<String>,
    labels: Vec<String>,
    data_period: Option<(i64, i64)>,
    data: Vec<String>,
    actions: Vec<String>,
    children: Vec<Provision>,
    /// Every actor must be among the caller's (a grant Consent: the app *and* the user who
    /// approved it), not any one of them.
    all_actors: bool,
}

/// One active Consent of a patient.
#[derive(Debug)]
pub struct Rule {
    pub id: String,
    pub(crate) root: Provision,
}

/// What a decision is about.
pub struct Request<'a> {
    /// Every reference the caller acts as: `Practitioner/1`, `Organization/2`,
    /// `client:<client_id>`, and the CareTeams the user belongs to (`CareTeam/3`).
    pub actors: &'a [String],
    pub purpose: Option<&'a str>,
    /// `access` for reads and searches, `correct` for writes.
    pub action: &'a str,
    pub rtype: &'a str,
    pub id: &'a str,
    /// Security label codes of the resource.
    pub labels: &'a [&'a str],
    /// The clinically relevant time of the resource (its `date`, else last update).
    pub date_ms: Option<(i64, i64)>,
    pub now_ms: i64,
}

fn period(v: Option<&Json>) -> Option<(i64, i64)> {
    let v = v?;
    let lo = v.str_at(&["start"]).and_then(crate::fhir::date_range_ms).map_or(i64::MIN, |r| r.0);
    let hi = v.str_at(&["end"]).and_then(crate::fhir::date_range_ms).map_or(i64::MAX, |r| r.1);
    Some((lo, hi))
}

/// The codes of a list of Codings or CodeableConcepts.
fn codes<'a>(list: impl Iterator<Item = &'a Json>) -> Vec<String> {
    let mut out = Vec::new();
    for item in list {
        out.extend(item.str_at(&["code"]).map(String::from));
        out.extend(item.items(&["coding"]).filter_map(|c| c.str_at(&["code"])).map(String::from));
    }
    out
}

pub(crate) fn reference_key(r: &Json) -> Option<String> {
    if let Some(s) = r.str_at(&["reference"]) {
        let s = s.rsplit('/').take(2).collect::<Vec<_>>();
        if let [id, t] = s.as_slice() {
            return Some(format!("{t}/{id}"));
        }
    }
    if r.str_at(&["identifier", "system"]) == Some("urn:fhir-ledger:client") {
        return r.str_at(&["identifier", "value"]).map(|v| format!("client:{v}"));
    }
    None
}

fn provision(v: &Json) -> Provision {
    Provision {
        kind: match v.str_at(&["type"]) {
            Some("permit") => Some(Decision::Permit),
            Some("deny") => Some(Decision::Deny),
            _ => None,
        },
        period: period(v.get("period")),
        actors: v.items(&["actor"]).filter_map(|a| a.get("reference").and_then(reference_key)).collect(),
        purposes: codes(v.items(&["purpose"])),
        classes: codes(v.items(&["class"])),
        labels: codes(v.items(&["securityLabel"])),
        data_period: period(v.get("dataPeriod")),
        data: v.items(&["data"]).filter_map(|d| d.get("reference").and_then(reference_key)).collect(),
        actions: codes(v.items(&["action"])),
        children: v.items(&["provision"]).map(provision).collect(),
        all_actors: false,
    }
}

/// A Consent's root provision. The grant Consents the authorization server writes when a
/// patient approves an app (marked by the scopes extension) name the app and the approving
/// user; they apply only to that user through that app, never to every user of the app.
pub(crate) fn root_provision(consent: &Json) -> Provision {
    fn require_all(p: &mut Provision) {
        p.all_actors = true;
        p.children.iter_mut().for_each(require_all);
    }
    let mut root = provision(consent.get("provision").unwrap_or(&Json::Null));
    let grant = consent.items(&["extension"]).any(|x| x.str_at(&["url"]) == Some(SCOPES_EXTENSION));
    if grant {
        require_all(&mut root);
    }
    root
}

fn overlaps(a: (i64, i64), b: (i64, i64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Provision {
    fn applies(&self, r: &Request) -> bool {
        (self.period.is_none_or(|p| p.0 <= r.now_ms && r.now_ms < p.1))
            && (self.actors.is_empty()
                || if self.all_actors {
                    self.actors.iter().all(|a| r.actors.contains(a))
                } else {
                    self.actors.iter().any(|a| r.actors.contains(a))
                })
            && (self.purposes.is_empty() || r.purpose.is_some_and(|p| self.purposes.iter().any(|x| x == p)))
            && (self.classes.is_empty() || self.classes.iter().any(|c| c == r.rtype))
            && (self.labels.is_empty() || self.labels.iter().any(|l| r.labels.contains(&l.as_str())))
            && (self.data_period.is_none_or(|p| r.date_ms.is_some_and(|d| overlaps(p, d))))
            && (self.data.is_empty() || self.data.iter().any(|d| *d == format!("{}/{}", r.rtype, r.id)))
            && (self.actions.is_empty()
                || self.actions.iter().any(|a| a == r.action || (r.action == "access" && a == "use")))
    }

    /// The decision of the deepest applying provision under this one (`inherited` when only
    /// this one applies and it states no type).
    pub(crate) fn decide(&self, r: &Request, inherited: Option<Decision>) -> Option<Decision> {
        if !self.applies(r) {
            return None;
        }
        let here = self.kind.or(inherited);
        let mut child: Option<Decision> = None;
        for c in &self.children {
            match c.decide(r, here) {
                Some(Decision::Deny) => return Some(Decision::Deny),
                Some(Decision::Permit) => child = Some(Decision::Permit),
                None => {}
            }
        }
        child.or(here)
    }
}

/// The active Consents of every patient, rebuilt when a Consent changes.
#[derive(Default)]
pub struct Book {
    by_patient: HashMap<String, Vec<Rule>>,
    /// Studies, enrolments and research Consents (which are not in `by_patient`).
    pub research: research::Research,
}

impl Book {
    /// `None` when no Consent of the patient speaks to this request.
    pub fn decide(&self, patient: &str, r: &Request) -> Option<Decision> {
        let mut out = None;
        for rule in self.by_patient.get(patient).into_iter().flatten() {
            match rule.root.decide(r, None) {
                Some(Decision::Deny) => return Some(Decision::Deny),
                Some(Decision::Permit) => out = Some(Decision::Permit),
                None => {}
            }
        }
        out
    }

    pub fn rules(&self, patient: &str) -> &[Rule] {
        self.by_patient.get(patient).map_or(&[], Vec::as_slice)
    }
}

/// Keeps the current [`Book`], keyed by the Consent documents' change count in the index.
#[derive(Default)]
pub struct Books {
    current: Mutex<Option<(u64, Arc<Book>)>>,
}

impl Books {
    pub fn get(&self, repo: &Repo, idx: &crate::search::index::Index) -> Result<Arc<Book>, FhirError> {
        let docs = idx.of("Consent");
        // Research access also turns on studies and enrolments.
        let stamp = docs.changes() + idx.of("ResearchStudy").changes() + idx.of("ResearchSubject").changes();
        if let Some((s, b)) = self.current.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            if *s == stamp {
                return Ok(b.clone());
            }
        }
        let mut book = Book::default();
        for_each_current(repo, idx, "Consent", |id, v| {
            if v.str_at(&["status"]) != Some("active") {
                return;
            }
            let Some(patient) = v.str_at(&["patient", "reference"]).and_then(|r| r.strip_prefix("Patient/")) else {
                return;
            };
            if research::is_research(v) {
                book.research.add_consent(id, patient, v);
                return;
            }
            let rule = Rule { id: id.to_string(), root: root_provision(v) };
            book.by_patient.entry(patient.to_string()).or_default().push(rule);
        })?;
        for_each_current(repo, idx, "ResearchStudy", |id, v| book.research.add_study(id, v))?;
        for_each_current(repo, idx, "ResearchSubject", |_, v| book.research.add_subject(v))?;
        let book = Arc::new(book);
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some((stamp, book.clone()));
        Ok(book)
    }
}

/// Calls `f` with the id and current body of every live resource of `rtype`.
fn for_each_current(
    repo: &Repo,
    idx: &crate::search::index::Index,
    rtype: &str,
    mut f: impl FnMut(&str, &Json),
) -> Result<(), FhirError> {
    for item in idx.of(rtype).scan(0) {
        let (_, d) = item?;
        let s = repo.vread(rtype, &d.id, d.version)?;
        let Some(body) = s.body.as_deref() else { continue };
        let v = json::parse(body.as_bytes(), usize::MAX).map_err(FhirError::internal)?;
        f(&d.id, &v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn req<'a>(actors: &'a [String], rtype: &'a str, labels: &'a [&'a str], purpose: Option<&'a str>) -> Request<'a> {
        Request { actors, purpose, action: "access", rtype, id: "1", labels, date_ms: None, now_ms: 1_000 }
    }

    fn book(consents: &[Value]) -> Book {
        let mut b = Book::default();
        for (i, c) in consents.iter().enumerate() {
            b.by_patient
                .entry("p".into())
                .or_default()
                .push(Rule { id: i.to_string(), root: root_provision(&Json::from(c.clone())) });
        }
        b
    }

    #[test]
    fn deny_for_one_practitioner_inside_a_permit() {
        let b = book(&[json!({"provision": {"type": "permit", "provision": [
            {"type": "deny", "actor": [{"reference": {"reference": "Practitioner/1"}}]}]}})]);
        let p1 = vec!["Practitioner/1".to_string()];
        let p2 = vec!["Practitioner/2".to_string()];
        assert_eq!(b.decide("p", &req(&p1, "Observation", &[], None)), Some(Decision::Deny));
        assert_eq!(b.decide("p", &req(&p2, "Observation", &[], None)), Some(Decision::Permit));
        assert_eq!(b.decide("q", &req(&p1, "Observation", &[], None)), None);
    }

    #[test]
    fn class_label_and_purpose_conditions() {
        let b = book(&[
            json!({"provision": {"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Condition"}]}}),
            json!({"provision": {"type": "deny", "securityLabel": [{"code": "R"}]}}),
            json!({"provision": {"type": "permit", "purpose": [{"code": "HRESCH"}]}}),
        ]);
        let a = vec!["Practitioner/9".to_string()];
        assert_eq!(b.decide("p", &req(&a, "Condition", &[], None)), Some(Decision::Deny));
        assert_eq!(b.decide("p", &req(&a, "Observation", &["R"], None)), Some(Decision::Deny));
        assert_eq!(b.decide("p", &req(&a, "Observation", &[], None)), None);
        assert_eq!(b.decide("p", &req(&a, "Observation", &[], Some("HRESCH"))), Some(Decision::Permit));
    }

    #[test]
    fn a_grant_consent_permits_only_its_user_through_its_app() {
        let b = book(&[json!({
            "extension": [{"url": SCOPES_EXTENSION, "valueString": "patient/*.rs"}],
            "provision": {"type": "permit", "actor": [
                {"reference": {"identifier": {"system": "urn:fhir-ledger:client", "value": "app"}}},
                {"reference": {"reference": "Patient/p"}}]}})]);
        let approver = vec!["Patient/p".to_string(), "client:app".to_string()];
        let other_user = vec!["Practitioner/9".to_string(), "client:app".to_string()];
        let other_app = vec!["Patient/p".to_string(), "client:other".to_string()];
        assert_eq!(b.decide("p", &req(&approver, "Observation", &[], None)), Some(Decision::Permit));
        assert_eq!(b.decide("p", &req(&other_user, "Observation", &[], None)), None);
        assert_eq!(b.decide("p", &req(&other_app, "Observation", &[], None)), None);
    }

    #[test]
    fn expired_provision_period_does_not_apply() {
        let b = book(&[json!({"provision": {"type": "deny", "period": {"end": "1969-01-01"}}})]);
        assert_eq!(b.decide("p", &req(&[], "Observation", &[], None)), None);
    }
}
