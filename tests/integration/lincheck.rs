//! Linearizability checker for per-key read/write registers: Wing & Gong / Lowe's search (WGL) with
//! Porcupine-style memoization of (linearized set, register state). Std only, so tests can judge recorded
//! histories without extra dependencies. Keys are independent registers (linearizability is compositional).
//!
//! Plain WGL blows up with 16 concurrent clients, so the search adds register-specific reductions, each of
//! which keeps the verdict exact (a brute-force test below cross-checks them):
//! - a read of the current value is taken eagerly and never backtracked over: reads leave the state alone,
//!   so if any linearization exists, one exists with that read first;
//! - a write is refused if it overwrites a value that a pending read still needs and no remaining write
//!   can bring back;
//! - writes that no pending read wants ("blind") are absorbed just before the next chosen write, where
//!   they are invisible, and only one blind write is tried as a choice (they all lead to equivalent states).
//!
//! With unique write values (e.g. `client << 32 | seq`) the search is close to linear. Repeated values are
//! checked correctly but can take exponential time: the general problem is NP-complete.

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
    /// Free text shown with the op in a violation (e.g. which node served it, at which term and
    /// read index); the check ignores it.
    pub note: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Write `value`. If `ret` is None the write may or may not have taken effect, at any time after `call`.
    Write(u64),
    /// A read that observed `Some(v)` or `None` (key absent). A read with unknown outcome says nothing, so
    /// callers should leave it out; `check` ignores Read ops whose `ret` is None.
    Read(Option<u64>),
}

/// A key whose sub-history has no linearization.
#[derive(Debug)]
pub struct Violation {
    pub key: String,
    /// Human-readable: the longest linearizable prefix found and the ops of the key left out of it, sorted
    /// by call time (long lists truncated); or the reads of values never written to the key.
    pub explanation: String,
}

/// Checks every key's sub-history independently (a register per key, initially absent = None).
/// Returns all violations, ordered by key (empty = linearizable).
#[must_use]
pub fn check(history: &[Op]) -> Vec<Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in history.iter().filter(|op| op.ret.is_some() || matches!(op.kind, Kind::Write(_))) {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let check_one = |(key, ops): (&str, Vec<&Op>)| Some(Violation { key: key.into(), explanation: check_key(&ops)? });
    by_key.into_iter().filter_map(check_one).collect()
}

const NIL: usize = usize::MAX;
/// Lines per listing in an explanation, so that a failure among 2,000 ops stays readable.
const MAX_LINES: usize = 40;

/// Checks one key; Some(explanation) if it is not linearizable.
fn check_key(ops: &[&Op]) -> Option<String> {
    let (ops, rets) = prepare(ops);
    let written: HashSet<u64> =
        ops.iter().filter_map(|op| if let Kind::Write(v) = op.kind { Some(v) } else { None }).collect();
    let phantom: Vec<&Op> =
        ops.iter().copied().filter(|op| matches!(op.kind, Kind::Read(Some(v)) if !written.contains(&v))).collect();
    if !phantom.is_empty() {
        let mut out = "reads of values never written to this key:\n".to_string();
        phantom.iter().take(MAX_LINES).for_each(|op| fmt_op(&mut out, op));
        return Some(out);
    }
    let mut s = Search::new(ops, &rets);
    if s.run().is_some() {
        return None;
    }
    let mut out = format!(
        "{} ops are not linearizable. Longest linearizable prefix found: {} ops, leaving the register at {:?}{}:\n",
        s.ops.len(),
        s.best.0.len(),
        s.values[s.best.1],
        if s.best.0.len() > MAX_LINES { format!(" (last {MAX_LINES} shown)") } else { String::new() }
    );
    s.best.0.iter().skip(s.best.0.len().saturating_sub(MAX_LINES)).for_each(|&i| fmt_op(&mut out, s.ops[i]));
    let placed: HashSet<&usize> = s.best.0.iter().collect();
    let mut rest: Vec<&Op> = (0..s.ops.len()).filter(|i| !placed.contains(i)).map(|i| s.ops[i]).collect();
    rest.sort_by_key(|op| op.call);
    out += "Ops left out of that prefix, by call time (unknown-outcome writes may legitimately stay out):\n";
    rest.iter().take(MAX_LINES).for_each(|op| fmt_op(&mut out, op));
    if rest.len() > MAX_LINES {
        let _ = writeln!(out, "  ... and {} more", rest.len() - MAX_LINES);
    }
    Some(out)
}

