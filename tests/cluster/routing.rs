//! The placement routing table and the client that routes by it: leaders report their
//! regions at once on change, any node answers LocateKey / ScanRegions / ClusterStatus, and a
//! client keeps working without surfacing a routing error while leaders move or die.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera::client::{Client, Health};
use tessera::ids::{NodeId, RegionId};
use tessera::proto::node_client::NodeClient;
use tessera::proto::{LocateKeyRequest, RegionRoute};

use super::common::{key_in_region, node_regions, wait_for_leaders, TestCluster, SYSTEM_REGIONS};

const REGIONS: u32 = 16;

fn fast(c: &mut tessera::config::Config) {
    c.placement.heartbeat_interval_ms = 200;
    c.placement.node_down_after_ms = 1500;
    c.placement.region_report_interval_ms = 500;
}

/// Waits until the routing table lists `n` regions, each with a leader.
async fn wait_for_table(client: &Client, n: u64, timeout: Duration) -> Vec<RegionRoute> {
    let t = Instant::now();
    loop {
        if let Ok(st) = client.status().await {
            if st.regions == n && st.regions_without_leader == 0 {
                return client.routes().await.expect("routes");
            }
        }
        assert!(t.elapsed() < timeout, "routing table never filled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The leader of `region` as its own replicas see it (node id).
async fn actual_leader(eps: &[String], region: u64) -> Option<u64> {
    for ep in eps {
        if let Some(infos) = node_regions(ep).await {
            if let Some(l) = infos
                .iter()
                .find(|i| i.region.as_ref().map(|r| r.id) == Some(region))
                .and_then(|i| i.leader)
            {
                return Some(l.node_id);
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_is_filled_and_locate_key_routes() {
    let cluster = TestCluster::start(3, REGIONS, fast).await;
    let eps = cluster.endpoints();
    wait_for_leaders(
        &eps,
        REGIONS as usize + SYSTEM_REGIONS,
        Duration::from_secs(60),
    )
    .await;
    let client = cluster.client().await;
    let routes = wait_for_table(
        &client,
        REGIONS as u64 + SYSTEM_REGIONS as u64,
        Duration::from_secs(20),
    )
    .await;
    // The table covers the keyspace without gaps or overlaps, in order.
    let mut expect: Vec<u8> = Vec::new();
    for r in &routes {
        let region = r.region.as_ref().unwrap();
        assert_eq!(
            region.start_key, expect,
            "gap or overlap before {}",
            region.id
        );
        expect = region.end_key.clone();
    }
    assert!(expect.is_empty(), "the last region runs to the end");

    // Every node answers LocateKey with the region holding the key.
    for i in 0..REGIONS {
        let key = key_in_region(i, REGIONS, "locate");
        let mut n = NodeClient::connect(format!("http://{}", eps[i as usize % 3]))
            .await
            .unwrap();
        let route = n
            .locate_key(LocateKeyRequest { key: key.clone() })
            .await
            .unwrap()
            .into_inner()
            .route
            .unwrap();
        let region = route.region.unwrap();
        assert!(region.start_key <= key && (region.end_key.is_empty() || key < region.end_key));
        assert!(route.leader.is_some());
    }

    // Load: keys and bytes written show up in the table within the report interval.
    for i in 0..REGIONS {
        for j in 0..5 {
            client
                .put(&key_in_region(i, REGIONS, &format!("load{j}")), &[7u8; 100])
                .await
                .unwrap();
        }
    }
    let t = Instant::now();
    loop {
        let st = client.status().await.unwrap();
        if st.total_keys >= u64::from(REGIONS) * 5 {
            // The user's keys exactly: the placement region's records are not counted.
            assert_eq!(st.total_keys, u64::from(REGIONS) * 5, "{st:?}");
            assert!(st.total_bytes >= u64::from(REGIONS) * 5 * 100);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "load never reported: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(Health::of(&client.status().await.unwrap()), Health::Healthy);

    // A row missing from the table (as between a split and the new region's first report):
    // status counts the regions past it and names the gap instead of reporting a healthy
    // cluster of the regions before it, and the next report fills it.
    let first = routes[0].region.clone().unwrap();
    let sys = super::common::system_client(&eps).await;
    // (Deleted again should a late report of that region land in between.)
    let mut tries = 0;
    let st = loop {
        sys.delete(&tessera::placement::route_key(&first.end_key))
            .await
            .unwrap();
        let st = client.status().await.unwrap();
        tries += 1;
        if !st.routing_gaps.is_empty() || tries == 5 {
            break st;
        }
    };
    assert_eq!(
        st.regions,
        u64::from(REGIONS) + SYSTEM_REGIONS as u64 - 1,
        "{st:?}"
    );
    assert_eq!(st.routing_gaps.len(), 1, "{st:?}");
    assert_eq!(st.routing_gaps[0].start_key, b"");
    assert_eq!(st.routing_gaps[0].end_key, first.end_key);
    assert_eq!(Health::of(&st), Health::Degraded);
    // Region load moved, so its leader reports it again within the interval.
    client
        .put(&key_in_region(0, REGIONS, "refill"), b"x")
        .await
        .unwrap();
    let t = Instant::now();
    loop {
        let st = client.status().await.unwrap();
        if st.routing_gaps.is_empty() {
            assert_eq!(st.regions, u64::from(REGIONS) + SYSTEM_REGIONS as u64);
            assert_eq!(Health::of(&st), Health::Healthy, "{st:?}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "gap never filled: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cluster.shutdown().await;
}

/// A client writes to every region while every leader is transferred, the placement leader
/// moves, and the node leading most regions is stopped and restarted: the caller never sees
/// an error, every acknowledged write is there afterwards, and the table follows the leaders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_rides_through_leader_transfers_and_a_dead_node() {
    let mut cluster = TestCluster::start(3, REGIONS, fast).await;
    let eps = cluster.endpoints();
    wait_for_leaders(
        &eps,
        REGIONS as usize + SYSTEM_REGIONS,
        Duration::from_secs(60),
    )
    .await;
    let client = super::common::patient_client(&eps).await;
    let routes = wait_for_table(
        &client,
        REGIONS as u64 + SYSTEM_REGIONS as u64,
        Duration::from_secs(20),
    )
    .await;

    // Writers: one per region, each overwriting its own key with a counter.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for i in 0..REGIONS {
        let (client, stop, errors) = (client.clone(), stop.clone(), errors.clone());
        writers.push(tokio::spawn(async move {
            let key = key_in_region(i, REGIONS, "ride");
            let mut acked = 0u64;
            // Bounded: stops when told, or after 60 s in any case.
            let t = Instant::now();
            while !stop.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(60) {
                let next = acked + 1;
                match client.put(&key, next.to_string().as_bytes()).await {
                    Ok(_) => acked = next,
                    Err(e) => {
                        eprintln!("region {i}: write {next} failed: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (key, acked)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Move every region's leadership (the placement region's too) to the next node.
    let mut moved = BTreeMap::new();
    for r in &routes {
        let region = r.region.as_ref().unwrap();
        let from = r.leader.unwrap().node_id;
        let to = from % 3 + 1;
        client
            .transfer_leader(RegionId(region.id), NodeId(to))
            .await
            .unwrap();
        moved.insert(region.id, to);
    }
    // The table follows: each region's row names its new leader soon after the move.
    let t = Instant::now();
    loop {
        let table = client.routes().await.unwrap();
        let stale: Vec<u64> = table
            .iter()
            .filter(|r| {
                let id = r.region.as_ref().unwrap().id;
                r.leader.map(|l| l.node_id) != moved.get(&id).copied()
            })
            .map(|r| r.region.as_ref().unwrap().id)
            .collect();
        if stale.is_empty() {
            eprintln!(
                "routing table followed {} transfers in {:?}",
                moved.len(),
                t.elapsed()
            );
            break;
        }
        // A leader may have moved on by itself since; trust the replicas over our map.
        for id in &stale {
            if let Some(actual) = actual_leader(&eps, *id).await {
                moved.insert(*id, actual);
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "table still shows old leaders for {stale:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Stop the node leading the most regions, keep writing, bring it back.
    let mut counts = [0usize; 3];
    for n in moved.values() {
        counts[*n as usize - 1] += 1;
    }
    let victim = (0..3).max_by_key(|i| counts[*i]).unwrap();
    cluster.stop(victim).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.restart(victim).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.push(w.await.unwrap());
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0, "the caller saw errors");
    for (key, n) in &acked {
        assert!(*n > 0, "writer of {key:?} made progress");
        let kv = client
            .get(key)
            .await
            .unwrap()
            .expect("acknowledged key present");
        assert_eq!(
            kv.value,
            n.to_string().as_bytes(),
            "last acknowledged write of {key:?}"
        );
    }
    let stats = client.stats();
    eprintln!(
        "writes acked: {}, retries: {}, region errors: {}, rpc errors: {}",
        acked.iter().map(|(_, n)| n).sum::<u64>(),
        stats.retries.load(Ordering::Relaxed),
        stats.region_errors.load(Ordering::Relaxed),
        stats.rpc_errors.load(Ordering::Relaxed)
    );

    // A scan of the whole keyspace returns each key exactly once, in order.
    let all = client.scan(b"", b"", 0).await.unwrap();
    assert_eq!(all.len(), REGIONS as usize);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    cluster.shutdown().await;
}

/// A node joins with an empty data dir and gets a fresh id; it restarts as itself; its
/// address cannot be registered twice; once removed it stops and cannot come back with its
/// data. Placement keeps working after its leader moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_restart_double_join_and_removal() {
    let mut cluster = TestCluster::start(3, 4, fast).await;
    let eps = cluster.endpoints();
    wait_for_leaders(&eps, 4 + SYSTEM_REGIONS, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    wait_for_table(&client, 4 + SYSTEM_REGIONS as u64, Duration::from_secs(20)).await;
    let max_before = client.status().await.unwrap().max_id;

    let j = cluster.join(1, fast).await;
    let joined_id = cluster.configs[j].node.id;
    let stored_id = |c: &TestCluster| {
        tessera::raftstore::bootstrap::store_ident(c.node(j).engine())
            .unwrap()
            .unwrap()
            .node_id
    };
    let new_id = stored_id(&cluster);
    assert_eq!(joined_id, 0, "the config asked for an assigned id");
    assert!(new_id > max_before, "id {new_id} comes from the allocator");
    let up = |nodes: &[tessera::proto::NodeInfo], id: u64| {
        nodes.iter().any(|n| {
            n.record.as_ref().map(|r| r.node_id) == Some(id)
                && n.state == tessera::proto::NodeState::Up as i32
        })
    };
    let t = Instant::now();
    loop {
        let nodes = client.nodes().await.unwrap();
        if [1, 2, 3, new_id].iter().all(|id| up(&nodes, *id)) {
            assert_eq!(nodes.len(), 4, "{nodes:?}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "not all up: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The placement leader moves; the registry and allocator keep answering.
    let routes = client.routes().await.unwrap();
    let placement = routes.last().unwrap();
    let p_region = placement.region.as_ref().unwrap().id;
    let to = placement.leader.unwrap().node_id % 3 + 1;
    client
        .transfer_leader(RegionId(p_region), NodeId(to))
        .await
        .unwrap();
    let st = client.status().await.unwrap();
    assert_eq!(st.nodes.len(), 4);

    // Restart: same data dir, still `join` in its config: it comes back as the same node.
    cluster.stop(j).await;
    cluster.restart(j).await;
    assert_eq!(stored_id(&cluster), new_id);

    // Another data dir claiming the same address is refused while that node exists.
    let mut dup = cluster.configs[j].clone();
    dup.node.data_dir = cluster.dir.path().join("duplicate");
    let busy_port = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    match tessera::server::Node::start(dup, Some(busy_port)).await {
        Ok(_) => panic!("a second node joined with the address of node {new_id}"),
        Err(e) => assert!(e.to_string().contains("already registered"), "{e}"),
    }

    // Removal: the node sees it and stops; with its old data it cannot serve again.
    client.remove_node(NodeId(new_id)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), cluster.node(j).wait_removed())
        .await
        .expect("removed node notices within 10 s");
    cluster.stop(j).await;
    cluster.restart(j).await;
    tokio::time::timeout(Duration::from_secs(10), cluster.node(j).wait_removed())
        .await
        .expect("a removed node restarted with its data is told to stop again");
    let nodes = client.nodes().await.unwrap();
    assert!(nodes
        .iter()
        .any(|n| n.record.as_ref().unwrap().node_id == new_id
            && n.state == tessera::proto::NodeState::Removed as i32));
    // Ids are never reused: a new join gets a higher id than the removed node's.
    let k = cluster.join(0, fast).await;
    let next = tessera::raftstore::bootstrap::store_ident(cluster.node(k).engine())
        .unwrap()
        .unwrap()
        .node_id;
    assert!(next > new_id);
    cluster.shutdown().await;
}

/// Multi-key calls are split per region and answered in the caller's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_calls_split_per_region() {
    let cluster = TestCluster::start(3, REGIONS, fast).await;
    wait_for_leaders(
        &cluster.endpoints(),
        REGIONS as usize + SYSTEM_REGIONS,
        Duration::from_secs(60),
    )
    .await;
    let client = cluster.client().await;
    // 5 keys in each region, interleaved so that no two neighbours share a region.
    let keys: Vec<Vec<u8>> = (0..5)
        .flat_map(|j| (0..REGIONS).map(move |i| key_in_region(i, REGIONS, &format!("b{j}"))))
        .collect();
    let ops: Vec<(Vec<u8>, Option<Vec<u8>>)> = keys
        .iter()
        .enumerate()
        .map(|(n, k)| (k.clone(), Some(format!("v{n}").into_bytes())))
        .collect();
    client.batch_write(&ops).await.unwrap();
    // Delete every third key in the same kind of call.
    let dels: Vec<(Vec<u8>, Option<Vec<u8>>)> =
        keys.iter().step_by(3).map(|k| (k.clone(), None)).collect();
    client.batch_write(&dels).await.unwrap();

    let mut asked = keys.clone();
    asked.push(b"never-written".to_vec());
    let got = client.batch_get(&asked).await.unwrap();
    assert_eq!(got.len(), asked.len());
    for (n, (k, kv)) in asked.iter().zip(&got).enumerate() {
        if n == keys.len() || n % 3 == 0 {
            assert!(kv.is_none(), "{k:?} should be absent");
        } else {
            let kv = kv.as_ref().expect("present");
            assert_eq!(&kv.key, k);
            assert_eq!(kv.value, format!("v{n}").into_bytes());
        }
    }
    // Same answers one key at a time.
    for (k, kv) in asked.iter().zip(&got) {
        assert_eq!(&client.get(k).await.unwrap(), kv);
    }
    // Bad input is refused as a whole and stores nothing.
    let bad = vec![
        (b"ok-key".to_vec(), Some(b"v".to_vec())),
        (Vec::new(), Some(b"v".to_vec())),
    ];
    assert!(matches!(
        client.batch_write(&bad).await,
        Err(tessera::client::Error::InvalidArgument(_))
    ));
    assert!(client.get(b"ok-key").await.unwrap().is_none());
    cluster.shutdown().await;
}
