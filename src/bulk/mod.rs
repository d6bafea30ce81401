//! Bulk Data Access `$export` (IG 2.0.0): asynchronous jobs pinned to a ledger tree head.
//!
//! A job is a ledger record (`_bulk.Job`), so it survives a restart and any node of a cluster
//! answers its status. An export is the ledger at one tree size: the kick-off fixes the signed
//! head, the runner selects each resource's version as of that size ([`select`]), and what it
//! keeps per output file is the list of leaves (`_bulk.Part` records), never the plaintext. A
//! file is produced again from those leaves, byte for byte, whenever it is downloaded
//! ([`render`]), so no decrypted PHI is written to disk and the digests in the trust label
//! ([`label`]) hold for every download.

pub mod check;
pub mod label;
pub mod params;
pub mod render;
pub mod select;
pub mod spool;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use self::params::{Level, Params};
use crate::auth::access::Disclosed;
use crate::auth::store::to_json;
use crate::auth::{Auth, Caller};
use crate::error::FhirError;
use crate::repo::System;
use crate::search::Engine;

/// Internal record types: jobs and the leaf lists of their files.
pub const JOB: &str = "_bulk.Job";
pub const PART: &str = "_bulk.Part";
/// The ledger actor of the export runner's own records.
pub const ACTOR: &str = "fhir-ledger/bulk";
/// Lines per output file; a type with more is split.
pub const LINES_PER_FILE: usize = 50_000;
/// How long a finished export may be downloaded.
pub const EXPIRES_MS: i64 = 24 * 3_600_000;
/// A runner refreshes its job's heartbeat this often; a job whose heartbeat is older than
/// [`TAKEOVER_MS`] has lost its runner (a restart, a node gone) and the next poll restarts it.
pub const HEARTBEAT_MS: i64 = 20_000;
pub const TAKEOVER_MS: i64 = 60_000;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Accepted,
    Complete,
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Output,
    Deleted,
    Error,
}

/// One file of a finished export.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// The file's name: the last segment of its URL.
    pub name: String,
    /// The resource type of its lines.
    pub rtype: String,
    pub kind: Kind,
    pub count: u64,
    pub bytes: u64,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// The `_bulk.Part` record with its leaves or lines.
    pub part: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Job {
    /// Who may poll, download and cancel: the kick-off's client and subject.
    pub owner: String,
    /// The kick-off request URL (the manifest's `request`).
    pub request: String,
    pub level: Level,
    pub params: Params,
    /// Patient and Group level: the patients whose compartments the export holds.
    pub patients: Option<BTreeSet<String>>,
    /// The signed tree head the export is pinned to (`GET /ledger/head`'s parts).
    pub head: serde_json::Value,
    /// Its tree size: the export holds leaves below it.
    pub size: u64,
    /// Its timestamp: the manifest's `transactionTime`.
    pub transaction_time_ms: i64,
    pub requires_token: bool,
    pub created_ms: i64,
    pub heartbeat_ms: i64,
    pub state: State,
    pub error: Option<String>,
    pub files: Vec<FileInfo>,
    pub completed_ms: Option<i64>,
    /// The trust label's detached JWS signatures (compact `header..signature`).
    #[serde(default)]
    pub signatures: Vec<String>,
    /// An operation run asynchronously that is not an export (`bulk-member-match`, `import`):
    /// no export runner ever takes it over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Such an operation's answer, which the status URL returns once complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The export of a study that receives de-identified data: every line passes through its
    /// rules. Such an export has no trust label: its bytes no longer trace to leaves, and
    /// proofs would name the original ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deidentify: Option<Deidentify>,
}

/// A de-identified export's study and rules (the study key is derived when files are made).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Deidentify {
    pub study: String,
    pub name: String,
    pub rules: Vec<String>,
}

/// What a de-identified export's lines pass through: the rules and the study's key.
pub struct Deid {
    pub rules: crate::fhir::deid::Rules,
    pub key: [u8; 32],
}

impl Deid {
    /// The de-identification of `job`'s lines, if it has one.
    pub fn of(job: &Job, auth: &Auth) -> Option<Self> {
        let d = job.deidentify.as_ref()?;
        let rules = crate::fhir::deid::Rules::parse(&d.name, &d.rules)
            .unwrap_or_else(|_| crate::fhir::deid::Rules::safe_harbor());
        Some(Self { rules, key: auth.study_key(&d.study) })
    }
}

