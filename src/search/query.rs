//! Parsing FHIR search parameters into filters and result controls. Every value is parsed
//! here, so a malformed one is a 400 naming the parameter before anything runs; nothing of a
//! query ever reaches the storage layer except as typed values.

use std::sync::Arc;

use super::index::Index;
use super::params::{Kind, Param};
use super::values::{normalize, split_ref};
use crate::error::FhirError;
use crate::fhir::date_range_ms;
use crate::fhir::profiles::{CodeSet, Profiles};

pub const DEFAULT_COUNT: usize = 50;
pub const MAX_COUNT: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrMode {
    Starts,
    Exact,
    Contains,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UriMode {
    Exact,
    Below,
    Above,
}

/// One value of a parameter (values separated by commas are ORed).
#[derive(Clone, Debug)]
pub enum Pred {
    /// `system`: `None` any, `Some(None)` none (`|code`), `Some(Some(s))`; `code: None` is `system|`.
    Token {
        system: Option<Option<String>>,
        code: Option<String>,
    },
    TokenText(String),
    OfType {
        system: Option<String>,
        code: String,
        value: String,
    },
    InSet(Arc<CodeSet>),
    Str {
        needle: String,
        mode: StrMode,
    },
    Date {
        prefix: Prefix,
        lo: i64,
        hi: i64,
    },
    /// Number and quantity: the value, its implicit precision range `[lo, hi)`, and units.
    Num {
        prefix: Prefix,
        value: f64,
        lo: f64,
        hi: f64,
        system: Option<String>,
        code: Option<String>,
    },
    Ref {
        rtype: Option<String>,
        id: String,
    },
    RefUrl(String),
    RefIdent {
        system: Option<String>,
        value: String,
    },
    Uri {
        value: String,
        mode: UriMode,
    },
    Composite(Vec<Pred>),
}

#[derive(Clone, Debug)]
pub enum Filter {
    /// Any value of `code` matches any pred; `negate` for `:not` and `:not-in`.
    Values {
        code: String,
        negate: bool,
        preds: Vec<Pred>,
    },
    Missing {
        code: String,
        missing: bool,
    },
    /// `code[:Type].rest=value`: resources whose `code` references one matching `inner`.
    Chain {
        code: String,
        targets: Vec<(String, Filter)>,
    },
    /// `_has:Type:code:rest=value`: resources that a `Type` matching `inner` references by `code`.
    Has {
        rtype: String,
        code: String,
        inner: Box<Filter>,
    },
    Ids(Vec<String>),
    List(Vec<String>),
    /// `_text` (narrative) or `_content` (every string of the resource): substring search.
    Text {
        content: bool,
        needles: Vec<String>,
    },
    /// Resources whose any of `codes` references `target` (compartment search).
    Compartment {
        codes: Vec<String>,
        target: (String, String),
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Total {
    None,
    Estimate,
    Accurate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Summary {
    False,
    True,
    Text,
    Data,
    Count,
}

#[derive(Clone, Debug)]
pub struct Include {
    pub source: String,
    /// `*` is `None`: every reference parameter of the source type.
    pub code: Option<String>,
    pub target: Option<String>,
    pub iterate: bool,
}

#[derive(Clone, Debug)]
pub struct SortKey {
    pub code: String,
    pub desc: bool,
}

/// A parsed search over one or more resource types.
#[derive(Debug)]
pub struct Search {
    /// Each type searched, with its filters (ANDed).
    pub types: Vec<(String, Vec<Filter>)>,
    pub count: usize,
    pub cursor: Option<String>,
    pub total: Total,
    pub summary: Summary,
    pub elements: Option<Vec<String>>,
    pub sort: Vec<SortKey>,
    pub include: Vec<Include>,
    pub revinclude: Vec<Include>,
    /// Parameters ignored under `Prefer: handling=lenient`.
    pub ignored: Vec<String>,
}

/// Parameters that shape the result rather than select resources.
pub const RESULT: &[&str] = &[
    "_count",
    "_sort",
    "_total",
    "_summary",
    "_elements",
    "_include",
    "_revinclude",
    "_contained",
    "_containedType",
    "_cursor",
    "_format",
    "_pretty",
    "_type",
];

pub struct Parser<'a> {
    pub idx: &'a Index,
    pub profiles: &'a Profiles,
    /// This server's base URL: absolute references to it are local references.
    pub base: &'a str,
    pub lenient: bool,
}

fn bad(name: &str, why: impl Into<String>) -> FhirError {
    FhirError::invalid(format!("search parameter {name}: {}", why.into())).at(name.to_string())
}

/// Splits on `sep` not escaped by a backslash; keeps escapes (unescape each part later).
fn split_escaped(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut last = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            last.push(c);
            if let Some(n) = chars.next() {
                last.push(n);
            }
        } else if c == sep {
            out.push(std::mem::take(&mut last));
        } else {
            last.push(c);
        }
    }
    out.push(last);
    out
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn prefix_of(v: &str) -> (Option<Prefix>, &str) {
    let p = match v.get(..2) {
        Some("eq") => Prefix::Eq,
        Some("ne") => Prefix::Ne,
        Some("gt") => Prefix::Gt,
        Some("lt") => Prefix::Lt,
        Some("ge") => Prefix::Ge,
        Some("le") => Prefix::Le,
        Some("sa") => Prefix::Sa,
        Some("eb") => Prefix::Eb,
        Some("ap") => Prefix::Ap,
        _ => return (None, v),
    };
    (Some(p), &v[2..])
}

/// A decimal and the half-width of its implicit precision (`100` → 0.5, `0.80` → 0.005).
fn decimal(v: &str) -> Option<(f64, f64)> {
    let x: f64 = v.parse().ok()?;
    if !x.is_finite() || v.is_empty() || !v.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) {
        return None;
    }
    let (mantissa, exp) = match v.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (v, 0),
    };
    let decimals = i32::try_from(mantissa.split_once('.').map_or(0, |(_, f)| f.len())).unwrap_or(i32::MAX);
    Some((x, 0.5 * 10f64.powi(exp - decimals)))
}

