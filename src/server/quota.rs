//! The space quota (docs/operations.md, "Space quota"), as etcd's: a node whose user data and
//! history pass `storage.quota_bytes` raises the cluster's NOSPACE alarm, and while any alarm
//! stands every node refuses writes — puts, compare-and-swaps that put, batches with a put,
//! lease grants — with `QuotaExceeded`; reads, deletes, keep-alives and revocations go on,
//! so that space can be freed. An operator disarms the alarm (`tessera alarm disarm`).
//!
//! Invariants:
//! - a node over its quota refuses writes at once, before its alarm reaches the others;
//! - other nodes learn of an alarm (and of its disarming) at their next successful read of
//!   the alarms from placement, once a heartbeat interval: until then their leaders still
//!   accept writes;
//! - placement's own writes (system access) are never refused: the cluster must go on
//!   working, and disarming is itself a write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::ids::NodeId;
use crate::placement::client::SystemClient;
use crate::proto::AlarmRecord;
use crate::storage::Engine;

/// Whether this node refuses user writes for lack of space.
#[derive(Clone, Default)]
pub struct SpaceQuota {
    no_space: Arc<AtomicBool>,
}

impl SpaceQuota {
    /// Refuses a user write while an alarm stands (`system`: placement's writes pass).
    pub fn check_write(&self, system: bool) -> Result<(), Status> {
        if system || !self.no_space.load(Ordering::Relaxed) {
            return Ok(());
        }
        metrics::counter!("tessera_writes_refused_no_space_total").increment(1);
        Err(Status::resource_exhausted(format!(
            "{QUOTA_EXCEEDED}: the cluster's NOSPACE alarm stands: reads and deletes are \
             served; free space, then `tessera alarm disarm`"
        )))
    }

    fn set(&self, no_space: bool) {
        self.no_space.store(no_space, Ordering::Relaxed);
        metrics::gauge!("tessera_alarm_no_space").set(if no_space { 1.0 } else { 0.0 });
    }
}

/// How a refusal for lack of space starts (clients recognise it by this).
pub const QUOTA_EXCEEDED: &str = tessera_api::limits::QUOTA_EXCEEDED;

/// Every `interval`: measures this node's data, raises its alarm if it is over `quota`
/// bytes (0: no quota), and learns which alarms stand. Runs until aborted.
pub async fn quota_loop(
    engine: Engine,
    placement: SystemClient,
    node: NodeId,
    quota: u64,
    state: SpaceQuota,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let bytes = engine.data_bytes();
        metrics::gauge!("tessera_data_bytes").set(bytes as f64);
        let over = quota > 0 && bytes > quota;
        if over {
            state.set(true);
        }
        let Ok(client) = placement.get().await else {
            continue;
        };
        if over {
            let record = AlarmRecord {
                node_id: node.get(),
                kind: "NOSPACE".into(),
                raised_at_ms: crate::placement::now_ms(),
                data_bytes: bytes,
                quota_bytes: quota,
            };
            match crate::placement::alarms::raise(&client, &record).await {
                Ok(()) => {}
                Err(e) => tracing::warn!(error = %e, "NOSPACE alarm not recorded yet"),
            }
        }
        match crate::placement::alarms::list(&client).await {
            Ok(alarms) => {
                let standing = !alarms.is_empty();
                if standing != state.no_space.load(Ordering::Relaxed) {
                    tracing::warn!(
                        alarms = ?alarms.iter().map(|a| a.node_id).collect::<Vec<_>>(),
                        no_space = standing,
                        data_bytes = bytes,
                        quota_bytes = quota,
                        "space alarm changed"
                    );
                }
                state.set(standing || over);
            }
            Err(e) => tracing::debug!(error = %e, "alarms not read"),
        }
    }
}