impl Job {
    /// A job just kicked off by `owner` with request URL `request`, pinned to `head`, at
    /// `level` with everything else empty: an export's runner, or an operation, fills it in.
    pub fn accepted(
        owner: String,
        request: String,
        level: Level,
        head: &crate::treehead::TreeHead,
        requires_token: bool,
    ) -> Job {
        let now = crate::fhir::now_ms();
        Job {
            owner,
            request,
            level,
            params: Params::default(),
            patients: None,
            head: crate::fhir::json::Json::Array(head.to_parts()).to_serde(),
            size: head.size,
            transaction_time_ms: head.timestamp_ms,
            requires_token,
            created_ms: now,
            heartbeat_ms: now,
            state: State::Accepted,
            error: None,
            files: Vec::new(),
            completed_ms: None,
            signatures: Vec::new(),
            operation: None,
            result: None,
            deidentify: None,
        }
    }

    pub fn expired(&self, now_ms: i64) -> bool {
        self.completed_ms.is_some_and(|c| now_ms > c + EXPIRES_MS)
    }
}

/// A file's content as leaves (outputs, deletions) or lines (errors).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Part {
    /// Leaves, ascending, as base64 of LEB128 deltas.
    #[serde(default)]
    pub leaves: String,
    #[serde(default)]
    pub lines: Vec<String>,
}

/// The owner string of a caller.
pub fn owner_of(caller: &Caller) -> String {
    format!("{} {}", caller.claims.client_id, caller.claims.sub)
}

/// How far a running export got, and whether it was cancelled.
#[derive(Default, Debug)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub cancelled: AtomicBool,
}

/// The exports this node runs, when each job was last polled (for 429), and the files its
/// jobs made (none without a spool: downloads then make them again).
#[derive(Default)]
pub struct Exports {
    running: Mutex<HashMap<String, Arc<Progress>>>,
    polled: Mutex<HashMap<String, i64>>,
    spool: Option<spool::Spool>,
}

impl Exports {
    /// Exports whose files are spooled under `dir` (emptied now), up to `bytes` of them (none
    /// if 0).
    pub fn with_spool(dir: &std::path::Path, bytes: u64) -> std::io::Result<Self> {
        let spool = if bytes == 0 { None } else { Some(spool::Spool::open(dir, bytes)?) };
        Ok(Self { spool, ..Self::default() })
    }

    /// File `name` of job `id` as its job made it, if this process did.
    pub fn spooled(&self, id: &str, name: &str) -> Option<spool::SpoolReader> {
        self.spool.as_ref()?.take(id, name)
    }

    /// Forgets the files of job `id`.
    pub fn unspool(&self, id: &str) {
        if let Some(s) = &self.spool {
            s.remove(id);
        }
    }

    pub fn progress(&self, id: &str) -> Option<Arc<Progress>> {
        self.running.lock().ok()?.get(id).cloned()
    }

    /// Registers a runner for `id`; `None` when one runs here already.
    fn begin(&self, id: &str) -> Option<Arc<Progress>> {
        let mut running = self.running.lock().ok()?;
        if running.contains_key(id) {
            return None;
        }
        let p = Arc::new(Progress::default());
        running.insert(id.to_string(), p.clone());
        Some(p)
    }

    fn end(&self, id: &str) {
        if let Ok(mut r) = self.running.lock() {
            r.remove(id);
        }
    }

