//! Messages that reach a raft worker, and the answers that go back.
//!
//! Everything a worker does arrives in its inbox as a [`WorkerMsg`]; async code (gRPC services,
//! the transport) never touches a peer directly. Answers cross back through
//! `tokio::sync::oneshot`.
//!
//! Invariants:
//! - async code never touches a peer: all work reaches a worker as a [`WorkerMsg`];
//! - each request carries its own reply channel and is answered at most once; a dropped
//!   reply means the outcome is unknown to the caller;
//! - `Refused`, `Internal`, `StaleWrite` and `Compacted` are final (nothing applied); the
//!   other kinds are fixed by a fresh route or a wait;
//! - [`RegionError::to_proto`] keeps the kind and the `Display` text of every error.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

use super::cmd::{ApplyResult, Command};
use crate::ids::{NodeId, PeerId, RegionId};
use crate::proto;

/// Why a region did not serve a request (docs/architecture.md, "Region errors"). Most kinds
/// are routing problems the client fixes by refreshing its region cache and retrying;
/// `Refused` and `Internal` are final. Converted to `proto::RegionError` at the service edge.
#[derive(Clone, Debug, PartialEq)]
pub enum RegionError {
    /// This peer is not the leader; `leader` is the one it knows of, if any.
    NotLeader {
        region: RegionId,
        leader: Option<proto::Peer>,
    },
    /// The request's epoch is stale; these regions now cover its range.
    EpochNotMatch {
        current: Vec<proto::Region>,
    },
    KeyNotInRegion {
        key: Vec<u8>,
        region: RegionId,
        start: Vec<u8>,
        end: Vec<u8>,
    },
    RegionNotFound(RegionId),
    /// The node cannot take the request now (its worker queue is full): retry later.
    ServerBusy {
        reason: String,
    },
    /// The request is refused as it stands and was not applied; a retry gets the same
    /// answer, so clients return it to the caller.
    Refused {
        reason: String,
    },
    /// The node failed serving it (a storage read error); nothing was applied.
    Internal {
        reason: String,
    },
    /// A delayed copy of a write the client has already been answered for: not applied.
    StaleWrite {
        client_id: u64,
        seq: u64,
    },
    /// A read below the revision history is compacted at.
    Compacted {
        compacted: u64,
    },
}

impl std::fmt::Display for RegionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegionError::NotLeader { region, leader } => match leader {
                Some(l) => write!(
                    f,
                    "not leader of {region}; leader is peer {} on node {}",
                    l.id, l.node_id
                ),
                None => write!(f, "not leader of {region}; leader unknown"),
            },
            RegionError::EpochNotMatch { current } => {
                write!(f, "stale region epoch; {} current region(s)", current.len())
            }
            RegionError::KeyNotInRegion { key, region, .. } => {
                write!(f, "key {key:02x?} is not in {region}")
            }
            RegionError::RegionNotFound(r) => write!(f, "{r} is not on this node"),
            RegionError::ServerBusy { reason } => write!(f, "server busy: {reason}"),
            RegionError::Refused { reason } => write!(f, "refused: {reason}"),
            RegionError::Internal { reason } => write!(f, "internal error: {reason}"),
            RegionError::StaleWrite { client_id, seq } => write!(
                f,
                "write {seq} of client {client_id:x} is a copy of one already answered"
            ),
            RegionError::Compacted { compacted } => {
                write!(f, "history is compacted up to revision {compacted}")
            }
        }
    }
}

impl RegionError {
    pub fn to_proto(&self, leader_addr: impl Fn(u64) -> String) -> proto::RegionError {
        use proto::region_error::Error as E;
        let error = match self {
            RegionError::NotLeader { region, leader } => E::NotLeader(proto::NotLeader {
                region_id: region.0,
                leader: *leader,
                leader_addr: leader
                    .as_ref()
                    .map(|l| leader_addr(l.node_id))
                    .unwrap_or_default(),
            }),
            RegionError::EpochNotMatch { current } => E::EpochNotMatch(proto::EpochNotMatch {
                current_regions: current.clone(),
            }),
            RegionError::KeyNotInRegion {
                key,
                region,
                start,
                end,
            } => E::KeyNotInRegion(proto::KeyNotInRegion {
                key: key.clone(),
                region_id: region.0,
                start_key: start.clone(),
                end_key: end.clone(),
            }),
            RegionError::RegionNotFound(r) => {
                E::RegionNotFound(proto::RegionNotFound { region_id: r.0 })
            }
            RegionError::ServerBusy { reason } => E::ServerBusy(proto::ServerBusy {
                reason: reason.clone(),
                backoff_ms: 50,
            }),
            RegionError::Refused { reason } => E::Refused(proto::Refused {
                reason: reason.clone(),
            }),
            RegionError::Internal { reason } => E::Internal(proto::Internal {
                reason: reason.clone(),
            }),
            RegionError::StaleWrite { client_id, seq } => E::StaleWrite(proto::StaleWrite {
                client_id: *client_id,
                seq: *seq,
            }),
            RegionError::Compacted { compacted } => E::Compacted(proto::Compacted {
                compact_revision: *compacted,
            }),
        };
        proto::RegionError {
            message: self.to_string(),
            error: Some(error),
        }
    }
}

