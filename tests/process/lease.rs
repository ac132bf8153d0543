//! Leader lease reads at the edge: a cut-off leader serves from its lease, then stops.

use super::*;

/// A linearizable read of `key` sent to `addr` only: the value, or why not.
async fn read_at(
    addr: &str,
    region: &tessera::proto::Region,
    key: &[u8],
    wait: Duration,
) -> Result<Option<Vec<u8>>, String> {
    common::get_at(addr, region, key, true, wait)
        .await
        .map(|kv| kv.map(|kv| kv.value))
}

/// A put of `key` sent to `addr` only: whether that node took it.
async fn put_at(addr: &str, region: &tessera::proto::Region, key: &[u8], value: &[u8]) -> bool {
    use tessera::proto::kv_client::KvClient;
    use tessera::proto::{PutRequest, RequestHeader};
    let call = async {
        let mut kv = KvClient::connect(format!("http://{addr}")).await.ok()?;
        let r = kv
            .put(PutRequest {
                header: Some(RequestHeader {
                    region_id: region.id,
                    region_epoch: region.epoch,
                    ..Default::default()
                }),
                key: key.to_vec(),
                value: value.to_vec(),
                lease: 0,
            })
            .await
            .ok()?
            .into_inner();
        Some(r.region_error.is_none())
    };
    tokio::time::timeout(Duration::from_secs(1), call)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Leader lease reads. A leader cut off from its followers still serves linearizable reads
/// from its lease for a moment (no quorum could confirm a ReadIndex round). Then it is
/// frozen (SIGSTOP, so it cannot step down), the others elect a leader and overwrite the
/// key, and it is resumed, still cut off and still believing it leads: the read it finds
/// waiting must not be served from the lease — the lease ended before the others could
/// elect (a lease as long as the election timeout fails here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_leader_serves_from_its_lease_then_stops() {
    let dir = common::test_dir("a_cut_off_leader_serves_from_its_lease_then_stops");
    // Election timeout 2 s, lease 1.9 s: long enough that the first part does not depend
    // on the machine answering within a few hundred milliseconds.
    let mut procs = start_process_cluster(dir.path(), 3, 1, |c| {
        c.raft.election_ticks = 40;
        c.raft.hibernate_regions = false;
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 2, Duration::from_secs(90)).await;
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    let key = b"lease/k".to_vec();
    client.put(&key, b"old").await.unwrap();

    let info = node_regions(&addrs[0])
        .await
        .unwrap()
        .into_iter()
        .find(|i| {
            i.region
                .as_ref()
                .is_some_and(|r| tessera::storage::keys::in_range(&key, &r.start_key, &r.end_key))
        })
        .expect("the key's region");
    let region = info.region.unwrap();
    let leader = info.leader.expect("a leader").node_id as usize;
    let old = addrs[leader - 1].clone();
    let others: Vec<usize> = (1..=3).filter(|n| *n != leader).collect();
    assert_eq!(
        read_at(&old, &region, &key, Duration::from_secs(5)).await,
        Ok(Some(b"old".to_vec()))
    );
    // A fresh write renews the lease just before the cut.
    client.put(&key, b"old").await.unwrap();

    let cut_at = Instant::now();
    for &n in &others {
        common::set_link(&old, n as u64, "drop").await;
        common::set_link(&addrs[n - 1], leader as u64, "drop").await;
    }
    let served = read_at(&old, &region, &key, Duration::from_millis(800)).await;
    if cut_at.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            served,
            Ok(Some(b"old".to_vec())),
            "the cut-off leader should still hold its lease"
        );
    } else {
        eprintln!(
            "machine too slow to check the lease part: {:?}",
            cut_at.elapsed()
        );
    }
    let signal = |sig: &str| procs[leader - 1].signal(sig);
    signal("STOP");

    // The other two elect a leader and take a write.
    let deadline = Instant::now() + Duration::from_secs(60);
    'written: loop {
        for &n in &others {
            if put_at(&addrs[n - 1], &region, &key, b"new").await {
                break 'written;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the majority never took the write"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new_written = cut_at.elapsed();
    // A read waits for the frozen old leader; it runs once the process resumes.
    let waiting = {
        let (old, region, key) = (old.clone(), region.clone(), key.clone());
        tokio::spawn(async move { read_at(&old, &region, &key, Duration::from_secs(3)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal("CONT");
    let r = waiting.await.unwrap();
    assert_ne!(
        r,
        Ok(Some(b"old".to_vec())),
        "stale read from the old leader {new_written:?} after the cut"
    );
    assert!(r.is_err(), "the cut-off old leader answered {r:?}");
    eprintln!(
        "cut-off leader served from its lease; the majority wrote {new_written:?} after the \
         cut; the resumed old leader answered {r:?}"
    );

    // Healed, every node agrees on the new value.
    for &n in &others {
        common::set_link(&old, n as u64, "").await;
        common::set_link(&addrs[n - 1], leader as u64, "").await;
    }
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(client.get(&key).await.unwrap().unwrap().value, b"new");
    for p in procs.iter_mut() {
        p.kill9();
    }
}
