//! The HTTP layer: routes, content negotiation and the mapping of every outcome to FHIR
//! responses. `create_app` builds the whole service so tests can drive it in-process.

pub mod admin;
pub mod authz;
pub mod bulk;
pub mod bundle;
pub mod console;
pub mod everything;
pub mod history;
pub mod import;

pub mod ledger;
pub mod metadata;
pub mod monitor;
pub mod pdex;
pub mod portal;
pub mod report;
pub mod research;
pub mod resource;
pub mod search;
pub mod smart;
pub mod supply;
pub mod timeline;

use std::sync::Arc;

use actix_web::http::header::{self, HeaderMap};
use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use futures::StreamExt;

use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::{self, Json};
use crate::repo::Repo;

/// Deepest JSON nesting accepted; real resources stay far below it.
pub const MAX_DEPTH: usize = 128;

pub struct AppState {
    pub repo: Arc<Repo>,
    /// The search index over `repo`.
    pub search: Arc<crate::search::Engine>,
    pub max_body_bytes: usize,
    pub admin: admin::AdminConfig,
    pub auth: Arc<crate::auth::Auth>,
    /// The Bulk exports this node runs.
    pub exports: Arc<crate::bulk::Exports>,
    /// The servers whose exports `$import` pulls.
    pub trusted_peers: Vec<crate::config::TrustedPeer>,
    /// The EPCIS schema and this node's capture jobs.
    pub supply: Arc<crate::supply::capture::Supply>,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    // Before `/admin`, whose default service would answer `/admin/auth/...` with a 404.
    admin::users::configure(cfg);
    admin::configure(cfg);
    smart::configure(cfg);
    portal::configure(cfg);
    console::configure(cfg);
    monitor::configure(cfg);
    cfg.service(fhir_routes());
}

