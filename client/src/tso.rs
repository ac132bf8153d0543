//! Cluster revisions from the timestamp oracle, for nodes (system access).
//!
//! The oracle lives with the leader of the placement region that holds
//! [`tessera_api::keys::tso_key`]; a request is routed to that region like a read of the key,
//! so a leader change or a split is followed the same way as for any other request.

use std::ops::Range;

use super::retry::Mode;
use super::{Client, Error, Result};
use crate::proto;

impl Client {
    /// `count` new cluster revisions, each larger than every revision handed out before the
    /// request reached the oracle. Needs a client with system access.
    pub async fn tso(&self, count: u32) -> Result<Range<u64>> {
        if !self.inner.opts.system {
            return Err(Error::InvalidArgument(
                "revisions are handed out to nodes only (system access)".into(),
            ));
        }
        if count == 0 {
            return Ok(0..0);
        }
        let key = tessera_api::keys::tso_key();
        let (first, got) = self
            .execute(&key, Mode::Idempotent, |conn, header| async move {
                // On the connection's command stream: a node asks once per raft round.
                let r = conn
                    .tso(proto::TsoRequest {
                        header: Some(header),
                        count,
                    })
                    .await?;
                Ok((r.region_error, (r.first, r.count)))
            })
            .await?;
        let end = first
            .checked_add(u64::from(count))
            .filter(|e| *e <= i64::MAX as u64);
        match end {
            Some(end) if got == count && first > 0 => Ok(first..end),
            _ => Err(Error::Server(format!(
                "the oracle answered {got} revisions from {first} for {count}"
            ))),
        }
    }
}
