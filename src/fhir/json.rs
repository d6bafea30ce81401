//! An order-preserving JSON tree that keeps numbers as their exact source text, so that
//! what a client sent (`170.10`, `1e2`) is what is stored and returned. serde_json's `Value`
//! cannot be the stored form: it normalizes numbers and (without `preserve_order`) reorders
//! keys.

use std::fmt::{self, Write as _};

#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// The number exactly as written (validated against the RFC 8259 grammar).
    Number(String),
    String(String),
    Array(Vec<Json>),
    /// Members in document order; keys are unique (duplicates are a parse error).
    Object(Vec<(String, Json)>),
    /// Already-serialized JSON spliced in verbatim when written: stored resources go into
    /// response bundles without being parsed and re-serialized.
    Raw(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonError {
    pub offset: usize,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at line {}, column {} (byte {})", self.message, self.line, self.column, self.offset)
    }
}

impl std::error::Error for JsonError {}

/// Parses `bytes` as one JSON document nested at most `max_depth` deep.
pub fn parse(bytes: &[u8], max_depth: usize) -> Result<Json, JsonError> {
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let mut p = Parser { text: "", s: bytes, i: e.valid_up_to(), max_depth };
            return Err(p.err(format!("invalid UTF-8 at byte {}", e.valid_up_to())));
        }
    };
    let mut p = Parser { text, s: bytes, i: 0, max_depth };
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(p.err("unexpected data after the JSON document".into()));
    }
    Ok(v)
}

struct Parser<'a> {
    /// The input, checked to be UTF-8 once: strings are cut from it without a second check.
    text: &'a str,
    s: &'a [u8],
    i: usize,
    max_depth: usize,
}

impl Parser<'_> {
    fn err(&mut self, message: String) -> JsonError {
        let upto = &self.s[..self.i.min(self.s.len())];
        // One more line than newlines: the pieces between them.
        let line = upto.split(|&b| b == b'\n').count();
        let column = upto.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        JsonError { offset: self.i, line, column, message }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn expect_word(&mut self, word: &str, v: Json) -> Result<Json, JsonError> {
        if self.s[self.i..].starts_with(word.as_bytes()) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(self.err(format!("expected {word}")))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, JsonError> {
        match self.peek() {
            None => Err(self.err("unexpected end of input".into())),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b't') => self.expect_word("true", Json::Bool(true)),
            Some(b'f') => self.expect_word("false", Json::Bool(false)),
            Some(b'n') => self.expect_word("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(c) => Err(self.err(format!("unexpected character {:?}", c as char))),
        }
    }

    fn check_depth(&mut self, depth: usize) -> Result<(), JsonError> {
        if depth > self.max_depth {
            return Err(self.err(format!("nesting deeper than {} levels", self.max_depth)));
        }
        Ok(())
    }

    fn object(&mut self, depth: usize) -> Result<Json, JsonError> {
        self.check_depth(depth)?;
        self.i += 1;
        let mut members: Vec<(String, Json)> = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(Json::Object(members));
        }
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a member name in double quotes".into()));
            }
            let key_at = self.i;
            let key = self.string()?;
            if members.iter().any(|(k, _)| *k == key) {
                self.i = key_at;
                return Err(self.err(format!("duplicate member {key:?}")));
            }
            self.ws();
            if self.peek() != Some(b':') {
                return Err(self.err("expected ':' after a member name".into()));
            }
            self.i += 1;
            self.ws();
            let v = self.value(depth)?;
            members.push((key, v));
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(Json::Object(members));
                }
                _ => return Err(self.err("expected ',' or '}' in an object".into())),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Json, JsonError> {
        self.check_depth(depth)?;
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(Json::Array(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth)?);
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(Json::Array(items));
                }
                _ => return Err(self.err("expected ',' or ']' in an array".into())),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<Json, JsonError> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.i += 1;
                if let Some(b'0'..=b'9') = self.peek() {
                    return Err(self.err("numbers may not have leading zeros".into()));
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("expected a digit".into())),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err("expected a digit after the decimal point".into()));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("expected a digit in the exponent".into()));
            }
        }
        // The input is valid UTF-8 and this slice is ASCII.
        Ok(Json::Number(String::from_utf8_lossy(&self.s[start..self.i]).into_owned()))
    }

    fn hex4(&mut self) -> Result<u32, JsonError> {
        let Some(h) = self.s.get(self.i..self.i + 4) else {
            return Err(self.err("truncated \\u escape".into()));
        };
        let text = std::str::from_utf8(h).unwrap_or("");
        let v = u32::from_str_radix(text, 16).map_err(|_| self.err("invalid \\u escape".into()))?;
        self.i += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, JsonError> {
        self.i += 1; // opening quote
                     // Most strings have no escape at all: one copy of the run up to the closing quote.
        let run = first_special(&self.s[self.i..]).unwrap_or(self.s.len() - self.i);
        if self.s.get(self.i + run) == Some(&b'"') {
            let out = self.text[self.i..self.i + run].to_string();
            self.i += run + 1;
            return Ok(out);
        }
        let mut out = String::new();
        loop {
            // Copy the run up to the next quote, backslash or control byte in one go. These
            // are ASCII, so every cut falls on a character boundary of the checked input.
            let run = first_special(&self.s[self.i..]).unwrap_or(self.s.len() - self.i);
            out.push_str(&self.text[self.i..self.i + run]);
            self.i += run;
            let Some(b) = self.peek() else {
                return Err(self.err("unterminated string".into()));
            };
            match b {
                b'"' => {
                    self.i += 1;
                    return Ok(out);
                }
                b'\\' => {
                    self.i += 1;
                    let Some(e) = self.peek() else {
                        return Err(self.err("unterminated escape".into()));
                    };
                    self.i += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&hi) {
                                if self.s.get(self.i..self.i + 2) != Some(b"\\u") {
                                    return Err(self.err("lone high surrogate in \\u escape".into()));
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(self.err("invalid low surrogate in \\u escape".into()));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return Err(self.err("lone low surrogate in \\u escape".into()));
                            } else {
                                hi
                            };
                            char::from_u32(code).ok_or_else(|| self.err("invalid \\u escape".into()))?
                        }
                        other => return Err(self.err(format!("invalid escape \\{}", other as char))),
                    };
                    out.push(c);
                }
                _ => return Err(self.err("control character in string (must be escaped)".into())),
            }
        }
    }
}

