//! The Rust client of tessera: routes every key to its region and leader, and hides region
//! changes. A crate of its own that depends on the wire types (`tessera-api`), tonic and
//! tokio only, so an application that embeds it builds no storage engine or consensus.
//!
//! The client keeps a [region cache](cache::RegionCache) by start key. Each request goes to
//! the cached leader of the key's region with the region's id and epoch. On a structured
//! region error it fixes the cache — from the error's payload where there is one (the new
//! leader, the current regions) — and retries with bounded, jittered backoff until an overall
//! deadline. Callers see data or a typed [`Error`], never a routing error.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tessera_client::Error> {
//! use tessera_client::{Client, ClientOptions};
//!
//! let client = Client::connect(&["127.0.0.1:20161".to_string()], ClientOptions::default()).await?;
//! client.put(b"/nodes/n1", b"10.0.0.1:9092").await?;
//! let kv = client.get(b"/nodes/n1").await?.expect("just written");
//! assert_eq!(kv.value, b"10.0.0.1:9092");
//! // Create-if-absent: only one of several racing callers wins.
//! let won = client.create(b"/leader", b"me").await?;
//! for kv in client.scan(b"/nodes/", b"/nodes0", 100).await? {
//!     println!("{:?}", kv.key);
//! }
//! // Several keys at once: one request per region, regions in parallel.
//! client
//!     .batch_write(&[
//!         (b"/topics/a".to_vec(), Some(b"3 partitions".to_vec())),
//!         (b"/topics/b".to_vec(), Some(b"6 partitions".to_vec())),
//!         (b"/topics/old".to_vec(), None), // delete
//!     ])
//!     .await?;
//! let got = client.batch_get(&[b"/topics/a".to_vec(), b"/topics/old".to_vec()]).await?;
//! assert!(got[0].is_some() && got[1].is_none());
//! // Where things are: the routing table with leaders and load, the cluster at a glance.
//! for route in client.routes().await? {
//!     let region = route.region.unwrap_or_default();
//!     println!("region {} leader {:?}", region.id, route.leader.map(|l| l.node_id));
//! }
//! let status = client.status().await?;
//! println!("{} regions, {} without a leader", status.regions, status.regions_without_leader);
//! # let _ = won; Ok(()) }
//! ```
//!
//! Errors: [`Error::InvalidArgument`] for requests the cluster refuses as malformed (empty or
//! oversize key, reserved key), [`Error::Unknown`] when a write's deadline passed after an
//! attempt whose outcome is unknown, [`Error::Deadline`] when routing problems outlasted
//! [`ClientOptions::deadline`], [`Error::Unavailable`] when no node answered,
//! [`Error::Refused`] for a request the cluster refused as it stands (a move to where the
//! replica already is), [`Error::Server`] for any other error the server answered with.
//!
//! Retries and exactly-once writes: every write (put, delete, compare-and-swap, each
//! region's part of a batch) carries a write id — this client's random id and the write's
//! number — that stays the same across its retries, and each region remembers the answers
//! of the ids it applied. So the client retries every write after any failure, even one
//! that may have reached the cluster (connection lost mid-request, timeout): a write that
//! already applied is answered with its first answer and applied nothing more. Writes are
//! linearizable with retries on, and [`Error::Unknown`] comes only when the deadline runs
//! out.
//!
//! Invariants:
//! - every attempt of one write carries the same write id, taken once per call
//!   (`write_id`);
//! - once an attempt of a write may have executed, the call ends in success or
//!   [`Error::Unknown`], never in another error (`retry`);
//! - the region cache's lock is never held across an `.await`;
//! - `scan` returns keys in order, at most `limit` of them; an answer that says more keys
//!   follow without moving past the cursor is an error, never a loop; without
//!   `ClientOptions::system` an open-ended scan stops where the system keyspace begins.

