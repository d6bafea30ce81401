//! The disclosure log: every read, search and refusal under authorization is recorded in an
//! AuditEvent on the ledger, so a patient can see who read what, how often and when. Events
//! are queued by the request and committed by one writer in batches (everything queued within
//! [`WINDOW`] of the first event, in commands of up to [`BATCH`]), never one Raft round trip
//! per read. Within a batch,
//! successful disclosures by one accessor of one patient share an AuditEvent (see
//! [`Disclosure`]); each refusal has its own.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::error::FhirError;
use crate::fhir::json::{self, Json};
use crate::search::Engine;

pub const BATCH: usize = 4096;
pub const WINDOW: Duration = Duration::from_millis(200);
/// The ledger actor of the log's own writes.
pub const ACTOR: &str = "fhir-ledger/disclosure-log";

/// One request's disclosure (or denial) concerning one patient (or none).
#[derive(Debug, Clone)]
pub struct Event {
    pub recorded_ms: i64,
    /// The RESTful interaction (`read`, `search-type`, `create`, ...).
    pub interaction: &'static str,
    pub success: bool,
    pub detail: Option<String>,
    pub purpose: Option<String>,
    /// The study a research read was for (`ResearchStudy` id).
    pub study: Option<String>,
    /// The de-identification algorithm what was disclosed passed through, if any.
    pub deidentified: Option<String>,
    pub broke_glass: bool,
    pub client_id: String,
    pub client_name: String,
    /// `Practitioner/1`, when a user acts.
    pub user: Option<String>,
    pub patient: Option<String>,
    /// `Type/id/_history/v` of each resource disclosed.
    pub entities: Vec<String>,
    /// How many requests this event stands for (more than one for aggregated refusals).
    pub requests: u64,
}

enum Msg {
    Event(Box<Event>),
    Flush(oneshot::Sender<()>),
}

/// The queue into the writer. Cloning shares it.
///
/// Authenticated callers' events are queued as they come (each stands for a request a known
/// client made). Refusals of unauthenticated requests, which anyone can send, go through
/// [`Refusals`] first: at most one event per source and window, so no client can grow the
/// ledger or the queue without limit.
#[derive(Clone)]
pub struct Log {
    tx: Option<mpsc::UnboundedSender<Msg>>,
    refusals: Arc<std::sync::Mutex<Refusals>>,
}

/// Window over which one source's unauthenticated refusals make one event.
pub const REFUSAL_WINDOW_MS: i64 = 5_000;
/// Sources tracked at once; beyond them, refusals are counted under one shared source.
const MAX_SOURCES: usize = 4096;
/// Characters of a refused request's method, path and reason kept in the log.
pub const MAX_DETAIL: usize = 256;

/// Per source: the window's start, how many refusals since the recorded one, and that event.
#[derive(Default)]
pub struct Refusals {
    by_source: std::collections::HashMap<String, (i64, u64, Event)>,
}

impl Refusals {
    /// The counts of the windows that ended by `now` (a timer calls this every second).
    fn sweep(&mut self, now: i64) -> Vec<Event> {
        let ended: Vec<String> = self
            .by_source
            .iter()
            .filter(|(_, (start, _, _))| now - start >= REFUSAL_WINDOW_MS)
            .map(|(k, _)| k.clone())
            .collect();
        ended
            .into_iter()
            .filter_map(|k| self.by_source.remove(&k))
            .filter_map(|(_, n, first)| further(n, first))
            .collect()
    }

    /// The events to record for a refusal from `source` now: the first of a window is
    /// recorded at once, the others are counted until the window ends.
    fn admit(&mut self, source: &str, e: Event) -> Vec<Event> {
        let now = e.recorded_ms;
        let mut out = Vec::new();
        let key = if self.by_source.len() >= MAX_SOURCES && !self.by_source.contains_key(source) {
            "(other sources)"
        } else {
            source
        };
        match self.by_source.get_mut(key) {
            Some((start, n, _)) if now - *start < REFUSAL_WINDOW_MS => *n += 1,
            _ => {
                if let Some((_, n, first)) = self.by_source.remove(key) {
                    out.extend(further(n, first));
                }
                self.by_source.insert(key.to_string(), (now, 0, e.clone()));
                out.push(e);
            }
        }
        out
    }
}

/// The event that counts a window's refusals after its first one (none if there were none).
fn further(n: u64, mut first: Event) -> Option<Event> {
    (n > 0).then(|| {
        first.detail = Some(format!("{} more like: {}", n, first.detail.unwrap_or_default()));
        first.requests = n;
        first.recorded_ms = crate::fhir::now_ms();
        first
    })
}

