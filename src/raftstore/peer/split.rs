//! Applying a split of a peer's region, and the new region's first campaign. A child
//! module of `peer`.
//!
//! Invariants:
//! - every apply-time check is on replicated state, so every replica decides the same; no
//!   split is applied in a joint configuration, and the placement region never splits;
//! - a split moves no data and raises the epoch's version.

use raft::eraftpb::{self};

use super::super::apply::{self, ApplyCtx};
use super::super::cmd::ApplyResult;
use super::super::msg::{NewPeer, RegionError};
use super::Peer;
use crate::ids::RegionId;
use crate::proto::{self};
use crate::storage::{keys, PeerStorage, WriteBatch};

impl Peer {
    /// Applies a split (see [`Command::Split`]). Every check is on replicated state, so every
    /// replica reaches the same outcome; no data moves, the region's range just shrinks and
    /// the new region's peer on this node is created with its own raft state, in `wb`.
    pub(super) fn apply_split(
        &mut self,
        split_key: Vec<u8>,
        new_region_id: u64,
        new_peer_ids: Vec<u64>,
        e: &eraftpb::Entry,
        wb: &mut WriteBatch<'_>,
        actx: &mut ApplyCtx,
    ) -> Result<ApplyResult, RegionError> {
        let region = self.region().clone();
        let refuse = |reason: &str| {
            Err(RegionError::Refused {
                reason: format!("split of region {} refused: {reason}", region.id),
            })
        };
        if split_key == region.start_key {
            return refuse("the split key is the region's start");
        }
        if keys::is_system_key(&region.start_key) && !keys::is_lease_key(&region.start_key) {
            return refuse("the placement region does not split");
        }
        if keys::is_lease_key(&region.start_key) && keys::parse_lease_key(&split_key).is_none() {
            // A lease's record and its attached rows stay in one region.
            return refuse("a lease region splits only at a lease's record");
        }
        if self.in_merge() {
            return Err(RegionError::ServerBusy {
                reason: format!(
                    "split of region {} waits: it is taking part in a merge",
                    region.id
                ),
            });
        }
        if new_region_id == 0 || new_peer_ids.contains(&0) {
            return refuse("malformed split command");
        }
        // The membership changed after the split's ids were taken for the old one (the
        // epoch's version does not say so): the caller describes the region again.
        if new_peer_ids.len() != region.peers.len() {
            return Err(RegionError::EpochNotMatch {
                current: vec![region],
            });
        }
        // Transient: the joint state is left by itself, a retry then proceeds.
        if self.raw.store().in_joint_config() {
            return Err(RegionError::ServerBusy {
                reason: format!(
                    "split of region {} waits: a membership change is in progress",
                    region.id
                ),
            });
        }
        let mut epoch = region.epoch.unwrap_or_default();
        epoch.version += 1;
        let mut left = region.clone();
        left.end_key = split_key.clone();
        left.epoch = Some(epoch);
        let right = proto::Region {
            id: new_region_id,
            start_key: split_key,
            end_key: region.end_key.clone(),
            epoch: Some(epoch),
            peers: region
                .peers
                .iter()
                .zip(&new_peer_ids)
                .map(|(p, id)| proto::Peer { id: *id, ..*p })
                .collect(),
        };
        let engine = self.raw.store().engine().clone();
        let (rk, rb) = apply::range_stats(
            &engine,
            actx,
            &keys::data_key(&right.start_key),
            &keys::data_end_key(&right.end_key),
        );
        let (tk, tb) = self.raw.store().data_stats();
        let store = self.raw.mut_store();
        store.set_data_stats(tk.saturating_sub(rk), tb.saturating_sub(rb));
        store.set_region(left.clone(), wb);
        let storage = PeerStorage::create_split(
            engine,
            &right,
            e.index,
            e.term,
            (rk, rb),
            self.raw.store().max_revision(),
            wb,
        );
        self.ctx.split_range(
            self.region_id,
            (&left.start_key, &left.end_key),
            RegionId(right.id),
            (&right.start_key, &right.end_key),
        );
        // A retry of a write this region applied may now be routed to either half.
        self.sessions.write_all(RegionId(right.id), wb);
        actx.new_peers.push(NewPeer {
            sessions: Some(self.sessions.clone()),
            campaign: self.is_leader(),
            ..NewPeer::new(storage)
        });
        self.siblings = vec![right.clone()];
        self.changed = true;
        // Its leases are now those of the smaller range.
        self.reload_leases =
            self.is_leader() && tessera_api::keys::reaches_leases(&self.region().end_key);
        // Watchers resume from history where their keys are now.
        self.ctx.hub.end_region(
            self.region_id,
            RegionError::EpochNotMatch {
                current: vec![left.clone(), right.clone()],
            },
        );
        metrics::counter!("tessera_region_splits_total").increment(1);
        tracing::info!(region = %self.region_id, new_region = new_region_id, index = e.index, "region split");
        Ok(ApplyResult::Split {
            regions: vec![left, right],
        })
    }

    /// Starts an election at once (the peer of a split region on the parent's leader node).
    pub fn campaign(&mut self) {
        if let Err(e) = self.raw.campaign() {
            tracing::debug!(region = %self.region_id, error = %e, "campaign failed");
        }
    }
}
