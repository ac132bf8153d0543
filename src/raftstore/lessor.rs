//! The leases of the lease regions this node leads, with their expiry times
//! (docs/architecture.md, "Leases").
//!
//! Only a region's leader holds its leases here. On taking the lead it loads them from its
//! applied state; from then on every lease command the region applies updates them, after
//! the round's batch is written. Deadlines are stored as wall-clock instants (the proposer's
//! clock, which may be another node's); here each becomes a monotonic instant when loaded or
//! applied — what is left by this node's clock plus `margin` (one election timeout, covering
//! clock differences) — so a clock step after that changes nothing, and a lease is never
//! expired before what is left of it, at most `margin` after.
//!
//! Invariants:
//! - a region is here only while this node leads it, loaded after the batch that made it
//!   leader was written; an untracked region's changes are ignored;
//! - a lease's `expires` moves only with a renewal applied here (or a reload);
//! - an expiry is handed out at most once per `REPROPOSE` per lease: a proposal that did not
//!   commit is retried, one that did removes it from the live set.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::apply::lease::LeaseChange;
use crate::ids::RegionId;
use crate::proto::{LeaseInfo, LeaseRecord};

/// How long an expiry proposal may take before it is handed out again.
const REPROPOSE: Duration = Duration::from_secs(1);

/// The wall clock in ms since the Unix epoch (0 before 1970): the time a leader stamps on
/// the entries it proposes (the log's time, see `session`), from which lease deadlines are
/// computed at apply — and so the clock this table turns them back into instants with.
pub fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Debug)]
struct Held {
    ttl_ms: u64,
    /// The stored deadline (the wall clock of the proposer that set it).
    deadline_ms: u64,
    /// When this node expires it.
    expires: Instant,
    /// Revoked at (wall clock, ms); 0 = live.
    revoked_at_ms: u64,
    /// When this node learnt of the revocation (applied or loaded it).
    revoked_seen: Option<Instant>,
    /// When its expiry was last handed out.
    expiry_proposed: Option<Instant>,
}

#[derive(Default)]
struct Inner {
    /// Per led region: its margin and leases.
    regions: HashMap<RegionId, (Duration, HashMap<u64, Held>)>,
}

/// The node's leases, shared by its workers (which apply) and the lease keeper (which
/// expires and revokes).
#[derive(Clone, Default)]
pub struct Lessor {
    inner: Arc<Mutex<Inner>>,
}

fn expires_at(now: Instant, now_ms: u64, deadline_ms: u64, margin: Duration) -> Instant {
    now + Duration::from_millis(deadline_ms.saturating_sub(now_ms)) + margin
}

impl Lessor {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node now leads `region`, whose applied state holds `leases`.
    pub fn lead(&self, region: RegionId, leases: Vec<(u64, LeaseRecord)>, margin: Duration) {
        let (now, now_ms) = (Instant::now(), wall_clock_ms());
        let held = leases
            .into_iter()
            .map(|(id, l)| {
                let h = Held {
                    ttl_ms: l.ttl_ms,
                    deadline_ms: l.deadline_ms,
                    expires: expires_at(now, now_ms, l.deadline_ms, margin),
                    revoked_at_ms: l.revoked_at_ms,
                    revoked_seen: (l.revoked_at_ms > 0).then_some(now),
                    expiry_proposed: None,
                };
                (id, h)
            })
            .collect();
        self.lock().regions.insert(region, (margin, held));
    }

    /// This node no longer leads `region` (or the peer is gone).
    pub fn forget(&self, region: RegionId) {
        self.lock().regions.remove(&region);
    }

    pub fn leads(&self, region: RegionId) -> bool {
        self.lock().regions.contains_key(&region)
    }

    /// Applies what `region` applied (ignored unless this node leads it).
    pub fn apply(&self, region: RegionId, changes: &[LeaseChange]) {
        let mut inner = self.lock();
        let Some((margin, leases)) = inner.regions.get_mut(&region) else {
            return;
        };
        let margin = *margin;
        let (now, now_ms) = (Instant::now(), wall_clock_ms());
        for c in changes {
            match *c {
                LeaseChange::Live {
                    id,
                    ttl_ms,
                    deadline_ms,
                } => {
                    let h = Held {
                        ttl_ms,
                        deadline_ms,
                        expires: expires_at(now, now_ms, deadline_ms, margin),
                        revoked_at_ms: 0,
                        revoked_seen: None,
                        expiry_proposed: None,
                    };
                    leases.insert(id, h);
                }
                LeaseChange::Revoked { id, at_ms } => {
                    if let Some(h) = leases.get_mut(&id) {
                        h.revoked_at_ms = at_ms;
                        h.revoked_seen = Some(now);
                    }
                }
                LeaseChange::Removed { id } => {
                    leases.remove(&id);
                }
            }
        }
    }

    /// Live leases past their expiry, at most `limit`, grouped by region, each with the
    /// stored deadline that passed; each is marked as handed out.
    pub fn expired(&self, limit: usize) -> Vec<(RegionId, Vec<(u64, u64)>)> {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut out = Vec::new();
        let mut n = 0;
        for (region, (_, leases)) in inner.regions.iter_mut() {
            let mut due = Vec::new();
            for (id, h) in leases.iter_mut() {
                if n >= limit {
                    break;
                }
                let retry = h.expiry_proposed.is_none_or(|t| now - t >= REPROPOSE);
                if h.revoked_at_ms == 0 && h.expires <= now && retry {
                    h.expiry_proposed = Some(now);
                    due.push((*id, h.deadline_ms));
                    n += 1;
                }
            }
            if !due.is_empty() {
                out.push((*region, due));
            }
        }
        out
    }

