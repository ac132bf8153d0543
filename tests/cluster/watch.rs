//! Watch: every change of a range from a start revision, in revision order, across regions
//! that split and whose leaders move or stop; from a past revision (history) or refused
//! below the compacted one; many watchers on one prefix.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tessera::client::{Client, Error, EventKind, WatchOptions, Watcher};
use tessera::ids::{NodeId, RegionId};

use super::common::{key_in_region, TestCluster};

const REGIONS: u32 = 4;

async fn started() -> TestCluster {
    TestCluster::start_led(3, REGIONS, |_| {}).await
}

/// What a watcher saw: revision → (key, kind, value) in the order delivered.
type Seen = Vec<(u64, Vec<u8>, EventKind, Vec<u8>)>;

/// Reads `w` until it has delivered a revision at or above `upto`; checks each response's
/// revision rises.
async fn collect_until(w: &mut Watcher, upto: u64, within: Duration) -> Seen {
    let deadline = Instant::now() + within;
    let mut seen = Seen::new();
    let mut last = 0;
    while last < upto {
        let left = deadline.saturating_duration_since(Instant::now());
        let resp = match tokio::time::timeout(left, w.next()).await {
            Ok(Some(r)) => r.expect("watch response"),
            Ok(None) => panic!("watch ended at {last}, waiting for {upto}"),
            Err(_) => panic!("watch stuck at {last}, waiting for {upto}"),
        };
        assert!(
            resp.revision > last,
            "revision {} after {last}",
            resp.revision
        );
        last = resp.revision;
        for e in resp.events {
            seen.push((resp.revision, e.kv.key, e.kind, e.kv.value));
        }
    }
    seen
}

/// Every write acknowledged: revision → (key, kind, value).
fn expected(writes: &[(u64, Vec<u8>, EventKind, Vec<u8>)], from: u64) -> Seen {
    let mut by_rev: BTreeMap<(u64, Vec<u8>), (EventKind, Vec<u8>)> = BTreeMap::new();
    for (rev, key, kind, value) in writes {
        if *rev >= from {
            by_rev.insert((*rev, key.clone()), (*kind, value.clone()));
        }
    }
    by_rev
        .into_iter()
        .map(|((rev, key), (kind, value))| (rev, key, kind, value))
        .collect()
}

