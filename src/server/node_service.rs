//! `proto::Node`: what this node knows locally — its regions, their leaders, and the
//! addresses of the other nodes. Clients use it to fill their region cache. It also answers
//! from placement (node registry, routing table, cluster status, joins and removals) and
//! runs the admin operations of regions led here (`admin`).
//!
//! Invariants:
//! - a malformed request (no header, empty split key, no or unknown changes, node id 0, an
//!   address that is not `host:port`) is `InvalidArgument` before anything runs;
//! - region errors travel inside successful responses; placement failures are
//!   `Unavailable`; an admin outcome that is not known is `DeadlineExceeded`, never
//!   success;
//! - a join for another cluster is `FailedPrecondition`; one from an address a node that
//!   is not removed holds is `AlreadyExists`;
//! - cluster status sums keys and bytes of user regions only, and counts a region
//!   unavailable when at most half its peers are on nodes that are up.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::admin::describe_regions;
use crate::auth::{Gate, Need};
use crate::ids::RegionId;
use crate::ids::{ClusterId, NodeId};
use crate::placement;
use crate::placement::client::SystemClient;
use crate::proto::node_server;
use crate::proto::{
    ChangePeersRequest, ChangePeersResponse, ClusterStatusRequest, ClusterStatusResponse,
    JoinRequest, JoinResponse, ListNodesRequest, ListNodesResponse, LocateKeyRequest,
    LocateKeyResponse, MergeRegionsRequest, MergeRegionsResponse, MoveReplicaRequest,
    MoveReplicaResponse, NodeAddress, RegionsRequest, RegionsResponse, RemoveNodeRequest,
    RemoveNodeResponse, ScanRegionsRequest, ScanRegionsResponse, SetFailpointRequest,
    SetFailpointResponse, SplitRegionRequest, SplitRegionResponse, TransferLeaderRequest,
    TransferLeaderResponse,
};
use crate::raftstore::msg::{self, PeerMsg};
use crate::raftstore::router::Router;
use crate::transport::Transport;

pub struct NodeService {
    cluster_id: ClusterId,
    node_id: NodeId,
    router: Router,
    transport: Transport,
    placement: SystemClient,
    down_after: Duration,
    gate: Arc<Gate>,
}

impl NodeService {
    pub fn new(
        cluster_id: ClusterId,
        node_id: NodeId,
        router: Router,
        transport: Transport,
        placement: SystemClient,
        down_after: Duration,
        gate: Arc<Gate>,
    ) -> Self {
        Self {
            cluster_id,
            node_id,
            router,
            transport,
            placement,
            down_after,
            gate,
        }
    }

