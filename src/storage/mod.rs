//! Durable state of a node: one RocksDB instance shared by all regions.
//!
//! - [`keys`]: the whole key layout, and nothing else builds keys;
//! - [`engine`]: the RocksDB wrapper — column families, write batches, synced writes,
//!   snapshots and range scans;
//! - [`peer_storage`]: `raft::Storage` for one region over the shared engine, plus the write
//!   side (append, hard state, compaction, snapshots) that a raft worker puts into its round's
//!   one write batch; its not-yet-applied entries are kept in an `entry_cache`;
//! - [`mvcc`]: the history of user keys — rows per key and revision, reads at a revision,
//!   compaction;
//! - [`snapshot`]: building a region's snapshot from one consistent view of the engine;
//! - `records`: conversions between raft-rs's types and the stored records.
//!
//! Invariants:
//! - only this module opens RocksDB or builds a storage key;
//! - a stored record that does not decode is an [`Error::Corrupt`] value, never a panic,
//!   and never caused by user input;
//! - storage errors reach raft-rs as `raft::Error::Store`.

pub mod engine;
mod entry_cache;
pub mod keys;
pub mod mvcc;
pub mod peer_storage;
mod records;
pub mod snapshot;

pub use engine::{Cf, Engine, EngineOptions, EngineSnapshot, WriteBatch};
pub use peer_storage::PeerStorage;

use crate::ids::RegionId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rocksdb: {0}")]
    RocksDb(#[from] rocksdb::Error),
    /// A stored record that does not decode: disk corruption or a bug, never user input.
    #[error("corrupt record at key {key:02x?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
    #[error(transparent)]
    Key(#[from] keys::KeyError),
    #[error("region {0} has no state in this store")]
    RegionNotFound(RegionId),
    /// The caller asked for something the stored state cannot allow (for example appending
    /// over compacted entries, or applying an out-of-date snapshot).
    #[error("region {region}: {reason}")]
    Invalid { region: RegionId, reason: String },
}

impl Error {
    pub fn corrupt(key: &[u8], reason: impl std::fmt::Display) -> Self {
        Error::Corrupt {
            key: key.to_vec(),
            reason: reason.to_string(),
        }
    }
}

impl From<Error> for raft::Error {
    fn from(e: Error) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}
