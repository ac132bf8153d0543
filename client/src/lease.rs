//! Leases: grant, renew, revoke, time-to-live, list, and a keep-alive task
//! (docs/architecture.md, "Leases").
//!
//! A lease lives in the region holding its record (`keys::lease_key(id)`); every call about
//! one lease is routed there like a put, and renewals of many leases go as one request per
//! region. A key put with [`Client::put_with_lease`] is deleted when its lease ends.
//!
//! Invariants:
//! - grant and revoke carry a write id (exactly-once across retries); renewals and reads
//!   are idempotent and retried freely;
//! - keep-alives are renewed by one task per client (`keepalive`).

use std::collections::HashMap;
use std::time::Duration;

use rand::Rng;

use super::retry::Mode;
use super::{CasAction, CasResult, Client, Compare, Error, Result};
use crate::proto::{self, lease_request::Op};
use tessera_api::keys::lease_key;

pub use tessera_api::limits::{MAX_LEASE_TTL, MIN_LEASE_TTL};

/// A lease as its region's leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseStatus {
    pub id: u64,
    /// The granted TTL.
    pub ttl: Duration,
    /// What is left of it.
    pub remaining: Duration,
    /// The keys attached to it (asked for with `keys`).
    pub keys: Vec<Vec<u8>>,
}

fn status(i: &proto::LeaseInfo, keys: Vec<Vec<u8>>) -> LeaseStatus {
    LeaseStatus {
        id: i.id,
        ttl: Duration::from_millis(i.ttl_ms),
        remaining: Duration::from_millis(i.remaining_ms),
        keys,
    }
}

fn not_found(id: u64) -> Error {
    Error::NotFound(format!(
        "lease {id} not found (never granted, expired or revoked)"
    ))
}

fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl.is_zero() || ttl > MAX_LEASE_TTL {
        return Err(Error::InvalidArgument(format!(
            "lease TTL must be above 0 and at most {} s, not {ttl:?}",
            MAX_LEASE_TTL.as_secs()
        )));
    }
    Ok(())
}

impl Client {
    async fn lease_call(&self, id: u64, mode: Mode<'_>, op: Op) -> Result<proto::LeaseResponse> {
        let key = lease_key(id);
        self.execute(&key, mode, |conn, header| {
            let op = op.clone();
            async move {
                let r = conn
                    .lease(proto::LeaseRequest {
                        header: Some(header),
                        op: Some(op),
                    })
                    .await?;
                Ok((r.region_error.clone(), r))
            }
        })
        .await
    }

