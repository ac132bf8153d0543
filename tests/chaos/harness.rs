//! The harness: recording clients, the run of one scenario (cluster, clients, fault,
//! healing) and what it found.

use super::*;

pub(crate) struct Recorder {
    pub(crate) origin: Instant,
    pub(crate) ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
    fn push(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }
}

/// How reads are served: through the client (linearizable), or — the negative control —
/// straight from a random replica's local state.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Reads {
    Linearizable,
    FollowerLocal,
}

pub(crate) struct Env {
    pub(crate) addrs: Vec<String>,
    pub(crate) keys: Vec<Vec<u8>>,
    /// Each key's region (regions do not change during these scenarios).
    pub(crate) region_of: HashMap<Vec<u8>, Region>,
    pub(crate) rec: Recorder,
    pub(crate) stop: AtomicBool,
    /// The recording clients' options.
    pub(crate) opts: ClientOptions,
    /// A pause before each operation, drawn from this range (ms): with many clients on
    /// few keys, a closed loop makes histories too long and too concurrent for the
    /// linearizability search.
    pub(crate) think_ms: Option<(u64, u64)>,
}

/// The harness's own clients' options (splits, moves, the final reads), not the recorded
/// ones: a shorter deadline so that a call cut off by a fault ends within the run.
pub(crate) fn harness_client_opts() -> ClientOptions {
    ClientOptions {
        deadline: Duration::from_secs(6),
        rpc_timeout: Duration::from_secs(2),
        ..Default::default()
    }
}

pub(crate) fn observed(kv: Option<tessera::proto::KeyValue>) -> Option<Observed> {
    kv.map(|kv| Observed {
        value: kv.value,
        version: kv.version,
        mod_revision: kv.mod_revision,
    })
}

pub(crate) async fn local_get(env: &Env, addr: &str, key: &[u8]) -> Option<Option<Observed>> {
    let region = env.region_of.get(key)?;
    common::local_get(addr, region, key).await.map(observed)
}

/// One recording client: random gets, puts of unique values and CASes on the version it
/// last saw, until told to stop (or 20,000 operations).
pub(crate) async fn client_loop(env: Arc<Env>, id: u64, seed: u64, reads: Reads) {
    let client = match Client::connect(&env.addrs, env.opts.clone()).await {
        Ok(c) => c,
        Err(e) => panic!("client {id} cannot connect: {e}"),
    };
    let mut rng = StdRng::seed_from_u64(seed * 1000 + id);
    let mut seen_version: HashMap<Vec<u8>, u64> = HashMap::new();
    for seq in 0..20_000u64 {
        if env.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Some((lo, hi)) = env.think_ms {
            tokio::time::sleep(Duration::from_millis(rng.random_range(lo..=hi))).await;
        }
        let key = env.keys[rng.random_range(0..env.keys.len())].clone();
        let roll: f64 = rng.random();
        let invoke = env.rec.now();
        let (input, ret) = if roll < 0.4 {
            let out = match reads {
                Reads::Linearizable => client.get(&key).await.ok().map(observed),
                Reads::FollowerLocal => {
                    let addr = &env.addrs[rng.random_range(0..env.addrs.len())];
                    local_get(&env, addr, &key).await
                }
            };
            if let Some(Some(o)) = &out {
                seen_version.insert(key.clone(), o.version);
            }
            (Input::Get, out.map(|o| (env.rec.now(), Output::Get(o))))
        } else if roll < 0.8 {
            let value = format!("c{id}-{seq}").into_bytes();
            let r = client.put(&key, &value).await;
            let ret = match r {
                Ok(w) => Some((
                    env.rec.now(),
                    Output::Put {
                        revision: w.revision,
                    },
                )),
                Err(Error::InvalidArgument(e)) => panic!("put refused: {e}"),
                Err(_) => None,
            };
            (Input::Put(value), ret)
        } else {
            let value = format!("c{id}-{seq}").into_bytes();
            let expect = seen_version.get(&key).copied().unwrap_or(0);
            let r = client
                .cas(
                    &key,
                    Compare::Version(expect),
                    CasAction::Put(value.clone()),
                )
                .await;
            let ret = match r {
                Ok(c) => Some((
                    env.rec.now(),
                    Output::Cas {
                        succeeded: c.succeeded,
                        revision: c.revision,
                    },
                )),
                Err(Error::InvalidArgument(e)) => panic!("cas refused: {e}"),
                Err(_) => None,
            };
            (
                Input::Cas {
                    expect_version: expect,
                    value,
                },
                ret,
            )
        };
        env.rec.push(Op {
            client: id,
            key,
            input,
            invoke,
            ret,
        });
    }
}

