//! Search values: what a parameter's expression yields from a resource, reduced to the form
//! its parameter type compares (R4 search.html, "Search parameter types" and the mapping of
//! data types to them).

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

use super::params::{Kind, Param};
use crate::fhir::date_range_ms;
use crate::fhir::fhirpath::{reference_type, Eval, Item};
use crate::fhir::json::Json;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Value {
    /// Coding, CodeableConcept, Identifier, ContactPoint, code, boolean, ...
    Token {
        system: Option<String>,
        code: Option<String>,
        /// Normalized display / text, for `:text`.
        text: Option<String>,
        /// Identifier.type codings `(system, code)`, for `:of-type`.
        types: Vec<(Option<String>, String)>,
        /// A primitive (`code`, `boolean`, ...), not a Coding: its system is implied.
        bare: bool,
    },
    /// `norm` is lower-cased without accents (default and `:contains`); `exact` as written.
    Str {
        norm: String,
        exact: String,
    },
    /// The instant range `[lo, hi)` in ms; open ends are `i64::MIN`/`i64::MAX`.
    Date {
        lo: i64,
        hi: i64,
    },
    /// A number, or a quantity (`lo == hi`) or range (`lo..=hi`) with its units.
    Quantity {
        lo: f64,
        hi: f64,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
    },
    Ref {
        rtype: Option<String>,
        id: Option<String>,
        url: Option<String>,
        ident: Option<(Option<String>, String)>,
        /// Posted under its bare id too ([`super::params::Param::posts_bare_id`], decided
        /// when extracted and kept, so a removal takes away exactly the postings added).
        bare: bool,
    },
    Uri(String),
    /// One value list per component, all from the same item.
    Composite(Vec<Vec<Value>>),
}

/// Lower case without diacritics, for case- and accent-insensitive string search.
pub fn normalize(s: &str) -> String {
    s.nfd().filter(|c| !is_combining_mark(*c)).flat_map(char::to_lowercase).collect()
}

fn s(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.clone()),
        Json::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn num(v: Option<&Json>) -> Option<f64> {
    match v? {
        Json::Number(n) => n.parse().ok(),
        _ => None,
    }
}

/// The values parameter `p` takes in `res` (of type `rtype`).
pub fn extract(ev: &Eval, p: &Param, rtype: &str, res: &Json) -> Vec<Value> {
    let Some(expr) = &p.expr else { return Vec::new() };
    let items = ev.run(expr, rtype, res);
    if p.kind == Kind::Composite {
        return items
            .iter()
            .map(|item| {
                Value::Composite(
                    p.components
                        .iter()
                        .map(|c| {
                            let sub = if c.from_root {
                                ev.run(&c.expr, rtype, res)
                            } else {
                                ev.eval(&c.expr, std::slice::from_ref(item))
                            };
                            sub.iter().flat_map(|i| of_item(c.kind, i)).collect()
                        })
                        .collect(),
                )
            })
            .collect();
    }
    let mut values: Vec<Value> = items.iter().flat_map(|i| of_item(p.kind, i)).collect();
    for v in &mut values {
        if let Value::Ref { rtype: Some(t), bare, .. } = v {
            *bare = p.posts_bare_id(t);
        }
    }
    values
}

fn token(system: Option<String>, code: Option<String>, text: Option<String>) -> Value {
    Value::Token { system, code, text: text.map(|t| normalize(&t)), types: Vec::new(), bare: false }
}

fn bare(code: String) -> Value {
    Value::Token { system: None, code: Some(code), text: None, types: Vec::new(), bare: true }
}

fn of_item(kind: Kind, item: &Item) -> Vec<Value> {
    let (j, ty) = match item {
        Item::Node(j, ty) => (*j, ty.as_deref().unwrap_or("")),
        Item::Bool(b) if kind == Kind::Token => return vec![bare(b.to_string())],
        Item::Str(v) if kind == Kind::Token => return vec![bare(v.clone())],
        _ => return Vec::new(),
    };
    match kind {
        Kind::Token => token_values(j, ty),
        Kind::String => string_values(j, ty),
        Kind::Date => date_value(j, ty).into_iter().collect(),
        Kind::Number | Kind::Quantity => quantity_value(j, ty).into_iter().collect(),
        Kind::Reference => reference_value(j).into_iter().collect(),
        Kind::Uri => s(Some(j)).map(Value::Uri).into_iter().collect(),
        Kind::Composite | Kind::Special => Vec::new(),
    }
}

