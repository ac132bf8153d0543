//! Exactly-once writes over the wire (write ids, records kept across restarts and splits),
//! and batch reads that see one point in time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera::proto::kv_client::KvClient;
use tessera::proto::{
    cas_request, compare, region_error, CasRequest, Compare, PutRequest, Region, RequestHeader,
    WriteId,
};

use super::common::{wait_for_leaders, TestCluster};

/// Sends one put with `write_id` to whichever node leads `region`'s key (no client library,
/// no retry). Returns the answer's revision, or the region error.
async fn raw_put(
    eps: &[String],
    region: &Region,
    key: &[u8],
    value: &[u8],
    write_id: WriteId,
) -> Result<u64, region_error::Error> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut last = None;
        for a in eps {
            let Ok(mut kv) = KvClient::connect(format!("http://{a}")).await else {
                continue;
            };
            let r = kv
                .put(PutRequest {
                    header: Some(RequestHeader {
                        region_id: region.id,
                        region_epoch: region.epoch,
                        write_id: Some(write_id),
                        ..Default::default()
                    }),
                    key: key.to_vec(),
                    value: value.to_vec(),
                    lease: 0,
                })
                .await;
            match r.map(|r| r.into_inner()) {
                Ok(r) => match r.region_error.and_then(|e| e.error) {
                    None => return Ok(r.revision),
                    // Not the leader, or (just after a split) not hosting the new region
                    // yet: another node, or a later try, will take it.
                    Some(region_error::Error::NotLeader(_))
                    | Some(region_error::Error::RegionNotFound(_)) => {}
                    Some(e) => last = Some(e),
                },
                Err(s) => panic!("put failed: {s}"),
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        assert!(Instant::now() < deadline, "no leader answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn region_of(client: &tessera::client::Client, key: &[u8]) -> Region {
    client
        .routes()
        .await
        .expect("routes")
        .into_iter()
        .filter_map(|r| r.region)
        .find(|r| tessera::storage::keys::in_range(key, &r.start_key, &r.end_key))
        .expect("a region holds the key")
}

/// A write sent again with its id is answered with its first answer and applied once —
/// after the node restarts, and after a split, from either half; a copy below the client's
/// `first_incomplete` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sent_twice_applies_once() {
    let mut cluster = TestCluster::start(3, 1, |_| {}).await;
    let eps = cluster.endpoints();
    wait_for_leaders(&eps, 2, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    let key = b"/once/a";
    let region = region_of(&client, key).await;
    let id = |seq, first_incomplete| WriteId {
        client_id: 0xC0FFEE,
        seq,
        first_incomplete,
    };

    let first = raw_put(&eps, &region, key, b"1", id(1, 1)).await.unwrap();
    let again = raw_put(&eps, &region, key, b"1", id(1, 1)).await.unwrap();
    assert_eq!(again, first, "the retry gets the first answer");
    let kv = client.get(key).await.unwrap().unwrap();
    assert_eq!((kv.version, kv.mod_revision), (1, first));

    // Kept on disk: after every node restarts, still answered from the records.
    for i in 0..3 {
        cluster.stop(i).await;
    }
    for i in 0..3 {
        cluster.restart(i).await;
    }
    wait_for_leaders(&eps, 2, Duration::from_secs(60)).await;
    let after_restart = raw_put(&eps, &region, key, b"1", id(1, 1)).await.unwrap();
    assert_eq!(after_restart, first);

    // Split between the key and the region's start: the key moves to the new region,
    // which starts with a copy of the records.
    let client = cluster.client().await;
    let halves = client.split(b"/once/").await.expect("split");
    assert_eq!(halves.len(), 2);
    let right = halves
        .iter()
        .find(|r| tessera::storage::keys::in_range(key, &r.start_key, &r.end_key))
        .expect("a half holds the key")
        .clone();
    assert_ne!(right.id, region.id, "the key is in the new region");
    let after_split = raw_put(&eps, &right, key, b"1", id(1, 1)).await.unwrap();
    assert_eq!(after_split, first);
    let kv = client.get(key).await.unwrap().unwrap();
    assert_eq!(kv.version, 1, "applied once in all");

    // The client moves on: write 2 says every write below 2 is finished.
    let second = raw_put(&eps, &right, key, b"2", id(2, 2)).await.unwrap();
    assert!(second > first);
    match raw_put(&eps, &right, key, b"1", id(1, 1)).await {
        Err(region_error::Error::StaleWrite(w)) => assert_eq!(w.seq, 1),
        other => panic!("a stale copy must be refused, got {other:?}"),
    }
    let kv = client.get(key).await.unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.version), (&b"2"[..], 2));

    // Malformed ids are refused before anything is proposed.
    let mut kv = KvClient::connect(format!("http://{}", eps[0]))
        .await
        .unwrap();
    for bad in [id(0, 0), id(3, 4)] {
        let r = kv
            .compare_and_swap(CasRequest {
                header: Some(RequestHeader {
                    region_id: right.id,
                    region_epoch: right.epoch,
                    write_id: Some(WriteId {
                        client_id: if bad.seq == 0 { 0 } else { 1 },
                        ..bad
                    }),
                    ..Default::default()
                }),
                key: key.to_vec(),
                compare: Some(Compare {
                    target: Some(compare::Target::Version(2)),
                }),
                action: Some(cas_request::Action::Put(b"x".to_vec())),
                lease: 0,
            })
            .await;
        assert_eq!(
            r.map(|_| ()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
    cluster.shutdown().await;
}

/// A batch read served on gRPC threads while a raft worker applies batch writes sees each
/// batch whole or not at all: both keys always carry the same value and revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_read_never_sees_half_of_a_batch_write() {
    let cluster = TestCluster::start(1, 1, |c| c.server.grpc_threads = 2).await;
    wait_for_leaders(&cluster.endpoints(), 2, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    let (a, b) = (b"/pair/a".to_vec(), b"/pair/b".to_vec());
    let pair = |i: u64| {
        let v = i.to_string().into_bytes();
        vec![(a.clone(), Some(v.clone())), (b.clone(), Some(v))]
    };
    client.batch_write(&pair(0)).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..2 {
        let (client, stop, reads) = (client.clone(), stop.clone(), reads.clone());
        let keys = vec![a.clone(), b.clone()];
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let got = client.batch_get(&keys).await.expect("batch get");
                let (x, y) = (got[0].as_ref().unwrap(), got[1].as_ref().unwrap());
                assert_eq!(
                    (&x.value, x.mod_revision),
                    (&y.value, y.mod_revision),
                    "a batch read saw half of a batch write"
                );
                reads.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let t = Instant::now();
    for i in 1..=3000u64 {
        client.batch_write(&pair(i)).await.unwrap();
        if t.elapsed() > Duration::from_secs(8) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.expect("reader");
    }
    let n = reads.load(Ordering::Relaxed);
    assert!(n > 200, "too few batch reads to mean anything: {n}");
    cluster.shutdown().await;
}
