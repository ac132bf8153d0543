//! Backup and restore as an operator runs them: `tessera backup` of a loaded cluster while
//! writes go on, kill -9 of every node and loss of their data, `tessera restore` on every
//! founding node of a new cluster, and every key compared with what the old cluster held
//! at the backup's revision — value, revisions, version and lease.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::StreamExt as _;

use super::cli::cli;
use super::*;
use tessera::config::Config;

const REGIONS: u32 = 64;
const KEYS: usize = 100_000;

fn key(i: usize) -> Vec<u8> {
    key_in_region((i % REGIONS as usize) as u32, REGIONS, &format!("/k{i:06}"))
}

/// Writes the KEYS keys, 512 per batch, four batches at a time.
async fn load(client: &Client) {
    let started = Instant::now();
    type Batch = Vec<(Vec<u8>, Option<Vec<u8>>)>;
    let batches: Vec<Batch> = (0..KEYS)
        .collect::<Vec<_>>()
        .chunks(512)
        .map(|c| {
            c.iter()
                .map(|&i| {
                    (
                        key(i),
                        Some(format!("value-{i}-{}", "x".repeat(i % 40)).into_bytes()),
                    )
                })
                .collect()
        })
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_new_cluster_key_for_key() {
    let dir = common::test_dir("a_backup_under_load_restores_into_a_new_cluster_key_for_key");
    let (mut procs, addrs, client) = start_led_with_client(dir.path(), 3, REGIONS).await;
    load(&client).await;
    let (lease, _) = client
        .lease_grant(Duration::from_secs(600))
        .await
        .expect("grant");
    for i in 0..10 {
        client
            .put_with_lease(&key(2 * KEYS + i), b"ephemeral", lease)
            .await
            .expect("put with lease");
    }

    // Writes go on during the backup: overwrites, new keys and deletes.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (c, stop, written) = (client.clone(), stop.clone(), written.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let r = match n % 3 {
                    0 => c.put(&key(n * 13 % KEYS), b"overwritten").await.map(|_| ()),
                    1 => c.put(&key(KEYS + n), b"new").await.map(|_| ()),
                    _ => c.delete(&key(n * 17 % KEYS)).await.map(|_| ()),
                };
                r.expect("write during the backup");
                written.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
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
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    let revision = json_field(&out, "revision") as u64;
    let keys = json_field(&out, "keys") as u64;
    let bytes = json_field(&out, "bytes");
    eprintln!(
        "backup: revision {revision}, {keys} keys, {:.1} MiB in {backup_secs:.2} s \
         ({:.0} keys/s, {:.2} MiB/s) with {} writes alongside",
        bytes / 1048576.0,
        keys as f64 / backup_secs,
        bytes / 1048576.0 / backup_secs,
        written.load(Ordering::Relaxed)
    );
    assert!(
        written.load(Ordering::Relaxed) > 0,
        "writes went on during the backup"
    );

    // What the backup must hold: the old cluster at the backup's revision.
    let expected = client
        .scan_at(b"", b"", 0, revision)
        .await
        .expect("scan at the revision");
    assert_eq!(
        expected.len() as u64,
        keys,
        "the backup holds the cluster at its revision"
    );
    assert!(keys as usize >= KEYS - 1000, "{keys} keys");
    assert_eq!(expected.iter().filter(|kv| kv.lease == lease).count(), 10);

    // The cluster is lost: every node killed, every data directory gone.
    for p in procs.iter_mut() {
        p.kill9();
    }
    for id in 1..=3 {
        std::fs::remove_dir_all(dir.path().join(format!("node{id}"))).expect("remove data");
    }
    let config = |id: u64| dir.path().join(format!("node{id}.toml"));

    // Refused before anything is written: the old cluster's id, and a damaged backup.
    let c1 = config(1);
    let c1 = c1.to_str().expect("path");
    let (code, _, err) = cli(&["restore", out_str, "--config", c1]);
    assert_eq!(code, 2);
    assert!(err.contains("restore into a new cluster"), "{err}");
    for id in 1..=3 {
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

    // Restore on every founding node, then start them.
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
        eprintln!(
            "restore on node {id}: {} keys in {secs:.2} s ({:.0} keys/s, {:.2} MiB/s of backup)",
            json_field(&out, "keys"),
            json_field(&out, "keys") / secs,
            bytes / 1048576.0 / secs,
        );
    }
    for (i, p) in procs.iter_mut().enumerate() {
        p.restart(&dir.path().join(format!("node{}.restored.log", i + 1)));
    }
    wait_serving(&addrs).await;
    wait_for_leaders(
        &addrs,
        REGIONS as usize + common::SYSTEM_REGIONS,
        Duration::from_secs(120),
    )
    .await;
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
    // New writes come after the backup's revision; history before it is not there.
    let w = client.put(&key(1), b"after").await.expect("put");
    assert!(w.revision > revision, "{} after {revision}", w.revision);
    match client.get_at(&key(1), revision - 1).await {
        Err(tessera::client::Error::Compacted { compact_revision }) => {
            assert_eq!(compact_revision, revision)
        }
        other => panic!("a read below the backup's revision: {other:?}"),
    }
    let kv = client
        .get_at(&key(2), revision)
        .await
        .expect("get at")
        .expect("key");
    assert_eq!(Some(&kv), expected.iter().find(|e| e.key == key(2)));
    // The lease lives on with what it had left, and keeps its keys.
    let st = client.lease_time_to_live(lease, true).await.expect("ttl");
    assert_eq!(st.keys.len(), 10);
    assert!(
        st.remaining > Duration::from_secs(400),
        "{:?}",
        st.remaining
    );
}
