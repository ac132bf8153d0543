//! One replica of one region: the `RawNode`, its pending proposals and reads, and the two
//! halves of its Ready handling that a worker round calls around the shared synced write.
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

use super::clock::BootInstant;

use raft::eraftpb::{self, EntryType, MessageType};
use raft::{RawNode, Ready, StateRole};

mod admin;
mod hibernate;
mod lease;

use super::apply::{self, ApplyCtx};
use super::cmd::{self, ApplyResult, Command, Envelope};
use super::local_read;
use super::msg::{PeerMsg, ReadRequest, ReadResult, RegionError, RegionInfo, Reply, Wake};
use super::session::{Seen, Sessions};
use super::store::StoreCtx;
use crate::ids::{PeerId, RegionId};
use crate::proto::{self, RegionEpoch};
use crate::storage::{keys, PeerStorage, WriteBatch};
use crate::transport::Transport;

struct Proposal {
    index: u64,
    term: u64,
    /// When it was proposed: its commit renews the leader's lease from then.
    at: Option<BootInstant>,
    reply: Reply<ApplyResult>,
}

struct PendingRead {
    req: ReadRequest,
    /// The epoch the client routed with: checked again when the read is served, since the
    /// region may have split while the read waited for its index.
    epoch: RegionEpoch,
    reply: Reply<ReadResult>,
}

pub struct Peer {
    region_id: RegionId,
    peer_id: PeerId,
    raw: RawNode<PeerStorage>,
    proposals: VecDeque<Proposal>,
    /// Reads that arrived this round; they share one ReadIndex request.
    reads_unsent: Vec<PendingRead>,
    /// ReadIndex requests sent to raft: context, send time (for the lease), reads.
    reads_inflight: VecDeque<(u64, BootInstant, Vec<PendingRead>)>,
    /// Reads whose read index is known, served once the region has applied that far.
    reads_ready: VecDeque<(u64, Vec<PendingRead>)>,
    next_read_ctx: u64,
    lease: lease::Lease,
    /// A lease read served this round found the lease past half: send a ReadIndex round
    /// (with no reads) to renew it.
    renew_lease: bool,
    /// The term in which this leader has applied an entry of its own (lease reads need it).
    applied_own_term: u64,
    /// Vote requests are dropped until then (a restarted peer, see `lease`).
    refuse_votes_until: Option<Instant>,
    /// The lease end and epoch version published to the node's local reader, if any.
    published: Option<(BootInstant, u64)>,
    log_gc_threshold: u64,
    /// Write commands applied since start (load reporting).
    writes_applied: u64,
    /// Leadership or the descriptor changed: placement should hear about it now.
    changed: bool,
    /// Regions this one's last split created, sent with `EpochNotMatch` so a client with a
    /// stale route learns the whole new layout from one error.
    siblings: Vec<proto::Region>,
    /// Ticks since the last activity (anything but heartbeats), and whether the peer sleeps:
    /// a sleeping peer is not ticked (no heartbeats, no election timer) until activity.
    idle_ticks: usize,
    asleep: bool,
    /// When this follower last got a message from its leader (the election timer's real
    /// start, see `hibernate`).
    leader_heard: Option<Instant>,
    /// Set by a tick whose election timeout ran out on a follower: the leader's node.
    leader_silent: Option<u64>,
    /// Set when this peer was removed from its region: the worker destroys it after the
    /// round's write.
    pending_destroy: bool,
    /// Ask the leader (or, not knowing it, every other peer) to wake, at the next round
    /// (see `hibernate`).
    wake_others: bool,
    /// Peers this leader removed, to be told so (they may not learn it from the log).
    tombstones: Vec<proto::Peer>,
    /// The region's exactly-once write records (replicated state, see `session`).
    sessions: Sessions,
    session_ttl_ms: u64,
    ctx: StoreCtx,
}