fn coding(c: &Json) -> Value {
    token(s(c.get("system")), s(c.get("code")), s(c.get("display")))
}

fn token_values(j: &Json, ty: &str) -> Vec<Value> {
    match ty {
        "CodeableConcept" => {
            let mut out: Vec<Value> =
                j.get("coding").and_then(Json::as_array).into_iter().flatten().map(coding).collect();
            if let Some(text) = s(j.get("text")) {
                out.push(token(None, None, Some(text)));
            }
            out
        }
        "Coding" => vec![coding(j)],
        "Identifier" => {
            let types = j
                .get("type")
                .and_then(|t| t.get("coding"))
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| Some((s(c.get("system")), s(c.get("code"))?)))
                .collect();
            let text = s(j.get("type").and_then(|t| t.get("text")));
            vec![Value::Token {
                system: s(j.get("system")),
                code: s(j.get("value")),
                text: text.map(|t| normalize(&t)),
                types,
                bare: false,
            }]
        }
        "ContactPoint" => vec![token(s(j.get("system")), s(j.get("value")), None)],
        // A Reference as a token: its identifier (e.g. `Composition.relatesTo.target as Identifier`).
        "Reference" => j.get("identifier").map(|i| token_values(i, "Identifier")).unwrap_or_default(),
        _ => match j {
            Json::String(_) | Json::Bool(_) | Json::Number(_) => s(Some(j)).map(bare).into_iter().collect(),
            // Shape-based fallback for elements whose type the definitions did not give.
            Json::Object(_) if j.get("coding").is_some() => token_values(j, "CodeableConcept"),
            Json::Object(_) if j.get("code").is_some() => token_values(j, "Coding"),
            Json::Object(_) if j.get("value").is_some() => token_values(j, "Identifier"),
            _ => Vec::new(),
        },
    }
}

fn string_values(j: &Json, ty: &str) -> Vec<Value> {
    let parts: Vec<String> = match ty {
        "HumanName" => ["family", "given", "prefix", "suffix", "text"].iter().flat_map(|k| strs(j.get(k))).collect(),
        "Address" => ["line", "city", "district", "state", "postalCode", "country", "text"]
            .iter()
            .flat_map(|k| strs(j.get(k)))
            .collect(),
        _ => match j {
            Json::String(v) => vec![v.clone()],
            Json::Object(_) => ["text", "display", "value"].iter().flat_map(|k| strs(j.get(k))).take(1).collect(),
            _ => Vec::new(),
        },
    };
    parts.into_iter().map(|p| Value::Str { norm: normalize(&p), exact: p }).collect()
}

fn strs(v: Option<&Json>) -> Vec<String> {
    match v {
        Some(Json::String(x)) => vec![x.clone()],
        Some(Json::Array(xs)) => xs.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
        _ => Vec::new(),
    }
}

fn date_value(j: &Json, ty: &str) -> Option<Value> {
    match (ty, j) {
        ("Period", _) => {
            let lo = j.get("start").and_then(Json::as_str).and_then(date_range_ms).map_or(i64::MIN, |r| r.0);
            let hi = j.get("end").and_then(Json::as_str).and_then(date_range_ms).map_or(i64::MAX, |r| r.1);
            (j.get("start").is_some() || j.get("end").is_some()).then_some(Value::Date { lo, hi })
        }
        ("Timing", _) => {
            let mut ranges: Vec<(i64, i64)> = strs(j.get("event")).iter().filter_map(|e| date_range_ms(e)).collect();
            if let Some(Value::Date { lo, hi }) =
                j.get("repeat").and_then(|r| r.get("boundsPeriod")).and_then(|p| date_value(p, "Period"))
            {
                ranges.push((lo, hi));
            }
            let lo = ranges.iter().map(|r| r.0).min()?;
            let hi = ranges.iter().map(|r| r.1).max()?;
            Some(Value::Date { lo, hi })
        }
        (_, Json::String(v)) => date_range_ms(v).map(|(lo, hi)| Value::Date { lo, hi }),
        // An object without a declared type: a Period if it looks like one.
        (_, Json::Object(_)) if j.get("start").is_some() || j.get("end").is_some() => date_value(j, "Period"),
        _ => None,
    }
}

