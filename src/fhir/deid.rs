//! De-identification of resources, with rules in the style of Microsoft's FHIR anonymizer: a
//! rule is a path and a method, the first rule that matches a node decides, and a rule
//! applies inside a node another rule redacts only if it comes before that rule.
//!
//! Paths: `nodesByType('T')` (every node of FHIR type `T`), optionally followed by element
//! names (`nodesByType('Address').state`), or `Type.a.b` from a resource root (`Resource.a`
//! for every type). Methods: `keep`, `redact`, `dateShift` (by a per-study, per-patient HMAC
//! offset of up to 50 days either way, so intervals within a patient survive), `cryptoHash`
//! (HMAC-SHA256 under a per-study key: ids and the ids inside references, so links survive
//! inside a study and not across studies), `generalize` (dates to the year, a birth date past
//! 89 years removed, ZIP codes to their first three digits or `000`), `substitute VALUE`.
//!
//! [`SAFE_HARBOR`] is the default: HIPAA Safe Harbor's 18 identifier classes (45 CFR
//! 164.514(b)(2)) as such rules.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::json::Json;
use super::profiles::{Element, Profiles};
use super::validate::find;

/// The default rule set: HIPAA Safe Harbor.
pub const SAFE_HARBOR: &[&str] = &[
    // Record numbers, account numbers and every other unique identifier: ids and references
    // become per-study pseudonyms; identifiers go.
    "Resource.id cryptoHash",
    "nodesByType('Reference').reference cryptoHash",
    "nodesByType('Reference').display redact",
    "nodesByType('Reference').identifier redact",
    "nodesByType('Identifier') redact",
    "Resource.meta.source redact",
    // Names, contact details, free text that may carry them, photos and documents (URLs).
    "nodesByType('Narrative') redact",
    "nodesByType('HumanName') redact",
    "nodesByType('ContactPoint') redact",
    "nodesByType('Attachment') redact",
    "nodesByType('Annotation') redact",
    "Patient.extension redact",
    "Patient.contact redact",
    "Coverage.subscriberId redact",
    // Free text answers (Synthea's social-history Observations record the address, for one).
    "Observation.valueString redact",
    "Observation.component.valueString redact",
    "QuestionnaireResponse.item.answer.valueString redact",
    // Geography below the state; the first three ZIP digits where the area is large enough.
    "nodesByType('Address').state keep",
    "nodesByType('Address').country keep",
    "nodesByType('Address').postalCode generalize",
    "nodesByType('Address') redact",
    // Every element of dates but the year; ages over 89.
    "Patient.birthDate generalize",
    "nodesByType('date') generalize",
    "nodesByType('dateTime') generalize",
    "nodesByType('instant') generalize",
];

/// The name the AuditEvent gives the default algorithm.
pub const SAFE_HARBOR_NAME: &str = "HIPAA Safe Harbor (45 CFR 164.514(b)(2))";

/// Three-digit ZIP areas of 20,000 people or fewer (HHS guidance, 2000 census): `000`.
const SMALL_ZIP3: [&str; 17] = [
    "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831", "878", "879", "884", "890",
    "893",
];

