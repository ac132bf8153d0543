//! The `tessera` binary: one executable for the server and the command-line client.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tessera::client::{CasAction, Client, ClientOptions, Compare};
use tessera::config::Config;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "A multi-Raft sharded metadata service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Server(ServerArgs),
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Read and write keys.
    Kv {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: KvOp,
    },
    /// List the nodes in the placement registry with their state, or remove one.
    Nodes {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: Option<NodesOp>,
    },
    /// Load-test a cluster.
    Bench(tessera::bench::BenchArgs),
    /// List the regions (range, epoch, peers, leader, load), or split, move or change one.
    Regions {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: Option<RegionsOp>,
    },
    /// The cluster at a glance: nodes up/down, regions, leaderless regions, data size.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand)]
enum NodesOp {
    /// Mark a node removed: it stops serving and may never come back with its data. Its
    /// region replicas are not moved elsewhere by this command.
    Remove { node_id: u64 },
}

#[derive(Subcommand)]
enum RegionsOp {
    /// Hand the leadership of REGION to its replica on NODE, and wait until it has moved.
    TransferLeader { region_id: u64, node_id: u64 },
    /// Split the region holding KEY so that a new region starts at KEY (UTF-8, or hex with
    /// --hex). Regions also split by themselves past the [region] size limits.
    Split {
        key: String,
        /// KEY is hex-encoded bytes.
        #[arg(long)]
        hex: bool,
    },
    /// Move REGION's replica on node FROM to node TO: a learner is added on TO and caught up
    /// (by snapshot), then promoted while FROM's replica is removed, in one joint change.
    Move { region_id: u64, from: u64, to: u64 },
    /// Add a replica of REGION on NODE (a voter, or a learner with --learner).
    AddPeer {
        region_id: u64,
        node_id: u64,
        #[arg(long)]
        learner: bool,
    },
    /// Remove REGION's replica on NODE (transfer leadership away from NODE first).
    RemovePeer { region_id: u64, node_id: u64 },
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Config file (TOML). Without it the embedded default config is used.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides node.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides node.listen_addr (and advertise_addr).
    #[arg(long)]
    listen_addr: Option<String>,
    /// Join the running cluster that ADDRESS (host:port, comma-separated for several)
    /// belongs to instead of founding one; the cluster assigns the node id.
    #[arg(long, value_name = "ADDRESS")]
    join: Option<String>,
    /// Validate the config and open the store, then exit.
    #[arg(long)]
    check: bool,
}

