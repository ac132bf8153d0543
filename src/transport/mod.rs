//! Raft messages between nodes: one long-lived gRPC stream per remote node, shared by every
//! region (docs/architecture.md, "Transport").
//!
//! - Workers call [`Transport::send`] from their threads; it never blocks. Each remote node
//!   has a bounded queue drained by one tokio task that coalesces whatever is queued into one
//!   `RaftMessageBatch` per stream write.
//! - A full queue (slow or dead node) drops the message and reports the peer unreachable:
//!   raft retransmits, and other nodes' queues are unaffected.
//! - A broken stream drops the batch it was sending (its peers are reported unreachable
//!   when the batch comes back unsent), probes the node, and reconnects with exponential
//!   backoff.
//! - Snapshots go over their own streaming RPC in chunks, on the same HTTP/2 connection.
//! - The receiving side (`server::raft_service`, which routes into the raft store) validates
//!   every batch and drops, with a counted reason, anything that does not decode or is not
//!   for this cluster and node (messages for a region not hosted yet are kept briefly).
//! - What happened to a delivery (unreachable peer, snapshot status, node down) is reported
//!   through [`DeliveryReports`], so the transport does not depend on the raft store that
//!   sends through it.
//!
//! Invariants:
//! - `send` never blocks or waits on the network; a node's queue holds at most 16,384
//!   messages, a batch at most 4,096 messages or about 8 MiB;
//! - messages to one node leave in the order they were queued, on one stream at a time;
//!   some may be lost, none are reordered on a stream (snapshots travel apart and are not
//!   ordered with them);
//! - a message whose target is not a peer of the region it names is dropped, never sent;
//! - the transport reaches the raft store only through [`DeliveryReports`].

// Only the chaos tests' builds set link faults; elsewhere the parser is unused.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub mod fault;
pub mod tls;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use protobuf::Message as _;
use raft::eraftpb::{self, MessageType};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::ids::{ClusterId, NodeId, PeerId, RegionId};
use crate::proto::raft_transport_client::RaftTransportClient;
use crate::proto::{self, RaftMessage, RaftMessageBatch, SnapshotChunk};

/// Messages queued for one node before new ones are dropped.
const NODE_QUEUE_LEN: usize = 16_384;
/// Upper bounds of one coalesced batch.
const MAX_BATCH_MSGS: usize = 4096;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Snapshot data per chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
pub use tessera_api::limits::MAX_GRPC_MESSAGE_BYTES;
/// A stream that cannot take a batch for this long is treated as broken.
const STREAM_SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// A node that does not answer a round trip within this is treated as gone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Messages that may reach a node which does not host the region's peer yet, or does not
/// know the sender: a leader's heartbeat and (pre-)vote requests. They carry the region's
/// range, and the receiver learns their sender and may create the peer (service.rs says
/// when).
pub(crate) fn introduces_peer(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::MsgHeartbeat | MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
    )
}

/// What the transport tells the regions about delivery. Implemented by the node's router;
/// a trait so that the transport, which the raft store uses to send, does not depend on it.
pub trait DeliveryReports: Send + Sync + 'static {
    /// A message from `region`'s peer to peer `to` could not be delivered.
    fn unreachable(&self, region: RegionId, to: PeerId);
    /// A snapshot of `region` to peer `to` was delivered, or failed.
    fn snapshot_status(&self, region: RegionId, to: PeerId, delivered: bool);
    /// `node` refuses connections or does not answer a probe.
    fn node_down(&self, node: NodeId);
}

#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    cluster_id: ClusterId,
    node_id: NodeId,
    addrs: DashMap<NodeId, String>,
    queues: DashMap<NodeId, mpsc::Sender<RaftMessage>>,
    channels: DashMap<NodeId, Channel>,
    reports: Arc<dyn DeliveryReports>,
    rt: tokio::runtime::Handle,
    /// Snapshot bytes delivered to other nodes since start.
    snapshot_bytes: std::sync::atomic::AtomicU64,
    /// This node's certificates (`None`: plaintext).
    tls: Option<Arc<tls::NodeTls>>,
}

fn dropped(reason: &'static str) {
    metrics::counter!("tessera_raft_messages_dropped_total", "reason" => reason).increment(1);
}

