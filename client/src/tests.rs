//! Leader targeting and the region cache, without a cluster.

use super::*;
use crate::proto::{Peer, Region};

fn client() -> Client {
    let c = Client {
        inner: Arc::new(Inner {
            endpoints: vec![],
            opts: ClientOptions::default(),
            channels: DashMap::new(),
            nodes: DashMap::new(),
            cache: RwLock::new(RegionCache::default()),
            stats: ClientStats::default(),
            suspects: DashMap::new(),
            writes: WriteIds::new(),
            watch_muxes: DashMap::new(),
            keepalives: Default::default(),
            token: Default::default(),
        }),
    };
    for n in 1..=3 {
        c.inner.nodes.insert(n, format!("127.0.0.1:{n}"));
    }
    c
}

fn region(leader: Option<u64>) -> CachedRegion {
    let peers: Vec<Peer> = (1..=3)
        .map(|n| Peer {
            id: 10 + n,
            node_id: n,
            role: 0,
        })
        .collect();
    CachedRegion {
        leader: leader.map(|l| peers[l as usize - 1]),
        region: Region {
            id: 1,
            peers,
            ..Default::default()
        },
    }
}

#[test]
fn suspect_nodes_are_tried_last() {
    let c = client();
    let r = region(Some(1));
    assert_eq!(c.target(&r, 0).map(|t| t.0), Some(1), "the leader first");
    c.inner
        .suspects
        .insert(1, Instant::now() + Duration::from_secs(60));
    for n in 0..6 {
        let t = c.target(&r, n).unwrap().0;
        assert_ne!(
            t, 1,
            "a suspect leader is skipped while another peer is left"
        );
    }
    c.inner
        .suspects
        .insert(2, Instant::now() + Duration::from_secs(60));
    c.inner
        .suspects
        .insert(3, Instant::now() + Duration::from_secs(60));
    assert!(c.target(&r, 0).is_some(), "all suspect: still try someone");
    // Suspicion expires.
    c.inner.suspects.insert(1, Instant::now());
    assert_eq!(c.target(&region(Some(1)), 0).map(|t| t.0), Some(1));
}