#[derive(clap::Args)]
struct ConnArgs {
    /// Comma-separated node addresses (host:port).
    #[arg(long, short, default_value = "127.0.0.1:20160", global = true)]
    endpoints: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum KvOp {
    Get {
        key: String,
        /// Serve from any replica's local state (may be stale).
        #[arg(long)]
        serializable: bool,
    },
    Put {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
    /// Keys in [START, END) in order; END empty = to the end.
    Scan {
        #[arg(default_value = "")]
        start: String,
        #[arg(default_value = "")]
        end: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Compare-and-swap: set KEY to VALUE only if its current value is EXPECTED
    /// (or, with --absent, only if it does not exist).
    Cas {
        key: String,
        value: String,
        #[arg(long, conflicts_with = "absent")]
        expected: Option<String>,
        #[arg(long)]
        absent: bool,
    },
}

fn load_config(args: &ServerArgs) -> Result<Config, String> {
    let mut cfg = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| e.to_string())?,
        None => Config::embedded_default(),
    };
    if let Some(dir) = &args.data_dir {
        cfg.node.data_dir = dir.clone();
    }
    if let Some(addr) = &args.listen_addr {
        cfg.node.listen_addr = addr.clone();
        cfg.node.advertise_addr = String::new();
    }
    if let Some(join) = &args.join {
        cfg.cluster.join = join
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        cfg.node.id = 0;
    }
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `cfg`: loaded by `main` from `args`, which sized the runtime by it.
async fn run_server(args: ServerArgs, cfg: Config) -> Result<(), String> {
    // Test builds only: fail points from the FAILPOINTS environment variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    if args.check {
        let engine =
            tessera::storage::Engine::open(&cfg.node.data_dir.join("db"), &Default::default())
                .map_err(|e| {
                    format!("cannot open store in {}: {e}", cfg.node.data_dir.display())
                })?;
        println!(
            "config valid; node {} of cluster {}; store opens at {}",
            cfg.node.id,
            cfg.cluster.cluster_id,
            engine.path().display()
        );
        return Ok(());
    }
    tessera::logging::init(&cfg.log.level, &cfg.log.file)?;
    if !cfg.node.metrics_addr.is_empty() {
        let addr: std::net::SocketAddr = cfg
            .node
            .metrics_addr
            .parse()
            .map_err(|_| "node.metrics_addr is not a socket address".to_string())?;
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .set_buckets(&[
                0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0, 4.0,
                8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
            ])
            .map_err(|e| format!("metrics: {e}"))?
            .install()
            .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    }
    let node = tessera::server::Node::start(cfg, None)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("tessera: node serving on {}", node.local_addr());
    let removed = tokio::select! {
        _ = wait_for_signal() => false,
        _ = node.wait_removed() => true,
    };
    eprintln!("tessera: shutting down");
    node.shutdown().await;
    if removed {
        return Err(
            "this node was removed from the cluster; its data directory cannot serve again \
             (wipe it and join anew)"
                .into(),
        );
    }
    Ok(())
}

async fn connect(conn: &ConnArgs, serializable: bool) -> Result<Client, String> {
    let endpoints: Vec<String> = conn
        .endpoints
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut opts = ClientOptions {
        deadline: std::time::Duration::from_secs(15),
        ..Default::default()
    };
    if serializable {
        opts.consistency = tessera::proto::ReadConsistency::Serializable;
    }
    Client::connect(&endpoints, opts)
        .await
        .map_err(|e| e.to_string())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn kv_json(kv: &tessera::proto::KeyValue) -> String {
    format!(
        "{{\"key\":{},\"value\":{},\"create_revision\":{},\"mod_revision\":{},\"version\":{}}}",
        json_str(&text(&kv.key)),
        json_str(&text(&kv.value)),
        kv.create_revision,
        kv.mod_revision,
        kv.version
    )
}

async fn run_kv(conn: ConnArgs, op: KvOp) -> Result<(), String> {
    let serializable = matches!(
        op,
        KvOp::Get {
            serializable: true,
            ..
        }
    );
    let client = connect(&conn, serializable).await?;
    let err = |e: tessera::client::Error| e.to_string();
    match op {
        KvOp::Get { key, .. } => match client.get(key.as_bytes()).await.map_err(err)? {
            Some(kv) if conn.json => println!("{}", kv_json(&kv)),
            Some(kv) => println!("{}", text(&kv.value)),
            None => return Err(format!("key {key:?} not found")),
        },
        KvOp::Put { key, value } => {
            let r = client
                .put(key.as_bytes(), value.as_bytes())
                .await
                .map_err(err)?;
            if conn.json {
                println!("{{\"revision\":{}}}", r.revision);
            } else {
                println!("OK (revision {})", r.revision);
            }
        }
        KvOp::Delete { key } => {
            let r = client.delete(key.as_bytes()).await.map_err(err)?;
            let deleted = r.prev.is_some();
            if conn.json {
                println!("{{\"deleted\":{deleted},\"revision\":{}}}", r.revision);
            } else if deleted {
                println!("deleted");
            } else {
                println!("not found");
            }
        }
        KvOp::Scan { start, end, limit } => {
            let kvs = client
                .scan(start.as_bytes(), end.as_bytes(), limit)
                .await
                .map_err(err)?;
            if conn.json {
                let items: Vec<String> = kvs.iter().map(kv_json).collect();
                println!("[{}]", items.join(","));
            } else {
                for kv in kvs {
                    println!("{}\t{}", text(&kv.key), text(&kv.value));
                }
            }
        }
        KvOp::Cas {
            key,
            value,
            expected,
            absent,
        } => {
            let compare = match (absent, expected) {
                (true, _) => Compare::Absent,
                (false, Some(v)) => Compare::Value(v.into_bytes()),
                (false, None) => return Err("cas needs --expected VALUE or --absent".into()),
            };
            let r = client
                .cas(key.as_bytes(), compare, CasAction::Put(value.into_bytes()))
                .await
                .map_err(err)?;
            if conn.json {
                println!(
                    "{{\"succeeded\":{},\"revision\":{}}}",
                    r.succeeded, r.revision
                );
            } else if r.succeeded {
                println!("OK (revision {})", r.revision);
            } else {
                return Err("compare failed: key not changed".into());
            }
        }
    }
    Ok(())
}

fn decode_hex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{s:?} is not an even number of hex digits"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| e.to_string()))
        .collect()
}

fn hex(k: &[u8]) -> String {
    if k.is_empty() {
        "-".to_string()
    } else {
        k.iter().map(|b| format!("{b:02x}")).collect()
    }
}

async fn run_regions(conn: ConnArgs, op: Option<RegionsOp>) -> Result<(), String> {
    let client = connect(&conn, false).await?;
    if let Some(RegionsOp::TransferLeader { region_id, node_id }) = op {
        client
            .transfer_leader(region_id, node_id)
            .await
            .map_err(|e| e.to_string())?;
        if conn.json {
            println!("{{\"region\":{region_id},\"leader_node\":{node_id}}}");
        } else {
            println!("region {region_id} is now led from node {node_id}");
        }
        return Ok(());
    }
    let changed = match &op {
        Some(RegionsOp::Move {
            region_id,
            from,
            to,
        }) => Some(
            client
                .move_replica(*region_id, *from, *to, std::time::Duration::from_secs(600))
                .await,
        ),
        Some(RegionsOp::AddPeer {
            region_id,
            node_id,
            learner,
        }) => {
            let kind = if *learner {
                tessera::proto::PeerChangeKind::AddLearner
            } else {
                tessera::proto::PeerChangeKind::AddVoter
            };
            Some(client.change_peers(*region_id, &[(kind, *node_id)]).await)
        }
        Some(RegionsOp::RemovePeer { region_id, node_id }) => Some(
            client
                .change_peers(
                    *region_id,
                    &[(tessera::proto::PeerChangeKind::Remove, *node_id)],
                )
                .await,
        ),
        _ => None,
    };
    if let Some(r) = changed {
        let r = r.map_err(|e| e.to_string())?;
        let peers: Vec<String> = r
            .peers
            .iter()
            .map(|p| {
                let learner = p.role == tessera::proto::PeerRole::Learner as i32;
                format!("{}{}", p.node_id, if learner { "(learner)" } else { "" })
            })
            .collect();
        let epoch = r.epoch.unwrap_or_default();
        if conn.json {
            println!(
                "{{\"region\":{},\"conf_ver\":{},\"nodes\":[{}]}}",
                r.id,
                epoch.conf_ver,
                r.peers
                    .iter()
                    .map(|p| p.node_id.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        } else {
            println!(
                "region {} now on nodes {} (conf_ver {})",
                r.id,
                peers.join(", "),
                epoch.conf_ver
            );
        }
        return Ok(());
    }
    if let Some(RegionsOp::Split { key, hex: is_hex }) = op {
        let key = if is_hex {
            decode_hex(&key)?
        } else {
            key.into_bytes()
        };
        let regions = client.split(&key).await.map_err(|e| e.to_string())?;
        for r in regions {
            let epoch = r.epoch.unwrap_or_default();
            if conn.json {
                println!(
                    "{{\"region\":{},\"start\":\"{}\",\"end\":\"{}\",\"version\":{}}}",
                    r.id,
                    hex(&r.start_key),
                    hex(&r.end_key),
                    epoch.version
                );
            } else {
                println!(
                    "region {:>6}  [{}, {})  version {}",
                    r.id,
                    hex(&r.start_key),
                    hex(&r.end_key),
                    epoch.version
                );
            }
        }
        return Ok(());
    }
    let routes = client.routes().await.map_err(|e| e.to_string())?;
    if conn.json {
        let items: Vec<String> = routes
            .iter()
            .filter_map(|route| {
                let r = route.region.as_ref()?;
                let load = route.load.unwrap_or_default();
                let peers: Vec<String> = r
                    .peers
                    .iter()
                    .map(|p| format!("{{\"id\":{},\"node\":{}}}", p.id, p.node_id))
                    .collect();
                Some(format!(
                    "{{\"id\":{},\"start\":{},\"end\":{},\"version\":{},\"conf_ver\":{},\"leader_node\":{},\"peers\":[{}],\"keys\":{},\"bytes\":{},\"writes_per_sec\":{:.1}}}",
                    r.id,
                    json_str(&hex(&r.start_key)),
                    json_str(&hex(&r.end_key)),
                    r.epoch.unwrap_or_default().version,
                    r.epoch.unwrap_or_default().conf_ver,
                    route.leader.as_ref().map_or("null".to_string(), |l| l.node_id.to_string()),
                    peers.join(","),
                    load.keys,
                    load.bytes,
                    load.writes_per_sec
                ))
            })
            .collect();
        println!("[{}]", items.join(","));
        return Ok(());
    }
    println!(
        "{:>8}  {:<12}  {:<12}  {:>7}  {:>6}  {:>8}  {:>10}  {:>8}  NODES",
        "REGION", "START", "END", "EPOCH", "LEADER", "KEYS", "BYTES", "WRITES/S"
    );
    for route in &routes {
        let Some(r) = route.region.as_ref() else {
            continue;
        };
        let e = r.epoch.unwrap_or_default();
        let load = route.load.unwrap_or_default();
        let nodes: Vec<String> = r.peers.iter().map(|p| p.node_id.to_string()).collect();
        println!(
            "{:>8}  {:<12}  {:<12}  {:>7}  {:>6}  {:>8}  {:>10}  {:>8.1}  {}",
            r.id,
            hex(&r.start_key),
            hex(&r.end_key),
            format!("{}/{}", e.conf_ver, e.version),
            route
                .leader
                .as_ref()
                .map_or("?".into(), |l| l.node_id.to_string()),
            load.keys,
            load.bytes,
            load.writes_per_sec,
            nodes.join(",")
        );
    }
    println!("{} regions", routes.len());
    Ok(())
}

fn state_name(s: i32) -> &'static str {
    use tessera::proto::NodeState;
    match NodeState::try_from(s) {
        Ok(NodeState::Up) => "up",
        Ok(NodeState::Down) => "down",
        Ok(NodeState::Removed) => "removed",
        Err(_) => "unknown",
    }
}

async fn run_nodes(conn: ConnArgs, op: Option<NodesOp>) -> Result<(), String> {
    let client = connect(&conn, false).await?;
    if let Some(NodesOp::Remove { node_id }) = op {
        client
            .remove_node(node_id)
            .await
            .map_err(|e| e.to_string())?;
        if conn.json {
            println!("{{\"removed\":{node_id}}}");
        } else {
            println!("node {node_id} marked removed");
        }
        return Ok(());
    }
    let nodes = client.nodes().await.map_err(|e| e.to_string())?;
    if conn.json {
        let items: Vec<String> = nodes
            .iter()
            .map(|n| {
                let r = n.record.clone().unwrap_or_default();
                format!(
                    "{{\"id\":{},\"addr\":{},\"state\":\"{}\",\"regions\":{},\"leaders\":{},\"heartbeat_age_ms\":{}}}",
                    r.node_id,
                    json_str(&r.addr),
                    state_name(n.state),
                    r.regions,
                    r.leaders,
                    n.heartbeat_age_ms
                )
            })
            .collect();
        println!("[{}]", items.join(","));
        return Ok(());
    }
    println!(
        "{:>4}  {:<22}  {:<7}  {:>7}  {:>7}  LAST HEARTBEAT",
        "ID", "ADDRESS", "STATE", "REGIONS", "LEADERS"
    );
    for n in &nodes {
        let r = n.record.clone().unwrap_or_default();
        let age = if r.last_heartbeat_ms == 0 {
            "never".to_string()
        } else {
            format!("{:.1}s ago", n.heartbeat_age_ms as f64 / 1000.0)
        };
        println!(
            "{:>4}  {:<22}  {:<7}  {:>7}  {:>7}  {age}",
            r.node_id,
            r.addr,
            state_name(n.state),
            r.regions,
            r.leaders,
        );
    }
    Ok(())
}

async fn run_status(conn: ConnArgs) -> Result<(), String> {
    let client = connect(&conn, false).await?;
    let st = client.status().await.map_err(|e| e.to_string())?;
    let count = |want: &str| {
        st.nodes
            .iter()
            .filter(|n| state_name(n.state) == want)
            .count()
    };
    let (up, down, removed) = (count("up"), count("down"), count("removed"));
    let health = tessera::client::Health::of(&st);
    if conn.json {
        println!(
            "{{\"cluster_id\":{},\"nodes_up\":{up},\"nodes_down\":{down},\"nodes_removed\":{removed},\"regions\":{},\"regions_without_leader\":{},\"regions_unavailable\":{},\"keys\":{},\"bytes\":{},\"placement_leader_node\":{},\"max_id\":{},\"health\":\"{}\",\"routing_gaps\":{}}}",
            st.cluster_id,
            st.regions,
            st.regions_without_leader,
            st.regions_unavailable,
            st.total_keys,
            st.total_bytes,
            st.placement_leader_node,
            st.max_id,
            health.as_str(),
            st.routing_gaps.len()
        );
        return Ok(());
    }
    println!("cluster {}: {}", st.cluster_id, health.as_str());
    println!("  nodes:    {up} up, {down} down, {removed} removed");
    println!(
        "  regions:  {} ({} without a leader, {} without a live majority)",
        st.regions, st.regions_without_leader, st.regions_unavailable
    );
    for g in &st.routing_gaps {
        println!(
            "  routing:  no region has reported keys [{}, {}) yet (- = keyspace edge); not counted above",
            hex(&g.start_key),
            hex(&g.end_key)
        );
    }
    println!(
        "  data:     {} keys, {} bytes in user regions (from periodic load reports: recent writes show later)",
        st.total_keys, st.total_bytes
    );
    println!("  placement leader: node {}", st.placement_leader_node);
    Ok(())
}

async fn run_bench(args: tessera::bench::BenchArgs) -> Result<(), String> {
    let json = args.json.clone();
    let report = tessera::bench::run(args).await?;
    println!("{}", report.text());
    if let Some(path) = json {
        std::fs::write(&path, report.json() + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

/// jemalloc, not glibc malloc: less CPU per allocation under the servers' cross-thread
/// pattern (buffers made on gRPC threads, freed on raft workers) and less retained memory.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs `task` on a multi-threaded runtime of `threads` threads (tokio's default: one per
/// core).
fn block_on(
    threads: Option<usize>,
    task: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let rt = builder
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    rt.block_on(task)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Rust ignores SIGPIPE, so printing into a closed pipe (`tessera regions | head`) would
    // panic; a command-line tool should just end quietly, as with the default action. Not
    // the server: there the default action would kill the node whenever a peer or client
    // closes a connection it is writing to.
    if !matches!(cli.command, Command::Server(_)) {
        // SAFETY: called in main before the runtime or any other thread exists.
        #[cfg(unix)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        // A server's runtime is sized by its configuration, so that is read first.
        Command::Server(args) => load_config(&args).and_then(|cfg| {
            let threads = cfg.grpc_threads();
            block_on(Some(threads), run_server(args, cfg))
        }),
        Command::DefaultConfig => {
            print!("{}", tessera::config::DEFAULT_CONFIG_TOML);
            Ok(())
        }
        Command::Kv { conn, op } => block_on(None, run_kv(conn, op)),
        Command::Regions { conn, op } => block_on(None, run_regions(conn, op)),
        Command::Bench(args) => block_on(None, run_bench(args)),
        Command::Nodes { conn, op } => block_on(None, run_nodes(conn, op)),
        Command::Status { conn } => block_on(None, run_status(conn)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("tessera: error: {msg}");
            ExitCode::from(2)
        }
    }
}
