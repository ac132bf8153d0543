//! The cluster's compacted revision, kept in the placement region: history below it may
//! be removed on every node (docs/architecture.md, "History and compaction").
//!
//! Invariants:
//! - the recorded revision only ever rises (a compare-and-swap that never lowers it);
//! - it is recorded before any node removes a row below it.

use super::{system_key, update, Update};
use crate::client::{Client, Error};

/// The system key holding the cluster's compacted revision (8 bytes, big-endian).
pub fn compact_key() -> Vec<u8> {
    system_key(b"compact")
}

fn decode(v: &[u8]) -> Result<u64, Error> {
    v.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Server("the compacted revision is not 8 bytes".into()))
}

/// Raises the cluster's compacted revision to `rev` (a lower `rev` changes nothing);
/// returns the compacted revision now.
pub async fn raise(client: &Client, rev: u64) -> Result<u64, Error> {
    update(client, &compact_key(), 20, "compaction", |cur| {
        let now = cur.map(|kv| decode(&kv.value)).transpose()?.unwrap_or(0);
        if now >= rev {
            return Ok(Update::Keep(now));
        }
        Ok(Update::Write(rev.to_be_bytes().to_vec(), rev))
    })
    .await
}

/// The cluster's compacted revision (0 = never compacted).
pub async fn current(client: &Client) -> Result<u64, Error> {
    match client.get(&compact_key()).await? {
        None => Ok(0),
        Some(kv) => decode(&kv.value),
    }
}