impl Peer {
    pub fn new(storage: PeerStorage, ctx: &StoreCtx) -> Result<Self, String> {
        let (node, cfg, logger) = (ctx.node, &ctx.cfg, &ctx.logger);
        let region = storage.region().clone();
        let me = region
            .peers
            .iter()
            .find(|p| p.node_id == node.0)
            .ok_or_else(|| format!("region {} has no peer on node {}", region.id, node.0))?;
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
        rc.validate().map_err(|e| format!("raft config: {e}"))?;
        let peer_logger = logger.new(slog::o!("region" => region.id, "peer" => me.id));
        let storage_initialized = storage.is_initialized();
        let sessions = if storage_initialized {
            Sessions::load(storage.engine(), RegionId(region.id))
                .map_err(|e| format!("region {}: {e}", region.id))?
        } else {
            Sessions::default()
        };
        let raw = RawNode::new(&rc, storage, &peer_logger).map_err(|e| e.to_string())?;
        Ok(Self {
            region_id: RegionId(region.id),
            peer_id,
            raw,
            proposals: VecDeque::new(),
            reads_unsent: Vec::new(),
            reads_inflight: VecDeque::new(),
            reads_ready: VecDeque::new(),
            next_read_ctx: 1,
            lease: lease::Lease::new(cfg.lease_reads, cfg.tick_interval(), cfg.election_ticks),
            renew_lease: false,
            applied_own_term: 0,
            refuse_votes_until: None,
            published: None,
            log_gc_threshold: cfg.log_gc_threshold,
            writes_applied: 0,
            changed: false,
            siblings: Vec::new(),
            idle_ticks: 0,
            asleep: false,
            leader_heard: None,
            leader_silent: None,
            pending_destroy: false,
            // A peer loaded at start (a restart) may belong to a sleeping region whose leader
            // would not heartbeat before this peer's election timer runs out.
            wake_others: storage_initialized,
            tombstones: Vec::new(),
            sessions,
            session_ttl_ms: cfg.client_session_ttl_secs.saturating_mul(1000),
            ctx: ctx.clone(),
        })
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
            PeerMsg::Describe(_) | PeerMsg::Progress(_) => None,
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
            } => self.propose(cmd, epoch, write_id.map(|w| *w), reply),
            PeerMsg::Read {
                req,
                epoch,
                linearizable,
                reply,
            } => self.read(req, epoch, linearizable, reply),
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
                if peer == self.peer_id.0 && epoch.conf_ver > ours.conf_ver && !self.is_leader() {
                    tracing::info!(region = %self.region_id, "told by the leader that this peer was removed");
                    self.pending_destroy = true;
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

    fn transfer_leader(&mut self, to_node: u64) -> Result<(), RegionError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let Some(to) = self.region().peers.iter().find(|p| p.node_id == to_node) else {
            return Err(RegionError::ServerBusy {
                reason: format!("{} has no peer on node {to_node}", self.region_id),
            });
        };
        if to.id != self.peer_id.0 {
            self.raw.transfer_leader(to.id);
            self.check_transfer();
        }
        Ok(())
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
                if !self.tombstones.contains(&p) {
                    self.tombstones.push(p);
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
            self.leader_heard = Some(Instant::now());
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
                    // a split yet): refused until it has shrunk.
                    && self
                        .ctx
                        .claim_range(self.region_id, &r.start_key, &r.end_key)
                        .is_ok()
            }),
            Err(_) => false,
        }
    }

    fn propose(
        &mut self,
        cmd: Command,
        epoch: RegionEpoch,
        write_id: Option<proto::WriteId>,
        reply: Reply<ApplyResult>,
    ) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        for key in cmd.keys() {
            if let Err(e) = self.check_route(&epoch, key) {
                let _ = reply.send(Err(e));
                return;
            }
        }
        let is_split = matches!(cmd, Command::Split { .. });
        let env = Envelope {
            epoch,
            write_id,
            proposed_at_ms: wall_clock_ms(),
            session_ttl_ms: self.session_ttl_ms,
        };
        let data = cmd::encode(&cmd, &env);
        let at = BootInstant::now();
        if let Err(e) = self.raw.propose(vec![], data) {
            tracing::debug!(region = %self.region_id, error = %e, "proposal dropped");
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if is_split {
            // Followers create the new region's peers when they apply the split: tell them
            // it committed at once, so the new region's election finds them. (Set only for
            // a split raft took: applying it turns the broadcast off again.)
            self.raw.raft.skip_bcast_commit(false);
        }
        metrics::counter!("tessera_proposals_total").increment(1);
        self.proposals.push_back(Proposal {
            index: self.raw.raft.raft_log.last_index(),
            term: self.raw.raft.term,
            at: Some(at),
            reply,
        });
    }

    fn check_read(&self, req: &ReadRequest, epoch: &RegionEpoch) -> Result<(), RegionError> {
        for key in local_read::read_keys(req) {
            self.check_route(epoch, key)?;
        }
        Ok(())
    }

    fn read(
        &mut self,
        req: ReadRequest,
        epoch: RegionEpoch,
        linearizable: bool,
        reply: Reply<ReadResult>,
    ) {
        if let Err(e) = self.check_read(&req, &epoch) {
            let _ = reply.send(Err(e));
            return;
        }
        if !linearizable {
            let _ = reply.send(self.serve_read(&req));
            return;
        }
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let now = BootInstant::now();
        if self.lease_read_ok(now) {
            metrics::counter!("tessera_reads_total", "path" => "lease").increment(1);
            let _ = reply.send(self.serve_read(&req));
            self.renew_lease |= self.lease.wants_renewal(now);
            return;
        }
        metrics::counter!("tessera_reads_total", "path" => "read_index").increment(1);
        self.reads_unsent.push(PendingRead { req, epoch, reply });
    }

    /// Sends one ReadIndex request for every read that arrived this round (or, with none,
    /// to renew a lease that a lease read found past half).
    pub fn flush_reads(&mut self) {
        let renew = std::mem::take(&mut self.renew_lease) && self.reads_inflight.is_empty();
        if self.reads_unsent.is_empty() && !renew {
            return;
        }
        if !self.is_leader() {
            let err = self.not_leader();
            for r in self.reads_unsent.drain(..) {
                let _ = r.reply.send(Err(err.clone()));
            }
            return;
        }
        // raft-rs silently drops ReadIndex on a leader that has not yet committed an entry of
        // its own term; hold the reads until it has.
        let log = &self.raw.raft.raft_log;
        if log.term(log.committed).unwrap_or(0) != self.raw.raft.term {
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        let sent = BootInstant::now();
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        let reads = std::mem::take(&mut self.reads_unsent);
        self.reads_inflight.push_back((ctx, sent, reads));
    }

    /// Serves reads whose read index has been applied. Call after the round's writes.
    pub fn serve_ready_reads(&mut self) {
        let applied = self.raw.store().applied_index();
        while self.reads_ready.front().is_some_and(|(i, _)| *i <= applied) {
            let (_, reads) = self.reads_ready.pop_front().expect("checked front");
            for r in reads {
                // A split applied while the read waited moves keys to another region, whose
                // newer writes this replica may not have applied yet: refuse, don't serve.
                let res = self
                    .check_read(&r.req, &r.epoch)
                    .and_then(|()| self.serve_read(&r.req));
                let _ = r.reply.send(res);
            }
        }
    }

    pub fn has_waiting_reads(&self) -> bool {
        !self.reads_unsent.is_empty() || !self.reads_ready.is_empty()
    }

    fn serve_read(&self, req: &ReadRequest) -> Result<ReadResult, RegionError> {
        local_read::serve_read(self.raw.store().engine(), self.region(), req)
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// First half of Ready handling, before the round's write: sends leader messages, and
    /// puts the snapshot, applied entries, new entries and hard state into `wb`.
    pub fn collect_ready(
        &mut self,
        wb: &mut WriteBatch<'_>,
        actx: &mut ApplyCtx,
        transport: &Transport,
    ) -> Option<Ready> {
        self.send_wake_up(transport);
        if !self.raw.has_ready() {
            return None;
        }
        let mut rd = self.raw.ready();
        if rd.ss().is_some() {
            self.on_role_change();
        }
        if !rd.messages().is_empty() {
            self.send(rd.take_messages(), transport);
        }
        if !rd.snapshot().is_empty() {
            self.withdraw_lease();
            let snap = rd.snapshot().clone();
            match self.raw.mut_store().apply_snapshot(&snap, wb) {
                Ok(rows) => match Sessions::from_rows(
                    rows.iter().map(|r| (r.key.as_slice(), r.value.as_slice())),
                ) {
                    Ok(s) => self.sessions = s,
                    Err(e) => crate::fatal(&format!(
                        "{}: a validated snapshot's write records: {e}",
                        self.region_id
                    )),
                },
                Err(e) => crate::fatal(&format!(
                    "{}: applying a validated snapshot: {e}",
                    self.region_id
                )),
            }
            // Proposals at or below the snapshot can no longer be matched: their outcome is
            // unknown, so their senders are dropped (the client sees "result unknown").
            let r = self.region();
            actx.forget_range(&r.start_key, &r.end_key);
            self.ctx.set_range(self.region_id, &r.start_key, &r.end_key);
            // The queue is in (term, index) order, not index order: look at every entry.
            let idx = snap.get_metadata().index;
            self.proposals.retain(|p| p.index > idx);
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed, wb, actx);
        self.send_tombstones(transport);
        let hs = rd.hs().cloned();
        if let Err(e) = self.raw.mut_store().persist(rd.entries(), hs.as_ref(), wb) {
            crate::fatal(&format!("{}: append: {e}", self.region_id));
        }
        for rs in rd.take_read_states() {
            let ctx = u64::from_be_bytes(rs.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            while let Some((c, _, _)) = self.reads_inflight.front() {
                if *c > ctx {
                    break;
                }
                let (c, sent, reads) = self.reads_inflight.pop_front().expect("checked front");
                if c == ctx {
                    // A quorum answered the heartbeat this leader sent at `sent`.
                    self.renew_lease(sent);
                    self.reads_ready.push_back((rs.index, reads));
                } else {
                    // An older request raft never answered (it was dropped): retry the reads.
                    self.reads_unsent.extend(reads);
                }
            }
        }
        Some(rd)
    }

    /// Second half, after the round's write is durable: messages that had to wait for it,
    /// `advance`, and the light ready (whose applies go into `wb`, written after this).
    pub fn after_persist(
        &mut self,
        mut rd: Ready,
        wb: &mut WriteBatch<'_>,
        actx: &mut ApplyCtx,
        transport: &Transport,
    ) {
        if !rd.persisted_messages().is_empty() {
            self.send(rd.take_persisted_messages(), transport);
        }
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        if !light.messages().is_empty() {
            self.send(light.take_messages(), transport);
        }
        let committed = light.take_committed_entries();
        self.apply_entries(committed, wb, actx);
        self.send_tombstones(transport);
        self.raw.advance_apply();
    }

    fn on_role_change(&mut self) {
        self.changed = true;
        self.lease.expire(BootInstant::now());
        self.withdraw_lease();
        if !self.is_leader() {
            // Reads waiting on a leadership that is gone can never be confirmed.
            let err = self.not_leader();
            let waiting = self
                .reads_inflight
                .drain(..)
                .map(|(_, _, r)| r)
                .chain(self.reads_ready.drain(..).map(|(_, r)| r))
                .flatten()
                .chain(self.reads_unsent.drain(..));
            for r in waiting {
                let _ = r.reply.send(Err(err.clone()));
            }
        }
    }

    fn send(&self, msgs: Vec<eraftpb::Message>, transport: &Transport) {
        let region = self.region();
        for m in msgs {
            if region.peers.iter().any(|p| p.id == m.to) {
                transport.send(region, self.peer_id, m);
            } else if let Some(p) = self.ctx.known_peer(m.to) {
                // A peer not yet filled by a snapshot knows its leader only from its messages.
                let mut r = region.clone();
                r.peers.push(p);
                transport.send(&r, self.peer_id, m);
            } else {
                metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "unknown_peer")
                    .increment(1);
            }
        }
    }

    fn apply_entries(
        &mut self,
        entries: Vec<eraftpb::Entry>,
        wb: &mut WriteBatch<'_>,
        actx: &mut ApplyCtx,
    ) {
        let Some(last) = entries.last().map(|e| e.index) else {
            return;
        };
        for e in entries {
            let result = match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => None,
                EntryType::EntryNormal => Some(self.apply_command(&e, wb, actx)),
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    self.withdraw_lease();
                    let r = self.apply_conf_change(&e, wb);
                    if let Err(err) = &r {
                        tracing::info!(region = %self.region_id, index = e.index, error = %err, "conf change not applied");
                    }
                    Some(r)
                }
            };
            actx.applied_entries += 1;
            self.answer_proposal(e.index, e.term, result, actx);
        }
        self.raw.mut_store().set_applied_index(last, wb);
    }

    fn apply_command(
        &mut self,
        e: &eraftpb::Entry,
        wb: &mut WriteBatch<'_>,
        actx: &mut ApplyCtx,
    ) -> Result<ApplyResult, RegionError> {
        let (cmd, env) = match cmd::decode(&e.data) {
            Ok(v) => v,
            Err(err) => {
                tracing::warn!(region = %self.region_id, index = e.index, error = %err, "skipping undecodable entry");
                return Err(RegionError::ServerBusy {
                    reason: err.to_string(),
                });
            }
        };
        for key in cmd.keys() {
            self.check_route(&env.epoch, key)?;
        }
        if let Command::Split {
            split_key,
            new_region_id,
            new_peer_ids,
        } = cmd
        {
            self.raw.raft.skip_bcast_commit(true);
            // The range the published lease vouches for is about to change.
            self.withdraw_lease();
            return self.apply_split(split_key, new_region_id, new_peer_ids, e, wb, actx);
        }
        // Time and TTL both from the entry: the same decision on every replica.
        if env.proposed_at_ms > 0 && env.session_ttl_ms > 0 {
            let forgotten = self.sessions.maybe_sweep(
                self.region_id,
                env.proposed_at_ms,
                env.session_ttl_ms,
                wb,
            );
            if forgotten > 0 {
                metrics::counter!("tessera_client_sessions_expired_total")
                    .increment(forgotten as u64);
            }
        }
        if let Some(w) = &env.write_id {
            match self.sessions.seen(w) {
                Seen::New => {}
                Seen::Applied(res) => {
                    // A retry of a write that already applied: its first answer, no effect.
                    metrics::counter!("tessera_writes_deduplicated_total").increment(1);
                    return Ok(res);
                }
                Seen::Stale => {
                    metrics::counter!("tessera_writes_stale_total").increment(1);
                    return Err(RegionError::StaleWrite {
                        client_id: w.client_id,
                        seq: w.seq,
                    });
                }
            }
        }
        actx.delta_keys = 0;
        actx.delta_bytes = 0;
        let res = apply::exec(cmd, e.index, self.raw.store().engine(), wb, actx);
        if let Some(w) = &env.write_id {
            self.sessions
                .record(self.region_id, w, env.proposed_at_ms, &res, wb);
        }
        self.writes_applied += 1;
        let (dk, db) = (actx.delta_keys, actx.delta_bytes);
        self.raw.mut_store().add_data_stats(dk, db);
        Ok(res)
    }

    fn answer_proposal(
        &mut self,
        index: u64,
        term: u64,
        result: Option<Result<ApplyResult, RegionError>>,
        actx: &mut ApplyCtx,
    ) {
        // The queue is in proposal order, which is (term, index) order: terms only grow, and
        // within its term a leader's indexes only grow. It is *not* index order once this
        // peer leads again with proposals of an earlier term still queued (entries that were
        // overwritten at indexes the new term reuses), so matching must compare both.
        while let Some(p) = self.proposals.front() {
            if (p.term, p.index) > (term, index) {
                break;
            }
            let p = self.proposals.pop_front().expect("checked front");
            if (p.term, p.index) < (term, index) {
                // The committed log holds another entry at `p.index` (or will, from a later
                // term): log terms never decrease along the log, so an entry of term
                // `p.term` cannot commit at or after this one. Definitely not applied.
                actx.replies.push((p.reply, Err(self.not_leader())));
                continue;
            }
            let res = match &result {
                Some(r) => {
                    // Committed: a quorum took an append this leader sent after `p.at`.
                    if let Some(at) = p.at.filter(|_| self.raw.raft.term == term) {
                        self.renew_lease(at);
                    }
                    r.clone()
                }
                // An empty entry (a new leader's) never carries a proposal.
                None => Err(self.not_leader()),
            };
            actx.replies.push((p.reply, res));
        }
    }

    /// Compacts the raft log once it holds more than `log_gc_threshold` applied entries.
    /// A leader keeps what its followers still need, unless one lags so far behind that a
    /// snapshot is the cheaper way to catch it up.
    pub fn maybe_compact_log(&mut self, wb: &mut WriteBatch<'_>) {
        let store = self.raw.store();
        let applied = store.applied_index();
        let truncated = store.truncated_index();
        if applied.saturating_sub(truncated) <= self.log_gc_threshold {
            return;
        }
        let mut target = applied;
        if self.is_leader() {
            let min_matched = self
                .raw
                .raft
                .prs()
                .iter()
                .map(|(_, pr)| pr.matched)
                .min()
                .unwrap_or(applied);
            let keep_floor = applied.saturating_sub(4 * self.log_gc_threshold);
            target = applied.min(min_matched.max(keep_floor));
        }
        if target > truncated {
            if let Err(e) = self.raw.mut_store().compact_to(target, wb) {
                tracing::warn!(region = %self.region_id, error = %e, "log compaction failed");
            } else {
                metrics::counter!("tessera_log_compactions_total").increment(1);
            }
        }
    }
}

/// The wall clock in ms since the Unix epoch: the time a leader stamps on the entries it
/// proposes (the log's time, see `session`). 0 if the clock is before 1970.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
