//! Sessions, elections and locks, built as etcd's concurrency package is
//! (docs/architecture.md, "Leases").
//!
//! A [`Session`] is a lease kept alive in the background. Every contender for a lock or an
//! election under a prefix puts one key, `prefix/<lease id in hex>`, attached to its
//! session's lease; the key with the lowest `create_revision` holds the lock (leads). The
//! others each wait for the deletion of the one key just before theirs — never all of them
//! for the holder's (no herd) — then look again. A contender whose session ends loses its
//! key with the lease, so a dead holder's lock passes on within its TTL. The holder's
//! `create_revision` is a fencing token: it only grows from one holder to the next.
//!
//! Invariants:
//! - a contender holds the lock only while its key exists and no key under the prefix has
//!   a lower `create_revision`; `lock` and `campaign` return only after seeing that;
//! - waiting reads the contenders at one revision `R` and watches the predecessor from
//!   `R + 1`, so a deletion between the read and the watch is not missed.

use std::time::Duration;

use futures::StreamExt;

use super::keepalive::KeepAlive;
use super::watch::{EventKind, WatchOptions};
use super::{CasAction, Client, Compare, Error, Result};
use crate::proto::KeyValue;
use tessera_api::keys::prefix_end;

/// A lease kept alive until it is closed or lost.
pub struct Session {
    client: Client,
    lease: u64,
    ttl: Duration,
    keep: KeepAlive,
}

impl Session {
    /// Grants a lease of `ttl` and keeps it alive.
    pub async fn new(client: &Client, ttl: Duration) -> Result<Session> {
        // The grant may apply well before its answer comes (a retry answered from the first
        // attempt): the lease's time runs from when it was asked for.
        let asked = std::time::Instant::now();
        let (lease, ttl) = client.lease_grant(ttl).await?;
        Ok(Session {
            client: client.clone(),
            lease,
            ttl,
            keep: client.keep_alive_since(lease, ttl, asked),
        })
    }

