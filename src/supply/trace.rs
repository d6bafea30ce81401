//! A product's custody chain and what is wrong with it.
//!
//! The steps of an instance are the events naming it, plus, while it sat in a case or on a
//! pallet (from the aggregation that packed it to the one that unpacked it), the events of
//! that container, followed upwards. Walking them in event time keeps a custody state
//! (commissioned, who holds it, where it was shipped, whether it left circulation) and names
//! every step that breaks it:
//!
//! | finding | when |
//! | --- | --- |
//! | `never-commissioned` | no commissioning precedes the first step (an unknown serial) |
//! | `cloned-serial` | the instance is seen at a second partner while the first still holds it, or after it left circulation |
//! | `custody-gap` | it is received by a partner it was never shipped to (a diverted lot) |
//! | `dispensed`, `decommissioned`, `destroyed` | it left circulation |
//! | `recalled` | a `recalled` disposition on it, a container of it, or its lot |
//! | `event-altered` | the recorded event no longer hashes to the Event Hash ID it was signed under |
//! | `signature-invalid` | the partner's signature does not verify with the partner's keys |
//! | `unlicensed-partner` | the partner held no valid licence at the time of the step |
//!
//! Events declared in error (an error declaration with the same eventID) are shown but do not
//! move custody.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use super::certs::{self, Certificate, Status};
use super::directory::Directory;
use super::events::{self, Recorded};
use super::partners::Partner;
use super::EVENT_JWS_TYPE;
use crate::epcis::hash;
use crate::error::FhirError;
use crate::search::index::Engine;

/// How far up aggregations a trace follows (item → case → pallet → container).
const MAX_DEPTH: usize = 4;

#[derive(Clone, Debug)]
pub struct Finding {
    pub code: &'static str,
    pub message: String,
    /// The event it is about.
    pub event: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Step {
    pub rec: Recorded,
    /// The container whose event this is, when the instance was inside it.
    pub via: Option<String>,
    /// `Organization/{id}` of the partner owning the step's location (else the signer).
    pub party: Option<String>,
    /// How the record checks out now: `verified`, `token` (submitted with the partner's token,
    /// unsigned), or the failure.
    pub signature: &'static str,
    pub licence: (Status, Option<String>),
    pub declared: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Trace {
    pub subject: String,
    pub steps: Vec<Step>,
    pub findings: Vec<Finding>,
    pub commissioned: bool,
    pub lot: Option<String>,
    pub expiry: Option<String>,
    /// Instances (or units) packed into the subject and still inside at the end.
    pub children: Vec<String>,
}

impl Trace {
    pub fn has(&self, code: &str) -> bool {
        self.findings.iter().any(|f| f.code == code)
    }
}

/// What a trace looks up once per partner, certificate holder and location.
struct Lookups<'e> {
    engine: &'e Engine,
    directory: &'e Directory,
    partners: HashMap<String, Option<Partner>>,
    locations: HashMap<String, Option<Partner>>,
    certs: HashMap<String, Vec<Certificate>>,
}

impl Lookups<'_> {
    fn partner(&mut self, reference: &str) -> Result<Option<Partner>, FhirError> {
        if !self.partners.contains_key(reference) {
            let id = reference.strip_prefix("Organization/").unwrap_or(reference);
            let p = self.directory.partner(self.engine, id)?;
            self.partners.insert(reference.to_string(), p);
        }
        Ok(self.partners.get(reference).cloned().flatten())
    }

    fn location(&mut self, id: &str) -> Result<Option<Partner>, FhirError> {
        if !self.locations.contains_key(id) {
            let p = self.directory.by_location(self.engine, id)?;
            self.locations.insert(id.to_string(), p);
        }
        Ok(self.locations.get(id).cloned().flatten())
    }

    fn certs(&mut self, reference: &str) -> Result<&[Certificate], FhirError> {
        if !self.certs.contains_key(reference) {
            let c = self.directory.certs(self.engine, reference)?;
            self.certs.insert(reference.to_string(), c);
        }
        Ok(self.certs.get(reference).map_or(&[][..], Vec::as_slice))
    }
}

/// Collects the events of an instance and of its containers while it was inside them.
struct Gatherer<'a> {
    engine: &'a Engine,
    admit: &'a dyn Fn(&str) -> Result<bool, FhirError>,
    seen: BTreeSet<String>,
    out: Vec<(Recorded, Option<String>)>,
}

