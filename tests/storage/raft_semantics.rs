//! The cases of raft-rs's `MemStorage` tests, run against `PeerStorage`. Our log keeps the
//! term of the truncated entry, so `term(truncated_index)` answers where MemStorage's dummy
//! entry would.

use protobuf::Message as _;
use raft::{GetEntriesContext, Storage, StorageError};
use tessera::ids::RegionId;
use tessera::proto::{RegionSnapshotData, SnapshotKv};
use tessera::storage::mvcc;
use tessera::storage::snapshot::generate_snapshot;
use tessera::storage::{keys, Cf, PeerStorage};

use super::{entry, open_engine, region, storage_with};

fn compacted<T>() -> raft::Result<T> {
    Err(raft::Error::Store(StorageError::Compacted))
}
fn unavailable<T>() -> raft::Result<T> {
    Err(raft::Error::Store(StorageError::Unavailable))
}
fn ctx() -> GetEntriesContext {
    GetEntriesContext::empty(false)
}

#[test]
fn term() {
    let (_d, engine) = open_engine();
    let ps = storage_with(
        &engine,
        &region(1, b"", b""),
        3,
        &[entry(4, 4), entry(5, 5)],
    );
    assert_eq!(ps.term(2), compacted());
    assert_eq!(ps.term(3), Ok(3));
    assert_eq!(ps.term(4), Ok(4));
    assert_eq!(ps.term(5), Ok(5));
    assert_eq!(ps.term(6), unavailable());
}

#[test]
fn entries_with_size_limits() {
    let (_d, engine) = open_engine();
    let ents = [entry(4, 4), entry(5, 5), entry(6, 6)];
    let ps = storage_with(&engine, &region(1, b"", b""), 3, &ents);
    let size = |i: usize| u64::from(ents[i].compute_size());
    let max = u64::MAX;
    assert_eq!(ps.entries(2, 6, max, ctx()), compacted());
    assert_eq!(ps.entries(3, 5, max, ctx()), compacted());
    assert_eq!(ps.entries(4, 5, max, ctx()), Ok(vec![entry(4, 4)]));
    assert_eq!(ps.entries(5, 6, max, ctx()), Ok(vec![entry(5, 5)]));
    assert_eq!(ps.entries(4, 6, max, ctx()), Ok(ents[..2].to_vec()));
    assert_eq!(ps.entries(4, 7, max, ctx()), Ok(ents.to_vec()));
    // Even with max_size 0 the first entry comes back.
    assert_eq!(ps.entries(4, 7, 0, ctx()), Ok(vec![entry(4, 4)]));
    assert_eq!(
        ps.entries(4, 7, size(0) + size(1), ctx()),
        Ok(ents[..2].to_vec())
    );
    assert_eq!(
        ps.entries(4, 7, size(0) + size(1) + size(2) / 2, ctx()),
        Ok(ents[..2].to_vec())
    );
    assert_eq!(
        ps.entries(4, 7, size(0) + size(1) + size(2) - 1, ctx()),
        Ok(ents[..2].to_vec())
    );
    assert_eq!(
        ps.entries(4, 7, size(0) + size(1) + size(2), ctx()),
        Ok(ents.to_vec())
    );
    // Past the end is an error, never a panic (MemStorage panics here).
    assert_eq!(ps.entries(4, 8, max, ctx()), unavailable());
    assert_eq!(ps.entries(5, 5, max, ctx()), Ok(vec![]));
}

#[test]
fn first_and_last_index() {
    let (_d, engine) = open_engine();
    let mut ps = storage_with(
        &engine,
        &region(1, b"", b""),
        3,
        &[entry(4, 4), entry(5, 5)],
    );
    assert_eq!(ps.first_index(), Ok(4));
    assert_eq!(ps.last_index(), Ok(5));
    let mut b = engine.batch();
    ps.append(&[entry(6, 5)], &mut b).unwrap();
    ps.set_applied_index(6, &mut b);
    engine.write(b, true).unwrap();
    assert_eq!(ps.last_index(), Ok(6));
    let mut b = engine.batch();
    ps.compact_to(4, &mut b).unwrap();
    engine.write(b, true).unwrap();
    assert_eq!(ps.first_index(), Ok(5));
    assert_eq!(ps.last_index(), Ok(6));
}