fn fhir_routes() -> actix_web::Scope<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    use actix_web::dev::Service;
    web::scope("")
        .wrap(actix_web::middleware::from_fn(authz::middleware))
        .wrap_fn(|req, srv| {
            let fut = srv.call(req);
            async move {
                let mut res = fut.await?;
                // A handler's error was rendered as FHIR JSON: answer in the negotiated format.
                if let Some(e) = res.response().error().and_then(|e| e.as_error::<FhirError>()).cloned() {
                    let f = Format::negotiate(res.request()).unwrap_or_else(|_| Format::plain());
                    res = res.into_response(e.render(f.content_type, f.pretty));
                }
                // Browser-based SMART apps call from their own origin; tokens, not cookies,
                // authorize FHIR calls, so any origin may read what its token permits.
                res.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, header::HeaderValue::from_static("*"));
                // Responses carry health data: no shared or browser cache may keep them.
                if !res.headers().contains_key(header::CACHE_CONTROL) {
                    res.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
                }
                res.headers_mut().insert(
                    header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    header::HeaderValue::from_static(
                        "Location, ETag, Last-Modified, Content-Location, X-Ledger-Leaf, X-Ledger-Staleness-Ms, \
                         X-Ledger-Node, X-Ledger-Term, X-Ledger-Read-Leader, X-Ledger-Read-Index, X-Ledger-Applied",
                    ),
                );
                let point = res.request().extensions().get::<consensus::ReadPoint>().copied();
                if let Some(p) = point {
                    read_point_headers(res.headers_mut(), &p);
                }
                Ok(res)
            }
        })
        .route("/{tail:.*}", web::method(actix_web::http::Method::OPTIONS).to(preflight))
        .route("/metadata", web::get().to(metadata::capability_statement))
        .route("/health", web::get().to(health))
        .route("/", web::post().to(bundle::batch_or_transaction))
        .route("/", web::get().to(search::system_get))
        .route("/_search", web::post().to(search::system_post))
        .route("/_history", web::get().to(history::system))
        .route("/ledger/head", web::get().to(ledger::head))
        .route("/ledger/proof", web::get().to(ledger::leaf_proof))
        .route("/ledger/consistency", web::get().to(ledger::consistency))
        .route("/ledger/entries", web::get().to(ledger::entries))
        .route("/$import", web::post().to(import::kickoff))
        .route("/$export", web::get().to(bulk::system))
        .route("/$export", web::post().to(bulk::system))
        .route("/Patient/$export", web::get().to(bulk::patient))
        .route("/Patient/$export", web::post().to(bulk::patient))
        .route("/Patient/$member-match", web::post().to(pdex::member_match))
        .route("/Patient/{id}/$everything", web::get().to(everything::everything))
        .route("/ResearchStudy/{id}/$lock", web::post().to(research::lock))
        .route("/ResearchStudy/{id}/$access-report", web::get().to(research::access_report))
        .route("/ResearchStudy/{id}/$verify-lock", web::get().to(research::verify_lock))
        .route("/ResearchStudy/{id}/$verify-lock", web::post().to(research::verify_lock))
        .route("/epcis/capture", web::post().to(supply::capture))
        .route("/epcis/capture/{id}", web::get().to(supply::capture_job))
        .route("/epcis/events", web::get().to(supply::query))
        .route("/epcis/events/{tail:.+}", web::get().to(supply::event))
        .route("/epcis/epcs/{tail:.+}", web::get().to(supply::epc_events))
        .route("/$verify-product", web::get().to(supply::verify_product))
        .route("/$trace", web::get().to(supply::trace_product))
        .route("/01/{gtin}/21/{serial}", web::get().to(supply::digital_link))
        .route("/{type:Device|Medication}/{id}/$trace", web::get().to(supply::trace_resource))
        .route("/Group/$bulk-member-match", web::post().to(pdex::bulk_member_match))
        .route("/Group/{id}/$davinci-data-export", web::get().to(bulk::davinci_data_export))
        .route("/Group/{id}/$davinci-data-export", web::post().to(bulk::davinci_data_export))
        .route("/Group/{id}/$export", web::get().to(bulk::group))
        .route("/Group/{id}/$export", web::post().to(bulk::group))
        .route("/bulk/{job}", web::get().to(bulk::status))
        .route("/bulk/{job}", web::delete().to(bulk::cancel))
        .route("/bulk/{job}/{file}", web::get().to(bulk::file))
        .route("/{type}", web::get().to(search::type_get))
        .route("/{type}", web::post().to(resource::create))
        .route("/{type}", web::put().to(resource::conditional_update))
        .route("/{type}", web::delete().to(resource::conditional_delete))
        .route("/{type}/_search", web::post().to(search::type_post))
        .route("/{type}/_history", web::get().to(history::type_level))
        .route("/{type}/{id}", web::get().to(resource::read))
        .route("/{type}/{id}", web::put().to(resource::update))
        .route("/{type}/{id}", web::patch().to(resource::patch))
        .route("/{type}/{id}", web::delete().to(resource::delete))
        .route("/{type}/{id}/{op}", web::post().to(ledger::erase))
        .route("/{type}/{id}/_history", web::get().to(history::instance))
        .route("/{compartment}/{id}/{type}", web::get().to(search::compartment))
        .route("/{type}/{id}/_history/{vid}", web::get().to(resource::vread))
        .route("/{type}/{id}/_history/{vid}/{op}", web::get().to(ledger::version_proof))
        .default_service(web::to(not_found))
}

/// The read barrier of a read interaction: linearizable by default; with
/// `Cache-Control: max-stale=N` (seconds), served from this node's state when it is at most N
/// seconds behind, and then says how far in `X-Ledger-Staleness-Ms`. Where the read was served
/// (node, term, read index) goes into the response headers ([`read_point_headers`]).
pub async fn read_barrier(req: &HttpRequest, repo: &Repo) -> Result<(), FhirError> {
    if req.extensions().get::<authz::Barriered>().is_some() {
        return Ok(());
    }
    let max_stale = max_stale(req.headers())?;
    let point = repo.read_barrier(max_stale).await?;
    req.extensions_mut().insert(point);
    Ok(())
}

