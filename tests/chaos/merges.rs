//! The fault of the merges scenario: the regions of the test's keys are split and merged
//! back, one after another, and every other merge has the node leading its regions killed
//! -9 a random moment after it started (between lock, prepare and commit), then restarted;
//! the merge is then asked again, which finishes it.

use std::time::{Duration, Instant};

use rand::Rng;
use tessera::client::Client;
use tessera::ids::RegionId;
use tessera::proto::Region;

use super::faults::FaultRun;
use super::{harness_client_opts, leadership_recovered, regions_of};

/// The node (0-based) leading `region`, as the first live node that knows it says.
async fn leader_node(addrs: &[String], region: u64) -> Option<usize> {
    for a in addrs {
        if let Some(rs) = regions_of(a).await {
            let l = rs
                .iter()
                .find(|r| r.region.as_ref().is_some_and(|d| d.id == region))
                .and_then(|r| r.leader);
            if let Some(l) = l {
                return Some(l.node_id as usize - 1);
            }
        }
    }
    None
}

/// The two regions to merge at `key`: split there (or, when a region already starts at
/// `key`, that region and its left neighbour).
async fn pair_at(admin: &Client, key: &[u8]) -> Option<(Region, Region)> {
    let halves = admin.split(key).await.ok()?;
    if let [left, right] = halves.as_slice() {
        return Some((left.clone(), right.clone()));
    }
    let right = halves.first()?.clone();
    let left = admin
        .regions()
        .await
        .ok()?
        .into_iter()
        .map(|c| c.region)
        .find(|r| !r.end_key.is_empty() && r.end_key == right.start_key)?;
    Some((left, right))
}

pub(super) async fn merges_under_kills(r: &mut FaultRun<'_>) {
    let addrs = r.addrs;
    let admin = Client::connect(addrs, super::common::with_tls(addrs, harness_client_opts()))
        .await
        .expect("admin client");
    let keys = r.env.keys.clone();
    let t = Instant::now();
    let run = Duration::from_secs(r.secs.saturating_sub(2).max(8));
    let (mut kills, mut round) = (0u32, 0usize);
    while t.elapsed() < run && round < 40 {
        let key = &keys[round % keys.len()];
        round += 1;
        let Some((left, right)) = pair_at(&admin, key).await else {
            continue;
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (source, target) = (RegionId(right.id), RegionId(left.id));
        let victim = if kills < 3 && round % 2 == 0 {
            leader_node(addrs, right.id).await
        } else {
            None
        };
        let timeout = Duration::from_secs(30);
        let merging = {
            let admin = admin.clone();
            tokio::spawn(async move { admin.merge_regions(source, target, timeout).await })
        };
        let mut first = None;
        if let Some(v) = victim {
            kills += 1;
            tokio::time::sleep(Duration::from_millis(r.rng.random_range(0..120))).await;
            r.procs[v].kill9();
            let live: Vec<usize> = (0..addrs.len()).filter(|i| *i != v).collect();
            r.recoveries
                .push(leadership_recovered(addrs, &live, Duration::from_secs(30)).await);
            tokio::time::sleep(Duration::from_millis(1000)).await;
            r.procs[v].restart(&r.dir.path().join(format!("node{}.log", v + 1)));
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        if let Ok(res) = merging.await {
            first = Some(res);
        }
        let done = match first {
            Some(Ok(m)) => Some(m),
            // Cut off by the kill (or still settling): asking again finishes it, or says
            // the source is gone because it did finish.
            other => {
                eprintln!("merge of {source} into {target}: {other:?}; asking again");
                match admin.merge_regions(source, target, timeout).await {
                    Ok(m) => Some(m),
                    Err(tessera::client::Error::NotFound(_)) => Some(left.clone()),
                    Err(e) => {
                        eprintln!("merge of {source} into {target} again: {e}");
                        None
                    }
                }
            }
        };
        if done.is_some() {
            r.merges += 1;
        }
    }
}
