//! One replica of one region: the `RawNode`, its pending proposals and reads, and the two
//! halves of its Ready handling that a worker round calls around the shared synced write.
//!
//! This file holds the shared state, the dispatch of messages and raft's inbound path; each
//! feature has its own child module, and the features with state of their own keep it in
//! a struct there: `propose` (client writes to raft; `Stamps`, writes waiting for their
//! revisions), `read` (lease and ReadIndex reads; `Reads`), `ready` (the Ready halves),
//! `command` (applying entries and answering proposals), `split`, `conf_change`, `life`
//! (destruction; `Life`), `lease` (the leader lease; `Lease`), `hibernate` (`Sleep`),
//! `log_gc` and `watch`.
//!
//! Invariants:
//! - only the owning worker thread touches a `Peer` (no lock);
//! - a proposal is answered only after the entry that carries it is applied *and* the batch
//!   holding that apply is written; it is matched by `(term, index)`, never FIFO, so an entry
//!   overwritten after a leader change answers `NotLeader` instead of someone else's result;
//! - a linearizable read is served only by a leader: within its lease (see `lease`), or
//!   after a ReadIndex round confirmed the leadership and the region applied up to that index;
//! - the command's epoch and key are checked at propose time and again at apply time, so a
//!   command never writes outside the range the region has when it applies.

use std::collections::VecDeque;
use std::time::Instant;

use raft::eraftpb::{self, MessageType};
use raft::{RawNode, StateRole};

mod command;
mod conf_change;
mod hibernate;
mod lease;
mod life;
mod log_gc;
mod merge;
pub use merge::mergeable;
mod propose;
mod read;
mod ready;
mod split;
mod watch;

use propose::Proposal;

use super::msg::{NewPeer, PeerMsg, RegionError, RegionInfo, Wake};
use super::session::Sessions;
use super::store::StoreCtx;
use crate::ids::{NodeId, PeerId, RegionId};
use crate::proto::{self, RegionEpoch};
use crate::storage::{keys, PeerStorage};

/// Why a peer cannot be built from its region's stored state.
#[derive(Debug, thiserror::Error)]
pub enum NewPeerError {
    #[error("{region} has no peer on node {node}")]
    NotMember { region: RegionId, node: u64 },
    #[error("{region}: raft refused its state: {source}")]
    Raft {
        region: RegionId,
        source: raft::Error,
    },
    #[error("{region}: cannot load its exactly-once write records: {source}")]
    Records {
        region: RegionId,
        source: crate::storage::Error,
    },
}

pub struct Peer {
    region_id: RegionId,
    peer_id: PeerId,
    raw: RawNode<PeerStorage>,
    proposals: VecDeque<Proposal>,
    /// Writes waiting for their cluster revisions, and the revisions' bounds (`propose`).
    stamps: propose::Stamps,
    /// A leader's linearizable reads on their way (`read`).
    reads: read::Reads,
    /// The leader lease and what hangs on it (`lease`).
    lease: lease::Lease,
    log_gc_threshold: u64,
    /// Write commands applied since start (load reporting).
    writes_applied: u64,
    /// Leadership or the descriptor changed: placement should hear about it now.
    changed: bool,
    /// This leader's leases are to be loaded into the node's lessor after the round's
    /// write (see `lessor`).
    reload_leases: bool,
    /// Regions this one's last split created, sent with `EpochNotMatch` so a client with a
    /// stale route learns the whole new layout from one error.
    siblings: Vec<proto::Region>,
    /// Hibernation: idle ticks, sleeping, the leader's silence (`hibernate`).
    sleep: hibernate::Sleep,
    /// Removal: destruction pending, peers to tell they are gone (`life`).
    life: life::Life,
    /// The region's exactly-once write records (replicated state, see `session`).
    sessions: Sessions,
    session_ttl_ms: u64,
    ctx: StoreCtx,
}

/// Whether `region`'s range holds the timestamp oracle's key.
fn holds_oracle(region: &proto::Region) -> bool {
    keys::in_range(
        &tessera_api::keys::tso_key(),
        &region.start_key,
        &region.end_key,
    )
}

