//! The node's one RocksDB instance.
//!
//! Two column families share one WAL, so a write batch that spans both is still atomic:
//! - `raft`: every local key (`0x01…`: raft logs, raft/apply/region state, node identity).
//!   Logs are written once, read rarely and deleted in ranges; keeping them apart lets the data
//!   family's iterators skip the log churn and its tombstones.
//! - `default`: user data (`'z'…`).
//!
//! A raft worker's round puts its log, hard state and applies into one [`WriteBatch`] and one
//! synced [`Engine::write`] — group commit (docs/architecture.md, "Group commit"); what the
//! round applies after that write goes into a second, unsynced batch.
//!
//! Invariants:
//! - a batch is written atomically across both families; with `sync` it is durable when
//!   `write` returns;
//! - a stored record that does not decode is `Error::Corrupt`, never a panic;
//! - scans visit `[start, end)` in key order and nothing outside it; reads through an
//!   [`EngineSnapshot`] never see later writes;
//! - this module decides column families and options, never keys (see `keys`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, ReadOptions, WriteOptions, DB};

use super::Error;

/// Which column family a key lives in. [`super::keys`] decides the key; this decides the CF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cf {
    Raft,
    Data,
    /// Past versions of user keys (`mvcc`).
    History,
}

impl Cf {
    fn name(self) -> &'static str {
        match self {
            Cf::Raft => "raft",
            Cf::Data => rocksdb::DEFAULT_COLUMN_FAMILY_NAME,
            Cf::History => "history",
        }
    }
}

#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Shared LRU block cache for both families.
    pub block_cache_bytes: usize,
    /// Background compaction and flush threads.
    pub background_jobs: i32,
    /// Memtable size of the history family.
    pub history_memtable_bytes: usize,
    /// Memtable size of the data family.
    pub data_memtable_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            block_cache_bytes: 64 << 20,
            background_jobs: 2,
            data_memtable_bytes: 16 << 20,
            history_memtable_bytes: 16 << 20,
        }
    }
}

/// A stored key and its value.
pub type KeyValuePair = (Vec<u8>, Vec<u8>);

/// A cheap, cloneable handle to the node's RocksDB instance.
#[derive(Clone)]
pub struct Engine {
    db: Arc<DB>,
    path: PathBuf,
    /// The revision this node's history is compacted at (`mvcc`): reads below it are
    /// refused. Loaded at open; raised before any row below it is removed.
    compacted: Arc<std::sync::atomic::AtomicU64>,
    compacting: Arc<std::sync::Mutex<()>>,
}

impl Engine {
    pub fn open(path: &Path, opts: &EngineOptions) -> Result<Self, Error> {
        let cache = rocksdb::Cache::new_lru_cache(opts.block_cache_bytes);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        table.set_bloom_filter(10.0, false);

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(opts.background_jobs);
        db_opts.set_block_based_table_factory(&table);

        let mut data_opts = Options::default();
        data_opts.set_block_based_table_factory(&table);
        data_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Apply looks up every written key's previous record; a whole-key bloom filter lets
        // a key that is not in the memtable skip the skiplist search.
        data_opts.set_memtable_prefix_bloom_ratio(0.02);
        data_opts.set_memtable_whole_key_filtering(true);
        // Every applied write searches this skiplist for its insert position, at random
        // keys; in a small memtable more of that search stays in the CPU cache. See
        // docs/benchmarks.md, "RocksDB memtables".
        data_opts.set_write_buffer_size(opts.data_memtable_bytes);
        // A region's raft-family records (log tail, raft and apply state) sit together and
        // are written again and again at the same place. With one region, successive inserts
        // land next to each other and the skiplist's last-insert position makes each nearly
        // free; with many regions each insert jumps to another region's run and pays a full
        // search from the top. A per-region-prefix insert hint keeps one position per region.
        // Only the C++ option string reaches this setting.
        let mut raft_opts = Options::default().get_options_from_string(format!(
            "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{}",
            super::keys::REGION_PREFIX_LEN
        ))?;
        raft_opts.set_block_based_table_factory(&table);
        // Raft log entries are mostly read back from the memtable right after being written
        // (or not at all); a bigger memtable keeps them there.
        raft_opts.set_write_buffer_size(64 << 20);

        // History rows are written once, read by key prefix or range, and removed by
        // compaction.
        let mut history_opts = Options::default();
        history_opts.set_block_based_table_factory(&table);
        history_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        // Every applied write inserts one row at a random key: a small skiplist keeps that
        // search cheap, as for the data family (docs/benchmarks.md, "History").
        history_opts.set_write_buffer_size(opts.history_memtable_bytes);
        let cfs = vec![
            ColumnFamilyDescriptor::new(Cf::Data.name(), data_opts),
            ColumnFamilyDescriptor::new(Cf::Raft.name(), raft_opts),
            ColumnFamilyDescriptor::new(Cf::History.name(), history_opts),
        ];
        let db = DB::open_cf_descriptors(&db_opts, path, cfs)?;
        let mut engine = Self {
            db: Arc::new(db),
            path: path.to_path_buf(),
            compacted: Arc::default(),
            compacting: Arc::default(),
        };
        let compacted = super::mvcc::load_compacted(&engine)?;
        engine.compacted = Arc::new(compacted.into());
        Ok(engine)
    }

