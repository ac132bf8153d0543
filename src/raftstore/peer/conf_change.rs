//! Membership changes of a peer's region: proposing one (simple, or joint consensus that
//! raft leaves by itself), applying it, and leaving a joint configuration a former leader
//! left behind. A child module of `peer`, so it works on the peer's private state directly.
//!
//! Invariants:
//! - the leader never removes or demotes itself; no membership change is proposed while the
//!   region is in a joint configuration;
//! - every apply-time check is on replicated state, so every replica decides the same;
//! - a membership change raises the epoch's `conf_ver`; the descriptor's peers are rebuilt
//!   from raft's configuration and always match it.

use protobuf::Message as _;
use raft::eraftpb::{self, ConfChange, ConfChangeV2, EntryType};

use super::super::cmd::ApplyResult;
use super::super::msg::{RegionError, Reply};
use super::{Peer, Proposal};
use crate::proto::{self, RegionEpoch};
use crate::storage::WriteBatch;

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
            if self.in_merge() {
                return Err(RegionError::ServerBusy {
                    reason: format!(
                        "membership change of region {} waits: it is taking part in a merge",
                        region.id
                    ),
                });
            }
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
            self.life.pending_destroy = true;
        } else if self.is_leader() {
            self.life.tombstones.extend(removed.iter().copied());
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
