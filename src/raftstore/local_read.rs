//! Lease reads served on the gRPC thread that received them, without a trip through the
//! region's raft worker (TiKV's "local reader").
//!
//! A leader that may serve lease reads (see `peer/lease.rs`) publishes a [`LeaseView`]: its
//! region descriptor and when its lease ends. A linearizable read whose epoch and keys match
//! a view that has not ended is served straight from the engine; anything else — no view,
//! lease over, another epoch, a key outside the range — goes to the worker as before, which
//! answers it or says why not.
//!
//! Why that is the same read the worker would serve: the engine holds every write this
//! leader acknowledged (a write is answered only after the batch applying it is written), and
//! the view is withdrawn *before* anything that ends the lease other than time: a leader
//! transfer starting, a role change, and a split, membership change or snapshot being
//! applied (they change the range the view vouches for). Publishing a renewed lease late
//! only shortens it.
//!
//! Invariants:
//! - a read is served here only if its region has a view, the lease has not ended
//!   (CLOCK_BOOTTIME), the epoch version matches and every key it names is in range;
//!   anything else goes to the worker;
//! - only the region's own peer, on its worker, publishes or withdraws its view;
//! - a batch get reads all its keys at one point in time; a scan is clamped to the region;
//! - a storage read error is a region error (`Internal`), never a panic.

use std::sync::Arc;

use dashmap::DashMap;

use super::clock::BootInstant;
use super::cmd;
use super::msg::{ReadAnswer, ReadRequest, ReadResult, RegionError};
use crate::ids::RegionId;
use crate::proto::{self, KvRecord, RegionEpoch};
use crate::storage::{keys, mvcc, Cf, Engine};

/// What a leader vouches for: reads of `region`'s range with its epoch are linearizable
/// from the engine until `until`.
pub struct LeaseView {
    pub region: proto::Region,
    pub until: BootInstant,
    /// The raft term the leader holds the lease in: one leader per term, so two views of
    /// the same term vouch for one unbroken leadership (the timestamp oracle relies on it).
    pub term: u64,
}

/// The node's published lease views, shared by the workers (writers) and the gRPC services,
/// and the engine the reads they vouch for are served from.
#[derive(Clone)]
pub struct LocalReader {
    views: Arc<DashMap<RegionId, Arc<LeaseView>>>,
    engine: Engine,
}

impl LocalReader {
    pub fn new(engine: Engine) -> Self {
        Self {
            views: Arc::default(),
            engine,
        }
    }

    /// The engine reads are served from.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn publish(&self, region: RegionId, view: LeaseView) {
        self.views.insert(region, Arc::new(view));
    }

    pub fn withdraw(&self, region: RegionId) {
        self.views.remove(&region);
    }

    /// The region whose live view holds `key`, if this node leads one under a lease.
    pub fn live_region_of(&self, key: &[u8]) -> Option<RegionId> {
        let now = BootInstant::now();
        self.views.iter().find_map(|e| {
            let v = e.value();
            (now < v.until && keys::in_range(key, &v.region.start_key, &v.region.end_key))
                .then_some(*e.key())
        })
    }

    /// The region's view, if this node leads it under a lease that has not ended.
    pub fn live_view(&self, region: RegionId) -> Option<Arc<LeaseView>> {
        let view = self.views.get(&region)?.value().clone();
        (BootInstant::now() < view.until).then_some(view)
    }

    /// Serves a linearizable read here if a lease vouches for it; `None` sends it to the
    /// region's worker.
    pub fn try_read(
        &self,
        region: RegionId,
        epoch: &RegionEpoch,
        req: &ReadRequest,
    ) -> Option<Result<ReadAnswer, RegionError>> {
        let view = self.views.get(&region)?.value().clone();
        let r = &view.region;
        if BootInstant::now() >= view.until
            || r.epoch.unwrap_or_default().version != epoch.version
            || !read_keys(req)
                .iter()
                .all(|k| keys::in_range(k, &r.start_key, &r.end_key))
        {
            return None;
        }
        metrics::counter!("tessera_reads_total", "path" => "lease_local").increment(1);
        Some(serve_read(&self.engine, r, req))
    }
}