/// `s` cut to at most `max` characters, marked when cut.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

impl Log {
    pub fn disabled() -> Self {
        Self { tx: None, refusals: Arc::default() }
    }

    /// Starts the writer on the current tokio runtime.
    pub fn start(search: Arc<Engine>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let refusals: Arc<std::sync::Mutex<Refusals>> = Arc::default();
        tokio::spawn(sweeper(Arc::downgrade(&refusals), tx.clone()));
        tokio::spawn(writer(search, rx));
        Self { tx: Some(tx), refusals }
    }

    /// Records the refusal of an unauthenticated request from `source` (its address),
    /// aggregated per source and window, its detail truncated.
    pub fn refused(&self, source: &str, mut e: Event) {
        if self.tx.is_none() {
            return;
        }
        e.detail = e.detail.map(|d| truncate(&d, MAX_DETAIL));
        let events = self.refusals.lock().unwrap_or_else(PoisonError::into_inner).admit(source, e);
        for e in events {
            self.record(e);
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn record(&self, e: Event) {
        if let Some(tx) = &self.tx {
            queue(tx, e);
        }
    }

    /// Waits until every event queued before the call is on the ledger.
    pub async fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done, wait) = oneshot::channel();
            if tx.send(Msg::Flush(done)).is_ok() {
                let _ = wait.await;
            }
        }
    }
}

/// Records the counts of ended refusal windows, once a second, until the log is dropped.
async fn sweeper(refusals: std::sync::Weak<std::sync::Mutex<Refusals>>, tx: mpsc::UnboundedSender<Msg>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(r) = refusals.upgrade() else { return };
        let ended = r.lock().unwrap_or_else(PoisonError::into_inner).sweep(crate::fhir::now_ms());
        for e in ended {
            if !queue(&tx, e) {
                return;
            }
        }
    }
}

async fn writer(search: Arc<Engine>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let node = search.repo().node_id().to_string();
    loop {
        // Wake once per window, not once per event: the first message opens a window, and
        // everything queued by its end is one batch (flush requests wait at most a window).
        let Some(first) = rx.recv().await else { return };
        tokio::time::sleep(WINDOW).await;
        let mut batch: Vec<Event> = Vec::new();
        let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Msg::Event(e) => batch.push(*e),
                Msg::Flush(w) => waiters.push(w),
            }
            if batch.len() >= BATCH {
                commit_counted(&search, &node, std::mem::take(&mut batch)).await;
            }
            next = rx.try_recv().ok();
        }
        commit_counted(&search, &node, batch).await;
        for w in waiters {
            let _ = w.send(());
        }
    }
}

/// Commits a batch and takes its events off the backlog gauge (queued in [`queue`]).
async fn commit_counted(search: &Arc<Engine>, node: &str, batch: Vec<Event>) {
    let n = batch.len();
    commit(search, node, aggregate(batch)).await;
    metrics::gauge!(crate::telemetry::DISCLOSURE_BACKLOG).decrement(n as f64);
}

/// Sends an event to the writer, counting it on the backlog gauge until it is committed.
fn queue(tx: &mpsc::UnboundedSender<Msg>, e: Event) -> bool {
    let sent = tx.send(Msg::Event(Box::new(e))).is_ok();
    if sent {
        metrics::gauge!(crate::telemetry::DISCLOSURE_BACKLOG).increment(1.0);
    }
    sent
}

/// The disclosures of one batch, merged: successful ones by the same accessor (client and
/// user) of the same patient, for the same interaction and purpose, become one AuditEvent
/// whose `period` spans them, whose count extension says how many requests it records and
/// whose entities say how often each resource was shown. Refusals stay one event each.
#[derive(Debug)]
pub struct Disclosure {
    pub first: Event,
    pub requests: u64,
    pub last_ms: i64,
    /// `Type/id/_history/v` and how many of the requests showed it, in first-seen order.
    pub entities: Vec<(String, u64)>,
}