    /// Grants a lease of `ttl` with a new random id. A TTL below [`MIN_LEASE_TTL`] is
    /// raised to it. Returns the lease's id and its granted TTL.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<(u64, Duration)> {
        let id = rand::rng().random_range(1..i64::MAX as u64);
        self.lease_grant_with_id(id, ttl).await.map(|t| (id, t))
    }

    /// Grants lease `id` (1 ..= i64::MAX, as etcd's ids); [`Error::Refused`] if it exists.
    pub async fn lease_grant_with_id(&self, id: u64, ttl: Duration) -> Result<Duration> {
        check_ttl(ttl)?;
        if id == 0 || id > i64::MAX as u64 {
            return Err(Error::InvalidArgument(format!(
                "lease id must be 1..={}, not {id}",
                i64::MAX
            )));
        }
        let ttl_ms = ttl.max(MIN_LEASE_TTL).as_millis() as u64;
        let ticket = self.inner.writes.start();
        let op = Op::Grant(proto::LeaseGrantOp { id, ttl_ms });
        let r = self.lease_call(id, Mode::Write(&ticket), op).await?;
        match r.leases.first() {
            Some(l) if l.ttl_ms > 0 => Ok(Duration::from_millis(l.ttl_ms)),
            _ => Err(Error::Refused(format!("lease {id} already exists"))),
        }
    }

    /// Revokes lease `id`: every key attached to it is deleted before this returns (unless
    /// the deadline runs out first; the deletion then still completes). [`Error::NotFound`]
    /// if the lease does not exist.
    pub async fn lease_revoke(&self, id: u64) -> Result<()> {
        let ticket = self.inner.writes.start();
        let op = Op::Revoke(proto::LeaseIds { ids: vec![id] });
        let r = self.lease_call(id, Mode::Write(&ticket), op).await?;
        match r.leases.first() {
            Some(l) if l.ttl_ms > 0 => Ok(()),
            _ => Err(not_found(id)),
        }
    }

    /// Renews each lease to its full TTL: one request per lease region. Returns each
    /// lease's TTL, `None` for a lease that is gone.
    pub async fn lease_renew(&self, ids: &[u64]) -> Result<Vec<Option<Duration>>> {
        let mut ttl: HashMap<u64, Option<Duration>> = HashMap::new();
        let groups = self.lease_groups(ids, true).await?;
        let calls = groups.into_iter().map(|group| self.renew_group(group));
        for answers in futures::future::join_all(calls).await {
            ttl.extend(answers?);
        }
        Ok(ids
            .iter()
            .map(|id| ttl.get(id).copied().flatten())
            .collect())
    }

    /// `ids` grouped by the lease region holding them; with `strict`, a lease whose region
    /// cannot be found fails the call, else it is left out.
    async fn lease_groups(&self, ids: &[u64], strict: bool) -> Result<Vec<Vec<u64>>> {
        let mut by_region: HashMap<u64, Vec<u64>> = HashMap::new();
        for &id in ids {
            match self.locate(&lease_key(id)).await {
                Ok(region) => by_region.entry(region.region.id).or_default().push(id),
                Err(e) if strict => return Err(e),
                Err(_) => {}
            }
        }
        Ok(by_region.into_values().collect())
    }

    /// Renews the leases of one region in one request: each lease's TTL, `None` if gone.
    async fn renew_group(&self, group: Vec<u64>) -> Result<Vec<(u64, Option<Duration>)>> {
        let op = Op::Renew(proto::LeaseIds { ids: group.clone() });
        let r = self.lease_call(group[0], Mode::Idempotent, op).await?;
        if r.leases.len() != group.len() {
            return Err(Error::Server(format!(
                "renewal of {} leases answered {} times",
                group.len(),
                r.leases.len()
            )));
        }
        let ttl = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        Ok(group
            .into_iter()
            .zip(r.leases)
            .map(|(id, a)| (id, ttl(a.ttl_ms)))
            .collect())
    }

    /// Attaches `key` to lease `id` ahead of a put with the lease; returns by when the put
    /// must be proposed (ms since the Unix epoch). For the nodes' own use: a put with a
    /// lease does this itself.
    #[doc(hidden)]
    pub async fn lease_attach(&self, id: u64, key: &[u8]) -> Result<u64> {
        let ticket = self.inner.writes.start();
        let op = Op::Attach(proto::LeaseAttachOp {
            id,
            key: key.to_vec(),
        });
        let r = self.lease_call(id, Mode::Write(&ticket), op).await?;
        match r.leases.first() {
            Some(l) if l.ttl_ms > 0 => Ok(r.attach_deadline_ms),
            _ => Err(not_found(id)),
        }
    }

    /// A compare-and-swap whose put attaches the key to lease `lease` (0 = to none);
    /// [`Error::NotFound`] if the lease does not exist.
    pub async fn cas_with_lease(
        &self,
        key: &[u8],
        compare: Compare,
        action: CasAction,
        lease: u64,
    ) -> Result<CasResult> {
        let compare = compare.to_proto();
        let action = match action {
            CasAction::Put(v) => proto::cas_request::Action::Put(v),
            CasAction::Delete => proto::cas_request::Action::Delete(true),
        };
        let ticket = self.inner.writes.start();
        self.execute(key, Mode::Write(&ticket), |conn, header| {
            let compare = compare.clone();
            let action = action.clone();
            async move {
                let r = conn
                    .cas(proto::CasRequest {
                        header: Some(header),
                        key: key.to_vec(),
                        compare: Some(compare),
                        action: Some(action),
                        lease,
                    })
                    .await?;
                Ok((
                    r.region_error,
                    CasResult {
                        succeeded: r.succeeded,
                        prev: r.prev_kv,
                        revision: r.revision,
                    },
                ))
            }
        })
        .await
    }

    /// Renews each lease as [`Client::lease_renew`] does, but a lease region that fails does
    /// not fail the others: the answer holds the leases whose region answered (a TTL, or
    /// `None` for a lease that is gone). A group that fails is tried again lease by lease,
    /// so that leases whose region split apart are routed anew.
    pub(super) async fn lease_renew_each(&self, ids: &[u64]) -> HashMap<u64, Option<Duration>> {
        let groups = self.lease_groups(ids, false).await.unwrap_or_default();
        let groups = groups.into_iter().map(|group| async move {
            match self.renew_group(group.clone()).await {
                Ok(done) => done,
                Err(_) if group.len() > 1 => {
                    let one_by_one = group.into_iter().map(|id| self.renew_group(vec![id]));
                    futures::future::join_all(one_by_one)
                        .await
                        .into_iter()
                        .flatten()
                        .flatten()
                        .collect()
                }
                Err(_) => Vec::new(),
            }
        });
        futures::future::join_all(groups)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Lease `id`'s TTL and what is left of it (and its keys with `keys`);
    /// [`Error::NotFound`] if it does not exist.
    pub async fn lease_time_to_live(&self, id: u64, keys: bool) -> Result<LeaseStatus> {
        let op = Op::TimeToLive(proto::LeaseTimeToLiveOp { id, keys });
        let r = self.lease_call(id, Mode::Idempotent, op).await?;
        match r.leases.first() {
            Some(l) if l.ttl_ms > 0 => Ok(status(l, r.keys)),
            _ => Err(not_found(id)),
        }
    }

    /// Every live lease, by id.
    pub async fn leases(&self) -> Result<Vec<LeaseStatus>> {
        self.refresh().await?;
        let regions: Vec<_> = self
            .inner
            .cache
            .read()
            .expect("region cache lock poisoned")
            .regions()
            .into_iter()
            .filter(|r| tessera_api::keys::reaches_leases(&r.region.end_key))
            .collect();
        let mut out = Vec::new();
        for r in regions {
            // Any id of the region routes the call there.
            let start = r
                .region
                .start_key
                .as_slice()
                .max(&tessera_api::keys::LEASE_KEYSPACE);
            let mut first = [0u8; 8];
            let tail = &start[2..];
            first[..tail.len().min(8)].copy_from_slice(&tail[..tail.len().min(8)]);
            let id = u64::from_be_bytes(first);
            let resp = self
                .lease_call(id, Mode::Idempotent, Op::List(proto::LeaseListOp {}))
                .await?;
            out.extend(resp.leases.iter().map(|l| status(l, Vec::new())));
        }
        out.sort_by_key(|l| l.id);
        out.dedup_by_key(|l| l.id);
        Ok(out)
    }
}
