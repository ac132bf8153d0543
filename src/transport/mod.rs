//! Raft messages between nodes: one long-lived gRPC stream per remote node, shared by every
//! region (DESIGN.md decision 6).
//!
//! - Workers hold what they send in an [`Outbox`] and flush it at fixed points of their
//!   round; a flush never blocks and puts each node's messages on its bounded queue as one
//!   unit. One tokio task per remote node drains the queue and coalesces whatever is there
//!   into one `RaftMessageBatch` per stream write.
//! - A full queue (slow or dead node) drops the messages and reports the peers unreachable:
//!   raft retransmits, and other nodes' queues are unaffected.
//! - A broken stream reports the peers of its last batch unreachable and reconnects with
//!   exponential backoff.
//! - Snapshots go over their own streaming RPC in chunks, on the same HTTP/2 connection.
//! - The receiving side ([`service`]) validates every batch and drops, with a counted reason,
//!   anything that does not decode or is not for this cluster, node or a known region.

// Only the chaos tests' builds set link faults; elsewhere the parser is unused.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub mod fault;
pub mod service;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use protobuf::Message as _;
use raft::eraftpb::{self, MessageType};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use crate::ids::{ClusterId, NodeId, PeerId, RegionId};
use crate::proto::raft_transport_client::RaftTransportClient;
use crate::proto::{self, RaftMessage, RaftMessageBatch, SnapshotChunk};
use crate::raftstore::msg::PeerMsg;
use crate::raftstore::router::Router;

/// Batches (each one worker flush's messages for the node) queued for one node before new
/// ones are dropped.
const NODE_QUEUE_BATCHES: usize = 1024;
/// Upper bounds of one coalesced batch.
const MAX_BATCH_MSGS: usize = 4096;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Snapshot data per chunk.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;
/// Largest gRPC message either side accepts.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 << 20;
/// A stream that cannot take a batch for this long is treated as broken.
const STREAM_SEND_TIMEOUT: Duration = Duration::from_secs(3);
/// A node that does not answer a round trip within this is treated as gone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a raft worker sends during one step of its round, held and grouped by node until
/// [`Outbox::flush`]: each node's queue then takes one push (one wake-up of its stream task)
/// per flush, not one per message. With many regions each sending a message or two per
/// round, this is what keeps the per-region cost of a round from growing with the count
/// of stream wake-ups.
pub struct Outbox {
    transport: Transport,
    held: HashMap<NodeId, Vec<RaftMessage>>,
}

impl Outbox {
    pub fn new(transport: Transport) -> Self {
        Self {
            transport,
            held: HashMap::new(),
        }
    }

    /// Holds one raft message of `region` from peer `from` (a snapshot goes at once, on its
    /// own stream).
    pub fn send(&mut self, region: &proto::Region, from: PeerId, m: eraftpb::Message) {
        if let Some((node, rm)) = self.transport.envelope(region, from, m) {
            self.held.entry(node).or_default().push(rm);
        }
    }

    /// Holds a tombstone for `to`, no longer in `region`.
    pub fn send_tombstone(&mut self, region: &proto::Region, from: PeerId, to: proto::Peer) {
        let (node, rm) = Transport::tombstone(region, from, to);
        self.held.entry(node).or_default().push(rm);
    }

    /// Queues everything held, one push per node, cut to the batch limits.
    pub fn flush(&mut self) {
        for (node, held) in self.held.iter_mut() {
            for batch in cut_batches(std::mem::take(held)) {
                self.transport.push(*node, batch);
            }
        }
    }
}

/// Cuts messages, in order, into batches of at most [`MAX_BATCH_MSGS`] messages and
/// [`MAX_BATCH_BYTES`] bytes (a single bigger message goes alone).
fn cut_batches(mut msgs: Vec<RaftMessage>) -> Vec<Vec<RaftMessage>> {
    let mut batches = Vec::new();
    while !msgs.is_empty() {
        let (mut cut, mut size) = (0, 0);
        for m in &msgs {
            if cut == MAX_BATCH_MSGS || (cut > 0 && size + m.message.len() > MAX_BATCH_BYTES) {
                break;
            }
            size += m.message.len();
            cut += 1;
        }
        let rest = msgs.split_off(cut);
        batches.push(msgs);
        msgs = rest;
    }
    batches
}

#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    cluster_id: ClusterId,
    node_id: NodeId,
    addrs: DashMap<NodeId, String>,
    queues: DashMap<NodeId, mpsc::Sender<Vec<RaftMessage>>>,
    channels: DashMap<NodeId, Channel>,
    router: Router,
    rt: tokio::runtime::Handle,
    /// Snapshot bytes delivered to other nodes since start.
    snapshot_bytes: std::sync::atomic::AtomicU64,
}

fn dropped(reason: &'static str) {
    metrics::counter!("tessera_raft_messages_dropped_total", "reason" => reason).increment(1);
}

