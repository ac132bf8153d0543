//! The receiving side of the transport: the `RaftTransport` gRPC service, which hands
//! validated messages to the raft store's router (and creates peers the cluster added here).
//!
//! Nothing from the network is trusted. A batch for another cluster or node, a message that
//! does not decode, or a message whose peers do not match its envelope is dropped and
//! counted under `tessera_raft_messages_dropped_total{reason}`; a message for a region this
//! node does not host is kept a few seconds for a peer about to start here, or dropped and
//! counted. The stream and the node carry on.
//!
//! Invariants:
//! - nothing received causes a panic; a message reaches a region only if its batch names
//!   this cluster and node, its target peer is on this node, its region id is not 0 and its
//!   raft `from`/`to` match the envelope;
//! - only a leader's heartbeat or a (pre-)vote request creates a peer here, and only where
//!   no local region overlaps its range (`StoreCtx::maybe_create_peer`);
//! - a snapshot is taken up to [`MAX_SNAPSHOT_BYTES`]; a longer stream is refused, not
//!   buffered;
//! - open streams end when the node stops.

use protobuf::Message as _;
use raft::eraftpb;
use tonic::{Request, Response, Status, Streaming};

use crate::ids::{ClusterId, NodeId, PeerId, RegionId};
use crate::proto::raft_transport_server::RaftTransport;
use crate::proto::{Done, RaftMessage, RaftMessageBatch, SnapshotChunk};
use crate::raftstore::msg::PeerMsg;
use crate::raftstore::router::{RouteError, Router};

/// Largest snapshot accepted; a stream that sends more is refused, not buffered.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

pub struct RaftService {
    cluster_id: ClusterId,
    node_id: NodeId,
    router: Router,
    /// Flips to true when the node stops: open streams end, so peers reconnect to whatever
    /// serves this address next instead of talking into a stopped node.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The node's control path for messages to regions it does not host.
    store: Option<crate::raftstore::store::StoreCtx>,
    /// TLS is on: only peers with a certificate of the cluster CA may stream.
    tls: Option<std::sync::Arc<crate::transport::tls::NodeTls>>,
}

fn dropped(reason: &'static str, n: u64) {
    metrics::counter!("tessera_raft_messages_dropped_total", "reason" => reason).increment(n);
}

impl RaftService {
    pub fn new(
        cluster_id: ClusterId,
        node_id: NodeId,
        router: Router,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            cluster_id,
            node_id,
            router,
            stopping,
            store: None,
            tls: None,
        }
    }

    /// On a TLS node: raft and snapshot streams only from callers with a certificate of the
    /// cluster CA.
    pub fn peers_only(
        mut self,
        tls: Option<std::sync::Arc<crate::transport::tls::NodeTls>>,
    ) -> Self {
        self.tls = tls;
        self
    }

    /// Lets heartbeats and vote requests of regions this node lacks create their peers here.
    pub fn with_store(mut self, store: crate::raftstore::store::StoreCtx) -> Self {
        self.store = Some(store);
        self
    }

    fn check_envelope(&self, b: &RaftMessageBatch) -> bool {
        if b.cluster_id != self.cluster_id.0 {
            dropped("cluster_mismatch", b.messages.len() as u64);
            return false;
        }
        if b.to_node != self.node_id.0 {
            dropped("wrong_node", b.messages.len() as u64);
            return false;
        }
        true
    }

    fn decode(&self, m: &RaftMessage) -> Option<eraftpb::Message> {
        let Some(to) = m.to_peer.as_ref() else {
            dropped("malformed", 1);
            return None;
        };
        if to.node_id != self.node_id.0 || m.region_id == 0 {
            dropped("malformed", 1);
            return None;
        }
        let msg = match eraftpb::Message::parse_from_bytes(&m.message) {
            Ok(msg) => msg,
            Err(_) => {
                dropped("decode", 1);
                return None;
            }
        };
        if msg.to != to.id || m.from_peer.as_ref().is_none_or(|f| f.id != msg.from) {
            dropped("malformed", 1);
            return None;
        }
        Some(msg)
    }

    fn route(&self, m: &RaftMessage, msg: eraftpb::Message) {
        let region = m.region_id;
        let introducing = crate::transport::introduces_peer(msg.get_msg_type());
        if let Some(store) = self.store.as_ref().filter(|_| introducing) {
            // Senders of heartbeats (leaders) and votes (perhaps a peer removed while its
            // node was down, which must be told so): the peer may need to answer one not in
            // its list.
            if let Some(from) = m.from_peer {
                store.learn_peer(from);
            }
            // The control path: a heartbeat from a region's leader proves this node holds
            // one of its peers (just added); create it unless a local region overlaps.
            // A vote request does too, and it matters when a region has no leader to send
            // heartbeats: a split region whose peer here never came to be (this node's
            // parent region skipped the split by taking a snapshot past it) while its third
            // node is down would otherwise never elect. The empty peer has never
            // acknowledged an entry of the region, so its vote is a new member's; with a
            // local region still covering the range (the split not yet applied here)
            // nothing is created and the split creates the peer when it applies.
            if let Some(to) = m
                .to_peer
                .filter(|_| !self.router.contains(RegionId(region)))
            {
                store.maybe_create_peer(
                    &self.router,
                    RegionId(region),
                    to,
                    m.region_epoch.unwrap_or_default(),
                    &m.start_key,
                    &m.end_key,
                );
            }
        }
        match self
            .router
            .send(RegionId(region), PeerMsg::Raft(Box::new(msg)))
        {
            Ok(()) => metrics::counter!("tessera_raft_messages_received_total").increment(1),
            // The control path: a peer that would prove it belongs here (added by a
            // membership change, created by a split) is created by the region lifecycle code.
            Err(RouteError::RegionNotFound(msg)) => {
                if self.router.stash(RegionId(region), msg) {
                    metrics::counter!("tessera_raft_messages_stashed_total").increment(1);
                } else {
                    dropped("region_not_found", 1);
                }
            }
            Err(RouteError::Closed(_)) | Err(RouteError::Busy(_)) => dropped("closed", 1),
        }
    }

    pub fn handle_batch(&self, b: RaftMessageBatch) {
        if !self.check_envelope(&b) {
            return;
        }
        for m in &b.messages {
            if m.tombstone {
                self.tombstone(m);
                continue;
            }
            if m.wake_up {
                // Best effort: a region this node does not host has nobody to wake.
                if self
                    .router
                    .send(RegionId(m.region_id), PeerMsg::Wake)
                    .is_err()
                {
                    dropped("region_not_found", 1);
                }
                continue;
            }
            if let Some(msg) = self.decode(m) {
                self.route(m, msg);
            }
        }
    }

    fn tombstone(&self, m: &RaftMessage) {
        let Some(to) = m.to_peer.filter(|t| t.node_id == self.node_id.0) else {
            dropped("malformed", 1);
            return;
        };
        let msg = PeerMsg::Tombstone {
            peer: PeerId(to.id),
            epoch: m.region_epoch.unwrap_or_default(),
        };
        if self.router.send(RegionId(m.region_id), msg).is_err() {
            dropped("region_not_found", 1);
        }
    }
}

