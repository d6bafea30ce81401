//! What operators watch: the process's Prometheus metrics (one recorder per process, rendered
//! by `GET /metrics`), its logs (text or JSON, to stderr, one request id per request) and the
//! progress bars of long command-line work.
//!
//! Metric names and labels are kept here so that the code map has one place to look; label
//! values are bounded (interactions and resource types the server knows, status codes), and no
//! label or log field ever carries an id, a search value or a name: those can be PHI.

use std::io::IsTerminal;
use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered: `interaction`, `type`, `status`.
pub const HTTP_REQUESTS: &str = "fhir_ledger_http_requests_total";
/// Their latency in seconds: `interaction`, `type`.
pub const HTTP_DURATION: &str = "fhir_ledger_http_request_duration_seconds";
/// Access tokens issued: `grant` (the OAuth grant type).
pub const TOKENS_ISSUED: &str = "fhir_ledger_auth_tokens_issued_total";
/// Requests or token requests refused: `reason` (an OAuth error code or a FHIR issue code).
pub const AUTH_REFUSALS: &str = "fhir_ledger_auth_refusals_total";
/// Disclosure events queued but not yet on the ledger.
pub const DISCLOSURE_BACKLOG: &str = "fhir_ledger_disclosure_backlog";
/// Cache lookups: `cache` (`bodies`, `documents`), `result` (`hit`, `miss`).
pub const CACHE_LOOKUPS: &str = "fhir_ledger_cache_lookups_total";
/// Snapshot builds and installs in seconds: `kind` (`build`, `install`); recorded by consensus.
pub use consensus::SNAPSHOT_DURATION;

/// Hits and misses of one cache, counted where it is looked up (two relaxed atomic adds: a
/// search page looks up hundreds of entries) and published at each scrape.
#[derive(Debug, Default)]
pub struct HitRate {
    hits: std::sync::atomic::AtomicU64,
    misses: std::sync::atomic::AtomicU64,
}

impl HitRate {
    pub fn record(&self, hit: bool) {
        let c = if hit { &self.hits } else { &self.misses };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the `CACHE_LOOKUPS` counters of `cache` to the counts so far.
    pub fn publish(&self, cache: &'static str) {
        for (result, c) in [("hit", &self.hits), ("miss", &self.misses)] {
            metrics::counter!(CACHE_LOOKUPS, "cache" => cache, "result" => result)
                .absolute(c.load(std::sync::atomic::Ordering::Relaxed));
        }
    }
}

/// Latency buckets: 250 us to 30 s, about three per decade (a read answers in well under a
/// millisecond, a large transaction or export in seconds).
const LATENCY_BUCKETS: &[f64] =
    &[0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use: every server in the process (the tests run
/// several) records into it, as a real process has exactly one.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(SNAPSHOT_DURATION.into()), &[0.1, 1.0, 10.0, 60.0, 600.0])
            })
            .map_or_else(|_| PrometheusBuilder::new().build_recorder(), PrometheusBuilder::build_recorder);
        let handle = recorder.handle();
        // Another recorder may already be installed (a library user's own): then ours only
        // renders what it was given, and /metrics says so by being mostly empty.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// The recorder, if [`prometheus`] installed one (a server run with `--no-metrics` has none:
/// every `metrics::` call is then a no-op).
pub fn installed() -> Option<&'static PrometheusHandle> {
    HANDLE.get()
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, with the request id of the request it belongs to.
    Json,
}

/// Sets up logging to stderr. `FHIR_LEDGER_LOG` filters (default `warn`; `info` adds one line
/// per request: method, route pattern, status and duration, never the path or query, which
/// can name a patient).
pub fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FHIR_LEDGER_LOG").unwrap_or_else(|_| "warn".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// A progress bar of `total` units named `unit` (`resources`, `leaves`) for long command-line
/// work (`load`, `verify --data-dir`, `cluster reindex`): done/total, rate and time left, drawn
/// on stderr only when stderr is a terminal; logs and scripts get the summary line alone.
pub fn progress_bar(total: u64, unit: &str) -> ProgressBar {
    bar(total, &format!("{{human_pos}}/{{human_len}} {unit} {{rate}}"))
}

/// [`progress_bar`] counting bytes (backup, restore); without a total (a stream whose length
/// is known only at its end), bytes and rate alone.
pub fn progress_bytes(total: Option<u64>) -> ProgressBar {
    if let Some(total) = total {
        return bar(total, "{bytes}/{total_bytes} {binary_bytes_per_sec}");
    }
    let style = ProgressStyle::with_template("{elapsed_precise} {spinner} {bytes} {binary_bytes_per_sec}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner());
    ProgressBar::with_draw_target(None, target()).with_style(style)
}

/// stderr when it is a terminal; nowhere otherwise.
fn target() -> ProgressDrawTarget {
    if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr_with_hz(4)
    } else {
        ProgressDrawTarget::hidden()
    }
}

fn bar(total: u64, counts: &str) -> ProgressBar {
    let template = format!("{{elapsed_precise}} [{{bar:30}}] {counts} ETA {{eta}}");
    let style = ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        // Whole units per second: indicatif's own `per_sec` prints four decimals.
        .with_key("rate", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}/s", s.per_sec());
        });
    ProgressBar::with_draw_target(Some(total), target()).with_style(style.progress_chars("=> "))
}