/// The keys a read must find inside the region (a scan: its start; its end is clamped).
/// Borrowed, not collected: this runs for every lease read on the gRPC thread.
pub fn read_keys(req: &ReadRequest) -> &[Vec<u8>] {
    match req {
        ReadRequest::Get { key } => std::slice::from_ref(key),
        ReadRequest::BatchGet { keys } => keys,
        ReadRequest::Scan { start, .. } => std::slice::from_ref(start),
    }
}

/// Reads from the engine's applied state of `region`, at one point in time: a batch get
/// must not see half of one atomic write, and the answer's revision (the region's highest
/// applied revision) must be that of the state read.
pub fn serve_read(
    engine: &Engine,
    region: &proto::Region,
    req: &ReadRequest,
) -> Result<ReadAnswer, RegionError> {
    engine.with_snapshot(|view| {
        let apply: proto::RaftApplyState = view
            .get_msg(Cf::Raft, &keys::apply_state_key(RegionId(region.id)))
            .map_err(busy)?
            .unwrap_or_default();
        let result = answer(
            region,
            req,
            |key| view.get_msg(Cf::Data, &keys::data_key(key)),
            |start, end, f| {
                let (start, end) = (keys::data_key(start), keys::data_end_key(end));
                view.scan(Cf::Data, &start, &end, |k, v| {
                    let key = keys::origin_key(k)?.to_vec();
                    let rec = <KvRecord as prost::Message>::decode(v)
                        .map_err(|e| crate::storage::Error::corrupt(k, e))?;
                    f(key, rec)
                })
            },
        )?;
        Ok(ReadAnswer {
            result,
            revision: apply.max_revision,
        })
    })
}

/// Reads `region`'s keys as of cluster revision `at` from their history (`mvcc`). The
/// caller has made sure every write of the region at or below `at` is applied.
pub fn serve_read_at(
    engine: &Engine,
    region: &proto::Region,
    req: &ReadRequest,
    at: u64,
) -> Result<ReadAnswer, RegionError> {
    let compacted = engine.compacted_revision();
    if at < compacted {
        return Err(RegionError::Compacted { compacted });
    }
    let result = answer(
        region,
        req,
        |key| mvcc::get_at(engine, key, at),
        |start, end, f| mvcc::scan_at(engine, start, end, at, f),
    )?;
    // Compaction may have passed `at` while the rows were read.
    let compacted = engine.compacted_revision();
    if at < compacted {
        return Err(RegionError::Compacted { compacted });
    }
    Ok(ReadAnswer {
        result,
        revision: at,
    })
}

/// What a scan hands each key it finds; `Ok(false)` stops it.
type Visit<'a> = &'a mut dyn FnMut(Vec<u8>, KvRecord) -> Result<bool, crate::storage::Error>;

