//! Leader lease: a leader that a quorum acknowledged at time `t` serves linearizable reads
//! from its own applied state until `t + max`, without a ReadIndex round.
//!
//! Why it is safe. A follower that accepts a message of the leader (an append, or the
//! heartbeat of a ReadIndex round) sent at `t` resets its election timer on arrival, after
//! `t`; with `check_quorum` raft-rs then ignores every vote and pre-vote request until that
//! timer has run `election_ticks` ticks, which takes at least `(election_ticks - 1)` tick
//! intervals (a worker never ticks faster than its interval, a hibernating peer does not
//! tick at all, and a sleeping follower woken because its leader may be gone moves its timer
//! on by no more than the whole intervals that passed since the leader's last message
//! arrived: see `hibernate`). A quorum that acknowledged the leader at `t` therefore elects
//! nobody else before `t + (election_ticks - 1) * tick`; the lease ends one tick before that.
//! Times are CLOCK_BOOTTIME (`clock`), which keeps running while a process is stopped and
//! while the system is suspended, so a leader paused past its lease (SIGSTOP, a suspended
//! host) finds the lease over when it resumes.
//!
//! Invariants (what the argument needs, and where each is kept):
//! - a lease runs `election_ticks - 2` ticks from the *send* time of an acknowledged
//!   message; an acknowledgement never shortens it, and none of a message sent before the
//!   lease was last ended on purpose (`Lease::expire`: role change, transfer) counts;
//! - the view published to `local_read` is withdrawn before anything but time ends the
//!   lease;
//! - a *forced* election (leader transfer: raft-rs's `MsgTimeoutNow`) skips the followers'
//!   timer: no lease while a transfer is pending and for one election timeout after it. A
//!   transfer that was abandoned can still be carried out late — the target gets the
//!   `MsgTimeoutNow` after a delay, or was paused before it stepped it — and its forced
//!   campaign is granted by any voter whose log is not longer than its own. So after an
//!   abandoned transfer the leader proposes an empty entry and counts no acknowledgement
//!   until that entry commits: a majority then holds an entry the target lacks (messages to
//!   the target are ordered, so it would have stepped the `MsgTimeoutNow` before receiving
//!   the entry), and the target can no longer win;
//! - a follower that restarts forgets its timer: peers loaded at start refuse (pre-)votes
//!   for one election timeout ([`Peer::refuse_votes_for`](super::Peer::refuse_votes_for));
//! - a new leader may not have applied entries that its predecessors acknowledged: lease
//!   reads start once it has applied an entry of its own term;
//! - in a joint configuration the quorum is two quorums: no lease reads until it is left.

use std::time::{Duration, Instant};

use crate::raftstore::clock::BootInstant;

use raft::eraftpb::{self, MessageType};

use super::Peer;
use crate::raftstore::local_read;

pub(super) struct Lease {
    /// How long after the send time of an acknowledged message the lease runs; zero turns
    /// lease reads off.
    max: Duration,
    /// End of the current lease.
    until: Option<BootInstant>,
    /// Acknowledgements of messages sent before this do not count (a leader transfer was
    /// pending then, or leadership changed).
    not_before: Option<BootInstant>,
    /// How long lease reads stay off after a leader transfer was last seen pending.
    after_transfer: Duration,
    /// A transfer was seen pending and has not been followed by a barrier yet.
    transfer_seen: bool,
    /// No acknowledgement renews the lease until the log has committed this index (the
    /// barrier entry proposed after an abandoned transfer).
    barrier: Option<u64>,
    /// A lease read served this round found the lease past half: send a ReadIndex round
    /// (with no reads) to renew it.
    pub(super) renew: bool,
    /// The term in which this leader has applied an entry of its own (lease reads need it).
    pub(super) applied_own_term: u64,
    /// Vote requests are dropped until then (a restarted peer, see the module doc).
    pub(super) refuse_votes_until: Option<std::time::Instant>,
    /// The lease end and epoch version published to the node's local reader, if any.
    pub(super) published: Option<(BootInstant, u64)>,
}

