//! `raft::Storage` for one region over the node's shared RocksDB.
//!
//! A `PeerStorage` caches the region's three small state records in memory (raft state, apply
//! state, region state) and the log entries not yet applied (see [`EntryCache`]); older
//! entries are read from the engine on demand. Writes never go to
//! the engine directly: each mutating method puts its changes into the caller's
//! [`WriteBatch`] and updates the cache, so a raft worker can persist every region of a round
//! with one synced write.
//!
//! Invariants:
//! - `truncated_index <= applied_index <= commit <= last_index` once initialized;
//! - the log holds exactly the entries `truncated_index + 1 ..= last_index`;
//! - the term of `truncated_index` is kept (`truncated_term`) so raft can match against it;
//! - the raft state record is written only when term or vote change (see [`PeerStorage::persist`]):
//!   on load the last index comes from the log itself, and the stored commit index, which
//!   may lag, is raised to the applied index, since an applied entry was committed;
//! - no method panics on an index raft may ask for: out-of-range requests are
//!   `Compacted` / `Unavailable` errors.
//!
//! The cache runs ahead of the disk between a method call and the batch's write. That is safe
//! because raft reads only entries it has been told are persisted, and a failed write stops
//! the node.

use std::cell::RefCell;
use std::sync::mpsc;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};

use super::entry_cache::EntryCache;
use super::keys;
use super::records::decode_entry;
pub use super::records::{conf_state_from_record, conf_state_of_region, conf_state_record};
use super::snapshot::generate_snapshot;
use super::{Cf, Engine, Error, WriteBatch};
use crate::ids::RegionId;
use crate::proto::{
    ConfStateRecord, MergeState, PeerState, RaftApplyState, RaftLocalState, Region,
    RegionLocalState, RegionSnapshotData, SnapshotKv,
};

/// A freshly bootstrapped region's log starts here rather than at 0, so that a peer created
/// empty (index 0) by a message can always be told apart from one that has the initial state
/// and must be caught up by snapshot.
pub const RAFT_INIT_LOG_INDEX: u64 = 5;
/// Where a restored region's log starts (see [`PeerStorage::write_restored_state`]).
pub const RESTORED_LOG_INDEX: u64 = RAFT_INIT_LOG_INDEX + 1;
pub const RESTORED_LOG_TERM: u64 = RAFT_INIT_LOG_TERM + 1;
pub const RAFT_INIT_LOG_TERM: u64 = 5;

/// Off-thread snapshot generation, polled by [`raft::Storage::snapshot`].
enum SnapGen {
    Idle,
    Generating(mpsc::Receiver<Result<Snapshot, Error>>),
}

pub struct PeerStorage {
    engine: Engine,
    region_id: RegionId,
    raft_state: RaftLocalState,
    apply_state: RaftApplyState,
    region_state: RegionLocalState,
    /// Term of the entry at `raft_state.last_index`.
    last_term: u64,
    cache: EntryCache,
    snap_gen: RefCell<SnapGen>,
}

impl PeerStorage {
    /// Loads a region's state. `RegionNotFound` if the region has never been written.
    pub fn open(engine: Engine, region_id: RegionId) -> Result<Self, Error> {
        let region_state: RegionLocalState = engine
            .get_msg(Cf::Raft, &keys::region_state_key(region_id))?
            .ok_or(Error::RegionNotFound(region_id))?;
        // Every state this code writes carries the descriptor; one without it is damage, and
        // `region()` relies on it being there.
        if region_state.region.is_none() {
            return Err(Error::corrupt(
                &keys::region_state_key(region_id),
                "region state has no region descriptor",
            ));
        }
        let mut raft_state: RaftLocalState = engine
            .get_msg(Cf::Raft, &keys::raft_state_key(region_id))?
            .unwrap_or_default();
        let apply_state: RaftApplyState = engine
            .get_msg(Cf::Raft, &keys::apply_state_key(region_id))?
            .unwrap_or_default();
        // The record is rewritten only when term or vote change (`persist`): the log itself
        // says where it ends. With no entry past the truncation point, it ends there.
        let (start, end) = keys::raft_log_range(region_id);
        raft_state.last_index = match engine.last_key(Cf::Raft, &start, &end)? {
            Some(k) => keys::decode_raft_log_key(&k)?.1,
            None => apply_state.truncated_index,
        };
        if raft_state.last_index < apply_state.truncated_index
            || raft_state.commit > raft_state.last_index
            || apply_state.applied_index < apply_state.truncated_index
            || apply_state.applied_index > raft_state.last_index
        {
            return Err(Error::corrupt(
                &keys::raft_state_key(region_id),
                format!(
                    "inconsistent states: last index {}, applied {}, truncated {}",
                    raft_state.last_index, apply_state.applied_index, apply_state.truncated_index
                ),
            ));
        }
        raft_state.commit = raft_state.commit.max(apply_state.applied_index);
        let mut s = Self {
            engine,
            region_id,
            raft_state,
            apply_state,
            region_state,
            last_term: 0,
            cache: EntryCache::default(),
            snap_gen: RefCell::new(SnapGen::Idle),
        };
        s.last_term = if s.raft_state.last_index == s.apply_state.truncated_index {
            s.apply_state.truncated_term
        } else {
            s.read_entry(s.raft_state.last_index)?.term
        };
        Ok(s)
    }

