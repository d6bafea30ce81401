//! `GET /metadata`: a CapabilityStatement that claims exactly what this build does.

use std::collections::BTreeMap;

use actix_web::{web, HttpRequest, HttpResponse};

use super::{base_url, json_response, AppState, Format};
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::search::params::{Kind, Registry};

fn s(v: &str) -> Json {
    Json::String(v.into())
}

fn o(members: Vec<(&str, Json)>) -> Json {
    Json::Object(members.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn param(p: &crate::search::params::Param) -> Json {
    let mut members = vec![("name", s(&p.code))];
    if !p.url.is_empty() {
        members.push(("definition", s(&p.url)));
    }
    members.push(("type", s(p.kind.as_str())));
    let doc = if p.custom {
        format!("custom SearchParameter stored on this server ({}); applies to resources written before and after it (the index is rebuilt for its types when it is stored)", p.expression)
    } else {
        p.expression.clone()
    };
    if !doc.is_empty() {
        members.push(("documentation", s(&doc)));
    }
    o(members)
}

/// Our ledger operations have no HL7 OperationDefinition; the canonical names them uniquely.
fn operation(name: &str, doc: &str) -> Json {
    o(vec![
        ("name", s(name)),
        ("definition", s(&format!("urn:fhir-ledger:OperationDefinition/{name}"))),
        ("documentation", s(doc)),
    ])
}

/// An operation an HL7 implementation guide defines.
fn standard_operation(name: &str, definition: &str, doc: &str) -> Json {
    o(vec![("name", s(name)), ("definition", s(definition)), ("documentation", s(doc))])
}

/// For each type, the `Source:parameter` pairs whose reference parameter may point at it: what
/// `_revinclude` on a search of that type can bring in.
fn revincludes<'a>(registry: &Registry, types: &'a [String]) -> BTreeMap<&'a str, Vec<Json>> {
    let mut by_target: BTreeMap<&str, Vec<Json>> = BTreeMap::new();
    for source in types {
        for p in registry.for_type(source).filter(|p| p.kind == Kind::Reference) {
            let pair = s(&format!("{source}:{}", p.code));
            for t in types.iter().filter(|t| p.targets.is_empty() || p.targets.contains(t)) {
                by_target.entry(t.as_str()).or_default().push(pair.clone());
            }
        }
    }
    by_target
}

const BULK_EXPORT: &str = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition";

