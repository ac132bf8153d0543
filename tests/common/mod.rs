//! Shared helpers for cluster tests: in-process clusters on `127.0.0.1:0` and real
//! `tessera server` processes.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tessera::client::{Client, ClientOptions};
use tessera::config::Config;
use tessera::proto::node_client::NodeClient;
use tessera::proto::{RegionInfo, RegionsRequest};
use tessera::server::Node;

/// Config for node `id` of a loopback cluster whose members are `addrs` (index = id - 1).
/// Regions besides the user regions in the test clusters: placement's and one lease region.
pub const SYSTEM_REGIONS: usize = 2;

pub fn node_config(dir: &Path, id: u64, addrs: &[SocketAddr], regions: u32) -> Config {
    let mut c = Config::default();
    c.node.id = id;
    c.node.data_dir = dir.join(format!("node{id}"));
    c.node.listen_addr = addrs[id as usize - 1].to_string();
    c.cluster.initial_cluster = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}@{a}", i + 1))
        .collect();
    c.cluster.initial_regions = regions;
    c.cluster.lease_regions = 1;
    c.raft.tick_interval_ms = 50;
    c.raft.election_ticks = 10;
    c.raft.heartbeat_ticks = 2;
    c.log.level = "warn".into();
    c
}

/// A temporary directory for one test's nodes. `TESSERA_TEST_KEEP=1` (or the chaos
/// harness's `TESSERA_CHAOS_KEEP=1`) keeps it, and prints its path, for a post-mortem of the
/// nodes' data and logs.
pub fn test_dir(what: &str) -> TempDir {
    let mut dir = tempfile::tempdir().expect("tempdir");
    let keep = ["TESSERA_TEST_KEEP", "TESSERA_CHAOS_KEEP"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if keep {
        dir.disable_cleanup(true);
        eprintln!("{what}: keeping {}", dir.path().display());
    }
    dir
}

pub struct TestCluster {
    pub dir: TempDir,
    pub addrs: Vec<SocketAddr>,
    pub configs: Vec<Config>,
    pub nodes: Vec<Option<Node>>,
}

impl TestCluster {
    pub async fn start(n: usize, regions: u32, tweak: impl Fn(&mut Config)) -> TestCluster {
        // TESSERA_TEST_LOG=debug (a tracing filter) shows the nodes' logs when debugging.
        if let Ok(filter) = std::env::var("TESSERA_TEST_LOG") {
            let _ = tessera::logging::init(&filter, Path::new(""));
        }
        let dir = test_dir("cluster");
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind loopback"),
            );
        }
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let mut configs = Vec::new();
        let mut nodes = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let mut cfg = node_config(dir.path(), i as u64 + 1, &addrs, regions);
            tweak(&mut cfg);
            cfg.validate().expect("valid config");
            nodes.push(Some(
                Node::start(cfg.clone(), Some(l))
                    .await
                    .expect("node starts"),
            ));
            configs.push(cfg);
        }
        TestCluster {
            dir,
            addrs,
            configs,
            nodes,
        }
    }

    /// As [`Self::start`], then waits until every region (and placement's) has a leader.
    pub async fn start_led(n: usize, regions: u32, tweak: impl Fn(&mut Config)) -> TestCluster {
        let cluster = Self::start(n, regions, tweak).await;
        wait_for_leaders(
            &cluster.endpoints(),
            regions as usize + SYSTEM_REGIONS,
            Duration::from_secs(60),
        )
        .await;
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.addrs.iter().map(|a| a.to_string()).collect()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.endpoints(), ClientOptions::default())
            .await
            .expect("client connects")
    }

    pub async fn stop(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    pub async fn restart(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        let listener = bind_retry(self.addrs[i]).await;
        let node = Node::start(self.configs[i].clone(), Some(listener))
            .await
            .expect("node restarts");
        self.nodes[i] = Some(node);
    }

    /// Starts one more node that joins the cluster through node `via`; returns its index.
    pub async fn join(&mut self, via: usize, tweak: impl Fn(&mut Config)) -> usize {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let i = self.nodes.len();
        let mut cfg = node_config(self.dir.path(), 1, &self.addrs, 1);
        cfg.node.id = 0;
        cfg.node.data_dir = self.dir.path().join(format!("joined{i}"));
        cfg.node.listen_addr = addr.to_string();
        cfg.cluster.join = vec![self.addrs[via].to_string()];
        tweak(&mut cfg);
        cfg.validate().expect("valid join config");
        let node = Node::start(cfg.clone(), Some(listener))
            .await
            .expect("node joins");
        self.addrs.push(addr);
        self.configs.push(cfg);
        self.nodes.push(Some(node));
        i
    }

    pub fn node(&self, i: usize) -> &Node {
        self.nodes[i].as_ref().expect("node running")
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop(i).await;
        }
    }
}