    pub fn region_id(&self) -> RegionId {
        self.region_id
    }

    pub fn region(&self) -> &Region {
        self.region_state
            .region
            .as_ref()
            .expect("invariant: region state always carries its region")
    }

    pub fn peer_state(&self) -> PeerState {
        PeerState::try_from(self.region_state.state).unwrap_or(PeerState::Normal)
    }

    /// Whether the peer has the region's data: false for a peer created by a message and not
    /// yet filled by a snapshot (it owns no range and serves nothing).
    pub fn is_initialized(&self) -> bool {
        self.apply_state.applied_index > 0
    }

    /// Whether the region's membership is in a joint configuration (a change half done).
    pub fn in_joint_config(&self) -> bool {
        self.region_state
            .conf_state
            .as_ref()
            .is_some_and(|c| !c.voters_outgoing.is_empty())
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn raft_state(&self) -> &RaftLocalState {
        &self.raft_state
    }

    pub fn apply_state(&self) -> &RaftApplyState {
        &self.apply_state
    }

    pub fn applied_index(&self) -> u64 {
        self.apply_state.applied_index
    }

    pub fn truncated_index(&self) -> u64 {
        self.apply_state.truncated_index
    }

    fn read_entry(&self, index: u64) -> Result<Entry, Error> {
        let key = keys::raft_log_key(self.region_id, index);
        let bytes = self
            .engine
            .get(Cf::Raft, &key)?
            .ok_or_else(|| Error::corrupt(&key, "log entry missing inside the live log"))?;
        decode_entry(&key, &bytes)
    }

    /// Puts `entries` into the batch, replacing any conflicting suffix of the log.
    /// The entries must be contiguous and start no later than `last_index + 1`.
    pub fn append(&mut self, entries: &[Entry], batch: &mut WriteBatch<'_>) -> Result<(), Error> {
        self.persist(entries, None, batch)
    }

    /// What one raft `Ready` asks to persist: new entries (as [`Self::append`]) and a changed
    /// hard state. The raft state record is written only when term or vote change: they
    /// must be durable before this peer sends anything, while the last index is found from
    /// the log at `open` and the commit index is soft state (raised to the applied index at
    /// `open`, learned from the leader otherwise). With many regions each taking one entry
    /// per round, this saves a record write per region and round on every replica.
    pub fn persist(
        &mut self,
        entries: &[Entry],
        hs: Option<&HardState>,
        batch: &mut WriteBatch<'_>,
    ) -> Result<(), Error> {
        self.append_entries(entries, batch)?;
        if let Some(hs) = hs {
            let vote_changed = hs.term != self.raft_state.term || hs.vote != self.raft_state.vote;
            self.raft_state.term = hs.term;
            self.raft_state.vote = hs.vote;
            self.raft_state.commit = hs.commit;
            if vote_changed {
                self.put_raft_state(batch);
            }
        }
        Ok(())
    }

    fn append_entries(
        &mut self,
        entries: &[Entry],
        batch: &mut WriteBatch<'_>,
    ) -> Result<(), Error> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        if first.index <= self.apply_state.truncated_index {
            return Err(self.invalid(format!(
                "append at {} would overwrite compacted log (truncated at {})",
                first.index, self.apply_state.truncated_index
            )));
        }
        if first.index > self.raft_state.last_index + 1 {
            return Err(self.invalid(format!(
                "append at {} leaves a gap after last index {}",
                first.index, self.raft_state.last_index
            )));
        }
        for (i, e) in entries.iter().enumerate() {
            if e.index != first.index + i as u64 {
                return Err(self.invalid("appended entries are not contiguous".into()));
            }
            let bytes = e
                .write_to_bytes()
                .map_err(|err| self.invalid(format!("encode entry {}: {err}", e.index)))?;
            batch.put(
                Cf::Raft,
                &keys::raft_log_key(self.region_id, e.index),
                &bytes,
            );
        }
        // Entries past the new last index belong to a conflicting suffix: drop them.
        if last.index < self.raft_state.last_index {
            batch.delete_range(
                Cf::Raft,
                &keys::raft_log_key(self.region_id, last.index + 1),
                &keys::raft_log_key(self.region_id, self.raft_state.last_index + 1),
            );
        }
        self.raft_state.last_index = last.index;
        self.last_term = last.term;
        self.cache.append(entries);
        Ok(())
    }

