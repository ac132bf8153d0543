//! `tessera alarm`: the cluster's alarms (NOSPACE: a node's data passed its space quota and
//! the cluster refuses writes), or disarm them.
//!
//! Invariants:
//! - listing is read-only; `disarm` removes alarm records only: a node still over its quota
//!   raises its alarm again within a heartbeat, as etcd's members do.

use serde::Serialize;
use tessera::ids::NodeId;

use super::{print_json, ConnArgs, Result};

#[derive(clap::Subcommand)]
pub enum AlarmOp {
    /// List the alarms standing (the default).
    List,
    /// Disarm the alarms (an admin call: needs --cert on a TLS cluster), after space was
    /// freed or the quota raised; prints those still standing.
    Disarm {
        /// Only this node's alarm.
        #[arg(long)]
        node: Option<NodeId>,
    },
}

#[derive(Serialize)]
struct AlarmJson<'a> {
    node_id: u64,
    kind: &'a str,
    raised_at_ms: u64,
    data_bytes: u64,
    quota_bytes: u64,
}

pub async fn run(conn: ConnArgs, op: Option<AlarmOp>) -> Result<()> {
    let client = conn.connect(false).await?;
    let alarms = match op.unwrap_or(AlarmOp::List) {
        AlarmOp::List => client.alarms().await?,
        AlarmOp::Disarm { node } => client.disarm_alarms(node).await?,
    };
    if conn.json {
        let items: Vec<AlarmJson> = alarms
            .iter()
            .map(|a| AlarmJson {
                node_id: a.node_id,
                kind: &a.kind,
                raised_at_ms: a.raised_at_ms,
                data_bytes: a.data_bytes,
                quota_bytes: a.quota_bytes,
            })
            .collect();
        print_json(&items);
        return Ok(());
    }
    if alarms.is_empty() {
        println!("no alarms");
    }
    for a in &alarms {
        println!(
            "node {}: {} ({} data bytes over a quota of {})",
            a.node_id, a.kind, a.data_bytes, a.quota_bytes
        );
    }
    Ok(())
}
