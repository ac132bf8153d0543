//! Applying the steps of a region merge (docs/architecture.md, "Region lifecycle"). A child
//! module of `peer`.
//!
//! A merge joins a *source* region to an adjacent *target* on the same nodes; the target
//! keeps its id and takes the source's range. User data is not region-prefixed, so no data
//! moves: what moves is the range, the load figures and the source's exactly-once records.
//! 1. **lock** (target's log): the target records the source and the source epoch its
//!    prepare must carry; a locked target neither splits, changes membership nor takes part
//!    in another merge, so the commit below cannot be refused once the source is frozen.
//! 2. **prepare** (source's log, with that epoch): the source freezes at this index; it
//!    serves and applies nothing afterwards. The round's write is synced.
//! 3. **commit** (target's log): once every source replica applied the prepare, each target
//!    replica takes the range, reading the frozen source from this node's own engine, and
//!    the local source peer ends (its raft state goes, its data stays: it is the target's).
//! 4. **unlock** (target's log): lifts the lock it names (source and source epoch) once no
//!    prepare of the source into this target can apply any more.
//!
//! Invariants:
//! - every check is on replicated state (this region's descriptor and merge state; for a
//!   commit, the source's frozen state, identical on every replica), so replicas decide
//!   alike;
//! - a frozen source never unfreezes: there is no rollback after a prepare, because the
//!   locked target cannot refuse the commit;
//! - a target replica whose node lacks the source's prepare stops the node rather than
//!   diverge; the driver commits only after every source replica reported it applied.

use raft::eraftpb;

use super::super::apply::{self, ApplyCtx};
use super::super::cmd::{ApplyResult, Envelope};
use super::super::msg::RegionError;
use super::super::session::Sessions;
use super::Peer;
use crate::ids::RegionId;
use crate::proto::{self, merge_cmd::Op, MergeState, PeerState, RaftApplyState, RegionLocalState};
use crate::storage::{keys, Cf, WriteBatch};

/// The nodes of a region's peers, sorted (a merge needs the same set on both sides).
fn nodes(region: &proto::Region) -> Vec<u64> {
    let mut n: Vec<u64> = region.peers.iter().map(|p| p.node_id).collect();
    n.sort_unstable();
    n
}

/// Whether `a` ends where `b` starts (`a` is `b`'s left neighbour).
fn left_of(a: &proto::Region, b: &proto::Region) -> bool {
    !a.end_key.is_empty() && a.end_key == b.start_key
}

/// Whether `source` may merge into `target`: its right neighbour (so the merged region's
/// routing row replaces the source's, at the same end key), on the same nodes, voters only.
pub fn mergeable(source: &proto::Region, target: &proto::Region) -> Result<(), String> {
    let (a, b) = (source, target);
    if a.id == b.id {
        return Err("a region cannot merge with itself".into());
    }
    if !left_of(b, a) {
        return Err(format!(
            "region {} is not region {}'s right neighbour",
            a.id, b.id
        ));
    }
    if keys::is_system_key(&a.start_key) || keys::is_system_key(&b.start_key) {
        return Err("placement and lease regions do not merge".into());
    }
    if nodes(a) != nodes(b) {
        return Err(format!(
            "regions {} and {} are not on the same nodes ({:?} and {:?})",
            a.id,
            b.id,
            nodes(a),
            nodes(b)
        ));
    }
    let learner = |r: &proto::Region| {
        r.peers
            .iter()
            .any(|p| p.role != proto::PeerRole::Voter as i32)
    };
    if learner(a) || learner(b) {
        return Err("a region with a learner does not merge".into());
    }
    Ok(())
}

impl Peer {
    /// The region this peer's region is frozen to merge into, if it is a merge's source.
    pub fn merging_into(&self) -> Option<u64> {
        self.raw
            .store()
            .merge_state()
            .map(|m| m.target_id)
            .filter(|t| *t != 0)
    }

    /// Whether the region takes part in a merge (locked target or frozen source): it then
    /// neither splits nor changes membership.
    pub(super) fn in_merge(&self) -> bool {
        self.raw.store().merge_state().is_some()
    }

