//! Membership changes run by a region's leader node: add or remove peers
//! (`Node.ChangePeers`), and move a replica from one node to another (`Node.MoveReplica`):
//! add a learner on the target, wait until it has caught up (a snapshot streamed in chunks,
//! then the log), then promote it and remove the old replica in one joint change.
//!
//! Invariants:
//! - the leader never removes or demotes its own replica: a move away from the leader's
//!   node first hands leadership to another voter and answers `NotLeader`;
//! - a learner is promoted only once it has the leader's whole committed log and no joint
//!   change is under way; its promotion and the old replica's removal are one change;
//! - new peer ids come from placement before anything is proposed;
//! - each step is short and may be asked again: after the move finished it answers `Done`
//!   (`InProgress` while raft is still leaving the joint configuration).

use std::time::{Duration, Instant};

use super::{ask, describe, led_region, progress, AdminError};
use crate::ids::{NodeId, RegionId};
use crate::placement::client::SystemClient;
use crate::proto::{self, PeerChangeKind, Region, RegionEpoch};
use crate::raftstore::cmd::ApplyResult;
use crate::raftstore::msg::{PeerMsg, RegionError};
use crate::raftstore::router::Router;

/// Changes the membership of `region` (led from this node) by node ids. Peer ids for new
/// peers come from placement; adding a voter where a learner is promotes it.
pub async fn change_peers(
    router: &Router,
    placement: &SystemClient,
    region: RegionId,
    epoch: Option<RegionEpoch>,
    changes: &[(PeerChangeKind, u64)],
) -> Result<Region, AdminError> {
    let info = led_region(router, region).await?;
    let epoch = epoch.unwrap_or_else(|| info.region.epoch.unwrap_or_default());
    let new_ids = changes
        .iter()
        .filter(|(k, n)| {
            *k != PeerChangeKind::Remove && !info.region.peers.iter().any(|p| p.node_id == *n)
        })
        .count() as u64;
    let mut ids = if new_ids > 0 {
        let client = placement
            .get()
            .await
            .map_err(|e| AdminError::Placement(e.to_string()))?;
        crate::placement::alloc_ids(&client, new_ids)
            .await
            .map_err(|e| AdminError::Placement(e.to_string()))?
    } else {
        0..0
    };
    let mut resolved = Vec::new();
    for (kind, node) in changes {
        let existing = info.region.peers.iter().find(|p| p.node_id == *node);
        let role = match kind {
            PeerChangeKind::AddLearner => proto::PeerRole::Learner,
            _ => proto::PeerRole::Voter,
        };
        let peer = match (kind, existing) {
            (PeerChangeKind::Remove, Some(p)) => *p,
            (PeerChangeKind::Remove, None) => {
                return Err(bad(format!("region {region} has no peer on node {node}")))
            }
            (_, Some(p)) if p.role == proto::PeerRole::Learner as i32 => proto::Peer {
                role: role as i32,
                ..*p
            },
            (_, Some(_)) => {
                return Err(bad(format!(
                    "region {region} already has a voter on node {node}"
                )))
            }
            (_, None) => proto::Peer {
                id: ids
                    .next()
                    .ok_or_else(|| AdminError::Placement("too few ids".into()))?,
                node_id: *node,
                role: role as i32,
            },
        };
        resolved.push((*kind, peer));
    }
    let res = ask(router, region, |reply| PeerMsg::ChangePeers {
        changes: resolved,
        epoch,
        reply,
    })
    .await?;
    let region_after = match res {
        Ok(ApplyResult::ChangePeers { region }) => region,
        Ok(other) => return Err(AdminError::Unknown(format!("unexpected result {other:?}"))),
        Err(e) => return Err(AdminError::Region(e)),
    };
    // A joint change is done once raft has left the joint state.
    let t = Instant::now();
    loop {
        let p = progress(router, region).await?;
        if !p.in_joint {
            break;
        }
        if t.elapsed() > crate::server::REQUEST_TIMEOUT {
            return Err(AdminError::Unknown("joint state not left in time".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(describe(router, region)
        .await
        .map(|i| i.region)
        .unwrap_or(region_after))
}

fn bad(reason: String) -> AdminError {
    AdminError::Region(RegionError::Refused { reason })
}

/// Where a move stands after one step.
pub enum MoveStep {
    /// The replica is on `to` and gone from `from`.
    Done(Region),
    /// A step was taken or is under way (learner added, catching up); ask again.
    InProgress(Region),
}

/// Takes the next step of moving the replica of `region` on `from` to `to` (`from` 0: add a
/// replica on `to`, removing none), each step short
/// enough for one RPC: hand leadership away if this node's replica is the one to move
/// (answered `NotLeader`: the caller asks the new leader), add a learner on `to`, and once it
/// has the whole committed log, promote it and remove `from` in one joint change.
pub async fn move_replica(
    router: &Router,
    placement: &SystemClient,
    region: RegionId,
    from: u64,
    to: u64,
) -> Result<MoveStep, AdminError> {
    let info = led_region(router, region).await?;
    let peers = &info.region.peers;
    let is_voter = |n: u64| {
        peers
            .iter()
            .any(|p| p.node_id == n && p.role == proto::PeerRole::Voter as i32)
    };
    if from == to {
        return Err(bad("source and target node are the same".into()));
    }
    if from == 0 && is_voter(to) {
        return Ok(MoveStep::Done(info.region));
    }
    if from != 0 && !peers.iter().any(|p| p.node_id == from) {
        if is_voter(to) {
            return Ok(MoveStep::Done(info.region));
        }
        return Err(bad(format!(
            "region {region} has no replica on node {from}"
        )));
    }
    if is_voter(to) {
        // The last step (promote `to`, remove `from`) applied and raft has not left the
        // joint configuration yet: the move is finishing, not refused.
        if progress(router, region).await?.in_joint {
            return Ok(MoveStep::InProgress(info.region));
        }
        return Err(bad(format!(
            "region {region} already has a voter on node {to}"
        )));
    }
    if info.leader.map(|l| l.node_id) == Some(from) {
        let target = peers
            .iter()
            .find(|p| p.node_id != from && p.role == proto::PeerRole::Voter as i32)
            .map(|p| p.node_id)
            .ok_or_else(|| bad("no other voter to hand leadership to".into()))?;
        let res = ask(router, region, |reply| PeerMsg::TransferLeader {
            to_node: NodeId(target),
            reply,
        })
        .await?;
        res.map_err(AdminError::Region)?;
        return Err(AdminError::Region(RegionError::NotLeader {
            region,
            leader: peers.iter().find(|p| p.node_id == target).copied(),
        }));
    }
    let Some(learner) = peers.iter().find(|p| p.node_id == to).copied() else {
        let r = change_peers(
            router,
            placement,
            region,
            None,
            &[(PeerChangeKind::AddLearner, to)],
        )
        .await?;
        return Ok(MoveStep::InProgress(r));
    };
    // Promote only a learner that has the leader's whole committed log.
    let p = progress(router, region).await?;
    let matched = p
        .matched
        .iter()
        .find(|(id, _)| *id == learner.id)
        .map_or(0, |(_, m)| *m);
    if matched < p.commit || p.in_joint {
        return Ok(MoveStep::InProgress(info.region));
    }
    let mut changes = vec![(PeerChangeKind::AddVoter, to)];
    if from != 0 {
        changes.push((PeerChangeKind::Remove, from));
    }
    let r = change_peers(router, placement, region, None, &changes).await?;
    Ok(MoveStep::Done(r))
}
