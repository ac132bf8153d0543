//! `Kv.Tso`: cluster revisions for nodes, from the oracle where this node holds the lease of
//! its region (`placement::tso`).

use std::time::Duration;

use tonic::Status;

use super::KvCore;
use crate::ids::RegionId;
use crate::placement::tso::{TsoError, MAX_REQUEST};
use crate::proto::{self, ReadConsistency};
use crate::raftstore::msg::{ReadRequest, RegionError};
use crate::storage::keys::tso_key;

/// Tries before telling the client to come back: a lease renewal may need one round.
const TRIES: usize = 4;

impl KvCore {
    pub(super) async fn tso(
        &self,
        r: proto::TsoRequest,
        _caller: &crate::auth::Caller,
    ) -> Result<proto::TsoResponse, Status> {
        let Some(header) = r.header.filter(|h| h.system) else {
            return Err(Status::invalid_argument(
                "revisions are handed out to nodes only (system access)",
            ));
        };
        if r.count == 0 || r.count > MAX_REQUEST {
            return Err(Status::invalid_argument(format!(
                "count must be 1..={MAX_REQUEST}, not {}",
                r.count
            )));
        }
        let answer = |region_error, first| proto::TsoResponse {
            region_error,
            first,
            count: if first > 0 { r.count } else { 0 },
        };
        let region = RegionId(header.region_id);
        for attempt in 0..TRIES {
            match self.oracle.server.allocate(region, r.count).await {
                Ok(first) => return Ok(answer(None, first)),
                Err(TsoError::Region(e)) => return Ok(answer(Some(self.region_error(&e)), 0)),
                Err(TsoError::Failed(why)) => return Err(Status::unavailable(why)),
                Err(TsoError::NoLease) => {
                    // A linearizable read through the region: a leader without a lease runs
                    // a ReadIndex round, which renews it (and wakes a sleeping region); a
                    // follower answers who leads.
                    let mut h = header;
                    h.consistency = ReadConsistency::Linearizable as i32;
                    if let Err(e) = self
                        .read(Some(h), ReadRequest::Get { key: tso_key() }, 0)
                        .await?
                    {
                        return Ok(answer(Some(e), 0));
                    }
                    // The lease is published at the end of the worker's round.
                    tokio::time::sleep(Duration::from_millis(1 << attempt)).await;
                }
            }
        }
        let busy = RegionError::ServerBusy {
            reason: "the timestamp oracle's lease is not established yet".into(),
        };
        Ok(answer(Some(self.region_error(&busy)), 0))
    }
}

impl KvCore {
    /// Refuses a read at a revision the oracle has not handed out yet: nothing is known
    /// about it, and promising it would hold every region's writes below it.
    pub(super) async fn check_not_future(&self, at: u64) -> Result<(), Status> {
        match self.oracle.client.handed_out(at).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Status::out_of_range(format!(
                "revision {at} is in the future"
            ))),
            Err(why) => Err(Status::unavailable(format!(
                "cannot check revision {at}: {why}"
            ))),
        }
    }

    /// Records `revision` as the cluster's compacted revision (only ever raised); the nodes
    /// remove the rows below it in the background (`server::compaction`).
    pub(super) async fn compact(
        &self,
        r: proto::CompactRequest,
    ) -> Result<proto::CompactResponse, Status> {
        if r.revision == 0 {
            return Err(Status::invalid_argument(
                "compact revision must be positive",
            ));
        }
        self.check_not_future(r.revision).await?;
        let client = self
            .oracle
            .placement
            .get()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let compact_revision = crate::placement::compaction::raise(&client, r.revision)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(proto::CompactResponse { compact_revision })
    }

    /// The cluster's current revision: a new one from the oracle, so at least the revision
    /// of every write acknowledged before the call.
    pub(super) async fn current_revision(&self) -> Result<proto::RevisionResponse, Status> {
        let revision = self
            .oracle
            .client
            .latest()
            .await
            .map_err(|e| Status::unavailable(format!("no revision from the oracle: {e}")))?;
        Ok(proto::RevisionResponse { revision })
    }
}
