//! Tests against real `tessera server` processes: kill -9 and restart, the CLI, node
//! replacement, lease reads and hibernation, one file per area; the helpers they share
//! are here and in `tests/common`.

#[path = "../common/mod.rs"]
mod common;

// Every test there needs fail points (link faults, a slow log write).
#[cfg(feature = "failpoints")]
mod answers;
#[cfg(feature = "failpoints")]
mod late_transfer;

mod auth;
mod backup;
mod cli;
mod crash;
mod hibernation;
// Link faults cut the leader off.
#[cfg(feature = "failpoints")]
mod lease;
mod leases;
#[cfg(feature = "failpoints")]
mod merge;
mod monitoring;
mod quota;
mod replacement;
mod revisions;
mod tls;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    key_in_region, metric_sum, node_regions, scrape_metrics, start_process_cluster,
    wait_for_leaders,
};
use tessera::client::{Client, ClientOptions};

type Progress = HashMap<Vec<u8>, (u64, u64)>;

fn endpoints(procs: &[common::Proc]) -> Vec<String> {
    procs.iter().map(|p| p.addr.clone()).collect()
}

/// Starts `n` processes with `regions` user regions, each with a metrics port and `tweak`
/// applied to its config, and waits until every region is led; returns the processes, their
/// addresses and their metrics addresses.
async fn start_led_with_metrics(
    dir: &std::path::Path,
    n: usize,
    regions: u32,
    tweak: impl Fn(&mut tessera::config::Config),
) -> (Vec<common::Proc>, Vec<String>, Vec<String>) {
    let metrics: Vec<String> = common::free_addrs(n)
        .iter()
        .map(|a| a.to_string())
        .collect();
    let m = metrics.clone();
    let procs = start_process_cluster(dir, n, regions, move |c| {
        c.node.metrics_addr = m[c.node.id as usize - 1].clone();
        tweak(c);
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(
        &addrs,
        regions as usize + common::SYSTEM_REGIONS,
        Duration::from_secs(90),
    )
    .await;
    (procs, addrs, metrics)
}

/// Starts `n` processes with `regions` user regions (default settings), waits until every
/// region is led, and connects a client with its default options.
async fn start_led_with_client(
    dir: &std::path::Path,
    n: usize,
    regions: u32,
) -> (Vec<common::Proc>, Vec<String>, Client) {
    let (procs, addrs, _) = start_led_with_metrics(dir, n, regions, |_| {}).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .expect("client connects");
    (procs, addrs, client)
}

async fn wait_serving(addrs: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in addrs {
        while node_regions(a).await.is_none() {
            assert!(Instant::now() < deadline, "{a} never started serving");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Reads `key` from `addr`'s own replica (serializable), without going to the leader.
async fn local_read(addr: &str, key: &[u8]) -> Option<Vec<u8>> {
    let regions = node_regions(addr).await?;
    let region = regions
        .into_iter()
        .filter_map(|i| i.region)
        .find(|r| tessera::storage::keys::in_range(key, &r.start_key, &r.end_key))?;
    common::local_get(addr, &region, key)
        .await?
        .map(|kv| kv.value)
}
