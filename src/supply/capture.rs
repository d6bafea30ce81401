//! EPCIS capture: a document is checked whole (schema, CBV, each Event Hash ID, each
//! partner's signature) and then recorded as one commit, or not at all: the standard's
//! `rollback` capture error behaviour, the only one offered.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use serde_json::Value;

use super::map::{self, Mapped};
use super::partners::{self, Partner};
use super::EVENT_JWS_TYPE;
use crate::epcis::{self, hash, schema, Facts};
use crate::error::{ErrorCode, FhirError, Issue};
use crate::fhir::json::Json;
use crate::repo::{Policy, Repo};
use crate::search::index::Engine;

/// The namespace of this server's EPCIS extensions; `eventSignatures` in a document's
/// `epcisHeader` carries the partners' detached JWS, one per event: `{"eventID", "jws"}`.
pub const NAMESPACE: &str = "https://fhir-ledger.dev/epcis/";

/// How many finished capture jobs a node remembers for `GET /epcis/capture/{id}`.
const JOBS_KEPT: usize = 10_000;

/// What a node keeps of the EPCIS machinery: the compiled schema and its capture jobs.
pub struct Supply {
    pub validator: schema::Validator,
    jobs: Mutex<(BTreeMap<String, Job>, std::collections::VecDeque<String>)>,
    /// Which Organization held a signing key (by RFC 7638 thumbprint) when last looked up:
    /// checked against the Organization's current version on every use, so a capture finds
    /// its partners without waiting for the search index.
    holders: Mutex<HashMap<String, String>>,
    /// Partners and certificates by version, for traces.
    pub directory: super::directory::Directory,
}

/// A capture job as `GET /epcis/capture/{id}` reports it.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: String,
    pub success: bool,
    pub events: Vec<String>,
    pub duplicates: usize,
    pub errors: Vec<String>,
    pub finished: String,
}

impl Supply {
    pub fn new() -> Result<Self, String> {
        Ok(Self {
            validator: schema::Validator::new()?,
            jobs: Mutex::new(Default::default()),
            holders: Mutex::new(HashMap::new()),
            directory: super::directory::Directory::default(),
        })
    }

