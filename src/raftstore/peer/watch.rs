//! Watchers registering with their region's leader (docs/architecture.md, "Watch"). A child
//! module of `peer`.
//!
//! Invariants:
//! - a watcher registers only with a leader whose epoch and range match its request, so
//!   the revision it is told (the region's highest applied one) covers every earlier change
//!   of its keys; everything the region applies later reaches it through the hub;
//! - the region's watchers end when the peer stops leading or the region splits (`ready`,
//!   `admin`): they resume from history where their keys are then.

use super::super::msg::{RegionError, Reply};
use super::super::msg::{Registration, WatchSpec};
use super::Peer;
use crate::proto::RegionEpoch;
use crate::storage::keys;

impl Peer {
    pub(super) fn watch(
        &mut self,
        spec: WatchSpec,
        epoch: RegionEpoch,
        reply: Reply<Registration>,
    ) {
        let _ = reply.send(self.register_watch(spec, &epoch));
    }

    fn register_watch(
        &mut self,
        spec: WatchSpec,
        epoch: &RegionEpoch,
    ) -> Result<Registration, RegionError> {
        self.check_route(epoch, &spec.start)?;
        let region = self.region();
        // `end` is exclusive: the last key it covers is below it, so it may equal the end.
        if !region.end_key.is_empty() && spec.end.as_slice() > region.end_key.as_slice() {
            return Err(RegionError::KeyNotInRegion {
                key: spec.end.clone(),
                region: self.region_id,
                start: region.start_key.clone(),
                end: region.end_key.clone(),
            });
        }
        if keys::is_system_key(&spec.start) {
            return Err(RegionError::Refused {
                reason: "the system keyspace cannot be watched".into(),
            });
        }
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let applied = self.raw.store().max_revision();
        Ok(self.ctx.hub.register(self.region_id, spec, applied))
    }
}
