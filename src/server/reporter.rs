//! Region reports: each region's leader writes the region's descriptor, leader and load into
//! the placement routing table — at once when its leadership or descriptor changes (the
//! raft workers send those region ids here), and every `interval` for regions whose load
//! moved. Followers never report, so a table row always comes from a leader of its term, and
//! `placement::report_region` keeps a stale report from overwriting a newer one.
//!
//! Invariants:
//! - a region is reported only while its local peer leads; a stale report loses to a newer
//!   row in `placement::report_region`;
//! - at most 16 reports are in flight; a failed report is tried again on the next pass
//!   (about half a second later), not dropped;
//! - a led region's row is rewritten about every 10 minutes even when nothing changed;
//! - size splits run only on full passes, and only for led regions over the limits;
//! - a merge found unfinished on a led region (target locked, or source frozen) for more
//!   than `RESUME_MERGE_AFTER` is driven on (`resume_merges`), one driver per pair.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;

use super::admin::{describe_some, split_oversized, SplitLimits};
use crate::ids::RegionId;
use crate::placement::client::SystemClient;
use crate::proto::{RegionLoad, RegionRoute};
use crate::raftstore::msg::RegionInfo;
use crate::raftstore::router::Router;
use crate::storage::Engine;

/// A quiet region's row is still rewritten this often, so `reported_ms` shows it is alive.
/// Long: at 10,000 regions every rewrite round is 10,000 placement writes.
const REFRESH_AFTER: Duration = Duration::from_secs(600);
/// Reports in flight at once.
const CONCURRENCY: usize = 16;
/// A merge left unfinished this long (its driver stopped: a crash, a command interrupted)
/// is driven on by the node leading its regions.
const RESUME_MERGE_AFTER: Duration = Duration::from_secs(5);

/// Unfinished merges seen on led regions: (source, target) → first seen, and whether a
/// driver runs for it.
#[derive(Default)]
struct Unfinished {
    seen: HashMap<(u64, u64), Instant>,
    running: std::sync::Arc<std::sync::Mutex<HashSet<(u64, u64)>>>,
}

impl Unfinished {
    /// Drives on the merges that led regions in `infos` (a full pass) are taking part in
    /// and that stayed unfinished for `RESUME_MERGE_AFTER`: each step is idempotent, so a
    /// second driver next to a live one is harmless.
    fn resume_merges(&mut self, placement: &SystemClient, infos: &[RegionInfo]) {
        let now = Instant::now();
        let pairs: HashSet<(u64, u64)> = infos
            .iter()
            .filter(|i| i.is_leader)
            .filter_map(|i| {
                let m = i.merge?;
                if m.target_id != 0 {
                    Some((i.region.id, m.target_id))
                } else {
                    Some((m.source_id, i.region.id))
                }
            })
            .collect();
        self.seen.retain(|p, _| pairs.contains(p));
        for pair in pairs {
            let since = *self.seen.entry(pair).or_insert(now);
            if now.duration_since(since) < RESUME_MERGE_AFTER {
                continue;
            }
            if !self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(pair)
            {
                continue;
            }
            let (placement, running) = (placement.clone(), self.running.clone());
            tokio::spawn(async move {
                let res = match placement.get().await {
                    Ok(client) => client
                        .merge_regions(RegionId(pair.0), RegionId(pair.1), Duration::from_secs(30))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match res {
                    Ok(()) => tracing::info!(
                        source = pair.0,
                        target = pair.1,
                        "unfinished merge finished"
                    ),
                    Err(e) => {
                        tracing::warn!(source = pair.0, target = pair.1, error = %e, "unfinished merge not finished yet")
                    }
                }
                running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&pair);
            });
        }
    }
}

struct Reported {
    at: Instant,
    writes: u64,
    applied_index: u64,
    rank: (u64, u64, u64),
    /// The report showed writes: once they stop, one more report says so (idle regions
    /// may merge).
    busy: bool,
}

fn rank(i: &RegionInfo) -> (u64, u64, u64) {
    let e = i.region.epoch.unwrap_or_default();
    (e.version, e.conf_ver, i.term)
}

