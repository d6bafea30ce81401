//! Linearizability checker for a per-key read/write register: Wing & Gong / Lowe's search with
//! Porcupine-style memoization. Std only, so that chaos tests can judge recorded histories without
//! pulling in dependencies. Each key is an independent register (linearizability is compositional).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

/// One client operation on one key, as the test recorded it.
#[derive(Clone, Debug)]
pub struct Op {
    pub client: usize,
    pub key: String,
    pub kind: Kind,
    /// Invocation time, nanoseconds since the start of the run.
    pub call: u64,
    /// Response time; None when the outcome is unknown (timeout, connection killed mid-request).
    pub ret: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Write `value`. If `ret` is None the write may or may not have taken effect, at any time after `call`.
    Write(u64),
    /// A read that observed `Some(v)` or `None` (key absent). A read with unknown outcome tells us
    /// nothing, so callers should leave it out; `check` ignores Read ops whose `ret` is None.
    Read(Option<u64>),
}

/// A key whose sub-history has no linearization.
#[derive(Debug)]
pub struct Violation {
    pub key: String,
    /// Human-readable: the longest linearizable prefix found, then the ops of the key that are not in
    /// it, sorted by call time (long lists are truncated).
    pub explanation: String,
}

/// Checks every key's sub-history independently (a register per key, initially absent = None).
/// Returns all violations, ordered by key (empty = linearizable).
pub fn check(history: &[Op]) -> Vec<Violation> {
    // BTreeMap: deterministic report order.
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history.iter().filter(|op| op.ret.is_some() || matches!(op.kind, Kind::Write(_))) {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    by_key
        .into_iter()
        .filter_map(|(key, ops)| check_key(&ops).err().map(|explanation| Violation { key: key.into(), explanation }))
        .collect()
}

/// Sentinel list head; `NIL` ends the list.
const HEAD: usize = 0;
const NIL: usize = usize::MAX;
/// Lines per listing in an explanation, so a 2,000-op failure stays readable.
const MAX_LINES: usize = 40;

/// The register model: `Some(new_state)` if `kind` may take effect in `state`.
fn step(state: Option<u64>, kind: &Kind) -> Option<Option<u64>> {
    match kind {
        Kind::Write(v) => Some(Some(*v)),
        Kind::Read(seen) => (*seen == state).then_some(state),
    }
}

/// Doubly linked list of call/return events (dancing links), so that lifting an op out and putting it
/// back on backtrack are O(1). Node 0 is the head sentinel.
struct Events {
    op: Vec<usize>,
    is_call: Vec<bool>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Return node of each op; None for unknown-outcome writes, which may stay unlinearized forever
    /// (no return event means the walk never forces them).
    ret_node: Vec<Option<usize>>,
}

impl Events {
    fn new(ops: &[&Op], rets: &[Option<u64>]) -> Self {
        // (time, 0 = call / 1 = return, op): at equal timestamps calls come first, so an op invoked at
        // the instant another returns counts as concurrent with it (the permissive, safe choice).
        let mut ev: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, op) in ops.iter().enumerate() {
            ev.push((op.call, 0, i));
            if let Some(ret) = rets[i] {
                ev.push((ret.max(op.call), 1, i)); // clamp clock skew: a return never precedes its call
            }
        }
        ev.sort_unstable();
        let m = ev.len();
        let mut e = Events {
            op: vec![usize::MAX; m + 1],
            is_call: vec![false; m + 1],
            next: (1..=m + 1).collect(),
            prev: (0..=m).map(|i| i.wrapping_sub(1)).collect(),
            ret_node: vec![None; ops.len()],
        };
        e.next[m] = NIL;
        for (j, &(_, kind, i)) in ev.iter().enumerate() {
            e.op[j + 1] = i;
            e.is_call[j + 1] = kind == 0;
            if kind == 1 {
                e.ret_node[i] = Some(j + 1);
            }
        }
        e
    }

    fn unlink(&mut self, n: usize) {
        self.next[self.prev[n]] = self.next[n];
        if self.next[n] != NIL {
            self.prev[self.next[n]] = self.prev[n];
        }
    }

    fn relink(&mut self, n: usize) {
        self.next[self.prev[n]] = n;
        if self.next[n] != NIL {
            self.prev[self.next[n]] = n;
        }
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        if let Some(r) = self.ret_node[self.op[call]] {
            self.unlink(r);
        }
    }

    /// Exact reverse of `lift` (must be called in LIFO order).
    fn unlift(&mut self, call: usize) {
        if let Some(r) = self.ret_node[self.op[call]] {
            self.relink(r);
        }
        self.relink(call);
    }
}

