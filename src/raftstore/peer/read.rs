//! Reads served by a peer: serializable reads from its state at once, linearizable ones
//! within the leader's lease or after a ReadIndex round confirmed the leadership and the
//! region applied that far. A child module of `peer`.
//!
//! Invariants:
//! - a linearizable read is served only by a leader: within its lease, or after a
//!   ReadIndex round (sent only once the leader has committed an entry of its own term)
//!   once the region has applied up to the read index;
//! - a read's epoch and keys are checked when it arrives and again when it is served
//!   after waiting;
//! - serializable reads are served at once from this replica's applied state;
//! - the reads of one round share one ReadIndex request; ready reads are served in
//!   read-index order;
//! - a read at revision R is served by the leader once its revision floor is at least R
//!   (no later write of the region takes a revision at or below R) and every entry
//!   proposed before it arrived is applied.

use std::collections::VecDeque;

use super::super::clock::BootInstant;
use super::super::local_read;
use super::super::msg::{ReadAnswer, ReadRequest, RegionError, Reply};
use super::Peer;
use crate::proto::RegionEpoch;

/// A linearizable read waiting for its read index.
pub(super) struct PendingRead {
    pub(super) req: ReadRequest,
    /// The epoch the client routed with: checked again when the read is served, since the
    /// region may have split while the read waited for its index.
    pub(super) epoch: RegionEpoch,
    /// Read as of this cluster revision (0 = the latest state).
    pub(super) at: u64,
    /// The region must have applied this far first: for a read at a revision, the last
    /// entry proposed when it arrived (its writes may have revisions at or below `at`).
    pub(super) min_applied: u64,
    pub(super) reply: Reply<ReadAnswer>,
}

/// A leader's linearizable reads on their way: waiting for this round's ReadIndex request,
/// for stamps, for their read index, and for apply to reach it.
pub(super) struct Reads {
    /// Reads that arrived this round; they share one ReadIndex request.
    pub(super) unsent: Vec<PendingRead>,
    /// Reads at a revision waiting for writes whose revisions were asked for.
    pub(super) after_stamps: Vec<PendingRead>,
    /// ReadIndex requests sent to raft: context, send time (for the lease), reads.
    pub(super) inflight: VecDeque<(u64, BootInstant, Vec<PendingRead>)>,
    /// Reads whose read index is known, served once the region has applied that far.
    pub(super) ready: VecDeque<(u64, Vec<PendingRead>)>,
    pub(super) next_ctx: u64,
}

impl Reads {
    pub(super) fn new() -> Self {
        Self {
            unsent: Vec::new(),
            after_stamps: Vec::new(),
            inflight: VecDeque::new(),
            ready: VecDeque::new(),
            next_ctx: 1,
        }
    }
}

impl Peer {
    fn check_read(&self, req: &ReadRequest, epoch: &RegionEpoch) -> Result<(), RegionError> {
        for key in local_read::read_keys(req) {
            self.check_route(epoch, key)?;
        }
        Ok(())
    }

    pub(super) fn read(
        &mut self,
        req: ReadRequest,
        epoch: RegionEpoch,
        linearizable: bool,
        at: u64,
        reply: Reply<ReadAnswer>,
    ) {
        if let Err(e) = self.check_read(&req, &epoch) {
            let _ = reply.send(Err(e));
            return;
        }
        if at > 0 {
            self.read_at(req, epoch, at, reply);
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
            self.lease.renew |= self.lease.wants_renewal(now);
            return;
        }
        metrics::counter!("tessera_reads_total", "path" => "read_index").increment(1);
        self.reads.unsent.push(PendingRead {
            req,
            epoch,
            at: 0,
            min_applied: 0,
            reply,
        });
    }

    /// A read as of revision `at` (docs/architecture.md, "Reads at a revision"). The leader
    /// first makes sure no write at or below `at` can still come to this region: it raises
    /// its revision floor to `at`, so every later write takes a revision above it (`stamp`),
    /// and waits until every entry already proposed is applied. A ReadIndex round confirms
    /// the leadership, as for any linearizable read.
    fn read_at(&mut self, req: ReadRequest, epoch: RegionEpoch, at: u64, reply: Reply<ReadAnswer>) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        metrics::counter!("tessera_reads_total", "path" => "at_revision").increment(1);
        let read = PendingRead {
            req,
            epoch,
            at,
            min_applied: 0,
            reply,
        };
        // Writes whose revisions are on their way may get revisions at or below `at`: wait
        // for them to be proposed rather than make them ask again (a steady stream of reads
        // at fresh revisions would otherwise keep them asking).
        if self.has_asked() {
            self.reads.after_stamps.push(read);
            return;
        }
        self.start_read_at(read);
    }

    fn start_read_at(&mut self, mut read: PendingRead) {
        self.stamps.floor = self.stamps.floor.max(read.at);
        read.min_applied = self.raw.raft.raft_log.last_index();
        self.reads.unsent.push(read);
    }

    /// Starts the reads at a revision that waited for the writes asked before them.
    pub(super) fn release_reads_at(&mut self) {
        for read in std::mem::take(&mut self.reads.after_stamps) {
            if !self.is_leader() {
                let _ = read.reply.send(Err(self.not_leader()));
                continue;
            }
            self.start_read_at(read);
        }
    }

    /// Sends one ReadIndex request for every read that arrived this round (or, with none,
    /// to renew a lease that a lease read found past half).
    pub fn flush_reads(&mut self) {
        let renew = std::mem::take(&mut self.lease.renew) && self.reads.inflight.is_empty();
        if self.reads.unsent.is_empty() && !renew {
            return;
        }
        if !self.is_leader() {
            let err = self.not_leader();
            for r in self.reads.unsent.drain(..) {
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
        let ctx = self.reads.next_ctx;
        self.reads.next_ctx += 1;
        let sent = BootInstant::now();
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        let reads = std::mem::take(&mut self.reads.unsent);
        self.reads.inflight.push_back((ctx, sent, reads));
    }

    /// Serves reads whose read index has been applied. Call after the round's writes.
    pub fn serve_ready_reads(&mut self) {
        let applied = self.raw.store().applied_index();
        while self.reads.ready.front().is_some_and(|(i, _)| *i <= applied) {
            let (_, reads) = self.reads.ready.pop_front().expect("checked front");
            for r in reads {
                // A split applied while the read waited moves keys to another region, whose
                // newer writes this replica may not have applied yet: refuse, don't serve.
                let res = self
                    .check_read(&r.req, &r.epoch)
                    .and_then(|()| self.serve_pending(&r));
                let _ = r.reply.send(res);
            }
        }
    }

    pub fn has_waiting_reads(&self) -> bool {
        !self.reads.unsent.is_empty()
            || !self.reads.ready.is_empty()
            || !self.reads.after_stamps.is_empty()
    }

    fn serve_read(&self, req: &ReadRequest) -> Result<ReadAnswer, RegionError> {
        local_read::serve_read(self.raw.store().engine(), self.region(), req)
    }

    fn serve_pending(&self, r: &PendingRead) -> Result<ReadAnswer, RegionError> {
        if r.at == 0 {
            return self.serve_read(&r.req);
        }
        local_read::serve_read_at(self.raw.store().engine(), self.region(), &r.req, r.at)
    }
}
