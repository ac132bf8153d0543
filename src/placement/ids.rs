//! The id counter: region, peer and node ids, unique in the cluster and never reused.
//!
//! Invariants:
//! - ids come only from the counter, raised by compare-and-swap, and are never handed out
//!   twice; an exhausted id space is an error, not a wrap.

use std::ops::Range;

use super::{ids_key, update, Update};
use crate::client::{Client, Error};

fn decode_u64(v: &[u8]) -> Result<u64, Error> {
    v.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Server(format!("id counter holds {} bytes, not 8", v.len())))
}

/// Allocates `count` new ids, unique across the cluster and never reused: a compare-and-swap
/// on the counter's mod revision; a caller that loses a race reads again and retries.
pub async fn alloc_ids(client: &Client, count: u64) -> Result<Range<u64>, Error> {
    update(client, &ids_key(), 100, "id allocation", |cur| {
        let cur = cur.ok_or_else(|| Error::Server("placement id counter is missing".into()))?;
        let last = decode_u64(&cur.value)?;
        let next = last
            .checked_add(count)
            .ok_or_else(|| Error::Server("id space exhausted".into()))?;
        Ok(Update::Write(
            next.to_be_bytes().to_vec(),
            last + 1..next + 1,
        ))
    })
    .await
}

/// The last id handed out.
pub async fn max_id(client: &Client) -> Result<u64, Error> {
    match client.get(&ids_key()).await? {
        Some(kv) => decode_u64(&kv.value),
        None => Err(Error::Server("placement id counter is missing".into())),
    }
}
