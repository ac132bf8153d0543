//! A raft worker: one thread owning a set of peers, running rounds with group commit.
//!
//! One round (DESIGN.md decision 2):
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

use std::collections::{HashMap, HashSet};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::apply::ApplyCtx;
use super::msg::{PeerMsg, RegionError, WorkerMsg};
use super::peer::Peer;
use crate::ids::RegionId;
use crate::storage::Engine;
use crate::transport::Transport;

/// Most inbox messages handled before a round writes, so replies never wait too long.
const MAX_MSGS_PER_ROUND: usize = 4096;
/// Ticks between log-compaction checks of each peer.
const LOG_GC_TICKS: u64 = 10;

pub struct Worker {
    index: usize,
    inbox: Receiver<WorkerMsg>,
    engine: Engine,
    transport: Transport,
    peers: HashMap<RegionId, Peer>,
    tick_interval: Duration,
    sync_writes: bool,
    ticks: u64,
    hooks: WorkerHooks,
}

/// What a worker tells the rest of the node.
#[derive(Clone)]
pub struct WorkerHooks {
    /// Regions this worker leads, read by the node's heartbeat.
    pub leaders: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Regions whose leadership or descriptor changed, for the placement reporter.
    pub changes: tokio::sync::mpsc::UnboundedSender<RegionId>,
}

impl Worker {
    pub fn new(
        index: usize,
        inbox: Receiver<WorkerMsg>,
        engine: Engine,
        transport: Transport,
        tick_interval: Duration,
        sync_writes: bool,
        hooks: WorkerHooks,
    ) -> Self {
        Self {
            index,
            inbox,
            engine,
            transport,
            peers: HashMap::new(),
            tick_interval,
            sync_writes,
            ticks: 0,
            hooks,
        }
    }

    pub fn spawn(self) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name(format!("raft-worker-{}", self.index))
            .spawn(move || self.run())
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
                for (id, p) in self.peers.iter_mut() {
                    p.tick();
                    touched.insert(*id);
                }
                next_tick = Instant::now() + self.tick_interval;
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
        metrics::gauge!("tessera_leaders", "worker" => self.index.to_string()).set(leaders as f64);
        self.hooks
            .leaders
            .store(leaders, std::sync::atomic::Ordering::Relaxed);
    }

    /// Returns true on shutdown.
    fn handle(&mut self, m: WorkerMsg, touched: &mut HashSet<RegionId>) -> bool {
        match m {
            WorkerMsg::Peer { region, msg } => match self.peers.get_mut(&region) {
                Some(p) => {
                    p.on_msg(msg);
                    touched.insert(region);
                }
                None => answer_missing(region, msg),
            },
            WorkerMsg::AddPeer(p) => {
                let id = p.region_id();
                self.peers.insert(id, *p);
                touched.insert(id);
                metrics::gauge!("tessera_regions", "worker" => self.index.to_string())
                    .set(self.peers.len() as f64);
            }
            WorkerMsg::Shutdown => return true,
        }
        false
    }

    /// Returns whether some peer already has more work (a new Ready) for the next round.
    fn round(&mut self, touched: &mut HashSet<RegionId>, gc: bool) -> bool {
        let engine = self.engine.clone();
        let mut wb = engine.batch();
        let mut actx = ApplyCtx::default();
        let mut readies = Vec::new();
        let mut must_sync = false;
        let mut entries = 0usize;
        for id in touched.iter() {
            let Some(p) = self.peers.get_mut(id) else {
                continue;
            };
            p.flush_reads();
            if gc {
                p.maybe_compact_log(&mut wb);
            }
            if let Some(rd) = p.collect_ready(&mut wb, &mut actx, &self.transport) {
                must_sync |= rd.must_sync();
                entries += rd.entries().len();
                readies.push((*id, rd));
            }
        }
        if !wb.is_empty() {
            let sync = must_sync && self.sync_writes;
            // Chaos tests: crash (exit 75) or stall just before or after the log write.
            fail::fail_point!("raft_before_write", |_| std::process::exit(75));
            if let Err(e) = engine.write(wb, sync) {
                crate::fatal(&format!("raft worker {} write failed: {e}", self.index));
            }
            fail::fail_point!("raft_after_write", |_| std::process::exit(75));
            if sync {
                metrics::counter!("tessera_fsyncs_total").increment(1);
                metrics::counter!("tessera_raft_entries_persisted_total").increment(entries as u64);
                metrics::histogram!("tessera_entries_per_fsync").record(entries as f64);
                metrics::histogram!("tessera_regions_per_fsync").record(readies.len() as f64);
            }
        }
        metrics::counter!("tessera_entries_applied_total").increment(actx.applied_entries);
        actx.send_replies();

        let mut wb = engine.batch();
        let mut actx = ApplyCtx::default();
        for (id, rd) in readies {
            if let Some(p) = self.peers.get_mut(&id) {
                p.after_persist(rd, &mut wb, &mut actx, &self.transport);
            }
        }
        if !wb.is_empty() {
            if let Err(e) = engine.write(wb, false) {
                crate::fatal(&format!(
                    "raft worker {} apply write failed: {e}",
                    self.index
                ));
            }
        }
        metrics::counter!("tessera_entries_applied_total").increment(actx.applied_entries);
        actx.send_replies();

        let mut still = HashSet::new();
        let mut more_work = false;
        for id in touched.drain() {
            if let Some(p) = self.peers.get_mut(&id) {
                p.serve_ready_reads();
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
        more_work
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
        _ => {
            metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "region_not_found")
                .increment(1);
        }
    }
}
