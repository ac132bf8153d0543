//! `tessera nodes`: the placement registry's nodes, or remove one.
//!
//! Invariants:
//! - listing is read-only; `remove` only marks the node removed in the placement registry
//!   and moves none of its replicas (the scheduler, when enabled, replaces them).

use serde::Serialize;
use tessera::ids::NodeId;

use super::{print_json, state_name, ConnArgs, Result};

#[derive(clap::Subcommand)]
pub enum NodesOp {
    /// Mark a node removed: it stops serving and may never come back with its data. Its
    /// region replicas are not moved elsewhere by this command.
    Remove { node_id: NodeId },
}

#[derive(Serialize)]
struct Removed {
    removed: u64,
}

#[derive(Serialize)]
struct NodeJson<'a> {
    id: u64,
    addr: &'a str,
    state: &'static str,
    regions: u64,
    leaders: u64,
    heartbeat_age_ms: u64,
}

pub async fn run(conn: ConnArgs, op: Option<NodesOp>) -> Result<()> {
    let client = conn.connect(false).await?;
    if let Some(NodesOp::Remove { node_id }) = op {
        client.remove_node(node_id).await?;
        let node_id = node_id.get();
        if conn.json {
            print_json(&Removed { removed: node_id });
        } else {
            println!("node {node_id} marked removed");
        }
        return Ok(());
    }
    let nodes = client.nodes().await?;
    let records: Vec<_> = nodes
        .iter()
        .map(|n| (n, n.record.clone().unwrap_or_default()))
        .collect();
    if conn.json {
        let items: Vec<NodeJson> = records
            .iter()
            .map(|(n, r)| NodeJson {
                id: r.node_id,
                addr: &r.addr,
                state: state_name(n.state),
                regions: r.regions,
                leaders: r.leaders,
                heartbeat_age_ms: n.heartbeat_age_ms,
            })
            .collect();
        print_json(&items);
        return Ok(());
    }
    println!(
        "{:>4}  {:<22}  {:<7}  {:>7}  {:>7}  LAST HEARTBEAT",
        "ID", "ADDRESS", "STATE", "REGIONS", "LEADERS"
    );
    for (n, r) in &records {
        let age = if r.last_heartbeat_ms == 0 {
            "never".to_string()
        } else {
            format!("{:.1}s ago", n.heartbeat_age_ms as f64 / 1000.0)
        };
        println!(
            "{:>4}  {:<22}  {:<7}  {:>7}  {:>7}  {age}",
            r.node_id,
            r.addr,
            state_name(n.state),
            r.regions,
            r.leaders,
        );
    }
    Ok(())
}
