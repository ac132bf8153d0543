//! The scheduler: run by the node that leads the placement region, it keeps every region at
//! its replica count on distinct live nodes, replaces the replicas of nodes that stay down
//! (or were removed), and balances replicas and then leaders across nodes — at most
//! `max_moves` replica moves (each a snapshot) at a time, so a joining node never causes a
//! snapshot storm.
//!
//! Each round reads the node registry and the routing table, plans with the pure function
//! [`plan`], and hands the operations to the regions' leaders through the client library
//! (`MoveReplica`, `TransferLeader`), which follows leaders and retries. A region touched by
//! an operation is left alone for a cool-down, so a routing table that has not caught up
//! yet never causes a second, contradicting move.
//!
//! Invariants:
//! - a round acts only while the routing table shows this node leading the placement
//!   region;
//! - replica moves in flight never exceed `max_moves`; a region gets at most one operation
//!   per round, and none while one is in flight or cooling down;
//! - replicas go only to live nodes without a replica of the region, leadership only to a
//!   voter on a live node;
//! - repairs come first: balancing is planned only in rounds that plan no repair;
//! - [`plan`] is pure: the same routes, nodes and limits give the same operations.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ids::{NodeId, RegionId};
use crate::placement::client::SystemClient;
use crate::proto::{NodeRecord, PeerRole, RegionRoute};

mod merges;
pub use merges::MergeLimits;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub enabled: bool,
    pub interval: Duration,
    pub replicas: usize,
    /// A node without heartbeat for this long is down (not a target, leaders move off it).
    pub down_after: Duration,
    /// A node down for this long (or removed) has its replicas replaced.
    pub replace_after: Duration,
    pub max_moves: usize,
    /// When adjacent idle regions merge.
    pub merges: MergeLimits,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Move the replica on `from` to `to` (`from` `None`: add a replica on `to`).
    Move {
        region: RegionId,
        from: Option<NodeId>,
        to: NodeId,
    },
    TransferLeader {
        region: RegionId,
        to: NodeId,
    },
    /// Merge `source` into `target`, its left neighbour.
    Merge {
        source: RegionId,
        target: RegionId,
    },
}

impl Op {
    fn regions(&self) -> Vec<u64> {
        match self {
            Op::Move { region, .. } | Op::TransferLeader { region, .. } => vec![region.get()],
            Op::Merge { source, target } => vec![source.get(), target.get()],
        }
    }
}

/// Node states as the scheduler sees them.
#[derive(Clone, Debug, Default)]
pub struct Nodes {
    /// Up: may receive replicas and leaders.
    pub live: Vec<u64>,
    /// Down for longer than `replace_after`, or removed: their replicas are replaced.
    pub dead: Vec<u64>,
}

pub fn classify(records: &[NodeRecord], now_ms: u64, cfg: &SchedulerConfig) -> Nodes {
    let mut n = Nodes::default();
    for r in records {
        let age = now_ms.saturating_sub(r.last_heartbeat_ms);
        if r.removed || (r.last_heartbeat_ms > 0 && age > cfg.replace_after.as_millis() as u64) {
            n.dead.push(r.node_id);
        } else if r.last_heartbeat_ms > 0 && age <= cfg.down_after.as_millis() as u64 {
            n.live.push(r.node_id);
        }
    }
    n.live.sort();
    n.dead.sort();
    n
}

/// A node that never heartbeated (a member of the initial cluster that died before its first
/// heartbeat landed — it may not even have a record among `hosts`, the nodes holding
/// replicas — or a joiner that crashed) would be neither live nor dead forever, and its
/// replicas never replaced: count its life from when this scheduler first saw it.
fn assume_alive_from_first_sight(
    mut records: Vec<NodeRecord>,
    hosts: &HashSet<u64>,
    first_seen: &mut HashMap<u64, u64>,
    now_ms: u64,
) -> Vec<NodeRecord> {
    for id in hosts {
        if !records.iter().any(|r| r.node_id == *id) {
            records.push(NodeRecord {
                node_id: *id,
                ..Default::default()
            });
        }
    }
    first_seen.retain(|id, _| {
        records
            .iter()
            .any(|r| r.node_id == *id && r.last_heartbeat_ms == 0)
    });
    for r in records.iter_mut().filter(|r| r.last_heartbeat_ms == 0) {
        r.last_heartbeat_ms = *first_seen.entry(r.node_id).or_insert(now_ms);
    }
    records
}

