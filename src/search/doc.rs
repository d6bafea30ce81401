//! A document of the index: what a search reads of one resource. Its values are kept in the
//! encoded form they are sealed in, one slice per parameter, and a parameter is decoded the
//! first time a search asks for it: a `_sort` over thousands of documents decodes the sort
//! parameter of each, not its twenty others (decoding and dropping values took over half of
//! such a search's time).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::OnceLock;

use super::values::Value;

/// Values by parameter code, as extracted from a resource.
pub type Values = BTreeMap<String, Vec<Value>>;

#[derive(Debug)]
pub struct Doc {
    pub id: String,
    pub version: u64,
    /// The Merkle leaf of that version (where its body is read from).
    pub leaf: u64,
    pub last_updated_ms: i64,
    params: Params,
}

/// The encoded values: per parameter, `u16` code length, code, `u32` length, bincode of its
/// `Vec<Value>`.
#[derive(Debug)]
struct Params {
    plain: Vec<u8>,
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    code: Range<usize>,
    vals: Range<usize>,
    decoded: OnceLock<Vec<Value>>,
}

impl Doc {
    /// A document of freshly extracted values (parameters without values are left out).
    pub fn new(id: String, version: u64, leaf: u64, last_updated_ms: i64, values: Values) -> Self {
        let mut plain = Vec::new();
        let mut entries = Vec::with_capacity(values.len());
        for (code, vals) in values {
            let encoded = bincode::serialize(&vals).unwrap_or_default();
            let (Ok(cl), Ok(vl)) = (u16::try_from(code.len()), u32::try_from(encoded.len())) else { continue };
            plain.extend_from_slice(&cl.to_be_bytes());
            let c = plain.len();
            plain.extend_from_slice(code.as_bytes());
            plain.extend_from_slice(&vl.to_be_bytes());
            let v = plain.len();
            plain.extend_from_slice(&encoded);
            entries.push(Entry { code: c..c + code.len(), vals: v..plain.len(), decoded: OnceLock::from(vals) });
        }
        Self { id, version, leaf, last_updated_ms, params: Params { plain, entries } }
    }

    /// A document of values in their encoded form ([`Doc::encoded`]); `None` if malformed.
    pub fn decode(id: String, version: u64, leaf: u64, last_updated_ms: i64, plain: Vec<u8>) -> Option<Self> {
        let mut entries = Vec::new();
        let mut at = 0;
        let take = |at: &mut usize, n: usize| -> Option<Range<usize>> {
            let r = *at..at.checked_add(n)?;
            (r.end <= plain.len()).then(|| {
                *at = r.end;
                r
            })
        };
        while at < plain.len() {
            let cl = plain.get(at..at + 2)?;
            at += 2;
            let code = take(&mut at, usize::from(u16::from_be_bytes([cl[0], cl[1]])))?;
            let vl: [u8; 4] = plain.get(at..at + 4)?.try_into().ok()?;
            at += 4;
            let vals = take(&mut at, u32::from_be_bytes(vl) as usize)?;
            entries.push(Entry { code, vals, decoded: OnceLock::new() });
        }
        Some(Self { id, version, leaf, last_updated_ms, params: Params { plain, entries } })
    }

    /// The values in the form they are sealed in.
    pub fn encoded(&self) -> &[u8] {
        &self.params.plain
    }

    /// The values of parameter `code` (empty when it has none).
    pub fn get(&self, code: &str) -> &[Value] {
        let p = &self.params;
        p.entries.iter().find(|e| &p.plain[e.code.clone()] == code.as_bytes()).map_or(&[], |e| p.values_of(e))
    }

    /// Every parameter with its values, in code order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &[Value])> {
        let p = &self.params;
        p.entries
            .iter()
            .map(move |e| (std::str::from_utf8(&p.plain[e.code.clone()]).unwrap_or_default(), p.values_of(e)))
    }
}

impl Params {
    fn values_of<'a>(&'a self, e: &'a Entry) -> &'a [Value] {
        e.decoded.get_or_init(|| {
            bincode::deserialize(&self.plain[e.vals.clone()]).unwrap_or_else(|err| {
                // The bytes were sealed by this node and opened with their tag checked.
                tracing::error!("search index: a document's values do not decode: {err}");
                Vec::new()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_back_from_their_encoded_form_one_parameter_at_a_time() {
        let mut values = Values::new();
        values.insert("code".into(), vec![Value::Str { norm: "abc".into(), exact: "ABC".into() }]);
        values.insert("date".into(), vec![Value::Date { lo: 1, hi: 2 }, Value::Date { lo: 3, hi: 4 }]);
        let doc = Doc::new("x".into(), 2, 7, 9, values);
        let back = Doc::decode("x".into(), 2, 7, 9, doc.encoded().to_vec()).expect("decodes");
        assert!(back.params.entries.iter().all(|e| e.decoded.get().is_none()), "nothing decoded up front");
        assert_eq!(back.get("date").len(), 2);
        assert!(back.get("missing").is_empty());
        let codes: Vec<&str> = back.params().map(|(c, _)| c).collect();
        assert_eq!(codes, ["code", "date"]);
        assert!(Doc::decode("x".into(), 1, 0, 0, doc.encoded()[..5].to_vec()).is_none(), "a cut encoding is refused");
    }
}
