//! Micro-benchmarks of the per-request hot paths: key encoding, command encode/decode, the
//! apply of a batch of commands, an (unsynced) raft log append, and the authentication
//! checks of a request (a token verified, a key checked against a user's permissions).
//!
//! `cargo bench --bench hot_paths`

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use raft::eraftpb::Entry;
use tessera::ids::RegionId;
use tessera::proto::{Peer, Region, RegionEpoch};
use tessera::raftstore::apply::{exec, ApplyCtx};
use tessera::raftstore::cmd::{self, Command};
use tessera::storage::{keys, Engine, EngineOptions, PeerStorage};

fn bench_keys(c: &mut Criterion) {
    let mut g = c.benchmark_group("keys");
    g.throughput(Throughput::Elements(1));
    g.bench_function("raft_log_key", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            std::hint::black_box(keys::raft_log_key(RegionId(i & 1023), i))
        })
    });
    g.bench_function("data_key_32b", |b| {
        let k = [7u8; 32];
        b.iter(|| std::hint::black_box(keys::data_key(std::hint::black_box(&k))))
    });
    g.finish();
}

fn bench_cmd(c: &mut Criterion) {
    let mut g = c.benchmark_group("command");
    g.throughput(Throughput::Elements(1));
    let put = Command::Put {
        key: b"/topics/orders/partition/0001".to_vec(),
        value: vec![b'v'; 256],
        lease: None,
    };
    let epoch = RegionEpoch {
        conf_ver: 1,
        version: 3,
    };
    let env = cmd::Envelope::with_epoch(epoch);
    g.bench_function("encode_put_256b", |b| {
        b.iter(|| cmd::encode(std::hint::black_box(&put), &env))
    });
    let bytes = cmd::encode(&put, &env);
    g.bench_function("decode_put_256b", |b| {
        b.iter(|| cmd::decode(std::hint::black_box(&bytes)))
    });
    g.finish();
}

fn engine_with_region() -> (tempfile::TempDir, Engine, PeerStorage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(dir.path(), &EngineOptions::default()).expect("open");
    let region = Region {
        id: 1,
        start_key: vec![],
        end_key: vec![],
        epoch: Some(RegionEpoch {
            conf_ver: 1,
            version: 1,
        }),
        peers: vec![Peer {
            id: 2,
            node_id: 1,
            role: 0,
        }],
    };
    let mut b = engine.batch();
    PeerStorage::write_initial_state(&mut b, &region);
    engine.write(b, true).expect("write");
    let ps = PeerStorage::open(engine.clone(), RegionId(1)).expect("open region");
    (dir, engine, ps)
}

fn bench_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply");
    const N: u64 = 128;
    g.throughput(Throughput::Elements(N));
    let (_dir, engine, _ps) = engine_with_region();
    g.bench_function("exec_128_puts_into_batch", |b| {
        let mut rev = 10u64;
        b.iter_batched(
            || {
                (0..N)
                    .map(|i| Command::Put {
                        key: format!("/bench/{:06}", i * 7919 % 100_000).into_bytes(),
                        value: vec![b'v'; 256],
                        lease: None,
                    })
                    .collect::<Vec<_>>()
            },
            |cmds| {
                let mut wb = engine.batch();
                let mut ctx = ApplyCtx::default();
                for cmd in cmds {
                    rev += 1;
                    std::hint::black_box(exec(cmd, rev, &engine, &mut wb, &mut ctx));
                }
                engine.write(wb, false).expect("write");
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("storage_append");
    const N: u64 = 64;
    g.throughput(Throughput::Elements(N));
    let (_dir, engine, mut ps) = engine_with_region();
    g.bench_function("append_64_entries_unsynced", |b| {
        b.iter(|| {
            let first = ps.raft_state().last_index + 1;
            let ents: Vec<Entry> = (first..first + N)
                .map(|i| {
                    let mut e = Entry {
                        index: i,
                        term: 6,
                        ..Default::default()
                    };
                    e.set_data(vec![b'd'; 256].into());
                    e
                })
                .collect();
            let mut wb = engine.batch();
            ps.append(&ents, &mut wb).expect("append");
            engine.write(wb, false).expect("write");
        })
    });
    g.finish();
}

/// A user with readwrite on 16 prefixes, as a node's gate holds it, and a token of it.
fn gate_with_user() -> (std::sync::Arc<tessera::auth::Gate>, String) {
    use tessera::auth::model::{AuthDoc, Change, Kind, Permission};
    use tessera::auth::password::PasswordHash;
    let mut doc = AuthDoc::default();
    let hash = || PasswordHash::new("pw", 1_000).expect("hash");
    let changes = [
        Change::UserAdd("root".into(), hash()),
        Change::UserGrantRole("root".into(), "root".into()),
        Change::UserAdd("app".into(), hash()),
        Change::RoleAdd("app".into()),
        Change::UserGrantRole("app".into(), "app".into()),
    ];
    for ch in &changes {
        doc.apply(ch).expect("change");
    }
    for i in 0..16 {
        let p = Permission {
            kind: Kind::ReadWrite,
            key: format!("/svc{i:02}/").into_bytes(),
            range_end: format!("/svc{i:02}0").into_bytes(),
        };
        doc.apply(&Change::RoleGrant("app".into(), p))
            .expect("grant");
    }
    doc.apply(&Change::Enable(true, vec![7; 32]))
        .expect("enable");
    let gate = tessera::auth::Gate::new(true, 300);
    gate.install(Some(&doc));
    let (token, _) = gate.authenticate(&doc, "app", "pw").expect("login");
    (gate, token)
}

fn bench_auth(c: &mut Criterion) {
    use tessera::auth::Need;
    let mut g = c.benchmark_group("auth");
    g.throughput(Throughput::Elements(1));
    let (gate, token) = gate_with_user();
    let key = b"/svc07/topics/orders/partition/0001";
    // A unary call: the token verified, then the key checked.
    g.bench_function("unary_call_token_and_key", |b| {
        b.iter(|| {
            let caller = gate
                .caller(false, Some(std::hint::black_box(&token)))
                .expect("token");
            gate.allow(&caller, Need::WriteKey(std::hint::black_box(key)))
                .expect("allowed")
        })
    });
    // A command of a stream: its caller known, the key checked.
    let caller = gate.caller(false, Some(&token)).expect("token");
    g.bench_function("stream_command_key", |b| {
        b.iter(|| {
            gate.allow(&caller, Need::WriteKey(std::hint::black_box(key)))
                .expect("allowed")
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_keys,
    bench_cmd,
    bench_apply,
    bench_append,
    bench_auth
);
criterion_main!(benches);
