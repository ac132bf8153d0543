//! Cluster-level calls: any-node RPCs (routing table, nodes, status, removal) and leader
//! transfer.
//!
//! Invariants:
//! - `any_node` moves on to the next node after any failure except `NotFound`,
//!   `InvalidArgument`, `AlreadyExists`, `FailedPrecondition`, `PermissionDenied` and
//!   `Unauthenticated`, which are answers, and `Aborted` (a write whose outcome the server
//!   does not know: `Error::Unknown`, never sent again);
//! - `change_peers` is at-most-once: after an attempt that may have executed it ends in
//!   `Error::Unknown`, never sends again; the other region calls are sent as idempotent;
//! - `transfer_leader` succeeds only once a refresh after the request shows the target
//!   leading; `Health::of` ranks unavailable regions above every other sign.

use std::time::{Duration, Instant};

use super::auth::Ch;
use tonic::{Code, Status};

use super::cache::CachedRegion;
use super::retry::Mode;
use super::{Client, Error, Result};
use crate::ids::{NodeId, RegionId};
use crate::proto::node_client::NodeClient;
use crate::proto::{self, ClusterStatusResponse, NodeInfo, RegionRoute};

/// How `tessera status` sums up a cluster (from [`Client::status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Every node up, every region led, the routing table covers the keyspace.
    Healthy,
    /// Serving, but a node is down, a region has no leader, or some key range has no
    /// routing-table row yet (a new region that has not reported).
    Degraded,
    /// Some region has no live majority: its keys cannot be written.
    Unavailable,
}

impl Health {
    pub fn of(st: &proto::ClusterStatusResponse) -> Self {
        let down = st
            .nodes
            .iter()
            .any(|n| n.state == proto::NodeState::Down as i32);
        if st.regions_unavailable > 0 {
            Health::Unavailable
        } else if down
            || st.regions_without_leader > 0
            || st.regions == 0
            || !st.routing_gaps.is_empty()
        {
            Health::Degraded
        } else {
            Health::Healthy
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Unavailable => "UNAVAILABLE REGIONS",
        }
    }
}

impl Client {
    /// Calls a `Node` RPC on the first node that answers. Only unreachable nodes are skipped;
    /// any other failure is the answer.
    pub(super) async fn any_node<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(NodeClient<Ch>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        self.any_channel(|ch| op(NodeClient::new(ch))).await
    }

