//! TLS and mutual TLS between nodes, with certificates made at test time: a TLS cluster
//! serves TLS clients; plaintext, a wrong CA and an expired certificate are refused; raft,
//! snapshot and admin calls need a certificate of the cluster CA; a node with another CA's
//! certificate cannot join — and the cluster keeps serving throughout.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tessera::client::TlsOptions;
use tessera::proto::raft_transport_client::RaftTransportClient;

use super::cli::cli;
use super::*;

/// A CA that signs node certificates for 127.0.0.1.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let pem = p.self_signed(&key).expect("CA").pem();
        Ca {
            issuer: Issuer::new(p, key),
            pem,
        }
    }

    /// A certificate and key for 127.0.0.1, written under `dir` as `name.crt`/`name.key`.
    fn issue(&self, dir: &Path, name: &str, expired: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("params");
        if expired {
            p.not_before = rcgen::date_time_ymd(2001, 1, 1);
            p.not_after = rcgen::date_time_ymd(2002, 1, 1);
        }
        let cert = p.signed_by(&key, &self.issuer).expect("certificate");
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}.pem"));
        std::fs::write(&p, &self.pem).expect("write CA");
        p
    }
}

async fn tls_client(eps: &[String], tls: TlsOptions) -> tessera::client::Result<Client> {
    let opts = ClientOptions {
        tls: Some(tls),
        deadline: Duration::from_secs(5),
        ..Default::default()
    };
    Client::connect(eps, opts).await
}

/// Waits until the TLS cluster's regions are all led, as placement sees it.
async fn wait_led_tls(eps: &[String], tls: &TlsOptions, regions: u64) {
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
    let ca = Ca::new("cluster");
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
    let rogue = Ca::new("rogue");
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

    // A node with another CA's certificate cannot join, even trusting the cluster's CA.
    let (rcert, rkey) = rogue.issue(&certs, "joiner", false);
    let addr = common::free_addrs(1)[0];
    let mut cfg = common::node_config(dir.path(), 1, &[addr], 4);
    cfg.node.id = 0;
    cfg.node.data_dir = dir.path().join("joiner");
    cfg.cluster.join = vec![eps[0].clone()];
    cfg.security.cert_file = rcert;
    cfg.security.key_file = rkey;
    cfg.security.ca_file = ca_file.clone();
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