/// Answers `req` from one source of records: `get` reads a key, `scan` visits the keys of a
/// user range in order.
fn answer(
    region: &proto::Region,
    req: &ReadRequest,
    get: impl Fn(&[u8]) -> Result<Option<KvRecord>, crate::storage::Error>,
    scan: impl FnOnce(&[u8], &[u8], Visit<'_>) -> Result<(), crate::storage::Error>,
) -> Result<ReadResult, RegionError> {
    let get = |key: &[u8]| -> Result<Option<proto::KeyValue>, RegionError> {
        Ok(get(key).map_err(busy)?.map(|r| cmd::key_value(key, r)))
    };
    Ok(match req {
        ReadRequest::Get { key } => ReadResult::Get(get(key)?),
        ReadRequest::BatchGet { keys } => {
            ReadResult::BatchGet(keys.iter().map(|k| get(k)).collect::<Result<Vec<_>, _>>()?)
        }
        ReadRequest::Scan {
            start,
            end,
            limit,
            keys_only,
        } => {
            let (start, end) = clamp(region, start, end);
            let mut kvs = Vec::new();
            let mut more = false;
            let mut visit = |key: Vec<u8>, rec: KvRecord| {
                if kvs.len() >= *limit {
                    more = true;
                    return Ok(false);
                }
                let mut kv = cmd::key_value(&key, rec);
                if *keys_only {
                    kv.value.clear();
                }
                kvs.push(kv);
                Ok(true)
            };
            scan(&start, &end, &mut visit).map_err(busy)?;
            ReadResult::Scan { kvs, more }
        }
    })
}

fn busy(e: crate::storage::Error) -> RegionError {
    RegionError::Internal {
        reason: format!("storage read failed: {e}"),
    }
}

/// A scan's `[start, end)` clipped to the region (empty `end` = +infinity).
fn clamp(region: &proto::Region, start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let start = start.max(region.start_key.as_slice()).to_vec();
    let end = match (end.is_empty(), region.end_key.is_empty()) {
        (true, _) => region.end_key.clone(),
        (false, true) => end.to_vec(),
        (false, false) => end.min(region.end_key.as_slice()).to_vec(),
    };
    (start, end)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn get(key: &[u8]) -> ReadRequest {
        ReadRequest::Get { key: key.to_vec() }
    }

    #[test]
    fn serves_only_what_a_live_view_vouches_for() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &Default::default()).unwrap();
        let mut wb = engine.batch();
        let rec = KvRecord {
            value: b"v".to_vec(),
            ..Default::default()
        };
        wb.put_msg(Cf::Data, &keys::data_key(b"b"), &rec);
        engine.write(wb, false).unwrap();

        let epoch = RegionEpoch {
            conf_ver: 1,
            version: 3,
        };
        let region = proto::Region {
            id: 7,
            start_key: b"a".to_vec(),
            end_key: b"m".to_vec(),
            epoch: Some(epoch),
            ..Default::default()
        };
        let reader = LocalReader::new(engine);
        let id = RegionId(7);
        assert!(reader.try_read(id, &epoch, &get(b"b")).is_none());

        reader.publish(
            id,
            LeaseView {
                term: 1,
                region: region.clone(),
                until: BootInstant::now() + Duration::from_secs(60),
            },
        );
        match reader.try_read(id, &epoch, &get(b"b")) {
            Some(Ok(ReadAnswer {
                result: ReadResult::Get(Some(kv)),
                ..
            })) => assert_eq!(kv.value, b"v"),
            other => panic!("expected the stored value, got {other:?}"),
        }
        // Another epoch, a key outside the range, another region: the worker decides.
        let old = RegionEpoch {
            version: 2,
            ..epoch
        };
        assert!(reader.try_read(id, &old, &get(b"b")).is_none());
        assert!(reader.try_read(id, &epoch, &get(b"x")).is_none());
        assert!(reader.try_read(RegionId(8), &epoch, &get(b"b")).is_none());
        let batch = ReadRequest::BatchGet {
            keys: vec![b"b".to_vec(), b"z".to_vec()],
        };
        assert!(reader.try_read(id, &epoch, &batch).is_none());

        // A lease that has ended, or a withdrawn view, serves nothing.
        reader.publish(
            id,
            LeaseView {
                term: 1,
                region: region.clone(),
                until: BootInstant::now(),
            },
        );
        assert!(reader.try_read(id, &epoch, &get(b"b")).is_none());
        reader.publish(
            id,
            LeaseView {
                term: 1,
                region,
                until: BootInstant::now() + Duration::from_secs(60),
            },
        );
        reader.withdraw(id);
        assert!(reader.try_read(id, &epoch, &get(b"b")).is_none());
    }
}
