//! What a caller may see, decided per resource over the search index: scopes (type,
//! `patient/` compartment, v2 query restrictions) and then the patient's Consents. Searches
//! filter with it before they count, page or include, and reads ask it before they answer, so
//! a hidden resource is indistinguishable from a missing one.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::scopes::{Context, Perm};
use super::Caller;
use crate::config::ConsentDefault;
use crate::consent::{Book, Decision, Request};
use crate::error::FhirError;
use crate::search::index::{Doc, DocKey, Index};
use crate::search::values::Value;
use crate::search::Compartments;

/// A caller and what its visibility depends on, for one request.
pub struct Access<'a> {
    pub caller: &'a Caller,
    pub books: &'a crate::consent::Books,
    pub default: ConsentDefault,
}

/// Break-the-glass: a stated purpose of emergency treatment overrides Consent denials.
pub const BREAK_THE_GLASS: &str = "ETREAT";

/// How a v2 query restriction (`patient/Observation.rs?category=...`) is checked for a
/// document: by its key in the set the restriction matched (the current version), not at
/// all (a body about to be written: the restriction speaks of what is stored), or as not
/// satisfied (an older version, which the restriction's search never saw).
#[derive(Clone, Copy, Debug)]
pub enum Restriction {
    Key(DocKey),
    Unchecked,
    Unknown,
}

pub struct Guard<'c> {
    caller: &'c Caller,
    book: Arc<Book>,
    default: ConsentDefault,
    /// Per scope of the caller (same order): the documents its query restriction admits.
    restricted: Vec<Option<BTreeSet<(String, DocKey)>>>,
    /// The CareTeams the user belongs to, and the other references they act as.
    actors: Vec<String>,
    /// Set when a Consent denial was overridden by break-the-glass.
    pub broke_glass: AtomicBool,
    /// Set when a Consent (or the opt-in default) hid something.
    pub consent_hid: AtomicBool,
    action: &'static str,
    now_ms: i64,
}

/// The patients a resource belongs to (its patient compartment memberships).
pub fn patients_of(comps: &Compartments, rtype: &str, doc: &Doc) -> Vec<String> {
    patient_ids(comps, rtype, doc).into_iter().map(str::to_string).collect()
}

fn patient_ids<'d>(comps: &Compartments, rtype: &str, doc: &'d Doc) -> Vec<&'d str> {
    if rtype == "Patient" {
        return vec![doc.id.as_str()];
    }
    let mut out: Vec<&str> = Vec::new();
    for code in comps.patient_params(rtype) {
        for v in doc.get(code) {
            if let Value::Ref { rtype: Some(t), id: Some(id), .. } = v {
                if t == "Patient" && !out.contains(&id.as_str()) {
                    out.push(id);
                }
            }
        }
    }
    out
}

fn labels(doc: &Doc) -> Vec<&str> {
    doc.get("_security")
        .iter()
        .filter_map(|v| match v {
            Value::Token { code: Some(c), .. } => Some(c.as_str()),
            _ => None,
        })
        .collect()
}

fn date_of(doc: &Doc) -> (i64, i64) {
    doc.get("date")
        .iter()
        .find_map(|v| match v {
            Value::Date { lo, hi } => Some((*lo, *hi)),
            _ => None,
        })
        .unwrap_or((doc.last_updated_ms, doc.last_updated_ms + 1))
}

impl<'c> Guard<'c> {
    /// A guard for `caller` over `idx`; `restrict` evaluates a scope's query restriction
    /// into the documents it admits (a search without the guard).
    pub fn new(
        caller: &'c Caller,
        idx: &Index,
        book: Arc<Book>,
        default: ConsentDefault,
        write: bool,
        mut restrict: impl FnMut(&str, &[(String, String)]) -> Result<Vec<DocKey>, FhirError>,
    ) -> Result<Self, FhirError> {
        let mut restricted = Vec::with_capacity(caller.scopes.len());
        for s in caller.scopes.iter() {
            if s.query.is_empty() {
                restricted.push(None);
                continue;
            }
            let types: Vec<String> =
                if s.rtype == "*" { idx.types.keys().cloned().collect() } else { vec![s.rtype.clone()] };
            let mut set = BTreeSet::new();
            for t in types {
                // A restriction that does not parse for a type admits nothing of it.
                if let Ok(keys) = restrict(&t, &s.query) {
                    set.extend(keys.into_iter().map(|k| (t.clone(), k)));
                }
            }
            restricted.push(Some(set));
        }
        let mut actors = Vec::new();
        if let Some((t, id)) = &caller.user {
            let me = format!("{t}/{id}");
            if let Some(teams) = idx.of("CareTeam") {
                for (_, d) in teams
                    .postings
                    .get("participant")
                    .and_then(|p| p.get(&me))
                    .into_iter()
                    .flatten()
                    .filter_map(|k| teams.docs.get_key_value(k))
                {
                    actors.push(format!("CareTeam/{}", d.id));
                }
            }
            actors.push(me);
        }
        if let Some(a) = &caller.client_actor {
            actors.push(a.clone());
        }
        actors.push(format!("client:{}", caller.claims.client_id));
        Ok(Self {
            caller,
            book,
            default,
            restricted,
            actors,
            broke_glass: AtomicBool::new(false),
            consent_hid: AtomicBool::new(false),
            action: if write { "correct" } else { "access" },
            now_ms: crate::fhir::now_ms(),
        })
    }