fn fmt_op(out: &mut String, op: &Op) {
    let ret = op.ret.map_or_else(|| "?".to_string(), |r| r.to_string());
    let _ = write!(out, "  client {} {:?} call={} ret={ret}", op.client, op.kind, op.call);
    let _ = writeln!(out, "{}{}", if op.note.is_empty() { "" } else { " " }, op.note);
}

/// Effective return times. Unknown-outcome writes multiply the search (each may land anywhere later, or
/// nowhere), so pin them down without changing the verdict: one whose value no read saw cannot matter and
/// is dropped; the sole writer of a value that was read must take effect before that read returned.
fn prepare<'a>(ops: &[&'a Op]) -> (Vec<&'a Op>, Vec<Option<u64>>) {
    let (mut writers, mut first_seen) = (HashMap::<u64, usize>::new(), HashMap::<u64, u64>::new());
    for op in ops {
        match (&op.kind, op.ret) {
            (Kind::Write(v), _) => *writers.entry(*v).or_default() += 1,
            (Kind::Read(Some(v)), Some(ret)) => {
                let t = first_seen.entry(*v).or_insert(ret);
                *t = ret.min(*t);
            }
            _ => {}
        }
    }
    let effective = |&op: &&'a Op| match (&op.kind, op.ret) {
        (Kind::Write(v), None) => match first_seen.get(v) {
            None => None,
            Some(&t) if writers.get(v) == Some(&1) => Some((op, Some(t))),
            Some(_) => Some((op, None)),
        },
        _ => Some((op, op.ret)),
    };
    ops.iter().filter_map(effective).unzip()
}

/// How an op got onto the search stack, which decides what backtracking does with it.
#[derive(Clone, Copy)]
enum Move {
    /// An eager read of the current value: nothing to try instead.
    Read,
    /// A blind write slipped in just before the chosen write it belongs to.
    Absorbed,
    /// A genuine choice of the next write; `blind_tried`: a blind write was already tried at this point.
    Chosen { blind_tried: bool },
}

/// WGL state for one key. The call/return events, sorted by time, form a doubly linked list with a head
/// sentinel at node 0, so lifting an op out and putting it back on backtrack are O(1) (dancing links).
/// Values are interned: the register state is a small index, 0 = absent.
struct Search<'a> {
    ops: Vec<&'a Op>,
    val: Vec<usize>,
    values: Vec<Option<u64>>,
    node_op: Vec<usize>,
    is_call: Vec<bool>,
    next: Vec<usize>,
    prev: Vec<usize>,
    /// None for unknown-outcome writes: with no return event, nothing ever forces them in (and they need
    /// not be linearized at all).
    ret_node: Vec<Option<usize>>,
    bits: Vec<u64>,
    state: usize,
    reads_left: Vec<usize>,
    writes_left: Vec<usize>,
    /// Ops with a known outcome not yet linearized; the search succeeds when this reaches 0.
    remaining: usize,
    stack: Vec<(usize, usize, Move)>, // (call node, state before, move)
    best: (Vec<usize>, usize),
}