impl Peer {
    /// Builds the peer `new` describes from its stored state (see `msg::NewPeer`).
    pub fn new(new: NewPeer, ctx: &StoreCtx) -> Result<Self, NewPeerError> {
        let NewPeer {
            storage,
            sessions,
            campaign: _,
            refuse_votes_for,
            built: _,
        } = new;
        let (node, cfg, logger) = (ctx.node, &ctx.cfg, &ctx.logger);
        let region = storage.region().clone();
        let region_id = RegionId(region.id);
        let me =
            region
                .peers
                .iter()
                .find(|p| p.node_id == node.0)
                .ok_or(NewPeerError::NotMember {
                    region: region_id,
                    node: node.0,
                })?;
        let peer_id = PeerId(me.id);
        let rc = raft::Config {
            id: me.id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied: storage.applied_index(),
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            // Proposals of one round go to each follower as one append, not one each: fewer
            // messages to encode, send, step and answer.
            batch_append: true,
            // A leader whose commit index moves does not send every follower an empty
            // append just to say so: followers learn it from the next append or heartbeat
            // (at most `heartbeat_ticks` later). Halves the raft messages, and the
            // followers' Readies and raft state writes, of a region taking one write at a
            // time. Membership changes (raft-rs) and splits (`propose`) still broadcast,
            // so followers apply those at once.
            skip_bcast_commit: true,
            ..Default::default()
        };
        let raft_err = |source| NewPeerError::Raft {
            region: region_id,
            source,
        };
        rc.validate().map_err(raft_err)?;
        let peer_logger = logger.new(slog::o!("region" => region.id, "peer" => me.id));
        let storage_initialized = storage.is_initialized();
        let sessions =
            match sessions {
                Some(given) => given,
                None if storage_initialized => Sessions::load(storage.engine(), region_id)
                    .map_err(|source| NewPeerError::Records {
                        region: region_id,
                        source,
                    })?,
                None => Sessions::default(),
            };
        // (An uninitialized peer's range is not known yet: see `ready` for a snapshot.)
        let holds_oracle = storage_initialized && holds_oracle(&region);
        let raw = RawNode::new(&rc, storage, &peer_logger).map_err(raft_err)?;
        let mut peer = Self {
            region_id,
            peer_id,
            raw,
            proposals: VecDeque::new(),
            stamps: propose::Stamps::default(),
            reads: read::Reads::new(),
            // The timestamp oracle serves only under its region's lease (`placement::tso`),
            // so the region holding its key keeps a lease whatever the configuration says.
            lease: lease::Lease::new(
                cfg.lease_reads || holds_oracle,
                cfg.tick_interval(),
                cfg.election_ticks,
            ),
            log_gc_threshold: cfg.log_gc_threshold,
            writes_applied: 0,
            changed: false,
            reload_leases: false,
            siblings: Vec::new(),
            // A peer loaded at start (a restart) may belong to a sleeping region whose leader
            // would not heartbeat before this peer's election timer runs out.
            sleep: hibernate::Sleep::new(storage_initialized),
            life: life::Life::default(),
            sessions,
            session_ttl_ms: cfg.client_session_ttl_secs.saturating_mul(1000),
            ctx: ctx.clone(),
        };
        if let Some(d) = refuse_votes_for {
            peer.refuse_votes_for(d);
        }
        Ok(peer)
    }

    pub fn region_id(&self) -> RegionId {
        self.region_id
    }

