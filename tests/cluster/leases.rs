//! Leases: keys attached to a lease go when it expires or is revoked (seen by watchers),
//! keep-alives keep it, a leader change continues it with what was left, and bad requests
//! get clear errors.

use std::time::{Duration, Instant};

use futures::StreamExt;
use tessera::client::{Client, Error, EventKind, WatchOptions};
use tessera::ids::{NodeId, RegionId};

use super::common::{key_in_region, TestCluster};

const REGIONS: u32 = 4;
/// One election timeout of the test clusters (10 ticks of 100 ms).
const ELECTION: Duration = Duration::from_secs(1);

async fn started() -> TestCluster {
    TestCluster::start_led(3, REGIONS, |_| {}).await
}

/// Keys of the lease's test, one in each user region.
fn keys(tag: &str) -> Vec<Vec<u8>> {
    (0..REGIONS)
        .map(|i| key_in_region(i, REGIONS, &format!("/lease/{tag}")))
        .collect()
}

async fn present(client: &Client, keys: &[Vec<u8>]) -> usize {
    let got = client.batch_get(keys).await.expect("batch get");
    got.iter().filter(|k| k.is_some()).count()
}

/// Polls until none of `keys` exists; returns when that was seen.
async fn wait_gone(client: &Client, keys: &[Vec<u8>], within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if present(client, keys).await == 0 {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "keys of the lease still there after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_lease_takes_its_keys_in_every_region_and_watchers_see_the_deletes() {
    let cluster = started().await;
    let client = cluster.client().await;
    let (id, ttl) = client
        .lease_grant(Duration::from_secs(2))
        .await
        .expect("grant");
    assert_eq!(ttl, Duration::from_secs(2));
    let keys = keys("expire");
    let mut watcher = client
        .watch_prefix(b"", WatchOptions::default())
        .await
        .expect("watch");
    let mut last_renewal = Instant::now();
    for k in &keys {
        client.put_with_lease(k, b"up", id).await.expect("put");
    }
    // Kept alive for a while: nothing goes.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let ttls = client.lease_renew(&[id]).await.expect("renew");
        assert_eq!(ttls, vec![Some(ttl)]);
        last_renewal = Instant::now();
    }
    assert_eq!(present(&client, &keys).await, keys.len());
    let status = client.lease_time_to_live(id, true).await.expect("ttl");
    assert_eq!(status.ttl, ttl);
    assert!(status.remaining > Duration::ZERO && status.remaining <= ttl);
    let mut attached = status.keys.clone();
    attached.sort();
    assert_eq!(attached, keys, "every attached key is listed");
    assert!(client
        .leases()
        .await
        .expect("list")
        .iter()
        .any(|l| l.id == id));

    // No more renewals: gone within the TTL plus an election timeout plus one second.
    let gone = wait_gone(&client, &keys, Duration::from_secs(10)).await;
    let took = gone - last_renewal;
    assert!(
        took <= ttl + ELECTION + Duration::from_secs(1),
        "keys went {took:?} after the last renewal"
    );
    assert!(
        took >= ttl,
        "keys went {took:?} after the last renewal, before the TTL"
    );
    assert!(matches!(
        client.lease_time_to_live(id, false).await,
        Err(Error::NotFound(_))
    ));
    // The watcher sees one put and one delete per key.
    let mut deletes = Vec::new();
    let mut puts = 0;
    while deletes.len() < keys.len() {
        let resp = tokio::time::timeout(Duration::from_secs(10), watcher.next())
            .await
            .expect("watch delivers the deletes")
            .expect("watch open")
            .expect("watch response");
        for e in resp.events {
            match e.kind {
                EventKind::Put => {
                    assert_eq!(e.kv.lease, id, "a put event carries its lease");
                    puts += 1;
                }
                EventKind::Delete => deletes.push(e.kv.key),
            }
        }
    }
    deletes.sort();
    assert_eq!((puts, deletes), (keys.len(), keys.clone()));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_alive_holds_a_lease_revoke_ends_it_and_a_put_without_it_detaches() {
    let cluster = started().await;
    let client = cluster.client().await;
    let (id, ttl) = client
        .lease_grant(Duration::from_secs(2))
        .await
        .expect("grant");
    let keys = keys("revoke");
    for k in &keys {
        client.put_with_lease(k, b"v", id).await.expect("put");
    }
    // One key is put again without the lease: it stays after the revoke.
    client.put(&keys[0], b"mine now").await.expect("put");
    let keeper = client.keep_alive(id, ttl);
    tokio::time::sleep(ttl * 3).await;
    assert!(!keeper.is_lost(), "the keep-alive lost the lease");
    assert_eq!(present(&client, &keys).await, keys.len());

    client.lease_revoke(id).await.expect("revoke");
    // Revoke returns once the keys are gone.
    let got = client.batch_get(&keys).await.expect("read");
    assert_eq!(
        got[0].as_ref().map(|kv| kv.value.clone()),
        Some(b"mine now".to_vec())
    );
    assert!(got[1..].iter().all(Option::is_none), "{got:?}");
    let mut keeper = keeper;
    let why = tokio::time::timeout(ttl * 2, keeper.lost())
        .await
        .expect("the keep-alive reports the loss");
    assert!(why.contains("expired or was revoked"), "{why}");
    // The revoked lease is gone for every operation.
    assert!(matches!(
        client.put_with_lease(b"/lease/late", b"v", id).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        client.lease_revoke(id).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(client.lease_renew(&[id]).await.expect("renew"), vec![None]);
    assert!(client.get(b"/lease/late").await.expect("get").is_none());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_lease_requests_get_clear_errors() {
    let cluster = started().await;
    let client = cluster.client().await;
    fn invalid<T>(r: Result<T, Error>) -> bool {
        matches!(r, Err(Error::InvalidArgument(_)))
    }
    assert!(invalid(client.lease_grant(Duration::ZERO).await));
    assert!(invalid(
        client
            .lease_grant(Duration::from_secs(10_000_000_000))
            .await
    ));
    assert!(invalid(
        client.lease_grant_with_id(0, Duration::from_secs(5)).await
    ));
    assert!(invalid(
        client
            .lease_grant_with_id(u64::MAX, Duration::from_secs(5))
            .await
    ));
    // Below the minimum: raised to it, as etcd does.
    let (_, ttl) = client
        .lease_grant(Duration::from_millis(10))
        .await
        .expect("grant");
    assert_eq!(ttl, tessera::client::MIN_LEASE_TTL);
    let unknown = 4242;
    assert!(matches!(
        client.lease_revoke(unknown).await,
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        client.lease_time_to_live(unknown, true).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(
        client.lease_renew(&[unknown]).await.expect("renew"),
        vec![None]
    );
    assert!(matches!(
        client.put_with_lease(b"/lease/x", b"v", unknown).await,
        Err(Error::NotFound(_))
    ));
    assert!(client.get(b"/lease/x").await.expect("get").is_none());
    client
        .lease_grant_with_id(77, Duration::from_secs(5))
        .await
        .expect("grant with an id");
    assert!(matches!(
        client.lease_grant_with_id(77, Duration::from_secs(5)).await,
        Err(Error::Refused(_))
    ));
    // Not even a system client writes the lease keyspace but through lease requests.
    let sys = super::common::system_client(&cluster.endpoints()).await;
    let record = tessera::storage::keys::lease_key(77);
    assert!(invalid(sys.put(&record, b"garbage").await));
    assert!(invalid(sys.delete(&record).await));
    assert!(client.lease_time_to_live(77, false).await.is_ok());
    cluster.shutdown().await;
}

/// The lease region's route: the region and its leader's node.
async fn lease_leader(client: &Client, id: u64) -> (RegionId, u64) {
    let key = tessera::storage::keys::lease_key(id);
    for r in client.routes().await.expect("routes") {
        let region = r.region.unwrap_or_default();
        let inside = key >= region.start_key && (region.end_key.is_empty() || key < region.end_key);
        if inside {
            if let Some(l) = r.leader {
                return (RegionId(region.id), l.node_id);
            }
        }
    }
    panic!("no led region holds lease {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_change_continues_a_lease_with_what_was_left() {
    let cluster = started().await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(60);
    let (id, _) = client.lease_grant(ttl).await.expect("grant");
    let granted = Instant::now();
    for round in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (region, leader) = lease_leader(&client, id).await;
        let to = if leader == 3 { 1 } else { leader + 1 };
        client
            .transfer_leader(region, NodeId(to))
            .await
            .expect("transfer");
        let status = client.lease_time_to_live(id, false).await.expect("ttl");
        let left = ttl.saturating_sub(granted.elapsed());
        assert!(
            status.remaining <= left + Duration::from_millis(200),
            "after change {round}: {:?} left, expected at most {left:?} + an election timeout",
            status.remaining
        );
        assert!(
            status.remaining + Duration::from_millis(200) >= left,
            "after change {round}: {:?} left, less than the {left:?} that was",
            status.remaining
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_live_on_across_a_split_of_their_region() {
    let cluster = started().await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(2);
    // Two leases at either end of the id space, each with a key.
    let (low, high) = (1u64 << 20, (1u64 << 62) + 5);
    for (id, key) in [(low, &b"/split/low"[..]), (high, &b"/split/high"[..])] {
        client.lease_grant_with_id(id, ttl).await.expect("grant");
        client.put_with_lease(key, b"v", id).await.expect("put");
    }
    // Not at a lease's record: refused. At one: the leases are in two regions now.
    let mut inside = tessera::storage::keys::lease_key(high);
    inside.push(0);
    assert!(matches!(
        client.split(&inside).await,
        Err(Error::Refused(_))
    ));
    let regions = client
        .split(&tessera::storage::keys::lease_key(high))
        .await
        .expect("split the lease region");
    assert_eq!(regions.len(), 2);
    let keeper = client.keep_alive(low, ttl);
    tokio::time::sleep(ttl * 2).await;
    // Kept: still there. Not kept: gone with its key.
    assert!(!keeper.is_lost());
    assert!(client.get(b"/split/low").await.expect("get").is_some());
    assert!(client.get(b"/split/high").await.expect("get").is_none());
    assert!(matches!(
        client.lease_time_to_live(high, false).await,
        Err(Error::NotFound(_))
    ));
    let listed: Vec<u64> = client
        .leases()
        .await
        .expect("list")
        .iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(listed, vec![low]);
    cluster.shutdown().await;
}

/// An expiry storm: `TESSERA_STORM_LEASES` (default 2,000) leases with a key each expire at
/// once while writes go on and other leases are kept alive. Every key goes, no kept lease is
/// lost; the writes' p99 during the storm is printed (a figure, docs/benchmarks.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expiry_storm_is_spread_out_and_kept_leases_survive_it() {
    let n: usize = std::env::var("TESSERA_STORM_LEASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000);
    let cluster = TestCluster::start_led(3, REGIONS, |c| {
        c.cluster.lease_regions = 2;
        c.lease.max_expiries_per_second = 2_000;
    })
    .await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(2);
    let granted = Instant::now();
    let storm: Vec<(u64, Vec<u8>)> = futures::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            async move {
                let (id, _) = client.lease_grant(ttl).await.expect("grant");
                let key = key_in_region(i as u32 % REGIONS, REGIONS, &format!("/storm/{i}"));
                client.put_with_lease(&key, b"s", id).await.expect("put");
                (id, key)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    eprintln!("storm: {n} leases with keys in {:?}", granted.elapsed());
    let mut kept = Vec::new();
    for _ in 0..20 {
        let (id, ttl) = client.lease_grant(ttl).await.expect("grant");
        kept.push(client.keep_alive(id, ttl));
    }
    // Writes through the storm, one at a time, timed.
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let until = Instant::now() + Duration::from_secs(8);
            let mut i = 0u32;
            while Instant::now() < until {
                let key = key_in_region(i % REGIONS, REGIONS, "/storm-writer");
                let t = Instant::now();
                client
                    .put(&key, b"w")
                    .await
                    .expect("write during the storm");
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        })
    };
    let keys: Vec<Vec<u8>> = storm.iter().map(|(_, k)| k.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = 0;
        for chunk in keys.chunks(500) {
            left += present(&client, chunk).await;
        }
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} keys of expired leases left"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "storm: every key gone {:?} after the grants began",
        granted.elapsed()
    );
    let mut lat = writer.await.expect("writer");
    lat.sort();
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    eprintln!(
        "storm: {} writes during it, p50 {:?} p99 {:?} max {:?}",
        lat.len(),
        p(0.5),
        p(0.99),
        lat[lat.len() - 1]
    );
    for k in &kept {
        assert!(!k.is_lost(), "a kept lease was lost in the storm");
    }
    let ids: Vec<u64> = kept.iter().map(|k| k.id).collect();
    assert!(client
        .lease_renew(&ids)
        .await
        .expect("renew")
        .iter()
        .all(Option::is_some));
    cluster.shutdown().await;
}

/// `Kv.LeaseKeepAlive`, as etcd's clients use it: one stream at any node (followers
/// forward) renews many leases; a lease that is gone answers TTL 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_keep_alive_stream_renews_many_leases_at_any_node() {
    use tessera::proto::kv_client::KvClient;
    use tessera::proto::LeaseKeepAliveRequest;
    let cluster = started().await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(2);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(client.lease_grant(ttl).await.expect("grant").0);
    }
    for addr in cluster.endpoints() {
        let mut kv = KvClient::connect(format!("http://{addr}"))
            .await
            .expect("connect");
        // Three rounds a third of the TTL apart, plus an unknown lease: the leases live on.
        for _ in 0..3 {
            let reqs: Vec<LeaseKeepAliveRequest> = ids
                .iter()
                .chain([&4242u64])
                .map(|id| LeaseKeepAliveRequest { id: *id })
                .collect();
            let mut answers = kv
                .lease_keep_alive(futures::stream::iter(reqs))
                .await
                .expect("stream")
                .into_inner();
            let mut got = Vec::new();
            while let Some(a) = answers.message().await.expect("answer") {
                assert!(a.error.is_empty(), "{}: {}", addr, a.error);
                got.push((a.id, a.ttl_ms));
            }
            let mut want: Vec<(u64, u64)> = ids.iter().map(|id| (*id, 2000)).collect();
            want.push((4242, 0));
            assert_eq!(got, want, "at {addr}");
            tokio::time::sleep(ttl / 3).await;
        }
    }
    // Renewed through every node for three TTLs: still alive.
    let ttls = client.lease_renew(&ids).await.expect("renew");
    assert!(ttls.iter().all(Option::is_some), "{ttls:?}");
    cluster.shutdown().await;
}

/// A keep-alive that can no longer reach the cluster tells its holder the lease is lost
/// within the TTL of the last successful renewal — before the cluster could have expired
/// it and handed the holder's lock to another — not when some call finally times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_keep_alive_reports_the_loss_within_the_ttl() {
    let mut cluster = started().await;
    let client = cluster.client().await;
    let ttl = Duration::from_secs(2);
    let asked = Instant::now();
    let (id, ttl) = client.lease_grant(ttl).await.expect("grant");
    let mut keeper = client.keep_alive_since(id, ttl, asked);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!keeper.is_lost());
    for i in 0..3 {
        cluster.stop(i).await;
    }
    let stopped = Instant::now();
    let why = tokio::time::timeout(Duration::from_secs(10), keeper.lost())
        .await
        .expect("the loss is reported");
    // The last renewal was sent at most a third of the TTL (plus a tick) before the stop.
    let took = stopped.elapsed();
    assert!(
        took <= ttl + Duration::from_millis(300),
        "told after {took:?}: {why}"
    );
    assert!(why.contains("not renewed for its TTL"), "{why}");
}
