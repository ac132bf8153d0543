//! Many regions share one RocksDB: what one region's storage does never touches another's
//! keys, and everything survives closing and reopening the instance.

use raft::{GetEntriesContext, Storage};
use tessera::ids::RegionId;
use tessera::storage::snapshot::generate_snapshot;
use tessera::storage::{keys, Cf, Engine, EngineOptions, PeerStorage};

use super::{entry, open_engine, region, storage_with};

/// Every raft-CF key and value belonging to `region`.
fn raft_keys_of(engine: &Engine, region: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let id = RegionId(region);
    let mut out = Vec::new();
    let (s, e) = keys::region_raft_range(id);
    engine
        .scan(Cf::Raft, &s, &e, |k, v| {
            out.push((k.to_vec(), v.to_vec()));
            Ok(true)
        })
        .unwrap();
    out.push((
        keys::region_state_key(id).to_vec(),
        engine
            .get(Cf::Raft, &keys::region_state_key(id))
            .unwrap()
            .unwrap_or_default(),
    ));
    out
}

#[test]
fn compaction_and_snapshots_stay_inside_their_region() {
    let (_d, engine) = open_engine();
    // Regions 1..=16 with adjacent ids and adjacent key ranges, 20 entries each.
    let mut stores: Vec<PeerStorage> = (1..=16u64)
        .map(|r| {
            let start = [r as u8 * 10];
            let end = [r as u8 * 10 + 10];
            let ents: Vec<_> = (4..24).map(|i| entry(i, 4)).collect();
            storage_with(&engine, &region(r, &start, &end), 3, &ents)
        })
        .collect();
    let before: Vec<_> = (1..=16).map(|r| raft_keys_of(&engine, r)).collect();

    // Compact region 8 entirely, and replace region 9 with a snapshot from elsewhere.
    let mut b = engine.batch();
    stores[7].compact_to(23, &mut b).unwrap();
    engine.write(b, true).unwrap();

    let (_d2, other) = open_engine();
    let ents: Vec<_> = (4..40).map(|i| entry(i, 6)).collect();
    storage_with(&other, &region(9, &[90], &[100]), 3, &ents);
    let snap = generate_snapshot(&other, RegionId(9)).unwrap();
    let mut b = engine.batch();
    stores[8].apply_snapshot(&snap, &mut b).unwrap();
    engine.write(b, true).unwrap();

    for r in 1..=16u64 {
        if r == 8 || r == 9 {
            continue;
        }
        assert_eq!(
            raft_keys_of(&engine, r),
            before[r as usize - 1],
            "region {r} was touched"
        );
    }
    assert_eq!(stores[7].first_index(), Ok(24));
    assert_eq!(stores[8].first_index(), Ok(40));
    // The neighbours of regions 8 and 9 (7 and 10) still read their full logs.
    for r in [6usize, 9] {
        let got = stores[r]
            .entries(4, 24, u64::MAX, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 20);
    }
}

#[test]
fn reopen_returns_exactly_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot_of = |engine: &Engine| -> Vec<_> {
        (1..=4u64)
            .map(|r| {
                let ps = PeerStorage::open(engine.clone(), RegionId(r)).unwrap();
                let st = ps.initial_state().unwrap();
                let first = ps.first_index().unwrap();
                let last = ps.last_index().unwrap();
                let ents = ps
                    .entries(first, last + 1, u64::MAX, GetEntriesContext::empty(false))
                    .unwrap();
                (
                    st.hard_state,
                    st.conf_state,
                    first,
                    last,
                    ps.term(first - 1).unwrap(),
                    ps.applied_index(),
                    ps.region().clone(),
                    ents,
                )
            })
            .collect()
    };
    let before = {
        let engine = Engine::open(dir.path(), &EngineOptions::default()).unwrap();
        for r in 1..=4u64 {
            let ents: Vec<_> = (4..(4 + r * 5)).map(|i| entry(i, 4 + i % 3)).collect();
            let mut ps = storage_with(&engine, &region(r, &[r as u8], &[r as u8 + 1]), 3, &ents);
            let mut b = engine.batch();
            let hs = raft::eraftpb::HardState {
                term: 9,
                vote: r * 10 + 2,
                commit: 3 + r * 5,
                ..Default::default()
            };
            ps.persist(&[], Some(&hs), &mut b).unwrap();
            ps.compact_to(3 + r, &mut b).unwrap();
            engine.write(b, true).unwrap();
        }
        snapshot_of(&engine)
    };
    let engine = Engine::open(dir.path(), &EngineOptions::default()).unwrap();
    assert_eq!(snapshot_of(&engine), before);
    assert!(matches!(
        PeerStorage::open(engine.clone(), RegionId(99)),
        Err(tessera::storage::Error::RegionNotFound(_))
    ));
}