    /// Calls any logged-in caller may make (routing, nodes, status).
    fn any<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let c = super::caller(&self.gate, self.transport.node_tls(), request)?;
        self.gate.allow(&c, Need::Any)
    }
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn regions(
        &self,
        request: Request<RegionsRequest>,
    ) -> Result<Response<RegionsResponse>, Status> {
        self.any(&request)?;
        let regions = describe_regions(&self.router).await;
        let nodes = self.node_addresses();
        Ok(Response::new(RegionsResponse {
            cluster_id: self.cluster_id.0,
            node_id: self.node_id.0,
            regions,
            nodes,
        }))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.any(&request)?;
        let client = self.system().await?;
        let nodes = placement::list_nodes(&client, self.down_after)
            .await
            .map_err(placement_failed)?;
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn locate_key(
        &self,
        request: Request<LocateKeyRequest>,
    ) -> Result<Response<LocateKeyResponse>, Status> {
        self.any(&request)?;
        let key = request.into_inner().key;
        let client = self.system().await?;
        let route = placement::locate_key(&client, &key)
            .await
            .map_err(placement_failed)?
            .ok_or_else(|| Status::not_found("the routing table has no region for this key yet"))?;
        Ok(Response::new(LocateKeyResponse {
            route: Some(route),
            nodes: self.node_addresses(),
        }))
    }

    async fn scan_regions(
        &self,
        request: Request<ScanRegionsRequest>,
    ) -> Result<Response<ScanRegionsResponse>, Status> {
        self.any(&request)?;
        let req = request.into_inner();
        let client = self.system().await?;
        let routes =
            placement::scan_routes(&client, &req.start_key, &req.end_key, req.limit as usize)
                .await
                .map_err(placement_failed)?;
        Ok(Response::new(ScanRegionsResponse {
            routes,
            nodes: self.node_addresses(),
        }))
    }

    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.any(&request)?;
        let client = self.system().await?;
        let st = placement::status::cluster_status(&client, self.cluster_id, self.down_after)
            .await
            .map_err(placement_failed)?;
        Ok(Response::new(st))
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        super::require_peer(self.transport.node_tls(), &request, "joining")?;
        let req = request.into_inner();
        if req.cluster_id != self.cluster_id.0 {
            return Err(Status::failed_precondition(format!(
                "this is cluster {}, not {}",
                self.cluster_id.0, req.cluster_id
            )));
        }
        if req.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "{:?} is not a host:port address",
                req.addr
            )));
        }
        let client = self.system().await?;
        let node_id = match placement::join(&client, &req.addr).await {
            Ok(id) => id,
            Err(placement::JoinError::AddressTaken { addr, node }) => {
                return Err(Status::already_exists(
                    placement::JoinError::AddressTaken { addr, node }.to_string(),
                ))
            }
            Err(placement::JoinError::Client(e)) => return Err(placement_failed(e)),
        };
        tracing::info!(node = node_id, addr = %req.addr, "node joined");
        self.transport
            .set_address(crate::ids::NodeId(node_id), req.addr.clone());
        Ok(Response::new(JoinResponse {
            cluster_id: self.cluster_id.0,
            node_id,
            nodes: self.node_addresses(),
        }))
    }

    async fn remove_node(
        &self,
        request: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        super::require_admin(
            &self.gate,
            self.transport.node_tls(),
            &request,
            "removing a node",
        )?;
        let id = request.into_inner().node_id;
        let client = self.system().await?;
        match placement::remove_node(&client, NodeId(id)).await {
            Ok(()) => {
                tracing::warn!(node = id, "node marked removed");
                Ok(Response::new(RemoveNodeResponse {}))
            }
            Err(crate::client::Error::InvalidArgument(m)) => Err(Status::not_found(m)),
            Err(e) => Err(placement_failed(e)),
        }
    }

    async fn transfer_leader(
        &self,
        request: Request<TransferLeaderRequest>,
    ) -> Result<Response<TransferLeaderResponse>, Status> {
        super::require_admin(
            &self.gate,
            self.transport.node_tls(),
            &request,
            "a leader transfer",
        )?;
        let req = request.into_inner();
        let region = RegionId(req.header.as_ref().map_or(0, |h| h.region_id));
        let (tx, rx) = oneshot::channel();
        let res = match self.router.send(
            region,
            PeerMsg::TransferLeader {
                to_node: NodeId(req.to_node),
                reply: tx,
            },
        ) {
            Ok(()) => match rx.await {
                Ok(r) => r,
                Err(_) => return Err(Status::unavailable("node is stopping")),
            },
            Err(_) => Err(msg::RegionError::RegionNotFound(region)),
        };
        let transport = self.transport.clone();
        Ok(Response::new(TransferLeaderResponse {
            region_error: res.err().map(|e| {
                e.to_proto(|n| transport.address(crate::ids::NodeId(n)).unwrap_or_default())
            }),
        }))
    }

    async fn split_region(
        &self,
        request: Request<SplitRegionRequest>,
    ) -> Result<Response<SplitRegionResponse>, Status> {
        super::require_admin(&self.gate, self.transport.node_tls(), &request, "a split")?;
        let req = request.into_inner();
        let header = required_header(req.header)?;
        if req.split_key.is_empty() {
            return Err(Status::invalid_argument("split key must not be empty"));
        }
        let res = super::admin::split_region(
            &self.router,
            &self.placement,
            RegionId(header.region_id),
            header.region_epoch,
            req.split_key,
        )
        .await;
        let transport = self.transport.clone();
        let addr = |n| transport.address(crate::ids::NodeId(n)).unwrap_or_default();
        match res {
            Ok(regions) => Ok(Response::new(SplitRegionResponse {
                region_error: None,
                regions,
            })),
            Err(super::admin::AdminError::Region(e)) => Ok(Response::new(SplitRegionResponse {
                region_error: Some(e.to_proto(addr)),
                regions: Vec::new(),
            })),
            Err(e @ super::admin::AdminError::Placement(_)) => {
                Err(Status::unavailable(e.to_string()))
            }
            Err(e @ super::admin::AdminError::Unknown(_)) => {
                Err(Status::deadline_exceeded(e.to_string()))
            }
        }
    }

    async fn merge_regions(
        &self,
        request: Request<MergeRegionsRequest>,
    ) -> Result<Response<MergeRegionsResponse>, Status> {
        super::require_admin(&self.gate, self.transport.node_tls(), &request, "a merge")?;
        let req = request.into_inner();
        let header = required_header(req.header)?;
        if req.target_id == 0 {
            return Err(Status::invalid_argument(
                "target region id 0 names no region",
            ));
        }
        let res = super::admin::merge_step(
            &self.router,
            &self.transport,
            RegionId(header.region_id),
            RegionId(req.target_id),
        )
        .await;
        let transport = self.transport.clone();
        let addr = |n| transport.address(crate::ids::NodeId(n)).unwrap_or_default();
        let answer = |region, done, step| {
            Ok(Response::new(MergeRegionsResponse {
                region_error: None,
                region,
                done,
                step,
            }))
        };
        match res {
            Ok(super::admin::MergeStep::Done(r)) => answer(Some(r), true, String::new()),
            Ok(super::admin::MergeStep::InProgress(step)) => answer(None, false, step),
            Err(super::admin::AdminError::Region(e)) => Ok(Response::new(MergeRegionsResponse {
                region_error: Some(e.to_proto(addr)),
                ..Default::default()
            })),
            Err(e @ super::admin::AdminError::Placement(_)) => {
                Err(Status::unavailable(e.to_string()))
            }
            Err(e @ super::admin::AdminError::Unknown(_)) => {
                Err(Status::deadline_exceeded(e.to_string()))
            }
        }
    }

    async fn change_peers(
        &self,
        request: Request<ChangePeersRequest>,
    ) -> Result<Response<ChangePeersResponse>, Status> {
        super::require_admin(
            &self.gate,
            self.transport.node_tls(),
            &request,
            "a membership change",
        )?;
        let req = request.into_inner();
        let header = required_header(req.header)?;
        if req.changes.is_empty() {
            return Err(Status::invalid_argument("no membership change given"));
        }
        let mut changes = Vec::new();
        for c in &req.changes {
            let kind = crate::proto::PeerChangeKind::try_from(c.kind)
                .map_err(|_| Status::invalid_argument(format!("unknown change kind {}", c.kind)))?;
            if c.node_id == 0 {
                return Err(Status::invalid_argument("node id 0"));
            }
            changes.push((kind, c.node_id));
        }
        let res = super::admin::change_peers(
            &self.router,
            &self.placement,
            RegionId(header.region_id),
            header.region_epoch,
            &changes,
        )
        .await;
        let (region_error, region) = self.answer(res)?;
        Ok(Response::new(ChangePeersResponse {
            region_error,
            region,
        }))
    }

    async fn move_replica(
        &self,
        request: Request<MoveReplicaRequest>,
    ) -> Result<Response<MoveReplicaResponse>, Status> {
        super::require_admin(
            &self.gate,
            self.transport.node_tls(),
            &request,
            "a replica move",
        )?;
        let req = request.into_inner();
        let header = required_header(req.header)?;
        let res = super::admin::move_replica(
            &self.router,
            &self.placement,
            RegionId(header.region_id),
            req.from_node,
            req.to_node,
        )
        .await;
        let (done, res) = match res {
            Ok(super::admin::MoveStep::Done(r)) => (true, Ok(r)),
            Ok(super::admin::MoveStep::InProgress(r)) => (false, Ok(r)),
            Err(e) => (false, Err(e)),
        };
        let (region_error, region) = self.answer(res)?;
        Ok(Response::new(MoveReplicaResponse {
            region_error,
            region,
            done,
        }))
    }

    async fn set_failpoint(
        &self,
        request: Request<SetFailpointRequest>,
    ) -> Result<Response<SetFailpointResponse>, Status> {
        super::require_peer(self.transport.node_tls(), &request, "a fail point")?;
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument(
                "fail point name must not be empty",
            ));
        }
        set_failpoint(&req.name, &req.actions)?;
        Ok(Response::new(SetFailpointResponse {}))
    }

    async fn alarm(
        &self,
        request: Request<crate::proto::AlarmRequest>,
    ) -> Result<Response<crate::proto::AlarmResponse>, Status> {
        use crate::proto::AlarmAction;
        let action = AlarmAction::try_from(request.get_ref().action)
            .map_err(|_| Status::invalid_argument("unknown alarm action"))?;
        if action == AlarmAction::AlarmDisarm {
            super::require_admin(
                &self.gate,
                self.transport.node_tls(),
                &request,
                "disarming an alarm",
            )?;
        } else {
            self.any(&request)?;
        }
        let req = request.into_inner();
        let client = self.system().await?;
        if action == AlarmAction::AlarmDisarm {
            let node = (req.node_id != 0).then_some(NodeId(req.node_id));
            placement::alarms::disarm(&client, node)
                .await
                .map_err(placement_failed)?;
        }
        let alarms = placement::alarms::list(&client)
            .await
            .map_err(placement_failed)?;
        Ok(Response::new(crate::proto::AlarmResponse { alarms }))
    }
}