    /// Revoked leases this node learnt of at least `wait` ago, grouped by region.
    pub fn revoked(&self, wait: Duration) -> Vec<(RegionId, Vec<u64>)> {
        let now = Instant::now();
        self.lock()
            .regions
            .iter()
            .filter_map(|(region, (_, leases))| {
                let ids: Vec<u64> = leases
                    .iter()
                    .filter(|(_, h)| h.revoked_seen.is_some_and(|t| now - t >= wait))
                    .map(|(id, _)| *id)
                    .collect();
                (!ids.is_empty()).then_some((*region, ids))
            })
            .collect()
    }

    /// What a client is told: the remaining TTL without the margin this node adds.
    fn info(id: u64, h: &Held, now: Instant, margin: Duration) -> LeaseInfo {
        let live = h.revoked_at_ms == 0;
        LeaseInfo {
            id,
            ttl_ms: if live { h.ttl_ms } else { 0 },
            remaining_ms: if live {
                h.expires
                    .saturating_duration_since(now + margin)
                    .as_millis() as u64
            } else {
                0
            },
        }
    }

    /// Lease `id` of `region` as its leader sees it (`None` when this node does not lead
    /// the region); a lease that does not exist or is revoked has TTL 0.
    pub fn get(&self, region: RegionId, id: u64) -> Option<LeaseInfo> {
        let inner = self.lock();
        let (margin, leases) = inner.regions.get(&region)?;
        let now = Instant::now();
        Some(leases.get(&id).map_or(
            LeaseInfo {
                id,
                ..Default::default()
            },
            |h| Self::info(id, h, now, *margin),
        ))
    }

    /// Whether lease `id` of `region` is still held here, live or revoked (`None` when this
    /// node does not lead the region).
    pub fn holds(&self, region: RegionId, id: u64) -> Option<bool> {
        Some(self.lock().regions.get(&region)?.1.contains_key(&id))
    }

    /// The live leases of `region`, by id (`None` when this node does not lead it).
    pub fn list(&self, region: RegionId) -> Option<Vec<LeaseInfo>> {
        let inner = self.lock();
        let (margin, leases) = inner.regions.get(&region)?;
        let now = Instant::now();
        let mut out: Vec<LeaseInfo> = leases
            .iter()
            .filter(|(_, h)| h.revoked_at_ms == 0)
            .map(|(id, h)| Self::info(*id, h, now, *margin))
            .collect();
        out.sort_by_key(|l| l.id);
        Some(out)
    }

    /// Live leases held here (for metrics).
    pub fn live(&self) -> usize {
        self.lock()
            .regions
            .values()
            .map(|(_, l)| l.values().filter(|h| h.revoked_at_ms == 0).count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(deadline_ms: u64) -> LeaseRecord {
        LeaseRecord {
            ttl_ms: 10_000,
            deadline_ms,
            revoked_at_ms: 0,
        }
    }

    #[test]
    fn an_inherited_lease_keeps_what_is_left_plus_the_margin() {
        let l = Lessor::default();
        let r = RegionId(7);
        let now_ms = wall_clock_ms();
        l.lead(
            r,
            vec![(1, record(now_ms + 4_000)), (2, record(now_ms - 1))],
            Duration::from_millis(1_000),
        );
        // What is left is reported without the margin.
        let left = l.get(r, 1).unwrap().remaining_ms;
        assert!((3_900..=4_000).contains(&left), "{left}");
        // Lease 2's deadline passed, but an inherited lease gets the margin first.
        assert!(l.expired(10).is_empty());
        assert_eq!(l.get(r, 3).unwrap().ttl_ms, 0);
        assert!(l.get(RegionId(8), 1).is_none());
    }

    #[test]
    fn expiries_are_handed_out_once_and_changes_apply_only_where_led() {
        let l = Lessor::default();
        let r = RegionId(7);
        let now_ms = wall_clock_ms();
        l.lead(r, vec![(1, record(now_ms - 1))], Duration::ZERO);
        assert_eq!(l.expired(10), vec![(r, vec![(1, now_ms - 1)])]);
        assert!(l.expired(10).is_empty(), "handed out again at once");
        // A renewal applied here moves it.
        l.apply(
            r,
            &[LeaseChange::Live {
                id: 1,
                ttl_ms: 10_000,
                deadline_ms: now_ms + 10_000,
            }],
        );
        assert!(l.expired(10).is_empty());
        l.apply(
            r,
            &[LeaseChange::Revoked {
                id: 1,
                at_ms: now_ms,
            }],
        );
        assert_eq!(l.revoked(Duration::ZERO), vec![(r, vec![1])]);
        assert!(l.revoked(Duration::from_secs(60)).is_empty());
        assert_eq!(l.list(r).unwrap().len(), 0);
        l.apply(r, &[LeaseChange::Removed { id: 1 }]);
        assert!(l.revoked(Duration::ZERO).is_empty());
        // Not led: ignored.
        l.apply(
            RegionId(9),
            &[LeaseChange::Live {
                id: 5,
                ttl_ms: 1,
                deadline_ms: 1,
            }],
        );
        assert!(l.get(RegionId(9), 5).is_none());
        l.forget(r);
        assert!(!l.leads(r));
    }
}
