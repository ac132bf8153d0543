//! Conversions between raft-rs's types and the records a node stores: log entries and the
//! configuration (voters, learners, joint state) kept in a region's state. Used by both the
//! peer storage and snapshot generation.
//!
//! Invariants:
//! - the conversions are total and lossless for what a region stores: voters, learners,
//!   outgoing voters, next learners and auto-leave survive a round trip;
//! - `conf_state_of_region` lists a learner peer as a learner and every other peer as a
//!   voter;
//! - a stored entry that does not decode is `Error::Corrupt` naming its key, never a
//!   panic.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry};

use super::Error;
use crate::proto::{ConfStateRecord, PeerRole, Region};

pub(super) fn decode_entry(key: &[u8], bytes: &[u8]) -> Result<Entry, Error> {
    Entry::parse_from_bytes(bytes).map_err(|e| Error::corrupt(key, e))
}

pub fn conf_state_of_region(region: &Region) -> ConfStateRecord {
    let mut cs = ConfStateRecord::default();
    for p in &region.peers {
        if p.role == PeerRole::Learner as i32 {
            cs.learners.push(p.id);
        } else {
            cs.voters.push(p.id);
        }
    }
    cs
}

pub fn conf_state_record(cs: &ConfState) -> ConfStateRecord {
    ConfStateRecord {
        voters: cs.voters.clone(),
        learners: cs.learners.clone(),
        voters_outgoing: cs.voters_outgoing.clone(),
        learners_next: cs.learners_next.clone(),
        auto_leave: cs.auto_leave,
    }
}

pub fn conf_state_from_record(r: &ConfStateRecord) -> ConfState {
    ConfState {
        voters: r.voters.clone(),
        learners: r.learners.clone(),
        voters_outgoing: r.voters_outgoing.clone(),
        learners_next: r.learners_next.clone(),
        auto_leave: r.auto_leave,
        ..Default::default()
    }
}
