//! `raft::Storage` for [`PeerStorage`]: what raft-rs reads — initial state, entries (from
//! the cache, then the engine), terms, and snapshots generated off the worker thread.
//!
//! Invariants:
//! - `entries` returns a contiguous run from `low`, at least one entry when `low < high`
//!   even past `max_size`; an index at or below the truncated index is `Compacted`, one
//!   past the last index `Unavailable`; a hole in the live log is `Corrupt`, never a panic;
//! - `term(truncated_index)` is answered from the kept `truncated_term`;
//! - `snapshot` never blocks the worker: at most one generator thread per peer at a time,
//!   and a generated snapshot older than the requested index is discarded, not returned.

use protobuf::Message as _;
use raft::eraftpb::{Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};

use super::*;

/// raft-rs's `max_size` rule for the entries `entries()` returns: stop before the entry that
/// takes their total size past the limit, but always return at least one.
struct SizeLimit {
    max: u64,
    used: u64,
    taken: usize,
}

impl SizeLimit {
    fn new(max: u64) -> Self {
        Self {
            max,
            used: 0,
            taken: 0,
        }
    }

    fn admits(&mut self, e: &Entry) -> bool {
        self.used += u64::from(e.compute_size());
        self.taken += 1;
        self.taken == 1 || self.used <= self.max
    }
}

fn store_err(e: StorageError) -> raft::Error {
    raft::Error::Store(e)
}

impl raft::Storage for PeerStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let hs = HardState {
            term: self.raft_state.term,
            vote: self.raft_state.vote,
            commit: self.raft_state.commit,
            ..Default::default()
        };
        let cs = conf_state_from_record(&self.region_state.conf_state.clone().unwrap_or_default());
        Ok(RaftState::new(hs, cs))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.apply_state.truncated_index {
            return Err(store_err(StorageError::Compacted));
        }
        if high > self.raft_state.last_index + 1 {
            return Err(store_err(StorageError::Unavailable));
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let mut limit = SizeLimit::new(max_size.into().unwrap_or(u64::MAX));
        if let Some(cached) = self.cache.range(low, high) {
            return Ok(cached.take_while(|e| limit.admits(e)).cloned().collect());
        }
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut expect = low;
        self.engine.scan(
            Cf::Raft,
            &keys::raft_log_key(self.region_id, low),
            &keys::raft_log_key(self.region_id, high),
            |k, v| {
                let e = decode_entry(k, v)?;
                if e.index != expect {
                    return Err(Error::corrupt(k, format!("expected entry {expect}")));
                }
                if !limit.admits(&e) {
                    return Ok(false);
                }
                out.push(e);
                expect += 1;
                Ok(true)
            },
        )?;
        if out.is_empty() {
            // A hole inside the live log: the disk does not hold what the states promise.
            return Err(Error::corrupt(
                &keys::raft_log_key(self.region_id, low),
                "log entry missing inside the live log",
            )
            .into());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.apply_state.truncated_index {
            return Ok(self.apply_state.truncated_term);
        }
        if idx < self.apply_state.truncated_index {
            return Err(store_err(StorageError::Compacted));
        }
        if idx > self.raft_state.last_index {
            return Err(store_err(StorageError::Unavailable));
        }
        if idx == self.raft_state.last_index {
            return Ok(self.last_term);
        }
        if let Some(e) = self.cache.get(idx) {
            return Ok(e.term);
        }
        Ok(self.read_entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.apply_state.truncated_index + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.raft_state.last_index)
    }

    /// Snapshots are built off the raft thread: the first call starts a generator and answers
    /// `SnapshotTemporarilyUnavailable`; raft asks again later and gets the finished one.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let mut gen = self.snap_gen.borrow_mut();
        if let SnapGen::Generating(rx) = &*gen {
            match rx.try_recv() {
                Ok(Ok(snap)) if snap.get_metadata().index >= request_index => {
                    *gen = SnapGen::Idle;
                    return Ok(snap);
                }
                Ok(Ok(_stale)) => *gen = SnapGen::Idle,
                Ok(Err(e)) => {
                    *gen = SnapGen::Idle;
                    tracing::warn!(region = %self.region_id, error = %e, "snapshot generation failed");
                }
                Err(mpsc::TryRecvError::Empty) => {
                    return Err(store_err(StorageError::SnapshotTemporarilyUnavailable))
                }
                Err(mpsc::TryRecvError::Disconnected) => *gen = SnapGen::Idle,
            }
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let engine = self.engine.clone();
        let region_id = self.region_id;
        let spawned = std::thread::Builder::new()
            .name(format!("snap-gen-{region_id}"))
            .spawn(move || {
                let _ = tx.send(generate_snapshot(&engine, region_id));
            });
        match spawned {
            Ok(_) => *gen = SnapGen::Generating(rx),
            Err(e) => {
                tracing::warn!(region = %region_id, error = %e, "cannot spawn snapshot generator")
            }
        }
        Err(store_err(StorageError::SnapshotTemporarilyUnavailable))
    }
}
