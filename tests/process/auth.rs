//! Users, roles and permissions on a TLS cluster of real processes, set up with the CLI as
//! an operator types it: once authentication is on, a caller with neither a token nor a
//! certificate of the cluster CA is refused; a user is refused every call outside its
//! permissions, and nothing changes; a revoked permission ends open streams; tokens
//! expire (and the client logs in again before they do); the state survives kill -9 of
//! every node.

use std::path::Path;

use futures::StreamExt;

use tessera::client::{CasAction, Compare, Credentials, Error, TlsOptions, WatchOptions};
use tessera::ids::{NodeId, RegionId};

use super::cli::cli;
use super::tls::wait_led_tls;
use super::*;

struct Setup {
    eps: Vec<String>,
    ep: String,
    ca: String,
    op_cert: String,
    op_key: String,
    anonymous: TlsOptions,
    operator: TlsOptions,
}

impl Setup {
    /// Runs the CLI as the operator (certificate of the cluster CA); fails the test unless
    /// it succeeds.
    fn admin(&self, args: &[&str]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.extend([
            "-e",
            &self.ep,
            "--cacert",
            &self.ca,
            "--cert",
            &self.op_cert,
            "--key",
            &self.op_key,
        ]);
        let (code, out, err) = cli(&all);
        assert_eq!(code, 0, "tessera {args:?}: {out} {err}");
        out
    }

    /// Runs the CLI as `user` (TLS without a certificate): (exit code, stdout, stderr).
    fn as_user(&self, user: &str, args: &[&str]) -> (i32, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-e", &self.ep, "--cacert", &self.ca, "--user", user]);
        cli(&all)
    }

    /// Runs the CLI as root (its token); fails the test unless it succeeds.
    fn root(&self, args: &[&str]) -> String {
        let (code, out, err) = self.as_user("root:root-pw", args);
        assert_eq!(code, 0, "tessera {args:?} as root: {out} {err}");
        out
    }

    async fn client(
        &self,
        user: &str,
        password: &str,
        multiplex: bool,
    ) -> tessera::client::Result<Client> {
        Client::connect(
            &self.eps,
            ClientOptions {
                tls: Some(self.anonymous.clone()),
                credentials: Some(Credentials {
                    user: user.into(),
                    password: password.into(),
                }),
                multiplex,
                ..Default::default()
            },
        )
        .await
    }

    async fn operator(&self) -> Client {
        Client::connect(
            &self.eps,
            ClientOptions {
                tls: Some(self.operator.clone()),
                ..Default::default()
            },
        )
        .await
        .expect("operator client")
    }
}

fn path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

/// A 3-node TLS cluster with users root (role root) and alice (role app: readwrite on
/// `/app/`), and authentication on.
async fn start(
    dir: &Path,
    tweak: impl Fn(&mut tessera::config::Config),
) -> (Vec<common::Proc>, Setup) {
    let (procs, s) = start_off(dir, tweak).await;
    s.enable().await;
    (procs, s)
}

