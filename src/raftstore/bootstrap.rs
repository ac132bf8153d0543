//! First start and restart of a node's store.
//!
//! The initial regions are the user keyspace split as configured, the placement region
//! `[0xFF, 0xFF 0xFF)` (placement's records), whose id counter is seeded here so that ids
//! handed out later never collide with the bootstrap ids, and the lease keyspace
//! `[0xFF 0xFF, +inf)` split evenly over lease ids into `cluster.lease_regions` regions.
//!
//! On the first start with an empty data directory every founding member computes the same
//! initial regions from the same config — same ranges, same region and peer ids — with no
//! coordination, writes the ones it hosts and its identity in one synced batch, and never
//! bootstraps again. Later starts load regions from disk and ignore the initial-cluster
//! settings. A data directory of another cluster or node is refused.
//!
//! Invariants:
//! - [`initial_regions`] depends only on the member ids (not their order), the split keys,
//!   the replica count and the number of lease regions: regions `1..=n` tile the keyspace,
//!   the placement region is `[0xFF, 0xFF 0xFF)`, the lease regions follow it, and peer ids
//!   count up from `n + 1`, never repeating;
//! - a store is bootstrapped at most once: its regions and identity go in one synced batch,
//!   and a store with an identity never bootstraps again;
//! - a store of another cluster or node, or one with regions but no identity, is refused;
//! - the placement id counter starts at the highest bootstrap id.

use crate::config::Member;
use crate::ids::{ClusterId, NodeId, RegionId};
use crate::proto::{Peer, PeerRole, PeerState, Region, RegionEpoch, RegionLocalState, StoreIdent};
use crate::storage::{keys, Cf, Engine, PeerStorage};

/// The initial regions of a cluster: `split_keys.len() + 1` user ranges, the placement
/// region and `lease_regions` lease regions, covering the keyspace, each on `replicas`
/// members (all when fewer), spread round-robin — except the placement region, which lives
/// on the first `replicas` members by id, so operators know where the cluster's metadata is
/// (docs/architecture.md, "Bootstrap and restart"). Region ids are `1..=n`; peer ids follow,
/// in region order.
pub fn initial_regions(
    members: &[Member],
    split_keys: &[Vec<u8>],
    replicas: u32,
    lease_regions: u32,
) -> Vec<Region> {
    let mut nodes: Vec<NodeId> = members.iter().map(|m| m.id).collect();
    nodes.sort();
    let mut split_keys: Vec<Vec<u8>> = split_keys
        .iter()
        .filter(|k| !keys::is_system_key(k))
        .cloned()
        .collect();
    split_keys.push(vec![keys::SYSTEM_KEY_PREFIX]);
    split_keys.push(tessera_api::keys::LEASE_KEYSPACE.to_vec());
    // Lease ids are below 2^63 (etcd's): split that range evenly.
    let leases = u64::from(lease_regions.max(1));
    for i in 1..leases {
        let first_id = (u128::from(i) << 63) / u128::from(leases);
        split_keys.push(tessera_api::keys::lease_key((first_id as u64).max(1)));
    }
    let n = split_keys.len() as u64 + 1;
    let r = (replicas as usize).min(nodes.len()).max(1);
    let mut next_peer = n + 1;
    let mut bounds = Vec::with_capacity(split_keys.len() + 2);
    bounds.push(Vec::new());
    bounds.extend(split_keys.iter().cloned());
    bounds.push(Vec::new());
    (0..n as usize)
        .map(|i| {
            let placement = bounds[i] == [keys::SYSTEM_KEY_PREFIX];
            let first = if placement { 0 } else { i };
            let peers = (0..r)
                .map(|j| {
                    let p = Peer {
                        id: next_peer,
                        node_id: nodes[(first + j) % nodes.len()].0,
                        role: PeerRole::Voter as i32,
                    };
                    next_peer += 1;
                    p
                })
                .collect();
            Region {
                id: i as u64 + 1,
                start_key: bounds[i].clone(),
                end_key: bounds[i + 1].clone(),
                epoch: Some(RegionEpoch {
                    conf_ver: 1,
                    version: 1,
                }),
                peers,
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::Error),
    #[error(
        "data directory belongs to cluster {found_cluster} node {found_node}, \
         but this node is configured as cluster {cluster} node {node}"
    )]
    WrongIdentity {
        found_cluster: u64,
        found_node: u64,
        cluster: u64,
        node: u64,
    },
    #[error("data directory holds regions but no node identity: refusing to guess")]
    NoIdentity,
}

