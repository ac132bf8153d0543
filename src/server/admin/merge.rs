//! Region merges (`Node.MergeRegions`, `tessera regions merge`, the scheduler's merges of
//! small idle neighbours), driven one step per call on the source's leader node. The steps
//! and what each replica checks are in `raftstore::peer::merge`; this side decides which
//! step is next from the two regions' replicated merge states, so a call may be repeated,
//! and a merge a crashed driver left half done is finished by the next call.
//!
//! Invariants:
//! - both regions must be led from this node: otherwise the source's leadership is handed
//!   to the target leader's node and the caller is told `NotLeader`;
//! - the source merges into its left neighbour; the target is locked before the source is
//!   frozen, and the source is frozen only while every replica of it is close behind the
//!   leader on a node that answers;
//! - a lock is lifted only when no prepare of the source into the target can ever apply
//!   (the source's epoch moved, its log refused a prepare, or it froze into another region);
//! - the commit is proposed only once every source replica reported the prepare applied
//!   (its write synced), so every target replica finds the frozen source on its node;
//! - a result not known (a timeout after proposing) is `Unknown`; asking again finds out.

use super::{describe, led_region, progress, propose, AdminError};
use crate::ids::{NodeId, RegionId};
use crate::proto::{self, merge_cmd::Op, Region};
use crate::raftstore::cmd::{ApplyResult, Command};
use crate::raftstore::msg::{PeerMsg, RegionError, RegionInfo};
use crate::raftstore::peer::mergeable;
use crate::raftstore::router::Router;
use crate::transport::Transport;

/// Where a merge stands after one step.
#[derive(Debug)]
pub enum MergeStep {
    /// The target holds the source's range.
    Done(Region),
    /// Under way: ask again.
    InProgress(String),
}

fn refused(reason: String) -> AdminError {
    AdminError::Region(RegionError::Refused { reason })
}

