//! The cluster at a glance, from placement's records: nodes and their states, regions,
//! regions without a leader or without a live majority, routing-table gaps, user data size
//! (`tessera status`, the status page, `Node.ClusterStatus`).
//!
//! Invariants:
//! - read-only: it changes no placement record;
//! - the data size counts user regions only (placement's records and leases are not the
//!   user's), from the leaders' last load reports;
//! - a routing-table gap is listed, never read as an empty range.

use std::time::Duration;

use crate::client::{Client, Error};
use crate::ids::ClusterId;
use crate::proto::{ClusterStatusResponse, KeyRange, NodeState};

/// The status of cluster `cluster_id` as placement has it; nodes silent for `down_after`
/// are shown down.
pub async fn cluster_status(
    client: &Client,
    cluster_id: ClusterId,
    down_after: Duration,
) -> Result<ClusterStatusResponse, Error> {
    let nodes = super::list_nodes(client, down_after).await?;
    let table = super::route_table(client).await?;
    let routes = table.routes;
    let max_id = super::max_id(client).await?;
    let up: std::collections::HashSet<u64> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Up as i32)
        .filter_map(|n| n.record.as_ref().map(|r| r.node_id))
        .collect();
    let mut st = ClusterStatusResponse {
        cluster_id: cluster_id.0,
        regions: routes.len() as u64,
        max_id,
        routing_gaps: table
            .gaps
            .into_iter()
            .map(|(start_key, end_key)| KeyRange { start_key, end_key })
            .collect(),
        ..Default::default()
    };
    for r in &routes {
        let Some(region) = r.region.as_ref() else {
            continue;
        };
        if r.leader.is_none() {
            st.regions_without_leader += 1;
        }
        let live = region
            .peers
            .iter()
            .filter(|p| up.contains(&p.node_id))
            .count();
        if live * 2 <= region.peers.len() {
            st.regions_unavailable += 1;
        }
        if region.start_key == [tessera_api::keys::SYSTEM_KEY_PREFIX] {
            st.placement_leader_node = r.leader.map_or(0, |l| l.node_id);
        } else if let Some(l) = r
            .load
            .as_ref()
            .filter(|_| !tessera_api::keys::is_system_key(&region.start_key))
        {
            // User data only: placement's records and the leases are not the user's.
            st.total_keys += l.keys;
            st.total_bytes += l.bytes;
        }
    }
    st.nodes = nodes;
    Ok(st)
}
