//! The KV state machine: applies committed commands into the round's write batch.
//!
//! Invariants:
//! - apply is deterministic: the same entries on the same state give the same writes and
//!   results on every replica. A command that cannot apply (stale epoch, key outside the
//!   region) is a deterministic *result*, not an error; a committed entry that does not
//!   decode stops the node (`peer::command`), since skipping it could diverge;
//! - data writes and the applied index go into the same batch (see `Peer::apply_entries`);
//! - a failure that is not deterministic (RocksDB read error) stops the node rather than
//!   letting replicas diverge.
//!
//! Several entries in one round may touch the same key before the batch is written, so reads
//! go through [`ApplyCtx::overlay`] first, then the worker's [`RecordCache`], then the engine.

use std::collections::{BTreeSet, HashMap};

use super::cmd::{key_value, ApplyResult, CasAction, Command};
use super::msg::{RegionError, Reply};
use crate::proto::{self, KvRecord};
use crate::storage::{keys, mvcc, Cf, Engine, WriteBatch};
use prost::Message as _;

pub mod lease;

/// The current records of recently applied keys, kept by a worker across rounds.
///
/// Every write apply makes reads the key's current record first (its version, create
/// revision and size, and the previous value the client gets back). Without this, that read
/// is a RocksDB `Get`, and a memtable lookup of a random key costs a cache miss per skiplist
/// level: 12% of the servers' CPU under a one-region put load (docs/benchmarks.md).
///
/// Coherence: the cache only ever holds what is on disk. Records enter it only when a
/// round's batch has been written (that round's overlay moves in). Every other writer of
/// the data column family clears it: a snapshot (its range is replaced) and a destroyed peer
/// (its data deleted). Regions never move between workers without one of those, so a key is
/// only ever written through its worker's cache.
#[derive(Default)]
pub struct RecordCache {
    map: HashMap<Vec<u8>, Option<KvRecord>>,
    /// Estimated heap bytes of `map`.
    bytes: usize,
    /// Most bytes kept; 0 = no caching.
    budget: usize,
}

