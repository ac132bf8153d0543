//! The two halves of a peer's Ready handling that a worker round calls around the shared
//! synced write, and what a change of role does to waiting reads. A child module of `peer`.
//!
//! Invariants:
//! - messages raft holds until persistence, `advance` and the light ready's applies come
//!   only after the round's first write;
//! - a snapshot raft accepted was validated before (see `Peer::on_raft_message`), so
//!   failing to apply it, like failing to append entries, stops the node;
//! - proposals at or below an applied snapshot are dropped unanswered: outcome unknown;
//! - on losing leadership every waiting read is answered `NotLeader`; a role change or a
//!   snapshot withdraws the published lease view first.

use raft::{eraftpb, Ready};

use super::super::apply::ApplyCtx;
use super::super::clock::BootInstant;
use super::super::session::Sessions;
use super::Peer;
use crate::storage::{keys, WriteBatch};
use crate::transport::Transport;
use tessera_api::keys::{reaches_leases, LEASE_KEYSPACE};

impl Peer {
    /// Loads this leader's leases into the node's lessor when its leadership or range
    /// changed. Called after the round's batch is written: the engine then holds every
    /// lease command applied so far, and the lessor sees each later one.
    pub fn load_leases(&mut self) {
        if !std::mem::take(&mut self.reload_leases) || !self.is_leader() {
            return;
        }
        let region = self.region();
        let start = keys::data_key(region.start_key.as_slice().max(&LEASE_KEYSPACE[..]));
        let end = keys::data_end_key(&region.end_key);
        match super::super::apply::lease::load(self.raw.store().engine(), &start, &end) {
            Ok(leases) => {
                let margin = self.ctx.cfg.election_timeout();
                self.ctx.lessor.lead(self.region_id, leases, margin);
            }
            Err(e) => crate::fatal(&format!("{}: loading leases: {e}", self.region_id)),
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
            self.keep_lease_if_oracle();
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
            while let Some((c, _, _)) = self.reads.inflight.front() {
                if *c > ctx {
                    break;
                }
                let (c, sent, reads) = self.reads.inflight.pop_front().expect("checked front");
                if c == ctx {
                    // A quorum answered the heartbeat this leader sent at `sent`.
                    self.renew_lease(sent);
                    // Reads at a revision also wait for the entries proposed before them.
                    let index = reads.iter().map(|r| r.min_applied).fold(rs.index, u64::max);
                    self.reads.ready.push_back((index, reads));
                } else {
                    // An older request raft never answered (it was dropped): retry the reads.
                    self.reads.unsent.extend(reads);
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

    pub(super) fn on_role_change(&mut self) {
        self.changed = true;
        self.reload_leases = self.is_leader() && reaches_leases(&self.region().end_key);
        if !self.reload_leases {
            self.ctx.lessor.forget(self.region_id);
        }
        self.lease.expire(BootInstant::now());
        self.withdraw_lease();
        if !self.is_leader() {
            // Reads waiting on a leadership that is gone can never be confirmed; watchers
            // continue where the region is led now.
            let err = self.not_leader();
            self.ctx.hub.end_region(self.region_id, err.clone());
            let waiting = self
                .reads
                .inflight
                .drain(..)
                .map(|(_, _, r)| r)
                .chain(self.reads.ready.drain(..).map(|(_, r)| r))
                .flatten()
                .chain(self.reads.unsent.drain(..))
                .chain(self.reads.after_stamps.drain(..));
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
}
