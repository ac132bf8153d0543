//! The `tessera` command line as a user types it, against a real cluster: output, JSON,
//! exit codes and one-line errors.

use super::*;

/// Runs the CLI; returns (exit code, stdout, stderr).
pub(super) fn cli(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("run tessera");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the CLI with `input` on its standard input; returns (exit code, stdout, stderr).
fn cli_stdin(args: &[&str], input: &[u8]) -> (i32, String, String) {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tessera");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(input).expect("write stdin");
    drop(stdin);
    let out = child.wait_with_output().expect("wait for tessera");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_end_to_end_including_error_exits() {
    let dir = common::test_dir("cli_end_to_end_including_error_exits");
    let procs = start_process_cluster(dir.path(), 3, 4, |c| {
        c.placement.heartbeat_interval_ms = 200;
        c.placement.node_down_after_ms = 2000;
        c.placement.replace_down_after_ms = 2000;
        // Replicas move only by command here, so the CLI's move is deterministic.
        c.placement.schedule = false;
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 5, Duration::from_secs(60)).await;
    let ep = addrs.join(",");
    let ep = ep.as_str();

    let (code, out, _) = cli(&["kv", "-e", ep, "put", "/topics/a", "one"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("OK (revision "), "{out}");
    let rev_one: u64 = out
        .trim()
        .trim_start_matches("OK (revision ")
        .trim_end_matches(')')
        .parse()
        .expect("a revision");
    cli(&["kv", "-e", ep, "put", "/topics/b", "two"]);
    // History: the value as of a revision, a whole scan at it, and compaction.
    let (code, out, _) = cli(&["kv", "-e", ep, "put", "/topics/a", "uno"]);
    assert_eq!(code, 0, "{out}");
    let rev = rev_one.to_string();
    let (code, out, _) = cli(&["kv", "-e", ep, "get", "/topics/a", "--rev", &rev]);
    assert_eq!((code, out.as_str()), (0, "one\n"));
    let (code, out, _) = cli(&[
        "kv", "-e", ep, "scan", "/topics/", "/topics0", "--rev", &rev,
    ]);
    assert_eq!(
        (code, out.as_str()),
        (0, "/topics/a\tone\n"),
        "b came later"
    );
    let (code, out, err) = cli(&["kv", "-e", ep, "get", "/topics/a", "--rev", "999999999999"]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains("in the future"), "{err}");
    let next = (rev_one + 1).to_string();
    let (code, out, _) = cli(&["compact", "-e", ep, &next]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("compacted up to revision {next}").as_str())
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _, err) = cli(&["kv", "-e", ep, "get", "/topics/a", "--rev", &rev]);
        if code == 2 && err.contains("revision compacted") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "read below the compaction served: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    cli(&["kv", "-e", ep, "put", "/topics/a", "one"]);
    let (code, out, _) = cli(&["kv", "-e", ep, "get", "/topics/a"]);
    assert_eq!((code, out.as_str()), (0, "one\n"));
    let (code, out, _) = cli(&["kv", "-e", ep, "scan", "/topics/", "/topics0"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "/topics/a\tone\n/topics/b\ttwo\n")
    );
    let (code, out, _) = cli(&["kv", "-e", ep, "--json", "get", "/topics/b"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("\"value\":\"two\"") && out.contains("\"version\":1"),
        "{out}"
    );
    let (code, _, _) = cli(&["kv", "-e", ep, "cas", "/leader", "me", "--absent"]);
    assert_eq!(code, 0);
    let (code, out, _) = cli(&["kv", "-e", ep, "delete", "/topics/a"]);
    assert_eq!((code, out.as_str()), (0, "deleted\n"));

    // A value from standard input when none is given: larger than an argument may be.
    let big: String = (0..200 * 1024)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let (code, out, err) = cli_stdin(&["kv", "-e", ep, "put", "/configs/big"], big.as_bytes());
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&["kv", "-e", ep, "get", "/configs/big"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim_end_matches('\n'), big);
    // Every subcommand explains itself.
    for sub in ["get", "put", "delete", "scan", "cas"] {
        let (code, out, _) = cli(&["kv", sub, "--help"]);
        assert_eq!(code, 0, "{sub}");
        let about = out.lines().next().unwrap_or_default();
        assert!(
            !about.starts_with("Usage"),
            "kv {sub} has no help text: {out}"
        );
    }

    // Failures: non-zero exit and one line on stderr.
    for (args, want) in [
        (vec!["kv", "-e", ep, "get", "/topics/a"], "not found"),
        (
            vec!["kv", "-e", ep, "cas", "/leader", "you", "--absent"],
            "compare failed",
        ),
        (
            vec!["kv", "-e", "127.0.0.1:1", "get", "x"],
            "no node reachable",
        ),
        (vec!["kv", "-e", ep, "put", "", "v"], "invalid argument"),
    ] {
        let (code, _, err) = cli(&args);
        assert_eq!(code, 2, "{args:?}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }

    let (code, out, _) = cli(&["regions", "-e", ep]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("{} regions", 4 + common::SYSTEM_REGIONS)),
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, _) = cli(&["nodes", "-e", ep, "--json"]);
        if code == 0 && out.matches("\"state\":\"up\"").count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "nodes never all up: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Status, once every region's leader has reported to the routing table.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, _) = cli(&["status", "-e", ep, "--json"]);
        if code == 0
            && out.contains(&format!("\"regions\":{},", 4 + common::SYSTEM_REGIONS))
            && out.contains("\"regions_without_leader\":0")
        {
            assert!(out.contains("\"nodes_up\":3"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "status never complete: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out, _) = cli(&["status", "-e", ep]);
    assert_eq!(code, 0);
    assert!(
        out.contains("healthy") && out.contains("3 up, 0 down"),
        "{out}"
    );

    // Leader transfer through the CLI.
    let (_, out, _) = cli(&["regions", "-e", ep, "--json"]);
    let first_leader: u64 = out
        .split("\"leader_node\":")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.parse().ok())
        .expect("region 1 has a leader");
    let to = (first_leader % 3 + 1).to_string();
    let (code, out, err) = cli(&["regions", "-e", ep, "transfer-leader", "1", &to]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("now led from node {to}")), "{out}");
    let (code, _, err) = cli(&["regions", "-e", ep, "transfer-leader", "1", "99"]);
    assert_eq!(code, 2);
    assert!(err.contains("no peer on node 99"), "{err}");

    // Split through the CLI: the region holding "/topics/" splits there, data stays put
    // (/topics/a was deleted above).
    let (code, out, err) = cli(&["regions", "-e", ep, "split", "/topics/"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.lines().nth(1).unwrap().contains("[2f746f706963732f, "),
        "{out}"
    );
    let (code, out, _) = cli(&["kv", "-e", ep, "scan", "/topics/", "/topics0"]);
    assert_eq!((code, out.as_str()), (0, "/topics/b\ttwo\n"));
    let (_, out, err) = cli(&["regions", "-e", ep, "split", "--hex", "zz"]);
    assert!(err.contains("hex digits"), "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out, _) = cli(&["regions", "-e", ep]);
        if out.contains(&format!("{} regions", 5 + common::SYSTEM_REGIONS)) {
            break;
        }
        assert!(Instant::now() < deadline, "split never reported: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A fourth node joins through the real binary and shows up in `tessera nodes`.
    let addr4 = common::free_addrs(1)[0].to_string();
    let log4 = std::fs::File::create(dir.path().join("node4.log")).unwrap();
    let mut node4 = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["server", "--config"])
        .arg(dir.path().join("node1.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("node4"))
        .args(["--listen-addr", &addr4, "--join", &addrs[1]])
        .stdout(log4.try_clone().unwrap())
        .stderr(log4)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let id4 = loop {
        let (_, out, _) = cli(&["nodes", "-e", ep, "--json"]);
        if let Some(entry) = out.split("{\"id\":").find(|e| {
            e.contains(&format!("\"addr\":\"{addr4}\"")) && e.contains("\"state\":\"up\"")
        }) {
            break entry.split(',').next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "joined node never up: {out}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (code, out, _) = cli(&["nodes", "-e", ep]);
    assert_eq!(code, 0);
    assert_eq!(out.matches(" up ").count(), 4, "{out}");

    // Move region 1's replica from node 3 to the new node, then back by add/remove.
    let (code, out, err) = cli(&["regions", "-e", ep, "move", "1", "3", &id4]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("now on nodes") && out.contains(&id4), "{out}");
    assert!(!out.contains(" 3,") && !out.contains(" 3 ("), "{out}");
    let (code, out, err) = cli(&["regions", "-e", ep, "add-peer", "1", "3", "--learner"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3(learner)"), "{out}");
    let (code, _, err) = cli(&["regions", "-e", ep, "move", "1", "3", "3"]);
    assert_eq!(code, 2, "{err}");

    // Removing it stops the process with an error exit.
    let (code, out, _) = cli(&["nodes", "-e", ep, "remove", &id4]);
    assert_eq!(code, 0, "{out}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = node4.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "removed node kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("node4.log")).unwrap();
    assert!(log.contains("removed from the cluster"), "{log}");
    let (code, _, err) = cli(&["nodes", "-e", ep, "remove", "12345"]);
    assert_eq!(code, 2);
    assert!(err.contains("not registered"), "{err}");

    // kill -9 of a node: shown down within node_down_after_ms (2 s) plus a beat.
    let mut procs = procs;
    let t = Instant::now();
    procs[2].kill9();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, out, _) = cli(&["nodes", "-e", &addrs[..2].join(","), "--json"]);
        if out.contains("{\"id\":3,")
            && out
                .split("{\"id\":3,")
                .nth(1)
                .is_some_and(|e| e.contains("\"state\":\"down\""))
        {
            eprintln!("killed node shown down after {:?}", t.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "killed node never shown down: {out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(procs);
}

/// The revision in an "OK (revision N)" line.
fn revision_of(out: &str) -> u64 {
    out.trim()
        .trim_start_matches("OK (revision ")
        .trim_end_matches(')')
        .parse()
        .expect("a revision")
}

/// `tessera watch`: history from --rev as JSON, live changes as text, exit status 3 for a
/// compacted start and 4 once the cluster is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_watch_prints_changes_and_tells_compacted_from_lost() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = common::test_dir("cli_watch_prints_changes_and_tells_compacted_from_lost");
    let mut procs = start_process_cluster(dir.path(), 3, 4, |_| {});
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 5, Duration::from_secs(60)).await;
    let ep = addrs.join(",");
    let ep = ep.as_str();

    let r1 = revision_of(&cli(&["kv", "-e", ep, "put", "/w/a", "1"]).1);
    cli(&["kv", "-e", ep, "put", "/w/b", "2"]);
    cli(&["kv", "-e", ep, "delete", "/w/a"]);
    cli(&["kv", "-e", ep, "put", "/x", "not watched"]);
    let (code, out, err) = cli(&[
        "watch",
        "-e",
        ep,
        "/w/",
        "--rev",
        &r1.to_string(),
        "--json",
        "--prev-kv",
        "--count",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let summary: Vec<(String, String, String)> = lines
        .iter()
        .map(|v| {
            (
                v["type"].as_str().unwrap_or_default().to_string(),
                v["key"].as_str().unwrap_or_default().to_string(),
                v["value"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("PUT".into(), "/w/a".into(), "1".into()),
            ("PUT".into(), "/w/b".into(), "2".into()),
            ("DELETE".into(), "/w/a".into(), String::new()),
        ]
    );
    assert_eq!(lines[0]["revision"].as_u64(), Some(r1));
    assert_eq!(lines[2]["prev_value"].as_str(), Some("1"));

    // Live, as text: a watch started after the last write sees the next two.
    let from = revision_of(&cli(&["kv", "-e", ep, "put", "/w/c", "3"]).1) + 1;
    let mut live = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "watch",
            "-e",
            ep,
            "/w/",
            "--rev",
            &from.to_string(),
            "--count",
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tessera watch");
    let rd = revision_of(&cli(&["kv", "-e", ep, "put", "/w/d", "4"]).1);
    let deleted: serde_json::Value =
        serde_json::from_str(&cli(&["kv", "-e", ep, "--json", "delete", "/w/c"]).1).expect("JSON");
    let re = deleted["revision"].as_u64().expect("revision");
    let out = BufReader::new(live.stdout.take().expect("stdout"));
    let got: Vec<String> = out.lines().map(|l| l.expect("line")).collect();
    assert_eq!(
        got,
        vec![format!("{rd} PUT /w/d 4"), format!("{re} DELETE /w/c")]
    );
    assert!(live.wait().expect("watch exits").success());

    // From a compacted revision: exit status 3.
    cli(&["compact", "-e", ep, &rd.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _, err) = cli(&[
            "watch",
            "-e",
            ep,
            "/w/",
            "--rev",
            &r1.to_string(),
            "--count",
            "1",
        ]);
        if code == 3 {
            assert!(err.contains("revision compacted"), "{err}");
            break;
        }
        assert_eq!(code, 0, "{err}");
        assert!(
            Instant::now() < deadline,
            "watch below the compaction served"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The cluster goes away under a running watch: exit status 4 after the deadline.
    let mut lost = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["watch", "-e", ep, "/w/"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tessera watch");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for p in procs.iter_mut() {
        p.kill9();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = lost.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "watch did not give up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut lost.stderr.take().expect("stderr"), &mut err)
        .expect("stderr");
    assert_eq!(status.code(), Some(4), "{err}");
    assert!(err.contains("lost the cluster"), "{err}");
}