pub(crate) struct Outcome {
    /// Snapshots the faulted node received (CutOffFollower).
    pub(crate) snapshots_received: u64,
    /// Crashes at a fail point (CrashAroundLogWrite).
    pub(crate) crashes: u32,
    /// Splits that completed (SplitsUnderKills).
    pub(crate) splits: u32,
    /// Replica moves that completed (MovesUnderKills).
    pub(crate) moves: u32,
    /// Merges that completed (MergesUnderKills).
    pub(crate) merges: u32,
    /// Raft messages lost to injected link faults, all nodes.
    pub(crate) injected_drops: u64,
    /// Linearizable reads served under a leader lease / after a ReadIndex round, all nodes
    /// (counted since each node's last start).
    pub(crate) lease_reads: u64,
    pub(crate) read_index_reads: u64,
    pub(crate) verdict: Verdict,
    /// Writes that applied twice, or applied though answered "failed" (check::misreported_writes).
    pub(crate) misreported: usize,
    pub(crate) ok: usize,
    pub(crate) failed_reads: usize,
    pub(crate) unknown: usize,
    pub(crate) lost: usize,
    pub(crate) stale: usize,
    /// Acknowledged writes whose revision is not above that of a write acknowledged
    /// before they were invoked (any keys: `check::revisions_out_of_real_time`).
    pub(crate) out_of_order: usize,
    /// What the watch check found wrong, per watcher (`watchers::check_watchers`).
    pub(crate) watch_problems: Vec<String>,
    /// Per fault that needed it: the time until every region had a leader on a live node
    /// again, or `None` if that did not happen within the wait.
    pub(crate) recoveries: Vec<Option<Duration>>,
}

pub(crate) async fn scenario(name: &str, fault: Fault, reads: Reads, seed: u64) -> Outcome {
    scenario_with(name, fault, reads, seed, false).await
}

