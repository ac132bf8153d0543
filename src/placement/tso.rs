//! The timestamp oracle: one cluster-wide revision clock (docs/architecture.md, "Cluster
//! revisions").
//!
//! The oracle runs on the leader of the placement region that holds the key
//! [`tso_key`](crate::storage::keys::tso_key). It hands out revisions from a window held in
//! memory and keeps, in that key, a high-water mark at or above every revision it may hand
//! out: a window is reserved by a compare-and-swap of the mark through raft before any of it
//! is served. Each node asks it once per batch for every write its workers are about to
//! propose ([`TsoClient`]).
//!
//! Why the revisions follow real time (a revision handed out after another was handed out is
//! larger): within one leadership the window only moves up; a new leader reserves above the
//! mark, which covers every window of its predecessors (it has applied their reservations
//! before it holds a lease); and a revision is handed out only while the leader's lease is
//! valid, so no two leaders hand out revisions at overlapping times.
//!
//! Invariants:
//! - a revision is handed out only while this node holds the lease of the oracle's region in
//!   the same term as the window it comes from; any change of term discards the window;
//! - the mark in raft is at or above the end of every window ever served from;
//! - revisions are positive and never handed out twice (gaps are allowed: a discarded
//!   window's rest is never used);
//! - nodes never cache revisions across batches: that would break the real-time order (a
//!   test-only fail point, `tso_cached_window`, does exactly that for the checkers).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Mutex};

use super::client::SystemClient;
use super::{update, Update};
use crate::client::Error;
use crate::ids::RegionId;
use crate::raftstore::local_read::LocalReader;
use crate::raftstore::msg::RegionError;
use crate::storage::keys::{self, tso_key};

/// Revisions reserved per write of the mark. A leader change skips the rest of a window.
pub const WINDOW: u64 = 10_000;
/// Most revisions one request may ask for.
pub const MAX_REQUEST: u32 = 1 << 20;
/// How long a node waits for the oracle before failing the writes that wait for it.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// A range of revisions reserved under one leadership.
struct Window {
    region: RegionId,
    term: u64,
    next: u64,
    /// One past the last revision of the window (the mark it reserved).
    end: u64,
}

/// Why the oracle did not hand out revisions.
#[derive(Debug)]
pub enum TsoError {
    /// This node does not hold the region's lease now: a linearizable read through the
    /// region renews it (or says who leads), then ask again.
    NoLease,
    /// The request reached the wrong region.
    Region(RegionError),
    /// Reserving a window failed.
    Failed(String),
}

/// The oracle's serving side, on every node; it serves only where the lease is.
pub struct TsoServer {
    reader: LocalReader,
    system: SystemClient,
    window: Mutex<Option<Window>>,
    /// The region this node last found holding the oracle's key under its lease.
    oracle_region: AtomicU64,
}

impl TsoServer {
    pub fn new(reader: LocalReader, system: SystemClient) -> Self {
        Self {
            reader,
            system,
            window: Mutex::new(None),
            oracle_region: AtomicU64::new(0),
        }
    }

    /// The first of `count` consecutive new revisions, handed out by region `region`'s
    /// leader under its lease.
    pub async fn allocate(&self, region: RegionId, count: u32) -> Result<u64, TsoError> {
        let count = u64::from(count);
        let mut window = self.window.lock().await;
        for _ in 0..3 {
            let Some(view) = self.reader.live_view(region) else {
                return Err(TsoError::NoLease);
            };
            let r = &view.region;
            if !keys::in_range(&tso_key(), &r.start_key, &r.end_key) {
                return Err(TsoError::Region(RegionError::KeyNotInRegion {
                    key: tso_key(),
                    region,
                    start: r.start_key.clone(),
                    end: r.end_key.clone(),
                }));
            }
            if let Some(w) = window.as_mut() {
                if w.region == region && w.term == view.term && w.end - w.next >= count {
                    let first = w.next;
                    w.next += count;
                    metrics::counter!("tessera_tso_revisions_total").increment(count);
                    return Ok(first);
                }
            }
            *window = None;
            let (next, end) = self.reserve(count.max(WINDOW)).await?;
            // Serve from the window only if the leadership that reserved it still holds.
            match self.reader.live_view(region) {
                Some(v) if v.term == view.term => {
                    *window = Some(Window {
                        region,
                        term: view.term,
                        next,
                        end,
                    })
                }
                _ => return Err(TsoError::NoLease),
            }
        }
        Err(TsoError::Failed("the oracle's window kept changing".into()))
    }

