//! A node killed for good: the scheduler rebuilds its replicas elsewhere.

use super::*;

/// Four real processes, three replicas per region: kill -9 of a node that is never coming
/// back. The scheduler (replace_down_after_ms = 2 s) rebuilds every replica it held on the
/// other nodes from snapshots; every acknowledged write is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_for_good_is_replaced() {
    const REGIONS: u32 = 8;
    let dir = common::test_dir("a_node_killed_for_good_is_replaced");
    let mut procs = start_process_cluster(dir.path(), 4, REGIONS, |c| {
        c.placement.heartbeat_interval_ms = 200;
        c.placement.node_down_after_ms = 1000;
        c.placement.replace_down_after_ms = 2000;
        c.placement.schedule_interval_ms = 300;
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    let client = common::patient_client(&addrs).await;
    // Each node hosts only some regions: wait on the routing table instead.
    let t = Instant::now();
    loop {
        if let Ok(st) = client.status().await {
            if st.regions == u64::from(REGIONS) + common::SYSTEM_REGIONS as u64
                && st.regions_without_leader == 0
            {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "cluster never led");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut written = Vec::new();
    for i in 0..REGIONS {
        for j in 0..20 {
            let key = key_in_region(i, REGIONS, &format!("durable{j:02}"));
            client
                .put(&key, format!("{i}-{j}").as_bytes())
                .await
                .unwrap();
            written.push((key, format!("{i}-{j}")));
        }
    }
    // Node 4 holds replicas of the user regions (round-robin), not of placement.
    procs[3].kill9();
    let took = common::wait_replaced(
        &client,
        REGIONS as usize + common::SYSTEM_REGIONS,
        4,
        Duration::from_secs(60),
    )
    .await;
    eprintln!("replicas of a kill -9'd node replaced after {took:?}");
    for (key, value) in &written {
        let kv = client
            .get(key)
            .await
            .unwrap()
            .expect("acknowledged key present");
        assert_eq!(kv.value, value.as_bytes());
    }
    drop(procs);
}
