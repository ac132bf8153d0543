//! Expiring and revoking the leases of the lease regions led here (docs/architecture.md,
//! "Leases").
//!
//! Every 100 ms (or at once when a revoke is waiting) the keeper:
//! 1. takes the node's lessor's leases past their expiry — at most
//!    `lease.max_expiries_per_second`, a token bucket, so a storm is spread out — confirms
//!    the leadership of each region with a linearizable read, and proposes their expiry:
//!    a revoke that applies only to a lease whose deadline is still the one seen here, and
//!    past by the proposer's clock;
//! 2. in a task of its own (one pass at a time, so a slow key region never holds up
//!    expiries), for every revoked lease this node learnt of `attach_window_ms +
//!    2 × max_clock_skew_ms` ago by its own monotonic clock — no put attached before the
//!    revocation can still be proposed — deletes each attached key that is still attached to
//!    it (a compare-and-swap on the key's lease, in the key's region, through the node's
//!    system client, each bounded by `DELETE_TIMEOUT`), then proposes the lease's removal.
//!
//! A leader that fails half way, or loses the lead, leaves the lease revoked and not removed:
//! the next leader loads it and does the rest. Deletes are conditional, so repeating one is
//! harmless.
//!
//! Invariants:
//! - a lease is removed only after every key attached to it was deleted or found attached
//!   elsewhere;
//! - the loop is bounded per pass (the token bucket; `MAX_REVOKE_PER_PASS`) and ends with
//!   the node (aborted at shutdown).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::{oneshot, Notify};

use crate::config::LeaseConfig;
use crate::ids::RegionId;
use crate::placement::client::SystemClient;
use crate::raftstore::cmd::{ApplyResult, CasAction, Command, Compare, LeaseCmd};
use crate::raftstore::lessor::Lessor;
use crate::raftstore::msg::{PeerMsg, ReadRequest};
use crate::raftstore::router::Router;
use crate::storage::{keys, Cf, Engine};
use tessera_api::keys::{lease_attached_row, lease_rows, parse_lease_attached_row};

const TICK: Duration = Duration::from_millis(100);
/// Revoked leases whose keys one pass deletes.
const MAX_REVOKE_PER_PASS: usize = 1024;
/// Key deletions in flight at once.
const DELETES_IN_FLIGHT: usize = 64;
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// One key deletion; one that takes longer is tried again in a later pass.
const DELETE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub(super) struct Keeper {
    pub lessor: Lessor,
    pub router: Router,
    pub engine: Engine,
    pub placement: SystemClient,
    pub cfg: LeaseConfig,
    pub wake: Arc<Notify>,
}

pub(super) async fn keep_loop(k: Keeper) {
    let rate = f64::from(k.cfg.max_expiries_per_second);
    let cap = (rate * TICK.as_secs_f64()).max(1.0);
    let mut tokens = cap;
    let mut last = Instant::now();
    let k = Arc::new(k);
    // Aborted with this loop (at shutdown), not left running on its own.
    let mut revoking: Option<AbortOnDrop> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = k.wake.notified() => {}
        }
        let now = Instant::now();
        tokens = (tokens + rate * (now - last).as_secs_f64()).min(cap);
        last = now;
        if tokens >= 1.0 {
            tokens -= expire(&k, tokens as usize).await as f64;
        }
        if revoking.as_ref().is_none_or(|t| t.0.is_finished()) {
            revoking = Some(AbortOnDrop(tokio::spawn(revoke(k.clone()))));
        }
        metrics::gauge!("tessera_leases").set(k.lessor.live() as f64);
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Proposes `cmd` to the local peer of `region` at its current epoch.
async fn propose(router: &Router, region: RegionId, cmd: Command) -> Result<ApplyResult, String> {
    let (tx, rx) = oneshot::channel();
    router
        .send(region, PeerMsg::Describe(tx))
        .map_err(|_| format!("{region} is not on this node"))?;
    let info = rx.await.map_err(|_| "the region dropped the request")?;
    let (reply, rx) = oneshot::channel();
    let msg = PeerMsg::Propose {
        cmd,
        epoch: info.region.epoch.unwrap_or_default(),
        write_id: None,
        reply,
    };
    router
        .send(region, msg)
        .map_err(|_| format!("{region} is not on this node"))?;
    match tokio::time::timeout(PROPOSE_TIMEOUT, rx).await {
        Ok(Ok(Ok(r))) => Ok(r),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(_)) => Err("the proposal was dropped".into()),
        Err(_) => Err("no answer in time".into()),
    }
}

