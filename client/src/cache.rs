//! The client's region cache: regions by start key, each with the leader last seen.
//!
//! Invariants:
//! - cached regions never overlap, and each is keyed by its own start key;
//! - a report never replaces a newer one: an insert overlapping a cached region of a higher
//!   epoch version (or the same region with a higher `conf_ver`) is ignored;
//! - `locate` returns only a region whose range holds the key, never a neighbour.

use std::collections::BTreeMap;

use crate::proto::{Peer, Region};
use tessera_api::keys::in_range;

#[derive(Clone, Debug)]
pub struct CachedRegion {
    pub region: Region,
    pub leader: Option<Peer>,
}

#[derive(Default, Debug)]
pub struct RegionCache {
    by_start: BTreeMap<Vec<u8>, CachedRegion>,
}

fn version(r: &Region) -> (u64, u64) {
    r.epoch.map_or((0, 0), |e| (e.version, e.conf_ver))
}

fn overlaps(a: &Region, b: &Region) -> bool {
    let a_before_b_ends = b.end_key.is_empty() || a.start_key < b.end_key;
    let b_before_a_ends = a.end_key.is_empty() || b.start_key < a.end_key;
    a_before_b_ends && b_before_a_ends
}

impl RegionCache {
    pub fn locate(&self, key: &[u8]) -> Option<&CachedRegion> {
        let (_, c) = self.by_start.range(..=key.to_vec()).next_back()?;
        in_range(key, &c.region.start_key, &c.region.end_key).then_some(c)
    }

    /// Inserts a region, evicting every cached region it overlaps — unless one of them is
    /// newer, in which case the stale report is ignored. Overlapping regions compare by epoch
    /// version (a split or merge gives every region it produces a higher version than the
    /// regions it came from), the same region by (version, conf_ver).
    pub fn insert(&mut self, region: Region, leader: Option<Peer>) {
        // Cached regions never overlap each other, so the ones `region` overlaps are the one
        // starting at or before its start and those starting inside it: a range lookup, not
        // a walk over the whole cache (10,000 regions at scale).
        let mut overlapping: Vec<Vec<u8>> = Vec::new();
        if let Some((k, c)) = self
            .by_start
            .range::<[u8], _>((
                std::ops::Bound::Unbounded,
                std::ops::Bound::Included(region.start_key.as_slice()),
            ))
            .next_back()
        {
            if overlaps(&c.region, &region) {
                overlapping.push(k.clone());
            }
        }
        let inside = self.by_start.range::<[u8], _>((
            std::ops::Bound::Excluded(region.start_key.as_slice()),
            std::ops::Bound::Unbounded,
        ));
        for (k, c) in inside {
            if !region.end_key.is_empty() && k.as_slice() >= region.end_key.as_slice() {
                break;
            }
            if overlaps(&c.region, &region) {
                overlapping.push(k.clone());
            }
        }
        if overlapping.iter().any(|k| {
            let c = &self.by_start[k];
            let (cv, cc) = version(&c.region);
            let (nv, nc) = version(&region);
            cv > nv || (c.region.id == region.id && cv == nv && cc > nc)
        }) {
            return;
        }
        for k in overlapping {
            self.by_start.remove(&k);
        }
        self.by_start
            .insert(region.start_key.clone(), CachedRegion { region, leader });
    }

    pub fn set_leader(&mut self, region_id: u64, leader: Option<Peer>) {
        if let Some(c) = self
            .by_start
            .values_mut()
            .find(|c| c.region.id == region_id)
        {
            c.leader = leader;
        }
    }

    pub fn invalidate(&mut self, region_id: u64) {
        self.by_start.retain(|_, c| c.region.id != region_id);
    }

    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_start.is_empty()
    }

    pub fn regions(&self) -> Vec<CachedRegion> {
        self.by_start.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RegionEpoch;

    fn r(id: u64, s: &[u8], e: &[u8], v: u64) -> Region {
        Region {
            id,
            start_key: s.to_vec(),
            end_key: e.to_vec(),
            epoch: Some(RegionEpoch {
                conf_ver: 1,
                version: v,
            }),
            peers: vec![],
        }
    }

    #[test]
    fn locate_and_replace() {
        let mut c = RegionCache::default();
        c.insert(r(1, b"", b"m", 1), None);
        c.insert(r(2, b"m", b"", 1), None);
        assert_eq!(c.locate(b"a").unwrap().region.id, 1);
        assert_eq!(c.locate(b"m").unwrap().region.id, 2);
        assert_eq!(c.locate(b"zzz").unwrap().region.id, 2);
        // A split of region 1 replaces it.
        c.insert(r(1, b"", b"f", 2), None);
        c.insert(r(3, b"f", b"m", 2), None);
        assert_eq!(c.locate(b"g").unwrap().region.id, 3);
        assert_eq!(c.len(), 3);
        // A stale report of region 1 does not undo the split.
        c.insert(r(1, b"", b"m", 1), None);
        assert_eq!(c.locate(b"g").unwrap().region.id, 3);
        // Not even when only the new sibling is cached.
        c.invalidate(1);
        c.insert(r(1, b"", b"m", 1), None);
        assert_eq!(c.locate(b"g").unwrap().region.id, 3);
        assert!(c.locate(b"a").is_none(), "the stale parent was not cached");
        c.insert(r(1, b"", b"f", 2), None);
        c.invalidate(3);
        assert!(c.locate(b"g").is_none());
    }
}