#[derive(Clone, Debug, PartialEq)]
enum Method {
    Keep,
    Redact,
    DateShift,
    CryptoHash,
    Generalize,
    Substitute(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Target {
    ByType { ty: String, tail: Vec<String> },
    ByPath { root: String, tail: Vec<String> },
}

#[derive(Clone, Debug)]
struct Rule {
    target: Target,
    method: Method,
}

impl Rule {
    fn matches(&self, root: &str, chain: &Chain) -> bool {
        match &self.target {
            Target::ByPath { root: r, tail } => {
                (r == "Resource" || r == root)
                    && chain.len() == tail.len()
                    && chain.iter().zip(tail).all(|((name, _), t)| name == t)
            }
            Target::ByType { ty, tail } => {
                if tail.is_empty() {
                    return chain.last().is_some_and(|(_, t)| t == ty);
                }
                let Some(at) = chain.len().checked_sub(tail.len() + 1) else { return false };
                chain[at].1 == *ty && chain[at + 1..].iter().zip(tail).all(|((name, _), t)| name == t)
            }
        }
    }
}

/// A study's rule set.
#[derive(Clone, Debug)]
pub struct Rules {
    parsed: Vec<Rule>,
    /// The rules' text, one `PATH METHOD [ARG]` each.
    pub lines: Vec<String>,
    /// What the AuditEvent names as the algorithm.
    pub name: String,
}

fn parse_rule(text: &str) -> Result<Rule, String> {
    let text = text.trim();
    let (path, rest) =
        text.split_once(char::is_whitespace).ok_or_else(|| format!("{text:?}: a rule is PATH METHOD"))?;
    let (method, arg) = rest.trim().split_once(char::is_whitespace).map_or((rest.trim(), ""), |(m, a)| (m, a.trim()));
    let method = match method {
        "keep" => Method::Keep,
        "redact" => Method::Redact,
        "dateShift" => Method::DateShift,
        "cryptoHash" => Method::CryptoHash,
        "generalize" => Method::Generalize,
        "substitute" => Method::Substitute(arg.to_string()),
        m => {
            return Err(format!(
                "{text:?}: unknown method {m:?} (keep, redact, dateShift, cryptoHash, generalize, substitute)"
            ))
        }
    };
    let target = if let Some(rest) = path.strip_prefix("nodesByType('") {
        let (ty, tail) = rest.split_once("')").ok_or_else(|| format!("{path:?}: nodesByType('T') is not closed"))?;
        let tail = tail.strip_prefix('.').unwrap_or(tail);
        Target::ByType {
            ty: ty.to_string(),
            tail: tail.split('.').filter(|s| !s.is_empty()).map(String::from).collect(),
        }
    } else {
        let mut parts = path.split('.');
        let root = parts.next().filter(|r| r.chars().next().is_some_and(|c| c.is_ascii_uppercase()));
        let root = root.ok_or_else(|| format!("{path:?}: a path starts with a resource type or nodesByType('T')"))?;
        Target::ByPath { root: root.to_string(), tail: parts.map(String::from).collect() }
    };
    Ok(Rule { target, method })
}

impl Rules {
    /// Rules from their text (`PATH METHOD [ARG]` each); `name` names the algorithm.
    pub fn parse<S: AsRef<str>>(name: &str, lines: &[S]) -> Result<Self, String> {
        let parsed = lines.iter().map(|l| parse_rule(l.as_ref())).collect::<Result<_, _>>()?;
        let lines = lines.iter().map(|l| l.as_ref().to_string()).collect();
        Ok(Self { parsed, lines, name: name.to_string() })
    }

    pub fn safe_harbor() -> Self {
        Self::parse(SAFE_HARBOR_NAME, SAFE_HARBOR).unwrap_or_else(|e| unreachable!("the built-in rules parse: {e}"))
    }
}

/// What a de-identification needs besides the rules.
pub struct Keys<'a> {
    /// The study's key (pseudonyms and date shifts).
    pub study: &'a [u8; 32],
    /// The patient the resource belongs to (its date shift).
    pub patient: Option<&'a str>,
    /// Now, for ages.
    pub now_ms: i64,
}

fn hmac(key: &[u8; 32], label: &str, value: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(label.as_bytes());
    mac.update(&[0]);
    mac.update(value.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The per-study pseudonym of an id (64 hex digits: a valid FHIR id).
pub fn pseudonym(key: &[u8; 32], id: &str) -> String {
    hex::encode(hmac(key, "id", id))
}

/// A reference with its id replaced by the pseudonym (`Type/id[/_history/v]`, absolute or
/// `urn:uuid:`); a contained (`#x`) reference stays.
fn hash_reference(key: &[u8; 32], r: &str) -> String {
    if r.starts_with('#') {
        return r.to_string();
    }
    if let Some(u) = r.strip_prefix("urn:uuid:") {
        return format!("urn:uuid:{}", pseudonym(key, u));
    }
    let (head, history) = r.split_once("/_history/").map_or((r, None), |(h, v)| (h, Some(v)));
    let (prefix, id) = head.rsplit_once('/').unwrap_or(("", head));
    let ty = prefix.rsplit('/').next().unwrap_or_default();
    let mut out = if ty.is_empty() { pseudonym(key, id) } else { format!("{ty}/{}", pseudonym(key, id)) };
    if let Some(v) = history {
        out.push_str("/_history/");
        out.push_str(v);
    }
    out
}

/// Days (-50..=50, never 0) a patient's dates move for a study.
fn shift_days(key: &[u8; 32], patient: &str) -> i64 {
    let h = hmac(key, "dateShift", patient);
    let n = i64::from(u16::from_be_bytes([h[0], h[1]]) % 100);
    if n < 50 {
        n - 50
    } else {
        n - 49
    }
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` at the start of `s`, if any.
fn ymd(s: &str) -> Option<(i64, u32, u32)> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    Some((s.get(0..4)?.parse().ok()?, s.get(5..7)?.parse().ok()?, s.get(8..10)?.parse().ok()?))
}

fn date_shift(s: &str, days: i64) -> String {
    let Some((y, m, d)) = ymd(s) else { return s.get(0..4).unwrap_or(s).to_string() };
    let (y, m, d) = civil_from_days(days_from_civil(y, m, d) + days);
    format!("{y:04}-{m:02}-{d:02}{}", &s[10..])
}

fn year(s: &str) -> &str {
    s.get(0..4).unwrap_or(s)
}

struct Walk<'a> {
    p: &'a Profiles,
    rules: &'a Rules,
    keys: &'a Keys<'a>,
}

/// One node on the way from the resource root: element name and FHIR type.
type Chain = Vec<(String, String)>;

impl Walk<'_> {
    fn first(&self, root: &str, chain: &Chain, limit: usize) -> Option<(usize, &Rule)> {
        self.rules.parsed.iter().take(limit).enumerate().find(|(_, r)| r.matches(root, chain))
    }

    /// Applies a value method to a primitive; `None` removes it.
    fn value(&self, method: &Method, ty: &str, name: &str, v: &Json, nested: bool) -> Option<Json> {
        let Json::String(s) = v else {
            return match method {
                Method::Redact => None,
                Method::Substitute(x) => Some(Json::String(x.clone())),
                _ => Some(v.clone()),
            };
        };
        let key = self.keys.study;
        Some(Json::String(match method {
            Method::Keep => return Some(v.clone()),
            Method::Redact => return None,
            Method::Substitute(x) => x.clone(),
            Method::CryptoHash if name == "id" && nested => s.clone(),
            Method::CryptoHash if name == "reference" => hash_reference(key, s),
            Method::CryptoHash => pseudonym(key, s),
            Method::DateShift => match self.keys.patient {
                Some(p) => date_shift(s, shift_days(key, p)),
                None => year(s).to_string(),
            },
            Method::Generalize if name == "postalCode" => {
                let digits: String = s.chars().filter(char::is_ascii_digit).take(3).collect();
                if digits.len() < 3 || SMALL_ZIP3.contains(&digits.as_str()) {
                    "000".into()
                } else {
                    digits
                }
            }
            Method::Generalize if name == "birthDate" => {
                let born: i64 = year(s).parse().ok()?;
                let (now, _, _) = civil_from_days(self.keys.now_ms.div_euclid(86_400_000));
                if now - born > 89 {
                    return None;
                }
                born.to_string()
            }
            Method::Generalize if ty == "instant" => format!("{}-01-01T00:00:00Z", year(s)),
            Method::Generalize => year(s).to_string(),
        }))
    }

    #[allow(clippy::too_many_arguments)]
    /// De-identifies the object `v` whose definition path is `def`; false when nothing of
    /// it remains. `limit`: only rules before it apply (inside a redacted node); `strict`:
    /// a node no rule matches goes (inside a redacted node) or stays.
    fn object(
        &self,
        v: &mut Json,
        def: &str,
        root: &str,
        chain: &mut Chain,
        limit: usize,
        strict: bool,
        nested: bool,
    ) -> bool {
        let Some(children) = self.p.children(def) else { return !strict };
        let Json::Object(members) = v else { return !strict };
        let mut kept = Vec::with_capacity(members.len());
        for (key, mut value) in std::mem::take(members) {
            if key == "resourceType" {
                kept.push((key, value));
                continue;
            }
            let base = key.strip_prefix('_').unwrap_or(&key);
            let Some((e, choice)) = find(children, base) else {
                if !strict {
                    kept.push((key, value));
                }
                continue;
            };
            let ty = choice.or_else(|| e.types.first().map(String::as_str)).unwrap_or_default();
            let primitive_companion = key.starts_with('_');
            let keep = match &mut value {
                Json::Array(items) => {
                    let mut out = Vec::with_capacity(items.len());
                    for mut item in std::mem::take(items) {
                        if self.member(&mut item, e, ty, base, root, chain, limit, strict, nested, primitive_companion)
                        {
                            out.push(item);
                        }
                    }
                    *items = out;
                    !items.is_empty()
                }
                item => self.member(item, e, ty, base, root, chain, limit, strict, nested, primitive_companion),
            };
            if keep {
                kept.push((key, value));
            }
        }
        // A companion `_x` without its `x` carries nothing.
        let names: Vec<String> = kept.iter().map(|(k, _)| k.clone()).collect();
        kept.retain(|(k, _)| k.strip_prefix('_').is_none_or(|b| names.iter().any(|n| n == b)));
        let has_content = kept.iter().any(|(k, _)| k != "resourceType");
        *members = kept;
        has_content
    }

    #[allow(clippy::too_many_arguments)]
    fn member(
        &self,
        v: &mut Json,
        e: &Element,
        ty: &str,
        name: &str,
        root: &str,
        chain: &mut Chain,
        limit: usize,
        strict: bool,
        nested: bool,
        companion: bool,
    ) -> bool {
        if matches!(v, Json::Null) {
            return true;
        }
        if ty == "Resource" {
            return self.resource(v, true) || !strict;
        }
        chain.push((name.to_string(), ty.to_string()));
        let primitive = self.p.is_primitive(ty) || ty.starts_with("http://hl7.org/fhirpath/");
        let def = match (&e.content_ref, ty) {
            (Some(r), _) => r.clone(),
            (None, "BackboneElement" | "Element") => e.path.clone(),
            (None, t) => t.to_string(),
        };
        let rule = self.first(root, chain, limit);
        let keep = if companion {
            // `_x`: the primitive's id and extensions, judged as an Element.
            match rule {
                Some((_, r)) if r.method == Method::Keep => true,
                Some((i, r)) if r.method == Method::Redact => self.object(v, "Element", root, chain, i, true, nested),
                Some(_) => true,
                None => self.object(v, "Element", root, chain, limit, strict, nested),
            }
        } else {
            match (rule, primitive) {
                (Some((_, r)), true) => match self.value(&r.method, ty, name, v, nested) {
                    Some(x) => {
                        *v = x;
                        true
                    }
                    None => false,
                },
                (Some((_, r)), false) if r.method == Method::Keep => true,
                (Some((i, r)), false) if r.method == Method::Redact => {
                    self.object(v, &def, root, chain, i, true, nested)
                }
                (Some(_) | None, false) => self.object(v, &def, root, chain, limit, strict, nested),
                (None, true) => !strict,
            }
        };
        chain.pop();
        keep
    }

    fn resource(&self, v: &mut Json, nested: bool) -> bool {
        let Some(rtype) = v.get("resourceType").and_then(Json::as_str).map(str::to_string) else { return false };
        let mut chain = Vec::new();
        self.object(v, &rtype, &rtype, &mut chain, self.rules.parsed.len(), false, nested)
    }
}

/// The patient a resource's dates belong to (its date shift): the Patient itself, or the one
/// its subject, patient, beneficiary or individual references.
pub fn patient_of(v: &Json) -> Option<&str> {
    if v.str_at(&["resourceType"]) == Some("Patient") {
        return v.str_at(&["id"]);
    }
    ["subject", "patient", "beneficiary", "individual"]
        .iter()
        .find_map(|k| v.str_at(&[k, "reference"]).and_then(|r| r.strip_prefix("Patient/")))
}

/// De-identifies `resource` in place by `rules`.
pub fn apply(p: &Profiles, rules: &Rules, keys: &Keys<'_>, resource: &mut Json) {
    Walk { p, rules, keys }.resource(resource, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_bad_ones_are_named() {
        assert_eq!(Rules::safe_harbor().parsed.len(), SAFE_HARBOR.len());
        assert!(Rules::parse("x", &["Patient.name scramble"]).unwrap_err().contains("scramble"));
        assert!(Rules::parse("x", &["name redact"]).is_err());
        let r = parse_rule("nodesByType('Address').postalCode generalize").unwrap();
        assert_eq!(r.target, Target::ByType { ty: "Address".into(), tail: vec!["postalCode".into()] });
    }

    #[test]
    fn date_shift_keeps_intervals_and_moves_every_date_of_a_patient_alike() {
        let key = [7u8; 32];
        let d = shift_days(&key, "p1");
        assert!(d != 0 && (-50..=50).contains(&d));
        assert_eq!(date_shift("2020-02-28", 2), "2020-03-01");
        assert_eq!(date_shift("2019-12-31T23:00:00Z", 1), "2020-01-01T23:00:00Z");
        let a = date_shift("2020-01-10", d);
        let b = date_shift("2020-01-20", d);
        let days = |s: &str| {
            let (y, m, dd) = ymd(s).unwrap();
            days_from_civil(y, m, dd)
        };
        assert_eq!(days(&b) - days(&a), 10, "the interval survives");
    }

    #[test]
    fn references_keep_their_type_and_version_and_hash_their_id() {
        let key = [1u8; 32];
        let h = pseudonym(&key, "123");
        assert_eq!(hash_reference(&key, "Patient/123"), format!("Patient/{h}"));
        assert_eq!(hash_reference(&key, "http://x/fhir/Patient/123/_history/2"), format!("Patient/{h}/_history/2"));
        assert_eq!(hash_reference(&key, "#c1"), "#c1");
        assert_ne!(pseudonym(&[2u8; 32], "123"), h, "another study, another pseudonym");
    }
}