    pub fn region(&self) -> &proto::Region {
        self.raw.store().region()
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Whether leadership or the descriptor changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    fn epoch(&self) -> RegionEpoch {
        self.region().epoch.unwrap_or_default()
    }

    pub fn leader(&self) -> Option<proto::Peer> {
        let id = self.raw.raft.leader_id;
        self.region().peers.iter().find(|p| p.id == id).cloned()
    }

    fn not_leader(&self) -> RegionError {
        RegionError::NotLeader {
            region: self.region_id,
            leader: self.leader(),
        }
    }

    /// Checks a client request's epoch and key against the region as it is now.
    fn check_route(&self, epoch: &RegionEpoch, key: &[u8]) -> Result<(), RegionError> {
        if !self.raw.store().is_initialized() {
            return Err(RegionError::RegionNotFound(self.region_id));
        }
        if let Some(target) = self.merging_into() {
            return Err(RegionError::ServerBusy {
                reason: format!("region {} is merging into region {target}", self.region_id),
            });
        }
        let region = self.region();
        if epoch.version != self.epoch().version {
            return Err(RegionError::EpochNotMatch {
                current: std::iter::once(region.clone())
                    .chain(self.siblings.iter().cloned())
                    .collect(),
            });
        }
        if !keys::in_range(key, &region.start_key, &region.end_key) {
            return Err(RegionError::KeyNotInRegion {
                key: key.to_vec(),
                region: self.region_id,
                start: region.start_key.clone(),
                end: region.end_key.clone(),
            });
        }
        Ok(())
    }

    pub fn on_msg(&mut self, msg: PeerMsg) {
        let why = match &msg {
            PeerMsg::Raft(m) => match m.get_msg_type() {
                MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse => None,
                MessageType::MsgAppend | MessageType::MsgAppendResponse => Some(Wake::Append),
                MessageType::MsgRequestPreVote | MessageType::MsgRequestVote => Some(Wake::Vote),
                _ => Some(Wake::RaftOther),
            },
            PeerMsg::Describe(_) | PeerMsg::Progress(_) | PeerMsg::Watch { .. } => None,
            PeerMsg::Propose { .. } | PeerMsg::Read { .. } => Some(Wake::Request),
            _ => Some(Wake::Admin),
        };
        if let Some(why) = why {
            self.wake(why);
        }
        match msg {
            PeerMsg::Raft(m) => self.on_raft_message(*m),
            PeerMsg::Propose {
                cmd,
                epoch,
                write_id,
                reply,
            } => self.propose(cmd, epoch, write_id, reply),
            PeerMsg::Read {
                req,
                epoch,
                linearizable,
                at,
                reply,
            } => self.read(req, epoch, linearizable, at, reply),
            PeerMsg::Watch { spec, epoch, reply } => self.watch(spec, epoch, reply),
            PeerMsg::Unreachable(p) => self.raw.report_unreachable(p.0),
            PeerMsg::SnapshotStatus { to, delivered } => {
                let status = if delivered {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to.0, status);
            }
            PeerMsg::Wake => {}
            PeerMsg::Merged { into } => self.merged_into(into),
            PeerMsg::Describe(tx) => {
                let (keys, bytes) = self.raw.store().data_stats();
                let _ = tx.send(RegionInfo {
                    region: self.region().clone(),
                    leader: self.leader(),
                    applied_index: self.raw.store().applied_index(),
                    term: self.raw.raft.term,
                    is_leader: self.is_leader(),
                    keys,
                    bytes,
                    writes: self.writes_applied,
                    merge: self.raw.store().merge_state().cloned(),
                });
            }
            PeerMsg::TransferLeader { to_node, reply } => {
                let _ = reply.send(self.transfer_leader(to_node));
            }
            PeerMsg::ChangePeers {
                changes,
                epoch,
                reply,
            } => self.propose_change_peers(changes, epoch, reply),
            PeerMsg::Tombstone { peer, epoch } => {
                let ours = self.epoch();
                if peer == self.peer_id && epoch.conf_ver > ours.conf_ver && !self.is_leader() {
                    tracing::info!(region = %self.region_id, "told by the leader that this peer was removed");
                    self.life.pending_destroy = true;
                }
            }
            PeerMsg::Progress(tx) => {
                let raft = &self.raw.raft;
                let matched = if self.is_leader() {
                    raft.prs()
                        .iter()
                        .map(|(id, pr)| (*id, pr.matched))
                        .collect()
                } else {
                    Vec::new()
                };
                let _ = tx.send(super::msg::Progress {
                    commit: raft.raft_log.committed,
                    matched,
                    in_joint: self.raw.store().in_joint_config(),
                });
            }
        }
    }

    fn transfer_leader(&mut self, to_node: NodeId) -> Result<(), RegionError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let Some(to) = self
            .region()
            .peers
            .iter()
            .find(|p| p.node_id == to_node.get())
        else {
            return Err(RegionError::Refused {
                reason: format!("{} has no peer on node {}", self.region_id, to_node.get()),
            });
        };
        if to.id != self.peer_id.0 {
            self.ready_to_take_over(to.id)?;
            self.raw.transfer_leader(to.id);
            self.check_transfer();
        }
        Ok(())
    }

