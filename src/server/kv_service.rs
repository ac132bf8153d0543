//! The client KV API (`proto::Kv`).
//!
//! Each request names the region (and epoch) it was routed to. The service validates sizes,
//! hands the request to the region's worker through the router, and waits for the answer —
//! except a linearizable read that a leader lease vouches for, served here (`local_read`).
//! Routing problems come back as a structured `RegionError` inside a successful response, so
//! the client can fix its cache; only malformed requests (`InvalidArgument`) and unknown
//! outcomes (`Unavailable`, `DeadlineExceeded`) are gRPC errors.
//!
//! `Commands` carries the same gets, puts, deletes and compare-and-swaps multiplexed on one
//! stream per client connection (as TiKV's `BatchCommands`): a message holds whatever the
//! client had queued, the commands run concurrently, and each answer message holds whatever
//! had finished. A command's gRPC error travels as a `CommandError` in its own answer and
//! does not end the stream.
//!
//! Invariants:
//! - every key of a get, write or batch is checked before it reaches a region: not empty,
//!   within `max_key_size`, and no system key unless the header asks for system access;
//!   values, batch sizes and write ids are checked the same way; scan bounds for size and
//!   order, and (without system access) a scan may not start in the system keyspace;
//! - every wait for a region is bounded by the request timeout; a timeout or a dropped
//!   reply is an unknown outcome, never success or a region error;
//! - serializable reads never take the lease path; a linearizable read is served on the
//!   gRPC thread only when a published lease vouches for it (`local_read`);
//! - a scan returns at most `max_scan_limit` keys.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tonic::Status;

use crate::auth::{Caller, Gate};
use crate::config::ServerConfig;
use crate::ids::{NodeId, RegionId};
use crate::proto::{self, ReadConsistency, RequestHeader};
use crate::raftstore::cmd::{ApplyResult, CasAction, Command, Compare};
use crate::raftstore::local_read::{self, LocalReader};
use crate::raftstore::msg::{PeerMsg, ReadAnswer, ReadRequest, ReadResult, RegionError, Reply};
use crate::raftstore::router::{RouteError, Router};
use crate::storage::keys::is_system_key;
use crate::transport::Transport;

mod access;
mod commands;
mod grpc;
mod lease;
mod tso;
mod watch_stream;

/// The `Kv` gRPC service; its state is shared with the tasks that serve `Commands` streams.
#[derive(Clone)]
pub struct KvService {
    core: Arc<KvCore>,
}

pub struct KvCore {
    router: Router,
    transport: Transport,
    limits: ServerConfig,
    timeout: Duration,
    /// Lease reads served here, without the region's worker.
    local: LocalReader,
    /// The timestamp oracle (served where this node leads its region), the node's way to
    /// it (reads at a revision check it is not in the future) and the node's placement
    /// client (compaction is recorded there).
    oracle: crate::placement::tso::Oracle,
    /// Watchers of the regions led here.
    hub: crate::raftstore::hub::WatchHub,
    /// The leases of the lease regions led here, their settings, and the keeper that
    /// expires and revokes them (woken when a revocation is waiting).
    lessor: crate::raftstore::lessor::Lessor,
    lease_cfg: crate::config::LeaseConfig,
    keeper: Arc<tokio::sync::Notify>,
    /// Set when the node stops: `Commands` streams end (they would otherwise keep the
    /// node's state alive for as long as their clients stay connected).
    stopping: watch::Receiver<bool>,
    quota: crate::server::quota::SpaceQuota,
    /// Who may do what, once authentication is on.
    gate: Arc<Gate>,
}

/// The answer of a region: a value, or a routing error for the client.
type Routed<T> = Result<T, proto::RegionError>;