    pub(super) fn apply_merge(
        &mut self,
        op: Op,
        env: &Envelope,
        e: &eraftpb::Entry,
        wb: &mut WriteBatch<'_>,
        actx: &mut ApplyCtx,
    ) -> Result<ApplyResult, RegionError> {
        let region = self.region().clone();
        if !self.raw.store().is_initialized() {
            return Err(RegionError::RegionNotFound(self.region_id));
        }
        if env.epoch != region.epoch.unwrap_or_default() {
            return Err(RegionError::EpochNotMatch {
                current: vec![region],
            });
        }
        let refuse = |reason: String| {
            Err(RegionError::Refused {
                reason: format!("merge step on region {}: {reason}", region.id),
            })
        };
        let busy = || {
            Err(RegionError::ServerBusy {
                reason: format!(
                    "merge step on region {} waits: a membership change is in progress",
                    region.id
                ),
            })
        };
        let merge = self.raw.store().merge_state().cloned();
        let done = |region: proto::Region| Ok(ApplyResult::Merge { region });
        match op {
            Op::Lock(lock) => {
                match &merge {
                    Some(m) if m.target_id == 0 && m.source_id == lock.source_id => {
                        return done(region)
                    }
                    Some(m) => return refuse(format!("already in a merge ({m:?})")),
                    None => {}
                }
                if keys::is_system_key(&region.start_key) {
                    return refuse("placement and lease regions do not merge".into());
                }
                if self.raw.store().in_joint_config() {
                    return busy();
                }
                let state = MergeState {
                    source_id: lock.source_id,
                    source_epoch: lock.source_epoch,
                    ..Default::default()
                };
                self.raw
                    .mut_store()
                    .set_merge(region.clone(), Some(state), wb);
                actx.must_sync = true;
                self.changed = true;
                tracing::info!(region = %self.region_id, source = lock.source_id, index = e.index, "locked for a merge");
                done(region)
            }
            Op::Unlock(lock) => {
                // Only the lock named: a late unlock of an older lock for the same source
                // must not lift a newer one.
                if merge.as_ref().is_some_and(|m| {
                    m.target_id == 0
                        && m.source_id == lock.source_id
                        && m.source_epoch == lock.source_epoch
                }) {
                    self.raw.mut_store().set_merge(region.clone(), None, wb);
                    self.changed = true;
                    tracing::info!(region = %self.region_id, source = lock.source_id, "merge lock lifted");
                }
                done(region)
            }
            Op::Prepare(target) => {
                match &merge {
                    Some(m) if m.target_id == target.id => return done(region),
                    Some(m) if m.target_id != 0 => {
                        return refuse(format!("already merging into region {}", m.target_id))
                    }
                    // Locked as another merge's target: that merge ends one way or another.
                    Some(m) => {
                        return Err(RegionError::ServerBusy {
                            reason: format!(
                                "region {} waits: it is locked for region {}'s merge",
                                region.id, m.source_id
                            ),
                        })
                    }
                    None => {}
                }
                if let Err(why) = mergeable(&region, &target) {
                    return refuse(why);
                }
                if self.raw.store().in_joint_config() {
                    return busy();
                }
                let state = MergeState {
                    target_id: target.id,
                    prepare_index: e.index,
                    ..Default::default()
                };
                self.raw
                    .mut_store()
                    .set_merge(region.clone(), Some(state), wb);
                actx.must_sync = true;
                self.withdraw_lease();
                self.changed = true;
                // Watchers resume through the routing table once the merge is done.
                self.ctx.hub.end_region(
                    self.region_id,
                    RegionError::ServerBusy {
                        reason: format!("region {} is merging", region.id),
                    },
                );
                tracing::info!(region = %self.region_id, target = target.id, index = e.index, "frozen to merge");
                done(region)
            }
            Op::Commit(commit) => {
                let Some(source) = commit.source else {
                    return refuse("the commit carries no source".into());
                };
                if !merge
                    .as_ref()
                    .is_some_and(|m| m.target_id == 0 && m.source_id == source.id)
                {
                    return refuse(format!("not locked for region {}", source.id));
                }
                if let Err(why) = mergeable(&source, &region) {
                    return refuse(why);
                }
                let (source_apply, source_sessions) =
                    self.frozen_source(&source, commit.prepare_index);
                let mut merged = region.clone();
                merged.end_key = source.end_key.clone();
                let mut epoch = region.epoch.unwrap_or_default();
                epoch.version = epoch.version.max(source.epoch.unwrap_or_default().version) + 1;
                merged.epoch = Some(epoch);
                let engine = self.raw.store().engine().clone();
                let (sk, sb) = apply::range_stats(
                    &engine,
                    actx,
                    &keys::data_key(&source.start_key),
                    &keys::data_end_key(&source.end_key),
                );
                let (tk, tb) = self.raw.store().data_stats();
                let store = self.raw.mut_store();
                store.set_data_stats(tk + sk, tb + sb);
                store.note_revision(source_apply.max_revision);
                store.set_merge(merged.clone(), None, wb);
                self.ctx.merge_range(
                    self.region_id,
                    (&merged.start_key, &merged.end_key),
                    RegionId(source.id),
                );
                self.sessions.absorb(source_sessions);
                self.sessions.write_all(self.region_id, wb);
                self.withdraw_lease();
                self.siblings.clear();
                self.changed = true;
                actx.must_sync = true;
                actx.merged.push((RegionId(source.id), self.region_id));
                metrics::counter!("tessera_region_merges_total").increment(1);
                tracing::info!(region = %self.region_id, source = source.id, index = e.index, "regions merged");
                done(merged)
            }
        }
    }

