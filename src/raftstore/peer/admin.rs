//! Admin commands of a peer: split, membership change (proposal and apply), leaving a
//! joint configuration, and the destruction of a removed peer. A child module of `peer`, so
//! it works on the peer's private state directly.
//!
//! Invariants:
//! - the leader never removes or demotes itself; no membership change is proposed, and no
//!   split applied, while the region is in a joint configuration;
//! - every apply-time check of a split or membership change is on replicated state, so
//!   every replica decides the same; a split moves no data and the placement region never
//!   splits;
//! - a split raises the epoch's version, a membership change its `conf_ver`; the
//!   descriptor's peers are rebuilt from raft's configuration and always match it;
//! - a destroyed peer leaves a tombstone, deletes its data only when no other local region
//!   owns part of it, and drops its pending proposals (outcome unknown).

use protobuf::Message as _;
use raft::eraftpb::{self, ConfChange, ConfChangeV2, EntryType};

use super::super::apply::{self, ApplyCtx};
use super::super::cmd::ApplyResult;
use super::super::msg::{NewPeer, RegionError, Reply};
use super::{Peer, Proposal};
use crate::ids::RegionId;
use crate::proto::{self, RegionEpoch};
use crate::storage::{keys, PeerStorage, WriteBatch};
use crate::transport::Transport;

impl Peer {
    /// Proposes a membership change (one change simply, several through joint consensus
    /// that raft leaves by itself once applied).
    pub(super) fn propose_change_peers(
        &mut self,
        changes: Vec<(proto::PeerChangeKind, proto::Peer)>,
        epoch: RegionEpoch,
        reply: Reply<ApplyResult>,
    ) {
        use eraftpb::{ConfChangeSingle, ConfChangeType};
        use proto::PeerChangeKind as K;
        let refuse = |reply: Reply<ApplyResult>, reason: String| {
            let _ = reply.send(Err(RegionError::Refused { reason }));
        };
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if epoch.conf_ver != self.epoch().conf_ver || epoch.version != self.epoch().version {
            let _ = reply.send(Err(RegionError::EpochNotMatch {
                current: vec![self.region().clone()],
            }));
            return;
        }
        if changes.is_empty() {
            return refuse(reply, "no membership change given".into());
        }
        // Transient: the joint state is left by itself, a retry then proceeds.
        let busy = |reply: Reply<ApplyResult>, reason: String| {
            let _ = reply.send(Err(RegionError::ServerBusy { reason }));
        };
        if self.raw.store().in_joint_config() {
            return busy(reply, "a membership change is still in progress".into());
        }
        let mut cc = ConfChangeV2::default();
        let mut added = Vec::new();
        for (kind, p) in &changes {
            if p.id == self.peer_id.0 && *kind != K::AddVoter {
                return refuse(
                    reply,
                    "the leader cannot remove or demote itself: transfer leadership first".into(),
                );
            }
            let single = ConfChangeSingle {
                node_id: p.id,
                change_type: match kind {
                    K::AddVoter => ConfChangeType::AddNode,
                    K::AddLearner => ConfChangeType::AddLearnerNode,
                    K::Remove => ConfChangeType::RemoveNode,
                },
                ..Default::default()
            };
            if *kind != K::Remove {
                added.push(*p);
            }
            cc.changes.push(single);
        }
        let ctx = proto::ChangePeersContext {
            region_epoch: Some(epoch),
            peers: added,
        };
        cc.context = prost::Message::encode_to_vec(&ctx).into();
        if let Err(e) = self.raw.propose_conf_change(vec![], cc) {
            // raft-rs drops proposals while a leadership transfer is pending: retry later.
            return busy(reply, format!("membership change not proposed: {e}"));
        }
        self.proposals.push_back(Proposal {
            index: self.raw.raft.raft_log.last_index(),
            term: self.raw.raft.term,
            // A membership change's commit does not renew the lease: the quorum changes.
            at: None,
            reply,
        });
    }

    /// Whether this peer was removed from its region and must be destroyed.
    pub fn should_destroy(&self) -> bool {
        self.pending_destroy
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
        for u in self.unstamped.drain(..) {
            u.refuse(RegionError::RegionNotFound(self.region_id));
        }
        self.on_role_change();
        metrics::counter!("tessera_peers_destroyed_total").increment(1);
        tracing::info!(region = %self.region_id, peer = %self.peer_id, "peer destroyed");
    }

