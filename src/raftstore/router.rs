//! Region id → the mailbox of the worker that owns the region.
//!
//! A lock-free `DashMap` lookup and a channel send: the router never blocks and never touches
//! a peer. A message for a region this node does not host is handed back to the caller, which
//! takes the node's control path: answer `RegionNotFound`, count and drop, or stash a raft
//! message for a few seconds in case the region is about to start here ([`Router::stash`]).
//!
//! Invariants:
//! - routing never blocks and never touches a peer; each region maps to one worker;
//! - client work is refused (`Busy`) once the worker's inbox holds more than
//!   [`BUSY_QUEUE_LEN`] messages; raft traffic is never refused for load;
//! - the stash holds at most 4,096 messages, each for at most 3 s, and hands a region its
//!   messages in arrival order when it registers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use dashmap::DashMap;

use super::msg::{PeerMsg, WorkerMsg};
use crate::ids::{PeerId, RegionId};

/// Above this many queued messages a worker is "busy" and new client work is refused with
/// `ServerBusy` instead of queueing without bound. Raft traffic is never refused here.
pub const BUSY_QUEUE_LEN: usize = 50_000;

#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    regions: DashMap<RegionId, usize>,
    workers: Vec<Sender<WorkerMsg>>,
    /// Raft messages for regions not (yet) here, kept briefly: the peers of a region just
    /// split off start on the parent's leader node first and campaign at once, and their vote
    /// requests must not be lost on a node that applies the split a moment later.
    stash: Mutex<Stash>,
}

/// Most raft messages stashed for unknown regions, and how long one is kept.
const STASH_MAX: usize = 4096;
const STASH_TTL: Duration = Duration::from_secs(3);

#[derive(Default)]
struct Stash {
    msgs: HashMap<RegionId, Vec<(Instant, PeerMsg)>>,
    len: usize,
}

/// Why a message could not be routed. It is handed back so the caller can answer it.
pub enum RouteError {
    RegionNotFound(PeerMsg),
    /// The worker is gone (the node is shutting down).
    Closed(PeerMsg),
    Busy(PeerMsg),
}

impl Router {
    pub fn new(workers: Vec<Sender<WorkerMsg>>) -> Self {
        assert!(!workers.is_empty(), "invariant: at least one raft worker");
        Self {
            inner: Arc::new(Inner {
                regions: DashMap::new(),
                workers,
                stash: Mutex::default(),
            }),
        }
    }

    /// The worker a new region goes to: spread by id.
    pub fn worker_for(&self, region: RegionId) -> usize {
        (region.0 % self.inner.workers.len() as u64) as usize
    }

    /// Routes `region` to `worker` from now on, and delivers the messages stashed for it.
    pub fn register(&self, region: RegionId, worker: usize) {
        self.inner.regions.insert(region, worker);
        let stashed = {
            let mut st = self.inner.stash.lock().unwrap_or_else(|e| e.into_inner());
            let v = st.msgs.remove(&region).unwrap_or_default();
            st.len -= v.len();
            v
        };
        for (at, msg) in stashed {
            if at.elapsed() < STASH_TTL {
                let _ = self.send(region, msg);
            }
        }
    }

    /// Keeps a raft message for a region this node does not host (yet); delivered if the
    /// region registers within a few seconds, dropped otherwise. Returns false when dropped.
    pub fn stash(&self, region: RegionId, msg: PeerMsg) -> bool {
        let mut st = self.inner.stash.lock().unwrap_or_else(|e| e.into_inner());
        if st.len >= STASH_MAX {
            let Stash { msgs, len } = &mut *st;
            msgs.retain(|_, v| {
                let before = v.len();
                v.retain(|(at, _)| at.elapsed() < STASH_TTL);
                *len -= before - v.len();
                !v.is_empty()
            });
            if st.len >= STASH_MAX {
                return false;
            }
        }
        // A region that registered meanwhile gets it directly.
        if self.contains(region) {
            drop(st);
            return self.send(region, msg).is_ok();
        }
        st.msgs
            .entry(region)
            .or_default()
            .push((Instant::now(), msg));
        st.len += 1;
        true
    }

    pub fn unregister(&self, region: RegionId) {
        self.inner.regions.remove(&region);
    }

    pub fn contains(&self, region: RegionId) -> bool {
        self.inner.regions.contains_key(&region)
    }

    pub fn region_ids(&self) -> Vec<RegionId> {
        self.inner.regions.iter().map(|e| *e.key()).collect()
    }

    pub fn region_count(&self) -> usize {
        self.inner.regions.len()
    }

    pub fn send(&self, region: RegionId, msg: PeerMsg) -> Result<(), RouteError> {
        self.route(region, msg, false)
    }

    /// Like [`Router::send`], but refuses client work when the owning worker is overloaded.
    pub fn send_client(&self, region: RegionId, msg: PeerMsg) -> Result<(), RouteError> {
        self.route(region, msg, true)
    }

    /// One map lookup per message: the hot path of every request and raft message.
    fn route(
        &self,
        region: RegionId,
        msg: PeerMsg,
        refuse_when_busy: bool,
    ) -> Result<(), RouteError> {
        let Some(worker) = self.inner.regions.get(&region).map(|w| *w) else {
            return Err(RouteError::RegionNotFound(msg));
        };
        let inbox = &self.inner.workers[worker];
        if refuse_when_busy && inbox.len() > BUSY_QUEUE_LEN {
            return Err(RouteError::Busy(msg));
        }
        inbox
            .send(WorkerMsg::Peer { region, msg })
            .map_err(|e| match e.into_inner() {
                WorkerMsg::Peer { msg, .. } => RouteError::Closed(msg),
                _ => unreachable!("we sent a Peer message"),
            })
    }

    pub fn send_worker(&self, worker: usize, msg: WorkerMsg) -> bool {
        self.inner.workers[worker].send(msg).is_ok()
    }

    /// Tells every worker that `node` looks down (`why` says who noticed), so each wakes
    /// the sleeping regions led from there.
    pub fn node_down(&self, node: crate::ids::NodeId, why: super::msg::Wake) {
        for w in &self.inner.workers {
            let _ = w.send(WorkerMsg::NodeDown { node, why });
        }
    }

    pub fn worker_count(&self) -> usize {
        self.inner.workers.len()
    }
}

/// The transport's delivery reports go to the regions' peers (and, for a node that is down,
/// to every worker, which wakes the sleeping regions that node leads).
impl crate::transport::DeliveryReports for Router {
    fn unreachable(&self, region: RegionId, to: PeerId) {
        let _ = self.send(region, PeerMsg::Unreachable(to));
    }

    fn snapshot_status(&self, region: RegionId, to: PeerId, delivered: bool) {
        let _ = self.send(region, PeerMsg::SnapshotStatus { to, delivered });
    }

    fn node_down(&self, node: crate::ids::NodeId) {
        Router::node_down(self, node, super::msg::Wake::TransportNodeDown);
    }
}