impl<'a> Search<'a> {
    fn new(ops: Vec<&'a Op>, rets: &[Option<u64>]) -> Self {
        // (time, 0 = call / 1 = return, op): at equal times calls come first, so an op invoked at the instant
        // another returns counts as concurrent with it (the permissive choice: no false alarms). A return
        // is clamped to its call, against clock skew.
        let mut ev: Vec<(u64, u8, usize)> = ops.iter().enumerate().map(|(i, op)| (op.call, 0, i)).collect();
        ev.extend(rets.iter().enumerate().filter_map(|(i, &r)| Some((r?.max(ops[i].call), 1, i))));
        ev.sort_unstable();
        let mut s = Search {
            remaining: rets.iter().flatten().count(),
            val: Vec::new(),
            values: vec![None],
            node_op: std::iter::once(NIL).chain(ev.iter().map(|e| e.2)).collect(),
            is_call: std::iter::once(false).chain(ev.iter().map(|e| e.1 == 0)).collect(),
            next: (1..=ev.len()).chain([NIL]).collect(),
            prev: (0..=ev.len()).map(|n| n.wrapping_sub(1)).collect(),
            ret_node: vec![None; ops.len()],
            bits: vec![0; ops.len().div_ceil(64)],
            state: 0,
            reads_left: vec![0],
            writes_left: vec![0],
            stack: Vec::new(),
            best: (Vec::new(), 0),
            ops,
        };
        for (j, e) in ev.iter().enumerate().filter(|(_, e)| e.1 == 1) {
            s.ret_node[e.2] = Some(j + 1);
        }
        let mut ids = HashMap::from([(None, 0)]);
        for op in &s.ops {
            let (v, write) = match op.kind {
                Kind::Write(v) => (Some(v), true),
                Kind::Read(v) => (v, false),
            };
            let id = *ids.entry(v).or_insert(s.values.len());
            if id == s.values.len() {
                s.values.push(v);
                s.reads_left.push(0);
                s.writes_left.push(0);
            }
            let left = if write { &mut s.writes_left } else { &mut s.reads_left };
            left[id] += 1;
            s.val.push(id);
        }
        s
    }

    fn is_write(&self, node: usize) -> bool {
        matches!(self.ops[self.node_op[node]].kind, Kind::Write(_))
    }

    fn value(&self, node: usize) -> usize {
        self.val[self.node_op[node]]
    }

