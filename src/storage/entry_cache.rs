//! The newest log entries of one region, kept in memory from append until applied.
//!
//! Invariants:
//! - the cached entries are contiguous by index, and the cache is empty or ends at the
//!   newest appended entry (`last_index`);
//! - an append replaces the cached suffix it conflicts with; one that would leave a gap, or
//!   that starts at or before the first cached entry, starts the cache over;
//! - past 512 KiB of entry data the oldest entries are dropped, but never the newest;
//! - `range` answers only when it holds the whole range; otherwise the caller reads the
//!   engine.

use std::collections::VecDeque;

use raft::eraftpb::Entry;

/// Most bytes of entries one region keeps in memory; past it the oldest are dropped (and read
/// from the engine if needed). Normally the cache holds only entries in flight.
const ENTRY_CACHE_MAX_BYTES: usize = 512 << 10;

/// The newest log entries, from some index up to `last_index`, kept from append until they are
/// applied. Apply and the leader's appends to its followers read them here instead of from
/// RocksDB, which costs an iterator seek and a decode per read. Empty, or ends at
/// `last_index`.
#[derive(Default)]
pub(super) struct EntryCache {
    entries: VecDeque<Entry>,
    bytes: usize,
}

impl EntryCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    /// The entries `[low, high)`, if the cache holds all of them.
    pub(super) fn range(&self, low: u64, high: u64) -> Option<impl Iterator<Item = &Entry>> {
        let first = self.first_index()?;
        let last = self.entries.back()?.index;
        if low < first || high > last + 1 || low >= high {
            return None;
        }
        Some(
            self.entries
                .range((low - first) as usize..(high - first) as usize),
        )
    }

    pub(super) fn get(&self, index: u64) -> Option<&Entry> {
        let first = self.first_index()?;
        self.entries
            .get(usize::try_from(index.checked_sub(first)?).ok()?)
    }

    /// Appends `entries` (contiguous, starting no later than one past the cached ones),
    /// replacing any cached suffix they conflict with.
    pub(super) fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first().map(|e| e.index) else {
            return;
        };
        match (self.first_index(), self.entries.back().map(|e| e.index)) {
            (Some(lo), Some(hi)) if lo < first && first <= hi + 1 => {
                while self.entries.back().is_some_and(|e| e.index >= first) {
                    self.pop_back();
                }
            }
            _ => self.clear(),
        }
        for e in entries {
            self.bytes += e.data.len() + e.context.len();
            self.entries.push_back(e.clone());
        }
        while self.bytes > ENTRY_CACHE_MAX_BYTES && self.entries.len() > 1 {
            self.drop_front();
        }
    }

    /// Forgets entries up to and including `index` (applied, or compacted away).
    pub(super) fn drop_to(&mut self, index: u64) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            self.drop_front();
        }
        if self.entries.is_empty() {
            // An idle region keeps no buffer: with thousands of regions that adds up.
            self.clear();
        }
    }

    fn drop_front(&mut self) {
        if let Some(e) = self.entries.pop_front() {
            self.bytes -= e.data.len() + e.context.len();
        }
    }

    fn pop_back(&mut self) {
        if let Some(e) = self.entries.pop_back() {
            self.bytes -= e.data.len() + e.context.len();
        }
    }

    pub(super) fn clear(&mut self) {
        self.entries = VecDeque::new();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, size: usize) -> Entry {
        Entry {
            index,
            term,
            data: vec![0u8; size].into(),
            ..Default::default()
        }
    }

    fn indexes(c: &EntryCache) -> Vec<(u64, u64)> {
        c.entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn appends_replace_a_conflicting_tail_and_applies_drop_the_front() {
        let mut c = EntryCache::default();
        c.append(&[entry(5, 1, 10), entry(6, 1, 10), entry(7, 1, 10)]);
        c.append(&[entry(7, 2, 10), entry(8, 2, 10)]);
        assert_eq!(indexes(&c), [(5, 1), (6, 1), (7, 2), (8, 2)]);
        assert_eq!(c.bytes, 40);
        c.append(&[entry(9, 2, 10)]);
        c.drop_to(6);
        assert_eq!(indexes(&c), [(7, 2), (8, 2), (9, 2)]);
        assert_eq!(c.get(8).map(|e| e.term), Some(2));
        assert!(c.get(6).is_none() && c.get(10).is_none());
        // Replacing from the first cached entry or before it starts over.
        c.append(&[entry(6, 3, 10)]);
        assert_eq!(indexes(&c), [(6, 3)]);
        // An append that leaves a gap after the cached entries (the log had more than the
        // cache) also starts over rather than holding a hole.
        c.append(&[entry(9, 3, 10)]);
        assert_eq!(indexes(&c), [(9, 3)]);
        assert_eq!(c.bytes, 10);
        c.drop_to(9);
        assert_eq!(c.first_index(), None);
        assert_eq!(c.bytes, 0);
        assert_eq!(
            c.entries.capacity(),
            0,
            "an applied-out cache frees its buffer"
        );
    }

    #[test]
    fn the_byte_cap_drops_the_oldest_but_keeps_the_newest() {
        let mut c = EntryCache::default();
        let big = ENTRY_CACHE_MAX_BYTES / 3 + 1;
        c.append(&[entry(1, 1, big), entry(2, 1, big)]);
        c.append(&[entry(3, 1, big)]);
        assert_eq!(indexes(&c), [(2, 1), (3, 1)]);
        assert_eq!(c.bytes, 2 * big);
        // One entry larger than the cap is still kept: the cache always ends at last_index.
        c.append(&[entry(4, 1, ENTRY_CACHE_MAX_BYTES + 1)]);
        assert_eq!(indexes(&c), [(4, 1)]);
    }
}
