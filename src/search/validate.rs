//! What a resource must be to be stored: valid against the R4 definitions and, for a
//! SearchParameter, one this server's search can evaluate (a stored SearchParameter indexes
//! every resource, so one it cannot use is refused rather than silently ignored).

use super::Engine;
use crate::error::{ErrorCode, FhirError};
use crate::fhir::json::Json;

/// Validates `res` as a resource of `rtype` against the R4 definitions. `prefix` relocates
/// issue paths (e.g. `Bundle.entry[3].resource`).
pub fn validate(engine: &Engine, rtype: &str, res: &Json, prefix: Option<&str>) -> Result<(), FhirError> {
    let actual = res.get("resourceType").and_then(Json::as_str);
    if actual != Some(rtype) {
        let mut e = FhirError::invalid(format!(
            "resourceType {} does not match the expected type {rtype}",
            actual.map_or("(missing)".to_string(), |a| format!("{a:?}"))
        ));
        e = e.at(prefix.map_or("resourceType".to_string(), |p| format!("{p}.resourceType")));
        return Err(e);
    }
    let issues = crate::fhir::validate::validate(engine.profiles(), res);
    if rtype == "SearchParameter" && issues.is_empty() {
        let idx = engine.current()?;
        if let Err(why) = super::params::custom_param(res, &idx.registry) {
            return Err(FhirError::not_supported(format!("this server cannot use this SearchParameter: {why}"))
                .at(prefix.unwrap_or("SearchParameter").to_string()));
        }
    }
    let errors: Vec<_> = issues
        .into_iter()
        .filter(|i| matches!(i.severity, crate::fhir::validate::Severity::Error))
        .take(50)
        .map(|i| {
            let path = match prefix {
                Some(p) => format!("{p}.{}", i.path.split_once('.').map_or("", |(_, rest)| rest)),
                None => i.path.clone(),
            };
            crate::error::Issue {
                severity: "error",
                code: i.code,
                diagnostics: format!("{}: {}", i.path, i.message),
                expression: vec![path.trim_end_matches('.').to_string()],
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(FhirError::with_issues(ErrorCode::Invalid, errors))
    }
}