    /// Serves `count` revisions in-process when this node leads the oracle's region under
    /// a lease (the node's own writes skip the round trip through the client library);
    /// `None` when it does not, and the request goes the usual way.
    pub async fn allocate_here(&self, count: u32) -> Option<u64> {
        let key = tso_key();
        let cached = RegionId(self.oracle_region.load(Ordering::Relaxed));
        let region = match self.reader.live_view(cached) {
            Some(v) if keys::in_range(&key, &v.region.start_key, &v.region.end_key) => cached,
            _ => {
                let found = self.reader.live_region_of(&key)?;
                self.oracle_region.store(found.0, Ordering::Relaxed);
                found
            }
        };
        self.allocate(region, count).await.ok()
    }

    /// Raises the mark by `n`; returns the reserved revisions `[old + 1, old + n + 1)`.
    async fn reserve(&self, n: u64) -> Result<(u64, u64), TsoError> {
        let client = self.system.get().await.map_err(failed)?;
        let (next, end) = update(&client, &tso_key(), 10, "revision reservation", |cur| {
            let mark = match cur {
                None => 0,
                Some(kv) => kv
                    .value
                    .as_slice()
                    .try_into()
                    .map(u64::from_be_bytes)
                    .map_err(|_| Error::Server("the oracle's mark is not 8 bytes".into()))?,
            };
            let end = mark
                .checked_add(n)
                .filter(|e| *e < i64::MAX as u64)
                .ok_or_else(|| Error::Server("cluster revisions exhausted".into()))?;
            Ok(Update::Write(
                end.to_be_bytes().to_vec(),
                (mark + 1, end + 1),
            ))
        })
        .await
        .map_err(failed)?;
        metrics::counter!("tessera_tso_windows_total").increment(1);
        tracing::debug!(next, end, "timestamp oracle reserved a window");
        Ok((next, end))
    }
}

fn failed(e: Error) -> TsoError {
    TsoError::Failed(e.to_string())
}

/// What a worker gets back: the first of the revisions it asked for, or why none.
pub type Stamps = Result<u64, String>;

/// One worker's request. Answered exactly once: if it is dropped unanswered (the client's
/// task ended), it answers with an error, so no worker waits forever.
struct Ask {
    count: u32,
    done: Option<Box<dyn FnOnce(Stamps) + Send>>,
}

impl Ask {
    fn answer(mut self, r: Stamps) {
        if let Some(done) = self.done.take() {
            done(r);
        }
    }
}

impl Drop for Ask {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(Err("the node's oracle client stopped".into()));
        }
    }
}

/// A node's way to the oracle: every ask that arrives while a request is out goes in the
/// next request, so a node sends at most one request at a time whatever its load.
#[derive(Clone)]
pub struct TsoClient {
    tx: mpsc::UnboundedSender<Ask>,
    /// The highest revision this node has been handed.
    seen: Arc<AtomicU64>,
}

impl TsoClient {
    /// Starts the client's task on the current runtime.
    /// Starts the client's task on the current runtime; `here` is this node's serving
    /// side, asked first.
    pub fn start(system: SystemClient, here: SharedTso) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let seen = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(system, here, rx, seen.clone()));
        Self { tx, seen }
    }

    /// Whether `rev` has been handed out already (to anyone): true at once if this node has
    /// seen a revision at least as high, otherwise after asking the oracle for a new one.
    pub async fn handed_out(&self, rev: u64) -> Result<bool, String> {
        if rev <= self.seen.load(Ordering::Acquire) {
            return Ok(true);
        }
        Ok(rev <= self.latest().await?)
    }

    /// The latest revision: one newly handed out.
    pub async fn latest(&self) -> Result<u64, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.ask(1, move |r| {
            let _ = tx.send(r);
        });
        rx.await.map_err(|_| "the node is stopping".to_string())?
    }

    /// Asks for `count` revisions; `done` runs on the client's task with the answer. If the
    /// node is stopping, `done` gets an error at once.
    pub fn ask(&self, count: u32, done: impl FnOnce(Stamps) + Send + 'static) {
        // A refused send drops the ask, which answers it with an error.
        let _ = self.tx.send(Ask {
            count,
            done: Some(Box::new(done)),
        });
    }
}

