//! A running node: store, raft workers, transport and gRPC services, started and stopped
//! together.
//!
//! Start-up order (`start`): open RocksDB → bootstrap or check the store → load regions →
//! start the raft workers with their peers → serve gRPC → placement tasks. Shutdown
//! reverses it: stop accepting, let each worker finish its round, flush and close the DB.

pub mod admin;
pub mod auth_service;
mod compaction;
pub mod kv_service;
mod lease_keeper;
pub mod node_service;
pub mod quota;
pub mod raft_service;
pub mod reporter;
mod resolver;
mod start;
pub mod status_page;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::Config;
use crate::ids::RegionId;
use crate::proto::NodeRecord;
use crate::raftstore::bootstrap::{self, BootstrapError};
use crate::raftstore::msg::WorkerMsg;
use crate::raftstore::router::Router;
use crate::storage::Engine;
use crate::transport::Transport;
use raft_service::RaftService;

/// How long a client request may wait for its region's answer before "result unknown".
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot open store in {path}: {source}")]
    Store {
        path: String,
        source: crate::storage::Error,
    },
    #[error("{0}")]
    Bootstrap(#[from] BootstrapError),
    #[error("region {region}: {reason}")]
    Region { region: RegionId, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("cannot start raft worker: {0}")]
    Thread(std::io::Error),
    #[error("cannot join the cluster: {0}")]
    Join(String),
    /// The TLS settings could not be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// A restore into this data directory did not finish: its partial store is not started.
    #[error(
        "{0} holds an unfinished restore: run `tessera restore` again (it starts over), or \
         delete it to start without the backup"
    )]
    UnfinishedRestore(String),
}

/// Peer-only calls (raft, snapshots, admin) on a TLS node: only a caller that presented a
/// certificate of the cluster CA (the TLS layer verified it), of an allowed name when the
/// node lists them, may make them.
pub(crate) fn require_peer<T>(
    tls: Option<&Arc<crate::transport::tls::NodeTls>>,
    req: &tonic::Request<T>,
    what: &str,
) -> Result<(), tonic::Status> {
    is_peer(tls, req).map_err(|why| {
        metrics::counter!("tessera_peer_calls_refused_total").increment(1);
        tonic::Status::permission_denied(format!("{what} {why}"))
    })
}

/// Whether the caller may make peer-only calls (see [`require_peer`]), without counting a
/// refusal: for requests that only lose their system access when it may not.
pub(crate) fn is_peer<T>(
    tls: Option<&Arc<crate::transport::tls::NodeTls>>,
    req: &tonic::Request<T>,
) -> Result<(), String> {
    let Some(tls) = tls else {
        return Ok(());
    };
    let certs = req.peer_certs();
    tls.check_peer(certs.as_deref().map(|c| c.as_slice()))
}

/// Who is calling (`crate::auth`): a node or operator by a certificate of the cluster CA, a
/// user by the token in its `authorization` metadata, or anyone while authentication is off.
pub(crate) fn caller<T>(
    gate: &crate::auth::Gate,
    tls: Option<&Arc<crate::transport::tls::NodeTls>>,
    req: &tonic::Request<T>,
) -> Result<crate::auth::Caller, tonic::Status> {
    let peer = tls.is_some() && is_peer(tls, req).is_ok();
    let token = req
        .metadata()
        .get(crate::auth::TOKEN_METADATA)
        .and_then(|v| v.to_str().ok());
    gate.caller(peer, token)
}

/// Administrative calls: a caller that may make peer-only calls ([`require_peer`]), or a
/// user holding the root role once authentication is on.
pub(crate) fn require_admin<T>(
    gate: &crate::auth::Gate,
    tls: Option<&Arc<crate::transport::tls::NodeTls>>,
    req: &tonic::Request<T>,
    what: &str,
) -> Result<(), tonic::Status> {
    if tls.is_none() && gate.enabled() {
        // Authentication on without TLS: nobody can be told apart (`crate::auth`).
        return gate.caller(false, None).map(|_| ());
    }
    if is_peer(tls, req).is_ok() {
        return Ok(());
    }
    if req.metadata().contains_key(crate::auth::TOKEN_METADATA) && gate.enabled() {
        let c = caller(gate, tls, req)?;
        return gate
            .allow(&c, crate::auth::Need::Admin)
            .map_err(|s| tonic::Status::permission_denied(format!("{what}: {}", s.message())));
    }
    require_peer(tls, req, what)
}