impl Lease {
    pub(super) fn new(enabled: bool, tick: Duration, election_ticks: usize) -> Self {
        let ticks = if enabled {
            election_ticks.saturating_sub(2) as u32
        } else {
            0
        };
        Self {
            max: tick * ticks,
            until: None,
            not_before: None,
            after_transfer: tick * (2 * election_ticks as u32),
            transfer_seen: false,
            barrier: None,
            renew: false,
            applied_own_term: 0,
            refuse_votes_until: None,
            published: None,
        }
    }

    pub(super) fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// A quorum acknowledged a message this leader sent at `sent`.
    pub(super) fn renew(&mut self, sent: BootInstant) {
        if !self.enabled() || self.not_before.is_some_and(|nb| sent < nb) {
            return;
        }
        let until = sent + self.max;
        if self.until.is_none_or(|u| u < until) {
            self.until = Some(until);
        }
    }

    /// Ends the lease, and ignores acknowledgements of anything sent before now.
    pub(super) fn expire(&mut self, now: BootInstant) {
        self.until = None;
        self.not_before = Some(self.not_before.map_or(now, |nb| nb.max(now)));
    }

    /// A leader transfer is pending: no lease now, and none for one election timeout after
    /// the transfer is over (a late `MsgTimeoutNow` could still start a forced election).
    pub(super) fn transfer_pending(&mut self, now: BootInstant) {
        self.expire(now + self.after_transfer);
    }

    pub(super) fn valid_at(&self, now: BootInstant) -> bool {
        self.until.is_some_and(|u| now < u)
    }

    /// Whether the lease should be renewed now: it is held but has less than half to run.
    pub(super) fn wants_renewal(&self, now: BootInstant) -> bool {
        self.until
            .is_some_and(|u| u.saturating_duration_since(now) < self.max / 2)
    }
}

impl Peer {
    /// Drops (pre-)vote requests for `d`: this peer was loaded at start and may have
    /// acknowledged a leader, whose lease counts on it, just before the process died.
    pub fn refuse_votes_for(&mut self, d: Duration) {
        if self.lease.enabled() {
            self.lease.refuse_votes_until = Some(Instant::now() + d);
        }
    }

    /// Whether `m` is a (pre-)vote request this restarted peer must still drop.
    pub(super) fn refuses_vote(&mut self, m: &eraftpb::Message) -> bool {
        let Some(until) = self.lease.refuse_votes_until else {
            return false;
        };
        if !matches!(
            m.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        ) || m.context == raft::CAMPAIGN_TRANSFER
        {
            return false;
        }
        if Instant::now() >= until {
            self.lease.refuse_votes_until = None;
            return false;
        }
        true
    }

    /// Keeps the lease off while raft has a leader transfer pending, and puts a barrier in
    /// the log once a transfer was abandoned (see the module doc).
    pub(super) fn check_transfer(&mut self) {
        if self.raw.raft.lead_transferee.is_some() {
            self.lease.transfer_seen = true;
            self.withdraw_lease();
            self.lease.transfer_pending(BootInstant::now());
        } else if std::mem::take(&mut self.lease.transfer_seen) && self.is_leader() {
            match self.raw.propose(vec![], vec![]) {
                Ok(()) => {
                    self.lease.barrier = Some(self.raw.raft.raft_log.last_index());
                    metrics::counter!("tessera_lease_barriers_total").increment(1);
                }
                // Not leading after all (raft refused): the role change ends the lease.
                Err(e) => tracing::debug!(region = %self.region_id, error = %e, "no lease barrier"),
            }
        }
    }

    /// A quorum acknowledged something this leader sent at `sent` (a ReadIndex heartbeat, or
    /// the append of a proposal that committed). Not while a transfer is pending: the
    /// transfer's target may be elected without waiting for the followers' timers.
    pub(super) fn renew_lease(&mut self, sent: BootInstant) {
        self.check_transfer();
        if let Some(b) = self.lease.barrier {
            if self.raw.raft.raft_log.committed < b {
                return;
            }
            self.lease.barrier = None;
        }
        if self.is_leader() {
            self.lease.renew(sent);
        }
    }

