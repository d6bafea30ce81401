//! R4 SearchParameter definitions (from `fhir-profiles/search-parameters.json`), reduced to
//! what the index can evaluate today: simple element paths, optionally restricted to a
//! reference target type (`X.subject.where(resolve() is Patient)`).
//!
//! The search issue grows this into a FHIRPath-subset evaluator; the index format (keyed
//! digests of `code`, `value`) does not change with it.

use std::collections::BTreeMap;

use crate::definitions::Definitions;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParamType {
    Token,
    Reference,
    Other(String),
}

/// One path a parameter reads from a resource type.
#[derive(Clone, Debug)]
pub struct ParamPath {
    /// Element names below the resource root, e.g. `["subject"]`.
    pub elements: Vec<String>,
    /// For references: only targets of this type count (`resolve() is Patient`).
    pub target: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SearchParam {
    pub code: String,
    pub kind: ParamType,
    pub paths: Vec<ParamPath>,
    /// Allowed reference target types (the SearchParameter's `target`).
    pub targets: Vec<String>,
}

/// The parameters the index maintains; every other R4 parameter is refused with a 400 until
/// the search issue lands (never silently ignored).
pub const INDEXED: &[&str] = &["identifier", "patient", "subject"];

#[derive(Debug, Default)]
pub struct SearchParams {
    by_type: BTreeMap<String, BTreeMap<String, SearchParam>>,
    /// `(type, code)` of a parameter whose terms another's give: that one's code and the type
    /// `code` is restricted to ([`SearchParams::alias`]).
    aliases: BTreeMap<(String, String), (String, String)>,
}

impl SearchParams {
    pub fn load(defs: &Definitions) -> Result<Self, String> {
        let bundle = defs.json("search-parameters.json")?;
        let mut by_type: BTreeMap<String, BTreeMap<String, SearchParam>> = BTreeMap::new();
        for entry in bundle["entry"].as_array().into_iter().flatten() {
            let r = &entry["resource"];
            let Some(code) = r["code"].as_str() else { continue };
            if !INDEXED.contains(&code) {
                continue;
            }
            let kind = match r["type"].as_str() {
                Some("token") => ParamType::Token,
                Some("reference") => ParamType::Reference,
                Some(other) => ParamType::Other(other.to_string()),
                None => continue,
            };
            let expression = r["expression"].as_str().unwrap_or_default();
            let targets: Vec<String> =
                r["target"].as_array().into_iter().flatten().filter_map(|t| t.as_str().map(String::from)).collect();
            for base in r["base"].as_array().into_iter().flatten().filter_map(|b| b.as_str()) {
                let paths: Vec<ParamPath> = expression.split('|').filter_map(|e| parse_path(e.trim(), base)).collect();
                if paths.is_empty() {
                    continue;
                }
                by_type.entry(base.to_string()).or_default().insert(
                    code.to_string(),
                    SearchParam { code: code.to_string(), kind: kind.clone(), paths, targets: targets.clone() },
                );
            }
        }
        let aliases = aliases(&by_type);
        Ok(Self { by_type, aliases })
    }

    /// The parameter that answers `code` on `rtype`, and the one type `code` takes of it:
    /// every path of `code` is one of its paths restricted to that type
    /// (`Observation.subject.where(resolve() is Patient)` against `Observation.subject`) and
    /// it has no other. A `Type/id` term of `code` then holds exactly the resources holding
    /// that term of the other, so only the other's terms are kept (one posting per resource
    /// instead of two in the state's lookup tables, issue 17).
    pub fn alias(&self, rtype: &str, code: &str) -> Option<(&str, &str)> {
        self.aliases.get(&(rtype.to_string(), code.to_string())).map(|(by, t)| (by.as_str(), t.as_str()))
    }

    pub fn get(&self, rtype: &str, code: &str) -> Option<&SearchParam> {
        self.by_type.get(rtype)?.get(code)
    }

