//! Supply-chain traceability over HTTP (the `supply` layer does the work):
//!
//! - the EPCIS 2.0 REST binding: `POST /epcis/capture` (202 and a capture job),
//!   `GET /epcis/capture/{id}`, `GET /epcis/events` (SimpleEventQuery parameters),
//!   `GET /epcis/events/{eventID}`, `GET /epcis/epcs/{epc}/events`;
//! - `GET /$verify-product` and its GS1 Digital Link form `GET /01/{gtin}/21/{serial}`: a GS1
//!   Lightweight Verification Messaging answer with the events it rests on and their proofs;
//! - `GET /$trace` (`gtin` + `serial`, `gtin` + `lot`, or `epc`), `GET /Device/{id}/$trace`,
//!   `GET /Medication/{id}/$trace`: the custody chain as `Parameters`, and for a lot its
//!   recall reach (the patients who received it, only those the caller may see).
//!
//! Every route reads and writes through the caller: capture commits with the caller's write
//! policy, and events, certificates and patients are admitted one by one by the caller's access.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use super::{authz, json_response, read_barrier, AppState, Format};
use crate::auth::scopes::Perm;
use crate::auth::Caller;
use crate::epcis::{self, epc};
use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::Json;
use crate::supply::{capture, events, partners, trace, verify, GTIN_SYSTEM, URI_SYSTEM};

/// The EPCIS JSON media type answers use.
const EPCIS_JSON: &str = "application/ld+json";

fn epcis_response(status: u16, body: &Value) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status).unwrap_or(actix_web::http::StatusCode::OK);
    HttpResponse::build(status).content_type(EPCIS_JSON).body(body.to_string())
}

/// Whether the caller may see the event recorded as `Provenance/{id}`.
fn admitter<'a>(state: &'a AppState, caller: &'a Caller) -> impl Fn(&str) -> Result<bool, FhirError> + 'a {
    move |id: &str| match state.auth.access(caller) {
        None => Ok(true),
        Some(access) => Ok(crate::auth::access::visible(&state.search, &access, "Provenance", id)?.0),
    }
}

async fn reader(req: &HttpRequest, state: &AppState, interaction: &'static str) -> Result<Arc<Caller>, FhirError> {
    read_barrier(req, &state.repo).await?;
    let caller = authz::caller(req);
    authz::require(state, &caller, "Provenance", Perm::R, interaction)?;
    Ok(caller)
}

/// `POST /epcis/capture`
pub async fn capture(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let state = &**state;
    let caller = authz::caller(&req);
    authz::require(state, &caller, "Provenance", Perm::C, "create")?;
    let behaviour = req.headers().get("gs1-capture-error-behaviour").and_then(|v| v.to_str().ok());
    if behaviour.is_some_and(|b| !b.trim().eq_ignore_ascii_case("rollback")) {
        return Err(FhirError::not_supported(
            "GS1-Capture-Error-Behaviour: only rollback is offered (a document is recorded whole or not at all)",
        ));
    }
    let body = super::read_body_of(&req, payload, state.max_body_bytes, &[EPCIS_JSON, "application/json", ""]).await?;
    let doc: Value = serde_json::from_slice(&body)
        .map_err(|e| FhirError::new(ErrorCode::Structure, format!("malformed JSON: {e}")))?;
    let submitter = if caller.unrestricted {
        None
    } else {
        read_barrier(&req, &state.repo).await?;
        partners::by_client(&state.search, &caller.claims.client_id)?
    };
    let now = crate::fhir::now_ms();
    let prepared = {
        let (supply, search, doc) = (state.supply.clone(), state.search.clone(), doc);
        let submitter = submitter.clone();
        tokio::task::spawn_blocking(move || capture::prepare(&supply, &search, &doc, submitter.as_ref(), now))
            .await
            .map_err(FhirError::internal)??
    };
    let duplicates = capture::record(&state.repo, &authz::capture_policy(state, &caller), &prepared).await?;
    let id = uuid::Uuid::new_v4().to_string();
    state.supply.remember(capture::Job {
        id: id.clone(),
        success: true,
        events: prepared.iter().map(|p| p.event_id.clone()).collect(),
        duplicates,
        errors: Vec::new(),
        finished: crate::fhir::instant(now),
    });
    Ok(HttpResponse::Accepted()
        .insert_header(("Location", format!("/epcis/capture/{id}")))
        .insert_header(("GS1-EPCIS-Version", "2.0.0"))
        .content_type(EPCIS_JSON)
        .body(
            job_json(&state.supply.job(&id).unwrap_or_else(|| capture::Job {
                id,
                success: true,
                events: Vec::new(),
                duplicates,
                errors: Vec::new(),
                finished: String::new(),
            }))
            .to_string(),
        ))
}

