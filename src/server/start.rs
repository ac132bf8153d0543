//! The steps of a node's start-up, in order: open the store, start the raft side, serve
//! gRPC, start the placement tasks. `Node::start` runs them.
//!
//! Invariants:
//! - every region's peer is registered with the router and queued to its worker before the
//!   workers start, and the workers run before gRPC serves: no request or raft message
//!   reaches a region that is not there yet;
//! - a node that ran before (it has a store identity) starts its peers refusing votes for
//!   an election timeout (see `raftstore::peer::lease`);
//! - the data directory is created here, not when the configuration is checked.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::{admin, compaction, heartbeat_loop, join_cluster, kv_service, node_service, reporter};
use super::{RaftService, StartError, REQUEST_TIMEOUT};
use crate::config::{Config, Member};
use crate::ids::RegionId;
use crate::placement::client::SystemClient;
use crate::placement::tso::{Oracle, TsoClient, TsoServer};
use crate::proto::NodeRecord;
use crate::proto::{
    kv_server::KvServer, node_server::NodeServer, raft_transport_server::RaftTransportServer,
};
use crate::raftstore::bootstrap;
use crate::raftstore::msg::{NewPeer, WorkerMsg};
use crate::raftstore::router::Router;
use crate::raftstore::store::StoreCtx;
use crate::raftstore::worker::{Worker, WorkerHooks};
use crate::storage::{Engine, EngineOptions, PeerStorage};
use crate::transport::tls::NodeTls;
use crate::transport::{Transport, MAX_GRPC_MESSAGE_BYTES};

/// The opened store and who the cluster's members are.
pub(super) struct Store {
    pub(super) engine: Engine,
    pub(super) members: Vec<Member>,
    /// The node's certificates (`None`: plaintext).
    pub(super) tls: Option<Arc<NodeTls>>,
    /// The store ran before (it has an identity).
    pub(super) restarted: bool,
}

/// Opens the store in `node.data_dir` (creating the directory); a node configured to join
/// joins first and learns its id and the members.
pub(super) async fn open_store(cfg: &mut Config) -> Result<Store, StartError> {
    let mut members = cfg.members()?;
    let tls = NodeTls::load(&cfg.security).map_err(StartError::Tls)?;
    cfg.prepare_data_dir()?;
    if let Some(dir) = crate::backup::restore::unfinished(&cfg.node.data_dir) {
        return Err(StartError::UnfinishedRestore(dir.display().to_string()));
    }
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
    // Peers of a node that ran before may have acknowledged a leader just before it died:
    // they refuse votes for a while (see raftstore/peer/lease.rs).
    let restarted = bootstrap::store_ident(&engine)?.is_some();
    if cfg.joining() {
        members = join_cluster(cfg, &engine, tls.as_ref()).await?;
    }
    Ok(Store {
        engine,
        members,
        tls,
        restarted,
    })
}

/// The raft side of a running node.
pub(super) struct Raft {
    pub(super) router: Router,
    pub(super) transport: Transport,
    pub(super) store: StoreCtx,
    pub(super) workers: Vec<JoinHandle<()>>,
    /// Regions each worker leads and lets sleep (read by the heartbeat and `Node`).
    pub(super) leaders: Vec<Arc<AtomicUsize>>,
    pub(super) asleep: Vec<Arc<AtomicUsize>>,
    /// The node's client of placement (system keyspace), connected on first use.
    pub(super) placement: SystemClient,
    /// The node's client of the timestamp oracle.
    pub(super) revisions: TsoClient,
    /// The oracle's serving side on this node.
    pub(super) oracle: crate::placement::tso::SharedTso,
    /// Wakes the lease keeper (a revocation is waiting).
    pub(super) lease_keeper: Arc<tokio::sync::Notify>,
    /// Whether writes are refused for lack of space (the NOSPACE alarm).
    pub(super) quota: super::quota::SpaceQuota,
    /// Who may do what (users and roles), once authentication is on.
    pub(super) gate: Arc<crate::auth::Gate>,
}

/// Regions whose leadership or descriptor changed, reported by the workers for the reporter.
pub(super) type Changes = tokio::sync::mpsc::UnboundedReceiver<RegionId>;

