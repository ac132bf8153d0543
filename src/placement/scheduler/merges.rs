//! Which regions the scheduler merges: two adjacent user regions, both below `[region]
//! merge_below_keys` and `merge_below_bytes` and idle (no write since their last report),
//! one operation per round. Replicas are aligned first: while the two are on different
//! nodes, one replica of the right region moves to a node of the left one; once they are on
//! the same nodes, the right merges into the left. A pure function, like the rest of the
//! plan.

use std::collections::HashSet;

use super::{Nodes, Op};
use crate::ids::{NodeId, RegionId};
use crate::proto::{PeerRole, Region, RegionRoute};
use crate::storage::keys;

/// The limits below which adjacent idle regions merge (`below_keys` 0 = never).
#[derive(Clone, Copy, Debug, Default)]
pub struct MergeLimits {
    pub below_keys: u64,
    pub below_bytes: u64,
}

impl MergeLimits {
    fn small_and_idle(&self, r: &RegionRoute) -> bool {
        let load = r.load.unwrap_or_default();
        load.keys < self.below_keys
            && (self.below_bytes == 0 || load.bytes < self.below_bytes)
            && load.writes_per_sec == 0.0
    }
}

fn voter_nodes(r: &Region) -> Option<Vec<u64>> {
    let mut n = Vec::with_capacity(r.peers.len());
    for p in &r.peers {
        if p.role != PeerRole::Voter as i32 {
            return None;
        }
        n.push(p.node_id);
    }
    n.sort_unstable();
    Some(n)
}

/// The operation to start this round, if any, for the leftmost pair that qualifies: the
/// right region merging into the left, or, while their nodes differ (same replica count),
/// a replica of the right region moving to a node of the left. Regions with an operation in
/// flight or cooling down (`skip`), without a leader, or with a replica on a node not live
/// are left alone.
pub fn plan_merge(
    routes: &[RegionRoute],
    nodes: &Nodes,
    limits: MergeLimits,
    skip: &HashSet<u64>,
) -> Option<Op> {
    if limits.below_keys == 0 {
        return None;
    }
    let ok = |r: &RegionRoute| {
        let Some(region) = &r.region else {
            return false;
        };
        !keys::is_system_key(&region.start_key)
            && r.leader.is_some()
            && !skip.contains(&region.id)
            && region.peers.iter().all(|p| nodes.live.contains(&p.node_id))
            && limits.small_and_idle(r)
    };
    routes.windows(2).find_map(|w| {
        let (l, r) = (w[0].region.as_ref()?, w[1].region.as_ref()?);
        let adjacent = !l.end_key.is_empty() && l.end_key == r.start_key;
        if !(adjacent && ok(&w[0]) && ok(&w[1])) {
            return None;
        }
        let (ln, rn) = (voter_nodes(l)?, voter_nodes(r)?);
        if ln == rn {
            return Some(Op::Merge {
                source: RegionId(r.id),
                target: RegionId(l.id),
            });
        }
        if ln.len() != rn.len() {
            return None;
        }
        let from = rn.iter().find(|n| !ln.contains(n))?;
        let to = ln.iter().find(|n| !rn.contains(n))?;
        Some(Op::Move {
            region: RegionId(r.id),
            from: Some(NodeId(*from)),
            to: NodeId(*to),
        })
    })
}

/// The two regions the next merge is for, picked ignoring cool-downs (an alignment move
/// cools its region down): the scheduler leaves them out of balancing, which would move
/// their replicas apart again while the merge aligns them.
pub fn merging_pair(routes: &[RegionRoute], nodes: &Nodes, limits: MergeLimits) -> Vec<u64> {
    match plan_merge(routes, nodes, limits, &HashSet::new()) {
        Some(Op::Merge { source, target }) => vec![source.get(), target.get()],
        Some(Op::Move { region, .. }) => {
            let left = routes.windows(2).find_map(|w| {
                let (l, r) = (w[0].region.as_ref()?, w[1].region.as_ref()?);
                (r.id == region.get()).then_some(l.id)
            });
            std::iter::once(region.get()).chain(left).collect()
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Peer, RegionLoad};

    fn route(id: u64, start: &[u8], end: &[u8], nodes: &[u64], keys: u64) -> RegionRoute {
        RegionRoute {
            region: Some(Region {
                id,
                start_key: start.to_vec(),
                end_key: end.to_vec(),
                peers: nodes
                    .iter()
                    .map(|n| Peer {
                        id: id * 10 + n,
                        node_id: *n,
                        role: PeerRole::Voter as i32,
                    })
                    .collect(),
                ..Default::default()
            }),
            leader: Some(Peer {
                id: id * 10 + nodes[0],
                node_id: nodes[0],
                role: PeerRole::Voter as i32,
            }),
            load: Some(RegionLoad {
                keys,
                bytes: keys * 100,
                writes_per_sec: 0.0,
            }),
            ..Default::default()
        }
    }

    fn live() -> Nodes {
        Nodes {
            live: vec![1, 2, 3, 4],
            ..Default::default()
        }
    }

    #[test]
    fn merges_only_small_idle_neighbours_on_the_same_nodes() {
        let limits = MergeLimits {
            below_keys: 100,
            below_bytes: 0,
        };
        let none = HashSet::new();
        let routes = vec![
            route(1, b"", b"b", &[1, 2, 3], 500),
            route(2, b"b", b"c", &[1, 2, 3], 10),
            route(3, b"c", b"d", &[2, 3, 4], 10),
            route(4, b"d", b"e", &[2, 3, 4], 10),
            route(5, b"e", &[0xFF], &[2, 3, 4], 10),
            route(6, &[0xFF], &[0xFF, 0xFF], &[2, 3, 4], 0),
        ];
        // 1 is too big; 2 and 3 are on different nodes: 3's replica on node 4 moves to
        // node 1 first.
        let want = Op::Move {
            region: RegionId(3),
            from: Some(NodeId(4)),
            to: NodeId(1),
        };
        assert_eq!(plan_merge(&routes, &live(), limits, &none), Some(want));
        // With 2 busy, 3 takes 4, the leftmost pair on the same nodes.
        let skip2: HashSet<u64> = [2].into();
        let want = Op::Merge {
            source: RegionId(4),
            target: RegionId(3),
        };
        assert_eq!(plan_merge(&routes, &live(), limits, &skip2), Some(want));
        // Busy regions are skipped; the placement region never merges.
        let skip: HashSet<u64> = [2, 3].into();
        let want = Op::Merge {
            source: RegionId(5),
            target: RegionId(4),
        };
        assert_eq!(plan_merge(&routes, &live(), limits, &skip), Some(want));
        let skip: HashSet<u64> = [2, 3, 4].into();
        assert_eq!(plan_merge(&routes, &live(), limits, &skip), None);
        // A write since the last report, or merging off, and nothing merges.
        let mut busy = routes.clone();
        for r in &mut busy {
            r.load.as_mut().unwrap().writes_per_sec = 1.0;
        }
        assert_eq!(plan_merge(&busy, &live(), limits, &none), None);
        assert_eq!(
            plan_merge(&routes, &live(), MergeLimits::default(), &none),
            None
        );
    }
}
