//! `proto::Node`: what this node knows locally — its regions, their leaders, and the
//! addresses of the other nodes. Clients use it to fill their region cache.

use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::ids::{ClusterId, NodeId};
use crate::proto::node_server;
use crate::proto::{NodeAddress, RegionInfo, RegionsRequest, RegionsResponse};
use crate::raftstore::msg::PeerMsg;
use crate::raftstore::router::Router;
use crate::transport::Transport;

pub struct NodeService {
    cluster_id: ClusterId,
    node_id: NodeId,
    router: Router,
    transport: Transport,
}

impl NodeService {
    pub fn new(
        cluster_id: ClusterId,
        node_id: NodeId,
        router: Router,
        transport: Transport,
    ) -> Self {
        Self {
            cluster_id,
            node_id,
            router,
            transport,
        }
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
}
