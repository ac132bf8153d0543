//! The node's watch hub: the watchers of the regions this node leads, fed by apply
//! (docs/architecture.md, "Watch").
//!
//! A region's worker registers a watcher (after checking leadership, epoch and range) and
//! tells it the region's highest applied revision then; every change the region applies
//! after that reaches the watcher's queue once the round's batch is written, in apply
//! order, which is revision order. Everything at or below the registration revision comes
//! from history (the watcher's task reads it).
//!
//! Invariants:
//! - a watcher's queue receives, for each revision the region applies after it registered,
//!   either all of that revision's events in its range or nothing more at all (it is
//!   removed, with the reason it ended: a full queue, a lost leadership, a split);
//! - events are published only after the batch holding them is written;
//! - a region's resolved revision (every event at or below it has been published) only
//!   rises, and is raised only by the applied revision of what was published or by a read
//!   at a revision that the region's leader answered (`server::watch`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::{mpsc, watch};

use super::msg::{Ended, HubBatch, RegionError, Registration, WatchSpec};
use crate::ids::RegionId;
use crate::proto;

/// Revisions a watcher's queue holds before the watcher falls behind and catches up from
/// history instead.
pub const QUEUE_REVISIONS: usize = 256;

struct Slot {
    id: u64,
    spec: WatchSpec,
    tx: mpsc::Sender<HubBatch>,
    ended: Arc<Mutex<Option<Ended>>>,
}

impl Slot {
    fn end(self, why: Ended) {
        *self.ended.lock().expect("watch slot lock poisoned") = Some(why);
    }
}

struct RegionWatchers {
    slots: Vec<Slot>,
    resolved: watch::Sender<u64>,
    /// The revision of the last change published for the region (0 = none yet).
    published: u64,
}

#[derive(Clone, Default)]
pub struct WatchHub {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    regions: DashMap<RegionId, RegionWatchers>,
    next_id: AtomicU64,
    watchers: AtomicU64,
}

impl WatchHub {
    /// Whether apply should collect the region's events.
    pub fn is_watched(&self, region: RegionId) -> bool {
        self.inner.regions.contains_key(&region)
    }

    /// Adds a watcher of `region`, whose highest applied revision is `applied` (called by
    /// the region's worker, between rounds).
    pub fn register(&self, region: RegionId, spec: WatchSpec, applied: u64) -> Registration {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(QUEUE_REVISIONS);
        let ended = Arc::new(Mutex::new(None));
        let mut entry = self
            .inner
            .regions
            .entry(region)
            .or_insert_with(|| RegionWatchers {
                slots: Vec::new(),
                resolved: watch::channel(applied).0,
                published: applied,
            });
        entry.resolved.send_if_modified(|r| raise(r, applied));
        let resolved = entry.resolved.subscribe();
        entry.slots.push(Slot {
            id,
            spec,
            tx,
            ended: ended.clone(),
        });
        drop(entry);
        self.count(1);
        Registration {
            id,
            applied,
            events: rx,
            ended,
            resolved,
        }
    }

    /// Removes a watcher that is done (its task ended).
    pub fn remove(&self, region: RegionId, id: u64) {
        let mut gone = 0;
        self.inner.regions.remove_if_mut(&region, |_, w| {
            let before = w.slots.len();
            w.slots.retain(|s| s.id != id);
            gone = before - w.slots.len();
            w.slots.is_empty()
        });
        self.count(-(gone as i64));
    }

    /// Ends every watcher of `region` (it is no longer led here, or its range changed).
    pub fn end_region(&self, region: RegionId, why: RegionError) {
        if let Some((_, w)) = self.inner.regions.remove(&region) {
            self.count(-(w.slots.len() as i64));
            for s in w.slots {
                s.end(Ended::Region(why.clone()));
            }
        }
    }

