//! The faults, one function each, and what they report back to the scenario.

use super::*;

#[derive(Clone, Copy, Debug)]
// The fail-point scenarios exist only with the `failpoints` feature.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub(crate) enum Fault {
    None,
    /// kill -9 the node leading the most regions, restart it `down` later.
    KillLeaderHeavy,
    /// kill -9 a random node, twice.
    KillRandom,
    /// SIGSTOP the leader-heavy node for longer than an election, then SIGCONT.
    PauseLeaderHeavy,
    /// SIGSTOP the node leading the fewest regions until the leaders compact their logs
    /// past it, so it must catch up by snapshot.
    CutOffFollower,
    /// Restart the leader-heavy node with fail points that make it exit just before or just
    /// after a raft log write, now and then; restart it each time it dies.
    CrashAroundLogWrite,
    /// The leader-heavy node's disk turns slow: a fifth of its synced writes stall 50 ms.
    SlowDisk,
    /// The regions holding the test's keys are split (at each key) one after another while
    /// random nodes are killed and restarted.
    SplitsUnderKills,
    /// The regions holding the test's keys are split and merged back again and again, while
    /// the node leading the merging regions is killed -9 and restarted.
    MergesUnderKills,
    /// Network partition: the leader-heavy node is cut off from both others (clients still
    /// reach it), healed, then a random node is; each for a third of the run.
    IsolateNode,
    /// Majority ring (Jepsen's "majorities-ring" on three nodes): the link between the
    /// leader-heavy node and one other is cut both ways; the third still talks to both, so
    /// each node sees a majority, but a different one.
    MajorityRing,
    /// Asymmetric partition: nothing the leader-heavy node sends reaches the others, while
    /// it still hears them.
    OneWay,
    /// Every link between nodes loses 10% of the raft messages and delays each batch by
    /// 2–25 ms, for the whole run.
    SlowLossyLinks,
    /// Four nodes: replicas of random regions are moved between nodes (learner, catch-up,
    /// joint promote + remove) one after another while random nodes are killed and
    /// restarted; the scheduler may move replicas too.
    MovesUnderKills,
    /// 32 clients with the client's default options (exactly-once retries on) on 4 keys
    /// while leadership moves: the keys' leader is cut off (it takes writes that never
    /// commit), healed and handed leadership back, in a loop; one kill -9 midway.
    ManyWritersLeadersMove,
    /// No fault, but every node keeps a window of revisions across requests to the
    /// timestamp oracle (fail point `tso_cached_window`): the negative control of the check
    /// of revisions against real time.
    CachedTsoWindow,
    /// No fault, but servers drop some live watch events (negative control of the watch
    /// check).
    SkipWatchEvents,
}

/// What a fault works with, and what it reports back.
pub(crate) struct FaultRun<'a> {
    pub(crate) name: &'a str,
    pub(crate) procs: &'a mut Vec<Proc>,
    pub(crate) addrs: &'a [String],
    pub(crate) dir: &'a tempfile::TempDir,
    /// The run's length (s).
    pub(crate) secs: u64,
    pub(crate) seed: u64,
    pub(crate) rng: StdRng,
    pub(crate) env: &'a Env,
    /// Per fault that needed it: the time until every region had a leader on a live node.
    pub(crate) recoveries: Vec<Option<Duration>>,
    /// The node cut off to be caught up by snapshot (CutOffFollower).
    pub(crate) snapshot_victim: Option<usize>,
    /// Crashes at a fail point (CrashAroundLogWrite).
    pub(crate) crashes: u32,
    /// Splits that completed (SplitsUnderKills).
    pub(crate) splits: u32,
    /// Replica moves that completed (MovesUnderKills).
    pub(crate) moves: u32,
    /// Merges that completed (MergesUnderKills).
    pub(crate) merges: u32,
}

