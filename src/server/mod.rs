//! A running node: store, raft workers, transport and gRPC services, started and stopped
//! together.
//!
//! Start-up order: open RocksDB → bootstrap or check the store → load regions → start the
//! raft workers with their peers → serve gRPC. Shutdown reverses it: stop accepting, let
//! each worker finish its round, flush and close the DB.

pub mod kv_service;
pub mod node_service;

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
use crate::raftstore::msg::WorkerMsg;
use crate::raftstore::peer::Peer;
use crate::raftstore::router::Router;
use crate::raftstore::worker::Worker;
use crate::storage::{Engine, EngineOptions, PeerStorage};
use crate::transport::{service::RaftService, Transport, MAX_GRPC_MESSAGE_BYTES};

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
    server: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Node {
    /// Starts a node. With `listener` the gRPC server uses it (tests bind `127.0.0.1:0`
    /// first); otherwise it binds `node.listen_addr`. Must run inside a tokio runtime.
    pub async fn start(cfg: Config, listener: Option<TcpListener>) -> Result<Node, StartError> {
        let members = cfg.members()?;
        let db_path = cfg.node.data_dir.join("db");
        let engine = Engine::open(
            &db_path,
            &EngineOptions {
                block_cache_bytes: cfg.storage.block_cache_mb << 20,
                ..Default::default()
            },
        )
        .map_err(|source| StartError::Store {
            path: db_path.display().to_string(),
            source,
        })?;
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
            router.clone(),
            tokio::runtime::Handle::current(),
        );
        for m in &members {
            transport.set_address(m.id, m.addr.to_string());
        }

        let logger = crate::logging::raft_logger();
        for id in &region_ids {
            let storage =
                PeerStorage::open(engine.clone(), *id).map_err(|e| StartError::Region {
                    region: *id,
                    reason: e.to_string(),
                })?;
            let peer = Peer::new(storage, cfg.node_id(), &cfg.raft, &logger).map_err(|reason| {
                StartError::Region {
                    region: *id,
                    reason,
                }
            })?;
            let w = router.worker_for(*id);
            router.register(*id, w);
            router.send_worker(w, WorkerMsg::AddPeer(Box::new(peer)));
        }
        let mut workers = Vec::new();
        let leaders: Vec<Arc<AtomicUsize>> =
            (0..cfg.raft.workers).map(|_| Arc::default()).collect();
        for (i, inbox) in inboxes.into_iter().enumerate() {
            let w = Worker::new(
                i,
                inbox,
                engine.clone(),
                transport.clone(),
                Duration::from_millis(cfg.raft.tick_interval_ms),
                cfg.storage.sync_writes,
                leaders[i].clone(),
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
        let max_msg = cfg.server.max_value_size * 2 + cfg.server.max_key_size + (64 << 10);
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let raft = RaftTransportServer::new(RaftService::new(
            cfg.cluster_id(),
            cfg.node_id(),
            router.clone(),
            stopping_rx,
        ))
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        let kv = KvServer::new(kv_service::KvService::new(
            router.clone(),
            transport.clone(),
            cfg.server.clone(),
            REQUEST_TIMEOUT,
        ))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        let placement = node_service::SystemClient::new(transport.clone());
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
        let heartbeat = tokio::spawn(heartbeat_loop(
            placement,
            router.clone(),
            leaders,
            NodeRecord {
                node_id: cfg.node.id,
                addr: cfg.advertise_addr()?.to_string(),
                ..Default::default()
            },
            Duration::from_millis(cfg.placement.heartbeat_interval_ms),
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

    /// Stops accepting requests, lets every worker finish its round, then flushes the store.
    pub async fn shutdown(mut self) {
        self.heartbeat.abort();
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

/// Writes this node's registry record into the placement region every `interval`, with its
/// region and leader counts. Failures (placement region without a leader yet, a partition)
/// are logged and retried on the next beat.
async fn heartbeat_loop(
    placement: node_service::SystemClient,
    router: Router,
    leaders: Vec<Arc<AtomicUsize>>,
    mut record: NodeRecord,
    interval: Duration,
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
        if let Err(e) = crate::placement::heartbeat(&client, &record).await {
            tracing::debug!(error = %e, "heartbeat not written");
        }
    }
}