/// How far apart two nodes' counts may be before balancing moves something: one, or 5% of
/// the average at scale (10,000 regions never split exactly evenly, and every transfer
/// wakes a sleeping region).
fn tolerance(counts: &BTreeMap<u64, usize>) -> usize {
    let avg = counts.values().sum::<usize>() / counts.len().max(1);
    (avg / 20).max(1)
}

/// Plans at most `budget` replica moves and a few leader transfers. Replica and leader
/// balance act when the fullest and emptiest node differ by more than [`tolerance`]. Regions in `skip` are
/// busy (an operation in flight or just finished).
pub fn plan(
    routes: &[RegionRoute],
    nodes: &Nodes,
    replicas: usize,
    skip: &HashSet<u64>,
    budget: usize,
) -> Vec<Op> {
    let mut ops = Vec::new();
    if nodes.live.is_empty() {
        return ops;
    }
    let mut count: BTreeMap<u64, usize> = nodes.live.iter().map(|n| (*n, 0)).collect();
    let mut leaders: BTreeMap<u64, usize> = count.clone();
    for r in routes {
        let Some(region) = &r.region else { continue };
        for p in &region.peers {
            if let Some(c) = count.get_mut(&p.node_id) {
                *c += 1;
            }
        }
        if let Some(c) = r.leader.and_then(|l| leaders.get_mut(&l.node_id)) {
            *c += 1;
        }
    }
    let least_loaded = |count: &BTreeMap<u64, usize>, exclude: &[u64]| {
        count
            .iter()
            .filter(|(n, _)| !exclude.contains(n))
            .min_by_key(|(n, c)| (**c, **n))
            .map(|(n, _)| *n)
    };
    let want = replicas.min(nodes.live.len() + nodes.dead.len()).max(1);
    // 1. Repairs: replicas on dead nodes, and regions with too few replicas.
    for r in routes {
        if ops.len() >= budget {
            return ops;
        }
        let Some(region) = &r.region else { continue };
        if skip.contains(&region.id) {
            continue;
        }
        let on: Vec<u64> = region.peers.iter().map(|p| p.node_id).collect();
        let voters = region
            .peers
            .iter()
            .filter(|p| p.role == PeerRole::Voter as i32)
            .count();
        let from = on.iter().find(|n| nodes.dead.contains(n)).copied();
        let from = match from {
            Some(f) => Some(NodeId(f)),
            None if voters < want && on.len() < nodes.live.len() => None,
            None => continue,
        };
        if let Some(to) = least_loaded(&count, &on) {
            *count.entry(to).or_default() += 1;
            ops.push(Op::Move {
                region: RegionId(region.id),
                from,
                to: NodeId(to),
            });
        }
    }
    if !ops.is_empty() {
        return ops;
    }
    // 2. Replica balance: one move from the fullest to the emptiest node.
    if budget > 0 {
        let max = count
            .iter()
            .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)));
        let min = count.iter().min_by_key(|(n, c)| (**c, **n));
        if let (Some((&hi, &hc)), Some((&lo, &lc))) = (max, min) {
            if hc > lc + tolerance(&count) {
                let pick = routes
                    .iter()
                    .filter_map(|r| r.region.as_ref())
                    .find(|region| {
                        !skip.contains(&region.id)
                            && region.peers.iter().any(|p| p.node_id == hi)
                            && !region.peers.iter().any(|p| p.node_id == lo)
                    });
                if let Some(region) = pick {
                    ops.push(Op::Move {
                        region: RegionId(region.id),
                        from: Some(NodeId(hi)),
                        to: NodeId(lo),
                    });
                    return ops;
                }
            }
        }
    }
    // 3. Leader balance: up to 16 transfers per round (each is one message to a region's
    // leader), each from the node leading most to a voter on the node leading fewest.
    for _ in 0..16 {
        let max = leaders
            .iter()
            .max_by_key(|(n, c)| (**c, std::cmp::Reverse(**n)));
        let min = leaders.iter().min_by_key(|(n, c)| (**c, **n));
        let (Some((&hi, &hc)), Some((&lo, &lc))) = (max, min) else {
            break;
        };
        if hc <= lc + tolerance(&leaders) {
            break;
        }
        let pick = routes.iter().find(|r| {
            r.leader.is_some_and(|l| l.node_id == hi)
                && r.region.as_ref().is_some_and(|region| {
                    !skip.contains(&region.id)
                        && !ops.iter().any(|o: &Op| o.regions().contains(&region.id))
                        && region
                            .peers
                            .iter()
                            .any(|p| p.node_id == lo && p.role == PeerRole::Voter as i32)
                })
        });
        let Some(r) = pick else { break };
        ops.push(Op::TransferLeader {
            region: RegionId(r.region.as_ref().map_or(0, |x| x.id)),
            to: NodeId(lo),
        });
        *leaders.entry(hi).or_default() -= 1;
        *leaders.entry(lo).or_default() += 1;
    }
    ops
}