fn aggregate(batch: Vec<Event>) -> Vec<Disclosure> {
    type Key = (String, Option<String>, Option<String>, &'static str, Option<String>, Option<String>, bool, bool);
    let mut out: Vec<Disclosure> = Vec::new();
    let mut by_key: std::collections::HashMap<Key, usize> = std::collections::HashMap::new();
    // Where each entity is in its disclosure's list: a Bulk export discloses thousands of
    // resources of one patient at once, and a linear search per entity was quadratic.
    let mut positions: Vec<std::collections::HashMap<String, usize>> = Vec::new();
    let count = |d: &mut Disclosure, at: &mut std::collections::HashMap<String, usize>, r: String| {
        if let Some(&i) = at.get(&r) {
            d.entities[i].1 += 1;
        } else {
            at.insert(r.clone(), d.entities.len());
            d.entities.push((r, 1));
        }
    };
    for mut e in batch {
        let key = (
            e.client_id.clone(),
            e.user.clone(),
            e.patient.clone(),
            e.interaction,
            e.purpose.clone(),
            e.study.clone(),
            e.deidentified.is_some(),
            e.broke_glass,
        );
        let slot = if e.success { by_key.get(&key).copied() } else { None };
        let entities = std::mem::take(&mut e.entities);
        let i = if let Some(i) = slot {
            let d = &mut out[i];
            d.requests += e.requests;
            d.last_ms = d.last_ms.max(e.recorded_ms);
            i
        } else {
            if e.success {
                by_key.insert(key, out.len());
            }
            out.push(Disclosure { last_ms: e.recorded_ms, requests: e.requests, entities: Vec::new(), first: e });
            positions.push(std::collections::HashMap::new());
            out.len() - 1
        };
        for r in entities {
            count(&mut out[i], &mut positions[i], r);
        }
    }
    out
}

async fn commit(search: &Engine, node: &str, batch: Vec<Disclosure>) {
    let repo = search.repo();
    if batch.is_empty() {
        return;
    }
    let mut docs = Vec::with_capacity(batch.len());
    for d in &batch {
        match json::parse(audit_event(d, node).to_string().as_bytes(), usize::MAX) {
            Ok(j) => docs.push((uuid::Uuid::new_v4().to_string(), j)),
            Err(err) => tracing::error!("disclosure log: {err}"),
        }
    }
    let append = |plan: &mut crate::repo::Plan<'_>| {
        for (id, doc) in &docs {
            plan.put_new("AuditEvent", id, doc)?;
        }
        Ok(())
    };
    let result = repo.commit(&crate::repo::System::new(ACTOR), append).await;
    if let Ok(((), stored)) = &result {
        // One command's leaves are consecutive: searches need not wait for them.
        let leaves = stored.iter().filter_map(|s| s.leaf);
        if let (Some(lo), Some(hi)) = (leaves.clone().min(), leaves.max()) {
            search.note_log_leaves(lo, hi + 1);
        }
    }
    if let Err(e) = result {
        // Dropping the batch would lose disclosures: keep trying, as the ledger comes back.
        tracing::error!("disclosure log: could not append {} events: {:?}; retrying", batch.len(), e.issues);
        for attempt in 1..=20u64 {
            tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            if repo.commit(&crate::repo::System::new(ACTOR), append).await.is_ok() {
                return;
            }
        }
        tracing::error!("disclosure log: gave up on {} events", batch.len());
    }
}

/// Extension on an AuditEvent: how many requests it records.
pub const REQUESTS_EXTENSION: &str = "urn:fhir-ledger:StructureDefinition/disclosure-requests";

const CLIENT_SYSTEM: &str = "urn:fhir-ledger:client";

