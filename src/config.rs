//! Node configuration: a serde-typed TOML file with defaults for every field.
//!
//! The documented default lives in `config/default.toml` and is embedded in the binary, so
//! `tessera server` runs with no file at all. [`Config::validate`] checks everything that can
//! be checked before start-up (addresses, ids, the data directory) and reports the first
//! problem as one [`ConfigError`] naming the field.
//!
//! Invariants:
//! - unknown fields are errors, missing ones take their defaults, and the embedded default
//!   equals `Config::default()` (tested);
//! - reading, parsing and checking return a [`ConfigError`]; only the embedded default's
//!   parse is trusted not to fail;
//! - checking changes nothing on disk: [`Config::prepare_data_dir`] does that, at start-up;
//! - generated split keys stay below 0xFF00, out of the system keyspace; explicit ones are
//!   checked for it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ids::{ClusterId, NodeId};
use crate::storage::keys::SYSTEM_KEY_PREFIX;

/// The embedded default configuration (`config/default.toml`).
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config {source_name}: {reason}")]
    Parse { source_name: String, reason: String },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub cluster: ClusterConfig,
    pub raft: RaftConfig,
    pub storage: StorageConfig,
    pub server: ServerConfig,
    pub placement: PlacementConfig,
    pub region: RegionConfig,
    pub mvcc: MvccConfig,
    pub lease: LeaseConfig,
    pub log: LogConfig,
    pub security: SecurityConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// Most leases a node expires per second (the rest wait): an expiry storm is revoked
    /// at a bounded rate instead of flooding the raft log (etcd's `leaseRevokeRate`).
    /// 1 to 1,000,000.
    pub max_expiries_per_second: u32,
    /// A put with a lease must be proposed within this long of its attachment in the
    /// lease's region; a revocation deletes the lease's keys only this long (plus
    /// `max_clock_skew_ms`) after it, so that no put it races with survives it. 50 to
    /// 10,000.
    pub attach_window_ms: u64,
    /// The most the wall clocks of two nodes may differ. Lease deadlines are wall-clock
    /// instants (docs/architecture.md, "Leases"). 0 to 10,000.
    pub max_clock_skew_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            max_expiries_per_second: 1000,
            attach_window_ms: 500,
            max_clock_skew_ms: 100,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MvccConfig {
    /// Automatic compaction of history, as etcd's: `"periodic:1h"` keeps the history of
    /// the last hour (units s, m, h, d), `"revisions:100000"` the last 100,000 revisions;
    /// empty or `"off"` compacts only when asked (`tessera compact`).
    pub auto_compaction: String,
    /// How often a node raises the resolved revision of the regions it leads that have
    /// watchers needing it (watches over several regions): an event of such a watch waits
    /// up to about this long for the other regions. 1 to 10,000.
    pub watch_resolve_interval_ms: u64,
}

impl Default for MvccConfig {
    fn default() -> Self {
        Self {
            auto_compaction: String::new(),
            watch_resolve_interval_ms: 50,
        }
    }
}

/// What `mvcc.auto_compaction` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep the history of this long.
    Periodic(std::time::Duration),
    /// Keep this many revisions.
    Revisions(u64),
}

