//! Restoring a backup: seeding a founding node's store of a new cluster from it.
//!
//! Every founding node runs the restore with its own config and the same backup, and
//! computes the same regions (the backup's user regions, then placement's and the lease
//! regions, as a first start would) with the same data, so the replicas agree with no log
//! between them: each region starts at its initial raft index holding the backup's keys,
//! their revisions and history rows at those revisions. The oracle's mark and the cluster's
//! compacted revision are the backup's revision, so new writes get revisions above every
//! restored one and reads below it are `Compacted` (the history before it is not in the
//! backup). Leases keep the deadlines the backup saw: one that has passed by the time the
//! cluster runs expires then, and its keys go, as they would have in the old cluster.
//!
//! Invariants:
//! - nothing is written until the whole backup has been read and verified;
//! - the store is built in `db.restoring` beside the node's `db` and renamed into place
//!   only once complete and synced: an interrupted restore leaves no store to start from;
//! - a node never restores over an existing store, into the backup's own cluster id, or as
//!   a joining node.

use std::collections::BTreeMap;
use std::path::Path;

use super::{read_region, verify, Error, Result};
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
    pub revision: u64,
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

/// Restores the backup in `dir` into the store of the node `cfg` configures (validated).
pub fn restore(cfg: &Config, dir: &Path, mut progress: impl FnMut(&str, u64)) -> Result<Summary> {
    let backup = verify(dir, |n| progress("verified", n))?;
    let m = &backup.manifest;
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
    let members = cfg.members().map_err(|e| Error::Refused(e.to_string()))?;
    let node = cfg.node_id();
    let db = cfg.node.data_dir.join("db");
    if std::fs::read_dir(&db).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::Refused(format!(
            "{} already holds a store: a restore only seeds an empty data directory",
            db.display()
        )));
    }
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

    let tmp = cfg.node.data_dir.join("db.restoring");
    if tmp.exists() {
        // What an interrupted restore left: never a store any node started from.
        std::fs::remove_dir_all(&tmp).map_err(super::io(&tmp))?;
    }
    std::fs::create_dir_all(&cfg.node.data_dir).map_err(super::io(&cfg.node.data_dir))?;
    let engine = Engine::open(&tmp, &EngineOptions::default())?;
    let mut w = Writer {
        engine: &engine,
        wb: engine.batch(),
        n: 0,
    };
    let mut sizes = Sizes::default();
    let mut summary = Summary {
        revision: m.revision,
        ..Default::default()
    };
    // Keys attached to each lease: rows in the lease's region.
    let mut attached: BTreeMap<u64, Vec<Vec<u8>>> = BTreeMap::new();
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
        read_region(m, i, r, |kv| {
            if kv.lease != 0 {
                attached.entry(kv.lease).or_default().push(kv.key.clone());
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
    // Leases and their rows, in the lease regions that hold them.
    for l in &m.leases {
        let key = lease_key(l.id);
        let Some(region) = regions
            .iter()
            .find(|r| keys::in_range(&key, &r.start_key, &r.end_key))
            .filter(|r| hosts(r))
        else {
            continue;
        };
        let lease = LeaseRecord {
            ttl_ms: l.ttl_ms,
            deadline_ms: l.deadline_ms,
            revoked_at_ms: 0,
        };
        let rec = system_record(prost::Message::encode_to_vec(&lease));
        sizes.add(region.id, &key, &rec);
        w.put(&key, &rec)?;
        for k in attached.get(&l.id).into_iter().flatten() {
            let row = lease_attached_row(l.id, k);
            let rec = system_record(Vec::new());
            sizes.add(region.id, &row, &rec);
            w.put(&row, &rec)?;
        }
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
        let max_revision = if user { m.revision } else { 0 };
        PeerStorage::write_seeded_state(&mut wb, r, sizes.of(r.id), max_revision);
        if r.start_key == [keys::SYSTEM_KEY_PREFIX] {
            seed_id_counter(&mut wb, max_id);
            for key in [tso_key(), crate::placement::compaction::compact_key()] {
                let rec = system_record(m.revision.to_be_bytes().to_vec());
                wb.put_msg(Cf::Data, &keys::data_key(&key), &rec);
            }
        }
        summary.regions += 1;
    }
    mvcc::store_compacted(&mut wb, m.revision);
    put_ident(&mut wb, cfg.cluster_id(), node);
    engine.write(wb, true)?;
    engine.flush()?;
    drop(engine);
    std::fs::rename(&tmp, &db).map_err(super::io(&db))?;
    std::fs::File::open(&cfg.node.data_dir)
        .and_then(|d| d.sync_all())
        .map_err(super::io(&cfg.node.data_dir))?;
    progress("written", summary.keys);
    Ok(summary)
}
