//! Write ids for exactly-once writes: one random client id per [`Client`](super::Client),
//! one sequence number per write, kept across the write's retries, and the lowest number
//! still waiting for its answer (`first_incomplete`), which lets each region forget the
//! answers this client no longer needs (see the server's `raftstore::session`).
//!
//! Invariants:
//! - a client id is random and never 0; sequence numbers start at 1, only grow, and are
//!   never reused by one [`Client`](super::Client);
//! - a number is pending from before anyone can see it until its ticket is dropped, so
//!   `first_incomplete` never passes a write that may still be retried;
//! - `first_incomplete <= seq` in every id sent.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::proto::WriteId;

/// The client's write numbering.
pub(super) struct WriteIds {
    client_id: u64,
    next: AtomicU64,
    /// Writes started and not yet finished (answered, failed or given up).
    pending: Arc<Mutex<BTreeSet<u64>>>,
}

impl WriteIds {
    pub(super) fn new() -> Self {
        // Random, so that two clients (two processes, or one restarted) never share an id.
        let client_id = loop {
            let id: u64 = rand::random();
            if id != 0 {
                break id;
            }
        };
        Self {
            client_id,
            next: AtomicU64::new(1),
            pending: Arc::default(),
        }
    }

    #[cfg(test)]
    fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Numbers a new write; it stays pending until the ticket is dropped.
    pub(super) fn start(&self) -> WriteTicket {
        // Numbered under the lock: a number taken before it is pending could otherwise be
        // passed by a later write's `first_incomplete`, and a region would refuse it as stale.
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        pending.insert(seq);
        drop(pending);
        WriteTicket {
            client_id: self.client_id,
            seq,
            pending: self.pending.clone(),
        }
    }
}

/// One write's number, held for as long as the write may still be retried.
pub(super) struct WriteTicket {
    client_id: u64,
    seq: u64,
    pending: Arc<Mutex<BTreeSet<u64>>>,
}

impl WriteTicket {
    /// The id to send with an attempt now: every write of this client numbered below
    /// `first_incomplete` has finished, so its answer can be forgotten.
    pub(super) fn id(&self) -> WriteId {
        let first_incomplete = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .first()
            .copied()
            .unwrap_or(self.seq)
            .min(self.seq);
        WriteId {
            client_id: self.client_id,
            seq: self.seq,
            first_incomplete,
        }
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_incomplete_is_the_oldest_unfinished_write() {
        let ids = WriteIds::new();
        let a = ids.start();
        let b = ids.start();
        let c = ids.start();
        assert_eq!((a.id().seq, a.id().first_incomplete), (1, 1));
        assert_eq!((c.id().seq, c.id().first_incomplete), (3, 1));
        drop(b);
        assert_eq!(c.id().first_incomplete, 1, "a is still pending");
        drop(a);
        assert_eq!(c.id().first_incomplete, 3);
        let d = ids.start();
        assert_eq!((d.id().seq, d.id().first_incomplete), (4, 3));
        assert_eq!(d.id().client_id, ids.client_id());
        assert_ne!(ids.client_id(), WriteIds::new().client_id());
    }
}
