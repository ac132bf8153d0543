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

/// One contender under a prefix: what a lock and an election both are.
struct Contender {
    client: Client,
    lease: u64,
    prefix: Vec<u8>,
    key: Vec<u8>,
    /// The key's `create_revision` (the fencing token); 0 when not contending.
    rev: u64,
    /// The revision at which no older contender was left.
    acquired: u64,
    /// Tests only: do not wait for older contenders.
    broken: bool,
}

impl Contender {
    fn new(session: &Session, prefix: &[u8]) -> Contender {
        Contender {
            client: session.client.clone(),
            lease: session.lease,
            prefix: prefix.to_vec(),
            key: contender_key(prefix, session.lease),
            rev: 0,
            acquired: 0,
            broken: false,
        }
    }

    /// Puts the contender's key with `value` (if absent), waits until no older contender is
    /// left, and checks the key is still there (the lease did not end meanwhile).
    async fn win(&mut self, value: &[u8]) -> Result<()> {
        let r = self
            .client
            .cas_with_lease(
                &self.key,
                Compare::Absent,
                CasAction::Put(value.to_vec()),
                self.lease,
            )
            .await?;
        self.rev = match r.prev {
            _ if r.succeeded => r.revision,
            Some(kv) if kv.lease == self.lease => kv.create_revision,
            _ => {
                return Err(Error::Refused(format!(
                    "{} is held by another lease",
                    String::from_utf8_lossy(&self.key)
                )))
            }
        };
        self.acquired =
            wait_predecessors(&self.client, &self.prefix, self.rev, self.broken).await?;
        match self.client.get(&self.key).await? {
            Some(kv) if kv.lease == self.lease && kv.create_revision == self.rev => Ok(()),
            _ => Err(Error::Refused(
                "the contender's lease ended while waiting".into(),
            )),
        }
    }

    /// Deletes the contender's key (if it is still this lease's).
    async fn leave(&mut self) -> Result<()> {
        self.client
            .cas(&self.key, Compare::Lease(self.lease), CasAction::Delete)
            .await?;
        self.rev = 0;
        Ok(())
    }
}

/// A distributed lock under a key prefix.
pub struct Mutex(Contender);

impl Mutex {
    pub fn new(session: &Session, prefix: &[u8]) -> Mutex {
        Mutex(Contender::new(session, prefix))
    }

    /// Waits until the session holds the lock.
    pub async fn lock(&mut self) -> Result<()> {
        self.0.win(b"").await
    }

    /// The revision at which the lock was found free of older contenders.
    pub fn acquired_revision(&self) -> u64 {
        self.0.acquired
    }

    /// Tests only: a lock that does not wait for the contenders before it — a broken lock,
    /// for showing that a checker of mutual exclusion catches one.
    #[doc(hidden)]
    pub fn break_for_testing(&mut self) {
        self.0.broken = true;
    }

    /// Releases the lock (deletes the holder's key).
    pub async fn unlock(&mut self) -> Result<()> {
        self.0.leave().await
    }

    /// The key the lock is held with.
    pub fn key(&self) -> &[u8] {
        &self.0.key
    }

    /// The fencing token: the holder key's `create_revision` (0 when not locked).
    pub fn token(&self) -> u64 {
        self.0.rev
    }
}

/// A leader election under a key prefix.
pub struct Election(Contender);

impl Election {
    pub fn new(session: &Session, prefix: &[u8]) -> Election {
        Election(Contender::new(session, prefix))
    }

    /// The revision at which the candidate was found to lead (no older contender left).
    pub fn acquired_revision(&self) -> u64 {
        self.0.acquired
    }

    /// Tests only: campaign without waiting for older contenders — a broken election, for
    /// showing that a checker of mutual exclusion catches one.
    #[doc(hidden)]
    pub fn break_for_testing(&mut self) {
        self.0.broken = true;
    }

    /// Waits until the session leads, proclaiming `value`.
    pub async fn campaign(&mut self, value: &[u8]) -> Result<()> {
        self.0.win(value).await?;
        self.proclaim(value).await
    }

    /// Sets the leader's value; [`Error::Refused`] unless the session leads (or
    /// campaigns).
    pub async fn proclaim(&self, value: &[u8]) -> Result<()> {
        let c = &self.0;
        let r = c
            .client
            .cas_with_lease(
                &c.key,
                Compare::Lease(c.lease),
                CasAction::Put(value.to_vec()),
                c.lease,
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
        self.0.leave().await
    }

    /// The candidate's key under the election's prefix.
    pub fn key_bytes(&self) -> &[u8] {
        &self.0.key
    }

    /// The fencing token: the leader key's `create_revision` (0 when not campaigning).
    pub fn token(&self) -> u64 {
        self.0.rev
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
