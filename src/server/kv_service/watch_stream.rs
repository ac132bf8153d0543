//! The `Watch` stream: many watches of one client connection on one bidirectional stream
//! (docs/architecture.md, "Watch"). Each watch covers keys of one region and runs as its own
//! task: it registers with the region's leader (`raftstore::hub`), reads history from its
//! start revision up to the revision it registered at, then forwards what apply publishes.
//!
//! Invariants:
//! - a watch sends each revision's events in one message, in revision order, from its start
//!   revision on, none twice: `next` (the first revision not sent yet) only rises, and
//!   nothing below it is sent;
//! - `progress R` is sent only when every event at or below R has been sent: R is either
//!   the region's highest applied revision at registration (history was read up to it) or
//!   a resolved revision, and the queue is drained before a resolved revision is taken;
//! - a watch whose queue filled (a slow reader) registers again and reads history from
//!   `next`: memory per watch stays bounded;
//! - history is read only above the compacted revision; a start at or below it, or a
//!   compaction that overtakes the reading, cancels the watch with `Compacted`;
//! - no watch task outlives its stream;
//! - a watch sends events only while its caller may read its whole range (`crate::auth`):
//!   refused at the start, cancelled when a permission is revoked.

use std::collections::HashMap;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::{Status, Streaming};

use super::KvCore;
use crate::auth::{Caller, Need};
use crate::ids::RegionId;
use crate::proto::{self, watch_message::Body};
use crate::raftstore::cmd::key_value;
use crate::raftstore::msg::{Ended, HubBatch, WatchSpec};
use crate::raftstore::msg::{PeerMsg, RegionError};
use crate::storage::{keys::SYSTEM_KEY_PREFIX, mvcc};

/// Changes read from history at a time by a watch catching up.
const CATCH_UP_CHANGES: usize = 1024;
/// Watch messages waiting to be written to one stream.
const STREAM_QUEUE: usize = 1024;
/// Most watches one stream may carry.
const MAX_STREAM_WATCHES: usize = 100_000;

/// Serves one `Watch` stream until the client closes it, it breaks or the node stops.
pub(super) async fn serve_watch(
    core: Arc<KvCore>,
    mut inbound: Streaming<proto::WatchRequest>,
    caller: Caller,
    out: mpsc::Sender<Result<proto::WatchResponse, Status>>,
) {
    let caller = Arc::new(caller);
    let _stream = StreamGauge::new();
    let (tx, mut rx) = mpsc::channel::<proto::WatchMessage>(STREAM_QUEUE);
    let mut running: HashMap<u64, tokio::task::AbortHandle> = HashMap::new();
    let mut tasks: JoinSet<u64> = JoinSet::new();
    let mut stopping = core.stopping.clone();
    loop {
        tokio::select! {
            _ = stopping.wait_for(|s| *s).map(|_| ()) => return,
            m = inbound.message() => match m {
                Ok(Some(req)) => match req.request {
                    Some(proto::watch_request::Request::Create(c)) => {
                        let id = c.watch_id;
                        let refuse = if running.contains_key(&id) {
                            Some("the stream already has a watch with this id".to_string())
                        } else if running.len() >= MAX_STREAM_WATCHES {
                            Some("too many watches on one stream".to_string())
                        } else {
                            core.may_watch(&caller, &c.start_key, &c.end_key).await.err()
                        };
                        if let Some(reason) = refuse {
                            // Straight out: this loop is the only reader of `rx`.
                            let messages = vec![canceled(id, None, &reason)];
                            if out.send(Ok(proto::WatchResponse { messages })).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        let task = tasks.spawn(watch_one(core.clone(), c, caller.clone(), tx.clone()));
                        running.insert(id, task);
                    }
                    Some(proto::watch_request::Request::Cancel(c)) => {
                        if let Some(t) = running.remove(&c.watch_id) {
                            t.abort();
                        }
                    }
                    None => {
                        let _ = out.send(Err(Status::invalid_argument("watch request is empty"))).await;
                        return;
                    }
                },
                Ok(None) | Err(_) => return,
            },
            Some(first) = rx.recv() => {
                let mut messages = vec![first];
                while messages.len() < 256 {
                    match rx.try_recv() {
                        Ok(m) => messages.push(m),
                        Err(_) => break,
                    }
                }
                let n = messages.iter().filter(|m| matches!(m.body, Some(Body::Events(_)))).count();
                if out.send(Ok(proto::WatchResponse { messages })).await.is_err() {
                    return;
                }
                metrics::counter!("tessera_watch_messages_sent_total").increment(n as u64);
            }
            Some(done) = tasks.join_next() => {
                if let Ok(id) = done {
                    running.remove(&id);
                }
            }
        }
    }
}

/// A watch's cancel reason for a refusal by `crate::auth`: the client turns the prefix back
/// into its error.
fn refusal(s: &Status) -> String {
    match s.code() {
        tonic::Code::Unauthenticated => format!("unauthenticated: {}", s.message()),
        _ => format!("permission denied: {}", s.message()),
    }
}

/// Counts open streams for `tessera_watch_streams`.
struct StreamGauge;

impl StreamGauge {
    fn new() -> Self {
        metrics::gauge!("tessera_watch_streams").increment(1.0);
        Self
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        metrics::gauge!("tessera_watch_streams").decrement(1.0);
    }
}

fn canceled(
    id: u64,
    region_error: Option<proto::RegionError>,
    reason: &str,
) -> proto::WatchMessage {
    proto::WatchMessage {
        watch_id: id,
        body: Some(Body::Canceled(proto::WatchCanceled {
            region_error,
            reason: reason.to_string(),
        })),
    }
}

/// Removes a watcher from the hub when its task ends, however it ends.
struct Registered {
    hub: crate::raftstore::hub::WatchHub,
    region: RegionId,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.hub.remove(self.region, self.id);
    }
}