pub async fn schedule_loop(placement: SystemClient, me: NodeId, cfg: SchedulerConfig) {
    if !cfg.enabled {
        return;
    }
    let busy: Arc<Mutex<HashMap<u64, Option<Instant>>>> = Arc::default();
    let cooldown = Duration::from_secs(3).max(cfg.interval * 3);
    let mut ticker = tokio::time::interval(cfg.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A balanced cluster is looked at less and less often (up to every 32 rounds): the
    // routing table is 10,000 rows at scale. A change of node states looks at once.
    let mut quiet_rounds = 0u32;
    let mut skip_rounds = 0u32;
    let mut last_nodes: Option<(Vec<u64>, Vec<u64>)> = None;
    let mut was_leading = false;
    let mut first_seen: HashMap<u64, u64> = HashMap::new();
    // Nodes holding replicas, as of the last routing-table read.
    let mut hosts: HashSet<u64> = HashSet::new();
    loop {
        ticker.tick().await;
        let Ok(client) = placement.get().await else {
            continue;
        };
        let placement_route =
            crate::placement::locate_key(&client, &[crate::storage::keys::SYSTEM_KEY_PREFIX]).await;
        let leads_placement = matches!(
            &placement_route,
            Ok(Some(r)) if r.leader.is_some_and(|l| l.node_id == me.0)
        );
        if leads_placement != was_leading {
            tracing::info!(
                active = leads_placement,
                route = ?placement_route.as_ref().map(|r| r.as_ref().map(|r| r.leader)),
                "scheduler"
            );
            was_leading = leads_placement;
        }
        if !leads_placement {
            continue;
        }
        if let Ok(t) = crate::placement::route_table(&client).await {
            let leaderless = t.routes.iter().filter(|r| r.leader.is_none()).count();
            metrics::gauge!("tessera_cluster_regions").set(t.routes.len() as f64);
            metrics::gauge!("tessera_cluster_regions_without_leader").set(leaderless as f64);
            metrics::gauge!("tessera_cluster_routing_gaps").set(t.gaps.len() as f64);
        }
        let records = match crate::placement::node_records(&client).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "scheduler: node registry read failed");
                continue;
            }
        };
        let now = crate::placement::now_ms();
        let records = assume_alive_from_first_sight(records, &hosts, &mut first_seen, now);
        let nodes = classify(&records, now, &cfg);
        let node_states = Some((nodes.live.clone(), nodes.dead.clone()));
        if node_states != last_nodes {
            last_nodes = node_states;
            skip_rounds = 0;
        } else if skip_rounds > 0 {
            skip_rounds -= 1;
            continue;
        }
        // Every reported region, also those past a gap (a new region not reported yet).
        let routes = match crate::placement::route_table(&client).await {
            Ok(t) => t.routes,
            Err(e) => {
                tracing::debug!(error = %e, "scheduler: routing table read failed");
                continue;
            }
        };
        let now_hosting: HashSet<u64> = routes
            .iter()
            .filter_map(|r| r.region.as_ref())
            .flat_map(|r| r.peers.iter().map(|p| p.node_id))
            .collect();
        if now_hosting != hosts {
            hosts = now_hosting;
            // A node seen for the first time must be classified at once.
            skip_rounds = 0;
        }
        let (skip, in_flight) = {
            let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
            b.retain(|_, done| done.is_none_or(|t| t.elapsed() < cooldown));
            let in_flight = b.values().filter(|d| d.is_none()).count();
            (b.keys().copied().collect::<HashSet<u64>>(), in_flight)
        };
        let budget = cfg.max_moves.saturating_sub(in_flight);
        let merge = merges::plan_merge(&routes, &nodes, cfg.merges, &skip);
        let mut balance_skip = skip.clone();
        balance_skip.extend(merges::merging_pair(&routes, &nodes, cfg.merges));
        let mut ops = plan(&routes, &nodes, cfg.replicas, &balance_skip, budget);
        if ops.is_empty() && in_flight == 0 {
            ops.extend(merge);
        }
        tracing::debug!(
            live = ?nodes.live, dead = ?nodes.dead, regions = routes.len(), busy = skip.len(),
            ops = ops.len(), "scheduler round"
        );
        if ops.is_empty() && skip.is_empty() {
            quiet_rounds = (quiet_rounds + 1).min(5);
            skip_rounds = (1 << quiet_rounds) - 1;
        } else {
            quiet_rounds = 0;
        }
        for op in ops {
            {
                let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
                for region in op.regions() {
                    b.insert(region, None);
                }
            }
            let (client, busy) = (client.clone(), busy.clone());
            tokio::spawn(async move {
                let res = match &op {
                    Op::Move { region, from, to } => client
                        .move_replica(*region, *from, *to, Duration::from_secs(300))
                        .await
                        .map(|_| ()),
                    // Fire and forget: waiting would poll (and refresh) per transfer; the
                    // next rounds see the outcome in the routing table. A target that is not
                    // ready is refused as busy, which the client would retry to its deadline
                    // while the operation holds a slot: give it one second.
                    Op::TransferLeader { region, to } => tokio::time::timeout(
                        Duration::from_secs(1),
                        client.request_transfer_leader(*region, *to),
                    )
                    .await
                    .unwrap_or_else(|_| {
                        Err(tessera_client::Error::Unavailable(
                            "the leader did not take the transfer within 1 s".into(),
                        ))
                    }),
                    Op::Merge { source, target } => client
                        .merge_regions(*source, *target, Duration::from_secs(60))
                        .await
                        .map(|_| ()),
                };
                match res {
                    Ok(()) => {
                        metrics::counter!("tessera_scheduler_ops_total").increment(1);
                        tracing::info!(?op, "scheduled operation done");
                    }
                    Err(e) => tracing::warn!(?op, error = %e, "scheduled operation failed"),
                }
                let mut b = busy.lock().unwrap_or_else(|e| e.into_inner());
                for region in op.regions() {
                    b.insert(region, Some(Instant::now()));
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Peer, Region};

    fn route(id: u64, nodes: &[u64], leader: u64) -> RegionRoute {
        let peers: Vec<Peer> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| Peer {
                id: id * 10 + i as u64,
                node_id: *n,
                role: 0,
            })
            .collect();
        RegionRoute {
            leader: peers.iter().find(|p| p.node_id == leader).copied(),
            region: Some(Region {
                id,
                peers,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn nodes(live: &[u64], dead: &[u64]) -> Nodes {
        Nodes {
            live: live.to_vec(),
            dead: dead.to_vec(),
        }
    }

    #[test]
    fn dead_node_replicas_are_replaced_within_budget() {
        let routes: Vec<_> = (1..=4).map(|i| route(i, &[1, 2, 3], 1)).collect();
        let ops = plan(&routes, &nodes(&[1, 2, 4], &[3]), 3, &HashSet::new(), 2);
        assert_eq!(
            ops,
            vec![
                Op::Move {
                    region: RegionId(1),
                    from: Some(NodeId(3)),
                    to: NodeId(4)
                },
                Op::Move {
                    region: RegionId(2),
                    from: Some(NodeId(3)),
                    to: NodeId(4)
                },
            ]
        );
        // Busy regions are skipped.
        let skip: HashSet<u64> = [1, 2].into();
        let ops = plan(&routes, &nodes(&[1, 2, 4], &[3]), 3, &skip, 2);
        assert_eq!(
            ops[0],
            Op::Move {
                region: RegionId(3),
                from: Some(NodeId(3)),
                to: NodeId(4)
            }
        );
    }

    #[test]
    fn a_node_that_never_heartbeated_is_dead_after_the_limit() {
        let cfg = SchedulerConfig {
            enabled: true,
            interval: Duration::from_millis(300),
            down_after: Duration::from_secs(1),
            replace_after: Duration::from_secs(2),
            replicas: 3,
            max_moves: 2,
            merges: MergeLimits::default(),
        };
        let rec = |id, hb| NodeRecord {
            node_id: id,
            last_heartbeat_ms: hb,
            ..Default::default()
        };
        let mut seen = HashMap::new();
        let at = |t: u64, seen: &mut HashMap<u64, u64>| {
            let recs = vec![rec(1, t), rec(4, 0)];
            classify(
                &assume_alive_from_first_sight(recs, &HashSet::new(), seen, t),
                t,
                &cfg,
            )
        };
        let n = at(10_000, &mut seen);
        assert_eq!((n.live.clone(), n.dead.clone()), (vec![1, 4], vec![]));
        let n = at(12_001, &mut seen);
        assert_eq!((n.live.clone(), n.dead.clone()), (vec![1], vec![4]));
        // Once it heartbeats, its own time counts and the first sight is forgotten.
        let recs = vec![rec(1, 12_100), rec(4, 12_100)];
        let n = classify(
            &assume_alive_from_first_sight(recs, &HashSet::new(), &mut seen, 12_100),
            12_100,
            &cfg,
        );
        assert_eq!(n.live, vec![1, 4]);
        assert!(seen.is_empty());
    }

    #[test]
    fn under_replicated_regions_get_replicas() {
        let routes = vec![route(1, &[1], 1)];
        let ops = plan(&routes, &nodes(&[1, 2, 3], &[]), 3, &HashSet::new(), 4);
        assert_eq!(
            ops,
            vec![Op::Move {
                region: RegionId(1),
                from: None,
                to: NodeId(2)
            }]
        );
    }

    #[test]
    fn a_joined_node_gets_replicas_then_leaders() {
        let routes: Vec<_> = (1..=6).map(|i| route(i, &[1, 2, 3], 1 + i % 3)).collect();
        let ops = plan(&routes, &nodes(&[1, 2, 3, 4], &[]), 3, &HashSet::new(), 2);
        assert_eq!(ops.len(), 1, "{ops:?}");
        assert!(matches!(ops[0], Op::Move { to: NodeId(4), .. }), "{ops:?}");
        // Balanced replicas, unbalanced leaders: transfers.
        let routes: Vec<_> = (1..=6).map(|i| route(i, &[1, 2, 3], 1)).collect();
        let ops = plan(&routes, &nodes(&[1, 2, 3], &[]), 3, &HashSet::new(), 2);
        assert!(!ops.is_empty());
        assert!(
            ops.iter().all(|o| matches!(o, Op::TransferLeader { .. })),
            "{ops:?}"
        );
        // Balanced: nothing to do.
        let routes: Vec<_> = (1..=6).map(|i| route(i, &[1, 2, 3], 1 + i % 3)).collect();
        assert!(plan(&routes, &nodes(&[1, 2, 3], &[]), 3, &HashSet::new(), 2).is_empty());
    }

    #[test]
    fn node_states() {
        let cfg = SchedulerConfig {
            enabled: true,
            interval: Duration::from_secs(1),
            replicas: 3,
            down_after: Duration::from_secs(10),
            replace_after: Duration::from_secs(60),
            max_moves: 2,
            merges: MergeLimits::default(),
        };
        let rec = |id, hb, removed| NodeRecord {
            node_id: id,
            last_heartbeat_ms: hb,
            removed,
            ..Default::default()
        };
        let now = 1_000_000;
        let n = classify(
            &[
                rec(1, now - 1_000, false),
                rec(2, now - 20_000, false),
                rec(3, now - 100_000, false),
                rec(4, now, true),
                rec(5, 0, false),
            ],
            now,
            &cfg,
        );
        assert_eq!(n.live, vec![1]);
        assert_eq!(n.dead, vec![3, 4], "down too long, or removed");
    }
}
