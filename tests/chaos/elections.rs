//! Elections under faults: contenders (the client library's `Election`, default options)
//! campaign, hold leadership for a while writing fenced records to a resource, then resign,
//! die (their lease expires) or pause past their TTL and come back with a stale token —
//! while nodes are killed with -9 and paused with SIGSTOP. The election check
//! (`check::check_election`) then reads the run's history: no term was won while an older
//! contender's key still existed, and the resource's tokens never fell.

use futures::StreamExt;
use tessera::check::{check_election, ElectionProblem, KeyLife, Term};
use tessera::client::concurrency::{Election, Session};
use tessera::client::{EventKind, WatchOptions};

use super::*;

const CONTENDERS: u64 = 4;
const PREFIX: &[u8] = b"/chaos/elect";
const RESOURCE: &[u8] = b"/chaos/resource";
const TTL: Duration = Duration::from_secs(2);

pub(crate) struct ElectionRun {
    pub(crate) terms: usize,
    pub(crate) writes: usize,
    pub(crate) problems: Vec<ElectionProblem>,
}

/// One fenced write: read the resource, refuse if a newer token wrote it, else a
/// compare-and-swap on what was read. `true` if it was written.
async fn fenced_write(client: &Client, token: u64, who: u64, i: u32) -> bool {
    let Ok(cur) = client.get(RESOURCE).await else {
        return false;
    };
    let (stored, compare) = match &cur {
        Some(kv) => {
            let t = String::from_utf8_lossy(&kv.value)
                .split_whitespace()
                .next()
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0);
            (t, Compare::ModRevision(kv.mod_revision))
        }
        None => (0, Compare::Absent),
    };
    if stored > token {
        return false;
    }
    let value = format!("{token} {who} {i}").into_bytes();
    matches!(client.cas(RESOURCE, compare, CasAction::Put(value)).await, Ok(r) if r.succeeded)
}

async fn contender(
    eps: Vec<String>,
    who: u64,
    seed: u64,
    until: Instant,
    broken: bool,
) -> Vec<Term> {
    let mut rng = StdRng::seed_from_u64(seed * 1000 + who);
    let mut terms = Vec::new();
    let Ok(client) = Client::connect(&eps, ClientOptions::default()).await else {
        return terms;
    };
    while Instant::now() < until {
        let Ok(Ok(session)) =
            tokio::time::timeout(Duration::from_secs(10), Session::new(&client, TTL)).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut e = Election::new(&session, PREFIX);
        if broken {
            e.break_for_testing();
        }
        let left = until.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
        let name = format!("c{who}");
        match tokio::time::timeout(left, e.campaign(name.as_bytes())).await {
            Ok(Ok(())) => {}
            _ => {
                let _ = tokio::time::timeout(Duration::from_secs(5), session.close()).await;
                continue;
            }
        }
        let token = e.token();
        terms.push(Term {
            key: e.key_bytes().to_vec(),
            token,
            acquired: e.acquired_revision(),
        });
        for i in 0..rng.random_range(2..6u32) {
            fenced_write(&client, token, who, i).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..200))).await;
        }
        match rng.random_range(0..10) {
            0..=5 => {
                let _ = tokio::time::timeout(Duration::from_secs(5), e.resign()).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), session.close()).await;
            }
            6..=7 => drop(session), // dies: the lease expires with the key
            _ => {
                // Paused past its TTL: comes back still believing it leads.
                drop(session);
                tokio::time::sleep(TTL + Duration::from_millis(1500)).await;
                fenced_write(&client, token, who, 99).await;
            }
        }
    }
    terms
}

/// Kills (-9, restarted a second later) or pauses (SIGSTOP past an election timeout) a
/// random node every 3 s until `until`.
async fn faults(procs: Arc<Mutex<Vec<Proc>>>, dir: std::path::PathBuf, seed: u64, until: Instant) {
    let mut rng = StdRng::seed_from_u64(seed);
    while Instant::now() + Duration::from_secs(3) < until {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let n = rng.random_range(0..3usize);
        if rng.random_bool(0.5) {
            procs.lock().unwrap()[n].kill9();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let log = dir.join(format!("node{}.log", n + 1));
            procs.lock().unwrap()[n].restart(&log);
        } else {
            procs.lock().unwrap()[n].signal("STOP");
            tokio::time::sleep(Duration::from_millis(1500)).await;
            procs.lock().unwrap()[n].signal("CONT");
        }
    }
}

