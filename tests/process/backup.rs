//! Backup and restore as an operator runs them: `tessera backup` of a loaded cluster while
//! writes go on, kill -9 of every node and loss of their data, `tessera restore` on the
//! founding nodes of a new cluster, and every key compared with what the old cluster held
//! at the backup's revision — value, revisions, version and lease — on every replica.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt as _;

use super::cli::cli;
use super::*;
use tessera::config::Config;

const REGIONS: u32 = 64;
const KEYS: usize = 100_000;

fn key(i: usize) -> Vec<u8> {
    key_in_region((i % REGIONS as usize) as u32, REGIONS, &format!("/k{i:06}"))
}

fn value(i: usize) -> Vec<u8> {
    format!("value-{i}-{}", "x".repeat(i % 40)).into_bytes()
}

/// Writes the KEYS keys, 512 per batch, four batches at a time.
async fn load(client: &Client) {
    type Batch = Vec<(Vec<u8>, Option<Vec<u8>>)>;
    let started = Instant::now();
    let batches: Vec<Batch> = (0..KEYS)
        .collect::<Vec<_>>()
        .chunks(512)
        .map(|c| c.iter().map(|&i| (key(i), Some(value(i)))).collect())
        .collect();
    let mut jobs = futures::stream::iter(batches.into_iter().map(|b| {
        let c = client.clone();
        async move { c.batch_write(&b).await }
    }))
    .buffer_unordered(4);
    while let Some(r) = jobs.next().await {
        r.expect("batch write");
    }
    eprintln!(
        "loaded {KEYS} keys over {REGIONS} regions in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Rewrites a config file with another cluster id.
fn set_cluster_id(path: &std::path::Path, id: u64) {
    let mut cfg = Config::from_file(path).expect("read config");
    cfg.cluster.cluster_id = id;
    std::fs::write(path, toml::to_string(&cfg).expect("config")).expect("write config");
}

fn json_field(out: &str, field: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON output");
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} in {out}"))
}

/// An acknowledged write: its revision, key and value (`None`: a delete).
type Acked = (u64, Vec<u8>, Option<Vec<u8>>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_new_cluster_key_for_key() {
    let dir = common::test_dir("a_backup_under_load_restores_into_a_new_cluster_key_for_key");
    // Four nodes, three replicas: no node holds every region.
    let mut procs = start_process_cluster(dir.path(), 4, REGIONS, |_| {});
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    let all = REGIONS as usize + common::SYSTEM_REGIONS;
    common::wait_for_leaders_spread(&addrs, all, Duration::from_secs(90)).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .expect("client connects");
    load(&client).await;
    // What the client was told, independently of any read: the loaded keys, then every
    // acknowledged write with its revision.
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = (0..KEYS).map(|i| (key(i), value(i))).collect();
    let (lease, _) = client
        .lease_grant(Duration::from_secs(600))
        .await
        .expect("grant");
    for i in 0..10 {
        client
            .put_with_lease(&key(2 * KEYS + i), b"ephemeral", lease)
            .await
            .expect("put with lease");
        model.insert(key(2 * KEYS + i), b"ephemeral".to_vec());
    }
    // A session with no keys yet lives on too.
    let (bare, _) = client
        .lease_grant(Duration::from_secs(600))
        .await
        .expect("grant");

    // Writes go on during the backup: overwrites, new keys and deletes.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (c, stop) = (client.clone(), stop.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut acked: Vec<Acked> = Vec::new();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let (k, v) = match n % 3 {
                    0 => (key(n * 13 % KEYS), Some(b"overwritten".to_vec())),
                    1 => (key(KEYS + n), Some(b"new".to_vec())),
                    _ => (key(n * 17 % KEYS), None),
                };
                let r = match &v {
                    Some(v) => c.put(&k, v).await,
                    None => c.delete(&k).await,
                };
                acked.push((r.expect("write during the backup").revision, k, v));
                n += 1;
            }
            acked
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out_dir = dir.path().join("backup");
    let out_str = out_dir.to_str().expect("path");
    let ep = addrs.join(",");
    let started = Instant::now();
    let (code, out, err) = cli(&["backup", "-e", &ep, "--json", out_str]);
    let backup_secs = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "backup failed: {err}");
    assert!(err.contains("regions"), "progress on stderr: {err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.expect("writer");
    let revision = json_field(&out, "revision") as u64;
    let keys = json_field(&out, "keys") as u64;
    let bytes = json_field(&out, "bytes");
    let after = acked.iter().filter(|a| a.0 > revision).count();
    eprintln!(
        "backup: revision {revision}, {keys} keys, {:.1} MiB in {backup_secs:.2} s \
         ({:.0} keys/s, {:.2} MiB/s); {} writes alongside, {after} of them after its revision",
        bytes / 1048576.0,
        keys as f64 / backup_secs,
        bytes / 1048576.0 / backup_secs,
        acked.len(),
    );
    assert!(
        acked.iter().any(|a| a.0 <= revision) && after > 0,
        "writes went on before and after the backup's revision"
    );
    let mut acked = acked;
    acked.sort_by_key(|a| a.0);
    for (rev, k, v) in acked.into_iter().filter(|a| a.0 <= revision) {
        assert!(rev > 0);
        match v {
            Some(v) => model.insert(k, v),
            None => model.remove(&k),
        };
    }
    // The old cluster read at the backup's revision, for the full records.
    let expected = client
        .scan_at(b"", b"", 0, revision)
        .await
        .expect("scan at the revision");
    assert_eq!(
        expected.len(),
        model.len(),
        "the old cluster at the revision"
    );
    assert_eq!(expected.len() as u64, keys, "the backup's key count");

    // The cluster is lost: every node killed, every data directory gone.
    for p in procs.iter_mut() {
        p.kill9();
    }
    for id in 1..=4 {
        std::fs::remove_dir_all(dir.path().join(format!("node{id}"))).expect("remove data");
    }
    let config = |id: u64| dir.path().join(format!("node{id}.toml"));

    // Refused before anything is written: the old cluster's id, and a damaged backup.
    let c1 = config(1);
    let c1 = c1.to_str().expect("path");
    let (code, _, err) = cli(&["restore", out_str, "--config", c1]);
    assert_eq!(code, 2);
    assert!(err.contains("restore into a new cluster"), "{err}");
    for id in 1..=4 {
        set_cluster_id(&config(id), 2);
    }
    let damaged = dir.path().join("damaged");
    std::fs::create_dir(&damaged).expect("mkdir");
    for e in std::fs::read_dir(&out_dir).expect("backup dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), damaged.join(e.file_name())).expect("copy");
    }
    let victim = damaged.join(tessera::backup::region_file(REGIONS as usize / 2));
    let mut b = std::fs::read(&victim).expect("read");
    let at = b.len() / 3;
    b[at] ^= 0x40;
    std::fs::write(&victim, &b).expect("write");
    let (code, _, err) = cli(&["restore", damaged.to_str().expect("path"), "--config", c1]);
    assert_eq!(code, 2, "a damaged backup is refused");
    assert!(err.contains("is not usable"), "{err}");
    assert!(
        !dir.path().join("node1").join("db").exists(),
        "nothing was written from the damaged backup"
    );

    // What an interrupted restore leaves is never started from; the next restore replaces
    // it.
    std::fs::create_dir_all(dir.path().join("node1").join("db.restoring")).expect("mkdir");
    let (code, _, err) = cli(&["server", "--config", c1, "--check"]);
    assert_eq!(code, 2, "a node with an unfinished restore does not start");
    assert!(err.contains("unfinished restore"), "{err}");

    // Restore on three of the four founding nodes; the fourth starts empty, as if forgotten,
    // and must get the data from the others rather than serve its empty replicas.
    let mut base = 0;
    for id in 1..=3u64 {
        let path = config(id);
        let started = Instant::now();
        let (code, out, err) = cli(&[
            "restore",
            out_str,
            "--config",
            path.to_str().expect("path"),
            "--json",
        ]);
        assert_eq!(code, 0, "restore on node {id}: {err}");
        let secs = started.elapsed().as_secs_f64();
        base = json_field(&out, "base_revision") as u64;
        eprintln!(
            "restore on node {id}: {} keys written in {secs:.2} s ({:.0} keys/s of the backup, \
             {:.2} MiB/s)",
            json_field(&out, "keys"),
            keys as f64 / secs,
            bytes / 1048576.0 / secs,
        );
    }
    assert!(
        base > revision,
        "the new cluster starts above the old revisions"
    );
    for (i, p) in procs.iter_mut().enumerate() {
        p.restart(&dir.path().join(format!("node{}.restored.log", i + 1)));
    }
    wait_serving(&addrs).await;
    common::wait_for_leaders_spread(&addrs, all, Duration::from_secs(120)).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .expect("client of the new cluster");
    assert_eq!(client.status().await.expect("status").cluster_id, 2);

    // Every key, with its revisions, version and lease.
    let restored = client
        .scan(b"", b"", 0)
        .await
        .expect("scan the new cluster");
    assert_eq!(restored.len(), expected.len());
    for (a, b) in expected.iter().zip(&restored) {
        assert_eq!(a, b, "key {:?}", String::from_utf8_lossy(&a.key));
    }
    for (kv, (k, v)) in restored.iter().zip(&model) {
        assert_eq!(
            (&kv.key, &kv.value),
            (k, v),
            "against the acknowledged writes"
        );
    }
    // Every replica holds the same: a sample of keys read on each node that hosts them,
    // node 4's snapshots included.
    let deadline = Instant::now() + Duration::from_secs(60);
    for kv in restored.iter().step_by(997) {
        for a in &addrs {
            let Some(regions) = node_regions(a).await else {
                continue;
            };
            let Some(region) = regions
                .into_iter()
                .filter_map(|i| i.region)
                .find(|r| tessera::storage::keys::in_range(&kv.key, &r.start_key, &r.end_key))
            else {
                continue;
            };
            loop {
                let got = common::local_get(a, &region, &kv.key).await.flatten();
                if got.as_ref() == Some(kv) {
                    break;
                }
                assert!(Instant::now() < deadline, "{a} holds {got:?}, not {kv:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // New writes come after the new cluster's base; history below it is gone.
    let (kv, at) = client.get_with_revision(&key(2)).await.expect("get");
    assert_eq!(at, base, "the present is read at the base revision");
    assert_eq!(kv.as_ref(), expected.iter().find(|e| e.key == key(2)));
    let w = client.put(&key(1), b"after").await.expect("put");
    assert!(w.revision > base, "{} after {base}", w.revision);
    match client.get_at(&key(1), revision).await {
        Err(tessera::client::Error::Compacted { compact_revision }) => {
            assert_eq!(compact_revision, base)
        }
        other => panic!("a read at the old revision: {other:?}"),
    }
    // The leases live on with what they had left; one keeps its keys.
    let st = client.lease_time_to_live(lease, true).await.expect("ttl");
    assert_eq!(st.keys.len(), 10);
    assert!(
        st.remaining > Duration::from_secs(400),
        "{:?}",
        st.remaining
    );
    let st = client.lease_time_to_live(bare, false).await.expect("ttl");
    assert!(
        st.remaining > Duration::from_secs(400),
        "{:?}",
        st.remaining
    );
}