impl RecordCache {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget: budget_bytes,
            ..Default::default()
        }
    }

    fn cost(key_len: usize, rec: &Option<KvRecord>) -> usize {
        // Key, value and a fixed share for the map slot, the record's fields and allocations.
        key_len + rec.as_ref().map_or(0, |r| r.value.len()) + 96
    }

    fn get(&self, key: &[u8]) -> Option<&Option<KvRecord>> {
        self.map.get(key)
    }

    fn insert(&mut self, key: Vec<u8>, rec: Option<KvRecord>) {
        if self.budget == 0 {
            return;
        }
        let key_len = key.len();
        self.bytes += Self::cost(key_len, &rec);
        if let Some(old) = self.map.insert(key, rec) {
            self.bytes -= Self::cost(key_len, &old);
        }
    }

    /// Drops about a quarter of the entries once over budget. Which ones is left to the hash
    /// order (random eviction): cheap, and no worse than LRU under a uniform load.
    fn trim(&mut self) {
        if self.bytes <= self.budget {
            return;
        }
        let target = self.budget / 4 * 3;
        let mut bytes = self.bytes;
        self.map.retain(|k, v| {
            if bytes <= target {
                return true;
            }
            bytes -= Self::cost(k.len(), v);
            false
        });
        self.bytes = bytes;
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Per-round apply state shared by every region a worker applies in that round.
#[derive(Default)]
pub struct ApplyCtx {
    /// Data keys written into the current batch and not yet on disk. `None` = deleted.
    overlay: HashMap<Vec<u8>, Option<KvRecord>>,
    /// The worker's records already on disk, lent for the round.
    cache: RecordCache,
    /// Reads that found their record in `overlay` or `cache`, and those that went to RocksDB.
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Answers to send once the batch is written.
    pub replies: Vec<(Reply<ApplyResult>, Result<ApplyResult, RegionError>)>,
    /// Entries applied this round (for metrics).
    pub applied_entries: u64,
    /// Change of the applying region's live keys and bytes; the peer takes it after each
    /// command.
    pub delta_keys: i64,
    pub delta_bytes: i64,
    /// Peers of regions created by splits applied this round. The worker builds and starts
    /// them after the batch holding their state is written.
    pub new_peers: Vec<super::msg::NewPeer>,
    /// Collect the applying command's events (its region has watchers on this node).
    pub capture: bool,
    events: Vec<proto::Event>,
    /// The events of the round's commands in watched regions, published once the batch is
    /// written: region, revision, events.
    pub watched: Vec<(crate::ids::RegionId, u64, Vec<proto::Event>)>,
    /// What the round's lease commands changed, for the node's lessor once the batch is
    /// written.
    pub lease_changes: Vec<(crate::ids::RegionId, lease::LeaseChange)>,
    /// The round's write must be synced whatever raft says (a merge step applied: the
    /// merge relies on it surviving a crash).
    pub must_sync: bool,
    /// Sources merged into a local target this round (source, target): their local peers
    /// end once the batch is written.
    pub merged: Vec<(crate::ids::RegionId, crate::ids::RegionId)>,
}

impl ApplyCtx {
    /// A round's context that reads through `cache` and adds the round's writes to it once
    /// they are on disk; take it back with [`Self::take_cache`] after [`Self::send_replies`].
    pub fn with_cache(cache: RecordCache) -> Self {
        Self {
            cache,
            ..Default::default()
        }
    }

    /// Sends every collected answer. Call only after the batch is durable: the round's
    /// writes now are on disk, so they join the cache.
    pub fn send_replies(&mut self) {
        for (tx, res) in self.replies.drain(..) {
            let _ = tx.send(res);
        }
        for (k, v) in self.overlay.drain() {
            self.cache.insert(k, v);
        }
        self.cache.trim();
    }

    /// The events the last command collected (see `capture`).
    pub fn take_events(&mut self) -> Vec<proto::Event> {
        std::mem::take(&mut self.events)
    }

    pub fn take_cache(&mut self) -> RecordCache {
        std::mem::take(&mut self.cache)
    }

    /// A snapshot replaced the data of the region `[start_key, end_key)` in this round's
    /// batch: nothing cached or pending may be trusted for it. The whole cache goes
    /// (snapshots are rare); pending writes of other regions stay.
    pub fn forget_range(&mut self, start_key: &[u8], end_key: &[u8]) {
        let (start, end) = (keys::data_key(start_key), keys::data_end_key(end_key));
        self.overlay
            .retain(|k, _| k.as_slice() < start.as_slice() || k.as_slice() >= end.as_slice());
        self.cache.clear();
    }

    /// The key's record as this round's apply sees it. A record read from the engine is not
    /// cached here: every caller but a failed compare-and-swap writes the key next, and the
    /// written record joins the cache with the batch.
    fn current(&mut self, engine: &Engine, data_key: &[u8]) -> Option<KvRecord> {
        let known = self
            .overlay
            .get(data_key)
            .or_else(|| self.cache.get(data_key))
            .cloned();
        if let Some(v) = known {
            self.cache_hits += 1;
            return v;
        }
        self.cache_misses += 1;
        match engine.get_msg::<KvRecord>(Cf::Data, data_key) {
            Ok(v) => v,
            Err(e) => crate::fatal(&format!("apply cannot read {data_key:02x?}: {e}")),
        }
    }

    /// The data keys in `[start, end)` that exist as this round's apply sees them.
    fn live_keys(&self, engine: &Engine, start: &[u8], end: &[u8]) -> Vec<Vec<u8>> {
        let mut found = BTreeSet::new();
        let scanned = engine.scan(Cf::Data, start, end, |k, _| {
            found.insert(k.to_vec());
            Ok(true)
        });
        if let Err(e) = scanned {
            crate::fatal(&format!("apply cannot scan {start:02x?}: {e}"));
        }
        let within = |k: &[u8]| k >= start && k < end;
        for (k, v) in self.overlay.iter().filter(|(k, _)| within(k)) {
            match v {
                Some(_) => found.insert(k.clone()),
                None => found.remove(k),
            };
        }
        found.into_iter().collect()
    }

    fn put(
        &mut self,
        wb: &mut WriteBatch<'_>,
        data_key: Vec<u8>,
        old: Option<&KvRecord>,
        rec: KvRecord,
    ) {
        let key_len = data_key.len() as i64 - 1;
        match old {
            Some(o) => self.delta_bytes -= key_len + o.encoded_len() as i64,
            None => self.delta_keys += 1,
        }
        self.delta_bytes += key_len + rec.encoded_len() as i64;
        wb.put_msg(Cf::Data, &data_key, &rec);
        let user_key = &data_key[1..];
        if !keys::is_system_key(user_key) {
            mvcc::record(wb, user_key, rec.mod_revision, &rec);
            if self.capture {
                self.events.push(proto::Event {
                    r#type: proto::event::EventType::Put as i32,
                    kv: Some(key_value(user_key, rec.clone())),
                    prev_kv: old.map(|o| key_value(user_key, o.clone())),
                });
            }
        }
        self.overlay.insert(data_key, Some(rec));
    }

    /// Deletes the key if it exists, leaving a tombstone at `revision` in its history.
    fn delete(
        &mut self,
        wb: &mut WriteBatch<'_>,
        data_key: Vec<u8>,
        old: Option<&KvRecord>,
        revision: u64,
    ) {
        let Some(o) = old else { return };
        self.delta_keys -= 1;
        self.delta_bytes -= data_key.len() as i64 - 1 + o.encoded_len() as i64;
        wb.delete(Cf::Data, &data_key);
        let user_key = &data_key[1..];
        if !keys::is_system_key(user_key) {
            mvcc::record(wb, user_key, revision, &mvcc::tombstone(revision));
            if self.capture {
                self.events.push(proto::Event {
                    r#type: proto::event::EventType::Delete as i32,
                    kv: Some(key_value(user_key, mvcc::tombstone(revision))),
                    prev_kv: Some(key_value(user_key, o.clone())),
                });
            }
        }
        self.overlay.insert(data_key, None);
    }

    /// The size a stored key counts for in region statistics: user key plus record.
    pub fn stored_size(data_key_len: usize, value_len: usize) -> u64 {
        (data_key_len.saturating_sub(1) + value_len) as u64
    }
}

fn put_record(cur: Option<&KvRecord>, value: Vec<u8>, revision: u64, lease: u64) -> KvRecord {
    KvRecord {
        value,
        create_revision: cur.map_or(revision, |c| c.create_revision),
        mod_revision: revision,
        version: cur.map_or(1, |c| c.version + 1),
        lease,
    }
}

/// Applies one command at raft index `revision`. The caller has checked epoch and range.
pub fn exec(
    cmd: Command,
    revision: u64,
    engine: &Engine,
    wb: &mut WriteBatch<'_>,
    ctx: &mut ApplyCtx,
) -> ApplyResult {
    match cmd {
        Command::Put { key, value, lease } => {
            let dkey = keys::data_key(&key);
            let cur = ctx.current(engine, &dkey);
            let lease = lease.map_or(0, |a| a.lease);
            let rec = put_record(cur.as_ref(), value, revision, lease);
            ctx.put(wb, dkey, cur.as_ref(), rec);
            let prev = cur.map(|r| key_value(&key, r));
            ApplyResult::Put { prev, revision }
        }
        Command::Delete { key } => {
            let dkey = keys::data_key(&key);
            let cur = ctx.current(engine, &dkey);
            ctx.delete(wb, dkey, cur.as_ref(), revision);
            let prev = cur.map(|r| key_value(&key, r));
            ApplyResult::Delete { prev, revision }
        }
        Command::CompareAndSwap {
            key,
            compare,
            action,
            lease,
        } => {
            let dkey = keys::data_key(&key);
            let cur = ctx.current(engine, &dkey);
            let succeeded = compare.matches(cur.as_ref());
            if succeeded {
                match action {
                    CasAction::Put(value) => {
                        let lease = lease.map_or(0, |a| a.lease);
                        let rec = put_record(cur.as_ref(), value, revision, lease);
                        ctx.put(wb, dkey, cur.as_ref(), rec);
                    }
                    CasAction::Delete => ctx.delete(wb, dkey, cur.as_ref(), revision),
                }
            }
            ApplyResult::Cas {
                succeeded,
                prev: cur.map(|r| key_value(&key, r)),
                revision,
            }
        }
        Command::Batch(ops) => {
            let mut hashes: Vec<u64> = ops
                .iter()
                .map(|(k, _)| super::session::key_hash(k))
                .collect();
            hashes.sort_unstable();
            hashes.dedup();
            for (key, value) in ops {
                let dkey = keys::data_key(&key);
                let cur = ctx.current(engine, &dkey);
                match value {
                    Some(v) => {
                        let rec = put_record(cur.as_ref(), v, revision, 0);
                        ctx.put(wb, dkey, cur.as_ref(), rec);
                    }
                    None => ctx.delete(wb, dkey, cur.as_ref(), revision),
                }
            }
            ApplyResult::Batch {
                revision,
                keys: hashes,
            }
        }
        // Admin commands change the region, not its data: the peer applies them.
        Command::Split { .. } | Command::Merge(_) => {
            crate::fatal("invariant: an admin command reached the data apply path")
        }
        Command::Lease(_) => crate::fatal("invariant: a lease command reached the data path"),
    }
}

/// Live keys and bytes of the data keys in `[start, end)` as this round's apply sees them:
/// the engine's contents with the round's unwritten changes laid over them. Used to divide
/// a region's statistics at a split, identically on every replica.
pub fn range_stats(engine: &Engine, ctx: &ApplyCtx, start: &[u8], end: &[u8]) -> (u64, u64) {
    let size = |k: &[u8], v_len: usize| ApplyCtx::stored_size(k.len(), v_len) as i64;
    let (mut keys, mut bytes) = (0i64, 0i64);
    let scanned = engine.scan(Cf::Data, start, end, |k, v| {
        keys += 1;
        bytes += size(k, v.len());
        Ok(true)
    });
    if let Err(e) = scanned {
        crate::fatal(&format!("split cannot scan its range: {e}"));
    }
    for (k, new) in ctx.overlay.iter() {
        if k.as_slice() < start || (!end.is_empty() && k.as_slice() >= end) {
            continue;
        }
        let old = match engine.get(Cf::Data, k) {
            Ok(v) => v,
            Err(e) => crate::fatal(&format!("split cannot read {k:02x?}: {e}")),
        };
        if let Some(o) = old {
            keys -= 1;
            bytes -= size(k, o.len());
        }
        if let Some(n) = new {
            keys += 1;
            bytes += size(k, n.encoded_len());
        }
    }
    (keys.max(0) as u64, bytes.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &[u8], value: &[u8]) -> Command {
        Command::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            lease: None,
        }
    }

    /// Applies `cmd` at `revision` in a round of its own, as a worker does: the context
    /// borrows the cache, the batch is written, the replies go, the cache comes back.
    fn round(engine: &Engine, cache: &mut RecordCache, cmd: Command, revision: u64) -> ApplyResult {
        let mut ctx = ApplyCtx::with_cache(std::mem::take(cache));
        let mut wb = engine.batch();
        let res = exec(cmd, revision, engine, &mut wb, &mut ctx);
        engine.write(wb, false).unwrap();
        ctx.send_replies();
        *cache = ctx.take_cache();
        res
    }

    fn version_of(res: &ApplyResult) -> Option<(u64, u64)> {
        match res {
            ApplyResult::Put { prev, .. } => prev.as_ref().map(|p| (p.version, p.mod_revision)),
            other => panic!("not a put result: {other:?}"),
        }
    }

    fn stored(engine: &Engine, key: &[u8]) -> Option<KvRecord> {
        engine.get_msg(Cf::Data, &keys::data_key(key)).unwrap()
    }

    #[test]
    fn cached_records_match_what_the_engine_would_give() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &Default::default()).unwrap();
        let mut cache = RecordCache::new(1 << 20);
        assert_eq!(
            version_of(&round(&engine, &mut cache, put(b"k", b"1"), 10)),
            None
        );
        assert_eq!(cache.len(), 1);
        // The second write finds the first in the cache, not the engine.
        let mut ctx = ApplyCtx::with_cache(std::mem::take(&mut cache));
        let mut wb = engine.batch();
        let res = exec(put(b"k", b"2"), 11, &engine, &mut wb, &mut ctx);
        assert_eq!((ctx.cache_hits, ctx.cache_misses), (1, 0));
        assert_eq!(version_of(&res), Some((1, 10)));
        engine.write(wb, false).unwrap();
        ctx.send_replies();
        cache = ctx.take_cache();

        let del = Command::Delete { key: b"k".to_vec() };
        round(&engine, &mut cache, del, 12);
        // A deleted key is cached as absent: the next write creates it anew.
        assert_eq!(
            version_of(&round(&engine, &mut cache, put(b"k", b"3"), 13)),
            None
        );
        let rec = stored(&engine, b"k").unwrap();
        assert_eq!(
            (rec.version, rec.create_revision, rec.mod_revision),
            (1, 13, 13)
        );
    }

    #[test]
    fn a_cache_over_budget_evicts_and_the_engine_answers_for_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &Default::default()).unwrap();
        // Room for about ten records of these sizes.
        let mut cache = RecordCache::new(10 * (6 + 100 + 96));
        let value = vec![7u8; 100];
        for pass in 0..3u64 {
            for i in 0..50u64 {
                let key = format!("key{i:02}");
                let rev = 100 * (pass + 1) + i;
                let res = round(&engine, &mut cache, put(key.as_bytes(), &value), rev);
                let prev = version_of(&res);
                let want = (pass > 0).then(|| (pass, 100 * pass + i));
                assert_eq!(prev, want, "{key} in pass {pass}");
                assert!(
                    cache.bytes <= cache.budget,
                    "{} > {}",
                    cache.bytes,
                    cache.budget
                );
            }
        }
        assert!(
            !cache.is_empty() && cache.len() <= 10,
            "{} entries",
            cache.len()
        );
        assert_eq!(stored(&engine, b"key07").unwrap().version, 3);
    }

    #[test]
    fn a_snapshot_makes_the_range_read_from_the_engine_again() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &Default::default()).unwrap();
        let mut cache = RecordCache::new(1 << 20);
        round(&engine, &mut cache, put(b"b", b"old"), 5);
        round(&engine, &mut cache, put(b"x", b"other region"), 6);

        // A snapshot of region [a, m) replaces "b" (version 4 on the leader), in the same
        // round as another region's pending write of "x".
        let mut ctx = ApplyCtx::with_cache(std::mem::take(&mut cache));
        let mut wb = engine.batch();
        exec(put(b"x", b"pending"), 7, &engine, &mut wb, &mut ctx);
        let snap = KvRecord {
            value: b"from snapshot".to_vec(),
            create_revision: 2,
            mod_revision: 20,
            version: 4,
            lease: 0,
        };
        wb.delete_range(Cf::Data, &keys::data_key(b"a"), &keys::data_end_key(b"m"));
        wb.put_msg(Cf::Data, &keys::data_key(b"b"), &snap);
        ctx.forget_range(b"a", b"m");
        // The other region's pending write is still seen within the round.
        let res = exec(put(b"x", b"again"), 8, &engine, &mut wb, &mut ctx);
        assert_eq!(version_of(&res), Some((2, 7)));
        engine.write(wb, false).unwrap();
        ctx.send_replies();
        cache = ctx.take_cache();

        let res = round(&engine, &mut cache, put(b"b", b"new"), 21);
        assert_eq!(version_of(&res), Some((4, 20)));
        let rec = stored(&engine, b"b").unwrap();
        assert_eq!((rec.version, rec.create_revision), (5, 2));
        assert_eq!(stored(&engine, b"x").unwrap().version, 3);
    }

    #[test]
    fn a_zero_budget_caches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &Default::default()).unwrap();
        let mut cache = RecordCache::new(0);
        round(&engine, &mut cache, put(b"k", b"1"), 1);
        assert!(cache.is_empty());
        assert_eq!(
            version_of(&round(&engine, &mut cache, put(b"k", b"2"), 2)),
            Some((1, 1))
        );
    }
}
