//! The operator console (`/console`): one server-rendered page behind the admin token with the
//! cluster's members (role, replication lag, last contact), the current signed tree head and
//! who cosigned it, the most recent leaves (type, version, operation, time: never an id, an
//! actor or a body, which can name a patient), the metrics an operator looks at first, and the
//! backups this node took. A browser signs in once with the admin token (`POST
//! /console/login`, a cookie good for that token and eight hours); scripts may send the token
//! as a bearer header instead. The page escapes every value (maud) and runs no script.

use std::collections::BTreeMap;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};
use sha2::{Digest, Sha256};

use super::admin::backup::{Record, Status as BackupStatus};
use super::admin::{console_cookie, console_session};
use crate::api::AppState;
use crate::error::FhirError;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/console", web::get().to(page)).route("/console/login", web::post().to(login));
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:72rem;margin:1.5rem auto;padding:0 1rem;color:#1b1b1b;background:#f7f9fb}\
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:.8rem 1rem;margin:.8rem 0}\
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #e5e9ee;padding:.3rem .5rem;text-align:left;font-size:.92rem}\
.num{text-align:right;font-variant-numeric:tabular-nums}.mono{font-family:monospace}.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}\
.tiles{display:flex;flex-wrap:wrap;gap:.6rem}.tile{border:1px solid #d0d7de;border-radius:6px;padding:.5rem .8rem;min-width:9rem;background:#fbfcfd}\
.tile b{display:block;font-size:1.3rem}.error{color:#b42318;font-weight:600}input[type=password]{width:100%;padding:.5rem;font-size:1rem}\
button{font-size:1rem;padding:.5rem 1.2rem;margin-top:.8rem;border-radius:6px;border:1px solid #1f6feb;background:#1f6feb;color:#fff}";

fn document(title: &str, body: &Markup) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"))
        .body(super::smart::pages::page_styled(title, STYLE, body))
}

fn sign_in(error: Option<&str>) -> HttpResponse {
    let body = html! {
        p { "This page is for the operators of this node. Sign in with its admin token "
            "(" code { "<data dir>/admin.token" } ", or the value it was started with)." }
        @if let Some(e) = error { p class="error" { (e) } }
        form id="console-login" method="post" action="/console/login" {
            input type="password" id="token" name="token" autocomplete="off" required;
            button type="submit" id="console-submit" { "Sign in" }
        }
    };
    let mut r = document("Operator console", &body);
    if error.is_some() {
        *r.status_mut() = actix_web::http::StatusCode::UNAUTHORIZED;
    }
    r
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(req: HttpRequest, state: web::Data<AppState>, form: web::Form<LoginForm>) -> HttpResponse {
    let digest: [u8; 32] = Sha256::digest(form.token.trim().as_bytes()).into();
    if digest != state.admin.token_sha256 {
        return sign_in(Some("That is not this node's admin token."));
    }
    let secure = req.connection_info().scheme() == "https";
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, "/console"))
        .cookie(console_cookie(&state.admin, secure))
        .finish()
}

fn bearer_ok(req: &HttpRequest, state: &AppState) -> bool {
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|t| {
        let digest: [u8; 32] = Sha256::digest(t.trim().as_bytes()).into();
        digest == state.admin.token_sha256
    })
}

async fn page(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if !console_session(&req, &state.admin) && !bearer_ok(&req, &state) {
        return sign_in(None);
    }
    match render(&state).await {
        Ok(body) => document("Operator console", &body),
        Err(e) => {
            let why = e.issues.first().map(|i| i.diagnostics.clone()).unwrap_or_default();
            let mut r = document("Operator console", &html! { p class="error" { (why) } });
            *r.status_mut() = actix_web::http::StatusCode::SERVICE_UNAVAILABLE;
            r
        }
    }
}

/// How many of the newest leaves the page lists.
const RECENT_LEAVES: u64 = 15;

