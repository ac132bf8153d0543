//! Region merges: by command under load (every acknowledged write stays, reads are never
//! stale, a client with a stale cache recovers), splitting and merging in a loop (the
//! routing table never shows a gap at the end), and merges of small idle regions by the
//! scheduler.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera::client::Client;
use tessera::ids::RegionId;
use tessera::proto::{Region, RegionRoute};

use super::common::{patient_client, wait_for_leaders, TestCluster, SYSTEM_REGIONS};

fn fast(c: &mut tessera::config::Config) {
    c.placement.heartbeat_interval_ms = 200;
    c.placement.region_report_interval_ms = 300;
}

/// The user-data rows of placement's routing table, once they cover the user keyspace
/// without a gap or overlap and every region is led; panics after `timeout`.
async fn settled_routes(client: &Client, want: usize, timeout: Duration) -> Vec<RegionRoute> {
    let t = Instant::now();
    loop {
        let mut last = String::new();
        if let Ok(routes) = client.routes().await {
            let user: Vec<RegionRoute> = routes
                .into_iter()
                .filter(|r| !r.region.as_ref().unwrap().start_key.starts_with(&[0xFF]))
                .collect();
            let region = |r: &RegionRoute| r.region.clone().unwrap();
            let no_gap = user.first().is_some_and(|r| region(r).start_key.is_empty())
                && user
                    .windows(2)
                    .all(|w| region(&w[0]).end_key == region(&w[1]).start_key)
                && user
                    .last()
                    .is_some_and(|r| region(r).end_key.starts_with(&[0xFF]));
            // Rows from the placement table itself (reported), not the client's fallback to
            // what the nodes host.
            let reported = user.iter().all(|r| r.reported_ms > 0 && r.leader.is_some());
            if no_gap && user.len() == want && reported {
                return user;
            }
            last = format!(
                "{} user regions, gapless {no_gap}: {:?}",
                user.len(),
                user.iter()
                    .map(|r| {
                        let r = region(r);
                        (r.id, r.start_key, r.end_key)
                    })
                    .collect::<Vec<_>>()
            );
        }
        assert!(
            t.elapsed() < timeout,
            "routing table never settled at {want} regions: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn region_at(client: &Client, key: &[u8]) -> Region {
    client
        .regions()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.region)
        .find(|r| {
            r.start_key.as_slice() <= key && (r.end_key.is_empty() || key < r.end_key.as_slice())
        })
        .expect("a region holds the key")
}

/// Writers overwrite keys on both sides of `b` and read back what they wrote before, while
/// the region of `b…` merges into the one of `a…`: nobody sees an error or a stale read,
/// every acknowledged write is there afterwards, a client whose cache still names the
/// merged region recovers, and key counts add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_under_load_keeps_every_write() {
    let cluster = TestCluster::start(3, 1, fast).await;
    let eps = cluster.endpoints();
    wait_for_leaders(&eps, 1 + SYSTEM_REGIONS, Duration::from_secs(60)).await;
    let client = patient_client(&eps).await;
    let mut ops = Vec::new();
    for side in ["a", "b"] {
        for i in 0..1000 {
            ops.push((format!("{side}-{i:04}").into_bytes(), Some(vec![b'x'; 64])));
        }
    }
    for chunk in ops.chunks(200) {
        client.batch_write(chunk).await.unwrap();
    }
    let halves = client.split(b"b").await.unwrap();
    let (left, right) = (halves[0].clone(), halves[1].clone());
    settled_routes(&client, 2, Duration::from_secs(20)).await;
    // A client that learns of the merge only from region errors.
    let stale = cluster.client().await;
    assert!(stale.get(b"b-0001").await.unwrap().is_some());

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (client, stop, errors) = (client.clone(), stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut acked: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            let t = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(60) {
                n += 1;
                let side = if n % 2 == 0 { "a" } else { "b" };
                let key = format!("{side}-{w}-{:02}", n % 40).into_bytes();
                match client.put(&key, n.to_string().as_bytes()).await {
                    Ok(_) => {
                        acked.insert(key, n);
                    }
                    Err(e) => {
                        eprintln!("writer {w}: put failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let probe = format!("{side}-{w}-{:02}", (n * 7) % 40).into_bytes();
                if let Some(&want) = acked.get(&probe) {
                    match client.get(&probe).await {
                        Ok(Some(kv)) => {
                            let got: u64 = String::from_utf8_lossy(&kv.value).parse().unwrap();
                            assert!(got >= want, "stale read of {probe:?}: {got} < {want}");
                        }
                        Ok(None) => panic!("acknowledged key {probe:?} missing"),
                        Err(e) => {
                            eprintln!("writer {w}: get failed: {e}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let merged = client
        .merge_regions(
            RegionId(right.id),
            RegionId(left.id),
            Duration::from_secs(60),
        )
        .await
        .expect("merge");
    eprintln!(
        "merged two regions of 1,000 keys each in {} ms under load",
        t.elapsed().as_millis()
    );
    assert_eq!(merged.id, left.id);
    assert_eq!(merged.start_key, left.start_key);
    assert_eq!(merged.end_key, right.end_key);
    let v = |r: &Region| r.epoch.unwrap().version;
    assert!(v(&merged) > v(&left).max(v(&right)), "{merged:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "the client surfaced errors"
    );
    for (key, n) in &acked {
        let kv = client.get(key).await.unwrap().expect("acknowledged key");
        assert_eq!(kv.value, n.to_string().as_bytes(), "{key:?}");
    }
    // The stale client's cache still names the merged region: it recovers by itself.
    stale.put(b"b-stale", b"1").await.unwrap();
    assert_eq!(
        stale.get(b"b-0999").await.unwrap().unwrap().value,
        vec![b'x'; 64]
    );
    // Asking again names what is gone.
    let again = client.merge_regions(
        RegionId(right.id),
        RegionId(left.id),
        Duration::from_secs(10),
    );
    match again.await {
        Err(tessera::client::Error::NotFound(why)) => assert!(why.contains(&right.id.to_string())),
        other => panic!("a finished merge asked again: {other:?}"),
    }

    let routes = settled_routes(&client, 1, Duration::from_secs(20)).await;
    let all = client.scan(b"", b"", 0).await.unwrap();
    assert_eq!(all.len(), 2000 + acked.len() + 1);
    let t = Instant::now();
    loop {
        let routes = client.routes().await.unwrap();
        let counted: u64 = routes
            .iter()
            .filter(|r| !r.region.as_ref().unwrap().start_key.starts_with(&[0xFF]))
            .map(|r| r.load.unwrap_or_default().keys)
            .sum();
        if counted == all.len() as u64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the merged region counts {counted} keys, not {} ({routes:?})",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(routes[0].region.as_ref().unwrap().id, left.id);
    cluster.shutdown().await;
}

/// Split and merge the same boundary again and again while a writer writes on both sides:
/// the routing table ends without gaps, with the one region, and every write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splitting_and_merging_in_a_loop_leaves_no_gap() {
    let cluster = TestCluster::start(3, 1, fast).await;
    let eps = cluster.endpoints();
    wait_for_leaders(&eps, 1 + SYSTEM_REGIONS, Duration::from_secs(60)).await;
    let client = patient_client(&eps).await;
    let mut expected = BTreeMap::new();
    for round in 0..6u32 {
        for k in [format!("l-{round}"), format!("r-{round}")] {
            client.put(k.as_bytes(), b"v").await.unwrap();
            expected.insert(k, ());
        }
        let halves = client.split(b"m").await.unwrap();
        assert_eq!(halves.len(), 2, "round {round}: {halves:?}");
        client
            .put(format!("s-{round}").as_bytes(), b"v")
            .await
            .unwrap();
        expected.insert(format!("s-{round}"), ());
        let merged = client
            .merge_regions(
                RegionId(halves[1].id),
                RegionId(halves[0].id),
                Duration::from_secs(60),
            )
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(merged.id, halves[0].id);
        assert_eq!(region_at(&client, b"z").await.id, halves[0].id);
    }
    settled_routes(&client, 1, Duration::from_secs(20)).await;
    let all = client.scan(b"", b"", 0).await.unwrap();
    let keys: Vec<String> = all
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    assert_eq!(keys, expected.into_keys().collect::<Vec<_>>());
    cluster.shutdown().await;
}

/// With `[region] merge_below_keys` set, the scheduler merges small idle neighbours by
/// itself until one user region is left, and their keys stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_merges_small_idle_regions() {
    let cluster = TestCluster::start(3, 4, |c| {
        fast(c);
        c.placement.schedule_interval_ms = 300;
        c.region.merge_below_keys = 100;
        c.region.merge_below_bytes = 1 << 20;
    })
    .await;
    let eps = cluster.endpoints();
    wait_for_leaders(&eps, 4 + SYSTEM_REGIONS, Duration::from_secs(60)).await;
    let client = patient_client(&eps).await;
    let keys: Vec<Vec<u8>> = (0..4)
        .map(|i| super::common::key_in_region(i, 4, "merge"))
        .collect();
    for k in &keys {
        client.put(k, b"v").await.unwrap();
    }
    let t = Instant::now();
    settled_routes(&client, 1, Duration::from_secs(60)).await;
    eprintln!(
        "the scheduler merged 4 regions into 1 in {} ms",
        t.elapsed().as_millis()
    );
    for k in &keys {
        assert_eq!(client.get(k).await.unwrap().unwrap().value, b"v");
    }
    cluster.shutdown().await;
}

/// On four nodes two small idle neighbours start on different nodes: the scheduler moves a
/// replica of the right one onto the left one's nodes, then merges them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_aligns_replicas_before_merging() {
    let cluster = TestCluster::start(4, 2, |c| {
        fast(c);
        c.placement.schedule_interval_ms = 300;
        c.region.merge_below_keys = 100;
    })
    .await;
    let client = patient_client(&cluster.endpoints()).await;
    let nodes = |r: &Region| {
        let mut n: Vec<u64> = r.peers.iter().map(|p| p.node_id).collect();
        n.sort_unstable();
        n
    };
    let before = settled_routes(&client, 2, Duration::from_secs(60)).await;
    let (l, r) = (
        before[0].region.clone().unwrap(),
        before[1].region.clone().unwrap(),
    );
    assert_ne!(
        nodes(&l),
        nodes(&r),
        "the two regions start on different nodes"
    );
    let keys: Vec<Vec<u8>> = (0..2)
        .map(|i| super::common::key_in_region(i, 2, "align"))
        .collect();
    for k in &keys {
        client.put(k, b"v").await.unwrap();
    }
    let t = Instant::now();
    let after = settled_routes(&client, 1, Duration::from_secs(90)).await;
    eprintln!("aligned and merged in {} ms", t.elapsed().as_millis());
    assert_eq!(after[0].region.as_ref().unwrap().id, l.id);
    for k in &keys {
        assert_eq!(client.get(k).await.unwrap().unwrap().value, b"v");
    }
    cluster.shutdown().await;
}
