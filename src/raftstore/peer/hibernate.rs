//! Hibernation of an idle peer: it stops ticking (no heartbeats, no election timer) once
//! its region is quiet and consistent, and wakes on any activity or when its leader's node
//! looks down. A child module of `peer`, so it works on the peer's private state directly.
//!
//! How a sleeping follower learns that its leader's node is gone, fastest first:
//! - an awake follower on this node, led from the same node, runs out its election timer
//!   ([`Peer::take_leader_silent`]); its worker wakes every sleeping region here led from
//!   there (one election timeout after the node went quiet, if any region shared with it
//!   is busy);
//! - a (pre-)vote request from a follower elsewhere that noticed first;
//! - the transport: the node's raft stream breaks or misses keep-alive pings, and a probe
//!   gets no answer (about 3 s for a hung node);
//! - placement: the node's heartbeat is older than `placement.node_down_after_ms`.
//!
//! Invariants:
//! - a sleeping peer is never ticked; any message but a heartbeat, a description or a
//!   progress query wakes it; with `hibernate_regions` off no peer sleeps;
//! - a leader sleeps only with nothing pending, everything committed, every peer holding
//!   the whole log and no transfer or joint change under way, so a sleeping region is
//!   consistent; a follower sleeps only while it knows a leader;
//! - a woken follower's election timer restarts from zero or, when its leader may be gone,
//!   moves on to at most the whole tick intervals that really passed since the leader was
//!   last heard (at most one election timeout): never ahead of real time, which lease
//!   reads depend on.

use std::time::Duration;

use raft::StateRole;

use super::Peer;
use crate::raftstore::msg::Wake;

/// The election timer of a follower woken because its leader may be gone: the whole tick
/// intervals that passed since the leader's last message arrived (`since_heard`), at most
/// `election_ticks`, and never less than it stood (`frozen`). Never more than the real time
/// allows, which is what keeps lease reads safe; unknown time means no catching up.
fn timer_on_waking(
    frozen: usize,
    since_heard: Option<Duration>,
    tick: Duration,
    election_ticks: usize,
) -> usize {
    let Some(since) = since_heard.filter(|_| !tick.is_zero()) else {
        return frozen;
    };
    let passed = (since.as_nanos() / tick.as_nanos()).min(election_ticks as u128) as usize;
    frozen.max(passed)
}

/// A peer's hibernation state.
pub(super) struct Sleep {
    /// Ticks since the last activity (anything but heartbeats).
    pub(super) idle_ticks: usize,
    /// A sleeping peer is not ticked (no heartbeats, no election timer) until activity.
    pub(super) asleep: bool,
    /// When this follower last got a message from its leader (the election timer's real
    /// start).
    pub(super) leader_heard: Option<std::time::Instant>,
    /// Set by a tick whose election timeout ran out on a follower: the leader's node.
    pub(super) leader_silent: Option<u64>,
    /// Ask the leader (or, not knowing it, every other peer) to wake, at the next round.
    pub(super) wake_others: bool,
}

impl Sleep {
    pub(super) fn new(wake_others: bool) -> Self {
        Self {
            idle_ticks: 0,
            asleep: false,
            leader_heard: None,
            leader_silent: None,
            wake_others,
        }
    }
}

impl Peer {
    /// One raft tick, unless the region hibernates. Returns whether raft ticked.
    pub fn tick(&mut self) -> bool {
        if self.sleep.asleep {
            return false;
        }
        self.sleep.idle_ticks += 1;
        if self.ctx.cfg.hibernate_regions && self.may_sleep() {
            self.sleep.asleep = true;
            metrics::counter!("tessera_region_hibernations_total").increment(1);
            return false;
        }
        let was_following = self.raw.raft.state == StateRole::Follower;
        // Campaigning clears the leader id: keep it to name the silent leader's node.
        let leader = self.raw.raft.leader_id;
        self.raw.tick();
        if was_following
            && matches!(
                self.raw.raft.state,
                StateRole::PreCandidate | StateRole::Candidate
            )
        {
            // The election timer ran out: nothing came from that node's leader for a whole
            // election timeout.
            self.sleep.leader_silent = self
                .region()
                .peers
                .iter()
                .find(|p| p.id == leader)
                .map(|p| p.node_id);
        }
        self.maybe_leave_joint();
        true
    }

    /// The node whose leader this follower stopped hearing from, at its last tick (taken
    /// once). Its sleeping regions here do not notice by themselves (see [`Self::wake`]).
    pub fn take_leader_silent(&mut self) -> Option<u64> {
        self.sleep.leader_silent.take()
    }

    pub fn is_asleep(&self) -> bool {
        self.sleep.asleep
    }

