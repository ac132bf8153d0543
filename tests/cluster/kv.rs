//! A 3-node cluster with 64 regions: every region elects a leader and serves reads and
//! writes; scans cross regions; compare-and-swap and revisions behave like etcd's.

use std::time::Duration;

use tessera::client::{CasAction, Compare};

use super::common::{key_in_region, wait_for_leaders, TestCluster, SYSTEM_REGIONS};

const REGIONS: u32 = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_region_elects_and_serves() {
    let cluster = TestCluster::start(3, REGIONS, |_| {}).await;
    let leaders = wait_for_leaders(
        &cluster.endpoints(),
        REGIONS as usize + SYSTEM_REGIONS,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        leaders.len(),
        REGIONS as usize + SYSTEM_REGIONS,
        "user regions, the placement region and the lease region"
    );
    let client = cluster.client().await;

    // Revisions are cluster-wide: each put, sent after the previous one was answered, has a
    // larger revision than it, whatever region it lands in.
    let mut last_revision = 0;
    for i in 0..REGIONS {
        let key = key_in_region(i, REGIONS, "/k");
        let w = client
            .put(&key, format!("v{i}").as_bytes())
            .await
            .expect("put");
        assert!(w.prev.is_none());
        assert!(
            w.revision > last_revision,
            "put {i} got revision {} after {last_revision}",
            w.revision
        );
        last_revision = w.revision;
    }
    for i in 0..REGIONS {
        let key = key_in_region(i, REGIONS, "/k");
        let kv = client.get(&key).await.expect("get").expect("present");
        assert_eq!(kv.value, format!("v{i}").as_bytes());
        assert_eq!(kv.version, 1);
        assert_eq!(kv.create_revision, kv.mod_revision);
    }

    // One scan over the whole keyspace returns every key once, in order, across regions.
    let all = client.scan(b"", b"", 0).await.expect("scan");
    let keys: Vec<_> = all.iter().map(|kv| kv.key.clone()).collect();
    let mut want: Vec<_> = (0..REGIONS)
        .map(|i| key_in_region(i, REGIONS, "/k"))
        .collect();
    want.sort();
    assert_eq!(keys, want);
    // A limit is honoured across region boundaries.
    let some = client.scan(b"", b"", 10).await.expect("scan");
    assert_eq!(some.len(), 10);
    assert_eq!(
        some.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        want[..10].to_vec()
    );
    // A bounded scan.
    let mid = client.scan(&want[20], &want[30], 0).await.expect("scan");
    assert_eq!(mid.len(), 10);

    // Overwrite: version and revisions advance, prev comes back.
    let key = key_in_region(5, REGIONS, "/k");
    let before = client.get(&key).await.unwrap().unwrap();
    let w = client.put(&key, b"again").await.unwrap();
    assert_eq!(w.prev.as_ref().unwrap().value, b"v5");
    let after = client.get(&key).await.unwrap().unwrap();
    assert_eq!(after.version, 2);
    assert_eq!(after.create_revision, before.create_revision);
    assert_eq!(after.mod_revision, w.revision);
    assert!(after.mod_revision > before.mod_revision);

    // Compare-and-swap on value, version, mod revision and absence.
    let r = client
        .cas(
            &key,
            Compare::Value(b"wrong".to_vec()),
            CasAction::Put(b"x".to_vec()),
        )
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.prev.as_ref().unwrap().value, b"again");
    let r = client
        .cas(
            &key,
            Compare::ModRevision(after.mod_revision),
            CasAction::Put(b"x".to_vec()),
        )
        .await
        .unwrap();
    assert!(r.succeeded);
    let r = client
        .cas(&key, Compare::Version(3), CasAction::Delete)
        .await
        .unwrap();
    assert!(r.succeeded);
    assert!(client.get(&key).await.unwrap().is_none());
    assert!(client.create(&key, b"first").await.unwrap());
    assert!(!client.create(&key, b"second").await.unwrap());
    let kv = client.get(&key).await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.version), (&b"first"[..], 1));

    // Delete returns what was there; deleting again finds nothing.
    let d = client.delete(&key).await.unwrap();
    assert_eq!(d.prev.unwrap().value, b"first");
    assert!(client.delete(&key).await.unwrap().prev.is_none());

    // Contended increments through CAS: no lost update.
    let counter = key_in_region(40, REGIONS, "/counter");
    client.put(&counter, b"0").await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let c = client.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < 10 {
                let cur = c.get(&counter).await.unwrap().unwrap();
                let n: u64 = String::from_utf8(cur.value).unwrap().parse().unwrap();
                let r = c
                    .cas(
                        &counter,
                        Compare::ModRevision(cur.mod_revision),
                        CasAction::Put((n + 1).to_string().into_bytes()),
                    )
                    .await
                    .unwrap();
                if r.succeeded {
                    done += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = client.get(&counter).await.unwrap().unwrap();
    assert_eq!(v.value, b"40");

    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_regions_and_data_without_rebootstrap() {
    let mut cluster = TestCluster::start(3, 8, |_| {}).await;
    wait_for_leaders(&cluster.endpoints(), 8, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    for i in 0..8 {
        client
            .put(&key_in_region(i, 8, "/r"), b"before")
            .await
            .unwrap();
    }
    for i in 0..3 {
        cluster.stop(i).await;
    }
    // Change the initial-cluster settings: a restart must ignore them.
    for c in cluster.configs.iter_mut() {
        c.cluster.initial_regions = 2;
    }
    for i in 0..3 {
        cluster.restart(i).await;
    }
    wait_for_leaders(&cluster.endpoints(), 8, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    for i in 0..8 {
        let kv = client
            .get(&key_in_region(i, 8, "/r"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kv.value, b"before");
    }
    assert_eq!(
        client.regions().await.unwrap().len(),
        8 + SYSTEM_REGIONS,
        "8 user regions + placement + leases"
    );

    // A data dir of another cluster is refused with a clear error.
    cluster.stop(0).await;
    let mut wrong = cluster.configs[0].clone();
    wrong.cluster.cluster_id = 77;
    let err = tessera::server::Node::start(wrong, None)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("belongs to cluster 1"), "{err}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_through_the_multiplexed_client() {
    let cluster = TestCluster::start(3, 2, |_| {}).await;
    wait_for_leaders(&cluster.endpoints(), 3, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    // Values near the 1 MiB limit: each put is too large for the command stream and goes as
    // a unary call.
    let value = |i: u8| vec![i; (1 << 20) - 64];
    let keys: Vec<Vec<u8>> = (0..8u8).map(|i| format!("/big/{i}").into_bytes()).collect();
    for (i, k) in keys.iter().enumerate() {
        client.put(k, &value(i as u8)).await.unwrap();
    }
    // Eighty gets at once on one client: small requests on the stream, whose answers (80
    // MiB together, more than a gRPC message may carry) must come back in several messages.
    let gets = (0..80usize).map(|n| {
        let client = client.clone();
        let key = keys[n % keys.len()].clone();
        async move { (n, client.get(&key).await) }
    });
    for (n, got) in futures::future::join_all(gets).await {
        let kv = got.unwrap().expect("key written above");
        assert_eq!(kv.value, value((n % 8) as u8), "get {n}");
    }
    let stats = client.stats();
    let rpc_errors = stats.rpc_errors.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(rpc_errors, 0, "no call failed and was retried");
    cluster.shutdown().await;
}

/// A region whose stored state cannot make a peer (here: its descriptor no longer names
/// this node) fails the node's start with an error naming the region, rather than stopping
/// the process from a raft worker after start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_cannot_be_built_fails_the_start_with_its_name() {
    use tessera::proto::RegionLocalState;
    use tessera::storage::{keys, Cf, Engine};
    let mut cluster = TestCluster::start_led(3, 2, |_| {}).await;
    cluster.stop(0).await;
    let cfg = cluster.configs[0].clone();
    {
        let engine = Engine::open(&cfg.node.data_dir.join("db"), &Default::default())
            .expect("open the stopped node's store");
        let key = keys::region_state_key(tessera::ids::RegionId(1));
        let mut state: RegionLocalState = engine
            .get_msg(Cf::Raft, &key)
            .expect("read")
            .expect("region 1 is stored");
        let region = state.region.as_mut().expect("descriptor");
        region.peers.retain(|p| p.node_id != cfg.node.id);
        let mut wb = engine.batch();
        wb.put_msg(Cf::Raft, &key, &state);
        engine.write(wb, true).expect("write");
    }
    let err = match tessera::server::Node::start(cfg.clone(), None).await {
        Ok(_) => panic!("a node with an unbuildable region started"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("r1") && err.contains(&format!("no peer on node {}", cfg.node.id)),
        "{err}"
    );
    cluster.shutdown().await;
}