    /// Only the commit index changed (raft-rs's light ready). Not written: the commit index
    /// is a hint that raft re-learns from its leader, and the applied index (stored with
    /// every apply) bounds it from below on load. That saves a record per region in most
    /// rounds.
    pub fn set_commit(&mut self, commit: u64) {
        self.raft_state.commit = self.raft_state.commit.max(commit);
    }

    pub fn set_conf_state(&mut self, cs: &ConfState, batch: &mut WriteBatch<'_>) {
        self.region_state.conf_state = Some(conf_state_record(cs));
        self.put_region_state(batch);
    }

    /// Replaces the region descriptor (membership or range changed), written at apply time.
    pub fn set_region(&mut self, region: Region, batch: &mut WriteBatch<'_>) {
        self.region_state.region = Some(region);
        self.put_region_state(batch);
    }

    /// The merge this region takes part in, as of the applied index.
    pub fn merge_state(&self) -> Option<&MergeState> {
        self.region_state.merge.as_ref()
    }

    /// Replaces the region's descriptor and merge state (a merge step applied).
    pub fn set_merge(
        &mut self,
        region: Region,
        merge: Option<MergeState>,
        batch: &mut WriteBatch<'_>,
    ) {
        self.region_state.region = Some(region);
        self.region_state.merge = merge;
        self.put_region_state(batch);
    }

    /// Live user keys and their bytes in this region, as of the applied index.
    pub fn data_stats(&self) -> (u64, u64) {
        (self.apply_state.data_keys, self.apply_state.data_bytes)
    }

    /// Replaces the data statistics (a split divided them); stored by the next
    /// `set_applied_index`.
    pub fn set_data_stats(&mut self, keys: u64, bytes: u64) {
        self.apply_state.data_keys = keys;
        self.apply_state.data_bytes = bytes;
    }

    /// The highest cluster revision applied to the region's user data (0 = none).
    pub fn max_revision(&self) -> u64 {
        self.apply_state.max_revision
    }

    /// Records a write applied at cluster revision `rev`; stored by the next
    /// `set_applied_index`, which the same apply always calls.
    pub fn note_revision(&mut self, rev: u64) {
        self.apply_state.max_revision = self.apply_state.max_revision.max(rev);
    }

    /// Adjusts the data statistics; stored by the next `set_applied_index`, which the same
    /// apply always calls.
    pub fn add_data_stats(&mut self, keys: i64, bytes: i64) {
        let s = &mut self.apply_state;
        s.data_keys = s.data_keys.saturating_add_signed(keys);
        s.data_bytes = s.data_bytes.saturating_add_signed(bytes);
    }

    /// Marks `index` applied. Must go into the same batch as the data the entry wrote.
    pub fn set_applied_index(&mut self, index: u64, batch: &mut WriteBatch<'_>) {
        self.apply_state.applied_index = index;
        self.cache.drop_to(index);
        batch.put_msg(
            Cf::Raft,
            &keys::apply_state_key(self.region_id),
            &self.apply_state,
        );
    }

    /// Removes every log entry up to and including `index`. `index` must be applied: an
    /// unapplied entry is still needed by this replica.
    pub fn compact_to(&mut self, index: u64, batch: &mut WriteBatch<'_>) -> Result<(), Error> {
        if index <= self.apply_state.truncated_index {
            return Ok(());
        }
        if index > self.apply_state.applied_index {
            return Err(self.invalid(format!(
                "compact to {index} past applied index {}",
                self.apply_state.applied_index
            )));
        }
        let term = raft::Storage::term(self, index).map_err(|e| self.invalid(e.to_string()))?;
        batch.delete_range(
            Cf::Raft,
            &keys::raft_log_key(self.region_id, self.apply_state.truncated_index + 1),
            &keys::raft_log_key(self.region_id, index + 1),
        );
        self.apply_state.truncated_index = index;
        self.apply_state.truncated_term = term;
        self.cache.drop_to(index);
        batch.put_msg(
            Cf::Raft,
            &keys::apply_state_key(self.region_id),
            &self.apply_state,
        );
        Ok(())
    }