fn job_json(j: &capture::Job) -> Value {
    json!({"captureID": j.id, "createdAt": j.finished, "finishedAt": j.finished, "running": false, "success": j.success,
           "captureErrorBehaviour": "rollback", "errors": j.errors, "eventIDs": j.events, "duplicates": j.duplicates})
}

/// `GET /epcis/capture/{id}`
pub async fn capture_job(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let caller = authz::caller(&req);
    authz::require(&state, &caller, "Provenance", Perm::C, "read")?;
    let job = state.supply.job(&path).ok_or_else(|| FhirError::not_found(&format!("capture job {path}")))?;
    Ok(epcis_response(200, &job_json(&job)))
}

fn query_document(events: &[Value]) -> Value {
    json!({
        "@context": [epcis::CONTEXT],
        "type": "EPCISQueryDocument",
        "schemaVersion": "2.0",
        "creationDate": crate::fhir::instant(crate::fhir::now_ms()),
        "epcisBody": {"queryResults": {"queryName": "SimpleEventQuery", "resultsBody": {"eventList": events}}},
    })
}

/// The SimpleEventQuery parameters this server answers; every other one is a 400.
const QUERY_PARAMS: [&str; 21] = [
    "eventType",
    "GE_eventTime",
    "LT_eventTime",
    "GE_recordTime",
    "LT_recordTime",
    "EQ_action",
    "EQ_bizStep",
    "EQ_disposition",
    "EQ_readPoint",
    "EQ_bizLocation",
    "MATCH_epc",
    "MATCH_parentID",
    "MATCH_inputEPC",
    "MATCH_outputEPC",
    "MATCH_anyEPC",
    "MATCH_epcClass",
    "MATCH_anyEPCClass",
    "EQ_eventID",
    "perPage",
    "nextPageToken",
    "_format",
];

/// One parsed query: values per parameter (a parameter's values are alternatives).
struct Query {
    params: Vec<(String, Vec<String>)>,
    per_page: usize,
    offset: usize,
}

fn parse_query(req: &HttpRequest) -> Result<Query, FhirError> {
    let mut q = Query { params: Vec::new(), per_page: 30, offset: 0 };
    for (k, v) in crate::codec::parse_query(req.query_string()) {
        if !QUERY_PARAMS.contains(&k.as_str()) {
            return Err(FhirError::not_supported(format!(
                "query parameter {k} is not supported by this EPCIS repository; supported: {}",
                QUERY_PARAMS.join(", ")
            ))
            .at(k));
        }
        let number = |what: &str| {
            v.parse::<usize>()
                .map_err(|_| FhirError::invalid(format!("{what}={v}: expected a whole number")).at(what.to_string()))
        };
        match k.as_str() {
            "perPage" => q.per_page = number("perPage")?.clamp(1, 1000),
            "nextPageToken" => q.offset = number("nextPageToken")?,
            "_format" => {}
            _ => {
                let values: Vec<String> =
                    v.split([',', '|']).map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
                if k.starts_with("MATCH_") && values.iter().any(|x| x.contains('*')) {
                    return Err(FhirError::not_supported(format!(
                        "{k}: EPC patterns (*) are not supported; give whole identifiers"
                    ))
                    .at(k));
                }
                if k.contains("Time") && values.iter().any(|x| epcis::time_ms(x).is_none()) {
                    return Err(
                        FhirError::invalid(format!("{k}={v}: expected an RFC 3339 timestamp with a zone")).at(k)
                    );
                }
                q.params.push((k, values));
            }
        }
    }
    Ok(q)
}