impl KvCore {
    /// A watch sees only what its caller may read: the whole of its range, checked when it
    /// starts and before every message of events.
    async fn may_watch(&self, caller: &Caller, start: &[u8], end: &[u8]) -> Result<(), String> {
        self.gate
            .allow_fresh(caller, Need::ReadRange(start, Some(end)))
            .await
            .map_err(|s| refusal(&s))
    }

    fn check_watch(&self, c: &proto::WatchCreate) -> Result<(), String> {
        if c.header.is_none() {
            return Err("watch has no header".into());
        }
        if c.start_revision == 0 {
            return Err("start_revision must be at least 1".into());
        }
        let user_end = [SYSTEM_KEY_PREFIX];
        if c.end_key.is_empty() || c.end_key.as_slice() > &user_end[..] {
            return Err("end_key must be set, at most 0xFF (the user keyspace)".into());
        }
        if c.end_key <= c.start_key {
            return Err("end_key must be above start_key".into());
        }
        let max = self.limits.max_key_size + 1;
        if c.start_key.len() > max || c.end_key.len() > max {
            return Err("watch bound exceeds the key size limit".into());
        }
        Ok(())
    }
}

/// One watch: sends its events (and progress) as `WatchMessage`s until it is cancelled,
/// ends, or its stream goes. Returns its id.
async fn watch_one(
    core: Arc<KvCore>,
    c: proto::WatchCreate,
    caller: Arc<Caller>,
    out: mpsc::Sender<proto::WatchMessage>,
) -> u64 {
    let id = c.watch_id;
    let mut w = Watch {
        id,
        out,
        caller,
        gate: core.gate.clone(),
        spec: WatchSpec {
            start: c.start_key.clone(),
            end: c.end_key.clone(),
            prev_kv: c.prev_kv,
            no_put: c.no_put,
            no_delete: c.no_delete,
            progress: c.progress,
        },
        next: c.start_revision,
        reported: c.start_revision.saturating_sub(1),
    };
    if let Err(reason) = core.check_watch(&c) {
        w.cancel(None, &reason).await;
        return id;
    }
    let _ = w.run(&core, c.header.unwrap_or_default()).await;
    id
}

struct Watch {
    id: u64,
    out: mpsc::Sender<proto::WatchMessage>,
    caller: Arc<Caller>,
    gate: Arc<crate::auth::Gate>,
    spec: WatchSpec,
    /// The first revision not sent yet.
    next: u64,
    /// The highest revision reported (by events or progress).
    reported: u64,
}

/// The stream went away.
struct Gone;

impl Watch {
    async fn send(&self, body: Body) -> Result<(), Gone> {
        let m = proto::WatchMessage {
            watch_id: self.id,
            body: Some(body),
        };
        self.out.send(m).await.map_err(|_| Gone)
    }

    async fn cancel(&self, region_error: Option<proto::RegionError>, reason: &str) {
        let _ = self.out.send(canceled(self.id, region_error, reason)).await;
    }

    async fn events(&mut self, revision: u64, events: Vec<proto::Event>) -> Result<(), Gone> {
        if revision < self.next {
            return Ok(());
        }
        self.next = revision + 1;
        if events.is_empty() {
            return Ok(());
        }
        // Permissions revoked since the watch started end it.
        let need = Need::ReadRange(&self.spec.start, Some(&self.spec.end));
        if let Err(s) = self.gate.allow(&self.caller, need) {
            self.cancel(None, &refusal(&s)).await;
            return Err(Gone);
        }
        self.reported = revision;
        metrics::counter!("tessera_watch_events_sent_total").increment(events.len() as u64);
        self.send(Body::Events(proto::WatchEvents { revision, events }))
            .await
    }

    /// Every event at or below `revision` has been sent.
    async fn complete_to(&mut self, revision: u64) -> Result<(), Gone> {
        if revision >= self.next {
            self.next = revision + 1;
        }
        if self.spec.progress && revision > self.reported {
            self.reported = revision;
            return self.send(Body::Progress(revision)).await;
        }
        Ok(())
    }

