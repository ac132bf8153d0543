//! Hibernating regions whose leader's node hangs elect without waiting for placement.

use super::*;

/// Hibernating regions whose leader's node hangs (SIGSTOP) elect without waiting for the
/// transport or placement to call the node down: a busy region led from the same node
/// notices the silence within an election timeout, and its worker wakes the sleeping ones,
/// whose election timers resume from the real time since they last heard the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeping_regions_elect_when_a_busy_one_finds_their_leaders_node_hung() {
    const REGIONS: u32 = 12;
    let dir =
        common::test_dir("sleeping_regions_elect_when_a_busy_one_finds_their_leaders_node_hung");
    let metrics: Vec<String> = common::free_addrs(3)
        .iter()
        .map(|a| a.to_string())
        .collect();
    let m = metrics.clone();
    let mut procs = start_process_cluster(dir.path(), 3, REGIONS, move |c| {
        c.node.metrics_addr = m[c.node.id as usize - 1].clone();
        // Leaders stay where they are, and placement's node-down alarm stays out of this
        // test.
        c.placement.schedule = false;
        c.placement.node_down_after_ms = 120_000;
        c.placement.replace_down_after_ms = 240_000;
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    let leaders = wait_for_leaders(
        &addrs,
        REGIONS as usize + common::SYSTEM_REGIONS,
        Duration::from_secs(90),
    )
    .await;
    let mut count: HashMap<u64, usize> = HashMap::new();
    for (_, l) in &leaders {
        *count.entry(*l).or_default() += 1;
    }
    let (&victim, &led) = count.iter().max_by_key(|(_, n)| **n).expect("leaders");
    assert!(led >= 2, "the leader-heavy node leads {led} regions");

    // A key of one region the victim leads: that region stays busy (awake).
    let regions = node_regions(&addrs[victim as usize - 1])
        .await
        .expect("regions");
    let busy_key = regions
        .iter()
        .filter(|i| i.leader.is_some_and(|l| l.node_id == victim))
        .filter_map(|i| i.region.as_ref())
        .find_map(|r| {
            (0..REGIONS)
                .map(|i| key_in_region(i, REGIONS, "/busy"))
                .find(|k| tessera::storage::keys::in_range(k, &r.start_key, &r.end_key))
        })
        .expect("a user region led by the victim");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (addrs, stop, key) = (addrs.clone(), stop.clone(), busy_key.clone());
        tokio::spawn(async move {
            let client = Client::connect(
                &addrs,
                ClientOptions {
                    deadline: Duration::from_secs(2),
                    rpc_timeout: Duration::from_millis(500),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            let started = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(120)
            {
                let _ = client.put(&key, b"v").await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Every other user region falls asleep on the live nodes (the placement region, taking
    // heartbeats, and the busy one stay awake).
    let live: Vec<usize> = (0..3).filter(|i| *i as u64 + 1 != victim).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let asleep: Vec<f64> = live
            .iter()
            .map(|&i| {
                metric_sum(
                    &scrape_metrics(&metrics[i]),
                    "tessera_regions_hibernating",
                    "",
                )
            })
            .collect();
        if asleep.iter().all(|a| *a >= f64::from(REGIONS - 1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "regions never fell asleep: {asleep:?} of {REGIONS} on the live nodes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let signal = |sig: &str| procs[victim as usize - 1].signal(sig);
    signal("STOP");
    let paused = Instant::now();
    let deadline = paused + Duration::from_secs(30);
    let recovered = 'recovered: loop {
        let mut all_led = true;
        for &i in &live {
            match node_regions(&addrs[i]).await {
                Some(rs) => {
                    all_led &= rs.len() > REGIONS as usize
                        && rs
                            .iter()
                            .all(|r| r.leader.is_some_and(|l| l.node_id != victim));
                }
                None => all_led = false,
            }
        }
        if all_led {
            break 'recovered paused.elapsed();
        }
        if Instant::now() > deadline {
            signal("CONT");
            panic!("regions led from the hung node {victim} did not elect within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let pages: Vec<String> = live.iter().map(|&i| scrape_metrics(&metrics[i])).collect();
    let woken = |reason: &str| -> f64 {
        pages
            .iter()
            .map(|p| {
                metric_sum(
                    p,
                    "tessera_region_wakeups_total",
                    &format!("reason=\"{reason}\""),
                )
            })
            .sum()
    };
    let by_reason: Vec<(&str, f64)> = ["leader_silent", "vote", "transport_node_down", "request"]
        .into_iter()
        .map(|r| (r, woken(r)))
        .collect();
    signal("CONT");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = writer.await;
    eprintln!(
        "node {victim} (leading {led} regions) hung: every region led elsewhere after \
         {recovered:?}; sleeping regions woken, by reason: {by_reason:?}"
    );
    assert!(
        woken("leader_silent") >= 1.0,
        "no sleeping region was woken by the busy region's election timeout"
    );
    for p in procs.iter_mut() {
        p.kill9();
    }
}