#[test]
fn compact() {
    // (compact to, want first index, want term at first index, want remaining entries)
    let cases = [(2, 4, 4, 3), (3, 4, 4, 3), (4, 5, 5, 2), (5, 6, 6, 1)];
    for (i, (to, first, term, len)) in cases.into_iter().enumerate() {
        let (_d, engine) = open_engine();
        let mut ps = storage_with(
            &engine,
            &region(1, b"", b""),
            3,
            &[entry(4, 4), entry(5, 5), entry(6, 6)],
        );
        let mut b = engine.batch();
        ps.compact_to(to, &mut b).unwrap();
        engine.write(b, true).unwrap();
        assert_eq!(ps.first_index(), Ok(first), "case {i}");
        let got = ps.entries(first, 7, u64::MAX, ctx()).unwrap();
        assert_eq!(got[0].term, term, "case {i}");
        assert_eq!(got.len(), len, "case {i}");
        assert_eq!(
            ps.term(first - 1).unwrap(),
            first - 1,
            "case {i}: truncated term kept"
        );
        // The compacted keys are really gone from disk.
        for idx in 4..first {
            let k = keys::raft_log_key(RegionId(1), idx);
            assert_eq!(engine.get(Cf::Raft, &k).unwrap(), None, "case {i}");
        }
    }
    // Compacting past the applied index is refused: those entries are still needed.
    let (_d, engine) = open_engine();
    let mut ps = storage_with(&engine, &region(1, b"", b""), 3, &[entry(4, 4)]);
    let mut b = engine.batch();
    ps.append(&[entry(5, 4)], &mut b).unwrap();
    assert!(ps.compact_to(5, &mut b).is_err());
}

#[test]
fn append_with_conflicts() {
    let base = [entry(4, 4), entry(5, 5), entry(6, 6)];
    let cases: Vec<(Vec<_>, Option<Vec<_>>)> = vec![
        (base.to_vec(), Some(base.to_vec())),
        (
            vec![entry(4, 4), entry(5, 7), entry(6, 7)],
            Some(vec![entry(4, 4), entry(5, 7), entry(6, 7)]),
        ),
        (
            vec![entry(4, 4), entry(5, 5), entry(6, 6), entry(7, 6)],
            Some(vec![entry(4, 4), entry(5, 5), entry(6, 6), entry(7, 6)]),
        ),
        // Overwriting compacted entries is refused.
        (vec![entry(3, 3), entry(4, 5)], None),
        // A conflicting entry truncates the suffix after it.
        (vec![entry(5, 7)], Some(vec![entry(4, 4), entry(5, 7)])),
        // Direct append.
        (
            vec![entry(7, 7)],
            Some(vec![entry(4, 4), entry(5, 5), entry(6, 6), entry(7, 7)]),
        ),
        // A gap is refused.
        (vec![entry(9, 7)], None),
    ];
    for (i, (ents, want)) in cases.into_iter().enumerate() {
        let (dir, engine) = open_engine();
        let reg = region(1, b"", b"");
        let mut ps = storage_with(&engine, &reg, 3, &base);
        // Pretend nothing past the truncation is applied, so any suffix may be replaced.
        let mut b = engine.batch();
        ps.set_applied_index(3, &mut b);
        let res = ps.append(&ents, &mut b);
        engine.write(b, true).unwrap();
        match want {
            None => assert!(res.is_err(), "case {i}: expected refusal"),
            Some(want) => {
                res.unwrap();
                let last = want.last().unwrap().index;
                assert_eq!(ps.last_index(), Ok(last), "case {i}");
                assert_eq!(ps.entries(4, last + 1, u64::MAX, ctx()), Ok(want.clone()));
                // Reopen from disk: nothing of a truncated suffix survives.
                drop(ps);
                drop(engine);
                let engine =
                    tessera::storage::Engine::open(dir.path(), &Default::default()).unwrap();
                let ps = PeerStorage::open(engine.clone(), RegionId(1)).unwrap();
                assert_eq!(ps.last_index(), Ok(last), "case {i} after reopen");
                assert_eq!(ps.entries(4, last + 1, u64::MAX, ctx()), Ok(want));
                let k = keys::raft_log_key(RegionId(1), last + 1);
                assert_eq!(engine.get(Cf::Raft, &k).unwrap(), None, "case {i}");
            }
        }
    }
}