/// Corrupt state records on disk give a typed error when the region is opened, never a panic.
#[test]
fn corrupt_state_records_are_errors_not_panics() {
    use proptest::prelude::*;
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 64,
        ..Default::default()
    });
    let (_d, engine) = open_engine();
    let reg = region(1, b"a", b"b");
    storage_with(&engine, &reg, 3, &[entry(4, 4), entry(5, 5)]);
    runner
        .run(
            &(0usize..4, proptest::collection::vec(any::<u8>(), 0..64)),
            |(which, garbage)| {
                let id = RegionId(1);
                let key = match which {
                    0 => keys::raft_state_key(id).to_vec(),
                    1 => keys::apply_state_key(id).to_vec(),
                    2 => keys::region_state_key(id).to_vec(),
                    _ => keys::raft_log_key(id, 5).to_vec(),
                };
                let old = engine.get(Cf::Raft, &key).unwrap();
                let mut b = engine.batch();
                b.put(Cf::Raft, &key, &garbage);
                engine.write(b, false).unwrap();
                match PeerStorage::open(engine.clone(), id) {
                    Ok(ps) => {
                        // Whatever decoded, reads answer with entries or an error.
                        let _ = ps.region();
                        let _ = ps.entries(4, 6, u64::MAX, GetEntriesContext::empty(false));
                        let _ = ps.term(5);
                    }
                    Err(tessera::storage::Error::Corrupt { key: k, .. }) => {
                        // The error names a key of this region's state.
                        prop_assert!(k.starts_with(&[0x01]), "corrupt key {k:02x?}");
                    }
                    Err(e) => prop_assert!(false, "unexpected error kind: {e}"),
                }
                let mut b = engine.batch();
                b.put(Cf::Raft, &key, &old.unwrap_or_default());
                engine.write(b, false).unwrap();
                Ok(())
            },
        )
        .unwrap();
}

/// Snapshot data comes from the network: arbitrary bytes, and well-formed snapshots of the
/// wrong region or with keys outside the region, are refused with an error and leave the
/// batch empty — nothing stored (this region's data and log, a neighbour's data) changes.
#[test]
fn garbage_snapshots_are_refused_and_change_nothing() {
    use proptest::prelude::*;
    use raft::eraftpb::Snapshot;
    use tessera::proto::{RegionSnapshotData, SnapshotKv};

    let (_d, engine) = open_engine();
    let reg = region(1, b"m", b"t");
    storage_with(&engine, &reg, 3, &[entry(4, 4), entry(5, 5)]);
    let mut b = engine.batch();
    for k in [&b"a"[..], b"n", b"p", b"z"] {
        b.put(Cf::Data, &keys::data_key(k), b"kept");
    }
    engine.write(b, true).unwrap();
    let everything = |e: &Engine| {
        let mut out = Vec::new();
        for cf in [Cf::Data, Cf::Raft] {
            e.scan(cf, &[], &[0xff; 16], |k, v| {
                out.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .unwrap();
        }
        out
    };
    let before = everything(&engine);
    let kv = (
        proptest::collection::vec(any::<u8>(), 0..4),
        proptest::collection::vec(any::<u8>(), 0..4),
    );
    let garbage = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        // Decodes, but names another region or carries a key outside [m, t).
        (0u64..3, proptest::collection::vec(kv, 1..4)).prop_map(|(id, kvs)| {
            let data = RegionSnapshotData {
                region: (id > 0).then(|| region(id, b"m", b"t")),
                sessions: vec![],
                max_revision: 0,
                history: vec![],
                compacted_revision: 0,
                merge: None,
                kvs: kvs
                    .into_iter()
                    .map(|(k, v)| SnapshotKv {
                        key: if k.first().is_some_and(|b| (b'm'..b't').contains(b)) {
                            [b"z".as_slice(), &k].concat()
                        } else {
                            k
                        },
                        value: v,
                    })
                    .collect(),
            };
            prost::Message::encode_to_vec(&data)
        }),
    ];
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 256,
        ..Default::default()
    });
    runner
        .run(&(garbage, 6u64..100), |(data, index)| {
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = index;
            snap.mut_metadata().term = 6;
            snap.set_data(data.into());
            let mut ps = PeerStorage::open(engine.clone(), RegionId(1)).unwrap();
            let mut b = engine.batch();
            let res = ps.apply_snapshot(&snap, &mut b);
            prop_assert!(res.is_err(), "garbage snapshot accepted");
            prop_assert!(b.is_empty(), "a refused snapshot wrote to the batch");
            Ok(())
        })
        .unwrap();
    assert_eq!(everything(&engine), before);
    let ps = PeerStorage::open(engine.clone(), RegionId(1)).unwrap();
    assert_eq!(ps.applied_index(), 5);
}