    /// Tells the node's local reader (`local_read`) about the lease, at the end of a round:
    /// a new view when the lease was renewed by more than a quarter of its length since the
    /// last one (a view that lags the lease only ends early) or the epoch changed, none when
    /// lease reads are not allowed now.
    pub fn publish_lease(&mut self) {
        let now = BootInstant::now();
        if !self.lease_read_ok(now) {
            self.withdraw_lease();
            return;
        }
        let Some(until) = self.lease.until else {
            return;
        };
        let version = self.epoch().version;
        let stale = self
            .lease
            .published
            .is_none_or(|(u, v)| v != version || until > u + self.lease.max / 4);
        if stale {
            self.ctx.reader.publish(
                self.region_id,
                local_read::LeaseView {
                    region: self.region().clone(),
                    until,
                    term: self.raw.raft.term,
                },
            );
            self.lease.published = Some((until, version));
        }
    }

    /// Withdraws the published lease view, before anything but time ends the lease.
    pub(super) fn withdraw_lease(&mut self) {
        if self.lease.published.take().is_some() {
            self.ctx.reader.withdraw(self.region_id);
        }
    }

    /// A replica that learned its range from a snapshot may hold the timestamp oracle's key,
    /// whose region keeps a lease whatever the configuration says (`placement::tso`).
    pub(super) fn keep_lease_if_oracle(&mut self) {
        if !self.lease.enabled() && super::holds_oracle(self.region()) {
            let cfg = &self.ctx.cfg;
            self.lease = Lease::new(true, cfg.tick_interval(), cfg.election_ticks);
        }
    }

    /// Whether a linearizable read may be served from the applied state right now.
    pub(super) fn lease_read_ok(&mut self, now: BootInstant) -> bool {
        // A frozen merge source serves nothing: its range is about to be its target's.
        if !self.lease.enabled() || !self.is_leader() || self.merging_into().is_some() {
            return false;
        }
        self.check_transfer();
        if !self.lease.valid_at(now) || self.raw.store().in_joint_config() {
            return false;
        }
        let term = self.raw.raft.term;
        if self.lease.applied_own_term != term {
            let applied = self.raw.store().applied_index();
            if self.raw.raft.raft_log.term(applied).ok() != Some(term) {
                return false;
            }
            self.lease.applied_own_term = term;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    #[test]
    fn lease_runs_from_the_send_time_and_ends_before_a_follower_may_vote() {
        let mut l = Lease::new(true, TICK, 10);
        let t = BootInstant::now();
        assert!(!l.valid_at(t));
        l.renew(t);
        assert!(l.valid_at(t + Duration::from_millis(799)));
        assert!(!l.valid_at(t + Duration::from_millis(800)));
        // A follower may vote (election_ticks - 1) intervals after it heard the leader.
        assert!(t + l.max < t + TICK * 9);
        // An older acknowledgement does not shorten the lease.
        l.renew(t - Duration::from_millis(500));
        assert!(l.valid_at(t + Duration::from_millis(799)));
        assert!(l.wants_renewal(t + Duration::from_millis(450)));
        assert!(!l.wants_renewal(t + Duration::from_millis(350)));
    }

    #[test]
    fn acknowledgements_of_messages_sent_before_expiry_do_not_count() {
        let mut l = Lease::new(true, TICK, 10);
        let t = BootInstant::now();
        l.renew(t);
        l.expire(t + Duration::from_millis(10));
        assert!(!l.valid_at(t + Duration::from_millis(20)));
        l.renew(t + Duration::from_millis(5));
        assert!(!l.valid_at(t + Duration::from_millis(20)));
        l.renew(t + Duration::from_millis(10));
        assert!(l.valid_at(t + Duration::from_millis(20)));
    }

    #[test]
    fn a_transfer_keeps_the_lease_off_for_an_election_timeout() {
        let mut l = Lease::new(true, TICK, 10);
        let t = BootInstant::now();
        l.transfer_pending(t);
        l.renew(t + Duration::from_millis(1999));
        assert!(!l.valid_at(t + Duration::from_millis(2000)));
        l.renew(t + Duration::from_millis(2000));
        assert!(l.valid_at(t + Duration::from_millis(2001)));
    }

    #[test]
    fn disabled_lease_is_never_valid() {
        let mut l = Lease::new(false, TICK, 10);
        let t = BootInstant::now();
        l.renew(t);
        assert!(!l.enabled());
        assert!(!l.valid_at(t));
        // Too few election ticks leave no room for a lease either.
        let mut l = Lease::new(true, TICK, 2);
        l.renew(t);
        assert!(!l.valid_at(t));
    }
}