/// The first `"`, `\\` or control byte in `s` (what a JSON string cannot hold as it is),
/// looked for eight bytes at a time: strings are most of a resource's bytes.
fn first_special(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut chunks = s.chunks_exact(8);
    for (n, chunk) in (&mut chunks).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_le_bytes(word);
        let (quote, backslash) = (x ^ (ONES * u64::from(b'"')), x ^ (ONES * u64::from(b'\\')));
        // A byte's high bit is set where it is zero (or below 0x20); a borrow can only set
        // more above the first match, so the lowest set bit is exact.
        let found = (quote.wrapping_sub(ONES) & !quote)
            | (backslash.wrapping_sub(ONES) & !backslash)
            | (x.wrapping_sub(ONES * 0x20) & !x);
        if found & HIGH != 0 {
            return Some(n * 8 + (found & HIGH).trailing_zeros() as usize / 8);
        }
    }
    let done = s.len() - chunks.remainder().len();
    chunks.remainder().iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).map(|i| done + i)
}

fn write_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut rest = s;
    // Whole runs that need no escape are copied at once; escapes are ASCII, so every cut
    // falls on a character boundary.
    while let Some(at) = first_special(rest.as_bytes()) {
        out.push_str(&rest[..at]);
        match rest.as_bytes()[at] {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            c => {
                let _ = write!(out, "\\u{c:04x}"); // cannot fail on a String
            }
        }
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

impl Json {
    pub fn write_compact(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) | Json::Raw(n) => out.push_str(n),
            Json::String(s) => write_str(out, s),
            Json::Array(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write_compact(out);
                }
                out.push(']');
            }
            Json::Object(members) => {
                out.push('{');
                for (i, (k, v)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, k);
                    out.push(':');
                    v.write_compact(out);
                }
                out.push('}');
            }
        }
    }

    fn write_pretty(&self, out: &mut String, indent: usize) {
        let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat_n(' ', n));
        match self {
            Json::Array(items) if !items.is_empty() => {
                out.push_str("[\n");
                for (i, v) in items.iter().enumerate() {
                    pad(out, indent + 2);
                    v.write_pretty(out, indent + 2);
                    out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
                }
                pad(out, indent);
                out.push(']');
            }
            Json::Object(members) if !members.is_empty() => {
                out.push_str("{\n");
                for (i, (k, v)) in members.iter().enumerate() {
                    pad(out, indent + 2);
                    write_str(out, k);
                    out.push_str(": ");
                    v.write_pretty(out, indent + 2);
                    out.push_str(if i + 1 < members.len() { ",\n" } else { "\n" });
                }
                pad(out, indent);
                out.push('}');
            }
            Json::Raw(text) => match parse(text.as_bytes(), usize::MAX) {
                Ok(v) => v.write_pretty(out, indent),
                Err(_) => out.push_str(text),
            },
            other => other.write_compact(out),
        }
    }

    /// A lower bound of the compact size, dominated by spliced `Raw` documents (a search
    /// page of a thousand resources is written without reallocating).
    fn size_hint(&self) -> usize {
        match self {
            Json::Raw(r) => r.len(),
            Json::String(s) => s.len() + 2,
            Json::Array(items) => items.iter().map(|i| i.size_hint() + 1).sum::<usize>() + 2,
            Json::Object(m) => m.iter().map(|(k, v)| k.len() + 4 + v.size_hint()).sum::<usize>() + 2,
            _ => 8,
        }
    }

    pub fn to_compact(&self) -> String {
        let mut s = String::with_capacity(self.size_hint());
        self.write_compact(&mut s);
        s
    }

    pub fn to_pretty(&self) -> String {
        let mut s = String::new();
        self.write_pretty(&mut s, 0);
        s
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Object(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The value at `path` (object keys), if every step is there.
    pub fn at(&self, path: &[&str]) -> Option<&Json> {
        path.iter().try_fold(self, |v, k| v.get(k))
    }

    /// The string at `path`.
    pub fn str_at(&self, path: &[&str]) -> Option<&str> {
        self.at(path).and_then(Json::as_str)
    }

    /// The items of the array at `path` (none when absent or not an array).
    pub fn items(&self, path: &[&str]) -> std::slice::Iter<'_, Json> {
        self.at(path).and_then(Json::as_array).map_or([].iter(), |a| a.iter())
    }

    /// The number at `path` as an unsigned integer.
    pub fn u64_at(&self, path: &[&str]) -> Option<u64> {
        match self.at(path)? {
            Json::Number(n) => n.parse().ok(),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Json> {
        match self {
            Json::Object(m) => m.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&Vec<Json>> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Vec<(String, Json)>> {
        match self {
            Json::Object(m) => Some(m),
            _ => None,
        }
    }

    /// Replaces `key` in place (keeping its position) or appends it.
    pub fn set(&mut self, key: &str, value: Json) {
        if let Json::Object(m) = self {
            match m.iter_mut().find(|(k, _)| k == key) {
                Some((_, v)) => *v = value,
                None => m.push((key.to_string(), value)),
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Json> {
        match self {
            Json::Object(m) => {
                let i = m.iter().position(|(k, _)| k == key)?;
                Some(m.remove(i).1)
            }
            _ => None,
        }
    }

    pub fn obj(members: Vec<(&str, Json)>) -> Json {
        Json::Object(members.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }

    pub fn str(s: impl Into<String>) -> Json {
        Json::String(s.into())
    }

    /// A `base64Binary` value.
    pub fn base64(bytes: &[u8]) -> Json {
        Json::String(crate::codec::b64(bytes))
    }

    /// A lossy serde view (numbers become f64/i64) for code that only inspects structure.
    pub fn to_serde(&self) -> serde_json::Value {
        serde_json::from_str(&self.to_compact()).unwrap_or(serde_json::Value::Null)
    }
}

impl From<serde_json::Value> for Json {
    fn from(v: serde_json::Value) -> Self {
        match v {
            serde_json::Value::Null => Json::Null,
            serde_json::Value::Bool(b) => Json::Bool(b),
            serde_json::Value::Number(n) => Json::Number(n.to_string()),
            serde_json::Value::String(s) => Json::String(s),
            serde_json::Value::Array(a) => Json::Array(a.into_iter().map(Json::from).collect()),
            serde_json::Value::Object(o) => Json::Object(o.into_iter().map(|(k, v)| (k, Json::from(v))).collect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_order_round_trip_exactly() {
        let text = r#"{"b":170.10,"a":[1e2,-0.0,1E-7,0],"s":"\u00e9\ud83d\ude00\n","t":true,"n":null}"#;
        let v = parse(text.as_bytes(), 16).unwrap();
        assert_eq!(v.to_compact(), r#"{"b":170.10,"a":[1e2,-0.0,1E-7,0],"s":"é😀\n","t":true,"n":null}"#);
        assert_eq!(parse(v.to_pretty().as_bytes(), 16).unwrap(), v);
    }

    #[test]
    fn special_bytes_are_found_first_at_every_place_of_a_word() {
        let naive = |s: &[u8]| s.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
        // Every byte at every place of three words, behind text that is plain, multibyte or
        // just above the special ranges (0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xff).
        for filler in [b'a', 0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0x80, 0xe9, 0xff] {
            for at in 0..24 {
                for b in 0..=255u8 {
                    let mut s = vec![filler; 24];
                    s[at] = b;
                    assert_eq!(first_special(&s), naive(&s), "byte {b:#x} at {at} among {filler:#x}");
                    // A second special byte after the first must not hide it.
                    if at + 1 < s.len() {
                        s[at + 1] = 0;
                        assert_eq!(first_special(&s), naive(&s), "byte {b:#x} at {at} before a zero");
                    }
                }
            }
        }
        assert_eq!(first_special(b""), None);
    }

    #[test]
    fn strings_escape_and_unescape_around_multibyte_text() {
        // Runs of plain text are copied whole; each escape and control byte is cut out exactly.
        let original = "a\"b\\c/é\u{1}\u{1f}\t\r\n😀 \u{7f}end";
        let v = Json::String(original.to_string());
        let text = v.to_compact();
        assert_eq!(text, "\"a\\\"b\\\\c/é\\u0001\\u001f\\t\\r\\n😀 \u{7f}end\"");
        assert_eq!(parse(text.as_bytes(), 4).unwrap(), v);
        assert_eq!(parse(br#""\/x\b\f""#, 4).unwrap(), Json::String("/x\u{8}\u{c}".into()));
        assert_eq!(parse(b"\"\"", 4).unwrap(), Json::String(String::new()));
        let e = parse(b"\"abc\tdef\"", 4).unwrap_err();
        assert_eq!(e.offset, 4, "the raw tab is named where it is");
        assert!(parse(b"\"abc", 4).unwrap_err().message.contains("unterminated"));
    }

    #[test]
    fn rejects_what_rfc8259_rejects() {
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "01",
            "1.",
            "-",
            "1e",
            "\"\\x\"",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "{\"a\":1}x",
            "{\"a\":1,\"a\":2}",
            "\"a\nb\"",
            "tru",
            "[1 2]",
            "{a:1}",
        ] {
            assert!(parse(bad.as_bytes(), 16).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn errors_say_where() {
        let e = parse(b"{\n  \"a\": tru\n}", 16).unwrap_err();
        assert_eq!((e.line, e.column), (2, 8));
        let e = parse(b"{\"a\":\"\xff\"}", 16).unwrap_err();
        assert!(e.message.contains("UTF-8"), "{e}");
        assert_eq!(e.offset, 6);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "[".repeat(1_000_000);
        let e = parse(deep.as_bytes(), 128).unwrap_err();
        assert!(e.message.contains("nesting"), "{e}");
        let ok = format!("{}{}", "[".repeat(128), "]".repeat(128));
        assert!(parse(ok.as_bytes(), 128).is_ok());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let alphabet = b"{}[]\":,.-+eE0123456789tfnul\\ \x80\xff";
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let _ = parse(&buf, 8);
        }
    }

    #[test]
    fn set_keeps_position_and_remove_works() {
        let mut v = parse(br#"{"a":1,"b":2}"#, 4).unwrap();
        v.set("a", Json::str("x"));
        v.set("c", Json::Null);
        assert_eq!(v.remove("b"), Some(Json::Number("2".into())));
        assert_eq!(v.to_compact(), r#"{"a":"x","c":null}"#);
    }
}
