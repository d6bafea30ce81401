//! The one error type of the FHIR layer. Every variant maps to an HTTP status and to an
//! OperationOutcome issue (severity, code, diagnostics, expression), in one place.

use crate::fhir::json::Json;

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
    pub status: u16,
    pub issues: Vec<Issue>,
}

impl FhirError {
    pub fn new(status: u16, code: &'static str, diagnostics: impl Into<String>) -> Self {
        Self {
            status,
            issues: vec![Issue { severity: "error", code, diagnostics: diagnostics.into(), expression: vec![] }],
        }
    }
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        if let Some(i) = self.issues.first_mut() {
            i.expression.push(expression.into());
        }
        self
    }
    pub fn invalid(diagnostics: impl Into<String>) -> Self {
        Self::new(400, "invalid", diagnostics)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(404, "not-found", format!("{what} is not known"))
    }
    pub fn gone(what: &str) -> Self {
        Self::new(410, "deleted", format!("{what} has been deleted"))
    }
    pub fn precondition(diagnostics: impl Into<String>) -> Self {
        Self::new(412, "conflict", diagnostics)
    }
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Self::new(500, "exception", "internal error; the request was not applied")
    }
    pub fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::new(503, "transient", format!("the ledger is unavailable: {e}"))
    }

    pub fn to_outcome(&self) -> Json {
        outcome(&self.issues)
    }
}

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