fn matches(r: &events::Recorded, q: &Query) -> bool {
    let f = &r.facts;
    let norm = |xs: &[String]| xs.iter().map(|x| epc::normalise(x)).collect::<Vec<_>>();
    let any_in = |have: &[String], want: &[String]| have.iter().any(|h| norm(want).contains(h));
    q.params.iter().all(|(k, vs)| {
        let one = |x: Option<&str>| x.is_some_and(|x| vs.iter().any(|v| v == x));
        let time =
            |t: i64, ge: bool| vs.iter().filter_map(|v| epcis::time_ms(v)).all(|b| if ge { t >= b } else { t < b });
        let record_ms = epcis::time_ms(&r.record_time).unwrap_or_default();
        match k.as_str() {
            "eventType" => one(Some(&f.event_type)),
            "GE_eventTime" => time(f.time_ms, true),
            "LT_eventTime" => time(f.time_ms, false),
            "GE_recordTime" => time(record_ms, true),
            "LT_recordTime" => time(record_ms, false),
            "EQ_action" => one(f.action.as_deref()),
            "EQ_bizStep" => f.biz_step.as_ref().is_some_and(|b| vs.iter().any(|v| &epcis::BIZ_STEP.word(v) == b)),
            "EQ_disposition" => {
                f.disposition.as_ref().is_some_and(|d| vs.iter().any(|v| &epcis::DISPOSITION.word(v) == d))
            }
            "EQ_readPoint" => f.read_point.as_ref().is_some_and(|p| norm(vs).contains(p)),
            "EQ_bizLocation" => f.biz_location.as_ref().is_some_and(|p| norm(vs).contains(p)),
            "MATCH_epc" => any_in(&f.epcs, vs) || any_in(&f.children, vs),
            "MATCH_parentID" => f.parent.as_ref().is_some_and(|p| norm(vs).contains(p)),
            "MATCH_inputEPC" | "MATCH_outputEPC" => {
                let key = if k == "MATCH_inputEPC" { "inputEPCList" } else { "outputEPCList" };
                let list: Vec<String> = r
                    .event
                    .get(key)
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(epc::normalise)
                    .collect();
                any_in(&list, vs)
            }
            "MATCH_anyEPC" => any_in(&f.identifiers(), vs),
            "MATCH_epcClass" | "MATCH_anyEPCClass" => any_in(&f.classes, vs),
            "EQ_eventID" => vs.iter().any(|v| v == &r.event_id),
            _ => true,
        }
    })
}

/// The most selective indexed lookup a query allows: `(search code, value)` alternatives.
fn selector(q: &Query) -> Option<Vec<(&'static str, String)>> {
    for (k, vs) in &q.params {
        let (code, system) = match k.as_str() {
            "MATCH_epc" | "MATCH_parentID" | "MATCH_inputEPC" | "MATCH_outputEPC" | "MATCH_anyEPC"
            | "MATCH_epcClass" | "MATCH_anyEPCClass" => ("epc", URI_SYSTEM),
            "EQ_eventID" => ("epcis-event", ""),
            _ => continue,
        };
        return Some(
            vs.iter()
                .map(|v| {
                    if code == "epcis-event" {
                        let s = if v.starts_with("ni:///") { crate::supply::HASH_SYSTEM } else { URI_SYSTEM };
                        (code, format!("{s}|{v}"))
                    } else {
                        (code, format!("{system}|{}", epc::normalise(v)))
                    }
                })
                .collect(),
        );
    }
    q.params.iter().find(|(k, _)| k == "EQ_bizStep").map(|(_, vs)| {
        vs.iter()
            .map(|v| ("biz-step", format!("{}|{}", crate::supply::BIZ_STEP_SYSTEM, epcis::BIZ_STEP.word(v))))
            .collect()
    })
}

fn run_query(state: &AppState, caller: &Caller, q: &Query) -> Result<(Vec<Value>, bool), FhirError> {
    let admit = admitter(state, caller);
    let tag = format!("{}|{}", crate::supply::TAG_SYSTEM, crate::supply::EVENT_TAG);
    let lookups = selector(q).unwrap_or_else(|| vec![("_tag", tag)]);
    let mut found: Vec<events::Recorded> = Vec::new();
    for (code, value) in &lookups {
        for r in events::find(&state.search, code, value, &admit)? {
            if !found.iter().any(|x| x.provenance == r.provenance) && matches(&r, q) {
                found.push(r);
            }
        }
    }
    found.sort_by(|a, b| (a.facts.time_ms, &a.record_time).cmp(&(b.facts.time_ms, &b.record_time)));
    let more = found.len() > q.offset + q.per_page;
    let page = found.into_iter().skip(q.offset).take(q.per_page).map(|r| r.event).collect();
    Ok((page, more))
}