impl crate::raftstore::worker::RevisionSource for TsoClient {
    fn ask(&self, count: u32, done: Box<dyn FnOnce(Stamps) + Send>) {
        TsoClient::ask(self, count, done)
    }
}

async fn run(
    system: SystemClient,
    here: SharedTso,
    mut rx: mpsc::UnboundedReceiver<Ask>,
    seen: Arc<AtomicU64>,
) {
    let mut cached: std::ops::Range<u64> = 0..0;
    while let Some(first) = rx.recv().await {
        let mut asks = vec![first];
        while let Ok(a) = rx.try_recv() {
            asks.push(a);
        }
        let total: u64 = asks.iter().map(|a| u64::from(a.count)).sum();
        let got = if cache_windows() {
            // Test-only: serve from a window kept across requests (breaks real-time order).
            if cached.end - cached.start < total {
                cached = fetch(&system, &here, total.max(1000)).await.unwrap_or(0..0);
            }
            if cached.end - cached.start >= total {
                let first = cached.start;
                cached.start += total;
                Ok(first)
            } else {
                Err("the oracle did not answer".to_string())
            }
        } else {
            fetch(&system, &here, total).await.map(|r| r.start)
        };
        metrics::counter!("tessera_tso_requests_total").increment(1);
        if let Ok(first) = &got {
            seen.fetch_max(first.saturating_add(total - 1), Ordering::AcqRel);
        }
        match answer_delay() {
            // Test-only: the answer reaches the asking workers late (tests of reads at a
            // revision while writes wait for theirs).
            Some(d) => {
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    hand_out(got, asks);
                });
            }
            None => hand_out(got, asks),
        }
    }
}

/// Gives each ask its share of the answer, in the order they came.
fn hand_out(got: Stamps, asks: Vec<Ask>) {
    let mut next = got.clone();
    for a in asks {
        let count = u64::from(a.count);
        let share = next.clone();
        next = next.map(|n| n.saturating_add(count));
        a.answer(share);
    }
}

async fn fetch(
    system: &SystemClient,
    here: &TsoServer,
    total: u64,
) -> Result<std::ops::Range<u64>, String> {
    let count = u32::try_from(total)
        .ok()
        .filter(|c| *c <= MAX_REQUEST)
        .ok_or_else(|| format!("{total} revisions asked at once"))?;
    if let Some(first) = here.allocate_here(count).await {
        return Ok(first..first + total);
    }
    let ask = async {
        let client = system.get().await.map_err(|e| e.to_string())?;
        client.tso(count).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(ASK_TIMEOUT, ask).await {
        Ok(r) => r,
        Err(_) => Err("the timestamp oracle did not answer in time".into()),
    }
}

#[cfg(feature = "failpoints")]
fn cache_windows() -> bool {
    fail::eval("tso_cached_window", |_| ()).is_some()
}

#[cfg(not(feature = "failpoints"))]
fn cache_windows() -> bool {
    false
}

#[cfg(feature = "failpoints")]
fn answer_delay() -> Option<Duration> {
    fail::eval("tso_delay_answer", |arg| arg.and_then(|a| a.parse().ok()))
        .flatten()
        .map(Duration::from_millis)
}

#[cfg(not(feature = "failpoints"))]
fn answer_delay() -> Option<Duration> {
    None
}

/// Shared handle the services use.
pub type SharedTso = Arc<TsoServer>;

/// What the client API needs of placement: the oracle's serving side, the node's client of
/// the oracle, and the node's placement client.
#[derive(Clone)]
pub struct Oracle {
    pub server: SharedTso,
    pub client: TsoClient,
    pub placement: SystemClient,
}