/// The service's settings.
pub struct KvSettings {
    pub limits: ServerConfig,
    /// How long a request may wait for its region.
    pub timeout: Duration,
    pub lease: crate::config::LeaseConfig,
    /// Wakes the node's lease keeper.
    pub keeper: Arc<tokio::sync::Notify>,
    /// Refuses writes while the cluster's NOSPACE alarm stands.
    pub quota: crate::server::quota::SpaceQuota,
    pub gate: Arc<Gate>,
}

impl KvService {
    pub fn new(
        router: Router,
        transport: Transport,
        settings: KvSettings,
        store: &crate::raftstore::store::StoreCtx,
        oracle: crate::placement::tso::Oracle,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            core: Arc::new(KvCore {
                router,
                transport,
                limits: settings.limits,
                timeout: settings.timeout,
                local: store.reader.clone(),
                oracle,
                hub: store.hub.clone(),
                lessor: store.lessor.clone(),
                lease_cfg: settings.lease,
                keeper: settings.keeper,
                quota: settings.quota,
                gate: settings.gate,
                stopping,
            }),
        }
    }
}

impl KvCore {
    fn region_error(&self, e: &RegionError) -> proto::RegionError {
        e.to_proto(|node| self.transport.address(NodeId(node)).unwrap_or_default())
    }

    /// A write that adds data: refused while the NOSPACE alarm stands.
    fn check_space(&self, header: Option<&RequestHeader>) -> Result<(), Status> {
        self.quota.check_write(header.is_some_and(|h| h.system))
    }