    /// Tells peers this leader removed that they are gone (best effort: a peer that misses
    /// it learns it from the log if it catches up, or stays harmless behind prevote).
    pub(super) fn send_tombstones(&mut self, transport: &Transport) {
        if self.tombstones.is_empty() {
            return;
        }
        let region = self.region().clone();
        for p in std::mem::take(&mut self.tombstones) {
            transport.send_tombstone(&region, self.peer_id, p);
        }
    }

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

    /// Applies a membership change. A change proposed under an older membership (the
    /// context's conf_ver) is refused identically on every replica and raft never sees it;
    /// the leave-joint entry raft proposes itself has no context and always applies. The
    /// descriptor's peers are rebuilt from raft's resulting configuration, so they always
    /// match it: during a joint change both the incoming and the outgoing voters are listed.
    pub(super) fn apply_conf_change(
        &mut self,
        e: &eraftpb::Entry,
        wb: &mut WriteBatch<'_>,
    ) -> Result<ApplyResult, RegionError> {
        let cc: ConfChangeV2 = if e.get_entry_type() == EntryType::EntryConfChange {
            ConfChange::parse_from_bytes(&e.data)
                .map(raft_proto::ConfChangeI::into_v2)
                .unwrap_or_else(|err| self.undecodable(e, &err))
        } else {
            ConfChangeV2::parse_from_bytes(&e.data).unwrap_or_else(|err| self.undecodable(e, &err))
        };
        let region = self.region().clone();
        let mut epoch = region.epoch.unwrap_or_default();
        let mut added = Vec::new();
        if !cc.changes.is_empty() {
            let ctx = <proto::ChangePeersContext as prost::Message>::decode(&cc.context[..])
                .unwrap_or_else(|err| self.undecodable(e, &err));
            if ctx.region_epoch.unwrap_or_default().conf_ver != epoch.conf_ver {
                return Err(RegionError::EpochNotMatch {
                    current: vec![region],
                });
            }
            added = ctx.peers;
        }
        let cs = self
            .raw
            .apply_conf_change(&cc)
            .map_err(|err| RegionError::Refused {
                reason: format!("conf change refused: {err}"),
            })?;
        let node_of = |id: u64| {
            region
                .peers
                .iter()
                .chain(added.iter())
                .find(|p| p.id == id)
                .map(|p| p.node_id)
        };
        let mut peers = Vec::new();
        let voters = cs.voters.iter().chain(cs.voters_outgoing.iter());
        let learners = cs.learners.iter().chain(cs.learners_next.iter());
        for (id, role) in voters
            .map(|id| (*id, proto::PeerRole::Voter))
            .chain(learners.map(|id| (*id, proto::PeerRole::Learner)))
        {
            if peers.iter().any(|p: &proto::Peer| p.id == id) {
                continue;
            }
            match node_of(id) {
                Some(node_id) => peers.push(proto::Peer {
                    id,
                    node_id,
                    role: role as i32,
                }),
                None => crate::fatal(&format!(
                    "{}: conf change names peer {id} of no known node",
                    self.region_id
                )),
            }
        }
        epoch.conf_ver += 1;
        let removed: Vec<proto::Peer> = region
            .peers
            .iter()
            .filter(|p| !peers.iter().any(|n| n.id == p.id))
            .copied()
            .collect();
        let new_region = proto::Region {
            epoch: Some(epoch),
            peers,
            ..region
        };
        let store = self.raw.mut_store();
        store.set_region(new_region.clone(), wb);
        store.set_conf_state(&cs, wb);
        self.changed = true;
        if !new_region.peers.iter().any(|p| p.id == self.peer_id.0) {
            self.pending_destroy = true;
        } else if self.is_leader() {
            self.tombstones.extend(removed.iter().copied());
        }
        metrics::counter!("tessera_conf_changes_total").increment(1);
        tracing::info!(region = %self.region_id, conf_ver = epoch.conf_ver, peers = ?new_region.peers, "membership changed");
        Ok(ApplyResult::ChangePeers { region: new_region })
    }

    /// raft-rs leaves a joint configuration by itself only if the leader that entered it
    /// stays leader until it applied; a new leader finishes the job.
    pub(super) fn maybe_leave_joint(&mut self) {
        let raft = &self.raw.raft;
        if self.is_leader()
            && self.raw.store().in_joint_config()
            && raft.pending_conf_index <= raft.raft_log.applied
        {
            if let Err(e) = self
                .raw
                .propose_conf_change(vec![], ConfChangeV2::default())
            {
                tracing::debug!(region = %self.region_id, error = %e, "leave joint not proposed");
            }
        }
    }
}
