//! Structural validation of a resource against the compiled R4 model ([`Profiles`]): unknown
//! elements, cardinality, JSON kinds, primitive formats, `_element` companions, choice types,
//! contained resources and required bindings. Every issue names a FHIRPath-like location
//! (`Patient.name[0].given[1]`). FHIRPath invariants are not evaluated.

use super::json::Json;
use super::profiles::{Element, Profiles};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone)]
pub struct Issue {
    pub severity: Severity,
    /// FHIR IssueType code.
    pub code: &'static str,
    pub path: String,
    pub message: String,
}

/// Nested resources (contained, Bundle entries) deeper than this are refused.
const MAX_RESOURCE_DEPTH: usize = 16;

struct Ctx<'a> {
    p: &'a Profiles,
    issues: Vec<Issue>,
}

impl Ctx<'_> {
    fn err(&mut self, code: &'static str, path: &Loc<'_>, message: String) {
        self.issues.push(Issue { severity: Severity::Error, code, path: path.to_string(), message });
    }
}

/// Where a value sits (`Patient.name[0].given[1]`), spelled out only when an issue is
/// found: valid resources, nearly all of them, never format a path.
#[derive(Clone, Copy)]
enum Loc<'a> {
    Root(&'a str),
    Key(&'a Loc<'a>, &'a str),
    Index(&'a Loc<'a>, usize),
}

impl std::fmt::Display for Loc<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loc::Root(name) => f.write_str(name),
            Loc::Key(parent, key) => write!(f, "{parent}.{key}"),
            Loc::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

pub fn validate(p: &Profiles, resource: &Json) -> Vec<Issue> {
    let mut cx = Ctx { p, issues: Vec::new() };
    let rtype = resource.get("resourceType").and_then(Json::as_str).unwrap_or("Resource").to_string();
    resource_at(&mut cx, resource, &Loc::Root(&rtype), 0);
    cx.issues
}

fn resource_at(cx: &mut Ctx<'_>, v: &Json, loc: &Loc<'_>, depth: usize) {
    if depth > MAX_RESOURCE_DEPTH {
        cx.err("structure", loc, "resources nested too deeply".into());
        return;
    }
    let Json::Object(_) = v else {
        cx.err("structure", loc, "a resource must be a JSON object".into());
        return;
    };
    match v.get("resourceType").and_then(Json::as_str) {
        Some(t) if cx.p.is_resource_type(t) => object(cx, v, t, loc, true, depth),
        Some(t) => cx.err("structure", loc, format!("unknown resourceType {t:?}")),
        None => cx.err("required", loc, "resourceType is missing".into()),
    }
}

/// The element named by JSON key `key` among `children`, and the type a choice key selects.
pub(crate) fn find<'e>(children: &'e [Element], key: &str) -> Option<(&'e Element, Option<&'e str>)> {
    if let Some(e) = children.iter().find(|e| !e.choice && e.name == key) {
        return Some((e, None));
    }
    children.iter().filter(|e| e.choice).find_map(|e| {
        let suffix = key.strip_prefix(e.name.as_str())?;
        let t = e.types.iter().find(|t| is_type_suffix(t, suffix))?;
        Some((e, Some(t.as_str())))
    })
}

/// `String` names `string`, `Quantity` names `Quantity` (`valueString`, `valueQuantity`).
fn is_type_suffix(t: &str, suffix: &str) -> bool {
    let (mut a, mut b) = (t.chars(), suffix.chars());
    match (a.next(), b.next()) {
        (Some(x), Some(y)) => x.to_ascii_uppercase() == y && a.as_str() == b.as_str(),
        _ => false,
    }
}