/// Runs `fault` for the run's time.
pub(crate) async fn inject(fault: Fault, r: &mut FaultRun<'_>) {
    match fault {
        Fault::None => no_fault(r).await,
        Fault::CachedTsoWindow => {
            for a in r.addrs {
                set_failpoint(a, "tso_cached_window", "return").await;
            }
            no_fault(r).await
        }
        Fault::SkipWatchEvents => {
            for a in r.addrs {
                set_failpoint(a, "watch_skip_live_events", "return").await;
            }
            no_fault(r).await
        }
        Fault::KillLeaderHeavy => kill_leader_heavy(r).await,
        Fault::KillRandom => kill_random(r).await,
        Fault::CutOffFollower => cut_off_follower(r).await,
        Fault::CrashAroundLogWrite => crash_around_log_write(r).await,
        Fault::SlowDisk => slow_disk(r).await,
        Fault::SplitsUnderKills => splits_under_kills(r).await,
        Fault::MergesUnderKills => super::merges::merges_under_kills(r).await,
        Fault::IsolateNode => isolate_node(r).await,
        Fault::MajorityRing => majority_ring(r).await,
        Fault::OneWay => one_way(r).await,
        Fault::SlowLossyLinks => slow_lossy_links(r).await,
        Fault::MovesUnderKills => moves_under_kills(r).await,
        Fault::ManyWritersLeadersMove => many_writers_leaders_move(r).await,
        Fault::PauseLeaderHeavy => pause_leader_heavy(r).await,
    }
}

/// The node (0-based) leading the most regions in `rs`, of `n`.
fn leader_heavy(rs: &Option<Vec<RegionInfo>>, n: usize) -> usize {
    let mut counts = vec![0usize; n];
    for r in rs.iter().flatten() {
        if let Some(l) = r.leader {
            counts[(l.node_id as usize - 1).min(n - 1)] += 1;
        }
    }
    (0..n).max_by_key(|i| counts[*i]).unwrap_or(0)
}

/// kill -9 of a random node and a restart a sixth of the run later, twice; the time until
/// every region had a leader again (or `None`) goes into `recoveries`.
pub(crate) async fn kill_random_twice(
    procs: &mut [Proc],
    addrs: &[String],
    rng: &mut StdRng,
    secs: u64,
    dir: &std::path::Path,
    recoveries: &mut Vec<Option<Duration>>,
) {
    let n = procs.len();
    for _ in 0..2 {
        let victim = rng.random_range(0..n);
        procs[victim].kill9();
        let live: Vec<usize> = (0..n).filter(|i| *i != victim).collect();
        recoveries.push(leadership_recovered(addrs, &live, Duration::from_secs(30)).await);
        tokio::time::sleep(Duration::from_secs(secs / 6)).await;
        procs[victim].restart(&dir.join(format!("node{}.log", victim + 1)));
        tokio::time::sleep(Duration::from_secs(secs / 6)).await;
    }
}

/// No fault: the workload runs undisturbed (the negative control).
async fn no_fault(r: &mut FaultRun<'_>) {
    let secs = r.secs;
    tokio::time::sleep(Duration::from_secs(secs - 2)).await;
}

