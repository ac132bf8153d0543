//! Restoring a backup: seeding a founding node's store of a new cluster from it.
//!
//! Every founding node runs the restore with its own config and the same backup, and
//! computes the same regions (the backup's user regions, then placement's and the lease
//! regions, as a first start would) with the same data, so the replicas agree with no log
//! between them: each region's log starts at `peer_storage::RESTORED_LOG_INDEX` holding
//! the backup's keys, their revisions and history rows at those revisions. A node that was
//! not restored and starts empty is behind every restored replica, so it gets their data
//! by snapshot.
//!
//! Revisions: the old cluster may have handed out revisions past the backup's (writes after
//! it, up to the manifest's `end_revision` and beyond), which its clients saw. The new
//! cluster starts at a **base** revision `end_revision + bump` (etcd's `--bump-revision`
//! and `--mark-compacted`): the oracle's mark, every user region's applied revision and the
//! compacted revision are the base, so new writes get revisions above any the old cluster
//! likely used, reads of the present answer at the base, and reads or watches below it are
//! `Compacted` (a client that remembers an old revision lists again rather than miss
//! events). Leases keep the deadlines the backup saw: one that has passed by the time the
//! cluster runs expires then, and its keys go, as they would have in the old cluster.
//!
//! Invariants:
//! - nothing is written until the whole backup has been read and verified against the new
//!   cluster's limits;
//! - the store is built in [`RESTORING_DIR`] beside the node's `db` and renamed into place
//!   only once complete and synced; a node does not start while that directory exists, and
//!   one restore at a time holds [`LOCK_FILE`];
//! - a node never restores over an existing store, into the backup's own cluster id, or as
//!   a joining node;
//! - what is replicated (regions, data, applied revisions, placement's records) depends
//!   only on the backup, the members, the replica and lease-region counts and the bump, so
//!   those must be the same on every founding node.

use std::collections::BTreeMap;
use std::path::Path;

use super::{read_region, verify, Error, Limits, Result};
use crate::config::Config;
use crate::proto::{KvRecord, LeaseRecord, Region};
use crate::raftstore::bootstrap::{initial_regions, put_ident, seed_id_counter};
use crate::storage::peer_storage::RAFT_INIT_LOG_INDEX;
use crate::storage::{keys, mvcc, Cf, Engine, EngineOptions, PeerStorage, WriteBatch};
use tessera_api::keys::{lease_attached_row, lease_key, tso_key};

/// Records written per batch.
const BATCH: usize = 4096;

/// What a restore wrote on this node.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// The backup's revision, and the new cluster's first (see the module doc).
    pub revision: u64,
    pub base_revision: u64,
    /// Regions this node hosts, and keys written into them.
    pub regions: usize,
    pub keys: u64,
    pub leases: usize,
}

/// A system record as a first start writes them: created at the initial raft index.
fn system_record(value: Vec<u8>) -> KvRecord {
    KvRecord {
        value,
        create_revision: RAFT_INIT_LOG_INDEX,
        mod_revision: RAFT_INIT_LOG_INDEX,
        version: 1,
        lease: 0,
    }
}

/// Region sizes as apply counts them: key plus stored record.
#[derive(Default)]
struct Sizes(BTreeMap<u64, (u64, u64)>);

impl Sizes {
    fn add(&mut self, region: u64, key: &[u8], rec: &KvRecord) {
        let e = self.0.entry(region).or_default();
        e.0 += 1;
        e.1 += (key.len() + prost::Message::encoded_len(rec)) as u64;
    }
    fn of(&self, region: u64) -> (u64, u64) {
        self.0.get(&region).copied().unwrap_or_default()
    }
}

/// A batch that writes itself out every [`BATCH`] records.
struct Writer<'a> {
    engine: &'a Engine,
    wb: WriteBatch<'a>,
    n: usize,
}

impl<'a> Writer<'a> {
    fn put(&mut self, key: &[u8], rec: &KvRecord) -> Result<()> {
        self.wb.put_msg(Cf::Data, &keys::data_key(key), rec);
        if !keys::is_system_key(key) {
            mvcc::record(&mut self.wb, key, rec.mod_revision, rec);
        }
        self.n += 1;
        if self.n >= BATCH {
            let full = std::mem::replace(&mut self.wb, self.engine.batch());
            self.engine.write(full, false)?;
            self.n = 0;
        }
        Ok(())
    }
}

