//! Creating a region's storage — at bootstrap, by a restore, by a split, for a peer that
//! waits for a snapshot — and destroying it. A child module of `peer_storage`, so it builds
//! and edits the private state directly.

use super::*;

impl PeerStorage {
    /// Writes the initial state of a region created at cluster bootstrap (or by a split): a log
    /// truncated at [`RAFT_INIT_LOG_INDEX`] and the region's membership as its conf state.
    pub fn write_initial_state(batch: &mut WriteBatch<'_>, region: &Region) {
        let at = (RAFT_INIT_LOG_INDEX, RAFT_INIT_LOG_TERM);
        Self::write_state_at(batch, region, at, (0, 0), 0);
    }

    /// As [`Self::write_initial_state`], for a region whose data a restore wrote before its
    /// first start: its sizes (`data_keys`, `data_bytes`) and the revision the data is at.
    /// Its log starts one entry later than a first start's ([`RESTORED_LOG_INDEX`]), so an
    /// empty replica on a node that was not restored is behind the restored ones: it cannot
    /// win an election against them, and gets the data by snapshot.
    pub fn write_restored_state(
        batch: &mut WriteBatch<'_>,
        region: &Region,
        sizes: (u64, u64),
        max_revision: u64,
    ) {
        let at = (RESTORED_LOG_INDEX, RESTORED_LOG_TERM);
        Self::write_state_at(batch, region, at, sizes, max_revision);
    }

    fn write_state_at(
        batch: &mut WriteBatch<'_>,
        region: &Region,
        at: (u64, u64),
        sizes: (u64, u64),
        max_revision: u64,
    ) {
        let id = RegionId(region.id);
        let (raft_state, apply_state, region_state) =
            starting_states(region, at, sizes, max_revision);
        batch.put_msg(Cf::Raft, &keys::raft_state_key(id), &raft_state);
        batch.put_msg(Cf::Raft, &keys::apply_state_key(id), &apply_state);
        batch.put_msg(Cf::Raft, &keys::region_state_key(id), &region_state);
    }

    /// Creates the storage of a region born from a split applied at raft `index` (of `term`)
    /// and puts its states into `batch`. Its log starts at `index`, so the revisions of its
    /// keys (raft indexes) keep growing past the ones the parent gave them; every replica
    /// applies the split at the same index, so every replica starts identically.
    pub fn create_split(
        engine: Engine,
        region: &Region,
        index: u64,
        term: u64,
        sizes: (u64, u64),
        max_revision: u64,
        batch: &mut WriteBatch<'_>,
    ) -> Self {
        let (raft_state, apply_state, region_state) =
            starting_states(region, (index, term), sizes, max_revision);
        let s = Self {
            engine,
            region_id: RegionId(region.id),
            raft_state,
            apply_state,
            region_state,
            last_term: term,
            cache: EntryCache::default(),
            snap_gen: RefCell::new(SnapGen::Idle),
        };
        s.put_raft_state(batch);
        batch.put_msg(
            Cf::Raft,
            &keys::apply_state_key(s.region_id),
            &s.apply_state,
        );
        s.put_region_state(batch);
        s
    }

    /// Creates the storage of a peer that a message proved belongs here (added to a region
    /// this node does not have yet): no log, no data, no range, only its own descriptor
    /// entry, until a snapshot fills it.
    pub fn create_uninitialized(
        engine: Engine,
        region_id: RegionId,
        me: crate::proto::Peer,
        epoch: crate::proto::RegionEpoch,
        batch: &mut WriteBatch<'_>,
    ) -> Self {
        let s = Self {
            engine,
            region_id,
            raft_state: RaftLocalState::default(),
            apply_state: RaftApplyState::default(),
            region_state: RegionLocalState {
                state: PeerState::Normal as i32,
                region: Some(Region {
                    id: region_id.0,
                    epoch: Some(epoch),
                    peers: vec![me],
                    ..Default::default()
                }),
                conf_state: Some(ConfStateRecord::default()),
                merge: None,
            },
            last_term: 0,
            cache: EntryCache::default(),
            snap_gen: RefCell::new(SnapGen::Idle),
        };
        s.put_raft_state(batch);
        batch.put_msg(Cf::Raft, &keys::apply_state_key(region_id), &s.apply_state);
        s.put_region_state(batch);
        s
    }

    /// Deletes the peer's raft log and states and leaves a tombstone with its last
    /// descriptor; with `delete_data` also its data range.
    pub fn destroy(&mut self, batch: &mut WriteBatch<'_>, delete_data: bool) {
        let (start, end) = keys::region_raft_range(self.region_id);
        batch.delete_range(Cf::Raft, &start, &end);
        self.cache.clear();
        if delete_data {
            let r = self.region();
            batch.delete_range(
                Cf::Data,
                &keys::data_key(&r.start_key),
                &keys::data_end_key(&r.end_key),
            );
            crate::storage::mvcc::delete_range(batch, &r.start_key, &r.end_key);
        }
        self.region_state.state = PeerState::Tombstone as i32;
        self.put_region_state(batch);
    }
}

/// The raft, apply and region states of a region whose log starts at `index` (of `term`),
/// truncated there, holding `data_keys`/`data_bytes` at `max_revision`: what bootstrap, a
/// restore and a split each write for a new region.
fn starting_states(
    region: &Region,
    (index, term): (u64, u64),
    (data_keys, data_bytes): (u64, u64),
    max_revision: u64,
) -> (RaftLocalState, RaftApplyState, RegionLocalState) {
    (
        RaftLocalState {
            term,
            vote: 0,
            commit: index,
            last_index: index,
        },
        RaftApplyState {
            applied_index: index,
            truncated_index: index,
            truncated_term: term,
            data_keys,
            data_bytes,
            max_revision,
        },
        RegionLocalState {
            state: PeerState::Normal as i32,
            region: Some(region.clone()),
            conf_state: Some(conf_state_of_region(region)),
            merge: None,
        },
    )
}
