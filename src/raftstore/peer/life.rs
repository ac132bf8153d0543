//! The end of a peer: destruction once removed from its region, and telling removed peers
//! they are gone. A child module of `peer`.
//!
//! Invariants:
//! - a destroyed peer leaves a tombstone, deletes its data only when no other local region
//!   owns part of it, and drops its pending proposals (outcome unknown); writes that were
//!   never proposed are refused (definitely not applied).

use super::super::msg::RegionError;
use super::Peer;
use crate::storage::WriteBatch;
use crate::transport::Transport;

/// A peer's removal state.
#[derive(Default)]
pub(super) struct Life {
    /// Set when this peer was removed from its region: the worker destroys it after the
    /// round's write.
    pub(super) pending_destroy: bool,
    /// Peers this leader removed, to be told so (they may not learn it from the log).
    pub(super) tombstones: Vec<crate::proto::Peer>,
}

impl Peer {
    /// Whether this peer was removed from its region and must be destroyed.
    pub fn should_destroy(&self) -> bool {
        self.life.pending_destroy
    }

    /// Removes this peer from the node, in `wb`: its raft log and states go, a tombstone
    /// with the last descriptor stays (so stale messages cannot recreate it), and its data
    /// range is deleted unless another local region owns part of it.
    pub fn destroy(mut self, wb: &mut WriteBatch<'_>) {
        self.withdraw_lease();
        let region = self.region().clone();
        let initialized = self.raw.store().is_initialized();
        self.ctx.remove_range(self.region_id);
        let keep_data = !initialized
            || self
                .ctx
                .overlapping(self.region_id, &region.start_key, &region.end_key)
                .is_some();
        self.raw.mut_store().destroy(wb, !keep_data);
        // Entries this peer proposed may still commit under the next leader (an outgoing
        // voter that led during a joint change, a lagging ex-leader removed by tombstone):
        // their outcome is unknown, never "not applied". Dropping the senders says so.
        self.proposals.clear();
        // Writes still waiting for their revisions were never proposed: definitely not
        // applied, so the client may send them again.
        for u in self.stamps.unstamped.drain(..) {
            u.refuse(RegionError::RegionNotFound(self.region_id));
        }
        self.on_role_change();
        metrics::counter!("tessera_peers_destroyed_total").increment(1);
        tracing::info!(region = %self.region_id, peer = %self.peer_id, "peer destroyed");
    }

    /// The target's replica on this node took this region's range (`peer::merge`): the peer
    /// ends after this round, like a removed one, and its data stays with the target.
    pub(super) fn merged_into(&mut self, target: crate::ids::RegionId) {
        if self.merging_into() != Some(target.0) {
            tracing::error!(region = %self.region_id, %target, "merge notice for a region not merging into it; ignored");
            return;
        }
        self.life.pending_destroy = true;
    }

    /// Tells peers this leader removed that they are gone (best effort: a peer that misses
    /// it learns it from the log if it catches up, or stays harmless behind prevote).
    pub(super) fn send_tombstones(&mut self, transport: &Transport) {
        if self.life.tombstones.is_empty() {
            return;
        }
        let region = self.region().clone();
        for p in std::mem::take(&mut self.life.tombstones) {
            transport.send_tombstone(&region, self.peer_id, p);
        }
    }
}