    /// Whether the caller may see this resource: some scope granting `r` or `s` on its type
    /// admits it (compartment, query restriction), and the patient's Consents permit it.
    pub fn visible(&self, comps: &Compartments, rtype: &str, key: DocKey, doc: &Doc) -> bool {
        self.admits(comps, rtype, Restriction::Key(key), doc, None)
    }

    /// Whether some scope granting `perm` (`None`: reading, `r` or `s`) admits `doc` and the
    /// patients' Consents permit it. Reading follows the R4 compartment: a resource of a
    /// patient type is the caller's when it references the caller's patient. Writing with a
    /// `patient/` scope is stricter: every patient the resource belongs to must be the
    /// caller's, and a resource of no patient cannot be written.
    pub fn admits(
        &self,
        comps: &Compartments,
        rtype: &str,
        restriction: Restriction,
        doc: &Doc,
        perm: Option<Perm>,
    ) -> bool {
        if self.caller.unrestricted {
            return true;
        }
        let patients = patient_ids(comps, rtype, doc);
        // A resource of no patient is shared (Practitioner, Medication, a Device assigned to
        // nobody) unless its type is in the Patient compartment, where it belongs to nobody.
        let shared = patients.is_empty() && rtype != "Patient" && !comps.patient.contains_key(rtype);
        let mine = |p: &str| self.caller.patient() == Some(p);
        let by_scope = self.caller.scopes.iter().enumerate().any(|(i, s)| {
            let granted = match perm {
                None => s.allows(Perm::R) || s.allows(Perm::S),
                Some(p) => s.allows(p),
            };
            let in_context = match (s.context, perm) {
                (Context::Patient, None) => shared || patients.iter().any(|p| mine(p)),
                (Context::Patient, Some(_)) => !patients.is_empty() && patients.iter().all(|p| mine(p)),
                _ => true,
            };
            let restricted = match (&self.restricted[i], restriction) {
                (None, _) | (Some(_), Restriction::Unchecked) => true,
                (Some(set), Restriction::Key(k)) => set.contains(&(rtype.to_string(), k)),
                (Some(_), Restriction::Unknown) => false,
            };
            s.covers(rtype) && granted && in_context && restricted
        });
        by_scope && self.consents(rtype, doc, &patients)
    }

    fn consents(&self, rtype: &str, doc: &Doc, patients: &[&str]) -> bool {
        // The opt-in default withholds disclosure; it does not stop a writer the scopes allow
        // (an EHR recording care): only a Consent's explicit `correct` provision does.
        let default = match (self.default, self.action) {
            (ConsentDefault::OptIn, "access") => Decision::Deny,
            _ => Decision::Permit,
        };
        for &p in patients {
            if self.caller.is_patient(p) {
                continue;
            }
            // A patient-launched app acts on the patient's own approval (its grant Consent),
            // for the user who approved it only.
            if self.caller.claims.consent.is_some() && self.caller.patient() == Some(p) && self.caller.is_patient(p) {
                continue;
            }
            let decision = if self.book.rules(p).is_empty() {
                default
            } else {
                let labels = labels(doc);
                let req = Request {
                    actors: &self.actors,
                    purpose: self.caller.purpose.as_deref(),
                    action: self.action,
                    rtype,
                    id: &doc.id,
                    labels: &labels,
                    date_ms: Some(date_of(doc)),
                    now_ms: self.now_ms,
                };
                self.book.decide(p, &req).unwrap_or(default)
            };
            if decision == Decision::Deny {
                // Break-the-glass is a clinician's act: patients and their proxies cannot.
                let clinician =
                    self.caller.user.as_ref().is_some_and(|(t, _)| t == "Practitioner" || t == "PractitionerRole");
                if self.caller.purpose.as_deref() == Some(BREAK_THE_GLASS) && clinician {
                    self.broke_glass.store(true, Ordering::Relaxed);
                    continue;
                }
                self.consent_hid.store(true, Ordering::Relaxed);
                return false;
            }
        }
        true
    }
}

/// Which patient compartment each `Type/id` of a page belongs to, for the disclosure log.
pub fn patients_by_hit(
    idx: &Index,
    comps: &Compartments,
    hits: &[(String, String)],
) -> HashMap<(String, String), Vec<String>> {
    let mut out = HashMap::new();
    for (t, id) in hits {
        if let Some((_, doc)) = idx.of(t).and_then(|d| d.doc(id)) {
            out.insert((t.clone(), id.clone()), patients_of(comps, t, doc));
        }
    }
    out
}