async fn render(state: &AppState) -> Result<Markup, FhirError> {
    let ledger = state.repo.ledger();
    let status = ledger.status();
    let metrics = Scrape::parse(&super::monitor::render(state).await.unwrap_or_default());
    let head = super::ledger::signed_head(&state.repo).await?;
    let view = ledger.view();
    let size = view.leaf_count()?;
    let mut leaves = Vec::new();
    for item in view.headers_from(size.saturating_sub(RECENT_LEAVES)) {
        let (leaf, h) = item?;
        leaves.push((leaf, h, view.leaf_hash(leaf)?));
    }
    leaves.reverse();
    let backups = state.admin.backups.all();
    let me = status.node_id;
    Ok(html! {
        p id="summary" {
            "Node " strong { (me) } " is " strong { (role_of(&status, me)) } " in term " (status.term)
            @if let Some(l) = status.leader { ", leader " (l) } @else { ", no leader known" }
            "; applied " (opt(status.last_applied)) " of " (opt(status.last_log_index))
            "; snapshot " (opt(status.snapshot)) "."
        }
        section id="members" {
            h2 { "Cluster members" }
            table {
                tr { th { "node" } th { "role" } th { "API" } th { "Raft" } th class="num" { "matched" } th class="num" { "lag" } th class="num" { "last contact" } }
                @for (id, n) in &status.nodes {
                    @let rep = status.replication.as_ref().and_then(|r| r.get(id));
                    tr class="member" {
                        td { (id) @if *id == me { " (this node)" } }
                        td { (role_of(&status, *id)) }
                        td class="mono" { (n.api_addr) }
                        td class="mono" { (n.raft_addr) }
                        td class="num" { (opt(rep.and_then(|r| r.matched))) }
                        td class="num" { (opt(rep.and_then(|r| r.lag))) }
                        td class="num" { (contact(&status, *id)) }
                    }
                }
            }
        }
        section id="tree-head" {
            h2 { "Signed tree head" }
            p {
                "Size " strong class="num" { (head.size) } ", root " span class="mono" { (hex::encode(head.root)) }
                ", at " (crate::fhir::instant(head.timestamp_ms)) "."
            }
            table {
                tr { th { "signed by node" } th { "key" } th { "signature" } }
                @for sig in &head.signatures {
                    @let good = verifies(&head, sig, &status.nodes);
                    tr class="cosignature" {
                        td { (sig.node) }
                        td class="mono" { (hex::encode(&sig.public_key[..8])) "…" }
                        td class=(if good { "ok" } else { "bad" }) { (if good { "valid, a member's key" } else { "not a member's valid signature" }) }
                    }
                }
            }
        }
        section id="metrics" {
            h2 { "At a glance" }
            div class="tiles" {
                (tile("requests", &metrics.sum(crate::telemetry::HTTP_REQUESTS, |_| true)))
                (tile("client errors (4xx)", &metrics.sum(crate::telemetry::HTTP_REQUESTS, |l| l.get("status").is_some_and(|s| s.starts_with('4')))))
                (tile("server errors (5xx)", &metrics.sum(crate::telemetry::HTTP_REQUESTS, |l| l.get("status").is_some_and(|s| s.starts_with('5')))))
                (tile("ledger leaves", &metrics.sum("fhir_ledger_ledger_leaves", |_| true)))
                (tile("ledger on disk", &megabytes(metrics.value("fhir_ledger_ledger_disk_bytes"))))
                (tile("disclosure backlog", &metrics.sum(crate::telemetry::DISCLOSURE_BACKLOG, |_| true)))
                (tile("tokens issued", &metrics.sum(crate::telemetry::TOKENS_ISSUED, |_| true)))
                (tile("authorization refusals", &metrics.sum(crate::telemetry::AUTH_REFUSALS, |_| true)))
                @for cache in ["bodies", "documents"] {
                    (tile(&format!("{cache} cache hits"), &metrics.hit_rate(cache)))
                }
            }
            p { "Every metric, in Prometheus text: " a href="/metrics" { "/metrics" } "." }
        }
        section id="recent-leaves" {
            h2 { "Recent leaves" }
            table {
                tr { th class="num" { "leaf" } th { "type" } th class="num" { "version" } th { "change" } th { "time" } th class="num" { "raft entry" } th { "leaf hash" } }
                @for (leaf, h, hash) in &leaves {
                    tr class="leaf" {
                        td class="num" { (leaf) }
                        td { (h.rtype) }
                        td class="num" { (h.version) }
                        td { (h.op) }
                        td { (crate::fhir::instant(h.last_updated_ms)) }
                        td class="num" { (h.log_index) }
                        td class="mono" { (hash.map(|x| hex::encode(&x[..8])).unwrap_or_default()) "…" }
                    }
                }
            }
        }
        section id="backups" {
            h2 { "Backups" }
            @if backups.is_empty() {
                p { "None taken since this node started. " code { "fhir-ledger backup --node URL --to DIR" } " takes one." }
            } @else {
                table {
                    tr { th { "backup" } th { "status" } th { "started" } th class="num" { "tree size" } th class="num" { "size" } }
                    @for b in backups.iter().rev() {
                        (backup_row(b))
                    }
                }
            }
            p { "As JSON: " a href="/admin/backups" { "/admin/backups" } "." }
        }
    })
}

