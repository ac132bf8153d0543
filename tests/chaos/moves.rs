//! The fault of the many-writers scenario: leaders move while 32 clients (default options,
//! retries on) write few keys.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use tessera::client::{Client, ClientOptions};
use tessera::ids::{NodeId, RegionId};
use tessera::proto::Region;

use super::common::Proc;
use super::{cut, heal_links, leadership_recovered, regions_of};

/// In a loop until the run's time is up: the node leading most of the keys' regions is cut
/// off from the others (clients still reach it, so it takes writes that can never commit),
/// the others elect, the links heal, and leadership of the keys' regions is handed back to
/// it — so it leads again with proposals of its earlier term still queued, the situation in
/// which answers must be matched to entries by term and index. Midway, a random node is
/// killed -9 and restarted (connections break with writes in flight: the clients retry
/// them). Each recovery's time goes into `recoveries`; returns the cycles run.
pub(super) async fn leaders_move(
    procs: &mut [Proc],
    addrs: &[String],
    region_of: &HashMap<Vec<u8>, Region>,
    rng: &mut StdRng,
    secs: u64,
    dir: &Path,
    recoveries: &mut Vec<Option<Duration>>,
) -> u32 {
    let n = procs.len();
    let admin = Client::connect(
        addrs,
        super::common::with_tls(addrs, ClientOptions::default()),
    )
    .await
    .expect("admin client");
    let key_regions: BTreeSet<u64> = region_of.values().map(|r| r.id).collect();
    let t = Instant::now();
    let run = Duration::from_secs(secs.saturating_sub(2).max(8));
    let (mut cycles, mut killed) = (0u32, false);
    while t.elapsed() < run && cycles < 20 {
        cycles += 1;
        let mut led = vec![0usize; n];
        for r in regions_of(&addrs[0]).await.unwrap_or_default() {
            if let (Some(region), Some(l)) = (&r.region, r.leader) {
                if key_regions.contains(&region.id) {
                    led[(l.node_id as usize - 1).min(n - 1)] += 1;
                }
            }
        }
        let p = (0..n).max_by_key(|i| led[*i]).unwrap_or(0);
        let others: Vec<usize> = (0..n).filter(|i| *i != p).collect();
        for &o in &others {
            cut(addrs, p, o).await;
        }
        tokio::time::sleep(Duration::from_millis(1200)).await;
        recoveries.push(leadership_recovered(addrs, &others, Duration::from_secs(30)).await);
        heal_links(addrs).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        for id in &key_regions {
            if let Err(e) = admin
                .transfer_leader(RegionId(*id), NodeId(p as u64 + 1))
                .await
            {
                eprintln!("transfer of region {id} to node {}: {e}", p + 1);
            }
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        if !killed && t.elapsed() > run / 2 {
            killed = true;
            let victim = rng.random_range(0..n);
            procs[victim].kill9();
            let live: Vec<usize> = (0..n).filter(|i| *i != victim).collect();
            recoveries.push(leadership_recovered(addrs, &live, Duration::from_secs(30)).await);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            procs[victim].restart(&dir.join(format!("node{}.log", victim + 1)));
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
    }
    cycles
}