async fn bind_retry(addr: SocketAddr) -> tokio::net::TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot rebind {addr}: {e}"),
        }
    }
}

/// TLS settings of the nodes a test started with TLS, by address (addresses are unique per
/// test): the helpers here and in the chaos harness speak TLS to those, with an operator's
/// certificate of the cluster CA so that admin calls and fail points work.
fn tls_registry() -> &'static std::sync::Mutex<HashMap<String, tessera::client::TlsOptions>> {
    static TLS: std::sync::OnceLock<
        std::sync::Mutex<HashMap<String, tessera::client::TlsOptions>>,
    > = std::sync::OnceLock::new();
    TLS.get_or_init(Default::default)
}

/// Registers `tls` for the nodes at `addrs`.
pub fn register_tls(addrs: &[String], tls: &tessera::client::TlsOptions) {
    let mut m = tls_registry().lock().unwrap_or_else(|e| e.into_inner());
    for a in addrs {
        m.insert(a.clone(), tls.clone());
    }
}

/// The TLS settings registered for the node at `addr`, if it speaks TLS.
pub fn tls_for(addr: &str) -> Option<tessera::client::TlsOptions> {
    let m = tls_registry().lock().unwrap_or_else(|e| e.into_inner());
    m.get(addr).cloned()
}

/// `opts`, speaking TLS when the nodes at `addrs` do.
pub fn with_tls(addrs: &[String], mut opts: ClientOptions) -> ClientOptions {
    if let Some(t) = addrs.first().and_then(|a| tls_for(a)) {
        opts.tls = Some(t);
    }
    opts
}

/// A gRPC channel to the node at `addr`: TLS when it speaks TLS.
pub async fn channel(addr: &str) -> Result<tonic::transport::Channel, String> {
    let tls = tls_for(addr);
    tessera::client::tls::endpoint(addr, tls.as_ref())?
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// Certificates for a TLS cluster of `n` nodes on 127.0.0.1, made under `dir`: the CA
/// file, each node's certificate and key, and an operator's client settings (a certificate
/// of the same CA, so admin calls pass).
pub struct TlsCerts {
    pub ca_file: PathBuf,
    pub nodes: Vec<(PathBuf, PathBuf)>,
    pub operator: tessera::client::TlsOptions,
}

pub fn tls_certs(dir: &Path, n: usize) -> TlsCerts {
    std::fs::create_dir_all(dir).expect("mkdir certs");
    let ca = Ca::new("cluster");
    let ca_file = ca.write(dir, "ca");
    let nodes = (1..=n)
        .map(|i| ca.issue(dir, &format!("node{i}"), false))
        .collect();
    let (oc, ok) = ca.issue(dir, "operator", false);
    let operator =
        tessera::client::TlsOptions::from_files(&ca_file, Some(&oc), Some(&ok)).expect("TLS");
    TlsCerts {
        ca_file,
        nodes,
        operator,
    }
}

/// A CA made at test time (rcgen) that signs node certificates for 127.0.0.1.
pub struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let pem = p.self_signed(&key).expect("CA").pem();
        Ca {
            issuer: rcgen::Issuer::new(p, key),
            pem,
        }
    }

    /// A certificate and key for 127.0.0.1, written under `dir` as `name.crt`/`name.key`.
    pub fn issue(&self, dir: &Path, name: &str, expired: bool) -> (PathBuf, PathBuf) {
        self.issue_for(dir, name, &["127.0.0.1", "localhost"], expired)
    }

    /// A certificate and key for `names`, written under `dir` as `name.crt`/`name.key`.
    pub fn issue_for(
        &self,
        dir: &Path,
        name: &str,
        names: &[&str],
        expired: bool,
    ) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let names = names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut p = rcgen::CertificateParams::new(names).expect("params");
        if expired {
            p.not_before = rcgen::date_time_ymd(2001, 1, 1);
            p.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = p.signed_by(&key, &self.issuer).expect("certificate");
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.pem"));
        std::fs::write(&p, &self.pem).expect("write CA");
        p
    }
}

impl TlsCerts {
    /// Sets node `c`'s `[security]` to these certificates.
    pub fn configure(&self, c: &mut Config) {
        let (cert, key) = &self.nodes[c.node.id as usize - 1];
        c.security.cert_file = cert.clone();
        c.security.key_file = key.clone();
        c.security.ca_file = self.ca_file.clone();
    }
}

/// The regions one node hosts, as it sees them.
pub async fn node_regions(addr: &str) -> Option<Vec<RegionInfo>> {
    let mut c = NodeClient::new(channel(addr).await.ok()?);
    Some(
        c.regions(RegionsRequest {})
            .await
            .ok()?
            .into_inner()
            .regions,
    )
}

