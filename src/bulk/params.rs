//! The kick-off parameters of `$export` (Bulk Data IG 2.0.0, with 3.0's `_until`), from a
//! query string or a `Parameters` body, checked before a job exists: an unknown or unsupported
//! parameter or value is a 400 naming it, unless the client asked `Prefer: handling=lenient`,
//! in which case it is left out and said so in the export's `error` file. Nothing is ignored
//! silently: a server that once ignored `_typeFilter` exported more than it was asked to.

use serde::{Deserialize, Serialize};

use crate::error::FhirError;
use crate::fhir::json::Json;

/// The output formats the IG names for NDJSON; all mean the same thing here.
const FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];
/// `includeAssociatedData` values this server supports.
pub const LATEST_PROVENANCE: &str = "LatestProvenanceResources";
pub const RELEVANT_PROVENANCE: &str = "RelevantProvenanceResources";

/// What an export is of.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Level {
    /// `/$export`: every resource the caller may read.
    System,
    /// `/Patient/$export`: the patient compartments (all patients, or those named by `patient`).
    Patient,
    /// `/Group/{id}/$export`: the compartments of the group's patient members.
    Group(String),
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct Params {
    /// Resources whose state at the export's tree head changed after this instant.
    pub since_ms: Option<i64>,
    /// The state as of this instant: each resource's newest version no later than it.
    pub until_ms: Option<i64>,
    /// Only these types (`None`: every type of the level).
    pub types: Option<Vec<String>>,
    /// `_elements`, as given (`Type.element` or `element`).
    pub elements: Option<Vec<String>>,
    /// `patient` (POST only): these patients' compartments only.
    pub patients: Vec<String>,
    /// `includeAssociatedData`.
    pub associated: Vec<String>,
    /// `_typeFilter`: `(type, query)`; several for one type are ORed.
    pub type_filters: Vec<(String, String)>,
    /// What lenient handling left out, reported in the `error` file.
    pub ignored: Vec<String>,
}

impl Params {
    /// The `_elements` that apply to `rtype` (`Observation.code` → `code`, `id` → `id`).
    pub fn elements_of(&self, rtype: &str) -> Option<Vec<String>> {
        let els = self.elements.as_ref()?;
        let mine: Vec<String> = els
            .iter()
            .filter_map(|e| match e.split_once('.') {
                Some((t, rest)) if t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => {
                    (t == rtype).then(|| rest.to_string())
                }
                _ => Some(e.clone()),
            })
            .collect();
        (!mine.is_empty()).then_some(mine)
    }

    /// Whether `rtype` is asked for.
    pub fn wants(&self, rtype: &str) -> bool {
        self.types.as_ref().is_none_or(|t| t.iter().any(|x| x == rtype))
    }
}

/// The kick-off's `(name, value)` pairs from a `Parameters` body (POST).
pub fn from_parameters(body: &Json) -> Result<Vec<(String, String)>, FhirError> {
    if body.get("resourceType").and_then(Json::as_str) != Some("Parameters") {
        return Err(FhirError::invalid("a POST $export kick-off takes a Parameters resource").at("resourceType"));
    }
    let mut out = Vec::new();
    for (i, p) in body.items(&["parameter"]).enumerate() {
        let at = format!("Parameters.parameter[{i}]");
        let name = p.get("name").and_then(Json::as_str).ok_or_else(|| FhirError::invalid("no name").at(at.clone()))?;
        let value = p.as_object().and_then(|m| {
            m.iter().find(|(k, _)| k.starts_with("value")).map(|(_, v)| match v {
                Json::Object(_) => v.get("reference").and_then(Json::as_str).unwrap_or_default().to_string(),
                other => other.as_str().map(str::to_string).unwrap_or_default(),
            })
        });
        let value = value.filter(|v| !v.is_empty()).ok_or_else(|| {
            FhirError::invalid(format!("parameter {name} has no value[x] this operation reads")).at(at.clone())
        })?;
        out.push((name.to_string(), value));
    }
    Ok(out)
}