fn put_data(engine: &tessera::storage::Engine, key: &[u8], value: &[u8]) {
    let mut b = engine.batch();
    b.put(Cf::Data, &keys::data_key(key), value);
    engine.write(b, true).unwrap();
}

#[test]
fn create_snapshot_holds_only_its_range() {
    let (_d, engine) = open_engine();
    let reg = region(1, b"b", b"d");
    let ps = storage_with(&engine, &reg, 3, &[entry(4, 4), entry(5, 5)]);
    for k in [&b"a"[..], b"b", b"c", b"cz", b"d", b"e"] {
        put_data(&engine, k, k);
    }
    let snap = generate_snapshot(&engine, RegionId(1)).unwrap();
    assert_eq!(snap.get_metadata().index, 5);
    assert_eq!(snap.get_metadata().term, 5);
    assert_eq!(
        snap.get_metadata().get_conf_state().voters,
        vec![11, 12, 13]
    );
    let data = <RegionSnapshotData as prost::Message>::decode(snap.get_data()).unwrap();
    let got: Vec<_> = data.kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(got, vec![b"b".to_vec(), b"c".to_vec(), b"cz".to_vec()]);
    assert_eq!(data.region.unwrap(), reg);

    // Through raft::Storage: generated off-thread, "temporarily unavailable" until ready.
    assert_eq!(
        ps.snapshot(5, 2),
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable
        ))
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let snap2 = loop {
        match ps.snapshot(5, 2) {
            Ok(s) => break s,
            Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)) => {
                assert!(std::time::Instant::now() < deadline, "snapshot never ready");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(snap2.get_metadata().index, 5);
    assert_eq!(snap2.get_data(), snap.get_data());
}

