//! The search index's background work (folding leaves, the LSM tree's flushes and compactions)
//! runs at a lower CPU priority than requests.
//!
//! Why: on a small machine that work competed with Raft, apply and the HTTP workers for the
//! same cores right after a load, and set their tail latency (reads at 2,000/s: p99 10 ms with
//! it at normal priority, 3.6 ms lowered; BENCHMARKS.md). Nothing a client waits for depends
//! on it: a search folds what the background has not yet folded itself, on its own request
//! thread at normal priority, so a lower priority delays no answer, it only moves the work.
//! The niceness is only a weight: under load the background still gets its share and
//! catches up when the load ends.

/// The niceness of background threads: about a tenth of a normal thread's weight under
/// contention (Linux's CFS weights, 1024 at 0 and 110 at 10).
const NICE: i32 = 10;

/// Lowers the calling thread's priority.
pub fn lower_this_thread() {
    renice(rustix::thread::gettid());
}

/// Lowers the priority of every thread of this process named `name` (threads a library
/// started, such as fjall's workers, which offer no hook of their own).
pub fn lower_threads_named(name: &str) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            if let Some(tid) =
                task.file_name().to_str().and_then(|t| t.parse().ok()).and_then(rustix::process::Pid::from_raw)
            {
                renice(tid);
            }
        }
    }
}

/// On Linux, setpriority(2) given a thread id sets that one thread's niceness.
fn renice(tid: rustix::process::Pid) {
    if let Err(e) = rustix::process::setpriority_process(Some(tid), NICE) {
        tracing::debug!("search index: could not lower thread {}'s priority: {e}", tid.as_raw_nonzero());
    }
}
