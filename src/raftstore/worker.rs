//! A raft worker: one thread owning a set of peers, running rounds with group commit.
//!
//! One round (docs/architecture.md, "Group commit"):
//! 1. wait for the inbox or the next tick, then drain the inbox (raft messages, proposals,
//!    reads); tick every peer when the tick is due;
//! 2. each touched peer sends one batched ReadIndex for the reads it got this round;
//! 3. for every peer with a Ready: send leader messages, put its snapshot, committed-entry
//!    applies, new log entries and hard state into **one** `WriteBatch`;
//! 4. **one** write, synced when any Ready demanded it (new entries, vote or term);
//! 5. answer the proposals applied in step 3; for each peer send `persisted_messages`,
//!    `advance`, and handle the light ready (its applies go into a second, unsynced batch:
//!    applied data never needs an fsync, the synced log can always replay it);
//! 6. serve the linearizable reads whose index is now applied.
//!
//! Invariants:
//! - only this thread touches its peers; a round takes at most 4,096 inbox messages before
//!   it writes;
//! - proposals are answered, and a split's new peers started, only after the batch holding
//!   their apply is written; `persisted_messages` and `advance` only after the round's
//!   first write;
//! - a failed write, a peer that cannot be built, or a panic in the worker stops the node
//!   (`crate::fatal`); a restart recovers from the log;
//! - a destroyed peer's tombstone is written synced at once; on shutdown pending replies
//!   are dropped, so waiting clients learn at once that the outcome is unknown.

use std::collections::{HashMap, HashSet};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::apply::{ApplyCtx, RecordCache};
use super::msg::{NewPeer, PeerMsg, RegionError, Wake, WorkerMsg};
use super::peer::Peer;
use super::router::Router;
use super::store::StoreCtx;
use crate::ids::RegionId;
use crate::storage::Engine;
use crate::transport::Transport;

/// Most inbox messages handled before a round writes, so replies never wait too long.
const MAX_MSGS_PER_ROUND: usize = 4096;
/// Longest a round waits for the oracle's answer before writing (see `await_revisions`).
const REVISIONS_WAIT: Duration = Duration::from_millis(2);
/// Ticks between log-compaction checks of each peer.
const LOG_GC_TICKS: u64 = 10;

pub struct Worker {
    index: usize,
    inbox: Receiver<WorkerMsg>,
    engine: Engine,
    transport: Transport,
    router: Router,
    peers: HashMap<RegionId, Peer>,
    /// What the node's peers share; new peers are built with it.
    store: StoreCtx,
    tick_interval: Duration,
    election_timeout: Duration,
    sync_writes: bool,
    ticks: u64,
    /// When this worker last woke the regions led from a node whose leader went silent.
    silent_noticed: HashMap<u64, Instant>,
    hooks: WorkerHooks,
    /// Records of recently applied keys, lent to each round's apply.
    cache: RecordCache,
    /// The regions (and how many of their writes) the outstanding request to the
    /// timestamp oracle is for, in the order its revisions are handed out.
    revisions_out: Option<Vec<(RegionId, u32)>>,
    /// Regions that got writes waiting for revisions since the last request.
    want_revisions: HashSet<RegionId>,
}

/// Where a worker gets cluster revisions: the node's client of the timestamp oracle
/// (`placement::tso`). `done` gets the first of `count` consecutive revisions.
pub trait RevisionSource: Send + Sync {
    fn ask(&self, count: u32, done: Box<dyn FnOnce(Result<u64, String>) + Send>);
}

