//! Watching a key range: every change from a start revision, in revision order, across
//! regions, resumed by itself across splits, leader changes and reconnects
//! (the server side: docs/architecture.md, "Watch").
//!
//! A watch is split into *pieces*, one per region its range overlaps. Each piece has a
//! server watch on its region's leader and knows the revision it is **complete** up to:
//! every event of its keys at or below it has arrived (an event of revision R completes R —
//! a server sends each revision's events in one message, in order — and so does a progress
//! message). Events wait in one buffer by revision and are released once every piece is
//! complete past them, so a revision's events across regions come out together, in
//! revision order. When a piece loses its server watch (the region split or its leader
//! moved, the connection broke, this client fell behind) it watches again from the revision
//! after the one it is complete up to, where its keys are now: nothing is lost, and nothing
//! it already had comes twice.
//!
//! Invariants:
//! - a piece's `complete` only rises, except when the buffer is dropped (see below), and
//!   only from messages of its current server watch;
//! - released revisions rise strictly; a revision is released only when every piece is
//!   complete at or past it;
//! - the buffer holds at most about `max_buffered_events` events: past that it is dropped
//!   and every piece ahead of the released revision starts again from it (history);
//! - a compacted start ends the watch with `Error::Compacted`; a piece that finds no node
//!   for longer than the client's deadline ends it with `Error::Unavailable`.

mod mux;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::cache::CachedRegion;
use super::{Client, Error, Result};
use crate::proto::{self, region_error, KeyValue};
pub(crate) use mux::Mux;
use mux::{Lost, SubMsg};

/// How a watch starts and what it reports.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// The first revision to report (history is read from it); 0 = changes after the call.
    pub start_revision: u64,
    /// Events carry the key's previous record.
    pub prev_kv: bool,
    /// Leave out puts, or deletes.
    pub no_put: bool,
    pub no_delete: bool,
    /// Also yield progress notifications (no events, a revision every event at or below
    /// which has been yielded) when nothing else came for `progress_interval`.
    pub progress_notify: bool,
    pub progress_interval: Duration,
    /// Events held while waiting for other regions before the watch drops them and reads
    /// them again from history.
    pub max_buffered_events: usize,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            start_revision: 0,
            prev_kv: false,
            no_put: false,
            no_delete: false,
            progress_notify: false,
            progress_interval: Duration::from_secs(1),
            max_buffered_events: 100_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change of a key.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    /// For a delete: the key, `mod_revision` the delete's revision, version 0.
    pub kv: KeyValue,
    /// The key before the change (when asked for and it existed).
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    fn from_proto(e: proto::Event) -> Self {
        Event {
            kind: if e.r#type == proto::event::EventType::Delete as i32 {
                EventKind::Delete
            } else {
                EventKind::Put
            },
            kv: e.kv.unwrap_or_default(),
            prev_kv: e.prev_kv,
        }
    }
}

/// The events of one revision, or (no events) a progress notification: every event at or
/// below `revision` has been yielded.
#[derive(Clone, Debug, PartialEq)]
pub struct WatchResponse {
    pub revision: u64,
    pub events: Vec<Event>,
}

impl WatchResponse {
    pub fn is_progress_notify(&self) -> bool {
        self.events.is_empty()
    }
}

/// A running watch: a stream of responses, ending with an error if the watch cannot go on
/// (`Compacted`, `Unavailable`). Dropping it stops the watch.
pub struct Watcher {
    rx: mpsc::Receiver<Result<WatchResponse>>,
    task: tokio::task::JoinHandle<()>,
    start_revision: u64,
}

impl Watcher {
    /// The first revision this watch reports.
    pub fn start_revision(&self) -> u64 {
        self.start_revision
    }
}

