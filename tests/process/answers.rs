//! Answers that tell the truth about whether a write applied, and peers that exist once.

use std::time::{Duration, Instant};

use tessera::client::{Client, ClientOptions};
use tessera::ids::{NodeId, RegionId};
use tessera::proto::kv_client::KvClient;
use tessera::proto::node_client::NodeClient;
use tessera::proto::{
    cas_request, compare, region_error, CasRequest, Compare, PutRequest, Region, RegionInfo,
    RequestHeader, SetFailpointRequest,
};

use super::common::{self, node_regions, start_process_cluster, wait_for_leaders};
use super::{endpoints, metric_sum, scrape_metrics, wait_serving};

/// `addr`'s view of the region holding `key`.
async fn info_of(addr: &str, key: &[u8]) -> Option<RegionInfo> {
    node_regions(addr).await?.into_iter().find(|i| {
        i.region
            .as_ref()
            .is_some_and(|r| tessera::storage::keys::in_range(key, &r.start_key, &r.end_key))
    })
}

fn header(region: &Region) -> Option<RequestHeader> {
    Some(RequestHeader {
        region_id: region.id,
        region_epoch: region.epoch,
        ..Default::default()
    })
}

/// One put sent to `addr` only: whether it was acknowledged.
async fn put_at(addr: &str, region: &Region, key: &[u8], value: &[u8]) -> bool {
    let call = async {
        let mut kv = KvClient::connect(format!("http://{addr}")).await.ok()?;
        let r = kv
            .put(PutRequest {
                header: header(region),
                key: key.to_vec(),
                value: value.to_vec(),
                lease: 0,
            })
            .await
            .ok()?
            .into_inner();
        r.region_error.is_none().then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), call).await,
        Ok(Some(()))
    )
}

async fn set_failpoint(addr: &str, name: &str, actions: &str) {
    let mut c = NodeClient::connect(format!("http://{addr}"))
        .await
        .expect("connect for a fail point");
    c.set_failpoint(SetFailpointRequest {
        name: name.into(),
        actions: actions.into(),
    })
    .await
    .expect("set fail point");
}

#[derive(Debug, PartialEq)]
enum CasAnswer {
    Succeeded,
    Failed,
    NotLeader,
    Other(String),
}

