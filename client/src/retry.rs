//! How a call finds its region's leader and retries: the node to try on each attempt
//! (leader first, peers in turn, recently failed nodes last), what a region error does to the
//! cache, what each RPC failure means, and the backoff until the call's deadline.
//!
//! An RPC failure is one of three kinds ([`Failure`]): *not sent* (the request never left
//! the client: an allow list of causes), *ambiguous* (it may have executed: the connection
//! broke or timed out with it in flight), or *fatal* (any other status: the server answered,
//! and retrying would get the same answer). Not-sent failures and region errors are always
//! retried; ambiguous ones are retried by idempotent calls and by writes, whose write id
//! makes the retry exactly-once; fatal ones end the call.
//!
//! Region errors that a fresh route or a short wait can fix (`NotLeader`, `EpochNotMatch`,
//! `KeyNotInRegion`, `RegionNotFound`, `ServerBusy`) are retried; `Refused` and `Internal`
//! are answers and end the call.
//!
//! Invariants:
//! - the deadline is checked before each retry, not during an attempt: a call may outlast
//!   it by one RPC timeout; one backoff sleeps at most 700 ms;
//! - once an attempt of a write may have executed, the call ends in success or
//!   `Error::Unknown` (`unknown_if`); an `AtMostOnce` call is never sent again after an
//!   ambiguous failure;
//! - every attempt of a write sends the same write id; `StaleWrite` ends the call as
//!   `Unknown` rather than guess;
//! - a node that failed an RPC is tried last for 3 s, but still tried when every peer of
//!   the region is suspect.

use std::time::{Duration, Instant};

use rand::Rng;
use tonic::{Code, Status};

use super::cache::CachedRegion;
use super::mux::{Conn, NOT_SENT};
use super::write_id::WriteTicket;
use super::{Client, Error, Result};
use crate::proto::{self, region_error, RequestHeader};

/// How long a node that failed an RPC is tried last.
const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// What an RPC failure says about the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// It never reached the server: safe to send again, whatever it is.
    NotSent,
    /// It may have executed (sent, then the connection broke or the answer did not come).
    Ambiguous,
    /// The server answered with an error that a retry would get again.
    Fatal,
}

/// Classifies an RPC failure. "Not sent" is an allow list of causes that prove the request
/// did not leave this client; only transport-level codes are ambiguous; every other status
/// is an answer.
pub(super) fn classify(s: &Status) -> Failure {
    let msg = s.message();
    let transport_code = matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    );
    if transport_code
        && (msg.starts_with(NOT_SENT)
            || msg.contains("tcp connect error")
            || msg.contains("Connection refused"))
    {
        return Failure::NotSent;
    }
    // A broken HTTP/2 stream or connection (a reset with INTERNAL_ERROR among them) is
    // reported as `Internal` or `Unknown` by tonic: the request may have been executed.
    let h2_broken = s.code() == Code::Internal
        && (msg.contains("h2 protocol error")
            || msg.contains("stream error")
            || msg.contains("connection error")
            || msg.contains("error reading a body from connection"));
    if transport_code || h2_broken {
        Failure::Ambiguous
    } else {
        Failure::Fatal
    }
}

/// How a call may be retried after an ambiguous failure.
#[derive(Clone, Copy)]
pub(super) enum Mode<'a> {
    /// Repeating it is harmless (reads, and admin calls that check their own state).
    Idempotent,
    /// It must not run twice and has no write id: an ambiguous failure ends the call with
    /// [`Error::Unknown`].
    AtMostOnce,
    /// A write with an id: every retry carries the same id, so the regions apply it once.
    Write(&'a WriteTicket),
}