/// Turns authentication on in a TLS cluster: user root, and user `chaos` allowed to read
/// and write every key; waits until every node refuses callers without a token, and
/// returns the options of a client logged in as `chaos` (TLS without a certificate).
async fn enable_auth(addrs: &[String], certs: &common::TlsCerts) -> ClientOptions {
    use tessera::proto::auth_change_request::Op;
    use tessera::proto::{KeyPermission, PermissionKind, RolePermission, UserPassword, UserRole};
    let admin = Client::connect(addrs, common::with_tls(addrs, harness_client_opts()))
        .await
        .expect("operator client");
    let user = |name: &str| {
        Op::UserAdd(UserPassword {
            name: name.into(),
            password: format!("{name}-pw"),
        })
    };
    let grant = |user: &str, role: &str| {
        Op::UserGrantRole(UserRole {
            user: user.into(),
            role: role.into(),
        })
    };
    let everything = Op::RoleGrantPermission(RolePermission {
        role: "chaos".into(),
        permission: Some(KeyPermission {
            kind: PermissionKind::PermissionReadwrite as i32,
            key: vec![0],
            range_end: vec![0],
        }),
    });
    for op in [
        user("root"),
        grant("root", "root"),
        user("chaos"),
        Op::RoleAdd("chaos".into()),
        everything,
        grant("chaos", "chaos"),
        Op::Enable(true),
    ] {
        admin.auth_change(op).await.expect("auth change");
    }
    let anonymous =
        tessera::client::TlsOptions::from_files(&certs.ca_file, None, None).expect("CA");
    let deadline = Instant::now() + Duration::from_secs(20);
    for a in addrs {
        loop {
            let opts = ClientOptions {
                tls: Some(anonymous.clone()),
                deadline: Duration::from_secs(2),
                ..Default::default()
            };
            match Client::connect(std::slice::from_ref(a), opts).await {
                Err(tessera::client::Error::Unauthenticated(_)) => break,
                _ => assert!(Instant::now() < deadline, "{a} never turned auth on"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    ClientOptions {
        tls: Some(anonymous),
        credentials: Some(tessera::client::Credentials {
            user: "chaos".into(),
            password: "chaos-pw".into(),
        }),
        ..Default::default()
    }
}

/// A scenario; with `tls` the nodes speak TLS and mutual TLS between them, every helper of
/// the run speaks TLS to them with the operator's certificate, and authentication is on:
/// the recorded clients log in as a user.
pub(crate) async fn scenario_with(
    name: &str,
    fault: Fault,
    reads: Reads,
    seed: u64,
    tls: bool,
) -> Outcome {
    // TESSERA_CHAOS_KEEP=1 (or TESSERA_TEST_KEEP=1) keeps the nodes' data and logs.
    let dir = common::test_dir(name);
    // Moves need a node that does not hold every region.
    let n = if matches!(fault, Fault::MovesUnderKills) {
        4
    } else {
        3
    };
    let all: Vec<usize> = (0..n).collect();
    let metrics: Vec<String> = common::free_addrs(n)
        .iter()
        .map(|a| a.to_string())
        .collect();
    let m = metrics.clone();
    // The cut-off follower must lead nothing when it stops: with the scheduler on, leader
    // balancing may hand it regions in the moment before, and the recording clients (whose
    // default RPC timeout, 12 s, outlasts the pause) would then wait on it instead of writing
    // the log past it.
    let schedule = !matches!(fault, Fault::CutOffFollower);
    let certs = tls.then(|| common::tls_certs(&dir.path().join("certs"), n));
    let tls_certs = certs.as_ref();
    let mut procs = start_process_cluster(dir.path(), n, REGIONS, move |c| {
        c.raft.log_gc_threshold = 50;
        c.node.metrics_addr = m[c.node.id as usize - 1].clone();
        c.placement.schedule = schedule;
        if let Some(t) = tls_certs {
            t.configure(c);
        }
    });
    let addrs: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    if let Some(t) = &certs {
        common::register_tls(&addrs, &t.operator);
    }
    assert!(
        leadership_recovered(&addrs, &all, Duration::from_secs(60))
            .await
            .is_some(),
        "{name}: cluster never elected"
    );
    let mut region_of = HashMap::new();
    // With four nodes, no node hosts every region: the union of their views.
    let mut regions = Vec::new();
    for a in &addrs {
        regions.extend(regions_of(a).await.expect("regions"));
    }
    let many = matches!(fault, Fault::ManyWritersLeadersMove);
    let (n_clients, n_keys) = if many {
        (MANY_CLIENTS, FEW_KEYS)
    } else {
        (CLIENTS, KEYS)
    };
    let keys: Vec<Vec<u8>> = (0..n_keys)
        .map(|i| key_in_region(i % REGIONS, REGIONS, &format!("chaos{i}")))
        .collect();
    for k in &keys {
        let r = regions
            .iter()
            .filter_map(|i| i.region.clone())
            .find(|r| tessera::storage::keys::in_range(k, &r.start_key, &r.end_key))
            .expect("key has a region");
        region_of.insert(k.clone(), r);
    }
    // What users get: the defaults, deadline and retries of every write included (and
    // the cluster's CA and a user's login when it speaks TLS).
    let opts = match &certs {
        Some(t) => enable_auth(&addrs, t).await,
        None => ClientOptions::default(),
    };
    let env = Arc::new(Env {
        addrs: addrs.clone(),
        keys,
        region_of,
        rec: Recorder {
            origin: Instant::now(),
            ops: Mutex::default(),
        },
        stop: AtomicBool::new(false),
        opts,
        think_ms: many.then_some((10, 40)),
    });
    let watches_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watchers = start_watchers(&addrs, watches_done.clone()).await;
    let watch_stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_leaders(addrs.clone(), watch_stop.clone()));
    let clients: Vec<_> = (0..n_clients)
        .map(|id| tokio::spawn(client_loop(env.clone(), id, seed, reads)))
        .collect();

    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut run = FaultRun {
        name,
        procs: &mut procs,
        addrs: &addrs,
        dir: &dir,
        secs: run_secs(),
        seed,
        rng: StdRng::seed_from_u64(seed),
        recoveries: Vec::new(),
        env: &env,
        snapshot_victim: None,
        crashes: 0,
        splits: 0,
        moves: 0,
        merges: 0,
    };
    inject(fault, &mut run).await;
    let FaultRun {
        snapshot_victim,
        crashes,
        splits,
        moves,
        merges,
        recoveries,
        ..
    } = run;
    // Heal: everyone runs; stop the clients; every region led again.
    env.stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(30), c).await;
    }
    if leadership_recovered(&addrs, &all, Duration::from_secs(60))
        .await
        .is_none()
    {
        for p in &procs {
            if let Some(c) = &p.child {
                let ps = std::process::Command::new("ps")
                    .args(["-o", "pid=,stat=,wchan=", "-p", &c.id().to_string()])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                eprintln!("{}: {}", p.addr, ps.trim());
            }
        }
        panic!("{name}: no full leadership after healing");
    }
    // Final linearizable reads of every key, recorded like any other read.
    let final_from = env.rec.now();
    let reader = Client::connect(&addrs, common::with_tls(&addrs, harness_client_opts()))
        .await
        .unwrap();
    for k in &env.keys {
        let invoke = env.rec.now();
        let got = reader.get(k).await.expect("final read after healing");
        env.rec.push(Op {
            client: 999,
            key: k.clone(),
            input: Input::Get,
            invoke,
            ret: Some((env.rec.now(), Output::Get(observed(got)))),
        });
    }
    watch_stop.store(true, Ordering::Relaxed);
    let leaders_seen = watcher.await.unwrap();
    assert!(
        leaders_seen.is_ok(),
        "{name}: {}",
        leaders_seen.unwrap_err()
    );

    // Replicas converge: once writes stop, every replica of every key's region holds the
    // same data (read from each node's local state), and every key has at least three.
    let mut converged = false;
    for _ in 0..100 {
        let mut views = Vec::new();
        for a in &addrs {
            views.extend(local_scan_all(a, &env).await);
        }
        if views.len() == addrs.len()
            && env.keys.iter().all(|k| {
                let held: Vec<_> = views.iter().filter_map(|v| v.get(k)).collect();
                held.len() >= 3 && held.iter().all(|h| *h == held[0])
            })
        {
            converged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(converged, "{name}: replicas did not converge");

    let history = History {
        ops: std::mem::take(&mut *env.rec.ops.lock().unwrap()),
    };
    if let Some(bad) = check::non_monotonic_revisions(&history) {
        if reads == Reads::Linearizable {
            panic!(
                "{name}: revisions went backwards for client {}: {bad:?}",
                bad.0
            );
        }
    }
    let ok = history.ops.iter().filter(|o| o.ret.is_some()).count();
    let unknown_writes = history
        .ops
        .iter()
        .filter(|o| o.ret.is_none() && o.input != Input::Get)
        .count();
    let failed_reads = history
        .ops
        .iter()
        .filter(|o| o.ret.is_none() && o.input == Input::Get)
        .count();
    let (lost, stale) = lost_and_stale(&history, final_from);
    let misreported = check::misreported_writes(&history);
    for m in misreported.iter().take(10) {
        eprintln!("{name}: write misreported: {m}");
    }
    let (out_of_order, first_out_of_order) = check::revisions_out_of_real_time(&history);
    if let Some(o) = &first_out_of_order {
        eprintln!("{name}: {out_of_order} writes out of real-time order, first: {o:?}");
    }
    let watch_problems = check_watchers(name, &addrs, watchers, watches_done, &history).await;
    for p in &watch_problems {
        eprintln!("{name}: watch: {p}");
    }
    let verdict = check::check(&history);
    // Scraped until it shows a snapshot (or 10 s pass): the endpoint of a node that was
    // just resumed may answer slowly.
    let mut snapshots_received = 0;
    if let Some(v) = snapshot_victim {
        let t = Instant::now();
        while snapshots_received == 0 && t.elapsed() < Duration::from_secs(10) {
            snapshots_received = metric(&metrics[v], "tessera_snapshots_received_total");
            if snapshots_received == 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    if let Some(v) = snapshot_victim {
        for (i, m) in metrics.iter().enumerate() {
            eprintln!(
                "{name}: node {}{}: snapshots sent {} received {} failed {}, log compactions {}",
                i + 1,
                if i == v { " (cut off)" } else { "" },
                metric(m, "tessera_snapshots_sent_total"),
                metric(m, "tessera_snapshots_received_total"),
                metric(m, "tessera_snapshots_failed_total"),
                metric(m, "tessera_log_compactions_total"),
            );
        }
    }
    let injected_drops = metrics
        .iter()
        .map(|m| {
            metric(
                m,
                "tessera_raft_messages_dropped_total{reason=\"injected_fault\"}",
            )
        })
        .sum();
    // `metric` sums every series whose line starts with the name: "lease" matches both
    // lease paths (served by the worker, and `lease_local` on the gRPC thread).
    let reads_by = |path: &str| -> u64 {
        let name = format!("tessera_reads_total{{path=\"{path}");
        metrics.iter().map(|m| metric(m, &name)).sum()
    };
    let (lease_reads, read_index_reads) = (reads_by("lease"), reads_by("read_index\""));
    drop(procs);
    drop(dir);
    Outcome {
        injected_drops,
        lease_reads,
        read_index_reads,
        snapshots_received,
        crashes,
        splits,
        moves,
        merges,
        verdict,
        misreported: misreported.len(),
        ok,
        failed_reads,
        unknown: unknown_writes,
        lost,
        stale,
        out_of_order,
        watch_problems,
        recoveries,
    }
}
