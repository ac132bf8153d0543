//! `Kv.Lease` and `Kv.LeaseKeepAlive` (docs/architecture.md, "Leases").
//!
//! A lease request is routed, like a put, to the leader of the region holding the lease's
//! record. Writes (grant, renew, revoke, attach) are raft commands; time-to-live and list
//! confirm the leadership with a linearizable read, then answer from the node's lessor,
//! which holds the expiry times. A put with a lease attaches first (through the node's
//! system client, wherever the lease lives), then proposes the put with the attachment's
//! deadline.
//!
//! Invariants:
//! - every TTL and id is checked before anything is proposed: 0, above the maximum, or an
//!   id outside 1..=i64::MAX is `InvalidArgument`; a TTL below the minimum is raised;
//! - a revoke is answered once the lease's keys are deleted, or at the request timeout
//!   (the deletion then completes in the background, see `server::lease_keeper`);
//! - a keep-alive stream answers every request it read, in order, with the TTL or an
//!   error; a lease that is gone answers TTL 0;
//! - once authentication is on, a user revokes a lease only with write permission on
//!   every key attached to it, and sees only the attached keys it may read.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::KvCore;
use crate::auth::{Caller, Need};
use crate::ids::RegionId;
use crate::proto::{self, lease_request::Op, ReadConsistency, RequestHeader};
use crate::raftstore::cmd::{ApplyResult, Attachment, Command, LeaseCmd};
use crate::raftstore::msg::{ReadRequest, ReadResult, RegionError};
use tessera_api::keys::{lease_attached_row, lease_rows, parse_lease_attached_row};
use tessera_api::limits::{MAX_LEASE_TTL, MIN_LEASE_TTL};

fn check_id(id: u64) -> Result<(), Status> {
    if id == 0 || id > i64::MAX as u64 {
        return Err(Status::invalid_argument(format!(
            "lease id must be 1..={}, not {id}",
            i64::MAX
        )));
    }
    Ok(())
}

type Answer = Result<proto::LeaseResponse, Status>;

fn region_answer(e: proto::RegionError) -> Answer {
    Ok(proto::LeaseResponse {
        region_error: Some(e),
        ..Default::default()
    })
}

impl KvCore {
    fn check_ids(&self, ids: &[u64]) -> Result<(), Status> {
        if ids.is_empty() || ids.len() > self.limits.max_scan_limit as usize {
            return Err(Status::invalid_argument(format!(
                "a lease request names 1 to {} leases, not {}",
                self.limits.max_scan_limit,
                ids.len()
            )));
        }
        ids.iter().try_for_each(|id| check_id(*id))
    }

    pub(super) async fn lease(&self, r: proto::LeaseRequest, caller: &Caller) -> Answer {
        let header = r.header;
        let op =
            r.op.ok_or_else(|| Status::invalid_argument("lease request has no operation"))?;
        match op {
            Op::Grant(g) => {
                check_id(g.id)?;
                self.check_space(header.as_ref())?;
                if g.ttl_ms == 0 || g.ttl_ms > MAX_LEASE_TTL.as_millis() as u64 {
                    return Err(Status::invalid_argument(format!(
                        "lease TTL must be above 0 and at most {} s, not {} ms",
                        MAX_LEASE_TTL.as_secs(),
                        g.ttl_ms
                    )));
                }
                let ttl_ms = g.ttl_ms.max(MIN_LEASE_TTL.as_millis() as u64);
                let cmd = LeaseCmd::Grant { id: g.id, ttl_ms };
                self.lease_write(header, cmd).await
            }
            Op::Renew(r) => {
                self.check_ids(&r.ids)?;
                self.lease_write(header, LeaseCmd::Renew { ids: r.ids })
                    .await
            }
            Op::Revoke(r) => {
                self.check_ids(&r.ids)?;
                if let Err(e) = self.may_revoke(header, &r.ids, caller).await? {
                    return region_answer(e);
                }
                let cmd = LeaseCmd::Revoke {
                    ids: r.ids.clone(),
                    deadlines_ms: Vec::new(),
                };
                let answer = self.lease_write(header, cmd).await?;
                if answer.region_error.is_none() {
                    let region = RegionId(header.map_or(0, |h| h.region_id));
                    self.await_removal(region, &r.ids).await;
                }
                Ok(answer)
            }
            Op::Attach(a) => {
                check_id(a.id)?;
                self.check_key(&a.key, None)?;
                self.check_space(header.as_ref())?;
                let cmd = LeaseCmd::Attach {
                    id: a.id,
                    key: a.key,
                    window_ms: self.lease_cfg.attach_window_ms,
                };
                self.lease_write(header, cmd).await
            }
            Op::TimeToLive(t) => {
                check_id(t.id)?;
                let mut answer = self.time_to_live(header, t).await?;
                // Only the attached keys the caller may read.
                answer.keys.retain(|k| self.gate.may_read(caller, k));
                Ok(answer)
            }
            Op::List(_) => {
                let region = RegionId(header.map_or(0, |h| h.region_id));
                if let Err(e) = self.confirm_leader(header).await? {
                    return region_answer(e);
                }
                match self.lessor.list(region) {
                    Some(leases) => Ok(proto::LeaseResponse {
                        leases,
                        ..Default::default()
                    }),
                    None => region_answer(self.region_error(&not_loaded())),
                }
            }
        }
    }

