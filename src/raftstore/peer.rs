//! One replica of one region: the `RawNode`, its pending proposals and reads, and the two
//! halves of its Ready handling that a worker round calls around the shared synced write.
//!
//! Invariants:
//! - only the owning worker thread touches a `Peer` (no lock);
//! - a proposal is answered only after the entry that carries it is applied *and* the batch
//!   holding that apply is written; it is matched by `(term, index)`, never FIFO, so an entry
//!   overwritten after a leader change answers `NotLeader` instead of someone else's result;
//! - a linearizable read is served only by a leader, after a ReadIndex round confirmed the
//!   leadership and the region applied up to that index;
//! - the command's epoch and key are checked at propose time and again at apply time, so a
//!   command never writes outside the range the region has when it applies.

use std::collections::VecDeque;

use protobuf::Message as _;
use raft::eraftpb::{self, ConfChange, ConfChangeV2, EntryType, MessageType};
use raft::{RawNode, Ready, StateRole};

use super::apply::{self, ApplyCtx};
use super::cmd::{self, ApplyResult, Command};
use super::msg::{PeerMsg, ReadRequest, ReadResult, RegionError, RegionInfo, Reply};
use crate::config::RaftConfig;
use crate::ids::{NodeId, PeerId, RegionId};
use crate::proto::{self, KvRecord, RegionEpoch};
use crate::storage::{keys, Cf, PeerStorage, WriteBatch};
use crate::transport::Transport;

struct Proposal {
    index: u64,
    term: u64,
    reply: Reply<ApplyResult>,
}

struct PendingRead {
    req: ReadRequest,
    reply: Reply<ReadResult>,
}

pub struct Peer {
    region_id: RegionId,
    peer_id: PeerId,
    raw: RawNode<PeerStorage>,
    proposals: VecDeque<Proposal>,
    /// Reads that arrived this round; they share one ReadIndex request.
    reads_unsent: Vec<PendingRead>,
    /// ReadIndex requests sent to raft, by context.
    reads_inflight: VecDeque<(u64, Vec<PendingRead>)>,
    /// Reads whose read index is known, served once the region has applied that far.
    reads_ready: VecDeque<(u64, Vec<PendingRead>)>,
    next_read_ctx: u64,
    log_gc_threshold: u64,
    /// Write commands applied since start (load reporting).
    writes_applied: u64,
    /// Leadership or the descriptor changed: placement should hear about it now.
    changed: bool,
}

