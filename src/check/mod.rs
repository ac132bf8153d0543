//! History checking: was what clients saw linearizable?
//!
//! A [`History`] records every operation's invoke and return (time, key, input, output); an
//! operation whose outcome is unknown (timeout, connection lost) has no return and may or
//! may not have taken effect. [`check`] partitions the history by key (linearizability is
//! compositional) and searches each key's sub-history for a legal order with the
//! Wing–Gong algorithm in Lowe's form: take the earliest pending call, try to linearize it
//! against a model, backtrack when a return is reached whose call was not linearized, and
//! memoize (set of linearized ops, model state) pairs already explored.
//!
//! The model is a register with etcd-style counters: a value (or absent), a version (writes
//! since creation) and a mod revision (the raft index of the last write, strictly increasing
//! per key). A read must see exactly the value, version and mod revision of the state it is
//! linearized at; a write's revision must be higher than every earlier write's; a
//! compare-and-swap succeeds exactly when the version matches.
//!
//! Invariants:
//! - checking is pure and deterministic: no I/O, no clock, the same history gives the same
//!   verdict;
//! - an operation whose outcome is unknown may be linearized anywhere after its invoke, or
//!   not at all; it is never required to have taken effect;
//! - operations that touch in time (one returns when another is invoked) count as
//!   concurrent;
//! - the search gives up after 20,000,000 steps per key with `Inconclusive`, never a
//!   guessed verdict.

use std::collections::{BTreeMap, HashSet};

