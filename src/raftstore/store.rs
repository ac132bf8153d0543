//! What every peer of a node shares: the node's id, raft settings, logger, engine, and the
//! key ranges of the node's initialized regions.
//!
//! The range map keeps two regions of one node from ever owning overlapping data: a
//! snapshot, or a peer created from a message, whose range overlaps another local region is
//! refused (that region is stale and will shrink by applying a split or a snapshot first).
//!
//! Invariants:
//! - no two regions in the range map overlap: a claim, a snapshot or a peer creation that
//!   would overlap another local region is refused; a split records both halves under one
//!   lock, so no range is ever owned by neither;
//! - peers are created from messages one at a time, only for this node and a non-zero peer
//!   id, and never over a live region's state; a tombstone blocks re-creation unless the
//!   message's membership is newer and the peer id is new;
//! - [`StoreCtx::set_range`] and [`StoreCtx::restore_range`] check nothing: they record
//!   ranges their callers already own or claimed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::msg::{NewPeer, WorkerMsg};
use super::router::Router;
use crate::config::RaftConfig;
use crate::ids::{NodeId, RegionId};
use crate::proto::{self, PeerState, RegionLocalState};
use crate::storage::{keys, Cf, Engine, PeerStorage};

/// Region → the `[start, end)` it owns on this node.
type Ranges = HashMap<RegionId, (Vec<u8>, Vec<u8>)>;

#[derive(Clone)]
pub struct StoreCtx {
    pub node: NodeId,
    pub cfg: RaftConfig,
    pub logger: slog::Logger,
    pub engine: Engine,
    ranges: Arc<Mutex<Ranges>>,
    /// Serializes peer creation from messages (several streams may deliver at once).
    creating: Arc<Mutex<()>>,
    /// Peers of other nodes seen sending heartbeats: a peer that does not know its region's
    /// members yet (created empty, waiting for a snapshot) answers its leader through this.
    known_peers: Arc<Mutex<HashMap<u64, proto::Peer>>>,
    /// Lease views of this node's leaders, for reads served off the workers.
    pub reader: super::local_read::LocalReader,
    /// Watchers of the regions led here, fed by apply.
    pub hub: super::hub::WatchHub,
    /// The leases of the lease regions led here, fed by apply.
    pub lessor: super::lessor::Lessor,
    /// Merge sources to end, and their targets (see [`Self::end_merged`]).
    merged: Arc<Mutex<Vec<(RegionId, RegionId)>>>,
}

/// What keeps a peer from being created from a message: the region itself is already
/// recorded (`is_self`), or another local region overlaps its range.
#[derive(Debug)]
struct Blocker {
    region: RegionId,
    is_self: bool,
}

impl std::fmt::Display for Blocker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_self {
            write!(f, "{} is already recorded on this node", self.region)
        } else {
            write!(f, "local {} overlaps its range", self.region)
        }
    }
}

/// Whether `[s1, e1)` and `[s2, e2)` overlap (empty end = +infinity).
pub fn overlaps(s1: &[u8], e1: &[u8], s2: &[u8], e2: &[u8]) -> bool {
    (e2.is_empty() || s1 < e2) && (e1.is_empty() || s2 < e1)
}

impl StoreCtx {
    /// Asks the worker to end local sources of merges whose target's snapshot covers them
    /// (see [`Self::take_merged`]).
    pub fn end_merged(&self, source: RegionId, target: RegionId) {
        self.merged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((source, target));
    }

    /// The sources [`Self::end_merged`] named since the last call.
    pub fn take_merged(&self) -> Vec<(RegionId, RegionId)> {
        std::mem::take(&mut *self.merged.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn new(node: NodeId, cfg: RaftConfig, logger: slog::Logger, engine: Engine) -> Self {
        Self {
            node,
            cfg,
            logger,
            reader: super::local_read::LocalReader::new(engine.clone()),
            hub: Default::default(),
            lessor: Default::default(),
            engine,
            ranges: Arc::default(),
            creating: Arc::default(),
            known_peers: Arc::default(),
            merged: Arc::default(),
        }
    }

    /// Remembers the sender of a heartbeat.
    pub fn learn_peer(&self, p: proto::Peer) {
        let mut known = self.known_peers.lock().unwrap_or_else(|e| e.into_inner());
        if known.get(&p.id) != Some(&p) {
            known.insert(p.id, p);
        }
    }

    pub fn known_peer(&self, id: u64) -> Option<proto::Peer> {
        self.known_peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied()
    }

    /// Creates an empty peer `to` of `region` on this node, on a leader's heartbeat or a
    /// candidate's vote request (server/raft_service.rs says why both), when
    /// the node has no state of that region, or only a tombstone of an older membership
    /// that did not include `to` (re-added with a new peer id) — and no local region
    /// overlaps the range. Returns whether the region is now hosted here.
    pub fn maybe_create_peer(
        &self,
        router: &Router,
        region: RegionId,
        to: proto::Peer,
        epoch: proto::RegionEpoch,
        start: &[u8],
        end: &[u8],
    ) -> bool {
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|e| e.into_inner());
        if router.contains(region) {
            return true;
        }
        if to.node_id != self.node.0 || to.id == 0 {
            return false;
        }
        match self
            .engine
            .get_msg::<RegionLocalState>(Cf::Raft, &keys::region_state_key(region))
        {
            Ok(None) => {}
            Ok(Some(st)) if st.state == PeerState::Tombstone as i32 => {
                let old = st.region.unwrap_or_default();
                let old_conf = old.epoch.unwrap_or_default().conf_ver;
                if old_conf >= epoch.conf_ver || old.peers.iter().any(|p| p.id == to.id) {
                    metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "tombstone")
                        .increment(1);
                    return false;
                }
            }
            Ok(Some(_)) | Err(_) => return false,
        }
        // One look at the range map, under its lock: a split applying on a worker records
        // both of its halves in one step (`split_range`), so this sees the parent still
        // covering the range or the new region already present, never neither. A region
        // with an entry is being created here by its split (its state is in a batch not yet
        // written, its peer not yet registered): a second, empty peer would replace it or,
        // on another worker, run beside it with the same peer id.
        if let Err(why) = self.may_create(region, start, end) {
            tracing::debug!(%region, %why, "not creating a peer from a message");
            if why.is_self {
                metrics::counter!("tessera_peer_creations_refused_total", "reason" => "recorded")
                    .increment(1);
            }
            return false;
        }
        let mut wb = self.engine.batch();
        let storage =
            PeerStorage::create_uninitialized(self.engine.clone(), region, to, epoch, &mut wb);
        if let Err(e) = self.engine.write(wb, false) {
            tracing::warn!(%region, error = %e, "cannot create peer");
            return false;
        }
        let w = router.worker_for(region);
        router.send_worker(w, WorkerMsg::AddPeer(Box::new(NewPeer::new(storage))));
        router.register(region, w);
        metrics::counter!("tessera_peers_created_total").increment(1);
        tracing::info!(%region, peer = to.id, "created a peer for a region added to this node");
        true
    }