/// The directory a restore builds the store in, beside `db`.
pub const RESTORING_DIR: &str = "db.restoring";
/// What an interrupted restore left in `data_dir`, if anything: a node must not start there.
pub fn unfinished(data_dir: &Path) -> Option<std::path::PathBuf> {
    Some(data_dir.join(RESTORING_DIR)).filter(|p| p.exists())
}

/// Held (created exclusively) while a restore runs.
pub const LOCK_FILE: &str = "restore.lock";
/// The default revision bump: far more revisions than a cluster hands out in the minutes
/// between its last backup and its loss at metadata rates.
pub const DEFAULT_BUMP: u64 = 1_000_000;

/// Refusals that need no reading of the backup's files.
fn check_target(cfg: &Config, m: &super::Manifest) -> Result<()> {
    if cfg.joining() {
        return Err(Error::Refused(
            "a restore seeds the founding nodes (cluster.initial_cluster); a joining node \
             gets its data from the cluster"
                .into(),
        ));
    }
    if cfg.cluster.cluster_id == m.cluster_id {
        return Err(Error::Refused(format!(
            "the backup is of cluster {0}: restore into a new cluster, with a \
             cluster.cluster_id other than {0}, so that no node of the old one talks to it",
            m.cluster_id
        )));
    }
    let db = cfg.node.data_dir.join("db");
    if std::fs::read_dir(&db).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::Refused(format!(
            "{} already holds a store: a restore only seeds an empty data directory",
            db.display()
        )));
    }
    Ok(())
}

/// Removes the lock file when the restore ends, however it ends.
struct Lock(std::path::PathBuf);