pub async fn capability_statement(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let f = &Format::negotiate(&req)?;
    let index = state.search.current()?;
    let interactions: Vec<Json> =
        ["read", "vread", "update", "patch", "delete", "history-instance", "history-type", "create", "search-type"]
            .iter()
            .map(|c| o(vec![("code", s(c))]))
            .collect();
    let types = state.repo.profiles.resource_types();
    let revincludes = revincludes(&index.registry, types);
    let resources: Vec<Json> = types
        .iter()
        .map(|t| {
            // Special parameters (Location.near) are defined but not executed: not claimed.
            let params: Vec<Json> =
                index.registry.for_type(t).filter(|p| p.kind != Kind::Special).map(|p| param(p)).collect();
            let mut includes = vec![s("*")];
            includes.extend(
                index
                    .registry
                    .for_type(t)
                    .filter(|p| p.kind == Kind::Reference)
                    .map(|p| s(&format!("{t}:{}", p.code))),
            );
            let mut operations = vec![operation(
                "proof",
                "GET /{type}/{id}/_history/{vid}/$proof: RFC 9162 inclusion proof of the version, with the signed tree head",
            )];
            if t.as_str() == "Patient" {
                operations.push(operation(
                    "access-report",
                    "GET /Patient/{id}/$access-report: who accessed the patient's data, what, how many times and when last (Parameters)",
                ));
                operations.push(standard_operation(
                    "export",
                    &format!("{BULK_EXPORT}/patient-export"),
                    "GET or POST /Patient/$export (Bulk Data 2.0.0 with _until): asynchronous, pinned to a signed tree head, every file with a trust label and proofs",
                ));
                operations.push(standard_operation(
                    "member-match",
                    "http://hl7.org/fhir/us/davinci-hrex/OperationDefinition/member-match",
                    "POST /Patient/$member-match (HRex 1.1.0): one member by demographics and coverage, with an HRex Consent naming the requesting payer",
                ));
                operations.push(standard_operation(
                    "everything",
                    "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "GET /Patient/{id}/$everything (_since, _type, _count): the patient, its compartment and what that references, paged across types",
                ));
                operations.push(operation(
                    "erase",
                    "POST /Patient/{id}/$erase: crypto-shreds the patient's compartment (every version unreadable, every proof still valid)",
                ));
            }
            if t.as_str() == "ResearchStudy" {
                operations.push(operation(
                    "lock",
                    "POST /ResearchStudy/{id}/$lock (the study's team, X-Purpose-Of-Use: HRESCH): freezes every version the study may see of its enrolled subjects at a signed tree head; answers the lock file (List, signature, multiproof)",
                ));
                operations.push(operation(
                    "access-report",
                    "GET /ResearchStudy/{id}/$access-report (the study's team with HRESCH, or an auditor): who accessed what for the study and how often, and every change to a subject's enrolment or research Consent after enrolment",
                ));
                operations.push(operation(
                    "verify-lock",
                    "GET /ResearchStudy/{id}/$verify-lock (the latest lock on the ledger) or POST with a kept lock file: every locked version still in the ledger unchanged, the ledger only grown since, and every amendment with who, when and why",
                ));
            }
            if matches!(t.as_str(), "Device" | "Medication") {
                operations.push(operation(
                    "trace",
                    "GET /Device/{id}/$trace (the instance its UDI names) or /Medication/{id}/$trace (the lot its batch names): the custody chain from the EPCIS events on the ledger, as for GET /$trace",
                ));
            }
            if t.as_str() == "Group" {
                operations.push(standard_operation(
                    "export",
                    &format!("{BULK_EXPORT}/group-export"),
                    "GET or POST /Group/{id}/$export: the Bulk export of the group's patient members",
                ));
                operations.push(standard_operation(
                    "bulk-member-match",
                    "http://hl7.org/fhir/us/davinci-pdex/OperationDefinition/BulkMemberMatch",
                    "POST /Group/$bulk-member-match (PDex 2.1.0, async): MatchedMembers, NonMatchedMembers and ConsentConstrainedMembers Groups; the matched one is stored for the requesting payer",
                ));
                operations.push(standard_operation(
                    "davinci-data-export",
                    "http://hl7.org/fhir/us/davinci-pdex/OperationDefinition/BulkMemberMatchDataExport",
                    "GET or POST /Group/{id}/$davinci-data-export (exportType hl7.fhir.us.davinci-pdex#payertopayer): the requesting payer's export of its matched members, at most five years back, each member's consent checked when it runs",
                ));
            }
            o(vec![
                ("type", s(t)),
                ("operation", Json::Array(operations)),
                ("profile", s(&format!("http://hl7.org/fhir/StructureDefinition/{t}"))),
                ("interaction", Json::Array(interactions.clone())),
                ("versioning", s("versioned-update")),
                ("readHistory", Json::Bool(true)),
                ("updateCreate", Json::Bool(true)),
                ("conditionalCreate", Json::Bool(true)),
                ("conditionalRead", s("full-support")),
                ("conditionalUpdate", Json::Bool(true)),
                ("conditionalDelete", s("single")),
                ("searchInclude", Json::Array(includes)),
                ("searchRevInclude", Json::Array(revincludes.get(t.as_str()).cloned().unwrap_or_default())),
                ("searchParam", Json::Array(params)),
            ])
        })
        .collect();
    let auth = &state.auth;
    let (documentation, security) = if auth.enabled {
        let uri = |name: &str, path: &str| o(vec![("url", s(name)), ("valueUri", s(&auth.endpoint(path)))]);
        let security = o(vec![
            (
                "extension",
                Json::Array(vec![o(vec![
                    // Only the four URIs R4's definition of this extension names; revocation and
                    // introspection are in .well-known/smart-configuration.
                    ("url", s("http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris")),
                    (
                        "extension",
                        Json::Array(vec![
                            uri("authorize", "/auth/authorize"),
                            uri("token", "/auth/token"),
                            uri("manage", "/portal"),
                        ]),
                    ),
                ])]),
            ),
            ("cors", Json::Bool(true)),
            (
                "service",
                Json::Array(vec![o(vec![
                    (
                        "coding",
                        Json::Array(vec![o(vec![
                            ("system", s("http://terminology.hl7.org/CodeSystem/restful-security-service")),
                            ("code", s("SMART-on-FHIR")),
                        ])]),
                    ),
                    ("text", s("OAuth2 using SMART-on-FHIR profile (see /.well-known/smart-configuration)")),
                ])]),
            ),
            ("description", s("SMART App Launch 2.x: scopes v1 and v2 on every interaction, the patient's Consents on every read and search, every disclosure an AuditEvent")),
        ]);
        ("SMART-on-FHIR authorization: every request needs a bearer token from /auth/token.", Some(security))
    } else {
        ("Authorization is OFF on this node (local development): no token is checked.", None)
    };
    let documentation = format!(
        "{documentation} Supply chain: the GS1 EPCIS 2.0 REST binding at /epcis (POST /epcis/capture, GET \
         /epcis/capture/{{id}}, /epcis/events, /epcis/events/{{eventID}}, /epcis/epcs/{{epc}}/events); each event is a \
         Provenance (and a SupplyDelivery for shipping and receiving) signed by its trading partner."
    );
    let mut rest = vec![("mode", s("server")), ("documentation", s(&documentation))];
    if let Some(sec) = security {
        rest.push(("security", sec));
    }
    let cs = o(vec![
        ("resourceType", s("CapabilityStatement")),
        ("status", s("active")),
        ("date", s("2026-11-24")),
        ("publisher", s("fhir-ledger")),
        ("kind", s("instance")),
        ("instantiates", Json::Array(vec![s("http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data")])),
        ("software", o(vec![("name", s("fhir-ledger")), ("version", s(env!("CARGO_PKG_VERSION")))])),
        (
            "implementation",
            o(vec![
                ("description", s("FHIR R4 server over a signed, encrypted, Raft-replicated ledger")),
                ("url", s(&base_url(&req))),
            ]),
        ),
        ("fhirVersion", s("4.0.1")),
        ("format", Json::Array(vec![s("application/fhir+json"), s("json")])),
        ("patchFormat", Json::Array(vec![s("application/json-patch+json")])),
        (
            "rest",
            Json::Array(vec![o({
                rest.push(("resource", Json::Array(resources)));
                rest.push((
                    "operation",
                    Json::Array(vec![
                        standard_operation(
                            "export",
                            &format!("{BULK_EXPORT}/export"),
                            "GET or POST /$export: the system-level Bulk export of what the token may read",
                        ),
                        operation(
                            "trace",
                            "GET /$trace?gtin=&serial= (an instance), ?gtin=&lot= (a lot, with its recall reach: the patients who received it that the caller may see) or ?epc=: every EPCIS custody step with partner, time, place, signature, licence and inclusion proof at one signed tree head, and what is wrong with the chain (never commissioned, cloned serial, custody gap, recalled, dispensed, altered or badly signed event, unlicensed partner)",
                        ),
                        operation(
                            "verify-product",
                            "GET /$verify-product?gtin=&serial=&lot=&expiry= or GET /01/{gtin}/21/{serial}?10=&17=&linkType=verificationService (GS1 Digital Link): a GS1 Lightweight Verification Messaging answer (verified, verificationFailureReason, additionalInfo) computed from the ledger, with the trace's findings and the events it rests on with their proofs",
                        ),
                        operation(
                            "import",
                            "POST /$import (ping-and-pull, async; Parameters manifestUrl and peer): pulls a [[trusted_peer]]'s export, verifies its trust label and head, imports it as one transaction with a PDex transmitter Provenance",
                        ),
                    ]),
                ));
                rest.extend([(
                    "interaction",
                    Json::Array(vec![
                        o(vec![("code", s("transaction"))]),
                        o(vec![("code", s("batch"))]),
                        o(vec![("code", s("history-system"))]),
                        o(vec![("code", s("search-system"))]),
                    ]),
                )]);
                rest
            })]),
        ),
    ]);
    Ok(json_response(200, &cs, f))
}