pub(super) enum Attempt<T> {
    Done(T),
    /// Not done; `ambiguous` = the attempt may have executed.
    Retry {
        why: String,
        ambiguous: bool,
    },
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
    pub(super) async fn execute<T, F, Fut>(&self, key: &[u8], mode: Mode<'_>, op: F) -> Result<T>
    where
        F: Fn(Conn, RequestHeader) -> Fut,
        Fut: std::future::Future<
            Output = std::result::Result<(Option<proto::RegionError>, T), Status>,
        >,
    {
        let start = Instant::now();
        let mut attempts = 0u32;
        let mut last = String::new();
        let mut ambiguous = false;
        loop {
            if attempts > 0 {
                self.backoff(start, attempts, &last)
                    .await
                    .map_err(|e| unknown_if(ambiguous && matches!(mode, Mode::Write(_)), e))?;
            }
            attempts += 1;
            let region = match self.locate(key).await {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let res = self.attempt(&region, attempts, mode, &op).await;
            match res.map_err(|e| unknown_if(ambiguous && matches!(mode, Mode::Write(_)), e))? {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry { why, ambiguous: a } => {
                    ambiguous |= a;
                    last = why;
                }
            }
        }
    }

    pub(super) async fn attempt<T, F, Fut>(
        &self,
        region: &CachedRegion,
        n: u32,
        mode: Mode<'_>,
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
            return Ok(Attempt::Retry {
                why: format!("no address for region {}", region.region.id),
                ambiguous: false,
            });
        };
        let ch = match self.channel(&addr).await {
            Ok(ch) => ch,
            Err(e) => {
                self.rpc_failed(region, node);
                return Ok(Attempt::Retry {
                    why: e,
                    ambiguous: false,
                });
            }
        };
        let mut header = self.header(region);
        if let Mode::Write(t) = mode {
            header.write_id = Some(t.id());
        }
        let res = op(ch, header).await;
        if res.is_ok() && !self.inner.suspects.is_empty() {
            self.inner.suspects.remove(&node);
        }
        match res {
            Ok((None, v)) => Ok(Attempt::Done(v)),
            Ok((Some(e), _)) => {
                match &e.error {
                    Some(region_error::Error::StaleWrite(w)) => {
                        // Only a copy of a finished write gets this; this call is not
                        // finished, so the server and client disagree on the write's number:
                        // give up rather than guess.
                        return Err(Error::Unknown(format!(
                            "the cluster took write {} as a copy of a finished one",
                            w.seq
                        )));
                    }
                    // Definite answers: a retry would get the same one.
                    Some(region_error::Error::Refused(r)) => {
                        return Err(Error::Refused(r.reason.clone()))
                    }
                    Some(region_error::Error::Internal(r)) => {
                        return Err(Error::Server(r.reason.clone()))
                    }
                    Some(region_error::Error::Compacted(c)) => {
                        return Err(Error::Compacted {
                            compact_revision: c.compact_revision,
                        })
                    }
                    _ => {}
                }
                Ok(Attempt::Retry {
                    why: self.on_region_error(region, e).await,
                    ambiguous: false,
                })
            }
            Err(s) if s.code() == Code::InvalidArgument => {
                Err(Error::InvalidArgument(s.message().into()))
            }
            Err(s) if s.code() == Code::NotFound => Err(Error::NotFound(s.message().into())),
            Err(s) if s.code() == Code::PermissionDenied => {
                Err(Error::PermissionDenied(s.message().into()))
            }
            // Refused before it ran: log in again (a token invalidated by a password
            // change, or one that expired while the client could not renew it) and retry.
            Err(s) if s.code() == Code::Unauthenticated => {
                if self.inner.opts.credentials.is_none() {
                    return Err(Error::Unauthenticated(s.message().into()));
                }
                self.login().await?;
                // Its command stream was opened with the old token.
                self.forget_channel(&addr);
                Ok(Attempt::Retry {
                    why: format!("{addr}: {}", s.message()),
                    ambiguous: false,
                })
            }
            Err(s)
                if s.code() == Code::ResourceExhausted
                    && s.message().starts_with(tessera_api::limits::QUOTA_EXCEEDED) =>
            {
                Err(Error::QuotaExceeded(s.message().into()))
            }
            Err(s) if s.code() == Code::ResourceExhausted || s.code() == Code::OutOfRange => {
                Err(Error::InvalidArgument(s.message().into()))
            }
            Err(s) => {
                let failure = classify(&s);
                if failure == Failure::Fatal {
                    return Err(Error::Server(format!("{:?}: {}", s.code(), s.message())));
                }
                self.forget_channel(&addr);
                self.rpc_failed(region, node);
                let ambiguous = failure == Failure::Ambiguous;
                if ambiguous && matches!(mode, Mode::AtMostOnce) {
                    return Err(Error::Unknown(s.message().into()));
                }
                Ok(Attempt::Retry {
                    why: format!("{addr}: {}", s.message()),
                    ambiguous,
                })
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

/// The error a write ends with once one of its attempts may have executed: whatever a later
/// attempt met (the deadline, a refusal, an error answer), the write's outcome is unknown.
pub(super) fn unknown_if(ambiguous_write: bool, e: Error) -> Error {
    match e {
        e if !ambiguous_write => e,
        Error::Unknown(m) => Error::Unknown(m),
        Error::Deadline { last, .. } => Error::Unknown(format!(
            "deadline passed after an ambiguous attempt: {last}"
        )),
        e => Error::Unknown(format!("after an ambiguous attempt: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_by_what_they_prove() {
        // Never left the client: safe to send again, even a compare-and-swap.
        assert_eq!(
            classify(&super::super::mux::not_sent("connection closed")),
            Failure::NotSent
        );
        assert_eq!(
            classify(&Status::unavailable(
                "tcp connect error: Connection refused"
            )),
            Failure::NotSent
        );
        // Sent, answer lost: may have been applied.
        assert_eq!(
            classify(&Status::unavailable(
                "connection lost with the request in flight: reset"
            )),
            Failure::Ambiguous
        );
        assert_eq!(
            classify(&Status::deadline_exceeded(
                "no answer within the RPC timeout"
            )),
            Failure::Ambiguous
        );
        assert_eq!(
            classify(&Status::internal(
                "h2 protocol error: stream error received: unexpected internal error encountered"
            )),
            Failure::Ambiguous
        );
        // Answers: a retry would get them again.
        for s in [
            Status::internal("unexpected put result"),
            Status::permission_denied("no"),
            Status::unimplemented("Kv.Frobnicate"),
            Status::failed_precondition("no"),
            Status::not_found("no"),
        ] {
            assert_eq!(classify(&s), Failure::Fatal, "{s:?}");
        }
    }
}