/// kill -9 of the node leading the most regions; restarted a third of the run later.
async fn kill_leader_heavy(r: &mut FaultRun<'_>) {
    let procs = &mut *r.procs;
    let addrs = r.addrs;
    let dir = r.dir;
    let secs = r.secs;
    let recoveries = &mut r.recoveries;
    let victim = leader_heavy(&regions_of(&addrs[0]).await, addrs.len());
    procs[victim].kill9();
    let live: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    recoveries.push(leadership_recovered(addrs, &live, Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(secs / 3)).await;
    procs[victim].restart(&dir.path().join(format!("node{}.log", victim + 1)));
    tokio::time::sleep(Duration::from_secs(secs / 3)).await;
}

/// kill -9 of a random node, twice.
async fn kill_random(r: &mut FaultRun<'_>) {
    let procs = &mut *r.procs;
    let addrs = r.addrs;
    let dir = r.dir;
    let secs = r.secs;
    let rng = &mut r.rng;
    let recoveries = &mut r.recoveries;
    kill_random_twice(procs, addrs, rng, secs, dir.path(), recoveries).await;
}

/// SIGSTOP of the node leading the fewest regions (made a pure follower first) until the leaders compact their logs past it.
async fn cut_off_follower(r: &mut FaultRun<'_>) {
    let procs = &mut *r.procs;
    let addrs = r.addrs;
    let secs = r.secs;
    let recoveries = &mut r.recoveries;
    let rs = regions_of(&addrs[0]).await;
    let mut counts = [0usize; 3];
    for r in rs.iter().flatten() {
        if let Some(l) = r.leader {
            counts[(l.node_id as usize - 1).min(2)] += 1;
        }
    }
    let victim = (0..3).min_by_key(|i| counts[*i]).unwrap_or(0);
    r.snapshot_victim = Some(victim);
    // Make it a pure follower first, so the clients keep their full write rate (and
    // the leaders' logs grow past it) instead of waiting on a paused leader.
    let admin = Client::connect(addrs, common::with_tls(addrs, harness_client_opts()))
        .await
        .unwrap();
    for r in rs.iter().flatten() {
        if let (Some(region), Some(l)) = (&r.region, r.leader) {
            if l.node_id == victim as u64 + 1 {
                let to = (victim + 1) % 3 + 1;
                admin
                    .transfer_leader(RegionId(region.id), NodeId(to as u64))
                    .await
                    .unwrap();
            }
        }
    }
    procs[victim].signal("STOP");
    let live: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    recoveries.push(leadership_recovered(addrs, &live, Duration::from_secs(30)).await);
    // Long enough for the leaders to write past 4 x log_gc_threshold and compact.
    tokio::time::sleep(Duration::from_secs(8)).await;
    procs[victim].signal("CONT");
    tokio::time::sleep(Duration::from_secs(secs / 2)).await;
}

/// The leader-heavy node restarted with fail points that exit just before or after a raft log write; restarted each time (at most 8 crashes).
async fn crash_around_log_write(r: &mut FaultRun<'_>) {
    let procs = &mut *r.procs;
    let addrs = r.addrs;
    let dir = r.dir;
    let secs = r.secs;
    let name = r.name;
    let victim = leader_heavy(&regions_of(&addrs[0]).await, addrs.len());
    let log = dir.path().join(format!("node{}.log", victim + 1));
    let fp = [(
        "FAILPOINTS",
        "raft_before_write=0.3%return;raft_after_write=0.3%return",
    )];
    procs[victim].restart_env(&log, &fp);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs.saturating_sub(4).max(4)) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let exited = procs[victim]
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            assert_eq!(status.code(), Some(75), "{name}: died of something else");
            r.crashes += 1;
            // Bounded: after 8 r.crashes it comes back without fail points.
            let env: &[(&str, &str)] = if r.crashes < 8 { &fp } else { &[] };
            procs[victim].restart_env(&log, env);
        }
    }
    // Heal: back without fail points.
    procs[victim].restart(&log);
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// A fifth of the leader-heavy node's synced writes stall 50 ms.
async fn slow_disk(r: &mut FaultRun<'_>) {
    let procs = &mut *r.procs;
    let addrs = r.addrs;
    let dir = r.dir;
    let secs = r.secs;
    let victim = leader_heavy(&regions_of(&addrs[0]).await, addrs.len());
    let log = dir.path().join(format!("node{}.log", victim + 1));
    procs[victim].restart_env(&log, &[("FAILPOINTS", "raft_before_write=20%sleep(50)")]);
    tokio::time::sleep(Duration::from_secs(secs.saturating_sub(2))).await;
    procs[victim].restart(&log);
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Every key's region split at the key, one after another, while random nodes are killed.
async fn splits_under_kills(r: &mut FaultRun<'_>) {
    let procs = &mut *r.procs;
    let addrs = r.addrs;
    let dir = r.dir;
    let secs = r.secs;
    let rng = &mut r.rng;
    let recoveries = &mut r.recoveries;
    let (keys, split_addrs) = (r.env.keys.clone(), addrs.to_vec());
    let splitter = tokio::spawn(async move {
        let admin = Client::connect(
            &split_addrs,
            common::with_tls(&split_addrs, harness_client_opts()),
        )
        .await
        .unwrap();
        let mut done = 0u32;
        for k in keys {
            // A split cut off by a kill is just not counted; the client retries
            // the rest, and a replayed split of a key already split is a no-op.
            if matches!(admin.split(&k).await, Ok(r) if r.len() == 2) {
                done += 1;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        done
    });
    kill_random_twice(procs, addrs, rng, secs, dir.path(), recoveries).await;
    r.splits = splitter.await.unwrap();
}

/// The leader-heavy node, then a random one, cut off from both others.
async fn isolate_node(r: &mut FaultRun<'_>) {
    let addrs = r.addrs;
    let secs = r.secs;
    let rng = &mut r.rng;
    let recoveries = &mut r.recoveries;
    let first = leader_heavy(&regions_of(&addrs[0]).await, addrs.len());
    let second = rng.random_range(0..3);
    for victim in [first, second] {
        let live: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
        for &o in &live {
            cut(addrs, victim, o).await;
        }
        recoveries.push(leadership_recovered(addrs, &live, Duration::from_secs(30)).await);
        tokio::time::sleep(Duration::from_secs(secs / 4)).await;
        heal_links(addrs).await;
        tokio::time::sleep(Duration::from_secs(secs / 6)).await;
    }
}

/// The link between the leader-heavy node and one other cut both ways; the third bridges.
async fn majority_ring(r: &mut FaultRun<'_>) {
    let addrs = r.addrs;
    let secs = r.secs;
    let rng = &mut r.rng;
    let recoveries = &mut r.recoveries;
    let v = leader_heavy(&regions_of(&addrs[0]).await, addrs.len());
    let w = (v + 1 + rng.random_range(0..2)) % 3;
    let bridge = 3 - v - w;
    cut(addrs, v, w).await;
    // The bridge node sees every region led, by someone it can reach.
    recoveries
        .push(leadership_seen_by(addrs, &[bridge], &[0, 1, 2], Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(secs / 2)).await;
    heal_links(addrs).await;
    tokio::time::sleep(Duration::from_secs(secs / 4)).await;
}

/// Nothing the leader-heavy node sends reaches the others.
async fn one_way(r: &mut FaultRun<'_>) {
    let addrs = r.addrs;
    let secs = r.secs;
    let recoveries = &mut r.recoveries;
    let v = leader_heavy(&regions_of(&addrs[0]).await, addrs.len());
    let live: Vec<usize> = (0..3).filter(|i| *i != v).collect();
    for &o in &live {
        set_link(addrs, v, o, "drop").await;
    }
    recoveries.push(leadership_recovered(addrs, &live, Duration::from_secs(30)).await);
    tokio::time::sleep(Duration::from_secs(secs / 2)).await;
    heal_links(addrs).await;
    tokio::time::sleep(Duration::from_secs(secs / 4)).await;
}

/// 10% loss and 2–25 ms delay on every link.
async fn slow_lossy_links(r: &mut FaultRun<'_>) {
    let addrs = r.addrs;
    let secs = r.secs;
    set_all_links(addrs, "loss=0.1,delay=2-25").await;
    tokio::time::sleep(Duration::from_secs(secs.saturating_sub(4).max(4))).await;
    heal_links(addrs).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
}

/// Replicas of random regions moved between four nodes while random nodes are killed.
async fn moves_under_kills(r: &mut FaultRun<'_>) {
    let procs = &mut *r.procs;
    let addrs = r.addrs;
    let dir = r.dir;
    let secs = r.secs;
    let seed = r.seed;
    let rng = &mut r.rng;
    let recoveries = &mut r.recoveries;
    let (mover_addrs, stop) = (addrs.to_vec(), Arc::new(AtomicBool::new(false)));
    let stop_moves = stop.clone();
    let mut mrng = StdRng::seed_from_u64(seed.wrapping_mul(7919));
    let mover = tokio::spawn(async move {
        let admin = Client::connect(
            &mover_addrs,
            common::with_tls(&mover_addrs, harness_client_opts()),
        )
        .await
        .unwrap();
        let (mut done, t) = (0u32, Instant::now());
        while !stop_moves.load(Ordering::Relaxed) && t.elapsed() < Duration::from_secs(120) {
            let user: Vec<Region> = admin
                .routes()
                .await
                .unwrap_or_default()
                .into_iter()
                .filter_map(|r| r.region)
                .filter(|r| !tessera::storage::keys::is_system_key(&r.start_key))
                .collect();
            if !user.is_empty() {
                let r = &user[mrng.random_range(0..user.len())];
                let on: Vec<u64> = r.peers.iter().map(|p| p.node_id).collect();
                let spare: Vec<u64> = (1..=4).filter(|x| !on.contains(x)).collect();
                if !on.is_empty() && !spare.is_empty() {
                    let from = on[mrng.random_range(0..on.len())];
                    let to = spare[mrng.random_range(0..spare.len())];
                    // A move cut short by a kill is not counted; the region stays
                    // valid at every step (learner, joint, final).
                    let res = admin
                        .move_replica(
                            RegionId(r.id),
                            Some(NodeId(from)),
                            NodeId(to),
                            Duration::from_secs(8),
                        )
                        .await;
                    match res {
                        Ok(_) => done += 1,
                        Err(e) => eprintln!("move of region {} {from}->{to}: {e}", r.id),
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        done
    });
    // A move takes a few round trips and a catch-up: give the kills room for a
    // handful of them even in the short CI run.
    kill_random_twice(procs, addrs, rng, secs.max(18), dir.path(), recoveries).await;
    stop.store(true, Ordering::Relaxed);
    r.moves = mover.await.unwrap();
}

/// The keys' leader cut off, healed and handed leadership back, in a loop; one kill -9 midway.
async fn many_writers_leaders_move(r: &mut FaultRun<'_>) {
    let procs = &mut *r.procs;
    let addrs = r.addrs;
    let dir = r.dir;
    let secs = r.secs;
    let name = r.name;
    let rng = &mut r.rng;
    let recoveries = &mut r.recoveries;
    let region_of = r.env.region_of.clone();
    let cycles = moves::leaders_move(
        procs,
        addrs,
        &region_of,
        rng,
        secs.max(16),
        dir.path(),
        recoveries,
    )
    .await;
    eprintln!("{name}: leadership-move cycles: {cycles}");
    assert!(cycles >= 3, "{name}: too few leadership moves ({cycles})");
}

/// SIGSTOP of the leader-heavy node past the election timeout.
async fn pause_leader_heavy(r: &mut FaultRun<'_>) {
    let procs = &mut *r.procs;
    let addrs = r.addrs;
    let secs = r.secs;
    let recoveries = &mut r.recoveries;
    let victim = leader_heavy(&regions_of(&addrs[0]).await, addrs.len());
    procs[victim].signal("STOP");
    let live: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    recoveries.push(leadership_recovered(addrs, &live, Duration::from_secs(30)).await);
    // Paused well past the election timeout (10 ticks of 50 ms, randomised to 2x).
    tokio::time::sleep(Duration::from_secs(3)).await;
    procs[victim].signal("CONT");
    tokio::time::sleep(Duration::from_secs(secs / 3)).await;
}
