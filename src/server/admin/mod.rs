//! Admin drivers that run on a region's leader node: splits (`split`) and membership
//! changes and replica moves (`membership`), and what both need — asking local peers for
//! their state, and one error type.
//!
//! A driver talks to its region only through the router (`PeerMsg`), and to placement only
//! through the placement client; a result it cannot know (a timeout after proposing) is
//! [`AdminError::Unknown`], never a guess.
//!
//! Invariants:
//! - every wait on a region is bounded (`REQUEST_TIMEOUT`; 5 s for descriptions), and a
//!   wait that times out is [`AdminError::Unknown`];
//! - [`led_region`] answers only for a local peer that leads; otherwise `NotLeader`, after
//!   waking the peer;
//! - region listings leave out peers that did not answer or hold nothing yet (applied index
//!   0), and are in start-key order.

pub mod membership;
pub mod merge;
pub mod split;

use tokio::sync::oneshot;

use crate::ids::RegionId;
use crate::proto;
use crate::raftstore::cmd::{ApplyResult, Command};
use crate::raftstore::msg::{PeerMsg, Progress, RegionError, RegionInfo};
use crate::raftstore::router::{RouteError, Router};

pub use membership::{change_peers, move_replica, MoveStep};
pub use merge::{merge_step, MergeStep};
pub use split::{split_oversized, split_region, SplitLimits};

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The region answered with an error (not its leader, refused, gone).
    #[error("{0}")]
    Region(RegionError),
    /// Placement could not be asked (for new ids) or did not answer.
    #[error("placement: {0}")]
    Placement(String),
    /// The request was proposed and its outcome is not known.
    #[error("result unknown: {0}")]
    Unknown(String),
}

pub(super) async fn ask<T>(
    router: &Router,
    region: RegionId,
    make: impl FnOnce(oneshot::Sender<T>) -> PeerMsg,
) -> Result<T, AdminError> {
    let (tx, rx) = oneshot::channel();
    router
        .send(region, make(tx))
        .map_err(|_| AdminError::Region(RegionError::RegionNotFound(region)))?;
    tokio::time::timeout(crate::server::REQUEST_TIMEOUT, rx)
        .await
        .map_err(|_| AdminError::Unknown("region did not answer".into()))?
        // Sent, and the answer dropped (the peer was destroyed, or the node is stopping):
        // what was asked may have been done.
        .map_err(|_| AdminError::Unknown("the region's answer was dropped".into()))
}

/// Proposes an admin command through `region`'s log under `epoch` and waits for it to apply.
pub(super) async fn propose(
    router: &Router,
    region: RegionId,
    epoch: proto::RegionEpoch,
    cmd: Command,
) -> Result<ApplyResult, AdminError> {
    let (tx, rx) = oneshot::channel();
    let msg = PeerMsg::Propose {
        cmd,
        epoch,
        write_id: None,
        reply: tx,
    };
    match router.send_client(region, msg) {
        Ok(()) => {}
        Err(RouteError::RegionNotFound(_)) => {
            return Err(AdminError::Region(RegionError::RegionNotFound(region)))
        }
        Err(_) => return Err(AdminError::Unknown("raft worker busy or stopping".into())),
    }
    match tokio::time::timeout(crate::server::REQUEST_TIMEOUT, rx).await {
        Ok(Ok(Ok(res))) => Ok(res),
        Ok(Ok(Err(e))) => Err(AdminError::Region(e)),
        Ok(Err(_)) => Err(AdminError::Unknown(
            "the region dropped the proposal".into(),
        )),
        Err(_) => Err(AdminError::Unknown("timed out".into())),
    }
}

pub(super) async fn describe(router: &Router, region: RegionId) -> Result<RegionInfo, AdminError> {
    ask(router, region, PeerMsg::Describe).await
}

/// The region as its local peer sees it, which must be the leader.
pub async fn led_region(router: &Router, region: RegionId) -> Result<RegionInfo, AdminError> {
    let info = describe(router, region).await?;
    if !info.is_leader {
        // Describe does not wake a sleeping peer (region listings send it to every region);
        // a request that needs the leader does, or a follower that still names a dead
        // leader would send the caller there for as long as the region sleeps.
        let _ = router.send(region, PeerMsg::Wake);
        return Err(AdminError::Region(RegionError::NotLeader {
            region,
            leader: info.leader,
        }));
    }
    Ok(info)
}

pub(super) async fn progress(router: &Router, region: RegionId) -> Result<Progress, AdminError> {
    ask(router, region, PeerMsg::Progress).await
}

/// Asks every local peer for its descriptor and leader. Regions that do not answer (being
/// removed, or the node stopping) are left out.
pub async fn describe_regions(router: &Router) -> Vec<proto::RegionInfo> {
    describe_some(router, &router.region_ids())
        .await
        .into_iter()
        .map(|info| proto::RegionInfo {
            region: Some(info.region),
            leader: info.leader,
            applied_index: info.applied_index,
            term: info.term,
            load: Some(proto::RegionLoad {
                keys: info.keys,
                bytes: info.bytes,
                writes_per_sec: 0.0,
            }),
        })
        .collect()
}

/// Asks the given local peers for their descriptor, leader and load, ordered by start key.
pub async fn describe_some(router: &Router, ids: &[RegionId]) -> Vec<RegionInfo> {
    let mut waits = Vec::new();
    for &id in ids {
        let (tx, rx) = oneshot::channel();
        if router.send(id, PeerMsg::Describe(tx)).is_ok() {
            waits.push(rx);
        }
    }
    let mut out = Vec::with_capacity(waits.len());
    for rx in waits {
        if let Ok(Ok(info)) = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await {
            // A peer not yet filled by a snapshot knows nothing worth showing.
            if info.applied_index > 0 {
                out.push(info);
            }
        }
    }
    out.sort_by(|a, b| a.region.start_key.cmp(&b.region.start_key));
    out
}