#[cfg(feature = "failpoints")]
#[allow(clippy::result_large_err)]
fn set_failpoint(name: &str, actions: &str) -> Result<(), Status> {
    if actions.is_empty() {
        fail::remove(name);
        return Ok(());
    }
    tracing::warn!(name, actions, "fail point set");
    fail::cfg(name, actions)
        .map_err(|e| Status::invalid_argument(format!("fail point {name}: {e}")))
}

#[cfg(not(feature = "failpoints"))]
#[allow(clippy::result_large_err)]
fn set_failpoint(_name: &str, _actions: &str) -> Result<(), Status> {
    Err(Status::unimplemented(
        "this build has no fail points (build with the `failpoints` feature)",
    ))
}

#[allow(clippy::result_large_err)]
fn required_header(
    h: Option<crate::proto::RequestHeader>,
) -> Result<crate::proto::RequestHeader, Status> {
    h.ok_or_else(|| Status::invalid_argument("request has no header"))
}

fn placement_failed(e: crate::client::Error) -> Status {
    Status::unavailable(format!("placement read failed: {e}"))
}

impl NodeService {
    async fn system(&self) -> Result<crate::client::Client, Status> {
        self.placement
            .get()
            .await
            .map_err(|e| Status::unavailable(format!("placement not reachable: {e}")))
    }

