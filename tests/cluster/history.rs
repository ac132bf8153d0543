//! History: reads as of a past cluster revision, consistent across regions and final once
//! served; reads of revisions not handed out yet are refused; compaction refuses reads
//! below it and keeps every read above it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera::client::Error;

use super::common::{key_in_region, TestCluster};

const REGIONS: u32 = 4;

fn value(kv: Option<tessera::proto::KeyValue>) -> Option<String> {
    kv.map(|kv| String::from_utf8(kv.value).expect("utf-8"))
}

/// A 3-node cluster of `REGIONS` regions (configured by `tweak`), every region led.
async fn started(tweak: impl Fn(&mut tessera::config::Config)) -> TestCluster {
    TestCluster::start_led(3, REGIONS, tweak).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_at_a_revision_and_compaction() {
    let cluster = started(|_| {}).await;
    let client = cluster.client().await;
    let a = key_in_region(0, REGIONS, "/a");
    let b = key_in_region(2, REGIONS, "/b");

    let r1 = client.put(&a, b"a1").await.expect("put").revision;
    let rb = client.put(&b, b"b1").await.expect("put").revision;
    let r2 = client.put(&a, b"a2").await.expect("put").revision;
    let r3 = client.delete(&a).await.expect("delete").revision;
    let r4 = client.put(&a, b"a3").await.expect("put").revision;
    assert!(r1 < rb && rb < r2 && r2 < r3 && r3 < r4);

    // (Revision 0 asks for the latest state; the cluster's first write may have revision 1.)
    if r1 > 1 {
        assert_eq!(value(client.get_at(&a, r1 - 1).await.unwrap()), None);
    }
    assert_eq!(
        value(client.get_at(&a, r1).await.unwrap()).as_deref(),
        Some("a1")
    );
    assert_eq!(
        value(client.get_at(&a, r2 - 1).await.unwrap()).as_deref(),
        Some("a1")
    );
    assert_eq!(
        value(client.get_at(&a, r2).await.unwrap()).as_deref(),
        Some("a2")
    );
    assert_eq!(value(client.get_at(&a, r3).await.unwrap()), None, "deleted");
    let now = client.get_at(&a, r4).await.unwrap().expect("a3");
    assert_eq!(
        (now.version, now.create_revision, now.mod_revision),
        (1, r4, r4),
        "recreated after the delete"
    );
    // A read of the latest state says which revision it is consistent at.
    let (latest, at) = client.get_with_revision(&a).await.expect("get");
    assert!(
        at >= r4,
        "answer consistent at {at}, before the write at {r4}"
    );
    assert_eq!(client.get_at(&a, at).await.expect("get at"), latest);
    // A scan at a revision reads every region at that revision.
    let at_rb = client.scan_at(b"", b"", 0, rb).await.expect("scan");
    let got: Vec<(Vec<u8>, Vec<u8>)> = at_rb.into_iter().map(|kv| (kv.key, kv.value)).collect();
    assert_eq!(
        got,
        vec![(a.clone(), b"a1".to_vec()), (b.clone(), b"b1".to_vec())]
    );
    let at_r3 = client.scan_at(b"", b"", 0, r3).await.expect("scan");
    assert_eq!(at_r3.len(), 1, "only b at r3");

    // A revision not handed out yet is refused, not waited for.
    match client.get_at(&a, r4 + (1 << 40)).await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("future"), "{m}"),
        other => panic!("a future revision was not refused: {other:?}"),
    }
    match client.compact(r4 + (1 << 40)).await {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("future"), "{m}"),
        other => panic!("compaction to a future revision was not refused: {other:?}"),
    }

    // Compact at r2: reads below it fail (once the nodes have heard, within seconds),
    // reads at and above it are unchanged.
    assert_eq!(client.compact(r2).await.expect("compact"), r2);
    assert_eq!(
        client.compact(r1).await.expect("compact"),
        r2,
        "never lowered"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.get_at(&a, r1).await {
            Err(Error::Compacted { compact_revision }) => {
                assert_eq!(compact_revision, r2);
                break;
            }
            Ok(v) => {
                assert_eq!(value(v).as_deref(), Some("a1"), "history before compaction");
                assert!(Instant::now() < deadline, "reads below r2 still served");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("read below the compacted revision: {e}"),
        }
    }
    assert_eq!(
        value(client.get_at(&a, r2).await.unwrap()).as_deref(),
        Some("a2")
    );
    assert_eq!(
        value(client.get_at(&b, r2).await.unwrap()).as_deref(),
        Some("b1")
    );
    assert_eq!(value(client.get_at(&a, r3).await.unwrap()), None);
    assert_eq!(
        value(client.get_at(&a, r4).await.unwrap()).as_deref(),
        Some("a3")
    );
    // The latest state never depends on history.
    assert_eq!(value(client.get(&a).await.unwrap()).as_deref(), Some("a3"));
}