/// `GET /epcis/events`
pub async fn query(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let caller = reader(&req, &state, "search-type").await?;
    let q = parse_query(&req)?;
    let (page, more) = run_query(&state, &caller, &q)?;
    let mut res = HttpResponse::Ok();
    res.content_type(EPCIS_JSON).insert_header(("GS1-EPCIS-Version", "2.0.0"));
    if more {
        let mut pairs: Vec<(String, String)> =
            crate::codec::parse_query(req.query_string()).into_iter().filter(|(k, _)| k != "nextPageToken").collect();
        pairs.push(("nextPageToken".into(), (q.offset + q.per_page).to_string()));
        let qs: Vec<String> = pairs
            .iter()
            .map(|(k, v)| {
                format!("{k}={}", percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC))
            })
            .collect();
        res.insert_header(("Link", format!("<{}?{}>; rel=\"next\"", req.path(), qs.join("&"))));
    }
    Ok(res.body(query_document(&page).to_string()))
}

/// The percent-decoded tail of a path (`ni:///…` and Digital Links hold `/` and `:`).
fn decoded_tail(req: &HttpRequest, prefix: &str, suffix: &str) -> Result<String, FhirError> {
    let raw = req.uri().path();
    let tail = raw.strip_prefix(prefix).and_then(|t| t.strip_suffix(suffix)).unwrap_or_default();
    let s = percent_encoding::percent_decode_str(tail)
        .decode_utf8()
        .map_err(|_| FhirError::invalid("the path is not UTF-8"))?;
    if s.is_empty() {
        return Err(FhirError::invalid("the path names no identifier"));
    }
    Ok(s.into_owned())
}

/// `GET /epcis/events/{eventID}`: the event and any error declaration of it.
pub async fn event(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let caller = reader(&req, &state, "read").await?;
    let id = decoded_tail(&req, "/epcis/events/", "")?;
    let admit = admitter(&state, &caller);
    let found = events::by_event_id(&state.search, &id, &admit)?;
    if found.is_empty() {
        return Err(FhirError::not_found(&format!("EPCIS event {id}")));
    }
    Ok(epcis_response(200, &query_document(&found.into_iter().map(|r| r.event).collect::<Vec<_>>())))
}

/// `GET /epcis/epcs/{epc}/events`
pub async fn epc_events(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let caller = reader(&req, &state, "search-type").await?;
    let id = decoded_tail(&req, "/epcis/epcs/", "/events")?;
    let mut q = parse_query(&req)?;
    q.params.push(("MATCH_anyEPC".into(), vec![id]));
    let (page, _) = run_query(&state, &caller, &q)?;
    Ok(epcis_response(200, &query_document(&page)))
}

fn s(v: impl Into<String>) -> Json {
    Json::String(v.into())
}

fn part(name: &str, kind: &str, value: Json) -> Json {
    Json::obj(vec![("name", s(name)), (kind, value)])
}

fn parts(name: &str, items: Vec<Json>) -> Json {
    Json::obj(vec![("name", s(name)), ("part", Json::Array(items))])
}

/// The events a trace rests on, each with its inclusion proof at one signed head.
async fn proofs(state: &AppState, t: &trace::Trace) -> Result<(Vec<Json>, Vec<Json>), FhirError> {
    let head = super::ledger::signed_head(&state.repo).await?;
    let nodes = consensus::proof::Memo::new(state.repo.view());
    let mut steps = Vec::new();
    for st in &t.steps {
        let r = &st.rec;
        let f = &r.facts;
        let mut p = vec![
            part("eventID", "valueUri", s(&r.event_id)),
            part("eventType", "valueCode", s(&f.event_type)),
            part("eventTime", "valueString", s(r.event.get("eventTime").and_then(Value::as_str).unwrap_or_default())),
        ];
        for (name, v) in [("action", &f.action), ("bizStep", &f.biz_step), ("disposition", &f.disposition)] {
            if let Some(v) = v {
                p.push(part(name, "valueCode", s(v)));
            }
        }
        if let Some(l) = f.biz_location.as_ref().or(f.read_point.as_ref()) {
            p.push(part("location", "valueUri", s(l)));
        }
        if let Some(party) = &st.party {
            p.push(part("partner", "valueReference", Json::obj(vec![("reference", s(party))])));
        }
        if let Some(via) = &st.via {
            p.push(part("via", "valueUri", s(via)));
        }
        p.push(part("signature", "valueCode", s(st.signature)));
        p.push(part("licence", "valueCode", s(st.licence.0.code())));
        if let Some(c) = &st.licence.1 {
            p.push(part("certificate", "valueReference", Json::obj(vec![("reference", s(c))])));
        }
        if let Some(why) = &st.declared {
            p.push(part("declaredInError", "valueString", s(why)));
        }
        p.push(part(
            "provenance",
            "valueReference",
            Json::obj(vec![("reference", s(format!("Provenance/{}/_history/{}", r.provenance, r.version)))]),
        ));
        p.push(parts("proof", super::ledger::inclusion_parts_from(&state.repo, &nodes, &head, r.leaf)?));
        steps.push(parts("step", p));
    }
    Ok((steps, head.to_parts()))
}