fn backup_row(b: &Record) -> Markup {
    let status = match b.status {
        BackupStatus::Running => "running",
        BackupStatus::Complete => "sent whole",
        BackupStatus::Failed => "failed",
    };
    html! {
        tr class="backup" {
            td class="mono" { (b.id.get(..12).unwrap_or(&b.id)) }
            td class=(if b.status == BackupStatus::Failed { "bad" } else { "" }) {
                (status) @if let Some(e) = &b.error { ": " (e) }
            }
            td { (crate::fhir::instant(b.started_ms)) }
            td class="num" { (b.tree_size) }
            td class="num" { (megabytes(Some(b.bytes as f64))) }
        }
    }
}

fn tile(label: &str, value: &str) -> Markup {
    html! { div class="tile" { b { (value) } (label) } }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| v.to_string())
}

fn role_of(status: &consensus::Status, id: consensus::NodeId) -> &'static str {
    if status.leader == Some(id) {
        "leader"
    } else if status.voters.contains(&id) {
        "voter"
    } else if status.learners.contains(&id) {
        "learner"
    } else {
        "not a member"
    }
}

/// When this node last heard from `id`: its followers' answers on a leader, the leader's
/// replication on a follower.
fn contact(status: &consensus::Status, id: consensus::NodeId) -> String {
    let ms = if id == status.node_id {
        return "–".into();
    } else if status.leader == Some(id) && status.leader != Some(status.node_id) {
        status.staleness_ms.or_else(|| status.last_contact_ms.get(&id).copied())
    } else {
        status.last_contact_ms.get(&id).copied()
    };
    ms.map_or_else(
        || "never".into(),
        |ms| if ms < 1000 { format!("{ms} ms ago") } else { format!("{:.1} s ago", ms as f64 / 1e3) },
    )
}

fn verifies(
    head: &crate::treehead::TreeHead,
    sig: &crate::treehead::HeadSignature,
    nodes: &BTreeMap<consensus::NodeId, consensus::Node>,
) -> bool {
    let Some(key) = nodes
        .values()
        .find_map(|n| crate::treehead::parse_key(&n.public_key).filter(|k| k.as_bytes() == &sig.public_key))
    else {
        return false;
    };
    let one = crate::treehead::TreeHead { signatures: vec![sig.clone()], ..head.clone() };
    one.check_quorum(&[key], 1).is_ok()
}

#[allow(clippy::cast_precision_loss)] // sizes for display
fn megabytes(bytes: Option<f64>) -> String {
    bytes.map_or_else(|| "–".into(), |b| format!("{:.1} MB", b / 1e6))
}

/// Samples of a Prometheus text rendering: (name, labels, value).
struct Scrape(Vec<(String, BTreeMap<String, String>, f64)>);

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                .collect();
            samples.push((name.to_string(), labels, value));
        }
        Self(samples)
    }

    fn value(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _, _)| n == name).map(|s| s.2)
    }

    fn sum(&self, name: &str, keep: impl Fn(&BTreeMap<String, String>) -> bool) -> String {
        let total: f64 = self.0.iter().filter(|(n, l, _)| n == name && keep(l)).map(|s| s.2).sum();
        // `+ 0.0`: an empty sum is -0.0, which would print as "-0".
        format!("{:.0}", total + 0.0)
    }

    fn hit_rate(&self, cache: &str) -> String {
        let count = |result: &str| -> f64 {
            self.0
                .iter()
                .filter(|(n, l, _)| {
                    n == crate::telemetry::CACHE_LOOKUPS
                        && l.get("cache").map(String::as_str) == Some(cache)
                        && l.get("result").map(String::as_str) == Some(result)
                })
                .map(|s| s.2)
                .sum()
        };
        let (hits, misses) = (count("hit"), count("miss"));
        if hits + misses == 0.0 {
            "–".into()
        } else {
            format!("{:.0} %", 100.0 * hits / (hits + misses))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_reads_prometheus_text() {
        let s = Scrape::parse(
            "# TYPE x counter\nfhir_ledger_http_requests_total{interaction=\"read\",status=\"200\"} 7\n\
             fhir_ledger_http_requests_total{interaction=\"read\",status=\"404\"} 2\nfhir_ledger_ledger_disk_bytes 2500000\n\
             fhir_ledger_cache_lookups_total{cache=\"bodies\",result=\"hit\"} 3\nfhir_ledger_cache_lookups_total{cache=\"bodies\",result=\"miss\"} 1\n",
        );
        assert_eq!(s.sum(crate::telemetry::HTTP_REQUESTS, |_| true), "9");
        assert_eq!(
            s.sum(crate::telemetry::HTTP_REQUESTS, |l| l.get("status").is_some_and(|x| x.starts_with('4'))),
            "2"
        );
        assert_eq!(megabytes(s.value("fhir_ledger_ledger_disk_bytes")), "2.5 MB");
        assert_eq!(s.hit_rate("bodies"), "75 %");
        assert_eq!(s.hit_rate("documents"), "–");
    }
}