/// Router, transport and the workers, with a peer queued for every region in `region_ids`.
pub(super) fn start_raft(
    cfg: &Config,
    store: &Store,
    region_ids: &[RegionId],
) -> Result<(Raft, Changes), StartError> {
    let engine = &store.engine;
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
        Arc::new(router.clone()),
        tokio::runtime::Handle::current(),
        store.tls.clone(),
    );
    for m in &store.members {
        transport.set_address(m.id, m.addr.to_string());
    }
    let ctx = StoreCtx::new(
        cfg.node_id(),
        cfg.raft.clone(),
        crate::logging::raft_logger(),
        engine.clone(),
    );
    let election_timeout = cfg.raft.election_timeout();
    // Each worker says whether it could build each peer: a region whose stored state cannot
    // make one fails the start with an error naming it (not a stopped process later).
    let (built_tx, built) = std::sync::mpsc::channel();
    let mut storages = Vec::with_capacity(region_ids.len());
    for id in region_ids {
        storages.push(
            PeerStorage::open(engine.clone(), *id).map_err(|e| StartError::Region {
                region: *id,
                reason: e.to_string(),
            })?,
        );
    }
    let storages =
        crate::raftstore::bootstrap::end_merged_sources(engine, storages).map_err(|e| {
            StartError::Store {
                path: cfg.node.data_dir.display().to_string(),
                source: e,
            }
        })?;
    for storage in storages {
        let id = &storage.region_id();
        if storage.is_initialized() {
            let r = storage.region();
            ctx.set_range(*id, &r.start_key, &r.end_key);
        }
        let peer = NewPeer {
            refuse_votes_for: store.restarted.then_some(election_timeout),
            built: Some(built_tx.clone()),
            ..NewPeer::new(storage)
        };
        let w = router.worker_for(*id);
        router.register(*id, w);
        router.send_worker(w, WorkerMsg::AddPeer(Box::new(peer)));
    }
    let mut workers = Vec::new();
    let leaders: Vec<Arc<AtomicUsize>> = (0..cfg.raft.workers).map(|_| Arc::default()).collect();
    let asleep: Vec<Arc<AtomicUsize>> = (0..cfg.raft.workers).map(|_| Arc::default()).collect();
    let (changes_tx, changes) = tokio::sync::mpsc::unbounded_channel();
    let placement = SystemClient::new(transport.clone(), cfg.cluster.join.clone());
    let oracle = Arc::new(TsoServer::new(ctx.reader.clone(), placement.clone()));
    let tso_client = TsoClient::start(placement.clone(), oracle.clone());
    let revisions = Arc::new(tso_client.clone());
    for (i, inbox) in inboxes.into_iter().enumerate() {
        let w = Worker::new(
            i,
            inbox,
            engine.clone(),
            transport.clone(),
            router.clone(),
            ctx.clone(),
            &cfg.raft,
            cfg.storage.sync_writes,
            cfg.storage.record_cache_mb << 20,
            WorkerHooks {
                leaders: leaders[i].clone(),
                asleep: asleep[i].clone(),
                changes: changes_tx.clone(),
                revisions: revisions.clone(),
            },
        );
        workers.push(w.spawn().map_err(StartError::Thread)?);
    }
    drop(built_tx);
    for _ in region_ids {
        match built.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok((_, Ok(()))) => {}
            Ok((region, Err(reason))) => return Err(StartError::Region { region, reason }),
            Err(_) => {
                return Err(StartError::Region {
                    region: RegionId(0),
                    reason: "a raft worker did not build its peers within 60 s".into(),
                })
            }
        }
    }
    metrics::gauge!("tessera_node_regions").set(region_ids.len() as f64);
    let raft = Raft {
        router,
        transport,
        store: ctx,
        workers,
        leaders,
        asleep,
        placement,
        revisions: tso_client,
        oracle,
        lease_keeper: Default::default(),
        quota: Default::default(),
        gate: crate::auth::Gate::new(cfg.security.enabled(), cfg.security.token_ttl_secs),
    };
    Ok((raft, changes))
}

