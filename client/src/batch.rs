//! Multi-key calls: keys grouped by region, one request per region, regions in parallel.
//!
//! Invariants:
//! - answers come back in the order of the keys asked for; a region that answers a
//!   different number of keys than it was asked for is an error, not a guess;
//! - a key keeps the write id it was first sent with until the call ends (`per_region`);
//! - `batch_write` checks every key before sending anything: an empty or reserved key
//!   fails the call with nothing written;
//! - a batch write is atomic within each region, not across regions.

use std::time::Instant;

use tonic::Status;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::cache::CachedRegion;
use super::mux::Conn;
use super::retry::{unknown_if, Mode};
use super::write_id::WriteTicket;
use super::{Attempt, Client, Error, Result};
use crate::proto::{self, KeyValue, RequestHeader};
use tessera_api::keys::is_system_key;

impl Client {
    /// Runs `op` once per region for the keys it holds, all regions in parallel; keys whose
    /// region answered with a routing error are grouped again and retried until the deadline.
    /// Returns each group's key indices with its answer.
    ///
    /// With `writes`, each group is a write with an id, and a key keeps the id it was first
    /// sent with until the call ends — also after a refusal, which proves only that *that*
    /// attempt did not apply, not an earlier ambiguous one. Keys are grouped by region and
    /// id: sent again in one group, or in several if the region split meanwhile, they carry
    /// their id, and a region that applied it (before a split, the records were copied to
    /// both halves) answers from its records. Keys never sent yet share a new id per region.
    async fn per_region<R, F, Fut>(
        &self,
        keys: &[&[u8]],
        writes: bool,
        op: F,
    ) -> Result<Vec<(Vec<usize>, R)>>
    where
        F: Fn(Conn, RequestHeader, Vec<usize>) -> Fut,
        Fut: std::future::Future<
            Output = std::result::Result<(Option<proto::RegionError>, R), Status>,
        >,
    {
        let start = Instant::now();
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        let mut out = Vec::new();
        let mut attempts = 0u32;
        let mut last = String::new();
        // Each key's write id once it has been sent, and whether any attempt was ambiguous.
        let mut ids: HashMap<usize, Arc<WriteTicket>> = HashMap::new();
        let mut ambiguous = false;
        while !pending.is_empty() {
            if attempts > 0 {
                self.backoff(start, attempts, &last)
                    .await
                    .map_err(|e| unknown_if(ambiguous && writes, e))?;
            }
            attempts += 1;
            // (region, id of the keys' earlier attempts; 0 = none yet) → keys.
            type Group = (CachedRegion, Vec<usize>, Option<Arc<WriteTicket>>);
            let mut groups: BTreeMap<(u64, usize), Group> = BTreeMap::new();
            let mut unrouted = Vec::new();
            for i in pending.drain(..) {
                match self.locate(keys[i]).await {
                    Ok(r) => {
                        let id = ids.get(&i).cloned();
                        let tag = id.as_ref().map_or(0, |t| Arc::as_ptr(t) as usize);
                        groups
                            .entry((r.region.id, tag))
                            .or_insert((r, Vec::new(), id))
                            .1
                            .push(i)
                    }
                    Err(e) => {
                        last = e.to_string();
                        unrouted.push(i);
                    }
                }
            }
            let mut calls = Vec::new();
            for (region, idx, id) in groups.into_values() {
                let ticket = match (writes, id) {
                    (false, _) => None,
                    (true, Some(t)) => Some(t),
                    (true, None) => {
                        let t = Arc::new(self.inner.writes.start());
                        for i in &idx {
                            ids.insert(*i, t.clone());
                        }
                        Some(t)
                    }
                };
                let op = &op;
                calls.push(async move {
                    let call = |c: Conn, h: RequestHeader| op(c, h, idx.clone());
                    let mode = match &ticket {
                        Some(t) => Mode::Write(t),
                        None => Mode::Idempotent,
                    };
                    let res = self.attempt(&region, attempts, mode, &call).await;
                    (idx, res)
                });
            }
            pending = unrouted;
            for (idx, res) in futures::future::join_all(calls).await {
                match res.map_err(|e| unknown_if(ambiguous && writes, e))? {
                    Attempt::Done(v) => out.push((idx, v)),
                    Attempt::Retry { why, ambiguous: a } => {
                        last = why;
                        ambiguous |= a;
                        pending.extend(idx);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads several keys: one request per region holding some of them, regions in
    /// parallel, each region's keys read at one point. Answers are in the order of `keys`.
    pub async fn batch_get(&self, keys: &[Vec<u8>]) -> Result<Vec<Option<KeyValue>>> {
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let groups = self
            .per_region(&refs, false, |conn, header, idx| {
                let keys: Vec<Vec<u8>> = idx.iter().map(|&i| keys[i].clone()).collect();
                async move {
                    let r = Self::kv(conn.ch)
                        .batch_get(proto::BatchGetRequest {
                            header: Some(header),
                            keys,
                        })
                        .await?
                        .into_inner();
                    Ok((r.region_error, r.kvs))
                }
            })
            .await?;
        let mut out = vec![None; keys.len()];
        for (idx, kvs) in groups {
            if kvs.len() != idx.len() {
                return Err(Error::Server(format!(
                    "batch get answered {} keys for {}",
                    kvs.len(),
                    idx.len()
                )));
            }
            for (i, kv) in idx.into_iter().zip(kvs) {
                out[i] = (!kv.key.is_empty()).then_some(kv);
            }
        }
        Ok(out)
    }

    /// Puts (`Some(value)`) and deletes (`None`) several keys: one raft entry per region
    /// holding some of them, regions in parallel. Atomic within each region, not across
    /// regions: if the call fails, some regions may have applied their part.
    /// Keys are checked before anything is sent, so an empty or reserved key fails the whole
    /// call with nothing written.
    pub async fn batch_write(&self, ops: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<()> {
        for (k, _) in ops {
            if k.is_empty() {
                return Err(Error::InvalidArgument("key must not be empty".into()));
            }
            if is_system_key(k) && !self.inner.opts.system {
                return Err(Error::InvalidArgument(
                    "keys starting with byte 0xFF are reserved for placement data".into(),
                ));
            }
        }
        let refs: Vec<&[u8]> = ops.iter().map(|(k, _)| k.as_slice()).collect();
        self.per_region(&refs, true, |conn, header, idx| {
            let ops: Vec<proto::BatchWriteOp> = idx
                .iter()
                .map(|&i| proto::BatchWriteOp {
                    key: ops[i].0.clone(),
                    value: ops[i].1.clone(),
                })
                .collect();
            async move {
                let r = Self::kv(conn.ch)
                    .batch_write(proto::BatchWriteRequest {
                        header: Some(header),
                        ops,
                    })
                    .await?
                    .into_inner();
                Ok((r.region_error, ()))
            }
        })
        .await?;
        Ok(())
    }
}