    /// Call nodes that may be linearized next: those invoked before every pending op's return.
    fn window(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut n = self.next[0];
        while n != NIL && self.is_call[n] {
            out.push(n);
            n = self.next[n];
        }
        out
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

    /// Linearizes the op of call `node`, or (`on` false) undoes that: all state but the stack and `state`.
    fn toggle(&mut self, node: usize, on: bool) {
        let (i, v, write) = (self.node_op[node], self.value(node), self.is_write(node));
        self.bits[i / 64] ^= 1 << (i % 64);
        let ret = self.ret_node[i];
        let left = if write { &mut self.writes_left[v] } else { &mut self.reads_left[v] };
        if on {
            *left -= 1;
            self.remaining -= usize::from(ret.is_some());
            self.unlink(node);
            if let Some(r) = ret {
                self.unlink(r);
            }
        } else {
            *left += 1;
            self.remaining += usize::from(ret.is_some());
            if let Some(r) = ret {
                self.relink(r); // the exact reverse of lifting; pops are LIFO
            }
            self.relink(node);
        }
    }

    fn push(&mut self, node: usize, mv: Move) {
        self.stack.push((node, self.state, mv));
        self.toggle(node, true);
        if self.is_write(node) {
            self.state = self.value(node);
        }
        if self.stack.len() > self.best.0.len() {
            self.best = (self.stack.iter().map(|&(n, _, _)| self.node_op[n]).collect(), self.state);
        }
    }

    fn pop(&mut self) -> Option<(usize, Move)> {
        let (node, state, mv) = self.stack.pop()?;
        self.toggle(node, false);
        self.state = state;
        Some((node, mv))
    }

    /// Linearizes write `node`, after absorbing the window's other blind writes, unless that strands a
    /// pending read of the overwritten value that no remaining write can bring back.
    fn try_write(&mut self, node: usize, blind_tried: bool, cache: &mut HashSet<(Vec<u64>, usize)>) -> bool {
        let (old, base) = (self.state, self.stack.len());
        for n in self.window() {
            if n != node && self.is_write(n) && self.reads_left[self.value(n)] == 0 {
                self.push(n, Move::Absorbed);
            }
        }
        self.push(node, Move::Chosen { blind_tried });
        let stranded = self.state != old && self.reads_left[old] > 0 && self.writes_left[old] == 0;
        if !stranded && cache.insert((self.bits.clone(), self.state)) {
            return true;
        }
        while self.stack.len() > base {
            self.pop();
        }
        false
    }

    /// Undoes moves back to the latest choice point; returns where to resume it, None if exhausted.
    fn backtrack(&mut self) -> Option<(usize, bool)> {
        loop {
            if let (node, Move::Chosen { blind_tried }) = self.pop()? {
                while matches!(self.stack.last(), Some((_, _, Move::Absorbed))) {
                    self.pop();
                }
                return Some((self.next[node], blind_tried));
            }
        }
    }

    /// The WGL loop, with an explicit stack (no recursion: histories have thousands of ops). Some(()) if a
    /// linearization exists; None once backtracking is exhausted.
    fn run(&mut self) -> Option<()> {
        let mut cache = HashSet::new();
        let mut resume = None;
        loop {
            let (mut cur, mut blind_tried) = match resume.take() {
                Some(point) => point,
                None if self.remaining == 0 => return Some(()),
                None => match self.window().into_iter().find(|&n| !self.is_write(n) && self.value(n) == self.state) {
                    None => (self.next[0], false),
                    Some(n) => {
                        self.push(n, Move::Read);
                        if !cache.insert((self.bits.clone(), self.state)) {
                            self.pop(); // explored before, so this configuration fails too
                            resume = Some(self.backtrack()?);
                        }
                        continue;
                    }
                },
            };
            // A choice point: try each write of the window in event order.
            loop {
                if cur == NIL || !self.is_call[cur] {
                    resume = Some(self.backtrack()?);
                    break;
                }
                if self.is_write(cur) {
                    let blind = self.reads_left[self.value(cur)] == 0;
                    if !(blind && blind_tried) && self.try_write(cur, blind_tried || blind, &mut cache) {
                        break;
                    }
                    blind_tried |= blind;
                }
                cur = self.next[cur];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn w(client: usize, key: &str, v: u64, call: u64, ret: Option<u64>) -> Op {
        Op { client, key: key.into(), kind: Kind::Write(v), call, ret, note: String::new() }
    }

    fn r(client: usize, key: &str, v: Option<u64>, call: u64, ret: u64) -> Op {
        Op { client, key: key.into(), kind: Kind::Read(v), call, ret: Some(ret), note: String::new() }
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
        let v = check(&[w(0, "k", 1, 0, Some(10)), w(1, "k", 2, 20, Some(30)), r(2, "k", Some(1), 40, 50)]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].key, "k");
        assert!(v[0].explanation.contains("Longest linearizable prefix found: 2 ops"), "{}", v[0].explanation);
        assert!(v[0].explanation.contains("client 2 Read(Some(1)) call=40 ret=50"), "{}", v[0].explanation);
    }

    #[test]
    fn concurrent_write_and_read_may_see_either_value() {
        for seen in [Some(1), Some(2)] {
            assert!(ok(&[w(0, "k", 1, 0, Some(10)), w(1, "k", 2, 20, Some(40)), r(2, "k", seen, 25, 35)]));
        }
        assert!(ok(&[w(0, "k", 1, 0, Some(10)), r(1, "k", None, 5, 15)]));
        // Invoked at the very instant the write returned: concurrent, so both values are fine.
        assert!(ok(&[w(0, "k", 1, 0, Some(10)), r(1, "k", None, 10, 20)]));
    }

    #[test]
    fn lost_acknowledged_write() {
        let h = [w(0, "k", 1, 0, Some(10)), w(1, "k", 2, 5, Some(30)), r(2, "k", Some(2), 12, 20)];
        assert!(ok(&h));
        assert!(!ok(&[&h[..], &[r(3, "k", Some(1), 40, 50)]].concat()), "2 was acknowledged and seen");
    }

    #[test]
    fn unknown_outcome_write() {
        let with = |extra: &[Op]| ok(&[&[w(0, "k", 1, 0, Some(10)), w(1, "k", 2, 20, None)], extra].concat());
        assert!(with(&[r(2, "k", Some(1), 30, 40)]), "not observed");
        assert!(with(&[r(2, "k", Some(2), 30, 40)]), "observed");
        assert!(with(&[r(2, "k", Some(1), 30, 40), w(3, "k", 3, 50, Some(60)), r(2, "k", Some(2), 100, 110)]), "late");
        assert!(!with(&[r(2, "k", Some(2), 30, 40), r(2, "k", Some(1), 50, 60)]), "no going back");
        assert!(!with(&[r(2, "k", Some(7), 30, 40)]), "never written");
        assert!(!with(&[r(2, "k", Some(2), 5, 15)]), "observed before its call");
    }

    #[test]
    fn read_none_after_completed_write() {
        assert!(!ok(&[w(0, "k", 1, 0, Some(10)), r(1, "k", None, 11, 20)]));
    }

    #[test]
    fn unknown_reads_are_ignored() {
        assert!(ok(&[w(0, "k", 1, 0, Some(10)), Op { ret: None, ..r(1, "k", Some(9), 20, 0) }]));
    }

    #[test]
    fn keys_are_independent() {
        let h = [w(0, "a", 1, 0, Some(10)), w(1, "b", 2, 0, Some(10)), r(2, "a", Some(1), 20, 30)];
        let v = check(&[&h[..], &[r(3, "b", None, 20, 30), r(4, "b", Some(2), 40, 50)]].concat());
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

    /// A history of atomic registers: each op takes effect at a random instant of its interval (unknown
    /// writes: some time after the call, or never), so it is linearizable by construction. Write values
    /// are `1 + value % modulo` when `modulo` > 0, else unique.
    fn simulate(seed: u64, clients: usize, per_client: usize, keys: &[&str], dur: u64, modulo: u64) -> Vec<Op> {
        let mut rng = XorShift(seed | 1);
        let (mut ops, mut at) = (Vec::new(), Vec::new());
        for client in 0..clients {
            let mut t = rng.below(2 * dur);
            for _ in 0..per_client {
                let (call, d) = (t + rng.below(dur / 4 + 1), 1 + rng.below(dur));
                let (key, lin) = (keys[rng.below(keys.len() as u64) as usize], call + rng.below(d + 1));
                let v = if modulo > 0 { 1 + rng.below(modulo) } else { ops.len() as u64 + 1 };
                let (op, lin) = match rng.below(20) {
                    0 => (w(client, key, v, call, None), Some(call + rng.below(10 * dur))),
                    1 => (w(client, key, v, call, None), None),
                    2 => (Op { ret: None, ..r(client, key, Some(1 << 50), call, 0) }, None), // ignored
                    3..=8 => (w(client, key, v, call, Some(call + d)), Some(lin)),
                    _ => (r(client, key, None, call, call + d), Some(lin)),
                };
                ops.push(op);
                at.push(lin);
                t = call + d + 1;
            }
        }
        let mut order: Vec<usize> = (0..ops.len()).filter(|&i| at[i].is_some()).collect();
        order.sort_by_key(|&i| (at[i], i));
        let mut reg: HashMap<String, u64> = HashMap::new();
        for i in order {
            match &mut ops[i] {
                Op { key, kind: Kind::Write(v), .. } => drop(reg.insert(key.clone(), *v)),
                Op { key, kind: Kind::Read(got), .. } => *got = reg.get(key).copied(),
            }
        }
        ops
    }

    /// Makes a late known read of some key return a value that was overwritten before the read began
    /// (write a, then write b, then the read, all strictly ordered in real time): never linearizable.
    fn corrupt_stale(h: &mut [Op]) -> String {
        let g: &[Op] = h;
        let writes_before = |i: usize, t: u64| {
            let done = move |j: &usize| g[*j].ret.is_some_and(|r| r < t) && g[*j].key == g[i].key;
            (0..g.len()).filter(move |j| done(j) && matches!(g[*j].kind, Kind::Write(_)))
        };
        let mut reads: Vec<usize> =
            (0..g.len()).filter(|&i| g[i].ret.is_some() && g[i].kind != Kind::Read(None)).collect();
        reads.sort_by_key(|&i| std::cmp::Reverse(g[i].call));
        let (i, v) = reads
            .into_iter()
            .filter(|&i| matches!(g[i].kind, Kind::Read(_)))
            .find_map(|i| {
                let b = writes_before(i, g[i].call).max_by_key(|&j| g[j].ret)?;
                let Kind::Write(v) = g[writes_before(i, g[b].call).next()?].kind else { return None };
                Some((i, v))
            })
            .expect("a read to corrupt");
        h[i].kind = Kind::Read(Some(v));
        h[i].key.clone()
    }

    #[test]
    fn randomized_linearizable_and_corrupted() {
        for seed in 1..=30 {
            let mut h = simulate(seed * 0x9E37_79B9, 6, 60, &["x", "y", "z"], 40, 0);
            let v = check(&h);
            assert!(v.is_empty(), "seed {seed}: {v:?}");
            let i = (0..h.len()).rev().find(|&i| h[i].ret.is_some() && matches!(h[i].kind, Kind::Read(_))).unwrap();
            let mut phantom = h.clone();
            phantom[i].kind = Kind::Read(Some(1 << 40)); // a value nobody wrote
            assert_eq!(check(&phantom).iter().map(|v| v.key.clone()).collect::<Vec<_>>(), [h[i].key.clone()]);
            let key = corrupt_stale(&mut h);
            assert_eq!(check(&h).iter().map(|v| v.key.clone()).collect::<Vec<_>>(), [key], "seed {seed}");
        }
    }

    /// Brute force over all orders of tiny histories with few distinct values, to validate the pruning.
    fn brute(ops: &[&Op], done: &mut Vec<bool>, state: Option<u64>) -> bool {
        if (0..ops.len()).all(|i| done[i] || ops[i].ret.is_none()) {
            return true;
        }
        (0..ops.len()).any(|i| {
            let blocked = (0..ops.len()).any(|j| !done[j] && ops[j].ret.is_some_and(|r| r < ops[i].call));
            let next = match ops[i].kind {
                Kind::Write(v) => Some(Some(v)),
                Kind::Read(seen) => (seen == state).then_some(state),
            };
            let Some(next) = next.filter(|_| !done[i] && !blocked) else { return false };
            done[i] = true;
            let found = brute(ops, done, next);
            done[i] = false;
            found
        })
    }

    #[test]
    fn matches_brute_force_on_small_histories() {
        let mut rng = XorShift(0x1234_5678_9abc);
        for _ in 0..5_000 {
            let (n, values) = (1 + rng.below(8), 1 + rng.below(4));
            let mut h = simulate(rng.below(u64::MAX), n as usize, 1, &["k"], 1 + rng.below(8), values);
            if rng.below(2) == 0 {
                let i = rng.below(n) as usize;
                if h[i].ret.is_some() && matches!(h[i].kind, Kind::Read(_)) {
                    h[i].kind = Kind::Read(Some(rng.below(values + 1)).filter(|&v| v > 0));
                }
            }
            let ops: Vec<&Op> = h.iter().filter(|op| op.ret.is_some() || matches!(op.kind, Kind::Write(_))).collect();
            assert_eq!(check(&h).is_empty(), brute(&ops, &mut vec![false; ops.len()], None), "{h:#?}");
        }
    }

    #[test]
    fn performance_16_clients_150_ops_one_key() {
        let start = Instant::now();
        let mut h = simulate(42, 16, 150, &["k"], 40, 0);
        assert!(check(&h).is_empty());
        corrupt_stale(&mut h);
        assert_eq!(check(&h).len(), 1);
        assert!(start.elapsed().as_secs_f64() < 2.0, "took {:?}", start.elapsed());
    }
}