    async fn lease_write(&self, header: Option<RequestHeader>, cmd: LeaseCmd) -> Answer {
        let ids = cmd.ids();
        match self.propose(header, Command::Lease(cmd)).await? {
            Ok(ApplyResult::Lease {
                ttls_ms,
                attach_deadline_ms,
            }) => Ok(proto::LeaseResponse {
                leases: ids
                    .into_iter()
                    .zip(ttls_ms)
                    .map(|(id, ttl_ms)| proto::LeaseInfo {
                        id,
                        ttl_ms,
                        remaining_ms: ttl_ms,
                    })
                    .collect(),
                attach_deadline_ms,
                ..Default::default()
            }),
            Ok(_) => Err(Status::internal("unexpected result of a lease command")),
            Err(e) => region_answer(e),
        }
    }

    /// A linearizable read through the region: it is led here, and everything committed
    /// before the call is applied (so the lessor has it).
    async fn confirm_leader(
        &self,
        header: Option<RequestHeader>,
    ) -> Result<Result<(), proto::RegionError>, Status> {
        let header = header.map(|mut h| {
            h.consistency = ReadConsistency::Linearizable as i32;
            h
        });
        let read = ReadRequest::BatchGet { keys: Vec::new() };
        Ok(self.read(header, read, 0).await?.map(|_| ()))
    }

    /// Revoking a lease deletes its keys: a user needs write permission on every one.
    async fn may_revoke(
        &self,
        header: Option<RequestHeader>,
        ids: &[u64],
        caller: &Caller,
    ) -> Result<Result<(), proto::RegionError>, Status> {
        if !matches!(caller, Caller::User { .. }) || self.gate.allow(caller, Need::Admin).is_ok() {
            return Ok(Ok(()));
        }
        for id in ids {
            let op = proto::LeaseTimeToLiveOp {
                id: *id,
                keys: true,
            };
            let answer = self.time_to_live(header, op).await?;
            if let Some(e) = answer.region_error {
                return Ok(Err(e));
            }
            if answer.keys.len() >= self.limits.max_scan_limit as usize {
                return Err(Status::permission_denied(format!(
                    "lease {id} holds too many keys to check them one by one: revoke it as root"
                )));
            }
            for k in &answer.keys {
                self.gate.allow(caller, Need::WriteKey(k))?;
            }
        }
        Ok(Ok(()))
    }

    async fn time_to_live(
        &self,
        header: Option<RequestHeader>,
        t: proto::LeaseTimeToLiveOp,
    ) -> Answer {
        let region = RegionId(header.map_or(0, |h| h.region_id));
        if let Err(e) = self.confirm_leader(header).await? {
            return region_answer(e);
        }
        let Some(info) = self.lessor.get(region, t.id) else {
            return region_answer(self.region_error(&not_loaded()));
        };
        let mut keys = Vec::new();
        if t.keys && info.ttl_ms > 0 {
            let (_, end) = lease_rows(t.id);
            let scan = ReadRequest::Scan {
                start: lease_attached_row(t.id, b""),
                end,
                limit: self.limits.max_scan_limit as usize,
                keys_only: true,
            };
            let rows = match self.read(header, scan, 0).await? {
                Ok(a) => match a.result {
                    ReadResult::Scan { kvs, .. } => kvs,
                    _ => return Err(Status::internal("unexpected result of a scan")),
                },
                Err(e) => return region_answer(e),
            };
            let attached: Vec<Vec<u8>> = rows
                .iter()
                .filter_map(|kv| parse_lease_attached_row(t.id, &kv.key).map(<[u8]>::to_vec))
                .collect();
            keys = self.still_attached(t.id, attached).await?;
        }
        Ok(proto::LeaseResponse {
            leases: vec![info],
            keys,
            ..Default::default()
        })
    }

