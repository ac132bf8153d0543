//! Group-commit headroom: appending raft entries with one synced write per entry, versus one
//! synced `WriteBatch` carrying one entry for each of 16 or 256 regions — the shape of a raft
//! worker round. Throughput is reported in entries per second.
//!
//! `cargo bench --bench raft_append`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use raft::eraftpb::Entry;
use tessera::ids::RegionId;
use tessera::proto::{Peer, Region, RegionEpoch};
use tessera::storage::{Engine, EngineOptions, PeerStorage};

const PAYLOAD: usize = 256;

fn setup(regions: u64) -> (tempfile::TempDir, Engine, Vec<PeerStorage>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), &EngineOptions::default()).expect("open");
    let mut b = engine.batch();
    for r in 1..=regions {
        let region = Region {
            id: r,
            start_key: r.to_be_bytes().to_vec(),
            end_key: (r + 1).to_be_bytes().to_vec(),
            epoch: Some(RegionEpoch {
                conf_ver: 1,
                version: 1,
            }),
            peers: vec![Peer {
                id: r,
                node_id: 1,
                role: 0,
            }],
        };
        PeerStorage::write_initial_state(&mut b, &region);
    }
    engine.write(b, true).expect("write");
    let stores = (1..=regions)
        .map(|r| PeerStorage::open(engine.clone(), RegionId(r)).expect("open region"))
        .collect();
    (dir, engine, stores)
}

fn next_entry(ps: &PeerStorage) -> Entry {
    let mut e = Entry {
        index: ps.raft_state().last_index + 1,
        term: 6,
        ..Default::default()
    };
    e.set_data(vec![0xab; PAYLOAD].into());
    e
}

fn bench_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("raft_append_synced");
    g.sample_size(20);
    g.measurement_time(std::time::Duration::from_secs(6));

    g.throughput(Throughput::Elements(1));
    g.bench_function("one_write_per_entry", |bch| {
        let (_dir, engine, mut stores) = setup(1);
        bch.iter(|| {
            let e = next_entry(&stores[0]);
            let mut b = engine.batch();
            stores[0].append(&[e], &mut b).expect("append");
            engine.write(b, true).expect("write");
        })
    });

    for regions in [16u64, 256] {
        g.throughput(Throughput::Elements(regions));
        g.bench_function(format!("one_batch_{regions}_regions"), |bch| {
            let (_dir, engine, mut stores) = setup(regions);
            bch.iter(|| {
                let mut b = engine.batch();
                for ps in stores.iter_mut() {
                    let e = next_entry(ps);
                    ps.append(&[e], &mut b).expect("append");
                }
                engine.write(b, true).expect("write");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_append);
criterion_main!(benches);