    async fn run(&mut self, core: &KvCore, header: proto::RequestHeader) -> Result<(), Gone> {
        let region = RegionId(header.region_id);
        loop {
            let spec = self.spec.clone();
            let reg = match core
                .call(Some(header), |epoch, _, reply| PeerMsg::Watch {
                    spec,
                    epoch,
                    reply,
                })
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let reason = e.message.clone();
                    self.cancel(Some(e), &reason).await;
                    return Ok(());
                }
                // No answer from the region (a slow worker, the region just left this
                // node): the client may try again.
                Err(s) => {
                    let e = core.region_error(&RegionError::ServerBusy {
                        reason: s.message().to_string(),
                    });
                    self.cancel(Some(e), s.message()).await;
                    return Ok(());
                }
            };
            let _registered = Registered {
                hub: core.hub.clone(),
                region,
                id: reg.id,
            };
            if let Err(compacted) = self.catch_up(core, reg.applied).await? {
                let e = core.region_error(&RegionError::Compacted { compacted });
                let reason = e.message.clone();
                self.cancel(Some(e), &reason).await;
                return Ok(());
            }
            self.complete_to(reg.applied).await?;
            let mut events = reg.events;
            let mut resolved = reg.resolved;
            let mut resolving = self.spec.progress;
            loop {
                tokio::select! {
                    biased;
                    b = events.recv() => match b {
                        // Test-only: drop some live events (the watch checker's negative
                        // control must catch the gaps).
                        Some(HubBatch { revision, .. }) if skip_live(revision) => {}
                        Some(HubBatch { revision, events }) => self.events(revision, events).await?,
                        None => break,
                    },
                    r = resolved.changed(), if resolving => {
                        if r.is_err() {
                            resolving = false;
                            continue;
                        }
                        // Every event at or below it was queued before it was set: take
                        // them first. A queue closed meanwhile may have lost some of them
                        // (the watch fell behind): no progress then, history instead.
                        let to = *resolved.borrow_and_update();
                        let closed = loop {
                            match events.try_recv() {
                                Ok(HubBatch { revision, events: e }) => {
                                    self.events(revision, e).await?
                                }
                                Err(mpsc::error::TryRecvError::Empty) => break false,
                                Err(mpsc::error::TryRecvError::Disconnected) => break true,
                            }
                        };
                        if closed {
                            break;
                        }
                        self.complete_to(to).await?;
                    }
                }
            }
            let ended = reg
                .ended
                .lock()
                .map(|mut e| e.take())
                .unwrap_or(Some(Ended::Lagged));
            match ended {
                Some(Ended::Region(e)) => {
                    let e = core.region_error(&e);
                    let reason = e.message.clone();
                    self.cancel(Some(e), &reason).await;
                    return Ok(());
                }
                // Fell behind: continue from history.
                Some(Ended::Lagged) | None => {
                    metrics::counter!("tessera_watch_resumed_from_history_total").increment(1);
                }
            }
        }
    }

    /// Sends the history of the watch's keys from `next` to `to`. `Err(compacted)` when
    /// history from `next` is compacted away.
    async fn catch_up(&mut self, core: &KvCore, to: u64) -> Result<Result<(), u64>, Gone> {
        let engine = core.local.engine().clone();
        while self.next <= to {
            let compacted = engine.compacted_revision();
            if self.next <= compacted {
                return Ok(Err(compacted));
            }
            let (start, end, from) = (self.spec.start.clone(), self.spec.end.clone(), self.next);
            let e2 = engine.clone();
            let read = tokio::task::spawn_blocking(move || {
                mvcc::changes(&e2, &start, &end, from, to, CATCH_UP_CHANGES)
            })
            .await;
            metrics::counter!("tessera_watch_catch_up_reads_total").increment(1);
            let failed = match read {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let (batch, upto) = match failed {
                Ok(r) => r,
                Err(e) => {
                    self.cancel(None, &format!("reading history failed: {e}"))
                        .await;
                    return Err(Gone);
                }
            };
            // A compaction that started while reading may have removed rows read as absent.
            let compacted = engine.compacted_revision();
            if from <= compacted {
                return Ok(Err(compacted));
            }
            for (revision, changes) in batch {
                let events = changes.into_iter().filter_map(|c| self.event(c)).collect();
                self.events(revision, events).await?;
            }
            self.next = self.next.max(upto + 1);
        }
        Ok(Ok(()))
    }

    /// The event a change from history is, if the watch wants it.
    fn event(&self, c: mvcc::Change) -> Option<proto::Event> {
        use proto::event::EventType;
        let delete = mvcc::is_tombstone(&c.record);
        if (delete && self.spec.no_delete) || (!delete && self.spec.no_put) {
            return None;
        }
        let prev_kv = c
            .prev
            .filter(|_| self.spec.prev_kv)
            .map(|p| key_value(&c.key, p));
        Some(proto::Event {
            r#type: if delete {
                EventType::Delete
            } else {
                EventType::Put
            } as i32,
            kv: Some(key_value(&c.key, c.record)),
            prev_kv,
        })
    }
}

#[cfg(feature = "failpoints")]
fn skip_live(revision: u64) -> bool {
    revision % 5 == 0 && fail::eval("watch_skip_live_events", |_| ()).is_some()
}

#[cfg(not(feature = "failpoints"))]
fn skip_live(_: u64) -> bool {
    false
}