fn findings(t: &trace::Trace) -> Vec<Json> {
    t.findings
        .iter()
        .map(|f| {
            let mut p = vec![part("code", "valueCode", s(f.code)), part("message", "valueString", s(&f.message))];
            if let Some(e) = &f.event {
                p.push(part("eventID", "valueUri", s(e)));
            }
            parts("finding", p)
        })
        .collect()
}

/// GTIN (14 digits) from a request: 8, 12, 13 or 14 digits, left-padded.
fn gtin_param(v: &str) -> Result<String, FhirError> {
    if !(v.chars().all(|c| c.is_ascii_digit()) && matches!(v.len(), 8 | 12 | 13 | 14)) {
        return Err(FhirError::invalid(format!("gtin {v:?}: expected 8, 12, 13 or 14 digits")).at("gtin"));
    }
    Ok(format!("{v:0>14}"))
}

/// The subject a `$trace` names.
enum Subject {
    Instance(String),
    Lot { gtin: String, lot: String },
}

fn subject_of(params: &[(String, String)]) -> Result<Subject, FhirError> {
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    for (k, _) in params {
        if !["gtin", "serial", "lot", "epc", "_format", "_pretty"].contains(&k.as_str()) {
            return Err(FhirError::not_supported(format!("$trace takes gtin with serial or lot, or epc; not {k}"))
                .at(k.clone()));
        }
    }
    match (get("epc"), get("gtin"), get("serial"), get("lot")) {
        (Some(e), None, None, None) => Ok(Subject::Instance(epc::normalise(e))),
        (None, Some(g), Some(serial), None) => Ok(Subject::Instance(epc::sgtin_link(&gtin_param(g)?, serial))),
        (None, Some(g), None, Some(lot)) => Ok(Subject::Lot { gtin: gtin_param(g)?, lot: lot.to_string() }),
        _ => Err(FhirError::invalid("$trace takes gtin and serial (an instance), gtin and lot (a lot), or epc")),
    }
}

/// `GET /$trace`
pub async fn trace_product(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let caller = reader(&req, &state, "operation").await?;
    let f = Format::negotiate(&req)?;
    let subject = subject_of(&crate::codec::parse_query(req.query_string()))?;
    let body = traced(&state, &caller, &subject).await?;
    Ok(json_response(200, &body, &f))
}

/// `GET /Device/{id}/$trace`, `GET /Medication/{id}/$trace`: the instance a Device's UDI names,
/// or the lot a Medication's batch names.
pub async fn trace_resource(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (rtype, id) = path.into_inner();
    let caller = reader(&req, &state, "operation").await?;
    let f = Format::negotiate(&req)?;
    authz::require(&state, &caller, &rtype, Perm::R, "operation")?;
    let d = authz::check_visible(&state, &caller, &rtype, &id, "operation")?;
    let stored = state.repo.read(&rtype, &id)?;
    let body = stored.parsed()?.ok_or_else(|| FhirError::not_found(&format!("{rtype}/{id}")))?;
    authz::disclosed(&state, &caller, "operation", &[(rtype.clone(), id.clone(), stored.version)], &d);
    let subject = if rtype == "Device" {
        let gtin = body.items(&["udiCarrier"]).find_map(|u| u.str_at(&["deviceIdentifier"])).map(String::from);
        match (gtin, body.str_at(&["serialNumber"]), body.str_at(&["lotNumber"])) {
            (Some(g), Some(serial), _) => Subject::Instance(epc::sgtin_link(&gtin_param(&g)?, serial)),
            (Some(g), None, Some(lot)) => Subject::Lot { gtin: gtin_param(&g)?, lot: lot.to_string() },
            _ => {
                return Err(FhirError::invalid(format!(
                    "{rtype}/{id} has no UDI device identifier with a serial or lot number"
                )))
            }
        }
    } else {
        let gtin = body
            .items(&["code", "coding"])
            .find(|c| c.str_at(&["system"]) == Some(GTIN_SYSTEM))
            .and_then(|c| c.str_at(&["code"]));
        match (gtin, body.str_at(&["batch", "lotNumber"])) {
            (Some(g), Some(lot)) => Subject::Lot { gtin: gtin_param(g)?, lot: lot.to_string() },
            _ => return Err(FhirError::invalid(format!("{rtype}/{id} has no GTIN code with a batch lot number"))),
        }
    };
    let out = traced(&state, &caller, &subject).await?;
    Ok(json_response(200, &out, &f))
}

