//! Structured region errors, request limits, and garbage from the network.

use std::time::Duration;

use protobuf::Message as _;
use tessera::ids::{NodeId, RegionId};
use tessera::proto::kv_client::KvClient;
use tessera::proto::node_client::NodeClient;
use tessera::proto::raft_transport_client::RaftTransportClient;
use tessera::proto::{
    self, region_error::Error as RE, GetRequest, PutRequest, RaftMessage, RaftMessageBatch,
    RegionEpoch, RequestHeader, SnapshotChunk,
};
use tokio::io::AsyncWriteExt;

use super::common::{key_in_region, node_regions, wait_for_leaders, TestCluster};

fn header(r: &proto::Region) -> Option<RequestHeader> {
    Some(RequestHeader {
        region_id: r.id,
        region_epoch: r.epoch,
        consistency: 0,
        system: false,
        write_id: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_errors_are_structured() {
    let cluster = TestCluster::start(3, 4, |_| {}).await;
    let leaders = wait_for_leaders(&cluster.endpoints(), 4, Duration::from_secs(60)).await;
    let (region_id, leader_node) = leaders[1];
    let infos = node_regions(&cluster.endpoints()[0]).await.unwrap();
    let region = infos
        .iter()
        .map(|i| i.region.clone().unwrap())
        .find(|r| r.id == region_id)
        .unwrap();
    let leader_addr = cluster.endpoints()[leader_node as usize - 1].clone();
    let follower_addr = cluster.endpoints()[leader_node as usize % 3].clone();
    let mut leader = KvClient::connect(format!("http://{leader_addr}"))
        .await
        .unwrap();
    let mut follower = KvClient::connect(format!("http://{follower_addr}"))
        .await
        .unwrap();
    let key = key_in_region(1, 4, "/e");

    let put = |h: Option<RequestHeader>, key: Vec<u8>, value: Vec<u8>| PutRequest {
        header: h,
        key,
        value,
        lease: 0,
    };

    // Not leader: the follower names the leader and its address.
    let r = follower
        .put(put(header(&region), key.clone(), b"v".to_vec()))
        .await
        .unwrap()
        .into_inner();
    match r.region_error.and_then(|e| e.error) {
        Some(RE::NotLeader(nl)) => {
            assert_eq!(nl.leader.unwrap().node_id, leader_node);
            assert_eq!(nl.leader_addr, leader_addr);
        }
        other => panic!("expected NotLeader, got {other:?}"),
    }
    // Stale epoch: the current region comes back.
    let mut stale = region.clone();
    stale.epoch = Some(RegionEpoch {
        conf_ver: 1,
        version: 0,
    });
    let r = leader
        .put(put(header(&stale), key.clone(), b"v".to_vec()))
        .await
        .unwrap()
        .into_inner();
    match r.region_error.and_then(|e| e.error) {
        Some(RE::EpochNotMatch(en)) => assert_eq!(en.current_regions, vec![region.clone()]),
        other => panic!("expected EpochNotMatch, got {other:?}"),
    }
    // Key outside the region: its range comes back.
    let outside = key_in_region(3, 4, "/e");
    let r = leader
        .put(put(header(&region), outside.clone(), b"v".to_vec()))
        .await
        .unwrap()
        .into_inner();
    match r.region_error.and_then(|e| e.error) {
        Some(RE::KeyNotInRegion(k)) => {
            assert_eq!(k.key, outside);
            assert_eq!(
                (k.start_key, k.end_key),
                (region.start_key.clone(), region.end_key.clone())
            );
        }
        other => panic!("expected KeyNotInRegion, got {other:?}"),
    }
    // Unknown region.
    let mut unknown = region.clone();
    unknown.id = 999_999;
    let r = leader
        .get(GetRequest {
            revision: 0,
            header: header(&unknown),
            key: key.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.region_error.and_then(|e| e.error),
        Some(RE::RegionNotFound(_))
    ));

    // Bad requests are InvalidArgument, never a crash.
    let big = vec![7u8; 1_048_577];
    let s = leader
        .put(put(header(&region), key.clone(), big))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s}");
    let s = leader
        .put(put(header(&region), vec![], b"v".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    let s = leader
        .put(put(None, key.clone(), b"v".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    let s = leader
        .put(put(header(&region), vec![1u8; 5000], b"v".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    let s = leader
        .compare_and_swap(proto::CasRequest {
            header: header(&region),
            key: key.clone(),
            compare: None,
            action: None,
            lease: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument);

    // A user scan may not read the system keyspace (placement data), even sent to the
    // placement region's leader.
    let placement = infos
        .iter()
        .map(|i| i.region.clone().unwrap())
        .find(|r| r.start_key == [0xFF])
        .expect("the placement region");
    for addr in cluster.endpoints() {
        let mut kv = KvClient::connect(format!("http://{addr}")).await.unwrap();
        let r = kv
            .scan(proto::ScanRequest {
                revision: 0,
                header: header(&placement),
                start_key: vec![0xFF],
                end_key: vec![],
                limit: 10,
                keys_only: false,
            })
            .await;
        match r {
            Err(s) => assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s}"),
            Ok(r) => {
                let r = r.into_inner();
                assert!(
                    r.kvs.is_empty(),
                    "{addr} served placement data to a user scan"
                );
                assert!(r.region_error.is_some(), "{addr}: {r:?}");
            }
        }
    }

    // And the right request works.
    let r = leader
        .put(put(header(&region), key.clone(), b"ok".to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert!(r.region_error.is_none());
    assert!(r.revision > 0);

    // A request refused as it stands is answered `Refused`, not "busy, retry": a transfer
    // to a node without a replica of the region...
    let r = NodeClient::connect(format!("http://{leader_addr}"))
        .await
        .unwrap()
        .transfer_leader(proto::TransferLeaderRequest {
            header: header(&region),
            to_node: 99,
        })
        .await
        .unwrap()
        .into_inner();
    match r.region_error.and_then(|e| e.error) {
        Some(RE::Refused(x)) => assert!(x.reason.contains("no peer on node 99"), "{x:?}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    // ...and through the client, which returns it rather than retrying to its deadline.
    let client = cluster.client().await;
    match client
        .move_replica(
            RegionId(region_id),
            Some(NodeId(leader_node)),
            NodeId(leader_node),
            Duration::from_secs(30),
        )
        .await
    {
        Err(tessera::client::Error::Refused(reason)) => {
            assert!(reason.contains("same"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_the_network_is_dropped_and_the_node_keeps_serving() {
    let cluster = TestCluster::start(3, 4, |_| {}).await;
    wait_for_leaders(&cluster.endpoints(), 4, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    let key = key_in_region(2, 4, "/g");
    client.put(&key, b"kept").await.unwrap();
    let target = cluster.endpoints()[0].clone();

    // Raw bytes that are not HTTP/2 at all.
    for garbage in [
        &b"\x00\x01\x02garbage\xff\xff"[..],
        &[0xffu8; 4096][..],
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(&target).await.unwrap();
        let _ = s.write_all(garbage).await;
        let _ = s.shutdown().await;
    }

    // Well-formed gRPC carrying bad batches.
    let mut raft = RaftTransportClient::connect(format!("http://{target}"))
        .await
        .unwrap();
    let mut valid = raft::eraftpb::Message::default();
    valid.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    valid.to = 1;
    valid.from = 2;
    valid.term = 1_000_000;
    let valid = valid.write_to_bytes().unwrap();
    let peer = |id, node| {
        Some(proto::Peer {
            id,
            node_id: node,
            role: 0,
        })
    };
    let msg = |region: u64, to, bytes: Vec<u8>| RaftMessage {
        region_id: region,
        from_peer: peer(2, 2),
        to_peer: to,
        region_epoch: None,
        message: bytes,
        ..Default::default()
    };
    let batches = vec![
        // Another cluster.
        RaftMessageBatch {
            cluster_id: 42,
            from_node: 2,
            to_node: 1,
            messages: vec![msg(1, peer(1, 1), valid.clone())],
        },
        // Another node.
        RaftMessageBatch {
            cluster_id: 1,
            from_node: 2,
            to_node: 9,
            messages: vec![msg(1, peer(1, 9), valid.clone())],
        },
        // Bytes that are not a raft message; no target peer; unknown region; peer mismatch.
        RaftMessageBatch {
            cluster_id: 1,
            from_node: 2,
            to_node: 1,
            messages: vec![
                msg(1, peer(1, 1), vec![0xff; 64]),
                msg(1, None, valid.clone()),
                msg(424242, peer(1, 1), valid.clone()),
                msg(1, peer(77, 1), valid.clone()),
            ],
        },
    ];
    let _ = raft.raft(futures::stream::iter(batches)).await;
    // A snapshot stream without an envelope, and one with garbage.
    let s = raft
        .snapshot(futures::stream::iter(vec![SnapshotChunk {
            envelope: None,
            data: vec![1, 2, 3],
        }]))
        .await;
    assert!(s.is_err());
    let s = raft
        .snapshot(futures::stream::iter(vec![SnapshotChunk {
            envelope: Some(RaftMessageBatch {
                cluster_id: 1,
                from_node: 2,
                to_node: 1,
                messages: vec![msg(1, peer(1, 1), vec![9; 10])],
            }),
            data: vec![0xee; 100],
        }]))
        .await;
    assert!(s.is_err());

    // The node still serves, and nothing stored was lost.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(client.get(&key).await.unwrap().unwrap().value, b"kept");
    client.put(&key, b"after").await.unwrap();
    assert_eq!(client.get(&key).await.unwrap().unwrap().value, b"after");
    assert!(super::common::node_regions(&target).await.is_some());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_stream_answers_each_command_and_survives_bad_ones() {
    use proto::kv_command::Request as Q;
    use proto::kv_command_result::Response as A;
    use proto::{KvCommand, KvCommands};

    let cluster = TestCluster::start(3, 4, |_| {}).await;
    let leaders = wait_for_leaders(&cluster.endpoints(), 4, Duration::from_secs(60)).await;
    let (region_id, leader_node) = leaders[1];
    let region = node_regions(&cluster.endpoints()[0])
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.region.unwrap())
        .find(|r| r.id == region_id)
        .unwrap();
    let leader_addr = cluster.endpoints()[leader_node as usize - 1].clone();
    let mut kv = KvClient::connect(format!("http://{leader_addr}"))
        .await
        .unwrap();
    let key = key_in_region(1, 4, "/s");
    let client = cluster.client().await;
    client.put(&key, b"before").await.unwrap();

    let put = |id, h: Option<RequestHeader>, value: Vec<u8>| KvCommand {
        id,
        request: Some(Q::Put(PutRequest {
            header: h,
            key: key.clone(),
            value,
            lease: 0,
        })),
    };
    let mut unknown = region.clone();
    unknown.id = 999_999;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = kv
        .commands(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(KvCommands {
        commands: vec![
            KvCommand {
                id: 1,
                request: None,
            },
            put(2, header(&region), vec![7u8; 1_048_577]),
            put(3, None, b"v".to_vec()),
            KvCommand {
                id: 4,
                request: Some(Q::Get(GetRequest {
                    revision: 0,
                    header: header(&unknown),
                    key: key.clone(),
                })),
            },
            put(5, header(&region), b"streamed".to_vec()),
        ],
    })
    .await
    .unwrap();
    let mut got = std::collections::HashMap::new();
    while got.len() < 5 {
        let batch = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("answers within 10 s")
            .unwrap()
            .expect("stream open");
        for r in batch.results {
            assert!(got.insert(r.id, r.response).is_none(), "id {} twice", r.id);
        }
    }
    for id in [1, 2, 3] {
        match &got[&id] {
            Some(A::Error(e)) => {
                assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{id}: {e:?}")
            }
            other => panic!("command {id}: expected InvalidArgument, got {other:?}"),
        }
    }
    match &got[&4] {
        Some(A::Get(r)) => assert!(matches!(
            r.region_error.as_ref().and_then(|e| e.error.as_ref()),
            Some(RE::RegionNotFound(_))
        )),
        other => panic!("expected a RegionNotFound answer, got {other:?}"),
    }
    match &got[&5] {
        Some(A::Put(r)) => {
            assert!(r.region_error.is_none(), "{r:?}");
            assert_eq!(r.prev_kv.as_ref().unwrap().value, b"before");
        }
        other => panic!("expected a put answer, got {other:?}"),
    }

    // The stream still works after the bad commands.
    tx.send(KvCommands {
        commands: vec![KvCommand {
            id: 6,
            request: Some(Q::Get(GetRequest {
                revision: 0,
                header: header(&region),
                key: key.clone(),
            })),
        }],
    })
    .await
    .unwrap();
    let batch = answers.message().await.unwrap().unwrap();
    match &batch.results[..] {
        [proto::KvCommandResult {
            id: 6,
            response: Some(A::Get(r)),
        }] => assert_eq!(r.kv.as_ref().unwrap().value, b"streamed"),
        other => panic!("expected the get's answer, got {other:?}"),
    }

    // A message over the server's limit ends the stream with an error, not the node.
    let huge: Vec<KvCommand> = (0..40)
        .map(|i| put(100 + i, header(&region), vec![1u8; 300 << 10]))
        .collect();
    tx.send(KvCommands { commands: huge }).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), answers.message())
        .await
        .expect("the stream ends within 10 s");
    assert!(
        end.is_err(),
        "an oversize message must fail the stream: {end:?}"
    );
    assert_eq!(
        client.get(&key).await.unwrap().unwrap().value,
        b"streamed",
        "nothing of the oversize message was applied, nothing stored was lost"
    );
    client.put(&key, b"after").await.unwrap();
    assert_eq!(client.get(&key).await.unwrap().unwrap().value, b"after");
    cluster.shutdown().await;
}

/// `ServerBusy` means "not done, try again": the client retries it until it clears and the
/// write then applies once. Fail point `kv_put_busy` answers puts of one key busy until it
/// is removed.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_server_busy_is_retried_until_it_clears() {
    let cluster = TestCluster::start(3, 2, |_| {}).await;
    wait_for_leaders(&cluster.endpoints(), 2, Duration::from_secs(60)).await;
    let client = cluster.client().await;
    let key = b"/busy/transient-put";
    client.put(b"/busy/warm-up", b"x").await.expect("put");
    fail::cfg("kv_put_busy", "return(/busy/transient-put)").expect("fail point");
    let clear = tokio::spawn(async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        fail::remove("kv_put_busy");
    });
    let before = client
        .stats()
        .region_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    let w = client.put(key, b"v").await;
    clear.await.expect("clear");
    let w = w.expect("a put refused as busy succeeds once the refusal clears");
    let busy = client
        .stats()
        .region_errors
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    assert!(
        busy >= 2,
        "the put was answered busy and retried ({busy} region errors)"
    );
    let kv = client
        .get(key)
        .await
        .expect("get")
        .expect("the put applied");
    assert_eq!((kv.value.as_slice(), kv.version), (&b"v"[..], 1));
    assert_eq!(
        kv.mod_revision, w.revision,
        "applied once, by the retry that succeeded"
    );
    cluster.shutdown().await;
}
