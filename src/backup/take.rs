//! Taking a backup through the client: every user region read at one cluster revision.
//!
//! Invariants:
//! - the revision is fixed before the first read and every read is at it, so the files
//!   hold the cluster's user data exactly as of that revision, whatever is written
//!   meanwhile; a compaction past it fails the backup rather than mixing revisions;
//! - memory holds one page of keys per region being read, never the backup;
//! - the manifest is written last: an interrupted backup has none and is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};

use super::{
    hex, io, region_file, write_manifest, Error, LeaseEntry, Manifest, RecordWriter, RegionEntry,
    Result, FORMAT,
};
use crate::client::Client;

/// Most keys read per request.
const PAGE: usize = 1024;
/// Fewest keys read per request (a page of the largest values: 16 MiB).
const MIN_PAGE: usize = 16;
/// Regions read at a time.
const PARALLEL: usize = 4;

/// How far a backup has got.
#[derive(Default)]
pub struct Progress {
    pub regions_total: AtomicU64,
    pub regions_done: AtomicU64,
    pub keys: AtomicU64,
    pub bytes: AtomicU64,
}

/// What a finished backup holds.
#[derive(Clone, Debug)]
pub struct Summary {
    pub revision: u64,
    pub regions: usize,
    pub keys: u64,
    pub bytes: u64,
    pub leases: usize,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Backs the cluster `client` talks to up into `out`, which must not exist or be empty.
pub async fn take(client: &Client, out: &Path, progress: &Progress) -> Result<Summary> {
    match std::fs::read_dir(out) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Err(Error::Refused(format!(
                    "{} is not empty: a backup goes into a new directory",
                    out.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(out).map_err(io(out))?;
        }
        Err(e) => return Err(io(out)(e)),
    }
    let cluster_id = client.status().await?.cluster_id;
    // The user regions as routed now; a region that splits meanwhile is still read whole
    // (a scan crosses regions), into the file of the range it had here.
    let user_end = vec![tessera_api::keys::SYSTEM_KEY_PREFIX];
    let mut ranges: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for route in client.routes().await? {
        let Some(r) = route.region else { continue };
        if r.start_key >= user_end {
            continue;
        }
        let end = if r.end_key.is_empty() || r.end_key > user_end {
            user_end.clone()
        } else {
            r.end_key
        };
        ranges.push((r.start_key, end));
    }
    ranges.sort();
    if ranges.first().map(|r| r.0.as_slice()) != Some(&[][..])
        || ranges.windows(2).any(|w| w[0].1 != w[1].0)
        || ranges.last().map(|r| &r.1) != Some(&user_end)
    {
        return Err(Error::Refused(
            "the routing table does not cover the user keyspace yet (a split is being \
             reported); try again in a few seconds"
                .into(),
        ));
    }
    let revision = client.current_revision().await?;
    let created_at_ms = now_ms();
    progress
        .regions_total
        .store(ranges.len() as u64, Ordering::Relaxed);

    let regions: Vec<RegionEntry> = futures::stream::iter(ranges.into_iter().enumerate())
        .map(|(i, (start, end))| backup_region(client, out, i, start, end, revision, progress))
        .buffered(PARALLEL)
        .try_collect()
        .await?;

    let leases = leases_of(client, out, regions.len()).await?;
    let end_revision = client.current_revision().await?;
    let manifest = Manifest {
        format: FORMAT.into(),
        cluster_id,
        revision,
        end_revision,
        created_at_ms,
        keys: regions.iter().map(|r| r.keys).sum(),
        bytes: regions.iter().map(|r| r.bytes).sum(),
        leases,
        regions,
    };
    write_manifest(out, &manifest)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io(parent))?;
    }
    Ok(Summary {
        revision,
        regions: manifest.regions.len(),
        keys: manifest.keys,
        bytes: manifest.bytes,
        leases: manifest.leases.len(),
    })
}

/// Keys per request: as many as fit in about 8 MiB at the largest record seen so far in the
/// region, between [`MIN_PAGE`] and [`PAGE`].
fn page_for(largest_record: u64) -> usize {
    ((8u64 << 20) / largest_record.max(1)).clamp(MIN_PAGE as u64, PAGE as u64) as usize
}

