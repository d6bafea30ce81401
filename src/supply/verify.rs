//! `$verify-product`: the GS1 Lightweight Verification Messaging answer (1.x: `verified`,
//! `verificationFailureReason`, `additionalInfo`) computed from a product's trace on the
//! ledger, with the trace's findings alongside under `fhirLedger`.
//!
//! | the trace says | verified | verificationFailureReason | additionalInfo |
//! | --- | --- | --- | --- |
//! | never commissioned (unknown serial) | false | `No_match_GTIN_Serial` | |
//! | lot and/or expiry differ from the commissioning | false | `No_match_GTIN_Serial_Lot` / `_Expiry` / `_Lot_Expiry` | |
//! | cloned serial, custody gap, altered or badly signed event, unlicensed partner, dispensed, decommissioned, destroyed | false | `Not_for_re-distribution` | `Suspect` |
//! | recalled | true | | `Recalled` |
//! | expired | true | | `Expired` |
//! | otherwise | true | | |

use serde_json::{json, Value};

use super::trace::Trace;

/// Findings that make a product unfit to pass on.
pub const SUSPECT: [&str; 8] = [
    "cloned-serial",
    "custody-gap",
    "event-altered",
    "signature-invalid",
    "unlicensed-partner",
    "dispensed",
    "decommissioned",
    "destroyed",
];

/// An expiry as `YYYY-MM-DD` (or `YYYY-MM` when AI 17 gives day `00`, the month's end):
/// from `YYMMDD` (AI 17), `YYYY-MM-DD`, or `YYYYMMDD`.
pub fn expiry(s: &str) -> Option<String> {
    let d: String = s.chars().filter(char::is_ascii_digit).collect();
    let (y, m, day) = match d.len() {
        6 => (format!("20{}", &d[..2]), &d[2..4], &d[4..6]),
        8 => (d[..4].to_string(), &d[4..6], &d[6..8]),
        _ => return None,
    };
    Some(if day == "00" { format!("{y}-{m}") } else { format!("{y}-{m}-{day}") })
}

fn same_expiry(asked: &str, recorded: &str) -> bool {
    match (expiry(asked), expiry(recorded)) {
        (Some(a), Some(r)) => r.starts_with(&a) || a.starts_with(&r),
        _ => false,
    }
}

/// The request: what the requestor read off the pack.
pub struct Asked<'a> {
    pub lot: Option<&'a str>,
    pub expiry: Option<&'a str>,
    /// Today, `YYYY-MM-DD`.
    pub today: &'a str,
}

/// `(status, verified, verificationFailureReason, additionalInfo)`.
pub fn verdict(t: &Trace, asked: &Asked<'_>) -> (&'static str, bool, Option<&'static str>, Option<&'static str>) {
    if !t.commissioned {
        return ("unknown-serial", false, Some("No_match_GTIN_Serial"), None);
    }
    let lot_bad = asked.lot.is_some_and(|l| t.lot.as_deref() != Some(l));
    let exp_bad = asked.expiry.is_some_and(|e| !t.expiry.as_deref().is_some_and(|r| same_expiry(e, r)));
    match (lot_bad, exp_bad) {
        (true, true) => return ("lot-and-expiry-mismatch", false, Some("No_match_GTIN_Serial_Lot_Expiry"), None),
        (true, false) => return ("lot-mismatch", false, Some("No_match_GTIN_Serial_Lot"), None),
        (false, true) => return ("expiry-mismatch", false, Some("No_match_GTIN_Serial_Expiry"), None),
        (false, false) => {}
    }
    if let Some(f) = t.findings.iter().find(|f| SUSPECT.contains(&f.code)) {
        return (f.code, false, Some("Not_for_re-distribution"), Some("Suspect"));
    }
    if t.has("recalled") {
        return ("recalled", true, None, Some("Recalled"));
    }
    let expired = t
        .expiry
        .as_deref()
        .and_then(expiry)
        .is_some_and(|x| x.as_str() < &asked.today[..x.len().min(asked.today.len())]);
    if expired {
        return ("expired", true, None, Some("Expired"));
    }
    ("verified", true, None, None)
}

/// The LVM response body (without the proofs, which the HTTP layer adds).
pub fn response(t: &Trace, asked: &Asked<'_>, corr: &str, now: &str) -> Value {
    let (status, verified, reason, info) = verdict(t, asked);
    let mut data = json!({"verified": verified});
    if let Some(r) = reason {
        data["verificationFailureReason"] = json!(r);
    }
    if let Some(i) = info {
        data["additionalInfo"] = json!(i);
    }
    json!({
        "corrUUID": corr,
        "verificationTimestamp": now,
        "data": data,
        "fhirLedger": {
            "status": status,
            "findings": t.findings.iter().map(|f| json!({"code": f.code, "message": f.message, "eventID": f.event})).collect::<Vec<_>>(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ai17_expiries_compare_with_dates() {
        assert_eq!(expiry("270531").as_deref(), Some("2027-05-31"));
        assert_eq!(expiry("270500").as_deref(), Some("2027-05"));
        assert!(same_expiry("270500", "2027-05-31"));
        assert!(same_expiry("2027-05-31", "2027-05-31"));
        assert!(!same_expiry("270530", "2027-05-31"));
    }
}