    /// Whether peer `to` can take the leadership now: heard from within the last election
    /// timeout (measured awake: a leader that slept checks first), not waiting for a
    /// snapshot, and at most `MAX_TRANSFER_LAG` entries behind. (A peer in probe state may
    /// be fully caught up: an idle region never moves it back to replicate.) raft-rs would start the transfer anyway and drop
    /// every proposal until the target caught up or an election timeout passed, so a
    /// transfer to a hung or lagging node stalls the region's writes; TiKV refuses such
    /// transfers the same way. The refusal is `ServerBusy`: the same request may succeed
    /// once the target has caught up.
    fn ready_to_take_over(&self, to: u64) -> Result<(), RegionError> {
        const MAX_TRANSFER_LAG: u64 = 128;
        let last = self.raw.raft.raft_log.last_index();
        let why = match self.raw.raft.prs().get(to) {
            None => "it is not in the configuration",
            Some(pr) if !pr.recent_active => "it has not answered within an election timeout",
            Some(pr) if pr.state == raft::ProgressState::Snapshot => "it is receiving a snapshot",
            Some(pr) if pr.matched + MAX_TRANSFER_LAG < last => "its log lags",
            Some(_) => return Ok(()),
        };
        Err(RegionError::ServerBusy {
            reason: format!(
                "{}: leadership not handed to peer {to}: {why}",
                self.region_id
            ),
        })
    }

    fn on_raft_message(&mut self, m: eraftpb::Message) {
        if m.to != self.peer_id.0 {
            metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "wrong_peer")
                .increment(1);
            return;
        }
        // A vote from a peer that is not a member: one removed while its node was down,
        // which never learned it. Tell it (it checks that our membership is newer than
        // its own, so a member we have not heard of yet is left alone).
        if matches!(
            m.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        ) && self.raw.store().is_initialized()
            && !self.region().peers.iter().any(|p| p.id == m.from)
        {
            if let Some(p) = self.ctx.known_peer(m.from) {
                if !self.life.tombstones.contains(&p) {
                    self.life.tombstones.push(p);
                }
            }
        }
        if self.refuses_vote(&m) {
            metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "vote_after_restart")
                .increment(1);
            return;
        }
        // A snapshot claims its range while it is validated (so no other local region can
        // take it meanwhile); the claim is undone below unless raft accepts the snapshot.
        let mut snapshot_claim = None;
        if m.get_msg_type() == MessageType::MsgSnapshot {
            let before = self.ctx.range_of(self.region_id);
            if !self.snapshot_is_valid(&m) {
                metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "bad_snapshot")
                    .increment(1);
                return;
            }
            let meta = m.get_snapshot().get_metadata();
            snapshot_claim = Some((before, meta.index, meta.term));
        }
        let from = m.from;
        let stepped = self.raw.step(m);
        if let Some((before, index, term)) = snapshot_claim {
            let accepted = self
                .raw
                .raft
                .raft_log
                .unstable_snapshot()
                .as_ref()
                .is_some_and(|s| s.get_metadata().index == index && s.get_metadata().term == term);
            if !accepted {
                // Stale or duplicate: raft keeps its state, so the region keeps its range.
                metrics::counter!("tessera_snapshots_rejected_total").increment(1);
                self.ctx.restore_range(self.region_id, before);
            }
        }
        if let Err(e) = stepped {
            tracing::debug!(region = %self.region_id, error = %e, "step failed");
            metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "step_error")
                .increment(1);
        } else if from == self.raw.raft.leader_id && self.raw.raft.state == StateRole::Follower {
            self.sleep.leader_heard = Some(Instant::now());
        }
        // A follower may ask the leader to transfer leadership.
        self.check_transfer();
    }

    /// A snapshot from the network is checked before raft accepts it: once raft has it,
    /// applying it must not fail.
    fn snapshot_is_valid(&self, m: &eraftpb::Message) -> bool {
        let data = m.get_snapshot().get_data();
        match <proto::RegionSnapshotData as prost::Message>::decode(data) {
            Ok(d) => d.region.as_ref().is_some_and(|r| {
                r.id == self.region_id.0
                    && Sessions::from_rows(
                        d.sessions
                            .iter()
                            .map(|r| (r.key.as_slice(), r.value.as_slice())),
                    )
                    .is_ok()
                    && d.kvs
                        .iter()
                        .all(|kv| keys::in_range(&kv.key, &r.start_key, &r.end_key))
                    // Another local region still owns part of the range (it has not applied
                    // a split yet, or is a merge source this snapshot's merge took):
                    // refused until it has shrunk or ended.
                    && match self.ctx.claim_range(self.region_id, &r.start_key, &r.end_key) {
                        Ok(()) => true,
                        Err(other) => {
                            self.end_if_merged_here(other, r);
                            false
                        }
                    }
            }),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests;