/// The queries of a `_typeFilter` value, a comma-separated list of `[type]?[query]` (the IG's
/// own example joins two). A comma also separates the OR-values inside one query
/// (`status=active,completed`), so a new query starts only where a known type and `?` follow.
fn type_filter_queries<'a>(value: &'a str, known_type: &impl Fn(&str) -> bool) -> Vec<&'a str> {
    let starts_query = |rest: &str| rest.split_once('?').is_some_and(|(t, _)| known_type(t));
    let mut out: Vec<&str> = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        if starts_query(&value[i + 1..]) {
            out.push(&value[start..i]);
            start = i + 1;
        }
    }
    out.push(&value[start..]);
    out
}

/// Checks and collects the kick-off parameters. `known_type` says whether a name is a
/// resource type of this server; `post` whether they came in a `Parameters` body (where
/// `patient` is allowed).
pub fn parse(
    pairs: &[(String, String)],
    level: &Level,
    post: bool,
    lenient: bool,
    known_type: impl Fn(&str) -> bool,
) -> Result<Params, FhirError> {
    let mut p = Params::default();
    let refuse = |p: &mut Params, name: &str, why: String| -> Result<(), FhirError> {
        if lenient {
            p.ignored.push(format!("{name}: {why} (left out under Prefer: handling=lenient)"));
            Ok(())
        } else {
            Err(FhirError::invalid(format!("$export {name}: {why}")).at(name.to_string()))
        }
    };
    let instant = |name: &str, v: &str| -> Result<i64, FhirError> {
        crate::fhir::date_range_ms(&crate::fhir::query_date(v))
            .map(|(lo, _)| lo)
            .ok_or_else(|| FhirError::invalid(format!("$export {name}: {v:?} is not an instant")).at(name.to_string()))
    };
    for (name, value) in pairs {
        match name.as_str() {
            "_outputFormat" => {
                if !FORMATS.contains(&value.as_str()) {
                    refuse(&mut p, name, format!("{value:?} is not supported; use application/fhir+ndjson"))?;
                }
            }
            "_since" => p.since_ms = Some(instant(name, value)?),
            "_until" => p.until_ms = Some(instant(name, value)?),
            "_type" => {
                for t in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                    if known_type(t) {
                        p.types.get_or_insert_with(Vec::new).push(t.to_string());
                    } else {
                        refuse(&mut p, name, format!("{t:?} is not a resource type of this server"))?;
                    }
                }
            }
            "_elements" => p
                .elements
                .get_or_insert_with(Vec::new)
                .extend(value.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string)),
            "patient" => {
                if !post || *level == Level::System {
                    refuse(&mut p, name, "is accepted only in a POST to Patient/$export or Group/[id]/$export".into())?;
                    continue;
                }
                match value.strip_prefix("Patient/").filter(|id| crate::fhir::is_valid_id(id)) {
                    Some(id) => p.patients.push(id.to_string()),
                    None => refuse(&mut p, name, format!("{value:?} is not a Patient reference"))?,
                }
            }
            "includeAssociatedData" => {
                for v in value.split(',').map(str::trim) {
                    if matches!(v, LATEST_PROVENANCE | RELEVANT_PROVENANCE) {
                        p.associated.push(v.to_string());
                    } else {
                        refuse(
                            &mut p,
                            name,
                            format!("{v:?} is not supported (LatestProvenanceResources, RelevantProvenanceResources)"),
                        )?;
                    }
                }
            }
            "_typeFilter" => {
                for query in type_filter_queries(value, &known_type) {
                    match query.split_once('?') {
                        Some((t, q)) if known_type(t) => p.type_filters.push((t.to_string(), q.to_string())),
                        _ => refuse(&mut p, name, format!("{query:?} is not of the form [type]?[search parameters]"))?,
                    }
                }
            }
            // Formatting of the kick-off's own response.
            "_format" | "_pretty" => {}
            other => refuse(&mut p, other, "is not a parameter of $export".into())?,
        }
    }
    if let Some(types) = p.types.clone() {
        for (t, _) in p.type_filters.clone() {
            if !types.contains(&t) {
                refuse(&mut p, "_typeFilter", format!("{t} is not among the types in _type"))?;
            }
        }
    }
    if let (Some(s), Some(u)) = (p.since_ms, p.until_ms) {
        if u < s {
            return Err(FhirError::invalid("$export _until is before _since").at("_until"));
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    fn known(t: &str) -> bool {
        matches!(t, "Patient" | "Observation" | "Condition")
    }

    #[test]
    fn a_type_filter_value_is_a_comma_separated_list_of_queries() {
        let v = "Observation?status=final,amended&code=1,Condition?clinical-status=active,Observation?code=2";
        assert_eq!(
            type_filter_queries(v, &known),
            ["Observation?status=final,amended&code=1", "Condition?clinical-status=active", "Observation?code=2"]
        );
        let p = parse(&pairs(&[("_typeFilter", v)]), &Level::System, false, false, known).expect("parsed");
        assert_eq!(p.type_filters.len(), 3);
    }

    #[test]
    fn unsupported_values_are_refused_unless_lenient() {
        for bad in [
            vec![("_outputFormat", "text/csv")],
            vec![("_type", "Observation,Nope")],
            vec![("_typeFilter", "Observation")],
            vec![("includeAssociatedData", "_custom")],
            vec![("_foo", "1")],
            vec![("_since", "yesterday")],
            vec![("_type", "Patient"), ("_typeFilter", "Observation?code=1")],
        ] {
            let e = parse(&pairs(&bad), &Level::System, false, false, known).expect_err("refused");
            assert_eq!(e.status(), 400, "{bad:?}");
            let name = bad.last().map(|(n, _)| *n).unwrap_or_default();
            assert!(e.issues[0].diagnostics.contains(name), "{bad:?}: {:?}", e.issues[0].diagnostics);
        }
        let p = parse(&pairs(&[("_outputFormat", "text/csv"), ("_foo", "1")]), &Level::System, false, true, known)
            .expect("lenient");
        assert_eq!(p.ignored.len(), 2);
    }

    #[test]
    fn patient_is_for_posts_at_patient_or_group_level() {
        let v = pairs(&[("patient", "Patient/a")]);
        assert!(parse(&v, &Level::Patient, false, false, known).is_err());
        assert!(parse(&v, &Level::System, true, false, known).is_err());
        let p = parse(&v, &Level::Group("g".into()), true, false, known).expect("ok");
        assert_eq!(p.patients, vec!["a".to_string()]);
    }

    #[test]
    fn elements_apply_per_type() {
        let p =
            parse(&pairs(&[("_elements", "Observation.code,id,Patient.name")]), &Level::System, false, false, known)
                .expect("ok");
        assert_eq!(p.elements_of("Observation"), Some(vec!["code".to_string(), "id".to_string()]));
        assert_eq!(p.elements_of("Condition"), Some(vec!["id".to_string()]));
    }

    #[test]
    fn parameters_bodies_read_each_value_kind() {
        let body = crate::fhir::json::parse(
            br#"{"resourceType":"Parameters","parameter":[{"name":"_since","valueInstant":"2020-01-01T00:00:00Z"},
                {"name":"patient","valueReference":{"reference":"Patient/p1"}},{"name":"_type","valueString":"Observation"}]}"#,
            64,
        )
        .expect("json");
        let v = from_parameters(&body).expect("read");
        assert_eq!(v[1], ("patient".to_string(), "Patient/p1".to_string()));
        let p = parse(&v, &Level::Patient, true, false, known).expect("ok");
        assert_eq!(p.patients, vec!["p1".to_string()]);
        assert!(p.since_ms.is_some());
    }
}