/// A region state that decodes but carries no descriptor (an empty record decodes to the
/// default message) is damage: opening the region says so instead of panicking later.
#[test]
fn region_state_without_descriptor_is_corrupt() {
    let (_d, engine) = open_engine();
    let reg = region(1, b"a", b"b");
    storage_with(&engine, &reg, 3, &[entry(4, 4)]);
    let mut b = engine.batch();
    b.put(Cf::Raft, &keys::region_state_key(RegionId(1)), &[]);
    engine.write(b, false).unwrap();
    match PeerStorage::open(engine.clone(), RegionId(1)) {
        Err(tessera::storage::Error::Corrupt { key, .. }) => {
            assert_eq!(key, keys::region_state_key(RegionId(1)).to_vec())
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a region state without its region was accepted"),
    }
}

/// The raft family inserts with a per-region hint (docs/architecture.md, "Storage: one RocksDB per node"): the
/// option must reach RocksDB, and interleaved writes of many regions, plus keys shorter
/// than the hint's prefix, must read back exactly as written.
#[test]
fn raft_family_uses_a_per_region_insert_hint() {
    let (dir, engine) = open_engine();
    let options: String = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    let raft_section = options
        .split("[CFOptions \"raft\"]")
        .nth(1)
        .expect("the OPTIONS file describes the raft family");
    let raft_section = raft_section.split("[TableOptions").next().unwrap();
    assert!(
        raft_section.contains(&format!(
            "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{}",
            keys::REGION_PREFIX_LEN
        )),
        "raft family options: {raft_section}"
    );

    // Rounds that each append one entry to every region, in a scrambled region order, and
    // rewrite each region's apply state: the write pattern of many busy regions.
    let regions: Vec<u64> = (1..=40).collect();
    for index in 1..=30u64 {
        let mut batch = engine.batch();
        // 7 is coprime with 40: each round visits every region once, in another order.
        for i in 0..regions.len() {
            let r = regions[(i * 7 + index as usize) % regions.len()];
            let id = RegionId(r);
            batch.put(
                Cf::Raft,
                &keys::raft_log_key(id, index),
                format!("{r}/{index}").as_bytes(),
            );
            batch.put(Cf::Raft, &keys::apply_state_key(id), &index.to_be_bytes());
        }
        batch.put(Cf::Raft, &keys::NODE_IDENT_KEY, &index.to_be_bytes());
        engine.write(batch, false).unwrap();
    }
    for r in regions {
        let id = RegionId(r);
        let (s, e) = keys::raft_log_range(id);
        let mut logs = Vec::new();
        engine
            .scan(Cf::Raft, &s, &e, |k, v| {
                logs.push((k.to_vec(), v.to_vec()));
                Ok(true)
            })
            .unwrap();
        let want: Vec<_> = (1..=30u64)
            .map(|i| {
                (
                    keys::raft_log_key(id, i).to_vec(),
                    format!("{r}/{i}").into_bytes(),
                )
            })
            .collect();
        assert_eq!(logs, want, "region {r}");
        assert_eq!(
            engine.get(Cf::Raft, &keys::apply_state_key(id)).unwrap(),
            Some(30u64.to_be_bytes().to_vec())
        );
    }
    assert_eq!(
        engine.get(Cf::Raft, &keys::NODE_IDENT_KEY).unwrap(),
        Some(30u64.to_be_bytes().to_vec())
    );
}
