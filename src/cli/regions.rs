//! `tessera regions`: list the regions, or split, merge, move or change one.
//!
//! Invariants:
//! - region boundaries are printed in hex (`-` for the keyspace's edge), never as raw bytes;
//! - a change prints the region as the cluster answered after applying it, not as asked;
//! - `transfer-leader` and `move` report success only once the change shows (`move` waits
//!   up to 10 minutes, `transfer-leader` up to the client's deadline).

use serde::Serialize;
use tessera::ids::{NodeId, RegionId};
use tessera::proto::{PeerChangeKind, PeerRole, Region};

use super::{decode_hex, hex, print_json, ConnArgs, Result};

#[derive(clap::Subcommand)]
pub enum RegionsOp {
    /// Hand the leadership of REGION to its replica on NODE, and wait until it has moved.
    TransferLeader {
        region_id: RegionId,
        node_id: NodeId,
    },
    /// Split the region holding KEY so that a new region starts at KEY (UTF-8, or hex with
    /// --hex). Regions also split by themselves past the [region] size limits.
    Split {
        key: String,
        /// KEY is hex-encoded bytes.
        #[arg(long)]
        hex: bool,
    },
    /// Merge two adjacent regions with replicas on the same nodes: LEFT takes RIGHT's range
    /// and keeps its id, RIGHT ends (waits up to 2 minutes; run again to finish a merge that
    /// was interrupted). Small idle regions also merge by themselves below the [region]
    /// merge limits.
    Merge { left: RegionId, right: RegionId },
    /// Move REGION's replica on node FROM to node TO: a learner is added on TO and caught up
    /// (by snapshot), then promoted while FROM's replica is removed, in one joint change.
    Move {
        region_id: RegionId,
        from: NodeId,
        to: NodeId,
    },
    /// Add a replica of REGION on NODE (a voter, or a learner with --learner).
    AddPeer {
        region_id: RegionId,
        node_id: NodeId,
        #[arg(long)]
        learner: bool,
    },
    /// Remove REGION's replica on NODE (transfer leadership away from NODE first).
    RemovePeer {
        region_id: RegionId,
        node_id: NodeId,
    },
}

#[derive(Serialize)]
struct Transferred {
    region: u64,
    leader_node: u64,
}

#[derive(Serialize)]
struct Changed {
    region: u64,
    conf_ver: u64,
    nodes: Vec<u64>,
}

#[derive(Serialize)]
struct SplitPart {
    region: u64,
    start: String,
    end: String,
    version: u64,
}

#[derive(Serialize)]
struct PeerJson {
    id: u64,
    node: u64,
}

#[derive(Serialize)]
struct RouteJson {
    id: u64,
    start: String,
    end: String,
    version: u64,
    conf_ver: u64,
    leader_node: Option<u64>,
    peers: Vec<PeerJson>,
    keys: u64,
    bytes: u64,
    writes_per_sec: f64,
}

