//! A leader transfer carried out late must not elect a leader beside one holding a lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera::client::{Client, ClientOptions};
use tessera::ids::{NodeId, RegionId};
use tessera::proto::kv_client::KvClient;
use tessera::proto::{GetRequest, PutRequest, Region, RequestHeader};

use super::common::{self, node_regions, start_process_cluster, wait_for_leaders};
use super::{endpoints, wait_serving};

/// A read at the old leader: when it was sent, when answered, the value.
type Read = (Instant, Instant, Vec<u8>);

fn header(region: &Region) -> Option<RequestHeader> {
    Some(RequestHeader {
        region_id: region.id,
        region_epoch: region.epoch,
        ..Default::default()
    })
}

/// The transfer target is paused (SIGSTOP) when the leader sends it `MsgTimeoutNow`, which
/// waits in its socket: the leader abandons the transfer after an election timeout and,
/// lease reads flowing, renews its lease through the third node. When the target resumes
/// 3 s later it steps the message and forces an election, which the third node grants
/// despite its timer if its log is no longer than the target's (an idle region). A write the
/// new leader acknowledges must not be missed by a read the old leader serves from its
/// lease after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_transfer_does_not_elect_beside_a_lease() {
    let dir = common::test_dir("a_late_transfer_does_not_elect_beside_a_lease");
    let procs = start_process_cluster(dir.path(), 3, 1, |c| {
        c.raft.hibernate_regions = false;
        // Only this test moves leaders.
        c.placement.schedule = false;
    });
    let addrs = endpoints(&procs);
    wait_serving(&addrs).await;
    wait_for_leaders(&addrs, 2, Duration::from_secs(90)).await;
    let key = b"late/k".to_vec();
    let client = Client::connect(&addrs, ClientOptions::default())
        .await
        .unwrap();
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
    let l = info.leader.expect("a leader").node_id as usize;
    let t = (1..=3).find(|n| *n != l).unwrap();

    // Reads at the leader, all the time: (sent, answered, value).
    let reads: Arc<Mutex<Vec<Read>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (reads, stop, region, key) = (reads.clone(), stop.clone(), region.clone(), key.clone());
        let mut kv = KvClient::connect(format!("http://{}", addrs[l - 1]))
            .await
            .unwrap();
        tokio::spawn(async move {
            let t0 = Instant::now();
            while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
                let sent = Instant::now();
                let r = kv
                    .get(GetRequest {
                        revision: 0,
                        header: header(&region),
                        key: key.clone(),
                    })
                    .await;
                if let Ok(r) = r.map(|r| r.into_inner()) {
                    if let (None, Some(v)) = (r.region_error, r.kv) {
                        reads.lock().unwrap().push((sent, Instant::now(), v.value));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // T's answers never reach L: L learns of T's new term only through F. L starts the
    // transfer only while T counts as active (it answered within the last election
    // timeout); if L's quorum check runs between T's last answer and the request, the
    // request is refused as busy: resume T and try again.
    let mut started = false;
    for _ in 0..5 {
        common::set_link(&addrs[t - 1], l as u64, "drop").await;
        procs[t - 1].signal("STOP");
        let ask = client.request_transfer_leader(RegionId(region.id), NodeId(t as u64));
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(2), ask).await {
            started = true;
            break;
        }
        procs[t - 1].signal("CONT");
        common::set_link(&addrs[t - 1], l as u64, "").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(started, "the leader never started the transfer");
    // The transfer is abandoned after an election timeout (0.5 s); the lease may come back
    // two election timeouts later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    procs[t - 1].signal("CONT");

    // Write "new" through T if it wins the late election (tried alone for 2 s, so that
    // nothing written through L lengthens the logs first), else through whoever leads.
    let resumed = Instant::now();
    let deadline = resumed + Duration::from_secs(20);
    let acked = 'written: loop {
        let only_t = resumed.elapsed() < Duration::from_secs(2);
        for n in (1..=3).filter(|n| !only_t || *n == t) {
            let mut kv = match KvClient::connect(format!("http://{}", addrs[n - 1])).await {
                Ok(kv) => kv,
                Err(_) => continue,
            };
            let put = kv.put(PutRequest {
                header: header(&region),
                key: key.clone(),
                value: b"new".to_vec(),
                lease: 0,
            });
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), put).await {
                if r.into_inner().region_error.is_none() {
                    eprintln!("the write was taken by node {n} (leader {l}, target {t})");
                    break 'written Instant::now();
                }
            }
        }
        assert!(Instant::now() < deadline, "no node took the write");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    common::set_link(&addrs[t - 1], l as u64, "").await;

    let reads = reads.lock().unwrap();
    let stale: Vec<_> = reads
        .iter()
        .filter(|(sent, _, v)| *sent > acked && v.as_slice() == b"old")
        .collect();
    let after = reads.iter().filter(|(sent, _, _)| *sent > acked).count();
    eprintln!(
        "reads at the old leader: {} in all, {after} sent after the write was acknowledged, {} stale",
        reads.len(),
        stale.len()
    );
    assert!(
        stale.is_empty(),
        "the old leader served {} stale reads after the new value was acknowledged",
        stale.len()
    );
    drop(procs);
}
