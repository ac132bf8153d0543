//! The placement region: node registry with heartbeats and down detection, the id counter,
//! and the reserved system keyspace.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tessera::proto::node_client::NodeClient;
use tessera::proto::{ListNodesRequest, NodeState};

use super::common::{wait_for_leaders, TestCluster, SYSTEM_REGIONS};

async fn node_states(addr: &str) -> Option<HashMap<u64, NodeState>> {
    let mut c = NodeClient::connect(format!("http://{addr}")).await.ok()?;
    let nodes = c
        .list_nodes(ListNodesRequest {})
        .await
        .ok()?
        .into_inner()
        .nodes;
    Some(
        nodes
            .into_iter()
            .map(|n| {
                (
                    n.record.unwrap_or_default().node_id,
                    NodeState::try_from(n.state).unwrap_or(NodeState::Down),
                )
            })
            .collect(),
    )
}

/// Waits until `addr` reports `want` for node `node`; returns how long that took.
async fn wait_state(addr: &str, node: u64, want: NodeState, timeout: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if let Some(s) = node_states(addr).await {
            if s.get(&node) == Some(&want) {
                return t.elapsed();
            }
        }
        assert!(
            t.elapsed() < timeout,
            "node {node} never became {want:?} as seen by {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_ids_and_reserved_keys() {
    let mut cluster = TestCluster::start(3, 4, |c| {
        c.placement.heartbeat_interval_ms = 200;
        c.placement.node_down_after_ms = 1500;
    })
    .await;
    wait_for_leaders(&cluster.endpoints(), 5, Duration::from_secs(60)).await;
    let eps = cluster.endpoints();
    for n in 1..=3 {
        wait_state(&eps[1], n, NodeState::Up, Duration::from_secs(20)).await;
    }

    // Users cannot touch the system keyspace.
    let user = cluster.client().await;
    let e = user.put(&[0xFF, b'x'], b"v").await.unwrap_err();
    assert!(
        matches!(e, tessera::client::Error::InvalidArgument(_)),
        "{e}"
    );
    user.put(b"plain", b"v").await.unwrap();
    let all = user.scan(b"", b"", 0).await.unwrap();
    assert!(
        all.iter().all(|kv| kv.key.first() != Some(&0xFF)),
        "a user scan shows no system keys"
    );

    // Ids: concurrent allocations are disjoint and above every bootstrap id.
    let sys = super::common::system_client(&eps).await;
    let max_bootstrap = user
        .regions()
        .await
        .unwrap()
        .iter()
        .flat_map(|c| c.region.peers.iter().map(|p| p.id).chain([c.region.id]))
        .max()
        .unwrap();
    let (a, b) = tokio::join!(
        tessera::placement::alloc_ids(&sys, 10),
        tessera::placement::alloc_ids(&sys, 10)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.end - a.start, b.end - b.start), (10, 10));
    assert!(a.end <= b.start || b.end <= a.start, "overlap: {a:?} {b:?}");
    assert!(a.start.min(b.start) > max_bootstrap);
    let high = a.end.max(b.end);

    // A stopped node is shown down within the configured time, and up again after restart.
    let t = Instant::now();
    cluster.stop(2).await;
    let took = wait_state(&eps[0], 3, NodeState::Down, Duration::from_secs(15)).await;
    eprintln!(
        "node 3 shown down {:?} after it stopped (node_down_after_ms = 1500)",
        t.elapsed()
    );
    assert!(took < Duration::from_secs(5));
    cluster.restart(2).await;
    wait_state(&eps[0], 3, NodeState::Up, Duration::from_secs(30)).await;

    // The registry and the counter survive a restart of every node.
    for i in 0..3 {
        cluster.stop(i).await;
    }
    for i in 0..3 {
        cluster.restart(i).await;
    }
    wait_for_leaders(&eps, 5, Duration::from_secs(60)).await;
    let states = node_states(&eps[2]).await.expect("registry readable");
    assert_eq!(states.len(), 3);
    let sys = super::common::system_client(&eps).await;
    let c = tessera::placement::alloc_ids(&sys, 1).await.unwrap();
    assert!(c.start >= high, "ids are never reused: {c:?} after {high}");
    // The routing table too: every region's row is still there, and any node serves it.
    let user = cluster.client().await;
    let t = Instant::now();
    loop {
        let st = user.status().await.unwrap();
        if st.regions == 4 + SYSTEM_REGIONS as u64
            && st.regions_without_leader == 0
            && st.max_id >= c.start
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "table after restart: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.shutdown().await;
}