    /// Calls an RPC that any node serves on the first node that answers (see `any_node`).
    pub(super) async fn any_channel<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Ch) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Status>>,
    {
        let mut last = String::from("no endpoint answered");
        for addr in self.node_addrs() {
            let ch = match self.channel(&addr).await {
                Ok(c) => c.ch,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match op(ch).await {
                Ok(v) => return Ok(v),
                Err(s) => match s.code() {
                    Code::NotFound => return Err(Error::NotFound(s.message().into())),
                    Code::InvalidArgument | Code::OutOfRange => {
                        return Err(Error::InvalidArgument(s.message().into()))
                    }
                    Code::AlreadyExists | Code::FailedPrecondition => {
                        return Err(Error::Refused(s.message().into()))
                    }
                    // Every node would say the same: not a node that is down.
                    Code::PermissionDenied => {
                        return Err(Error::PermissionDenied(s.message().into()))
                    }
                    Code::Unauthenticated => {
                        return Err(Error::Unauthenticated(s.message().into()))
                    }
                    // The server could not tell whether its write took effect: sent again
                    // elsewhere it could apply twice.
                    Code::Aborted => return Err(Error::Unknown(s.message().into())),
                    _ => {
                        self.forget_channel(&addr);
                        last = crate::status_text(&addr, self.inner.opts.tls.is_some(), &s);
                    }
                },
            }
        }
        Err(Error::Unavailable(last))
    }

    /// Loads routes from the placement routing table: the region holding `start` and up to
    /// `limit - 1` after it (`limit` 0 = the whole keyspace).
    pub(super) async fn load_routes(&self, start: &[u8], limit: u32) -> Result<Vec<RegionRoute>> {
        let resp = self
            .any_node(|mut n| async move {
                n.scan_regions(proto::ScanRegionsRequest {
                    start_key: start.to_vec(),
                    end_key: Vec::new(),
                    limit,
                })
                .await
                .map(|r| r.into_inner())
            })
            .await?;
        if resp.routes.is_empty() {
            return Err(Error::NotFound("the routing table is empty".into()));
        }
        self.learn_nodes(resp.nodes);
        let mut cache = self
            .inner
            .cache
            .write()
            .expect("region cache lock poisoned");
        for r in &resp.routes {
            if let Some(region) = r.region.clone() {
                cache.insert(region, r.leader);
            }
        }
        Ok(resp.routes)
    }

    /// Every region with its leader and load, from the placement routing table (or, while
    /// that does not cover the keyspace yet, as the nodes themselves report them, without
    /// load).
    pub async fn routes(&self) -> Result<Vec<RegionRoute>> {
        let complete = |routes: &[RegionRoute]| {
            let mut expect: &[u8] = &[];
            for r in routes {
                match &r.region {
                    Some(region) if region.start_key == expect => expect = &region.end_key,
                    _ => return false,
                }
            }
            !routes.is_empty() && expect.is_empty()
        };
        match self.load_routes(&[], 0).await {
            Ok(r) if complete(&r) => Ok(r),
            _ => Ok(self
                .regions()
                .await?
                .into_iter()
                .map(|c| RegionRoute {
                    region: Some(c.region),
                    leader: c.leader,
                    ..Default::default()
                })
                .collect()),
        }
    }

    /// Every registered node with its state.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        self.any_node(|mut n| async move {
            n.list_nodes(proto::ListNodesRequest {})
                .await
                .map(|r| r.into_inner().nodes)
        })
        .await
    }

    /// The cluster at a glance: nodes, regions, leaderless or unavailable regions, totals.
    pub async fn status(&self) -> Result<ClusterStatusResponse> {
        self.any_node(|mut n| async move {
            n.cluster_status(proto::ClusterStatusRequest {})
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    /// The cluster's alarms (NOSPACE: a node's data passed its space quota).
    pub async fn alarms(&self) -> Result<Vec<proto::AlarmRecord>> {
        self.any_node(|mut n| async move {
            n.alarm(proto::AlarmRequest {
                action: proto::AlarmAction::AlarmList as i32,
                node_id: 0,
            })
            .await
            .map(|r| r.into_inner().alarms)
        })
        .await
    }

    /// Disarms the alarm of `node` (`None`: every alarm); returns the alarms still standing.
    /// A node still over its quota raises its alarm again within a heartbeat.
    pub async fn disarm_alarms(&self, node: Option<NodeId>) -> Result<Vec<proto::AlarmRecord>> {
        let node_id = node.map_or(0, |n| n.get());
        self.any_node(|mut n| async move {
            n.alarm(proto::AlarmRequest {
                action: proto::AlarmAction::AlarmDisarm as i32,
                node_id,
            })
            .await
            .map(|r| r.into_inner().alarms)
        })
        .await
    }

    /// Marks a node removed; it stops serving and may never return with its data.
    pub async fn remove_node(&self, node: NodeId) -> Result<()> {
        let node_id = node.get();
        self.any_node(|mut n| async move {
            n.remove_node(proto::RemoveNodeRequest { node_id })
                .await
                .map(|_| ())
        })
        .await
    }

    /// Asks region `region_id`'s leader to hand leadership to its peer on `to_node`, and waits
    /// (within the deadline) until the cluster reports the new leader.
    pub async fn transfer_leader(&self, region: RegionId, to: NodeId) -> Result<()> {
        let (region_id, to_node) = (region.get(), to.get());
        let start = Instant::now();
        let mut asked = false;
        loop {
            if start.elapsed() >= self.inner.opts.deadline {
                return Err(Error::Deadline {
                    attempts: 0,
                    elapsed: start.elapsed(),
                    last: format!("region {region_id} still not led from node {to_node}"),
                });
            }
            let region = self.cached_region(region_id).await?;
            if !region.region.peers.iter().any(|p| p.node_id == to_node) {
                return Err(Error::InvalidArgument(format!(
                    "region {region_id} has no peer on node {to_node}"
                )));
            }
            if asked && region.leader.is_some_and(|l| l.node_id == to_node) {
                return Ok(());
            }
            self.start_transfer_leader(&region, to_node).await?;
            asked = true;
            tokio::time::sleep(Duration::from_millis(100)).await;
            // Ask the leader it named (it answers NotLeader naming the new one once done).
            self.inner
                .cache
                .write()
                .expect("region cache lock poisoned")
                .set_leader(region_id, None);
            let _ = self.refresh().await;
        }
    }

    /// Splits the region holding `key` so that a region starts at `key`; returns the regions
    /// now covering the old range. Splitting at a key that already starts a region changes
    /// nothing and returns that region.
    pub async fn split(&self, key: &[u8]) -> Result<Vec<proto::Region>> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("split key must not be empty".into()));
        }
        let regions = self
            .execute(key, Mode::Idempotent, |conn, header| async move {
                let r = NodeClient::new(conn.ch)
                    .split_region(proto::SplitRegionRequest {
                        header: Some(header),
                        split_key: key.to_vec(),
                    })
                    .await?
                    .into_inner();
                Ok((r.region_error, r.regions))
            })
            .await?;
        let mut cache = self
            .inner
            .cache
            .write()
            .expect("region cache lock poisoned");
        for r in &regions {
            cache.insert(r.clone(), None);
        }
        Ok(regions)
    }

    /// Merges region `source` into `target`, its neighbour with replicas on the same nodes:
    /// the target keeps its id and takes the source's range. Returns the target afterwards.
    /// The merge runs in steps on the source's leader node, asked until done or `timeout`;
    /// asking again after a failure finishes a merge left half done.
    pub async fn merge_regions(
        &self,
        source: RegionId,
        target: RegionId,
        timeout: Duration,
    ) -> Result<proto::Region> {
        let (source_id, target_id) = (source.get(), target.get());
        if source_id == target_id {
            return Err(Error::InvalidArgument(
                "a region cannot merge with itself".into(),
            ));
        }
        // The source's first key stays the source's until the merge, then the target's.
        let key = self.cached_region(source_id).await?.region.start_key;
        let start = Instant::now();
        loop {
            let (region, done, step) = self
                .execute(&key, Mode::Idempotent, |conn, header| async move {
                    if header.region_id == target_id {
                        return Ok((None, (None, true, String::new())));
                    }
                    if header.region_id != source_id {
                        return Err(Status::failed_precondition(format!(
                            "region {source_id}'s first key is now in region {}",
                            header.region_id
                        )));
                    }
                    let r = NodeClient::new(conn.ch)
                        .merge_regions(proto::MergeRegionsRequest {
                            header: Some(header),
                            target_id,
                        })
                        .await?
                        .into_inner();
                    Ok((r.region_error, (r.region, r.done, r.step)))
                })
                .await?;
            if done {
                if region.is_some() {
                    return self.region_changed(region);
                }
                self.refresh().await?;
                return Ok(self.cached_region(target_id).await?.region);
            }
            if start.elapsed() >= timeout {
                return Err(Error::Deadline {
                    attempts: 0,
                    elapsed: start.elapsed(),
                    last: format!("merge of region {source_id} into {target_id}: {step}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Changes the membership of a region by node ids: `(kind, node)` pairs; several go
    /// through joint consensus. Returns the region afterwards.
    pub async fn change_peers(
        &self,
        region: RegionId,
        changes: &[(proto::PeerChangeKind, NodeId)],
    ) -> Result<proto::Region> {
        let region = self.cached_region(region.get()).await?;
        let changes: Vec<proto::PeerChange> = changes
            .iter()
            .map(|(k, n)| proto::PeerChange {
                kind: *k as i32,
                node_id: n.get(),
            })
            .collect();
        let key = region.region.start_key.clone();
        let r = self
            .execute(&key, Mode::AtMostOnce, |conn, header| {
                let changes = changes.clone();
                async move {
                    let r = NodeClient::new(conn.ch)
                        .change_peers(proto::ChangePeersRequest {
                            header: Some(header),
                            changes,
                        })
                        .await?
                        .into_inner();
                    Ok((r.region_error, r.region))
                }
            })
            .await?;
        self.region_changed(r)
    }

    /// Moves the replica of a region from one node to another (learner, catch-up, joint
    /// promote-and-remove), or with `from` `None` adds one on `to`, waiting at most
    /// `timeout` for the new replica to catch up. Returns the region afterwards.
    pub async fn move_replica(
        &self,
        region: RegionId,
        from: Option<NodeId>,
        to: NodeId,
        timeout: Duration,
    ) -> Result<proto::Region> {
        if to.get() == 0 || from.is_some_and(|f| f.get() == 0) {
            return Err(Error::InvalidArgument("node id 0 names no node".into()));
        }
        let (region_id, from, to) = (region.get(), from.map_or(0, NodeId::get), to.get());
        let start = Instant::now();
        loop {
            let region = self.cached_region(region_id).await?;
            let key = region.region.start_key.clone();
            let (r, done) = self
                .execute(&key, Mode::Idempotent, |conn, header| async move {
                    let r = NodeClient::new(conn.ch)
                        .move_replica(proto::MoveReplicaRequest {
                            header: Some(header),
                            from_node: from,
                            to_node: to,
                        })
                        .await?
                        .into_inner();
                    Ok((r.region_error, (r.region, r.done)))
                })
                .await?;
            let r = self.region_changed(r)?;
            if done {
                return Ok(r);
            }
            if start.elapsed() >= timeout {
                return Err(Error::Deadline {
                    attempts: 0,
                    elapsed: start.elapsed(),
                    last: format!("replica of region {region_id} still moving to node {to}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn region_changed(&self, r: Option<proto::Region>) -> Result<proto::Region> {
        let r = r.ok_or_else(|| Error::Unavailable("the node answered without a region".into()))?;
        self.inner
            .cache
            .write()
            .expect("region cache lock poisoned")
            .insert(r.clone(), None);
        Ok(r)
    }

    /// Asks the leader of `region_id` to hand leadership to its peer on `to_node`, without
    /// waiting for the transfer to complete (the scheduler's way: it sees the result in the
    /// routing table).
    pub async fn request_transfer_leader(&self, region: RegionId, to: NodeId) -> Result<()> {
        let region = self.cached_region(region.get()).await?;
        self.start_transfer_leader(&region, to.get()).await
    }

    async fn start_transfer_leader(&self, region: &CachedRegion, to_node: u64) -> Result<()> {
        let key = region.region.start_key.clone();
        self.execute(&key, Mode::Idempotent, |conn, header| async move {
            let r = NodeClient::new(conn.ch)
                .transfer_leader(proto::TransferLeaderRequest {
                    header: Some(header),
                    to_node,
                })
                .await?
                .into_inner();
            Ok((r.region_error, ()))
        })
        .await
    }

    async fn cached_region(&self, region_id: u64) -> Result<CachedRegion> {
        let find = |c: &Client| {
            c.inner
                .cache
                .read()
                .expect("region cache lock poisoned")
                .regions()
                .into_iter()
                .find(|r| r.region.id == region_id)
        };
        if let Some(r) = find(self) {
            return Ok(r);
        }
        let _ = self.load_routes(&[], 0).await;
        if find(self).is_none() {
            self.refresh().await?;
        }
        find(self).ok_or_else(|| Error::NotFound(format!("no region {region_id}")))
    }
}