impl futures::Stream for Watcher {
    type Item = Result<WatchResponse>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Watches every key in `[start, end)` (empty `end` = to the end of the user keyspace).
    pub async fn watch(&self, start: &[u8], end: &[u8], opts: WatchOptions) -> Result<Watcher> {
        let user_end = vec![tessera_api::keys::SYSTEM_KEY_PREFIX];
        let end = if end.is_empty() || end > &user_end[..] {
            user_end
        } else {
            end.to_vec()
        };
        if end.as_slice() <= start {
            return Err(Error::InvalidArgument(
                "a watch needs a non-empty range in the user keyspace".into(),
            ));
        }
        let start_revision = match opts.start_revision {
            0 => self.current_revision().await? + 1,
            r => r,
        };
        let (user, rx) = mpsc::channel(64);
        let (tx_sub, rx_sub) = mpsc::channel(1024);
        let merger = Merger {
            client: self.clone(),
            pieces: vec![Piece {
                start: start.to_vec(),
                end,
                complete: start_revision - 1,
                sub: None,
                retry_at: Instant::now(),
                attempts: 0,
                down_since: Some(Instant::now()),
            }],
            buf: Buffer {
                released: start_revision - 1,
                ..Default::default()
            },
            notified: start_revision - 1,
            last_yield: Instant::now(),
            tx_sub,
            rx_sub,
            lost: Arc::new(Lost::default()),
            user,
            opts,
        };
        Ok(Watcher {
            rx,
            task: tokio::spawn(merger.run()),
            start_revision,
        })
    }

    /// Watches every key that starts with `prefix`.
    pub async fn watch_prefix(&self, prefix: &[u8], opts: WatchOptions) -> Result<Watcher> {
        self.watch(prefix, &tessera_api::keys::prefix_end(prefix), opts)
            .await
    }

    /// The cluster's current revision: at least the revision of every write acknowledged
    /// before the call.
    pub async fn current_revision(&self) -> Result<u64> {
        self.any_channel(|ch| async move {
            Self::kv(ch)
                .revision(proto::RevisionRequest {})
                .await
                .map(|r| r.into_inner().revision)
        })
        .await
    }

    /// The watch stream to the node at `addr` (opened if there is none alive).
    async fn watch_mux(&self, addr: &str) -> std::result::Result<Mux, String> {
        if let Some(m) = self.inner.watch_muxes.get(addr) {
            if !m.is_dead() {
                return Ok(m.clone());
            }
        }
        let conn = self.channel(addr).await?;
        let m = Mux::open(conn.ch)
            .await
            .map_err(|s| format!("{addr}: {}", s.message()))?;
        self.inner.watch_muxes.insert(addr.to_string(), m.clone());
        Ok(m)
    }
}

/// One region's part of a watch.
struct Piece {
    start: Vec<u8>,
    end: Vec<u8>,
    /// Every event of these keys at or below this revision has arrived.
    complete: u64,
    sub: Option<Sub>,
    /// When to try again to start a server watch (no `sub`).
    retry_at: Instant,
    attempts: u32,
    /// Since when the piece has had no server watch it could start.
    down_since: Option<Instant>,
}

/// A piece's server watch.
struct Sub {
    id: u64,
    mux: Mux,
    region: CachedRegion,
    created: Instant,
}

/// Events that arrived but are not released yet, by revision.
#[derive(Default)]
struct Buffer {
    events: BTreeMap<u64, Vec<Event>>,
    count: usize,
    /// Every event at or below this has been released (or, below the start, never existed).
    released: u64,
}

impl Buffer {
    /// A server watch's events of `revision` for a piece complete up to `complete`.
    fn add(&mut self, complete: &mut u64, revision: u64, events: Vec<proto::Event>) {
        if revision <= *complete {
            return;
        }
        *complete = revision;
        self.count += events.len();
        self.events
            .entry(revision)
            .or_default()
            .extend(events.into_iter().map(Event::from_proto));
    }

    /// Takes every revision at or below `upto` (the least `complete` of the pieces), in
    /// revision order, each revision's events in key order.
    fn take(&mut self, upto: u64) -> Vec<WatchResponse> {
        let mut out = Vec::new();
        while let Some(entry) = self.events.first_entry() {
            if *entry.key() > upto {
                break;
            }
            let (revision, mut events) = entry.remove_entry();
            self.count -= events.len();
            events.sort_by(|a, b| a.kv.key.cmp(&b.kv.key));
            out.push(WatchResponse { revision, events });
        }
        self.released = self.released.max(upto);
        out
    }

    fn clear(&mut self) {
        self.events.clear();
        self.count = 0;
    }
}

struct Merger {
    client: Client,
    opts: WatchOptions,
    pieces: Vec<Piece>,
    buf: Buffer,
    /// The last revision yielded (events or a progress notification).
    notified: u64,
    last_yield: Instant,
    tx_sub: mpsc::Sender<(u64, SubMsg)>,
    rx_sub: mpsc::Receiver<(u64, SubMsg)>,
    lost: Arc<Lost>,
    user: mpsc::Sender<Result<WatchResponse>>,
}

