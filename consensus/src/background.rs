//! Background work runs at a lower CPU priority than requests: the search index's folding
//! (`fhir-ledger`'s `search::index`) and snapshot builds, Raft's and backups'.
//!
//! Why, for the fold: on a small machine it competed with Raft, apply and the HTTP workers for the same
//! cores right after a load, and set their tail latency (reads at 2,000/s after a load: p99
//! 10 ms at normal priority, 4.4-4.6 ms lowered; BENCHMARKS.md). Nothing a client waits for
//! depends on it: a search folds what the background has not folded yet itself, on its own
//! request thread at normal priority, so a lower priority delays no answer, it only moves the
//! work. The niceness is a weight, not a ban: under load the thread still gets its share and
//! catches up when the load ends.
//!
//! For a snapshot build: it scans the whole state (reading, decoding and hashing every record
//! and body) beside apply, which every write waits for; at normal priority, 64 writers saw
//! apply's batches take up to 250 ms while a build ran (`tests/bench/snapshot.sh`). Nothing
//! but the snapshot's own caller waits for a build.
//!
//! fjall's flush and compaction worker keeps the normal priority: lowered, it fell behind
//! under load and the tables waiting for it held memory (RSS after a 225,000-resource load
//! 1,231 MB against 662 MB).

/// A background thread's niceness: about a tenth of a normal thread's weight under
/// contention (Linux's CFS weights, 1024 at 0 and 110 at 10).
const NICE: i32 = 10;

/// Lowers the calling thread's priority (on Linux, setpriority(2) given a thread id sets that
/// one thread's niceness).
pub fn lower_this_thread() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), NICE) {
        tracing::debug!("could not lower background thread {}'s priority: {e}", tid.as_raw_nonzero());
    }
}
