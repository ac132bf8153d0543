use super::*;
use proptest::prelude::*;

fn engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), &Default::default()).unwrap();
    (dir, engine)
}

fn live(value: &str, rev: u64, version: u64) -> KvRecord {
    KvRecord {
        value: value.as_bytes().to_vec(),
        create_revision: rev + 1 - version,
        mod_revision: rev,
        version,
        lease: 0,
    }
}

fn write(engine: &Engine, key: &[u8], rev: u64, rec: KvRecord) {
    let mut wb = engine.batch();
    record(&mut wb, key, rev, &rec);
    engine.write(wb, false).unwrap();
}

fn value_at(engine: &Engine, key: &[u8], rev: u64) -> Option<String> {
    get_at(engine, key, rev)
        .unwrap()
        .map(|r| String::from_utf8(r.value).unwrap())
}

fn scan_values(engine: &Engine, rev: u64) -> Vec<(String, String)> {
    let mut out = Vec::new();
    scan_at(engine, b"", b"", rev, |k, r| {
        out.push((
            String::from_utf8(k).unwrap(),
            String::from_utf8(r.value).unwrap(),
        ));
        Ok(true)
    })
    .unwrap();
    out
}

proptest! {
    /// Rows sort by key, then revision, and no key's rows fall among another's (keys
    /// with zero bytes and prefixes of each other included).
    #[test]
    fn rows_sort_by_key_then_revision(
        a in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..6),
        b in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..6),
        ra in any::<u64>(),
        rb in any::<u64>(),
    ) {
        let (ka, kb) = (history_key(&a, ra), history_key(&b, rb));
        prop_assert_eq!(ka.cmp(&kb), (&a, ra).cmp(&(&b, rb)));
        prop_assert_eq!(parse_history_key(&ka), Some((a.clone(), ra)));
    }

    /// A key's rows fall within the bounds of `[start, end)` exactly when the key does.
    #[test]
    fn range_bounds_hold_exactly_the_range(
        start in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..4),
        end in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), any::<u8>()], 0..4),
        key in proptest::collection::vec(prop_oneof![Just(0u8), Just(1u8), 0u8..0xFF], 0..5),
        rev in any::<u64>(),
    ) {
        let (lo, hi) = range_bounds(&start, &end);
        let row = history_key(&key, rev);
        let inside = key >= start && (end.is_empty() || key < end);
        // Keys from 0xFF on are the system keyspace, which keeps no history.
        prop_assume!(key.first() != Some(&0xFF));
        prop_assert_eq!(lo <= row && row < hi, inside);
    }
}

#[test]
fn reads_at_a_revision_see_the_newest_row_at_or_below_it() {
    let (_d, e) = engine();
    write(&e, b"a", 10, live("a1", 10, 1));
    write(&e, b"a", 20, live("a2", 20, 2));
    write(&e, b"a", 30, tombstone(30));
    write(&e, b"a\0", 15, live("other", 15, 1));
    write(&e, b"b", 25, live("b1", 25, 1));
    assert_eq!(value_at(&e, b"a", 9), None);
    assert_eq!(value_at(&e, b"a", 10).as_deref(), Some("a1"));
    assert_eq!(value_at(&e, b"a", 19).as_deref(), Some("a1"));
    assert_eq!(value_at(&e, b"a", 29).as_deref(), Some("a2"));
    assert_eq!(value_at(&e, b"a", 30), None, "deleted at 30");
    assert_eq!(value_at(&e, b"a", u64::MAX), None);
    assert_eq!(value_at(&e, b"a\0", 100).as_deref(), Some("other"));
    let pairs = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(k, x)| (k.to_string(), x.to_string()))
            .collect::<Vec<_>>()
    };
    assert_eq!(scan_values(&e, 16), pairs(&[("a", "a1"), ("a\0", "other")]));
    assert_eq!(
        scan_values(&e, 25),
        pairs(&[("a", "a2"), ("a\0", "other"), ("b", "b1")])
    );
    assert_eq!(scan_values(&e, 30), pairs(&[("a\0", "other"), ("b", "b1")]));
    // Keys with no row at or below the revision are skipped, whatever lies around them.
    assert_eq!(scan_values(&e, 12), pairs(&[("a", "a1")]));
    assert_eq!(scan_values(&e, 9), pairs(&[]));
    // A scan stops when told to.
    let mut seen = 0;
    scan_at(&e, b"", b"", 25, |_, _| {
        seen += 1;
        Ok(false)
    })
    .unwrap();
    assert_eq!(seen, 1);
    // A range in the middle: only its keys.
    let mut keys = Vec::new();
    scan_at(&e, b"a\0", b"b", 100, |k, _| {
        keys.push(k);
        Ok(true)
    })
    .unwrap();
    assert_eq!(keys, vec![b"a\0".to_vec()]);
}