/// Also the size check: each full pass splits the led regions over `limits`.
pub async fn report_loop(
    placement: SystemClient,
    router: Router,
    engine: Engine,
    limits: SplitLimits,
    mut changes: UnboundedReceiver<RegionId>,
    interval: Duration,
) {
    let mut last: HashMap<RegionId, Reported> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Regions whose report failed: tried again on the next pass.
    let mut retry: HashSet<RegionId> = HashSet::new();
    let mut unfinished = Unfinished::default();
    loop {
        let retrying = !retry.is_empty();
        let mut urgent: HashSet<RegionId> = std::mem::take(&mut retry);
        let full = tokio::select! {
            _ = ticker.tick() => true,
            _ = tokio::time::sleep(Duration::from_millis(500)), if retrying => false,
            id = changes.recv() => match id {
                Some(id) => { urgent.insert(id); false }
                None => return,
            },
        };
        // Let a burst of changes (an election wave) arrive, then report them together.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Ok(id) = changes.try_recv() {
            urgent.insert(id);
        }
        if full {
            super::disk_gauges(engine.path());
        }
        let ids: Vec<RegionId> = if full {
            router.region_ids()
        } else {
            urgent.iter().copied().collect()
        };
        let infos = describe_some(&router, &ids).await;
        if full {
            unfinished.resume_merges(&placement, &infos);
            let oversized: Vec<RegionInfo> = infos
                .iter()
                .filter(|i| i.is_leader && limits.exceeded_by(i))
                .cloned()
                .collect();
            if !oversized.is_empty() {
                split_oversized(&router, &placement, &engine, oversized).await;
            }
        }
        let now = Instant::now();
        let mut todo = Vec::new();
        for info in infos {
            let id = RegionId(info.region.id);
            if !info.is_leader {
                last.remove(&id);
                continue;
            }
            let due = match last.get(&id) {
                None => true,
                Some(prev) => {
                    urgent.contains(&id)
                        || prev.rank != rank(&info)
                        || ((prev.applied_index != info.applied_index || prev.busy)
                            && now.duration_since(prev.at) >= interval)
                        || now.duration_since(prev.at) >= REFRESH_AFTER
                }
            };
            if due {
                todo.push(info);
            }
        }
        if todo.is_empty() {
            continue;
        }
        let client = match placement.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "placement not reachable; reports wait");
                retry.extend(todo.iter().map(|i| RegionId(i.region.id)));
                continue;
            }
        };
        let results: Vec<(RegionInfo, bool)> = futures::stream::iter(todo)
            .map(|info| {
                let client = client.clone();
                let prev_writes = last.get(&RegionId(info.region.id)).map(|p| (p.writes, p.at));
                async move {
                    let writes_per_sec = match prev_writes {
                        Some((w, at)) => {
                            let secs = now.duration_since(at).as_secs_f64().max(0.001);
                            info.writes.saturating_sub(w) as f64 / secs
                        }
                        None => 0.0,
                    };
                    let route = RegionRoute {
                        region: Some(info.region.clone()),
                        leader: info.leader,
                        term: info.term,
                        load: Some(RegionLoad {
                            keys: info.keys,
                            bytes: info.bytes,
                            writes_per_sec,
                        }),
                        reported_ms: crate::placement::now_ms(),
                    };
                    let ok = match crate::placement::report_region(&client, &route).await {
                        Ok(_) => true,
                        Err(e) => {
                            tracing::debug!(region = info.region.id, error = %e, "region report failed");
                            false
                        }
                    };
                    (info, ok)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (info, ok) in results {
            let id = RegionId(info.region.id);
            if ok {
                metrics::counter!("tessera_region_reports_total").increment(1);
                let busy = last.get(&id).is_some_and(|p| info.writes > p.writes);
                last.insert(
                    id,
                    Reported {
                        at: now,
                        writes: info.writes,
                        applied_index: info.applied_index,
                        rank: rank(&info),
                        busy,
                    },
                );
            } else {
                retry.insert(id);
            }
        }
    }
}