impl Lock {
    fn take(path: std::path::PathBuf) -> Result<Lock> {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(_) => Ok(Lock(path)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(Error::Refused(format!(
                "{} exists: another restore is running here, or one was killed (then delete it)",
                path.display()
            )))
            }
            Err(e) => Err(super::io(&path)(e)),
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Restores the backup in `dir` into the store of the node `cfg` configures (validated),
/// starting the new cluster's revisions at the backup's end revision plus `bump`.
pub fn restore(
    cfg: &Config,
    dir: &Path,
    bump: u64,
    mut progress: impl FnMut(&str, u64),
) -> Result<Summary> {
    let (manifest, _) = super::read_manifest(dir)?;
    check_target(cfg, &manifest)?;
    let base = manifest
        .end_revision
        .checked_add(bump)
        .filter(|b| *b <= super::MAX_REVISION)
        .ok_or_else(|| Error::Refused(format!("--bump-revision {bump} is too large")))?;
    let members = cfg.members().map_err(|e| Error::Refused(e.to_string()))?;
    let node = cfg.node_id();
    std::fs::create_dir_all(&cfg.node.data_dir).map_err(super::io(&cfg.node.data_dir))?;
    let _lock = Lock::take(cfg.node.data_dir.join(LOCK_FILE))?;
    let limits = Limits {
        max_key_size: cfg.server.max_key_size,
        max_value_size: cfg.server.max_value_size,
    };
    let backup = verify(dir, &limits, |n| progress("verified", n))?;
    let m = &backup.manifest;
    check_target(cfg, m)?;
    let split_keys: Vec<Vec<u8>> = backup
        .regions
        .iter()
        .skip(1)
        .map(|r| r.start.clone())
        .collect();
    let regions = initial_regions(
        &members,
        &split_keys,
        cfg.cluster.replicas,
        cfg.cluster.lease_regions,
    );
    let hosts = |r: &Region| r.peers.iter().any(|p| p.node_id == node.0);
    // The lease regions this node hosts, by range.
    let lease_regions: Vec<&Region> = regions
        .iter()
        .filter(|r| r.start_key.as_slice() >= tessera_api::keys::LEASE_KEYSPACE.as_slice())
        .collect();
    let hosted_lease_region = |id: u64| {
        let key = lease_key(id);
        lease_regions
            .iter()
            .find(|r| keys::in_range(&key, &r.start_key, &r.end_key))
            .filter(|r| hosts(r))
            .map(|r| r.id)
    };

    let tmp = cfg.node.data_dir.join(RESTORING_DIR);
    if tmp.exists() {
        // What an interrupted restore left (the lock says none is running).
        std::fs::remove_dir_all(&tmp).map_err(super::io(&tmp))?;
    }
    let engine = Engine::open(&tmp, &EngineOptions::default())?;
    let mut w = Writer {
        engine: &engine,
        wb: engine.batch(),
        n: 0,
    };
    let mut sizes = Sizes::default();
    let mut summary = Summary {
        revision: m.revision,
        base_revision: base,
        ..Default::default()
    };
    for (i, r) in backup.regions.iter().enumerate() {
        // The user regions come first, in key order, one per backup region.
        let region = &regions[i];
        if region.start_key != r.start || region.end_key != r.end {
            return Err(Error::Refused(format!(
                "region {} of the new cluster is not the backup's region {i}",
                region.id
            )));
        }
        let hosted = hosts(region);
        read_region(m, &limits, i, r, |kv| {
            // The row attaching the key to its lease, in the lease's region.
            if let Some(lr) = (kv.lease != 0)
                .then(|| hosted_lease_region(kv.lease))
                .flatten()
            {
                let row = lease_attached_row(kv.lease, &kv.key);
                let rec = system_record(Vec::new());
                sizes.add(lr, &row, &rec);
                w.put(&row, &rec)?;
            }
            if hosted {
                let rec = KvRecord {
                    value: kv.value,
                    create_revision: kv.create_revision,
                    mod_revision: kv.mod_revision,
                    version: kv.version,
                    lease: kv.lease,
                };
                sizes.add(region.id, &kv.key, &rec);
                w.put(&kv.key, &rec)?;
                summary.keys += 1;
                if summary.keys % BATCH as u64 == 0 {
                    progress("written", summary.keys);
                }
            }
            Ok(())
        })?;
    }
    for l in &m.leases {
        let Some(lr) = hosted_lease_region(l.id) else {
            continue;
        };
        let lease = LeaseRecord {
            ttl_ms: l.ttl_ms,
            deadline_ms: l.deadline_ms,
            revoked_at_ms: 0,
        };
        let key = lease_key(l.id);
        let rec = system_record(prost::Message::encode_to_vec(&lease));
        sizes.add(lr, &key, &rec);
        w.put(&key, &rec)?;
        summary.leases += 1;
    }
    // Region states, placement's records, the node's compacted revision and its identity,
    // synced together.
    let Writer { mut wb, .. } = w;
    let max_id = regions
        .iter()
        .flat_map(|r| r.peers.iter().map(|p| p.id))
        .max()
        .unwrap_or(0);
    for r in regions.iter().filter(|r| hosts(r)) {
        let user = !keys::is_system_key(&r.start_key);
        let max_revision = if user { base } else { 0 };
        PeerStorage::write_restored_state(&mut wb, r, sizes.of(r.id), max_revision);
        if r.start_key == [keys::SYSTEM_KEY_PREFIX] {
            seed_id_counter(&mut wb, max_id);
            for key in [tso_key(), crate::placement::compaction::compact_key()] {
                let rec = system_record(base.to_be_bytes().to_vec());
                wb.put_msg(Cf::Data, &keys::data_key(&key), &rec);
            }
        }
        summary.regions += 1;
    }
    mvcc::store_compacted(&mut wb, base);
    put_ident(&mut wb, cfg.cluster_id(), node);
    engine.write(wb, true)?;
    engine.flush()?;
    drop(engine);
    let db = cfg.node.data_dir.join("db");
    if db.exists() {
        // Empty (checked above): the rename needs it gone.
        std::fs::remove_dir(&db).map_err(super::io(&db))?;
    }
    std::fs::rename(&tmp, &db).map_err(super::io(&db))?;
    std::fs::File::open(&cfg.node.data_dir)
        .and_then(|d| d.sync_all())
        .map_err(super::io(&cfg.node.data_dir))?;
    progress("written", summary.keys);
    Ok(summary)
}