pub async fn run(conn: ConnArgs, op: Option<RegionsOp>) -> Result<()> {
    let client = conn.connect(false).await?;
    let changed = match op {
        None => return list(&conn, &client).await,
        Some(RegionsOp::TransferLeader { region_id, node_id }) => {
            client.transfer_leader(region_id, node_id).await?;
            let (region_id, node_id) = (region_id.get(), node_id.get());
            if conn.json {
                print_json(&Transferred {
                    region: region_id,
                    leader_node: node_id,
                });
            } else {
                println!("region {region_id} is now led from node {node_id}");
            }
            return Ok(());
        }
        Some(RegionsOp::Split { key, hex: is_hex }) => {
            let key = if is_hex {
                decode_hex(&key)?
            } else {
                key.into_bytes()
            };
            return print_split(&conn, client.split(&key).await?);
        }
        Some(RegionsOp::Merge { left, right }) => {
            let timeout = std::time::Duration::from_secs(120);
            let merged = client.merge_regions(right, left, timeout).await?;
            return print_split(&conn, vec![merged]);
        }
        Some(RegionsOp::Move {
            region_id,
            from,
            to,
        }) => {
            client
                .move_replica(
                    region_id,
                    Some(from),
                    to,
                    std::time::Duration::from_secs(600),
                )
                .await?
        }
        Some(RegionsOp::AddPeer {
            region_id,
            node_id,
            learner,
        }) => {
            let kind = if learner {
                PeerChangeKind::AddLearner
            } else {
                PeerChangeKind::AddVoter
            };
            client.change_peers(region_id, &[(kind, node_id)]).await?
        }
        Some(RegionsOp::RemovePeer { region_id, node_id }) => {
            client
                .change_peers(region_id, &[(PeerChangeKind::Remove, node_id)])
                .await?
        }
    };
    let epoch = changed.epoch.unwrap_or_default();
    if conn.json {
        print_json(&Changed {
            region: changed.id,
            conf_ver: epoch.conf_ver,
            nodes: changed.peers.iter().map(|p| p.node_id).collect(),
        });
    } else {
        let peers: Vec<String> = changed
            .peers
            .iter()
            .map(|p| {
                let learner = p.role == PeerRole::Learner as i32;
                format!("{}{}", p.node_id, if learner { "(learner)" } else { "" })
            })
            .collect();
        println!(
            "region {} now on nodes {} (conf_ver {})",
            changed.id,
            peers.join(", "),
            epoch.conf_ver
        );
    }
    Ok(())
}

fn print_split(conn: &ConnArgs, regions: Vec<Region>) -> Result<()> {
    for r in regions {
        let epoch = r.epoch.unwrap_or_default();
        if conn.json {
            print_json(&SplitPart {
                region: r.id,
                start: hex(&r.start_key),
                end: hex(&r.end_key),
                version: epoch.version,
            });
        } else {
            println!(
                "region {:>6}  [{}, {})  version {}",
                r.id,
                hex(&r.start_key),
                hex(&r.end_key),
                epoch.version
            );
        }
    }
    Ok(())
}

async fn list(conn: &ConnArgs, client: &tessera::client::Client) -> Result<()> {
    let routes = client.routes().await?;
    if conn.json {
        let items: Vec<RouteJson> = routes
            .iter()
            .filter_map(|route| {
                let r = route.region.as_ref()?;
                let load = route.load.unwrap_or_default();
                let epoch = r.epoch.unwrap_or_default();
                Some(RouteJson {
                    id: r.id,
                    start: hex(&r.start_key),
                    end: hex(&r.end_key),
                    version: epoch.version,
                    conf_ver: epoch.conf_ver,
                    leader_node: route.leader.as_ref().map(|l| l.node_id),
                    peers: r
                        .peers
                        .iter()
                        .map(|p| PeerJson {
                            id: p.id,
                            node: p.node_id,
                        })
                        .collect(),
                    keys: load.keys,
                    bytes: load.bytes,
                    writes_per_sec: load.writes_per_sec,
                })
            })
            .collect();
        print_json(&items);
        return Ok(());
    }
    println!(
        "{:>8}  {:<12}  {:<12}  {:>7}  {:>6}  {:>8}  {:>10}  {:>8}  NODES",
        "REGION", "START", "END", "EPOCH", "LEADER", "KEYS", "BYTES", "WRITES/S"
    );
    for route in &routes {
        let Some(r) = route.region.as_ref() else {
            continue;
        };
        let e = r.epoch.unwrap_or_default();
        let load = route.load.unwrap_or_default();
        let nodes: Vec<String> = r.peers.iter().map(|p| p.node_id.to_string()).collect();
        println!(
            "{:>8}  {:<12}  {:<12}  {:>7}  {:>6}  {:>8}  {:>10}  {:>8.1}  {}",
            r.id,
            hex(&r.start_key),
            hex(&r.end_key),
            format!("{}/{}", e.conf_ver, e.version),
            route
                .leader
                .as_ref()
                .map_or("?".into(), |l| l.node_id.to_string()),
            load.keys,
            load.bytes,
            load.writes_per_sec,
            nodes.join(",")
        );
    }
    println!("{} regions", routes.len());
    Ok(())
}
