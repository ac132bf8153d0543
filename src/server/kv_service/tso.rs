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
    pub(super) async fn tso(&self, r: proto::TsoRequest) -> Result<proto::TsoResponse, Status> {
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
            match self.tso.allocate(region, r.count).await {
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
                        .read(Some(h), ReadRequest::Get { key: tso_key() })
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