/// The same cluster and users, authentication still off.
async fn start_off(
    dir: &Path,
    tweak: impl Fn(&mut tessera::config::Config),
) -> (Vec<common::Proc>, Setup) {
    let certs = common::tls_certs(&dir.join("certs"), 3);
    let procs = start_process_cluster(dir, 3, 2, |c| {
        certs.configure(c);
        tweak(c);
    });
    let eps = endpoints(&procs);
    let anonymous = TlsOptions::from_files(&certs.ca_file, None, None).expect("CA");
    wait_led_tls(&eps, &certs.operator, 2 + common::SYSTEM_REGIONS as u64).await;
    let s = Setup {
        ep: eps.join(","),
        eps,
        ca: path(&certs.ca_file),
        op_cert: path(&dir.join("certs/operator.crt")),
        op_key: path(&dir.join("certs/operator.key")),
        anonymous,
        operator: certs.operator.clone(),
    };
    s.admin(&["user", "add", "root:root-pw"]);
    s.admin(&["user", "grant-role", "root", "root"]);
    s.admin(&["role", "add", "app"]);
    s.admin(&[
        "role",
        "grant-permission",
        "app",
        "readwrite",
        "/app/",
        "--prefix",
    ]);
    s.admin(&["user", "add", "alice:alice-pw"]);
    s.admin(&["user", "grant-role", "alice", "app"]);
    let users = s.admin(&["user", "list", "--json"]);
    assert!(
        users.contains(r#"{"name":"alice","roles":["app"]}"#),
        "{users}"
    );
    let op = s.operator().await;
    op.put(b"/other/x", b"orig").await.expect("seed /other/x");
    (procs, s)
}

impl Setup {
    /// Turns authentication on; returns once every node refuses callers without a token.
    async fn enable(&self) {
        let s = self;
        s.admin(&["auth", "enable"]);
        assert!(s.admin(&["auth", "status"]).contains("authentication on"));
        // Every node learns of it within its refresh interval.
        for ep in &s.eps {
            let deadline = Instant::now() + Duration::from_secs(10);
            let ch = tessera::client::tls::endpoint(ep, Some(&s.anonymous))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            loop {
                let r = tessera::proto::node_client::NodeClient::new(ch.clone())
                    .list_nodes(tessera::proto::ListNodesRequest {})
                    .await;
                match r {
                    Err(e) if e.code() == tonic::Code::Unauthenticated => break,
                    _ => assert!(
                        Instant::now() < deadline,
                        "{ep} never turned authentication on"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Streams opened while authentication was off — a command stream and a watch, by a
/// client without a login — are refused once it is on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_opened_before_authentication_are_refused_once_it_is_on() {
    let dir = common::test_dir("streams_opened_before_authentication_are_refused");
    let (_procs, s) = start_off(dir.path(), |_| {}).await;
    let anonymous = Client::connect(
        &s.eps,
        ClientOptions {
            tls: Some(s.anonymous.clone()),
            ..Default::default()
        },
    )
    .await
    .expect("a client without a login, authentication off");
    anonymous.put(b"/app/a", b"1").await.expect("put");
    anonymous.get(b"/app/a").await.expect("get");
    let mut watch = anonymous
        .watch_prefix(b"/app/", WatchOptions::default())
        .await
        .expect("watch");
    s.enable().await;
    let started = Instant::now();
    loop {
        match anonymous.get(b"/app/a").await {
            Err(Error::Unauthenticated(_)) => break,
            Ok(_) => assert!(
                started.elapsed() < Duration::from_secs(10),
                "a command stream opened before authentication still serves"
            ),
            Err(e) => panic!("the anonymous get: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let op = s.operator().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            op.put(b"/app/b", b"x").await.expect("operator put");
            match tokio::time::timeout(Duration::from_millis(500), watch.next()).await {
                Ok(Some(Ok(_))) | Err(_) => {}
                Ok(Some(Err(e))) => return Some(e),
                Ok(None) => return None,
            }
        }
    })
    .await
    .expect("the watch ended within 10 s");
    assert!(
        matches!(ended, Some(Error::Unauthenticated(_))),
        "the watch opened before authentication: {ended:?}"
    );
}

/// Every kind of call alice makes outside `/app/`: each must fail with `PermissionDenied`.
async fn refused_outside(alice: &Client, lease_elsewhere: u64) -> Vec<(String, Error)> {
    let mut refused: Vec<(String, tessera::client::Result<()>)> = vec![
        ("get".into(), alice.get(b"/other/x").await.map(|_| ())),
        (
            "put".into(),
            alice.put(b"/other/x", b"evil").await.map(|_| ()),
        ),
        (
            "put of a new key".into(),
            alice.put(b"/other/new", b"evil").await.map(|_| ()),
        ),
        ("delete".into(), alice.delete(b"/other/x").await.map(|_| ())),
        (
            "cas".into(),
            alice
                .cas(
                    b"/other/x",
                    Compare::Version(1),
                    CasAction::Put(b"evil".to_vec()),
                )
                .await
                .map(|_| ()),
        ),
        (
            "scan".into(),
            alice.scan(b"/other/", b"/other0", 0).await.map(|_| ()),
        ),
        (
            "scan of everything".into(),
            alice.scan(b"", b"", 0).await.map(|_| ()),
        ),
        (
            "scan from inside to outside".into(),
            alice.scan(b"/app/", b"/other0", 0).await.map(|_| ()),
        ),
        (
            "batch get".into(),
            alice
                .batch_get(&[b"/app/a".to_vec(), b"/other/x".to_vec()])
                .await
                .map(|_| ()),
        ),
        (
            "batch write".into(),
            alice
                .batch_write(&[
                    (b"/app/b".to_vec(), Some(b"1".to_vec())),
                    (b"/other/x".to_vec(), Some(b"evil".to_vec())),
                ])
                .await,
        ),
        (
            "lease revoke".into(),
            alice.lease_revoke(lease_elsewhere).await,
        ),
        ("split".into(), alice.split(b"/other/m").await.map(|_| ())),
        (
            "leader transfer".into(),
            alice.transfer_leader(RegionId(1), NodeId(2)).await,
        ),
        ("node removal".into(), alice.remove_node(NodeId(3)).await),
        ("compaction".into(), alice.compact(1).await.map(|_| ())),
        (
            "alarm disarm".into(),
            alice.disarm_alarms(None).await.map(|_| ()),
        ),
        (
            "user add".into(),
            alice
                .auth_change(tessera::proto::auth_change_request::Op::UserAdd(
                    tessera::proto::UserPassword {
                        name: "mallory".into(),
                        password: "x".into(),
                    },
                ))
                .await,
        ),
        (
            "role grant".into(),
            alice
                .auth_change(tessera::proto::auth_change_request::Op::UserGrantRole(
                    tessera::proto::UserRole {
                        user: "alice".into(),
                        role: "root".into(),
                    },
                ))
                .await,
        ),
        ("auth show".into(), alice.auth_show().await.map(|_| ())),
    ];
    let (lease, _) = alice
        .lease_grant(Duration::from_secs(60))
        .await
        .expect("lease grant");
    refused.push((
        "put with a lease".into(),
        alice
            .put_with_lease(b"/other/leased", b"evil", lease)
            .await
            .map(|_| ()),
    ));
    let watch = match alice
        .watch_prefix(b"/other/", WatchOptions::default())
        .await
    {
        Err(e) => Err(e),
        Ok(mut w) => match tokio::time::timeout(Duration::from_secs(10), w.next()).await {
            Ok(Some(Err(e))) => Err(e),
            other => panic!("a watch outside /app/ was not refused: {other:?}"),
        },
    };
    refused.push(("watch".into(), watch));
    refused
        .into_iter()
        .map(|(what, r)| match r {
            Ok(()) => panic!("alice's {what} outside /app/ succeeded"),
            Err(e) => (what, e),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_outside_a_users_permissions_is_refused_and_changes_nothing() {
    let dir = common::test_dir("every_call_outside_a_users_permissions_is_refused");
    let (mut procs, s) = start(dir.path(), |_| {}).await;
    let op = s.operator().await;
    // A lease of root's holding a key outside /app/.
    let (lease, _) = op
        .lease_grant(Duration::from_secs(120))
        .await
        .expect("lease");
    op.put_with_lease(b"/other/held", b"root's", lease)
        .await
        .expect("put with lease");

    // No token, a wrong password, an unknown user: refused before anything runs.
    let anonymous = Client::connect(
        &s.eps,
        ClientOptions {
            tls: Some(s.anonymous.clone()),
            deadline: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .await;
    match anonymous {
        Err(Error::Unauthenticated(why)) => assert!(why.contains("--user"), "{why}"),
        Err(e) => panic!("a caller without a token: {e}"),
        Ok(c) => panic!(
            "a caller without a token connected; get: {:?}",
            c.get(b"/app/a").await
        ),
    }
    for (user, password) in [("alice", "wrong"), ("nobody", "alice-pw")] {
        match s.client(user, password, true).await {
            Err(Error::Unauthenticated(why)) => assert!(why.contains("wrong"), "{why}"),
            Err(e) => panic!("{user}/{password}: {e}"),
            Ok(_) => panic!("{user} logged in with {password}"),
        }
    }
    let (code, _, err) = s.as_user("alice:wrong", &["kv", "get", "/app/a"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unauthenticated"), "{err}");

    for multiplex in [true, false] {
        let alice = s
            .client("alice", "alice-pw", multiplex)
            .await
            .expect("alice logs in");
        // Inside her prefix: everything works.
        alice.put(b"/app/a", b"1").await.expect("put in /app/");
        assert_eq!(alice.get(b"/app/a").await.unwrap().unwrap().value, b"1");
        assert_eq!(alice.scan(b"/app/", b"/app0", 0).await.unwrap().len(), 1);
        // Outside: refused, each with PermissionDenied naming what was refused.
        for (what, e) in refused_outside(&alice, lease).await {
            eprintln!("alice's {what} (multiplex {multiplex}): {e}");
            match &e {
                Error::PermissionDenied(_) => {}
                other => panic!("alice's {what}: {other:?}"),
            }
        }
    }

    // Nothing changed: the operator sees /other/ as it was, and the users as they were.
    let kvs = op
        .scan(b"/other/", b"/other0", 0)
        .await
        .expect("operator scan");
    let keys: Vec<&[u8]> = kvs.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [&b"/other/held"[..], b"/other/x"], "{kvs:?}");
    assert_eq!(kvs[1].value, b"orig");
    assert_eq!(kvs[1].version, 1);
    let users = s.admin(&["user", "list"]);
    assert!(!users.contains("mallory"), "{users}");
    assert!(users.contains("alice\tapp\n"), "{users}");
    assert!(op.lease_time_to_live(lease, false).await.expect("ttl").ttl > Duration::ZERO);

    // Write-only: puts and deletes work, but do not show the old value.
    s.root(&["role", "add", "writer"]);
    let (code, _, err) = s.as_user(
        "root:root-pw",
        &[
            "role",
            "grant-permission",
            "writer",
            "write",
            "/wo/",
            "--prefix",
        ],
    );
    assert_eq!(code, 0, "root grants through its token: {err}");
    s.root(&["user", "add", "bob:bob-pw"]);
    s.root(&["user", "grant-role", "bob", "writer"]);
    op.put(b"/wo/k", b"secret").await.expect("seed /wo/k");
    let bob = s.client("bob", "bob-pw", true).await.expect("bob logs in");
    let w = bob.put(b"/wo/k", b"new").await.expect("bob writes");
    assert!(
        w.prev.is_none(),
        "a write-only user saw the old value: {w:?}"
    );
    assert!(matches!(
        bob.get(b"/wo/k").await,
        Err(Error::PermissionDenied(_))
    ));
    // A permission taken back applies to bob's open stream within the refresh interval.
    s.root(&["role", "revoke-permission", "writer", "/wo/", "--prefix"]);
    let started = Instant::now();
    while bob.put(b"/wo/k", b"newer").await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "bob still writes after the revocation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        bob.put(b"/wo/k", b"newest").await,
        Err(Error::PermissionDenied(_))
    ));

    // The CLI as a user types it: inside works, outside is refused with exit status 2.
    let (code, out, err) = s.as_user("alice:alice-pw", &["kv", "get", "/app/a"]);
    assert_eq!((code, out.trim()), (0, "1"), "{err}");
    let (code, _, err) = s.as_user("alice:alice-pw", &["kv", "put", "/other/x", "evil"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("permission denied") && err.contains("/other/x"),
        "{err}"
    );

    // The state is in raft: after kill -9 of every node, still on, still the same users.
    for p in procs.iter_mut() {
        p.kill9();
    }
    for (i, p) in procs.iter_mut().enumerate() {
        p.restart(&dir.path().join(format!("node{}.restart.log", i + 1)));
    }
    wait_led_tls(&s.eps, &s.operator, 2 + common::SYSTEM_REGIONS as u64).await;
    let alice = s
        .client("alice", "alice-pw", true)
        .await
        .expect("alice after restart");
    assert_eq!(alice.get(b"/app/a").await.unwrap().unwrap().value, b"1");
    assert!(matches!(
        alice.get(b"/other/x").await,
        Err(Error::PermissionDenied(_))
    ));
    let (code, _, err) = cli(&["kv", "get", "/app/a", "-e", &s.ep, "--cacert", &s.ca]);
    assert_eq!(code, 2, "a caller without a token after the restart");
    assert!(err.contains("unauthenticated"), "{err}");
    assert_eq!(op.get(b"/other/x").await.unwrap().unwrap().value, b"orig");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_permissions_end_open_streams_and_tokens_expire() {
    let dir = common::test_dir("revoked_permissions_end_open_streams_and_tokens_expire");
    let (_procs, s) = start(dir.path(), |c| c.security.token_ttl_secs = 10).await;
    let op = s.operator().await;
    let alice = s
        .client("alice", "alice-pw", true)
        .await
        .expect("alice logs in");
    alice.put(b"/app/a", b"1").await.expect("put");
    let mut watch = alice
        .watch_prefix(b"/app/", WatchOptions::default())
        .await
        .expect("watch /app/");
    op.put(b"/app/b", b"2").await.expect("operator put");
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event within 10 s")
        .expect("the watch goes on")
        .expect("no error");
    assert_eq!(first.events[0].kv.key, b"/app/b");

    // A raw token, for the expiry check below.
    let ch = tessera::client::tls::endpoint(&s.eps[0], Some(&s.anonymous))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let token = tessera::proto::auth_client::AuthClient::new(ch.clone())
        .authenticate(tessera::proto::AuthenticateRequest {
            name: "alice".into(),
            password: "alice-pw".into(),
        })
        .await
        .expect("login")
        .into_inner();
    assert_eq!(token.ttl_secs, 10);
    let raw_get = |token: String| {
        let ch = ch.clone();
        async move {
            let mut req = tonic::Request::new(tessera::proto::LocateKeyRequest {
                key: b"/app/a".to_vec(),
            });
            req.metadata_mut()
                .insert("authorization", token.parse().expect("ascii"));
            tessera::proto::node_client::NodeClient::new(ch)
                .locate_key(req)
                .await
        }
    };
    raw_get(token.token.clone())
        .await
        .expect("a fresh token works");

    // Take alice's role: her open command stream and her watch lose it.
    let started = Instant::now();
    s.root(&["user", "revoke-role", "alice", "app"]);
    loop {
        match alice.get(b"/app/a").await {
            Err(Error::PermissionDenied(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("alice's get after the revocation: {e}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the revocation never reached alice's stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "revocation effective on an open stream after {:?}",
        started.elapsed()
    );
    op.put(b"/app/c", b"3").await.expect("operator put");
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch.next().await {
                Some(Ok(_)) => op.put(b"/app/c", b"again").await.map(|_| ()).expect("put"),
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the watch ended within 10 s");
    assert!(
        matches!(ended, Some(Error::PermissionDenied(_))),
        "the watch after the revocation: {ended:?}"
    );

    // Tokens expire; the client logs in again before its do.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let expired = raw_get(token.token).await.expect_err("an expired token");
    assert_eq!(expired.code(), tonic::Code::Unauthenticated);
    assert!(expired.message().contains("expired"), "{expired:?}");
    let rev = alice
        .current_revision()
        .await
        .expect("alice's client renewed its token");
    assert!(rev > 0);

    // A password change ends every token issued before it.
    let ch0 = tessera::client::tls::endpoint(&s.eps[1], Some(&s.anonymous))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let before = tessera::proto::auth_client::AuthClient::new(ch0)
        .authenticate(tessera::proto::AuthenticateRequest {
            name: "alice".into(),
            password: "alice-pw".into(),
        })
        .await
        .expect("login")
        .into_inner()
        .token;
    s.root(&["user", "passwd", "alice:new-pw"]);
    let started = Instant::now();
    loop {
        match raw_get(before.clone()).await {
            Err(e) if e.code() == tonic::Code::Unauthenticated => break,
            Ok(_) => {}
            Err(e) => panic!("the old token after the password change: {e:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the old token still works"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(
        s.client("alice", "alice-pw", true).await,
        Err(Error::Unauthenticated(_))
    ));
    s.client("alice", "new-pw", true)
        .await
        .expect("the new password");
}
