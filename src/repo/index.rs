//! Equality terms, for the state machine's postings (conditional interactions) and the search
//! index's token and reference postings. A term is `HMAC-SHA256(index_key, code 0x00 value)`:
//! it answers equality questions ("which Observations have subject Patient/123?") without
//! holding the value itself, so no identifier or reference is readable from either at rest.

use consensus::IndexKey;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::fhir::json::Json;
use crate::fhir::refs::{split_reference, values_at};
use crate::fhir::searchparams::{ParamType, SearchParam, SearchParams};

pub fn term(key: &[u8; 32], code: &str, value: &str) -> IndexKey {
    TermKey::new(key).term(code, value)
}

/// The HMAC keyed once: each [`TermKey::term`] then hashes its message and the outer block,
/// not the key's inner and outer pads again (two of about four compressions a term).
#[derive(Clone)]
pub struct TermKey(Hmac<Sha256>);

impl TermKey {
    pub fn new(key: &[u8; 32]) -> Self {
        Self(
            <Hmac<Sha256> as Mac>::new_from_slice(key)
                .unwrap_or_else(|e| unreachable!("HMAC takes any key length: {e}")),
        )
    }

    pub fn term(&self, code: &str, value: &str) -> IndexKey {
        let mut mac = self.0.clone();
        mac.update(code.as_bytes());
        mac.update(&[0]);
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// The index values a token (Identifier) element contributes, in the forms a query can ask:
/// `system|value`, `|value` (no system), `*|value` (any system) and `system|*`.
pub fn identifier_values(v: &Json) -> Vec<String> {
    let system = v.get("system").and_then(Json::as_str);
    let value = v.get("value").and_then(Json::as_str);
    let mut out = Vec::new();
    if let Some(value) = value {
        out.push(format!("*|{value}"));
        match system {
            Some(s) => out.push(format!("{s}|{value}")),
            None => out.push(format!("|{value}")),
        }
    }
    if let Some(s) = system {
        out.push(format!("{s}|*"));
    }
    out
}

/// `Type/id` for a relative reference (absolute URLs keep their last two segments). A query
/// without a type asks for each target type the parameter allows, so one term per reference is
/// enough on the write side.
pub fn reference_values(reference: &str, required_type: Option<&str>) -> Vec<String> {
    let relative = if reference.contains("://") {
        let mut segs: Vec<&str> = reference.rsplitn(3, '/').collect();
        segs.truncate(2);
        segs.reverse();
        segs.join("/")
    } else {
        reference.to_string()
    };
    match split_reference(&relative) {
        Some((t, id)) if required_type.is_none_or(|r| r == t) => vec![format!("{t}/{id}")],
        _ => Vec::new(),
    }
}

/// The search parameters whose terms the state machine keeps, and so the only criteria a
/// conditional interaction accepts besides `_id`: `apply` re-checks them on every node from
/// the replicated state. Each term is a posting per resource in that state (sled), which is
/// what restart, memory and ingest pay for as the data grows; every other search is the
/// search index's (`crate::search`).
pub const CONDITIONAL_PARAMS: &[&str] = &["identifier", "patient", "subject"];

/// The conditional-interaction terms of one resource version (sorted, deduplicated: the state
/// machine stores them as given, so their order must not depend on anything but the resource).
/// `_id` needs no term: the current record of an id is a direct lookup; nor does a parameter
/// another one answers ([`SearchParams::alias`]: `patient` where `subject` holds its terms).
/// Versions written before that carry both; criteria ask for the other's.
pub fn resource_terms(key: &[u8; 32], params: &SearchParams, rtype: &str, res: &Json) -> Vec<IndexKey> {
    let keyed = TermKey::new(key);
    let mut terms = Vec::new();
    let kept =
        |sp: &&SearchParam| CONDITIONAL_PARAMS.contains(&sp.code.as_str()) && params.alias(rtype, &sp.code).is_none();
    for sp in params.for_type(rtype).filter(kept) {
        for path in &sp.paths {
            for v in values_at(res, &path.elements) {
                let values = match sp.kind {
                    ParamType::Token => identifier_values(v),
                    ParamType::Reference => v
                        .get("reference")
                        .and_then(Json::as_str)
                        .map(|r| reference_values(r, path.target.as_deref()))
                        .unwrap_or_default(),
                    ParamType::Other(_) => Vec::new(),
                };
                terms.extend(values.iter().map(|val| keyed.term(&sp.code, val)));
            }
        }
    }
    terms.sort_unstable();
    terms.dedup();
    terms
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Postings already on disk (state lookup tables, search index) were keyed with a fresh
    /// HMAC per term: the keyed-once form must give the same bytes, or conditional
    /// interactions and searches would stop finding them.
    #[test]
    fn a_term_keyed_once_equals_one_keyed_afresh() {
        let key = [9u8; 32];
        let mut fresh = <Hmac<Sha256> as Mac>::new_from_slice(&key).unwrap();
        fresh.update(b"identifier\0http://x|1");
        let expected: IndexKey = fresh.finalize().into_bytes().into();
        let keyed = TermKey::new(&key);
        assert_eq!(keyed.term("identifier", "http://x|1"), expected);
        assert_eq!(keyed.term("identifier", "http://x|1"), expected, "the keyed state is not consumed");
        assert_eq!(term(&key, "identifier", "http://x|1"), expected);
        assert_ne!(keyed.term("identifier", "http://x|2"), expected);
    }
}