/// Effective return times. Unknown-outcome writes are what make the search blow up (each can be placed
/// anywhere later, or nowhere), so narrow them down without changing the verdict: one whose value no read
/// saw is irrelevant and dropped; the sole writer of a value that was read must precede that read's return.
fn prepare<'a>(ops: &[&'a Op]) -> (Vec<&'a Op>, Vec<Option<u64>>) {
    let (mut writers, mut seen_by) = (HashMap::<u64, usize>::new(), HashMap::<u64, u64>::new());
    for op in ops {
        match (&op.kind, op.ret) {
            (Kind::Write(v), _) => *writers.entry(*v).or_default() += 1,
            (Kind::Read(Some(v)), Some(ret)) => {
                let t = seen_by.entry(*v).or_insert(ret);
                *t = ret.min(*t);
            }
            _ => {}
        }
    }
    ops.iter()
        .filter_map(|&op| match (&op.kind, op.ret) {
            (Kind::Write(v), None) => match seen_by.get(v) {
                None => None,
                Some(&t) if writers.get(v) == Some(&1) => Some((op, Some(t))),
                Some(_) => Some((op, None)),
            },
            _ => Some((op, op.ret)),
        })
        .unzip()
}

/// WGL search over one key's ops. Explicit stack instead of recursion: histories have thousands of ops.
fn check_key(ops: &[&Op]) -> Result<(), String> {
    let (ops, rets) = prepare(ops);
    let mut ev = Events::new(&ops, &rets);
    let mut bits = vec![0u64; ops.len().div_ceil(64)];
    // (linearized set, register state) pairs already explored: the memoization that makes WGL practical.
    let mut cache: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new(); // (call node, state before it)
    let mut state = None;
    let mut remaining = rets.iter().filter(|r| r.is_some()).count();
    let (mut best, mut best_state) = (Vec::new(), None);
    let mut cur = ev.next[HEAD];
    loop {
        // Done once every op with a known outcome is placed; unknown writes may be left out.
        if remaining == 0 {
            return Ok(());
        }
        if cur != NIL && ev.is_call[cur] {
            let i = ev.op[cur];
            if let Some(new_state) = step(state, &ops[i].kind) {
                bits[i / 64] |= 1 << (i % 64);
                if cache.insert((bits.clone(), new_state)) {
                    stack.push((cur, state));
                    state = new_state;
                    ev.lift(cur);
                    remaining -= usize::from(rets[i].is_some());
                    if stack.len() > best.len() {
                        best = stack.iter().map(|&(n, _)| ev.op[n]).collect();
                        best_state = state;
                    }
                    cur = ev.next[HEAD];
                    continue;
                }
                bits[i / 64] &= !(1 << (i % 64));
            }
            cur = ev.next[cur];
        } else {
            // Reached the return of an op not yet linearized (or the end): undo the last choice.
            let Some((n, prev_state)) = stack.pop() else {
                return Err(explain(&ops, &best, best_state));
            };
            let i = ev.op[n];
            state = prev_state;
            bits[i / 64] &= !(1 << (i % 64));
            ev.unlift(n);
            remaining += usize::from(rets[i].is_some());
            cur = ev.next[n];
        }
    }
}

fn fmt_op(out: &mut String, i: usize, op: &Op) {
    let ret = op.ret.map_or_else(|| "?".to_string(), |r| r.to_string());
    let _ = writeln!(out, "  #{i} client {} {:?} call={} ret={ret}", op.client, op.kind, op.call);
}

