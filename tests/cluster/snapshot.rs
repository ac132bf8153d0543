//! A follower that misses more than the leaders keep in their logs is caught up by a
//! snapshot streamed in chunks.

use std::time::{Duration, Instant};

use tessera::ids::RegionId;
use tessera::storage::PeerStorage;

use super::common::{key_in_region, wait_for_leaders, TestCluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    let mut cluster = TestCluster::start(3, 2, |c| {
        c.raft.log_gc_threshold = 20;
    })
    .await;
    let leaders = wait_for_leaders(&cluster.endpoints(), 2, Duration::from_secs(60)).await;
    // Stop a node that leads nothing if there is one, so elections do not slow the test.
    let victim = (1..=3u64)
        .find(|n| leaders.iter().all(|(_, l)| l != n))
        .unwrap_or(3) as usize
        - 1;
    let client = cluster.client().await;
    let key = |i: u32| key_in_region(0, 2, &format!("/s{i:04}"));
    client.put(&key(0), b"v").await.unwrap();
    cluster.stop(victim).await;

    // Far more writes than log_gc_threshold: the leader compacts past the stopped follower.
    for i in 0..300u32 {
        client
            .put(&key(i), format!("v{i}").as_bytes())
            .await
            .unwrap();
    }
    let leader_applied = {
        let n = cluster.nodes.iter().flatten().next().unwrap();
        PeerStorage::open(n.engine().clone(), RegionId(1))
            .unwrap()
            .applied_index()
    };
    // Give the leaders a few ticks to run log GC.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let truncated_on_leaders: Vec<u64> = cluster
        .nodes
        .iter()
        .flatten()
        .map(|n| {
            PeerStorage::open(n.engine().clone(), RegionId(1))
                .unwrap()
                .truncated_index()
        })
        .collect();
    assert!(
        truncated_on_leaders.iter().all(|t| *t > 100),
        "logs were compacted: {truncated_on_leaders:?}"
    );

    cluster.restart(victim).await;
    let engine = cluster.nodes[victim].as_ref().unwrap().engine().clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ps = PeerStorage::open(engine.clone(), RegionId(1)).unwrap();
        if ps.applied_index() >= leader_applied {
            // The follower's log starts past where it stopped: it got a snapshot.
            assert!(
                ps.truncated_index() > 100,
                "truncated at {}",
                ps.truncated_index()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "follower never caught up (applied {})",
            ps.applied_index()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its local state machine holds every key.
    let mut n = 0;
    engine
        .scan(
            tessera::storage::Cf::Data,
            &tessera::storage::keys::data_key(&key(0)),
            &tessera::storage::keys::data_key(&key(9999)),
            |_, _| {
                n += 1;
                Ok(true)
            },
        )
        .unwrap();
    assert_eq!(n, 300);
    cluster.shutdown().await;
}