    /// A snapshot of this region, as `snap` describes it, covers part of local region
    /// `other`'s range. If `other` is frozen to merge into this region and the snapshot's
    /// version is above the source's, the merge committed: the commit raises the target's
    /// version above the source's, while any state of this region from before the split
    /// that made the source is below it, and the target's range never overlapped the
    /// source's in between. The source's peer then ends, and the snapshot is taken when the
    /// leader sends it again.
    pub(super) fn end_if_merged_here(&self, other: RegionId, snap: &proto::Region) {
        let state: Option<RegionLocalState> = self
            .raw
            .store()
            .engine()
            .get_msg(Cf::Raft, &keys::region_state_key(other))
            .ok()
            .flatten();
        let version =
            |r: Option<&proto::Region>| r.and_then(|r| r.epoch).unwrap_or_default().version;
        let into_me = state.is_some_and(|s| {
            s.merge.is_some_and(|m| m.target_id == self.region_id.0)
                && version(Some(snap)) > version(s.region.as_ref())
        });
        if into_me {
            tracing::info!(region = %self.region_id, source = %other, "snapshot covers a merged source; ending it");
            self.ctx.end_merged(other, self.region_id);
        }
    }

    /// The source as this node applied it: frozen into this region at `prepare_index`, with
    /// its apply state and write records. Anything else means the driver committed before
    /// this node applied the prepare, which it must never do: the node stops rather than
    /// take a range whose data it does not have.
    fn frozen_source(
        &self,
        source: &proto::Region,
        prepare_index: u64,
    ) -> (RaftApplyState, Sessions) {
        let engine = self.raw.store().engine();
        let id = RegionId(source.id);
        let state: Option<RegionLocalState> = engine
            .get_msg(Cf::Raft, &keys::region_state_key(id))
            .unwrap_or_else(|e| crate::fatal(&format!("reading merge source {id}: {e}")));
        let apply: Option<RaftApplyState> = engine
            .get_msg(Cf::Raft, &keys::apply_state_key(id))
            .unwrap_or_else(|e| crate::fatal(&format!("reading merge source {id}: {e}")));
        // Compared by range and epoch: the order of the peer list may differ between
        // replicas (rebuilt from raft's configuration).
        let same = |r: &proto::Region| {
            r.id == source.id
                && r.epoch == source.epoch
                && r.start_key == source.start_key
                && r.end_key == source.end_key
        };
        let frozen = |s: &RegionLocalState| {
            s.state == PeerState::Normal as i32
                && s.region.as_ref().is_some_and(same)
                && s.merge.as_ref().is_some_and(|m| {
                    m.target_id == self.region_id.0 && m.prepare_index == prepare_index
                })
        };
        match (state, apply) {
            (Some(s), Some(a)) if frozen(&s) && a.applied_index >= prepare_index => {
                let sessions = Sessions::load(engine, id).unwrap_or_else(|e| {
                    crate::fatal(&format!("reading merge source {id}'s write records: {e}"))
                });
                (a, sessions)
            }
            (s, a) => crate::fatal(&format!(
                "region {} commits the merge of {id} (prepared at {prepare_index}), but this \
                 node's replica of {id} has not applied the prepare (state {s:?}, applied {:?})",
                self.region_id,
                a.map(|a| a.applied_index)
            )),
        }
    }
}
