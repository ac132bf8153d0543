//! Checking a configuration before start-up: every field that can be checked without
//! starting anything, reported as the first [`ConfigError`] naming the field. Checking
//! touches nothing on disk; [`Config::prepare_data_dir`] does that, at start-up.
//!
//! Invariants:
//! - [`Config::validate`] reads no file and writes nothing (it only looks whether
//!   `node.data_dir` exists and is a directory); it stops at the first problem;
//! - a joining node has `node.id` 0 and is no founding member; a founding node is listed
//!   in `cluster.initial_cluster` under its advertise address;
//! - the bounds other modules rely on hold after it: `election_ticks > heartbeat_ticks`, a
//!   write-record TTL of one minute to one week, `replace_down_after_ms >=
//!   node_down_after_ms`, split keys strictly increasing and outside the system keyspace.

use std::collections::HashSet;
use std::path::Path;

use super::{invalid, parse_addr, Config, ConfigError};
use crate::storage::keys::is_system_key;

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.joining() {
            if self.node.id != 0 {
                return Err(invalid(
                    "node.id",
                    "must be 0 when cluster.join is set (the cluster assigns the id)",
                ));
            }
            for a in &self.cluster.join {
                parse_addr("cluster.join", a)?;
            }
        } else if self.node.id == 0 {
            return Err(invalid("node.id", "must be a positive integer"));
        }
        if self.cluster.cluster_id == 0 {
            return Err(invalid("cluster.cluster_id", "must be a positive integer"));
        }
        self.mvcc.auto_compaction()?;
        self.security.validate()?;
        if !(1..=10_000).contains(&self.mvcc.watch_resolve_interval_ms) {
            return Err(invalid(
                "mvcc.watch_resolve_interval_ms",
                "must be between 1 and 10000",
            ));
        }
        if !(1..=64).contains(&self.cluster.lease_regions) {
            return Err(invalid("cluster.lease_regions", "must be between 1 and 64"));
        }
        if !(1..=1_000_000).contains(&self.lease.max_expiries_per_second) {
            return Err(invalid(
                "lease.max_expiries_per_second",
                "must be between 1 and 1000000",
            ));
        }
        if !(50..=10_000).contains(&self.lease.attach_window_ms) {
            return Err(invalid(
                "lease.attach_window_ms",
                "must be between 50 and 10000",
            ));
        }
        if self.lease.max_clock_skew_ms >= self.raft.election_timeout().as_millis() as u64 {
            // A new leader gives inherited leases one election timeout for clock differences.
            return Err(invalid(
                "lease.max_clock_skew_ms",
                "must be below the election timeout (raft.tick_interval_ms × raft.election_ticks)",
            ));
        }
        let advertise = self.advertise_addr()?;
        self.listen_addr()?;
        if !self.node.metrics_addr.is_empty() {
            parse_addr("node.metrics_addr", &self.node.metrics_addr)?;
        }

        let members = self.members()?;
        if members.is_empty() {
            return Err(invalid("cluster.initial_cluster", "names no members"));
        }
        let mut ids = HashSet::new();
        let mut addrs = HashSet::new();
        for m in &members {
            if !ids.insert(m.id) {
                return Err(invalid(
                    "cluster.initial_cluster",
                    format!("node id {} appears twice", m.id.0),
                ));
            }
            if !addrs.insert(m.addr) {
                return Err(invalid(
                    "cluster.initial_cluster",
                    format!("address {} appears twice", m.addr),
                ));
            }
        }
        match members.iter().find(|m| m.id == self.node_id()) {
            None if self.joining() => {}
            Some(m) if self.joining() => {
                return Err(invalid(
                    "cluster.join",
                    format!("a joining node cannot be founding member {}", m.id.0),
                ))
            }
            None => {
                return Err(invalid(
                    "node.id",
                    format!("node {} is not in cluster.initial_cluster", self.node.id),
                ))
            }
            Some(m) if m.addr != advertise => {
                return Err(invalid(
                    "node.advertise_addr",
                    format!(
                        "this node is {advertise} but cluster.initial_cluster says node {} is {}",
                        self.node.id, m.addr
                    ),
                ))
            }
            Some(_) => {}
        }

        if self.cluster.initial_regions == 0 || self.cluster.initial_regions > 65280 {
            return Err(invalid("cluster.initial_regions", "must be 1..=65280"));
        }
        if self.cluster.replicas == 0 {
            return Err(invalid("cluster.replicas", "must be at least 1"));
        }
        let keys = &self.cluster.split_keys;
        if keys.iter().any(|k| k.is_empty()) {
            return Err(invalid("cluster.split_keys", "contains an empty key"));
        }
        if keys.iter().any(|k| is_system_key(k.as_bytes())) {
            return Err(invalid(
                "cluster.split_keys",
                "keys starting with byte 0xFF are reserved",
            ));
        }
        if keys.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid("cluster.split_keys", "must be strictly increasing"));
        }

        let r = &self.raft;
        if r.workers == 0 || r.workers > 64 {
            return Err(invalid("raft.workers", "must be 1..=64"));
        }
        if r.tick_interval_ms == 0 {
            return Err(invalid("raft.tick_interval_ms", "must be positive"));
        }
        if r.heartbeat_ticks == 0 {
            return Err(invalid("raft.heartbeat_ticks", "must be positive"));
        }
        if r.election_ticks <= r.heartbeat_ticks {
            return Err(invalid(
                "raft.election_ticks",
                "must be greater than raft.heartbeat_ticks",
            ));
        }
        if r.max_inflight_msgs == 0 {
            return Err(invalid("raft.max_inflight_msgs", "must be positive"));
        }
        if r.log_gc_threshold == 0 {
            return Err(invalid("raft.log_gc_threshold", "must be positive"));
        }
        // Well above a client's deadline for one call (30 s by default): a retry that comes
        // after its client's records were forgotten would apply again.
        if r.client_session_ttl_secs < 60 || r.client_session_ttl_secs > 7 * 24 * 3600 {
            return Err(invalid(
                "raft.client_session_ttl_secs",
                "must be 60..=604800 (one minute to one week)",
            ));
        }
        if self.storage.data_memtable_mb == 0 || self.storage.data_memtable_mb > 4096 {
            return Err(invalid("storage.data_memtable_mb", "must be 1..=4096"));
        }
        if self.server.max_key_size == 0 {
            return Err(invalid("server.max_key_size", "must be positive"));
        }
        if self.server.max_value_size == 0 || self.server.max_value_size > 64 << 20 {
            return Err(invalid("server.max_value_size", "must be 1..=64 MiB"));
        }
        // Raft and snapshot streams share a peer's connection and take slots too.
        if !(16..=1_000_000).contains(&self.server.max_requests_per_connection) {
            return Err(invalid(
                "server.max_requests_per_connection",
                "must be 16 to 1000000",
            ));
        }
        if self.server.max_scan_limit == 0 {
            return Err(invalid("server.max_scan_limit", "must be positive"));
        }
        if self.server.grpc_threads > 1024 {
            return Err(invalid("server.grpc_threads", "must be 0 (auto) ..= 1024"));
        }
        if self.placement.heartbeat_interval_ms == 0 {
            return Err(invalid(
                "placement.heartbeat_interval_ms",
                "must be positive",
            ));
        }
        if self.placement.node_down_after_ms <= self.placement.heartbeat_interval_ms {
            return Err(invalid(
                "placement.node_down_after_ms",
                "must be longer than placement.heartbeat_interval_ms",
            ));
        }
        if self.placement.schedule_interval_ms == 0 {
            return Err(invalid(
                "placement.schedule_interval_ms",
                "must be positive",
            ));
        }
        if self.placement.replace_down_after_ms < self.placement.node_down_after_ms {
            return Err(invalid(
                "placement.replace_down_after_ms",
                "must be at least placement.node_down_after_ms",
            ));
        }
        if self.placement.max_concurrent_moves == 0 {
            return Err(invalid(
                "placement.max_concurrent_moves",
                "must be positive",
            ));
        }
        if self.placement.region_report_interval_ms == 0 {
            return Err(invalid(
                "placement.region_report_interval_ms",
                "must be positive",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", e.to_string()));
        }
        check_data_dir_path(&self.node.data_dir)
    }

    /// Creates `node.data_dir` if it does not exist and checks that the node can write
    /// there. The one part of checking a configuration that changes the disk, so it runs at
    /// start-up, not in [`Config::validate`].
    pub fn prepare_data_dir(&self) -> Result<(), ConfigError> {
        prepare_data_dir(&self.node.data_dir)
    }
}

/// What can be said of the data directory without touching the disk's contents.
fn check_data_dir_path(dir: &Path) -> Result<(), ConfigError> {
    if dir.as_os_str().is_empty() {
        return Err(invalid("node.data_dir", "is empty"));
    }
    if dir.exists() && !dir.is_dir() {
        return Err(invalid(
            "node.data_dir",
            format!("{} exists and is not a directory", dir.display()),
        ));
    }
    Ok(())
}

/// Creates the data directory if needed and checks that it is writable.
pub(super) fn prepare_data_dir(dir: &Path) -> Result<(), ConfigError> {
    check_data_dir_path(dir)?;
    std::fs::create_dir_all(dir).map_err(|e| {
        invalid(
            "node.data_dir",
            format!("cannot create {}: {e}", dir.display()),
        )
    })?;
    let probe = dir.join(".tessera-write-probe");
    std::fs::write(&probe, b"probe").map_err(|e| {
        invalid(
            "node.data_dir",
            format!("{} is not writable: {e}", dir.display()),
        )
    })?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}
