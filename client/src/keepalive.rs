//! Keeping leases alive: one task per client renews every lease kept alive through it, at a
//! third of each lease's TTL, all leases due at once in one request per lease region.
//!
//! Invariants:
//! - a lease is reported lost once the cluster answers that it is gone, or once its TTL
//!   passed since the last successful renewal was *sent* (the cluster's deadline is at
//!   least that late), whatever call is in flight; it is then no longer renewed;
//! - one renewal call waits at most a third of the shortest TTL it renews;
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
    /// Keeps lease `id` (of TTL `ttl`) alive until the returned handle is dropped.
    pub fn keep_alive(&self, id: u64, ttl: Duration) -> KeepAlive {
        let k = &self.inner.keepalives;
        let handle = k.next_handle.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        let now = Instant::now();
        k.lock().insert(
            handle,
            Kept {
                lease: id,
                ttl,
                // Renewed at once: the lease's time so far is unknown here.
                due: now,
                last_ok: now,
                lost: tx,
            },
        );
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

async fn run(owner: Weak<Inner>) {
    loop {
        tokio::time::sleep(TICK).await;
        let Some(inner) = owner.upgrade() else {
            return;
        };
        let k = &inner.keepalives;
        let now = Instant::now();
        let (due, shortest): (Vec<u64>, Duration) = {
            let mut kept = k.lock();
            kept.retain(|_, c| {
                if now - c.last_ok < c.ttl {
                    return true;
                }
                let _ = c.lost.send(Some(format!(
                    "lease {} not renewed for its TTL ({:?})",
                    c.lease, c.ttl
                )));
                false
            });
            if kept.is_empty() {
                k.running.store(false, Ordering::SeqCst);
                // A lease added meanwhile, whose caller saw the task still running.
                if kept.is_empty() || k.running.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
            let due: Vec<&Kept> = kept.values().filter(|c| c.due <= now).collect();
            let shortest = due.iter().map(|c| c.ttl).min().unwrap_or_default();
            let mut ids: Vec<u64> = due.iter().map(|c| c.lease).collect();
            ids.sort_unstable();
            ids.dedup();
            (ids, shortest)
        };
        if due.is_empty() {
            continue;
        }
        let client = Client {
            inner: inner.clone(),
        };
        let sent = Instant::now();
        let wait = (shortest / 3).max(TICK);
        let answers = match tokio::time::timeout(wait, client.lease_renew(&due)).await {
            Ok(a) => a,
            Err(_) => Err(super::Error::Unavailable(format!(
                "no answer to the renewal within {wait:?}"
            ))),
        };
        let now = Instant::now();
        let mut kept = k.lock();
        let ttls: HashMap<u64, Option<Duration>> = match &answers {
            Ok(t) => due.iter().copied().zip(t.iter().copied()).collect(),
            Err(_) => HashMap::new(),
        };
        kept.retain(|_, c| {
            if !due.contains(&c.lease) {
                return true;
            }
            match ttls.get(&c.lease) {
                Some(Some(ttl)) => {
                    c.ttl = *ttl;
                    c.last_ok = sent;
                    c.due = sent + *ttl / 3;
                    true
                }
                Some(None) => {
                    let _ = c
                        .lost
                        .send(Some(format!("lease {} expired or was revoked", c.lease)));
                    false
                }
                None if now - c.last_ok >= c.ttl => {
                    let why = answers
                        .as_ref()
                        .err()
                        .map_or(String::new(), |e| e.to_string());
                    let _ = c.lost.send(Some(format!(
                        "lease {} not renewed for its TTL ({:?}): {why}",
                        c.lease, c.ttl
                    )));
                    false
                }
                // Failed: try again at the next tick.
                None => true,
            }
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