fn is_unpacking_all(r: &Recorded, parent: &str) -> bool {
    let f = &r.facts;
    r.declared.is_none()
        && f.event_type == "AggregationEvent"
        && f.action.as_deref() == Some("DELETE")
        && f.parent.as_deref() == Some(parent)
        && f.children.is_empty()
}

impl Gatherer<'_> {
    /// `own`: the events naming `id`; `window`: when they count; `via`: the container they
    /// belong to when `id` is one.
    fn gather(
        &mut self,
        id: &str,
        own: Vec<Recorded>,
        window: (i64, i64),
        via: Option<&str>,
        depth: usize,
    ) -> Result<(), FhirError> {
        // Packing windows: (container, from, until) from this id's aggregations.
        let mut open: HashMap<String, i64> = HashMap::new();
        let mut windows: Vec<(String, i64, i64)> = Vec::new();
        for r in &own {
            let f = &r.facts;
            if r.declared.is_some() || f.event_type != "AggregationEvent" || !f.children.iter().any(|c| c == id) {
                continue;
            }
            let Some(parent) = &f.parent else { continue };
            match f.action.as_deref() {
                Some("ADD") => {
                    open.insert(parent.clone(), f.time_ms);
                }
                Some("DELETE") => {
                    if let Some(from) = open.remove(parent) {
                        windows.push((parent.clone(), from, f.time_ms));
                    }
                }
                _ => {}
            }
        }
        windows.extend(open.into_iter().map(|(p, from)| (p, from, i64::MAX)));
        for r in own {
            if r.facts.time_ms >= window.0 && r.facts.time_ms < window.1 && self.seen.insert(r.provenance.clone()) {
                self.out.push((r, via.map(String::from)));
            }
        }
        if depth >= MAX_DEPTH {
            return Ok(());
        }
        for (parent, from, until) in windows {
            let theirs = events::naming(self.engine, &parent, self.admit)?;
            // An unpacking that names no children empties the container: it ends the window.
            let until = theirs
                .iter()
                .filter(|r| r.facts.time_ms > from && is_unpacking_all(r, &parent))
                .map(|r| r.facts.time_ms)
                .min()
                .map_or(until, |t| t.min(until));
            let w = (from.max(window.0), until.min(window.1));
            if w.0 < w.1 {
                // Events of the container strictly after the packing (which is ours), up to
                // and including the unpacking.
                self.gather(&parent, theirs, (w.0 + 1, w.1.saturating_add(1)), Some(&parent), depth + 1)?;
            }
        }
        Ok(())
    }
}