/// A client that rides out leader changes and dead nodes: 30 s per call, 3 s per RPC.
pub async fn patient_client(eps: &[String]) -> tessera::client::Client {
    tessera::client::Client::connect(
        eps,
        tessera::client::ClientOptions {
            deadline: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await
    .expect("client connects")
}

/// A client that may read and write the placement (system) keys.
pub async fn system_client(eps: &[String]) -> tessera::client::Client {
    tessera::client::Client::connect(
        eps,
        tessera::client::ClientOptions {
            system: true,
            ..Default::default()
        },
    )
    .await
    .expect("system client connects")
}

/// Waits until the routing table shows all `regions` regions with three voters each and
/// none on `dead` (the scheduler replaced its replicas); returns how long that took.
pub async fn wait_replaced(
    client: &tessera::client::Client,
    regions: usize,
    dead: u64,
    timeout: Duration,
) -> Duration {
    let t = Instant::now();
    loop {
        let routes = client.routes().await.unwrap_or_default();
        let layout: Vec<Vec<(u64, i32)>> = routes
            .iter()
            .filter_map(|r| r.region.as_ref())
            .map(|r| r.peers.iter().map(|p| (p.node_id, p.role)).collect())
            .collect();
        let healed = layout.len() == regions
            && layout.iter().all(|peers| {
                peers.len() == 3 && peers.iter().all(|(n, role)| *n != dead && *role == 0)
            });
        if healed {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < timeout,
            "replicas of node {dead} not replaced: {layout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads `key` from `addr`'s own replica of `region` (serializable: no leader involved).
/// `None` when the node does not answer within a few seconds or refuses the route.
pub async fn local_get(
    addr: &str,
    region: &tessera::proto::Region,
    key: &[u8],
) -> Option<Option<tessera::proto::KeyValue>> {
    get_at(addr, region, key, false, Duration::from_secs(3))
        .await
        .ok()
}

/// A get of `key` in `region` sent to `addr` only (no routing, no retry): `Ok` when that
/// node served it, `Err` for a region error, a failure, or no answer within `wait`.
pub async fn get_at(
    addr: &str,
    region: &tessera::proto::Region,
    key: &[u8],
    linearizable: bool,
    wait: Duration,
) -> Result<Option<tessera::proto::KeyValue>, String> {
    use tessera::proto::kv_client::KvClient;
    use tessera::proto::{GetRequest, ReadConsistency, RequestHeader};
    let consistency = if linearizable {
        ReadConsistency::Linearizable
    } else {
        ReadConsistency::Serializable
    };
    let call = async {
        let mut kv = KvClient::new(channel(addr).await?);
        let r = kv
            .get(GetRequest {
                revision: 0,
                header: Some(RequestHeader {
                    region_id: region.id,
                    region_epoch: region.epoch,
                    consistency: consistency as i32,
                    system: false,
                    write_id: None,
                }),
                key: key.to_vec(),
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        match r.region_error {
            Some(e) => Err(format!("{e:?}")),
            None => Ok(r.kv),
        }
    };
    tokio::time::timeout(wait, call)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {wait:?}")))
}

/// Waits until every region of the running nodes has a leader known to all of them.
/// Returns the leader node per region.
pub async fn wait_for_leaders(
    addrs: &[String],
    regions: usize,
    timeout: Duration,
) -> Vec<(u64, u64)> {
    wait_led(addrs, regions, true, timeout).await
}

/// As [`wait_for_leaders`], for a cluster whose nodes each host only some of the regions
/// (more nodes than replicas): `regions` counts the regions of all nodes together.
pub async fn wait_for_leaders_spread(
    addrs: &[String],
    regions: usize,
    timeout: Duration,
) -> Vec<(u64, u64)> {
    wait_led(addrs, regions, false, timeout).await
}

async fn wait_led(
    addrs: &[String],
    regions: usize,
    everywhere: bool,
    timeout: Duration,
) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut ok = true;
        let mut leaders = std::collections::BTreeMap::new();
        for a in addrs {
            match node_regions(a).await {
                Some(rs) => {
                    if everywhere && rs.len() < regions {
                        ok = false;
                    }
                    for r in rs {
                        let id = r.region.as_ref().map_or(0, |r| r.id);
                        match r.leader {
                            Some(l) => {
                                if let Some(prev) = leaders.insert(id, l.node_id) {
                                    if prev != l.node_id {
                                        ok = false;
                                    }
                                }
                            }
                            None => ok = false,
                        }
                    }
                }
                None => ok = false,
            }
        }
        if ok && leaders.len() >= regions {
            return leaders.into_iter().collect();
        }
        assert!(
            Instant::now() < deadline,
            "regions without an agreed leader after {timeout:?}: {} of {regions} have one",
            leaders.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A key that falls in the `i`-th of `n` evenly split initial regions.
pub fn key_in_region(i: u32, n: u32, suffix: &str) -> Vec<u8> {
    let v = ((u64::from(i) * 65536).div_ceil(u64::from(n))) as u16;
    let mut k = v.to_be_bytes().to_vec();
    k.extend_from_slice(suffix.as_bytes());
    k
}

/// A `tessera server` process.
pub struct Proc {
    pub child: Option<Child>,
    pub config_path: PathBuf,
    pub addr: String,
}

impl Proc {
    pub fn start(config_path: &Path, addr: &str, log: &Path) -> Proc {
        Proc::start_env(config_path, addr, log, &[])
    }

    /// Like `start`, with extra environment variables (e.g. FAILPOINTS).
    pub fn start_env(config_path: &Path, addr: &str, log: &Path, env: &[(&str, &str)]) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log");
        let child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .envs(env.iter().copied())
            .arg("server")
            .arg("--config")
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn tessera server");
        Proc {
            child: Some(child),
            config_path: config_path.to_path_buf(),
            addr: addr.to_string(),
        }
    }

    /// SIGKILL: no shutdown code runs, like a power cut for the process.
    /// Sends `sig` (`STOP`, `CONT`, ...) to the process, if it runs.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn restart(&mut self, log: &Path) {
        self.restart_env(log, &[]);
    }

    pub fn restart_env(&mut self, log: &Path, env: &[(&str, &str)]) {
        self.kill9();
        *self = Proc::start_env(&self.config_path.clone(), &self.addr.clone(), log, env);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Free loopback ports for process tests (bound then released). A port is never handed
/// out twice by one test process: the kernel may give a just-released port to the next
/// bind, so a test asking twice (nodes' ports, then their metrics ports) could otherwise
/// start two listeners on one port — a node that cannot bind and a cluster that never
/// elects.
pub fn free_addrs(n: usize) -> Vec<SocketAddr> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = Vec::new();
    let mut addrs = Vec::new();
    while addrs.len() < n {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = l.local_addr().expect("addr");
        if !handed_out.contains(&a.port()) {
            handed_out.push(a.port());
            addrs.push(a);
        }
        // Held until all are chosen, so this call cannot get the same port twice either.
        held.push(l);
    }
    addrs
}

/// Writes configs for a process cluster and starts it.
pub fn start_process_cluster(
    dir: &Path,
    n: usize,
    regions: u32,
    tweak: impl Fn(&mut Config),
) -> Vec<Proc> {
    let addrs = free_addrs(n);
    (1..=n as u64)
        .map(|id| {
            let mut cfg = node_config(dir, id, &addrs, regions);
            cfg.log.level = "info".into();
            tweak(&mut cfg);
            let path = dir.join(format!("node{id}.toml"));
            std::fs::write(&path, toml::to_string(&cfg).expect("serialize config"))
                .expect("write config");
            Proc::start(
                &path,
                &addrs[id as usize - 1].to_string(),
                &dir.join(format!("node{id}.log")),
            )
        })
        .collect()
}

/// Sets the fault on the link from the node at `from` to node id `to`, or clears it with an
/// empty `spec` (fail point `net_to_<to>`; syntax in src/transport/fault.rs). The node may be
/// busy, so a few tries; a fault that could not be set (or cleared) makes the calling test
/// meaningless, so it fails loudly.
pub async fn set_link(from: &str, to: u64, spec: &str) {
    let actions = if spec.is_empty() {
        String::new()
    } else {
        format!("return({spec})")
    };
    set_failpoint(from, &format!("net_to_{to}"), &actions).await;
}

/// Sets fail point `name` to `actions` on the node at `addr` (empty `actions` clears it),
/// with a few tries; panics if it cannot be set.
pub async fn set_failpoint(addr: &str, name: &str, actions: &str) {
    let req = tessera::proto::SetFailpointRequest {
        name: name.to_string(),
        actions: actions.to_string(),
    };
    for attempt in 0..10 {
        let res = async {
            let mut c = NodeClient::new(channel(addr).await?);
            c.set_failpoint(req.clone())
                .await
                .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(2), res).await {
            Ok(Ok(_)) => return,
            r if attempt == 9 => panic!("cannot set fail point {name} on {addr}: {r:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A node's Prometheus page from its metrics address (empty if it cannot be read): one
/// HTTP/1.0 GET, answered within 5 s.
pub fn scrape_metrics(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    if s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Sum of one metric's samples in a Prometheus page: every line that starts with `name`
/// and contains `labels` ("" for all).
pub fn metric_sum(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