fn explain(ops: &[&Op], best: &[usize], best_state: Option<u64>) -> String {
    let mut out = format!(
        "{} ops are not linearizable. Longest linearizable prefix found: {} ops, leaving the register at {:?}",
        ops.len(),
        best.len(),
        best_state
    );
    let skip = best.len().saturating_sub(MAX_LINES);
    out += &if skip > 0 { format!(" (last {MAX_LINES} shown):\n") } else { ":\n".to_string() };
    for &i in &best[skip..] {
        fmt_op(&mut out, i, ops[i]);
    }
    let mut placed = vec![false; ops.len()];
    best.iter().for_each(|&i| placed[i] = true);
    let mut rest: Vec<usize> = (0..ops.len()).filter(|&i| !placed[i]).collect();
    rest.sort_by_key(|&i| (ops[i].call, i));
    let _ = writeln!(out, "Ops not in that prefix, by call time (unknown-outcome writes may legitimately stay out):");
    for &i in rest.iter().take(MAX_LINES) {
        fmt_op(&mut out, i, ops[i]);
    }
    if rest.len() > MAX_LINES {
        let _ = writeln!(out, "  ... and {} more", rest.len() - MAX_LINES);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Instant;

    fn w(client: usize, key: &str, v: u64, call: u64, ret: Option<u64>) -> Op {
        Op { client, key: key.into(), kind: Kind::Write(v), call, ret }
    }

    fn r(client: usize, key: &str, v: Option<u64>, call: u64, ret: u64) -> Op {
        Op { client, key: key.into(), kind: Kind::Read(v), call, ret: Some(ret) }
    }

    fn ok(h: &[Op]) -> bool {
        check(h).is_empty()
    }

    #[test]
    fn sequential_write_then_read() {
        assert!(ok(&[r(0, "k", None, 0, 5), w(0, "k", 1, 10, Some(20)), r(1, "k", Some(1), 30, 40)]));
        assert!(ok(&[]));
    }

    #[test]
    fn stale_read_after_acknowledged_write() {
        let h = [w(0, "k", 1, 0, Some(10)), w(1, "k", 2, 20, Some(30)), r(2, "k", Some(1), 40, 50)];
        let v = check(&h);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].key, "k");
        assert!(v[0].explanation.contains("Read(Some(1))"), "{}", v[0].explanation);
    }

    #[test]
    fn concurrent_write_and_read_may_see_either_value() {
        for seen in [Some(1), Some(2)] {
            assert!(ok(&[w(0, "k", 1, 0, Some(10)), w(1, "k", 2, 20, Some(40)), r(2, "k", seen, 25, 35)]));
        }
        assert!(ok(&[w(0, "k", 1, 0, Some(10)), r(1, "k", None, 5, 15)]));
        // Call at the very instant of another op's return counts as concurrent.
        assert!(ok(&[w(0, "k", 1, 0, Some(10)), r(1, "k", None, 10, 20)]));
        assert!(!ok(&[w(0, "k", 1, 0, Some(10)), r(1, "k", None, 11, 20)]));
    }

    #[test]
    fn lost_acknowledged_write() {
        let h = [
            w(0, "k", 1, 0, Some(10)),
            w(1, "k", 2, 5, Some(30)),
            r(2, "k", Some(2), 12, 20),
            r(3, "k", Some(1), 40, 50), // 2 was acknowledged and already observed; 1 cannot come back
        ];
        assert!(!ok(&h));
        assert!(ok(&h[..3]));
    }

    #[test]
    fn unknown_outcome_write() {
        let base = [w(0, "k", 1, 0, Some(10)), w(1, "k", 2, 20, None)];
        let with = |extra: &[Op]| [&base[..], extra].concat();
        assert!(ok(&with(&[r(2, "k", Some(1), 30, 40)])), "not observed (yet)");
        assert!(ok(&with(&[r(2, "k", Some(2), 30, 40)])), "observed");
        assert!(ok(&with(&[r(2, "k", Some(1), 30, 40), w(3, "k", 3, 50, Some(60)), r(2, "k", Some(2), 100, 110)])));
        assert!(!ok(&with(&[r(2, "k", Some(2), 30, 40), r(2, "k", Some(1), 50, 60)])), "no going back");
        assert!(!ok(&with(&[r(2, "k", Some(7), 30, 40)])), "never written");
        assert!(!ok(&with(&[r(2, "k", Some(2), 5, 15)])), "observed before its call");
    }

    #[test]
    fn read_none_after_completed_write() {
        assert!(!ok(&[w(0, "k", 1, 0, Some(10)), r(1, "k", None, 20, 30)]));
    }

    #[test]
    fn unknown_reads_are_ignored() {
        let h = [
            w(0, "k", 1, 0, Some(10)),
            Op { client: 1, key: "k".into(), kind: Kind::Read(Some(9)), call: 20, ret: None },
        ];
        assert!(ok(&h));
    }

    #[test]
    fn keys_are_independent() {
        let h = [
            w(0, "a", 1, 0, Some(10)),
            w(1, "b", 2, 0, Some(10)),
            r(2, "a", Some(1), 20, 30),
            r(3, "b", Some(1), 20, 30), // 1 was written to a, not b
            r(4, "b", Some(2), 40, 50),
        ];
        let v = check(&h);
        assert_eq!(v.iter().map(|v| v.key.as_str()).collect::<Vec<_>>(), ["b"]);
    }

    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A history of an atomic register: every op takes effect at a random instant inside its interval
    /// (unknown writes: at some point after the call, or never), so it is linearizable by construction.
    fn simulate(seed: u64, clients: usize, per_client: usize, keys: &[&str]) -> Vec<Op> {
        let mut rng = XorShift(seed | 1);
        let (mut ops, mut at) = (Vec::new(), Vec::new());
        for client in 0..clients {
            let mut t = rng.below(20);
            for _ in 0..per_client {
                let call = t + rng.below(10);
                let dur = 1 + rng.below(40);
                let key = keys[rng.below(keys.len() as u64) as usize];
                let lin = call + rng.below(dur + 1);
                let (op, lin) = match rng.below(20) {
                    0 => (w(client, key, ops.len() as u64, call, None), Some(call + rng.below(300))),
                    1 => (w(client, key, ops.len() as u64, call, None), None),
                    2 => (Op { ret: None, ..r(client, key, Some(u64::MAX), call, 0) }, None), // ignored
                    3..=8 => (w(client, key, ops.len() as u64, call, Some(call + dur)), Some(lin)),
                    _ => (r(client, key, None, call, call + dur), Some(lin)),
                };
                ops.push(op);
                at.push(lin);
                t = call + dur + 1;
            }
        }
        let mut order: Vec<usize> = (0..ops.len()).filter(|&i| at[i].is_some()).collect();
        order.sort_by_key(|&i| (at[i], i));
        let mut reg: HashMap<String, u64> = HashMap::new();
        for i in order {
            let Op { key, kind, .. } = &mut ops[i];
            match kind {
                Kind::Write(v) => {
                    reg.insert(key.clone(), *v);
                }
                Kind::Read(seen) => *seen = reg.get(key).copied(),
            }
        }
        ops
    }

    #[test]
    fn randomized_linearizable_and_corrupted() {
        for seed in 1..=30 {
            let mut h = simulate(seed * 0x9E37_79B9, 6, 60, &["x", "y", "z"]);
            let v = check(&h);
            assert!(v.is_empty(), "seed {seed}: {v:?}");
            let (n, i) = (h.len(), h.len() / 2);
            let i = (i..n).chain(0..i).find(|&i| h[i].ret.is_some() && matches!(h[i].kind, Kind::Read(_))).unwrap();
            h[i].kind = Kind::Read(Some(1 << 40)); // a value no one ever wrote
            let v = check(&h);
            assert_eq!(v.len(), 1, "seed {seed}");
            assert_eq!(v[0].key, h[i].key);
        }
    }

    #[test]
    fn performance_16_clients_150_ops_one_key() {
        let h = simulate(42, 16, 150, &["k"]);
        let start = Instant::now();
        assert!(check(&h).is_empty());
        let elapsed = start.elapsed();
        assert!(elapsed.as_secs_f64() < 2.0, "took {elapsed:?}");
    }
}