/// How a record's re-check came out before the signatures are verified (in one batch).
enum Recheck {
    /// Submitted with the partner's token: no signature to check.
    Token,
    /// The signature to verify.
    Signed(Box<crate::jws::Signed>),
    Failed(&'static str, String),
}

/// Re-checks a record: its event still hashes to the recorded Event Hash ID, and the partner's
/// signature over that id names one of the partner's keys (verified by [`verify_signatures`]).
fn recheck(r: &Recorded, partner: Option<&Partner>) -> Recheck {
    match recheck_hash(r, partner) {
        Ok(Some(s)) => Recheck::Signed(Box::new(s)),
        Ok(None) => Recheck::Token,
        Err((code, why)) => Recheck::Failed(code, why),
    }
}

fn recheck_hash(r: &Recorded, partner: Option<&Partner>) -> Result<Option<crate::jws::Signed>, (&'static str, String)> {
    let contexts: Vec<&Value> = match r.event.get("@context") {
        Some(Value::Array(items)) => items.iter().filter(|c| c.is_object()).collect(),
        Some(c @ Value::Object(_)) => vec![c],
        _ => Vec::new(),
    };
    let now = hash::event_hash_id(&r.event, &contexts).map_err(|e| ("event-altered", e.to_string()))?;
    if now != r.hash_id {
        return Err((
            "event-altered",
            format!("the recorded event now hashes to {now}, not to {} it was captured and signed under", r.hash_id),
        ));
    }
    let Some(jws) = &r.jws else { return Ok(None) };
    let keys = partner.map(|p| p.keys.as_slice()).unwrap_or_default();
    crate::jws::parse(jws, EVENT_JWS_TYPE, r.hash_id.as_bytes(), keys, "the event")
        .map(Some)
        .map_err(|e| ("signature-invalid", e))
}

/// Verifies the trace's signatures in one batch; when it fails, one by one: the steps whose
/// signature does not verify are marked and named.
fn verify_signatures(t: &mut Trace, signed: &[(usize, crate::jws::Signed)]) {
    use ed25519_dalek::Verifier;
    let inputs: Vec<&[u8]> = signed.iter().map(|(_, s)| s.input.as_slice()).collect();
    let sigs: Vec<ed25519_dalek::Signature> = signed.iter().map(|(_, s)| s.signature).collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = signed.iter().map(|(_, s)| s.key).collect();
    if ed25519_dalek::verify_batch(&inputs, &sigs, &keys).is_ok() {
        return;
    }
    for (i, s) in signed {
        if s.key.verify(&s.input, &s.signature).is_err() {
            t.steps[*i].signature = "invalid";
            let event = t.steps[*i].rec.event_id.clone();
            t.findings.push(Finding {
                code: "signature-invalid",
                message: format!("the event signature by {} does not verify", s.kid),
                event: Some(event),
            });
        }
    }
}

/// The custody trace of instance (or container) `id`, a canonical Digital Link.
pub fn trace(
    engine: &Engine,
    directory: &Directory,
    id: &str,
    admit: &dyn Fn(&str) -> Result<bool, FhirError>,
) -> Result<Trace, FhirError> {
    let own = events::naming(engine, id, admit)?;
    let mut g = Gatherer { engine, admit, seen: BTreeSet::new(), out: Vec::new() };
    g.gather(id, own, (i64::MIN, i64::MAX), None, 0)?;
    let mut gathered = g.out;
    gathered.sort_by(|a, b| (a.0.facts.time_ms, &a.0.record_time).cmp(&(b.0.facts.time_ms, &b.0.record_time)));
    let mut look =
        Lookups { engine, directory, partners: HashMap::new(), locations: HashMap::new(), certs: HashMap::new() };
    let declared: HashMap<String, String> =
        gathered.iter().filter_map(|(r, _)| r.declared.as_ref().map(|why| (r.event_id.clone(), why.clone()))).collect();
    let mut t = Trace { subject: id.to_string(), ..Trace::default() };
    let mut to_verify = Vec::new();
    let mut custody = Custody::default();
    for (rec, via) in gathered {
        let signer = match &rec.partner {
            Some(p) => look.partner(p)?,
            None => None,
        };
        let place = rec.facts.biz_location.clone().or_else(|| rec.facts.read_point.clone());
        let owner = match &place {
            Some(l) => look.location(l)?,
            None => None,
        };
        let party = owner.map(|p| p.reference()).or_else(|| rec.partner.clone());
        let signature = match recheck(&rec, signer.as_ref()) {
            Recheck::Token => "token",
            Recheck::Signed(s) => {
                to_verify.push((t.steps.len(), *s));
                "verified"
            }
            Recheck::Failed(code, why) => {
                t.findings.push(Finding { code, message: why, event: Some(rec.event_id.clone()) });
                if code == "event-altered" {
                    "altered"
                } else {
                    "invalid"
                }
            }
        };
        let licence = match &party {
            Some(p) => certs::licence_at(look.certs(p)?, rec.facts.time_ms),
            None => (Status::None, None),
        };
        let declared_why =
            if rec.declared.is_some() { rec.declared.clone() } else { declared.get(&rec.event_id).cloned() };
        if declared_why.is_none() {
            if licence.0 != Status::Valid {
                t.findings.push(Finding {
                    code: "unlicensed-partner",
                    message: format!(
                        "{} held no valid licence at the time of this step (its licence: {})",
                        party.as_deref().unwrap_or("an unknown partner"),
                        licence.0.code()
                    ),
                    event: Some(rec.event_id.clone()),
                });
            }
            custody.step(&mut t, &rec, party.as_deref(), via.is_some(), &mut look)?;
        }
        t.steps.push(Step { rec, via, party, signature, licence, declared: declared_why });
    }
    verify_signatures(&mut t, &to_verify);
    // A recall of the lot names the lot, not the instance.
    if let (Some(lot), Some(gtin)) = (&t.lot, crate::epcis::epc::parse(id).and_then(|k| k.gtin)) {
        let lot_id = format!("{}|{}", super::URI_SYSTEM, crate::epcis::epc::lgtin_link(&gtin, lot));
        let recalled = format!("{}|recalled", super::DISPOSITION_SYSTEM);
        let recalls = events::find_all(engine, &[("epc", &lot_id), ("disposition", &recalled)], admit)?;
        if let Some(r) = recalls.iter().find(|r| r.declared.is_none() && !declared.contains_key(&r.event_id)) {
            if !t.has("recalled") {
                t.findings.push(Finding {
                    code: "recalled",
                    message: format!("lot {lot} is recalled"),
                    event: Some(r.event_id.clone()),
                });
            }
        }
    }
    if !t.commissioned && !t.steps.is_empty() {
        t.findings.insert(
            0,
            Finding {
                code: "never-commissioned",
                message: format!(
                    "no commissioning of {id} is recorded: the serial was never issued by its manufacturer"
                ),
                event: None,
            },
        );
    }
    t.children = custody.children.into_iter().collect();
    Ok(t)
}

/// The custody state a trace walks.
#[derive(Default)]
struct Custody {
    holder: Option<String>,
    /// Where a shipment is headed (partners; empty when the shipment named none we know).
    in_transit: Option<Vec<String>>,
    /// How and where it left circulation.
    left: Option<(&'static str, String)>,
    children: BTreeSet<String>,
}

impl Custody {
    fn step(
        &mut self,
        t: &mut Trace,
        r: &Recorded,
        party: Option<&str>,
        via: bool,
        look: &mut Lookups<'_>,
    ) -> Result<(), FhirError> {
        let f = &r.facts;
        let step = f.biz_step.as_deref().unwrap_or_default();
        let disp = f.disposition.as_deref().unwrap_or_default();
        let event = Some(r.event_id.clone());
        if disp == "recalled" && !t.has("recalled") {
            t.findings.push(Finding {
                code: "recalled",
                message: "the product is recalled".into(),
                event: event.clone(),
            });
        }
        if !via && f.event_type == "AggregationEvent" && f.parent.as_deref() == Some(&t.subject) {
            match f.action.as_deref() {
                Some("ADD") => self.children.extend(f.children.iter().cloned()),
                Some("DELETE") if f.children.is_empty() => self.children.clear(),
                Some("DELETE") => f.children.iter().for_each(|c| {
                    self.children.remove(c);
                }),
                _ => {}
            }
        }
        if step == "commissioning" {
            t.commissioned = true;
            t.lot = t.lot.take().or_else(|| f.lot.clone());
            t.expiry = t.expiry.take().or_else(|| f.expiry.clone());
            self.holder = party.map(String::from);
            return Ok(());
        }
        let Some(party) = party else { return Ok(()) };
        if let Some((how, where_)) = &self.left {
            if party != where_ {
                t.findings.push(Finding {
                    code: "cloned-serial",
                    message: format!("seen at {party} after it was {how} at {where_}: the serial is in two places"),
                    event: event.clone(),
                });
            }
        } else if self.holder.as_deref() != Some(party) {
            match &self.in_transit {
                Some(to) if !to.is_empty() && !to.iter().any(|d| d == party) => t.findings.push(Finding {
                    code: "custody-gap",
                    message: format!("handled at {party}, but it was shipped to {}: never shipped here", to.join(", ")),
                    event: event.clone(),
                }),
                Some(_) => {}
                None => {
                    if let Some(holder) = &self.holder {
                        t.findings.push(Finding {
                            code: "cloned-serial",
                            message: format!("seen at {party} while {holder} holds it (never shipped from there)"),
                            event: event.clone(),
                        });
                    }
                }
            }
        }
        match step {
            "shipping" => {
                let mut to = Vec::new();
                for (_, d) in &f.destinations {
                    if let Some(p) = look.location(d)? {
                        to.push(p.reference());
                    }
                }
                self.in_transit = Some(to);
                self.holder = Some(party.to_string());
            }
            "receiving" | "accepting" => {
                self.in_transit = None;
                self.holder = Some(party.to_string());
            }
            _ if step == "dispensing" || disp == "dispensed" || disp == "partially_dispensed" => {
                self.left = Some(("dispensed", party.to_string()));
                t.findings.push(Finding {
                    code: "dispensed",
                    message: format!("dispensed at {party}"),
                    event: event.clone(),
                });
            }
            _ if step == "decommissioning" || disp == "inactive" => {
                self.left = Some(("decommissioned", party.to_string()));
                t.findings.push(Finding {
                    code: "decommissioned",
                    message: format!("decommissioned at {party}"),
                    event: event.clone(),
                });
            }
            _ if step == "destroying" || disp == "destroyed" => {
                self.left = Some(("destroyed", party.to_string()));
                t.findings.push(Finding { code: "destroyed", message: format!("destroyed at {party}"), event });
            }
            _ => {}
        }
        Ok(())
    }
}
