//! A node's side of history compaction (docs/architecture.md, "History and compaction"):
//! it follows the cluster's compacted revision, kept by placement, removing the rows below
//! it in the background; with `mvcc.auto_compaction` set it also raises that revision.
//!
//! Invariants:
//! - the node's compacted revision is raised and stored before any row below it is
//!   removed, so no read below it is served from a half-compacted history;
//! - removing rows never holds up writes: it runs on a blocking thread, in small batches;
//! - every loop is bounded by the node's life (the task is aborted at shutdown).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::AutoCompaction;
use crate::placement::client::SystemClient;
use crate::placement::compaction;
use crate::placement::tso::TsoClient;
use crate::storage::{mvcc, Engine};

/// How often the node looks at the cluster's compacted revision.
const POLL: Duration = Duration::from_secs(1);
/// How often `revisions:N` auto compaction looks at the latest revision.
const REVISIONS_EVERY: Duration = Duration::from_secs(2);

pub(super) async fn compaction_loop(
    engine: Engine,
    placement: SystemClient,
    revisions: TsoClient,
    auto: Option<AutoCompaction>,
) {
    // The revision this node last removed rows below (since start: a compaction cut short
    // by a crash runs again).
    let mut done = 0u64;
    let mut auto = Auto {
        mode: auto,
        samples: VecDeque::new(),
        last_check: None,
    };
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(client) = placement.get().await else {
            continue;
        };
        if let Some(target) = auto.target(&revisions).await {
            match compaction::raise(&client, target).await {
                Ok(now) => tracing::debug!(target, now, "automatic compaction"),
                Err(e) => tracing::warn!(error = %e, "automatic compaction not recorded"),
            }
        }
        let target = match compaction::current(&client).await {
            Ok(t) => t.max(engine.compacted_revision()),
            Err(_) => continue,
        };
        if target <= done {
            continue;
        }
        if let Err(e) = compact_to(&engine, target).await {
            tracing::error!(error = %e, target, "history compaction failed");
            continue;
        }
        done = target;
    }
}

/// Refuses reads below `target` from now on, records it, and removes the rows below it.
async fn compact_to(engine: &Engine, target: u64) -> Result<(), crate::storage::Error> {
    let now = engine.raise_compacted_revision(target)?;
    metrics::gauge!("tessera_mvcc_compacted_revision").set(now as f64);
    let e = engine.clone();
    let started = Instant::now();
    let removed = tokio::task::spawn_blocking(move || mvcc::compact(&e, target))
        .await
        .map_err(|e| crate::storage::Error::corrupt(b"", format!("compaction task: {e}")))??;
    metrics::counter!("tessera_mvcc_rows_compacted_total").increment(removed);
    tracing::info!(target, removed, elapsed = ?started.elapsed(), "history compacted");
    Ok(())
}

/// Automatic compaction: which revision to compact to now, if any.
struct Auto {
    mode: Option<AutoCompaction>,
    /// `periodic`: (when, latest revision then), oldest first.
    samples: VecDeque<(Instant, u64)>,
    last_check: Option<Instant>,
}

impl Auto {
    async fn target(&mut self, revisions: &TsoClient) -> Option<u64> {
        let mode = self.mode?;
        let every = match mode {
            AutoCompaction::Periodic(keep) => (keep / 10).max(POLL),
            AutoCompaction::Revisions(_) => REVISIONS_EVERY,
        };
        if self.last_check.is_some_and(|t| t.elapsed() < every) {
            return None;
        }
        self.last_check = Some(Instant::now());
        let latest = revisions.latest().await.ok()?;
        match mode {
            AutoCompaction::Revisions(keep) => latest.checked_sub(keep).filter(|t| *t > 0),
            AutoCompaction::Periodic(keep) => {
                let now = Instant::now();
                self.samples.push_back((now, latest));
                // The newest sample at least `keep` old is the revision to keep from.
                let mut target = None;
                while let Some(&(at, rev)) = self.samples.front() {
                    if now.duration_since(at) < keep {
                        break;
                    }
                    target = Some(rev);
                    self.samples.pop_front();
                }
                target
            }
        }
    }
}