fn object(cx: &mut Ctx<'_>, v: &Json, path: &str, loc: &Loc<'_>, is_resource: bool, depth: usize) {
    let Some(members) = v.as_object() else {
        cx.err("structure", loc, "expected a JSON object".into());
        return;
    };
    if members.is_empty() {
        cx.err("value", loc, "empty objects are not allowed in FHIR".into());
        return;
    }
    let Some(children) = cx.p.children(path) else {
        cx.err("structure", loc, format!("no definition for {path}"));
        return;
    };
    let mut chosen: Vec<&str> = Vec::new();
    for (key, value) in members {
        let here = Loc::Key(loc, key);
        if key == "resourceType" {
            if !is_resource {
                cx.err("structure", &here, "resourceType is only allowed at the root of a resource".into());
            }
            continue;
        }
        if let Some(base) = key.strip_prefix('_') {
            match find(children, base) {
                Some((e, t))
                    if t.map_or_else(|| e.types.iter().all(|t| cx.p.is_primitive(t)), |t| cx.p.is_primitive(t))
                        && !e.types.is_empty() =>
                {
                    companion(cx, value, e.many, &here, depth);
                }
                _ => {
                    cx.err("structure", &here, format!("unknown element {key:?} (no primitive element {base:?} here)"));
                }
            }
            continue;
        }
        let Some((e, choice_type)) = find(children, key) else {
            cx.err("structure", &here, format!("unknown element {key:?}"));
            continue;
        };
        if e.choice {
            if chosen.contains(&e.name.as_str()) {
                cx.err("structure", &here, format!("more than one type given for {}[x]", e.name));
            }
            chosen.push(e.name.as_str());
        }
        match (e.many, value) {
            (true, Json::Array(items)) => {
                if items.is_empty() {
                    cx.err("value", &here, "empty arrays are not allowed in FHIR".into());
                }
                for (i, item) in items.iter().enumerate() {
                    let at = Loc::Index(&here, i);
                    if matches!(item, Json::Null) && members.iter().any(|(k, _)| k.strip_prefix('_') == Some(key)) {
                        continue; // aligned with a companion `_key` entry
                    }
                    typed(cx, e, choice_type, item, &at, is_resource && path_is_root(path), depth);
                }
            }
            (true, _) => cx.err("structure", &here, format!("{key} repeats: it must be a JSON array")),
            (false, Json::Array(_)) => {
                cx.err("structure", &here, format!("{key} does not repeat: it must not be an array"));
            }
            (false, item) => {
                typed(cx, e, choice_type, item, &here, is_resource && path_is_root(path), depth);
            }
        }
    }
    for e in children.iter().filter(|e| e.min > 0) {
        let present = members.iter().any(|(k, _)| {
            let k = k.strip_prefix('_').unwrap_or(k);
            if e.choice {
                k.starts_with(e.name.as_str()) && find(children, k).is_some_and(|(f, _)| f.path == e.path)
            } else {
                k == e.name
            }
        });
        if !present {
            cx.err("required", &Loc::Key(loc, &e.name), format!("{} is required (min {})", e.name, e.min));
        }
    }
}

fn path_is_root(path: &str) -> bool {
    !path.contains('.')
}

/// `_given: [null, {"extension": [...]}]` carries ids and extensions of primitive values.
fn companion(cx: &mut Ctx<'_>, v: &Json, many: bool, loc: &Loc<'_>, depth: usize) {
    let check = |cx: &mut Ctx<'_>, item: &Json, at: &Loc<'_>| match item {
        Json::Null if many => {}
        Json::Object(_) => object(cx, item, "Element", at, false, depth),
        _ => cx.err("structure", at, "a primitive's companion must be an object with id or extension".into()),
    };
    match (many, v) {
        (true, Json::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                check(cx, item, &Loc::Index(loc, i));
            }
        }
        (true, _) => cx.err("structure", loc, "companion of a repeating element must be an array".into()),
        (false, item) => check(cx, item, loc),
    }
}

fn typed(cx: &mut Ctx<'_>, e: &Element, choice: Option<&str>, v: &Json, loc: &Loc<'_>, at_root: bool, depth: usize) {
    if let Some(target) = &e.content_ref {
        object(cx, v, target, loc, false, depth);
        return;
    }
    let t = match choice {
        Some(t) => t,
        None => match e.types.as_slice() {
            [t] => t.as_str(),
            [] => "",
            [first, ..] => first.as_str(),
        },
    };
    match t {
        "" => cx.err("structure", loc, format!("{} has no type", e.path)),
        "BackboneElement" | "Element" if cx.p.children(&e.path).is_some() => object(cx, v, &e.path, loc, false, depth),
        "Resource" => resource_at(cx, v, loc, depth + 1),
        t if cx.p.is_primitive(t) => {
            // A resource's own `id` is typed System.String in the snapshot but is an `id`.
            let t = if at_root && e.name == "id" { "id" } else { t };
            primitive(cx, t, v, loc);
            if let (Some(i), Json::String(code)) = (e.required_codes, v) {
                if t == "code" && !cx.p.code_sets[i].has_code(code) {
                    cx.err("code-invalid", loc, format!("{code:?} is not in the required value set of {}", e.path));
                }
            }
        }
        complex => {
            object(cx, v, complex, loc, false, depth);
            if let Some(i) = e.required_codes {
                check_codings(cx, i, complex, v, loc, &e.path);
            }
        }
    }
}

