//! The patient portal's access timeline: one row per accessor, one mark per disclosure-log
//! entry at the time it was recorded (its size grows with the requests it sums), refusals as
//! red squares, emergency (break-the-glass) access ringed. Server-rendered SVG through `maud`,
//! so every name and time is escaped; each mark's `<title>` says what it stands for. Every
//! element is closed (`{}`): inline SVG is foreign content to the HTML parser, where an
//! unclosed `<line>` would swallow everything after it.

use std::collections::BTreeMap;

use maud::{html, Markup};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::disclosure::Accessor;

const WIDTH: f64 = 760.0;
const LABEL: f64 = 200.0;
const PLOT: f64 = WIDTH - LABEL - 30.0;
const ROW: f64 = 30.0;
const TOP: f64 = 28.0;

/// Milliseconds since the epoch of an AuditEvent's `recorded`, if it is an instant.
fn ms(recorded: &str) -> Option<i128> {
    OffsetDateTime::parse(recorded, &Rfc3339).ok().map(|t| t.unix_timestamp_nanos() / 1_000_000)
}

fn minute(ms: i128) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ms * 1_000_000)
        .map(|t| {
            format!("{}-{:02}-{:02} {:02}:{:02} UTC", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute())
        })
        .unwrap_or_default()
}

/// The timeline of `accessors` (as `disclosure::access_report` sums them); nothing when no
/// access was recorded.
pub fn timeline(accessors: &BTreeMap<String, Accessor>) -> Markup {
    let times: Vec<i128> =
        accessors.values().flat_map(|acc| acc.marks.iter().filter_map(|mark| ms(&mark.recorded))).collect();
    let (Some(&first), Some(&last)) = (times.iter().min(), times.iter().max()) else {
        return html! { p id="no-accesses" { "No access has been recorded yet." } };
    };
    // A single moment still gets a minute of axis, centred.
    let (from, span) = if last > first { (first, (last - first) as f64) } else { (first - 30_000, 60_000.0) };
    let x_of = |at: i128| LABEL + 10.0 + PLOT * ((at - from) as f64 / span);
    let height = TOP + ROW * accessors.len() as f64 + 34.0;
    let legend_y = height - 12.0;
    html! {
        svg id="access-timeline" xmlns="http://www.w3.org/2000/svg" width=(WIDTH) height=(height)
            viewBox={ "0 0 " (WIDTH) " " (height) } role="img"
            aria-label="When each app or person accessed your records" {
            text x=(LABEL + 10.0) y="16" font-size="12" { (minute(from)) }
            text x=(WIDTH - 20.0) y="16" font-size="12" text-anchor="end" { (minute(from + span as i128)) }
            line x1=(LABEL + 10.0) y1="22" x2=(LABEL + 10.0 + PLOT) y2="22" stroke="#888" {}
            @for (row, (who, acc)) in accessors.iter().enumerate() {
                @let row_y = TOP + ROW * row as f64 + ROW / 2.0;
                @let app = if acc.client_name.is_empty() { acc.client.as_str() } else { acc.client_name.as_str() };
                @let label = format!("{who} ({app})");
                // Cut to the label column; the whole name is the label's title.
                text class="accessor" x="4" y=(row_y + 4.0) font-size="12" {
                    title { (label) }
                    (crate::disclosure::truncate(&label, 30))
                }
                line x1=(LABEL + 10.0) y1=(row_y) x2=(LABEL + 10.0 + PLOT) y2=(row_y) stroke="#ddd" {}
                @for mark in &acc.marks {
                    @if let Some(at) = ms(&mark.recorded) {
                        @let radius = 4.0 + (mark.requests.max(1) as f64).log2().min(6.0);
                        @let what = if mark.refused { "refused" } else { "shown" };
                        @let tip = format!("{who} · {app} · {} · {} request(s) {what}{}", mark.recorded, mark.requests,
                            if mark.broke_glass { " · emergency access" } else { "" });
                        @let class = if mark.broke_glass { format!("mark {what} emergency") } else { format!("mark {what}") };
                        g class=(class) {
                            title { (tip) }
                            @if mark.refused {
                                rect x=(x_of(at) - radius) y=(row_y - radius) width=(2.0 * radius) height=(2.0 * radius) fill="#c33" {}
                            } @else {
                                circle cx=(x_of(at)) cy=(row_y) r=(radius) fill="#2a7" fill-opacity="0.8" {}
                            }
                            @if mark.broke_glass {
                                circle cx=(x_of(at)) cy=(row_y) r=(radius + 4.0) fill="none" stroke="#e80" stroke-width="2" {}
                            }
                        }
                    }
                }
            }
            circle cx=(LABEL + 16.0) cy=(legend_y - 4.0) r="5" fill="#2a7" {}
            text x=(LABEL + 26.0) y=(legend_y) font-size="12" { "shown" }
            rect x=(LABEL + 86.0) y=(legend_y - 9.0) width="10" height="10" fill="#c33" {}
            text x=(LABEL + 102.0) y=(legend_y) font-size="12" { "refused" }
            circle cx=(LABEL + 172.0) cy=(legend_y - 4.0) r="7" fill="none" stroke="#e80" stroke-width="2" {}
            text x=(LABEL + 184.0) y=(legend_y) font-size="12" { "emergency access (break the glass)" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disclosure::Mark;

    fn mark(recorded: &str, requests: u64, refused: bool, broke_glass: bool) -> Mark {
        Mark { recorded: recorded.into(), requests, refused, broke_glass }
    }

    #[test]
    fn one_row_per_accessor_one_mark_per_entry_and_names_escaped() {
        let mut acc = BTreeMap::new();
        acc.insert(
            "Practitioner/<script>".to_string(),
            Accessor {
                client: "ehr".into(),
                marks: vec![
                    mark("2026-12-01T10:00:00Z", 3, false, false),
                    mark("2026-12-02T10:00:00Z", 1, true, false),
                ],
                ..Accessor::default()
            },
        );
        acc.insert(
            "client:app".to_string(),
            Accessor {
                client: "app".into(),
                client_name: "Growth Chart".into(),
                marks: vec![mark("2026-12-03T10:00:00Z", 1, false, true)],
                ..Accessor::default()
            },
        );
        let svg = timeline(&acc).into_string();
        assert!(svg.starts_with("<svg id=\"access-timeline\""), "{svg}");
        assert_eq!(svg.matches("class=\"accessor\"").count(), 2, "{svg}");
        assert_eq!(svg.matches("<g class=\"mark ").count(), 3, "{svg}");
        assert!(svg.contains("class=\"mark refused\""), "{svg}");
        assert!(svg.contains("class=\"mark shown emergency\""), "{svg}");
        assert!(svg.contains("Growth Chart"), "{svg}");
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;"), "names are escaped: {svg}");
        assert!(svg.contains("2026-12-01 10:00 UTC") && svg.contains("2026-12-03 10:00 UTC"), "{svg}");
        for shape in ["line", "rect", "circle"] {
            let open = svg.matches(&format!("<{shape} ")).count();
            assert!(open > 0 && open == svg.matches(&format!("</{shape}>")).count(), "every <{shape}> closed: {svg}");
        }
    }

    #[test]
    fn no_entries_no_chart() {
        let svg = timeline(&BTreeMap::new()).into_string();
        assert!(svg.contains("no-accesses") && !svg.contains("<svg"), "{svg}");
    }
}