impl Transport {
    pub fn new(
        cluster_id: ClusterId,
        node_id: NodeId,
        reports: Arc<dyn DeliveryReports>,
        rt: tokio::runtime::Handle,
        tls: Option<Arc<tls::NodeTls>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cluster_id,
                node_id,
                addrs: DashMap::new(),
                queues: DashMap::new(),
                channels: DashMap::new(),
                reports,
                rt,
                snapshot_bytes: Default::default(),
                tls,
            }),
        }
    }

    /// How this node speaks TLS to others, if it does: for every client of the cluster the
    /// node makes (placement, the oracle), not only raft traffic. Current as of the last
    /// reload of the certificates.
    pub fn tls(&self) -> Option<crate::client::TlsOptions> {
        self.inner.tls.as_ref().map(|t| t.client())
    }

    /// This node's certificates, if it speaks TLS.
    pub fn node_tls(&self) -> Option<&Arc<tls::NodeTls>> {
        self.inner.tls.as_ref()
    }

    /// Reads the certificates again (SIGHUP, or a file changed). When they take effect the
    /// cached connections to other nodes are dropped, so that the next ones present the new
    /// certificate; their queues reconnect by themselves.
    pub fn reload_tls(&self) -> Result<(), String> {
        let Some(tls) = &self.inner.tls else {
            return Ok(());
        };
        tls.reload()?;
        self.inner.channels.clear();
        Ok(())
    }

    /// Snapshot bytes this node delivered to others since it started.
    pub fn snapshot_bytes_sent(&self) -> u64 {
        self.inner
            .snapshot_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_address(&self, node: NodeId, addr: String) {
        if self.inner.addrs.get(&node).is_some_and(|a| *a == addr) {
            return;
        }
        self.inner.addrs.insert(node, addr);
        // A new address needs a new connection.
        self.inner.channels.remove(&node);
    }

    pub fn address(&self, node: NodeId) -> Option<String> {
        self.inner.addrs.get(&node).map(|a| a.clone())
    }

    pub fn addresses(&self) -> Vec<(NodeId, String)> {
        self.inner
            .addrs
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect()
    }

    /// Queues one raft message of `region` from peer `from`. Never blocks.
    pub fn send(&self, region: &proto::Region, from: PeerId, m: eraftpb::Message) {
        let Some(to) = region.peers.iter().find(|p| p.id == m.to).cloned() else {
            return dropped("unknown_peer");
        };
        let from_peer = region.peers.iter().find(|p| p.id == from.0).cloned();
        let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
        let bytes = match m.write_to_bytes() {
            Ok(b) => b,
            Err(_) => return dropped("encode"),
        };
        let with_range = introduces_peer(m.get_msg_type());
        let rm = RaftMessage {
            region_id: region.id,
            from_peer,
            to_peer: Some(to),
            region_epoch: region.epoch,
            message: bytes,
            start_key: if with_range {
                region.start_key.clone()
            } else {
                Vec::new()
            },
            end_key: if with_range {
                region.end_key.clone()
            } else {
                Vec::new()
            },
            tombstone: false,
            wake_up: false,
        };
        if is_snapshot {
            self.send_snapshot(rm);
            return;
        }
        let node = NodeId(to.node_id);
        let queue = self.queue(node);
        match queue.try_send(rm) {
            Ok(()) => metrics::counter!("tessera_raft_messages_sent_total").increment(1),
            Err(mpsc::error::TrySendError::Full(rm)) => {
                dropped("queue_full");
                self.report_unreachable(&[rm]);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => dropped("closed"),
        }
    }

    /// Tells `to` (no longer in `region`, whose epoch records its removal) that it was
    /// removed, so its node destroys it.
    pub fn send_tombstone(&self, region: &proto::Region, from: PeerId, to: proto::Peer) {
        self.send_control(region, from, to, |m| m.tombstone = true);
    }

    /// Asks `to`'s node to wake its peer of `region` (see `RaftMessage.wake_up`).
    pub fn send_wake_up(&self, region: &proto::Region, from: PeerId, to: proto::Peer) {
        self.send_control(region, from, to, |m| m.wake_up = true);
    }

    /// Sends a message of tessera's own (no raft message inside), marked by `mark`.
    fn send_control(
        &self,
        region: &proto::Region,
        from: PeerId,
        to: proto::Peer,
        mark: impl FnOnce(&mut RaftMessage),
    ) {
        let mut rm = RaftMessage {
            region_id: region.id,
            from_peer: region.peers.iter().find(|p| p.id == from.0).cloned(),
            to_peer: Some(to),
            region_epoch: region.epoch,
            ..Default::default()
        };
        mark(&mut rm);
        if self.queue(NodeId(to.node_id)).try_send(rm).is_err() {
            dropped("queue_full");
        }
    }

    fn queue(&self, node: NodeId) -> mpsc::Sender<RaftMessage> {
        if let Some(q) = self.inner.queues.get(&node) {
            return q.clone();
        }
        self.inner
            .queues
            .entry(node)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(NODE_QUEUE_LEN);
                let t = self.clone();
                self.inner
                    .rt
                    .spawn(async move { t.run_node_stream(node, rx).await });
                tx
            })
            .clone()
    }

    fn report_unreachable(&self, msgs: &[RaftMessage]) {
        let mut seen = HashSet::new();
        for m in msgs {
            let to = m.to_peer.as_ref().map_or(0, |p| p.id);
            if seen.insert((m.region_id, to)) {
                self.inner
                    .reports
                    .unreachable(RegionId(m.region_id), PeerId(to));
            }
        }
    }

    /// Whether `node` answers a round trip now: a fresh connection and an empty raft
    /// stream, within [`PROBE_TIMEOUT`]. A killed process refuses the connection; a hung
    /// one (SIGSTOP, stuck runtime) accepts it in the kernel but never answers; a busy one
    /// answers, since the RPC is served by its network threads, not its raft workers. Used
    /// before acting on "node down" from placement (which a loaded cluster can report
    /// falsely) and after a stream to the node broke.
    pub async fn probe(&self, node: NodeId) -> bool {
        let Some(addr) = self.address(node) else {
            return false;
        };
        if fault::link(node).is_some_and(|f| f.drop_all) {
            return false;
        }
        let batch = RaftMessageBatch {
            cluster_id: self.inner.cluster_id.0,
            from_node: self.inner.node_id.0,
            to_node: node.0,
            messages: Vec::new(),
        };
        let round_trip = async {
            let ch = crate::client::tls::endpoint(&addr, self.tls().as_ref())
                .ok()?
                .connect_timeout(PROBE_TIMEOUT)
                .connect()
                .await
                .ok()?;
            Self::client(ch)
                .raft(futures::stream::iter([batch]))
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, round_trip).await,
            Ok(Some(_))
        )
    }

    /// The cached channel to `node` (made on first use), for raft traffic and admin calls.
    pub async fn channel(&self, node: NodeId) -> Result<Channel, String> {
        if let Some(c) = self.inner.channels.get(&node) {
            return Ok(c.clone());
        }
        let addr = self
            .address(node)
            .ok_or_else(|| format!("no address for node {node}"))?;
        let generation = self.tls_generation();
        let ch = crate::client::tls::endpoint(&addr, self.tls().as_ref())?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(1))
            // Idle too: when every region shared with that node sleeps, a hung (not dead)
            // node is noticed only by a missed ping; the probe that follows fails, and the
            // regions it led wake and elect (see run_node_stream).
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        self.inner.channels.insert(node, ch.clone());
        // Certificates reloaded while this connected (a reload bumps the generation, then
        // clears the cache): keep no channel with the old ones.
        if self.tls_generation() != generation {
            self.inner.channels.remove(&node);
        }
        Ok(ch)
    }

    fn tls_generation(&self) -> u64 {
        self.inner.tls.as_ref().map_or(0, |t| t.generation())
    }

    fn client(ch: Channel) -> RaftTransportClient<Channel> {
        RaftTransportClient::new(ch)
            .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
    }

    /// Drains one node's queue into a single long-lived stream, reconnecting on failure.
    async fn run_node_stream(self, node: NodeId, mut rx: mpsc::Receiver<RaftMessage>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(first) = rx.recv().await else {
                return;
            };
            let ch = match self.channel(node).await {
                Ok(ch) => ch,
                Err(e) => {
                    tracing::debug!(%node, error = %e, "cannot connect");
                    let mut lost = vec![first];
                    while let Ok(m) = rx.try_recv() {
                        lost.push(m);
                    }
                    metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "unreachable")
                        .increment(lost.len() as u64);
                    self.report_unreachable(&lost);
                    self.wake_regions_led_by(node);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            let (tx, srx) = mpsc::channel::<RaftMessageBatch>(4);
            let mut client = Self::client(ch);
            let mut call = tokio::spawn(async move {
                client
                    .raft(tokio_stream::wrappers::ReceiverStream::new(srx))
                    .await
            });
            let mut next = Some(first);
            loop {
                let first = match next.take() {
                    Some(m) => m,
                    None => tokio::select! {
                        m = rx.recv() => match m {
                            Some(m) => m,
                            None => {
                                call.abort();
                                return;
                            }
                        },
                        res = &mut call => {
                            tracing::debug!(%node, ?res, "raft stream ended while idle");
                            break;
                        }
                    },
                };
                let mut size = first.message.len();
                let mut msgs = vec![first];
                while msgs.len() < MAX_BATCH_MSGS && size < MAX_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(m) => {
                            size += m.message.len();
                            msgs.push(m);
                        }
                        Err(_) => break,
                    }
                }
                if let Some(f) = fault::link(node) {
                    let before = msgs.len();
                    msgs.retain(|_| !f.lose());
                    metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "injected_fault")
                        .increment((before - msgs.len()) as u64);
                    tokio::time::sleep(f.delay()).await;
                    if msgs.is_empty() {
                        continue;
                    }
                }
                let n = msgs.len();
                let batch = RaftMessageBatch {
                    cluster_id: self.inner.cluster_id.0,
                    from_node: self.inner.node_id.0,
                    to_node: node.0,
                    messages: msgs,
                };
                // A stream that neither takes the batch nor fails within the timeout is dead
                // (peer paused or gone without closing the connection).
                let sent = tokio::select! {
                    r = tokio::time::timeout(STREAM_SEND_TIMEOUT, tx.send(batch)) => match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(mpsc::error::SendError(b))) => Err(b.messages),
                        // Slow, or gone: the probe after the loop tells which.
                        Err(_) => Err(Vec::new()),
                    },
                    res = &mut call => {
                        tracing::debug!(%node, ?res, "raft stream ended while sending");
                        Err(Vec::new())
                    }
                };
                if let Err(lost) = sent {
                    metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "stream_broken")
                        .increment(n as u64);
                    self.report_unreachable(&lost);
                    break;
                }
                backoff = Duration::from_millis(50);
                metrics::histogram!("tessera_transport_batch_messages").record(n as f64);
            }
            call.abort();
            self.inner.channels.remove(&node);
            // A broken or stalled stream alone proves little (a busy peer misses keep-alive
            // pings and drains slowly); an unanswered round trip does: the process is gone
            // or hung, and the sleeping regions it led must elect without it.
            if !self.probe(node).await {
                self.wake_regions_led_by(node);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// `node` refuses connections (a killed process) or does not answer a probe (a hung
    /// one): wake the sleeping regions it leads so they elect now rather than when placement
    /// shows the node down. A false alarm costs at most a leader change of an idle region
    /// (docs/architecture.md, "Hibernation").
    fn wake_regions_led_by(&self, node: NodeId) {
        self.inner.reports.node_down(node);
    }

    fn send_snapshot(&self, mut rm: RaftMessage) {
        let Some(to) = rm.to_peer else {
            return dropped("unknown_peer");
        };
        let t = self.clone();
        self.inner.rt.spawn(async move {
            let region = RegionId(rm.region_id);
            let node = NodeId(to.node_id);
            // Split the snapshot's data off the raft message: the envelope carries the
            // message without it, the chunks carry the bytes.
            let (envelope_msg, data) = match eraftpb::Message::parse_from_bytes(&rm.message) {
                Ok(mut m) => {
                    let data = m.get_snapshot().get_data().to_vec();
                    m.mut_snapshot().set_data(Vec::new().into());
                    match m.write_to_bytes() {
                        Ok(b) => (b, data),
                        Err(_) => return dropped("encode"),
                    }
                }
                Err(_) => return dropped("encode"),
            };
            rm.message = envelope_msg;
            let bytes = data.len();
            let mut chunks = Vec::with_capacity(bytes / SNAPSHOT_CHUNK_BYTES + 1);
            chunks.push(SnapshotChunk {
                envelope: Some(RaftMessageBatch {
                    cluster_id: t.inner.cluster_id.0,
                    from_node: t.inner.node_id.0,
                    to_node: node.0,
                    messages: vec![rm],
                }),
                data: Vec::new(),
            });
            for c in data.chunks(SNAPSHOT_CHUNK_BYTES) {
                chunks.push(SnapshotChunk {
                    envelope: None,
                    data: c.to_vec(),
                });
            }
            let fault = fault::link(node);
            if let Some(f) = &fault {
                tokio::time::sleep(f.delay()).await;
            }
            let cut_off = fault.is_some_and(|f| f.drop_all);
            let delivered = match t.channel(node).await {
                _ if cut_off => false,
                Ok(ch) => Self::client(ch)
                    .snapshot(futures::stream::iter(chunks))
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            if delivered {
                metrics::counter!("tessera_snapshots_sent_total").increment(1);
                metrics::counter!("tessera_snapshot_bytes_sent_total").increment(bytes as u64);
                t.inner
                    .snapshot_bytes
                    .fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
            } else {
                metrics::counter!("tessera_snapshots_failed_total").increment(1);
            }
            t.inner
                .reports
                .snapshot_status(region, PeerId(to.id), delivered);
        });
    }
}
