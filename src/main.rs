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
    /// List the nodes in the placement registry with their state.
    Nodes {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Load-test a cluster.
    Bench(tessera::bench::BenchArgs),
    /// List the regions, their ranges, peers and leaders.
    Regions {
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(clap::Args)]
struct ServerArgs {
    /// Config file (TOML). Without it the embedded default config is used.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides node.data_dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
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

async fn run_server(args: ServerArgs) -> Result<(), String> {
    let cfg = load_config(&args)?;
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
    wait_for_signal().await;
    eprintln!("tessera: shutting down");
    node.shutdown().await;
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

async fn run_regions(conn: ConnArgs) -> Result<(), String> {
    let client = connect(&conn, false).await?;
    let regions = client.regions().await.map_err(|e| e.to_string())?;
    if conn.json {
        let items: Vec<String> = regions
            .iter()
            .map(|c| {
                let r = &c.region;
                let peers: Vec<String> = r
                    .peers
                    .iter()
                    .map(|p| format!("{{\"id\":{},\"node\":{}}}", p.id, p.node_id))
                    .collect();
                format!(
                    "{{\"id\":{},\"start\":{},\"end\":{},\"version\":{},\"conf_ver\":{},\"leader_node\":{},\"peers\":[{}]}}",
                    r.id,
                    json_str(&format!("{:02x?}", r.start_key)),
                    json_str(&format!("{:02x?}", r.end_key)),
                    r.epoch.unwrap_or_default().version,
                    r.epoch.unwrap_or_default().conf_ver,
                    c.leader.as_ref().map_or("null".to_string(), |l| l.node_id.to_string()),
                    peers.join(",")
                )
            })
            .collect();
        println!("[{}]", items.join(","));
        return Ok(());
    }
    println!(
        "{:>8}  {:<20}  {:<20}  {:>7}  {:>6}  NODES",
        "REGION", "START", "END", "EPOCH", "LEADER"
    );
    let hex = |k: &[u8]| {
        if k.is_empty() {
            "-".to_string()
        } else {
            k.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    for c in &regions {
        let r = &c.region;
        let e = r.epoch.unwrap_or_default();
        let nodes: Vec<String> = r.peers.iter().map(|p| p.node_id.to_string()).collect();
        println!(
            "{:>8}  {:<20}  {:<20}  {:>7}  {:>6}  {}",
            r.id,
            hex(&r.start_key),
            hex(&r.end_key),
            format!("{}/{}", e.conf_ver, e.version),
            c.leader
                .as_ref()
                .map_or("?".into(), |l| l.node_id.to_string()),
            nodes.join(",")
        );
    }
    println!("{} regions", regions.len());
    Ok(())
}

async fn run_nodes(conn: ConnArgs) -> Result<(), String> {
    use tessera::proto::node_client::NodeClient;
    use tessera::proto::{ListNodesRequest, NodeState};
    let mut last = String::from("no endpoint given");
    for ep in conn
        .endpoints
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let mut c = match NodeClient::connect(format!("http://{ep}")).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{ep}: {e}");
                continue;
            }
        };
        let nodes = match c.list_nodes(ListNodesRequest {}).await {
            Ok(r) => r.into_inner().nodes,
            Err(s) => {
                last = format!("{ep}: {}", s.message());
                continue;
            }
        };
        let state = |s: i32| match NodeState::try_from(s) {
            Ok(NodeState::Up) => "up",
            Ok(NodeState::Down) => "down",
            Ok(NodeState::Removed) => "removed",
            Err(_) => "unknown",
        };
        if conn.json {
            let items: Vec<String> = nodes
                .iter()
                .map(|n| {
                    let r = n.record.clone().unwrap_or_default();
                    format!(
                        "{{\"id\":{},\"addr\":{},\"state\":\"{}\",\"regions\":{},\"leaders\":{},\"heartbeat_age_ms\":{}}}",
                        r.node_id,
                        json_str(&r.addr),
                        state(n.state),
                        r.regions,
                        r.leaders,
                        n.heartbeat_age_ms
                    )
                })
                .collect();
            println!("[{}]", items.join(","));
        } else {
            println!(
                "{:>4}  {:<22}  {:<7}  {:>7}  {:>7}  LAST HEARTBEAT",
                "ID", "ADDRESS", "STATE", "REGIONS", "LEADERS"
            );
            for n in &nodes {
                let r = n.record.clone().unwrap_or_default();
                println!(
                    "{:>4}  {:<22}  {:<7}  {:>7}  {:>7}  {:.1}s ago",
                    r.node_id,
                    r.addr,
                    state(n.state),
                    r.regions,
                    r.leaders,
                    n.heartbeat_age_ms as f64 / 1000.0
                );
            }
        }
        return Ok(());
    }
    Err(format!("no node answered: {last}"))
}

async fn run_bench(args: tessera::bench::BenchArgs) -> Result<(), String> {
    let name = format!("{:?}", args.workload).to_lowercase();
    let json = args.json.clone();
    let report = tessera::bench::run(args).await?;
    println!("{}", report.text(&name));
    if let Some(path) = json {
        std::fs::write(&path, report.json(&name) + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tessera: error: cannot start runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Server(args) => run_server(args).await,
            Command::DefaultConfig => {
                print!("{}", tessera::config::DEFAULT_CONFIG_TOML);
                Ok(())
            }
            Command::Kv { conn, op } => run_kv(conn, op).await,
            Command::Regions { conn } => run_regions(conn).await,
            Command::Bench(args) => run_bench(args).await,
            Command::Nodes { conn } => run_nodes(conn).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("tessera: error: {msg}");
            ExitCode::from(2)
        }
    }
}
