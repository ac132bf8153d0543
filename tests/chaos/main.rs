//! Chaos: a real 3-node cluster of `tessera server` processes, clients that record every
//! operation, faults injected while they run (kill -9, SIGSTOP longer than an election), then
//! healing and checking: linearizable per key (Wing–Gong/Lowe search over a register with
//! CAS and revisions), no acknowledged write lost, no stale read, monotonic revisions per
//! client, at most one leader per region and term, replicas converged, and watchers (the
//! whole keyspace and half of it, from now and from revision 1) that received exactly the
//! committed history of their ranges.
//!
//! Layout: `harness` (recording clients, one scenario's run), `faults` (one function per
//! fault), `links` (link faults), `checks` (what a run is checked for), `moves` (the
//! many-writers fault).
//!
//! Each scenario is bounded in time and count and stops by itself. CI runs every scenario
//! once with one seed; the full matrix is
//!   TESSERA_CHAOS_SEEDS=1,2,3,4,5,6,7,8 TESSERA_CHAOS_SECS=30 cargo test --test chaos -- --nocapture
//! (see docs/reliability.md). The negative control runs the same harness with reads served
//! locally by followers — a mode that is not linearizable — and asserts the checker says so.

mod checks;
#[path = "../common/mod.rs"]
mod common;
mod elections;
mod faults;
mod harness;
mod links;
mod merges;
mod moves;
mod watchers;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera::check::{self, History, Input, Observed, Op, Output, Verdict};
use tessera::client::{CasAction, Client, ClientOptions, Compare, Error};
use tessera::ids::{NodeId, RegionId};
use tessera::proto::kv_client::KvClient;
use tessera::proto::{ReadConsistency, Region, RegionInfo, RequestHeader, ScanRequest};

use checks::*;
use common::{key_in_region, set_failpoint, start_process_cluster, Proc};
use faults::*;
use harness::*;
use links::*;
use watchers::*;

const REGIONS: u32 = 8;
const KEYS: u32 = 16;
const CLIENTS: u64 = 6;
/// The many-writers scenario: 32 clients with default options on 8 keys.
const MANY_CLIENTS: u64 = 32;
const FEW_KEYS: u32 = 8;

