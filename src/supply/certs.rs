//! Certificates of partners and products (wholesale and pharmacy licences, GMP, CE or FDA
//! clearance, cold-chain conformity) as `VerificationResult`s an issuer signs:
//!
//! - `target`: the partner (`Organization/{id}`) or the product (its GTIN's Digital Link as an
//!   identifier);
//! - `validationProcess`: the certificate's kind ([`KIND_SYSTEM`]);
//! - the [`PERIOD`] extension: its validity;
//! - `validator[0].organization`: the issuer, a registered Organization with a key;
//!   `validator[0].identityCertificate`: the certificate's number;
//!   `validator[0].attestationSignature`: the issuer's detached JWS over [`statement`];
//! - revocation: a new version with `status` `val-fail`, effective from its `statusDate` (steps
//!   before it keep the certificate they had).

use std::collections::HashMap;

use super::partners::{self, Partner};
use crate::codec::unb64;
use crate::error::FhirError;
use crate::fhir::json::Json;
use crate::search::index::Engine;

pub const KIND_SYSTEM: &str = "urn:fhir-ledger:certificate-kind";
pub const PERIOD: &str = "urn:fhir-ledger:StructureDefinition/certificate-period";
/// `typ` of an issuer's JWS over a certificate statement.
pub const CERT_JWS_TYPE: &str = "supply-certificate+jws";
/// The kinds that license a trading partner to hold and pass on product (DSCSA's
/// "authorized trading partner").
pub const LICENCES: [&str; 4] = ["manufacturing-licence", "wholesale-licence", "3pl-licence", "dispenser-licence"];

/// The bytes an issuer signs: kind, target, validity and number, one per line.
pub fn statement(kind: &str, target: &str, start: &str, end: &str, number: &str) -> String {
    format!("fhir-ledger certificate v1\n{kind}\n{target}\n{start}\n{end}\n{number}\n")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Valid,
    NotYetValid,
    Expired,
    Revoked,
    BadSignature(String),
    None,
}

impl Status {
    pub fn code(&self) -> &'static str {
        match self {
            Status::Valid => "valid",
            Status::NotYetValid => "not-yet-valid",
            Status::Expired => "expired",
            Status::Revoked => "revoked",
            Status::BadSignature(_) => "bad-signature",
            Status::None => "none",
        }
    }
}

/// One certificate as read from its VerificationResult.
#[derive(Clone, Debug)]
pub struct Certificate {
    pub reference: String,
    pub kind: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// When it was revoked (`status` `val-fail`).
    pub revoked_ms: Option<i64>,
    pub signature: Result<String, String>,
    /// The issuer's Organization id, when it names one.
    pub issuer: Option<String>,
}

impl Certificate {
    /// Its status at `t`.
    pub fn at(&self, t: i64) -> Status {
        if let Err(e) = &self.signature {
            return Status::BadSignature(e.clone());
        }
        if self.revoked_ms.is_some_and(|r| r <= t) {
            Status::Revoked
        } else if t < self.start_ms {
            Status::NotYetValid
        } else if t >= self.end_ms {
            Status::Expired
        } else {
            Status::Valid
        }
    }
}

fn bound(v: Option<&str>, end: bool) -> i64 {
    v.and_then(crate::fhir::date_range_ms)
        .map_or(if end { i64::MAX } else { i64::MIN }, |(s, e)| if end { e } else { s })
}

/// Reads and checks one certificate: the issuer's signature over its statement.
fn read_one(
    engine: &Engine,
    id: &str,
    r: &Json,
    target: &str,
    issuers: &mut HashMap<String, Option<Partner>>,
) -> Certificate {
    let kind = r
        .items(&["validationProcess"])
        .flat_map(|c| c.items(&["coding"]))
        .find(|c| c.str_at(&["system"]) == Some(KIND_SYSTEM))
        .and_then(|c| c.str_at(&["code"]))
        .unwrap_or_default()
        .to_string();
    let period = r.items(&["extension"]).find(|x| x.str_at(&["url"]) == Some(PERIOD));
    let start = period.and_then(|p| p.str_at(&["valuePeriod", "start"]));
    let end = period.and_then(|p| p.str_at(&["valuePeriod", "end"]));
    let revoked_ms = (r.str_at(&["status"]) == Some("val-fail"))
        .then(|| r.str_at(&["statusDate"]).and_then(crate::fhir::date_range_ms).map_or(i64::MIN, |(s, _)| s));
    let validator = r.items(&["validator"]).next();
    let number = validator.and_then(|v| v.str_at(&["identityCertificate"])).unwrap_or_default();
    let signature = (|| {
        let v = validator.ok_or("names no issuer (validator)")?;
        let issuer_ref = v.str_at(&["organization", "reference"]).ok_or("names no issuer organization")?;
        let issuer_id = issuer_ref.strip_prefix("Organization/").ok_or("issuer is not an Organization")?;
        if issuer_ref == target {
            return Err(format!("is issued by {target} to itself"));
        }
        if !issuers.contains_key(issuer_id) {
            issuers.insert(issuer_id.to_string(), partners::partner(engine, issuer_id).ok().flatten());
        }
        let issuer =
            issuers.get(issuer_id).cloned().flatten().ok_or(format!("issuer {issuer_ref} is not registered"))?;
        let jws = v
            .str_at(&["attestationSignature", "data"])
            .and_then(|d| unb64(d).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or("carries no issuer signature")?;
        let text = statement(&kind, target, start.unwrap_or_default(), end.unwrap_or_default(), number);
        crate::jws::check(&jws, CERT_JWS_TYPE, text.as_bytes(), &issuer.keys, "the certificate")?;
        Ok(issuer_ref.to_string())
    })();
    let issuer = validator
        .and_then(|v| v.str_at(&["organization", "reference"]))
        .and_then(|r| r.strip_prefix("Organization/"))
        .map(String::from);
    Certificate {
        issuer,
        reference: format!("VerificationResult/{id}"),
        kind,
        start_ms: bound(start, false),
        end_ms: bound(end, true),
        revoked_ms,
        signature: signature.map_err(|e: String| e),
    }
}

/// The current VerificationResults naming `target` (`Organization/{id}`).
pub fn heads(engine: &Engine, target: &str) -> Result<Vec<crate::search::index::Head>, FhirError> {
    super::events::matching(&*engine.current()?, "VerificationResult", &[("target", target)])
}

/// The certificates held by `target`, read and checked (through a `Directory`, once a version).
pub fn read(
    engine: &Engine,
    heads: &[crate::search::index::Head],
    target: &str,
) -> Result<Vec<Certificate>, FhirError> {
    let leaves: Vec<u64> = heads.iter().map(|h| h.leaf).collect();
    let mut issuers = HashMap::new();
    let mut out = Vec::new();
    for (h, stored) in heads.iter().zip(engine.repo().read_leaves(&leaves)) {
        if let Some(r) = stored?.parsed()? {
            out.push(read_one(engine, &h.id, &r, target, &mut issuers));
        }
    }
    Ok(out)
}

/// The licence standing of a partner at `t`: the best status among its licences (valid wins;
/// then the most telling failure), with the certificate it rests on.
pub fn licence_at(certs: &[Certificate], t: i64) -> (Status, Option<String>) {
    let mut best: (Status, Option<String>) = (Status::None, None);
    for c in certs.iter().filter(|c| LICENCES.contains(&c.kind.as_str())) {
        let s = c.at(t);
        if s == Status::Valid {
            return (s, Some(c.reference.clone()));
        }
        if best.0 == Status::None {
            best = (s, Some(c.reference.clone()));
        }
    }
    best
}