    /// The revision this node's history is compacted at (0 = never).
    pub fn compacted_revision(&self) -> u64 {
        self.compacted.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Raises the compacted revision to `rev` (never lowers it) and stores it, synced,
    /// before returning: reads below it are refused from now on, also after a restart.
    /// Returns the compacted revision now.
    pub fn raise_compacted_revision(&self, rev: u64) -> Result<u64, Error> {
        // One raiser at a time, so the stored value is always the highest one raised.
        let _one = self
            .compacting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let prev = self
            .compacted
            .fetch_max(rev, std::sync::atomic::Ordering::AcqRel);
        let now = prev.max(rev);
        if now > prev {
            let mut wb = self.batch();
            super::mvcc::store_compacted(&mut wb, now);
            self.write(wb, true)?;
        }
        Ok(now)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("invariant: every column family is created at open")
    }

    pub fn batch(&self) -> WriteBatch<'_> {
        WriteBatch {
            engine: self,
            inner: rocksdb::WriteBatch::default(),
        }
    }

    /// Writes the batch atomically; with `sync` it is on disk (fsync'd WAL) when this returns.
    pub fn write(&self, batch: WriteBatch<'_>, sync: bool) -> Result<(), Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch.inner, &wo)?;
        Ok(())
    }

    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.db.get_cf(self.cf(cf), key)?)
    }

    /// Reads and decodes a stored protobuf record.
    pub fn get_msg<M: prost::Message + Default>(
        &self,
        cf: Cf,
        key: &[u8],
    ) -> Result<Option<M>, Error> {
        match self.db.get_pinned_cf(self.cf(cf), key)? {
            None => Ok(None),
            Some(v) => M::decode(v.as_ref())
                .map(Some)
                .map_err(|e| Error::corrupt(key, e)),
        }
    }

    /// Calls `f` for each key in `[start, end)` in order until it returns `Ok(false)`.
    pub fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        scan_with(&self.db, None, self.cf(cf), start, end, f)
    }

    /// The last key in `[start, end)`, if there is one.
    pub fn last_key(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.last_entry(cf, start, end)?.map(|(k, _)| k))
    }

    /// The last key in `[start, end)` and its value, if there is one.
    pub fn last_entry(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
    ) -> Result<Option<KeyValuePair>, Error> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start);
        ro.set_iterate_upper_bound(end);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(cf), ro);
        it.seek_to_last();
        if it.valid() {
            if let (Some(k), Some(v)) = (it.key(), it.value()) {
                return Ok(Some((k.to_vec(), v.to_vec())));
            }
        }
        it.status()?;
        Ok(None)
    }

    /// A cursor over the keys of `[start, end)` of `cf`, for readers that jump (`mvcc`).
    pub fn cursor(&self, cf: Cf, start: &[u8], end: &[u8]) -> Cursor<'_> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start);
        ro.set_iterate_upper_bound(end);
        Cursor {
            it: self.db.raw_iterator_cf_opt(self.cf(cf), ro),
        }
    }

    /// Runs `f` over a consistent point-in-time view of the whole instance.
    pub fn with_snapshot<T>(&self, f: impl FnOnce(&EngineSnapshot<'_>) -> T) -> T {
        let snap = self.db.snapshot();
        f(&EngineSnapshot { engine: self, snap })
    }

    /// Bytes the user data and its history take on this node (live SST files and memtables):
    /// what the space quota counts. The raft log is left out: it is truncated as it is
    /// applied. Files that compaction made obsolete do not count.
    pub fn data_bytes(&self) -> u64 {
        let mut total = 0;
        for cf in [Cf::Data, Cf::History] {
            for p in [
                "rocksdb.live-sst-files-size",
                "rocksdb.cur-size-all-mem-tables",
            ] {
                if let Ok(Some(v)) = self.db.property_int_value_cf(self.cf(cf), p) {
                    total += v;
                }
            }
        }
        total
    }

    /// Flushes memtables and syncs the WAL; used at shutdown so the next start replays less.
    pub fn flush(&self) -> Result<(), Error> {
        self.db.flush_wal(true)?;
        for cf in [Cf::Raft, Cf::Data, Cf::History] {
            self.db.flush_cf(self.cf(cf))?;
        }
        Ok(())
    }
}