fn seeds() -> Vec<u64> {
    std::env::var("TESSERA_CHAOS_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<u64>| !v.is_empty())
        .unwrap_or_else(|| vec![1])
}

fn run_secs() -> u64 {
    std::env::var("TESSERA_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

async fn regions_of(addr: &str) -> Option<Vec<RegionInfo>> {
    tokio::time::timeout(Duration::from_secs(1), common::node_regions(addr))
        .await
        .ok()
        .flatten()
}

async fn run_scenario(name: &str, fault: Fault) {
    run_scenario_with(name, fault, false).await
}

async fn run_scenario_with(name: &str, fault: Fault, tls: bool) {
    for seed in seeds() {
        let o = scenario_with(name, fault, Reads::Linearizable, seed, tls).await;
        if matches!(fault, Fault::CrashAroundLogWrite) {
            eprintln!(
                "chaos {name} seed {seed}: crashes at a fail point: {}",
                o.crashes
            );
            assert!(o.crashes > 0, "{name}: the fail points never fired");
        }
        if matches!(fault, Fault::SplitsUnderKills) {
            eprintln!("chaos {name} seed {seed}: splits completed: {}", o.splits);
            assert!(
                o.splits >= 4,
                "{name}: too few splits happened ({})",
                o.splits
            );
        }
        if matches!(
            fault,
            Fault::IsolateNode
                | Fault::MajorityRing
                | Fault::OneWay
                | Fault::SlowLossyLinks
                | Fault::ManyWritersLeadersMove
        ) {
            eprintln!(
                "chaos {name} seed {seed}: raft messages lost to the injected faults: {}",
                o.injected_drops
            );
            assert!(o.injected_drops > 0, "{name}: the link faults never fired");
        }
        if matches!(fault, Fault::MergesUnderKills) {
            eprintln!("chaos {name} seed {seed}: merges completed: {}", o.merges);
            assert!(
                o.merges >= 3,
                "{name}: too few merges happened ({})",
                o.merges
            );
        }
        if matches!(fault, Fault::MovesUnderKills) {
            eprintln!(
                "chaos {name} seed {seed}: replica moves completed: {}",
                o.moves
            );
            assert!(o.moves >= 2, "{name}: too few moves happened ({})", o.moves);
        }
        if matches!(fault, Fault::CutOffFollower) {
            eprintln!(
                "chaos {name} seed {seed}: snapshots received by the cut-off node: {}",
                o.snapshots_received
            );
            assert!(
                o.snapshots_received > 0,
                "{name}: the cut-off follower caught up without a snapshot"
            );
        }
        eprintln!(
            "chaos {name} seed {seed}: linearizable reads by lease {}, by ReadIndex {}",
            o.lease_reads, o.read_index_reads
        );
        if matches!(
            fault,
            Fault::PauseLeaderHeavy
                | Fault::IsolateNode
                | Fault::MajorityRing
                | Fault::OneWay
                | Fault::SlowLossyLinks
        ) {
            // No node restarts in these, so the counters cover the whole run: the faults
            // that could make a lease unsafe must have met lease reads.
            assert!(o.lease_reads > 0, "{name}: no read was served by lease");
        }
        let lin = matches!(o.verdict, Verdict::Linearizable);
        let recovered: Vec<Duration> = o.recoveries.iter().flatten().copied().collect();
        eprintln!(
            "chaos {name} seed {seed}: ops ok {} / failed reads {} / unknown writes {}, lost acknowledged writes {}, stale reads {}, linearizable {}, leadership recovered {} of {} times, p50 {:?} max {:?}",
            o.ok,
            o.failed_reads,
            o.unknown,
            o.lost,
            o.stale,
            match o.verdict {
                Verdict::Linearizable => "yes",
                Verdict::Inconclusive { .. } => "INCONCLUSIVE (search budget exhausted)",
                _ => "NO",
            },
            recovered.len(),
            o.recoveries.len(),
            percentile(&recovered, 0.5),
            recovered.iter().max().copied().unwrap_or_default(),
        );
        // Every fault that takes leaders away must be followed by every region led again:
        // a region left without a leader for the whole wait (30 s) is unavailable.
        assert_eq!(
            recovered.len(),
            o.recoveries.len(),
            "{name} seed {seed}: some regions had no leader for the whole wait after a fault"
        );
        assert!(o.ok > 100, "{name}: too little work done ({})", o.ok);
        assert_eq!(o.lost, 0, "{name}: acknowledged writes lost");
        assert_eq!(
            o.misreported, 0,
            "{name}: writes applied other than answered"
        );
        assert_eq!(o.stale, 0, "{name}: stale reads");
        assert_eq!(
            o.out_of_order, 0,
            "{name}: revisions out of real-time order across keys"
        );
        assert!(
            o.watch_problems.is_empty(),
            "{name} seed {seed}: watchers: {:?}",
            o.watch_problems
        );
        if let Verdict::Violation { key, ops } = &o.verdict {
            // The key's whole history, in invoke order, for a post-mortem.
            let mut ops = ops.clone();
            ops.sort_by_key(|op| op.invoke);
            let path = std::env::temp_dir().join(format!("chaos-{name}-{seed}-violation.txt"));
            let text: String = ops.iter().map(|op| format!("{op:?}\n")).collect();
            let _ = std::fs::write(&path, text);
            panic!(
                "{name} seed {seed}: not linearizable on key {key:02x?} ({} ops in {})",
                ops.len(),
                path.display()
            );
        }
        assert!(lin, "{name} seed {seed}: not linearizable: {:?}", o.verdict);
    }
}

/// Many writers with the client's default options (retries of every write on, made safe by
/// write ids) while the keys' leader is cut off, healed and handed leadership back, and a
/// node is killed: stale proposal tails build up on the returning leader and connections
/// break with writes in flight.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_while_leaders_move() {
    run_scenario("many-writers-leaders-move", Fault::ManyWritersLeadersMove).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_leader_heavy_node() {
    run_scenario("kill9-leader-heavy", Fault::KillLeaderHeavy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_random_nodes() {
    run_scenario("kill9-random", Fault::KillRandom).await;
}

/// The same with TLS on every node's port, mutual TLS between the nodes and
/// authentication on (the clients log in as a user): restarted nodes rejoin through new
/// handshakes and load the users again, and the checks hold as in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_random_nodes_with_tls_and_auth() {
    run_scenario_with("kill9-random-tls-auth", Fault::KillRandom, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_while_nodes_are_killed() {
    run_scenario("splits-under-kill9", Fault::SplitsUnderKills).await;
}

/// Splits (admin calls with the operator's certificate) while nodes are killed, with TLS and
/// authentication on: the logged-in clients follow the new regions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splits_while_nodes_are_killed_with_tls_and_auth() {
    run_scenario_with("splits-under-kill9-tls-auth", Fault::SplitsUnderKills, true).await;
}

/// Splits and merges back while the node leading the merging regions is killed -9: a merge
/// cut off at any step is finished by asking again, and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merges_while_their_leaders_are_killed() {
    run_scenario("merges-under-kill9", Fault::MergesUnderKills).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_moves_while_nodes_are_killed() {
    run_scenario("moves-under-kill9", Fault::MovesUnderKills).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_leader_heavy_node_past_election_timeout() {
    run_scenario("sigstop-leader-heavy", Fault::PauseLeaderHeavy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_cut_off_past_compaction_recovers_by_snapshot() {
    run_scenario("cut-off-follower", Fault::CutOffFollower).await;
}

/// Needs the `failpoints` feature (scripts/test.sh turns it on); without it the fail points
/// do not exist and the scenario is left out.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_just_before_or_after_the_log_write() {
    run_scenario("crash-around-log-write", Fault::CrashAroundLogWrite).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_disk_on_the_leader_heavy_node() {
    run_scenario("slow-disk", Fault::SlowDisk).await;
}

/// Network faults are injected where raft messages leave a node (fail points
/// `net_to_<node>`, src/transport/fault.rs), so these need the `failpoints` feature.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_one_node_from_the_others() {
    run_scenario("partition-isolate", Fault::IsolateNode).await;
}

/// The same with TLS and authentication on: the isolated node cannot read the users from
/// placement, keeps the copy it has, and serves the logged-in clients once healed.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_one_node_from_the_others_with_tls_and_auth() {
    run_scenario_with("partition-isolate-tls-auth", Fault::IsolateNode, true).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_majority_ring() {
    run_scenario("partition-majority-ring", Fault::MajorityRing).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_one_way_from_the_leader_heavy_node() {
    run_scenario("partition-one-way", Fault::OneWay).await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_lossy_links_between_all_nodes() {
    run_scenario("slow-lossy-links", Fault::SlowLossyLinks).await;
}

/// The check of revisions against real time is not a rubber stamp: nodes that keep a
/// window of revisions across requests to the oracle (each node's writes then draw from its
/// own range) are caught, though every key on its own stays linearizable.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_cached_revision_windows_are_caught() {
    let o = scenario(
        "negative-control-tso",
        Fault::CachedTsoWindow,
        Reads::Linearizable,
        1,
    )
    .await;
    eprintln!(
        "chaos negative-control-tso: ops ok {}, writes out of real-time order {}",
        o.ok, o.out_of_order
    );
    assert!(o.ok > 100, "too little work done ({})", o.ok);
    assert!(
        o.out_of_order > 0,
        "revisions from cached windows passed the real-time check"
    );
}

/// The watch check is not a rubber stamp: servers that drop some live events (fail point
/// `watch_skip_live_events`) are caught.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_watch_gaps_are_caught() {
    let o = scenario(
        "negative-control-watch",
        Fault::SkipWatchEvents,
        Reads::Linearizable,
        1,
    )
    .await;
    eprintln!(
        "chaos negative-control-watch: ops ok {}, watch problems {:?}",
        o.ok, o.watch_problems
    );
    assert!(o.ok > 100, "too little work done ({})", o.ok);
    assert!(
        !o.watch_problems.is_empty(),
        "watchers missing live events passed the watch check"
    );
}

/// The checker is not a rubber stamp: reads served from any replica's local state (not
/// linearizable) under the same workload are caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_follower_reads_are_caught() {
    let o = scenario("negative-control", Fault::None, Reads::FollowerLocal, 1).await;
    eprintln!(
        "chaos negative-control: ops ok {}, stale reads {}, linearizable {}",
        o.ok,
        o.stale,
        matches!(o.verdict, Verdict::Linearizable)
    );
    assert!(
        matches!(o.verdict, Verdict::Violation { .. }),
        "follower-local reads passed the linearizability check ({} stale by the direct check)",
        o.stale
    );
    assert!(o.stale > 0, "the direct stale-read check found none");
}
