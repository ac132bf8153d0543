//! History: reads as of a past cluster revision, and compaction.

use super::retry::Mode;
use super::{Client, Result};
use crate::proto::{self, KeyValue};

impl Client {
    /// `key` as it was at cluster revision `revision` (0 = now). A revision below the
    /// compacted one is [`crate::Error::Compacted`]; one not handed out yet is refused.
    pub async fn get_at(&self, key: &[u8], revision: u64) -> Result<Option<KeyValue>> {
        Ok(self.get_revisioned(key, revision).await?.0)
    }

    /// `key`'s latest value with the cluster revision the answer is consistent at: the
    /// region's highest applied revision when it was read, so `get_at(key, revision)` gives
    /// the same answer (until compacted).
    pub async fn get_with_revision(&self, key: &[u8]) -> Result<(Option<KeyValue>, u64)> {
        self.get_revisioned(key, 0).await
    }

    /// One get, as of `revision` (0 = now), with the revision its answer is consistent at.
    pub(super) async fn get_revisioned(
        &self,
        key: &[u8],
        revision: u64,
    ) -> Result<(Option<KeyValue>, u64)> {
        self.execute(key, Mode::Idempotent, |conn, header| async move {
            let r = conn
                .get(proto::GetRequest {
                    header: Some(header),
                    key: key.to_vec(),
                    revision,
                })
                .await?;
            Ok((r.region_error, (r.kv, r.revision)))
        })
        .await
    }

    /// Drops the cluster's history below `revision`; returns the compacted revision now
    /// (at least `revision`). Nodes remove the rows in the background; reads below it fail
    /// with [`crate::Error::Compacted`] from then on.
    pub async fn compact(&self, revision: u64) -> Result<u64> {
        self.any_channel(|ch| async move {
            Self::kv(ch)
                .compact(proto::CompactRequest { revision })
                .await
                .map(|r| r.into_inner().compact_revision)
        })
        .await
    }
}