    /// Hands the changes of revision `revision` in `region` (written to disk) to its
    /// watchers. A watcher whose queue is full is removed: it catches up from history.
    pub fn publish(&self, region: RegionId, revision: u64, events: &[proto::Event]) {
        let Some(mut w) = self.inner.regions.get_mut(&region) else {
            return;
        };
        w.published = w.published.max(revision);
        let mut removed = 0;
        let mut lagged = 0;
        let mut sent = 0u64;
        let slots = std::mem::take(&mut w.slots);
        for s in slots {
            let mine = select(&s.spec, events);
            if mine.is_empty() {
                w.slots.push(s);
                continue;
            }
            let n = mine.len() as u64;
            match s.tx.try_send(HubBatch {
                revision,
                events: mine,
            }) {
                Ok(()) => {
                    sent += n;
                    w.slots.push(s);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    lagged += 1;
                    removed += 1;
                    s.end(Ended::Lagged);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => removed += 1,
            }
        }
        let empty = w.slots.is_empty();
        drop(w);
        if empty {
            self.inner
                .regions
                .remove_if(&region, |_, w| w.slots.is_empty());
        }
        self.count(-(removed as i64));
        metrics::counter!("tessera_watch_events_queued_total").increment(sent);
        if lagged > 0 {
            metrics::counter!("tessera_watch_lagged_total").increment(lagged);
        }
    }

    /// Raises `region`'s resolved revision to `revision`.
    pub fn resolve(&self, region: RegionId, revision: u64) {
        if let Some(w) = self.inner.regions.get(&region) {
            w.resolved.send_if_modified(|r| raise(r, revision));
        }
    }

    /// The regions with a watcher that needs progress, with the revision last published
    /// for each.
    pub fn wanting_progress(&self) -> Vec<(RegionId, u64)> {
        self.inner
            .regions
            .iter()
            .filter(|w| w.slots.iter().any(|s| s.spec.progress))
            .map(|w| (*w.key(), w.published))
            .collect()
    }

    /// Watchers registered on this node.
    pub fn watchers(&self) -> u64 {
        self.inner.watchers.load(Ordering::Relaxed)
    }

    fn count(&self, delta: i64) {
        if delta == 0 {
            return;
        }
        let now = if delta > 0 {
            self.inner
                .watchers
                .fetch_add(delta as u64, Ordering::Relaxed)
                + delta as u64
        } else {
            let d = delta.unsigned_abs();
            self.inner.watchers.fetch_sub(d, Ordering::Relaxed) - d
        };
        metrics::gauge!("tessera_watchers").set(now as f64);
    }
}

/// The events of `all` that `spec` gets (none if it filters every one out).
fn select(spec: &WatchSpec, all: &[proto::Event]) -> Vec<proto::Event> {
    all.iter()
        .filter(|e| {
            let key = e.kv.as_ref().map_or(&[][..], |kv| kv.key.as_slice());
            key >= spec.start.as_slice()
                && key < spec.end.as_slice()
                && !(spec.no_put && e.r#type == proto::event::EventType::Put as i32)
                && !(spec.no_delete && e.r#type == proto::event::EventType::Delete as i32)
        })
        .map(|e| {
            let mut e = e.clone();
            if !spec.prev_kv {
                e.prev_kv = None;
            }
            e
        })
        .collect()
}

fn raise(r: &mut u64, to: u64) -> bool {
    if to > *r {
        *r = to;
        true
    } else {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &[u8], rev: u64) -> proto::Event {
        proto::Event {
            r#type: proto::event::EventType::Put as i32,
            kv: Some(proto::KeyValue {
                key: key.to_vec(),
                mod_revision: rev,
                version: 1,
                ..Default::default()
            }),
            prev_kv: Some(proto::KeyValue::default()),
        }
    }

    fn spec(start: &[u8], end: &[u8]) -> WatchSpec {
        WatchSpec {
            start: start.to_vec(),
            end: end.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn watchers_get_their_range_in_order_and_a_full_queue_ends_one() {
        let hub = WatchHub::default();
        let r = RegionId(7);
        let mut a = hub.register(r, spec(b"a", b"b"), 10);
        let mut b = hub.register(r, spec(b"b", b"c"), 10);
        assert!(hub.is_watched(r));
        hub.publish(r, 11, &[put(b"a1", 11), put(b"b1", 11)]);
        hub.publish(r, 12, &[put(b"b2", 12)]);
        let got = a.events.try_recv().unwrap();
        assert_eq!((got.revision, got.events.len()), (11, 1));
        assert_eq!(got.events[0].prev_kv, None, "prev_kv only when asked");
        assert!(a.events.try_recv().is_err());
        assert_eq!(b.events.try_recv().unwrap().revision, 11);
        assert_eq!(b.events.try_recv().unwrap().revision, 12);
        // `a` stops reading: once its queue is full it is ended as lagging, `b` goes on.
        for rev in 13..13 + QUEUE_REVISIONS as u64 + 1 {
            hub.publish(r, rev, &[put(b"a2", rev)]);
            let _ = b.events.try_recv();
        }
        assert_eq!(*a.ended.lock().unwrap(), Some(Ended::Lagged));
        assert_eq!(hub.watchers(), 1);
        hub.end_region(r, RegionError::RegionNotFound(r));
        assert!(!hub.is_watched(r));
        assert!(matches!(*b.ended.lock().unwrap(), Some(Ended::Region(_))));
    }

    #[test]
    fn the_resolved_revision_only_rises() {
        let hub = WatchHub::default();
        let r = RegionId(1);
        let w = hub.register(r, spec(b"a", b"z"), 5);
        hub.resolve(r, 9);
        hub.resolve(r, 7);
        assert_eq!(*w.resolved.borrow(), 9);
        hub.remove(r, w.id);
        assert!(!hub.is_watched(r));
        assert_eq!(hub.watchers(), 0);
    }
}
