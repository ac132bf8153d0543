//! Placement: the cluster's metadata about itself, kept in the cluster.
//!
//! The placement data lives in an ordinary region — the placement region, covering the
//! system keyspace `[0xFF, +inf)` — so it is replicated, persisted, snapshotted and routed by
//! the same machinery as user data (CockroachDB keeps its meta ranges and node liveness the
//! same way). User requests for keys starting with 0xFF are refused; placement code reaches
//! them through a client with `ClientOptions::system` set.
//!
//! Keys (after the 0xFF prefix):
//! - `ids` — the id counter: the highest id handed out, big-endian u64, seeded at bootstrap
//!   above every bootstrap region and peer id;
//! - `nodes/` ‖ node_id (big-endian) — one `NodeRecord` per node, written by its heartbeats;
//! - `routes/` ‖ 0x01 ‖ end_key (or `routes/` ‖ 0x02 for the last region) — one
//!   `RegionRoute` per region: descriptor, leader, load; written by the region's leader;
//! - `alarms/` ‖ node_id — the space alarms; `auth` — users, roles and permissions.
//!
//! Node liveness: each node rewrites its record every `heartbeat_interval_ms` with its wall
//! clock; a reader shows a node down when its last heartbeat is older than
//! `node_down_after_ms` by the reader's clock (so clocks must agree to well within that).
//!
//! Files: `ids` (the id counter), `nodes` (registry, heartbeats, join and removal), `routes`
//! (the routing table), `tso` (the timestamp oracle), `compaction` (the cluster's compacted
//! revision), `client` (the system-keyspace client a node reaches placement with),
//! `scheduler` (replica repair and balancing, run by the placement leader's node), `status`
//! (the cluster at a glance). A node's
//! region reports come from `server::reporter`, which also starts the node's size-triggered
//! splits and so lives with the node's admin drivers.
//!
//! Invariants:
//! - every placement record changes by compare-and-swap against what was read (an absent
//!   record must still be absent), retried a bounded number of times: a lost race is read
//!   again, never overwritten;
//! - ids come only from the counter and are never handed out twice; an exhausted id space
//!   is an error, not a wrap;
//! - a heartbeat never clears a node's `removed` mark, and a removed node's record stays;
//! - a route report never overwrites a newer row (higher epoch, or same epoch and newer
//!   term); [`scan_routes`] stops at the first gap rather than report a range as empty;
//! - a record that does not decode is an error value, never a panic.

pub mod alarms;
pub mod auth;
pub mod client;
pub mod compaction;
mod ids;
mod nodes;
mod routes;
pub mod scheduler;
pub mod status;
pub mod tso;

pub use ids::{alloc_ids, max_id};
pub use nodes::{heartbeat, join, list_nodes, node_records, remove_node, Beat, JoinError};
pub use routes::{locate_key, report_region, route_key, route_table, scan_routes, RouteTable};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::client::{CasAction, Client, Compare, Error};
use crate::ids::NodeId;
use crate::proto::{KeyValue, NodeInfo, NodeRecord, NodeState};
use crate::storage::keys::SYSTEM_KEY_PREFIX;

fn system_key(suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + suffix.len());
    k.push(SYSTEM_KEY_PREFIX);
    k.extend_from_slice(suffix);
    k
}

pub use crate::storage::keys::ids_key;

pub fn node_key(node_id: NodeId) -> Vec<u8> {
    let mut k = system_key(b"nodes/");
    k.extend_from_slice(&node_id.get().to_be_bytes());
    k
}

fn nodes_range() -> (Vec<u8>, Vec<u8>) {
    (system_key(b"nodes/"), system_key(b"nodes0"))
}

/// What a read-modify-write of one placement record decided after reading it.
enum Update<T> {
    /// Write this value — only if the record is still as read — and return `T`.
    Write(Vec<u8>, T),
    /// Leave the record as it is and return `T`.
    Keep(T),
}

/// Every placement record is updated the same way: read it, let `decide` choose, write with a
/// compare-and-swap against what was read (absent must still be absent), and start over when
/// another writer got in between — at most `tries` times.
async fn update<T>(
    client: &Client,
    key: &[u8],
    tries: u32,
    what: &str,
    mut decide: impl FnMut(Option<&KeyValue>) -> Result<Update<T>, Error>,
) -> Result<T, Error> {
    for _ in 0..tries {
        let cur = client.get(key).await?;
        let compare = cur
            .as_ref()
            .map_or(Compare::Absent, |kv| Compare::ModRevision(kv.mod_revision));
        match decide(cur.as_ref())? {
            Update::Keep(t) => return Ok(t),
            Update::Write(value, t) => {
                if client
                    .cas(key, compare, CasAction::Put(value))
                    .await?
                    .succeeded
                {
                    return Ok(t);
                }
            }
        }
    }
    Err(Error::Server(format!("{what} kept losing races")))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