async fn traced(state: &AppState, caller: &Caller, subject: &Subject) -> Result<Json, FhirError> {
    let admit = admitter(state, caller);
    match subject {
        Subject::Instance(id) => {
            let t = trace::trace(&state.search, &state.supply.directory, id, &admit)?;
            if t.steps.is_empty() {
                return Err(FhirError::not_found(&format!("any recorded event of {id}")));
            }
            let (status, ..) = verify::verdict(&t, &verify::Asked { lot: None, expiry: None, today: &today() });
            let (steps, head) = proofs(state, &t).await?;
            let mut p = vec![part("subject", "valueUri", s(id)), part("status", "valueCode", s(status))];
            p.extend(findings(&t));
            p.extend(steps);
            p.extend(t.children.iter().map(|c| part("child", "valueUri", s(c))));
            p.push(parts("treeHead", head));
            Ok(Json::obj(vec![("resourceType", s("Parameters")), ("parameter", Json::Array(p))]))
        }
        Subject::Lot { gtin, lot } => {
            let class = epc::lgtin_link(gtin, lot);
            let commissioned = events::find_all(
                &state.search,
                &[
                    ("epc", &format!("{URI_SYSTEM}|{class}")),
                    ("biz-step", &format!("{}|commissioning", crate::supply::BIZ_STEP_SYSTEM)),
                ],
                &admit,
            )?;
            let mut instances: Vec<String> = commissioned.iter().flat_map(|r| r.facts.epcs.clone()).collect();
            instances.sort();
            instances.dedup();
            let mut p = vec![part("subject", "valueUri", s(&class))];
            for i in instances.iter().take(LOT_INSTANCES) {
                let t = trace::trace(&state.search, &state.supply.directory, i, &admit)?;
                let (status, ..) = verify::verdict(&t, &verify::Asked { lot: None, expiry: None, today: &today() });
                let mut ip = vec![part("epc", "valueUri", s(i)), part("status", "valueCode", s(status))];
                ip.extend(findings(&t));
                p.push(parts("instance", ip));
            }
            if instances.len() > LOT_INSTANCES {
                p.push(part(
                    "truncated",
                    "valueString",
                    s(format!("{} instances; the first {LOT_INSTANCES} are traced", instances.len())),
                ));
            }
            for (patient, via) in reach(state, caller, gtin, lot)? {
                p.push(parts(
                    "patient",
                    vec![
                        part("patient", "valueReference", Json::obj(vec![("reference", s(patient))])),
                        part("via", "valueReference", Json::obj(vec![("reference", s(via))])),
                    ],
                ));
            }
            Ok(Json::obj(vec![("resourceType", s("Parameters")), ("parameter", Json::Array(p))]))
        }
    }
}

/// How many instances of a lot one `$trace` follows.
const LOT_INSTANCES: usize = 1000;

fn today() -> String {
    crate::fhir::instant(crate::fhir::now_ms())[..10].to_string()
}