/// Every live lease, and every lease a key of the backup names, read after the keys. A lease
/// that ended since the revision is recorded as ended at once, so its keys go soon after a
/// restore, as they would have gone here.
async fn leases_of(client: &Client, out: &Path, regions: usize) -> Result<Vec<LeaseEntry>> {
    let listed_at = now_ms();
    let mut leases: BTreeMap<u64, LeaseEntry> = client
        .leases()
        .await?
        .into_iter()
        .map(|l| {
            let e = LeaseEntry {
                id: l.id,
                ttl_ms: l.ttl.as_millis() as u64,
                deadline_ms: listed_at + l.remaining.as_millis() as u64,
            };
            (l.id, e)
        })
        .collect();
    let mut named = BTreeSet::new();
    for i in 0..regions {
        let mut rd = super::RecordReader::open(&out.join(region_file(i)))?;
        while let Some(kv) = rd.next_record()? {
            if kv.lease != 0 && !leases.contains_key(&kv.lease) {
                named.insert(kv.lease);
            }
        }
    }
    // Not listed (a lease region the listing missed, or a lease that ended since): asked
    // one by one; only a definite "no such lease" counts as ended.
    for id in named {
        let entry = match client.lease_time_to_live(id, false).await {
            Ok(st) if !st.ttl.is_zero() => LeaseEntry {
                id,
                ttl_ms: st.ttl.as_millis() as u64,
                deadline_ms: now_ms() + st.remaining.as_millis() as u64,
            },
            Ok(_) | Err(crate::client::Error::NotFound(_)) => LeaseEntry {
                id,
                ttl_ms: 1,
                deadline_ms: listed_at,
            },
            Err(e) => return Err(e.into()),
        };
        leases.insert(id, entry);
    }
    Ok(leases.into_values().collect())
}

async fn backup_region(
    client: &Client,
    out: &Path,
    i: usize,
    start: Vec<u8>,
    end: Vec<u8>,
    revision: u64,
    progress: &Progress,
) -> Result<RegionEntry> {
    let file = region_file(i);
    let mut w = RecordWriter::create(&out.join(&file))?;
    // Each page starts at the last key written (inclusive: one past it could exceed the
    // key size limit or meet the range's end), which comes back first and is skipped. The
    // range is done when a page brings nothing new: a short page proves nothing.
    let mut last: Option<Vec<u8>> = None;
    let mut largest = 0u64;
    loop {
        let cursor = last.clone().unwrap_or_else(|| start.clone());
        let page = page_for(largest);
        let kvs = match client.scan_at(&cursor, &end, page, revision).await {
            Ok(kvs) => kvs,
            Err(crate::client::Error::Compacted { compact_revision }) => {
                return Err(Error::Refused(format!(
                    "the cluster was compacted to revision {compact_revision}, past the \
                     backup's revision {revision}, while the backup ran; run it again (and \
                     let auto-compaction keep more history)"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        let before = (w.keys, w.bytes);
        for kv in kvs {
            if last.as_ref() == Some(&kv.key) {
                continue;
            }
            if last.as_ref().is_some_and(|l| kv.key <= *l) || kv.key < start || kv.key >= end {
                return Err(Error::Refused(format!(
                    "the cluster answered key {:?} out of order or outside [{}, {}): backup \
                     stopped",
                    String::from_utf8_lossy(&kv.key),
                    hex(&start),
                    hex(&end)
                )));
            }
            let b = w.bytes;
            w.write(&kv)?;
            largest = largest.max(w.bytes - b);
            last = Some(kv.key);
        }
        progress
            .keys
            .fetch_add(w.keys - before.0, Ordering::Relaxed);
        progress
            .bytes
            .fetch_add(w.bytes - before.1, Ordering::Relaxed);
        if w.keys == before.0 {
            break;
        }
    }
    let keys = w.keys;
    let bytes = w.bytes;
    let sha256 = w.finish()?;
    progress.regions_done.fetch_add(1, Ordering::Relaxed);
    Ok(RegionEntry {
        start: hex(&start),
        end: hex(&end),
        file,
        keys,
        bytes,
        sha256,
    })
}
