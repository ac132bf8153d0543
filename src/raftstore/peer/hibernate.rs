//! Hibernation of an idle peer: it stops ticking (no heartbeats, no election timer) once
//! its region is quiet and consistent, and wakes on any activity or when its leader's node
//! is down. A child module of `peer`, so it works on the peer's private state directly.

use raft::StateRole;

use super::Peer;

impl Peer {
    /// One raft tick, unless the region hibernates. Returns whether raft ticked.
    pub fn tick(&mut self) -> bool {
        if self.asleep {
            return false;
        }
        self.idle_ticks += 1;
        if self.ctx.cfg.hibernate_regions && self.may_sleep() {
            self.asleep = true;
            metrics::counter!("tessera_region_hibernations_total").increment(1);
            return false;
        }
        self.raw.tick();
        self.maybe_leave_joint();
        true
    }

    pub fn is_asleep(&self) -> bool {
        self.asleep
    }

    /// Something other than a heartbeat happened: tick again (if asleep) and start counting
    /// idle ticks anew.
    pub fn wake(&mut self, why: &'static str) {
        self.idle_ticks = 0;
        if self.asleep {
            metrics::counter!("tessera_region_wakeups_total", "reason" => why).increment(1);
            self.asleep = false;
            // A leader's quorum check restarts from a full interval: it heard nothing while
            // asleep because it sent nothing.
            self.raw.raft.election_elapsed = 0;
        }
    }

    /// The node hosting this region's leader is down: wake so the election timer runs.
    pub fn leader_node_down(&mut self, node: u64) {
        if self.asleep && self.leader().is_none_or(|l| l.node_id == node) {
            self.wake("leader_node_down");
        }
    }

    /// Whether this idle peer may stop ticking. A follower sleeps early — after half the
    /// time its election timer could run past its last heartbeat — so that the leader's last
    /// heartbeats reach it before the leader itself sleeps. The leader sleeps only when every
    /// follower has its whole log and nothing is pending, so a sleeping region is consistent.
    pub(super) fn may_sleep(&self) -> bool {
        if !self.proposals.is_empty() || self.has_waiting_reads() || !self.reads_inflight.is_empty()
        {
            return false;
        }
        let raft = &self.raw.raft;
        let (e, h) = (self.ctx.cfg.election_ticks, self.ctx.cfg.heartbeat_ticks);
        match raft.state {
            StateRole::Leader => {
                let last = raft.raft_log.last_index();
                self.idle_ticks >= 2 * e
                    && raft.lead_transferee.is_none()
                    && raft.raft_log.committed == last
                    && !self.raw.store().in_joint_config()
                    && raft.prs().iter().all(|(_, pr)| pr.matched == last)
            }
            StateRole::Follower => {
                self.idle_ticks >= ((e - h) / 2).max(1)
                    && raft.leader_id != raft::INVALID_ID
                    && raft.election_elapsed <= h
            }
            _ => false,
        }
    }
}