mod election;
mod realtime;
mod watch;
pub use election::{check_election, ElectionProblem, KeyLife, Term};
pub use realtime::{revisions_out_of_real_time, OutOfOrder};
pub use watch::{check_watch, WatchedEvent};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Get,
    Put(Vec<u8>),
    /// Write `value` if the key's version is `expect_version` (0 = absent).
    Cas {
        expect_version: u64,
        value: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Observed {
    pub value: Vec<u8>,
    pub version: u64,
    pub mod_revision: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Get(Option<Observed>),
    Put { revision: u64 },
    Cas { succeeded: bool, revision: u64 },
}

#[derive(Clone, Debug)]
pub struct Op {
    pub client: u64,
    pub key: Vec<u8>,
    pub input: Input,
    /// Nanoseconds on one clock shared by all clients of the history.
    pub invoke: u64,
    /// Return time and output; `None` = outcome unknown.
    pub ret: Option<(u64, Output)>,
}

/// The operations of one test run, from any number of clients.
#[derive(Default, Debug, Clone)]
pub struct History {
    pub ops: Vec<Op>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Rev {
    Known(u64),
    /// An unknown-outcome write was linearized: the revision is above this, value unknown.
    Above(u64),
}

impl Rev {
    fn floor(&self) -> u64 {
        match self {
            Rev::Known(r) | Rev::Above(r) => *r,
        }
    }
    /// Whether a write at `r` may come after this state.
    fn allows_next(&self, r: u64) -> bool {
        r > self.floor()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct State {
    value: Option<Vec<u8>>,
    version: u64,
    rev: Rev,
}

impl State {
    fn written(&self, value: &[u8], rev: Rev) -> State {
        State {
            value: Some(value.to_vec()),
            version: self.version + 1,
            rev,
        }
    }

    /// The state after `op`, if `op` can take effect (with its observed output) here.
    fn step(&self, op: &Op) -> Option<State> {
        let out = op.ret.as_ref().map(|(_, o)| o);
        match (&op.input, out) {
            (Input::Get, None) => Some(self.clone()),
            (Input::Get, Some(Output::Get(None))) => self.value.is_none().then(|| self.clone()),
            (Input::Get, Some(Output::Get(Some(o)))) => {
                let rev_ok = match self.rev {
                    Rev::Known(r) => r == o.mod_revision,
                    Rev::Above(r) => o.mod_revision > r,
                };
                (self.value.as_deref() == Some(o.value.as_slice())
                    && self.version == o.version
                    && rev_ok)
                    .then(|| State {
                        rev: Rev::Known(o.mod_revision),
                        ..self.clone()
                    })
            }
            (Input::Put(v), None) => Some(self.written(v, Rev::Above(self.rev.floor()))),
            (Input::Put(v), Some(Output::Put { revision })) => self
                .rev
                .allows_next(*revision)
                .then(|| self.written(v, Rev::Known(*revision))),
            (
                Input::Cas {
                    expect_version,
                    value,
                },
                out,
            ) => match out {
                None => (self.version == *expect_version)
                    .then(|| self.written(value, Rev::Above(self.rev.floor()))),
                Some(Output::Cas {
                    succeeded: true,
                    revision,
                }) => (self.version == *expect_version && self.rev.allows_next(*revision))
                    .then(|| self.written(value, Rev::Known(*revision))),
                Some(Output::Cas {
                    succeeded: false, ..
                }) => (self.version != *expect_version).then(|| self.clone()),
                Some(_) => None,
            },
            _ => None,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No legal order exists for this key; the operations of the key are attached.
    Violation {
        key: Vec<u8>,
        ops: Vec<Op>,
    },
    /// The search gave up after its step budget (too much concurrency on one key).
    Inconclusive {
        key: Vec<u8>,
    },
}

impl PartialEq for Op {
    fn eq(&self, o: &Op) -> bool {
        self.client == o.client
            && self.key == o.key
            && self.input == o.input
            && self.invoke == o.invoke
            && self.ret == o.ret
    }
}
impl Eq for Op {}

/// Search steps per key before giving up.
const BUDGET: u64 = 20_000_000;

/// Checks every key's sub-history; the first violation (or inconclusive key) is returned.
pub fn check(history: &History) -> Verdict {
    let mut by_key: BTreeMap<&[u8], Vec<&Op>> = BTreeMap::new();
    for op in &history.ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in by_key {
        match check_key(&ops) {
            Some(true) => {}
            Some(false) => {
                return Verdict::Violation {
                    key: key.to_vec(),
                    ops: ops.into_iter().cloned().collect(),
                }
            }
            None => return Verdict::Inconclusive { key: key.to_vec() },
        }
    }
    Verdict::Linearizable
}

/// Writes that took effect other than as reported, found directly from their values (which
/// must be unique in the history, as the chaos clients' are): a value observed at two
/// revisions (the write applied twice), a value observed although its compare-and-swap
/// answered "failed" (it applied and the answer said it did not), or a write acknowledged at
/// one revision while readers saw its value at another. One line per finding.
pub fn misreported_writes(history: &History) -> Vec<String> {
    use std::collections::BTreeSet;
    // (key, value) → the write's reported outcome: Some(revision) acknowledged, None failed.
    let mut written: BTreeMap<(&[u8], &[u8]), Option<u64>> = BTreeMap::new();
    let mut seen: BTreeMap<(&[u8], &[u8]), BTreeSet<u64>> = BTreeMap::new();
    for op in &history.ops {
        match (&op.input, &op.ret) {
            (Input::Put(v), Some((_, Output::Put { revision }))) => {
                written.insert((&op.key, v), Some(*revision));
            }
            (
                Input::Cas { value, .. },
                Some((
                    _,
                    Output::Cas {
                        succeeded,
                        revision,
                    },
                )),
            ) => {
                written.insert((&op.key, value), succeeded.then_some(*revision));
            }
            (Input::Get, Some((_, Output::Get(Some(o))))) => {
                seen.entry((&op.key, &o.value))
                    .or_default()
                    .insert(o.mod_revision);
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for ((key, value), revs) in &seen {
        let show = String::from_utf8_lossy(value);
        if revs.len() > 1 {
            out.push(format!(
                "{key:02x?} value {show} seen at revisions {revs:?}: applied more than once"
            ));
        }
        match written.get(&(*key, *value)) {
            Some(None) => out.push(format!(
                "{key:02x?} value {show} seen at {revs:?}, but its compare-and-swap answered failed"
            )),
            Some(Some(r)) if revs.iter().any(|x| x != r) => out.push(format!(
                "{key:02x?} value {show} acknowledged at revision {r}, seen at {revs:?}"
            )),
            _ => {}
        }
    }
    out
}

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// Index of the matching return event (calls of ops with a known outcome).
    partner: Option<usize>,
}

/// `Some(true)` linearizable, `Some(false)` not, `None` budget exhausted.
fn check_key(ops: &[&Op]) -> Option<bool> {
    // Events in time order; at equal times calls first, so touching operations count as
    // concurrent (the lenient reading).
    let mut evs: Vec<(u64, bool, usize)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        evs.push((op.invoke, true, i));
        if let Some((t, _)) = &op.ret {
            evs.push((*t, false, i));
        }
    }
    evs.sort_by_key(|(t, call, i)| (*t, !*call, *i));
    let n = evs.len();
    let mut events: Vec<Event> = evs
        .iter()
        .map(|(_, call, i)| Event {
            op: *i,
            is_call: *call,
            partner: None,
        })
        .collect();
    let mut ret_of = vec![None; ops.len()];
    for (ix, e) in events.iter().enumerate() {
        if !e.is_call {
            ret_of[e.op] = Some(ix);
        }
    }
    for e in events.iter_mut() {
        if e.is_call {
            e.partner = ret_of[e.op];
        }
    }
    // Doubly linked list over event indices; n = end sentinel.
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut head = if n == 0 { n } else { 0 };
    let unlink = |ix: usize, head: &mut usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[ix], next[ix]);
        if p == usize::MAX {
            *head = nx;
        } else {
            next[p] = nx;
        }
        if nx < n {
            prev[nx] = p;
        }
    };
    let relink = |ix: usize, head: &mut usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[ix], next[ix]);
        if p == usize::MAX {
            *head = ix;
        } else {
            next[p] = ix;
        }
        if nx < n {
            prev[nx] = ix;
        }
    };
    let mut known_left = ops.iter().filter(|o| o.ret.is_some()).count();
    let mut linearized = vec![0u64; ops.len().div_ceil(64)];
    let mut cache: HashSet<(Vec<u64>, State)> = HashSet::new();
    let mut stack: Vec<(usize, State)> = Vec::new();
    let mut state = State {
        value: None,
        version: 0,
        rev: Rev::Known(0),
    };
    let mut entry = head;
    let mut steps = 0u64;
    while known_left > 0 {
        steps += 1;
        if steps > BUDGET {
            return None;
        }
        if entry < n && events[entry].is_call {
            let e = events[entry];
            if let Some(ns) = state.step(ops[e.op]) {
                let mut lin = linearized.clone();
                lin[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((lin.clone(), ns.clone())) {
                    stack.push((entry, state));
                    state = ns;
                    linearized = lin;
                    if ops[e.op].ret.is_some() {
                        known_left -= 1;
                    }
                    unlink(entry, &mut head, &mut next, &mut prev);
                    if let Some(r) = e.partner {
                        unlink(r, &mut head, &mut next, &mut prev);
                    }
                    entry = head;
                    continue;
                }
            }
            entry = next[entry];
            continue;
        }
        // A return whose call is not linearized yet (or the end, with only unknown-outcome
        // calls ahead): undo the last choice and try the next candidate after it.
        let Some((call, st)) = stack.pop() else {
            return Some(false);
        };
        let op = events[call].op;
        linearized[op / 64] &= !(1 << (op % 64));
        if ops[op].ret.is_some() {
            known_left += 1;
        }
        if let Some(r) = events[call].partner {
            relink(r, &mut head, &mut next, &mut prev);
        }
        relink(call, &mut head, &mut next, &mut prev);
        state = st;
        entry = next[call];
    }
    Some(true)
}

/// Per client and key, the revisions a client observes (read mod revisions and its own write
/// revisions, in the order its operations returned) never go backwards. Returns the first
/// offending (client, key, earlier, later).
pub fn non_monotonic_revisions(history: &History) -> Option<(u64, Vec<u8>, u64, u64)> {
    // (client, key) → (return time, revision) in the order seen.
    type Seen = Vec<(u64, u64)>;
    let mut by: BTreeMap<(u64, &[u8]), Seen> = BTreeMap::new();
    for op in &history.ops {
        let Some((t, out)) = &op.ret else { continue };
        let rev = match out {
            Output::Get(Some(o)) => o.mod_revision,
            Output::Put { revision } => *revision,
            Output::Cas {
                succeeded: true,
                revision,
            } => *revision,
            _ => continue,
        };
        by.entry((op.client, &op.key)).or_default().push((*t, rev));
    }
    for ((client, key), mut seen) in by {
        seen.sort();
        for w in seen.windows(2) {
            if w[1].1 < w[0].1 {
                return Some((client, key.to_vec(), w[0].1, w[1].1));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u64, input: Input, invoke: u64, ret: Option<(u64, Output)>) -> Op {
        Op {
            client,
            key: b"k".to_vec(),
            input,
            invoke,
            ret,
        }
    }
    fn put(v: &str) -> Input {
        Input::Put(v.as_bytes().to_vec())
    }
    fn got(v: &str, version: u64, rev: u64) -> Output {
        Output::Get(Some(Observed {
            value: v.as_bytes().to_vec(),
            version,
            mod_revision: rev,
        }))
    }
    fn h(ops: Vec<Op>) -> History {
        History { ops }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let hist = h(vec![
            op(1, put("a"), 0, Some((10, Output::Put { revision: 5 }))),
            op(1, Input::Get, 20, Some((30, got("a", 1, 5)))),
            op(2, put("b"), 40, Some((50, Output::Put { revision: 7 }))),
            op(2, Input::Get, 60, Some((70, got("b", 2, 7)))),
        ]);
        assert_eq!(check(&hist), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_after_a_completed_write_is_caught() {
        let hist = h(vec![
            op(1, put("a"), 0, Some((10, Output::Put { revision: 5 }))),
            op(1, put("b"), 20, Some((30, Output::Put { revision: 6 }))),
            // Starts after "b" was acknowledged but sees "a": a stale read.
            op(2, Input::Get, 40, Some((50, got("a", 1, 5)))),
        ]);
        assert!(matches!(check(&hist), Verdict::Violation { .. }));
    }

    #[test]
    fn concurrent_read_may_see_either_side() {
        let hist = h(vec![
            op(1, put("a"), 0, Some((10, Output::Put { revision: 5 }))),
            op(1, put("b"), 20, Some((60, Output::Put { revision: 6 }))),
            op(2, Input::Get, 30, Some((40, got("a", 1, 5)))),
            op(3, Input::Get, 35, Some((45, got("b", 2, 6)))),
        ]);
        assert_eq!(check(&hist), Verdict::Linearizable);
        // ...but not go back to "a" after someone saw "b" in real-time order.
        let mut ops = hist.ops.clone();
        ops.push(op(4, Input::Get, 50, Some((55, got("a", 1, 5)))));
        assert!(matches!(check(&h(ops)), Verdict::Violation { .. }));
    }

    #[test]
    fn lost_acknowledged_write_is_caught_and_unknown_writes_are_optional() {
        // The acknowledged write of "a" vanished: the final read sees nothing.
        let lost = h(vec![
            op(1, put("a"), 0, Some((10, Output::Put { revision: 5 }))),
            op(2, Input::Get, 20, Some((30, Output::Get(None)))),
        ]);
        assert!(matches!(check(&lost), Verdict::Violation { .. }));
        // An unknown-outcome write may have happened...
        let maybe = h(vec![
            op(1, put("a"), 0, None),
            op(2, Input::Get, 20, Some((30, got("a", 1, 9)))),
        ]);
        assert_eq!(check(&maybe), Verdict::Linearizable);
        // ...or not.
        let maybe_not = h(vec![
            op(1, put("a"), 0, None),
            op(2, Input::Get, 20, Some((30, Output::Get(None)))),
        ]);
        assert_eq!(check(&maybe_not), Verdict::Linearizable);
    }

    #[test]
    fn cas_semantics_and_double_success_is_caught() {
        let cas = |v: &str| Input::Cas {
            expect_version: 0,
            value: v.as_bytes().to_vec(),
        };
        let ok = |r| Output::Cas {
            succeeded: true,
            revision: r,
        };
        let fail = Output::Cas {
            succeeded: false,
            revision: 0,
        };
        let fine = h(vec![
            op(1, cas("a"), 0, Some((20, ok(5)))),
            op(2, cas("b"), 5, Some((25, fail.clone()))),
        ]);
        assert_eq!(check(&fine), Verdict::Linearizable);
        // Two create-if-absent calls cannot both win.
        let both = h(vec![
            op(1, cas("a"), 0, Some((20, ok(5)))),
            op(2, cas("b"), 5, Some((25, ok(6)))),
        ]);
        assert!(matches!(check(&both), Verdict::Violation { .. }));
    }

    #[test]
    fn revisions_must_grow_and_monotonicity_is_checked_per_client() {
        let hist = h(vec![
            op(1, put("a"), 0, Some((10, Output::Put { revision: 7 }))),
            op(1, put("b"), 20, Some((30, Output::Put { revision: 6 }))),
        ]);
        assert!(matches!(check(&hist), Verdict::Violation { .. }));
        assert_eq!(
            non_monotonic_revisions(&hist),
            Some((1, b"k".to_vec(), 7, 6))
        );
    }

    #[test]
    fn many_concurrent_clients_check_quickly() {
        // 8 clients, 400 writes and reads with overlapping windows, all consistent with
        // the order of revisions.
        let mut ops = Vec::new();
        let mut rev = 0;
        for i in 0..200u64 {
            rev += 1;
            let t = i * 10;
            ops.push(op(
                i % 8,
                put(&format!("v{i}")),
                t,
                Some((t + 25, Output::Put { revision: rev })),
            ));
            ops.push(op(
                (i + 3) % 8,
                Input::Get,
                t + 26,
                Some((t + 30, got(&format!("v{i}"), i + 1, rev))),
            ));
        }
        assert_eq!(check(&h(ops)), Verdict::Linearizable);
    }
}