/// What a worker tells the rest of the node.
#[derive(Clone)]
pub struct WorkerHooks {
    /// Regions this worker leads, read by the node's heartbeat.
    pub leaders: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Regions of this worker that hibernate.
    pub asleep: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Regions whose leadership or descriptor changed, for the placement reporter.
    pub changes: tokio::sync::mpsc::UnboundedSender<RegionId>,
    /// Cluster revisions for the writes this worker proposes.
    pub revisions: std::sync::Arc<dyn RevisionSource>,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        inbox: Receiver<WorkerMsg>,
        engine: Engine,
        transport: Transport,
        router: Router,
        store: StoreCtx,
        raft: &crate::config::RaftConfig,
        sync_writes: bool,
        record_cache_bytes: usize,
        hooks: WorkerHooks,
    ) -> Self {
        Self {
            index,
            inbox,
            engine,
            transport,
            router,
            peers: HashMap::new(),
            store,
            tick_interval: raft.tick_interval(),
            election_timeout: raft.election_timeout(),
            sync_writes,
            ticks: 0,
            silent_noticed: HashMap::new(),
            hooks,
            cache: RecordCache::new(record_cache_bytes),
            revisions_out: None,
            want_revisions: HashSet::new(),
        }
    }

    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("raft-worker-{}", self.index))
            .spawn(move || {
                let index = self.index;
                // A worker that panicked (a committed entry it cannot apply, a broken
                // invariant) leaves its regions undriven while the node still answers for
                // them: stop the whole node instead. A restart recovers from the log.
                let run = std::panic::AssertUnwindSafe(move || self.run());
                if std::panic::catch_unwind(run).is_err() {
                    crate::fatal(&format!("raft worker {index} panicked"));
                }
            })
    }

    fn run(mut self) {
        let mut next_tick = Instant::now() + self.tick_interval;
        let mut touched: HashSet<RegionId> = HashSet::new();
        let mut stopping = false;
        let mut more_work = false;
        while !stopping {
            let wait = if more_work {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(Instant::now())
            };
            match self.inbox.recv_timeout(wait) {
                Ok(m) => stopping |= self.handle(m, &mut touched),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => stopping = true,
            }
            let round_start = Instant::now();
            for _ in 0..MAX_MSGS_PER_ROUND {
                match self.inbox.try_recv() {
                    Ok(m) => stopping |= self.handle(m, &mut touched),
                    Err(_) => break,
                }
            }
            let tick_due = Instant::now() >= next_tick;
            if tick_due {
                self.ticks += 1;
                let mut silent = HashSet::new();
                for (id, p) in self.peers.iter_mut() {
                    if p.tick() {
                        touched.insert(*id);
                    }
                    silent.extend(p.take_leader_silent());
                }
                for node in silent {
                    self.leaders_silent(node);
                }
                next_tick = Instant::now() + self.tick_interval;
            }
            if self.ask_revisions() {
                stopping |= self.await_revisions(&mut touched);
            }
            more_work = self.round(&mut touched, tick_due && self.ticks % LOG_GC_TICKS == 0);
            if tick_due {
                self.publish_leader_count();
            }
            metrics::histogram!("tessera_worker_round_seconds")
                .record(round_start.elapsed().as_secs_f64());
        }
        // Dropping the peers drops their pending replies: waiting clients get "result
        // unknown" at once rather than a timeout.
        self.peers.clear();
        tracing::info!(worker = self.index, "raft worker stopped");
    }

    /// Counts led regions once per tick (not per round: it walks every peer) for the
    /// `tessera_leaders` gauge and the node's placement heartbeat.
    fn publish_leader_count(&self) {
        let leaders = self.peers.values().filter(|p| p.is_leader()).count();
        let asleep = self.peers.values().filter(|p| p.is_asleep()).count();
        metrics::gauge!("tessera_leaders", "worker" => self.index.to_string()).set(leaders as f64);
        metrics::gauge!("tessera_regions_hibernating", "worker" => self.index.to_string())
            .set(asleep as f64);
        self.hooks
            .leaders
            .store(leaders, std::sync::atomic::Ordering::Relaxed);
        self.hooks
            .asleep
            .store(asleep, std::sync::atomic::Ordering::Relaxed);
    }

    /// A follower here heard nothing from its leader on `node` for an election timeout: wake
    /// the sleeping regions led from there, on every worker of this node (this one included,
    /// through its own inbox at the start of the next round), so they elect now
    /// rather than when the transport or placement declares the node down. Once per node and
    /// election timeout, however many regions noticed. What a false alarm costs is in
    /// docs/architecture.md, "Hibernation": at most a leader change of an idle region.
    fn leaders_silent(&mut self, node: u64) {
        if self
            .silent_noticed
            .get(&node)
            .is_some_and(|at| at.elapsed() < self.election_timeout)
        {
            return;
        }
        self.silent_noticed.insert(node, Instant::now());
        metrics::counter!("tessera_leader_silent_total").increment(1);
        tracing::info!(
            worker = self.index,
            node,
            "a leader there went silent: waking the regions it leads here"
        );
        self.router
            .node_down(crate::ids::NodeId(node), Wake::LeaderSilent);
    }

    /// Returns true on shutdown.
    fn handle(&mut self, m: WorkerMsg, touched: &mut HashSet<RegionId>) -> bool {
        match m {
            WorkerMsg::Peer { region, msg } => match self.peers.get_mut(&region) {
                Some(p) => {
                    let write = matches!(msg, PeerMsg::Propose { .. });
                    p.on_msg(msg);
                    touched.insert(region);
                    if write && p.has_unasked() {
                        self.want_revisions.insert(region);
                    }
                }
                None => answer_missing(region, msg),
            },
            WorkerMsg::Revisions(first) => self.hand_out_revisions(first, touched),
            WorkerMsg::AddPeer(mut new) => {
                let built = new.built.take();
                let region = new.storage.region_id();
                let p = match (Peer::new(*new, &self.store), built) {
                    (Ok(p), report) => {
                        if let Some(tx) = report {
                            let _ = tx.send((region, Ok(())));
                        }
                        p
                    }
                    // Start-up turns this into its error and stops the node.
                    (Err(e), Some(tx)) => {
                        let _ = tx.send((region, Err(e.to_string())));
                        return false;
                    }
                    (Err(e), None) => {
                        crate::fatal(&format!("cannot build the peer of region {region}: {e}"))
                    }
                };
                let id = p.region_id();
                self.peers.insert(id, p);
                touched.insert(id);
                metrics::gauge!("tessera_regions", "worker" => self.index.to_string())
                    .set(self.peers.len() as f64);
            }
            WorkerMsg::NodeDown { node, why } => {
                for p in self.peers.values_mut() {
                    p.leader_node_down(node, why);
                }
            }
            WorkerMsg::Shutdown => return true,
        }
        false
    }

    /// Asks the oracle for the revisions of every write waiting for one, in one request,
    /// unless a request is already out (its answer comes through the inbox, and the writes
    /// that arrived meanwhile go in the next request). Called before the round's write, so
    /// the request travels while the round writes.
    fn ask_revisions(&mut self) -> bool {
        if self.revisions_out.is_some() || self.want_revisions.is_empty() {
            return false;
        }
        let mut out = Vec::new();
        for id in self.want_revisions.drain() {
            if let Some(p) = self.peers.get_mut(&id) {
                let n = p.revisions_wanted();
                if n > 0 {
                    out.push((id, n));
                }
            }
        }
        let total: u32 = out.iter().map(|(_, n)| *n).sum();
        if total == 0 {
            return false;
        }
        self.revisions_out = Some(out);
        let router = self.router.clone();
        let worker = self.index;
        self.hooks.revisions.ask(
            total,
            Box::new(move |first| {
                router.send_worker(worker, WorkerMsg::Revisions(first));
            }),
        );
        true
    }

    /// Waits a little for the oracle's answer, handling whatever else arrives meanwhile, so
    /// that the writes it stamps are proposed in this round's write rather than the next
    /// one's: one synced write per batch of writes instead of two, and fuller rounds. The
    /// oracle answers in a few hundred microseconds; a slow one only delays this round by
    /// [`REVISIONS_WAIT`]. Returns true on shutdown.
    fn await_revisions(&mut self, touched: &mut HashSet<RegionId>) -> bool {
        let deadline = Instant::now() + REVISIONS_WAIT;
        while self.revisions_out.is_some() {
            match self.inbox.recv_deadline(deadline) {
                Ok(m) => {
                    if self.handle(m, touched) {
                        return true;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => break,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return true,
            }
        }
        false
    }

    fn hand_out_revisions(&mut self, first: Result<u64, String>, touched: &mut HashSet<RegionId>) {
        let Some(out) = self.revisions_out.take() else {
            return;
        };
        let mut next = first;
        for (id, n) in out {
            if let Some(p) = self.peers.get_mut(&id) {
                p.stamp(next.clone(), n);
                touched.insert(id);
                if p.has_unasked() {
                    self.want_revisions.insert(id);
                }
            }
            if let Ok(f) = next.as_mut() {
                *f += u64::from(n);
            }
        }
    }

    /// Returns whether some peer already has more work (a new Ready) for the next round.
    fn round(&mut self, touched: &mut HashSet<RegionId>, gc: bool) -> bool {
        let engine = self.engine.clone();
        let mut wb = engine.batch();
        let mut actx = ApplyCtx::with_cache(std::mem::take(&mut self.cache));
        let mut readies = Vec::new();
        let mut must_sync = false;
        let mut entries = 0usize;
        if gc {
            // Every peer, sleeping ones too: a follower that fell asleep right after a burst
            // of writes must still drop the log it applied.
            for p in self.peers.values_mut() {
                p.maybe_compact_log(&mut wb);
            }
        }
        for id in touched.iter() {
            let Some(p) = self.peers.get_mut(id) else {
                continue;
            };
            p.flush_reads();
            if let Some(rd) = p.collect_ready(&mut wb, &mut actx, &self.transport) {
                must_sync |= rd.must_sync();
                entries += rd.entries().len();
                readies.push((*id, rd));
            }
        }
        if !wb.is_empty() {
            let sync = (must_sync || actx.must_sync) && self.sync_writes;
            // Chaos tests: crash (exit 75) or stall just before or after the log write.
            fail::fail_point!("raft_before_write", |_| std::process::exit(75));
            let started = std::time::Instant::now();
            if let Err(e) = engine.write(wb, sync) {
                crate::fatal(&format!("raft worker {} write failed: {e}", self.index));
            }
            fail::fail_point!("raft_after_write", |_| std::process::exit(75));
            if sync {
                metrics::histogram!("tessera_fsync_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("tessera_fsyncs_total").increment(1);
                metrics::counter!("tessera_raft_entries_persisted_total").increment(entries as u64);
                metrics::histogram!("tessera_entries_per_fsync").record(entries as f64);
                metrics::histogram!("tessera_regions_per_fsync").record(readies.len() as f64);
            }
        }
        metrics::counter!("tessera_entries_applied_total").increment(actx.applied_entries);
        self.end_merged_sources(&mut actx);
        let mut born = self.start_new_peers(&mut actx);
        self.publish_leases(&mut actx);
        actx.send_replies();
        self.publish_watched(&mut actx);
        count_cache_reads(&actx);

        let mut wb = engine.batch();
        let mut actx = ApplyCtx::with_cache(actx.take_cache());
        for (id, rd) in readies {
            if let Some(p) = self.peers.get_mut(&id) {
                p.after_persist(rd, &mut wb, &mut actx, &self.transport);
            }
        }
        if !wb.is_empty() {
            if let Err(e) = engine.write(wb, actx.must_sync && self.sync_writes) {
                crate::fatal(&format!(
                    "raft worker {} apply write failed: {e}",
                    self.index
                ));
            }
        }
        metrics::counter!("tessera_entries_applied_total").increment(actx.applied_entries);
        self.end_merged_sources(&mut actx);
        born.extend(self.start_new_peers(&mut actx));
        self.publish_leases(&mut actx);
        actx.send_replies();
        self.publish_watched(&mut actx);
        count_cache_reads(&actx);
        self.cache = actx.take_cache();

        let mut still: HashSet<RegionId> = born.into_iter().collect();
        let mut more_work = false;
        let mut destroy = Vec::new();
        for id in touched.drain() {
            if let Some(p) = self.peers.get_mut(&id) {
                if p.should_destroy() {
                    destroy.push(id);
                    continue;
                }
                p.serve_ready_reads();
                p.publish_lease();
                p.load_leases();
                if p.take_changed() {
                    let _ = self.hooks.changes.send(id);
                }
                // Keep peers with unfinished work in the next round even without new input.
                let ready = p.has_ready();
                more_work |= ready;
                if ready || p.has_waiting_reads() {
                    still.insert(id);
                }
            }
        }
        *touched = still;
        for id in destroy {
            self.destroy(id);
        }
        more_work
    }

    /// Hands the round's changes of watched regions to their watchers: after the batch
    /// holding them is written, before any read (a resolved revision) is answered.
    fn publish_watched(&self, actx: &mut ApplyCtx) {
        for (region, revision, events) in actx.watched.drain(..) {
            self.store.hub.publish(region, revision, &events);
        }
    }

    /// Hands the round's lease changes to the node's lessor: after the batch holding them is
    /// written, before their answers go (a time-to-live right after a grant sees it).
    fn publish_leases(&self, actx: &mut ApplyCtx) {
        for (region, change) in actx.lease_changes.drain(..) {
            self.store
                .lessor
                .apply(region, std::slice::from_ref(&change));
        }
    }

    /// Destroys a removed peer: its raft state goes, a tombstone stays (synced, so a restart
    /// never brings the peer back), and the router forgets the region.
    fn destroy(&mut self, id: RegionId) {
        let Some(p) = self.peers.remove(&id) else {
            return;
        };
        self.router.unregister(id);
        self.store
            .hub
            .end_region(id, RegionError::RegionNotFound(id));
        self.store.lessor.forget(id);
        // Its data may be deleted: no cached record of it can be trusted.
        self.cache.clear();
        let mut wb = self.engine.batch();
        p.destroy(&mut wb);
        if let Err(e) = self.engine.write(wb, true) {
            crate::fatal(&format!("destroying {id}: {e}"));
        }
        metrics::gauge!("tessera_regions", "worker" => self.index.to_string())
            .set(self.peers.len() as f64);
    }
}

impl Worker {
    /// Builds a peer this worker is to drive. Its stored state was written by whoever asked
    /// (start-up found it, a split's round or a peer creation wrote it); a region this node
    /// must host whose state cannot be built from is not something to run without.
    fn build_peer(&self, new: NewPeer) -> Peer {
        let region = new.storage.region().id;
        match Peer::new(new, &self.store) {
            Ok(p) => p,
            Err(e) => crate::fatal(&format!("cannot build the peer of region {region}: {e}")),
        }
    }

    /// Tells the local peers of sources merged this round that their target took their
    /// range. Call after the batch holding the merge is written: a source destroyed before
    /// it would leave a restart with neither the source nor the merged target.
    fn end_merged_sources(&mut self, actx: &mut ApplyCtx) {
        let mut ended = std::mem::take(&mut actx.merged);
        ended.extend(self.store.take_merged());
        for (source, target) in ended {
            if self
                .router
                .send(source, PeerMsg::Merged { into: target })
                .is_err()
            {
                tracing::warn!(region = %source, %target, "merged source has no local peer to end");
            }
        }
    }

    /// Takes over the peers of regions that splits created this round. Call after the batch
    /// holding their state is written, before the split is acknowledged.
    fn start_new_peers(&mut self, actx: &mut ApplyCtx) -> Vec<RegionId> {
        let mut ids = Vec::new();
        for new in std::mem::take(&mut actx.new_peers) {
            let campaign = new.campaign;
            let mut p = self.build_peer(new);
            let id = p.region_id();
            if campaign {
                p.campaign();
            }
            self.peers.insert(id, p);
            self.router.register(id, self.index);
            ids.push(id);
        }
        if !ids.is_empty() {
            metrics::gauge!("tessera_regions", "worker" => self.index.to_string())
                .set(self.peers.len() as f64);
        }
        ids
    }
}

fn count_cache_reads(actx: &ApplyCtx) {
    if actx.cache_hits > 0 {
        metrics::counter!("tessera_apply_record_reads_total", "source" => "cache")
            .increment(actx.cache_hits);
    }
    if actx.cache_misses > 0 {
        metrics::counter!("tessera_apply_record_reads_total", "source" => "engine")
            .increment(actx.cache_misses);
    }
}

/// The region left this worker between routing and delivery (or never was here).
fn answer_missing(region: RegionId, msg: PeerMsg) {
    let err = RegionError::RegionNotFound(region);
    match msg {
        PeerMsg::Propose { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        PeerMsg::Read { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        PeerMsg::TransferLeader { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        PeerMsg::ChangePeers { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        PeerMsg::Watch { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        _ => {
            metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "region_not_found")
                .increment(1);
        }
    }
}
