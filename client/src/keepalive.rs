//! Keeping leases alive: one task per client renews every lease kept alive through it, at a
//! third of each lease's TTL, all leases due at once in one request per lease region.
//!
//! Invariants:
//! - a lease is reported lost once the cluster answers that it is gone, or once its TTL
//!   passed since the last successful renewal was *sent* (the cluster's deadline is at
//!   least that late), whatever call is in flight; it is then no longer renewed;
//! - one renewal call waits at most a third of the shortest TTL it renews, and never past
//!   the moment a kept lease would be lost, so that loss is told on time;
//! - a lease region that fails does not hold up the renewal of leases in the others;
//! - the task holds the client weakly and ends when nothing is kept alive (started again
//!   by the next [`Client::keep_alive`]) or the client is dropped;
//! - dropping a [`KeepAlive`] stops its renewals (the lease then expires unless revoked).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{Client, Inner};

/// How often the task looks for leases due.
const TICK: Duration = Duration::from_millis(100);

struct Kept {
    lease: u64,
    ttl: Duration,
    due: Instant,
    /// When the last successful renewal (or the call that started keeping it) was sent.
    last_ok: Instant,
    lost: watch::Sender<Option<String>>,
}

/// The leases a client keeps alive.
#[derive(Default)]
pub(super) struct KeepAlives {
    kept: Mutex<HashMap<u64, Kept>>,
    next_handle: AtomicU64,
    running: AtomicBool,
}

impl KeepAlives {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Kept>> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Client {
    /// Keeps lease `id` (of TTL `ttl`) alive until the returned handle is dropped. Call it
    /// right after the grant: until the first renewal answers, the lease counts as renewed
    /// when this is called (see [`Client::keep_alive_since`]).
    pub fn keep_alive(&self, id: u64, ttl: Duration) -> KeepAlive {
        self.keep_alive_since(id, ttl, Instant::now())
    }

    /// As [`Client::keep_alive`], for a lease last granted or renewed by a call sent at
    /// `since`: it is lost if not renewed within its TTL from then.
    pub fn keep_alive_since(&self, id: u64, ttl: Duration, since: Instant) -> KeepAlive {
        let ttl = ttl.max(Duration::from_secs(1));
        let k = &self.inner.keepalives;
        let handle = k.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        {
            let mut kept = k.lock();
            // Another handle of the same lease may know it was renewed earlier.
            let since = kept
                .values()
                .filter(|c| c.lease == id)
                .map(|c| c.last_ok)
                .fold(since, Instant::min);
            kept.insert(
                handle,
                Kept {
                    lease: id,
                    ttl,
                    // Renewed at once: how much of it is left is not known here.
                    due: Instant::now(),
                    last_ok: since,
                    lost: tx,
                },
            );
        }
        if !k.running.swap(true, Ordering::SeqCst) {
            tokio::spawn(run(Arc::downgrade(&self.inner)));
        }
        KeepAlive {
            id,
            handle,
            lost: rx,
            owner: Arc::downgrade(&self.inner),
        }
    }
}

/// Clears `running` if the task ends other than by finding nothing to keep (a panic, or
/// its runtime shutting down), so that the next `keep_alive` starts one again.
struct Running {
    owner: Weak<Inner>,
    normal_exit: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.normal_exit {
            return;
        }
        if let Some(inner) = self.owner.upgrade() {
            let _kept = inner.keepalives.lock();
            inner.keepalives.running.store(false, Ordering::SeqCst);
        }
    }
}

fn lose(c: &Kept, why: &str) {
    let _ = c.lost.send(Some(format!("lease {} {why}", c.lease)));
}

async fn run(owner: Weak<Inner>) {
    let mut guard = Running {
        owner: owner.clone(),
        normal_exit: false,
    };
    loop {
        tokio::time::sleep(TICK).await;
        let Some(inner) = owner.upgrade() else {
            return;
        };
        let k = &inner.keepalives;
        let now = Instant::now();
        let (due, wait) = {
            let mut kept = k.lock();
            if kept.is_empty() {
                // Under the lock: a `keep_alive` inserts under it, then finds `running`
                // false and starts a new task.
                k.running.store(false, Ordering::SeqCst);
                guard.normal_exit = true;
                return;
            }
            kept.retain(|_, c| {
                let keep = now - c.last_ok < c.ttl;
                if !keep {
                    lose(c, &format!("not renewed for its TTL ({:?})", c.ttl));
                }
                keep
            });
            let due: Vec<&Kept> = kept.values().filter(|c| c.due <= now).collect();
            let shortest = due.iter().map(|c| c.ttl).min().unwrap_or_default();
            // Back before any kept lease could be lost, to say so on time.
            let first_loss = kept
                .values()
                .map(|c| (c.last_ok + c.ttl).saturating_duration_since(now))
                .min()
                .unwrap_or_default();
            let mut ids: Vec<u64> = due.iter().map(|c| c.lease).collect();
            ids.sort_unstable();
            ids.dedup();
            (ids, (shortest / 3).min(first_loss).max(TICK))
        };
        if due.is_empty() {
            continue;
        }
        let client = Client {
            inner: inner.clone(),
        };
        let sent = Instant::now();
        let ttls: HashMap<u64, Option<Duration>> =
            tokio::time::timeout(wait, client.lease_renew_each(&due))
                .await
                .unwrap_or_default();
        let mut kept = k.lock();
        kept.retain(|_, c| match ttls.get(&c.lease) {
            Some(Some(ttl)) => {
                c.ttl = *ttl;
                c.last_ok = sent;
                c.due = sent + *ttl / 3;
                true
            }
            Some(None) => {
                lose(c, "expired or was revoked");
                false
            }
            // Not answered: tried again at the next tick; lost once its TTL has passed.
            None => true,
        });
    }
}

/// A lease kept alive in the background (see [`Client::keep_alive`]).
pub struct KeepAlive {
    pub id: u64,
    handle: u64,
    lost: watch::Receiver<Option<String>>,
    owner: Weak<Inner>,
}

impl KeepAlive {
    /// Waits until the lease is lost, and says why.
    pub async fn lost(&mut self) -> String {
        loop {
            if let Some(why) = self.lost.borrow().clone() {
                return why;
            }
            if self.lost.changed().await.is_err() {
                return format!("lease {}'s keep-alive stopped", self.id);
            }
        }
    }

    /// Whether the lease was lost already.
    pub fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        if let Some(inner) = self.owner.upgrade() {
            inner.keepalives.lock().remove(&self.handle);
        }
    }
}