pub const STALENESS_HEADER: &str = "x-ledger-staleness-ms";

/// Says where a read was served, so that a client history that is not linearizable can name
/// the node, its term and the read index of each read (ARCHITECTURE.md, "Reads").
fn read_point_headers(headers: &mut HeaderMap, p: &consensus::ReadPoint) {
    let fields = [
        (STALENESS_HEADER, p.staleness.map(|d| d.as_millis().to_string())),
        ("x-ledger-node", Some(p.node.to_string())),
        ("x-ledger-term", Some(p.term.to_string())),
        ("x-ledger-read-leader", p.leader.map(|l| l.to_string())),
        ("x-ledger-read-index", p.read_index.map(|i| i.to_string())),
        ("x-ledger-applied", p.applied.map(|i| i.to_string())),
    ];
    for (name, value) in fields {
        if let Some(v) = value.and_then(|v| header::HeaderValue::from_str(&v).ok()) {
            headers.insert(header::HeaderName::from_static(name), v);
        }
    }
}

fn max_stale(headers: &HeaderMap) -> Result<Option<std::time::Duration>, FhirError> {
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',').map(str::trim) {
            let Some(v) = directive.strip_prefix("max-stale") else { continue };
            let v = v.trim_start();
            // `max-stale` without a value accepts any staleness (RFC 9111 5.2.1.2).
            let Some(secs) = v.strip_prefix('=') else { return Ok(Some(std::time::Duration::MAX)) };
            let secs: u64 = secs.trim().trim_matches('"').parse().map_err(|_| {
                FhirError::invalid(format!("Cache-Control max-stale={secs}: expected a number of seconds"))
            })?;
            return Ok(Some(std::time::Duration::from_secs(secs)));
        }
    }
    Ok(None)
}

async fn preflight() -> HttpResponse {
    HttpResponse::NoContent()
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST, PUT, PATCH, DELETE, OPTIONS"))
        .insert_header((
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "Authorization, Content-Type, Accept, Prefer, If-Match, If-None-Exist, If-None-Match, If-Modified-Since, X-Purpose-Of-Use",
        ))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, "86400"))
        .finish()
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(r#"{"status":"ok"}"#)
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    FhirError::new(ErrorCode::UnknownRoute, format!("no FHIR interaction at {} {}", req.method(), req.path()))
        .error_response()
}

/// How to write the response body.
#[derive(Clone, Debug)]
pub struct Format {
    pub pretty: bool,
    pub content_type: &'static str,
}

pub use crate::error::FHIR_JSON;

impl Format {
    pub fn plain() -> Self {
        Self { pretty: false, content_type: FHIR_JSON }
    }

    /// `_format` wins over `Accept`; JSON in either spelling is served, XML is a 406.
    pub fn negotiate(req: &HttpRequest) -> Result<Self, FhirError> {
        let query = crate::codec::parse_query(req.query_string());
        let pretty = query.iter().any(|(k, v)| k == "_pretty" && v == "true");
        let json_type = |t: &str| -> Option<&'static str> {
            let t = t.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            match t.as_str() {
                "json" | "application/fhir+json" | "application/json+fhir" | "*/*" | "application/*" | "" => {
                    Some(FHIR_JSON)
                }
                "application/json" => Some("application/json; charset=utf-8"),
                _ => None,
            }
        };
        if let Some((_, f)) = query.iter().find(|(k, _)| k == "_format") {
            return json_type(f).map(|content_type| Self { pretty, content_type }).ok_or_else(|| not_acceptable(f));
        }
        let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
        if accept.trim().is_empty() {
            return Ok(Self { pretty, content_type: FHIR_JSON });
        }
        accept
            .split(',')
            .find_map(json_type)
            .map(|content_type| Self { pretty, content_type })
            .ok_or_else(|| not_acceptable(accept))
    }
}

