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
//! - `nodes/` ‖ node_id (big-endian) — one `NodeRecord` per node, written by its heartbeats.
//!
//! Node liveness: each node rewrites its record every `heartbeat_interval_ms` with its wall
//! clock; a reader shows a node down when its last heartbeat is older than
//! `node_down_after_ms` by the reader's clock (so clocks must agree to well within that).

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::client::{CasAction, Client, Compare, Error};
use crate::proto::{KvRecord, NodeInfo, NodeRecord, NodeState};
use crate::storage::keys::{self, SYSTEM_KEY_PREFIX};
use crate::storage::{Cf, WriteBatch};

fn system_key(suffix: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + suffix.len());
    k.push(SYSTEM_KEY_PREFIX);
    k.extend_from_slice(suffix);
    k
}

pub fn ids_key() -> Vec<u8> {
    system_key(b"ids")
}

pub fn node_key(node_id: u64) -> Vec<u8> {
    let mut k = system_key(b"nodes/");
    k.extend_from_slice(&node_id.to_be_bytes());
    k
}

fn nodes_range() -> (Vec<u8>, Vec<u8>) {
    (system_key(b"nodes/"), system_key(b"nodes0"))
}

/// Writes the initial id counter into the placement region's data (bootstrap only).
pub fn seed_id_counter(wb: &mut WriteBatch<'_>, max_bootstrap_id: u64) {
    let rec = KvRecord {
        value: max_bootstrap_id.to_be_bytes().to_vec(),
        create_revision: crate::storage::peer_storage::RAFT_INIT_LOG_INDEX,
        mod_revision: crate::storage::peer_storage::RAFT_INIT_LOG_INDEX,
        version: 1,
    };
    wb.put_msg(Cf::Data, &keys::data_key(&ids_key()), &rec);
}

fn decode_u64(v: &[u8]) -> Result<u64, Error> {
    v.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Server(format!("id counter holds {} bytes, not 8", v.len())))
}

/// Allocates `count` new ids, unique across the cluster and never reused: a compare-and-swap
/// on the counter's mod revision; a caller that loses a race reads again and retries.
pub async fn alloc_ids(client: &Client, count: u64) -> Result<Range<u64>, Error> {
    let key = ids_key();
    for _ in 0..100 {
        let cur = client
            .get(&key)
            .await?
            .ok_or_else(|| Error::Server("placement id counter is missing".into()))?;
        let last = decode_u64(&cur.value)?;
        let next = last
            .checked_add(count)
            .ok_or_else(|| Error::Server("id space exhausted".into()))?;
        let r = client
            .cas(
                &key,
                Compare::ModRevision(cur.mod_revision),
                CasAction::Put(next.to_be_bytes().to_vec()),
            )
            .await?;
        if r.succeeded {
            return Ok(last + 1..next + 1);
        }
    }
    Err(Error::Server("id allocation kept losing races".into()))
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes this node's registry record (one heartbeat).
pub async fn heartbeat(client: &Client, record: &NodeRecord) -> Result<(), Error> {
    let value = prost::Message::encode_to_vec(record);
    client
        .put(&node_key(record.node_id), &value)
        .await
        .map(|_| ())
}

/// Every registered node with its state as of now.
pub async fn list_nodes(client: &Client, down_after: Duration) -> Result<Vec<NodeInfo>, Error> {
    let (start, end) = nodes_range();
    let now = now_ms();
    let mut out = Vec::new();
    for kv in client.scan(&start, &end, 0).await? {
        let rec = <NodeRecord as prost::Message>::decode(kv.value.as_slice())
            .map_err(|e| Error::Server(format!("bad node record: {e}")))?;
        let age = now.saturating_sub(rec.last_heartbeat_ms);
        let state = if rec.removed {
            NodeState::Removed
        } else if age > down_after.as_millis() as u64 {
            NodeState::Down
        } else {
            NodeState::Up
        };
        out.push(NodeInfo {
            record: Some(rec),
            state: state as i32,
            heartbeat_age_ms: age,
        });
    }
    Ok(out)
}
