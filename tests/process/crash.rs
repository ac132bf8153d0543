//! kill -9 of one node and of every node under load, and a graceful SIGTERM: no
//! acknowledged write is lost and the nodes catch up after restart.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_leader_node_then_it_catches_up() {
    const REGIONS: u32 = 64;
    let dir = common::test_dir("kill9_of_a_leader_node_then_it_catches_up");
    let metrics = common::free_addrs(1)[0].to_string();
    let m = metrics.clone();
    let mut procs = start_process_cluster(dir.path(), 3, REGIONS, move |c| {
        c.raft.log_gc_threshold = 30;
        if c.node.id == 1 {
            c.node.metrics_addr = m.clone();
        }
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    let leaders = wait_for_leaders(&addrs, REGIONS as usize, Duration::from_secs(90)).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    for i in 0..REGIONS {
        client
            .put(&key_in_region(i, REGIONS, "/k"), b"v1")
            .await
            .unwrap();
    }

    // Kill -9 the node that leads the most regions.
    let mut count: HashMap<u64, usize> = HashMap::new();
    for (_, l) in &leaders {
        *count.entry(*l).or_default() += 1;
    }
    let (&victim, &led) = count.iter().max_by_key(|(_, c)| **c).unwrap();
    assert!(led > 0);
    let vi = victim as usize - 1;
    procs[vi].kill9();

    // The others elect new leaders and keep serving every region.
    let t = Instant::now();
    for i in 0..REGIONS {
        client
            .put(&key_in_region(i, REGIONS, "/k"), b"v2")
            .await
            .unwrap();
    }
    eprintln!(
        "all 64 regions written after kill -9 of node {victim} (led {led}) in {:?}",
        t.elapsed()
    );
    // Enough writes to a few regions that their logs get compacted past the dead node.
    for n in 0..200u32 {
        let i = n % 4;
        client
            .put(&key_in_region(i, REGIONS, &format!("/more{n}")), b"x")
            .await
            .unwrap();
    }

    let log = dir.path().join(format!("node{victim}.log"));
    procs[vi].restart(&log);
    let victim_addr = addrs[vi].clone();
    wait_serving(std::slice::from_ref(&victim_addr)).await;
    // Its own replicas catch up: every key reads "v2" from its local state.
    let deadline = Instant::now() + Duration::from_secs(90);
    for i in 0..REGIONS {
        let key = key_in_region(i, REGIONS, "/k");
        loop {
            if local_read(&victim_addr, &key).await.as_deref() == Some(&b"v2"[..]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {victim} never caught up on region {i}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for n in 0..200u32 {
        let key = key_in_region(n % 4, REGIONS, &format!("/more{n}"));
        loop {
            if local_read(&victim_addr, &key).await.is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {victim} never caught up on {key:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The metrics endpoint serves the counters the node keeps.
    let text = scrape_metrics(&metrics);
    for name in [
        "tessera_fsyncs_total",
        "tessera_raft_entries_persisted_total",
        "tessera_entries_per_fsync",
        "tessera_worker_round_seconds",
        "tessera_raft_messages_sent_total",
        "tessera_leaders",
        "tessera_regions",
    ] {
        assert!(text.contains(name), "metric {name} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_every_node_mid_load_loses_no_acknowledged_write() {
    const REGIONS: u32 = 16;
    let dir = common::test_dir("kill9_of_every_node_mid_load_loses_no_acknowledged_write");
    let mut procs = start_process_cluster(dir.path(), 3, REGIONS, |_| {});
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, REGIONS as usize, Duration::from_secs(90)).await;
    let opts = ClientOptions {
        deadline: Duration::from_secs(5),
        ..Default::default()
    };
    let client = Client::connect(&addrs, opts).await.unwrap();

    // One writer per key: puts 1, 2, 3, ... each acknowledged before the next is sent.
    // key → (last acknowledged value, last attempted value)
    let acked: Arc<Mutex<Progress>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..32u32 {
        let key = key_in_region(w % REGIONS, REGIONS, &format!("/w{w}"));
        let client = client.clone();
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                acked.lock().unwrap().entry(key.clone()).or_insert((0, 0)).1 = n;
                match client.put(&key, n.to_string().as_bytes()).await {
                    Ok(_) => acked.lock().unwrap().get_mut(&key).unwrap().0 = n,
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before: u64 = acked.lock().unwrap().values().map(|(a, _)| *a).sum();
    assert!(before > 0, "no write was acknowledged before the crash");
    for p in procs.iter_mut() {
        p.kill9();
    }
    for w in writers {
        let _ = w.await;
    }

    for (i, p) in procs.iter_mut().enumerate() {
        p.restart(&dir.path().join(format!("node{}.log", i + 1)));
    }
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, REGIONS as usize, Duration::from_secs(90)).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    let acked = acked.lock().unwrap().clone();
    let mut total = 0;
    for (key, (ack, attempted)) in acked {
        let kv = client.get(&key).await.unwrap();
        let (value, version) = kv.map_or((0, 0), |kv| {
            (
                String::from_utf8(kv.value).unwrap().parse::<u64>().unwrap(),
                kv.version,
            )
        });
        assert!(
            value >= ack,
            "{key:?}: acknowledged {ack} but found {value}"
        );
        assert!(
            value <= attempted,
            "{key:?}: found {value}, never written past {attempted}"
        );
        // Every put bumps the version once: a put applied twice would show here.
        assert_eq!(
            version, value,
            "{key:?}: version {version} for value {value}"
        );
        total += ack;
    }
    eprintln!("{total} acknowledged writes, all present after kill -9 of every node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_data_survives() {
    let dir = common::test_dir("sigterm_stops_gracefully_and_data_survives");
    let mut procs = start_process_cluster(dir.path(), 1, 4, |_| {});
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 4, Duration::from_secs(60)).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    for i in 0..4 {
        client
            .put(&key_in_region(i, 4, "/t"), b"kept")
            .await
            .unwrap();
    }
    let t = Instant::now();
    let status = procs[0]
        .terminate(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert!(status.success(), "exit status {status}");
    eprintln!("graceful shutdown took {:?}", t.elapsed());
    procs[0].restart(&dir.path().join("node1.log"));
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 4, Duration::from_secs(60)).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    for i in 0..4 {
        let kv = client
            .get(&key_in_region(i, 4, "/t"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kv.value, b"kept");
    }
}
