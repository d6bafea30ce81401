//! EPC / GS1 Digital Link identifier normalisation.
//!
//! Port of `dl_normaliser.py` of the CBV 2.0 event hash reference implementation
//! (github.com/RalphTro/epcis-event-hash-generator, MIT, PyPI `epcis-event-hash-generator` 1.9.3),
//! which implements CBV 2.0 section 8.9.3 step "canonical GS1 Digital Link URI". The reference is
//! regex based; each regex is mirrored here by a token pattern (`Tok`) evaluated by a tiny
//! backtracking matcher, so its quirks (e.g. `.` in `id.gs1.org` matching any character, `%`
//! rejected in Digital Link serials but kept for EPC URNs) are preserved on purpose.

use std::fmt::Write as _;

use percent_encoding::percent_decode_str;

const DL_ROOT: &str = "https://id.gs1.org";

/// Canonical form of an identifier as the CBV 2.0 hash algorithm normalises it: EPC URNs, EPC class
/// and ID-pattern URNs and GS1 Digital Link URIs (any host) become the canonical Digital Link
/// (`https://id.gs1.org/...`, lowest identification level, no CPV, no query). Anything else is
/// returned unchanged.
pub fn normalise(id: &str) -> String {
    dl_normalise(id).unwrap_or_else(|| id.to_string())
}

/// `dl_normaliser.normaliser`: `None` when the reference would return `None`.
pub fn dl_normalise(uri: &str) -> Option<String> {
    // An event names the same few identifiers in many places, and capture, the hash and the
    // FHIR mapping each normalise them: the result is remembered per thread (the matcher
    // mirrors the reference's regexes and costs microseconds).
    thread_local! {
        static MEMO: std::cell::RefCell<std::collections::HashMap<String, Option<String>>> =
            std::cell::RefCell::new(std::collections::HashMap::new());
    }
    const MEMO_MAX: usize = 1 << 16;
    if let Some(hit) = MEMO.with(|m| m.borrow().get(uri).cloned()) {
        return hit;
    }
    let out = dl_normalise_uncached(uri);
    MEMO.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= MEMO_MAX {
            m.clear();
        }
        m.insert(uri.to_string(), out.clone());
    });
    out
}

fn dl_normalise_uncached(uri: &str) -> Option<String> {
    // The reference bails out early on strings without any '.'.
    if !uri.contains('.') {
        return None;
    }
    let s: Vec<char> = uri.chars().collect();
    if uri.starts_with("urn:epc:") {
        return epc_urn_to_dl(&s);
    }
    digital_link_to_canonical(uri)
}

/// GS1 identifiers carried by an EPC URN or a Digital Link, as application identifiers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gs1Key {
    /// AI 01, always 14 digits.
    pub gtin: Option<String>,
    /// AI 21 (percent-decoded).
    pub serial: Option<String>,
    /// AI 10 (percent-decoded).
    pub lot: Option<String>,
    /// AI 17 (YYMMDD), only from a Digital Link query string.
    pub expiry: Option<String>,
    /// AI 00, 18 digits.
    pub sscc: Option<String>,
    /// AI 414, 13 digits.
    pub gln: Option<String>,
    /// AI 254 (GLN extension).
    pub ext: Option<String>,
    /// AI 417 (party GLN).
    pub pgln: Option<String>,
    /// All (AI, value) pairs of the path, in order, values percent-decoded.
    pub ais: Vec<(String, String)>,
}

/// Parse an EPC URN or a Digital Link (any host, short names like `/gtin/` accepted) into GS1
/// application identifiers. Unlike `normalise`, both lot and serial are kept when both are present.
pub fn parse(id: &str) -> Option<Gs1Key> {
    // Digital Links with '%' escapes are rejected by the reference normaliser but are still parseable.
    let canonical = dl_normalise(id);
    if canonical.is_none() && !looks_like_dl(id) {
        return None;
    }
    let (path_source, query) = if id.starts_with("urn:") {
        (canonical.as_deref()?, None)
    } else {
        let (before_fragment, _) = id.split_once('#').unwrap_or((id, ""));
        match before_fragment.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (before_fragment, None),
        }
    };
    let mut key = Gs1Key { ais: dl_path_pairs(path_source)?, ..Gs1Key::default() };
    if let Some(q) = query {
        for pair in q.split('&') {
            if let Some(("17", v)) = pair.split_once('=') {
                key.expiry = Some(decode(v));
            }
        }
    }
    for (ai, v) in &key.ais {
        let slot = match ai.as_str() {
            "01" => &mut key.gtin,
            "21" => &mut key.serial,
            "10" => &mut key.lot,
            "00" => &mut key.sscc,
            "414" => &mut key.gln,
            "254" => &mut key.ext,
            "417" => &mut key.pgln,
            "17" => &mut key.expiry,
            _ => continue,
        };
        *slot = Some(v.clone());
    }
    Some(key)
}

/// Canonical Digital Link of an SGTIN (GTIN-8/12/13/14 accepted, padded to 14 digits).
pub fn sgtin_link(gtin: &str, serial: &str) -> String {
    format!("{DL_ROOT}/01/{}/21/{}", pad_gtin(gtin), encode_component(serial))
}

/// Canonical Digital Link of an LGTIN (GTIN + lot).
pub fn lgtin_link(gtin: &str, lot: &str) -> String {
    format!("{DL_ROOT}/01/{}/10/{}", pad_gtin(gtin), encode_component(lot))
}