    fn node_addresses(&self) -> Vec<NodeAddress> {
        let mut nodes: Vec<NodeAddress> = self
            .transport
            .addresses()
            .into_iter()
            .map(|(id, addr)| NodeAddress {
                node_id: id.0,
                addr,
            })
            .collect();
        nodes.sort_by_key(|n| n.node_id);
        nodes
    }
}

impl NodeService {
    /// A lifecycle operation's outcome as (region error, region) or a gRPC status.
    #[allow(clippy::result_large_err)]
    fn answer(
        &self,
        res: Result<crate::proto::Region, super::admin::AdminError>,
    ) -> Result<
        (
            Option<crate::proto::RegionError>,
            Option<crate::proto::Region>,
        ),
        Status,
    > {
        use super::admin::AdminError;
        let transport = self.transport.clone();
        let addr = |n| transport.address(crate::ids::NodeId(n)).unwrap_or_default();
        match res {
            Ok(r) => Ok((None, Some(r))),
            Err(AdminError::Region(e)) => Ok((Some(e.to_proto(addr)), None)),
            Err(e @ AdminError::Placement(_)) => Err(Status::unavailable(e.to_string())),
            Err(e @ AdminError::Unknown(_)) => Err(Status::deadline_exceeded(e.to_string())),
        }
    }
}
