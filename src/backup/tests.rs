use super::*;

const LIMITS: Limits = Limits {
    max_key_size: 4096,
    max_value_size: 1 << 20,
};

fn kv(key: &[u8], rev: u64, lease: u64) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        value: format!("v{rev}").into_bytes(),
        create_revision: rev,
        mod_revision: rev,
        version: 1,
        lease,
    }
}

/// A backup of two regions `[-, "m")` and `["m", 0xFF)` with `keys` per region.
fn write_backup(dir: &Path, keys: u64) -> Manifest {
    let mut regions = Vec::new();
    for (i, (start, end)) in [(b"".to_vec(), b"m".to_vec()), (b"m".to_vec(), vec![0xFF])]
        .into_iter()
        .enumerate()
    {
        let mut w = RecordWriter::create(&dir.join(region_file(i))).unwrap();
        for k in 0..keys {
            let base = if i == 0 { "a" } else { "n" };
            let key = format!("{base}{k:05}");
            w.write(&kv(key.as_bytes(), 10 + k, if k == 0 { 7 } else { 0 }))
                .unwrap();
        }
        let (keys, bytes) = (w.keys, w.bytes);
        regions.push(RegionEntry {
            start: hex(&start),
            end: hex(&end),
            file: region_file(i),
            keys,
            bytes,
            sha256: w.finish().unwrap(),
        });
    }
    let m = Manifest {
        format: FORMAT.into(),
        cluster_id: 1,
        revision: 10 + keys,
        end_revision: 20 + keys,
        created_at_ms: 1,
        keys: regions.iter().map(|r| r.keys).sum(),
        bytes: regions.iter().map(|r| r.bytes).sum(),
        leases: vec![LeaseEntry {
            id: 7,
            ttl_ms: 60_000,
            deadline_ms: 2,
        }],
        regions,
    };
    write_manifest(dir, &m).unwrap();
    m
}

fn refused(dir: &Path) -> String {
    match verify(dir, &LIMITS, |_| {}) {
        Ok(_) => panic!("a damaged backup was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_backup_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let m = write_backup(dir.path(), 300);
    let v = verify(dir.path(), &LIMITS, |_| {}).unwrap();
    assert_eq!(v.manifest, m);
    assert_eq!(v.regions.len(), 2);
    assert_eq!(v.regions[1].start, b"m");
    let mut seen = Vec::new();
    read_region(&v.manifest, &LIMITS, 1, &v.regions[1], |kv| {
        seen.push(kv);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen.len(), 300);
    assert_eq!(seen[0], kv(b"n00000", 10, 7));
}

#[test]
fn a_flipped_byte_a_truncation_or_a_missing_manifest_is_refused() {
    // A flipped byte in a value: the file's checksum.
    let dir = tempfile::tempdir().unwrap();
    write_backup(dir.path(), 100);
    let f = dir.path().join(region_file(1));
    let mut b = std::fs::read(&f).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x01;
    std::fs::write(&f, &b).unwrap();
    let e = refused(dir.path());
    assert!(e.contains("region-00001.kv"), "{e}");

    // A truncated file.
    let dir = tempfile::tempdir().unwrap();
    write_backup(dir.path(), 100);
    let f = dir.path().join(region_file(0));
    let b = std::fs::read(&f).unwrap();
    std::fs::write(&f, &b[..b.len() - 3]).unwrap();
    let e = refused(dir.path());
    assert!(e.contains("truncated"), "{e}");

    // A file cut at a record boundary: the counts.
    let dir = tempfile::tempdir().unwrap();
    write_backup(dir.path(), 100);
    let f = dir.path().join(region_file(0));
    let b = std::fs::read(&f).unwrap();
    let first = kv(b"a00000", 10, 7).encode_length_delimited_to_vec().len();
    std::fs::write(&f, &b[..first]).unwrap();
    let e = refused(dir.path());
    assert!(e.contains("the manifest says 100 keys"), "{e}");

    // An unfinished backup (no checksum of the manifest), and no backup at all.
    let dir = tempfile::tempdir().unwrap();
    write_backup(dir.path(), 10);
    std::fs::remove_file(dir.path().join(MANIFEST_SUM)).unwrap();
    assert!(refused(dir.path()).contains("did not finish"));
    let empty = tempfile::tempdir().unwrap();
    assert!(refused(empty.path()).contains("no manifest.json"));

    // A manifest edited by hand.
    let dir = tempfile::tempdir().unwrap();
    write_backup(dir.path(), 10);
    let p = dir.path().join(MANIFEST);
    let s = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, s.replace("\"revision\": 20", "\"revision\": 21")).unwrap();
    assert!(refused(dir.path()).contains("SHA-256"));
}

#[test]
fn records_that_break_the_manifests_promises_are_refused() {
    // Keys out of order, with correct checksums: only the content check can see it.
    let dir = tempfile::tempdir().unwrap();
    let mut m = write_backup(dir.path(), 3);
    let mut w = RecordWriter::create(&dir.path().join(region_file(0))).unwrap();
    for key in [b"b".as_slice(), b"a"] {
        w.write(&kv(key, 5, 0)).unwrap();
    }
    m.regions[0].keys = w.keys;
    m.regions[0].bytes = w.bytes;
    m.regions[0].sha256 = w.finish().unwrap();
    m.keys = m.regions.iter().map(|r| r.keys).sum();
    write_manifest(dir.path(), &m).unwrap();
    assert!(refused(dir.path()).contains("out of order"));

    // A key past the backup's revision, and one naming a lease not listed.
    for (bad, why) in [
        (kv(b"a", 1_000, 0), "revisions"),
        (kv(b"a", 5, 99), "lease the manifest does not list"),
        (kv(b"zz", 5, 0), "outside the region"),
        (kv(&[b'a'; 5000], 5, 0), "key size"),
        (
            KeyValue {
                create_revision: 0,
                ..kv(b"a", 5, 0)
            },
            "revisions",
        ),
    ] {
        let mut w = RecordWriter::create(&dir.path().join(region_file(0))).unwrap();
        w.write(&bad).unwrap();
        m.regions[0].keys = w.keys;
        m.regions[0].bytes = w.bytes;
        m.regions[0].sha256 = w.finish().unwrap();
        m.keys = m.regions.iter().map(|r| r.keys).sum();
        write_manifest(dir.path(), &m).unwrap();
        let e = refused(dir.path());
        assert!(e.contains(why), "{why}: {e}");
    }

    // Leases listed twice.
    let dir = tempfile::tempdir().unwrap();
    let mut m = write_backup(dir.path(), 3);
    m.leases.push(m.leases[0].clone());
    write_manifest(dir.path(), &m).unwrap();
    assert!(refused(dir.path()).contains("increasing id order"));

    // Regions that leave a gap.
    let dir = tempfile::tempdir().unwrap();
    let mut m = write_backup(dir.path(), 3);
    m.regions[1].start = hex(b"n");
    write_manifest(dir.path(), &m).unwrap();
    assert!(refused(dir.path()).contains("does not continue"));
}
