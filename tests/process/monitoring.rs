//! The dashboard and alert rules in `deploy/` name only metrics that running nodes export.

use super::*;

/// Every `tessera_*` metric named in the file at `path` (repository-relative), without the
/// `_bucket`/`_count`/`_sum` suffixes of histograms.
fn named(path: &str) -> std::collections::BTreeSet<String> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .expect("read a deploy file");
    let mut out = std::collections::BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("tessera_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        out.insert(base.to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_name_only_exported_metrics() {
    let dir = common::test_dir("the_dashboard_and_alerts_name_only_exported_metrics");
    let (procs, addrs, metrics) = start_led_with_metrics(dir.path(), 3, 2, |_| {}).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .expect("client connects");
    for i in 0..20 {
        client
            .put(format!("/monitored/{i}").as_bytes(), b"v")
            .await
            .expect("put");
        client
            .get(format!("/monitored/{i}").as_bytes())
            .await
            .expect("get");
    }
    let mut wanted = named("deploy/grafana/tessera.json");
    wanted.extend(named("deploy/prometheus/alerts.yml"));
    assert!(wanted.len() >= 15, "too few metrics found: {wanted:?}");
    // Heartbeats, the scheduler's look at the routing table: within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pages: Vec<String> = metrics.iter().map(|a| scrape_metrics(a)).collect();
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|name| {
                !pages.iter().any(|p| {
                    p.lines().any(|l| {
                        l.strip_prefix(name.as_str())
                            .is_some_and(|r| r.starts_with([' ', '{']) || r.starts_with("_bucket"))
                    })
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "named in deploy/ but exported by no node: {missing:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for mut p in procs {
        p.terminate(Duration::from_secs(10));
    }
}

/// Under systemd (`Type=notify`), a node says READY=1 once it serves and STOPPING=1 when it
/// is asked to stop: a socket made here stands in for systemd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_tells_systemd_it_is_ready_and_stopping() {
    let dir = common::test_dir("a_node_tells_systemd_it_is_ready_and_stopping");
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut procs = start_process_cluster(dir.path(), 1, 1, |_| {});
    let notify = socket_path.to_string_lossy().into_owned();
    let log = dir.path().join("node1.log");
    procs[0].restart_env(&log, &[("NOTIFY_SOCKET", notify.as_str())]);
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).expect("READY=1 within a minute");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means serving.
    let addrs = endpoints(&procs);
    assert!(
        node_regions(&addrs[0]).await.is_some(),
        "ready but not serving"
    );
    procs[0].terminate(Duration::from_secs(20));
    let n = socket.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// A plain HTTP GET of `path` at `addr`: the whole answer, headers included.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The page a browser shows (headless Chromium, as installed by `scripts/test.sh`), after its
/// script has run.
fn browse(url: &str) -> String {
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=4000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("run chromium (scripts/test.sh installs Debian's chromium)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status page on the metrics port shows the three nodes, and changes when one dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_nodes_and_a_node_going_down() {
    let dir = common::test_dir("the_status_page_shows_the_nodes_and_a_node_going_down");
    let (mut procs, _addrs, metrics) = start_led_with_metrics(dir.path(), 3, 2, |c| {
        c.placement.heartbeat_interval_ms = 200;
        c.placement.node_down_after_ms = 2000;
    })
    .await;
    let url = format!("http://{}/", metrics[0]);
    let state_of = |page: &str, node: u64| -> Option<String> {
        // "<td>node N</td><td>ADDR</td><td class="STATE">STATE</td>"
        let row = page
            .split("<tr>")
            .find(|r| r.contains(&format!(">node {node}<")))?;
        let at = row.find("<td class=\"")? + "<td class=\"".len();
        Some(row[at..].split('"').next()?.to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = Instant::now();
    loop {
        let page = browse(&url);
        let states: Vec<Option<String>> = (1..=3).map(|n| state_of(&page, n)).collect();
        if states.iter().all(|s| s.as_deref() == Some("up")) {
            assert!(page.contains("tessera"), "{page}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "three nodes up never shown: {states:?}\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "status page showed three nodes up {:?} after the cluster was led",
        started.elapsed()
    );
    let t = Instant::now();
    let page = http_get(&metrics[0], "/");
    let html = t.elapsed();
    let t = Instant::now();
    let json = http_get(&metrics[0], "/status.json");
    eprintln!(
        "status page: / in {html:?} ({} bytes), /status.json in {:?} ({} bytes)",
        page.len(),
        t.elapsed(),
        json.len()
    );
    assert!(
        json.starts_with("HTTP/1.1 200") && json.contains("\"nodes\":["),
        "{json}"
    );
    assert!(http_get(&metrics[0], "/nope").starts_with("HTTP/1.1 404"));
    procs[2].kill9();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = browse(&url);
        if state_of(&page, 3).as_deref() == Some("down") {
            assert_eq!(state_of(&page, 1).as_deref(), Some("up"));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 never shown down:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The same port still serves the metrics.
    assert!(scrape_metrics(&metrics[0]).contains("tessera_fsyncs_total"));
    for p in procs.iter_mut() {
        p.terminate(Duration::from_secs(10));
    }
}