/// Takes the next step of merging `source` (led from this node) into `target`.
pub async fn merge_step(
    router: &Router,
    transport: &Transport,
    source: RegionId,
    target: RegionId,
) -> Result<MergeStep, AdminError> {
    let s = led_region(router, source).await?;
    let t = match describe(router, target).await {
        Ok(t) => t,
        Err(AdminError::Region(RegionError::RegionNotFound(_))) => {
            return Err(refused(format!(
                "region {target} has no replica on this node, which holds region {source}'s"
            )))
        }
        Err(e) => return Err(e),
    };
    if !t.is_leader {
        return follow_target_leader(router, &s, &t).await;
    }
    let s_merge = s.merge.unwrap_or_default();
    let t_merge = t.merge.unwrap_or_default();
    let t_epoch = t.region.epoch.unwrap_or_default();
    let locked_for_source = t_merge.target_id == 0 && t_merge.source_id == source.0;
    // Lifts the lock as it stands now (the unlock names its source epoch, so a late one
    // never lifts a newer lock).
    let unlock = || async {
        let cmd = Command::Merge(Box::new(Op::Unlock(proto::MergeLockOp {
            source_id: source.0,
            source_epoch: t_merge.source_epoch,
        })));
        propose(router, target, t_epoch, cmd).await?;
        tracing::info!(%source, %target, "merge abandoned; target unlocked");
        Ok::<(), AdminError>(())
    };
    if s_merge.target_id != 0 && s_merge.target_id != target.0 {
        // Frozen into another region for good: no prepare into this target can apply.
        if locked_for_source {
            unlock().await?;
        }
        return Err(refused(format!(
            "region {source} is merging into region {}",
            s_merge.target_id
        )));
    }
    if s.merge.is_some() && s_merge.target_id == 0 {
        return Ok(MergeStep::InProgress(format!(
            "region {source} is locked as the target of region {}'s merge",
            s_merge.source_id
        )));
    }
    if s_merge.target_id == target.0 {
        if !locked_for_source {
            // The target committed here; the source's peer ends after that round.
            return Ok(MergeStep::InProgress(
                "the source's replicas are ending".into(),
            ));
        }
        if let Some(waiting) = not_prepared(router, transport, &s, s_merge.prepare_index).await {
            return Ok(MergeStep::InProgress(waiting));
        }
        let cmd = Command::Merge(Box::new(Op::Commit(proto::MergeCommitOp {
            source: Some(s.region.clone()),
            prepare_index: s_merge.prepare_index,
        })));
        return match propose(router, target, t_epoch, cmd).await {
            Ok(ApplyResult::Merge { region }) => {
                tracing::info!(%source, %target, "merge committed");
                Ok(MergeStep::Done(region))
            }
            Ok(other) => Err(AdminError::Unknown(format!("unexpected result {other:?}"))),
            // Another driver's commit applied first: the source's peers are ending.
            Err(AdminError::Region(RegionError::Refused { .. }))
            | Err(AdminError::Region(RegionError::EpochNotMatch { .. })) => Ok(
                MergeStep::InProgress("committed by another call; the source is ending".into()),
            ),
            Err(e) => Err(e),
        };
    }
    // The source is not frozen yet.
    let s_epoch = s.region.epoch.unwrap_or_default();
    if !locked_for_source {
        if t.merge.is_some() {
            return Err(refused(format!(
                "region {target} is taking part in another merge ({t_merge:?})"
            )));
        }
        mergeable(&s.region, &t.region).map_err(refused)?;
        if let Some(lagging) = lagging_replica(router, transport, &s).await? {
            return Ok(MergeStep::InProgress(lagging));
        }
        let cmd = Command::Merge(Box::new(Op::Lock(proto::MergeLockOp {
            source_id: source.0,
            source_epoch: Some(s_epoch),
        })));
        propose(router, target, t_epoch, cmd).await?;
        return Ok(MergeStep::InProgress("target locked".into()));
    }
    // The target is locked for the source. The lock is lifted only when no prepare of the
    // source into it can ever apply: the source's epoch moved past the one the lock names
    // (epochs only grow), or the source's log refused a prepare at apply — every earlier
    // prepare attempt is before it in that log, or was never committed.
    let expected = t_merge.source_epoch.unwrap_or_default();
    if expected != s_epoch {
        let newer = s_epoch.version >= expected.version && s_epoch.conf_ver >= expected.conf_ver;
        if !newer {
            // This leader has not applied what the lock saw yet.
            return Ok(MergeStep::InProgress(
                "the source's leader is catching up".into(),
            ));
        }
        unlock().await?;
        return Err(AdminError::Region(RegionError::EpochNotMatch {
            current: vec![s.region.clone()],
        }));
    }
    if let Some(lagging) = lagging_replica(router, transport, &s).await? {
        // Not now; the lock stays (a prepare asked for before may still apply).
        return Ok(MergeStep::InProgress(lagging));
    }
    let cmd = Command::Merge(Box::new(Op::Prepare(t.region.clone())));
    match propose(router, source, expected, cmd).await {
        Ok(_) => Ok(MergeStep::InProgress("source frozen".into())),
        Err(e @ AdminError::Region(RegionError::EpochNotMatch { .. }))
        | Err(e @ AdminError::Region(RegionError::Refused { .. })) => {
            unlock().await?;
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// The target is led from another node: hand the source's leadership there (both regions
/// have replicas on the same nodes), so that one node drives both.
async fn follow_target_leader(
    router: &Router,
    s: &RegionInfo,
    t: &RegionInfo,
) -> Result<MergeStep, AdminError> {
    let Some(leader) = t.leader else {
        let _ = router.send(RegionId(t.region.id), PeerMsg::Wake);
        return Ok(MergeStep::InProgress("the target has no leader".into()));
    };
    let source = RegionId(s.region.id);
    let Some(peer) = s.region.peers.iter().find(|p| p.node_id == leader.node_id) else {
        return Err(refused(format!(
            "region {source} has no replica on node {}, which leads region {}",
            leader.node_id, t.region.id
        )));
    };
    let to_node = NodeId(leader.node_id);
    // Best effort: the caller asks the new leader next, or again here if it did not move.
    let _ = super::ask(router, source, |reply| PeerMsg::TransferLeader {
        to_node,
        reply,
    })
    .await;
    Err(AdminError::Region(RegionError::NotLeader {
        region: source,
        leader: Some(*peer),
    }))
}

/// A source replica further behind than this many entries is not frozen into a merge.
const MAX_LAG: u64 = 128;

/// Why the source may not be frozen yet: a replica far behind the leader's log, or on a node
/// that does not answer (the commit waits for every replica to apply the prepare, so one
/// that is down would keep the source frozen until it is back).
async fn lagging_replica(
    router: &Router,
    transport: &Transport,
    s: &RegionInfo,
) -> Result<Option<String>, AdminError> {
    let p = progress(router, RegionId(s.region.id)).await?;
    if p.in_joint {
        return Ok(Some("a membership change is in progress".into()));
    }
    let me = s.leader.map(|l| l.node_id);
    for peer in &s.region.peers {
        let matched = p.matched.iter().find(|(id, _)| *id == peer.id).map(|m| m.1);
        if matched.is_none_or(|m| m + MAX_LAG < p.commit) {
            return Ok(Some(format!(
                "the source's replica on node {} is behind ({matched:?} of {})",
                peer.node_id, p.commit
            )));
        }
        if Some(peer.node_id) != me && !transport.probe(NodeId(peer.node_id)).await {
            return Ok(Some(format!("node {} does not answer", peer.node_id)));
        }
    }
    Ok(None)
}

/// The first source replica that has not applied the prepare at `index`, if any.
async fn not_prepared(
    router: &Router,
    transport: &Transport,
    s: &RegionInfo,
    index: u64,
) -> Option<String> {
    let me = s.leader.map(|l| l.node_id);
    for peer in &s.region.peers {
        let applied = if Some(peer.node_id) == me {
            describe(router, RegionId(s.region.id))
                .await
                .ok()
                .map(|i| i.applied_index)
        } else {
            remote_applied(transport, NodeId(peer.node_id), s.region.id).await
        };
        if applied.is_none_or(|a| a < index) {
            return Some(format!(
                "waiting for node {} to apply the prepare at {index} (applied {applied:?})",
                peer.node_id
            ));
        }
    }
    None
}

/// The applied index of `region`'s replica on `node`, as that node answers.
async fn remote_applied(transport: &Transport, node: NodeId, region: u64) -> Option<u64> {
    let ch = transport.channel(node).await.ok()?;
    let mut client = proto::node_client::NodeClient::new(ch);
    let ask = client.regions(proto::RegionsRequest {});
    let resp = tokio::time::timeout(std::time::Duration::from_secs(2), ask)
        .await
        .ok()?
        .ok()?
        .into_inner();
    resp.regions
        .iter()
        .find(|r| r.region.as_ref().is_some_and(|d| d.id == region))
        .map(|r| r.applied_index)
}