    pub fn lease(&self) -> u64 {
        self.lease
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Waits until the session's lease is lost (expired or revoked); says why.
    pub async fn lost(&mut self) -> String {
        self.keep.lost().await
    }

    pub fn is_lost(&self) -> bool {
        self.keep.is_lost()
    }

    /// Ends the session: its lease is revoked, so its keys (held locks, candidacies) go.
    pub async fn close(self) -> Result<()> {
        let id = self.lease;
        drop(self.keep);
        match self.client.lease_revoke(id).await {
            Ok(()) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn contender_key(prefix: &[u8], lease: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.push(b'/');
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

fn dir(prefix: &[u8]) -> Vec<u8> {
    let mut d = prefix.to_vec();
    d.push(b'/');
    d
}

/// The contenders under `prefix` at revision `rev`, lowest `create_revision` first.
async fn contenders(client: &Client, prefix: &[u8], rev: u64) -> Result<Vec<KeyValue>> {
    let d = dir(prefix);
    let mut all = client.scan_at(&d, &prefix_end(&d), 0, rev).await?;
    all.sort_by_key(|kv| kv.create_revision);
    Ok(all)
}

/// Waits until no key under `prefix` has a `create_revision` below `mine`: each round
/// watches only the nearest older one. Returns the revision at which none was left.
/// `broken` (tests only) skips the wait: a lock that is not one.
async fn wait_predecessors(client: &Client, prefix: &[u8], mine: u64, broken: bool) -> Result<u64> {
    loop {
        let rev = client.current_revision().await?;
        if broken {
            return Ok(rev);
        }
        let all = contenders(client, prefix, rev).await?;
        let Some(pred) = all.iter().rev().find(|kv| kv.create_revision < mine) else {
            return Ok(rev);
        };
        let mut end = pred.key.clone();
        end.push(0);
        let opts = WatchOptions {
            start_revision: rev + 1,
            no_put: true,
            ..Default::default()
        };
        let mut w = client.watch(&pred.key, &end, opts).await?;
        loop {
            match w.next().await {
                Some(Ok(resp)) if resp.events.iter().any(|e| e.kind == EventKind::Delete) => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Err(Error::Unavailable("the watch ended".into())),
            }
        }
    }
}

/// Puts this session's contender key (if absent) and returns its `create_revision`.
async fn enter(client: &Client, key: &[u8], value: &[u8], lease: u64) -> Result<u64> {
    let r = client
        .cas_with_lease(key, Compare::Absent, CasAction::Put(value.to_vec()), lease)
        .await?;
    if r.succeeded {
        return Ok(r.revision);
    }
    match r.prev {
        Some(kv) if kv.lease == lease => Ok(kv.create_revision),
        _ => Err(Error::Refused(format!(
            "{} is held by another lease",
            String::from_utf8_lossy(key)
        ))),
    }
}

/// Whether `key` still exists with `lease` (the session did not end meanwhile).
async fn still_ours(client: &Client, key: &[u8], lease: u64, rev: u64) -> Result<()> {
    match client.get(key).await? {
        Some(kv) if kv.lease == lease && kv.create_revision == rev => Ok(()),
        _ => Err(Error::Refused(
            "the session's lease ended while waiting".into(),
        )),
    }
}

/// A distributed lock under a key prefix.
pub struct Mutex {
    client: Client,
    lease: u64,
    prefix: Vec<u8>,
    key: Vec<u8>,
    rev: u64,
    acquired: u64,
    broken: bool,
}

impl Mutex {
    pub fn new(session: &Session, prefix: &[u8]) -> Mutex {
        Mutex {
            client: session.client.clone(),
            lease: session.lease,
            prefix: prefix.to_vec(),
            key: contender_key(prefix, session.lease),
            rev: 0,
            acquired: 0,
            broken: false,
        }
    }

    /// Waits until this session holds the lock.
    pub async fn lock(&mut self) -> Result<()> {
        self.rev = enter(&self.client, &self.key, b"", self.lease).await?;
        self.acquired =
            wait_predecessors(&self.client, &self.prefix, self.rev, self.broken).await?;
        still_ours(&self.client, &self.key, self.lease, self.rev).await
    }

    /// The revision at which the lock was found free of older contenders.
    pub fn acquired_revision(&self) -> u64 {
        self.acquired
    }

    /// Tests only: a lock that does not wait for the contenders before it — a broken lock,
    /// for showing that a checker of mutual exclusion catches one.
    #[doc(hidden)]
    pub fn break_for_testing(&mut self) {
        self.broken = true;
    }

    /// Releases the lock (deletes this session's key).
    pub async fn unlock(&mut self) -> Result<()> {
        self.client
            .cas(&self.key, Compare::Lease(self.lease), CasAction::Delete)
            .await?;
        self.rev = 0;
        Ok(())
    }

    /// The key this session holds the lock with.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The fencing token: the holder key's `create_revision` (0 when not locked).
    pub fn token(&self) -> u64 {
        self.rev
    }
}

/// A leader election under a key prefix.
pub struct Election {
    client: Client,
    lease: u64,
    prefix: Vec<u8>,
    key: Vec<u8>,
    rev: u64,
    acquired: u64,
    broken: bool,
}

impl Election {
    pub fn new(session: &Session, prefix: &[u8]) -> Election {
        Election {
            client: session.client.clone(),
            lease: session.lease,
            prefix: prefix.to_vec(),
            key: contender_key(prefix, session.lease),
            rev: 0,
            acquired: 0,
            broken: false,
        }
    }

    /// The revision at which this session was found to lead (no older contender left).
    pub fn acquired_revision(&self) -> u64 {
        self.acquired
    }

    /// Tests only: campaign without waiting for older contenders — a broken election, for
    /// showing that a checker of mutual exclusion catches one.
    #[doc(hidden)]
    pub fn break_for_testing(&mut self) {
        self.broken = true;
    }

    /// Waits until this session leads, proclaiming `value`.
    pub async fn campaign(&mut self, value: &[u8]) -> Result<()> {
        self.rev = enter(&self.client, &self.key, value, self.lease).await?;
        self.acquired =
            wait_predecessors(&self.client, &self.prefix, self.rev, self.broken).await?;
        still_ours(&self.client, &self.key, self.lease, self.rev).await?;
        self.proclaim(value).await
    }

    /// Sets the leader's value; [`Error::Refused`] unless this session leads (or
    /// campaigns).
    pub async fn proclaim(&self, value: &[u8]) -> Result<()> {
        let r = self
            .client
            .cas_with_lease(
                &self.key,
                Compare::Lease(self.lease),
                CasAction::Put(value.to_vec()),
                self.lease,
            )
            .await?;
        if r.succeeded {
            Ok(())
        } else {
            Err(Error::Refused(
                "not the leader: the candidacy is gone".into(),
            ))
        }
    }

    /// Gives up leadership (or the candidacy).
    pub async fn resign(&mut self) -> Result<()> {
        self.client
            .cas(&self.key, Compare::Lease(self.lease), CasAction::Delete)
            .await?;
        self.rev = 0;
        Ok(())
    }

    /// This session's key under the election's prefix.
    pub fn key_bytes(&self) -> &[u8] {
        &self.key
    }

    /// The fencing token: this leader key's `create_revision` (0 when not campaigning).
    pub fn token(&self) -> u64 {
        self.rev
    }

    /// The current leader under `prefix`: its key and value.
    pub async fn leader(client: &Client, prefix: &[u8]) -> Result<Option<KeyValue>> {
        let rev = client.current_revision().await?;
        Ok(contenders(client, prefix, rev).await?.into_iter().next())
    }

    /// Follows the leader under `prefix`: each [`Observer::next`] returns the leader once it
    /// differs from the last one returned (`None`: nobody leads).
    pub fn observe(client: &Client, prefix: &[u8]) -> Observer {
        Observer {
            client: client.clone(),
            prefix: prefix.to_vec(),
            last: None,
            first: true,
        }
    }
}

/// The leader of an election as it changes (see [`Election::observe`]).
pub struct Observer {
    client: Client,
    prefix: Vec<u8>,
    /// The last leader returned: key, create revision, value.
    last: Option<(Vec<u8>, u64, Vec<u8>)>,
    first: bool,
}

impl Observer {
    /// Waits for the next change of leader (or of the leader's value).
    pub async fn next(&mut self) -> Result<Option<KeyValue>> {
        loop {
            let rev = self.client.current_revision().await?;
            let leader = contenders(&self.client, &self.prefix, rev)
                .await?
                .into_iter()
                .next();
            let now = leader
                .as_ref()
                .map(|kv| (kv.key.clone(), kv.create_revision, kv.value.clone()));
            if self.first || now != self.last {
                self.first = false;
                self.last = now;
                return Ok(leader);
            }
            let d = dir(&self.prefix);
            let opts = WatchOptions {
                start_revision: rev + 1,
                ..Default::default()
            };
            let mut w = self.client.watch(&d, &prefix_end(&d), opts).await?;
            match w.next().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Err(Error::Unavailable("the watch ended".into())),
            }
        }
    }
}
