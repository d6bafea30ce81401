//! One line per check, and the error plumbing that turns every failure into that line's detail.

use std::fmt::Display;

use fhir_sdk::client::Error as SdkError;

/// A check's result: the detail of a pass, or why it failed.
pub type Outcome = Result<String, String>;

/// The checks run so far.
#[derive(Default)]
pub struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    /// Prints the check's line at once (a hung later check still leaves the earlier lines).
    pub fn record(&mut self, name: &str, outcome: Outcome) {
        match outcome {
            Ok(detail) => {
                self.passed += 1;
                println!("PASS {name}: {detail}");
            }
            Err(detail) => {
                self.failed += 1;
                println!("FAIL {name}: {detail}");
            }
        }
    }

    pub fn failed(&self) -> usize {
        self.failed
    }

    pub fn passed(&self) -> usize {
        self.passed
    }
}

/// An error as one readable line. fhir-sdk's own Display prints an OperationOutcome with
/// `{:?}`, every empty `_ext` field included, so its outcomes get their issues only.
pub trait Describe {
    fn describe(&self) -> String;
}

impl Describe for SdkError {
    fn describe(&self) -> String {
        match self {
            SdkError::OperationOutcomeR4B(status, outcome) => {
                let issues: Vec<String> = outcome
                    .issue
                    .iter()
                    .flatten()
                    .map(|issue| {
                        let text = issue
                            .diagnostics
                            .clone()
                            .or_else(|| issue.details.as_ref().and_then(|d| d.text.clone()))
                            .unwrap_or_default();
                        format!("{} {}: {text}", issue.severity, issue.code)
                    })
                    .collect();
                format!("HTTP {status}, OperationOutcome [{}]", issues.join("; "))
            }
            other => other.to_string(),
        }
    }
}

/// Errors whose Display is already one readable line.
macro_rules! describe_by_display {
    ($($t:ty),*) => {$(
        impl Describe for $t {
            fn describe(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
describe_by_display!(
    String,
    &str,
    serde_json::Error,
    std::io::Error,
    fhir_sdk::BuilderError,
    fhir_sdk::DateFormatError,
    fhir_sdk::WrongResourceType
);

/// `?` with the step that failed in front of the error.
pub trait Context<T> {
    fn ctx(self, step: impl Display) -> Result<T, String>;
}

impl<T, E: Describe> Context<T> for Result<T, E> {
    fn ctx(self, step: impl Display) -> Result<T, String> {
        self.map_err(|e| format!("{step}: {}", e.describe()))
    }
}

impl<T> Context<T> for Option<T> {
    fn ctx(self, step: impl Display) -> Result<T, String> {
        self.ok_or_else(|| format!("{step}: missing"))
    }
}

/// Fails with `why()` unless `cond` holds.
pub fn ensure(cond: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(why())
    }
}
