//! The cluster's alarms, kept in the placement region as etcd keeps its alarms in raft: one
//! record per node whose data passed its space quota (docs/operations.md, "Space quota").
//!
//! Invariants:
//! - a node raises only its own alarm, and only a disarm removes one: an alarm outlives
//!   restarts of the node that raised it, and of every other node;
//! - while any alarm stands, every node refuses writes other than deletes (`server::quota`).

use super::{system_key, update, Update};
use crate::client::{Client, Error};
use crate::ids::NodeId;
use crate::proto::AlarmRecord;

fn alarm_key(node: NodeId) -> Vec<u8> {
    let mut k = system_key(b"alarms/");
    k.extend_from_slice(&node.get().to_be_bytes());
    k
}

fn alarms_range() -> (Vec<u8>, Vec<u8>) {
    (system_key(b"alarms/"), system_key(b"alarms0"))
}

fn decode(v: &[u8]) -> Result<AlarmRecord, Error> {
    <AlarmRecord as prost::Message>::decode(v)
        .map_err(|e| Error::Server(format!("bad alarm record: {e}")))
}

/// Raises `record`'s alarm, unless its node has one standing already.
pub async fn raise(client: &Client, record: &AlarmRecord) -> Result<(), Error> {
    let value = prost::Message::encode_to_vec(record);
    update(
        client,
        &alarm_key(NodeId(record.node_id)),
        10,
        "raising an alarm",
        |cur| {
            Ok(match cur {
                Some(_) => Update::Keep(()),
                None => Update::Write(value.clone(), ()),
            })
        },
    )
    .await
}

/// The alarms standing, by node.
pub async fn list(client: &Client) -> Result<Vec<AlarmRecord>, Error> {
    let (start, end) = alarms_range();
    client
        .scan(&start, &end, 0)
        .await?
        .iter()
        .map(|kv| decode(&kv.value))
        .collect()
}

/// Removes the alarm of `node` (`None`: every alarm).
pub async fn disarm(client: &Client, node: Option<NodeId>) -> Result<(), Error> {
    for a in list(client).await? {
        if node.is_none_or(|n| n.get() == a.node_id) {
            client.delete(&alarm_key(NodeId(a.node_id))).await?;
        }
    }
    Ok(())
}
