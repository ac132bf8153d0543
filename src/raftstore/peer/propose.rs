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
//! - proposals are queued in `(term, index)` order, the order raft appends them;
//! - a user-data write is proposed only with a cluster revision above every revision its
//!   region has applied or proposed, asked for in the term it is proposed in: revisions
//!   rise in log order (docs/architecture.md, "Cluster revisions").

use super::super::clock::BootInstant;
use super::super::cmd::{self, ApplyResult, Command, Envelope};
use super::super::msg::{RegionError, Reply};
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

/// A user-data write checked and waiting for its cluster revision (see `stamp`).
pub(crate) struct Unstamped {
    cmd: Command,
    epoch: RegionEpoch,
    write_id: Option<Box<proto::WriteId>>,
    reply: Reply<ApplyResult>,
    /// The term this leader was in when the worker asked the oracle for its revision;
    /// `None` until asked.
    asked_in: Option<u64>,
}

impl Unstamped {
    /// Answers a write that was never proposed.
    pub(super) fn refuse(self, e: RegionError) {
        let _ = self.reply.send(Err(e));
    }
}

/// User-data writes waiting for their cluster revisions, and the bounds a revision must
/// clear before a write is proposed with it.
#[derive(Default)]
pub(super) struct Stamps {
    pub(super) unstamped: std::collections::VecDeque<Unstamped>,
    /// The highest revision this peer proposed as leader.
    pub(super) proposed: u64,
    /// No write is proposed with a revision at or below this: a read at that revision was
    /// served (see `read`).
    pub(super) floor: u64,
}

impl Peer {
    pub(super) fn propose(
        &mut self,
        cmd: Command,
        epoch: RegionEpoch,
        write_id: Option<Box<proto::WriteId>>,
        reply: Reply<ApplyResult>,
    ) {
        if let Err(e) = self.check_proposal(&cmd, &epoch) {
            let _ = reply.send(Err(e));
            return;
        }
        if cmd.needs_revision() {
            // Proposed once the worker has its revision from the oracle (`stamp`).
            self.stamps.unstamped.push_back(Unstamped {
                cmd,
                epoch,
                write_id,
                reply,
                asked_in: None,
            });
            return;
        }
        self.propose_now(cmd, epoch, write_id, 0, reply);
    }

    fn check_proposal(&self, cmd: &Command, epoch: &RegionEpoch) -> Result<(), RegionError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        for key in cmd.keys() {
            self.check_route(epoch, &key)?;
        }
        Ok(())
    }

    /// How many waiting writes need revisions and have not been asked for; marks them
    /// asked. The worker asks the oracle for all its peers at once, in peer order, and hands
    /// the answer back through [`Self::stamp`] in the same order.
    pub fn revisions_wanted(&mut self) -> u32 {
        if !self.is_leader() {
            // Never proposed: the client may retry them at the new leader.
            while let Some(u) = self.stamps.unstamped.pop_front() {
                let _ = u.reply.send(Err(self.not_leader()));
            }
            return 0;
        }
        let term = self.raw.raft.term;
        let mut n = 0;
        for u in self
            .stamps
            .unstamped
            .iter_mut()
            .filter(|u| u.asked_in.is_none())
        {
            u.asked_in = Some(term);
            n += 1;
        }
        n
    }

    /// The oracle's answer for the first `n` waiting writes: revisions `first..first + n`,
    /// or why there are none. A write is proposed with its revision only if this peer still
    /// leads in the term it asked in and the revision is above every revision the region
    /// has applied or proposed (a revision from before a leadership change may be older
    /// than entries the new term inherited): otherwise it waits for a new one. Revisions
    /// therefore rise in log order, which is apply order.
    pub fn stamp(&mut self, first: Result<u64, String>, n: u32) {
        let mut waiting = Vec::with_capacity(n as usize);
        for _ in 0..n {
            match self.stamps.unstamped.pop_front() {
                Some(u) if u.asked_in.is_some() => waiting.push(u),
                Some(u) => {
                    self.stamps.unstamped.push_front(u);
                    break;
                }
                None => break,
            }
        }
        let first = match first {
            Ok(f) => f,
            Err(why) => {
                for u in waiting {
                    u.refuse(RegionError::ServerBusy {
                        reason: format!("no cluster revision: {why}"),
                    });
                }
                if !self.has_asked() {
                    self.release_reads_at();
                }
                return;
            }
        };
        let mut retry = Vec::new();
        for (i, u) in waiting.into_iter().enumerate() {
            let rev = first + i as u64;
            if let Err(e) = self.check_proposal(&u.cmd, &u.epoch) {
                let _ = u.reply.send(Err(e));
                continue;
            }
            if u.asked_in != Some(self.raw.raft.term) || rev <= self.max_revision() {
                metrics::counter!("tessera_revisions_reasked_total").increment(1);
                retry.push(Unstamped {
                    asked_in: None,
                    ..u
                });
                continue;
            }
            self.stamps.proposed = rev;
            self.propose_now(u.cmd, u.epoch, u.write_id, rev, u.reply);
        }
        for u in retry.into_iter().rev() {
            self.stamps.unstamped.push_front(u);
        }
        // A read at a revision waited for the writes asked before it (`read`).
        if !self.has_asked() {
            self.release_reads_at();
        }
        // The entries just proposed must reach the followers: a peer that fell asleep
        // while its writes waited wakes.
        self.wake(super::super::msg::Wake::Request);
    }

    /// Whether writes wait for revisions asked for but not answered yet.
    pub(super) fn has_asked(&self) -> bool {
        self.stamps.unstamped.iter().any(|u| u.asked_in.is_some())
    }

    /// Whether writes wait for revisions that have not been asked for.
    pub fn has_unasked(&self) -> bool {
        self.stamps.unstamped.iter().any(|u| u.asked_in.is_none())
    }

    /// The highest revision this region has applied, this leader proposed, or a read at a
    /// revision was promised (the floor).
    fn max_revision(&self) -> u64 {
        self.raw
            .store()
            .max_revision()
            .max(self.stamps.proposed)
            .max(self.stamps.floor)
    }

    fn propose_now(
        &mut self,
        cmd: Command,
        epoch: RegionEpoch,
        write_id: Option<Box<proto::WriteId>>,
        revision: u64,
        reply: Reply<ApplyResult>,
    ) {
        let is_split = matches!(cmd, Command::Split { .. } | Command::Merge(_));
        let env = Envelope {
            epoch,
            write_id: write_id.map(|w| *w),
            proposed_at_ms: super::super::lessor::wall_clock_ms(),
            session_ttl_ms: self.session_ttl_ms,
            revision,
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
