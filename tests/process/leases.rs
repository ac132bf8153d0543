//! Leases with real processes: a keep-alive outlives kill -9 of the lease's leader, the keys
//! of a lease whose holder stopped go after its TTL, and the `lease`, `lock` and `elect`
//! commands as a user types them.

use super::cli::cli;
use super::*;

/// The node leading the region that holds lease `id`'s record, as `addr` sees it.
async fn lease_leader(addr: &str, id: u64) -> Option<u64> {
    let key = tessera::storage::keys::lease_key(id);
    node_regions(addr).await?.into_iter().find_map(|info| {
        let r = info.region?;
        tessera::storage::keys::in_range(&key, &r.start_key, &r.end_key)
            .then(|| info.leader.map(|l| l.node_id))
            .flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_lease_survives_kill9_of_its_leader_and_a_dropped_one_takes_its_keys() {
    const REGIONS: u32 = 4;
    let dir = common::test_dir("a_kept_lease_survives_kill9_of_its_leader");
    let (mut procs, addrs, client) = start_led_with_client(dir.path(), 3, REGIONS).await;
    // A keep-alive tells the loss a TTL after its last successful renewal was sent, so the
    // TTL leaves room for a failover on a loaded 2-core machine: renewals every 1.7 s leave
    // 3.3 s to elect a new leader and reach it.
    let (id, ttl) = client
        .lease_grant(Duration::from_secs(5))
        .await
        .expect("grant");
    let keys: Vec<Vec<u8>> = (0..REGIONS)
        .map(|i| key_in_region(i, REGIONS, "/session"))
        .collect();
    for k in &keys {
        client.put_with_lease(k, b"alive", id).await.expect("put");
    }
    let keeper = client.keep_alive(id, ttl);
    for round in 0..3 {
        let mut victim = None;
        for _ in 0..100 {
            let seen = lease_leader(&addrs[round % addrs.len()], id).await;
            if seen.is_some() {
                victim = seen;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let victim = victim.expect("the lease's region has a leader") as usize - 1;
        eprintln!(
            "round {round}: kill -9 of node {}, the lease's leader",
            victim + 1
        );
        procs[victim].kill9();
        // Longer than the TTL with the leader gone for part of it.
        tokio::time::sleep(ttl + Duration::from_secs(1)).await;
        assert!(!keeper.is_lost(), "round {round}: the lease was lost");
        let got = client.batch_get(&keys).await.expect("read");
        assert!(got.iter().all(Option::is_some), "round {round}: keys went");
        procs[victim].restart(&dir.path().join(format!("node{}.log", victim + 1)));
        wait_serving(&addrs).await;
    }
    let left = client.lease_time_to_live(id, true).await.expect("ttl");
    assert_eq!(left.keys.len(), keys.len());
    // The holder stops renewing: the keys go after the TTL.
    drop(keeper);
    let stopped = Instant::now();
    loop {
        let got = client.batch_get(&keys).await.expect("read");
        if got.iter().all(Option::is_none) {
            break;
        }
        assert!(
            stopped.elapsed() < ttl + Duration::from_secs(5),
            "keys of a lease nobody renews still there: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stopped.elapsed() >= ttl - ttl / 3, "went before the TTL");
    for p in procs.iter_mut() {
        p.terminate(Duration::from_secs(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_leases_locks_and_elections() {
    let dir = common::test_dir("cli_leases_locks_and_elections");
    let mut procs = start_process_cluster(dir.path(), 3, 2, |_| {});
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 2 + common::SYSTEM_REGIONS, Duration::from_secs(90)).await;
    let ep = addrs.join(",");
    let ep = ep.as_str();

    let (code, out, err) = cli(&["lease", "-e", ep, "grant", "30"]);
    assert_eq!(code, 0, "{err}");
    // "lease <hex> granted with TTL(30s)"
    let id = out.split_whitespace().nth(1).expect("an id").to_string();
    assert!(out.contains("granted with TTL(30s)"), "{out}");
    let (code, _, err) = cli(&["kv", "-e", ep, "put", "/svc/a", "10.0.0.1", "--lease", &id]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(&["kv", "-e", ep, "--json", "get", "/svc/a"]);
    assert_eq!(code, 0);
    assert!(out.contains(&format!("\"lease\":\"{id}\"")), "{out}");
    let (code, out, _) = cli(&["lease", "-e", ep, "ttl", &id, "--keys"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("granted with TTL(30s)") && out.contains("/svc/a"),
        "{out}"
    );
    let (code, out, _) = cli(&["lease", "-e", ep, "keep-alive", &id, "--once"]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("lease {id} keepalived with TTL(30)").as_str())
    );
    let (code, out, _) = cli(&["lease", "-e", ep, "list"]);
    assert_eq!(code, 0);
    assert!(out.contains(&id), "{out}");
    let (code, out, _) = cli(&["lease", "-e", ep, "revoke", &id]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("lease {id} revoked").as_str())
    );
    let (code, _, err) = cli(&["kv", "-e", ep, "get", "/svc/a"]);
    assert_eq!(code, 2, "the key went with its lease");
    assert!(err.contains("not found"), "{err}");
    // Bad input: one clear line each, exit status 2.
    for (args, says) in [
        (vec!["lease", "-e", ep, "grant", "0"], "TTL must be above 0"),
        (vec!["lease", "-e", ep, "revoke", "123abc"], "not found"),
        (vec!["lease", "-e", ep, "ttl", "zz"], "not a lease id"),
        (
            vec!["kv", "-e", ep, "put", "/svc/b", "v", "--lease", &id],
            "not found",
        ),
        (
            vec!["lease", "-e", ep, "keep-alive", &id],
            "expired or was revoked",
        ),
    ] {
        let (code, _, err) = cli(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains(says) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }

    // Two `lock` commands on one name: the second runs its command only after the first's
    // finished, and with a higher fencing token.
    let log = dir.path().join("lock.log");
    let script = format!(
        "echo start $TESSERA_LOCK_TOKEN >> {0}; sleep 1; echo end $TESSERA_LOCK_TOKEN >> {0}",
        log.display()
    );
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["lock", "-e", ep, "jobs", "--", "sh", "-c", &script])
            .spawn()
            .expect("run tessera lock")
    };
    let (mut a, mut b) = (spawn(), spawn());
    assert!(a.wait().expect("lock a").success());
    assert!(b.wait().expect("lock b").success());
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .expect("lock log")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    let token = |l: &str| {
        l.split_whitespace()
            .nth(1)
            .and_then(|t| t.parse::<u64>().ok())
    };
    assert!(
        lines[0].starts_with("start") && lines[1].starts_with("end"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("start") && lines[3].starts_with("end"),
        "{lines:?}"
    );
    assert_eq!(token(&lines[0]), token(&lines[1]));
    assert!(
        token(&lines[2]) > token(&lines[0]),
        "tokens rise: {lines:?}"
    );

    // `elect NAME` prints the leader as it changes; `elect NAME VALUE` campaigns.
    use std::io::BufRead as _;
    let mut observer = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["elect", "-e", ep, "ctl"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run tessera elect");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = observer.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("the observer printed no {what}"))
    };
    assert_eq!(next("first state"), "no leader");
    let mut candidate = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["elect", "-e", ep, "--ttl", "2", "ctl", "alice"])
        .spawn()
        .expect("run tessera elect");
    assert!(next("leader key").starts_with("ctl/"));
    assert_eq!(next("leader value"), "alice");
    // The candidate dies without resigning: its lease expires and leadership is gone.
    candidate.kill().expect("kill the candidate");
    let _ = candidate.wait();
    assert_eq!(next("change after the leader died"), "no leader");
    let _ = observer.kill();
    let _ = observer.wait();
    for p in procs.iter_mut() {
        p.terminate(Duration::from_secs(10));
    }
}

/// A revocation is driven to completion across a crash of its driver: the lease's leader
/// dies (fail point `lease_key_deleted`) after deleting its first key; once it is back, the
/// lease's leader then deletes the rest and removes the lease.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_survives_the_crash_of_its_driver() {
    const REGIONS: u32 = 4;
    let dir = common::test_dir("a_revocation_survives_the_crash_of_its_driver");
    let (mut procs, addrs, client) = start_led_with_client(dir.path(), 3, REGIONS).await;
    let (id, _) = client
        .lease_grant(Duration::from_secs(30))
        .await
        .expect("grant");
    let keys: Vec<Vec<u8>> = (0..REGIONS * 2)
        .map(|i| key_in_region(i % REGIONS, REGIONS, &format!("/driver/{i}")))
        .collect();
    for k in &keys {
        client.put_with_lease(k, b"v", id).await.expect("put");
    }
    let leader = lease_leader(&addrs[0], id).await.expect("a lease leader") as usize - 1;
    common::set_failpoint(&addrs[leader], "lease_key_deleted", "return").await;
    // The revoke's answer is lost with the node; what matters is what happens to the keys.
    let revoke = tokio::spawn({
        let client = client.clone();
        async move { client.lease_revoke(id).await }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = procs[leader]
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the driver never reached the fail point"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.code(), Some(75), "the driver died at the fail point");
    let left = client
        .batch_get(&keys)
        .await
        .expect("read")
        .iter()
        .filter(|k| k.is_some())
        .count();
    eprintln!("driver died with {left} of {} keys left", keys.len());
    procs[leader].restart(&dir.path().join(format!("node{}.log", leader + 1)));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = client.batch_get(&keys).await.expect("read");
        let gone = matches!(
            client.lease_time_to_live(id, false).await,
            Err(tessera::client::Error::NotFound(_))
        );
        if gone && got.iter().all(Option::is_none) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "revocation not finished after the driver's crash"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = revoke.await;
    for p in procs.iter_mut() {
        p.terminate(Duration::from_secs(10));
    }
}
