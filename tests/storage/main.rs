//! Storage tests: `PeerStorage` against raft-rs's storage semantics, region isolation inside
//! one RocksDB, durability across reopen, and a model-based property test.

mod isolation;
mod model;
mod raft_semantics;

use raft::eraftpb::Entry;
use tempfile::TempDir;
use tessera::ids::RegionId;
use tessera::proto::{Peer, RaftApplyState, RaftLocalState, Region, RegionEpoch};
use tessera::storage::{keys, Cf, Engine, EngineOptions, PeerStorage};

pub fn open_engine() -> (TempDir, Engine) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), &EngineOptions::default()).expect("open engine");
    (dir, engine)
}

pub fn region(id: u64, start: &[u8], end: &[u8]) -> Region {
    Region {
        id,
        start_key: start.to_vec(),
        end_key: end.to_vec(),
        epoch: Some(RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: (1..=3)
            .map(|n| Peer {
                id: id * 10 + n,
                node_id: n,
                role: 0,
            })
            .collect(),
    }
}

pub fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        ..Default::default()
    }
}

/// A region whose log is truncated at (`truncated`, `truncated` as term) and then holds
/// `entries`, all applied — the shape raft-rs's MemStorage tests start from.
pub fn storage_with(
    engine: &Engine,
    reg: &Region,
    truncated: u64,
    entries: &[Entry],
) -> PeerStorage {
    let id = RegionId(reg.id);
    let mut b = engine.batch();
    PeerStorage::write_initial_state(&mut b, reg);
    b.put_msg(
        Cf::Raft,
        &keys::apply_state_key(id),
        &RaftApplyState {
            applied_index: truncated,
            truncated_index: truncated,
            truncated_term: truncated,
            ..Default::default()
        },
    );
    b.put_msg(
        Cf::Raft,
        &keys::raft_state_key(id),
        &RaftLocalState {
            term: truncated,
            vote: 0,
            commit: truncated,
            last_index: truncated,
        },
    );
    engine.write(b, true).expect("write");
    let mut ps = PeerStorage::open(engine.clone(), id).expect("open region");
    let mut b = engine.batch();
    ps.append(entries, &mut b).expect("append");
    if let Some(last) = entries.last() {
        ps.set_applied_index(last.index, &mut b);
    }
    engine.write(b, true).expect("write");
    ps
}
