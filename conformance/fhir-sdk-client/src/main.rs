//! fhir-sdk (crates.io), the Rust FHIR client with R4B but no R4 models, against fhir-ledger
//! (R4). One line per check; exit status 1 if any check fails. README.md says what R4B vs R4
//! breaks and whose it is to fix.
//!
//! Environment: FHIR_BASE (a server with `--auth off`), SYNTHEA_BUNDLE (a transaction Bundle
//! file), R4_EXAMPLES_DIR (official R4 example resources; optional).

mod fidelity;
mod gaps;
mod report;
mod rest;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use fhir_sdk::{
    client::{Client, RequestSettings},
    r4b::resources::{DetectedIssue, Evidence},
    HttpClient,
};
use serde_json::json;

use crate::{gaps::Gaps, report::Report, rest::Run};

fn main() -> ExitCode {
    let Ok(base) = std::env::var("FHIR_BASE") else {
        eprintln!("FHIR_BASE is not set (the base URL of a fhir-ledger server run with --auth off)");
        return ExitCode::from(2);
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let report = runtime.block_on(run(&base));
    println!("{} passed, {} failed", report.passed(), report.failed());
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run(base: &str) -> Report {
    let mut report = Report::default();
    let client = match base.parse().map_err(|e| format!("FHIR_BASE {base}: {e}")).and_then(|url| {
        Client::builder()
            .base_url(url)
            // A server that hangs must fail the check, not the run; no retries hide flakiness.
            .request_settings(RequestSettings::default().retries(0).timeout(Some(Duration::from_mins(2))))
            .build()
            .map_err(|e| format!("client: {e}"))
    }) {
        Ok(client) => client,
        Err(e) => {
            report.record("client", Err(e));
            return report;
        }
    };
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let run = Run { client, tag };
    let gaps = Gaps { run: &run, http: HttpClient::new(), base: base.to_owned() };

    match gaps.capabilities().await {
        Ok((detail, types)) => {
            report.record("capabilities", Ok(detail));
            report.record("capabilities-r4-types", Gaps::capabilities_r4_only(&types));
        }
        Err(e) => {
            // No server: one line, not a hundred about unreachable setup.
            let unreachable = e.contains("error sending request");
            report.record("capabilities", Err(e));
            if unreachable {
                return report;
            }
        }
    }
    report.record("fhir-version-negotiation", gaps.version_negotiation().await);

    match run.create().await {
        Ok((detail, mut created)) => {
            report.record("create", Ok(detail));
            report.record("read", run.read(&created).await);
            report.record("update", run.update(&mut created).await);
            report.record("vread-history", run.vread(&created).await);
            report.record("search-token", run.search_token(&created).await);
            report.record("search-reference", run.search_reference(&created).await);
            report.record("search-string", run.search_string(&created).await);
            report.record("search-date", run.search_date(&created).await);
        }
        Err(e) => report.record("create", Err(e)),
    }
    report.record("delete", run.delete().await);
    report.record("paging", run.paging(12, 5).await);
    report.record("transaction", run.transaction().await);
    report.record("r4-only-type", gaps.r4_only_type().await);
    // R4's detectedissue-status has `mitigated`; R4B binds ObservationStatus, which has not.
    report.record(
        "r4-code-gap",
        gaps.decode_gap::<DetectedIssue>(json!({"resourceType": "DetectedIssue", "status": "mitigated"}), "mitigated")
            .await,
    );
    // R4B's redesigned Evidence requires variableDefinition (1..*), which R4 has not.
    report.record(
        "r4-evidence-gap",
        gaps.decode_gap::<Evidence>(
            json!({"resourceType": "Evidence", "status": "active", "exposureBackground": {"display": "adults"}}),
            "variableDefinition",
        )
        .await,
    );
    report.record("r4b-only-types", gaps.r4b_only_types().await);

    match std::env::var_os("SYNTHEA_BUNDLE").map(PathBuf::from) {
        None => report.record("synthea", Err("SYNTHEA_BUNDLE is not set".into())),
        Some(path) => match gaps.load(&path).await {
            Err(e) => report.record("synthea-load", Err(e)),
            Ok((detail, types)) => {
                report.record("synthea-load", Ok(detail));
                for (resource_type, count) in types {
                    report.record(&format!("synthea {resource_type}"), gaps.read_type(&resource_type, count).await);
                }
            }
        },
    }
    if let Some(dir) = std::env::var_os("R4_EXAMPLES_DIR").map(PathBuf::from) {
        if let Err(e) = gaps.examples(&dir, &mut report).await {
            report.record("r4-examples", Err(e));
        }
    }
    report
}