/// Writes `n` changes (puts, and deletes of keys written before) spread over every
/// region; returns them as acknowledged.
async fn write_all(client: Client, tag: &str, n: u64) -> Vec<(u64, Vec<u8>, EventKind, Vec<u8>)> {
    let mut done = Vec::new();
    for i in 0..n {
        let key = key_in_region(
            (i % u64::from(REGIONS)) as u32,
            REGIONS,
            &format!("/{tag}{}", i % 7),
        );
        if i % 5 == 4 {
            let r = client.delete(&key).await.expect("delete");
            if r.prev.is_some() {
                done.push((r.revision, key, EventKind::Delete, Vec::new()));
            }
        } else {
            let value = format!("{tag}-{i}").into_bytes();
            let r = client.put(&key, &value).await.expect("put");
            done.push((r.revision, key, EventKind::Put, value));
        }
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_over_every_region_misses_nothing_through_splits_leader_moves_and_a_stopped_node() {
    let mut cluster = started().await;
    let client = cluster.client().await;
    let mut watch = client
        .watch(b"", b"", WatchOptions::default())
        .await
        .expect("watch");
    let from = watch.start_revision();

    let writers: Vec<_> = ["a", "b", "c"]
        .into_iter()
        .map(|tag| tokio::spawn(write_all(client.clone(), tag, 120)))
        .collect();
    // Meanwhile: two splits, leaders moved, and the node leading region 0 stopped and
    // brought back.
    let admin = cluster.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    admin
        .split(&key_in_region(1, REGIONS, "/b"))
        .await
        .expect("split");
    admin
        .split(&key_in_region(2, REGIONS, "/a3"))
        .await
        .expect("split");
    for route in admin.routes().await.expect("routes") {
        let (Some(region), Some(leader)) = (route.region, route.leader) else {
            continue;
        };
        if region.start_key.first() == Some(&0xFF) {
            continue;
        }
        let to = region
            .peers
            .iter()
            .map(|p| p.node_id)
            .find(|n| *n != leader.node_id)
            .expect("another peer");
        admin
            .transfer_leader(RegionId(region.id), NodeId(to))
            .await
            .expect("transfer");
    }
    let first = admin.routes().await.expect("routes");
    let leader0 = first
        .iter()
        .find(|r| r.region.as_ref().is_some_and(|g| g.start_key.is_empty()))
        .and_then(|r| r.leader)
        .expect("region 0 led")
        .node_id;
    cluster.stop((leader0 - 1) as usize).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.restart((leader0 - 1) as usize).await;

    let mut writes = Vec::new();
    for w in writers {
        writes.extend(w.await.expect("writer"));
    }
    let last = writes.iter().map(|w| w.0).max().expect("writes");
    let seen = collect_until(&mut watch, last, Duration::from_secs(60)).await;
    let want = expected(&writes, from);
    let missing: Vec<_> = want.iter().filter(|w| !seen.contains(w)).collect();
    assert!(missing.is_empty(), "events never delivered: {missing:?}");
    assert_eq!(seen, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_the_past_reads_history_and_a_compacted_start_is_refused() {
    let cluster = started().await;
    let client = cluster.client().await;
    let k = key_in_region(1, REGIONS, "/cfg");
    let other = key_in_region(1, REGIONS, "/other");
    let r1 = client.put(&k, b"v1").await.expect("put").revision;
    client.put(&other, b"x").await.expect("put");
    let r2 = client.put(&k, b"v2").await.expect("put").revision;
    let r3 = client.delete(&k).await.expect("delete").revision;
    // One change per key and revision: a batch naming a key twice is refused (live events
    // and history would otherwise disagree on it).
    match client
        .batch_write(&[(k.clone(), Some(b"x".to_vec())), (k.clone(), None)])
        .await
    {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("twice"), "{m}"),
        other => panic!("a batch naming a key twice: {other:?}"),
    }

    let opts = WatchOptions {
        start_revision: r1,
        prev_kv: true,
        ..Default::default()
    };
    let mut w = client
        .watch(&k, &[k.clone(), vec![0]].concat(), opts.clone())
        .await
        .expect("watch");
    let mut got = Vec::new();
    while got.len() < 3 {
        let resp = tokio::time::timeout(Duration::from_secs(20), w.next())
            .await
            .expect("history in time")
            .expect("open")
            .expect("response");
        for e in resp.events {
            got.push((
                resp.revision,
                e.kind,
                e.kv.value,
                e.prev_kv.map(|p| p.value),
            ));
        }
    }
    assert_eq!(
        got,
        vec![
            (r1, EventKind::Put, b"v1".to_vec(), None),
            (r2, EventKind::Put, b"v2".to_vec(), Some(b"v1".to_vec())),
            (r3, EventKind::Delete, Vec::new(), Some(b"v2".to_vec())),
        ]
    );
    // Live after history: the next change comes too, deletes filtered out on request.
    let mut puts_only = client
        .watch_prefix(
            &k,
            WatchOptions {
                start_revision: r1,
                no_delete: true,
                ..Default::default()
            },
        )
        .await
        .expect("watch");
    let r4 = client.put(&k, b"v4").await.expect("put").revision;
    let revs: Vec<u64> = {
        let mut revs = Vec::new();
        while revs.last() != Some(&r4) {
            let resp = tokio::time::timeout(Duration::from_secs(20), puts_only.next())
                .await
                .expect("in time")
                .expect("open")
                .expect("response");
            revs.push(resp.revision);
        }
        revs
    };
    assert_eq!(revs, vec![r1, r2, r4]);

    // Compact at r2: a watch from r1 (or r2) is refused with the compacted revision, once
    // the nodes have heard; one from above it works.
    assert_eq!(client.compact(r2).await.expect("compact"), r2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut w = client.watch_prefix(&k, opts.clone()).await.expect("watch");
        match tokio::time::timeout(Duration::from_secs(20), w.next()).await {
            Ok(Some(Err(Error::Compacted { compact_revision }))) => {
                assert_eq!(compact_revision, r2);
                break;
            }
            Ok(Some(Ok(r))) => {
                assert_eq!(r.revision, r1, "history before the compaction took effect");
                assert!(Instant::now() < deadline, "watch below r2 still served");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("watch from a compacted revision: {other:?}"),
        }
    }
    let mut w = client
        .watch_prefix(
            &k,
            WatchOptions {
                start_revision: r2 + 1,
                ..Default::default()
            },
        )
        .await
        .expect("watch");
    let resp = tokio::time::timeout(Duration::from_secs(20), w.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("above the compacted revision");
    assert_eq!(
        (resp.revision, resp.events[0].kind),
        (r3, EventKind::Delete)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_watchers_on_one_prefix_each_see_every_change() {
    let cluster = started().await;
    let client = cluster.client().await;
    let prefix = key_in_region(2, REGIONS, "/topics/");
    let mut watchers = Vec::new();
    for _ in 0..1000 {
        watchers.push(
            client
                .watch_prefix(&prefix, WatchOptions::default())
                .await
                .expect("watch"),
        );
    }
    let mut writes = Vec::new();
    for i in 0..10 {
        let key = [prefix.clone(), format!("t{i}").into_bytes()].concat();
        let r = client.put(&key, b"3 partitions").await.expect("put");
        writes.push((r.revision, key, EventKind::Put, b"3 partitions".to_vec()));
    }
    let last = writes.last().expect("writes").0;
    let want = expected(&writes, 0);
    for (i, w) in watchers.iter_mut().enumerate() {
        let seen = collect_until(w, last, Duration::from_secs(60)).await;
        assert_eq!(seen, want, "watcher {i}");
    }
}

/// A watcher that stops reading while 1,500 revisions are written falls behind (its queues
/// fill and its server watches are dropped), then resumes from history: when it reads
/// again it gets every change once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_catches_up_from_history() {
    let cluster = started().await;
    let client = cluster.client().await;
    let prefix = key_in_region(1, REGIONS, "/slow/");
    let mut w = client
        .watch_prefix(&prefix, WatchOptions::default())
        .await
        .expect("watch");
    let writers: Vec<_> = (0..8u64)
        .map(|t| {
            let (c, prefix) = (client.clone(), prefix.clone());
            tokio::spawn(async move {
                let mut done = Vec::new();
                for i in 0..190u64 {
                    let key = [
                        prefix.clone(),
                        format!("k{}", (t * 7 + i) % 40).into_bytes(),
                    ]
                    .concat();
                    let value = format!("{t}-{i}").into_bytes();
                    let r = c.put(&key, &value).await.expect("put");
                    done.push((r.revision, key, EventKind::Put, value));
                }
                done
            })
        })
        .collect();
    let mut writes = Vec::new();
    for t in writers {
        writes.extend(t.await.expect("writer"));
    }
    let last = writes.iter().map(|w| w.0).max().expect("writes");
    let seen = collect_until(&mut w, last, Duration::from_secs(60)).await;
    assert_eq!(seen, expected(&writes, 0));
}