fn scan_with(
    db: &DB,
    snap: Option<&rocksdb::Snapshot<'_>>,
    cf: &rocksdb::ColumnFamily,
    start: &[u8],
    end: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<bool, Error>,
) -> Result<(), Error> {
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(start);
    ro.set_iterate_upper_bound(end);
    if let Some(s) = snap {
        ro.set_snapshot(s);
    }
    let mut it = db.raw_iterator_cf_opt(cf, ro);
    it.seek(start);
    while it.valid() {
        let (Some(k), Some(v)) = (it.key(), it.value()) else {
            break;
        };
        if !f(k, v)? {
            return Ok(());
        }
        it.next();
    }
    it.status()?;
    Ok(())
}

/// A key and its value, borrowed from a cursor.
pub type Entry<'a> = (&'a [u8], &'a [u8]);

/// A positioned iterator over a key range (see [`Engine::cursor`]).
pub struct Cursor<'a> {
    it: rocksdb::DBRawIteratorWithThreadMode<'a, DB>,
}

impl Cursor<'_> {
    /// Moves to the first key at or after `key`.
    pub fn seek(&mut self, key: &[u8]) {
        self.it.seek(key);
    }

    /// Moves to the last key at or before `key`.
    pub fn seek_for_prev(&mut self, key: &[u8]) {
        self.it.seek_for_prev(key);
    }

    pub fn next(&mut self) {
        self.it.next();
    }

    /// The current key and value; `Ok(None)` past the range's end, an error if the
    /// iterator failed.
    pub fn entry(&self) -> Result<Option<Entry<'_>>, Error> {
        if self.it.valid() {
            if let (Some(k), Some(v)) = (self.it.key(), self.it.value()) {
                return Ok(Some((k, v)));
            }
        }
        self.it.status()?;
        Ok(None)
    }
}

/// A point-in-time view; reads through it never see later writes.
pub struct EngineSnapshot<'a> {
    engine: &'a Engine,
    snap: rocksdb::Snapshot<'a>,
}

impl EngineSnapshot<'_> {
    pub fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        Ok(self.snap.get_cf(self.engine.cf(cf), key)?)
    }

    pub fn get_msg<M: prost::Message + Default>(
        &self,
        cf: Cf,
        key: &[u8],
    ) -> Result<Option<M>, Error> {
        match self.get(cf, key)? {
            None => Ok(None),
            Some(v) => M::decode(v.as_slice())
                .map(Some)
                .map_err(|e| Error::corrupt(key, e)),
        }
    }

    pub fn scan(
        &self,
        cf: Cf,
        start: &[u8],
        end: &[u8],
        f: impl FnMut(&[u8], &[u8]) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        scan_with(
            &self.engine.db,
            Some(&self.snap),
            self.engine.cf(cf),
            start,
            end,
            f,
        )
    }
}

/// Writes collected for one atomic [`Engine::write`].
pub struct WriteBatch<'a> {
    engine: &'a Engine,
    inner: rocksdb::WriteBatch,
}

impl<'a> WriteBatch<'a> {
    /// The engine the batch is for.
    pub fn engine(&self) -> &'a Engine {
        self.engine
    }

    pub fn put(&mut self, cf: Cf, key: &[u8], value: &[u8]) {
        self.inner.put_cf(self.engine.cf(cf), key, value);
    }

    pub fn put_msg<M: prost::Message>(&mut self, cf: Cf, key: &[u8], msg: &M) {
        self.put(cf, key, &msg.encode_to_vec());
    }

    pub fn delete(&mut self, cf: Cf, key: &[u8]) {
        self.inner.delete_cf(self.engine.cf(cf), key);
    }

    /// Deletes every key in `[start, end)` with one range tombstone.
    pub fn delete_range(&mut self, cf: Cf, start: &[u8], end: &[u8]) {
        if start < end {
            self.inner.delete_range_cf(self.engine.cf(cf), start, end);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Number of operations in the batch.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    /// Encoded size in bytes.
    pub fn size_in_bytes(&self) -> usize {
        self.inner.size_in_bytes()
    }
}
