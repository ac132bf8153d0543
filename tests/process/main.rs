//! Tests against real `tessera server` processes: kill -9 and restart.

#[path = "../common/mod.rs"]
mod common;

// Every test there needs fail points (link faults, a slow log write).
#[cfg(feature = "failpoints")]
mod answers;
#[cfg(feature = "failpoints")]
mod late_transfer;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{key_in_region, node_regions, start_process_cluster, wait_for_leaders};
use tessera::client::{Client, ClientOptions};

type Progress = HashMap<Vec<u8>, (u64, u64)>;

fn endpoints(procs: &[common::Proc]) -> Vec<String> {
    procs.iter().map(|p| p.addr.clone()).collect()
}

async fn wait_serving(addrs: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in addrs {
        while node_regions(a).await.is_none() {
            assert!(Instant::now() < deadline, "{a} never started serving");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Reads `key` from `addr`'s own replica (serializable), without going to the leader.
async fn local_read(addr: &str, key: &[u8]) -> Option<Vec<u8>> {
    let regions = node_regions(addr).await?;
    let region = regions
        .into_iter()
        .filter_map(|i| i.region)
        .find(|r| tessera::storage::keys::in_range(key, &r.start_key, &r.end_key))?;
    common::local_get(addr, &region, key)
        .await?
        .map(|kv| kv.value)
}

fn scrape_metrics(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

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

/// Runs the CLI; returns (exit code, stdout, stderr).
fn cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("run tessera");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the CLI with `input` on its standard input; returns (exit code, stdout, stderr).
fn cli_stdin(args: &[&str], input: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tessera");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    let out = child.wait_with_output().expect("wait for tessera");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_end_to_end_including_error_exits() {
    let dir = common::test_dir("cli_end_to_end_including_error_exits");
    let procs = start_process_cluster(dir.path(), 3, 4, |c| {
        c.placement.heartbeat_interval_ms = 200;
        c.placement.node_down_after_ms = 2000;
        c.placement.replace_down_after_ms = 2000;
        // Replicas move only by command here, so the CLI's move is deterministic.
        c.placement.schedule = false;
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 5, Duration::from_secs(60)).await;
    let ep = addrs.join(",");
    let ep = ep.as_str();

    let (code, out, _) = cli(&["kv", "-e", ep, "put", "/topics/a", "one"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("OK (revision "), "{out}");
    cli(&["kv", "-e", ep, "put", "/topics/b", "two"]);
    let (code, out, _) = cli(&["kv", "-e", ep, "get", "/topics/a"]);
    assert_eq!((code, out.as_str()), (0, "one\n"));
    let (code, out, _) = cli(&["kv", "-e", ep, "scan", "/topics/", "/topics0"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "/topics/a\tone\n/topics/b\ttwo\n")
    );
    let (code, out, _) = cli(&["kv", "-e", ep, "--json", "get", "/topics/b"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("\"value\":\"two\"") && out.contains("\"version\":1"),
        "{out}"
    );
    let (code, _, _) = cli(&["kv", "-e", ep, "cas", "/leader", "me", "--absent"]);
    assert_eq!(code, 0);
    let (code, out, _) = cli(&["kv", "-e", ep, "delete", "/topics/a"]);
    assert_eq!((code, out.as_str()), (0, "deleted\n"));

    // A value from standard input when none is given: larger than an argument may be.
    let big: String = (0..200 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let (code, out, err) = cli_stdin(&["kv", "-e", ep, "put", "/configs/big"], big.as_bytes());
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&["kv", "-e", ep, "get", "/configs/big"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim_end_matches('\n'), big);
    // Every subcommand explains itself.
    for sub in ["get", "put", "delete", "scan", "cas"] {
        let (code, out, _) = cli(&["kv", sub, "--help"]);
        assert_eq!(code, 0, "{sub}");
        let about = out.lines().next().unwrap_or_default();
        assert!(
            !about.starts_with("Usage"),
            "kv {sub} has no help text: {out}"
        );
    }

    // Failures: non-zero exit and one line on stderr.
    for (args, want) in [
        (vec!["kv", "-e", ep, "get", "/topics/a"], "not found"),
        (
            vec!["kv", "-e", ep, "cas", "/leader", "you", "--absent"],
            "compare failed",
        ),
        (
            vec!["kv", "-e", "127.0.0.1:1", "get", "x"],
            "no node reachable",
        ),
        (vec!["kv", "-e", ep, "put", "", "v"], "invalid argument"),
    ] {
        let (code, _, err) = cli(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }

    let (code, out, _) = cli(&["regions", "-e", ep]);
    assert_eq!(code, 0);
    assert!(out.contains("5 regions"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, _) = cli(&["nodes", "-e", ep, "--json"]);
        if code == 0 && out.matches("\"state\":\"up\"").count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "nodes never all up: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Status, once every region's leader has reported to the routing table.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, _) = cli(&["status", "-e", ep, "--json"]);
        if code == 0
            && out.contains("\"regions\":5,")
            && out.contains("\"regions_without_leader\":0")
        {
            assert!(out.contains("\"nodes_up\":3"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "status never complete: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out, _) = cli(&["status", "-e", ep]);
    assert_eq!(code, 0);
    assert!(
        out.contains("healthy") && out.contains("3 up, 0 down"),
        "{out}"
    );

    // Leader transfer through the CLI.
    let (_, out, _) = cli(&["regions", "-e", ep, "--json"]);
    let first_leader: u64 = out
        .split("\"leader_node\":")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .expect("region 1 has a leader");
    let to = (first_leader % 3 + 1).to_string();
    let (code, out, err) = cli(&["regions", "-e", ep, "transfer-leader", "1", &to]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("now led from node {to}")), "{out}");
    let (code, _, err) = cli(&["regions", "-e", ep, "transfer-leader", "1", "99"]);
    assert_eq!(code, 2);
    assert!(err.contains("no peer on node 99"), "{err}");

    // Split through the CLI: the region holding "/topics/" splits there, data stays put
    // (/topics/a was deleted above).
    let (code, out, err) = cli(&["regions", "-e", ep, "split", "/topics/"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.lines().nth(1).unwrap().contains("[2f746f706963732f, "),
        "{out}"
    );
    let (code, out, _) = cli(&["kv", "-e", ep, "scan", "/topics/", "/topics0"]);
    assert_eq!((code, out.as_str()), (0, "/topics/b\ttwo\n"));
    let (_, out, err) = cli(&["regions", "-e", ep, "split", "--hex", "zz"]);
    assert!(err.contains("hex digits"), "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out, _) = cli(&["regions", "-e", ep]);
        if out.contains("6 regions") {
            break;
        }
        assert!(Instant::now() < deadline, "split never reported: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A fourth node joins through the real binary and shows up in `tessera nodes`.
    let addr4 = common::free_addrs(1)[0].to_string();
    let log4 = std::fs::File::create(dir.path().join("node4.log")).unwrap();
    let mut node4 = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["server", "--config"])
        .arg(dir.path().join("node1.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("node4"))
        .args(["--listen-addr", &addr4, "--join", &addrs[1]])
        .stdout(log4.try_clone().unwrap())
        .stderr(log4)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let id4 = loop {
        let (_, out, _) = cli(&["nodes", "-e", ep, "--json"]);
        if let Some(entry) = out.split("{\"id\":").find(|e| {
            e.contains(&format!("\"addr\":\"{addr4}\"")) && e.contains("\"state\":\"up\"")
        }) {
            break entry.split(',').next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "joined node never up: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (code, out, _) = cli(&["nodes", "-e", ep]);
    assert_eq!(code, 0);
    assert_eq!(out.matches(" up ").count(), 4, "{out}");

    // Move region 1's replica from node 3 to the new node, then back by add/remove.
    let (code, out, err) = cli(&["regions", "-e", ep, "move", "1", "3", &id4]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("now on nodes") && out.contains(&id4), "{out}");
    assert!(!out.contains(" 3,") && !out.contains(" 3 ("), "{out}");
    let (code, out, err) = cli(&["regions", "-e", ep, "add-peer", "1", "3", "--learner"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3(learner)"), "{out}");
    let (code, _, err) = cli(&["regions", "-e", ep, "move", "1", "3", "3"]);
    assert_eq!(code, 2, "{err}");

    // Removing it stops the process with an error exit.
    let (code, out, _) = cli(&["nodes", "-e", ep, "remove", &id4]);
    assert_eq!(code, 0, "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = node4.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "removed node kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("node4.log")).unwrap();
    assert!(log.contains("removed from the cluster"), "{log}");
    let (code, _, err) = cli(&["nodes", "-e", ep, "remove", "12345"]);
    assert_eq!(code, 2);
    assert!(err.contains("not registered"), "{err}");

    // kill -9 of a node: shown down within node_down_after_ms (2 s) plus a beat.
    let mut procs = procs;
    let t = Instant::now();
    procs[2].kill9();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, out, _) = cli(&["nodes", "-e", &addrs[..2].join(","), "--json"]);
        if out.contains("{\"id\":3,")
            && out
                .split("{\"id\":3,")
                .nth(1)
                .is_some_and(|e| e.contains("\"state\":\"down\""))
        {
            eprintln!("killed node shown down after {:?}", t.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "killed node never shown down: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(procs);
}

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
            if st.regions == u64::from(REGIONS) + 1 && st.regions_without_leader == 0 {
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
    let took =
        common::wait_replaced(&client, REGIONS as usize + 1, 4, Duration::from_secs(60)).await;
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

/// A linearizable read of `key` sent to `addr` only: the value, or why not.
#[cfg(feature = "failpoints")]
async fn read_at(
    addr: &str,
    region: &tessera::proto::Region,
    key: &[u8],
    wait: Duration,
) -> Result<Option<Vec<u8>>, String> {
    common::get_at(addr, region, key, true, wait)
        .await
        .map(|kv| kv.map(|kv| kv.value))
}

/// A put of `key` sent to `addr` only: whether that node took it.
#[cfg(feature = "failpoints")]
async fn put_at(addr: &str, region: &tessera::proto::Region, key: &[u8], value: &[u8]) -> bool {
    use tessera::proto::kv_client::KvClient;
    use tessera::proto::{PutRequest, RequestHeader};
    let call = async {
        let mut kv = KvClient::connect(format!("http://{addr}")).await.ok()?;
        let r = kv
            .put(PutRequest {
                header: Some(RequestHeader {
                    region_id: region.id,
                    region_epoch: region.epoch,
                    ..Default::default()
                }),
                key: key.to_vec(),
                value: value.to_vec(),
            })
            .await
            .ok()?
            .into_inner();
        Some(r.region_error.is_none())
    };
    tokio::time::timeout(Duration::from_secs(1), call)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Leader lease reads. A leader cut off from its followers still serves linearizable reads
/// from its lease for a moment (no quorum could confirm a ReadIndex round). Then it is
/// frozen (SIGSTOP, so it cannot step down), the others elect a leader and overwrite the
/// key, and it is resumed, still cut off and still believing it leads: the read it finds
/// waiting must not be served from the lease — the lease ended before the others could
/// elect (a lease as long as the election timeout fails here).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_serves_from_its_lease_then_stops() {
    let dir = common::test_dir("a_cut_off_leader_serves_from_its_lease_then_stops");
    // Election timeout 2 s, lease 1.9 s: long enough that the first part does not depend
    // on the machine answering within a few hundred milliseconds.
    let mut procs = start_process_cluster(dir.path(), 3, 1, |c| {
        c.raft.election_ticks = 40;
        c.raft.hibernate_regions = false;
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 2, Duration::from_secs(90)).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    let key = b"lease/k".to_vec();
    client.put(&key, b"old").await.unwrap();

    let info = node_regions(&addrs[0])
        .await
        .unwrap()
        .into_iter()
        .find(|i| {
            i.region
                .as_ref()
                .is_some_and(|r| tessera::storage::keys::in_range(&key, &r.start_key, &r.end_key))
        })
        .expect("the key's region");
    let region = info.region.unwrap();
    let leader = info.leader.expect("a leader").node_id as usize;
    let old = addrs[leader - 1].clone();
    let others: Vec<usize> = (1..=3).filter(|n| *n != leader).collect();
    assert_eq!(
        read_at(&old, &region, &key, Duration::from_secs(5)).await,
        Ok(Some(b"old".to_vec()))
    );
    // A fresh write renews the lease just before the cut.
    client.put(&key, b"old").await.unwrap();

    let cut_at = Instant::now();
    for &n in &others {
        common::set_link(&old, n as u64, "drop").await;
        common::set_link(&addrs[n - 1], leader as u64, "drop").await;
    }
    let served = read_at(&old, &region, &key, Duration::from_millis(800)).await;
    if cut_at.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            served,
            Ok(Some(b"old".to_vec())),
            "the cut-off leader should still hold its lease"
        );
    } else {
        eprintln!(
            "machine too slow to check the lease part: {:?}",
            cut_at.elapsed()
        );
    }
    let signal = |sig: &str| procs[leader - 1].signal(sig);
    signal("STOP");

    // The other two elect a leader and take a write.
    let deadline = Instant::now() + Duration::from_secs(60);
    'written: loop {
        for &n in &others {
            if put_at(&addrs[n - 1], &region, &key, b"new").await {
                break 'written;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the majority never took the write"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new_written = cut_at.elapsed();
    // A read waits for the frozen old leader; it runs once the process resumes.
    let waiting = {
        let (old, region, key) = (old.clone(), region.clone(), key.clone());
        tokio::spawn(async move { read_at(&old, &region, &key, Duration::from_secs(3)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal("CONT");
    let r = waiting.await.unwrap();
    assert_ne!(
        r,
        Ok(Some(b"old".to_vec())),
        "stale read from the old leader {new_written:?} after the cut"
    );
    assert!(r.is_err(), "the cut-off old leader answered {r:?}");
    eprintln!(
        "cut-off leader served from its lease; the majority wrote {new_written:?} after the \
         cut; the resumed old leader answered {r:?}"
    );

    // Healed, every node agrees on the new value.
    for &n in &others {
        common::set_link(&old, n as u64, "").await;
        common::set_link(&addrs[n - 1], leader as u64, "").await;
    }
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(client.get(&key).await.unwrap().unwrap().value, b"new");
    for p in procs.iter_mut() {
        p.kill9();
    }
}

/// Sum of one metric's samples (every label set containing `labels`) in a Prometheus page.
fn metric_sum(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

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
    let leaders = wait_for_leaders(&addrs, REGIONS as usize + 1, Duration::from_secs(90)).await;
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
