//! Online backups (`/admin/backups`), what `fhir-ledger backup` drives and the operator console
//! lists. A backup is a snapshot of the ledger at its last applied entry, built while the node
//! serves (`consensus::Ledger::backup`) and streamed in the response as it is built, with a tree
//! head signed (and, in a cluster, cosigned) at exactly the backup's tree size in the
//! `X-Backup-Head` header: `restore` checks the file against that head, and a consistency proof
//! from it ties the restored node to every later head. Nothing is written to the node's disk.
//! The list is the process's own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::{json, Administrator};
use crate::api::AppState;
use crate::error::FhirError;

/// The response header carrying the backup's signed tree head (base64url of its JSON).
pub const HEAD_HEADER: &str = "X-Backup-Head";
/// The response header naming the backup (`GET /admin/backups/{id}` reports how it ended).
pub const ID_HEADER: &str = "X-Backup-Id";

/// The backups this process took, newest last.
#[derive(Debug, Default)]
pub struct Backups {
    list: Mutex<Vec<Record>>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being built and sent.
    Running,
    /// Sent whole.
    Complete,
    /// Ended early (the client left, or the build failed): `error` says why.
    Failed,
}

/// One backup, as `GET /admin/backups` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub id: String,
    pub status: Status,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// Bytes sent so far (the whole file once complete).
    pub bytes: u64,
    /// Leaves in the backed-up tree, its root (hex) and the last Raft entry it holds.
    pub tree_size: u64,
    pub root: String,
    pub last_log_index: u64,
    /// The signed tree head at `tree_size` (the Parameters `GET /ledger/head` serves).
    pub head: Option<serde_json::Value>,
    pub error: Option<String>,
}

impl Backups {
    fn update(&self, id: &str, f: impl FnOnce(&mut Record)) {
        let mut list = self.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = list.iter_mut().find(|r| r.id == id) {
            f(r);
        }
    }

    fn get(&self, id: &str) -> Option<Record> {
        self.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().find(|r| r.id == id).cloned()
    }

    /// Every backup this process took, newest last.
    pub fn all(&self) -> Vec<Record> {
        self.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// The build's output: each buffered chunk handed to the response, waiting while the client
/// is behind (so a slow client slows the build, never apply).
struct ToResponse {
    tx: tokio::sync::mpsc::Sender<Result<web::Bytes, std::io::Error>>,
    sent: Arc<AtomicU64>,
}

impl std::io::Write for ToResponse {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(web::Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))?;
        self.sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `POST /admin/backups`: takes a backup and streams it as it is built (200, chunked), once
/// its point is taken and the head at that point signed (`X-Backup-Head`).
pub async fn create(_: Administrator, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let record = Record {
        id: id.clone(),
        status: Status::Running,
        started_ms: crate::fhir::now_ms(),
        finished_ms: None,
        bytes: 0,
        tree_size: 0,
        root: String::new(),
        last_log_index: 0,
        head: None,
        error: None,
    };
    let backups = state.admin.backups.clone();
    backups.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(record);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let sent = Arc::new(AtomicU64::new(0));
    let out = ToResponse { tx: tx.clone(), sent: sent.clone() };
    let (point_tx, point_rx) = tokio::sync::oneshot::channel();
    let ledger = state.repo.ledger().clone();
    let (job, job_backups) = (id.clone(), backups.clone());
    actix_web::rt::spawn(async move {
        let built = ledger
            .backup(Box::new(out), |size, root| {
                let _ = point_tx.send((size, root));
            })
            .await;
        if let Err(e) = &built {
            tracing::warn!("backup {job} failed: {e}");
            // Ends the response with an error, so the client cannot take it for whole.
            let _ = tx.send(Err(std::io::Error::other("the backup failed"))).await;
        }
        job_backups.update(&job, |r| {
            r.finished_ms = Some(crate::fhir::now_ms());
            r.bytes = sent.load(Ordering::Relaxed);
            match built {
                Ok(b) => {
                    r.status = Status::Complete;
                    r.last_log_index = consensus::backup::last_entry(&b.meta).map_or(0, |(_, index)| index);
                }
                Err(e) => {
                    r.status = Status::Failed;
                    r.error = Some(e.to_string());
                }
            }
        });
    });
    let Ok((size, root)) = point_rx.await else {
        let why = backups.get(&id).and_then(|r| r.error).unwrap_or_default();
        return Err(FhirError::unavailable(format!("the backup could not start: {why}")));
    };
    let head =
        crate::api::ledger::parameters(crate::api::ledger::signed_head_at(&state.repo, size, root).await.to_parts());
    let head_header = crate::codec::b64url(head.to_compact().as_bytes());
    backups.update(&id, |r| {
        r.tree_size = size;
        r.root = hex::encode(root);
        r.head = Some(head.to_serde());
    });
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .insert_header((ID_HEADER, id))
        .insert_header((HEAD_HEADER, head_header))
        .streaming(body))
}

/// `GET /admin/backups/{id}`
pub async fn one(
    _: Administrator,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, FhirError> {
    let record = state.admin.backups.get(&id).ok_or_else(|| FhirError::not_found(&format!("backup {id}")))?;
    Ok(json(&record))
}

/// `GET /admin/backups`
pub async fn list(_: Administrator, state: web::Data<AppState>) -> HttpResponse {
    json(&state.admin.backups.all())
}
