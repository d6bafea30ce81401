//! The one error type of the server. [`ErrorCode`] is the table: every kind of failure a
//! client can see, with its HTTP status and FHIR IssueType, in one place. [`FhirError`] is an
//! actix [`ResponseError`], so handlers return `Result<_, FhirError>` and the error becomes an
//! OperationOutcome response (re-rendered in the negotiated format by the FHIR routes).

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};

use crate::fhir::json::Json;

/// Every kind of error the server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// A request or resource breaks a rule (400 `invalid`).
    Invalid,
    /// The body is not well-formed JSON, or not a resource (400 `structure`).
    Structure,
    /// Something needed is missing, such as the body (400 `required`).
    Required,
    /// A parameter, modifier, method or value this server does not support (400 `not-supported`).
    NotSupported,
    /// No access token was sent (401 `login`).
    Unauthenticated,
    /// The access token is bad, expired or revoked (401 `security`).
    InvalidToken,
    /// The caller may not do this (403 `forbidden`).
    Forbidden,
    /// The resource is not there, or hidden from the caller (404 `not-found`).
    NotFound,
    /// No such interaction, operation, type or compartment (404 `not-supported`).
    UnknownRoute,
    /// The response cannot be produced in the format asked for (406 `not-supported`).
    NotAcceptable,
    /// What is being created exists already (409 `duplicate`).
    Duplicate,
    /// Other writers kept changing the resource (409 `conflict`).
    Conflict,
    /// The resource was deleted (410 `deleted`).
    Gone,
    /// An `If-Match` or conditional criteria did not hold (412 `conflict`).
    PreconditionFailed,
    /// The body exceeds the configured limit (413 `too-costly`).
    TooLarge,
    /// The body's media type is not JSON (415 `not-supported`).
    UnsupportedMediaType,
    /// An admin call reached a node that is not the leader (421 `business-rule`).
    NotLeader,
    /// Well-formed, but cannot be applied (a failing patch; 422 `processing`).
    Unprocessable,
    /// Asked again too soon (a Bulk status polled faster than `Retry-After`; 429 `throttled`).
    TooManyRequests,
    /// A fault of the server; details go to its log, not to the client (500 `exception`).
    Internal,
    /// The ledger has no quorum or is catching up (503 `transient`).
    Unavailable,
}

impl ErrorCode {
    /// The HTTP status and the FHIR IssueType code.
    pub const fn parts(self) -> (u16, &'static str) {
        match self {
            Self::Invalid => (400, "invalid"),
            Self::Structure => (400, "structure"),
            Self::Required => (400, "required"),
            Self::NotSupported => (400, "not-supported"),
            Self::Unauthenticated => (401, "login"),
            Self::InvalidToken => (401, "security"),
            Self::Forbidden => (403, "forbidden"),
            Self::NotFound => (404, "not-found"),
            Self::UnknownRoute => (404, "not-supported"),
            Self::NotAcceptable => (406, "not-supported"),
            Self::Duplicate => (409, "duplicate"),
            Self::Conflict => (409, "conflict"),
            Self::Gone => (410, "deleted"),
            Self::PreconditionFailed => (412, "conflict"),
            Self::TooLarge => (413, "too-costly"),
            Self::UnsupportedMediaType => (415, "not-supported"),
            Self::NotLeader => (421, "business-rule"),
            Self::Unprocessable => (422, "processing"),
            Self::TooManyRequests => (429, "throttled"),
            Self::Internal => (500, "exception"),
            Self::Unavailable => (503, "transient"),
        }
    }

    pub const fn status(self) -> u16 {
        self.parts().0
    }

    pub const fn issue_type(self) -> &'static str {
        self.parts().1
    }
}

#[derive(Debug, Clone)]
pub struct Issue {
    pub severity: &'static str,
    /// FHIR IssueType code (`invalid`, `structure`, `not-found`, ...).
    pub code: &'static str,
    pub diagnostics: String,
    /// FHIRPath expressions locating the problem, when there is one.
    pub expression: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct FhirError {
    pub code: ErrorCode,
    pub issues: Vec<Issue>,
}

impl FhirError {
    pub fn new(code: ErrorCode, diagnostics: impl Into<String>) -> Self {
        let issue =
            Issue { severity: "error", code: code.issue_type(), diagnostics: diagnostics.into(), expression: vec![] };
        Self { code, issues: vec![issue] }
    }

