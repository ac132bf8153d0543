//! The node registry in the placement region: heartbeats, joining and removal.
//!
//! Invariants:
//! - a node id is handed out once and never reused; a removed node's record stays;
//! - a heartbeat never undoes a removal (it writes with a compare-and-swap against the
//!   record it read);
//! - one address runs as at most one live node: a join from an address another node holds
//!   is refused.

use super::*;

/// What a heartbeat learned.
#[derive(Debug, PartialEq, Eq)]
pub enum Beat {
    Written,
    /// The registry says this node was removed: it must stop serving.
    Removed,
}

fn decode_node(v: &[u8]) -> Result<NodeRecord, Error> {
    <NodeRecord as prost::Message>::decode(v)
        .map_err(|e| Error::Server(format!("bad node record: {e}")))
}

/// Writes this node's registry record (one heartbeat) — unless the record says the node was
/// removed, which a heartbeat must never undo (hence the compare-and-swap).
pub async fn heartbeat(client: &Client, record: &NodeRecord) -> Result<Beat, Error> {
    let value = prost::Message::encode_to_vec(record);
    update(
        client,
        &node_key(NodeId(record.node_id)),
        10,
        "heartbeat",
        |cur| {
            Ok(match cur {
                Some(kv) if decode_node(&kv.value)?.removed => Update::Keep(Beat::Removed),
                _ => Update::Write(value.clone(), Beat::Written),
            })
        },
    )
    .await
}

/// Every registered node's record.
pub async fn node_records(client: &Client) -> Result<Vec<NodeRecord>, Error> {
    let (start, end) = nodes_range();
    let mut out = Vec::new();
    for kv in client.scan(&start, &end, 0).await? {
        out.push(decode_node(&kv.value)?);
    }
    Ok(out)
}

/// Every registered node with its state as of now.
pub async fn list_nodes(client: &Client, down_after: Duration) -> Result<Vec<NodeInfo>, Error> {
    let now = now_ms();
    Ok(node_records(client)
        .await?
        .into_iter()
        .map(|rec| {
            let age = now.saturating_sub(rec.last_heartbeat_ms);
            let state = if rec.removed {
                NodeState::Removed
            } else if age > down_after.as_millis() as u64 {
                NodeState::Down
            } else {
                NodeState::Up
            };
            NodeInfo {
                record: Some(rec),
                state: state as i32,
                heartbeat_age_ms: age,
            }
        })
        .collect())
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("address {addr} is already registered to node {node}; remove that node first (`tessera nodes remove {node}`)")]
    AddressTaken { addr: String, node: u64 },
    #[error("{0}")]
    Client(#[from] Error),
}

/// Registers a node at `addr` and gives it an id. A registration that never heartbeated (a
/// joiner that crashed before saving its id) is handed out again to the same address; an
/// address held by any other node that was not removed is refused, so that one machine never
/// runs as two nodes.
pub async fn join(client: &Client, addr: &str) -> Result<u64, JoinError> {
    for rec in node_records(client).await? {
        if rec.addr == addr && !rec.removed {
            if rec.last_heartbeat_ms == 0 {
                return Ok(rec.node_id);
            }
            return Err(JoinError::AddressTaken {
                addr: addr.to_string(),
                node: rec.node_id,
            });
        }
    }
    let id = alloc_ids(client, 1).await?.start;
    let rec = NodeRecord {
        node_id: id,
        addr: addr.to_string(),
        ..Default::default()
    };
    let created = client
        .create(&node_key(NodeId(id)), &prost::Message::encode_to_vec(&rec))
        .await?;
    if !created {
        return Err(Error::Server(format!("fresh node id {id} is already registered")).into());
    }
    Ok(id)
}

/// Marks a node removed. Its record stays (ids are never reused) and it can never heartbeat
/// again; the node stops when it sees the mark.
pub async fn remove_node(client: &Client, node_id: NodeId) -> Result<(), Error> {
    update(client, &node_key(node_id), 10, "node removal", |cur| {
        let kv =
            cur.ok_or_else(|| Error::InvalidArgument(format!("node {node_id} is not registered")))?;
        let mut rec = decode_node(&kv.value)?;
        if rec.removed {
            return Ok(Update::Keep(()));
        }
        rec.removed = true;
        Ok(Update::Write(prost::Message::encode_to_vec(&rec), ()))
    })
    .await
}