    pub fn for_type(&self, rtype: &str) -> impl Iterator<Item = &SearchParam> {
        self.by_type.get(rtype).into_iter().flat_map(|m| m.values())
    }
}

/// [`SearchParams::alias`] of every parameter that has one.
fn aliases(by_type: &BTreeMap<String, BTreeMap<String, SearchParam>>) -> BTreeMap<(String, String), (String, String)> {
    let mut out = BTreeMap::new();
    let elements = |sp: &SearchParam| -> Vec<Vec<String>> {
        let mut e: Vec<Vec<String>> = sp.paths.iter().map(|p| p.elements.clone()).collect();
        e.sort();
        e.dedup();
        e
    };
    for (rtype, params) in by_type {
        for sp in params.values().filter(|sp| sp.kind == ParamType::Reference) {
            let mut targets = sp.paths.iter().map(|p| p.target.as_deref());
            let Some(Some(target)) = targets.next() else { continue };
            if !targets.all(|t| t == Some(target)) {
                continue;
            }
            let by = params.values().find(|o| {
                o.code != sp.code
                    && o.kind == ParamType::Reference
                    && o.paths.iter().all(|p| p.target.is_none())
                    && elements(o) == elements(sp)
            });
            if let Some(by) = by {
                out.insert((rtype.clone(), sp.code.clone()), (by.code.clone(), target.to_string()));
            }
        }
    }
    out
}

/// `path.where(resolve() is T)` as `path` and `T` (a type name); anything else `None`. The
/// one form of restriction to a reference type both registries read (this one, and
/// `search::params`' derived parameters).
pub fn split_restriction(expr: &str) -> Option<(&str, &str)> {
    let (path, rest) = expr.split_once(".where(resolve() is ")?;
    let t = rest.strip_suffix(')')?;
    (!t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric())).then_some((path, t))
}

/// `Type.a.b` or `Type.a.where(resolve() is X)` for `base`; anything else is not indexable yet.
fn parse_path(expr: &str, base: &str) -> Option<ParamPath> {
    let rest = expr.strip_prefix(base)?.strip_prefix('.')?;
    let (path, target) = match split_restriction(rest) {
        Some((p, t)) => (p, Some(t.to_string())),
        None => (rest, None),
    };
    let elements: Vec<String> = path.split('.').map(String::from).collect();
    if elements.iter().any(|e| e.is_empty() || !e.chars().all(|c| c.is_ascii_alphanumeric())) {
        return None;
    }
    Some(ParamPath { elements, target })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restriction_to_one_reference_type_splits_and_nothing_else_does() {
        assert_eq!(split_restriction("subject.where(resolve() is Patient)"), Some(("subject", "Patient")));
        for other in [
            "subject",
            "subject.where(resolve() is Patient",
            "subject.where(resolve() is )",
            "subject.where(resolve() is Patient or Group)",
            "subject.where(resolve() is Patient).id",
        ] {
            assert_eq!(split_restriction(other), None, "{other}");
        }
    }

    #[test]
    fn parses_simple_and_typed_paths() {
        let p = parse_path("Observation.subject.where(resolve() is Patient)", "Observation").unwrap();
        assert_eq!(p.elements, vec!["subject"]);
        assert_eq!(p.target.as_deref(), Some("Patient"));
        assert!(parse_path("Observation.value as Quantity", "Observation").is_none());
        assert!(parse_path("Condition.subject", "Observation").is_none());
    }

    #[test]
    fn loads_patient_param_for_observation() {
        let sp = SearchParams::load(&Definitions::Embedded).unwrap();
        let p = sp.get("Observation", "patient").unwrap();
        assert_eq!(p.kind, ParamType::Reference);
        assert_eq!(p.paths[0].elements, vec!["subject"]);
        assert!(sp.get("Patient", "identifier").is_some());
        assert!(sp.get("Patient", "subject").is_none());
    }

    #[test]
    fn patient_is_answered_by_subject_where_it_is_subject_restricted_to_patients() {
        let sp = SearchParams::load(&Definitions::Embedded).unwrap();
        for t in ["Observation", "Encounter", "Condition", "Procedure", "DiagnosticReport", "CarePlan"] {
            assert_eq!(sp.alias(t, "patient"), Some(("subject", "Patient")), "{t}");
            assert_eq!(sp.alias(t, "subject"), None, "{t}");
        }
        // No unrestricted parameter over the same element: patient keeps its own terms.
        for t in ["Immunization", "Claim", "ExplanationOfBenefit", "AllergyIntolerance", "Patient"] {
            assert_eq!(sp.alias(t, "patient"), None, "{t}");
        }
    }
}