/// The gRPC server and what stops it.
pub(super) struct Grpc {
    pub(super) addr: std::net::SocketAddr,
    pub(super) server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    pub(super) stop: oneshot::Sender<()>,
    /// Tells the services the node is stopping.
    pub(super) stopping: tokio::sync::watch::Sender<bool>,
    pub(super) placement: SystemClient,
}

/// Serves the RaftTransport, Kv and Node services on `listener` (or `node.listen_addr`).
pub(super) async fn serve(
    cfg: &Config,
    listener: Option<TcpListener>,
    raft: &Raft,
) -> Result<Grpc, StartError> {
    let listen_err = |e: std::io::Error| StartError::Listen {
        addr: cfg.node.listen_addr.clone(),
        reason: e.to_string(),
    };
    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(&cfg.node.listen_addr)
            .await
            .map_err(listen_err)?,
    };
    let addr = listener.local_addr().map_err(listen_err)?;
    // One request, or one message of a `Commands` stream carrying many (the client sends a
    // request too large to share a message on its own, as a unary call).
    let max_msg = (cfg.server.max_value_size * 2 + cfg.server.max_key_size + (64 << 10))
        .max(tessera_api::limits::MAX_COMMANDS_MESSAGE_BYTES * 2);
    let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
    let raft_svc = RaftTransportServer::new(
        RaftService::new(
            cfg.cluster_id(),
            cfg.node_id(),
            raft.router.clone(),
            stopping_rx.clone(),
        )
        .with_store(raft.store.clone())
        .peers_only(raft.transport.node_tls().cloned()),
    )
    .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let placement = raft.placement.clone();
    let tso = raft.oracle.clone();
    let kv = KvServer::new(kv_service::KvService::new(
        raft.router.clone(),
        raft.transport.clone(),
        kv_service::KvSettings {
            limits: cfg.server.clone(),
            timeout: REQUEST_TIMEOUT,
            lease: cfg.lease.clone(),
            keeper: raft.lease_keeper.clone(),
            quota: raft.quota.clone(),
            gate: raft.gate.clone(),
        },
        &raft.store,
        Oracle {
            server: tso,
            client: raft.revisions.clone(),
            placement: placement.clone(),
        },
        stopping_rx,
    ))
    .max_decoding_message_size(max_msg)
    .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let node_svc = NodeServer::new(node_service::NodeService::new(
        cfg.cluster_id(),
        cfg.node_id(),
        raft.router.clone(),
        raft.transport.clone(),
        placement.clone(),
        Duration::from_millis(cfg.placement.node_down_after_ms),
        raft.gate.clone(),
    ));
    let auth_svc =
        crate::proto::auth_server::AuthServer::new(super::auth_service::AuthService::new(
            raft.gate.clone(),
            placement.clone(),
            raft.transport.clone(),
            cfg.security.password_iterations,
        ));
    let (stop, stop_rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(cfg.server.max_requests_per_connection)
        .add_service(raft_svc)
        .add_service(kv)
        .add_service(node_svc)
        .add_service(auth_svc);
    let stopped = async {
        let _ = stop_rx.await;
    };
    let server = match raft.transport.node_tls() {
        // TLS by the node's own acceptor, so that reloaded certificates serve the next
        // handshake.
        Some(tls) => tokio::spawn(
            router.serve_with_incoming_shutdown(tls.clone().incoming(listener), stopped),
        ),
        None => {
            // The builder's tcp_nodelay only covers listeners it binds itself; without it
            // small responses wait for delayed ACKs (~40 ms).
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |conn| {
                    if let Ok(c) = &conn {
                        let _ = c.set_nodelay(true);
                    }
                    conn
                },
            );
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    Ok(Grpc {
        addr,
        server,
        stop,
        stopping,
        placement,
    })
}

/// The node's background tasks.
pub(super) struct Tasks {
    pub(super) heartbeat: tokio::task::JoinHandle<()>,
    pub(super) scheduler: tokio::task::JoinHandle<()>,
    pub(super) reporter: tokio::task::JoinHandle<()>,
    pub(super) compaction: tokio::task::JoinHandle<()>,
    pub(super) resolver: tokio::task::JoinHandle<()>,
    pub(super) lease_keeper: tokio::task::JoinHandle<()>,
    /// Reads the certificates again on SIGHUP or a change (TLS nodes).
    pub(super) tls_reload: tokio::task::JoinHandle<()>,
    /// Measures the node's data against its space quota; follows the cluster's alarms.
    pub(super) quota: tokio::task::JoinHandle<()>,
    /// Keeps the node's copy of users and roles current.
    pub(super) auth_refresh: tokio::task::JoinHandle<()>,
    /// Turns true once placement has removed this node.
    pub(super) removed: tokio::sync::watch::Receiver<bool>,
}

/// Starts the heartbeat to placement, the scheduler (active on the placement leader's node)
/// and the region reporter.
/// Registers the metrics the dashboard and alert rules (`deploy/`) name but that a healthy
/// node may not have touched yet (drops, snapshots), so that they are exported as 0 rather
/// than missing.
fn register_metrics() {
    for name in [
        "tessera_raft_messages_dropped_total",
        "tessera_snapshots_sent_total",
        "tessera_snapshots_received_total",
        "tessera_snapshots_failed_total",
        "tessera_lease_expiries_total",
        "tessera_lease_revocations_total",
        "tessera_peer_calls_refused_total",
        "tessera_auth_denied_total",
        "tessera_auth_failures_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("tessera_watchers").increment(0.0);
    metrics::gauge!("tessera_placement_reachable").set(0.0);
    metrics::gauge!("tessera_alarm_no_space").set(0.0);
    metrics::gauge!("tessera_auth_enabled").set(0.0);
}

pub(super) fn spawn_tasks(
    cfg: &Config,
    engine: &Engine,
    raft: &Raft,
    placement: SystemClient,
    changes: Changes,
) -> Result<Tasks, StartError> {
    register_metrics();
    let (removed_tx, removed) = tokio::sync::watch::channel(false);
    let heartbeat = tokio::spawn(heartbeat_loop(
        placement.clone(),
        raft.router.clone(),
        raft.transport.clone(),
        raft.leaders.clone(),
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
            merges: crate::placement::scheduler::MergeLimits {
                below_keys: cfg.region.merge_below_keys,
                below_bytes: cfg.region.merge_below_bytes,
            },
        },
    ));
    let compaction = tokio::spawn(compaction::compaction_loop(
        engine.clone(),
        placement.clone(),
        raft.revisions.clone(),
        cfg.mvcc.auto_compaction()?,
    ));
    let resolver = tokio::spawn(super::resolver::resolve_loop(
        raft.store.hub.clone(),
        raft.router.clone(),
        raft.revisions.clone(),
        Duration::from_millis(cfg.mvcc.watch_resolve_interval_ms),
    ));
    let lease_keeper = tokio::spawn(super::lease_keeper::keep_loop(
        super::lease_keeper::Keeper {
            lessor: raft.store.lessor.clone(),
            router: raft.router.clone(),
            engine: engine.clone(),
            placement: placement.clone(),
            cfg: cfg.lease.clone(),
            wake: raft.lease_keeper.clone(),
        },
    ));
    let reporter = tokio::spawn(reporter::report_loop(
        placement.clone(),
        raft.router.clone(),
        engine.clone(),
        admin::SplitLimits {
            max_keys: cfg.region.max_keys,
            max_bytes: cfg.region.max_bytes,
        },
        changes,
        Duration::from_millis(cfg.placement.region_report_interval_ms),
    ));
    let tls_reload = tokio::spawn(crate::transport::tls::reload_loop(raft.transport.clone()));
    let auth_refresh = tokio::spawn(super::auth_service::refresh_loop(
        raft.gate.clone(),
        placement.clone(),
        Duration::from_millis(cfg.security.auth_refresh_ms),
    ));
    let quota = tokio::spawn(super::quota::quota_loop(
        engine.clone(),
        placement,
        cfg.node_id(),
        cfg.storage.quota_bytes,
        raft.quota.clone(),
        Duration::from_millis(cfg.placement.heartbeat_interval_ms),
    ));
    Ok(Tasks {
        heartbeat,
        scheduler,
        reporter,
        compaction,
        resolver,
        lease_keeper,
        tls_reload,
        quota,
        auth_refresh,
        removed,
    })
}
