//! The bench harness against real servers: every workload against an in-process tessera
//! cluster, and the etcd target against a real etcd (Debian's etcd-server, which
//! scripts/test.sh installs) started on a loopback port for the test.

#[path = "../common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for_leaders, TestCluster};
use tessera::bench::{self, BenchArgs, Distribution, TargetKind, Workload};

fn args(target: TargetKind, endpoints: String, workload: Workload) -> BenchArgs {
    BenchArgs {
        workload,
        target,
        endpoints,
        concurrency: 8,
        connections: 2,
        keys: 500,
        key_size: 0,
        value_size: 64,
        distribution: Distribution::Uniform,
        duration: Some(1),
        ops: 0,
        rate: 0.0,
        warmup: 0,
        read_ratio: 0.5,
        serializable: false,
        unary: false,
        scan_length: 10,
        cas_keys: 4,
        preload: true,
        watchers: 100,
        sessions: 1000,
        ttl: 60,
        json: None,
        cacert: None,
        user: None,
    }
}

/// Watch: 10 watchers, writes at 200/s for 1 s. The bench reports an error for every event
/// of the window's writes that a watcher missed or got twice, so no errors means each of the
/// window's writes reached each watcher exactly once.
async fn every_watcher_sees_every_write(target: TargetKind, endpoints: String) {
    let mut a = args(target, endpoints, Workload::Watch);
    a.watchers = 10;
    a.rate = 200.0;
    a.concurrency = 2;
    let r = bench::run(a).await.unwrap();
    eprintln!("{}", r.text());
    assert!(r.errors.is_empty(), "{target:?}: {:?}", r.errors);
    assert!(
        r.ops > 0 && r.ops % 10 == 0,
        "{target:?}: 10 watchers got {} events of the window's writes",
        r.ops
    );
}

/// Lease: 200 sessions of a 3 s TTL renewed at a third of it for 2 s: about 200 keep-alives
/// a second, none of them finding its lease gone.
async fn every_session_is_kept(target: TargetKind, endpoints: String) {
    let mut a = args(target, endpoints, Workload::Lease);
    a.sessions = 200;
    a.ttl = 3;
    a.duration = Some(2);
    let r = bench::run(a).await.unwrap();
    eprintln!("{}", r.text());
    assert!(r.errors.is_empty(), "{target:?}: {:?}", r.errors);
    assert!(
        (300..=500).contains(&r.ops),
        "{target:?}: 200 sessions renewed every second for 2 s made {} keep-alives",
        r.ops
    );
}

async fn every_workload(target: TargetKind, endpoints: String) {
    for w in [
        Workload::Put,
        Workload::Get,
        Workload::Mixed,
        Workload::Scan,
        Workload::Cas,
        Workload::Metadata,
    ] {
        let r = bench::run(args(target, endpoints.clone(), w))
            .await
            .unwrap();
        eprintln!("{}", r.text());
        assert!(r.ops > 0, "{target:?} {w:?} did no work");
        assert!(r.errors.is_empty(), "{target:?} {w:?}: {:?}", r.errors);
        let json: serde_json::Value = serde_json::from_str(&r.json()).expect("the report is JSON");
        assert_eq!(json["ops"], r.ops, "{json}");
        assert_eq!(json["percentiles_ms"][0][0], 50.0, "{json}");
        assert_eq!(json["errors"], serde_json::json!({}), "{json}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_against_tessera() {
    let cluster = TestCluster::start(3, 8, |_| {}).await;
    wait_for_leaders(&cluster.endpoints(), 9, Duration::from_secs(60)).await;
    every_workload(TargetKind::Tessera, cluster.endpoints().join(",")).await;

    every_watcher_sees_every_write(TargetKind::Tessera, cluster.endpoints().join(",")).await;
    every_session_is_kept(TargetKind::Tessera, cluster.endpoints().join(",")).await;

    // The cas workload's counters add up: every counted increment really happened, with
    // requests multiplexed on streams (the default) and as unary calls.
    let client = cluster.client().await;
    for unary in [false, true] {
        let mut a = args(
            TargetKind::Tessera,
            cluster.endpoints().join(","),
            Workload::Cas,
        );
        a.ops = 200;
        a.duration = Some(30);
        a.cas_keys = 2;
        a.concurrency = 4;
        a.unary = unary;
        let before = counters(&client, 2).await;
        let r = bench::run(a).await.unwrap();
        let after = counters(&client, 2).await;
        assert!(r.ops >= 200);
        assert!(r.json().contains(&format!("\"unary\":{unary}")));
        // Increments done during the (untimed) wind-down are not counted in ops.
        assert!(
            after - before >= r.ops,
            "unary {unary}: {before} -> {after} for {} ops",
            r.ops
        );
    }

    // --rate holds the offered load, whatever the distribution.
    for dist in [Distribution::Zipfian, Distribution::Sequential] {
        let mut a = args(
            TargetKind::Tessera,
            cluster.endpoints().join(","),
            Workload::Mixed,
        );
        a.rate = 300.0;
        a.duration = Some(2);
        a.distribution = dist;
        a.preload = false;
        let r = bench::run(a).await.unwrap();
        eprintln!("{}", r.text());
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        // 300/s over 2 s: about 600, never the thousands an unthrottled run does here.
        assert!(
            (450..=700).contains(&r.ops),
            "{dist:?}: {} ops at --rate 300 for 2 s",
            r.ops
        );
    }
    cluster.shutdown().await;
}

async fn counters(client: &tessera::client::Client, n: u64) -> u64 {
    let mut sum = 0;
    for i in 0..n {
        if let Some(kv) = client.get(&bench::key(i, 0)).await.unwrap() {
            sum += std::str::from_utf8(&kv.value)
                .unwrap()
                .parse::<u64>()
                .unwrap();
        }
    }
    sum
}

/// The etcd process and its data directory (removed when dropped).
struct Etcd(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_etcd() -> (Etcd, String) {
    let dir = tempfile::tempdir().unwrap();
    let ports = common::free_addrs(2);
    let (client, peer) = (ports[0], ports[1]);
    let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
    let child = Command::new("etcd")
        .args(["--name", "bench-test", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &format!("http://{client}")])
        .args(["--advertise-client-urls", &format!("http://{client}")])
        .args(["--listen-peer-urls", &format!("http://{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
        .args(["--initial-cluster", &format!("bench-test=http://{peer}")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("etcd is installed (scripts/test.sh installs Debian's etcd-server)");
    (Etcd(child, dir), client.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_against_etcd() {
    let (_etcd, ep) = start_etcd();
    // Wait until etcd answers a write.
    let t = Instant::now();
    loop {
        let mut a = args(TargetKind::Etcd, ep.clone(), Workload::Put);
        a.preload = false;
        a.ops = 1;
        if let Ok(r) = bench::run(a).await {
            if r.ops > 0 && r.errors.is_empty() {
                break;
            }
        }
        assert!(t.elapsed() < Duration::from_secs(30), "etcd never served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    every_workload(TargetKind::Etcd, ep.clone()).await;
    every_watcher_sees_every_write(TargetKind::Etcd, ep.clone()).await;
    every_session_is_kept(TargetKind::Etcd, ep.clone()).await;

    // The bench really wrote into etcd: a preloaded key reads back with its value.
    let target = bench::target::Target::connect(
        TargetKind::Etcd,
        &[ep],
        1,
        false,
        false,
        Default::default(),
    )
    .await
    .unwrap();
    let v = target
        .get(0, &bench::key(100, 0))
        .await
        .unwrap()
        .expect("preloaded key");
    assert_eq!(v.value.len(), 64);
}