/// A read at revision R, once answered, is final: writes that come later in real time get
/// revisions above R, so the same read later gives the same answer — even for a region whose
/// writes were in flight when R was handed out in another region.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_at_a_revision_never_changes() {
    let cluster = started(|_| {}).await;
    let client = cluster.client().await;
    let hot = key_in_region(0, REGIONS, "/hot");
    let other = key_in_region(3, REGIONS, "/other");
    let stop = Arc::new(AtomicBool::new(false));
    // Writers keep the hot key's region busy with writes in flight.
    let mut writers = Vec::new();
    for w in 0..4 {
        let (c, stop, hot) = (client.clone(), stop.clone(), hot.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 5_000 {
                c.put(&hot, format!("w{w}-{i}").as_bytes())
                    .await
                    .expect("put");
                i += 1;
            }
        }));
    }
    // Half the oracle's answers reach their workers 30 ms late: writes of the hot region
    // wait for revisions handed out before a read at a later revision arrives there.
    #[cfg(feature = "failpoints")]
    fail::cfg("tso_delay_answer", "50%return(30)").expect("fail point");
    let mut seen = Vec::new();
    for i in 0..100 {
        let r = client
            .put(&other, format!("{i}").as_bytes())
            .await
            .expect("put")
            .revision;
        let kv = client.get_at(&hot, r).await.expect("read at r");
        if let Some(kv) = &kv {
            assert!(kv.mod_revision <= r, "a write above {r} seen at {r}");
        }
        seen.push((r, kv.map(|kv| (kv.value, kv.mod_revision))));
    }
    #[cfg(feature = "failpoints")]
    fail::remove("tso_delay_answer");
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    for (r, first) in seen {
        let again = client.get_at(&hot, r).await.expect("read again");
        assert_eq!(
            again.map(|kv| (kv.value, kv.mod_revision)),
            first,
            "the read at {r} changed"
        );
    }
}

/// `mvcc.auto_compaction = "revisions:N"`: history older than the last N revisions is
/// compacted without being asked; the newest stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_compaction_keeps_the_last_revisions() {
    let cluster = started(|c| {
        c.mvcc.auto_compaction = "revisions:50".into();
    })
    .await;
    let client = cluster.client().await;
    let key = key_in_region(1, REGIONS, "/auto");
    let mut revs = Vec::new();
    for i in 0..100 {
        revs.push(
            client
                .put(&key, format!("{i}").as_bytes())
                .await
                .expect("put")
                .revision,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let compacted = loop {
        match client.get_at(&key, revs[0]).await {
            Err(Error::Compacted { compact_revision }) => break compact_revision,
            Ok(_) => {
                assert!(Instant::now() < deadline, "nothing compacted automatically");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let last = *revs.last().expect("writes");
    assert!(
        compacted > revs[0] && compacted <= last,
        "compacted at {compacted}"
    );
    let kv = client
        .get_at(&key, last)
        .await
        .expect("read")
        .expect("present");
    assert_eq!(kv.value, b"99");
}
