//! `proto::Node`: what this node knows locally — its regions, their leaders, and the
//! addresses of the other nodes. Clients use it to fill their region cache.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, OnceCell};
use tonic::{Request, Response, Status};

use crate::client::{Client, ClientOptions};
use crate::ids::{ClusterId, NodeId};
use crate::proto::node_server;
use crate::proto::{
    ListNodesRequest, ListNodesResponse, NodeAddress, RegionInfo, RegionsRequest, RegionsResponse,
};
use crate::raftstore::msg::PeerMsg;
use crate::raftstore::router::Router;
use crate::transport::Transport;

pub struct NodeService {
    cluster_id: ClusterId,
    node_id: NodeId,
    router: Router,
    transport: Transport,
    placement: SystemClient,
    down_after: Duration,
}

impl NodeService {
    pub fn new(
        cluster_id: ClusterId,
        node_id: NodeId,
        router: Router,
        transport: Transport,
        placement: SystemClient,
        down_after: Duration,
    ) -> Self {
        Self {
            cluster_id,
            node_id,
            router,
            transport,
            placement,
            down_after,
        }
    }
}

/// A client with system-keyspace access, connected on first use to the nodes this node
/// knows (it needs the gRPC server running, so it cannot be built during start-up).
#[derive(Clone)]
pub struct SystemClient {
    transport: Transport,
    cell: Arc<OnceCell<Client>>,
}

impl SystemClient {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            cell: Arc::new(OnceCell::new()),
        }
    }

    pub async fn get(&self) -> Result<Client, crate::client::Error> {
        self.cell
            .get_or_try_init(|| async {
                let endpoints: Vec<String> = self
                    .transport
                    .addresses()
                    .into_iter()
                    .map(|(_, a)| a)
                    .collect();
                let opts = ClientOptions {
                    system: true,
                    deadline: Duration::from_secs(5),
                    ..Default::default()
                };
                Client::connect(&endpoints, opts).await
            })
            .await
            .cloned()
    }
}

/// Asks every local peer for its descriptor and leader. Regions that do not answer (being
/// removed, or the node stopping) are left out.
pub async fn describe_regions(router: &Router) -> Vec<RegionInfo> {
    let mut waits = Vec::new();
    for id in router.region_ids() {
        let (tx, rx) = oneshot::channel();
        if router.send(id, PeerMsg::Describe(tx)).is_ok() {
            waits.push(rx);
        }
    }
    let mut out = Vec::with_capacity(waits.len());
    for rx in waits {
        if let Ok(Ok(info)) = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await {
            out.push(RegionInfo {
                region: Some(info.region),
                leader: info.leader,
                applied_index: info.applied_index,
            });
        }
    }
    out.sort_by(|a, b| {
        let ka = a.region.as_ref().map(|r| &r.start_key);
        let kb = b.region.as_ref().map(|r| &r.start_key);
        ka.cmp(&kb)
    });
    out
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn regions(
        &self,
        _request: Request<RegionsRequest>,
    ) -> Result<Response<RegionsResponse>, Status> {
        let regions = describe_regions(&self.router).await;
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
        Ok(Response::new(RegionsResponse {
            cluster_id: self.cluster_id.0,
            node_id: self.node_id.0,
            regions,
            nodes,
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let client = self
            .placement
            .get()
            .await
            .map_err(|e| Status::unavailable(format!("placement not reachable: {e}")))?;
        let nodes = crate::placement::list_nodes(&client, self.down_after)
            .await
            .map_err(|e| Status::unavailable(format!("placement read failed: {e}")))?;
        Ok(Response::new(ListNodesResponse { nodes }))
    }
}
