//! A peer on its own: one node's store context and engine, no transport and no worker; the
//! tests drive the peer's message handling and answering directly.

use raft::eraftpb::{ConfState, Message, MessageType, Snapshot};
use tempfile::TempDir;
use tokio::sync::oneshot;

use super::*;
use crate::config::RaftConfig;
use crate::ids::NodeId;
use crate::proto::{Peer as PeerDesc, RegionSnapshotData};
use crate::raftstore::apply::ApplyCtx;
use crate::raftstore::cmd::{ApplyResult, Command};
use crate::storage::{Engine, PeerStorage};

fn desc(id: u64, node: u64) -> PeerDesc {
    PeerDesc {
        id,
        node_id: node,
        ..Default::default()
    }
}

/// Region 2, `[start, end)`, with the given peers, and this node's peer of it.
fn peer_on(node: u64, start: &[u8], end: &[u8], peers: Vec<PeerDesc>) -> (TempDir, Peer) {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), &Default::default()).unwrap();
    let region = proto::Region {
        id: 2,
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        epoch: Some(RegionEpoch {
            conf_ver: 1,
            version: 2,
        }),
        peers,
    };
    let mut wb = engine.batch();
    PeerStorage::write_initial_state(&mut wb, &region);
    engine.write(wb, false).unwrap();
    let storage = PeerStorage::open(engine.clone(), RegionId(2)).unwrap();
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let ctx = StoreCtx::new(NodeId(node), RaftConfig::default(), logger, engine);
    ctx.set_range(RegionId(2), start, end);
    let peer = Peer::new(NewPeer::new(storage), &ctx).unwrap();
    (dir, peer)
}

fn put(key: &[u8]) -> Command {
    Command::Put {
        key: key.to_vec(),
        value: b"v".to_vec(),
        lease: None,
    }
}

fn proposal(
    term: u64,
    index: u64,
) -> (
    Proposal,
    oneshot::Receiver<Result<ApplyResult, RegionError>>,
) {
    let (tx, rx) = oneshot::channel();
    let p = Proposal {
        index,
        term,
        at: None,
        reply: tx,
    };
    (p, rx)
}

fn put_result(revision: u64) -> ApplyResult {
    ApplyResult::Put {
        prev: None,
        revision,
    }
}

/// A peer that led in term 2 (proposals at 100..=103 never committed), lost leadership,
/// and leads again in term 5, where its new proposals reuse indexes 101 and 102. Each
/// proposal gets the answer of the entry that carries it, and "not applied" only if no
/// entry of its term can commit at its index.
#[test]
fn proposals_are_matched_by_term_and_index() {
    let (_dir, mut peer) = peer_on(1, b"", b"", vec![desc(11, 1)]);
    let mut old = Vec::new();
    for i in 100..=103 {
        let (p, rx) = proposal(2, i);
        peer.proposals.push_back(p);
        old.push(rx);
    }
    let mut new = Vec::new();
    for i in 101..=102 {
        let (p, rx) = proposal(5, i);
        peer.proposals.push_back(p);
        new.push(rx);
    }
    let mut actx = ApplyCtx::default();
    // Another leader's entries at 100 (term 3); this peer's new term from 101.
    peer.answer_proposal(100, 3, Some(Ok(put_result(100))), &mut actx);
    peer.answer_proposal(101, 5, Some(Ok(put_result(101))), &mut actx);
    peer.answer_proposal(102, 5, Some(Ok(put_result(102))), &mut actx);
    actx.send_replies();
    for mut rx in old {
        assert!(
            matches!(rx.try_recv(), Ok(Err(RegionError::NotLeader { .. }))),
            "a term-2 proposal is not applied"
        );
    }
    let got: Vec<_> = new
        .into_iter()
        .map(|mut rx| rx.try_recv().expect("answered").expect("applied"))
        .collect();
    assert_eq!(got, vec![put_result(101), put_result(102)]);
    assert!(peer.proposals.is_empty());
}

/// A removed peer's pending proposals may still commit under the next leader: they are
/// answered "unknown" (the sender dropped), never with a region error that says "not
/// applied".
#[test]
fn a_destroyed_peer_leaves_its_proposals_unknown() {
    let (_dir, mut peer) = peer_on(1, b"", b"", vec![desc(11, 1)]);
    peer.campaign();
    assert!(peer.is_leader(), "a single voter elects itself");
    let (tx, mut rx) = oneshot::channel();
    let epoch = peer.epoch();
    peer.on_msg(PeerMsg::Propose {
        cmd: put(b"k"),
        epoch,
        write_id: None,
        reply: tx,
    });
    // A user write waits for its cluster revision, then is proposed with it.
    assert!(peer.proposals.is_empty());
    assert_eq!(peer.revisions_wanted(), 1);
    peer.stamp(Ok(7), 1);
    assert_eq!(peer.proposals.len(), 1);
    let engine = peer.raw.store().engine().clone();
    let mut wb = engine.batch();
    peer.destroy(&mut wb);
    assert!(
        matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
        "the proposal's outcome is unknown"
    );
}

