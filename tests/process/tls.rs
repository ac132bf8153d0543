//! TLS and mutual TLS between nodes, with certificates made at test time: a TLS cluster
//! serves TLS clients; plaintext, a wrong CA and an expired certificate are refused; raft,
//! snapshot and admin calls need a certificate of the cluster CA; a node with another CA's
//! certificate cannot join — and the cluster keeps serving throughout.

use std::path::Path;

use tessera::client::TlsOptions;
use tessera::proto::raft_transport_client::RaftTransportClient;

use super::cli::cli;
use super::*;

async fn tls_client(eps: &[String], tls: TlsOptions) -> tessera::client::Result<Client> {
    let opts = ClientOptions {
        tls: Some(tls),
        deadline: Duration::from_secs(5),
        ..Default::default()
    };
    Client::connect(eps, opts).await
}

/// Waits until the TLS cluster's regions are all led, as placement sees it.
pub(super) async fn wait_led_tls(eps: &[String], tls: &TlsOptions, regions: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Ok(c) = tls_client(eps, tls.clone()).await {
            if let Ok(st) = c.status().await {
                if st.regions >= regions && st.regions_without_leader == 0 {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the TLS cluster never got its leaders"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_refuse_whoever_lacks_the_cluster_ca() {
    let dir = common::test_dir("tls_and_mutual_tls_refuse_whoever_lacks_the_cluster_ca");
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let ca = common::Ca::new("cluster");
    let ca_file = ca.write(&certs, "ca");
    let node_certs: Vec<_> = (1..=3)
        .map(|i| ca.issue(&certs, &format!("node{i}"), false))
        .collect();
    let (client_cert, client_key) = ca.issue(&certs, "operator", false);
    let procs = start_process_cluster(dir.path(), 3, 4, |c| {
        let (cert, key) = &node_certs[c.node.id as usize - 1];
        c.security.cert_file = cert.clone();
        c.security.key_file = key.clone();
        c.security.ca_file = ca_file.clone();
    });
    let eps = endpoints(&procs);
    let anonymous = TlsOptions::from_files(&ca_file, None, None).expect("CA");
    wait_led_tls(&eps, &anonymous, 4 + common::SYSTEM_REGIONS as u64).await;

    // A TLS client without a certificate uses the KV API.
    let client = tls_client(&eps, anonymous.clone())
        .await
        .expect("TLS client");
    client.put(b"/tls/a", b"1").await.expect("put over TLS");
    assert_eq!(
        client
            .get(b"/tls/a")
            .await
            .expect("get")
            .expect("key")
            .value,
        b"1"
    );

    // System access (placement's keys) needs a certificate of the cluster CA: a client
    // without one that asks for it is refused like any user; the operator's is not.
    let node_key = tessera::placement::node_key(tessera::ids::NodeId(1));
    let forger = Client::connect(
        &eps,
        ClientOptions {
            tls: Some(anonymous.clone()),
            system: true,
            deadline: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .await
    .expect("TLS client");
    let why = forger
        .put(&node_key, b"forged")
        .await
        .expect_err("a system write without a certificate");
    eprintln!("system write without a certificate: {why}");
    let operator_tls = TlsOptions::from_files(&ca_file, Some(&client_cert), Some(&client_key))
        .expect("operator TLS");
    let operator = Client::connect(
        &eps,
        ClientOptions {
            tls: Some(operator_tls),
            system: true,
            deadline: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .await
    .expect("operator client");
    // Node 1's first heartbeat writes its record; wait for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let record = loop {
        let got = operator
            .get(&node_key)
            .await
            .expect("system read with the operator's certificate");
        if let Some(kv) = got {
            break kv;
        }
        assert!(Instant::now() < deadline, "node 1 never wrote its record");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(record.value, b"forged", "node 1's record was overwritten");

    // Plaintext to a TLS port: refused, and the message says what to do.
    let plain = Client::connect(
        &eps,
        ClientOptions {
            deadline: Duration::from_secs(3),
            ..Default::default()
        },
    )
    .await;
    let why = match plain {
        Ok(c) => c
            .put(b"/tls/plain", b"x")
            .await
            .expect_err("plaintext write")
            .to_string(),
        Err(e) => e.to_string(),
    };
    eprintln!("plaintext client: {why}");
    assert!(why.contains("--cacert"), "{why}");

    // Another CA's view of the nodes: the client refuses their certificates.
    let rogue = common::Ca::new("rogue");
    let rogue_ca = rogue.write(&certs, "rogue-ca");
    let wrong = TlsOptions::from_files(&rogue_ca, None, None).expect("CA");
    let why = match tls_client(&eps, wrong).await {
        Ok(c) => c.get(b"/tls/a").await.expect_err("wrong CA").to_string(),
        Err(e) => e.to_string(),
    };
    eprintln!("client trusting another CA: {why}");
    assert!(why.to_lowercase().contains("certificate"), "{why}");

    // Raft traffic and admin calls need a certificate of the cluster CA.
    let ch = tessera::client::tls::endpoint(&eps[0], Some(&anonymous))
        .expect("endpoint")
        .connect()
        .await
        .expect("TLS connection");
    let status = RaftTransportClient::new(ch)
        .raft(futures::stream::iter(
            Vec::<tessera::proto::RaftMessageBatch>::new(),
        ))
        .await
        .expect_err("raft stream without a certificate");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let ep = eps.join(",");
    let ca_s = ca_file.to_str().expect("path");
    let (code, _, err) = cli(&["regions", "-e", &ep, "--cacert", ca_s, "split", "/tls/m"]);
    assert_eq!(code, 2, "an admin call without a certificate is refused");
    assert!(
        err.contains("certificate signed by the cluster CA"),
        "{err}"
    );
    let (code, out, err) = cli(&[
        "regions",
        "-e",
        &ep,
        "--cacert",
        ca_s,
        "--cert",
        client_cert.to_str().expect("path"),
        "--key",
        client_key.to_str().expect("path"),
        "split",
        "/tls/m",
    ]);
    assert_eq!(
        code, 0,
        "an admin call with the operator's certificate: {out} {err}"
    );

    // An expired certificate, or one of another CA, is refused by the nodes.
    for (label, (cert, key)) in [
        ("an expired", ca.issue(&certs, "expired", true)),
        ("another CA's", rogue.issue(&certs, "rogue", false)),
    ] {
        let tls = TlsOptions {
            identity: Some((std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap())),
            ..anonymous.clone()
        };
        let ch = tessera::client::tls::endpoint(&eps[1], Some(&tls)).expect("endpoint");
        // The handshake fails: not a PermissionDenied from a node that took the certificate.
        let why = match ch.connect().await {
            Err(e) => format!("{e:?}"),
            Ok(ch) => match RaftTransportClient::new(ch)
                .raft(futures::stream::iter(
                    Vec::<tessera::proto::RaftMessageBatch>::new(),
                ))
                .await
            {
                Ok(_) => panic!("a raft stream with {label} certificate was accepted"),
                Err(status) => {
                    assert_ne!(
                        status.code(),
                        tonic::Code::PermissionDenied,
                        "{label} certificate got past the handshake: {status:?}"
                    );
                    format!("{status:?}")
                }
            },
        };
        eprintln!("raft stream with {label} certificate: {why}");
    }

    // A node with another CA's certificate cannot join, even trusting the cluster's CA (its
    // CA file holds both, so it starts and dials the cluster).
    let (rcert, rkey) = rogue.issue(&certs, "joiner", false);
    let addr = common::free_addrs(1)[0];
    let mut cfg = common::node_config(dir.path(), 1, &[addr], 4);
    cfg.node.id = 0;
    cfg.node.data_dir = dir.path().join("joiner");
    cfg.cluster.join = vec![eps[0].clone()];
    cfg.security.cert_file = rcert;
    cfg.security.key_file = rkey;
    let both = certs.join("both-ca.pem");
    std::fs::write(&both, format!("{}{}", rogue.pem, ca.pem)).expect("write CA bundle");
    cfg.security.ca_file = both;
    let path = dir.path().join("joiner.toml");
    std::fs::write(&path, toml::to_string(&cfg).expect("config")).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["server", "--config", path.to_str().expect("path")])
        .output()
        .expect("run the joiner");
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("joiner with another CA's certificate: {}", err.trim());
    assert!(!out.status.success(), "the rogue node joined");
    assert!(err.contains("cannot join"), "{err}");

    // Through all of it the cluster kept serving.
    client
        .put(b"/tls/b", b"2")
        .await
        .expect("put after the refusals");
    assert_eq!(
        client
            .get(b"/tls/b")
            .await
            .expect("get")
            .expect("key")
            .value,
        b"2"
    );
    drop(procs);
}

/// Waits until the node's log (`nodeN.log` in `dir`) holds a line with every one of `words`.
async fn wait_log(dir: &Path, node: u64, words: &[&str]) {
    let path = dir.join(format!("node{node}.log"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.lines().any(|l| words.iter().all(|w| l.contains(w))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} never logged {words:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Puts through a client that trusts `tls` and reaches only `ep`, until it works.
async fn put_via(ep: &str, tls: &TlsOptions, key: &[u8]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let why = match tls_client(&[ep.to_string()], tls.clone()).await {
            Ok(c) => match c.put(key, b"v").await {
                Ok(_) => return,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "{ep}: {why}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_read_again_on_a_change_or_sighup_and_peer_names_are_checked() {
    let dir = common::test_dir("certificates_are_read_again_on_a_change_or_sighup");
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).expect("mkdir");
    let ca = common::Ca::new("cluster");
    let ca_file = ca.write(&certs, "ca");
    let node_certs: Vec<_> = (1..=3)
        .map(|i| ca.issue(&certs, &format!("node{i}"), false))
        .collect();
    let mut procs = start_process_cluster(dir.path(), 3, 2, |c| {
        let (cert, key) = &node_certs[c.node.id as usize - 1];
        c.security.cert_file = cert.clone();
        c.security.key_file = key.clone();
        c.security.ca_file = ca_file.clone();
        c.security.allowed_peer_names = vec!["localhost".into()];
    });
    let eps = endpoints(&procs);
    let anonymous = TlsOptions::from_files(&ca_file, None, None).expect("CA");
    wait_led_tls(&eps, &anonymous, 2 + common::SYSTEM_REGIONS as u64).await;

    // With allowed_peer_names, a certificate of the cluster CA for another name may not
    // make admin calls; one for a listed name may.
    let ep = eps.join(",");
    let ca_s = ca_file.to_str().expect("path");
    for (name, ok) in [("intruder.example", false), ("localhost", true)] {
        let (cert, key) = ca.issue_for(&certs, name, &[name], false);
        let (code, out, err) = cli(&[
            "regions",
            "-e",
            &ep,
            "--cacert",
            ca_s,
            "--cert",
            cert.to_str().expect("path"),
            "--key",
            key.to_str().expect("path"),
            "split",
            &format!("/names/{name}"),
        ]);
        eprintln!("split with a certificate for {name}: {code} {out} {err}");
        if ok {
            assert_eq!(code, 0, "a listed name was refused: {err}");
        } else {
            assert_eq!(code, 2, "an unlisted name made an admin call: {out}");
            assert!(err.contains("allowed_peer_names"), "{err}");
        }
    }

    // A certificate file that does not parse: the node says so and keeps serving with the
    // certificate it has.
    let (cert1, _) = &node_certs[0];
    let good = std::fs::read(cert1).expect("read");
    std::fs::write(cert1, b"not a certificate").expect("write");
    wait_log(dir.path(), 1, &["TLS certificates not reloaded"]).await;
    put_via(&eps[0], &anonymous, b"/reload/broken").await;
    std::fs::write(cert1, &good).expect("write");
    wait_log(dir.path(), 1, &["TLS certificates reloaded"]).await;

    // Rotation to a new CA without a restart: every node trusts both CAs, then presents a
    // certificate of the new one. A client that trusts only the new CA reaches every node,
    // and the nodes keep replicating to each other.
    let ca2 = common::Ca::new("cluster-2");
    std::fs::write(&ca_file, format!("{}{}", ca.pem, ca2.pem)).expect("write CA bundle");
    for (i, (cert, key)) in node_certs.iter().enumerate() {
        let (c, k) = ca2.issue(&certs, &format!("node{}-2", i + 1), false);
        std::fs::copy(&k, key).expect("key");
        std::fs::copy(&c, cert).expect("cert");
    }
    let ca2_file = ca2.write(&certs, "ca-2");
    let only_new = TlsOptions::from_files(&ca2_file, None, None).expect("CA");
    for (i, ep) in eps.iter().enumerate() {
        put_via(ep, &only_new, format!("/reload/new/{i}").as_bytes()).await;
    }

    // SIGHUP reads them again too, and does not stop the node.
    procs[1].signal("HUP");
    wait_log(dir.path(), 2, &["TLS certificates reloaded", "SIGHUP"]).await;
    let alive = procs[1]
        .child
        .as_mut()
        .expect("node 2 runs")
        .try_wait()
        .expect("wait");
    assert!(alive.is_none(), "SIGHUP stopped node 2: {alive:?}");
    let client = tls_client(&eps, only_new).await.expect("client");
    for i in 0..20u32 {
        let k = format!("/reload/after/{i}");
        client
            .put(k.as_bytes(), b"x")
            .await
            .expect("put after SIGHUP");
    }
    drop(procs);
}

/// Under TLS and mutual TLS, writers with the client's default options (and the cluster CA)
/// keep writing while nodes are killed with kill -9 and restarted, one at a time: every
/// acknowledged write is there afterwards, with its value. Restarted nodes reconnect to
/// their peers through new TLS handshakes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_under_tls_while_nodes_are_killed() {
    const REGIONS: u32 = 4;
    const WRITERS: u64 = 4;
    let dir = common::test_dir("no_acknowledged_write_is_lost_under_tls");
    let certs = common::tls_certs(&dir.path().join("certs"), 3);
    let mut procs = start_process_cluster(dir.path(), 3, REGIONS, |c| certs.configure(c));
    let eps = endpoints(&procs);
    let tls = TlsOptions::from_files(&certs.ca_file, None, None).expect("CA");
    wait_led_tls(
        &eps,
        &tls,
        u64::from(REGIONS) + common::SYSTEM_REGIONS as u64,
    )
    .await;
    let client = Client::connect(
        &eps,
        ClientOptions {
            tls: Some(tls.clone()),
            ..Default::default()
        },
    )
    .await
    .expect("client with default options");

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(Vec<u8>, Vec<u8>)>::new()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (client, stop, acked) = (client.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut failed = 0u64;
                for i in 0..100_000u64 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let k = common::key_in_region(
                        (i % u64::from(REGIONS)) as u32,
                        REGIONS,
                        &format!("/tls-chaos/{w}/{i}"),
                    );
                    let v = format!("{w}-{i}").into_bytes();
                    match client.put(&k, &v).await {
                        Ok(_) => acked.lock().expect("lock").push((k, v)),
                        // Unknown outcomes and deadlines are allowed under kills; only
                        // acknowledged writes are promised.
                        Err(_) => failed += 1,
                    }
                }
                failed
            })
        })
        .collect();

    // Each node in turn: kill -9 under load, down for a moment, restarted.
    for (victim, p) in procs.iter_mut().enumerate() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        p.kill9();
        tokio::time::sleep(Duration::from_secs(1)).await;
        p.restart(&dir.path().join(format!("node{}.log", victim + 1)));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failed = 0;
    for w in writers {
        failed += w.await.expect("writer");
    }
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    eprintln!(
        "TLS under kill -9: {} writes acknowledged, {failed} failed or unknown",
        acked.len()
    );
    assert!(acked.len() > 100, "too few writes went through");

    // Every acknowledged write reads back, after every node came back over TLS.
    wait_led_tls(
        &eps,
        &tls,
        u64::from(REGIONS) + common::SYSTEM_REGIONS as u64,
    )
    .await;
    let mut lost = Vec::new();
    for chunk in acked.chunks(256) {
        let keys: Vec<Vec<u8>> = chunk.iter().map(|(k, _)| k.clone()).collect();
        let got = client.batch_get(&keys).await.expect("read back");
        for ((k, v), kv) in chunk.iter().zip(got) {
            if kv.as_ref().map(|kv| &kv.value) != Some(v) {
                lost.push(String::from_utf8_lossy(k).into_owned());
            }
        }
    }
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    drop(procs);
}