fn check_codings(cx: &mut Ctx<'_>, set: usize, t: &str, v: &Json, loc: &Loc<'_>, path: &str) {
    let mut check = |coding: &Json, at: &Loc<'_>| {
        let (Some(system), Some(code)) =
            (coding.get("system").and_then(Json::as_str), coding.get("code").and_then(Json::as_str))
        else {
            return;
        };
        let s = &cx.p.code_sets[set];
        if s.systems.contains(system) && !s.has(system, code) {
            let why = format!("{system}|{code} is not in the required value set of {path}");
            cx.err("code-invalid", at, why);
        }
    };
    match t {
        "Coding" => check(v, loc),
        "CodeableConcept" => {
            let codings = Loc::Key(loc, "coding");
            for (i, c) in v.get("coding").and_then(Json::as_array).into_iter().flatten().enumerate() {
                check(c, &Loc::Index(&codings, i));
            }
        }
        _ => {}
    }
}

fn primitive(cx: &mut Ctx<'_>, t: &str, v: &Json, loc: &Loc<'_>) {
    let result: Result<(), String> = match (t, v) {
        ("boolean", Json::Bool(_)) | ("decimal", Json::Number(_)) => Ok(()),
        ("boolean", _) => Err("must be a JSON boolean (true or false)".into()),
        ("integer" | "positiveInt" | "unsignedInt", Json::Number(n)) => integer(t, n),
        ("decimal" | "integer" | "positiveInt" | "unsignedInt", _) => Err(format!("a {t} must be a JSON number")),
        (_, Json::String(s)) => string_format(t, s),
        _ => Err(format!("a {t} must be a JSON string")),
    };
    if let Err(why) = result {
        let code = if matches!(v, Json::String(_) | Json::Number(_) | Json::Bool(_)) { "value" } else { "structure" };
        cx.err(code, loc, format!("invalid {t}: {why}"));
    }
}

fn integer(t: &str, n: &str) -> Result<(), String> {
    let v: i64 = n.parse().map_err(|_| format!("{n} is not an integer"))?;
    let min = match t {
        "positiveInt" => 1,
        "unsignedInt" => 0,
        _ => i64::from(i32::MIN),
    };
    if v < min || v > i64::from(i32::MAX) {
        return Err(format!("{n} is out of range for {t}"));
    }
    Ok(())
}