    fn ranges(&self) -> MutexGuard<'_, Ranges> {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the range `region` owns on this node.
    pub fn set_range(&self, region: RegionId, start: &[u8], end: &[u8]) {
        self.ranges().insert(region, (start.to_vec(), end.to_vec()));
    }

    pub fn remove_range(&self, region: RegionId) {
        self.ranges().remove(&region);
    }

    /// Another local region whose range overlaps `[start, end)`, if any.
    pub fn overlapping(&self, region: RegionId, start: &[u8], end: &[u8]) -> Option<RegionId> {
        self.ranges()
            .iter()
            .find(|(id, (s, e))| **id != region && overlaps(s, e, start, end))
            .map(|(id, _)| *id)
    }

    /// Whether a peer of `region` may be created from a message: the region has no entry
    /// in the range map and no other local region overlaps `[start, end)`.
    fn may_create(&self, region: RegionId, start: &[u8], end: &[u8]) -> Result<(), Blocker> {
        let ranges = self.ranges();
        if ranges.contains_key(&region) {
            return Err(Blocker {
                region,
                is_self: true,
            });
        }
        match ranges.iter().find(|(_, (s, e))| overlaps(s, e, start, end)) {
            Some((id, _)) => Err(Blocker {
                region: *id,
                is_self: false,
            }),
            None => Ok(()),
        }
    }

    /// A split applied: the parent keeps `left`, the new region `right` takes the rest —
    /// both recorded under one lock, so no reader sees the range owned by neither.
    pub fn split_range(
        &self,
        parent: RegionId,
        left: (&[u8], &[u8]),
        child: RegionId,
        right: (&[u8], &[u8]),
    ) {
        let mut ranges = self.ranges();
        ranges.insert(parent, (left.0.to_vec(), left.1.to_vec()));
        ranges.insert(child, (right.0.to_vec(), right.1.to_vec()));
    }

    /// A merge applied: `target` takes `range`, which includes the source's, and the
    /// source's entry goes — under one lock, so no reader sees the range owned by neither.
    pub fn merge_range(&self, target: RegionId, range: (&[u8], &[u8]), source: RegionId) {
        let mut ranges = self.ranges();
        ranges.remove(&source);
        ranges.insert(target, (range.0.to_vec(), range.1.to_vec()));
    }

    /// Restores `region`'s entry to what it was before a tentative [`Self::claim_range`].
    pub fn restore_range(&self, region: RegionId, before: Option<(Vec<u8>, Vec<u8>)>) {
        let mut ranges = self.ranges();
        match before {
            Some(r) => ranges.insert(region, r),
            None => ranges.remove(&region),
        };
    }

    /// The range `region` owns on this node, if it has an entry.
    pub fn range_of(&self, region: RegionId) -> Option<(Vec<u8>, Vec<u8>)> {
        self.ranges().get(&region).cloned()
    }

    /// Claims `[start, end)` for `region` unless another local region overlaps it.
    pub fn claim_range(&self, region: RegionId, start: &[u8], end: &[u8]) -> Result<(), RegionId> {
        let mut ranges = self.ranges();
        if let Some((id, _)) = ranges
            .iter()
            .find(|(id, (s, e))| **id != region && overlaps(s, e, start, end))
        {
            return Err(*id);
        }
        ranges.insert(region, (start.to_vec(), end.to_vec()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::overlaps;

    #[test]
    fn range_overlap() {
        assert!(overlaps(b"a", b"c", b"b", b"d"));
        assert!(
            !overlaps(b"a", b"b", b"b", b"c"),
            "touching ranges do not overlap"
        );
        assert!(overlaps(b"", b"", b"x", b"y"));
        assert!(overlaps(b"m", b"", b"a", b"n"));
        assert!(!overlaps(b"m", b"", b"a", b"m"));
    }
}
