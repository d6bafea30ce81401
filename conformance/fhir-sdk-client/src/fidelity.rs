//! What an R4B model keeps of an R4 resource: parse the server's JSON as R4B, serialize it
//! again and compare. fhir-model's structs do not deny unknown fields, so an R4 element that
//! R4B lacks is dropped without an error; only this comparison shows it.

use std::collections::BTreeMap;

use fhir_sdk::{r4b::resources::Resource, DateTime};
use serde_json::Value;

/// How the R4B serialization differs from the server's JSON at one element path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// In the server's JSON, gone after the R4B round trip: data loss.
    Dropped,
    /// Not in the server's JSON, present after the round trip.
    Added,
    /// Present in both with different values.
    Changed,
    /// Same value, other spelling (`+00:00` → `Z`, base64 without line breaks): no data lost,
    /// but the bytes (and a signature over them) differ.
    Reformatted,
    /// A decimal's spelling changed (`1.00` → `1.0`, `1` → `1.0`): fhir-model holds decimals
    /// as f64, and FHIR counts a decimal's precision as part of its value.
    Precision,
}

impl Change {
    pub fn loses_data(self) -> bool {
        matches!(self, Self::Dropped | Self::Added | Self::Changed)
    }
}

/// Differences over many resources: (change, path without array indices) → how many, and
/// the first one as `before → after`.
pub type Tally = BTreeMap<(Change, String), (usize, String)>;

/// Parses one resource's JSON text as R4B and tallies how its round trip differs.
pub fn round_trip(text: &str, tally: &mut Tally) -> Result<(), serde_json::Error> {
    let parsed: Resource = serde_json::from_str(text)?;
    let again = serde_json::to_string(&parsed)?;
    let (before, after): (Value, Value) = (serde_json::from_str(text)?, serde_json::from_str(&again)?);
    let root = before.get("resourceType").and_then(Value::as_str).unwrap_or("?").to_owned();
    diff(&before, &after, &root, tally);
    decimals(text, &again, &root, tally);
    Ok(())
}

fn diff(before: &Value, after: &Value, path: &str, tally: &mut Tally) {
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                if key == "resourceType" {
                    continue;
                }
                let child = format!("{path}.{key}");
                match b.get(key) {
                    Some(other) => diff(value, other, &child, tally),
                    None => note(tally, Change::Dropped, &child, &value.to_string(), "∅"),
                }
            }
            for (key, value) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
                note(tally, Change::Added, &format!("{path}.{key}"), "∅", &value.to_string());
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (x, y) in a.iter().zip(b) {
                diff(x, y, path, tally);
            }
        }
        // Spelling of numbers is `decimals`' business.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (Value::String(a), Value::String(b)) if a != b && (same_time(a, b) || same_base64(a, b)) => {
            note(tally, Change::Reformatted, path, &before.to_string(), &after.to_string());
        }
        _ if before == after => {}
        _ => note(tally, Change::Changed, path, &before.to_string(), &after.to_string()),
    }
}

fn note(tally: &mut Tally, change: Change, path: &str, before: &str, after: &str) {
    let clip = |s: &str| s.chars().take(60).collect::<String>();
    let entry =
        tally.entry((change, path.to_owned())).or_insert_with(|| (0, format!("{} → {}", clip(before), clip(after))));
    entry.0 += 1;
}