    pub fn cancel(&self, id: &str) {
        if let Some(p) = self.progress(id) {
            p.cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Records a poll at `now_ms`; false when the previous one was less than `min_gap_ms` ago.
    pub fn poll_ok(&self, id: &str, now_ms: i64, min_gap_ms: i64) -> bool {
        let Ok(mut polled) = self.polled.lock() else { return true };
        polled.retain(|_, t| now_ms - *t < 3_600_000);
        let ok = polled.get(id).is_none_or(|t| now_ms - *t >= min_gap_ms);
        if ok {
            polled.insert(id.to_string(), now_ms);
        }
        ok
    }
}

pub fn get_job(engine: &Engine, id: &str) -> Result<Option<(Job, u64)>, FhirError> {
    crate::auth::store::get(engine.repo(), JOB, id)
}

pub fn get_part(engine: &Engine, id: &str) -> Result<Part, FhirError> {
    Ok(crate::auth::store::get(engine.repo(), PART, id)?.map(|(p, _)| p).unwrap_or_default())
}

/// Writes a new job.
pub async fn create(engine: &Engine, id: &str, job: &Job) -> Result<(), FhirError> {
    let body = to_json(job)?;
    engine.repo().commit(&System::new(ACTOR), |plan| plan.put_new(JOB, id, &body).map(|_| ())).await?;
    Ok(())
}

/// Replaces version `version` of job `id`; false when it changed meanwhile (or was cancelled).
async fn replace(
    engine: &Engine,
    id: &str,
    job: &Job,
    version: u64,
    parts: &[(String, Part)],
) -> Result<bool, FhirError> {
    let body = to_json(job)?;
    let parts = parts.iter().map(|(pid, p)| Ok((pid.clone(), to_json(p)?))).collect::<Result<Vec<_>, FhirError>>()?;
    let r = engine
        .repo()
        .commit(&System::new(ACTOR), |plan| {
            for (pid, p) in &parts {
                plan.put(PART, pid, p, None)?;
            }
            plan.put(JOB, id, &body, Some(version)).map(|_| ())
        })
        .await;
    match r {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.status(), 404 | 409 | 410 | 412) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Cancels job `id`: its record and parts are deleted (a poll then answers 404).
pub async fn delete(engine: &Engine, id: &str, job: &Job) -> Result<(), FhirError> {
    let parts: Vec<String> = job.files.iter().map(|f| f.part.clone()).collect();
    engine
        .repo()
        .commit(&System::new(ACTOR), |plan| {
            for p in &parts {
                plan.delete(PART, p, None)?;
            }
            plan.delete(JOB, id, None).map(|_| ())
        })
        .await?;
    Ok(())
}

/// Runs `work`, an operation job's body, on this node: keeps job `id`'s heartbeat fresh while
/// it runs, then records its answer (`Complete`) or its refusal (`Failed`). Returns at once.
pub fn spawn_operation(
    engine: Arc<Engine>,
    exports: Arc<Exports>,
    id: String,
    work: impl std::future::Future<Output = Result<serde_json::Value, FhirError>> + Send + 'static,
) {
    let Some(_progress) = exports.begin(&id) else { return };
    tokio::spawn(async move {
        tokio::pin!(work);
        let mut beat = tokio::time::interval(std::time::Duration::from_millis(HEARTBEAT_MS as u64));
        beat.tick().await;
        let outcome = loop {
            tokio::select! {
                done = &mut work => break done,
                _ = beat.tick() => {
                    if let Ok(Some((mut j, v))) = get_job(&engine, &id) {
                        j.heartbeat_ms = crate::fhir::now_ms();
                        let _ = replace(&engine, &id, &j, v, &[]).await;
                    }
                }
            }
        };
        if let Ok(Some((mut job, version))) = get_job(&engine, &id) {
            job.completed_ms = Some(crate::fhir::now_ms());
            match outcome {
                Ok(result) => {
                    job.state = State::Complete;
                    job.result = Some(result);
                }
                Err(e) => {
                    job.state = State::Failed;
                    job.error = Some(e.issues.iter().map(|i| i.diagnostics.as_str()).collect::<Vec<_>>().join("; "));
                }
            }
            if let Err(e) = replace(&engine, &id, &job, version, &[]).await {
                tracing::warn!("operation {id}: its outcome was not recorded: {:?}", e.issues.first());
            }
        }
        exports.end(&id);
    });
}

/// Reports what an export disclosed to the disclosure log (the HTTP layer's writer).
pub type OnShown = Arc<dyn Fn(&Caller, &[(String, String, u64)], Disclosed) + Send + Sync>;

/// Runs job `id` on this node for `caller` (its owner) unless it runs here already: selects,
/// digests each file, signs the trust label and records the result. Returns at once.
pub fn spawn(
    engine: Arc<Engine>,
    auth: Arc<Auth>,
    exports: Arc<Exports>,
    caller: Arc<Caller>,
    id: String,
    on_shown: OnShown,
) {
    let Some(progress) = exports.begin(&id) else { return };
    tokio::spawn(async move {
        if let Err(e) = run(&engine, &auth, &exports, &caller, &id, &progress, on_shown).await {
            tracing::warn!("export {id}: {:?}", e.issues.first().map(|i| &i.diagnostics));
            fail(&engine, &id, &e).await;
        }
        exports.end(&id);
    });
}

async fn fail(engine: &Engine, id: &str, e: &FhirError) {
    if let Ok(Some((mut job, version))) = get_job(engine, id) {
        if job.state == State::Accepted {
            job.state = State::Failed;
            job.error = Some(e.issues.first().map(|i| i.diagnostics.clone()).unwrap_or_default());
            job.completed_ms = Some(crate::fhir::now_ms());
            let _ = replace(engine, id, &job, version, &[]).await;
        }
    }
}

async fn run(
    engine: &Arc<Engine>,
    auth: &Arc<Auth>,
    exports: &Arc<Exports>,
    caller: &Arc<Caller>,
    id: &str,
    progress: &Arc<Progress>,
    on_shown: OnShown,
) -> Result<(), FhirError> {
    let Some((job, _)) = get_job(engine, id)? else { return Ok(()) };
    if job.state != State::Accepted {
        return Ok(());
    }
    let work = {
        let (engine, auth, exports, caller, progress, job) =
            (engine.clone(), auth.clone(), exports.clone(), caller.clone(), progress.clone(), job.clone());
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            produce(&engine, &auth, &caller, &id, &job, &progress, &on_shown, exports.spool.as_ref())
        })
    };
    tokio::pin!(work);
    let mut beat = tokio::time::interval(std::time::Duration::from_millis(HEARTBEAT_MS as u64));
    beat.tick().await;
    let (files, parts) = loop {
        tokio::select! {
            done = &mut work => break done.map_err(FhirError::internal)??,
            _ = beat.tick() => {
                // Keeps other nodes from taking the job over while it runs here.
                let Some((mut j, v)) = get_job(engine, id)? else { progress.cancelled.store(true, std::sync::atomic::Ordering::Relaxed); continue };
                j.heartbeat_ms = crate::fhir::now_ms();
                replace(engine, id, &j, v, &[]).await?;
            }
        }
    };
    let Some((mut job, version)) = get_job(engine, id)? else {
        exports.unspool(id); // cancelled while it ran
        return Ok(());
    };
    if job.state != State::Accepted {
        exports.unspool(id);
        return Ok(());
    }
    job.files = files;
    job.state = State::Complete;
    job.completed_ms = Some(crate::fhir::now_ms());
    if job.deidentify.is_none() {
        job.signatures = vec![label::sign(&job, id, engine.repo().signer(), &engine.repo().node_id().to_string())?];
    }
    replace(engine, id, &job, version, &parts).await?;
    Ok(())
}

/// A run's files and the parts they are made from (by part id).
type Produced = (Vec<FileInfo>, Vec<(String, Part)>);

/// The blocking part of a run: selection, and every file made once to digest it (and spooled
/// for its downloads when there is a spool).
#[allow(clippy::too_many_arguments)] // one job's context, passed through from `run`
fn produce(
    engine: &Engine,
    auth: &Auth,
    caller: &Caller,
    id: &str,
    job: &Job,
    progress: &Progress,
    on_shown: &OnShown,
    spool: Option<&spool::Spool>,
) -> Result<Produced, FhirError> {
    let access = auth.access(caller);
    let guard = match &access {
        Some(a) => {
            let idx = engine.current()?;
            Some(crate::auth::access::guard_for(engine, &idx, a, false)?)
        }
        None => None,
    };
    let deid = Deid::of(job, auth);
    let scope = select::Scope {
        level: &job.level,
        params: &job.params,
        patients: job.patients.as_ref(),
        size: job.size,
        logged: auth.logs_disclosures_of(caller),
    };
    let selected =
        select::select(engine, guard.as_ref(), &scope, progress, &mut |shown, d| on_shown(caller, shown, d))?;
    let mut files = Vec::new();
    let mut parts = Vec::new();
    let mut add = |rtype: &str, kind: Kind, n: usize, part: Part| {
        let name = match kind {
            Kind::Output => format!("{rtype}-{n}.ndjson"),
            Kind::Deleted => format!("deleted-{n}.ndjson"),
            Kind::Error => format!("error-{n}.ndjson"),
        };
        let part_id = format!("{id}-{}", parts.len() + 1);
        files.push(FileInfo {
            name,
            rtype: rtype.to_string(),
            kind,
            count: 0,
            bytes: 0,
            sha256: String::new(),
            part: part_id.clone(),
        });
        parts.push((part_id, part));
    };
    for (rtype, leaves) in &selected.outputs {
        for (n, chunk) in leaves.chunks(LINES_PER_FILE).enumerate() {
            add(rtype, Kind::Output, n + 1, Part { leaves: render::encode_leaves(chunk), lines: Vec::new() });
        }
    }
    for (n, chunk) in selected.deleted.chunks(LINES_PER_FILE).enumerate() {
        add("Bundle", Kind::Deleted, n + 1, Part { leaves: render::encode_leaves(chunk), lines: Vec::new() });
    }
    if !selected.errors.is_empty() {
        add("OperationOutcome", Kind::Error, 1, Part { leaves: String::new(), lines: selected.errors.clone() });
    }
    // Every file is made once to digest it, the files spread over the cores; with a spool,
    // the files are kept for the downloads, and the proof files (none for a de-identified
    // export) made beside them in one pass: the task `None`.
    let items: Vec<(&FileInfo, &Part)> = files.iter().zip(parts.iter().map(|(_, p)| p)).collect();
    let proofs = spool.filter(|_| deid.is_none());
    let tasks: Vec<Option<(&FileInfo, &Part)>> =
        proofs.map(|_| None).into_iter().chain(items.iter().copied().map(Some)).collect();
    let outcomes = crate::parallel::on_every_core(&tasks, |task| {
        let Some((info, part)) = task else {
            let proved: Vec<(&FileInfo, &Part)> =
                items.iter().copied().filter(|(f, _)| f.kind != Kind::Error).collect();
            if let Some(spool) = proofs {
                spool_proofs(engine, job, id, &proved, spool);
            }
            return Ok(None);
        };
        let writer = spool.and_then(|s| writer(s, id, &info.name));
        render::digest(engine, job, info, part, deid.as_ref(), writer).map(Some)
    });
    digested(files, parts, outcomes.into_iter().skip(usize::from(proofs.is_some())))
}

/// A spool writer for a job's file; a file the spool cannot take is made again at its
/// download: never an error.
fn writer(spool: &spool::Spool, id: &str, name: &str) -> Option<spool::SpoolWriter> {
    spool.writer(id, name).map_err(|e| tracing::warn!("spool: {e}")).ok()
}

/// The files with their digests filled in.
fn digested(
    mut files: Vec<FileInfo>,
    parts: Vec<(String, Part)>,
    outcomes: impl Iterator<Item = Option<Result<Option<render::Digest>, FhirError>>>,
) -> Result<Produced, FhirError> {
    for (info, digest) in files.iter_mut().zip(outcomes) {
        let d = digest.ok_or_else(|| FhirError::internal("a thread digesting an export file died"))??;
        let d = d.ok_or_else(|| FhirError::internal("an export file was not digested"))?;
        (info.count, info.bytes, info.sha256) = (d.count, d.bytes, d.sha256);
    }
    Ok((files, parts))
}

/// Spools the proof files of `files` (made together: [`render::write_proofs_together`]). Any
/// failure leaves them unfinished, so their downloads make them again.
fn spool_proofs(engine: &Engine, job: &Job, id: &str, files: &[(&FileInfo, &Part)], spool: &spool::Spool) {
    let writers: Option<Vec<spool::SpoolWriter>> =
        files.iter().map(|(f, _)| writer(spool, id, &render::proofs_name(&f.name))).collect();
    let Some(mut writers) = writers else { return };
    let parts: Vec<&Part> = files.iter().map(|(_, p)| *p).collect();
    let mut sinks: Vec<_> =
        writers.iter_mut().map(|w| move |b: &[u8]| w.write(b).map_err(FhirError::internal)).collect();
    let mut sinks: Vec<&mut render::Sink<'_>> = sinks.iter_mut().map(|s| s as &mut render::Sink<'_>).collect();
    if let Err(e) = render::write_proofs_together(engine, job, &parts, &mut sinks) {
        tracing::warn!("export {id}: proof files not spooled: {:?}", e.issues.first().map(|i| &i.diagnostics));
        return;
    }
    drop(sinks);
    for w in writers {
        if let Err(e) = w.finish() {
            tracing::warn!("spool: {e}");
        }
    }
}

impl Deid {
    /// De-identifies one resource; its dates shift by its patient's offset.
    pub fn deidentify(&self, profiles: &crate::fhir::profiles::Profiles, res: &mut crate::fhir::json::Json) {
        let patient = crate::fhir::deid::patient_of(res).map(str::to_string);
        let keys =
            crate::fhir::deid::Keys { study: &self.key, patient: patient.as_deref(), now_ms: crate::fhir::now_ms() };
        crate::fhir::deid::apply(profiles, &self.rules, &keys, res);
    }
}