/// Bootstraps an empty store or checks an existing one; returns the regions to host.
pub fn prepare_store(
    engine: &Engine,
    cluster: ClusterId,
    node: NodeId,
    members: &[Member],
    split_keys: &[Vec<u8>],
    replicas: u32,
    lease_regions: u32,
) -> Result<Vec<RegionId>, BootstrapError> {
    match engine.get_msg::<StoreIdent>(Cf::Raft, &keys::NODE_IDENT_KEY)? {
        Some(ident) if ident.cluster_id == cluster.0 && ident.node_id == node.0 => {}
        Some(ident) => {
            return Err(BootstrapError::WrongIdentity {
                found_cluster: ident.cluster_id,
                found_node: ident.node_id,
                cluster: cluster.0,
                node: node.0,
            })
        }
        None => {
            if !load_region_ids(engine)?.is_empty() {
                return Err(BootstrapError::NoIdentity);
            }
            let mut wb = engine.batch();
            let regions = initial_regions(members, split_keys, replicas, lease_regions);
            let mut hosted = 0;
            let max_id = regions
                .iter()
                .flat_map(|r| r.peers.iter().map(|p| p.id))
                .max()
                .unwrap_or(0);
            for r in regions
                .iter()
                .filter(|r| r.peers.iter().any(|p| p.node_id == node.0))
            {
                PeerStorage::write_initial_state(&mut wb, r);
                if r.start_key == [keys::SYSTEM_KEY_PREFIX] {
                    // Every replica of the placement region starts with the same counter.
                    seed_id_counter(&mut wb, max_id);
                }
                hosted += 1;
            }
            // The identity goes in the same batch: a crash leaves either nothing or all.
            put_ident(&mut wb, cluster, node);
            engine.write(wb, true)?;
            tracing::info!(%cluster, %node, regions = hosted, "bootstrapped new store");
        }
    }
    Ok(load_region_ids(engine)?)
}

/// The store's identity, if it has one.
pub fn store_ident(engine: &Engine) -> Result<Option<StoreIdent>, BootstrapError> {
    Ok(engine.get_msg::<StoreIdent>(Cf::Raft, &keys::NODE_IDENT_KEY)?)
}

/// Gives an empty store the identity a join handed out (no regions: they arrive later).
pub fn write_joined_ident(
    engine: &Engine,
    cluster: ClusterId,
    node: NodeId,
) -> Result<(), BootstrapError> {
    if !load_region_ids(engine)?.is_empty() {
        return Err(BootstrapError::NoIdentity);
    }
    let mut wb = engine.batch();
    put_ident(&mut wb, cluster, node);
    engine.write(wb, true)?;
    Ok(())
}

pub(crate) fn put_ident(wb: &mut crate::storage::WriteBatch<'_>, cluster: ClusterId, node: NodeId) {
    wb.put_msg(
        Cf::Raft,
        &keys::NODE_IDENT_KEY,
        &StoreIdent {
            cluster_id: cluster.0,
            node_id: node.0,
        },
    );
}

/// Every region with live (not tombstoned) state in this store.
pub fn load_region_ids(engine: &Engine) -> Result<Vec<RegionId>, crate::storage::Error> {
    let (start, end) = keys::region_meta_range();
    let mut out = Vec::new();
    engine.scan(Cf::Raft, &start, &end, |k, v| {
        let id = keys::decode_region_state_key(k)?;
        let st = <RegionLocalState as prost::Message>::decode(v)
            .map_err(|e| crate::storage::Error::corrupt(k, e))?;
        if st.state != PeerState::Tombstone as i32 {
            out.push(id);
        }
        Ok(true)
    })?;
    Ok(out)
}

/// Ends the stored sources of merges whose local target already took their range (the node
/// stopped between the target's commit and the source's end): their raft state goes, a
/// tombstone stays, their data is the target's. Returns the storages of the other regions.
pub fn end_merged_sources(
    engine: &Engine,
    storages: Vec<PeerStorage>,
) -> Result<Vec<PeerStorage>, crate::storage::Error> {
    let covered = |s: &PeerStorage| {
        let Some(target) = s.merge_state().map(|m| m.target_id).filter(|t| *t != 0) else {
            return false;
        };
        let r = s.region();
        storages.iter().any(|t| {
            t.region_id().0 == target
                && t.is_initialized()
                && crate::raftstore::store::overlaps(
                    &t.region().start_key,
                    &t.region().end_key,
                    &r.start_key,
                    &r.end_key,
                )
        })
    };
    let ended: Vec<bool> = storages.iter().map(covered).collect();
    let mut wb = engine.batch();
    let mut out = Vec::with_capacity(storages.len());
    for (mut s, end) in storages.into_iter().zip(ended) {
        if end {
            tracing::info!(region = %s.region_id(), "merged region ended at start-up");
            s.destroy(&mut wb, false);
        } else {
            out.push(s);
        }
    }
    if !wb.is_empty() {
        engine.write(wb, true)?;
    }
    Ok(out)
}

