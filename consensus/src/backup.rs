//! Online backup and offline restore of a node's ledger.
//!
//! A backup is a snapshot like the ones followers install (format 1, bodies inline, SHA-256
//! trailer), built the same way while apply goes on (`StateMachine::build_into`), but streamed
//! to the client as it is built and never recorded as the node's snapshot: taking a backup
//! neither compacts the log nor replaces the snapshot followers are sent. Restoring loads it into an
//! empty ledger directory as an install would; the node then starts at the backup's last
//! applied entry and, in a cluster, catches up from the leader (by snapshot when the leader
//! has compacted past it).

use std::io;
use std::path::Path;

use crate::kv::WriteBatch;
use crate::merkle::{Frontier, Hash};
use crate::snapshot::{self, Meta};

/// A backup a running node streamed, and the tree it holds.
#[derive(Clone, Debug)]
pub struct Backup {
    /// Its last applied entry and membership.
    pub meta: Meta,
    /// Leaves in the backed-up tree.
    pub size: u64,
    /// The tree's root hash.
    pub root: Hash,
}

impl crate::Ledger {
    /// A consistent copy of the state at the last applied entry, written onto `out` as it is
    /// built, while the node goes on applying and serving. `point(size, root)` is told the
    /// tree the copy holds as soon as its point is taken. A slow `out` slows the build, not
    /// apply (apply keeps undo for what it changes meanwhile).
    pub async fn backup(&self, out: Box<dyn io::Write + Send>, point: impl FnOnce(u64, Hash)) -> io::Result<Backup> {
        let (meta, frontier, _) = self.sm.build_into(Some(out), |_, f| point(f.size, f.root())).await?;
        Ok(Backup { meta, size: frontier.size, root: frontier.root() })
    }
}

/// What a snapshot file holds, read through once (the trailer checked at the end).
#[derive(Clone, Debug)]
pub struct Summary {
    /// Its last applied entry and membership.
    pub meta: Meta,
    /// Leaves in the tree it holds.
    pub size: u64,
    /// That tree's root hash.
    pub root: Hash,
    /// State records in the file.
    pub records: u64,
}

/// A member a snapshot's membership lists.
#[derive(Clone, Debug)]
pub struct Member {
    /// Its node id.
    pub id: crate::NodeId,
    /// Its addresses and key.
    pub node: crate::Node,
    /// A voter (else a learner).
    pub voter: bool,
}

/// The last applied entry `(term, index)` a snapshot's meta names.
pub fn last_entry(meta: &Meta) -> Option<(u64, u64)> {
    meta.last_log_id.map(|l| (l.leader_id.term, l.index))
}

/// The members a snapshot's meta lists.
pub fn members(meta: &Meta) -> Vec<Member> {
    let membership = meta.last_membership.membership();
    let voters: std::collections::BTreeSet<_> = membership.voter_ids().collect();
    membership.nodes().map(|(id, n)| Member { id: *id, node: n.clone(), voter: voters.contains(id) }).collect()
}

/// Reads the snapshot at `path` through, checking its trailer, and returns its meta and tree.
/// `progress` gets the bytes read so far.
pub fn inspect(path: &Path, progress: &mut dyn FnMut(u64)) -> io::Result<Summary> {
    inspect_from(std::fs::File::open(path)?, progress)
}

/// [`inspect`] over a stream (a download, checked as it arrives).
pub fn inspect_from(input: impl io::Read, progress: &mut dyn FnMut(u64)) -> io::Result<Summary> {
    let (mut reader, meta) = snapshot::Reader::new(input)?;
    let (mut frontier, mut records, mut bytes) = (None, 0u64, 0u64);
    while let Some((k, v)) = reader.next_record()? {
        bytes += (k.len() + v.len() + 8) as u64;
        records += 1;
        if k.as_slice() == crate::state_machine::META_FRONTIER {
            frontier = Some(bincode::deserialize::<Frontier>(&v).map_err(|e| crate::invalid_data(e.to_string()))?);
        }
        if records.is_multiple_of(4096) {
            progress(bytes);
        }
    }
    progress(bytes);
    let frontier = frontier.unwrap_or_default();
    Ok(Summary { meta, size: frontier.size, root: frontier.root(), records })
}

/// Builds the ledger directory `dir` (which must hold no ledger) from the snapshot at `path`:
/// the file is kept as the node's current snapshot and loaded into the state, and the Raft log
/// starts empty (openraft purges it up to the snapshot at the first start). `progress` gets
/// the bytes loaded so far.
pub fn restore(path: &Path, dir: &Path, progress: &mut dyn FnMut(u64)) -> io::Result<Meta> {
    if dir.join("db").exists() || dir.join("conf").exists() || dir.join(crate::log_store::DIR).exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} already holds a ledger; restore into an empty data directory", dir.display()),
        ));
    }
    let meta = snapshot::check(path)?;
    let snap_dir = dir.join("snapshots");
    std::fs::create_dir_all(&snap_dir)?;
    let name = snapshot::file_name(&meta);
    let kept = snap_dir.join(&name);
    let tmp = kept.with_extension("tmp");
    std::fs::copy(path, &tmp)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &kept)?;
    snapshot::sync_dir(&snap_dir)?;
    let db = crate::sled_store::SledDb::open_with_cache(dir, 64 << 20)?;
    let lookup = crate::lsm_store::Tree::open(&dir.join(crate::LOOKUP_DIR), "lookup", 64 << 20)?;
    let kv = crate::split_store::SplitStore::new(db.tree("state")?, std::sync::Arc::new(lookup));
    let mut wb = WriteBatch::default();
    wb.put(crate::state_machine::META_INSTALLING.to_vec(), bincode::serialize(&name).map_err(io::Error::other)?);
    crate::kv::KvStore::apply(&kv, wb)?;
    crate::state_machine::load_snapshot(&kv, &kept, &meta, &name, progress)?;
    // An empty log, so that the offline verifier finds one before the node first starts.
    crate::log_store::open_segments(&dir.join(crate::log_store::DIR)).map_err(io::Error::other)?;
    Ok(meta)
}