impl Peer {
    pub fn new(
        storage: PeerStorage,
        node: NodeId,
        cfg: &RaftConfig,
        logger: &slog::Logger,
    ) -> Result<Self, String> {
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
            ..Default::default()
        };
        rc.validate().map_err(|e| format!("raft config: {e}"))?;
        let logger = logger.new(slog::o!("region" => region.id, "peer" => me.id));
        let raw = RawNode::new(&rc, storage, &logger).map_err(|e| e.to_string())?;
        Ok(Self {
            region_id: RegionId(region.id),
            peer_id,
            raw,
            proposals: VecDeque::new(),
            reads_unsent: Vec::new(),
            reads_inflight: VecDeque::new(),
            reads_ready: VecDeque::new(),
            next_read_ctx: 1,
            log_gc_threshold: cfg.log_gc_threshold,
            writes_applied: 0,
            changed: false,
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
        let region = self.region();
        if epoch.version != self.epoch().version {
            return Err(RegionError::EpochNotMatch {
                current: vec![region.clone()],
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

    pub fn tick(&mut self) {
        self.raw.tick();
    }

    pub fn on_msg(&mut self, msg: PeerMsg) {
        match msg {
            PeerMsg::Raft(m) => self.on_raft_message(*m),
            PeerMsg::Propose { cmd, epoch, reply } => self.propose(cmd, epoch, reply),
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
        }
        Ok(())
    }

    fn on_raft_message(&mut self, m: eraftpb::Message) {
        if m.to != self.peer_id.0 {
            metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "wrong_peer")
                .increment(1);
            return;
        }
        if m.get_msg_type() == MessageType::MsgSnapshot && !self.snapshot_is_valid(&m) {
            metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "bad_snapshot")
                .increment(1);
            return;
        }
        if let Err(e) = self.raw.step(m) {
            tracing::debug!(region = %self.region_id, error = %e, "step failed");
            metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "step_error")
                .increment(1);
        }
    }

    /// A snapshot from the network is checked before raft accepts it: once raft has it,
    /// applying it must not fail.
    fn snapshot_is_valid(&self, m: &eraftpb::Message) -> bool {
        let data = m.get_snapshot().get_data();
        match <proto::RegionSnapshotData as prost::Message>::decode(data) {
            Ok(d) => d.region.as_ref().is_some_and(|r| {
                r.id == self.region_id.0
                    && d.kvs
                        .iter()
                        .all(|kv| keys::in_range(&kv.key, &r.start_key, &r.end_key))
            }),
            Err(_) => false,
        }
    }

    fn propose(&mut self, cmd: Command, epoch: RegionEpoch, reply: Reply<ApplyResult>) {
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
        let data = cmd::encode(&cmd, epoch);
        if let Err(e) = self.raw.propose(vec![], data) {
            tracing::debug!(region = %self.region_id, error = %e, "proposal dropped");
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        metrics::counter!("tessera_proposals_total").increment(1);
        self.proposals.push_back(Proposal {
            index: self.raw.raft.raft_log.last_index(),
            term: self.raw.raft.term,
            reply,
        });
    }

    fn read(
        &mut self,
        req: ReadRequest,
        epoch: RegionEpoch,
        linearizable: bool,
        reply: Reply<ReadResult>,
    ) {
        let keys: Vec<&Vec<u8>> = match &req {
            ReadRequest::Get { key } => vec![key],
            ReadRequest::BatchGet { keys } => keys.iter().collect(),
            ReadRequest::Scan { start, .. } => vec![start],
        };
        for key in keys {
            if let Err(e) = self.check_route(&epoch, key) {
                let _ = reply.send(Err(e));
                return;
            }
        }
        if !linearizable {
            let _ = reply.send(self.serve_read(&req));
            return;
        }
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        self.reads_unsent.push(PendingRead { req, reply });
    }

    /// Sends one ReadIndex request for every read that arrived this round.
    pub fn flush_reads(&mut self) {
        if self.reads_unsent.is_empty() {
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
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        let reads = std::mem::take(&mut self.reads_unsent);
        self.reads_inflight.push_back((ctx, reads));
    }

    /// Serves reads whose read index has been applied. Call after the round's writes.
    pub fn serve_ready_reads(&mut self) {
        let applied = self.raw.store().applied_index();
        while self.reads_ready.front().is_some_and(|(i, _)| *i <= applied) {
            let (_, reads) = self.reads_ready.pop_front().expect("checked front");
            for r in reads {
                let res = self.serve_read(&r.req);
                let _ = r.reply.send(res);
            }
        }
    }

    pub fn has_waiting_reads(&self) -> bool {
        !self.reads_unsent.is_empty() || !self.reads_ready.is_empty()
    }

    fn serve_read(&self, req: &ReadRequest) -> Result<ReadResult, RegionError> {
        let engine = self.raw.store().engine();
        let busy = |e: crate::storage::Error| RegionError::ServerBusy {
            reason: format!("storage read failed: {e}"),
        };
        match req {
            ReadRequest::Get { key } => {
                let rec: Option<KvRecord> = engine
                    .get_msg(Cf::Data, &keys::data_key(key))
                    .map_err(busy)?;
                Ok(ReadResult::Get(rec.map(|r| apply::key_value(key, r))))
            }
            ReadRequest::BatchGet { keys } => {
                let mut out = Vec::with_capacity(keys.len());
                for key in keys {
                    let rec: Option<KvRecord> = engine
                        .get_msg(Cf::Data, &keys::data_key(key))
                        .map_err(busy)?;
                    out.push(rec.map(|r| apply::key_value(key, r)));
                }
                Ok(ReadResult::BatchGet(out))
            }
            ReadRequest::Scan {
                start,
                end,
                limit,
                keys_only,
            } => {
                let region = self.region();
                let start = keys::data_key(start.max(&region.start_key));
                let end = match (end.is_empty(), region.end_key.is_empty()) {
                    (true, _) => keys::data_end_key(&region.end_key),
                    (false, true) => keys::data_key(end),
                    (false, false) => keys::data_key(end.min(&region.end_key)),
                };
                let mut kvs = Vec::new();
                let mut more = false;
                engine
                    .scan(Cf::Data, &start, &end, |k, v| {
                        if kvs.len() >= *limit {
                            more = true;
                            return Ok(false);
                        }
                        let key = keys::origin_key(k)?;
                        let rec = <KvRecord as prost::Message>::decode(v)
                            .map_err(|e| crate::storage::Error::corrupt(k, e))?;
                        let mut kv = apply::key_value(key, rec);
                        if *keys_only {
                            kv.value.clear();
                        }
                        kvs.push(kv);
                        Ok(true)
                    })
                    .map_err(busy)?;
                Ok(ReadResult::Scan { kvs, more })
            }
        }
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
            let snap = rd.snapshot().clone();
            if let Err(e) = self.raw.mut_store().apply_snapshot(&snap, wb) {
                crate::fatal(&format!(
                    "{}: applying a validated snapshot: {e}",
                    self.region_id
                ));
            }
            // Proposals at or below the snapshot can no longer be matched: their outcome is
            // unknown, so their senders are dropped (the client sees "result unknown").
            let idx = snap.get_metadata().index;
            while self.proposals.front().is_some_and(|p| p.index <= idx) {
                self.proposals.pop_front();
            }
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed, wb, actx);
        if !rd.entries().is_empty() {
            if let Err(e) = self.raw.mut_store().append(rd.entries(), wb) {
                crate::fatal(&format!("{}: append: {e}", self.region_id));
            }
        }
        if let Some(hs) = rd.hs() {
            let hs = hs.clone();
            self.raw.mut_store().set_hard_state(&hs, wb);
        }
        for rs in rd.take_read_states() {
            let ctx = u64::from_be_bytes(rs.request_ctx.as_slice().try_into().unwrap_or([0; 8]));
            while let Some((c, _)) = self.reads_inflight.front() {
                if *c > ctx {
                    break;
                }
                let (c, reads) = self.reads_inflight.pop_front().expect("checked front");
                if c == ctx {
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
            self.raw.mut_store().set_commit(commit, wb);
        }
        if !light.messages().is_empty() {
            self.send(light.take_messages(), transport);
        }
        let committed = light.take_committed_entries();
        self.apply_entries(committed, wb, actx);
        self.raw.advance_apply();
    }

    fn on_role_change(&mut self) {
        self.changed = true;
        if !self.is_leader() {
            // Reads waiting on a leadership that is gone can never be confirmed.
            let err = self.not_leader();
            let waiting = self
                .reads_inflight
                .drain(..)
                .chain(self.reads_ready.drain(..))
                .flat_map(|(_, r)| r)
                .chain(self.reads_unsent.drain(..));
            for r in waiting {
                let _ = r.reply.send(Err(err.clone()));
            }
        }
    }

    fn send(&self, msgs: Vec<eraftpb::Message>, transport: &Transport) {
        let region = self.region();
        for m in msgs {
            transport.send(region, self.peer_id, m);
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
                    self.apply_conf_change(&e, wb);
                    None
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
        let (cmd, epoch) = match cmd::decode(&e.data) {
            Ok(v) => v,
            Err(err) => {
                tracing::warn!(region = %self.region_id, index = e.index, error = %err, "skipping undecodable entry");
                return Err(RegionError::ServerBusy {
                    reason: err.to_string(),
                });
            }
        };
        for key in cmd.keys() {
            self.check_route(&epoch, key)?;
        }
        actx.delta_keys = 0;
        actx.delta_bytes = 0;
        let res = apply::exec(cmd, e.index, self.raw.store().engine(), wb, actx);
        self.writes_applied += 1;
        let (dk, db) = (actx.delta_keys, actx.delta_bytes);
        self.raw.mut_store().add_data_stats(dk, db);
        Ok(res)
    }

    fn apply_conf_change(&mut self, e: &eraftpb::Entry, wb: &mut WriteBatch<'_>) {
        let cc: ConfChangeV2 = if e.get_entry_type() == EntryType::EntryConfChange {
            match ConfChange::parse_from_bytes(&e.data) {
                Ok(cc) => raft_proto::ConfChangeI::into_v2(cc),
                Err(err) => {
                    tracing::warn!(region = %self.region_id, error = %err, "bad conf change");
                    return;
                }
            }
        } else {
            match ConfChangeV2::parse_from_bytes(&e.data) {
                Ok(cc) => cc,
                Err(err) => {
                    tracing::warn!(region = %self.region_id, error = %err, "bad conf change");
                    return;
                }
            }
        };
        self.changed = true;
        match self.raw.apply_conf_change(&cc) {
            Ok(cs) => self.raw.mut_store().set_conf_state(&cs, wb),
            Err(err) => {
                tracing::warn!(region = %self.region_id, error = %err, "conf change refused")
            }
        }
    }

    fn answer_proposal(
        &mut self,
        index: u64,
        term: u64,
        result: Option<Result<ApplyResult, RegionError>>,
        actx: &mut ApplyCtx,
    ) {
        while let Some(p) = self.proposals.front() {
            if p.index > index {
                break;
            }
            let p = self.proposals.pop_front().expect("checked front");
            if p.index < index {
                // Its entry was never applied at that index: lost in a leader change.
                actx.replies.push((p.reply, Err(self.not_leader())));
                continue;
            }
            let res = match (&result, p.term == term) {
                (Some(r), true) => r.clone(),
                // Same index, other term: another leader's entry replaced ours.
                _ => Err(self.not_leader()),
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
