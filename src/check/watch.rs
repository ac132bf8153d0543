//! The watch checker: what a watcher received against the committed history of its range
//! and the writes the clients saw acknowledged.
//!
//! Invariants:
//! - a watcher passes only if it received exactly the reference (the range's history from
//!   its start revision, read after healing) up to the checked revision: no gap, no
//!   duplicate, the same order;
//! - every acknowledged write in the range from the start revision up to the checked one is
//!   among the received events, with its value, whatever the reference says.

use std::collections::HashSet;

use super::{History, Input, Output};

/// Revision, key and value (`None`: deleted) of a delivered event.
type Delivered<'a> = (u64, &'a [u8], Option<&'a [u8]>);

/// One event as a watcher received it: `value` is `None` for a delete.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchedEvent {
    pub revision: u64,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// Checks `received` (in the order delivered) against `reference` and the acknowledged
/// writes of `history` whose keys `in_range` accepts, for revisions in `[start, upto]`.
/// Returns what is wrong, the first few problems described.
pub fn check_watch(
    received: &[WatchedEvent],
    reference: &[WatchedEvent],
    history: &History,
    in_range: impl Fn(&[u8]) -> bool,
    start: u64,
    upto: u64,
) -> Result<(), String> {
    let within = |e: &&WatchedEvent| e.revision >= start && e.revision <= upto;
    let got: Vec<&WatchedEvent> = received.iter().filter(within).collect();
    let want: Vec<&WatchedEvent> = reference.iter().filter(within).collect();
    let mut problems = Vec::new();
    if let Some(w) = got.windows(2).find(|w| w[1].revision < w[0].revision) {
        problems.push(format!(
            "revision {} after {} (out of order)",
            w[1].revision, w[0].revision
        ));
    }
    let mut seen = HashSet::new();
    if let Some(d) = got.iter().find(|e| !seen.insert((e.revision, &e.key))) {
        problems.push(format!("duplicate event {} {:02x?}", d.revision, d.key));
    }
    if got != want {
        let have: HashSet<&WatchedEvent> = got.iter().copied().collect();
        let missing: Vec<u64> = want
            .iter()
            .filter(|e| !have.contains(*e))
            .map(|e| e.revision)
            .collect();
        let expected: HashSet<&WatchedEvent> = want.iter().copied().collect();
        let extra: Vec<u64> = got
            .iter()
            .filter(|e| !expected.contains(*e))
            .map(|e| e.revision)
            .collect();
        problems.push(format!(
            "received {} events, history has {}: {} missing (first {:?}), {} not in history (first {:?})",
            got.len(),
            want.len(),
            missing.len(),
            missing.first(),
            extra.len(),
            extra.first()
        ));
    }
    let have: HashSet<Delivered<'_>> = got
        .iter()
        .map(|e| (e.revision, e.key.as_slice(), e.value.as_deref()))
        .collect();
    let mut unseen = 0;
    for op in &history.ops {
        let (value, revision) = match (&op.input, &op.ret) {
            (Input::Put(v), Some((_, Output::Put { revision }))) => (v, *revision),
            (
                Input::Cas { value, .. },
                Some((
                    _,
                    Output::Cas {
                        succeeded: true,
                        revision,
                    },
                )),
            ) => (value, *revision),
            _ => continue,
        };
        if revision < start || revision > upto || !in_range(&op.key) {
            continue;
        }
        if !have.contains(&(revision, op.key.as_slice(), Some(value.as_slice()))) {
            if unseen == 0 {
                problems.push(format!(
                    "acknowledged write at {revision} of {:02x?} never delivered",
                    op.key
                ));
            }
            unseen += 1;
        }
    }
    if unseen > 1 {
        problems.push(format!("{unseen} acknowledged writes never delivered"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Op;

    fn ev(revision: u64, key: &str, value: &str) -> WatchedEvent {
        WatchedEvent {
            revision,
            key: key.as_bytes().to_vec(),
            value: Some(value.as_bytes().to_vec()),
        }
    }

    fn put(key: &str, value: &str, revision: u64) -> Op {
        Op {
            client: 1,
            key: key.as_bytes().to_vec(),
            input: Input::Put(value.as_bytes().to_vec()),
            invoke: revision * 10,
            ret: Some((revision * 10 + 5, Output::Put { revision })),
        }
    }

    #[test]
    fn gaps_duplicates_reordering_and_unseen_writes_fail() {
        let reference = vec![ev(3, "a", "1"), ev(5, "b", "2"), ev(9, "a", "3")];
        let history = History {
            ops: vec![put("a", "1", 3), put("b", "2", 5), put("a", "3", 9)],
        };
        let all = |_: &[u8]| true;
        assert_eq!(
            check_watch(&reference, &reference, &history, all, 1, 9),
            Ok(())
        );
        // Only the window [start, upto] counts.
        assert_eq!(
            check_watch(&reference[1..2], &reference, &history, all, 4, 8),
            Ok(())
        );
        let gap = vec![ev(3, "a", "1"), ev(9, "a", "3")];
        let err = check_watch(&gap, &reference, &history, all, 1, 9).unwrap_err();
        assert!(err.contains("1 missing") && err.contains("at 5"), "{err}");
        let dup = vec![
            ev(3, "a", "1"),
            ev(5, "b", "2"),
            ev(5, "b", "2"),
            ev(9, "a", "3"),
        ];
        assert!(check_watch(&dup, &reference, &history, all, 1, 9)
            .unwrap_err()
            .contains("duplicate"));
        let swapped = vec![ev(5, "b", "2"), ev(3, "a", "1"), ev(9, "a", "3")];
        assert!(check_watch(&swapped, &reference, &history, all, 1, 9)
            .unwrap_err()
            .contains("out of order"));
        // A reference that itself lacks an acknowledged write does not excuse the watcher.
        let short = vec![ev(3, "a", "1"), ev(9, "a", "3")];
        assert!(check_watch(&short, &short, &history, all, 1, 9)
            .unwrap_err()
            .contains("never delivered"));
        // Keys outside the range are not expected.
        let only_a = |k: &[u8]| k == b"a";
        assert_eq!(check_watch(&short, &short, &history, only_a, 1, 9), Ok(()));
    }
}