    /// An error of `code` with issues of their own (validation findings, each with its path).
    pub fn with_issues(code: ErrorCode, issues: Vec<Issue>) -> Self {
        Self { code, issues }
    }

    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// The same error as another kind (its issues keep their codes and paths).
    #[must_use]
    pub fn recode(mut self, code: ErrorCode) -> Self {
        self.code = code;
        self
    }

    #[must_use]
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        if let Some(i) = self.issues.first_mut() {
            i.expression.push(expression.into());
        }
        self
    }
    pub fn invalid(diagnostics: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, diagnostics)
    }
    pub fn not_supported(diagnostics: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotSupported, diagnostics)
    }
    pub fn forbidden(diagnostics: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, diagnostics)
    }
    /// `$op` on `on` (a type, an instance or the system) names no operation this server has.
    pub fn unknown_operation(on: &str, op: &str) -> Self {
        Self::new(
            ErrorCode::UnknownRoute,
            format!("operation {op} is not supported on {on} (GET /metadata lists the operations)"),
        )
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} is not known"))
    }
    pub fn gone(what: &str) -> Self {
        Self::new(ErrorCode::Gone, format!("{what} has been deleted"))
    }
    pub fn precondition(diagnostics: impl Into<String>) -> Self {
        Self::new(ErrorCode::PreconditionFailed, diagnostics)
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Self::new(ErrorCode::Internal, "internal error; the request was not applied")
    }
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Unavailable, format!("the ledger is unavailable: {e}"))
    }

    /// Whether this says the resource is absent (never written, hidden, or deleted).
    pub fn is_absent(&self) -> bool {
        matches!(self.code, ErrorCode::NotFound | ErrorCode::Gone)
    }

    pub fn to_outcome(&self) -> Json {
        outcome(&self.issues)
    }

    /// The response in `content_type`, indented when `pretty`; a 401 says how to
    /// authenticate (RFC 6750 3: no error code when no token was sent, `invalid_token` when
    /// a bad one was).
    pub fn render(&self, content_type: &str, pretty: bool) -> HttpResponse {
        let body = self.to_outcome();
        let text = if pretty { body.to_pretty() } else { body.to_compact() };
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = HttpResponse::build(status);
        r.content_type(content_type);
        if self.status() == 401 {
            let value = match self.issues.first() {
                Some(i) if self.code == ErrorCode::InvalidToken => format!(
                    "Bearer realm=\"fhir-ledger\", error=\"invalid_token\", error_description=\"{}\"",
                    // A header value is visible ASCII: anything a token smuggled in is dropped.
                    i.diagnostics
                        .chars()
                        .map(|c| if c == '"' || c == '\\' { '\'' } else { c })
                        .filter(|c| c.is_ascii_graphic() || *c == ' ')
                        .collect::<String>()
                ),
                _ => "Bearer realm=\"fhir-ledger\"".to_string(),
            };
            if let Ok(v) = header::HeaderValue::from_str(&value) {
                r.insert_header((header::WWW_AUTHENTICATE, v));
            }
        }
        r.body(text)
    }
}

impl std::fmt::Display for FhirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = self.issues.first().map_or("", |i| i.diagnostics.as_str());
        write!(f, "{} {}: {first}", self.status(), self.code.issue_type())
    }
}

impl ResponseError for FhirError {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// In FHIR JSON; the FHIR routes re-render it in the format the request negotiated.
    fn error_response(&self) -> HttpResponse {
        self.render(FHIR_JSON, false)
    }
}

/// The FHIR JSON media type, as every response names it.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

impl From<std::io::Error> for FhirError {
    fn from(e: std::io::Error) -> Self {
        Self::internal(e)
    }
}

pub fn outcome(issues: &[Issue]) -> Json {
    let issues = issues
        .iter()
        .map(|i| {
            let mut members = vec![
                ("severity".to_string(), Json::String(i.severity.into())),
                ("code".to_string(), Json::String(i.code.into())),
                ("diagnostics".to_string(), Json::String(i.diagnostics.clone())),
            ];
            if !i.expression.is_empty() {
                members.push((
                    "expression".to_string(),
                    Json::Array(i.expression.iter().map(|e| Json::String(e.clone())).collect()),
                ));
            }
            Json::Object(members)
        })
        .collect();
    Json::Object(vec![
        ("resourceType".to_string(), Json::String("OperationOutcome".into())),
        ("issue".to_string(), Json::Array(issues)),
    ])
}

pub fn information(diagnostics: impl Into<String>) -> Json {
    outcome(&[Issue {
        severity: "information",
        code: "informational",
        diagnostics: diagnostics.into(),
        expression: vec![],
    }])
}
