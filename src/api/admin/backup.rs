//! Online backups (`/admin/backups`), what `fhir-ledger backup` drives and the operator console
//! lists. A backup is a snapshot file of the ledger at its last applied entry, built while the
//! node serves (`consensus::Ledger::backup`), with a tree head signed (and, in a cluster,
//! cosigned) at exactly the backup's tree size: `restore` checks the file against that head,
//! and a consistency proof from it ties the restored node to every later head.
//!
//! Files stay in `<ledger>/local/backups/` until the client deletes them (the CLI does once it
//! saved and checked its copy) or the node restarts; the list is the process's own.

use std::sync::Mutex;

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::{json, Administrator};
use crate::api::AppState;
use crate::error::FhirError;

/// The backups this process took, newest last.
#[derive(Debug, Default)]
pub struct Backups {
    list: Mutex<Vec<Record>>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Ready,
    Failed,
    Deleted,
}

/// One backup, as `GET /admin/backups` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub id: String,
    pub status: Status,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// The snapshot file's size.
    pub bytes: u64,
    /// Leaves in the backed-up tree, its root (hex) and the last Raft entry it holds.
    pub tree_size: u64,
    pub root: String,
    pub last_log_index: u64,
    /// The signed tree head at `tree_size` (the Parameters `GET /ledger/head` serves).
    pub head: Option<serde_json::Value>,
    /// Where to download the file.
    pub snapshot: String,
    pub error: Option<String>,
    #[serde(skip)]
    file: Option<std::path::PathBuf>,
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

fn dir(state: &AppState) -> std::path::PathBuf {
    state.repo.ledger().local_dir("backups")
}

/// Removes what a previous process left (its list is gone with it).
pub fn clear_leftovers(ledger: &consensus::Ledger) {
    let _ = std::fs::remove_dir_all(ledger.local_dir("backups"));
}

/// `POST /admin/backups`: starts a backup and answers (202) once its point is taken, with the
/// head signed at that point; the file grows while `GET …/snapshot` streams it.
pub async fn create(_: Administrator, state: web::Data<AppState>) -> Result<HttpResponse, FhirError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = dir(&state).join(&id);
    std::fs::create_dir_all(&dir).map_err(FhirError::internal)?;
    let file = dir.join("ledger.snapshot");
    // There from the start, so that a download may open it before the build writes to it.
    std::fs::File::create(&file).map_err(FhirError::internal)?;
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
        snapshot: format!("/admin/backups/{id}/snapshot"),
        error: None,
        file: Some(file.clone()),
    };
    let backups = state.admin.backups.clone();
    backups.list.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(record);
    let (point_tx, point_rx) = tokio::sync::oneshot::channel();
    let ledger = state.repo.ledger().clone();
    let (job, job_backups) = (id.clone(), backups.clone());
    actix_web::rt::spawn(async move {
        let built = ledger
            .backup(&file, |size, root| {
                let _ = point_tx.send((size, root));
            })
            .await;
        job_backups.update(&job, |r| {
            r.finished_ms = Some(crate::fhir::now_ms());
            match built {
                Ok(b) => {
                    r.status = Status::Ready;
                    r.bytes = std::fs::metadata(&b.path).map_or(0, |m| m.len());
                    r.last_log_index = consensus::backup::describe(&b.meta).0.map_or(0, |(_, index)| index);
                }
                Err(e) => {
                    tracing::warn!("backup {job} failed: {e}");
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
    let head = crate::api::ledger::signed_head_at(&state.repo, size, root).await;
    backups.update(&id, |r| {
        r.tree_size = size;
        r.root = hex::encode(root);
        r.head = Some(crate::api::ledger::parameters(head.to_parts()).to_serde());
    });
    Ok(HttpResponse::Accepted()
        .content_type("application/json")
        .body(serde_json::to_string_pretty(&backups.get(&id)).unwrap_or_default()))
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

/// `GET /admin/backups/{id}/snapshot`: the file, streamed as the node writes it (chunked; the
/// stream ends once the backup is complete and wholly sent, or fails).
pub async fn download(
    _: Administrator,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, FhirError> {
    let backups = state.admin.backups.clone();
    let record = backups.get(&id).ok_or_else(|| FhirError::not_found(&format!("backup {id}")))?;
    let Some(path) = record.file.filter(|_| record.status != Status::Failed) else {
        return Err(FhirError::not_found(&format!("backup {id} (it is {:?})", record.status)));
    };
    let file = tokio::fs::File::open(&path).await.map_err(FhirError::internal)?;
    let tail = Tail { file, sent: 0, id: id.into_inner(), backups };
    let body = futures::stream::unfold(Some(tail), |tail| async move {
        let mut tail = tail?;
        match tail.next().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(tail))),
            Ok(None) => None,
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(HttpResponse::Ok().content_type("application/octet-stream").streaming(body))
}

/// A backup file read as it grows.
struct Tail {
    file: tokio::fs::File,
    sent: u64,
    id: String,
    backups: std::sync::Arc<Backups>,
}

impl Tail {
    async fn next(&mut self) -> std::io::Result<Option<web::Bytes>> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = self.file.read(&mut buf).await?;
            if n > 0 {
                buf.truncate(n);
                self.sent += n as u64;
                return Ok(Some(web::Bytes::from(buf)));
            }
            // At the end of what is written: done, failed, or wait for more.
            let record = self.backups.get(&self.id).ok_or_else(|| std::io::Error::other("the backup was removed"))?;
            match record.status {
                Status::Ready if self.sent >= record.bytes => return Ok(None),
                Status::Ready => {}
                Status::Running => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
                Status::Failed | Status::Deleted => return Err(std::io::Error::other("the backup failed")),
            }
        }
    }
}

/// `DELETE /admin/backups/{id}`: removes the node's copy.
pub async fn delete(
    _: Administrator,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, FhirError> {
    let record = state.admin.backups.get(&id).ok_or_else(|| FhirError::not_found(&format!("backup {id}")))?;
    if record.status == Status::Running {
        return Err(FhirError::new(crate::error::ErrorCode::Conflict, format!("backup {id} is still being written")));
    }
    if let Some(dir) = record.file.as_ref().and_then(|f| f.parent()) {
        let _ = std::fs::remove_dir_all(dir);
    }
    state.admin.backups.update(&id, |r| {
        r.status = Status::Deleted;
        r.file = None;
    });
    Ok(HttpResponse::NoContent().finish())
}