pub type Reply<T> = oneshot::Sender<Result<T, RegionError>>;

#[derive(Clone, Debug, PartialEq)]
pub enum ReadRequest {
    Get {
        key: Vec<u8>,
    },
    /// Several keys of the region, read at one point.
    BatchGet {
        keys: Vec<Vec<u8>>,
    },
    /// `[start, end)` clipped to the region; empty `end` = to the region's end.
    Scan {
        start: Vec<u8>,
        end: Vec<u8>,
        limit: usize,
        keys_only: bool,
    },
}

/// A read's result and the cluster revision it is consistent at.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadAnswer {
    pub result: ReadResult,
    pub revision: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ReadResult {
    Get(Option<proto::KeyValue>),
    BatchGet(Vec<Option<proto::KeyValue>>),
    Scan {
        kvs: Vec<proto::KeyValue>,
        more: bool,
    },
}

// Watchers (see `hub`).

/// One revision's events for one watcher.
#[derive(Clone, Debug, PartialEq)]
pub struct HubBatch {
    pub revision: u64,
    pub events: Vec<proto::Event>,
}

/// Why a watcher's queue was closed.
#[derive(Clone, Debug, PartialEq)]
pub enum Ended {
    /// Its queue was full: it continues from history.
    Lagged,
    /// The region stopped serving it here (leadership, split, removal).
    Region(RegionError),
}

/// What a watcher asks for.
#[derive(Clone, Debug, Default)]
pub struct WatchSpec {
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub prev_kv: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// Whether it needs the region's resolved revision.
    pub progress: bool,
}

/// A registered watcher's ends of the hub.
pub struct Registration {
    pub id: u64,
    /// The region's highest applied revision when the watcher registered: every later
    /// revision comes through `events`.
    pub applied: u64,
    pub events: mpsc::Receiver<HubBatch>,
    /// Set before `events` closes (by the hub).
    pub ended: Arc<Mutex<Option<Ended>>>,
    /// The region's resolved revision.
    pub resolved: watch::Receiver<u64>,
}

/// Work for one peer.
pub enum PeerMsg {
    /// A raft message from another node, already checked to be addressed to this region.
    Raft(Box<raft::eraftpb::Message>),
    /// A client write. The epoch is the one the client routed with; `write_id` makes it
    /// exactly-once (see `session`).
    Propose {
        cmd: Command,
        epoch: proto::RegionEpoch,
        /// Boxed: most messages are not writes, and every message is as large as the largest.
        write_id: Option<Box<proto::WriteId>>,
        reply: Reply<ApplyResult>,
    },
    /// A client read.
    Read {
        req: ReadRequest,
        epoch: proto::RegionEpoch,
        linearizable: bool,
        /// Read as of this cluster revision (0 = the latest state); always linearizable.
        at: u64,
        reply: Reply<ReadAnswer>,
    },
    /// Register a watcher of keys of this region (its leader only).
    Watch {
        spec: WatchSpec,
        epoch: proto::RegionEpoch,
        reply: Reply<Registration>,
    },
    /// The transport could not deliver to this peer.
    Unreachable(PeerId),
    /// A snapshot to this peer was delivered (`true`) or failed.
    SnapshotStatus { to: PeerId, delivered: bool },
    /// Answer with the region's descriptor and leader (for routing information).
    Describe(oneshot::Sender<RegionInfo>),
    /// Hand leadership to the region's peer on `to_node` (answered once raft started the
    /// transfer; the transfer itself completes, or is abandoned, within an election timeout).
    TransferLeader { to_node: NodeId, reply: Reply<()> },
    /// Change the region's membership (answered once the change applied).
    ChangePeers {
        changes: Vec<(proto::PeerChangeKind, proto::Peer)>,
        epoch: proto::RegionEpoch,
        reply: Reply<ApplyResult>,
    },
    /// The region's leader removed `peer` at membership `epoch`.
    Tombstone {
        peer: PeerId,
        epoch: proto::RegionEpoch,
    },
    /// The leader's view of replication (for waiting until a new learner caught up).
    Progress(oneshot::Sender<Progress>),
    /// An admin request found this peer not leading: start ticking again, so that a
    /// sleeping follower of a leader that is gone notices and elects one.
    Wake,
    /// This node's replica of the merge's target took this region's range: the peer ends,
    /// leaving its data to the target.
    Merged { into: RegionId },
}