    fn check_key(&self, key: &[u8], header: Option<&RequestHeader>) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("key must not be empty"));
        }
        if crate::storage::keys::is_lease_key(key) {
            return Err(Status::invalid_argument(
                "the lease keyspace is written by lease requests only",
            ));
        }
        if is_system_key(key) && !header.is_some_and(|h| h.system) {
            return Err(Status::invalid_argument(
                "keys starting with byte 0xFF are reserved for placement data",
            ));
        }
        if key.len() > self.limits.max_key_size {
            return Err(Status::invalid_argument(format!(
                "key of {} bytes exceeds the limit of {} bytes",
                key.len(),
                self.limits.max_key_size
            )));
        }
        Ok(())
    }

    fn check_batch_len(&self, n: usize) -> Result<(), Status> {
        if n == 0 {
            return Err(Status::invalid_argument("batch names no keys"));
        }
        if n > self.limits.max_scan_limit as usize {
            return Err(Status::invalid_argument(format!(
                "batch of {n} keys exceeds the limit of {}",
                self.limits.max_scan_limit
            )));
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<(), Status> {
        if value.len() > self.limits.max_value_size {
            return Err(Status::invalid_argument(format!(
                "value of {} bytes exceeds the limit of {} bytes",
                value.len(),
                self.limits.max_value_size
            )));
        }
        Ok(())
    }

    async fn call<T>(
        &self,
        header: Option<RequestHeader>,
        make: impl FnOnce(proto::RegionEpoch, bool, Reply<T>) -> PeerMsg,
    ) -> Result<Routed<T>, Status> {
        let header = header.ok_or_else(|| Status::invalid_argument("request has no header"))?;
        let region = RegionId(header.region_id);
        let epoch = header.region_epoch.unwrap_or_default();
        let linearizable = header.consistency != ReadConsistency::Serializable as i32;
        let (tx, rx) = oneshot::channel();
        let msg = make(epoch, linearizable, tx);
        match self.router.send_client(region, msg) {
            Ok(()) => {}
            Err(RouteError::RegionNotFound(_)) => {
                return Ok(Err(self.region_error(&RegionError::RegionNotFound(region))))
            }
            Err(RouteError::Busy(_)) => {
                return Ok(Err(self.region_error(&RegionError::ServerBusy {
                    reason: "raft worker queue full".into(),
                })))
            }
            Err(RouteError::Closed(_)) => return Err(Status::unavailable("node is shutting down")),
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(Ok(v)),
            Ok(Ok(Err(e))) => Ok(Err(self.region_error(&e))),
            Ok(Err(_)) => Err(Status::unavailable(
                "result unknown: the request was dropped (node stopping or region changed)",
            )),
            Err(_) => Err(Status::deadline_exceeded(
                "result unknown: no answer within the request timeout",
            )),
        }
    }

    async fn propose(
        &self,
        header: Option<RequestHeader>,
        cmd: Command,
    ) -> Result<Routed<ApplyResult>, Status> {
        let write_id = header.as_ref().and_then(|h| h.write_id).map(Box::new);
        if let Some(w) = &write_id {
            check_write_id(w)?;
        }
        self.call(header, |epoch, _, reply| PeerMsg::Propose {
            cmd,
            epoch,
            write_id,
            reply,
        })
        .await
    }

    /// Reads the latest state (`at` = 0) or the state as of cluster revision `at`.
    async fn read(
        &self,
        header: Option<RequestHeader>,
        req: ReadRequest,
        at: u64,
    ) -> Result<Routed<ReadAnswer>, Status> {
        if at > 0 {
            if local_read::read_keys(&req).iter().any(|k| is_system_key(k)) {
                return Err(Status::invalid_argument(
                    "placement's system keys keep no history: read them without a revision",
                ));
            }
            self.check_not_future(at).await?;
            let compacted = self.local.engine().compacted_revision();
            if at < compacted {
                return Ok(Err(self.region_error(&RegionError::Compacted { compacted })));
            }
        } else if let Some(h) = header
            .as_ref()
            .filter(|h| h.consistency != ReadConsistency::Serializable as i32)
        {
            let epoch = h.region_epoch.unwrap_or_default();
            if let Some(res) = self.local.try_read(RegionId(h.region_id), &epoch, &req) {
                return Ok(res.map_err(|e| self.region_error(&e)));
            }
        }
        self.call(header, |epoch, linearizable, reply| PeerMsg::Read {
            req,
            epoch,
            linearizable,
            at,
            reply,
        })
        .await
    }
}

/// A write id the exactly-once records can work with (see `raftstore::session`).
fn check_write_id(w: &proto::WriteId) -> Result<(), Status> {
    if w.client_id == 0 || w.seq == 0 {
        return Err(Status::invalid_argument(
            "write_id needs a non-zero client_id and seq",
        ));
    }
    if w.first_incomplete > w.seq {
        return Err(Status::invalid_argument(
            "write_id.first_incomplete must not exceed seq",
        ));
    }
    Ok(())
}

fn unexpected<T>(what: &str) -> Result<T, Status> {
    Err(Status::internal(format!("unexpected {what} result")))
}

/// The requests themselves, shared by the unary calls and the `Commands` stream.
impl KvCore {
    async fn get(
        &self,
        r: proto::GetRequest,
        _caller: &Caller,
    ) -> Result<proto::GetResponse, Status> {
        self.check_key(&r.key, r.header.as_ref())?;
        let read = ReadRequest::Get { key: r.key };
        let resp = match self.read(r.header, read, r.revision).await? {
            Ok(ReadAnswer {
                result: ReadResult::Get(kv),
                revision,
            }) => proto::GetResponse {
                region_error: None,
                kv,
                revision,
            },
            Ok(_) => return unexpected("get"),
            Err(e) => proto::GetResponse {
                region_error: Some(e),
                ..Default::default()
            },
        };
        Ok(resp)
    }

    async fn put(
        &self,
        r: proto::PutRequest,
        _caller: &Caller,
    ) -> Result<proto::PutResponse, Status> {
        self.check_key(&r.key, r.header.as_ref())?;
        self.check_value(&r.value)?;
        self.check_space(r.header.as_ref())?;
        if busy_for_testing(&r.key) {
            return Ok(proto::PutResponse {
                region_error: Some(self.region_error(&RegionError::ServerBusy {
                    reason: "fail point kv_put_busy".into(),
                })),
                ..Default::default()
            });
        }
        let lease = match r.lease {
            0 => None,
            id => match self.attach(id, &r.key).await? {
                Ok(a) => Some(a),
                Err(e) => {
                    return Ok(proto::PutResponse {
                        region_error: Some(e),
                        ..Default::default()
                    })
                }
            },
        };
        let cmd = Command::Put {
            key: r.key,
            value: r.value,
            lease,
        };
        let resp = match self.propose(r.header, cmd).await? {
            Ok(ApplyResult::Put { prev, revision }) => proto::PutResponse {
                region_error: None,
                prev_kv: prev,
                revision,
            },
            Ok(_) => return unexpected("put"),
            Err(e) => proto::PutResponse {
                region_error: Some(e),
                ..Default::default()
            },
        };
        Ok(resp)
    }

    async fn delete(
        &self,
        r: proto::DeleteRequest,
        _caller: &Caller,
    ) -> Result<proto::DeleteResponse, Status> {
        self.check_key(&r.key, r.header.as_ref())?;
        let resp = match self
            .propose(r.header, Command::Delete { key: r.key })
            .await?
        {
            Ok(ApplyResult::Delete { prev, revision }) => proto::DeleteResponse {
                region_error: None,
                prev_kv: prev,
                revision,
            },
            Ok(_) => return unexpected("delete"),
            Err(e) => proto::DeleteResponse {
                region_error: Some(e),
                ..Default::default()
            },
        };
        Ok(resp)
    }

    async fn scan(
        &self,
        r: proto::ScanRequest,
        _caller: &Caller,
    ) -> Result<proto::ScanResponse, Status> {
        if r.start_key.len() > self.limits.max_key_size
            || r.end_key.len() > self.limits.max_key_size
        {
            return Err(Status::invalid_argument(
                "scan bound exceeds the key size limit",
            ));
        }
        if !r.end_key.is_empty() && r.end_key <= r.start_key {
            return Err(Status::invalid_argument(
                "scan end_key must be after start_key",
            ));
        }
        // The system keyspace is [0xFF, +inf), held by the placement region: a scan is served
        // from [start, end) clipped to the region it was routed to, so it reads system keys
        // only when it starts there.
        let system = r.header.as_ref().is_some_and(|h| h.system);
        if !system && is_system_key(&r.start_key) {
            return Err(Status::invalid_argument(
                "a scan may not reach the keys starting with byte 0xFF (placement data)",
            ));
        }
        let max = self.limits.max_scan_limit as usize;
        let limit = if r.limit == 0 {
            max
        } else {
            (r.limit as usize).min(max)
        };
        let req = ReadRequest::Scan {
            start: r.start_key,
            end: r.end_key,
            limit,
            keys_only: r.keys_only,
        };
        let resp = match self.read(r.header, req, r.revision).await? {
            Ok(ReadAnswer {
                result: ReadResult::Scan { kvs, more },
                revision,
            }) => proto::ScanResponse {
                region_error: None,
                kvs,
                more,
                revision,
            },
            Ok(_) => return unexpected("scan"),
            Err(e) => proto::ScanResponse {
                region_error: Some(e),
                ..Default::default()
            },
        };
        Ok(resp)
    }

    async fn compare_and_swap(
        &self,
        r: proto::CasRequest,
        _caller: &Caller,
    ) -> Result<proto::CasResponse, Status> {
        self.check_key(&r.key, r.header.as_ref())?;
        let compare = Compare::from_proto(r.compare.as_ref())
            .ok_or_else(|| Status::invalid_argument("compare-and-swap has no comparison"))?;
        if let Compare::Value(v) = &compare {
            self.check_value(v)?;
        }
        let action = match r.action {
            Some(proto::cas_request::Action::Put(v)) => {
                self.check_value(&v)?;
                self.check_space(r.header.as_ref())?;
                CasAction::Put(v)
            }
            Some(proto::cas_request::Action::Delete(_)) => CasAction::Delete,
            None => return Err(Status::invalid_argument("compare-and-swap has no action")),
        };
        let lease = match (r.lease, &action) {
            (0, _) | (_, CasAction::Delete) => None,
            (id, CasAction::Put(_)) => match self.attach(id, &r.key).await? {
                Ok(a) => Some(a),
                Err(e) => {
                    return Ok(proto::CasResponse {
                        region_error: Some(e),
                        ..Default::default()
                    })
                }
            },
        };
        let cmd = Command::CompareAndSwap {
            key: r.key,
            compare,
            action,
            lease,
        };
        let resp = match self.propose(r.header, cmd).await? {
            Ok(ApplyResult::Cas {
                succeeded,
                prev,
                revision,
            }) => proto::CasResponse {
                region_error: None,
                succeeded,
                prev_kv: prev,
                revision,
            },
            Ok(_) => return unexpected("compare-and-swap"),
            Err(e) => proto::CasResponse {
                region_error: Some(e),
                ..Default::default()
            },
        };
        Ok(resp)
    }

    async fn batch_get(
        &self,
        r: proto::BatchGetRequest,
        _caller: &Caller,
    ) -> Result<proto::BatchGetResponse, Status> {
        self.check_batch_len(r.keys.len())?;
        for k in &r.keys {
            self.check_key(k, r.header.as_ref())?;
        }
        let resp = match self
            .read(r.header, ReadRequest::BatchGet { keys: r.keys }, 0)
            .await?
        {
            Ok(ReadAnswer {
                result: ReadResult::BatchGet(kvs),
                revision,
            }) => proto::BatchGetResponse {
                region_error: None,
                kvs: kvs.into_iter().map(Option::unwrap_or_default).collect(),
                revision,
            },
            Ok(_) => return unexpected("batch get"),
            Err(e) => proto::BatchGetResponse {
                region_error: Some(e),
                ..Default::default()
            },
        };
        Ok(resp)
    }

    async fn batch_write(
        &self,
        r: proto::BatchWriteRequest,
        _caller: &Caller,
    ) -> Result<proto::BatchWriteResponse, Status> {
        self.check_batch_len(r.ops.len())?;
        let (mut total, mut keys) = (0usize, std::collections::HashSet::new());
        for op in &r.ops {
            self.check_key(&op.key, r.header.as_ref())?;
            // One change per key and revision, as history and watchers see it (etcd too).
            if !keys.insert(op.key.as_slice()) {
                return Err(Status::invalid_argument("a batch names a key twice"));
            }
            if let Some(v) = &op.value {
                self.check_value(v)?;
                self.check_space(r.header.as_ref())?;
                total += v.len();
            }
        }
        if total > self.limits.max_value_size {
            return Err(Status::invalid_argument(format!(
                "batch of {total} value bytes exceeds the limit of {} bytes",
                self.limits.max_value_size
            )));
        }
        let cmd = Command::Batch(r.ops.into_iter().map(|o| (o.key, o.value)).collect());
        let resp = match self.propose(r.header, cmd).await? {
            Ok(ApplyResult::Batch { revision, .. }) => proto::BatchWriteResponse {
                region_error: None,
                revision,
            },
            Ok(_) => return unexpected("batch write"),
            Err(e) => proto::BatchWriteResponse {
                region_error: Some(e),
                revision: 0,
            },
        };
        Ok(resp)
    }
}

/// Test builds only: fail point `kv_put_busy` with the key as its argument answers puts of
/// that key `ServerBusy` (nothing proposed), to test how clients take a transient refusal.
#[cfg(feature = "failpoints")]
fn busy_for_testing(key: &[u8]) -> bool {
    fail::eval("kv_put_busy", |arg| {
        arg.is_some_and(|k| k.as_bytes() == key)
    }) == Some(true)
}

#[cfg(not(feature = "failpoints"))]
fn busy_for_testing(_key: &[u8]) -> bool {
    false
}