impl Parser<'_> {
    /// Parses the query of a search on `types` (one for a type-level search).
    pub fn parse(&self, types: &[String], params: &[(String, String)]) -> Result<Search, FhirError> {
        let mut s = Search {
            types: types.iter().map(|t| (t.clone(), Vec::new())).collect(),
            count: DEFAULT_COUNT,
            cursor: None,
            // Totals are given whenever the search computed every match anyway; asking for
            // `accurate` makes it do so (see docs/search.md).
            total: Total::Estimate,
            summary: Summary::False,
            elements: None,
            sort: Vec::new(),
            include: Vec::new(),
            revinclude: Vec::new(),
            ignored: Vec::new(),
        };
        for (name, value) in params {
            let (code, modifier) = name.split_once(':').map_or((name.as_str(), None), |(c, m)| (c, Some(m)));
            if RESULT.contains(&code) {
                self.result_param(&mut s, name, code, modifier, value)?;
                continue;
            }
            let mut parsed = Vec::new();
            for (t, _) in &s.types {
                match self.filter(t, name, value) {
                    Ok(f) => parsed.push(f),
                    Err(e) if self.lenient && e.issues.first().is_some_and(|i| i.code == "not-supported") => {
                        parsed.clear();
                        s.ignored.push(name.clone());
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            for ((_, filters), f) in s.types.iter_mut().zip(parsed) {
                filters.push(f);
            }
        }
        Ok(s)
    }

    fn result_param(
        &self,
        s: &mut Search,
        name: &str,
        code: &str,
        modifier: Option<&str>,
        value: &str,
    ) -> Result<(), FhirError> {
        if modifier.is_some() && !matches!(code, "_include" | "_revinclude") {
            return Err(bad(name, format!("{code} takes no modifier")));
        }
        match code {
            "_count" => {
                s.count = value
                    .parse::<usize>()
                    .map_err(|_| bad(name, format!("must be a non-negative integer, not {value:?}")))?
                    .min(MAX_COUNT);
            }
            "_cursor" => s.cursor = Some(value.to_string()),
            "_total" => {
                s.total = match value {
                    "none" => Total::None,
                    "estimate" => Total::Estimate,
                    "accurate" => Total::Accurate,
                    _ => return Err(bad(name, format!("must be none, estimate or accurate, not {value:?}"))),
                }
            }
            "_summary" => {
                s.summary = match value {
                    "true" => Summary::True,
                    "false" => Summary::False,
                    "text" => Summary::Text,
                    "data" => Summary::Data,
                    "count" => Summary::Count,
                    _ => return Err(bad(name, format!("must be true, false, text, data or count, not {value:?}"))),
                }
            }
            "_elements" => {
                let els: Vec<String> =
                    value.split(',').map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
                if let Some(e) = els.iter().find(|e| !e.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')) {
                    return Err(bad(name, format!("{e:?} is not an element name")));
                }
                s.elements = Some(els);
            }
            "_sort" => {
                for key in value.split(',') {
                    let (desc, code) = key.strip_prefix('-').map_or((false, key), |k| (true, k));
                    for (t, _) in &s.types {
                        let p = self.param(t, code, name)?;
                        if matches!(p.kind, Kind::Composite | Kind::Special) {
                            return Err(bad(name, format!("cannot sort by {} parameter {code}", p.kind.as_str())));
                        }
                    }
                    s.sort.push(SortKey { code: code.to_string(), desc });
                }
            }
            "_include" | "_revinclude" => {
                let iterate = match modifier {
                    None => false,
                    Some("iterate" | "recurse") => true,
                    Some(m) => return Err(bad(name, format!("modifier :{m} is not supported (:iterate is)"))),
                };
                let inc = self.include(name, value, iterate, code == "_revinclude")?;
                if code == "_include" {
                    s.include.push(inc);
                } else {
                    s.revinclude.push(inc);
                }
            }
            "_contained" if value != "false" => {
                return Err(FhirError::not_supported(format!("_contained={value} is not supported: contained resources are not indexed on their own (only _contained=false)"),
                    )
                    .at(name.to_string()));
            }
            "_containedType" if value != "container" => {
                return Err(bad(name, "only container is supported"));
            }
            // `_format`, `_pretty`, `_type` are handled by the caller.
            _ => {}
        }
        Ok(())
    }

    fn include(&self, name: &str, value: &str, iterate: bool, rev: bool) -> Result<Include, FhirError> {
        let parts: Vec<&str> = value.split(':').collect();
        let (source, code, target) = match parts.as_slice() {
            ["*"] if !rev => return Ok(Include { source: "*".into(), code: None, target: None, iterate }),
            [s, "*"] => (*s, None, None),
            [s, c] => (*s, Some(*c), None),
            [s, c, t] => (*s, Some(*c), Some(*t)),
            _ => return Err(bad(name, format!("{value:?} is not Type:parameter[:targetType]"))),
        };
        if !self.profiles.is_resource_type(source) {
            return Err(bad(name, format!("{source} is not a resource type")));
        }
        if let Some(c) = code {
            let p = self.param(source, c, name)?;
            if p.kind != Kind::Reference {
                return Err(bad(name, format!("{source}:{c} is not a reference parameter")));
            }
        }
        if let Some(t) = target {
            if !self.profiles.is_resource_type(t) {
                return Err(bad(name, format!("{t} is not a resource type")));
            }
        }
        Ok(Include {
            source: source.to_string(),
            code: code.map(String::from),
            target: target.map(String::from),
            iterate,
        })
    }

    fn param(&self, rtype: &str, code: &str, name: &str) -> Result<Arc<Param>, FhirError> {
        self.idx.registry.get(rtype, code).cloned().ok_or_else(|| {
            FhirError::not_supported(format!(
                "unknown search parameter {code:?} for {rtype} (in {name}); GET /metadata lists the supported ones"
            ))
            .at(name.to_string())
        })
    }

    /// One filter parameter `name=value` on `rtype`.
    pub fn filter(&self, rtype: &str, name: &str, value: &str) -> Result<Filter, FhirError> {
        if let Some(rest) = name.strip_prefix("_has:") {
            let mut parts = rest.splitn(3, ':');
            let (Some(t), Some(code), Some(inner)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(bad(name, "expected _has:Type:reference:parameter"));
            };
            if !self.profiles.is_resource_type(t) {
                return Err(bad(name, format!("{t} is not a resource type")));
            }
            let p = self.param(t, code, name)?;
            if p.kind != Kind::Reference {
                return Err(bad(name, format!("{t}:{code} is not a reference parameter")));
            }
            let inner = self.filter(t, inner, value)?;
            return Ok(Filter::Has { rtype: t.to_string(), code: code.to_string(), inner: Box::new(inner) });
        }
        if let Some((head, rest)) = name.split_once('.') {
            let (code, typed) = head.split_once(':').map_or((head, None), |(c, t)| (c, Some(t)));
            let p = self.param(rtype, code, name)?;
            if p.kind != Kind::Reference {
                return Err(bad(name, format!("{code} is not a reference parameter, so it cannot be chained")));
            }
            let candidates: Vec<String> = match typed {
                Some(t) if self.profiles.is_resource_type(t) => vec![t.to_string()],
                Some(t) => return Err(bad(name, format!("{t} is not a resource type"))),
                None if p.targets.is_empty() => self.profiles.resource_types().to_vec(),
                None => p.targets.clone(),
            };
            let chained = rest.split(['.', ':']).next().unwrap_or(rest);
            let mut targets = Vec::new();
            for t in candidates {
                if chained.starts_with("_has") || self.idx.registry.get(&t, chained).is_some() {
                    targets.push((t.clone(), self.filter(&t, rest, value)?));
                }
            }
            if targets.is_empty() {
                return Err(FhirError::not_supported(format!(
                    "no target type of {rtype}.{code} has a search parameter {chained:?} (in {name})"
                ))
                .at(name.to_string()));
            }
            return Ok(Filter::Chain { code: code.to_string(), targets });
        }
        let (code, modifier) = name.split_once(':').map_or((name, None), |(c, m)| (c, Some(m)));
        match code {
            "_id" if modifier.is_none() => {
                return Ok(Filter::Ids(split_escaped(value, ',').iter().map(|v| unescape(v)).collect()));
            }
            "_list" if modifier.is_none() => {
                return Ok(Filter::List(split_escaped(value, ',').iter().map(|v| unescape(v)).collect()));
            }
            "_text" | "_content" if modifier.is_none() || modifier == Some("contains") => {
                let needles = split_escaped(value, ',').iter().map(|v| normalize(&unescape(v))).collect();
                return Ok(Filter::Text { content: code == "_content", needles });
            }
            _ => {}
        }
        let p = self.param(rtype, code, name)?;
        if modifier == Some("missing") {
            let missing = match value {
                "true" => true,
                "false" => false,
                _ => return Err(bad(name, format!(":missing takes true or false, not {value:?}"))),
            };
            return Ok(Filter::Missing { code: code.to_string(), missing });
        }
        if p.kind == Kind::Special {
            return Err(
                FhirError::not_supported(format!("special parameter {code} is not supported")).at(name.to_string())
            );
        }
        let mut negate = false;
        let mut preds = Vec::new();
        for v in split_escaped(value, ',') {
            let (pred, neg) = self.pred(&p, modifier, &v, name)?;
            negate = neg;
            preds.push(pred);
        }
        Ok(Filter::Values { code: code.to_string(), negate, preds })
    }

    /// One value (still escaped) of parameter `p` with `modifier`; the flag is negation.
    fn pred(&self, p: &Param, modifier: Option<&str>, v: &str, name: &str) -> Result<(Pred, bool), FhirError> {
        let unsupported =
            |m: &str| bad(name, format!("modifier :{m} is not supported on {} parameters", p.kind.as_str()));
        match p.kind {
            Kind::Token if modifier.is_none() || modifier == Some("not") => {
                if self.is_boolean(p) && !matches!(v, "true" | "false") {
                    return Err(bad(name, format!("{} is a boolean: true or false, not {v:?}", p.code)));
                }
                Ok((token(v), modifier.is_some()))
            }
            Kind::Token => match modifier {
                None => Ok((token(v), false)),
                Some("text") => Ok((Pred::TokenText(normalize(&unescape(v))), false)),
                Some("of-type") => {
                    let parts = split_escaped(v, '|');
                    let [system, code, value] = parts.as_slice() else {
                        return Err(bad(name, format!(":of-type takes system|code|value, not {v:?}")));
                    };
                    Ok((
                        Pred::OfType {
                            system: (!system.is_empty()).then(|| unescape(system)),
                            code: unescape(code),
                            value: unescape(value),
                        },
                        false,
                    ))
                }
                Some(m @ ("in" | "not-in")) => {
                    let url = unescape(v);
                    let set = self.profiles.value_set(&url).ok_or_else(|| {
                        bad(name, format!("value set {url:?} is not one this server can expand (core R4 value sets with enumerated codes are)"))
                    })?;
                    Ok((Pred::InSet(set), m == "not-in"))
                }
                Some(m) => Err(unsupported(m)),
            },
            Kind::String => {
                let mode = match modifier {
                    None => StrMode::Starts,
                    Some("exact") => StrMode::Exact,
                    Some("contains") => StrMode::Contains,
                    Some(m) => return Err(unsupported(m)),
                };
                let raw = unescape(v);
                let needle = if mode == StrMode::Exact { raw } else { normalize(&raw) };
                Ok((Pred::Str { needle, mode }, false))
            }
            Kind::Uri => {
                let mode = match modifier {
                    None => UriMode::Exact,
                    Some("below") => UriMode::Below,
                    Some("above") => UriMode::Above,
                    Some(m) => return Err(unsupported(m)),
                };
                Ok((Pred::Uri { value: unescape(v), mode }, false))
            }
            Kind::Reference => self.reference(p, modifier, &unescape(v), name).map(|r| (r, false)),
            Kind::Date | Kind::Number | Kind::Quantity => {
                if let Some(m) = modifier {
                    return Err(unsupported(m));
                }
                Ok((ordered(p.kind, v, name)?, false))
            }
            Kind::Composite => {
                if let Some(m) = modifier {
                    return Err(unsupported(m));
                }
                let parts = split_escaped(v, '$');
                if parts.len() != p.components.len() {
                    return Err(bad(
                        name,
                        format!(
                            "{v:?} has {} parts separated by $, the parameter {} components",
                            parts.len(),
                            p.components.len()
                        ),
                    ));
                }
                let mut preds = Vec::new();
                for (c, part) in p.components.iter().zip(&parts) {
                    preds.push(match c.kind {
                        Kind::Token => token(part),
                        Kind::String => Pred::Str { needle: normalize(&unescape(part)), mode: StrMode::Starts },
                        Kind::Uri => Pred::Uri { value: unescape(part), mode: UriMode::Exact },
                        Kind::Reference => Pred::Ref { rtype: None, id: unescape(part) },
                        k => ordered(k, part, name)?,
                    });
                }
                Ok((Pred::Composite(preds), false))
            }
            Kind::Special => Err(bad(name, "special parameters are not supported")),
        }
    }

    /// Whether a token parameter reads a boolean element (so only true/false make sense).
    fn is_boolean(&self, p: &Param) -> bool {
        let ev = crate::fhir::fhirpath::Eval { profiles: self.profiles };
        let Some(e) = &p.expr else { return false };
        let Some(rtype) = crate::fhir::fhirpath::root_type(e) else { return false };
        ev.static_types(e, rtype).is_some_and(|ts| !ts.is_empty() && ts.iter().all(|t| t == "boolean"))
    }

    fn reference(&self, p: &Param, modifier: Option<&str>, v: &str, name: &str) -> Result<Pred, FhirError> {
        match modifier {
            Some("identifier") => {
                let (system, value) = match v.split_once('|') {
                    Some((s, val)) => ((!s.is_empty()).then(|| s.to_string()), val.to_string()),
                    None => (None, v.to_string()),
                };
                return Ok(Pred::RefIdent { system, value });
            }
            Some(t) if self.profiles.is_resource_type(t) => {
                if !p.targets.is_empty() && !p.targets.iter().any(|x| x == t) {
                    return Err(bad(name, format!("{} cannot reference {t}", p.code)));
                }
                let id = v.rsplit('/').next().unwrap_or(v).to_string();
                return Ok(Pred::Ref { rtype: Some(t.to_string()), id });
            }
            Some(m) => return Err(bad(name, format!("modifier :{m} is not supported on reference parameters"))),
            None => {}
        }
        if v.is_empty() {
            return Err(bad(name, "empty reference"));
        }
        if v.contains("://") || v.starts_with("urn:") {
            let local = v.strip_prefix(self.base).and_then(|r| r.strip_prefix('/'));
            return Ok(match local.map(split_ref) {
                Some((Some(t), Some(id))) => Pred::Ref { rtype: Some(t), id },
                _ => Pred::RefUrl(v.to_string()),
            });
        }
        Ok(match split_ref(v) {
            (Some(t), Some(id)) if v.contains('/') => Pred::Ref { rtype: Some(t), id },
            _ if v.contains('/') => return Err(bad(name, format!("{v:?} is not Type/id, an id or an absolute URL"))),
            _ => Pred::Ref { rtype: None, id: v.to_string() },
        })
    }
}

fn token(v: &str) -> Pred {
    let parts = split_escaped(v, '|');
    match parts.as_slice() {
        [code] => Pred::Token { system: None, code: Some(unescape(code)) },
        [system, code] => Pred::Token {
            system: Some((!system.is_empty()).then(|| unescape(system))),
            code: (!code.is_empty()).then(|| unescape(code)),
        },
        // More than one bar: the rest belongs to the code.
        _ => Pred::Token { system: Some(Some(unescape(&parts[0]))), code: Some(unescape(&parts[1..].join("|"))) },
    }
}

/// A date, number or quantity value with its prefix.
fn ordered(kind: Kind, v: &str, name: &str) -> Result<Pred, FhirError> {
    let (prefix, rest) = prefix_of(v);
    if prefix.is_none() && v.len() >= 2 && v.as_bytes()[..2].iter().all(u8::is_ascii_lowercase) {
        return Err(bad(name, format!("unknown prefix {:?} in {v:?} (eq ne gt lt ge le sa eb ap)", &v[..2])));
    }
    let prefix = prefix.unwrap_or(Prefix::Eq);
    if kind == Kind::Date {
        let (lo, hi) = date_range_ms(&crate::fhir::query_date(rest))
            .ok_or_else(|| bad(name, format!("{rest:?} is not a FHIR date, dateTime or instant")))?;
        Ok(Pred::Date { prefix, lo, hi })
    } else {
        let parts = split_escaped(rest, '|');
        let (number, system, code) = match parts.as_slice() {
            [n] => (n.as_str(), None, None),
            [n, s, c] if kind == Kind::Quantity => {
                (n.as_str(), (!s.is_empty()).then(|| unescape(s)), (!c.is_empty()).then(|| unescape(c)))
            }
            _ => {
                return Err(bad(
                    name,
                    format!(
                        "{v:?} is not [prefix]number{}",
                        if kind == Kind::Quantity { "[|system|code]" } else { "" }
                    ),
                ))
            }
        };
        let (value, half) = decimal(number).ok_or_else(|| bad(name, format!("{number:?} is not a number")))?;
        Ok(Pred::Num { prefix, value, lo: value - half, hi: value + half, system, code })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_unescaped_separators() {
        assert_eq!(split_escaped(r"a\,b,c", ','), vec![r"a\,b", "c"]);
        assert_eq!(unescape(r"a\,b\$c\|d\\"), r"a,b$c|d\");
    }

    #[test]
    fn decimals_carry_their_precision() {
        assert_eq!(decimal("100"), Some((100.0, 0.5)));
        let (v, h) = decimal("0.80").unwrap();
        assert!((v - 0.8).abs() < 1e-12 && (h - 0.005).abs() < 1e-12);
        assert_eq!(decimal("1e2"), Some((100.0, 50.0)));
        assert_eq!(decimal("abc"), None);
        assert_eq!(decimal("NaN"), None);
    }

    #[test]
    fn tokens_parse_every_form() {
        assert!(matches!(token("a"), Pred::Token { system: None, code: Some(c) } if c == "a"));
        assert!(matches!(token("|a"), Pred::Token { system: Some(None), code: Some(_) }));
        assert!(matches!(token("s|"), Pred::Token { system: Some(Some(_)), code: None }));
        assert!(matches!(token(r"s|a\|b"), Pred::Token { code: Some(c), .. } if c == "a|b"));
    }

    #[test]
    fn ordered_values_reject_bad_prefixes_and_numbers() {
        assert!(ordered(Kind::Date, "xx2020", "date").is_err());
        assert!(ordered(Kind::Date, "ge2020-13", "date").is_err());
        assert!(matches!(ordered(Kind::Date, "ap2020", "date").unwrap(), Pred::Date { prefix: Prefix::Ap, .. }));
        assert!(ordered(Kind::Quantity, "gt5.4|http://unitsofmeasure.org|mg", "q").is_ok());
        assert!(ordered(Kind::Number, "5|a|b", "n").is_err());
        assert!(ordered(Kind::Quantity, "abc", "q").is_err());
    }
}
