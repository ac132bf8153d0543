//! How a call finds its region's leader and retries: the node to try on each attempt
//! (leader first, peers in turn, recently failed nodes last), what a region error does to the
//! cache, which RPC failures are ambiguous, and the backoff until the call's deadline.

use std::time::{Duration, Instant};

use rand::Rng;
use tonic::{Code, Status};

use super::cache::CachedRegion;
use super::mux::{Conn, NOT_SENT};
use super::{Client, Error, Result};
use crate::proto::{self, region_error, RequestHeader};

/// How long a node that failed an RPC is tried last.
const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// Whether an RPC failure may have happened after the server applied the request.
fn ambiguous(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    ) && !s.message().contains("tcp connect error")
        && !s.message().starts_with(NOT_SENT)
        && !s.message().contains("Connection refused")
}

pub(super) enum Attempt<T> {
    Done(T),
    Retry(String),
}

impl Client {
    /// Before retry number `attempts`: fails with `Deadline` once the call's time is up,
    /// otherwise sleeps a jittered, doubling backoff (10 ms to 700 ms).
    pub(super) async fn backoff(&self, start: Instant, attempts: u32, last: &str) -> Result<()> {
        if start.elapsed() >= self.inner.opts.deadline {
            return Err(Error::Deadline {
                attempts,
                elapsed: start.elapsed(),
                last: last.to_string(),
            });
        }
        self.inner
            .stats
            .retries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = 10u64 << attempts.min(6);
        let jitter = rand::rng().random_range(0..=base / 2);
        tokio::time::sleep(Duration::from_millis((base + jitter).min(700))).await;
        Ok(())
    }

    /// Applies a region error to the cache; returns a description for the retry log.
    pub(super) async fn on_region_error(&self, r: &CachedRegion, e: proto::RegionError) -> String {
        self.inner
            .stats
            .region_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut refresh = false;
        {
            let mut cache = self
                .inner
                .cache
                .write()
                .expect("region cache lock poisoned");
            match e.error {
                Some(region_error::Error::NotLeader(nl)) => {
                    if let Some(l) = nl.leader.as_ref() {
                        // Another node names it as the leader: worth trying again.
                        self.inner.suspects.remove(&l.node_id);
                        if !nl.leader_addr.is_empty() {
                            self.inner.nodes.insert(l.node_id, nl.leader_addr.clone());
                        }
                    }
                    cache.set_leader(r.region.id, nl.leader);
                }
                Some(region_error::Error::EpochNotMatch(en)) => {
                    for cur in en.current_regions {
                        cache.insert(cur, None);
                    }
                }
                Some(region_error::Error::ServerBusy(_)) => {}
                _ => {
                    cache.invalidate(r.region.id);
                    refresh = true;
                }
            }
        }
        if refresh && self.inner.opts.system {
            let _ = self.refresh().await;
        }
        e.message
    }

    /// The node to try for region `r` on attempt `n`: its leader if known, else its peers in
    /// turn.
    pub(super) fn target(&self, r: &CachedRegion, n: u32) -> Option<(u64, String)> {
        let node = match &r.leader {
            Some(l) if !self.suspect(l.node_id) => l.node_id,
            _ if r.region.peers.is_empty() => return None,
            _ => {
                // Peers in turn from attempt n, skipping suspects while there is another.
                let len = r.region.peers.len();
                (0..len)
                    .map(|i| r.region.peers[(n as usize + i) % len].node_id)
                    .find(|id| !self.suspect(*id))
                    .unwrap_or(r.region.peers[n as usize % len].node_id)
            }
        };
        self.inner.nodes.get(&node).map(|a| (node, a.clone()))
    }