#[tonic::async_trait]
impl RaftTransport for RaftService {
    async fn raft(
        &self,
        request: Request<Streaming<RaftMessageBatch>>,
    ) -> Result<Response<Done>, Status> {
        if let Err(e) = super::require_peer(self.tls.as_ref(), &request, "raft traffic") {
            dropped("no_peer_certificate", 1);
            return Err(e);
        }
        let mut stream = request.into_inner();
        let mut stopping = self.stopping.clone();
        loop {
            let next = tokio::select! {
                m = stream.message() => m,
                _ = stopping.wait_for(|s| *s) => {
                    return Err(Status::unavailable("node is stopping"));
                }
            };
            match next {
                Ok(Some(batch)) => self.handle_batch(batch),
                Ok(None) => return Ok(Response::new(Done {})),
                Err(status) => {
                    dropped("stream_error", 1);
                    return Err(status);
                }
            }
        }
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Done>, Status> {
        if let Err(e) = super::require_peer(self.tls.as_ref(), &request, "a snapshot") {
            dropped("no_peer_certificate", 1);
            return Err(e);
        }
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let envelope = first
            .envelope
            .ok_or_else(|| Status::invalid_argument("first snapshot chunk has no envelope"))?;
        if !self.check_envelope(&envelope) {
            return Err(Status::invalid_argument(
                "snapshot for another cluster or node",
            ));
        }
        let [m] = envelope.messages.as_slice() else {
            dropped("malformed", 1);
            return Err(Status::invalid_argument(
                "snapshot envelope must hold one message",
            ));
        };
        let Some(mut msg) = self.decode(m) else {
            return Err(Status::invalid_argument("snapshot message does not decode"));
        };
        if msg.get_msg_type() != eraftpb::MessageType::MsgSnapshot {
            dropped("malformed", 1);
            return Err(Status::invalid_argument("not a snapshot message"));
        }
        let mut data = first.data;
        while let Some(chunk) = stream.message().await? {
            if data.len() + chunk.data.len() > MAX_SNAPSHOT_BYTES {
                dropped("snapshot_too_large", 1);
                return Err(Status::resource_exhausted("snapshot too large"));
            }
            data.extend_from_slice(&chunk.data);
        }
        metrics::counter!("tessera_snapshots_received_total").increment(1);
        msg.mut_snapshot().set_data(data.into());
        self.route(m, msg);
        Ok(Response::new(Done {}))
    }
}

#[cfg(test)]
mod tests {
    //! Whatever arrives on the raft stream — arbitrary bytes or well-formed batches full of
    //! nonsense — is dropped or routed, never a panic.

    use super::*;
    use proptest::prelude::*;

    fn service() -> (
        RaftService,
        crossbeam_channel::Receiver<crate::raftstore::msg::WorkerMsg>,
    ) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let router = Router::new(vec![tx]);
        router.register(RegionId(1), 0);
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        (
            RaftService::new(ClusterId(1), NodeId(1), router, stopping),
            rx,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (svc, _rx) = service();
            if let Ok(batch) = <RaftMessageBatch as prost::Message>::decode(bytes.as_slice()) {
                svc.handle_batch(batch);
            }
        }

        #[test]
        fn nonsense_batches_are_dropped_or_routed(
            cluster in 0u64..3, to_node in 0u64..3, region in 0u64..3,
            to_peer in proptest::option::of((0u64..3, 0u64..3)),
            from_peer in proptest::option::of(0u64..3),
            message in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let (svc, rx) = service();
            let batch = RaftMessageBatch {
                cluster_id: cluster,
                from_node: 2,
                to_node,
                messages: vec![RaftMessage {
                    region_id: region,
                    from_peer: from_peer.map(|id| crate::proto::Peer { id, node_id: 2, role: 0 }),
                    to_peer: to_peer.map(|(id, node_id)| crate::proto::Peer { id, node_id, role: 0 }),
                    region_epoch: None,
                    message,
                    ..Default::default()
                }],
            };
            svc.handle_batch(batch);
            // Anything routed was addressed to this cluster, node and a hosted region.
            if rx.try_recv().is_ok() {
                prop_assert!(cluster == 1 && to_node == 1 && region == 1);
            }
        }
    }
}
