//! FHIR R4 JSON: the lossless JSON tree, structure validation, search-parameter definitions
//! and the small helpers (ids, instants, references) the API and repository share.

pub mod deid;
pub mod fhirpath;
pub mod json;
pub mod patch;
pub mod profiles;
pub mod refs;
pub mod searchparams;
pub mod validate;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// FHIR `id`: 1-64 of `[A-Za-z0-9\-\.]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A FHIR `instant` with millisecond precision in UTC, e.g. `2026-11-24T10:00:00.123Z`.
pub fn instant(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// RFC 7231 HTTP date for `Last-Modified`.
pub fn http_date(ms: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let wd = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"][t.weekday().number_days_from_monday() as usize];
    let mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        [usize::from(u8::from(t.month())) - 1];
    format!("{wd}, {:02} {mon} {:04} {:02}:{:02}:{:02} GMT", t.day(), t.year(), t.hour(), t.minute(), t.second())
}

pub fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A FHIR date/dateTime/instant search value as the [start, end) of the instant range it
/// denotes, in milliseconds since the epoch. `2020` is the whole year; a value without a
/// zone is taken as UTC.
/// A date, dateTime or instant as a query string carried it. HAPI's client (and others) leave
/// the `+` of a zone offset unescaped, so it arrives decoded as a space; as HAPI's server does,
/// a space in the offset's place is read as `+`. Anything else is returned as it is.
pub fn query_date(value: &str) -> std::borrow::Cow<'_, str> {
    if let Some((head, offset)) = value.trim_end().rsplit_once(' ') {
        let b = offset.as_bytes();
        let is_offset = b.len() == 5 && b[2] == b':' && b.iter().enumerate().all(|(i, c)| i == 2 || c.is_ascii_digit());
        if head.contains('T') && !head.contains(' ') && is_offset {
            return format!("{head}+{offset}").into();
        }
    }
    value.into()
}

pub fn date_range_ms(value: &str) -> Option<(i64, i64)> {
    use time::{Date, Month};
    let v = value.trim();
    let ymd = |y: i32, m: u8, d: u8| -> Option<i64> {
        let date = Date::from_calendar_date(y, Month::try_from(m).ok()?, d).ok()?;
        Some(date.midnight().assume_utc().unix_timestamp() * 1000)
    };
    let num = |s: &str| -> Option<u32> {
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    match v.len() {
        4 => {
            let y = i32::try_from(num(v)?).ok()?;
            Some((ymd(y, 1, 1)?, ymd(y + 1, 1, 1)?))
        }
        7 => {
            let y = i32::try_from(num(v.get(..4)?)?).ok()?;
            let m = num(v.get(5..7)?)? as u8;
            if v.as_bytes()[4] != b'-' {
                return None;
            }
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            Some((ymd(y, m, 1)?, ymd(ny, nm, 1)?))
        }
        10 => {
            let y = i32::try_from(num(v.get(..4)?)?).ok()?;
            let m = num(v.get(5..7)?)? as u8;
            let d = num(v.get(8..10)?)? as u8;
            if v.as_bytes()[4] != b'-' || v.as_bytes()[7] != b'-' {
                return None;
            }
            let s = ymd(y, m, d)?;
            Some((s, s + 86_400_000))
        }
        _ => {
            let with_zone = if v.ends_with('Z') || v.get(v.len().saturating_sub(6)..)?.starts_with(['+', '-']) {
                v.to_string()
            } else {
                format!("{v}Z")
            };
            // Minutes-only precision (`2020-01-01T10:00Z`) is legal in search values.
            let minutes_only = with_zone.len() >= 16 && with_zone.as_bytes().get(16) != Some(&b':');
            let with_seconds =
                if minutes_only { format!("{}:00{}", &with_zone[..16], &with_zone[16..]) } else { with_zone };
            let t = OffsetDateTime::parse(&with_seconds, &Rfc3339).ok()?;
            let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
            let precision_ms = match (minutes_only, with_seconds.contains('.')) {
                (true, _) => 60_000,
                (false, true) => 1,
                (false, false) => 1000,
            };
            Some((ms, ms + precision_ms))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_and_http_dates() {
        assert_eq!(instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(instant(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(http_date(1_700_000_000_123), "Tue, 14 Nov 2023 22:13:20 GMT");
    }

    #[test]
    fn date_ranges_follow_precision() {
        let (s, e) = date_range_ms("2020").unwrap();
        assert_eq!((e - s) / 86_400_000, 366);
        let (s, e) = date_range_ms("2020-02").unwrap();
        assert_eq!((e - s) / 86_400_000, 29);
        assert_eq!(
            date_range_ms("2020-01-01T00:00:00Z").unwrap().1 - date_range_ms("2020-01-01T00:00:00Z").unwrap().0,
            1000
        );
        let (s, e) = date_range_ms("2007-10-19T12:09Z").unwrap();
        assert_eq!(e - s, 60_000, "a minute-precision value is the whole minute");
        assert!(date_range_ms("2020-13").is_none());
        assert!(date_range_ms("yesterday").is_none());
        assert!(date_range_ms("2020-01-01T10:00:00+02:00").is_some());
    }

    #[test]
    fn an_unescaped_offset_plus_is_read_back() {
        assert_eq!(query_date("2026-12-05T02:54:04.527 00:00"), "2026-12-05T02:54:04.527+00:00");
        assert_eq!(query_date("2026-12-05T02:54:04 05:30"), "2026-12-05T02:54:04+05:30");
        for unchanged in ["2026-12-05T02:54:04Z", "2026-12-05T02:54:04-03:00", "2026 00:00", "x T 12:00", "2026-12-05"]
        {
            assert_eq!(query_date(unchanged), unchanged);
        }
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("abc-1.2"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id(&"a".repeat(65)));
    }
}
