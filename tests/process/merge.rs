//! A merge's commit that one replica missed: that node applied the source's prepare, was
//! cut off from raft traffic while the others committed, was killed -9, restarted and
//! healed after the target's log moved past it. It must catch up by the target's snapshot,
//! ending its frozen source replica, and hold every key.

use std::time::{Duration, Instant};

use tessera::client::{Client, ClientOptions};
use tessera::proto::node_client::NodeClient;
use tessera::proto::{region_error, MergeRegionsRequest, Region, RequestHeader};

use super::common::{self, node_regions};
use super::{local_read, scrape_metrics, start_led_with_metrics};

/// The region with id `id` on `addr`, with its applied index and leader's node.
async fn replica(addr: &str, id: u64) -> Option<(Region, u64, Option<u64>)> {
    node_regions(addr).await?.into_iter().find_map(|i| {
        let r = i.region?;
        (r.id == id).then(|| (r, i.applied_index, i.leader.map(|l| l.node_id)))
    })
}

/// One step of merging `source` into `target`, sent to the node leading `source` (as
/// `addrs[0]` knows it); `None` while that is not known or the call fails.
async fn step(addrs: &[String], source: &Region, target: u64) -> Option<(bool, String)> {
    let (_, _, leader) = replica(&addrs[0], source.id).await?;
    let addr = &addrs[leader? as usize - 1];
    let mut c = NodeClient::connect(format!("http://{addr}")).await.ok()?;
    let call = c.merge_regions(MergeRegionsRequest {
        header: Some(RequestHeader {
            region_id: source.id,
            region_epoch: source.epoch,
            ..Default::default()
        }),
        target_id: target,
    });
    let r = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .ok()?
        .ok()?
        .into_inner();
    match r.region_error.and_then(|e| e.error) {
        None => Some((r.done, r.step)),
        Some(region_error::Error::NotLeader(_)) => None,
        Some(other) => panic!("merge step refused: {other:?}"),
    }
}

/// Steps the merge until `until` says stop; returns the last step's answer.
async fn step_until(
    addrs: &[String],
    source: &Region,
    target: u64,
    until: impl Fn(bool, &str) -> bool,
) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((done, s)) = step(addrs, source, target).await {
            if until(done, &s) {
                return (done, s);
            }
        }
        assert!(Instant::now() < deadline, "the merge never got there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_the_commit_catches_up_by_snapshot_after_a_crash() {
    let dir = common::test_dir("a_replica_that_missed_the_commit_catches_up_by_snapshot");
    let (mut procs, addrs, metrics) = start_led_with_metrics(dir.path(), 3, 1, |c| {
        c.raft.log_gc_threshold = 10;
        c.raft.hibernate_regions = false;
    })
    .await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .expect("client connects");
    for i in 0..50 {
        for side in ["a", "b"] {
            let k = format!("{side}-{i:02}");
            client.put(k.as_bytes(), k.as_bytes()).await.unwrap();
        }
    }
    let halves = client.split(b"b").await.unwrap();
    let (left, right) = (halves[0].clone(), halves[1].clone());

    // Lock and prepare: the source freezes on every node.
    step_until(&addrs, &right, left.id, |_, s| s == "source frozen").await;
    let (_, _, leader) = replica(&addrs[0], right.id).await.unwrap();
    let leader = leader.expect("the source has a leader") as usize;
    let victim = (leader % 3) + 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, lead_applied, _) = replica(&addrs[leader - 1], right.id).await.unwrap();
        let (_, applied, _) = replica(&addrs[victim - 1], right.id).await.unwrap();
        if applied >= lead_applied {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {victim} never applied the prepare"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Cut the victim off from raft traffic; the others commit the merge without it.
    for n in (1..=3).filter(|n| *n != victim) {
        common::set_link(&addrs[n - 1], victim as u64, "drop").await;
        common::set_link(&addrs[victim - 1], n as u64, "drop").await;
    }
    let (done, _) = step_until(&addrs, &right, left.id, |done, _| done).await;
    assert!(done);
    // The victim dies; the merged region's log moves far past it.
    procs[victim - 1].kill9();
    for i in 0..100 {
        let k = format!("c-{i:02}");
        client.put(k.as_bytes(), b"after").await.unwrap();
    }
    procs[victim - 1].restart(&dir.path().join(format!("node{victim}.log")));
    tokio::time::sleep(Duration::from_secs(1)).await;
    for n in (1..=3).filter(|n| *n != victim) {
        common::set_link(&addrs[n - 1], victim as u64, "").await;
    }
    // It catches up by snapshot: the merged region covers both halves there, the source is
    // gone, and its own replica holds every key.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let merged = replica(&addrs[victim - 1], left.id).await;
        let source = replica(&addrs[victim - 1], right.id).await;
        if source.is_none() && merged.is_some_and(|(r, _, _)| r.end_key == right.end_key) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {victim} never took the merged region's snapshot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let page = scrape_metrics(&metrics[victim - 1]);
    assert!(
        common::metric_sum(&page, "tessera_snapshots_received_total", "") >= 1.0,
        "node {victim} caught up without a snapshot"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    for side in ["a", "b"] {
        for i in 0..50 {
            let k = format!("{side}-{i:02}");
            while local_read(&addrs[victim - 1], k.as_bytes()).await != Some(k.clone().into_bytes())
            {
                assert!(Instant::now() < deadline, "node {victim} lacks {k}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(
        local_read(&addrs[victim - 1], b"c-99").await,
        Some(b"after".to_vec())
    );
}
