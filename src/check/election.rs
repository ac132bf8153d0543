//! The election check: no two contenders' terms overlap, and fenced writes' tokens only
//! rise (docs/reliability.md, "Elections").
//!
//! Each contender of an election puts a key under the election's prefix; its
//! `create_revision` is its token. A contender that won says at which revision it saw no
//! older contender left (`acquired`). From the cluster's history of the prefix (every key's
//! creation and deletion revision) the check needs no clock: a term is correct only if every
//! key with a lower token was deleted at or before the revision the term was acquired at.
//! Writes to the protected resource, in revision order, must carry tokens that never fall.
//!
//! Invariants:
//! - the check depends only on revisions, never on the test's clocks;
//! - a key whose deletion is not in the history counts as never deleted.

use std::collections::HashMap;

/// A won term: its key, token (the key's create revision) and the revision at which it was
/// won.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    pub key: Vec<u8>,
    pub token: u64,
    pub acquired: u64,
}

/// A contender key's life in the history: created at `created` (its token), deleted at
/// `deleted` (if it was).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyLife {
    pub created: u64,
    pub deleted: Option<u64>,
}

/// What the check found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElectionProblem {
    /// `term` was won while `older` (a lower token) still existed.
    Overlap {
        term: Term,
        older: Vec<u8>,
        older_token: u64,
    },
    /// A resource write with `token` came after one with the higher `after`.
    TokenFell {
        revision: u64,
        token: u64,
        after: u64,
    },
}

/// Checks `terms` against the prefix's `history` (key → life) and the resource's
/// `writes` (revision, token), in any order.
pub fn check_election(
    terms: &[Term],
    history: &HashMap<Vec<u8>, KeyLife>,
    writes: &[(u64, u64)],
) -> Vec<ElectionProblem> {
    let mut problems = Vec::new();
    for t in terms {
        for (key, life) in history {
            if life.created < t.token && life.deleted.is_none_or(|d| d > t.acquired) {
                problems.push(ElectionProblem::Overlap {
                    term: t.clone(),
                    older: key.clone(),
                    older_token: life.created,
                });
            }
        }
    }
    let mut writes = writes.to_vec();
    writes.sort();
    let mut highest = 0;
    for (revision, token) in writes {
        if token < highest {
            problems.push(ElectionProblem::TokenFell {
                revision,
                token,
                after: highest,
            });
        }
        highest = highest.max(token);
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(created: u64, deleted: Option<u64>) -> KeyLife {
        KeyLife { created, deleted }
    }

    #[test]
    fn terms_after_their_predecessors_pass_and_overlaps_fail() {
        let history: HashMap<Vec<u8>, KeyLife> = [
            (b"e/a".to_vec(), life(10, Some(20))),
            (b"e/b".to_vec(), life(12, Some(30))),
            (b"e/c".to_vec(), life(25, None)),
        ]
        .into_iter()
        .collect();
        let good = vec![
            Term {
                key: b"e/a".to_vec(),
                token: 10,
                acquired: 11,
            },
            Term {
                key: b"e/b".to_vec(),
                token: 12,
                acquired: 20,
            },
            Term {
                key: b"e/c".to_vec(),
                token: 25,
                acquired: 30,
            },
        ];
        let writes = [(11, 10), (21, 12), (22, 12), (31, 25)];
        assert!(check_election(&good, &history, &writes).is_empty());
        // b won while a still existed.
        let early = [Term {
            key: b"e/b".to_vec(),
            token: 12,
            acquired: 19,
        }];
        assert!(matches!(
            check_election(&early, &history, &[]).as_slice(),
            [ElectionProblem::Overlap {
                older_token: 10,
                ..
            }]
        ));
        // A stale leader's write after a newer one's.
        let fell = [(21, 12), (23, 10)];
        assert_eq!(
            check_election(&[], &history, &fell),
            vec![ElectionProblem::TokenFell {
                revision: 23,
                token: 10,
                after: 12
            }]
        );
    }
}
