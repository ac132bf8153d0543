//! Region splits: by request (`Node.SplitRegion`, `tessera regions split KEY`) and by size.
//!
//! A split is decided on the region's leader node: it takes ids for the new region and its
//! peers from placement, then proposes [`Command::Split`] through the region's log, so every
//! replica applies it at the same index. The size check runs with the node's region reports:
//! a led region above `region.max_keys` or `region.max_bytes` is split just after the key
//! at which the first half of its bytes ends (the left half keeps that key).
//!
//! Invariants:
//! - a split is proposed only from the leader's node, under the epoch the caller routed
//!   with, and only after placement handed out the new ids: if that fails, nothing is
//!   proposed; a timeout after proposing is `Unknown`;
//! - every replica applies and checks it at the same log index (`raftstore::peer::admin`);
//!   no data moves;
//! - the placement region never splits (the size check skips it, apply refuses it);
//! - the size check scans data off the raft threads; oversized regions split one at a
//!   time, and a failed split waits for the next check.

use super::{led_region, propose, AdminError};
use crate::ids::RegionId;
use crate::placement::client::SystemClient;
use crate::proto::{self, Region, RegionEpoch};
use crate::raftstore::cmd::{ApplyResult, Command};
use crate::raftstore::msg::RegionInfo;
use crate::raftstore::router::Router;
use crate::storage::{keys, Cf, Engine};

/// Splits `region` at `split_key`. `epoch` is the one the caller routed with (`None` = the
/// region's current one). A key that already starts the region is a no-op.
pub async fn split_region(
    router: &Router,
    placement: &SystemClient,
    region: RegionId,
    epoch: Option<RegionEpoch>,
    split_key: Vec<u8>,
) -> Result<Vec<Region>, AdminError> {
    let info = led_region(router, region).await?;
    let epoch = epoch.unwrap_or_else(|| info.region.epoch.unwrap_or_default());
    if split_key == info.region.start_key
        && epoch.version == info.region.epoch.unwrap_or_default().version
    {
        return Ok(vec![info.region]);
    }
    let client = placement
        .get()
        .await
        .map_err(|e| AdminError::Placement(e.to_string()))?;
    let n = info.region.peers.len() as u64;
    let ids = crate::placement::alloc_ids(&client, 1 + n)
        .await
        .map_err(|e| AdminError::Placement(e.to_string()))?;
    let mut ids = ids.into_iter();
    let new_region_id = ids
        .next()
        .ok_or_else(|| AdminError::Placement("id allocation returned an empty range".into()))?;
    let cmd = Command::Split {
        split_key,
        new_region_id,
        new_peer_ids: ids.collect(),
    };
    match propose(router, region, epoch, cmd).await? {
        ApplyResult::Split { regions } => Ok(regions),
        other => Err(AdminError::Unknown(format!("unexpected result {other:?}"))),
    }
}

/// Size limits above which a region splits (0 = no limit).
#[derive(Clone, Copy, Debug)]
pub struct SplitLimits {
    pub max_keys: u64,
    pub max_bytes: u64,
}

impl SplitLimits {
    pub fn exceeded_by(&self, info: &RegionInfo) -> bool {
        // Placement's region never splits; lease regions do, like data regions.
        let placement = keys::is_system_key(&info.region.start_key)
            && !keys::is_lease_key(&info.region.start_key);
        !placement
            && ((self.max_keys > 0 && info.keys > self.max_keys)
                || (self.max_bytes > 0 && info.bytes > self.max_bytes))
    }
}

/// The key where the first half of the region's bytes ends (scanned from this node's data,
/// off the raft threads), or `None` when the region has fewer than two keys.
pub fn middle_key(engine: &Engine, region: &proto::Region) -> Result<Option<Vec<u8>>, String> {
    let start = keys::data_key(&region.start_key);
    let end = keys::data_end_key(&region.end_key);
    let mut total = 0u64;
    engine
        .scan(Cf::Data, &start, &end, |k, v| {
            total += (k.len() + v.len()) as u64;
            Ok(true)
        })
        .map_err(|e| e.to_string())?;
    let mut seen = 0u64;
    let mut found = None;
    engine
        .scan(Cf::Data, &start, &end, |k, v| {
            seen += (k.len() + v.len()) as u64;
            if seen * 2 >= total {
                found = Some(k.to_vec());
                return Ok(false);
            }
            Ok(true)
        })
        .map_err(|e| e.to_string())?;
    // Split just after the middle key so that the left half holds it.
    let Some(mid) = found else { return Ok(None) };
    let mut after = None;
    engine
        .scan(Cf::Data, &mid, &end, |k, _| {
            if k != mid.as_slice() {
                after = Some(k.to_vec());
                return Ok(false);
            }
            Ok(true)
        })
        .map_err(|e| e.to_string())?;
    match after {
        Some(k) => Ok(Some(
            keys::origin_key(&k).map_err(|e| e.to_string())?.to_vec(),
        )),
        None => Ok(None),
    }
}

/// Splits each of `infos` (led regions over the limits), one at a time. Failures are logged;
/// the next size check tries again.
pub async fn split_oversized(
    router: &Router,
    placement: &SystemClient,
    engine: &Engine,
    infos: Vec<RegionInfo>,
) {
    for info in infos {
        let id = RegionId(info.region.id);
        let e = engine.clone();
        let region = info.region.clone();
        let key = match tokio::task::spawn_blocking(move || middle_key(&e, &region)).await {
            Ok(Ok(Some(k))) => k,
            Ok(Ok(None)) => continue,
            Ok(Err(err)) => {
                tracing::warn!(region = %id, error = %err, "split check failed");
                continue;
            }
            Err(_) => continue,
        };
        // A lease's record and attached rows stay together: a lease region splits only at a
        // record.
        let key = if keys::is_lease_key(&info.region.start_key) {
            match key.get(..tessera_api::keys::LEASE_KEY_LEN) {
                Some(k) if k > info.region.start_key.as_slice() => k.to_vec(),
                _ => continue,
            }
        } else {
            key
        };
        match split_region(router, placement, id, info.region.epoch, key).await {
            Ok(regions) => tracing::info!(
                region = %id,
                keys = info.keys,
                bytes = info.bytes,
                into = regions.len(),
                "split an oversized region"
            ),
            Err(err) => tracing::debug!(region = %id, error = %err, "size split failed"),
        }
    }
}