#[test]
fn apply_snapshot_replaces_range_log_and_state() {
    let (_d, src_engine) = open_engine();
    let reg = region(1, b"b", b"d");
    storage_with(
        &src_engine,
        &reg,
        3,
        &[entry(4, 4), entry(5, 5), entry(6, 6)],
    );
    put_data(&src_engine, b"b1", b"new");
    // History travels with the snapshot, and so does the sender's compacted revision.
    let rec = |v: &[u8], rev: u64| tessera::proto::KvRecord {
        value: v.to_vec(),
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease: 0,
    };
    let mut b = src_engine.batch();
    mvcc::record(&mut b, b"b1", 40, &rec(b"old", 40));
    mvcc::record(&mut b, b"b1", 50, &rec(b"new", 50));
    mvcc::record(&mut b, b"e", 45, &rec(b"outside", 45));
    mvcc::store_compacted(&mut b, 30);
    src_engine.write(b, true).unwrap();
    let snap = generate_snapshot(&src_engine, RegionId(1)).unwrap();

    let (_d2, engine) = open_engine();
    let mut ps = storage_with(&engine, &reg, 3, &[entry(4, 4)]);
    let mut b = engine.batch();
    ps.set_applied_index(3, &mut b);
    engine.write(b, true).unwrap();
    put_data(&engine, b"a", b"outside-left");
    put_data(&engine, b"c", b"stale");
    put_data(&engine, b"d", b"outside-right");
    let mut b = engine.batch();
    mvcc::record(&mut b, b"c", 35, &rec(b"stale", 35));
    mvcc::record(&mut b, b"a", 35, &rec(b"outside-left", 35));
    engine.write(b, true).unwrap();

    let mut b = engine.batch();
    ps.apply_snapshot(&snap, &mut b).unwrap();
    engine.write(b, true).unwrap();
    let at = |k: &[u8], rev| mvcc::get_at(&engine, k, rev).unwrap().map(|r| r.value);
    assert_eq!(at(b"b1", 45).as_deref(), Some(&b"old"[..]));
    assert_eq!(at(b"b1", 50).as_deref(), Some(&b"new"[..]));
    assert_eq!(at(b"c", 40), None, "stale history inside the range is gone");
    assert_eq!(at(b"a", 40).as_deref(), Some(&b"outside-left"[..]));
    assert_eq!(
        at(b"e", 50),
        None,
        "the sender's rows outside the range stay there"
    );
    assert_eq!(engine.compacted_revision(), 30);
    assert_eq!(mvcc::load_compacted(&engine).unwrap(), 30);
    assert_eq!(ps.first_index(), Ok(7));
    assert_eq!(ps.last_index(), Ok(6));
    assert_eq!(ps.term(6), Ok(6));
    assert_eq!(ps.applied_index(), 6);
    let get = |k: &[u8]| engine.get(Cf::Data, &keys::data_key(k)).unwrap();
    assert_eq!(get(b"b1").as_deref(), Some(&b"new"[..]));
    assert_eq!(get(b"c"), None, "stale key inside the range is gone");
    assert_eq!(get(b"a").as_deref(), Some(&b"outside-left"[..]));
    assert_eq!(get(b"d").as_deref(), Some(&b"outside-right"[..]));
    assert_eq!(
        engine
            .get(Cf::Raft, &keys::raft_log_key(RegionId(1), 4))
            .unwrap(),
        None
    );

    // An older (or equal) snapshot is out of date.
    let mut b = engine.batch();
    assert!(ps.apply_snapshot(&snap, &mut b).is_err());

    // A snapshot of another region, or with garbage data, is refused, not applied.
    let mut other = snap.clone();
    other.set_data(
        prost::Message::encode_to_vec(&RegionSnapshotData {
            region: Some(region(2, b"", b"")),
            sessions: vec![],
            max_revision: 0,
            history: vec![],
            compacted_revision: 0,
            merge: None,
            kvs: vec![],
        })
        .into(),
    );
    other.mut_metadata().index = 100;
    assert!(ps.apply_snapshot(&other, &mut b).is_err());
    let mut garbage = snap.clone();
    garbage.set_data(vec![0xff, 0xff, 0xff].into());
    garbage.mut_metadata().index = 100;
    assert!(ps.apply_snapshot(&garbage, &mut b).is_err());
    let mut outside = snap.clone();
    outside.set_data(
        prost::Message::encode_to_vec(&RegionSnapshotData {
            region: Some(reg.clone()),
            sessions: vec![],
            max_revision: 0,
            history: vec![],
            compacted_revision: 0,
            merge: None,
            kvs: vec![SnapshotKv {
                key: b"zzz".to_vec(),
                value: vec![],
            }],
        })
        .into(),
    );
    outside.mut_metadata().index = 100;
    assert!(ps.apply_snapshot(&outside, &mut b).is_err());
    let mut outside_history = snap.clone();
    outside_history.set_data(
        prost::Message::encode_to_vec(&RegionSnapshotData {
            region: Some(reg.clone()),
            history: vec![SnapshotKv {
                key: mvcc::history_key(b"zzz", 7),
                value: vec![],
            }],
            ..Default::default()
        })
        .into(),
    );
    outside_history.mut_metadata().index = 100;
    assert!(ps.apply_snapshot(&outside_history, &mut b).is_err());
}

/// Entries appended but not applied are served from the in-memory cache; the same reads after
/// a reopen (cache empty, engine only) must give the same answers, size limits included.
#[test]
fn cached_entries_read_like_stored_ones() {
    let (_d, engine) = open_engine();
    let mut ps = storage_with(&engine, &region(1, b"", b""), 3, &[entry(4, 4)]);
    let ents: Vec<_> = (5..=9).map(|i| entry(i, 5 + i / 8)).collect();
    let mut b = engine.batch();
    ps.append(&ents, &mut b).unwrap();
    // A conflicting suffix replaces the cached tail, as it does on disk.
    ps.append(&[entry(8, 7), entry(9, 7)], &mut b).unwrap();
    ps.set_applied_index(6, &mut b);
    engine.write(b, true).unwrap();
    let reopened = PeerStorage::open(engine.clone(), RegionId(1)).unwrap();
    let one = u64::from(entry(7, 6).compute_size());
    for low in 4..=9 {
        for max in [0, one, 2 * one + 1, u64::MAX] {
            let cached = ps.entries(low, 10, max, ctx());
            assert_eq!(
                cached,
                reopened.entries(low, 10, max, ctx()),
                "[{low}, 10) max {max}"
            );
            assert!(cached.is_ok_and(|e| e[0].index == low));
        }
    }
    for i in 3..=9 {
        assert_eq!(ps.term(i), reopened.term(i), "term of {i}");
    }
    assert_eq!(ps.term(8), Ok(7));
    assert_eq!(ps.entries(4, 11, u64::MAX, ctx()), unavailable());
}