    /// Something other than a heartbeat happened: tick again (if asleep) and start counting
    /// idle ticks anew.
    ///
    /// Where the election timer of a waking follower starts. It did not run while the
    /// follower slept, so it stands at most `heartbeat_ticks` past the leader's last message,
    /// which may be long ago. Normally it restarts from zero: a client request or an append
    /// wakes the leader too, which answers well within an election timeout. But when the
    /// leader itself may be gone — a (pre-)vote request came, or its node looks down — the
    /// timer is moved on to the ticks that really passed since the leader was last heard,
    /// at most one election timeout. Then the follower grants votes at once and campaigns
    /// within one more (randomised) timeout, as an awake follower would by then; it does not
    /// first sit out a whole timeout of its own. Lease reads stay safe (see `lease`): the
    /// timer never runs ahead of the real time since the leader's last message arrived.
    pub fn wake(&mut self, why: Wake) {
        self.sleep.idle_ticks = 0;
        if self.sleep.asleep {
            metrics::counter!("tessera_region_wakeups_total", "reason" => why.label()).increment(1);
            self.sleep.asleep = false;
            let raft = &mut self.raw.raft;
            raft.election_elapsed = match raft.state {
                StateRole::Follower if why.leader_may_be_gone() => timer_on_waking(
                    raft.election_elapsed,
                    self.sleep.leader_heard.map(|at| at.elapsed()),
                    self.ctx.cfg.tick_interval(),
                    self.ctx.cfg.election_ticks,
                ),
                // A leader's quorum check restarts from a full interval: it heard nothing
                // while asleep because it sent nothing.
                _ => 0,
            };
            // For the same reason a woken leader knows of no peer that it is alive until it
            // answers: a leadership transfer waits for that (`ready_to_take_over`).
            if raft.state == StateRole::Leader {
                let me = raft.id;
                for (id, pr) in raft.mut_prs().iter_mut() {
                    if *id != me {
                        pr.recent_active = false;
                    }
                }
            }
            // A request its leader does not see (a serializable read served here, an admin
            // call) wakes only this follower: its timer would run out on the sleeping leader
            // and start an election that the other follower, woken by the pre-vote, grants.
            // Waking the leader instead keeps the leadership where it is.
            if raft.state == StateRole::Follower && matches!(why, Wake::Request | Wake::Admin) {
                self.sleep.wake_others = true;
            }
        }
    }

    /// Sends the wake-up asked for by [`Self::wake`] (or by a restart): to the leader, or to
    /// every other peer when the leader is unknown.
    pub(super) fn send_wake_up(&mut self, transport: &crate::transport::Transport) {
        if !std::mem::take(&mut self.sleep.wake_others) || self.is_leader() {
            return;
        }
        let targets: Vec<crate::proto::Peer> = match self.leader() {
            Some(l) => vec![l],
            None => self
                .region()
                .peers
                .iter()
                .filter(|p| p.id != self.peer_id.0)
                .copied()
                .collect(),
        };
        let region = self.region().clone();
        for p in targets {
            transport.send_wake_up(&region, self.peer_id, p);
        }
        metrics::counter!("tessera_wake_ups_sent_total").increment(1);
    }

    /// The node hosting this region's leader looks down (`why` says who noticed): wake so
    /// the election timer runs, from where it would be had it never slept.
    pub fn leader_node_down(&mut self, node: crate::ids::NodeId, why: Wake) {
        if self.sleep.asleep && self.leader().is_none_or(|l| l.node_id == node.get()) {
            self.wake(why);
        }
    }

    /// Whether this idle peer may stop ticking. A follower sleeps early — after half the
    /// time its election timer could run past its last heartbeat — so that the leader's last
    /// heartbeats reach it before the leader itself sleeps. The leader sleeps only when every
    /// follower has its whole log and nothing is pending, so a sleeping region is consistent.
    pub(super) fn may_sleep(&self) -> bool {
        // Lease regions never sleep: their leases must expire on time, which needs a leader
        // that can commit, and a follower of a sleeping region would not notice a leader cut
        // off from it until some request came (docs/architecture.md, "Leases").
        if tessera_api::keys::reaches_leases(&self.region().end_key) {
            return false;
        }
        if !self.proposals.is_empty()
            || !self.stamps.unstamped.is_empty()
            || self.has_waiting_reads()
            || !self.reads.inflight.is_empty()
        {
            return false;
        }
        let raft = &self.raw.raft;
        let (e, h) = (self.ctx.cfg.election_ticks, self.ctx.cfg.heartbeat_ticks);
        match raft.state {
            StateRole::Leader => {
                let last = raft.raft_log.last_index();
                self.sleep.idle_ticks >= 2 * e
                    && raft.lead_transferee.is_none()
                    && raft.raft_log.committed == last
                    && !self.raw.store().in_joint_config()
                    && raft.prs().iter().all(|(_, pr)| pr.matched == last)
            }
            StateRole::Follower => {
                self.sleep.idle_ticks >= ((e - h) / 2).max(1)
                    && raft.leader_id != raft::INVALID_ID
                    && raft.election_elapsed <= h
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    #[test]
    fn a_woken_timer_counts_only_the_whole_intervals_that_passed() {
        // 950 ms since the leader was heard: 9 whole ticks, still inside the lease bound
        // (raft-rs votes only at 10).
        assert_eq!(
            timer_on_waking(1, Some(Duration::from_millis(950)), TICK, 10),
            9
        );
        assert_eq!(
            timer_on_waking(0, Some(Duration::from_millis(1000)), TICK, 10),
            10
        );
        // Long asleep: one election timeout, not more, so the randomised part still spreads
        // the campaigns.
        assert_eq!(
            timer_on_waking(2, Some(Duration::from_secs(3600)), TICK, 10),
            10
        );
        // Just heard: stays where it was.
        assert_eq!(
            timer_on_waking(2, Some(Duration::from_millis(30)), TICK, 10),
            2
        );
        // Nothing heard since start, or no tick length: no catching up.
        assert_eq!(timer_on_waking(2, None, TICK, 10), 2);
        assert_eq!(
            timer_on_waking(2, Some(Duration::from_secs(5)), Duration::ZERO, 10),
            2
        );
    }
}
