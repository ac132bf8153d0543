//! Region lifecycle: splits by command and by size while clients write and read, and idle
//! regions that hibernate and wake.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera::client::Client;
use tessera::ids::{NodeId, RegionId};

use super::common::{patient_client, wait_for_leaders, TestCluster, SYSTEM_REGIONS};

fn fast(c: &mut tessera::config::Config) {
    c.placement.heartbeat_interval_ms = 200;
    c.placement.node_down_after_ms = 1500;
    c.placement.region_report_interval_ms = 300;
}

/// The id the cluster gave the node listening at `addr`.
async fn node_id_at(client: &Client, addr: &str) -> u64 {
    client
        .nodes()
        .await
        .unwrap()
        .iter()
        .filter_map(|n| n.record.clone())
        .find(|r| r.addr == addr)
        .expect("node listed")
        .node_id
}

/// One writer per region, each overwriting its own key with a counter every `pause`, until
/// stopped (or 120 s in any case).
struct Writers {
    stop: Arc<AtomicBool>,
    errors: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<u8>, u64)>>,
}

impl Writers {
    fn start(client: &Client, regions: u32, label: &str, pause: Duration) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let tasks = (0..regions)
            .map(|i| {
                let (client, stop, errors) = (client.clone(), stop.clone(), errors.clone());
                let key = super::common::key_in_region(i, regions, label);
                tokio::spawn(async move {
                    let mut acked = 0u64;
                    let t = Instant::now();
                    while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(120) {
                        match client.put(&key, (acked + 1).to_string().as_bytes()).await {
                            Ok(_) => acked += 1,
                            Err(e) => {
                                eprintln!("region {i}: {e}");
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                    (key, acked)
                })
            })
            .collect();
        Writers {
            stop,
            errors,
            tasks,
        }
    }

    /// Stops the writers, checks that none saw an error and that every last acknowledged
    /// value reads back; returns the number of acknowledged writes.
    async fn finish(self, client: &Client) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in self.tasks {
            let (key, n) = t.await.unwrap();
            let kv = client
                .get(&key)
                .await
                .unwrap()
                .expect("acknowledged key present");
            assert_eq!(kv.value, n.to_string().as_bytes(), "{key:?}");
            total += n;
        }
        assert_eq!(
            self.errors.load(Ordering::Relaxed),
            0,
            "the client surfaced errors"
        );
        total
    }
}

/// Waits until the routing table covers the keyspace with `min` regions or more, each led;
/// returns the table.
async fn wait_for_routes(
    client: &Client,
    min: usize,
    timeout: Duration,
) -> Vec<tessera::proto::RegionRoute> {
    let t = Instant::now();
    loop {
        if let Ok(routes) = client.routes().await {
            let covered = routes
                .first()
                .and_then(|r| r.region.as_ref())
                .is_some_and(|r| r.start_key.is_empty())
                && routes
                    .last()
                    .and_then(|r| r.region.as_ref())
                    .is_some_and(|r| r.end_key.is_empty())
                && routes.windows(2).all(|w| {
                    w[0].region.as_ref().map(|r| &r.end_key)
                        == w[1].region.as_ref().map(|r| &r.start_key)
                });
            if covered && routes.len() >= min && routes.iter().all(|r| r.leader.is_some()) {
                return routes;
            }
        }
        assert!(
            t.elapsed() < timeout,
            "routing table never showed {min} led regions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writers and linearizable readers run while a region is split by command three times and
/// more regions split by size (max 150 keys): no caller sees an error, no read is served from
/// the wrong range (every read returns the writer's last acknowledged value or a newer one),
/// every acknowledged write is there at the end, and the table shows the new regions with
/// load that adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_by_command_and_size_under_load() {
    let cluster = TestCluster::start(3, 1, |c| {
        fast(c);
        c.region.max_keys = 150;
    })
    .await;
    let eps = cluster.endpoints();
    wait_for_leaders(&eps, 2, Duration::from_secs(60)).await;
    let client = patient_client(&eps).await;
    // A second client whose cache is filled now and never told about the splits except
    // through region errors.
    let stale = cluster.client().await;
    stale.put(b"k-stale", b"0").await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..4u32 {
        let (client, stop, errors) = (client.clone(), stop.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            // Each writer owns 150 keys spread over the keyspace: k{0..9}-w-n.
            let mut acked: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
            let t = Instant::now();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(60) {
                n += 1;
                let key = format!("k{}-{w}-{:03}", n % 10, n % 150).into_bytes();
                match client.put(&key, n.to_string().as_bytes()).await {
                    Ok(_) => {
                        acked.insert(key.clone(), n);
                    }
                    Err(e) => {
                        eprintln!("writer {w}: put failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Read back a key this writer wrote before: never older than acknowledged.
                let probe = format!("k{}-{w}-{:03}", (n * 7) % 10, (n * 7) % 150).into_bytes();
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
    for key in [&b"k5"[..], b"k2", b"k8"] {
        let regions = client.split(key).await.expect("split by command");
        assert_eq!(regions.len(), 2, "{regions:?}");
        assert_eq!(regions[1].start_key, key);
        assert_eq!(regions[0].end_key, key);
        let (l, r) = (regions[0].epoch.unwrap(), regions[1].epoch.unwrap());
        assert_eq!(l.version, r.version);
        // Splitting again at the same key changes nothing.
        let again = client.split(key).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].start_key, key);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The stale client's cached route is from before the splits: it follows EpochNotMatch.
    stale.put(b"k9-stale", b"1").await.unwrap();
    assert_eq!(stale.get(b"k9-stale").await.unwrap().unwrap().value, b"1");

    // Let the size-based splits happen: 4 writers × 150 keys, at most 150 keys per region.
    tokio::time::sleep(Duration::from_secs(6)).await;
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
    let stats = client.stats();
    eprintln!(
        "split under load: writes acked {}, retries {}, region errors {}, rpc errors {}",
        acked.len(),
        stats.retries.load(Ordering::Relaxed),
        stats.region_errors.load(Ordering::Relaxed),
        stats.rpc_errors.load(Ordering::Relaxed)
    );
    for (key, n) in &acked {
        let kv = client
            .get(key)
            .await
            .unwrap()
            .expect("acknowledged key present");
        assert_eq!(kv.value, n.to_string().as_bytes(), "{key:?}");
    }
    let routes = wait_for_routes(&client, 6, Duration::from_secs(20)).await;
    eprintln!("regions after splits: {}", routes.len());
    // Every key is counted by exactly one region: the table's load adds up to the data.
    let all = client.scan(b"", b"", 0).await.unwrap();
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(
        all.len(),
        acked.len() + 2,
        "the writers' keys and the stale client's two"
    );
    let t = Instant::now();
    loop {
        let routes = client.routes().await.unwrap();
        let counted: u64 = routes
            .iter()
            .filter(|r| !r.region.as_ref().unwrap().start_key.starts_with(&[0xFF]))
            .map(|r| r.load.unwrap_or_default().keys)
            .sum();
        if counted == all.len() as u64 {
            let biggest = routes
                .iter()
                .map(|r| r.load.unwrap_or_default().keys)
                .max()
                .unwrap();
            assert!(
                biggest <= 150 + 50,
                "a region stayed oversized: {biggest} keys"
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "regions' key counts {counted} never matched the {} keys",
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.shutdown().await;
}

/// Idle regions stop ticking: after a quiet period most regions sleep on every node; a
/// write wakes its region and succeeds; killing the node that leads sleeping regions makes
/// them elect elsewhere through node liveness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_regions_hibernate_and_wake() {
    let mut cluster = TestCluster::start(3, 16, fast).await;
    let eps = cluster.endpoints();
    wait_for_leaders(&eps, 17, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    // Quiet for a while: 2 election timeouts plus margin.
    let t = Instant::now();
    let mut sleeping = 0;
    while t.elapsed() < Duration::from_secs(15) {
        sleeping = (0..3)
            .map(|i| cluster.node(i).hibernating_regions())
            .sum::<usize>();
        // 16 user regions × 3 replicas; the placement region stays busy with heartbeats.
        if sleeping >= 16 * 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sleeping >= 16 * 3, "only {sleeping} replicas hibernated");
    // A write wakes its region.
    client.put(b"wake-me", b"1").await.unwrap();
    assert_eq!(client.get(b"wake-me").await.unwrap().unwrap().value, b"1");

    // Let everything sleep again, then stop the node leading most user regions.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let routes = client.routes().await.unwrap();
    let mut led = [0usize; 4];
    for r in &routes {
        led[r.leader.unwrap().node_id as usize] += 1;
    }
    let victim = (1..=3).max_by_key(|n| led[*n]).unwrap();
    cluster.stop(victim - 1).await;
    // Every region gets a leader on the two others, without any client traffic.
    let others: Vec<String> = (0..3)
        .filter(|i| *i != victim - 1)
        .map(|i| cluster.endpoints()[i].clone())
        .collect();
    let t = Instant::now();
    loop {
        let mut led_regions = std::collections::HashSet::new();
        for ep in &others {
            if let Some(infos) = super::common::node_regions(ep).await {
                for i in infos {
                    if i.leader.is_some_and(|l| l.node_id != victim as u64) {
                        led_regions.insert(i.region.unwrap().id);
                    }
                }
            }
        }
        if led_regions.len() == 16 + SYSTEM_REGIONS {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "only {} regions re-elected after node {victim} stopped",
            led_regions.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "sleeping regions re-elected {:?} after their leader's node stopped",
        t.elapsed()
    );
    cluster.shutdown().await;
}

/// Membership changes while writers run on every region: a fourth node joins; one region's
/// replica moves to it from a follower and another's from its leader (leadership moves
/// first); a learner is added, promoted, and a voter removed. No caller sees an error,
/// every acknowledged write is there, the new replica has the data, and removed replicas are
/// destroyed on their nodes (a tombstone keeps them from coming back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_under_load() {
    const REGIONS: u32 = 4;
    // Membership changes by command only: the scheduler would rebalance behind our back.
    let manual = |c: &mut tessera::config::Config| {
        fast(c);
        c.placement.schedule = false;
    };
    let mut cluster = TestCluster::start(3, REGIONS, manual).await;
    let eps = cluster.endpoints();
    wait_for_leaders(
        &eps,
        REGIONS as usize + SYSTEM_REGIONS,
        Duration::from_secs(60),
    )
    .await;
    let client = patient_client(&eps).await;
    // Some data for the snapshots to carry.
    for i in 0..REGIONS {
        for j in 0..50 {
            let key = super::common::key_in_region(i, REGIONS, &format!("pre{j:02}"));
            client.put(&key, &[j as u8; 64]).await.unwrap();
        }
    }
    let four = cluster.join(0, manual).await;
    let four_addr = cluster.endpoints()[four].clone();
    let four_id = node_id_at(&client, &four_addr).await;
    let writers = Writers::start(&client, REGIONS, "member", Duration::from_millis(5));
    let routes = wait_for_routes(
        &client,
        REGIONS as usize + SYSTEM_REGIONS,
        Duration::from_secs(20),
    )
    .await;
    let user: Vec<_> = routes
        .iter()
        .filter(|r| !r.region.as_ref().unwrap().start_key.starts_with(&[0xFF]))
        .cloned()
        .collect();

    // Region A: move a follower's replica to node 4.
    let a = user[0].region.clone().unwrap();
    let a_leader = user[0].leader.unwrap().node_id;
    let a_from = a
        .peers
        .iter()
        .map(|p| p.node_id)
        .find(|n| *n != a_leader)
        .unwrap();
    let t = Instant::now();
    let moved = client
        .move_replica(
            RegionId(a.id),
            Some(NodeId(a_from)),
            NodeId(four_id),
            Duration::from_secs(60),
        )
        .await
        .expect("move");
    eprintln!(
        "moved region {} from node {a_from} to node {four_id} in {:?}",
        a.id,
        t.elapsed()
    );
    let nodes: Vec<u64> = moved.peers.iter().map(|p| p.node_id).collect();
    assert!(
        nodes.contains(&four_id) && !nodes.contains(&a_from),
        "{nodes:?}"
    );
    assert!(
        moved.peers.iter().all(|p| p.role == 0),
        "all voters: {moved:?}"
    );
    assert_eq!(
        moved.epoch.unwrap().conf_ver,
        a.epoch.unwrap().conf_ver + 3,
        "learner added, joint entered, joint left"
    );

    // Region B: move the leader's own replica.
    let b = user[1].region.clone().unwrap();
    let b_leader = user[1].leader.unwrap().node_id;
    let moved_b = client
        .move_replica(
            RegionId(b.id),
            Some(NodeId(b_leader)),
            NodeId(four_id),
            Duration::from_secs(60),
        )
        .await
        .expect("move leader's replica");
    assert!(!moved_b.peers.iter().any(|p| p.node_id == b_leader));
    assert!(moved_b.peers.iter().any(|p| p.node_id == four_id));

    // Region C: learner on node 4, promoted, then a follower removed.
    let c = user[2].region.clone().unwrap();
    let c_leader = user[2].leader.unwrap().node_id;
    use tessera::proto::PeerChangeKind as K;
    let r = client
        .change_peers(RegionId(c.id), &[(K::AddLearner, NodeId(four_id))])
        .await
        .unwrap();
    assert!(r.peers.iter().any(|p| p.node_id == four_id && p.role == 1));
    let r = client
        .change_peers(RegionId(c.id), &[(K::AddVoter, NodeId(four_id))])
        .await
        .unwrap();
    assert!(r.peers.iter().any(|p| p.node_id == four_id && p.role == 0));
    assert_eq!(r.peers.len(), 4);
    let c_from = r
        .peers
        .iter()
        .map(|p| p.node_id)
        .find(|n| *n != c_leader && *n != four_id)
        .unwrap();
    let r = client
        .change_peers(RegionId(c.id), &[(K::Remove, NodeId(c_from))])
        .await
        .unwrap();
    assert_eq!(r.peers.len(), 3);
    // Bad requests are refused with a reason, nothing changes.
    let e = client
        .change_peers(RegionId(c.id), &[(K::Remove, NodeId(99))])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no peer on node 99"), "{e}");

    tokio::time::sleep(Duration::from_millis(500)).await;
    let acked = writers.finish(&client).await;
    let stats = client.stats();
    eprintln!(
        "membership under load: writes acked {acked}, retries {}, region errors {}, rpc errors {}",
        stats.retries.load(Ordering::Relaxed),
        stats.region_errors.load(Ordering::Relaxed),
        stats.rpc_errors.load(Ordering::Relaxed)
    );

    // Node 4's replicas hold the data (read from its own copy), and removed replicas are
    // gone from their nodes.
    for (region, i) in [(&moved, 0u32), (&moved_b, 1)] {
        let key = super::common::key_in_region(i, REGIONS, "pre07");
        let t = Instant::now();
        loop {
            let routes = client.routes().await.unwrap();
            let cur = routes
                .iter()
                .find(|r| r.region.as_ref().unwrap().id == region.id)
                .and_then(|r| r.region.clone())
                .unwrap();
            if let Some(Some(kv)) = super::common::local_get(&four_addr, &cur, &key).await {
                assert_eq!(kv.value, vec![7u8; 64]);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "node 4 never served {key:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for (region, node) in [(a.id, a_from), (b.id, b_leader), (c.id, c_from)] {
        let t = Instant::now();
        while cluster
            .node(node as usize - 1)
            .router()
            .contains(tessera::ids::RegionId(region))
        {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "removed replica of region {region} still on node {node}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A restart does not bring a destroyed replica back.
    cluster.stop(a_from as usize - 1).await;
    cluster.restart(a_from as usize - 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!cluster
        .node(a_from as usize - 1)
        .router()
        .contains(tessera::ids::RegionId(a.id)));

    // A replica removed while its node was down learns it when the node comes back (its
    // vote requests are answered with a tombstone) and is destroyed.
    let d = user[3].region.clone().unwrap();
    let d_leader = client
        .routes()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.region.as_ref().unwrap().id == d.id)
        .and_then(|r| r.leader)
        .unwrap()
        .node_id;
    let d_from = d
        .peers
        .iter()
        .map(|p| p.node_id)
        .find(|n| *n != d_leader && *n != four_id)
        .unwrap();
    cluster.stop(d_from as usize - 1).await;
    let r = client
        .change_peers(RegionId(d.id), &[(K::Remove, NodeId(d_from))])
        .await
        .unwrap();
    assert_eq!(r.peers.len(), 2);
    cluster.restart(d_from as usize - 1).await;
    let t = Instant::now();
    while cluster
        .node(d_from as usize - 1)
        .router()
        .contains(tessera::ids::RegionId(d.id))
    {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "replica removed while down still on node {d_from}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "replica removed while its node was down destroyed {:?} after restart",
        t.elapsed()
    );
    cluster.shutdown().await;
}

/// Replica and leader counts per node from the routing table (voters and learners).
async fn placement_counts(client: &Client) -> (BTreeMap<u64, usize>, BTreeMap<u64, usize>) {
    let mut replicas = BTreeMap::new();
    let mut leaders = BTreeMap::new();
    for r in client.routes().await.unwrap_or_default() {
        for p in &r.region.as_ref().unwrap().peers {
            *replicas.entry(p.node_id).or_insert(0) += 1;
        }
        if let Some(l) = r.leader {
            *leaders.entry(l.node_id).or_insert(0) += 1;
        }
    }
    (replicas, leaders)
}

/// The scheduler at work while writers run: a joining node receives its share of replicas
/// and leaders (moves limited to two at a time), and a node that stays down is replaced so
/// that every region is back at three replicas on live nodes. No caller sees an error and
/// every acknowledged write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_balances_a_join_and_replaces_a_dead_node() {
    const REGIONS: u32 = 8;
    let tweak = |c: &mut tessera::config::Config| {
        fast(c);
        c.placement.schedule_interval_ms = 300;
        c.placement.replace_down_after_ms = 3000;
    };
    let mut cluster = TestCluster::start(3, REGIONS, tweak).await;
    let eps = cluster.endpoints();
    wait_for_leaders(
        &eps,
        REGIONS as usize + SYSTEM_REGIONS,
        Duration::from_secs(60),
    )
    .await;
    let client = patient_client(&eps).await;
    for i in 0..REGIONS {
        let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = (0..200)
            .map(|j| {
                let key = super::common::key_in_region(i, REGIONS, &format!("bulk{j:03}"));
                (key, Some(vec![b'v'; 256]))
            })
            .collect();
        client.batch_write(&ops).await.unwrap();
    }
    let writers = Writers::start(&client, REGIONS, "sched", Duration::from_millis(10));

    // A fourth node joins and receives its share: 27 replicas over 4 nodes.
    let snap_before: u64 = (0..3)
        .map(|i| cluster.node(i).transport().snapshot_bytes_sent())
        .sum();
    let t = Instant::now();
    let four = cluster.join(0, tweak).await;
    let four_addr = cluster.endpoints()[four].clone();
    let four_id = node_id_at(&client, &four_addr).await;
    loop {
        let (replicas, leaders) = placement_counts(&client).await;
        let max = replicas.values().max().copied().unwrap_or(0);
        let min = replicas.values().min().copied().unwrap_or(0);
        let mine = replicas.get(&four_id).copied().unwrap_or(0);
        if replicas.len() == 4
            && mine >= 6
            && max - min <= 1
            && leaders.get(&four_id).copied().unwrap_or(0) >= 1
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "node {four_id} never got its share: {replicas:?} leaders {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let snap_after: u64 = (0..3)
        .map(|i| cluster.node(i).transport().snapshot_bytes_sent())
        .sum();
    eprintln!(
        "rebalance after join: {:?}, snapshot bytes sent {}, counts {:?}",
        t.elapsed(),
        snap_after - snap_before,
        placement_counts(&client).await
    );

    // Node 2 dies for good: its replicas are replaced on the three others.
    cluster.stop(1).await;
    let took = super::common::wait_replaced(
        &client,
        REGIONS as usize + SYSTEM_REGIONS,
        2,
        Duration::from_secs(60),
    )
    .await;
    eprintln!("replicas of the dead node replaced {took:?} after it stopped");

    writers.finish(&client).await;
    let all = client.scan(b"", b"", 0).await.unwrap();
    assert_eq!(all.len(), REGIONS as usize * 201);
    cluster.shutdown().await;
}