fn not_acceptable(what: &str) -> FhirError {
    FhirError::new(
        ErrorCode::NotAcceptable,
        format!(
            "cannot produce {what:?}: this server speaks FHIR JSON (application/fhir+json) only; XML is not supported"
        ),
    )
}

/// A response builder with the status and the negotiated content type.
pub fn body_response(status: u16, f: &Format) -> actix_web::HttpResponseBuilder {
    let mut b = HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    b.content_type(f.content_type);
    b
}

pub fn json_response(status: u16, body: &Json, f: &Format) -> HttpResponse {
    let text = if f.pretty { body.to_pretty() } else { body.to_compact() };
    body_response(status, f).body(text)
}

/// The media types FHIR interactions read.
const FHIR_BODIES: &[&str] = &[
    "application/fhir+json",
    "application/json",
    "application/json+fhir",
    "application/json-patch+json",
    "application/x-www-form-urlencoded",
    "text/plain",
    "",
];

/// Reads the request body within the configured limit and checks its media type.
pub async fn read_body(req: &HttpRequest, payload: web::Payload, limit: usize) -> Result<Vec<u8>, FhirError> {
    read_body_of(req, payload, limit, FHIR_BODIES).await
}

/// [`read_body`] for a body of one of `accepted` media types (the first one is named in the error).
pub async fn read_body_of(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    accepted: &[&str],
) -> Result<Vec<u8>, FhirError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let t = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !accepted.contains(&t.as_str()) {
            return Err(FhirError::new(
                ErrorCode::UnsupportedMediaType,
                format!("Content-Type {t} is not supported; send {}", accepted.first().unwrap_or(&"JSON")),
            ));
        }
    }
    let declared =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    let too_large = || FhirError::new(ErrorCode::TooLarge, format!("request body exceeds the limit of {limit} bytes"));
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| FhirError::invalid(format!("could not read the request body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Parses a request body as a resource; syntax errors name line and column.
pub fn parse_resource(body: &[u8]) -> Result<Json, FhirError> {
    if body.is_empty() {
        return Err(FhirError::new(ErrorCode::Required, "the request body is empty; a FHIR resource was expected"));
    }
    let v = json::parse(body, MAX_DEPTH)
        .map_err(|e| FhirError::new(ErrorCode::Structure, format!("malformed JSON: {e}")))?;
    if !matches!(v, Json::Object(_)) {
        return Err(FhirError::new(ErrorCode::Structure, "the body must be a JSON object (a FHIR resource)"));
    }
    Ok(v)
}

/// `W/"3"` or `"3"` → 3.
pub fn parse_etag(headers: &HeaderMap, name: &header::HeaderName) -> Result<Option<u64>, FhirError> {
    let Some(v) = headers.get(name) else { return Ok(None) };
    let s = v.to_str().unwrap_or("").trim();
    let inner = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    inner
        .parse::<u64>()
        .map(Some)
        .map_err(|_| FhirError::invalid(format!("{name} {s:?} is not a version ETag like W/\"3\"")))
}

/// The base URL clients used to reach us, for `Location` and `fullUrl`.
pub fn base_url(req: &HttpRequest) -> String {
    let info = req.connection_info();
    format!("{}://{}", info.scheme(), info.host())
}

/// What `Prefer: return=` asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

pub fn prefer_return(req: &HttpRequest) -> Return {
    let prefer = req.headers().get_all("prefer").filter_map(|v| v.to_str().ok()).collect::<Vec<_>>().join(",");
    for part in prefer.split([',', ';']) {
        match part.trim() {
            "return=minimal" => return Return::Minimal,
            "return=OperationOutcome" => return Return::OperationOutcome,
            "return=representation" => return Return::Representation,
            _ => {}
        }
    }
    Return::Representation
}

pub fn prefer_lenient(req: &HttpRequest) -> bool {
    req.headers()
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split([',', ';']).any(|p| p.trim() == "handling=lenient"))
}
