//! Authentication on a cluster without TLS: users and roles can be prepared, but turning
//! authentication on is refused (a node without TLS cannot tell peers from clients), and
//! nothing changes for the clients.

use tessera::client::{Credentials, Error};
use tessera::proto::auth_change_request::Op;
use tessera::proto::{UserPassword, UserRole};

use super::common::TestCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_is_refused_without_tls() {
    let cluster = TestCluster::start_led(3, 2, |c| c.security.password_iterations = 1_000).await;
    let client = cluster.client().await;
    for op in [
        Op::UserAdd(UserPassword {
            name: "root".into(),
            password: "pw".into(),
        }),
        Op::UserGrantRole(UserRole {
            user: "root".into(),
            role: "root".into(),
        }),
    ] {
        client.auth_change(op).await.expect("users can be prepared");
    }
    // Bad changes get clear errors.
    let bad = client
        .auth_change(Op::UserAdd(UserPassword {
            name: "root".into(),
            password: "again".into(),
        }))
        .await;
    assert!(
        matches!(&bad, Err(Error::Refused(m)) if m.contains("already exists")),
        "{bad:?}"
    );
    let bad = client
        .auth_change(Op::UserAdd(UserPassword {
            name: "no spaces".into(),
            password: "pw".into(),
        }))
        .await;
    assert!(
        matches!(&bad, Err(Error::InvalidArgument(m)) if m.contains("must be 1 to 64")),
        "{bad:?}"
    );
    let refused = client.auth_change(Op::Enable(true)).await;
    match &refused {
        Err(Error::Refused(m)) => assert!(m.contains("TLS"), "{m}"),
        other => panic!("authentication turned on without TLS: {other:?}"),
    }
    let shown = client.auth_show().await.expect("show");
    assert!(!shown.enabled);
    assert_eq!(shown.users.len(), 1);
    // Clients without a login, and with one, keep working.
    client
        .put(b"/plain", b"1")
        .await
        .expect("put without a login");
    let opts = tessera::client::ClientOptions {
        credentials: Some(Credentials {
            user: "root".into(),
            password: "pw".into(),
        }),
        ..Default::default()
    };
    let with_login = tessera::client::Client::connect(&cluster.endpoints(), opts)
        .await
        .expect("credentials given to a cluster with authentication off");
    assert_eq!(
        with_login.get(b"/plain").await.unwrap().unwrap().value,
        b"1"
    );
    cluster.shutdown().await;
}