/// True for an EPC URN / Digital Link the normaliser understands, for other EPC URN schemes it does
/// not convert (gid, usdod, adi, bic, imovn, ...) when they are well formed, and for any other
/// absolute URI (RFC 3986 scheme followed by a non-empty, whitespace-free remainder).
pub fn is_valid_epc(id: &str) -> bool {
    if dl_normalise(id).is_some() {
        return true;
    }
    if let Some(rest) = id.strip_prefix("urn:epc:") {
        // GS1-keyed schemes must have been accepted by the normaliser above.
        const GS1_SCHEMES: [&str; 16] = [
            "sgtin", "sscc", "sgln", "grai", "giai", "gsrn", "gsrnp", "gdti", "cpi", "sgcn", "ginc", "gsin", "itip",
            "upui", "pgln", "lgtin",
        ];
        let mut parts = rest.splitn(3, ':');
        let (Some(kind), Some(scheme), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        return matches!(kind, "id" | "class" | "idpat")
            && !GS1_SCHEMES.contains(&scheme)
            && !body.is_empty()
            && !body.chars().any(|c| c.is_whitespace() || c.is_control());
    }
    let Some((scheme, rest)) = id.split_once(':') else { return false };
    let mut sc = scheme.chars();
    sc.next().is_some_and(|c| c.is_ascii_alphabetic())
        && sc.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn pad_gtin(gtin: &str) -> String {
    format!("{gtin:0>14}")
}

fn decode(v: &str) -> String {
    percent_decode_str(v).decode_utf8_lossy().into_owned()
}

/// Encode a raw (unescaped) serial/lot so that it equals what `normalise` produces for the EPC URN
/// carrying the same value: URN-safe characters stay, `!()*+,:` get the reference's escapes
/// (`__web_uri_percent_encoder`), everything else is UTF-8 percent-encoded with upper-case hex.
fn encode_component(v: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '\'' | '.' | ';' | '=' | '_' | '-') {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Split a Digital Link path into (AI, value) pairs, starting at its primary key.
fn dl_path_pairs(uri: &str) -> Option<Vec<(String, String)>> {
    let after_scheme = uri.split_once("://").map_or(uri, |(_, r)| r);
    let path = after_scheme.split_once('/').map(|(_, p)| p)?;
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let start = segs.iter().position(|s| PRIMARY_KEYS.contains(&short_to_ai(s)))?;
    let mut out = Vec::new();
    for pair in segs[start..].chunks(2) {
        let [ai, value] = pair else { return None };
        let ai = short_to_ai(ai);
        let mut value = decode(value);
        if ai == "01" && value.len() < 14 {
            value = pad_gtin(&value);
        }
        out.push((ai.to_string(), value));
    }
    Some(out)
}

const PRIMARY_KEYS: [&str; 14] =
    ["01", "8006", "8010", "414", "417", "8017", "8018", "255", "00", "253", "401", "402", "8003", "8004"];

/// Short names of the Digital Link standard, in the reference's replacement order.
const SHORT_NAMES: [(&str, &str); 17] = [
    ("gtin", "01"),
    ("itip", "8006"),
    ("cpid", "8010"),
    ("gln", "414"),
    ("party", "417"),
    ("gsrnp", "8017"),
    ("gsrn", "8018"),
    ("gcn", "255"),
    ("sscc", "00"),
    ("gdti", "253"),
    ("ginc", "401"),
    ("gsin", "402"),
    ("grai", "8003"),
    ("giai", "8004"),
    ("cpv", "22"),
    ("lot", "10"),
    ("ser", "21"),
];

fn short_to_ai(s: &str) -> &str {
    SHORT_NAMES.iter().find(|(n, _)| *n == s).map_or(s, |(_, ai)| ai)
}

// ---------------------------------------------------------------------------------------------
// Mini regex engine: just enough to mirror the reference's patterns (anchored at the start like
// Python's `re.match`).

#[derive(Clone, Copy)]
enum Unit {
    /// `(\%2[125-9A-Fa-f]|\%3[0-9A-Fa-f]|\%4[1-9A-Fa-f]|\%5[0-9AaFf]|\%6[1-9A-Fa-f]|\%7[0-9Aa]|[!\')(*+,.0-9:;=A-Za-z_-])`
    Epc,
    /// `(\%2[3dfDF]|\%3[0-9]|\%4[1-9A-Fa-f]|\%5[0-9Aa]|[0-9A-Z-])`
    Cpi,
}

#[derive(Clone, Copy)]
enum Tok {
    Lit(&'static str),
    /// Python `.`: any character but a newline.
    Any,
    Class(fn(char) -> bool, usize, usize),
    Units(Unit, usize, usize),
    /// Python `$`: end of string or before a final newline.
    End,
}

fn digits(n: usize) -> Tok {
    Tok::Class(is_digit, n, n)
}

fn is_digit(c: char) -> bool {
    c.is_ascii_digit()
}

/// `[\x22\x27\x2D\x2E\x30-\x39\x3B-\x3F\x41-\x5A\x5F\x61-\x7A]`: GS1 AI encodable character set 82
/// as the reference restricts it (no `%`, no `/`).
fn cset82(c: char) -> bool {
    matches!(c, '"' | '\'' | '-' | '.' | '0'..='9' | ';'..='?' | 'A'..='Z' | '_' | 'a'..='z')
}

fn cset82_slash(c: char) -> bool {
    c == '/' || cset82(c)
}

/// `[\x23\x2D\x2F\x30-\x39\x41-\x5A]` (CPID characters).
fn cset39(c: char) -> bool {
    matches!(c, '#' | '-' | '/' | '0'..='9' | 'A'..='Z')
}

fn unit_len(kind: Unit, s: &[char], pos: usize) -> Option<usize> {
    let c = *s.get(pos)?;
    if c == '%' {
        let (a, b) = (*s.get(pos + 1)?, *s.get(pos + 2)?);
        let hex = b.is_ascii_hexdigit();
        let ok = match kind {
            Unit::Epc => match a {
                '2' => matches!(b, '1' | '2' | '5'..='9' | 'A'..='F' | 'a'..='f'),
                '3' => hex,
                '4' | '6' => hex && b != '0',
                '5' => matches!(b, '0'..='9' | 'A' | 'a' | 'F' | 'f'),
                '7' => matches!(b, '0'..='9' | 'A' | 'a'),
                _ => false,
            },
            Unit::Cpi => match a {
                '2' => matches!(b, '3' | 'd' | 'f' | 'D' | 'F'),
                '3' => b.is_ascii_digit(),
                '4' => hex && b != '0',
                '5' => matches!(b, '0'..='9' | 'A' | 'a'),
                _ => false,
            },
        };
        return ok.then_some(3);
    }
    let ok = match kind {
        Unit::Epc => {
            c.is_ascii_alphanumeric()
                || matches!(c, '!' | '\'' | ')' | '(' | '*' | '+' | ',' | '.' | ':' | ';' | '=' | '_' | '-')
        }
        Unit::Cpi => c.is_ascii_digit() || c.is_ascii_uppercase() || c == '-',
    };
    ok.then_some(1)
}

fn matches_at(s: &[char], pos: usize, toks: &[Tok]) -> bool {
    let Some((tok, rest)) = toks.split_first() else { return true };
    match *tok {
        Tok::Lit(l) => {
            let mut p = pos;
            for lc in l.chars() {
                if s.get(p) != Some(&lc) {
                    return false;
                }
                p += 1;
            }
            matches_at(s, p, rest)
        }
        Tok::Any => s.get(pos).is_some_and(|&c| c != '\n') && matches_at(s, pos + 1, rest),
        Tok::End => pos == s.len() || (pos + 1 == s.len() && s[pos] == '\n'),
        Tok::Class(f, min, max) => {
            let mut n = 0;
            while n < max && s.get(pos + n).is_some_and(|&c| f(c)) {
                n += 1;
            }
            (min..=n).rev().any(|k| matches_at(s, pos + k, rest))
        }
        Tok::Units(kind, min, max) => {
            let mut ends = vec![pos];
            let mut p = pos;
            while ends.len() <= max {
                let Some(l) = unit_len(kind, s, p) else { break };
                p += l;
                ends.push(p);
            }
            (min..ends.len()).rev().any(|k| matches_at(s, ends[k], rest))
        }
    }
}

fn re(s: &[char], toks: &[Tok]) -> bool {
    matches_at(s, 0, toks)
}

/// Python-style clamped slice `s[a:b]`.
fn sl(s: &[char], a: usize, b: usize) -> String {
    let b = b.min(s.len());
    if a >= b {
        return String::new();
    }
    s[a..b].iter().collect()
}

fn sl_from(s: &[char], a: usize) -> String {
    sl(s, a, s.len())
}

/// `check_digit`: GS1 General Specifications 7.9.1 (mod 10, weights 3/1 from the right).
pub fn check_digit(key_without_check_digit: &str) -> u32 {
    let sum: u32 = key_without_check_digit
        .chars()
        .rev()
        .enumerate()
        .map(|(i, c)| c.to_digit(10).unwrap_or(0) * if i % 2 == 0 { 3 } else { 1 })
        .sum();
    (10 - sum % 10) % 10
}

/// `__web_uri_percent_encoder`: only these characters are escaped by the reference.
fn web_uri_percent_encoder(input: &str) -> String {
    let mut out = String::with_capacity(input.len());
    for c in input.chars() {
        match c {
            '!' => out.push_str("%21"),
            '(' => out.push_str("%28"),
            ')' => out.push_str("%29"),
            '*' => out.push_str("%2A"),
            '+' => out.push_str("%2B"),
            ',' => out.push_str("%2C"),
            ':' => out.push_str("%3A"),
            _ => out.push(c),
        }
    }
    out
}

fn gtin_with_cd(raw: &str) -> String {
    format!("{raw}{}", check_digit(raw))
}

/// `gcp` digits, '.', `k` digits: the common `(\d{6}\.\d{k})|(\d{7}\.\d{k-1})|...` alternation.
fn gcp_toks(prefix: &'static str, n: usize, ref_len: usize) -> [Tok; 4] {
    [Tok::Lit(prefix), digits(n), Tok::Lit("."), digits(ref_len - n)]
}

fn any_gcp(s: &[char], f: impl Fn(usize) -> Vec<Tok>) -> bool {
    (6..=12).any(|n| re(s, &f(n)))
}

/// The EPC URN branches of `normaliser` (EPC URIs, EPC Class URIs, EPC ID Pattern URIs).
#[allow(clippy::similar_names)]
fn epc_urn_to_dl(s: &[char]) -> Option<String> {
    use Tok::{End, Lit, Units};
    let partition = s.iter().position(|&c| c == '.')?;
    let with = |head: [Tok; 4], tail: &[Tok]| -> Vec<Tok> { head.iter().chain(tail).copied().collect() };
    // Company prefix and item/location reference as the reference slices them.
    let gcp_at = |start: usize| sl(s, start, partition);
    let reference = |gcp: &str, total: usize| sl(s, partition + 1, partition + 1 + total.saturating_sub(gcp.len()));
    // GTIN-14 without check digit: indicator digit (first of the item reference) + prefix + rest.
    let gtin_of = |gcp: &str, itemref: &str| {
        let mut it = itemref.chars();
        let indicator = it.next().map(String::from).unwrap_or_default();
        format!("{indicator}{gcp}{}", it.as_str())
    };
    let epc_units = |max| Units(Unit::Epc, 1, max);
    let twelve_or = |n: usize, normal: [Tok; 4], twelve: &'static str, p: &'static str| -> [Tok; 4] {
        if n == 12 {
            [Lit(p), digits(12), Lit(twelve), Lit("")]
        } else {
            normal
        }
    };

    if any_gcp(s, |n| with(gcp_toks("urn:epc:id:sgtin:", n, 13), &[Lit("."), epc_units(20), End])) {
        let gcp = gcp_at(17);
        let raw = gtin_of(&gcp, &reference(&gcp, 13));
        return Some(format!("{DL_ROOT}/01/{}/21/{}", gtin_with_cd(&raw), web_uri_percent_encoder(&sl_from(s, 32))));
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:id:sscc:", n, 17), &[End])) {
        let gcp = gcp_at(16);
        let raw = format!("{}{gcp}{}", sl(s, partition + 1, partition + 2), sl_from(s, partition + 2));
        return Some(format!("{DL_ROOT}/00/{}", gtin_with_cd(&raw)));
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:id:sgln:", n, 12), &[Lit("."), epc_units(20), End])) {
        let gcp = gcp_at(16);
        let raw = format!("{gcp}{}", reference(&gcp, 12));
        let ext = sl_from(s, 30);
        if ext == "0" {
            return Some(format!("{DL_ROOT}/414/{}", gtin_with_cd(&raw)));
        }
        return Some(format!("{DL_ROOT}/414/{}/254/{}", gtin_with_cd(&raw), web_uri_percent_encoder(&ext)));
    }
    if any_gcp(s, |n| {
        let p = "urn:epc:id:grai:";
        with(twelve_or(n, gcp_toks(p, n, 12), "..", p), &[Lit("."), Units(Unit::Epc, 1, 16), End])
    }) {
        let gcp = gcp_at(16);
        let raw = format!("0{gcp}{}", reference(&gcp, 12));
        return Some(format!("{DL_ROOT}/8003/{}{}", gtin_with_cd(&raw), web_uri_percent_encoder(&sl_from(s, 30))));
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:id:giai:", n, n), &[Units(Unit::Epc, 1, 30 - n), End])) {
        let gcp = gcp_at(16);
        return Some(format!("{DL_ROOT}/8004/{gcp}{}", web_uri_percent_encoder(&sl_from(s, partition + 1))));
    }
    for (prefix, ai, start) in [("urn:epc:id:gsrn:", "8018", 16), ("urn:epc:id:gsrnp:", "8017", 17)] {
        if any_gcp(s, |n| with(gcp_toks(prefix, n, 17), &[End])) {
            let raw = format!("{}{}", gcp_at(start), sl_from(s, partition + 1));
            return Some(format!("{DL_ROOT}/{ai}/{}", gtin_with_cd(&raw)));
        }
    }
    if any_gcp(s, |n| {
        let p = "urn:epc:id:gdti:";
        with(twelve_or(n, gcp_toks(p, n, 12), "..", p), &[epc_units(20), End])
    }) {
        let gcp = gcp_at(16);
        let raw = format!("{gcp}{}", reference(&gcp, 12));
        return Some(format!("{DL_ROOT}/253/{}{}", gtin_with_cd(&raw), web_uri_percent_encoder(&sl_from(s, 30))));
    }
    if any_gcp(s, |n| {
        with(
            gcp_toks("urn:epc:id:cpi:", n, n),
            &[Units(Unit::Cpi, 1, 30 - n), Lit("."), Tok::Class(is_digit, 1, 12), End],
        )
    }) {
        let gcp = gcp_at(15);
        let sep = s.iter().rposition(|&c| c == '.').unwrap_or(partition);
        let raw = format!("{gcp}{}", sl(s, partition + 1, sep));
        return Some(format!("{DL_ROOT}/8010/{}/8011/{}", web_uri_percent_encoder(&raw), sl_from(s, sep + 1)));
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:id:sgcn:", n, 12), &[Lit("."), Tok::Class(is_digit, 1, 12), End])) {
        let gcp = gcp_at(16);
        let raw = format!("{gcp}{}", reference(&gcp, 12));
        return Some(format!("{DL_ROOT}/255/{}{}", gtin_with_cd(&raw), sl_from(s, 30)));
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:id:ginc:", n, n), &[Units(Unit::Epc, 1, 30 - n), End])) {
        let gcp = gcp_at(16);
        return Some(format!("{DL_ROOT}/401/{gcp}{}", web_uri_percent_encoder(&sl_from(s, partition + 1))));
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:id:gsin:", n, 16), &[End])) {
        let raw = format!("{}{}", gcp_at(16), sl_from(s, partition + 1));
        return Some(format!("{DL_ROOT}/402/{}", gtin_with_cd(&raw)));
    }
    if any_gcp(s, |n| {
        with(
            gcp_toks("urn:epc:id:itip:", n, 13),
            &[Lit("."), digits(2), Lit("."), digits(2), Lit("."), epc_units(20), End],
        )
    }) {
        let gcp = gcp_at(16);
        let raw = gtin_of(&gcp, &reference(&gcp, 13));
        return Some(format!(
            "{DL_ROOT}/8006/{}{}{}/21/{}",
            gtin_with_cd(&raw),
            sl(s, 31, 33),
            sl(s, 34, 36),
            web_uri_percent_encoder(&sl_from(s, 37))
        ));
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:id:upui:", n, 13), &[Lit("."), Units(Unit::Epc, 1, 28), End])) {
        let gcp = gcp_at(16);
        let raw = gtin_of(&gcp, &reference(&gcp, 13));
        return Some(format!("{DL_ROOT}/01/{}/235/{}", gtin_with_cd(&raw), web_uri_percent_encoder(&sl_from(s, 31))));
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:id:pgln:", n, 12), &[End])) {
        let gcp = gcp_at(16);
        let raw = format!("{gcp}{}", reference(&gcp, 12));
        return Some(format!("{DL_ROOT}/417/{}", gtin_with_cd(&raw)));
    }
    // EPC Class URIs
    if any_gcp(s, |n| with(gcp_toks("urn:epc:class:lgtin:", n, 13), &[Lit("."), epc_units(20), End])) {
        let gcp = gcp_at(20);
        let raw = gtin_of(&gcp, &reference(&gcp, 13));
        return Some(format!("{DL_ROOT}/01/{}/10/{}", gtin_with_cd(&raw), web_uri_percent_encoder(&sl_from(s, 35))));
    }
    // EPC ID Pattern URIs
    if any_gcp(s, |n| with(gcp_toks("urn:epc:idpat:sgtin:", n, 13), &[Lit(".*"), End])) {
        let gcp = gcp_at(20);
        let raw = gtin_of(&gcp, &reference(&gcp, 13));
        return Some(format!("{DL_ROOT}/01/{}", gtin_with_cd(&raw)));
    }
    for (p, ai, leading_zero) in [
        ("urn:epc:idpat:grai:", "8003", true),
        ("urn:epc:idpat:gdti:", "253", false),
        ("urn:epc:idpat:sgcn:", "255", false),
    ] {
        if any_gcp(s, |n| with(twelve_or(n, gcp_toks(p, n, 12), "..", p), &[Lit(".*"), End])) {
            let gcp = gcp_at(19);
            let raw = format!("{}{gcp}{}", if leading_zero { "0" } else { "" }, reference(&gcp, 12));
            return Some(format!("{DL_ROOT}/{ai}/{}", gtin_with_cd(&raw)));
        }
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:idpat:cpi:", n, n), &[Units(Unit::Cpi, 1, 30 - n), Lit(".*"), End])) {
        let gcp = gcp_at(18);
        let sep = s.iter().rposition(|&c| c == '.').unwrap_or(partition);
        return Some(format!(
            "{DL_ROOT}/8010/{}",
            web_uri_percent_encoder(&format!("{gcp}{}", sl(s, partition + 1, sep)))
        ));
    }
    if any_gcp(s, |n| {
        with(gcp_toks("urn:epc:idpat:itip:", n, 13), &[Lit("."), digits(2), Lit("."), digits(2), Lit(".*"), End])
    }) {
        let gcp = gcp_at(19);
        let raw = gtin_of(&gcp, &reference(&gcp, 13));
        return Some(format!("{DL_ROOT}/8006/{}{}{}", gtin_with_cd(&raw), sl(s, 34, 36), sl(s, 37, 39)));
    }
    if any_gcp(s, |n| with(gcp_toks("urn:epc:idpat:upui:", n, 13), &[Lit(".*"), End])) {
        let gcp = gcp_at(19);
        let raw = gtin_of(&gcp, &reference(&gcp, 13));
        return Some(format!("{DL_ROOT}/01/{}", gtin_with_cd(&raw)));
    }
    None
}

const DL_KEYS: [&str; 28] = [
    "01", "gtin", "8006", "itip", "8010", "cpid", "414", "gln", "417", "party", "8017", "gsrnp", "8018", "gsrn", "255",
    "gcn", "00", "sscc", "253", "gdti", "401", "ginc", "402", "gsin", "8003", "grai", "8004", "giai",
];

/// First regex of the Digital Link branch: `^https?:(//authority)?(path/KEY/\d{4}[^/]+...|/[A-Za-z_-]{10}$)`.
/// The optional tails of the pattern never constrain the match, so only the mandatory parts are checked.
fn looks_like_dl(uri: &str) -> bool {
    let Some(rest) = uri.strip_prefix("https:").or_else(|| uri.strip_prefix("http:")) else {
        return false;
    };
    let r: Vec<char> = rest.chars().collect();
    let stop = r.iter().position(|&c| c == '?' || c == '#').unwrap_or(r.len());
    for i in 0..stop {
        if r[i] != '/' {
            continue;
        }
        for key in DL_KEYS {
            let toks = [Tok::Lit("/"), Tok::Lit(key), Tok::Lit("/"), digits(4), Tok::Class(|c| c != '/', 1, 1)];
            if matches_at(&r, i, &toks) {
                return true;
            }
        }
    }
    let short = [Tok::Lit("/"), Tok::Class(|c| c.is_ascii_alphabetic() || c == '_' || c == '-', 10, 10), Tok::End];
    re(&r, &short)
        || re(
            &r,
            &[
                Tok::Lit("//"),
                Tok::Class(|c| !matches!(c, '/' | '?' | '#'), 0, usize::MAX),
                short[0],
                short[1],
                short[2],
            ],
        )
}

/// `https://id.gs1.org/` as the reference's regexes spell it (unescaped dots match anything).
const ROOT_TOKS: [Tok; 5] = [Tok::Lit("https://id"), Tok::Any, Tok::Lit("gs1"), Tok::Any, Tok::Lit("org/")];

fn rooted(s: &[char], tail: &[Tok]) -> bool {
    let toks: Vec<Tok> = ROOT_TOKS.iter().chain(tail).copied().collect();
    re(s, &toks)
}

fn cls(f: fn(char) -> bool, min: usize, max: usize) -> Tok {
    Tok::Class(f, min, max)
}

/// The GS1 Digital Link branch of `normaliser`.
fn digital_link_to_canonical(input: &str) -> Option<String> {
    use Tok::{End, Lit};
    if !looks_like_dl(input) {
        return None;
    }
    // remove query string
    let mut uri = input.split_once('?').map_or(input, |(a, _)| a).to_string();
    // replace short names for keys/key extensions with AIs
    for (name, ai) in SHORT_NAMES {
        uri = uri.replace(&format!("/{name}/"), &format!("/{ai}/"));
    }
    // prefix with canonical domain name
    let chars: Vec<char> = uri.chars().collect();
    let canonical_root =
        PRIMARY_KEYS.iter().any(|k| rooted(&chars, &[Lit(k), Lit("/"), digits(4), cls(|c| c != '/', 1, 1)]));
    if !canonical_root {
        const REROOT_ORDER: [&str; 14] =
            ["00", "01", "253", "255", "401", "402", "414", "417", "8003", "8004", "8006", "8010", "8017", "8018"];
        if let Some(idx) = REROOT_ORDER.iter().find_map(|k| uri.find(&format!("/{k}/"))) {
            uri = format!("{DL_ROOT}{}", &uri[idx..]);
        }
    }
    // ensure that all GTIN formats are padded to 14 digits
    let s: Vec<char> = uri.chars().collect();
    if !rooted(&s, &[Lit("01/"), digits(14)]) {
        if rooted(&s, &[Lit("01/"), digits(13)]) {
            uri = uri.replace("/01/", "/01/0");
        } else if rooted(&s, &[Lit("01/"), digits(12)]) {
            uri = uri.replace("/01/", "/01/00");
        } else if rooted(&s, &[Lit("01/"), digits(8)]) {
            uri = uri.replace("/01/", "/01/000000");
        }
    }
    // remove cpv
    let key_toks = |s: &[char], tail: &[Tok]| {
        rooted(s, &[&[Lit("8006/"), digits(18)][..], tail].concat())
            || rooted(s, &[&[Lit("01/"), digits(14)][..], tail].concat())
    };
    let s: Vec<char> = uri.chars().collect();
    if let Some(i) = uri.find("/22/") {
        if key_toks(&s, &[Lit("/22/"), cls(cset82, 0, 20), End]) {
            uri.truncate(i);
        } else if key_toks(&s, &[Lit("/22/"), cls(cset82_slash, 0, 20), End]) {
            let x = &uri[i + 4..];
            let tail = x
                .find('/')
                .map_or_else(|| x.chars().last().map(String::from).unwrap_or_default(), |j| x[j..].to_string());
            uri = format!("{}{tail}", &uri[..i]);
        }
    }
    // take only lowest ID granularity level (i.e. if serial is present, omit lot)
    let s: Vec<char> = uri.chars().collect();
    if key_toks(&s, &[Lit("/10/"), cls(cset82, 0, 20), Lit("/21/"), cls(cset82, 0, 20), End]) {
        if let Some(i) = uri.find("/10/") {
            let y = &uri[i + 4..];
            let tail = y
                .find('/')
                .map_or_else(|| y.chars().last().map(String::from).unwrap_or_default(), |j| y[j..].to_string());
            uri = format!("{}{tail}", &uri[..i]);
        }
    }
    // ensure that output has a valid syntax
    let s: Vec<char> = uri.chars().collect();
    let valid: [&[Tok]; 21] = [
        &[Lit("00/"), digits(18), End],
        &[Lit("01/"), digits(14), Lit("/21/"), cls(cset82, 0, 20), End],
        &[Lit("01/"), digits(14), Lit("/10/"), cls(cset82, 0, 20), End],
        &[Lit("01/"), digits(14), End],
        &[Lit("01/"), digits(14), Lit("/235/"), cls(cset82, 0, 28), End],
        &[Lit("253/"), digits(13), cls(cset82, 0, 17), End],
        &[Lit("255/"), digits(13), cls(is_digit, 0, 12), End],
        &[Lit("401/"), cls(cset82, 0, 30), End],
        &[Lit("402/"), digits(17), End],
        &[Lit("414/"), digits(13), End],
        &[Lit("414/"), digits(13), Lit("/254/"), cls(cset82, 0, 20), End],
        &[Lit("417/"), digits(13), End],
        &[Lit("8003/"), digits(14), cls(cset82, 0, 16), End],
        &[Lit("8004/"), cls(cset82, 0, 30), End],
        &[Lit("8006/"), digits(18), Lit("/21/"), cls(cset82, 0, 20), End],
        &[Lit("8006/"), digits(18), Lit("/10/"), cls(cset82, 0, 20), End],
        &[Lit("8006/"), digits(18), End],
        &[Lit("8010/"), cls(cset39, 0, 30), Lit("/8011/"), cls(is_digit, 0, 12), End],
        &[Lit("8010/"), cls(cset39, 0, 30), End],
        &[Lit("8017/"), digits(18), End],
        &[Lit("8018/"), digits(18), End],
    ];
    valid.iter().any(|t| rooted(&s, t)).then_some(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Option<String> {
        dl_normalise(s)
    }

    /// Cases from the reference's tests/dl_normaliser_test.py.
    #[test]
    fn reference_epc_conversions() {
        let cases = [
            ("urn:epc:id:sgtin:4012345.011111.98%22", "https://id.gs1.org/01/04012345111118/21/98%22"),
            ("urn:epc:id:sgtin:415056789012.0.987654", "https://id.gs1.org/01/04150567890128/21/987654"),
            (
                "urn:epc:id:sgtin:0614141.812345.6789%2F%26%25%22!%3F()",
                "https://id.gs1.org/01/80614141123458/21/6789%2F%26%25%22%21%3F%28%29",
            ),
            ("urn:epc:id:sscc:4012345.3111111111", "https://id.gs1.org/00/340123451111111111"),
            ("urn:epc:id:sgln:4012345.00005.122", "https://id.gs1.org/414/4012345000054/254/122"),
            ("urn:epc:id:sgln:4012345.00005.0", "https://id.gs1.org/414/4012345000054"),
            ("urn:epc:id:grai:4012345.00022.334455", "https://id.gs1.org/8003/04012345000221334455"),
            ("urn:epc:id:giai:4012345.ABC345", "https://id.gs1.org/8004/4012345ABC345"),
            ("urn:epc:id:gsrn:4012345.0000006765", "https://id.gs1.org/8018/401234500000067657"),
            ("urn:epc:id:gsrnp:4012345.0000000007", "https://id.gs1.org/8017/401234500000000074"),
            ("urn:epc:id:gdti:4012345.00009.PO-4711", "https://id.gs1.org/253/4012345000092PO-4711"),
            ("urn:epc:id:gdti:987659999999..9", "https://id.gs1.org/253/98765999999929"),
            (
                "urn:epc:id:cpi:0614141.11111111111111-A%23%2F.1234",
                "https://id.gs1.org/8010/061414111111111111111-A%23%2F/8011/1234",
            ),
            ("urn:epc:id:ginc:0614141.xyz47%2F11", "https://id.gs1.org/401/0614141xyz47%2F11"),
            ("urn:epc:id:gsin:4012345.222333444", "https://id.gs1.org/402/40123452223334442"),
            ("urn:epc:id:itip:4012345.011111.01.02.987", "https://id.gs1.org/8006/040123451111180102/21/987"),
            (
                "urn:epc:id:upui:1234567.098765.51qIgY)%3C%26Jp3*j7SDB",
                "https://id.gs1.org/01/01234567987651/235/51qIgY%29%3C%26Jp3%2Aj7SDB",
            ),
            ("urn:epc:id:pgln:4000001.00000", "https://id.gs1.org/417/4000001000005"),
            ("urn:epc:id:pgln:999999999999.", "https://id.gs1.org/417/9999999999994"),
            ("urn:epc:class:lgtin:4012345.012345.Lot987", "https://id.gs1.org/01/04012345123456/10/Lot987"),
            ("urn:epc:idpat:sgtin:4012345.012345.*", "https://id.gs1.org/01/04012345123456"),
            ("urn:epc:idpat:grai:4012345.99999.*", "https://id.gs1.org/8003/04012345999990"),
            ("urn:epc:idpat:gdti:4012345.11111.*", "https://id.gs1.org/253/4012345111118"),
            ("urn:epc:idpat:sgcn:4012345.22222.*", "https://id.gs1.org/255/4012345222227"),
            ("urn:epc:idpat:cpi:4012345.AB12.*", "https://id.gs1.org/8010/4012345AB12"),
            ("urn:epc:idpat:itip:4012345.012345.01.02.*", "https://id.gs1.org/8006/040123451234560102"),
            ("urn:epc:idpat:upui:4012345.012345.*", "https://id.gs1.org/01/04012345123456"),
            ("urn:epc:id:sscc:4012345.0000000011", "https://id.gs1.org/00/040123450000000115"),
            ("urn:epc:id:gsrn:4012345.9876540000", "https://id.gs1.org/8018/401234598765400000"),
            ("urn:epc:id:gsrnp:4012345.0000098765", "https://id.gs1.org/8017/401234500000987658"),
            ("urn:epc:id:gsin:4012345.999987654", "https://id.gs1.org/402/40123459999876541"),
        ];
        for (input, expected) in cases {
            assert_eq!(n(input).as_deref(), Some(expected), "{input}");
        }
    }

    #[test]
    fn reference_dl_conversions() {
        let cases = [
            ("https://id.gs1.org/gtin/09780345418913", "https://id.gs1.org/01/09780345418913"),
            (
                "https://example.com/gtin/09780345418913/21/765tz?abc=211121",
                "https://id.gs1.org/01/09780345418913/21/765tz",
            ),
            ("http://example.de/gtin-8/01/97803111", "https://id.gs1.org/01/00000097803111"),
            ("http://us-company-with-UPC.com/01/001122334455", "https://id.gs1.org/01/00001122334455"),
            ("http://us-company-with-UPC.com/01/001122334455/ser/GHB", "https://id.gs1.org/01/00001122334455/21/GHB"),
            ("https://ean-13.de/gtin/4012345123456/ser/ABC524", "https://id.gs1.org/01/04012345123456/21/ABC524"),
            ("http://id.gs1.org/gtin/9780345418913", "https://id.gs1.org/01/09780345418913"),
            (
                "https://id.gs1.org/gtin/9780345418913/cpv/344/lot/1223/ser/765tz",
                "https://id.gs1.org/01/09780345418913/21/765tz",
            ),
            ("https://id.gs1.org/gtin/9780345418913/cpv/344", "https://id.gs1.org/01/09780345418913"),
            (
                "https://example.de/gtin/04012345123456/cpv/344/ser/987654",
                "https://id.gs1.org/01/04012345123456/21/987654",
            ),
            ("http://example.de/01/040123451234/cpv/344/lot/ABD", "https://id.gs1.org/01/00040123451234/10/ABD"),
            (
                "https://id.gs1.org/01/9780345418913/22/344/10/1223/21/765tz",
                "https://id.gs1.org/01/09780345418913/21/765tz",
            ),
            ("https://id.gs1.org/itip/123456789101100190/cpv/ABCD", "https://id.gs1.org/8006/123456789101100190"),
            (
                "https://fashion-corp.com/8006/040123451234560102/22/AB/21/443322",
                "https://id.gs1.org/8006/040123451234560102/21/443322",
            ),
            (
                "https://id.gs1.org/8006/040123451234560102/22/ABCD/10/XYZ",
                "https://id.gs1.org/8006/040123451234560102/10/XYZ",
            ),
            (
                "https://fashion-corp.com/8006/040123451234560102/10/Lot-123/21/ser987",
                "https://id.gs1.org/8006/040123451234560102/21/ser987",
            ),
            ("https://gs1.test.example.org/01/9780345418913/10/1223", "https://id.gs1.org/01/09780345418913/10/1223"),
            (
                "https://example.org/01/9780345418913/21/765tz?11=221109",
                "https://id.gs1.org/01/09780345418913/21/765tz",
            ),
            ("https://id.gs1.org/00/340123453111111115", "https://id.gs1.org/00/340123453111111115"),
            ("https://id.gs1.org/414/4226350800008", "https://id.gs1.org/414/4226350800008"),
            ("https://example.co.uk/party/4226350800008", "https://id.gs1.org/417/4226350800008"),
            ("https://id.gs1.org/414/4280000000002/254/12", "https://id.gs1.org/414/4280000000002/254/12"),
            ("https://id.gs1.org/8003/03870585000552987", "https://id.gs1.org/8003/03870585000552987"),
            ("https://id.gs1.org/8004/0180451111ABC987", "https://id.gs1.org/8004/0180451111ABC987"),
            ("https://id.gs1.org/8018/385888700111111111", "https://id.gs1.org/8018/385888700111111111"),
            ("https://id.gs1.org/8017/440018922222222226", "https://id.gs1.org/8017/440018922222222226"),
            ("https://id.gs1.org/253/4602443000331XYZ", "https://id.gs1.org/253/4602443000331XYZ"),
            ("https://id.gs1.org/8010/0628165987/8011/9876", "https://id.gs1.org/8010/0628165987/8011/9876"),
            ("https://id.gs1.org/255/0811625999996554433", "https://id.gs1.org/255/0811625999996554433"),
            (
                "http://fashion.com/itip/040123451234560102/ser/ABC145",
                "https://id.gs1.org/8006/040123451234560102/21/ABC145",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(n(input).as_deref(), Some(expected), "{input}");
        }
        for bad in [
            "http://example.org/123/4012345ABC987/456/4711",
            "http://id.gs1.org/99/9780345418913",
            "http://id.gs1.org/01/9780345418913/99/utfgf",
            "http://example.de/abc/9780345418913",
            "http://example.de/01/97803",
            "https://id.gs1.org/8006/04012345123456/22/ABCD/10/XYZ",
            "42",
            "Hello World!",
        ] {
            assert_eq!(n(bad), None, "{bad}");
        }
    }

    #[test]
    fn api_helpers() {
        assert_eq!(sgtin_link("4012345111118", "98\""), "https://id.gs1.org/01/04012345111118/21/98%22");
        assert_eq!(sgtin_link("4012345111118", "a!b"), normalise("urn:epc:id:sgtin:4012345.011111.a!b"));
        assert_eq!(lgtin_link("04012345123456", "Lot987"), normalise("urn:epc:class:lgtin:4012345.012345.Lot987"));
        let k = parse("https://example.com/01/9780345418913/10/L1/21/S%2F1?17=251231").unwrap_or_default();
        assert_eq!(k.gtin.as_deref(), Some("09780345418913"));
        assert_eq!(k.lot.as_deref(), Some("L1"));
        assert_eq!(k.serial.as_deref(), Some("S/1"));
        assert_eq!(k.expiry.as_deref(), Some("251231"));
        let k = parse("urn:epc:id:sgln:4012345.00005.122").unwrap_or_default();
        assert_eq!((k.gln.as_deref(), k.ext.as_deref()), (Some("4012345000054"), Some("122")));
        let k = parse("urn:epc:id:sscc:4012345.0000000011").unwrap_or_default();
        assert_eq!(k.sscc.as_deref(), Some("040123450000000115"));
        assert!(parse("urn:example:foo").is_none());
        assert!(is_valid_epc("urn:epc:id:sgtin:4012345.011111.9876"));
        assert!(is_valid_epc("urn:epc:id:bic:CSQU3054383"));
        assert!(!is_valid_epc("urn:epc:id:sgtin:4012345.9876"));
        assert!(is_valid_epc("https://example.com/anything"));
        assert!(!is_valid_epc("not a uri"));
        assert_eq!(normalise("urn:example:x"), "urn:example:x");
    }
}
