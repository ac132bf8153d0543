//! The real-time order of revisions across keys: a write acknowledged before another write
//! was invoked has the smaller revision, whatever keys (and so regions) the two touch.
//! Linearizability per key cannot see this; etcd's lock and election recipes rely on it
//! (the oldest `create_revision` under a prefix wins).
//!
//! Invariants:
//! - only acknowledged writes that took effect count (puts, and compare-and-swaps that
//!   succeeded); writes with unknown outcome and reads are ignored;
//! - writes that touch in time (one returns when the other is invoked) are concurrent, as
//!   in the linearizability checker.

use super::{History, Input, Op, Output};

/// Two acknowledged writes out of real-time order: `before` returned before `after` was
/// invoked, yet `after`'s revision is not larger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutOfOrder {
    pub before: (u64, Vec<u8>, u64),
    pub after: (u64, Vec<u8>, u64),
}

fn write_revision(op: &Op) -> Option<(u64, u64)> {
    let (ret, out) = op.ret.as_ref()?;
    let rev = match (&op.input, out) {
        (Input::Put(_), Output::Put { revision }) => *revision,
        (
            Input::Cas { .. },
            Output::Cas {
                succeeded: true,
                revision,
            },
        ) => *revision,
        _ => return None,
    };
    Some((*ret, rev))
}

/// The first pair of acknowledged writes whose revisions contradict their real-time order,
/// if any, and how many writes are out of order in all.
pub fn revisions_out_of_real_time(history: &History) -> (usize, Option<OutOfOrder>) {
    // (invoke, return, revision, op index) of every acknowledged write.
    let mut writes: Vec<(u64, u64, u64, usize)> = history
        .ops
        .iter()
        .enumerate()
        .filter_map(|(i, op)| write_revision(op).map(|(ret, rev)| (op.invoke, ret, rev, i)))
        .collect();
    let mut by_return: Vec<(u64, u64, usize)> = writes
        .iter()
        .map(|&(_, ret, rev, i)| (ret, rev, i))
        .collect();
    by_return.sort_unstable();
    writes.sort_unstable();
    let describe = |i: usize, rev: u64| {
        let op = &history.ops[i];
        (op.client, op.key.clone(), rev)
    };
    // Sweep by invoke time, keeping the largest revision of the writes returned strictly
    // before the current invoke.
    let mut done = 0;
    let mut max: Option<(u64, usize)> = None;
    let mut bad = 0;
    let mut first = None;
    for &(invoke, _, rev, i) in &writes {
        while done < by_return.len() && by_return[done].0 < invoke {
            let (_, r, j) = by_return[done];
            if max.is_none_or(|(m, _)| r > m) {
                max = Some((r, j));
            }
            done += 1;
        }
        if let Some((m, j)) = max.filter(|(m, _)| *m >= rev) {
            bad += 1;
            first.get_or_insert_with(|| OutOfOrder {
                before: describe(j, m),
                after: describe(i, rev),
            });
        }
    }
    (bad, first)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(client: u64, key: &str, invoke: u64, ret: u64, revision: u64) -> Op {
        Op {
            client,
            key: key.as_bytes().to_vec(),
            input: Input::Put(b"v".to_vec()),
            invoke,
            ret: Some((ret, Output::Put { revision })),
        }
    }

    #[test]
    fn a_later_write_with_a_smaller_revision_is_caught_across_keys() {
        let h = History {
            ops: vec![put(1, "a", 0, 10, 7), put(2, "b", 20, 30, 5)],
        };
        let (n, first) = revisions_out_of_real_time(&h);
        assert_eq!(n, 1);
        let first = first.expect("caught");
        assert_eq!(first.before, (1, b"a".to_vec(), 7));
        assert_eq!(first.after, (2, b"b".to_vec(), 5));
    }

    #[test]
    fn concurrent_and_touching_writes_may_take_either_order() {
        let h = History {
            ops: vec![
                put(1, "a", 0, 10, 7),
                // Invoked before "a" returned, or exactly when it did: concurrent.
                put(2, "b", 5, 30, 5),
                put(3, "c", 10, 40, 6),
                // After both: must be larger than 7.
                put(4, "d", 41, 50, 8),
            ],
        };
        assert_eq!(revisions_out_of_real_time(&h), (0, None));
    }

    #[test]
    fn unknown_outcomes_failed_swaps_and_reads_do_not_count() {
        let mut unknown = put(1, "a", 0, 10, 100);
        unknown.ret = None;
        let failed = Op {
            client: 2,
            key: b"b".to_vec(),
            input: Input::Cas {
                expect_version: 3,
                value: b"x".to_vec(),
            },
            invoke: 0,
            ret: Some((
                5,
                Output::Cas {
                    succeeded: false,
                    revision: 100,
                },
            )),
        };
        let h = History {
            ops: vec![unknown, failed, put(3, "c", 20, 30, 1)],
        };
        assert_eq!(revisions_out_of_real_time(&h), (0, None));
    }
}
