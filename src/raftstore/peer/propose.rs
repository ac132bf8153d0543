//! Proposing a client's write: checks, the envelope every replica applies the same way,
//! and the queue of proposals waiting for their entries to apply. A child module of
//! `peer`, so it works on the peer's private state directly.
//!
//! Invariants:
//! - only a leader proposes: a follower, or a proposal raft drops, answers `NotLeader` and
//!   nothing is appended;
//! - every key is checked against the client's epoch and the region's range before the
//!   proposal (and again at apply, see `command`);
//! - the envelope carries what apply needs besides the command — epoch, write id, the
//!   leader's wall clock and TTL — so no replica consults its own clock when applying;
//! - proposals are queued in `(term, index)` order, the order raft appends them.

use super::super::clock::BootInstant;
use super::super::cmd::{self, ApplyResult, Command, Envelope};
use super::super::msg::Reply;
use super::Peer;
use crate::proto::{self, RegionEpoch};

/// A write proposed by this peer as leader, waiting for the entry at `(term, index)`.
pub(super) struct Proposal {
    pub(super) index: u64,
    pub(super) term: u64,
    /// When it was proposed: its commit renews the leader's lease from then.
    pub(super) at: Option<BootInstant>,
    pub(super) reply: Reply<ApplyResult>,
}

impl Peer {
    pub(super) fn propose(
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
}

/// The wall clock in ms since the Unix epoch: the time a leader stamps on the entries it
/// proposes (the log's time, see `session`). 0 if the clock is before 1970.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
