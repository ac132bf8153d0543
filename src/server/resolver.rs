//! Raising the resolved revision of watched regions (docs/architecture.md, "Watch").
//!
//! A watch over several regions releases an event only once every region involved has
//! resolved past its revision: no event at or below it can still appear there. A region
//! that applied writes since the last look is resolved up to the last one (its revisions
//! rise in log order). An idle region is resolved by a read at a fresh revision `T` through
//! its leader: the read raises the leader's revision floor to `T`, waits until everything
//! already in its log is applied, and confirms the leadership — after which no write at or
//! below `T` can reach the region (docs/architecture.md, "Reads at a revision").
//!
//! Invariants:
//! - a region's resolved revision is raised only to the revision of a change already
//!   published to its watchers, or to `T` after its leader answered the read at `T`;
//! - one oracle request per look, whatever the number of regions; the task ends with the
//!   node (aborted at shutdown).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::ids::RegionId;
use crate::placement::tso::TsoClient;
use crate::raftstore::hub::WatchHub;
use crate::raftstore::msg::{PeerMsg, ReadRequest};
use crate::raftstore::router::Router;

pub(super) async fn resolve_loop(
    hub: WatchHub,
    router: Router,
    revisions: TsoClient,
    interval: Duration,
) {
    // The revision last published in each region at the previous look, and when each
    // region's resolved revision last rose.
    let mut last: HashMap<RegionId, u64> = HashMap::new();
    let mut risen: HashMap<RegionId, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let regions = hub.wanting_progress();
        let now = Instant::now();
        let lag = regions
            .iter()
            .filter_map(|(r, _)| risen.get(r).map(|t| now - *t))
            .max()
            .unwrap_or_default();
        metrics::gauge!("tessera_watch_resolved_lag_seconds").set(lag.as_secs_f64());
        last.retain(|r, _| regions.iter().any(|(x, _)| x == r));
        risen.retain(|r, _| regions.iter().any(|(x, _)| x == r));
        let mut idle = Vec::new();
        for (region, published) in regions {
            match last.insert(region, published) {
                Some(before) if before != published => {
                    hub.resolve(region, published);
                    risen.insert(region, now);
                }
                _ => {
                    risen.entry(region).or_insert(now);
                    idle.push(region);
                }
            }
        }
        if idle.is_empty() {
            continue;
        }
        let Ok(at) = revisions.latest().await else {
            continue;
        };
        let reads = idle.into_iter().map(|region| {
            let (reply, rx) = oneshot::channel();
            let sent = router.send(
                region,
                PeerMsg::Read {
                    req: ReadRequest::BatchGet { keys: Vec::new() },
                    epoch: Default::default(),
                    linearizable: true,
                    at,
                    reply,
                },
            );
            async move {
                let ok = sent.is_ok()
                    && matches!(tokio::time::timeout(interval * 20, rx).await, Ok(Ok(Ok(_))));
                (region, ok)
            }
        });
        for (region, ok) in futures::future::join_all(reads).await {
            if ok {
                hub.resolve(region, at);
                risen.insert(region, Instant::now());
            }
        }
    }
}
