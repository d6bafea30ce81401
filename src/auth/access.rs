//! What a caller may see, decided per resource over the search index: scopes (type,
//! `patient/` compartment, v2 query restrictions) and then the patient's Consents. Searches
//! filter with it before they count, page or include, and reads ask it before they answer, so
//! a hidden resource is indistinguishable from a missing one.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::scopes::{Context, Perm};
use super::Caller;
use crate::config::ConsentDefault;
use crate::consent::research::Standing;
use crate::consent::{Book, Decision, Request};
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::search::index::{Doc, DocKey, Engine, Index};
use crate::search::query::Filter;
use crate::search::values::Value;
use crate::search::{Compartments, Found, Visibility};

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
    comps: &'c Compartments,
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

impl Visibility for Guard<'_> {
    /// Some scope granting `r` or `s` on the type admits the resource (compartment, query
    /// restriction), and the patient's Consents permit it.
    fn visible(&self, rtype: &str, key: DocKey, doc: &Doc) -> bool {
        self.admits(rtype, Restriction::Key(key), doc, None)
    }
}

impl<'c> Guard<'c> {
    /// A guard for `caller` over `idx`; `restrict` evaluates a scope's query restriction
    /// into the documents it admits (a search without the guard).
    pub fn new(
        caller: &'c Caller,
        comps: &'c Compartments,
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
                if s.rtype == "*" { idx.type_names().map(str::to_string).collect() } else { vec![s.rtype.clone()] };
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
            let teams = idx.of("CareTeam");
            for k in teams.posting("participant", &me)? {
                if let Some(d) = teams.get(k)? {
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
            comps,
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

    /// Whether some scope of the caller carries a query restriction, so that [`Guard::admits`]
    /// needs the document's key in the current index.
    pub fn restricts(&self) -> bool {
        self.restricted.iter().any(Option::is_some)
    }

    /// Whether some scope granting `perm` (`None`: reading, `r` or `s`) admits `doc` and the
    /// patients' Consents permit it. Reading follows the R4 compartment: a resource of a
    /// patient type is the caller's when it references the caller's patient. Writing with a
    /// `patient/` scope is stricter: every patient the resource belongs to must be the
    /// caller's, and a resource of no patient cannot be written.
    pub fn admits(&self, rtype: &str, restriction: Restriction, doc: &Doc, perm: Option<Perm>) -> bool {
        if self.caller.unrestricted {
            return true;
        }
        let patients = self.comps.patient_ids(rtype, doc);
        // A resource of no patient is shared (Practitioner, Medication, a Device assigned to
        // nobody) unless its type is in the Patient compartment, where it belongs to nobody.
        let shared = patients.is_empty() && rtype != "Patient" && !self.comps.patient.contains_key(rtype);
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
            // A client confined to consented patients gets nothing by default.
            let default = if self.caller.consent_required { Decision::Deny } else { default };
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
            let decision = match &self.caller.research {
                Standing::Clinical if self.book.rules(p).is_empty() => default,
                Standing::Clinical => self.book.decide(p, &req).unwrap_or(default),
                Standing::Barred => Decision::Deny,
                // Research reads only, permitted by the study's Consent and denied by none.
                Standing::Study(_) if self.action != "access" => Decision::Deny,
                Standing::Study(study) => match self.book.decide(p, &req) {
                    Some(Decision::Deny) => Decision::Deny,
                    _ => self.book.research.decide(study, p, &req),
                },
            };
            if decision == Decision::Deny {
                // Break-the-glass is a clinician's act: patients, their proxies and research cannot.
                let clinician =
                    self.caller.user.as_ref().is_some_and(|(t, _)| t == "Practitioner" || t == "PractitionerRole");
                let clinical = self.caller.research == Standing::Clinical;
                if self.caller.purpose.as_deref() == Some(BREAK_THE_GLASS) && clinician && clinical {
                    self.broke_glass.store(true, Relaxed);
                    continue;
                }
                self.consent_hid.store(true, Relaxed);
                return false;
            }
        }
        true
    }
}

/// What a guarded read or search disclosed and withheld, for the disclosure log.
#[derive(Default, Debug)]
pub struct Disclosed {
    /// The patients each returned resource belongs to, by `(type, id)`.
    pub patients: HashMap<(String, String), Vec<String>>,
    pub broke_glass: bool,
    pub consent_hid: bool,
    /// For a single resource: the leaf of the current version the index holds.
    pub leaf: Option<u64>,
}

/// What an access decision is about: the live resource as the index holds it, or a body (a
/// stored version that is not the current one, or what a write would leave).
#[derive(Clone, Copy)]
pub enum Subject<'a> {
    Current(&'a str),
    Body { id: &'a str, version: u64, body: &'a Json, restriction: Restriction },
}

/// Whether the caller may read the live `rtype/id` (for a read outside a search).
pub fn visible(engine: &Engine, access: &Access<'_>, rtype: &str, id: &str) -> Result<(bool, Disclosed), FhirError> {
    admits(engine, access, rtype, Subject::Current(id), None)
}

/// Whether the caller's scopes and the patients' Consents admit `subject` for `perm`
/// (`None`: reading). A live resource missing from the index is not admitted.
pub fn admits(
    engine: &Engine,
    access: &Access<'_>,
    rtype: &str,
    subject: Subject<'_>,
    perm: Option<Perm>,
) -> Result<(bool, Disclosed), FhirError> {
    let idx = engine.current()?;
    let guard = guard_for(engine, &idx, access, perm.is_some())?;
    let (id, restriction, doc, leaf) = match subject {
        Subject::Current(id) => {
            let Some((key, doc)) = idx.of(rtype).doc(id)? else {
                return Ok((false, Disclosed::default()));
            };
            let leaf = doc.leaf;
            (id, Restriction::Key(key), doc, Some(leaf))
        }
        Subject::Body { id, version, body, restriction } => {
            (id, restriction, Arc::new(engine.doc_of(&idx.registry, rtype, id, version, body)), None)
        }
    };
    let ok = guard.admits(rtype, restriction, &doc, perm);
    let mut d = Disclosed {
        broke_glass: guard.broke_glass.load(Relaxed),
        consent_hid: guard.consent_hid.load(Relaxed),
        leaf,
        ..Default::default()
    };
    d.patients.insert((rtype.to_string(), id.to_string()), engine.compartments().patients_of(rtype, &doc));
    Ok((ok, d))
}

/// The guard of `access`'s caller over `idx`, for reading (`write` false) or writing; it
/// borrows nothing of `idx`, so a long reader (a Bulk export) may let the index go between
/// batches and keep one guard, with the Consents as they were when it began.
pub fn guard_for<'c>(
    engine: &'c Engine,
    idx: &Index,
    access: &Access<'c>,
    write: bool,
) -> Result<Guard<'c>, FhirError> {
    let book = access.books.get(engine.repo(), idx)?;
    Guard::new(access.caller, engine.compartments(), idx, book, access.default, write, |t, q| {
        crate::search::matching(engine, idx, t, q)
    })
}

/// Runs a search (see [`crate::search::run`]) as `access`'s caller, when given: what the
/// caller may not see is neither matched, counted nor included.
#[allow(clippy::too_many_arguments)]
pub fn search(
    engine: &Engine,
    base: &str,
    types: &[String],
    params: &[(String, String)],
    lenient: bool,
    extra: Option<Filter>,
    access: Option<&Access<'_>>,
) -> Result<(Found, Disclosed), FhirError> {
    let idx = engine.current()?;
    let Some(access) = access else {
        let found = crate::search::run(engine, &idx, base, types, params, lenient, extra, None)?;
        return Ok((found, Disclosed::default()));
    };
    let guard = guard_for(engine, &idx, access, false)?;
    let mut found = crate::search::run(engine, &idx, base, types, params, lenient, extra, Some(&guard))?;
    let d = Disclosed {
        patients: std::mem::take(&mut found.patients),
        broke_glass: guard.broke_glass.load(Relaxed),
        consent_hid: guard.consent_hid.load(Relaxed),
        leaf: None,
    };
    Ok((found, d))
}