/// A commit-only advance is not written on its own; after a restart the commit index is at
/// least the applied index, which raft-rs requires (applied <= committed).
#[test]
fn commit_reopens_at_least_at_applied() {
    let (_d, engine) = open_engine();
    let mut ps = storage_with(&engine, &region(1, b"", b""), 3, &[]);
    let mut b = engine.batch();
    ps.append(&[entry(4, 4), entry(5, 4), entry(6, 4)], &mut b)
        .unwrap();
    engine.write(b, true).unwrap();
    ps.set_commit(6);
    let mut b = engine.batch();
    ps.set_applied_index(5, &mut b);
    engine.write(b, true).unwrap();
    assert_eq!(ps.initial_state().unwrap().hard_state.commit, 6);
    let reopened = PeerStorage::open(engine.clone(), RegionId(1)).unwrap();
    let hs = reopened.initial_state().unwrap().hard_state;
    assert_eq!(hs.commit, 5, "raised from the stored 3 to the applied 5");
    assert_eq!(reopened.applied_index(), 5);
}

/// The raft state record is rewritten only when term or vote change; on reopen the last
/// index (and its term) come from the log itself, or from the truncation point once the
/// log is compacted away.
#[test]
fn raft_state_written_for_term_and_vote_last_index_read_from_the_log() {
    use raft::eraftpb::HardState;
    use tessera::proto::RaftLocalState;
    let (dir, engine) = open_engine();
    let mut ps = storage_with(&engine, &region(1, b"", b""), 3, &[]);
    let stored = |engine: &tessera::storage::Engine| -> RaftLocalState {
        engine
            .get_msg(Cf::Raft, &keys::raft_state_key(RegionId(1)))
            .unwrap()
            .unwrap()
    };
    let persist = |ps: &mut PeerStorage, ents: &[raft::eraftpb::Entry], hs: Option<HardState>| {
        let mut b = engine.batch();
        ps.persist(ents, hs.as_ref(), &mut b).unwrap();
        engine.write(b, true).unwrap();
    };
    // Appends alone leave the record as it was.
    persist(&mut ps, &[entry(4, 4), entry(5, 4)], None);
    assert_eq!(stored(&engine).last_index, 3);
    // A new term and vote are written with the round's entries.
    let hs = |term, vote, commit| HardState {
        term,
        vote,
        commit,
        ..Default::default()
    };
    persist(&mut ps, &[entry(6, 5)], Some(hs(5, 2, 4)));
    let st = stored(&engine);
    assert_eq!((st.term, st.vote, st.commit, st.last_index), (5, 2, 4, 6));
    // A commit-only change is not.
    persist(&mut ps, &[entry(7, 5)], Some(hs(5, 2, 6)));
    assert_eq!(stored(&engine).commit, 4);

    let reopen = |engine: &tessera::storage::Engine| PeerStorage::open(engine.clone(), RegionId(1));
    let again = reopen(&engine).unwrap();
    assert_eq!(again.last_index(), Ok(7));
    assert_eq!(again.term(7), Ok(5));
    let st = again.initial_state().unwrap().hard_state;
    assert_eq!((st.term, st.vote, st.commit), (5, 2, 4));

    // Compacted up to the last entry: the log holds no key, it ends at the truncation.
    let mut b = engine.batch();
    ps.set_applied_index(7, &mut b);
    ps.compact_to(7, &mut b).unwrap();
    engine.write(b, true).unwrap();
    drop((ps, again));
    drop(engine);
    let engine = tessera::storage::Engine::open(dir.path(), &Default::default()).unwrap();
    let again = reopen(&engine).unwrap();
    assert_eq!(again.last_index(), Ok(7));
    assert_eq!(again.first_index(), Ok(8));
    assert_eq!(again.term(7), Ok(5));
    assert_eq!(again.initial_state().unwrap().hard_state.commit, 7);
}