/// The AuditEvent (R4) of one event.
pub fn audit_event(d: &Disclosure, node: &str) -> Value {
    let e = &d.first;
    let action = match e.interaction {
        "create" => "C",
        "update" | "patch" => "U",
        "delete" => "D",
        "search-type" | "search-system" | "history-type" | "history-system" | "operation" => "E",
        _ => "R",
    };
    let mut agents = Vec::new();
    if let Some(u) = &e.user {
        agents.push(json!({"who": {"reference": u}, "requestor": true}));
    }
    agents.push(json!({
        "who": {"identifier": {"system": CLIENT_SYSTEM, "value": e.client_id}, "display": e.client_name},
        "requestor": e.user.is_none()
    }));
    let mut entities = Vec::new();
    if let Some(p) = &e.patient {
        entities.push(json!({
            "what": {"reference": format!("Patient/{p}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}
        }));
    }
    if let Some(algorithm) = &e.deidentified {
        // IHE's de-identification audit: the ISO 21089 lifecycle event and the algorithm.
        entities.push(json!({
            "what": {"display": algorithm},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
            "description": "de-identification algorithm"
        }));
    }
    if let Some(s) = &e.study {
        entities.push(json!({
            "what": {"reference": format!("ResearchStudy/{s}")},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
            "description": "the research study this disclosure was for"
        }));
    }
    for (r, n) in &d.entities {
        let mut ent = json!({
            "what": {"reference": r},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4"}
        });
        if *n > 1 {
            ent["detail"] = json!([{"type": "disclosures", "valueString": n.to_string()}]);
        }
        entities.push(ent);
    }
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": e.interaction}],
        "action": action,
        "extension": [{"url": REQUESTS_EXTENSION, "valueInteger": d.requests}],
        "period": {"start": crate::fhir::instant(e.recorded_ms), "end": crate::fhir::instant(d.last_ms)},
        "recorded": crate::fhir::instant(d.last_ms),
        "outcome": if e.success { "0" } else { "4" },
        "agent": agents,
        "source": {"site": "fhir-ledger", "observer": {"display": format!("fhir-ledger node {node}")},
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4"}]},
    });
    if let Some(d) = &e.detail {
        ev["outcomeDesc"] = json!(d);
    }
    if let Some(p) = &e.purpose {
        ev["purposeOfEvent"] =
            json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": p}]}]);
    }
    if e.deidentified.is_some() {
        if let Some(subtypes) = ev["subtype"].as_array_mut() {
            subtypes.push(
                json!({"system": "http://terminology.hl7.org/CodeSystem/iso-21089-lifecycle", "code": "deidentify"}),
            );
        }
    }
    if e.broke_glass {
        ev["meta"] = json!({"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "BTG",
                                           "display": "break the glass"}]});
    }
    if !entities.is_empty() {
        ev["entity"] = json!(entities);
    }
    ev
}

/// Who accessed one accessor's view of a patient's data.
#[derive(Default, Debug)]
pub struct Accessor {
    pub client: String,
    pub client_name: String,
    pub count: u64,
    pub resources: u64,
    pub denied: u64,
    pub broke_glass: u64,
    pub last: String,
    /// Each AuditEvent of this accessor, in the order read (for the portal's timeline).
    pub marks: Vec<Mark>,
}

/// One AuditEvent of an accessor: when, how many requests it records, whether they were
/// refused, and whether they broke the glass.
#[derive(Default, Debug, Clone)]
pub struct Mark {
    pub recorded: String,
    pub requests: u64,
    pub refused: bool,
    pub broke_glass: bool,
}

/// Every AuditEvent of the patient, summed per accessor (a user, or a client without one).
pub fn access_report(search: &Engine, patient: &str) -> Result<(u64, BTreeMap<String, Accessor>), FhirError> {
    accesses(search, "patient", &format!("Patient/{patient}"))
}

/// Every AuditEvent for a study (its disclosures name it), summed per accessor.
pub fn study_report(search: &Engine, study: &str) -> Result<(u64, BTreeMap<String, Accessor>), FhirError> {
    accesses(search, "entity", &format!("ResearchStudy/{study}"))
}

/// Every AuditEvent of the log holding `value` under search parameter `code`, per accessor.
fn accesses(search: &Engine, code: &str, value: &str) -> Result<(u64, BTreeMap<String, Accessor>), FhirError> {
    let repo = search.repo();
    let idx = search.current_all()?;
    let docs = idx.of("AuditEvent");
    let mut keys: Vec<(String, u64)> = Vec::new();
    for k in docs.posting(code, value)? {
        keys.extend(docs.get(k)?.map(|d| (d.id.clone(), d.version)));
    }
    drop(idx);
    let mut total = 0;
    let mut out: BTreeMap<String, Accessor> = BTreeMap::new();
    for (id, version) in keys {
        // Only what this log wrote counts: its versions carry the log's actor in the leaf.
        let authored = repo.view().version("AuditEvent", &id, version)?.is_some_and(|r| r.header.actor == ACTOR);
        if !authored {
            continue;
        }
        let s = repo.vread("AuditEvent", &id, version)?;
        let Some(body) = s.body.as_deref() else { continue };
        let v = json::parse(body.as_bytes(), usize::MAX).map_err(FhirError::internal)?;
        let requests = v
            .items(&["extension"])
            .find(|x| x.str_at(&["url"]) == Some(REQUESTS_EXTENSION))
            .and_then(|x| x.u64_at(&["valueInteger"]))
            .unwrap_or(1);
        total += requests;
        let mut client = String::new();
        let mut client_name = String::new();
        let mut user = None;
        for a in v.items(&["agent"]) {
            if a.str_at(&["who", "identifier", "system"]) == Some(CLIENT_SYSTEM) {
                client = a.str_at(&["who", "identifier", "value"]).unwrap_or("").to_string();
                client_name = a.str_at(&["who", "display"]).unwrap_or("").to_string();
            } else if let Some(r) = a.str_at(&["who", "reference"]) {
                user = Some(r.to_string());
            }
        }
        let who = user.unwrap_or_else(|| format!("client:{client}"));
        let acc = out.entry(who).or_default();
        acc.client = client;
        acc.client_name = client_name;
        let recorded = v.str_at(&["recorded"]).unwrap_or("").to_string();
        let refused = v.str_at(&["outcome"]) != Some("0");
        let broke_glass = v.items(&["meta", "security"]).any(|c| c.str_at(&["code"]) == Some("BTG"));
        acc.marks.push(Mark { recorded: recorded.clone(), requests, refused, broke_glass });
        if recorded > acc.last {
            acc.last = recorded;
        }
        if refused {
            acc.denied += requests;
        } else {
            acc.count += requests;
            for ent in v.items(&["entity"]).filter(|e| e.str_at(&["role", "code"]) == Some("4")) {
                let shown = ent
                    .items(&["detail"])
                    .find(|d| d.str_at(&["type"]) == Some("disclosures"))
                    .and_then(|d| d.str_at(&["valueString"]))
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(1);
                acc.resources += shown;
            }
        }
        if broke_glass {
            acc.broke_glass += requests;
        }
    }
    Ok((total, out))
}

