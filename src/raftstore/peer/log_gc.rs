//! Raft log compaction of a peer. A child module of `peer`.
//!
//! Invariants:
//! - the log is compacted only up to the applied index, and only once it keeps more than
//!   `log_gc_threshold` applied entries;
//! - a leader keeps what its slowest follower still needs, but never more than
//!   `4 * log_gc_threshold` entries behind the applied index (a follower further behind
//!   gets a snapshot);
//! - compaction goes into the round's batch; a failure is logged and tried again at the
//!   next check.

use super::Peer;
use crate::storage::WriteBatch;

impl Peer {
    /// Compacts the raft log once it holds more than `log_gc_threshold` applied entries.
    /// A leader keeps what its followers still need, unless one lags so far behind that a
    /// snapshot is the cheaper way to catch it up.
    pub fn maybe_compact_log(&mut self, wb: &mut WriteBatch<'_>) {
        let store = self.raw.store();
        let applied = store.applied_index();
        let truncated = store.truncated_index();
        if applied.saturating_sub(truncated) <= self.log_gc_threshold {
            return;
        }
        let mut target = applied;
        if self.is_leader() {
            let min_matched = self
                .raw
                .raft
                .prs()
                .iter()
                .map(|(_, pr)| pr.matched)
                .min()
                .unwrap_or(applied);
            let keep_floor = applied.saturating_sub(4 * self.log_gc_threshold);
            target = applied.min(min_matched.max(keep_floor));
        }
        if target > truncated {
            if let Err(e) = self.raw.mut_store().compact_to(target, wb) {
                tracing::warn!(region = %self.region_id, error = %e, "log compaction failed");
            } else {
                metrics::counter!("tessera_log_compactions_total").increment(1);
            }
        }
    }
}
