//! Building a region's snapshot: its data range, write records, descriptor, membership and
//! apply state, all read from one consistent view of the engine.
//! [`PeerStorage`](super::PeerStorage) runs this off the raft thread when raft asks for a
//! snapshot.
//!
//! Invariants:
//! - everything in a snapshot comes from one engine snapshot, so data, write records,
//!   descriptor and membership are all as of its index, the applied index;
//! - its term is the applied entry's, or the truncated term when the log is compacted up to
//!   the applied index; an applied entry missing from the log is `Corrupt`, never a guess;
//! - data is stored under user keys and write records under region-independent suffixes,
//!   so the receiver files them under its own region;
//! - generating a snapshot only reads: it writes nothing.

use raft::eraftpb::Snapshot;

use super::keys;
use super::records::{conf_state_from_record, decode_entry};
use super::{Cf, Engine, EngineSnapshot, Error};
use crate::ids::RegionId;
use crate::proto::{RaftApplyState, RegionLocalState, RegionSnapshotData, SnapshotKv};

/// Builds a snapshot of `region_id` from one consistent view of the engine: data range,
/// descriptor, membership and apply state all as of the same applied index.
pub fn generate_snapshot(engine: &Engine, region_id: RegionId) -> Result<Snapshot, Error> {
    engine.with_snapshot(|view| generate_snapshot_from(view, region_id))
}

fn generate_snapshot_from(
    view: &EngineSnapshot<'_>,
    region_id: RegionId,
) -> Result<Snapshot, Error> {
    let state: RegionLocalState = view
        .get_msg(Cf::Raft, &keys::region_state_key(region_id))?
        .ok_or(Error::RegionNotFound(region_id))?;
    let apply: RaftApplyState = view
        .get_msg(Cf::Raft, &keys::apply_state_key(region_id))?
        .ok_or(Error::RegionNotFound(region_id))?;
    let region = state.region.unwrap_or_default();
    let index = apply.applied_index;
    let term = if index == apply.truncated_index {
        apply.truncated_term
    } else {
        let key = keys::raft_log_key(region_id, index);
        let bytes = view
            .get(Cf::Raft, &key)?
            .ok_or_else(|| Error::corrupt(&key, "applied entry missing from the log"))?;
        decode_entry(&key, &bytes)?.term
    };
    let mut kvs = Vec::new();
    view.scan(
        Cf::Data,
        &keys::data_key(&region.start_key),
        &keys::data_end_key(&region.end_key),
        |k, v| {
            kvs.push(SnapshotKv {
                key: keys::origin_key(k)?.to_vec(),
                value: v.to_vec(),
            });
            Ok(true)
        },
    )?;
    let mut sessions = Vec::new();
    let (start, end) = keys::session_range(region_id);
    view.scan(Cf::Raft, &start, &end, |k, v| {
        let suffix =
            keys::session_suffix(k).ok_or_else(|| Error::corrupt(k, "not a write-record key"))?;
        sessions.push(SnapshotKv {
            key: suffix.to_vec(),
            value: v.to_vec(),
        });
        Ok(true)
    })?;
    let mut history = Vec::new();
    let (lo, hi) = super::mvcc::range_bounds(&region.start_key, &region.end_key);
    if lo < hi {
        view.scan(Cf::History, &lo, &hi, |k, v| {
            history.push(SnapshotKv {
                key: k.to_vec(),
                value: v.to_vec(),
            });
            Ok(true)
        })?;
    }
    let compacted_revision = view
        .get(Cf::Raft, &keys::COMPACTED_KEY)?
        .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0);
    let data = RegionSnapshotData {
        region: Some(region),
        kvs,
        sessions,
        max_revision: apply.max_revision,
        history,
        compacted_revision,
        merge: state.merge,
    };
    let mut snap = Snapshot::default();
    snap.set_data(prost::Message::encode_to_vec(&data).into());
    let meta = snap.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(conf_state_from_record(
        &state.conf_state.unwrap_or_default(),
    ));
    Ok(snap)
}