    pub(super) fn suspect(&self, node: u64) -> bool {
        match self.inner.suspects.get(&node).map(|t| *t) {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                self.inner.suspects.remove(&node);
                false
            }
            None => false,
        }
    }

    /// Runs `op` against the region holding `key`, fixing the route and retrying until it
    /// answers or the deadline passes.
    pub(super) async fn execute<T, F, Fut>(
        &self,
        key: &[u8],
        retry_ambiguous: bool,
        op: F,
    ) -> Result<T>
    where
        F: Fn(Conn, RequestHeader) -> Fut,
        Fut: std::future::Future<
            Output = std::result::Result<(Option<proto::RegionError>, T), Status>,
        >,
    {
        let start = Instant::now();
        let mut attempts = 0u32;
        let mut last = String::new();
        loop {
            if attempts > 0 {
                self.backoff(start, attempts, &last).await?;
            }
            attempts += 1;
            let region = match self.locate(key).await {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            match self
                .attempt(&region, attempts, retry_ambiguous, &op)
                .await?
            {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry(why) => last = why,
            }
        }
    }

    pub(super) async fn attempt<T, F, Fut>(
        &self,
        region: &CachedRegion,
        n: u32,
        retry_ambiguous: bool,
        op: &F,
    ) -> Result<Attempt<T>>
    where
        F: Fn(Conn, RequestHeader) -> Fut,
        Fut: std::future::Future<
            Output = std::result::Result<(Option<proto::RegionError>, T), Status>,
        >,
    {
        let Some((node, addr)) = self.target(region, n) else {
            let _ = self.refresh().await;
            return Ok(Attempt::Retry(format!(
                "no address for region {}",
                region.region.id
            )));
        };
        let ch = match self.channel(&addr).await {
            Ok(ch) => ch,
            Err(e) => {
                self.rpc_failed(region, node);
                return Ok(Attempt::Retry(e));
            }
        };
        let res = op(ch, self.header(region)).await;
        if res.is_ok() && !self.inner.suspects.is_empty() {
            self.inner.suspects.remove(&node);
        }
        match res {
            Ok((None, v)) => Ok(Attempt::Done(v)),
            Ok((Some(e), _)) => Ok(Attempt::Retry(self.on_region_error(region, e).await)),
            Err(s) if s.code() == Code::InvalidArgument => {
                Err(Error::InvalidArgument(s.message().into()))
            }
            Err(s) if s.code() == Code::ResourceExhausted || s.code() == Code::OutOfRange => {
                Err(Error::InvalidArgument(s.message().into()))
            }
            Err(s) if ambiguous(&s) && !retry_ambiguous => {
                self.forget_channel(&addr);
                self.rpc_failed(region, node);
                Err(Error::Unknown(s.message().into()))
            }
            Err(s) => {
                self.forget_channel(&addr);
                self.rpc_failed(region, node);
                Ok(Attempt::Retry(format!("{addr}: {}", s.message())))
            }
        }
    }

    /// The node did not answer: forget it as leader so the next attempt tries another peer.
    pub(super) fn rpc_failed(&self, region: &CachedRegion, node: u64) {
        self.inner
            .stats
            .rpc_errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .suspects
            .insert(node, Instant::now() + SUSPECT_FOR);
        let mut cache = self
            .inner
            .cache
            .write()
            .expect("region cache lock poisoned");
        if region.leader.as_ref().is_some_and(|l| l.node_id == node) {
            cache.set_leader(region.region.id, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_after_sending_are_ambiguous() {
        // Never left the client: safe to retry, even a compare-and-swap.
        assert!(!ambiguous(&super::super::mux::not_sent(
            "connection closed"
        )));
        assert!(!ambiguous(&Status::unavailable(
            "tcp connect error: Connection refused"
        )));
        // Sent, answer lost: may have been applied.
        assert!(ambiguous(&Status::unavailable(
            "connection lost with the request in flight: reset"
        )));
        assert!(ambiguous(&Status::deadline_exceeded(
            "no answer within the RPC timeout"
        )));
        // A refusal is an answer.
        assert!(!ambiguous(&Status::invalid_argument(
            "key must not be empty"
        )));
    }
}