/// The watch cannot go on.
struct Stop;

/// However the watch ends (its task aborted when the `Watcher` is dropped included), its
/// server watches are cancelled: a quiet range would otherwise keep them for good.
impl Drop for Merger {
    fn drop(&mut self) {
        for p in &mut self.pieces {
            if let Some(s) = p.sub.take() {
                s.mux.cancel(s.id);
            }
        }
    }
}

impl Merger {
    async fn run(mut self) {
        let _ = self.drive().await;
    }

    async fn drive(&mut self) -> std::result::Result<(), Stop> {
        loop {
            self.subscribe_due().await?;
            let wake = self.next_wake();
            tokio::select! {
                m = self.rx_sub.recv() => {
                    if let Some((id, msg)) = m {
                        self.on_message(id, msg).await?;
                    }
                    while let Ok((id, msg)) = self.rx_sub.try_recv() {
                        self.on_message(id, msg).await?;
                    }
                }
                _ = self.lost.notify.notified() => {
                    for id in self.lost.take() {
                        if let Some(p) = self
                            .pieces
                            .iter_mut()
                            .find(|p| p.sub.as_ref().is_some_and(|s| s.id == id))
                        {
                            let sub = p.sub.take().expect("found by its sub");
                            Self::schedule(p, &sub);
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
                _ = self.user.closed() => return Err(Stop),
            }
            self.bound_buffer();
            self.release().await?;
        }
    }

    /// The piece lost `sub`: try again after a backoff. A server watch that lasted a while
    /// starts a new outage; one refused at once continues the outage it was meant to end
    /// (so a region that no node serves ends the watch after the deadline).
    fn schedule(p: &mut Piece, sub: &Sub) {
        Self::retry_later(p);
        if sub.created.elapsed() >= Duration::from_secs(1) {
            p.down_since = Some(Instant::now());
        }
    }

    fn retry_later(p: &mut Piece) {
        p.attempts += 1;
        let backoff = Duration::from_millis((10u64 << p.attempts.min(6)).min(500));
        p.retry_at = Instant::now() + backoff;
        p.down_since.get_or_insert_with(Instant::now);
    }

    /// When the loop must look again without a message: a piece to retry, a progress
    /// notification due.
    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(1);
        for p in self.pieces.iter().filter(|p| p.sub.is_none()) {
            wake = wake.min(p.retry_at);
        }
        // A notification is due only once there is something new to report.
        if self.opts.progress_notify && self.buf.released > self.notified {
            wake = wake.min(self.last_yield + self.opts.progress_interval);
        }
        wake
    }

    /// Starts a server watch for every piece that has none and is due.
    async fn subscribe_due(&mut self) -> std::result::Result<(), Stop> {
        let now = Instant::now();
        let mut i = 0;
        while i < self.pieces.len() {
            let p = &self.pieces[i];
            if p.sub.is_some() || p.retry_at > now {
                i += 1;
                continue;
            }
            if p.down_since
                .is_some_and(|t| now.duration_since(t) > self.client.inner.opts.deadline)
            {
                let _ = self
                    .user
                    .send(Err(Error::Unavailable(format!(
                        "no node could serve the watch of {:02x?} for {:?}",
                        p.start, self.client.inner.opts.deadline
                    ))))
                    .await;
                return Err(Stop);
            }
            if let Err(why) = self.subscribe(i).await {
                tracing::debug!(piece = ?self.pieces[i].start, %why, "watch not started yet");
                Self::retry_later(&mut self.pieces[i]);
            }
            i += 1;
        }
        Ok(())
    }

    async fn subscribe(&mut self, i: usize) -> std::result::Result<(), String> {
        let region = self
            .client
            .locate(&self.pieces[i].start)
            .await
            .map_err(|e| e.to_string())?;
        // The region may end before the piece does: the rest becomes a piece of its own.
        let region_end = region.region.end_key.clone();
        if !region_end.is_empty() && region_end < self.pieces[i].end {
            let rest = Piece {
                start: region_end.clone(),
                end: std::mem::replace(&mut self.pieces[i].end, region_end),
                complete: self.pieces[i].complete,
                sub: None,
                retry_at: Instant::now(),
                attempts: 0,
                down_since: self.pieces[i].down_since,
            };
            self.pieces.insert(i + 1, rest);
        }
        let Some((node, addr)) = self.client.target(&region, self.pieces[i].attempts) else {
            let _ = self.client.refresh().await;
            return Err(format!("no address for region {}", region.region.id));
        };
        let mux = match self.client.watch_mux(&addr).await {
            Ok(m) => m,
            Err(e) => {
                self.client.rpc_failed(&region, node);
                return Err(e);
            }
        };
        let p = &self.pieces[i];
        let create = proto::WatchCreate {
            watch_id: 0,
            header: Some(self.client.header(&region)),
            start_key: p.start.clone(),
            end_key: p.end.clone(),
            start_revision: p.complete + 1,
            prev_kv: self.opts.prev_kv,
            no_put: self.opts.no_put,
            no_delete: self.opts.no_delete,
            progress: self.pieces.len() > 1 || self.opts.progress_notify,
        };
        let id = mux
            .create(create, self.tx_sub.clone(), self.lost.clone())
            .ok_or_else(|| format!("{addr}: the watch stream closed"))?;
        let p = &mut self.pieces[i];
        p.sub = Some(Sub {
            id,
            mux,
            region,
            created: Instant::now(),
        });
        Ok(())
    }

    async fn on_message(&mut self, id: u64, msg: SubMsg) -> std::result::Result<(), Stop> {
        let Some(i) = self
            .pieces
            .iter()
            .position(|p| p.sub.as_ref().is_some_and(|s| s.id == id))
        else {
            // A server watch this piece already gave up.
            return Ok(());
        };
        let p = &mut self.pieces[i];
        match msg {
            SubMsg::Events(revision, events) => {
                p.attempts = 0;
                p.down_since = None;
                self.buf.add(&mut p.complete, revision, events);
            }
            SubMsg::Progress(revision) => {
                p.complete = p.complete.max(revision);
                p.attempts = 0;
                p.down_since = None;
            }
            SubMsg::Canceled(c) => {
                let sub = p.sub.take().expect("found by its sub");
                match c.region_error {
                    Some(proto::RegionError {
                        error: Some(region_error::Error::Compacted(c)),
                        ..
                    }) => {
                        let _ = self
                            .user
                            .send(Err(Error::Compacted {
                                compact_revision: c.compact_revision,
                            }))
                            .await;
                        return Err(Stop);
                    }
                    Some(e) => {
                        self.client.on_region_error(&sub.region, e).await;
                        Self::schedule(&mut self.pieces[i], &sub);
                    }
                    None => {
                        let r = c.reason;
                        let e = if let Some(why) = r.strip_prefix("permission denied: ") {
                            Error::PermissionDenied(why.into())
                        } else if let Some(why) = r.strip_prefix("unauthenticated: ") {
                            Error::Unauthenticated(why.into())
                        } else {
                            Error::Server(r)
                        };
                        let _ = self.user.send(Err(e)).await;
                        return Err(Stop);
                    }
                }
            }
        }
        Ok(())
    }

    /// Too many events wait for a slow region: drop them and read them again later.
    fn bound_buffer(&mut self) {
        if self.buf.count <= self.opts.max_buffered_events {
            return;
        }
        self.buf.clear();
        for p in &mut self.pieces {
            if p.complete > self.buf.released {
                p.complete = self.buf.released;
                if let Some(s) = p.sub.take() {
                    s.mux.cancel(s.id);
                }
                p.retry_at = Instant::now();
            }
        }
    }

    /// Yields every buffered revision all pieces are complete past, then a progress
    /// notification if one is due.
    async fn release(&mut self) -> std::result::Result<(), Stop> {
        let upto = self
            .pieces
            .iter()
            .map(|p| p.complete)
            .min()
            .unwrap_or(self.buf.released);
        for r in self.buf.take(upto) {
            self.yield_response(r).await?;
        }
        if self.opts.progress_notify
            && self.buf.released > self.notified
            && self.last_yield.elapsed() >= self.opts.progress_interval
        {
            let revision = self.buf.released;
            self.yield_response(WatchResponse {
                revision,
                events: Vec::new(),
            })
            .await?;
        }
        Ok(())
    }

    async fn yield_response(&mut self, r: WatchResponse) -> std::result::Result<(), Stop> {
        self.notified = r.revision;
        self.last_yield = Instant::now();
        self.user.send(Ok(r)).await.map_err(|_| Stop)
    }
}

#[cfg(test)]
mod tests;