pub mod auth;
mod batch;
pub mod cache;
mod cluster;
pub mod concurrency;
mod keepalive;
mod lease;
mod mux;
mod mvcc;
mod retry;
pub mod tls;
mod tso;
mod watch;
mod write_id;

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::proto::kv_client::KvClient;
use crate::proto::node_client::NodeClient;
use crate::proto::{KeyValue, NodeAddress, ReadConsistency, RegionsRequest, RequestHeader};
use cache::{CachedRegion, RegionCache};
use mux::Conn;
use retry::{Attempt, Mode};
use tessera_api::keys::is_system_key;
use write_id::WriteIds;

pub use auth::Credentials;
pub use cluster::Health;
pub use keepalive::KeepAlive;
pub use lease::{LeaseStatus, MAX_LEASE_TTL, MIN_LEASE_TTL};
pub use tessera_api::limits::MAX_COMMANDS_MESSAGE_BYTES;
pub use tessera_api::{ids, proto};
pub use tls::TlsOptions;
pub use watch::{Event, EventKind, WatchOptions, WatchResponse, Watcher};

pub use tessera_api::kv::{CasAction, Compare};

/// The addresses in a comma-separated list (`host:port,host:port`), trimmed, empty ones
/// dropped: how endpoints are given on command lines and in configuration.
pub fn endpoint_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no node reachable: {0}")]
    Unavailable(String),
    #[error("gave up after {attempts} attempts in {elapsed:?}: {last}")]
    Deadline {
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A write whose outcome cannot be known (the connection broke after sending it).
    #[error("result unknown: {0}")]
    Unknown(String),
    #[error("server error: {0}")]
    Server(String),
    #[error("not found: {0}")]
    NotFound(String),
    /// The cluster refused the request as it stands (for example a join from an address
    /// another node holds).
    #[error("refused: {0}")]
    Refused(String),
    /// A read (or watch) below the revision the cluster's history is compacted at.
    #[error("revision compacted: history starts at revision {compact_revision}")]
    Compacted { compact_revision: u64 },
    /// A write refused because the cluster's NOSPACE alarm stands (a node's data passed its
    /// space quota); reads and deletes are still served.
    #[error("{0}")]
    QuotaExceeded(String),
    /// The caller is not logged in, or its login failed (wrong user name or password, or
    /// a token the cluster no longer accepts).
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller's user may not do this (outside its roles' permissions, or an
    /// administrative call without the root role or a certificate of the cluster CA).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Overall time a call may take, retries included.
    pub deadline: Duration,
    /// Time for one RPC attempt.
    pub rpc_timeout: Duration,
    /// Consistency of `get` and `scan`.
    pub consistency: ReadConsistency,
    /// Access to the system keyspace (keys starting with 0xFF: placement data). For
    /// tessera's own placement code; user clients leave it off.
    pub system: bool,
    /// Send gets, puts, deletes and compare-and-swaps of all callers multiplexed on one
    /// stream per node (`Kv.Commands`), as TiKV's client does, rather than one unary call
    /// each. Same answers and errors; far less CPU per request on both sides under load.
    pub multiplex: bool,
    /// TLS to the nodes (`None`: plaintext).
    pub tls: Option<TlsOptions>,
    /// Log in as this user (clusters with authentication on).
    pub credentials: Option<Credentials>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(30),
            rpc_timeout: Duration::from_secs(12),
            consistency: ReadConsistency::Linearizable,
            system: false,
            multiplex: true,
            tls: None,
            credentials: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct WriteResult {
    pub prev: Option<KeyValue>,
    pub revision: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CasResult {
    pub succeeded: bool,
    pub prev: Option<KeyValue>,
    pub revision: u64,
}

/// Counters of what the client had to do behind the caller's back.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub retries: std::sync::atomic::AtomicU64,
    pub region_errors: std::sync::atomic::AtomicU64,
    pub rpc_errors: std::sync::atomic::AtomicU64,
    pub cache_refreshes: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    opts: ClientOptions,
    channels: DashMap<String, Conn>,
    nodes: DashMap<u64, String>,
    cache: RwLock<RegionCache>,
    stats: ClientStats,
    /// Nodes that recently failed an RPC (refused, reset, timed out), until when: tried last
    /// when choosing among a region's peers. A paused or overloaded node still accepts
    /// connections, and each attempt on it costs a whole RPC timeout.
    suspects: DashMap<u64, Instant>,
    /// This client's write ids (exactly-once writes).
    writes: WriteIds,
    /// One watch stream per node address, shared by all watches.
    watch_muxes: DashMap<String, watch::Mux>,
    /// The leases kept alive through this client.
    keepalives: keepalive::KeepAlives,
    /// The login token every call carries (when logged in).
    token: auth::Token,
}

impl Client {
    /// Connects to any of `endpoints` (`host:port`) and loads the region map.
    pub async fn connect(endpoints: &[String], opts: ClientOptions) -> Result<Client> {
        if endpoints.is_empty() {
            return Err(Error::InvalidArgument("no endpoints given".into()));
        }
        let c = Client {
            inner: Arc::new(Inner {
                endpoints: endpoints.to_vec(),
                opts,
                channels: DashMap::new(),
                nodes: DashMap::new(),
                cache: RwLock::new(RegionCache::default()),
                stats: ClientStats::default(),
                suspects: DashMap::new(),
                writes: WriteIds::new(),
                watch_muxes: DashMap::new(),
                keepalives: Default::default(),
                token: Default::default(),
            }),
        };
        let ttl = c.login().await?;
        c.keep_logged_in(ttl);
        if c.inner.opts.system || c.load_routes(&[], 0).await.is_err() {
            c.refresh().await?;
        }
        Ok(c)
    }

    fn kv(ch: auth::Ch) -> KvClient<auth::Ch> {
        KvClient::new(ch).max_decoding_message_size(tessera_api::limits::MAX_GRPC_MESSAGE_BYTES)
    }

    /// The endpoints given at connect time, then every node learnt since.
    fn node_addrs(&self) -> Vec<String> {
        let mut addrs: Vec<String> = self.inner.endpoints.clone();
        for e in self.inner.nodes.iter() {
            if !addrs.contains(e.value()) {
                addrs.push(e.value().clone());
            }
        }
        addrs
    }

    fn learn_nodes(&self, nodes: Vec<NodeAddress>) {
        for n in nodes {
            self.inner.nodes.insert(n.node_id, n.addr);
        }
    }

    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    async fn channel(&self, addr: &str) -> std::result::Result<Conn, String> {
        if let Some(c) = self.inner.channels.get(addr) {
            return Ok(c.clone());
        }
        let ch = tls::endpoint(addr, self.inner.opts.tls.as_ref())?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .timeout(self.inner.opts.rpc_timeout)
            .connect()
            .await
            .map_err(|e| tls::connect_error(addr, self.inner.opts.tls.is_some(), &e))?;
        let ch = tonic::service::interceptor::InterceptedService::new(ch, self.inner.token.clone());
        let conn = Conn::new(ch, self.inner.opts.multiplex, self.inner.opts.rpc_timeout);
        self.inner.channels.insert(addr.to_string(), conn.clone());
        Ok(conn)
    }

    fn forget_channel(&self, addr: &str) {
        // A connection kept only for what it learnt: that the server has no command stream.
        self.inner.channels.remove_if(addr, |_, c| !c.unary_only());
    }

    /// Reloads the region map from every reachable node.
    pub async fn refresh(&self) -> Result<()> {
        self.inner
            .stats
            .cache_refreshes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let addrs = self.node_addrs();
        let mut last_err = String::from("no endpoint answered");
        let mut any = false;
        let mut infos = Vec::new();
        for addr in addrs {
            let ch = match self.channel(&addr).await {
                Ok(c) => c.ch,
                Err(e) => {
                    last_err = e;
                    continue;
                }
            };
            match NodeClient::new(ch).regions(RegionsRequest {}).await {
                Ok(resp) => {
                    any = true;
                    let resp = resp.into_inner();
                    for n in resp.nodes {
                        self.inner.nodes.insert(n.node_id, n.addr);
                    }
                    infos.extend(resp.regions);
                }
                // Every node would say the same.
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    return Err(Error::Unauthenticated(s.message().into()))
                }
                Err(s) if s.code() == tonic::Code::PermissionDenied => {
                    return Err(Error::PermissionDenied(s.message().into()))
                }
                Err(s) => {
                    self.forget_channel(&addr);
                    last_err = status_text(&addr, self.inner.opts.tls.is_some(), &s);
                }
            }
        }
        if !any {
            return Err(Error::Unavailable(last_err));
        }
        // Older epochs first, so newer reports win; known leaders after unknown ones.
        infos.sort_by_key(|i| {
            let e = i.region.as_ref().and_then(|r| r.epoch).unwrap_or_default();
            (e.version, e.conf_ver, i.leader.is_some())
        });
        let mut cache = self
            .inner
            .cache
            .write()
            .expect("region cache lock poisoned");
        for i in infos {
            if let Some(r) = i.region {
                let leader = i
                    .leader
                    .or_else(|| cache.locate(&r.start_key).and_then(|c| c.leader));
                cache.insert(r, leader);
            }
        }
        Ok(())
    }

    /// The cached regions (after a refresh if the cache is empty).
    pub async fn regions(&self) -> Result<Vec<CachedRegion>> {
        self.refresh().await?;
        Ok(self
            .inner
            .cache
            .read()
            .expect("region cache lock poisoned")
            .regions())
    }

    async fn locate(&self, key: &[u8]) -> Result<CachedRegion> {
        if let Some(c) = self
            .inner
            .cache
            .read()
            .expect("region cache lock poisoned")
            .locate(key)
        {
            return Ok(c.clone());
        }
        // The placement routing table first (one RPC loads this region and the next ones);
        // the placement region itself, and a table not filled yet, through the nodes.
        if self.inner.opts.system
            || is_system_key(key)
            || self.load_routes(key, 32).await.is_err()
            || self.cached(key).is_none()
        {
            self.refresh().await?;
        }
        self.inner
            .cache
            .read()
            .expect("region cache lock poisoned")
            .locate(key)
            .cloned()
            .ok_or_else(|| Error::Unavailable(format!("no region holds key {key:02x?}")))
    }

    fn cached(&self, key: &[u8]) -> Option<CachedRegion> {
        self.inner
            .cache
            .read()
            .expect("region cache lock poisoned")
            .locate(key)
            .cloned()
    }

    fn header(&self, r: &CachedRegion) -> RequestHeader {
        RequestHeader {
            region_id: r.region.id,
            region_epoch: r.region.epoch,
            consistency: self.inner.opts.consistency as i32,
            system: self.inner.opts.system,
            write_id: None,
        }
    }

    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        Ok(self.get_revisioned(key, 0).await?.0)
    }

    /// Puts `key`, attached to no lease (a key attached to one is detached).
    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<WriteResult> {
        self.put_with_lease(key, value, 0).await
    }

    /// Puts `key` attached to lease `lease` (0 = to none): the key is deleted when the lease
    /// expires or is revoked. [`Error::NotFound`] if the lease does not exist (any more).
    pub async fn put_with_lease(
        &self,
        key: &[u8],
        value: &[u8],
        lease: u64,
    ) -> Result<WriteResult> {
        let ticket = self.inner.writes.start();
        self.execute(key, Mode::Write(&ticket), |conn, header| async move {
            let r = conn
                .put(proto::PutRequest {
                    header: Some(header),
                    key: key.to_vec(),
                    value: value.to_vec(),
                    lease,
                })
                .await?;
            Ok((
                r.region_error,
                WriteResult {
                    prev: r.prev_kv,
                    revision: r.revision,
                },
            ))
        })
        .await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<WriteResult> {
        let ticket = self.inner.writes.start();
        self.execute(key, Mode::Write(&ticket), |conn, header| async move {
            let r = conn
                .delete(proto::DeleteRequest {
                    header: Some(header),
                    key: key.to_vec(),
                })
                .await?;
            Ok((
                r.region_error,
                WriteResult {
                    prev: r.prev_kv,
                    revision: r.revision,
                },
            ))
        })
        .await
    }

    pub async fn cas(&self, key: &[u8], compare: Compare, action: CasAction) -> Result<CasResult> {
        self.cas_with_lease(key, compare, action, 0).await
    }

    /// Creates `key` only if it does not exist; returns whether this call created it.
    pub async fn create(&self, key: &[u8], value: &[u8]) -> Result<bool> {
        Ok(self
            .cas(key, Compare::Absent, CasAction::Put(value.to_vec()))
            .await?
            .succeeded)
    }

    /// Keys in `[start, end)` in order across regions (empty `end` = to the end of the
    /// keyspace), at most `limit` of them (0 = no limit).
    pub async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<KeyValue>> {
        self.scan_at(start, end, limit, 0).await
    }

    /// As [`Self::scan`], as of cluster revision `revision` (0 = the latest state): every
    /// region is read at that revision, so the result is one consistent snapshot.
    pub async fn scan_at(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        revision: u64,
    ) -> Result<Vec<KeyValue>> {
        // The user keyspace ends where the system keyspace begins.
        let user_end = [tessera_api::keys::SYSTEM_KEY_PREFIX];
        let end = if !self.inner.opts.system && (end.is_empty() || end > &user_end[..]) {
            &user_end[..]
        } else {
            end
        };
        let mut out: Vec<KeyValue> = Vec::new();
        let mut cursor = start.to_vec();
        loop {
            let want = if limit == 0 { 0 } else { limit - out.len() };
            let (kvs, more, region_end) = self.scan_region(&cursor, end, want, revision).await?;
            let last = kvs.last().map(|kv| kv.key.clone());
            out.extend(kvs);
            if limit != 0 && out.len() >= limit {
                out.truncate(limit);
                return Ok(out);
            }
            if more {
                // The region has more: continue right after the last key returned. A server
                // answer that would not move the cursor forward is refused, not looped on.
                let Some(mut next) = last.filter(|k| k.as_slice() >= cursor.as_slice()) else {
                    return Err(Error::Server(
                        "scan answer says more keys follow but does not advance".into(),
                    ));
                };
                next.push(0);
                cursor = next;
                continue;
            }
            if region_end.is_empty() || (!end.is_empty() && region_end.as_slice() >= end) {
                return Ok(out);
            }
            cursor = region_end;
        }
    }

    async fn scan_region(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        revision: u64,
    ) -> Result<(Vec<KeyValue>, bool, Vec<u8>)> {
        self.execute(start, Mode::Idempotent, |conn, header| {
            // Where the region this request goes to ends: from the cached region the header
            // was made from. If the cache has moved on since, nothing is guessed (an empty
            // end would end the scan early): the attempt is retried.
            let region_end = self
                .inner
                .cache
                .read()
                .expect("region cache lock poisoned")
                .locate(start)
                .filter(|c| {
                    c.region.id == header.region_id && c.region.epoch == header.region_epoch
                })
                .map(|c| c.region.end_key.clone());
            async move {
                let Some(region_end) = region_end else {
                    let stale = proto::RegionError {
                        message: "the region changed while the scan was sent".into(),
                        error: Some(proto::region_error::Error::RegionNotFound(
                            proto::RegionNotFound {
                                region_id: header.region_id,
                            },
                        )),
                    };
                    return Ok((Some(stale), (Vec::new(), false, Vec::new())));
                };
                let r = Self::kv(conn.ch)
                    .scan(proto::ScanRequest {
                        header: Some(header),
                        start_key: start.to_vec(),
                        end_key: end.to_vec(),
                        limit: limit.min(u32::MAX as usize) as u32,
                        keys_only: false,
                        revision,
                    })
                    .await?
                    .into_inner();
                Ok((r.region_error, (r.kvs, r.more, region_end)))
            }
        })
        .await
    }
}

/// A failed call to `addr`, with the hint of [`tls::connect_error`] when a plaintext client's
/// connection broke the way a TLS server breaks it.
pub(crate) fn status_text(addr: &str, tls: bool, s: &tonic::Status) -> String {
    use tonic::Code;
    let broken = matches!(
        s.code(),
        Code::Unknown | Code::Cancelled | Code::Unavailable | Code::Internal
    );
    let hint = if !tls && broken {
        tls::PLAINTEXT_HINT
    } else {
        ""
    };
    format!("{addr}: {}{hint}", s.message())
}

#[cfg(test)]
mod tests;