/// A snapshot raft rejects (older than what the peer has committed) must not leave its
/// range claimed: here a pre-split snapshot of `[, +inf)` arrives at a peer that already
/// owns only `[, m)`, on a node that does not host the split-off region yet.
#[test]
fn a_rejected_snapshot_does_not_claim_its_range() {
    let peers = vec![desc(11, 1), desc(12, 2), desc(13, 3)];
    let (_dir, mut peer) = peer_on(3, b"", b"m", peers.clone());
    let stale_region = proto::Region {
        id: 2,
        start_key: vec![],
        end_key: vec![],
        epoch: Some(RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers,
    };
    let data = RegionSnapshotData {
        region: Some(stale_region),
        kvs: vec![],
        sessions: vec![],
        max_revision: 0,
        ..Default::default()
    };
    let mut snap = Snapshot::default();
    snap.set_data(prost::Message::encode_to_vec(&data).into());
    let meta = snap.mut_metadata();
    // Below the initial log's commit index: raft rejects it.
    meta.index = crate::storage::peer_storage::RAFT_INIT_LOG_INDEX - 2;
    meta.term = crate::storage::peer_storage::RAFT_INIT_LOG_TERM;
    meta.set_conf_state(ConfState {
        voters: vec![11, 12, 13],
        ..Default::default()
    });
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgSnapshot);
    m.from = 11;
    m.to = 13;
    m.term = peer.raw.raft.term;
    m.set_snapshot(snap);
    peer.on_msg(PeerMsg::Raft(Box::new(m)));

    assert_eq!(
        peer.ctx.range_of(RegionId(2)),
        Some((vec![], b"m".to_vec())),
        "the region keeps its range"
    );
    assert_eq!(
        peer.ctx.overlapping(RegionId(3), b"m", b""),
        None,
        "the split-off region can still be created here"
    );
}

/// A committed entry that does not decode cannot be skipped (the other replicas may apply
/// it) nor retried: applying it stops the peer's worker, before anything is recorded as
/// applied.
#[test]
#[should_panic(expected = "cannot be decoded")]
fn an_undecodable_committed_entry_stops_the_worker() {
    let (_dir, mut peer) = peer_on(1, b"", b"", vec![desc(11, 1)]);
    let engine = peer.raw.store().engine().clone();
    let mut wb = engine.batch();
    let mut actx = ApplyCtx::default();
    let e = eraftpb::Entry {
        index: 6,
        term: 1,
        data: vec![0xff; 16].into(),
        ..Default::default()
    };
    peer.apply_entries(vec![e], &mut wb, &mut actx);
}

/// Leadership is handed only to a peer that can take it at once: a transfer to a peer that
/// has not answered within an election timeout (a hung node) or lags is refused as "busy",
/// and raft never starts it — a started transfer drops every proposal until it ends.
#[test]
fn leadership_goes_only_to_a_peer_ready_to_take_it() {
    let (_dir, mut peer) = peer_on(1, b"", b"", vec![desc(11, 1), desc(12, 2)]);
    peer.raw.raft.become_candidate();
    peer.raw.raft.become_leader();
    assert!(peer.is_leader());
    let last = peer.raw.raft.raft_log.last_index();

    // Silent for an election timeout: refused, no transfer started.
    let pr = peer.raw.raft.mut_prs().get_mut(12).expect("peer 12");
    pr.recent_active = false;
    pr.become_replicate();
    pr.matched = last;
    match peer.transfer_leader(crate::ids::NodeId(2)) {
        Err(RegionError::ServerBusy { reason }) => {
            assert!(reason.contains("not answered"), "{reason}")
        }
        other => panic!("expected ServerBusy, got {other:?}"),
    }
    assert_eq!(peer.raw.raft.lead_transferee, None);

    // Answering but far behind: refused.
    let pr = peer.raw.raft.mut_prs().get_mut(12).expect("peer 12");
    pr.recent_active = true;
    pr.matched = 0;
    for _ in 0..200 {
        peer.raw.propose(vec![], b"x".to_vec()).expect("propose");
    }
    assert!(matches!(
        peer.transfer_leader(crate::ids::NodeId(2)),
        Err(RegionError::ServerBusy { .. })
    ));
    assert_eq!(peer.raw.raft.lead_transferee, None);

    // Receiving a snapshot: refused.
    let last = peer.raw.raft.raft_log.last_index();
    let pr = peer.raw.raft.mut_prs().get_mut(12).expect("peer 12");
    pr.matched = last;
    pr.become_snapshot(last);
    assert!(matches!(
        peer.transfer_leader(crate::ids::NodeId(2)),
        Err(RegionError::ServerBusy { .. })
    ));

    // Up to date and answering, even in probe state (an idle region never moves a peer
    // that was unreachable once back to replicate): the transfer starts.
    let pr = peer.raw.raft.mut_prs().get_mut(12).expect("peer 12");
    pr.become_probe();
    pr.matched = last;
    peer.transfer_leader(crate::ids::NodeId(2))
        .expect("transfer starts");
    assert_eq!(peer.raw.raft.lead_transferee, Some(12));

    // A node without a replica: refused for good.
    assert!(matches!(
        peer.transfer_leader(crate::ids::NodeId(3)),
        Err(RegionError::Refused { .. })
    ));
}