impl MvccConfig {
    /// The automatic compaction asked for, or `None` when it is off.
    pub fn auto_compaction(&self) -> Result<Option<AutoCompaction>, ConfigError> {
        let bad = |why: &str| invalid("mvcc.auto_compaction", why);
        let s = self.auto_compaction.trim();
        if s.is_empty() || s == "off" {
            return Ok(None);
        }
        let (mode, arg) = s
            .split_once(':')
            .ok_or_else(|| bad("must be \"periodic:DURATION\" or \"revisions:COUNT\""))?;
        match mode {
            "periodic" => {
                let unit_err = || bad("a period needs a unit: s, m, h or d (e.g. \"1h\")");
                let unit = arg.chars().last().ok_or_else(unit_err)?;
                let num = &arg[..arg.len() - unit.len_utf8()];
                let secs = match unit {
                    's' => 1,
                    'm' => 60,
                    'h' => 3600,
                    'd' => 86_400,
                    _ => return Err(unit_err()),
                };
                let n: u64 = num
                    .parse()
                    .map_err(|_| bad("the period must be a whole number with a unit"))?;
                if n == 0 {
                    return Err(bad("the period must be positive"));
                }
                Ok(Some(AutoCompaction::Periodic(
                    std::time::Duration::from_secs(n.saturating_mul(secs)),
                )))
            }
            "revisions" => {
                let n: u64 = arg
                    .parse()
                    .map_err(|_| bad("the revision count must be a whole number"))?;
                if n == 0 {
                    return Err(bad("the revision count must be positive"));
                }
                Ok(Some(AutoCompaction::Revisions(n)))
            }
            _ => Err(bad("the mode must be \"periodic\" or \"revisions\"")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegionConfig {
    /// A region whose leader counts more live keys than this is split in two (0 = never).
    pub max_keys: u64,
    /// A region whose leader counts more bytes (keys plus stored records) than this is split
    /// in two (0 = never).
    pub max_bytes: u64,
    /// Adjacent idle regions with fewer live keys than this (and fewer bytes than
    /// `merge_below_bytes`) are merged by the scheduler (0 = only when asked).
    pub merge_below_keys: u64,
    pub merge_below_bytes: u64,
}

impl Default for RegionConfig {
    fn default() -> Self {
        Self {
            max_keys: 960_000,
            max_bytes: 96 << 20,
            merge_below_keys: 0,
            merge_below_bytes: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementConfig {
    /// How often a node writes its heartbeat into the placement registry.
    pub heartbeat_interval_ms: u64,
    /// A node whose last heartbeat is older than this is shown down.
    pub node_down_after_ms: u64,
    /// Region leaders re-report regions whose load changed this often (leadership and
    /// descriptor changes are reported at once).
    pub region_report_interval_ms: u64,
    /// Whether the placement leader schedules replica repairs and balancing.
    pub schedule: bool,
    /// How often the scheduler looks at the cluster.
    pub schedule_interval_ms: u64,
    /// A node down (no heartbeat) for this long, or removed, has its replicas replaced.
    pub replace_down_after_ms: u64,
    /// Most replica moves (each one a snapshot to the new node) at a time.
    pub max_concurrent_moves: usize,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 1000,
            node_down_after_ms: 10_000,
            region_report_interval_ms: 10_000,
            schedule: true,
            schedule_interval_ms: 1000,
            replace_down_after_ms: 300_000,
            max_concurrent_moves: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's id; must appear in `cluster.initial_cluster` when bootstrapping.
    pub id: u64,
    /// Holds the node's one RocksDB instance. Created if missing.
    pub data_dir: PathBuf,
    /// Where the gRPC server (client KV API and peer transport) listens.
    pub listen_addr: String,
    /// Where other nodes and clients reach this node; defaults to `listen_addr`.
    pub advertise_addr: String,
    /// Prometheus endpoint (`/metrics`); empty disables it.
    pub metrics_addr: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Every node and store carries it; traffic and data of another cluster are refused.
    pub cluster_id: u64,
    /// The founding members, `"id@host:port"`, like etcd's `--initial-cluster`.
    pub initial_cluster: Vec<String>,
    /// How many regions the keyspace starts with, split evenly over the first key byte.
    /// Ignored when `split_keys` is set.
    pub initial_regions: u32,
    /// Explicit initial split keys (UTF-8), strictly increasing.
    pub split_keys: Vec<String>,
    /// Replicas per region (all nodes when the cluster is smaller).
    pub replicas: u32,
    /// How many regions the lease keyspace starts with, split evenly over lease ids, so
    /// that the leases' expiry timers are spread over several leaders. 1 to 64.
    pub lease_regions: u32,
    /// Addresses of running nodes to join through (`host:port`). When set, an empty data
    /// directory registers with that cluster and gets its node id from it (`node.id` must be
    /// 0); `initial_cluster` is not used.
    pub join: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftConfig {
    /// Raft worker threads; each region is owned by exactly one.
    pub workers: usize,
    /// One raft tick.
    pub tick_interval_ms: u64,
    /// Election timeout, in ticks (randomised up to twice this).
    pub election_ticks: usize,
    /// Leader heartbeat interval, in ticks.
    pub heartbeat_ticks: usize,
    /// Most in-flight append messages per follower.
    pub max_inflight_msgs: usize,
    /// Largest append message, in bytes.
    pub max_size_per_msg: u64,
    /// Compact a region's log once it holds more applied entries than this.
    pub log_gc_threshold: u64,
    /// Idle regions stop ticking and heartbeating until the next message or request.
    pub hibernate_regions: bool,
    /// Leaders serve linearizable reads within a lease of `election_ticks - 2` ticks from
    /// the last quorum acknowledgement, without a ReadIndex round.
    pub lease_reads: bool,
    /// A region forgets a client's write records once the client has written nothing to it
    /// for this long, in the log's time (leaders' clocks). Must exceed the longest time a
    /// client keeps retrying one write plus the clock difference between nodes.
    pub client_session_ttl_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// fsync every round's write batch. Turning it off loses acknowledged writes on a crash.
    pub sync_writes: bool,
    pub block_cache_mb: usize,
    /// Memtable (write buffer) of the user-data column family.
    pub data_memtable_mb: usize,
    /// Records of recently written keys each raft worker keeps for apply. 0 = none.
    pub record_cache_mb: usize,
    /// The space quota: when the user data and its history on this node take more, the
    /// node raises the cluster's NOSPACE alarm and every node refuses writes (not reads or
    /// deletes) until an operator disarms it. 0 = no quota.
    pub quota_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Largest accepted key, in bytes.
    pub max_key_size: usize,
    /// Largest accepted value, in bytes.
    pub max_value_size: usize,
    /// Most keys one scan returns.
    pub max_scan_limit: u32,
    /// Threads of the async runtime (gRPC server, raft transport, placement loops); 0 = the
    /// machine's cores minus `raft.workers`, at least 1. See [`Config::grpc_threads`].
    pub grpc_threads: usize,
    /// Most calls one connection may have in progress at once (unary calls until they
    /// answer, streams while they open); more wait. 16 to 1,000,000.
    pub max_requests_per_connection: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, e.g. `info` or `tessera=debug,raft=info`.
    pub level: String,
    /// Log file; empty logs to standard error.
    pub file: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: 1,
            data_dir: PathBuf::from("tessera-data/node1"),
            listen_addr: "127.0.0.1:20160".into(),
            advertise_addr: String::new(),
            metrics_addr: String::new(),
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            cluster_id: 1,
            initial_cluster: vec!["1@127.0.0.1:20160".into()],
            initial_regions: 8,
            split_keys: Vec::new(),
            replicas: 3,
            lease_regions: 2,
            join: Vec::new(),
        }
    }
}

impl RaftConfig {
    pub fn tick_interval(&self) -> Duration {
        Duration::from_millis(self.tick_interval_ms)
    }

    /// The shortest election timeout (raft-rs randomises it up to twice this).
    pub fn election_timeout(&self) -> Duration {
        self.tick_interval() * self.election_ticks as u32
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            tick_interval_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_inflight_msgs: 256,
            max_size_per_msg: 1 << 20,
            log_gc_threshold: 1024,
            hibernate_regions: true,
            lease_reads: true,
            client_session_ttl_secs: 600,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            sync_writes: true,
            block_cache_mb: 64,
            data_memtable_mb: 16,
            record_cache_mb: 64,
            quota_bytes: 8 << 30,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_key_size: 4 << 10,
            max_value_size: 1 << 20,
            max_scan_limit: 10_000,
            grpc_threads: 0,
            max_requests_per_connection: 1024,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            file: PathBuf::new(),
        }
    }
}

/// One founding member from `cluster.initial_cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: NodeId,
    pub addr: SocketAddr,
}

impl Config {
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            source_name: source_name.to_string(),
            reason: e.to_string().trim_end().replace('\n', " "),
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// The embedded default configuration.
    pub fn embedded_default() -> Self {
        Self::from_toml_str(DEFAULT_CONFIG_TOML, "embedded default")
            .expect("invariant: config/default.toml parses (tested)")
    }

    pub fn node_id(&self) -> NodeId {
        NodeId(self.node.id)
    }

    pub fn cluster_id(&self) -> ClusterId {
        ClusterId(self.cluster.cluster_id)
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("node.listen_addr", &self.node.listen_addr)
    }

    /// The address others use to reach this node.
    pub fn advertise_addr(&self) -> Result<SocketAddr, ConfigError> {
        if self.node.advertise_addr.is_empty() {
            self.listen_addr()
        } else {
            parse_addr("node.advertise_addr", &self.node.advertise_addr)
        }
    }

    pub fn members(&self) -> Result<Vec<Member>, ConfigError> {
        let mut out = Vec::with_capacity(self.cluster.initial_cluster.len());
        for entry in &self.cluster.initial_cluster {
            let (id, addr) = entry.split_once('@').ok_or_else(|| {
                invalid(
                    "cluster.initial_cluster",
                    format!("{entry:?} is not of the form \"id@host:port\""),
                )
            })?;
            let id: u64 = id.trim().parse().map_err(|_| {
                invalid(
                    "cluster.initial_cluster",
                    format!("{entry:?}: node id {id:?} is not a positive integer"),
                )
            })?;
            if id == 0 {
                return Err(invalid(
                    "cluster.initial_cluster",
                    format!("{entry:?}: node id 0 is reserved"),
                ));
            }
            let addr = parse_addr("cluster.initial_cluster", addr.trim())?;
            out.push(Member {
                id: NodeId(id),
                addr,
            });
        }
        Ok(out)
    }

    /// Initial split keys of the user keyspace: explicit ones, or `initial_regions - 1` keys
    /// spread evenly over its first two bytes. The placement region's boundary (0xFF) is
    /// added by bootstrap.
    pub fn initial_split_keys(&self) -> Vec<Vec<u8>> {
        if !self.cluster.split_keys.is_empty() {
            return self
                .cluster
                .split_keys
                .iter()
                .map(|k| k.as_bytes().to_vec())
                .collect();
        }
        let n = u64::from(self.cluster.initial_regions.max(1));
        // The user keyspace ends at 0xFF00 (the system keyspace starts at 0xFF).
        let span = u64::from(SYSTEM_KEY_PREFIX) << 8;
        (1..n)
            .map(|i| {
                // 2-byte prefixes so that many initial regions stay distinct.
                let v = (i * span / n) as u16;
                v.to_be_bytes().to_vec()
            })
            .collect()
    }

    /// Checks everything checkable before start-up. Creates the data directory if it is
    /// missing, and proves it is writable.
    /// Whether this node joins a running cluster instead of founding one.
    pub fn joining(&self) -> bool {
        !self.cluster.join.is_empty()
    }

    /// Threads for the node's async runtime: `server.grpc_threads`, or when that is 0 the
    /// cores not taken by raft workers, at least one. Raft workers are busy whenever the
    /// node is, and more runtime threads than the cores left over only add wake-ups and
    /// context switches (docs/benchmarks.md, "Runtime threads").
    pub fn grpc_threads(&self) -> usize {
        if self.server.grpc_threads > 0 {
            return self.server.grpc_threads;
        }
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        cores.saturating_sub(self.raft.workers).max(1)
    }
}

fn parse_addr(field: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(field, format!("{s:?} is not a socket address (ip:port)")))
}

mod security;
mod validate;

pub use security::{SecurityConfig, TlsFiles};

#[cfg(test)]
mod tests;