impl Transport {
    pub fn new(
        cluster_id: ClusterId,
        node_id: NodeId,
        router: Router,
        rt: tokio::runtime::Handle,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                cluster_id,
                node_id,
                addrs: DashMap::new(),
                queues: DashMap::new(),
                channels: DashMap::new(),
                router,
                rt,
                snapshot_bytes: Default::default(),
            }),
        }
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

    /// Encodes one raft message of `region` from peer `from` for the wire. A snapshot is
    /// handed to its own stream at once and gives `None`, as does a message to a peer the
    /// region does not list.
    fn envelope(
        &self,
        region: &proto::Region,
        from: PeerId,
        m: eraftpb::Message,
    ) -> Option<(NodeId, RaftMessage)> {
        let Some(to) = region.peers.iter().find(|p| p.id == m.to).cloned() else {
            dropped("unknown_peer");
            return None;
        };
        let from_peer = region.peers.iter().find(|p| p.id == from.0).cloned();
        let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
        let Ok(bytes) = m.write_to_bytes() else {
            dropped("encode");
            return None;
        };
        // Heartbeats carry the range, so a node that lacks the peer can create it.
        let with_range = m.get_msg_type() == MessageType::MsgHeartbeat;
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
        };
        if is_snapshot {
            self.send_snapshot(rm);
            return None;
        }
        Some((NodeId(to.node_id), rm))
    }

    /// The message telling `to` (no longer in `region`, whose epoch records its removal)
    /// that it was removed, so its node destroys it.
    fn tombstone(region: &proto::Region, from: PeerId, to: proto::Peer) -> (NodeId, RaftMessage) {
        let rm = RaftMessage {
            region_id: region.id,
            from_peer: region.peers.iter().find(|p| p.id == from.0).cloned(),
            to_peer: Some(to),
            region_epoch: region.epoch,
            tombstone: true,
            ..Default::default()
        };
        (NodeId(to.node_id), rm)
    }

    /// Queues messages for `node` as one unit. Never blocks: a full queue drops them and
    /// reports their peers unreachable, so raft retransmits later.
    fn push(&self, node: NodeId, msgs: Vec<RaftMessage>) {
        let n = msgs.len() as u64;
        match self.queue(node).try_send(msgs) {
            Ok(()) => metrics::counter!("tessera_raft_messages_sent_total").increment(n),
            Err(mpsc::error::TrySendError::Full(msgs)) => {
                metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "queue_full")
                    .increment(n);
                self.report_unreachable(&msgs);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::counter!("tessera_raft_messages_dropped_total", "reason" => "closed")
                    .increment(n);
            }
        }
    }

    fn queue(&self, node: NodeId) -> mpsc::Sender<Vec<RaftMessage>> {
        if let Some(q) = self.inner.queues.get(&node) {
            return q.clone();
        }
        self.inner
            .queues
            .entry(node)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(NODE_QUEUE_BATCHES);
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
                let _ = self
                    .inner
                    .router
                    .send(RegionId(m.region_id), PeerMsg::Unreachable(PeerId(to)));
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
            let ch = Endpoint::from_shared(format!("http://{addr}"))
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

    async fn channel(&self, node: NodeId) -> Result<Channel, String> {
        if let Some(c) = self.inner.channels.get(&node) {
            return Ok(c.clone());
        }
        let addr = self
            .address(node)
            .ok_or_else(|| format!("no address for node {node}"))?;
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
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
        Ok(ch)
    }

    fn client(ch: Channel) -> RaftTransportClient<Channel> {
        RaftTransportClient::new(ch)
            .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
    }

    /// Drains one node's queue into a single long-lived stream, reconnecting on failure.
    async fn run_node_stream(self, node: NodeId, mut rx: mpsc::Receiver<Vec<RaftMessage>>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let Some(first) = rx.recv().await else {
                return;
            };
            let ch = match self.channel(node).await {
                Ok(ch) => ch,
                Err(e) => {
                    tracing::debug!(%node, error = %e, "cannot connect");
                    let mut lost = first;
                    while let Ok(m) = rx.try_recv() {
                        lost.extend(m);
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
                let mut size: usize = first.iter().map(|m| m.message.len()).sum();
                let mut msgs = first;
                while msgs.len() < MAX_BATCH_MSGS && size < MAX_BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(more) => {
                            size += more.iter().map(|m| m.message.len()).sum::<usize>();
                            msgs.extend(more);
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

    /// `node` refuses connections (a killed process): wake
    /// the sleeping regions it leads so they elect now rather than when placement shows
    /// the node down. A false alarm only wakes regions, which fall asleep again.
    fn wake_regions_led_by(&self, node: NodeId) {
        for w in 0..self.inner.router.worker_count() {
            self.inner
                .router
                .send_worker(w, crate::raftstore::msg::WorkerMsg::NodeDown(node.0));
        }
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
            let _ = t.inner.router.send(
                region,
                PeerMsg::SnapshotStatus {
                    to: PeerId(to.id),
                    delivered,
                },
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: u64, len: usize) -> RaftMessage {
        RaftMessage {
            region_id: id,
            message: vec![0; len],
            ..Default::default()
        }
    }

    fn ids(batches: &[Vec<RaftMessage>]) -> Vec<u64> {
        batches.iter().flatten().map(|m| m.region_id).collect()
    }

    #[test]
    fn a_flush_is_cut_to_the_batch_limits_in_order() {
        assert!(cut_batches(Vec::new()).is_empty());

        let many: Vec<_> = (0..MAX_BATCH_MSGS as u64 * 2 + 3)
            .map(|i| msg(i, 1))
            .collect();
        let batches = cut_batches(many);
        let lens: Vec<_> = batches.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![MAX_BATCH_MSGS, MAX_BATCH_MSGS, 3]);
        assert_eq!(
            ids(&batches),
            (0..MAX_BATCH_MSGS as u64 * 2 + 3).collect::<Vec<_>>()
        );

        // By bytes: three messages of 40% of the limit make batches of two and one; a
        // message above the limit travels alone rather than being lost.
        let part = MAX_BATCH_BYTES * 2 / 5;
        let batches = cut_batches(vec![
            msg(1, part),
            msg(2, part),
            msg(3, part),
            msg(4, MAX_BATCH_BYTES + 1),
            msg(5, 1),
        ]);
        let lens: Vec<_> = batches.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![2, 1, 1, 1]);
        assert_eq!(ids(&batches), vec![1, 2, 3, 4, 5]);
        for b in &batches {
            let bytes: usize = b.iter().map(|m| m.message.len()).sum();
            assert!(b.len() == 1 || bytes <= MAX_BATCH_BYTES);
        }
    }
}
