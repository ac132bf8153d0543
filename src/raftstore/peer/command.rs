//! Applying committed entries — client writes (with their exactly-once records), splits
//! and conf changes — and answering the proposals they carry, matched by `(term, index)`.
//! A child module of `peer`.
//!
//! Invariants:
//! - entries apply in log order, and the applied index goes into the same batch as their
//!   effects;
//! - each command's epoch and keys are checked again at apply; a failed check is a region
//!   error in the answer, the same on every replica, and writes no data;
//! - a write id already applied is answered from its record and applies nothing; one the
//!   client has declared finished is `StaleWrite`; records are swept by the entry's time,
//!   never a local clock;
//! - a proposal is matched by `(term, index)`: one passed by a later entry is answered
//!   `NotLeader` (definitely not applied);
//! - an undecodable committed entry stops the node before the round's write; it is never
//!   skipped.

use raft::eraftpb::{self, EntryType};

use super::super::apply::{self, ApplyCtx};
use super::super::cmd::{self, ApplyResult, Command};
use super::super::msg::RegionError;
use super::super::session::Seen;
use super::Peer;
use crate::storage::WriteBatch;

impl Peer {
    pub(super) fn apply_entries(
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
        let (cmd, env) = cmd::decode(&e.data).unwrap_or_else(|err| self.undecodable(e, &err));
        for key in cmd.keys() {
            self.check_route(&env.epoch, &key)?;
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
        if let Command::Merge(op) = cmd {
            self.raw.raft.skip_bcast_commit(true);
            return self.apply_merge(*op, &env, e, wb, actx);
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
            match self.sessions.seen(w, &cmd) {
                Seen::New => {}
                Seen::Applied(res) => {
                    // A retry of a write that already applied: its first answer, no effect.
                    metrics::counter!("tessera_writes_deduplicated_total").increment(1);
                    return Ok(res);
                }
                Seen::Stale | Seen::Partly => {
                    metrics::counter!("tessera_writes_stale_total").increment(1);
                    return Err(RegionError::StaleWrite {
                        client_id: w.client_id,
                        seq: w.seq,
                    });
                }
            }
        }
        if let Command::Put { lease: Some(a), .. }
        | Command::CompareAndSwap { lease: Some(a), .. } = &cmd
        {
            // Proposed too late to be sure a revocation of the lease sees it (see
            // `apply::lease`): the server attaches again. Not recorded, so the retry applies.
            if env.proposed_at_ms == 0 || env.proposed_at_ms > a.deadline_ms {
                metrics::counter!("tessera_lease_attachments_expired_total").increment(1);
                return Err(RegionError::ServerBusy {
                    reason: format!(
                        "the attachment to lease {} expired before the put was proposed",
                        a.lease
                    ),
                });
            }
        }
        actx.delta_keys = 0;
        actx.delta_bytes = 0;
        let revision = if env.revision > 0 {
            let applied = self.raw.store().max_revision();
            if env.revision <= applied {
                // Cannot happen while leaders stamp in log order (`propose`); counted so
                // that the checkers' runs would show it.
                metrics::counter!("tessera_revision_order_violations_total").increment(1);
                tracing::error!(region = %self.region_id, index = e.index, revision = env.revision, applied, "write applies below the region's revision");
                // Watchers drop what is below what they have seen: make them read history.
                self.ctx.hub.end_region(self.region_id, self.not_leader());
            }
            self.raw.mut_store().note_revision(env.revision);
            env.revision
        } else {
            e.index
        };
        actx.capture = env.revision > 0 && self.ctx.hub.is_watched(self.region_id);
        let engine = self.raw.store().engine();
        let res = match cmd {
            Command::Lease(l) => {
                let mut changes = Vec::new();
                let now = env.proposed_at_ms;
                let res = apply::lease::exec(l, revision, now, engine, wb, actx, &mut changes);
                let region = self.region_id;
                actx.lease_changes
                    .extend(changes.into_iter().map(|c| (region, c)));
                res
            }
            cmd => apply::exec(cmd, revision, engine, wb, actx),
        };
        if actx.capture {
            let events = actx.take_events();
            if !events.is_empty() {
                actx.watched.push((self.region_id, revision, events));
            }
        }
        if let Some(w) = &env.write_id {
            self.sessions
                .record(self.region_id, w, env.proposed_at_ms, &res, wb);
        }
        self.writes_applied += 1;
        let (dk, db) = (actx.delta_keys, actx.delta_bytes);
        self.raw.mut_store().add_data_stats(dk, db);
        Ok(res)
    }

    pub(super) fn answer_proposal(
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

    /// A committed entry this node cannot decode. Skipping it would leave this replica's
    /// state different from its peers' (a node of a newer version may have proposed a
    /// command this one does not know), and a retry reads the same bytes: the worker stops,
    /// which stops the node (see `worker`), before the round's write records it as applied.
    /// A restart with a build that understands the entry continues from it.
    pub(super) fn undecodable(&self, e: &eraftpb::Entry, err: &dyn std::fmt::Display) -> ! {
        tracing::error!(region = %self.region_id, index = e.index, term = e.term, error = %err, "committed entry cannot be decoded; stopping");
        panic!(
            "{}: committed entry {} (term {}) cannot be decoded: {err}",
            self.region_id, e.index, e.term
        )
    }
}