fn digits(s: &str, n: usize) -> Option<u32> {
    (s.len() == n && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

fn date(s: &str) -> Result<(), String> {
    let bad = || format!("{s:?} is not a date (YYYY, YYYY-MM or YYYY-MM-DD)");
    let parts: Vec<&str> = s.split('-').collect();
    let year = digits(parts.first().copied().unwrap_or(""), 4).ok_or_else(bad)?;
    if let Some(m) = parts.get(1) {
        let m = digits(m, 2).filter(|m| (1..=12).contains(m)).ok_or_else(bad)?;
        if let Some(d) = parts.get(2) {
            let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
            let max = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            digits(d, 2).filter(|d| (1..=max).contains(d)).ok_or_else(bad)?;
        }
    }
    if parts.len() > 3 || year == 0 && parts.is_empty() {
        return Err(bad());
    }
    Ok(())
}

fn time(s: &str) -> Result<(), String> {
    let bad = || format!("{s:?} is not a time (hh:mm:ss)");
    let (hms, frac) = s.split_once('.').map_or((s, None), |(a, b)| (a, Some(b)));
    let p: Vec<&str> = hms.split(':').collect();
    if p.len() != 3 {
        return Err(bad());
    }
    digits(p[0], 2).filter(|h| *h <= 23).ok_or_else(bad)?;
    digits(p[1], 2).filter(|m| *m <= 59).ok_or_else(bad)?;
    digits(p[2], 2).filter(|s| *s <= 60).ok_or_else(bad)?;
    if let Some(f) = frac {
        if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
    }
    Ok(())
}

fn date_time(s: &str, need_time: bool) -> Result<(), String> {
    let Some((d, rest)) = s.split_once('T') else {
        if need_time {
            return Err(format!("{s:?} is not an instant (needs time and zone)"));
        }
        return date(s);
    };
    date(d)?;
    if d.len() != 10 {
        return Err(format!("{s:?}: a time needs a full date"));
    }
    let (t, zone) = if let Some(t) = rest.strip_suffix('Z') {
        (t, "Z")
    } else if rest.len() > 6 && matches!(rest.as_bytes()[rest.len() - 6], b'+' | b'-') {
        rest.split_at(rest.len() - 6)
    } else {
        return Err(format!("{s:?}: a dateTime with a time must have a timezone (Z or +hh:mm)"));
    };
    time(t)?;
    if zone != "Z" {
        let h = digits(&zone[1..3], 2).filter(|h| *h <= 14);
        let m = digits(&zone[4..], 2).filter(|m| *m <= 59);
        if h.is_none() || m.is_none() || &zone[3..4] != ":" {
            return Err(format!("{s:?}: bad timezone {zone:?}"));
        }
    }
    Ok(())
}

fn string_format(t: &str, s: &str) -> Result<(), String> {
    let is_oid = || {
        s.strip_prefix("urn:oid:").is_some_and(|r| {
            r.split('.').count() >= 2 && r.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    let is_uuid = || {
        s.strip_prefix("urn:uuid:").is_some_and(|r| {
            r.len() == 36
                && r.char_indices()
                    .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() })
        })
    };
    match t {
        _ if s.is_empty() => Err("empty strings are not allowed in FHIR".into()),
        "id" if !super::is_valid_id(s) => Err(format!("{s:?} is not an id (1-64 of A-Z a-z 0-9 - .)")),
        "code" if s.trim() != s || s.contains("  ") || s.contains(['\t', '\n', '\r']) => {
            Err(format!("{s:?}: codes have no leading, trailing or repeated whitespace"))
        }
        "date" => date(s),
        "dateTime" => date_time(s, false),
        "instant" => date_time(s, true),
        "time" => time(s),
        "uri" | "url" | "canonical" if s.chars().any(char::is_whitespace) => {
            Err(format!("{s:?}: a {t} may not contain whitespace"))
        }
        "oid" if !is_oid() => Err(format!("{s:?} is not an oid (urn:oid:1.2.3)")),
        "uuid" if !is_uuid() => Err(format!("{s:?} is not a uuid (urn:uuid:...)")),
        "base64Binary"
            if !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b' ' | b'\n' | b'\r')) =>
        {
            Err("not base64".into())
        }
        "xhtml" if !s.trim_start().starts_with("<div") => Err("narrative must be an XHTML <div>".into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::json::parse;
    use std::path::Path;
    use std::sync::OnceLock;

    fn profiles() -> &'static Profiles {
        static P: OnceLock<Profiles> = OnceLock::new();
        P.get_or_init(|| Profiles::load(&crate::definitions::Definitions::Embedded).unwrap())
    }

    /// Validates `json` and returns `(path, code)` of every error.
    fn check(json: &str) -> Vec<(String, &'static str)> {
        let v = parse(json.as_bytes(), 128).unwrap();
        validate(profiles(), &v).into_iter().map(|i| (i.path, i.code)).collect()
    }

    #[test]
    fn accepts_valid_resources() {
        assert_eq!(
            check(
                r#"{"resourceType":"Patient","id":"a.1","gender":"male","birthDate":"2000-02-29","name":[{"given":["A","B"],"_given":[null,{"extension":[{"url":"x","valueString":"y"}]}]}]}"#
            ),
            vec![]
        );
        assert_eq!(
            check(
                r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":1.50},"effectiveDateTime":"2020-01-01T10:00:00+00:00"}"#
            ),
            vec![]
        );
        assert_eq!(
            check(
                r#"{"resourceType":"Questionnaire","status":"draft","item":[{"linkId":"1","type":"group","item":[{"linkId":"1.1","type":"string"}]}]}"#
            ),
            vec![]
        );
    }

    #[test]
    fn names_the_path_of_every_error() {
        let cases = [
            (r#"{"resourceType":"Patient","robot":1}"#, "Patient.robot", "structure"),
            (r#"{"resourceType":"Patient","gender":"robot"}"#, "Patient.gender", "code-invalid"),
            (r#"{"resourceType":"Patient","birthDate":"2020-13-45"}"#, "Patient.birthDate", "value"),
            (r#"{"resourceType":"Patient","id":"a_b"}"#, "Patient.id", "value"),
            (r#"{"resourceType":"Patient","active":"true"}"#, "Patient.active", "value"),
            (r#"{"resourceType":"Patient","name":{"family":"x"}}"#, "Patient.name", "structure"),
            (r#"{"resourceType":"Patient","gender":["male"]}"#, "Patient.gender", "structure"),
            (r#"{"resourceType":"Patient","contact":[{"robot":1}]}"#, "Patient.contact[0].robot", "structure"),
            (
                r#"{"resourceType":"Patient","contained":[{"resourceType":"Patient","gender":"x"}]}"#,
                "Patient.contained[0].gender",
                "code-invalid",
            ),
            (
                r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueQuantity":{"value":"1.0"}}"#,
                "Observation.valueQuantity.value",
                "value",
            ),
            (r#"{"resourceType":"Observation","code":{"text":"x"}}"#, "Observation.status", "required"),
            (
                r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueFoo":1}"#,
                "Observation.valueFoo",
                "structure",
            ),
            (
                r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"effectiveDateTime":"2020-01-01T10:00:00"}"#,
                "Observation.effectiveDateTime",
                "value",
            ),
            (r#"{"resourceType":"Patient","name":[]}"#, "Patient.name", "value"),
            (
                r#"{"resourceType":"Patient","multipleBirthInteger":2147483648}"#,
                "Patient.multipleBirthInteger",
                "value",
            ),
            (r#"{"resourceType":"Patient","extension":[{"valueString":"x"}]}"#, "Patient.extension[0].url", "required"),
            (r#"{"resourceType":"Robot"}"#, "Robot", "structure"),
        ];
        for (json, path, code) in cases {
            let errors = check(json);
            assert!(
                errors.iter().any(|(p, c)| p == path && *c == code),
                "{json}: expected {code} at {path}, got {errors:?}"
            );
        }
    }

    #[test]
    fn every_synthea_resource_is_valid() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/synthea"));
        let mut n = 0;
        let start = std::time::Instant::now();
        for f in std::fs::read_dir(dir).unwrap() {
            let path = f.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let bundle = parse(&std::fs::read(path).unwrap(), 128).unwrap();
            for e in bundle.get("entry").and_then(Json::as_array).unwrap() {
                let r = e.get("resource").unwrap();
                let issues = validate(profiles(), r);
                assert!(issues.is_empty(), "{}: {:?}", r.get("resourceType").unwrap().to_compact(), issues);
                n += 1;
            }
        }
        eprintln!("validated {n} Synthea resources in {:?}", start.elapsed());
        assert!(n > 50_000);
    }
}

#[cfg(test)]
mod examples {
    use super::*;
    use crate::fhir::json::parse;
    use std::path::Path;

    /// Official R4 examples that are themselves invalid against the R4 definitions, with the
    /// rule each breaks. The test fails if one of these starts passing or another fails.
    pub const KNOWN_INVALID: &[(&str, &str)] = &[(
        "bundle-questionnaire.json",
        "its display items have no linkId, but Questionnaire.item.linkId has cardinality 1..1 in R4",
    )];

    #[test]
    fn official_examples_validate_except_the_known_invalid_ones() {
        let p = Profiles::load(&crate::definitions::Definitions::Embedded).unwrap();
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data/hl7-r4-examples"));
        let mut failing = Vec::new();
        for f in std::fs::read_dir(dir).unwrap() {
            let path = f.unwrap().path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let v = parse(&std::fs::read(&path).unwrap(), 128).unwrap();
            let issues = validate(&p, &v);
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if !issues.is_empty() {
                eprintln!(
                    "{name}: {:?}",
                    issues.iter().map(|i| format!("{} {} {}", i.path, i.code, i.message)).collect::<Vec<_>>()
                );
                failing.push(name);
            }
        }
        failing.sort();
        let mut known: Vec<String> = KNOWN_INVALID.iter().map(|(n, _)| n.to_string()).collect();
        known.sort();
        assert_eq!(failing, known);
    }
}