    /// The keys of `rows` that are still attached to lease `id` (a key put again without it,
    /// or deleted, keeps its row until the lease goes).
    async fn still_attached(&self, id: u64, rows: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, Status> {
        if rows.is_empty() {
            return Ok(rows);
        }
        let client = self.system_client().await?;
        let current = client
            .batch_get(&rows)
            .await
            .map_err(|e| Status::unavailable(format!("reading lease {id}'s keys: {e}")))?;
        Ok(rows
            .into_iter()
            .zip(current)
            .filter(|(_, kv)| kv.as_ref().is_some_and(|kv| kv.lease == id))
            .map(|(k, _)| k)
            .collect())
    }

    async fn system_client(&self) -> Result<crate::client::Client, Status> {
        self.oracle
            .placement
            .get()
            .await
            .map_err(|e| Status::unavailable(format!("no client to the cluster: {e}")))
    }

    /// Waits until the revoked leases are removed (their keys deleted) by the keeper, for at
    /// most the request timeout. If this node stops leading the region meanwhile, a new
    /// leader finishes the deletion out of sight: the answer then comes at the timeout, never
    /// before the keys may be gone.
    async fn await_removal(&self, region: RegionId, ids: &[u64]) {
        self.keeper.notify_one();
        let until = Instant::now() + self.timeout;
        while Instant::now() < until {
            let held = ids
                .iter()
                .any(|id| self.lessor.holds(region, *id).unwrap_or(true));
            if !held {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Attaches `key` to lease `id` in the lease's region, wherever it is led. A lease that
    /// does not exist is `NotFound`; any other failure is `ServerBusy` for the client to retry
    /// (nothing was written).
    pub(super) async fn attach(
        &self,
        id: u64,
        key: &[u8],
    ) -> Result<Result<Box<Attachment>, proto::RegionError>, Status> {
        check_id(id)?;
        let busy = |why: String| {
            Ok(Err(self.region_error(&RegionError::ServerBusy {
                reason: format!("cannot attach the key to lease {id}: {why}"),
            })))
        };
        let client = match self.system_client().await {
            Ok(c) => c,
            Err(s) => return busy(s.message().to_string()),
        };
        match client.lease_attach(id, key).await {
            Ok(deadline_ms) => Ok(Ok(Box::new(Attachment {
                lease: id,
                deadline_ms,
            }))),
            Err(crate::client::Error::NotFound(m)) => Err(Status::not_found(m)),
            Err(e) => busy(e.to_string()),
        }
    }
}

fn not_loaded() -> RegionError {
    RegionError::ServerBusy {
        reason: "the region's leases are not loaded yet".into(),
    }
}

/// Serves one `LeaseKeepAlive` stream: whatever requests have arrived are renewed together
/// (one request per lease region, through the node's system client), then answered.
pub(super) async fn serve_keep_alive(
    core: std::sync::Arc<KvCore>,
    requests: Streaming<proto::LeaseKeepAliveRequest>,
    caller: Caller,
    tx: mpsc::Sender<Result<proto::LeaseKeepAliveResponse, Status>>,
) {
    let mut batches = requests.ready_chunks(1024);
    while let Some(batch) = batches.next().await {
        // The caller's user may have been deleted since the stream opened.
        if let Err(s) = core.gate.allow(&caller, Need::Any) {
            let _ = tx.send(Err(s)).await;
            return;
        }
        let mut ids = Vec::with_capacity(batch.len());
        for r in batch {
            match r {
                Ok(r) => ids.push(r.id),
                Err(_) => return,
            }
        }
        let answers: Vec<proto::LeaseKeepAliveResponse> = match renew(&core, &ids).await {
            Ok(ttls) => ids
                .iter()
                .zip(ttls)
                .map(|(id, ttl)| proto::LeaseKeepAliveResponse {
                    id: *id,
                    ttl_ms: ttl.map_or(0, |t| t.as_millis() as u64),
                    error: String::new(),
                })
                .collect(),
            Err(e) => ids
                .iter()
                .map(|id| proto::LeaseKeepAliveResponse {
                    id: *id,
                    ttl_ms: 0,
                    error: e.to_string(),
                })
                .collect(),
        };
        for a in answers {
            if tx.send(Ok(a)).await.is_err() {
                return;
            }
        }
    }
}

async fn renew(core: &KvCore, ids: &[u64]) -> Result<Vec<Option<Duration>>, String> {
    if let Some(bad) = ids.iter().find(|id| check_id(**id).is_err()) {
        return Err(format!("lease id {bad} is not a valid id"));
    }
    let client = core.system_client().await.map_err(|e| e.to_string())?;
    client.lease_renew(ids).await.map_err(|e| e.to_string())
}