/// Replication progress as a region's leader sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    pub commit: u64,
    /// Each peer's matched index (leaders only).
    pub matched: Vec<(u64, u64)>,
    pub in_joint: bool,
}

/// What a peer knows of its region, for routing RPCs and placement reports.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionInfo {
    pub region: proto::Region,
    pub leader: Option<proto::Peer>,
    pub applied_index: u64,
    pub term: u64,
    pub is_leader: bool,
    /// Live keys and bytes of the region's data.
    pub keys: u64,
    pub bytes: u64,
    /// Write commands applied by this replica since it started.
    pub writes: u64,
    /// The merge the region takes part in, if any.
    pub merge: Option<proto::MergeState>,
}

/// Why a sleeping (hibernating) peer woke: the label of `tessera_region_wakeups_total`, and
/// whether its leader may be gone (see `peer/hibernate.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// An append or its answer.
    Append,
    /// A vote or pre-vote request: some follower stopped hearing the leader.
    Vote,
    /// Another raft message (not a heartbeat).
    RaftOther,
    /// A client write or read.
    Request,
    /// An admin request (split, membership, leader transfer, ...).
    Admin,
    /// An awake follower here ran out its election timer on a leader at that node.
    LeaderSilent,
    /// The transport's stream to that node broke and a probe got no answer.
    TransportNodeDown,
    /// Placement shows that node down, and a probe got no answer.
    PlacementNodeDown,
}

impl Wake {
    pub fn label(self) -> &'static str {
        match self {
            Wake::Append => "append",
            Wake::Vote => "vote",
            Wake::RaftOther => "raft_other",
            Wake::Request => "request",
            Wake::Admin => "admin",
            Wake::LeaderSilent => "leader_silent",
            Wake::TransportNodeDown => "transport_node_down",
            Wake::PlacementNodeDown => "placement_node_down",
        }
    }

    /// Whether this says the peer's leader may be gone, rather than that the leader or a
    /// client is active.
    pub fn leader_may_be_gone(self) -> bool {
        matches!(
            self,
            Wake::Vote | Wake::LeaderSilent | Wake::TransportNodeDown | Wake::PlacementNodeDown
        )
    }
}

/// A peer for a worker to build from its stored state and take over. The worker builds
/// it, so what decides that a peer is needed (start-up, a split, a message for a region
/// added to this node) does not depend on the peer itself.
pub struct NewPeer {
    pub storage: crate::storage::PeerStorage,
    /// The exactly-once write records to start with (a split's new half inherits its
    /// parent's); `None`: those stored for the region.
    pub sessions: Option<super::session::Sessions>,
    /// Campaign at once (the new half of a split its leader applied).
    pub campaign: bool,
    /// Drop vote requests for this long (a restarted node's peers, see `peer::lease`).
    pub refuse_votes_for: Option<std::time::Duration>,
    /// Start-up's: where the worker says whether the peer could be built. Without it, a
    /// peer that cannot be built stops the node.
    pub built: Option<std::sync::mpsc::Sender<(RegionId, Result<(), String>)>>,
}

impl NewPeer {
    pub fn new(storage: crate::storage::PeerStorage) -> Self {
        Self {
            storage,
            sessions: None,
            campaign: false,
            refuse_votes_for: None,
            built: None,
        }
    }
}

pub enum WorkerMsg {
    Peer {
        region: RegionId,
        msg: PeerMsg,
    },
    /// Build a peer and take it over (at start-up, or when a region is created here).
    AddPeer(Box<NewPeer>),
    /// The node `node` looks down: wake the sleeping regions it leads, so they elect.
    /// `why` says who noticed.
    NodeDown {
        node: crate::ids::NodeId,
        why: Wake,
    },
    /// The timestamp oracle's answer to this worker's request for revisions: the first of
    /// them, or why there are none.
    Revisions(Result<u64, String>),
    /// Finish the round, then stop.
    Shutdown,
}