/// A leader that regains leadership with proposals of an earlier term still queued (taken
/// while it was cut off, overwritten after it healed) must answer each new proposal from
/// the entry that carries it. Pipelined compare-and-swaps on the version, sent raw (no
/// client retries) to that leader: every one answered "not leader" must have changed
/// nothing, so the key's final version counts exactly the ones that succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_leader_answers_each_proposal_from_its_own_entry() {
    let dir = common::test_dir("a_returning_leader_answers_each_proposal_from_its_own_entry");
    let procs = start_process_cluster(dir.path(), 3, 1, |c| c.raft.hibernate_regions = false);
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 2, Duration::from_secs(90)).await;
    let key = b"truth/k".to_vec();
    let info = info_of(&addrs[0], &key).await.expect("the key's region");
    let region = info.region.expect("descriptor");
    let p = info.leader.expect("a leader").node_id as usize;
    let first_term = info.term;
    let others: Vec<usize> = (1..=3).filter(|n| *n != p).collect();

    // P is cut off; 30 puts reach it and are appended to its log, never to commit.
    for &n in &others {
        common::set_link(&addrs[p - 1], n as u64, "drop").await;
        common::set_link(&addrs[n - 1], p as u64, "drop").await;
    }
    for i in 0..30u32 {
        let (addr, region, key) = (addrs[p - 1].clone(), region.clone(), key.clone());
        tokio::spawn(async move {
            let _ = put_at(&addr, &region, &key, format!("stale{i}").as_bytes()).await;
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The others elect Q and take a few writes.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut written = 0;
    while written < 3 {
        for &n in &others {
            if put_at(&addrs[n - 1], &region, &key, b"through q").await {
                written += 1;
            }
        }
        assert!(Instant::now() < deadline, "the majority never took writes");
    }
    // Healed, P follows Q (its tail is overwritten), then leads again.
    for &n in &others {
        common::set_link(&addrs[p - 1], n as u64, "").await;
        common::set_link(&addrs[n - 1], p as u64, "").await;
    }
    let admin = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Every node agrees that P leads, in a term after the one it was cut off in (its
        // own view alone could be the stale one from before it heard of Q).
        let mut agreed = true;
        for a in &addrs {
            agreed &= info_of(a, &key).await.is_some_and(|i| {
                i.leader.is_some_and(|l| l.node_id == p as u64) && i.term > first_term + 1
            });
        }
        if agreed {
            break;
        }
        let _ = admin
            .transfer_leader(RegionId(region.id), NodeId(p as u64))
            .await;
        assert!(Instant::now() < deadline, "leadership never returned to P");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let base = admin.get(&key).await.unwrap().map_or(0, |kv| kv.version);

    // Pipelined CAS increments: the i-th expects version base + i.
    let kv = KvClient::connect(format!("http://{}", addrs[p - 1]))
        .await
        .unwrap();
    let mut calls = Vec::new();
    for i in 0..30u64 {
        let mut kv = kv.clone();
        let h = header(&region);
        let key = key.clone();
        calls.push(tokio::spawn(async move {
            let r = kv
                .compare_and_swap(CasRequest {
                    header: h,
                    key,
                    compare: Some(Compare {
                        target: Some(compare::Target::Version(base + i)),
                    }),
                    action: Some(cas_request::Action::Put(format!("cas{i}").into_bytes())),
                    lease: 0,
                })
                .await;
            match r.map(|r| r.into_inner()) {
                Ok(r) => match r.region_error.and_then(|e| e.error) {
                    None if r.succeeded => CasAnswer::Succeeded,
                    None => CasAnswer::Failed,
                    Some(region_error::Error::NotLeader(_)) => CasAnswer::NotLeader,
                    Some(e) => CasAnswer::Other(format!("{e:?}")),
                },
                Err(s) => CasAnswer::Other(s.to_string()),
            }
        }));
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut answers = Vec::new();
    for c in calls {
        answers.push(c.await.unwrap());
    }
    let succeeded = answers
        .iter()
        .filter(|a| **a == CasAnswer::Succeeded)
        .count() as u64;
    let after = admin.get(&key).await.unwrap().map_or(0, |kv| kv.version);
    eprintln!("answers: {answers:?}; version {base} -> {after}");
    assert!(
        answers.iter().all(|a| !matches!(a, CasAnswer::Other(_))),
        "{answers:?}"
    );
    assert!(
        succeeded > 0,
        "no compare-and-swap reached the returned leader: {answers:?}"
    );
    assert_eq!(
        after - base,
        succeeded,
        "compare-and-swaps answered as not applied did apply: {answers:?}"
    );
    drop(procs);
}

/// A split applying on a follower whose round is slow to write: messages of the new region
/// (its leader's heartbeats and votes) that arrive between the apply and the write must not
/// create a second, empty peer of it. With two workers, that peer could run beside the one
/// the split made, with the same peer id. After a restart the follower's descriptor of the
/// new region is the leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_on_a_slow_follower_creates_no_second_peer() {
    let dir = common::test_dir("a_split_on_a_slow_follower_creates_no_second_peer");
    let metrics: Vec<String> = common::free_addrs(3)
        .iter()
        .map(|a| a.to_string())
        .collect();
    let m = metrics.clone();
    let mut procs = start_process_cluster(dir.path(), 3, 1, move |c| {
        c.raft.workers = 2;
        c.raft.hibernate_regions = false;
        c.node.metrics_addr = m[c.node.id as usize - 1].clone();
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 2, Duration::from_secs(90)).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    for i in 0..20 {
        client
            .put(format!("split/{i:02}").as_bytes(), b"v")
            .await
            .unwrap();
    }
    let info = info_of(&addrs[0], b"split/10").await.expect("region");
    let leader = info.leader.expect("leader").node_id as usize;
    let f = (1..=3).find(|n| *n != leader).unwrap();
    let created_before = metric_sum(
        &scrape_metrics(&metrics[f - 1]),
        "tessera_peers_created_total",
        "",
    );

    set_failpoint(&addrs[f - 1], "raft_before_write", "sleep(300)").await;
    let halves = client.split(b"split/10").await.expect("split");
    assert_eq!(halves.len(), 2);
    let new_region = halves
        .iter()
        .find(|r| r.start_key == b"split/10")
        .expect("the new region")
        .clone();
    // Its leader's heartbeats and votes reach the slow follower meanwhile.
    tokio::time::sleep(Duration::from_secs(3)).await;
    set_failpoint(&addrs[f - 1], "raft_before_write", "").await;
    let created = metric_sum(
        &scrape_metrics(&metrics[f - 1]),
        "tessera_peers_created_total",
        "",
    ) - created_before;
    assert_eq!(
        created, 0.0,
        "a message created a peer of the split region on the follower"
    );

    // The follower's descriptor of the new region, after a restart, is the leader's.
    let log = dir.path().join(format!("node{f}.log"));
    procs[f - 1].restart(&log);
    wait_serving(std::slice::from_ref(&addrs[f - 1])).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let on_leader = info_of(&addrs[leader - 1], b"split/10").await;
        let on_f = info_of(&addrs[f - 1], b"split/10").await;
        let (Some(l), Some(fo)) = (on_leader, on_f) else {
            assert!(
                Instant::now() < deadline,
                "the follower lost the new region"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if l.region == fo.region && fo.region.as_ref().is_some_and(|r| r.id == new_region.id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "descriptors differ: leader {:?}, follower {:?}",
            l.region,
            fo.region
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And it serves: a write to the new region reaches every replica.
    client.put(b"split/99", b"after").await.unwrap();
}