/// Two spellings of one date or instant (fhir-model writes instants as RFC 3339 with `Z`).
fn same_time(a: &str, b: &str) -> bool {
    match (a.parse::<DateTime>(), b.parse::<DateTime>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// base64Binary allows whitespace between the characters; fhir-model writes none.
fn same_base64(a: &str, b: &str) -> bool {
    a.chars().filter(|c| !c.is_whitespace()).eq(b.chars())
}

/// Number spellings that the round trip changed. serde_json reads both sides into f64, so
/// only the texts show `1.00` → `1.0`; the numbers are compared as lexemes, without a path.
fn decimals(before: &str, after: &str, root: &str, tally: &mut Tally) {
    let mut gone = number_lexemes(before);
    for lexeme in number_lexemes(after) {
        if let Some(i) = gone.iter().position(|g| *g == lexeme) {
            gone.swap_remove(i);
        } else if let Some(i) = gone.iter().position(|g| g.parse::<f64>().ok() == lexeme.parse::<f64>().ok()) {
            let was = gone.swap_remove(i);
            note(tally, Change::Precision, &format!("{root} decimals"), was, lexeme);
        } else {
            note(tally, Change::Changed, &format!("{root} numbers"), "?", lexeme);
        }
    }
    for was in gone {
        note(tally, Change::Dropped, &format!("{root} numbers"), was, "∅");
    }
}

/// The number tokens of a JSON text, outside strings.
fn number_lexemes(json: &str) -> Vec<&str> {
    let (mut out, mut in_string, mut escaped, mut start) = (Vec::new(), false, false, None);
    for (i, c) in json.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        // A number starts with a digit or `-` (so `true` is no number); exponents continue it.
        let starts = c.is_ascii_digit() || c == '-';
        let continues = starts || matches!(c, '+' | '.' | 'e' | 'E');
        match (start, starts, continues) {
            (None, true, _) => start = Some(i),
            (Some(s), _, false) => {
                out.push(&json[s..i]);
                start = None;
            }
            _ => {}
        }
        in_string = c == '"';
    }
    if let Some(s) = start {
        out.push(&json[s..]);
    }
    out
}

/// "dropped Observation.foo ×3, e.g. … → …; …" for the changes that `keep` selects.
pub fn summary(tally: &Tally, keep: impl Fn(Change) -> bool) -> String {
    let parts: Vec<String> = tally
        .iter()
        .filter(|((change, _), _)| keep(*change))
        .map(|((change, path), (n, sample))| {
            format!("{} {path} ×{n}, e.g. {sample}", format!("{change:?}").to_lowercase())
        })
        .collect();
    parts.join("; ")
}

/// The R4 → R4B losses README.md states, shown on R4 JSON without a server.
#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip_tally(json: &str) -> Result<Tally, serde_json::Error> {
        let mut tally = Tally::new();
        round_trip(json, &mut tally).map(|()| tally)
    }

    fn has(tally: &Tally, change: Change, path: &str) -> bool {
        tally.contains_key(&(change, path.to_owned()))
    }

    #[test]
    fn r4_evidence_does_not_parse_and_loses_elements() -> Result<(), serde_json::Error> {
        // R4B requires variableDefinition (1..*), which R4's Evidence does not have.
        let r4 = r#"{"resourceType":"Evidence","status":"active","name":"n","exposureBackground":{"reference":"EvidenceVariable/1"}}"#;
        let error = round_trip_tally(r4).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("variableDefinition"), "{error}");
        // Given one, R4's elements are dropped without an error.
        let tally = round_trip_tally(
            &r4.replace(r#""name":"n""#, r#""name":"n","variableDefinition":[{"variableRole":{"text":"exposure"}}]"#),
        )?;
        assert!(has(&tally, Change::Dropped, "Evidence.name"), "{tally:?}");
        assert!(has(&tally, Change::Dropped, "Evidence.exposureBackground"), "{tally:?}");
        Ok(())
    }

    #[test]
    fn r4_evidence_variable_characteristic() -> Result<(), serde_json::Error> {
        // R4's definitionDataRequirement is no R4B definition[x]: the resource does not parse.
        let data_requirement = r#"{"resourceType":"EvidenceVariable","status":"active",
            "characteristic":[{"definitionDataRequirement":{"type":"Patient"}}]}"#;
        assert!(round_trip_tally(data_requirement).is_err());
        // R4's Duration timeFromStart meets R4B's backbone: its value is gone.
        let tally = round_trip_tally(
            r#"{"resourceType":"EvidenceVariable","status":"active","type":"dichotomous",
            "characteristic":[{"definitionCodeableConcept":{"text":"adults"},"timeFromStart":{"value":3,"unit":"d"},
            "participantEffectiveDateTime":"2020-01-01"}]}"#,
        )?;
        for path in [
            "EvidenceVariable.type",
            "EvidenceVariable.characteristic.timeFromStart.value",
            "EvidenceVariable.characteristic.participantEffectiveDateTime",
        ] {
            assert!(has(&tally, Change::Dropped, path), "{path}: {tally:?}");
        }
        Ok(())
    }

    #[test]
    fn r4_detected_issue_mitigated_does_not_parse() {
        assert!(round_trip_tally(r#"{"resourceType":"DetectedIssue","status":"mitigated"}"#).is_err());
    }

    #[test]
    fn decimal_spelling_is_precision_not_loss() -> Result<(), serde_json::Error> {
        let tally = round_trip_tally(
            r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1.00}}"#,
        )?;
        assert!(has(&tally, Change::Precision, "Observation decimals"), "{tally:?}");
        assert!(!tally.keys().any(|(change, _)| change.loses_data()), "{tally:?}");
        Ok(())
    }

    #[test]
    fn number_lexemes_skip_strings_and_literals() {
        let json = r#"{"a":1.00,"b":"x1 \"2\"","c":true,"d":[-2E-3,null,false]}"#;
        assert_eq!(number_lexemes(json), ["1.00", "-2E-3"]);
    }
}