pub struct Node {
    addr: SocketAddr,
    engine: Engine,
    router: Router,
    transport: Transport,
    workers: Vec<JoinHandle<()>>,
    stop_server: Option<oneshot::Sender<()>>,
    stopping: tokio::sync::watch::Sender<bool>,
    heartbeat: tokio::task::JoinHandle<()>,
    reporter: tokio::task::JoinHandle<()>,
    compaction: tokio::task::JoinHandle<()>,
    resolver: tokio::task::JoinHandle<()>,
    lease_keeper: tokio::task::JoinHandle<()>,
    scheduler: tokio::task::JoinHandle<()>,
    tls_reload: tokio::task::JoinHandle<()>,
    quota: tokio::task::JoinHandle<()>,
    auth_refresh: tokio::task::JoinHandle<()>,
    removed: tokio::sync::watch::Receiver<bool>,
    asleep: Vec<Arc<AtomicUsize>>,
    server: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Node {
    /// Starts a node. With `listener` the gRPC server uses it (tests bind `127.0.0.1:0`
    /// first); otherwise it binds `node.listen_addr`. Must run inside a tokio runtime.
    ///
    /// The steps (`start.rs`): open the store (joining a cluster first if configured),
    /// bootstrap or check it and list its regions, start the raft side (router, transport,
    /// workers and their peers), serve gRPC, then the placement tasks.
    pub async fn start(mut cfg: Config, listener: Option<TcpListener>) -> Result<Node, StartError> {
        let store = start::open_store(&mut cfg).await?;
        let region_ids = bootstrap::prepare_store(
            &store.engine,
            cfg.cluster_id(),
            cfg.node_id(),
            &store.members,
            &cfg.initial_split_keys(),
            cfg.cluster.replicas,
            cfg.cluster.lease_regions,
        )?;
        let (raft, changes) = start::start_raft(&cfg, &store, &region_ids)?;
        let grpc = start::serve(&cfg, listener, &raft).await?;
        let tasks =
            start::spawn_tasks(&cfg, &store.engine, &raft, grpc.placement.clone(), changes)?;
        tracing::info!(
            node = %cfg.node_id(),
            addr = %grpc.addr,
            regions = region_ids.len(),
            "node started"
        );
        Ok(Node {
            addr: grpc.addr,
            engine: store.engine,
            router: raft.router,
            transport: raft.transport,
            workers: raft.workers,
            stop_server: Some(grpc.stop),
            stopping: grpc.stopping,
            heartbeat: tasks.heartbeat,
            reporter: tasks.reporter,
            compaction: tasks.compaction,
            resolver: tasks.resolver,
            lease_keeper: tasks.lease_keeper,
            scheduler: tasks.scheduler,
            tls_reload: tasks.tls_reload,
            quota: tasks.quota,
            auth_refresh: tasks.auth_refresh,
            removed: tasks.removed,
            asleep: raft.asleep,
            server: Some(grpc.server),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Regions of this node that hibernate (as of the workers' last tick).
    pub fn hibernating_regions(&self) -> usize {
        self.asleep.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }

    /// Resolves once the placement registry says this node was removed from the cluster;
    /// the node must then stop (its data may never serve again).
    pub async fn wait_removed(&self) {
        let mut rx = self.removed.clone();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Stops accepting requests, lets every worker finish its round, then flushes the store.
    pub async fn shutdown(mut self) {
        self.heartbeat.abort();
        self.reporter.abort();
        self.compaction.abort();
        self.resolver.abort();
        self.lease_keeper.abort();
        self.scheduler.abort();
        self.tls_reload.abort();
        self.quota.abort();
        self.auth_refresh.abort();
        let _ = self.stopping.send(true);
        if let Some(tx) = self.stop_server.take() {
            let _ = tx.send(());
        }
        if let Some(mut server) = self.server.take() {
            // Graceful shutdown waits for open streams, and peers' raft streams never end on
            // their own: give requests in flight a moment, then drop every connection so the
            // peers notice and reconnect to whatever listens here next.
            if tokio::time::timeout(Duration::from_secs(1), &mut server)
                .await
                .is_err()
            {
                server.abort();
                let _ = server.await;
            }
        }
        for w in 0..self.router.worker_count() {
            self.router.send_worker(w, WorkerMsg::Shutdown);
        }
        let workers = std::mem::take(&mut self.workers);
        let _ = tokio::task::spawn_blocking(move || {
            for w in workers {
                let _ = w.join();
            }
        })
        .await;
        if let Err(e) = self.engine.flush() {
            tracing::warn!(error = %e, "flush at shutdown failed");
        }
        tracing::info!(addr = %self.addr, "node stopped");
    }
}

/// Registers a node with an empty store through `cluster.join`, or recovers the id of one
/// that joined before. Sets `cfg.node.id` and returns the cluster's nodes as members.
async fn join_cluster(
    cfg: &mut Config,
    engine: &Engine,
    tls: Option<&Arc<crate::transport::tls::NodeTls>>,
) -> Result<Vec<crate::config::Member>, StartError> {
    use crate::proto::node_client::NodeClient;
    if let Some(ident) = bootstrap::store_ident(engine)? {
        if ident.cluster_id != cfg.cluster.cluster_id {
            return Err(BootstrapError::WrongIdentity {
                found_cluster: ident.cluster_id,
                found_node: ident.node_id,
                cluster: cfg.cluster.cluster_id,
                node: ident.node_id,
            }
            .into());
        }
        tracing::info!(
            node = ident.node_id,
            "store already joined; restarting as that node"
        );
        cfg.node.id = ident.node_id;
        return Ok(Vec::new());
    }
    let addr = cfg.advertise_addr()?.to_string();
    let mut last = String::from("no join address given");
    for seed in &cfg.cluster.join {
        let tls = tls.map(|t| t.client());
        let channel = match crate::client::tls::endpoint(seed, tls.as_ref()) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(20)),
            Err(e) => {
                last = format!("{seed}: {e}");
                continue;
            }
        };
        let mut client = match channel.connect().await {
            Ok(ch) => NodeClient::new(ch),
            Err(e) => {
                last = crate::client::tls::connect_error(seed, tls.is_some(), &e);
                continue;
            }
        };
        let resp = match client
            .join(crate::proto::JoinRequest {
                cluster_id: cfg.cluster.cluster_id,
                addr: addr.clone(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                last = format!("{seed}: {}", s.message());
                continue;
            }
            Err(s) => return Err(StartError::Join(format!("{seed}: {}", s.message()))),
        };
        if resp.cluster_id != cfg.cluster.cluster_id || resp.node_id == 0 {
            return Err(StartError::Join(format!(
                "{seed} answered for cluster {} with node id {}",
                resp.cluster_id, resp.node_id
            )));
        }
        bootstrap::write_joined_ident(engine, cfg.cluster_id(), crate::ids::NodeId(resp.node_id))?;
        tracing::info!(node = resp.node_id, via = %seed, "joined the cluster");
        cfg.node.id = resp.node_id;
        let mut members = Vec::new();
        for n in resp.nodes {
            if let Ok(a) = n.addr.parse() {
                members.push(crate::config::Member {
                    id: crate::ids::NodeId(n.node_id),
                    addr: a,
                });
            }
        }
        return Ok(members);
    }
    Err(StartError::Join(last))
}

/// The free and total bytes of the file system holding the node's data (for the "disk
/// nearly full" alert).
pub(crate) fn disk_gauges(dir: &std::path::Path) {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return;
    };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid C string and `st` is written by statvfs before it is read.
    let ok = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } == 0;
    if ok {
        // SAFETY: statvfs returned 0, so it filled `st`.
        let st = unsafe { st.assume_init() };
        let block = st.f_frsize as f64;
        metrics::gauge!("tessera_disk_free_bytes").set(st.f_bavail as f64 * block);
        metrics::gauge!("tessera_disk_total_bytes").set(st.f_blocks as f64 * block);
    }
}

/// Writes this node's registry record into the placement region every `interval`, with its
/// region and leader counts, and learns the addresses of the other nodes from the registry.
/// Failures (placement region without a leader yet, a partition) are logged and retried on
/// the next beat. If the registry says this node was removed, `removed` is set and beats stop.
#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    placement: crate::placement::client::SystemClient,
    router: Router,
    transport: Transport,
    leaders: Vec<Arc<AtomicUsize>>,
    mut record: NodeRecord,
    interval: Duration,
    down_after: Duration,
    removed: tokio::sync::watch::Sender<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let client = match placement.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "placement not reachable yet");
                continue;
            }
        };
        record.last_heartbeat_ms = crate::placement::now_ms();
        record.regions = router.region_count() as u64;
        record.leaders = leaders
            .iter()
            .map(|l| l.load(Ordering::Relaxed) as u64)
            .sum();
        let beat = crate::placement::heartbeat(&client, &record).await;
        metrics::gauge!("tessera_placement_reachable").set(if beat.is_ok() { 1.0 } else { 0.0 });
        match beat {
            Ok(crate::placement::Beat::Written) => {}
            Ok(crate::placement::Beat::Removed) => {
                tracing::error!(
                    node = record.node_id,
                    "this node was removed from the cluster"
                );
                let _ = removed.send(true);
                return;
            }
            Err(e) => tracing::debug!(error = %e, "heartbeat not written"),
        }
        if let Ok(nodes) = crate::placement::node_records(&client).await {
            let now = crate::placement::now_ms();
            for n in nodes {
                let down = n.removed
                    || now.saturating_sub(n.last_heartbeat_ms) > down_after.as_millis() as u64;
                // Sleeping regions led from there do not notice by themselves. A loaded
                // placement region can delay heartbeats past the limit, and every false
                // alarm would wake thousands of regions into elections: confirm first.
                if down
                    && n.node_id != record.node_id
                    && !transport.probe(crate::ids::NodeId(n.node_id)).await
                {
                    router.node_down(
                        crate::ids::NodeId(n.node_id),
                        crate::raftstore::msg::Wake::PlacementNodeDown,
                    );
                }
                if !n.removed {
                    transport.set_address(crate::ids::NodeId(n.node_id), n.addr);
                }
            }
        }
    }
}