/// The report as a FHIR Parameters resource.
pub fn report_parameters(patient: &str, total: u64, accessors: &BTreeMap<String, Accessor>) -> Json {
    report_of("patient", &format!("Patient/{patient}"), total, accessors, Vec::new())
}

/// A report on `subject` (named by part `name`), its accessors, and `more` parts after them.
pub fn report_of(
    name: &str,
    subject: &str,
    total: u64,
    accessors: &BTreeMap<String, Accessor>,
    more: Vec<serde_json::Value>,
) -> Json {
    let mut params = vec![
        json!({"name": name, "valueReference": {"reference": subject}}),
        json!({"name": "total", "valueInteger": total}),
    ];
    for (who, a) in accessors {
        let mut part = vec![
            json!({"name": "who", "valueString": who}),
            json!({"name": "client", "valueString": a.client}),
            json!({"name": "clientName", "valueString": a.client_name}),
            json!({"name": "count", "valueInteger": a.count}),
            json!({"name": "resources", "valueInteger": a.resources}),
            json!({"name": "denied", "valueInteger": a.denied}),
            json!({"name": "breakTheGlass", "valueInteger": a.broke_glass}),
        ];
        if !a.last.is_empty() {
            part.push(json!({"name": "last", "valueInstant": a.last}));
        }
        params.push(json!({"name": "accessor", "part": part}));
    }
    params.extend(more);
    let v = json!({"resourceType": "Parameters", "parameter": params});
    json::parse(v.to_string().as_bytes(), usize::MAX).unwrap_or(Json::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(patient: &str, success: bool, entities: &[&str]) -> Event {
        Event {
            recorded_ms: 1,
            interaction: "read",
            success,
            detail: None,
            purpose: None,
            study: None,
            deidentified: None,
            broke_glass: false,
            client_id: "app".into(),
            client_name: "App".into(),
            user: None,
            patient: Some(patient.into()),
            entities: entities.iter().map(ToString::to_string).collect(),
            requests: 1,
        }
    }

    #[test]
    fn disclosures_merge_per_accessor_and_patient_and_count_each_resource() {
        let batch = vec![
            event("a", true, &["Observation/1/_history/1", "Observation/2/_history/1", "Observation/1/_history/1"]),
            event("a", true, &["Observation/2/_history/1", "Observation/3/_history/1"]),
            event("b", true, &["Observation/9/_history/1"]),
            event("a", false, &[]),
            event("a", false, &[]),
        ];
        let out = aggregate(batch);
        assert_eq!(out.len(), 4, "one merged event for a, one for b, each refusal apart");
        let a = &out[0];
        assert_eq!(a.requests, 2);
        assert_eq!(
            a.entities,
            [
                ("Observation/1/_history/1".to_string(), 2),
                ("Observation/2/_history/1".to_string(), 2),
                ("Observation/3/_history/1".to_string(), 1)
            ]
        );
        assert_eq!(out[1].entities, [("Observation/9/_history/1".to_string(), 1)]);
        assert!(!out[2].first.success && !out[3].first.success);
    }
}
