//! A running node: store, raft workers, transport and gRPC services, started and stopped
//! together.
//!
//! Start-up order: open RocksDB → bootstrap or check the store → load regions → start the
//! raft workers with their peers → serve gRPC. Shutdown reverses it: stop accepting, let
//! each worker finish its round, flush and close the DB.

pub mod admin;
pub mod kv_service;
pub mod node_service;
pub mod raft_service;
pub mod reporter;

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
use crate::proto::{
    kv_server::KvServer, node_server::NodeServer, raft_transport_server::RaftTransportServer,
};
use crate::raftstore::bootstrap::{self, BootstrapError};
use crate::raftstore::msg::{NewPeer, WorkerMsg};
use crate::raftstore::router::Router;
use crate::raftstore::worker::{Worker, WorkerHooks};
use crate::storage::{Engine, EngineOptions, PeerStorage};
use crate::transport::{Transport, MAX_GRPC_MESSAGE_BYTES};
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
    scheduler: tokio::task::JoinHandle<()>,
    removed: tokio::sync::watch::Receiver<bool>,
    asleep: Vec<Arc<AtomicUsize>>,
    server: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Node {
    /// Starts a node. With `listener` the gRPC server uses it (tests bind `127.0.0.1:0`
    /// first); otherwise it binds `node.listen_addr`. Must run inside a tokio runtime.
    pub async fn start(mut cfg: Config, listener: Option<TcpListener>) -> Result<Node, StartError> {
        let mut members = cfg.members()?;
        cfg.prepare_data_dir()?;
        let db_path = cfg.node.data_dir.join("db");
        let engine = Engine::open(
            &db_path,
            &EngineOptions {
                block_cache_bytes: cfg.storage.block_cache_mb << 20,
                data_memtable_bytes: cfg.storage.data_memtable_mb << 20,
                ..Default::default()
            },
        )
        .map_err(|source| StartError::Store {
            path: db_path.display().to_string(),
            source,
        })?;
        // Peers of a node that ran before may have acknowledged a leader just before it
        // died: they refuse votes for a while (see raftstore/peer/lease.rs).
        let restarted = bootstrap::store_ident(&engine)?.is_some();
        if cfg.joining() {
            members = join_cluster(&mut cfg, &engine).await?;
        }
        let region_ids = bootstrap::prepare_store(
            &engine,
            cfg.cluster_id(),
            cfg.node_id(),
            &members,
            &cfg.initial_split_keys(),
            cfg.cluster.replicas,
        )?;

        let mut inboxes = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..cfg.raft.workers {
            let (tx, rx) = crossbeam_channel::unbounded();
            senders.push(tx);
            inboxes.push(rx);
        }
        let router = Router::new(senders);
        let transport = Transport::new(
            cfg.cluster_id(),
            cfg.node_id(),
            std::sync::Arc::new(router.clone()),
            tokio::runtime::Handle::current(),
        );
        for m in &members {
            transport.set_address(m.id, m.addr.to_string());
        }

        let store = crate::raftstore::store::StoreCtx::new(
            cfg.node_id(),
            cfg.raft.clone(),
            crate::logging::raft_logger(),
            engine.clone(),
        );
        let election_timeout = cfg.raft.election_timeout();
        for id in &region_ids {
            let storage =
                PeerStorage::open(engine.clone(), *id).map_err(|e| StartError::Region {
                    region: *id,
                    reason: e.to_string(),
                })?;
            if storage.is_initialized() {
                let r = storage.region();
                store.set_range(*id, &r.start_key, &r.end_key);
            }
            let peer = NewPeer {
                refuse_votes_for: restarted.then_some(election_timeout),
                ..NewPeer::new(storage)
            };
            let w = router.worker_for(*id);
            router.register(*id, w);
            router.send_worker(w, WorkerMsg::AddPeer(Box::new(peer)));
        }
        let mut workers = Vec::new();
        let leaders: Vec<Arc<AtomicUsize>> =
            (0..cfg.raft.workers).map(|_| Arc::default()).collect();
        let asleep: Vec<Arc<AtomicUsize>> = (0..cfg.raft.workers).map(|_| Arc::default()).collect();
        let (changes_tx, changes_rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, inbox) in inboxes.into_iter().enumerate() {
            let w = Worker::new(
                i,
                inbox,
                engine.clone(),
                transport.clone(),
                router.clone(),
                store.clone(),
                &cfg.raft,
                cfg.storage.sync_writes,
                cfg.storage.record_cache_mb << 20,
                WorkerHooks {
                    leaders: leaders[i].clone(),
                    asleep: asleep[i].clone(),
                    changes: changes_tx.clone(),
                },
            );
            workers.push(w.spawn().map_err(StartError::Thread)?);
        }
        metrics::gauge!("tessera_node_regions").set(region_ids.len() as f64);

        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(&cfg.node.listen_addr)
                .await
                .map_err(|e| StartError::Listen {
                    addr: cfg.node.listen_addr.clone(),
                    reason: e.to_string(),
                })?,
        };
        let addr = listener.local_addr().map_err(|e| StartError::Listen {
            addr: cfg.node.listen_addr.clone(),
            reason: e.to_string(),
        })?;
        // One request, or one message of a `Commands` stream carrying many (the client
        // sends a request too large to share a message on its own, as a unary call).
        let max_msg = (cfg.server.max_value_size * 2 + cfg.server.max_key_size + (64 << 10))
            .max(tessera_api::limits::MAX_COMMANDS_MESSAGE_BYTES * 2);
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let raft = RaftTransportServer::new(
            RaftService::new(
                cfg.cluster_id(),
                cfg.node_id(),
                router.clone(),
                stopping_rx.clone(),
            )
            .with_store(store.clone()),
        )
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        let kv = KvServer::new(kv_service::KvService::new(
            router.clone(),
            transport.clone(),
            cfg.server.clone(),
            REQUEST_TIMEOUT,
            store.reader.clone(),
            stopping_rx,
        ))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        let placement = crate::placement::client::SystemClient::new(
            transport.clone(),
            cfg.cluster.join.clone(),
        );
        let node_svc = NodeServer::new(node_service::NodeService::new(
            cfg.cluster_id(),
            cfg.node_id(),
            router.clone(),
            transport.clone(),
            placement.clone(),
            Duration::from_millis(cfg.placement.node_down_after_ms),
        ));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        // The builder's tcp_nodelay only covers listeners it binds itself; without it small
        // responses wait for delayed ACKs (~40 ms).
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            |conn| {
                if let Ok(c) = &conn {
                    let _ = c.set_nodelay(true);
                }
                conn
            },
        );
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(raft)
                .add_service(kv)
                .add_service(node_svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                }),
        );
        let (removed_tx, removed) = tokio::sync::watch::channel(false);
        let heartbeat = tokio::spawn(heartbeat_loop(
            placement.clone(),
            router.clone(),
            transport.clone(),
            leaders,
            NodeRecord {
                node_id: cfg.node.id,
                addr: cfg.advertise_addr()?.to_string(),
                ..Default::default()
            },
            Duration::from_millis(cfg.placement.heartbeat_interval_ms),
            Duration::from_millis(cfg.placement.node_down_after_ms),
            removed_tx,
        ));
        let scheduler = tokio::spawn(crate::placement::scheduler::schedule_loop(
            placement.clone(),
            cfg.node_id(),
            crate::placement::scheduler::SchedulerConfig {
                enabled: cfg.placement.schedule,
                interval: Duration::from_millis(cfg.placement.schedule_interval_ms),
                replicas: cfg.cluster.replicas as usize,
                down_after: Duration::from_millis(cfg.placement.node_down_after_ms),
                replace_after: Duration::from_millis(cfg.placement.replace_down_after_ms),
                max_moves: cfg.placement.max_concurrent_moves,
            },
        ));
        let reporter = tokio::spawn(reporter::report_loop(
            placement,
            router.clone(),
            engine.clone(),
            admin::SplitLimits {
                max_keys: cfg.region.max_keys,
                max_bytes: cfg.region.max_bytes,
            },
            changes_rx,
            Duration::from_millis(cfg.placement.region_report_interval_ms),
        ));
        tracing::info!(node = %cfg.node_id(), %addr, regions = region_ids.len(), "node started");
        Ok(Node {
            addr,
            engine,
            router,
            transport,
            workers,
            stop_server: Some(stop_tx),
            stopping,
            heartbeat,
            reporter,
            scheduler,
            removed,
            asleep,
            server: Some(server),
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
        self.scheduler.abort();
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
        let channel = match tonic::transport::Endpoint::from_shared(format!("http://{seed}")) {
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
                last = format!("{seed}: {e}");
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
        match crate::placement::heartbeat(&client, &record).await {
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