    pub fn remember(&self, job: Job) {
        let Ok(mut jobs) = self.jobs.lock() else { return };
        let (map, order) = &mut *jobs;
        order.push_back(job.id.clone());
        map.insert(job.id.clone(), job);
        while order.len() > JOBS_KEPT {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    pub fn job(&self, id: &str) -> Option<Job> {
        self.jobs.lock().ok()?.0.get(id).cloned()
    }

    /// The partner holding the key with thumbprint `kid` now.
    fn key_holder(&self, engine: &Engine, kid: &str) -> Result<Option<Partner>, FhirError> {
        let known = self.holders.lock().ok().and_then(|h| h.get(kid).cloned());
        if let Some(id) = known {
            if let Some(p) = partners::partner(engine, &id)? {
                if p.keys.iter().any(|k| crate::jws::thumbprint(k) == kid) {
                    return Ok(Some(p));
                }
            }
        }
        let found = partners::by_thumbprint(engine, kid)?;
        if let (Some(p), Ok(mut h)) = (&found, self.holders.lock()) {
            h.insert(kid.to_string(), p.id.clone());
        }
        Ok(found)
    }
}

/// One event ready to record.
pub struct Prepared {
    pub event_id: String,
    pub hash_id: String,
    pub resources: Vec<Mapped>,
}

fn invalid_at(location: &str, message: impl Into<String>) -> FhirError {
    FhirError::new(ErrorCode::Invalid, message).at(location.to_string())
}

/// The JSON-LD contexts in scope of a document: its `@context` entries that are objects (the
/// prefix definitions; the standard context's URL defines no user prefix).
fn contexts(doc: &Value) -> Vec<&Value> {
    match doc.get("@context") {
        Some(Value::Array(items)) => items.iter().filter(|c| c.is_object()).collect(),
        Some(c @ Value::Object(_)) => vec![c],
        _ => Vec::new(),
    }
}

/// The document's `eventSignatures` (in `epcisHeader`, under any prefix bound to
/// [`NAMESPACE`], or the full IRI): event id → JWS.
fn signatures(doc: &Value, contexts: &[&Value]) -> Result<HashMap<String, String>, FhirError> {
    let mut out = HashMap::new();
    let Some(header) = doc.get("epcisHeader").and_then(Value::as_object) else { return Ok(out) };
    for (key, value) in header {
        let expanded = match key.split_once(':') {
            Some((prefix, term)) if !key.starts_with("http") => {
                contexts.iter().find_map(|c| c.get(prefix).and_then(Value::as_str)).map(|ns| format!("{ns}{term}"))
            }
            _ => Some(key.clone()),
        };
        if expanded.as_deref() != Some(&format!("{NAMESPACE}eventSignatures")) {
            continue;
        }
        let at = format!("epcisHeader.{key}");
        for (n, s) in value.as_array().into_iter().flatten().enumerate() {
            let (Some(id), Some(jws)) =
                (s.get("eventID").and_then(Value::as_str), s.get("jws").and_then(Value::as_str))
            else {
                return Err(invalid_at(
                    &format!("{at}[{n}]"),
                    "an event signature is {\"eventID\": ..., \"jws\": ...}",
                ));
            };
            out.insert(id.to_string(), jws.to_string());
        }
    }
    Ok(out)
}

fn kid_of(jws: &str) -> Option<String> {
    let header = crate::codec::unb64url(jws.split('.').next()?).ok()?;
    let header: Value = serde_json::from_slice(&header).ok()?;
    header.get("kid")?.as_str().map(String::from)
}

/// Who vouches for one event: the partner whose key signed its Event Hash ID, or else the
/// partner whose token submits it.
fn signer(
    supply: &Supply,
    engine: &Engine,
    cache: &mut HashMap<String, Option<Partner>>,
    jws: Option<&String>,
    hash_id: &str,
    submitter: Option<&Partner>,
    at: &str,
) -> Result<(Partner, Option<(String, crate::jws::Signed)>), FhirError> {
    let Some(jws) = jws else {
        return submitter.cloned().map(|p| (p, None)).ok_or_else(|| {
            FhirError::forbidden(format!(
                "{at}: the event is neither signed by a registered trading partner (epcisHeader \
                 eventSignatures) nor submitted with a partner's token"
            ))
        });
    };
    let kid = kid_of(jws).ok_or_else(|| invalid_at(at, "the event's signature is not a compact JWS with a kid"))?;
    if !cache.contains_key(&kid) {
        cache.insert(kid.clone(), supply.key_holder(engine, &kid)?);
    }
    let partner = cache.get(&kid).cloned().flatten().ok_or_else(|| {
        FhirError::forbidden(format!(
            "{at}: signature-key-unknown: the event is signed by key {kid}, which no registered trading partner holds"
        ))
    })?;
    let signed = crate::jws::parse(jws, EVENT_JWS_TYPE, hash_id.as_bytes(), &partner.keys, "the event")
        .map_err(|e| invalid_signature(at, hash_id, &partner, &e))?;
    Ok((partner, Some((jws.clone(), signed))))
}

fn invalid_signature(at: &str, hash_id: &str, partner: &Partner, e: &str) -> FhirError {
    FhirError::forbidden(format!(
        "{at}: signature-invalid: {e} (the signature over {hash_id} is not {}'s: the event was changed after it was \
         signed, or another key signed it)",
        partner.reference()
    ))
}

/// Verifies the document's signatures in one batch; when the batch fails, one by one, to name
/// the event whose signature is not its partner's.
fn verify_all(pending: &[(String, String, Partner, crate::jws::Signed)]) -> Result<(), FhirError> {
    let inputs: Vec<&[u8]> = pending.iter().map(|p| p.3.input.as_slice()).collect();
    let sigs: Vec<ed25519_dalek::Signature> = pending.iter().map(|p| p.3.signature).collect();
    let keys: Vec<ed25519_dalek::VerifyingKey> = pending.iter().map(|p| p.3.key).collect();
    if ed25519_dalek::verify_batch(&inputs, &sigs, &keys).is_ok() {
        return Ok(());
    }
    for (at, hash_id, partner, s) in pending {
        use ed25519_dalek::Verifier;
        s.key.verify(&s.input, &s.signature).map_err(|_| {
            invalid_signature(at, hash_id, partner, &format!("the event signature by {} does not verify", s.kid))
        })?;
    }
    Ok(())
}

/// GTINs a DeviceDefinition names (`identifier` with the GTIN system): tracked per instance.
fn device_gtins(engine: &Engine, events: &[Value]) -> Result<Vec<String>, FhirError> {
    let mut gtins: Vec<String> = Vec::new();
    for e in events {
        if e.get("bizStep").and_then(Value::as_str).map(|b| epcis::BIZ_STEP.word(b)).as_deref() != Some("commissioning")
        {
            continue;
        }
        for id in e.get("epcList").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if let Some(g) = epcis::epc::parse(id).and_then(|k| k.gtin) {
                if !gtins.contains(&g) {
                    gtins.push(g);
                }
            }
        }
    }
    if gtins.is_empty() {
        return Ok(Vec::new());
    }
    let idx = engine.current_for(&["DeviceDefinition"])?;
    let defs = idx.of("DeviceDefinition");
    let mut out = Vec::new();
    for g in gtins {
        if !defs.posting("identifier", &format!("{}|{g}", super::GTIN_SYSTEM))?.is_empty() {
            out.push(g);
        }
    }
    Ok(out)
}

/// Checks a whole capture document and maps every event; nothing is written.
pub fn prepare(
    supply: &Supply,
    engine: &Engine,
    doc: &Value,
    submitter: Option<&Partner>,
    now_ms: i64,
) -> Result<Vec<Prepared>, FhirError> {
    if doc.get("type").and_then(Value::as_str) != Some("EPCISDocument") {
        return Err(invalid_at("type", "the capture interface takes an EPCISDocument (type \"EPCISDocument\")"));
    }
    let problems = supply.validator.validate_document(doc);
    if !problems.is_empty() {
        let issues = problems
            .into_iter()
            .map(|p| Issue {
                severity: "error",
                code: "invalid",
                diagnostics: format!("{}: {}", p.location, p.message),
                expression: vec![p.location],
            })
            .collect();
        return Err(FhirError::with_issues(ErrorCode::Invalid, issues));
    }
    let ctx = contexts(doc);
    let sigs = signatures(doc, &ctx)?;
    let events: &[Value] =
        doc.pointer("/epcisBody/eventList").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let devices = device_gtins(engine, events)?;
    let recorded = crate::fhir::instant(now_ms);
    let mut cache: HashMap<String, Option<Partner>> = HashMap::new();
    let mut out = Vec::with_capacity(events.len());
    let mut pending = Vec::new();
    for (n, event) in events.iter().enumerate() {
        let at = format!("epcisBody.eventList[{n}]");
        let mut scoped = ctx.clone();
        match event.get("@context") {
            Some(Value::Array(items)) => scoped.extend(items.iter().filter(|c| c.is_object())),
            Some(c @ Value::Object(_)) => scoped.push(c),
            _ => {}
        }
        let hash_id = hash::event_hash_id(event, &scoped).map_err(|e| invalid_at(&at, e.to_string()))?;
        let given = event.get("eventID").and_then(Value::as_str);
        if let Some(given) = given.filter(|g| g.starts_with("ni:///")) {
            if given != hash_id {
                return Err(invalid_at(
                    &format!("{at}.eventID"),
                    format!(
                        "event-hash-mismatch: eventID {given} is not the CBV 2.0 Event Hash ID of the event's content \
                         ({hash_id}): the event was changed after it was hashed"
                    ),
                ));
            }
        }
        let event_id = given.unwrap_or(&hash_id).to_string();
        let jws = sigs.get(&event_id).or_else(|| sigs.get(&hash_id));
        let (partner, signed) = signer(supply, engine, &mut cache, jws, &hash_id, submitter, &at)?;
        let jws = signed.map(|(jws, s)| {
            pending.push((at.clone(), hash_id.clone(), partner.clone(), s));
            jws
        });
        let declaration = event.get("errorDeclaration").map(|d| {
            let when = d.get("declarationTime").and_then(Value::as_str).unwrap_or_default().to_string();
            let reason = d.get("reason").and_then(Value::as_str).map(String::from);
            (when, reason)
        });
        let mut record = event.clone();
        if let Some(o) = record.as_object_mut() {
            o.insert("eventID".into(), Value::String(event_id.clone()));
            o.insert("recordTime".into(), Value::String(recorded.clone()));
            // The prefixes in scope travel with the event, so its hash can be recomputed
            // from the record alone.
            if !scoped.is_empty() {
                o.insert("@context".into(), Value::Array(scoped.iter().map(|c| (*c).clone()).collect()));
            }
        }
        let bytes = serde_json::to_vec(&record).map_err(FhirError::internal)?;
        let facts = Facts::of(event);
        let event_time = event.get("eventTime").and_then(Value::as_str).unwrap_or_default();
        let input = map::Input {
            event_bytes: &bytes,
            event_id: &event_id,
            hash_id: &hash_id,
            facts: &facts,
            partner: &partner,
            jws: jws.as_deref(),
            recorded: &recorded,
            event_time,
            device_gtins: &devices,
        };
        let resources = map::map(&input, declaration.as_ref().map(|(w, r)| (w.as_str(), r.as_deref())));
        out.push(Prepared { event_id, hash_id, resources });
    }
    verify_all(&pending)?;
    Ok(out)
}

/// Records prepared events in one commit. An event already recorded with the same content is
/// skipped (a retried capture records nothing twice); an `eventID` already naming another
/// event is a 409. Returns how many events were duplicates.
pub async fn record(repo: &Repo, policy: &dyn Policy, prepared: &[Prepared]) -> Result<usize, FhirError> {
    let (duplicates, _) = repo
        .commit(policy, |plan| {
            let mut duplicates = 0;
            let mut written: std::collections::HashSet<(&str, &str)> = std::collections::HashSet::new();
            for p in prepared {
                let Some(prov) = p.resources.last() else { continue };
                if let Some(cur) = plan.current(prov.rtype, &prov.id)?.filter(|c| !c.deleted) {
                    let existing = plan.repo().vread("Provenance", &prov.id, cur.version)?.parsed()?;
                    if existing.as_ref().and_then(map::recorded_hash) == Some(p.hash_id.as_str()) {
                        duplicates += 1;
                        continue;
                    }
                    return Err(FhirError::new(
                        ErrorCode::Duplicate,
                        format!("eventID {} already names another event on this ledger", p.event_id),
                    ));
                }
                for m in &p.resources {
                    if !written.insert((m.rtype, m.id.as_str())) {
                        continue;
                    }
                    // Every record is create-only: an existing live one stays as it is (a lot's
                    // Medication commissioned again, a retried event).
                    let body = Json::from(m.body.clone());
                    match plan.current(m.rtype, &m.id)? {
                        Some(c) if !c.deleted => continue,
                        Some(_) => plan.put(m.rtype, &m.id, &body, None)?,
                        None => plan.put_new(m.rtype, &m.id, &body)?,
                    };
                }
            }
            Ok(duplicates)
        })
        .await?;
    Ok(duplicates)
}