/// Recall reach: `(Patient/…, what links them)` for every dispense, administration and device
/// of lot `lot` of `gtin` the caller may see, each disclosure logged.
fn reach(state: &AppState, caller: &Caller, gtin: &str, lot: &str) -> Result<Vec<(String, String)>, FhirError> {
    let mut candidates: Vec<(String, String)> = Vec::new();
    {
        let idx = state.search.current()?;
        let ids = |rtype: &str, all: &[(&str, &str)]| -> Result<Vec<String>, FhirError> {
            Ok(events::matching(&idx, rtype, all)?.into_iter().map(|h| h.id).collect())
        };
        for m in ids("Medication", &[("lot-number", lot), ("code", &format!("{GTIN_SYSTEM}|{gtin}"))])? {
            for rtype in ["MedicationDispense", "MedicationAdministration"] {
                for id in ids(rtype, &[("medication", &format!("Medication/{m}"))])? {
                    candidates.push((rtype.to_string(), id));
                }
            }
        }
        // R4's `udi-di` is a string parameter (prefix match): the GTIN is checked on the body.
        for id in ids("Device", &[("lot-number", lot)])? {
            candidates.push(("Device".to_string(), id));
        }
    }
    let mut out = Vec::new();
    for (rtype, id) in candidates {
        let Ok(d) = authz::check_visible(state, caller, &rtype, &id, "operation") else { continue };
        let Ok(stored) = state.repo.read(&rtype, &id) else { continue };
        let Some(body) = stored.parsed()? else { continue };
        if rtype == "Device" && !body.items(&["udiCarrier"]).any(|u| u.str_at(&["deviceIdentifier"]) == Some(gtin)) {
            continue;
        }
        let patient = ["subject", "patient"]
            .iter()
            .find_map(|k| body.str_at(&[k, "reference"]))
            .filter(|r| r.starts_with("Patient/"));
        if let Some(patient) = patient {
            authz::disclosed(state, caller, "operation", &[(rtype.clone(), id.clone(), stored.version)], &d);
            out.push((patient.to_string(), format!("{rtype}/{id}")));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `GET /$verify-product?gtin=&serial=&lot=&expiry=`
pub async fn verify_product(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let params = crate::codec::parse_query(req.query_string());
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    for (k, _) in &params {
        if !["gtin", "serial", "lot", "expiry", "corrUUID", "requestorGLN", "context", "_format"].contains(&k.as_str())
        {
            return Err(FhirError::not_supported(format!("$verify-product does not take {k}")).at(k.clone()));
        }
    }
    let (Some(gtin), Some(serial)) = (get("gtin"), get("serial")) else {
        return Err(FhirError::invalid(
            "$verify-product needs gtin and serial (lot and expiry are checked when given)",
        ));
    };
    verified(&req, &state, &gtin, &serial, get("lot"), get("expiry"), get("corrUUID")).await
}

/// `GET /01/{gtin}/21/{serial}?10={lot}&17={expiry}&linkType=verificationService`
pub async fn digital_link(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, FhirError> {
    let (gtin, serial) = path.into_inner();
    let params = crate::codec::parse_query(req.query_string());
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match get("linkType").as_deref() {
        Some("verificationService" | "gs1:verificationService" | "https://gs1.org/voc/verificationService") => {}
        other => {
            return Err(FhirError::not_supported(format!(
                "linkType {}: this resolver answers linkType=verificationService only",
                other.unwrap_or("(none)")
            )))
        }
    }
    verified(&req, &state, &gtin, &serial, get("10"), get("17"), get("corrUUID")).await
}

async fn verified(
    req: &HttpRequest,
    state: &AppState,
    gtin: &str,
    serial: &str,
    lot: Option<String>,
    expiry: Option<String>,
    corr: Option<String>,
) -> Result<HttpResponse, FhirError> {
    let caller = reader(req, state, "operation").await?;
    let gtin = gtin_param(gtin)?;
    if let Some(e) = &expiry {
        verify::expiry(e)
            .ok_or_else(|| FhirError::invalid(format!("expiry {e:?}: expected YYMMDD or YYYY-MM-DD")).at("expiry"))?;
    }
    let id = epc::sgtin_link(&gtin, serial);
    let admit = admitter(state, &caller);
    let t = trace::trace(&state.search, &state.supply.directory, &id, &admit)?;
    let today = today();
    let asked = verify::Asked { lot: lot.as_deref(), expiry: expiry.as_deref(), today: &today };
    let corr = corr.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut body = Json::from(verify::response(&t, &asked, &corr, &crate::fhir::instant(crate::fhir::now_ms())));
    let (steps, head) = proofs(state, &t).await?;
    if let Some(ours) = body.get_mut("fhirLedger") {
        ours.set("steps", Json::Array(steps));
        ours.set("treeHead", Json::Array(head));
    }
    Ok(HttpResponse::Ok().content_type("application/json").body(body.to_compact()))
}
