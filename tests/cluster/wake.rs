//! Sleeping regions stay led by the same leader when only a follower is woken by a
//! serializable read it serves itself.

use std::time::Duration;

use tessera::proto::{Region, RegionInfo};

use super::common::{local_get, node_regions, wait_for_leaders, TestCluster};

/// (term, leader node) of the user region as each running node sees it.
async fn views(eps: &[String]) -> Vec<(u64, Option<u64>)> {
    let mut out = Vec::new();
    for a in eps {
        let rs: Vec<RegionInfo> = node_regions(a).await.unwrap_or_default();
        for r in rs {
            let user = r
                .region
                .as_ref()
                .is_some_and(|g| !tessera::storage::keys::is_system_key(&g.start_key));
            if user {
                out.push((r.term, r.leader.map(|l| l.node_id)));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waking_a_follower_does_not_move_the_leadership() {
    let cluster = TestCluster::start(3, 1, |_| {}).await;
    let eps = cluster.endpoints();
    wait_for_leaders(&eps, 2, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    client.put(b"/wake/k", b"v").await.unwrap();
    let region: Region = client
        .routes()
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.region)
        .find(|r| tessera::storage::keys::in_range(b"/wake/k", &r.start_key, &r.end_key))
        .unwrap();
    // Idle for many election timeouts (0.5 s here): the region falls asleep.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = views(&eps).await;
    let leader = before[0].1.expect("a leader");
    assert!(before.iter().all(|v| *v == before[0]), "{before:?}");
    let follower = (1..=3u64).find(|n| *n != leader).unwrap() as usize - 1;

    // Serializable reads on a follower, each after the region fell asleep again.
    for _ in 0..3 {
        let got = local_get(&eps[follower], &region, b"/wake/k").await;
        assert_eq!(got.flatten().map(|kv| kv.value), Some(b"v".to_vec()));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = views(&eps).await;
        assert_eq!(now, before, "a follower's read moved the leadership");
    }

    cluster.shutdown().await;
}
