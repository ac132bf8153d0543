//! The space quota: a node over `storage.quota_bytes` raises the cluster's NOSPACE alarm;
//! every node then refuses writes with QuotaExceeded and keeps serving reads and deletes; the
//! alarm survives kill -9 and restarts, comes back when disarmed while the node is still
//! over, and once the node is under its quota a disarm lets writes in again.

use tessera::client::Error;

use super::cli::cli;
use super::*;

/// Rewrites node `i`'s config with `quota` bytes, and restarts it after kill -9.
fn restart_with_quota(dir: &std::path::Path, procs: &mut [common::Proc], i: usize, quota: u64) {
    let p = &mut procs[i];
    let text = std::fs::read_to_string(&p.config_path).expect("read config");
    let mut cfg: tessera::config::Config = toml::from_str(&text).expect("parse config");
    cfg.storage.quota_bytes = quota;
    std::fs::write(&p.config_path, toml::to_string(&cfg).expect("config")).expect("write");
    p.restart(&dir.join(format!("node{}.log", i + 1)));
}

/// `tessera alarm` until its output does (or does not) name node 3's NOSPACE alarm.
async fn wait_alarm(ep: &str, standing: bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, out, err) = cli(&["alarm", "-e", ep]);
        if code == 0 && out.contains("node 3: NOSPACE") == standing {
            eprintln!("tessera alarm: {}", out.trim());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "alarm standing={standing} never shown: {code} {out} {err}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until every node says (`tessera_alarm_no_space` on its metrics port) that it
/// refuses writes, or that it does not. A node learns of an alarm when it next reads the
/// alarms from placement, which a loaded machine can delay past a heartbeat.
async fn wait_nodes_refusing(metrics: &[String], refusing: bool) {
    let want = if refusing { 1.0 } else { 0.0 };
    let deadline = Instant::now() + Duration::from_secs(60);
    for m in metrics {
        loop {
            let page = common::scrape_metrics(m);
            if page.contains("tessera_alarm_no_space")
                && common::metric_sum(&page, "tessera_alarm_no_space", "") == want
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the node with metrics at {m} never had tessera_alarm_no_space {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Puts into every region until each refuses with `QuotaExceeded`: the node over its quota
/// refuses at once, the others once a heartbeat brought them the alarm.
async fn wait_refused(client: &Client) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0u32;
    loop {
        let mut refused = Vec::new();
        for r in 0..4u32 {
            i += 1;
            let k = common::key_in_region(r, 4, &format!("/probe/{i}"));
            match client.put(&k, b"x").await {
                Err(Error::QuotaExceeded(why)) => refused.push(why),
                Ok(_) => {}
                // A node was just killed and restarted: an outcome may be unknown.
                Err(e) => eprintln!("put while the alarm spreads: {e}"),
            }
        }
        if refused.len() == 4 {
            return refused.swap_remove(0);
        }
        assert!(
            Instant::now() < deadline,
            "puts never refused in every region"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_its_quota_stops_writes_until_the_alarm_is_disarmed() {
    let dir = common::test_dir("a_node_over_its_quota_stops_writes");
    let (mut procs, eps, metrics) = start_led_with_metrics(dir.path(), 3, 4, |_| {}).await;
    let client = Client::connect(&eps, ClientOptions::default())
        .await
        .expect("client connects");
    let ep = eps.join(",");
    for i in 0..40u32 {
        let k = common::key_in_region(i % 4, 4, &format!("/q/{i}"));
        client
            .put(&k, b"before")
            .await
            .expect("put before the alarm");
    }
    wait_alarm(&ep, false).await;

    // Node 3 comes back with a quota of one byte: over it at once.
    restart_with_quota(dir.path(), &mut procs, 2, 1);
    wait_alarm(&ep, true).await;
    let why = wait_refused(&client).await;
    eprintln!("put under the alarm: {why}");
    wait_nodes_refusing(&metrics, true).await;
    for i in 0..8u32 {
        let k = common::key_in_region(i % 4, 4, &format!("/q/new/{i}"));
        match client.put(&k, b"x").await {
            Err(Error::QuotaExceeded(_)) => {}
            other => panic!("a put under the alarm: {other:?}"),
        }
    }
    // Reads and deletes are served, in every region.
    for i in 0..4u32 {
        let k = common::key_in_region(i, 4, &format!("/q/{i}"));
        let kv = client.get(&k).await.expect("get").expect("key");
        assert_eq!(kv.value, b"before");
    }
    let gone = common::key_in_region(0, 4, "/q/0");
    client.delete(&gone).await.expect("delete under the alarm");
    assert!(client.get(&gone).await.expect("get").is_none());
    // The CLI as a user types it says why.
    let (code, _, err) = cli(&["kv", "-e", &ep, "put", "/q/cli", "v"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("QuotaExceeded"), "{err}");

    // The alarm is in raft: it outlives kill -9 of a node that did not raise it.
    procs[0].kill9();
    procs[0].restart(&dir.path().join("node1.log"));
    wait_alarm(&ep, true).await;

    // Disarmed while node 3 is still over its quota, it comes back.
    let (code, out, err) = cli(&["alarm", "-e", &ep, "disarm"]);
    assert_eq!(code, 0, "{out} {err}");
    wait_alarm(&ep, true).await;
    wait_refused(&client).await;

    // Under its quota again (a restart with the default), a disarm lets writes in.
    restart_with_quota(dir.path(), &mut procs, 2, 8 << 30);
    let (code, out, err) = cli(&["alarm", "-e", &ep, "disarm", "--node", "3"]);
    assert_eq!(code, 0, "{out} {err}");
    wait_alarm(&ep, false).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.put(b"/q/after", b"after").await {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "writes stayed refused: {e}")
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kv = client.get(b"/q/after").await.expect("get").expect("key");
    assert_eq!(kv.value, b"after");
    drop(procs);
}