/// The run's history of everything under `/chaos/` from `from` up to the current revision.
async fn history(client: &Client, from: u64) -> (HashMap<Vec<u8>, KeyLife>, Vec<(u64, u64)>) {
    let upto = client.current_revision().await.expect("current revision");
    let opts = WatchOptions {
        start_revision: from,
        progress_notify: true,
        progress_interval: Duration::from_millis(200),
        ..Default::default()
    };
    let mut w = client.watch_prefix(b"/chaos/", opts).await.expect("watch");
    let (mut keys, mut writes) = (HashMap::<Vec<u8>, KeyLife>::new(), Vec::new());
    let mut dir = PREFIX.to_vec();
    dir.push(b'/');
    let mut complete = 0;
    while complete < upto {
        let resp = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("history arrives")
            .expect("watch open")
            .expect("watch response");
        complete = resp.revision;
        for e in resp.events {
            if e.kv.key == RESOURCE && e.kind == EventKind::Put {
                let token = String::from_utf8_lossy(&e.kv.value)
                    .split_whitespace()
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                writes.push((resp.revision, token));
            } else if e.kv.key.starts_with(&dir) {
                let life = keys.entry(e.kv.key.clone()).or_default();
                match e.kind {
                    EventKind::Put if life.created == 0 => life.created = e.kv.create_revision,
                    EventKind::Put => {}
                    EventKind::Delete => life.deleted = Some(resp.revision),
                }
            }
        }
    }
    (keys, writes)
}

pub(crate) async fn election_run(
    name: &str,
    seed: u64,
    with_faults: bool,
    broken: bool,
) -> ElectionRun {
    let dir = common::test_dir(name);
    let procs = start_process_cluster(dir.path(), 3, 2, |_| {});
    let eps: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    common::wait_for_leaders(&eps, 2 + common::SYSTEM_REGIONS, Duration::from_secs(90)).await;
    let client = Client::connect(&eps, ClientOptions::default())
        .await
        .expect("client connects");
    let from = client.current_revision().await.expect("revision") + 1;
    let until = Instant::now() + Duration::from_secs(run_secs().max(15));
    let procs = Arc::new(Mutex::new(procs));
    let fault_task = with_faults
        .then(|| tokio::spawn(faults(procs.clone(), dir.path().to_path_buf(), seed, until)));
    let tasks: Vec<_> = (0..CONTENDERS)
        .map(|who| tokio::spawn(contender(eps.clone(), who, seed, until, broken)))
        .collect();
    let mut terms = Vec::new();
    for t in tasks {
        terms.extend(t.await.expect("contender"));
    }
    if let Some(f) = fault_task {
        f.await.expect("faults");
    }
    for p in procs.lock().unwrap().iter() {
        p.signal("CONT");
    }
    common::wait_for_leaders(&eps, 2 + common::SYSTEM_REGIONS, Duration::from_secs(90)).await;
    let (keys, writes) = history(&client, from).await;
    let problems = check_election(&terms, &keys, &writes);
    for p in procs.lock().unwrap().iter_mut() {
        p.terminate(Duration::from_secs(10));
    }
    ElectionRun {
        terms: terms.len(),
        writes: writes.len(),
        problems,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_hold_under_kill9_and_pauses() {
    for seed in seeds() {
        let r = election_run("elections-under-faults", seed, true, false).await;
        eprintln!(
            "chaos elections seed {seed}: terms won {}, fenced writes {}, problems {:?}",
            r.terms, r.writes, r.problems
        );
        assert!(r.terms >= 4, "too few terms won ({})", r.terms);
        assert!(r.writes >= 4, "too few fenced writes ({})", r.writes);
        assert!(r.problems.is_empty(), "seed {seed}: {:?}", r.problems);
    }
}

/// The election check is not a rubber stamp: contenders that do not wait for their
/// predecessors (a broken lock) are caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_an_election_without_the_predecessor_wait_is_caught() {
    let r = election_run("negative-control-election", 1, false, true).await;
    eprintln!(
        "chaos negative-control-election: terms won {}, problems {}",
        r.terms,
        r.problems.len()
    );
    assert!(r.terms >= 4, "too few terms won ({})", r.terms);
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, ElectionProblem::Overlap { .. })),
        "overlapping terms passed the election check"
    );
}