fn quantity_value(j: &Json, ty: &str) -> Option<Value> {
    match (ty, j) {
        (_, Json::Number(n)) => {
            let v = n.parse().ok()?;
            Some(Value::Quantity { lo: v, hi: v, system: None, code: None, unit: None })
        }
        ("Range", _) => {
            let (low, high) = (j.get("low"), j.get("high"));
            let unit_of = low.or(high)?;
            Some(Value::Quantity {
                lo: num(low.and_then(|l| l.get("value"))).unwrap_or(f64::NEG_INFINITY),
                hi: num(high.and_then(|h| h.get("value"))).unwrap_or(f64::INFINITY),
                system: s(unit_of.get("system")),
                code: s(unit_of.get("code")),
                unit: s(unit_of.get("unit")),
            })
        }
        ("Money", _) => {
            let v = num(j.get("value"))?;
            Some(Value::Quantity {
                lo: v,
                hi: v,
                system: Some("urn:iso:std:iso:4217".into()),
                code: s(j.get("currency")),
                unit: None,
            })
        }
        ("SampledData", _) => None,
        (_, Json::Object(_)) => {
            let v = num(j.get("value"))?;
            Some(Value::Quantity {
                lo: v,
                hi: v,
                system: s(j.get("system")),
                code: s(j.get("code")),
                unit: s(j.get("unit")),
            })
        }
        _ => None,
    }
}

/// Splits a literal reference into type and id where it has that shape.
pub fn split_ref(reference: &str) -> (Option<String>, Option<String>) {
    let path = reference.split(['?', '#']).next().unwrap_or_default();
    let segs: Vec<&str> = path.split('/').collect();
    let n = segs.len();
    let id = if n >= 4 && segs[n - 2] == "_history" { segs.get(n - 3) } else { segs.last() };
    match (reference_type(reference), id) {
        (Some(t), Some(id)) if !id.is_empty() && !reference.starts_with('#') => (Some(t), Some(id.to_string())),
        _ => (None, None),
    }
}

fn reference_value(j: &Json) -> Option<Value> {
    match j {
        // canonical / uri references
        Json::String(u) => {
            let (rtype, id) = split_ref(u);
            Some(Value::Ref { rtype, id, url: Some(u.clone()), ident: None, bare: true })
        }
        Json::Object(_) => {
            let reference = j.get("reference").and_then(Json::as_str);
            let ident = j.get("identifier").and_then(|i| Some((s(i.get("system")), s(i.get("value"))?)));
            if reference.is_none() && ident.is_none() {
                return None;
            }
            // An absolute URL names a resource on some server: it matches by URL only (a
            // query for `Patient/1` means this server's Patient/1).
            let (rtype, id) = reference.filter(|r| !r.contains("://")).map(split_ref).unwrap_or_default();
            let url = reference.filter(|r| r.contains(':')).map(String::from);
            Some(Value::Ref { rtype, id, url, ident, bare: true })
        }
        _ => None,
    }
}

/// How a date, number or quantity value sorts: by its lower bound. Dates, numbers and
/// quantities have only such values, so a sort record of these numbers orders them exactly
/// as their documents would.
pub fn sort_num(v: &Value) -> Option<f64> {
    match v {
        Value::Date { lo, .. } => Some(*lo as f64),
        Value::Quantity { lo, .. } => Some(*lo),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_case_and_accents() {
        assert_eq!(normalize("Zoë ÅSTRÖM"), "zoe astrom");
    }

    #[test]
    fn splits_references() {
        assert_eq!(split_ref("Patient/1"), (Some("Patient".into()), Some("1".into())));
        assert_eq!(split_ref("http://x/fhir/Patient/1/_history/3"), (Some("Patient".into()), Some("1".into())));
        assert_eq!(split_ref("urn:uuid:1"), (None, None));
        assert_eq!(split_ref("#p1"), (None, None));
    }
}
