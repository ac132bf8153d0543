//! `tessera server`: run a node until SIGINT/SIGTERM, or until the cluster removes it.
//!
//! Invariants:
//! - command-line overrides are applied before the configuration is validated; a node
//!   starts only from a validated configuration whose data directory is ready;
//! - `--join` clears `node.id` (the cluster assigns it); `--listen-addr` clears
//!   `advertise_addr`, which then defaults to the listen address;
//! - `--check` opens the store and exits: it starts no node;
//! - the node is shut down before the command returns, on a signal or on removal; removal
//!   is reported as an error.

use std::path::PathBuf;

use tessera::config::Config;

use super::{Error, Result};

#[derive(clap::Args)]
pub struct ServerArgs {
    /// Config file (TOML). Without it the embedded default config is used.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Overrides node.data_dir.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Overrides node.listen_addr (and advertise_addr).
    #[arg(long)]
    pub listen_addr: Option<String>,
    /// Join the running cluster that ADDRESS (host:port, comma-separated for several)
    /// belongs to instead of founding one; the cluster assigns the node id.
    #[arg(long, value_name = "ADDRESS")]
    pub join: Option<String>,
    /// Validate the config and open the store, then exit.
    #[arg(long)]
    pub check: bool,
}

pub fn load_config(args: &ServerArgs) -> Result<Config> {
    let mut cfg = match &args.config {
        Some(path) => Config::from_file(path).map_err(|e| Error::Config(e.to_string()))?,
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
        cfg.cluster.join = tessera::client::endpoint_list(join);
        cfg.node.id = 0;
    }
    cfg.validate()
        .and_then(|()| cfg.prepare_data_dir())
        .map_err(|e| Error::Config(e.to_string()))?;
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
pub async fn run(args: ServerArgs, cfg: Config) -> Result<()> {
    // Test builds only: fail points from the FAILPOINTS environment variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    if args.check {
        if let Some(dir) = tessera::backup::restore::unfinished(&cfg.node.data_dir) {
            let e = tessera::server::StartError::UnfinishedRestore(dir.display().to_string());
            return Err(Error::Server(e.to_string()));
        }
        let engine =
            tessera::storage::Engine::open(&cfg.node.data_dir.join("db"), &Default::default())
                .map_err(|e| {
                    Error::Server(format!(
                        "cannot open store in {}: {e}",
                        cfg.node.data_dir.display()
                    ))
                })?;
        println!(
            "config valid; node {} of cluster {}; store opens at {}",
            cfg.node.id,
            cfg.cluster.cluster_id,
            engine.path().display()
        );
        return Ok(());
    }
    tessera::logging::init(&cfg.log.level, &cfg.log.file).map_err(Error::Config)?;
    // From here SIGHUP re-reads the TLS certificates (or is ignored without TLS) instead of
    // stopping the node: its handler is installed before the start-up, which can take a
    // while, and stays for the life of the process.
    #[cfg(unix)]
    let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    // The metrics port: Prometheus text and the status page (`server::status_page`).
    let mut metrics_port = None;
    if !cfg.node.metrics_addr.is_empty() {
        let addr: std::net::SocketAddr = cfg
            .node
            .metrics_addr
            .parse()
            .map_err(|_| Error::Config("node.metrics_addr is not a socket address".into()))?;
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(&[
                0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0, 4.0,
                8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0,
            ])
            .map_err(|e| Error::Server(format!("metrics: {e}")))?
            .install_recorder()
            .map_err(|e| Error::Server(format!("metrics: {e}")))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Server(format!("cannot serve metrics on {addr}: {e}")))?;
        metrics_port = Some((listener, handle));
    }
    // The status page asks the node itself, at the address its certificate names.
    let advertise = cfg.advertise_addr().ok();
    let node = tessera::server::Node::start(cfg, None)
        .await
        .map_err(|e| Error::Server(e.to_string()))?;
    let status_page = metrics_port.map(|(listener, handle)| {
        let mut kv = node.local_addr();
        if let Some(a) = advertise.filter(|a| !a.ip().is_unspecified() && a.port() != 0) {
            kv = a;
        }
        if kv.ip().is_unspecified() {
            kv.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        tokio::spawn(tessera::server::status_page::serve(
            listener,
            handle,
            kv,
            node.transport().node_tls().cloned(),
        ))
    });
    eprintln!("tessera: node serving on {}", node.local_addr());
    sd_notify("READY=1");
    let removed = tokio::select! {
        _ = wait_for_signal() => false,
        _ = node.wait_removed() => true,
    };
    eprintln!("tessera: shutting down");
    sd_notify("STOPPING=1");
    if let Some(task) = status_page {
        task.abort();
    }
    node.shutdown().await;
    if removed {
        return Err(Error::Server(
            "this node was removed from the cluster; its data directory cannot serve again \
             (wipe it and join anew)"
                .into(),
        ));
    }
    Ok(())
}

/// Tells systemd (`Type=notify`, deploy/systemd/tessera.service) how the node is doing,
/// when it runs under systemd (`NOTIFY_SOCKET` set); otherwise does nothing. Best effort: a
/// failure is logged, never fatal.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!(socket = %path, error = %e, "cannot notify systemd");
    }
}
