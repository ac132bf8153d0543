//! A property test: random appends (with conflicts), applies, compactions and reopens over
//! several regions in one RocksDB behave exactly like a simple in-memory model of their logs.
//! Reads cover every suffix of the log, so they come from the in-memory entry cache (entries
//! not yet applied), from the engine, and from both sides of the cache's start.

use std::collections::BTreeMap;

use proptest::prelude::*;
use protobuf::Message as _;
use raft::{GetEntriesContext, Storage};
use tessera::ids::RegionId;
use tessera::storage::{Engine, EngineOptions, PeerStorage};

use super::{entry, region, storage_with};

#[derive(Debug, Clone)]
enum Op {
    /// Append `len` entries of `term` starting `back` entries before the end (0 = after it).
    Append {
        region: u64,
        back: u64,
        len: u64,
        term: u64,
    },
    /// Mark applied up to `frac` of the way from the first to the last index (never back).
    Apply {
        region: u64,
        frac: u8,
    },
    /// Compact to `frac` of the way from the first to the last index.
    Compact {
        region: u64,
        frac: u8,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..=3u64, 0..4u64, 1..6u64, 0..3u64)
            .prop_map(|(region, back, len, term)| Op::Append { region, back, len, term }),
        1 => (1..=3u64, 0..=100u8).prop_map(|(region, frac)| Op::Apply { region, frac }),
        1 => (1..=3u64, 0..=100u8).prop_map(|(region, frac)| Op::Compact { region, frac }),
        1 => Just(Op::Reopen),
    ]
}

/// Per region: the truncated (index, term) and the live entries' terms from truncated + 1.
#[derive(Debug, Clone)]
struct ModelLog {
    truncated: (u64, u64),
    terms: Vec<u64>,
    max_term: u64,
    applied: u64,
}

impl ModelLog {
    fn last(&self) -> u64 {
        self.truncated.0 + self.terms.len() as u64
    }
    fn term(&self, i: u64) -> u64 {
        if i == self.truncated.0 {
            self.truncated.1
        } else {
            self.terms[(i - self.truncated.0 - 1) as usize]
        }
    }
}

fn check(ps: &PeerStorage, m: &ModelLog) -> Result<(), TestCaseError> {
    prop_assert_eq!(ps.first_index().unwrap(), m.truncated.0 + 1);
    prop_assert_eq!(ps.last_index().unwrap(), m.last());
    for i in m.truncated.0..=m.last() {
        prop_assert_eq!(ps.term(i).unwrap(), m.term(i));
    }
    for low in m.truncated.0 + 1..=m.last() {
        let want: Vec<_> = (low..=m.last()).map(|i| entry(i, m.term(i))).collect();
        let got = ps
            .entries(low, m.last() + 1, u64::MAX, GetEntriesContext::empty(false))
            .unwrap();
        prop_assert_eq!(&got, &want);
        // A size limit of two entries' worth returns exactly two (or all, if fewer).
        let two: u64 = want
            .iter()
            .take(2)
            .map(|e| u64::from(e.compute_size()))
            .sum();
        let got = ps
            .entries(low, m.last() + 1, two, GetEntriesContext::empty(false))
            .unwrap();
        prop_assert_eq!(&got[..], &want[..want.len().min(2)]);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn logs_match_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Engine::open(dir.path(), &EngineOptions::default()).unwrap();
        let mut model: BTreeMap<u64, ModelLog> = BTreeMap::new();
        let mut stores: BTreeMap<u64, PeerStorage> = BTreeMap::new();
        for r in 1..=3u64 {
            stores.insert(r, storage_with(&engine, &region(r, &[r as u8], &[r as u8 + 1]), 3, &[]));
            model.insert(r, ModelLog { truncated: (3, 3), terms: vec![], max_term: 3, applied: 3 });
        }
        for op in ops {
            match op {
                Op::Append { region, back, len, term } => {
                    let m = model.get_mut(&region).unwrap();
                    let ps = stores.get_mut(&region).unwrap();
                    let mut start = (m.last() + 1).saturating_sub(back);
                    if start > m.truncated.0 {
                        // Raft never replaces an applied entry.
                        start = start.max(m.applied + 1);
                    }
                    // Raft never appends with a term lower than what precedes; keep terms
                    // non-decreasing like a real log.
                    let t = m.max_term + term;
                    let ents: Vec<_> = (start..start + len).map(|i| entry(i, t)).collect();
                    let mut b = engine.batch();
                    let res = ps.append(&ents, &mut b);
                    if start <= m.truncated.0 {
                        prop_assert!(res.is_err());
                        continue;
                    }
                    res.unwrap();
                    engine.write(b, true).unwrap();
                    m.terms.truncate((start - m.truncated.0 - 1) as usize);
                    m.terms.extend(std::iter::repeat_n(t, len as usize));
                    m.max_term = t;
                }
                Op::Apply { region, frac } => {
                    let m = model.get_mut(&region).unwrap();
                    let ps = stores.get_mut(&region).unwrap();
                    let to = m.truncated.0 + (m.last() - m.truncated.0) * u64::from(frac) / 100;
                    if to > m.applied {
                        let mut b = engine.batch();
                        ps.set_applied_index(to, &mut b);
                        engine.write(b, true).unwrap();
                        m.applied = to;
                    }
                }
                Op::Compact { region, frac } => {
                    let m = model.get_mut(&region).unwrap();
                    let ps = stores.get_mut(&region).unwrap();
                    let to = m.truncated.0 + (m.last() - m.truncated.0) * u64::from(frac) / 100;
                    let mut b = engine.batch();
                    ps.set_applied_index(m.last(), &mut b);
                    m.applied = m.last();
                    ps.compact_to(to, &mut b).unwrap();
                    engine.write(b, true).unwrap();
                    if to > m.truncated.0 {
                        let term = m.term(to);
                        m.terms.drain(..(to - m.truncated.0) as usize);
                        m.truncated = (to, term);
                    }
                }
                Op::Reopen => {
                    stores.clear();
                    drop(engine);
                    engine = Engine::open(dir.path(), &EngineOptions::default()).unwrap();
                    for r in 1..=3u64 {
                        stores.insert(r, PeerStorage::open(engine.clone(), RegionId(r)).unwrap());
                    }
                }
            }
            for (r, m) in &model {
                check(&stores[r], m)?;
            }
        }
    }
}