/// Whether this node still leads `region`: a linearizable read through it.
async fn leads(router: &Router, region: RegionId) -> bool {
    let (reply, rx) = oneshot::channel();
    let msg = PeerMsg::Read {
        req: ReadRequest::BatchGet { keys: Vec::new() },
        epoch: Default::default(),
        linearizable: true,
        at: 0,
        reply,
    };
    router.send(region, msg).is_ok()
        && matches!(
            tokio::time::timeout(PROPOSE_TIMEOUT, rx).await,
            Ok(Ok(Ok(_)))
        )
}

/// Proposes the expiry of up to `budget` leases; returns how many it handed out.
async fn expire(k: &Keeper, budget: usize) -> usize {
    let due = k.lessor.expired(budget);
    let mut n = 0;
    for (region, leases) in due {
        n += leases.len();
        if !leads(&k.router, region).await {
            continue;
        }
        let (ids, deadlines_ms) = leases.into_iter().unzip();
        let cmd = Command::Lease(LeaseCmd::Revoke { ids, deadlines_ms });
        match propose(&k.router, region, cmd).await {
            Ok(ApplyResult::Lease { ttls_ms, .. }) => {
                let expired = ttls_ms.iter().filter(|t| **t > 0).count();
                metrics::counter!("tessera_lease_expiries_total").increment(expired as u64);
            }
            Ok(other) => tracing::warn!(%region, ?other, "unexpected result of a lease expiry"),
            Err(e) => tracing::debug!(%region, error = %e, "lease expiry not proposed"),
        }
    }
    n
}

/// The keys attached to lease `id` (in this node's applied state of its region).
fn attached(engine: &Engine, id: u64) -> Result<Vec<Vec<u8>>, String> {
    let (_, end) = lease_rows(id);
    let start = keys::data_key(&lease_attached_row(id, b""));
    let mut out = Vec::new();
    engine
        .scan(Cf::Data, &start, &keys::data_key(&end), |k, _| {
            if let Some(key) = parse_lease_attached_row(id, &k[1..]) {
                out.push(key.to_vec());
            }
            Ok(true)
        })
        .map_err(|e| e.to_string())?;
    Ok(out)
}

/// Deletes the keys of revoked leases that are old enough, then removes the leases.
async fn revoke(k: Arc<Keeper>) {
    let wait = k.cfg.attach_window_ms + 2 * k.cfg.max_clock_skew_ms;
    let mut due = k.lessor.revoked(Duration::from_millis(wait));
    // In random order: leases whose keys cannot be deleted now do not starve the others.
    {
        use rand::seq::SliceRandom;
        let mut rng = rand::rng();
        due.shuffle(&mut rng);
        for (_, ids) in due.iter_mut() {
            ids.shuffle(&mut rng);
        }
    }
    if due.is_empty() {
        return;
    }
    let Ok(client) = k.placement.get().await else {
        return;
    };
    let mut budget = MAX_REVOKE_PER_PASS;
    for (region, ids) in due {
        let ids: Vec<u64> = ids.into_iter().take(budget).collect();
        budget -= ids.len();
        let mut work = Vec::new();
        let mut unreadable = Vec::new();
        for &id in &ids {
            match attached(&k.engine, id) {
                Ok(keys) => work.extend(keys.into_iter().map(|key| (id, key))),
                Err(e) => {
                    tracing::warn!(%region, lease = id, error = %e, "cannot read a lease's keys");
                    unreadable.push(id);
                }
            }
        }
        let failed: Vec<u64> = futures::stream::iter(work)
            .map(|(id, key)| {
                let client = client.clone();
                async move {
                    let cas = client.cas(&key, Compare::Lease(id), CasAction::Delete);
                    match tokio::time::timeout(DELETE_TIMEOUT, cas).await {
                        Ok(Ok(res)) => {
                            // Tests: the keeper's node dies half way through a revocation.
                            fail::fail_point!("lease_key_deleted", |_| std::process::exit(75));
                            if res.succeeded {
                                metrics::counter!("tessera_lease_keys_deleted_total").increment(1);
                            }
                            None
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(lease = id, error = %e, "lease key not deleted yet");
                            Some(id)
                        }
                        Err(_) => Some(id),
                    }
                }
            })
            .buffer_unordered(DELETES_IN_FLIGHT)
            .filter_map(|f| async move { f })
            .collect()
            .await;
        let done: Vec<u64> = ids
            .into_iter()
            .filter(|id| !failed.contains(id) && !unreadable.contains(id))
            .collect();
        if done.is_empty() {
            continue;
        }
        let n = done.len();
        match propose(
            &k.router,
            region,
            Command::Lease(LeaseCmd::Remove { ids: done }),
        )
        .await
        {
            Ok(_) => metrics::counter!("tessera_lease_revocations_total").increment(n as u64),
            Err(e) => tracing::debug!(%region, error = %e, "lease removal not proposed"),
        }
        if budget == 0 {
            break;
        }
    }
}
