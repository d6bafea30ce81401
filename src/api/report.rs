//! `GET /Patient/{id}/$access-report`: who accessed the patient's data, what, how many times
//! and when last, summed from the disclosure log (AuditEvents on the ledger).

use actix_web::{HttpRequest, HttpResponse};

use super::{authz, json_response, AppState, Format};
use crate::auth::scopes::{Context, Perm};
use crate::error::FhirError;

pub async fn access_report(req: &HttpRequest, state: &AppState, id: &str) -> Result<HttpResponse, FhirError> {
    let caller = authz::caller(req);
    let allowed = (|| {
        authz::require(state, &caller, "AuditEvent", Perm::S, "operation")?;
        if !crate::fhir::is_valid_id(id) {
            return Err(FhirError::not_found(&format!("Patient/{id}")));
        }
        // A patient-context caller sees only their own patient's report.
        let patient_only = caller.covering("AuditEvent", Perm::S).all(|s| s.context == Context::Patient);
        if !caller.unrestricted && patient_only {
            return if caller.patient() == Some(id) {
                Ok(())
            } else {
                Err(FhirError::not_found(&format!("Patient/{id}")))
            };
        }
        authz::check_visible(state, &caller, "Patient", id, "operation")?;
        Ok(())
    })();
    allowed?;
    // Count every disclosure answered before this request.
    state.auth.disclosures.flush().await;
    let f = &Format::negotiate(req)?;
    let (total, accessors) = crate::disclosure::access_report(&state.search, id)?;
    Ok(json_response(200, &crate::disclosure::report_parameters(id, total, &accessors), f))
}