/// Writes placement's initial id counter (the highest id bootstrap used) into the placement
/// region's data: every replica of it starts with the same counter.
pub(crate) fn seed_id_counter(wb: &mut crate::storage::WriteBatch<'_>, max_bootstrap_id: u64) {
    let rec = crate::proto::KvRecord {
        value: max_bootstrap_id.to_be_bytes().to_vec(),
        create_revision: crate::storage::peer_storage::RAFT_INIT_LOG_INDEX,
        mod_revision: crate::storage::peer_storage::RAFT_INIT_LOG_INDEX,
        version: 1,
        lease: 0,
    };
    wb.put_msg(Cf::Data, &keys::data_key(&keys::ids_key()), &rec);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u64) -> Vec<Member> {
        (1..=n)
            .map(|i| Member {
                id: NodeId(i),
                addr: format!("127.0.0.1:{}", 20000 + i).parse().unwrap(),
            })
            .collect()
    }

    #[test]
    fn initial_regions_are_deterministic_and_cover_the_keyspace() {
        let splits: Vec<Vec<u8>> = vec![b"b".to_vec(), b"m".to_vec(), b"t".to_vec()];
        let a = initial_regions(&members(3), &splits, 3, 2);
        let mut shuffled = members(3);
        shuffled.reverse();
        assert_eq!(a, initial_regions(&shuffled, &splits, 3, 2));
        assert_eq!(
            a.len(),
            7,
            "4 user regions, the placement region, 2 lease regions"
        );
        assert_eq!(a[4].start_key, vec![0xFF]);
        assert_eq!(a[4].end_key, vec![0xFF, 0xFF]);
        assert_eq!(a[6].start_key, tessera_api::keys::lease_key(1 << 62));
        assert!(a[0].start_key.is_empty() && a[6].end_key.is_empty());
        for w in a.windows(2) {
            assert_eq!(w[0].end_key, w[1].start_key);
        }
        let mut peer_ids: Vec<u64> = a
            .iter()
            .flat_map(|r| r.peers.iter().map(|p| p.id))
            .collect();
        peer_ids.sort();
        peer_ids.dedup();
        assert_eq!(peer_ids.len(), 21, "peer ids are unique");
        assert!(
            peer_ids.iter().all(|p| *p > 7),
            "peer ids never clash with region ids"
        );
        for r in &a {
            let mut nodes: Vec<u64> = r.peers.iter().map(|p| p.node_id).collect();
            nodes.sort();
            assert_eq!(nodes, vec![1, 2, 3]);
        }
    }

    #[test]
    fn many_lease_regions_tile_the_lease_keyspace() {
        for leases in [1, 3, 4, 7, 64] {
            let a = initial_regions(&members(3), &[], 3, leases);
            assert_eq!(a.len(), 2 + leases as usize);
            for w in a.windows(2) {
                assert_eq!(w[0].end_key, w[1].start_key);
                assert!(
                    w[1].end_key.is_empty() || w[1].start_key < w[1].end_key,
                    "{leases}"
                );
            }
            let ids: Vec<u64> = a[2..]
                .iter()
                .skip(1)
                .filter_map(|r| tessera_api::keys::parse_lease_key(&r.start_key))
                .collect();
            assert_eq!(ids.len(), leases as usize - 1, "{leases}");
            assert!(ids.iter().all(|id| *id < 1 << 63), "{leases}: {ids:?}");
        }
    }

    #[test]
    fn fewer_replicas_spread_round_robin() {
        let a = initial_regions(&members(5), &[b"a".to_vec(), b"b".to_vec()], 3, 1);
        let nodes: Vec<Vec<u64>> = a
            .iter()
            .map(|r| r.peers.iter().map(|p| p.node_id).collect())
            .collect();
        assert_eq!(
            nodes,
            vec![
                vec![1, 2, 3],
                vec![2, 3, 4],
                vec![3, 4, 5],
                vec![1, 2, 3],
                vec![5, 1, 2]
            ],
            "user and lease regions round-robin, the placement region on the first voters"
        );
        let single = initial_regions(&members(1), &[], 3, 1);
        assert_eq!(
            single.len(),
            3,
            "one user region, the placement and the lease region"
        );
        assert_eq!(single[0].peers.len(), 1);
    }

    #[test]
    fn store_identity_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &Default::default()).unwrap();
        let m = members(3);
        let ids =
            prepare_store(&engine, ClusterId(1), NodeId(2), &m, &[b"k".to_vec()], 3, 1).unwrap();
        assert_eq!(
            ids,
            vec![RegionId(1), RegionId(2), RegionId(3), RegionId(4)]
        );
        // Restart: same regions, no second bootstrap even if the config changed.
        let again = prepare_store(&engine, ClusterId(1), NodeId(2), &m, &[], 3, 1).unwrap();
        assert_eq!(again, ids);
        let e = prepare_store(&engine, ClusterId(9), NodeId(2), &m, &[], 3, 1).unwrap_err();
        assert!(matches!(e, BootstrapError::WrongIdentity { .. }), "{e}");
        let e = prepare_store(&engine, ClusterId(1), NodeId(3), &m, &[], 3, 1).unwrap_err();
        assert!(e.to_string().contains("node 2"), "{e}");
    }
}
