//! `tessera status`: the cluster at a glance.
//!
//! Invariants:
//! - read-only: one `ClusterStatus` call, nothing written;
//! - the exit status says whether the status could be read, not how healthy the cluster
//!   is; the health is in the output.

use serde::Serialize;

use super::{hex, print_json, state_name, ConnArgs, Result};

#[derive(Serialize)]
struct StatusJson {
    cluster_id: u64,
    nodes_up: usize,
    nodes_down: usize,
    nodes_removed: usize,
    regions: u64,
    regions_without_leader: u64,
    regions_unavailable: u64,
    keys: u64,
    bytes: u64,
    placement_leader_node: u64,
    max_id: u64,
    health: &'static str,
    routing_gaps: usize,
}

pub async fn run(conn: ConnArgs) -> Result<()> {
    let client = conn.connect(false).await?;
    let st = client.status().await?;
    let count = |want: &str| {
        st.nodes
            .iter()
            .filter(|n| state_name(n.state) == want)
            .count()
    };
    let (up, down, removed) = (count("up"), count("down"), count("removed"));
    let health = tessera::client::Health::of(&st);
    if conn.json {
        print_json(&StatusJson {
            cluster_id: st.cluster_id,
            nodes_up: up,
            nodes_down: down,
            nodes_removed: removed,
            regions: st.regions,
            regions_without_leader: st.regions_without_leader,
            regions_unavailable: st.regions_unavailable,
            keys: st.total_keys,
            bytes: st.total_bytes,
            placement_leader_node: st.placement_leader_node,
            max_id: st.max_id,
            health: health.as_str(),
            routing_gaps: st.routing_gaps.len(),
        });
        return Ok(());
    }
    println!("cluster {}: {}", st.cluster_id, health.as_str());
    println!("  nodes:    {up} up, {down} down, {removed} removed");
    println!(
        "  regions:  {} ({} without a leader, {} without a live majority)",
        st.regions, st.regions_without_leader, st.regions_unavailable
    );
    for g in &st.routing_gaps {
        println!(
            "  routing:  no region has reported keys [{}, {}) yet (- = keyspace edge); not counted above",
            hex(&g.start_key),
            hex(&g.end_key)
        );
    }
    println!(
        "  data:     {} keys, {} bytes in user regions (from periodic load reports: recent writes show later)",
        st.total_keys, st.total_bytes
    );
    println!("  placement leader: node {}", st.placement_leader_node);
    Ok(())
}
