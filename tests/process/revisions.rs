//! Cluster revisions across kill -9 of the timestamp oracle's node: the oracle's
//! high-water mark is in raft, so a new oracle leader hands out revisions above every one
//! handed out before, and a write acknowledged before another was sent always has the
//! smaller revision, whatever region each lands in.

use super::*;

/// The node leading the region that holds the oracle's key, as `addr` sees it.
async fn oracle_node(addr: &str) -> Option<u64> {
    let key = tessera::storage::keys::tso_key();
    node_regions(addr).await?.into_iter().find_map(|info| {
        let r = info.region?;
        tessera::storage::keys::in_range(&key, &r.start_key, &r.end_key)
            .then(|| info.leader.map(|l| l.node_id))
            .flatten()
    })
}

/// One sequential put per key, spread over every region; the answers' revisions in order.
async fn write_round(client: &Client, round: u32, regions: u32) -> Vec<u64> {
    let mut revs = Vec::new();
    for i in 0..regions * 4 {
        let key = key_in_region(i % regions, regions, &format!("/r{round}/{i}"));
        revs.push(client.put(&key, b"v").await.expect("put").revision);
    }
    revs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_keep_rising_across_kill9_of_the_oracle_node() {
    const REGIONS: u32 = 4;
    let dir = common::test_dir("revisions_keep_rising_across_kill9_of_the_oracle_node");
    let (mut procs, addrs, client) = start_led_with_client(dir.path(), 3, REGIONS).await;

    let mut last = 0u64;
    for round in 0..3u32 {
        for rev in write_round(&client, round, REGIONS).await {
            assert!(rev > last, "round {round}: revision {rev} after {last}");
            last = rev;
        }
        // kill -9 the oracle's node; the others elect a new placement leader, which must
        // start above the old leader's mark.
        let mut victim = None;
        for _ in 0..100 {
            if let Some(n) = oracle_node(&addrs[0]).await {
                victim = Some(n);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let victim = victim.expect("the placement region has a leader") as usize - 1;
        eprintln!(
            "round {round}: last revision {last}, kill -9 of node {}",
            victim + 1
        );
        procs[victim].kill9();
        // Written while the oracle moves: each answer is above the last one.
        for rev in write_round(&client, round + 10, REGIONS).await {
            assert!(rev > last, "after kill -9: revision {rev} after {last}");
            last = rev;
        }
        procs[victim].restart(&dir.path().join(format!("node{}.log", victim + 1)));
        wait_serving(&addrs).await;
    }
    // The per-key counters run on the same clock: a re-put's mod revision is the answer's.
    let key = key_in_region(0, REGIONS, "/final");
    let w = client.put(&key, b"x").await.expect("put");
    let kv = client.get(&key).await.expect("get").expect("present");
    assert_eq!(
        (kv.mod_revision, kv.create_revision),
        (w.revision, w.revision)
    );
    assert!(w.revision > last);
}