#[test]
fn compaction_keeps_every_read_at_or_above_its_revision() {
    let (_d, e) = engine();
    write(&e, b"a", 10, live("a1", 10, 1));
    write(&e, b"a", 20, live("a2", 20, 2));
    write(&e, b"a", 30, live("a3", 30, 3));
    write(&e, b"d", 5, live("d1", 5, 1));
    write(&e, b"d", 12, tombstone(12));
    write(&e, b"t", 8, live("t1", 8, 1));
    write(&e, b"t", 26, tombstone(26));
    write(&e, b"x", 24, live("x1", 24, 1));
    let reads = |e: &Engine| -> Vec<Vec<(String, String)>> {
        (25..=35).map(|r| scan_values(e, r)).collect()
    };
    let before = reads(&e);
    let removed = compact(&e, 25).unwrap();
    assert_eq!(reads(&e), before, "reads at or above 25 unchanged");
    // a@10 (superseded by a@20), d@5 and the tombstone d@12; t keeps t1 (live at 25).
    assert_eq!(removed, 3);
    assert_eq!(value_at(&e, b"a", 20).as_deref(), Some("a2"));
    assert_eq!(value_at(&e, b"t", 25).as_deref(), Some("t1"));
    // Compacting again at a later revision drops what became unreachable.
    let removed = compact(&e, 31).unwrap();
    assert_eq!(removed, 3, "a@20, and t's row and tombstone");
    assert_eq!(value_at(&e, b"a", 31).as_deref(), Some("a3"));
    assert_eq!(scan_values(&e, 31).len(), 2);
    assert_eq!(compact(&e, 31).unwrap(), 0, "idempotent");
}

#[test]
fn the_compacted_revision_is_kept() {
    let (_d, e) = engine();
    assert_eq!(load_compacted(&e).unwrap(), 0);
    let mut wb = e.batch();
    store_compacted(&mut wb, 42);
    e.write(wb, false).unwrap();
    assert_eq!(load_compacted(&e).unwrap(), 42);
}

proptest! {
    /// Reading changes in windows of any size from any revision gives exactly the writes
    /// of the range in that window, by revision, each with the key's record before it,
    /// and a window cut short by its limit ends on a whole revision.
    #[test]
    fn changes_are_the_range_writes_by_revision(
        writes in proptest::collection::vec((0u8..6, any::<bool>()), 1..40),
        from in 1u64..45,
        limit in 1usize..8,
    ) {
        let (_dir, engine) = engine();
        // Model: key -> current record; every write at its own revision, some batched
        // (two keys sharing a revision) to test whole revisions.
        let mut state: std::collections::BTreeMap<Vec<u8>, KvRecord> = Default::default();
        let mut expected: Vec<(u64, Vec<u8>, bool, Option<KvRecord>)> = Vec::new();
        for (i, (k, is_put)) in writes.iter().enumerate() {
            let rev = 1 + i as u64 / 2;
            let key = vec![b'a', *k];
            if expected.iter().any(|(r, kk, _, _)| *r == rev && *kk == key) {
                continue;
            }
            let prev = state.get(&key).cloned();
            let rec = if *is_put {
                let version = prev.as_ref().map_or(1, |p| p.version + 1);
                KvRecord { value: vec![*k; 3], create_revision: rev, mod_revision: rev, version, lease: 0 }
            } else if prev.is_some() {
                tombstone(rev)
            } else {
                continue;
            };
            write(&engine, &key, rev, rec.clone());
            if is_tombstone(&rec) { state.remove(&key); } else { state.insert(key.clone(), rec); }
            expected.push((rev, key, *is_put, prev));
        }
        // A key outside the range never shows up.
        write(&engine, b"b", 3, live("other", 3, 1));
        let to = 30;
        let mut next = from;
        let mut got = Vec::new();
        while next <= to {
            let (batch, upto) = changes(&engine, b"a", b"b", next, to, limit).unwrap();
            prop_assert!(upto >= next || batch.is_empty());
            prop_assert!(batch.len() <= 1 || batch.values().map(Vec::len).sum::<usize>() <= limit);
            for (rev, cs) in batch {
                prop_assert!(rev >= next && rev <= upto);
                for c in cs {
                    got.push((rev, c.key, !is_tombstone(&c.record), c.prev));
                }
            }
            next = upto + 1;
        }
        let mut want: Vec<_> = expected.into_iter().filter(|(r, ..)| *r >= from && *r <= to).collect();
        want.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        prop_assert_eq!(got, want);
    }
}