    /// Replaces the region's data range, log, states and write records with a received
    /// snapshot, atomically within `batch`. Returns the snapshot's write records (key
    /// suffixes and values, see `keys::session_suffix`) for the peer to load.
    pub fn apply_snapshot(
        &mut self,
        snap: &Snapshot,
        batch: &mut WriteBatch<'_>,
    ) -> Result<Vec<SnapshotKv>, Error> {
        let meta = snap.get_metadata();
        if meta.index <= self.apply_state.applied_index {
            return Err(self.invalid(format!(
                "snapshot at {} is out of date (applied {})",
                meta.index, self.apply_state.applied_index
            )));
        }
        let data = <RegionSnapshotData as prost::Message>::decode(snap.get_data())
            .map_err(|e| self.invalid(format!("snapshot data does not decode: {e}")))?;
        let region = data
            .region
            .ok_or_else(|| self.invalid("snapshot carries no region".into()))?;
        if region.id != self.region_id.0 {
            return Err(self.invalid(format!("snapshot is of region {}", region.id)));
        }
        // Validate everything before touching the batch: a refused snapshot leaves it as it was.
        if data
            .kvs
            .iter()
            .any(|kv| !keys::in_range(&kv.key, &region.start_key, &region.end_key))
        {
            return Err(self.invalid("snapshot holds a key outside its region".into()));
        }
        if data.sessions.iter().any(|r| {
            keys::session_suffix(&keys::session_key_from_suffix(self.region_id, &r.key)).is_none()
        }) {
            return Err(self.invalid("snapshot holds a malformed write record key".into()));
        }
        if !super::mvcc::rows_within(&data.history, &region) {
            return Err(self.invalid("snapshot holds a history row outside its region".into()));
        }
        let start = keys::data_key(&region.start_key);
        let end = keys::data_end_key(&region.end_key);
        batch.delete_range(Cf::Data, &start, &end);
        let mut data_bytes = 0;
        for kv in &data.kvs {
            batch.put(Cf::Data, &keys::data_key(&kv.key), &kv.value);
            data_bytes += (kv.key.len() + kv.value.len()) as u64;
        }
        super::mvcc::replace_range(batch, &region, &data.history, data.compacted_revision)?;
        let (log_start, log_end) = keys::raft_log_range(self.region_id);
        batch.delete_range(Cf::Raft, &log_start, &log_end);
        self.cache.clear();
        let (sess_start, sess_end) = keys::session_range(self.region_id);
        batch.delete_range(Cf::Raft, &sess_start, &sess_end);
        for r in &data.sessions {
            batch.put(
                Cf::Raft,
                &keys::session_key_from_suffix(self.region_id, &r.key),
                &r.value,
            );
        }

        self.raft_state.last_index = meta.index;
        self.raft_state.commit = self.raft_state.commit.max(meta.index);
        self.raft_state.term = self.raft_state.term.max(meta.term);
        self.last_term = meta.term;
        self.apply_state = RaftApplyState {
            applied_index: meta.index,
            truncated_index: meta.index,
            truncated_term: meta.term,
            data_keys: data.kvs.len() as u64,
            data_bytes,
            max_revision: data.max_revision,
        };
        self.region_state = RegionLocalState {
            state: PeerState::Normal as i32,
            region: Some(region),
            conf_state: Some(conf_state_record(meta.get_conf_state())),
            merge: data.merge,
        };
        self.put_raft_state(batch);
        batch.put_msg(
            Cf::Raft,
            &keys::apply_state_key(self.region_id),
            &self.apply_state,
        );
        self.put_region_state(batch);
        Ok(data.sessions)
    }

    fn put_raft_state(&self, batch: &mut WriteBatch<'_>) {
        batch.put_msg(
            Cf::Raft,
            &keys::raft_state_key(self.region_id),
            &self.raft_state,
        );
    }

    fn put_region_state(&self, batch: &mut WriteBatch<'_>) {
        batch.put_msg(
            Cf::Raft,
            &keys::region_state_key(self.region_id),
            &self.region_state,
        );
    }

    fn invalid(&self, reason: String) -> Error {
        Error::Invalid {
            region: self.region_id,
            reason,
        }
    }
}

mod create;
mod raft_impl;
