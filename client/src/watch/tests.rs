use super::*;
use rand::{Rng, SeedableRng};

fn put(key: &str, rev: u64) -> proto::Event {
    proto::Event {
        r#type: proto::event::EventType::Put as i32,
        kv: Some(KeyValue {
            key: key.as_bytes().to_vec(),
            mod_revision: rev,
            ..Default::default()
        }),
        prev_kv: None,
    }
}

/// Per-region event streams merged by revision: whatever the interleaving, resent messages
/// and progress, the merge releases every revision once, in order, with all its events
/// from every region, and never a revision some region is not complete past.
#[test]
fn merged_streams_release_each_revision_once_in_order_when_every_region_is_past_it() {
    for seed in 0..300u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let regions = rng.random_range(1..5usize);
        // Revisions 1..=60; each is written in one region, or (a few) in two at once.
        let mut streams: Vec<Vec<(u64, Vec<proto::Event>)>> = vec![Vec::new(); regions];
        let mut want: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for rev in 1..=60u64 {
            if rng.random_bool(0.3) {
                continue;
            }
            let mut in_regions = vec![rng.random_range(0..regions)];
            if regions > 1 && rng.random_bool(0.1) {
                in_regions.push((in_regions[0] + 1) % regions);
            }
            for r in in_regions {
                let key = format!("r{r}/k{}", rng.random_range(0..5));
                streams[r].push((rev, vec![put(&key, rev)]));
                want.entry(rev).or_default().push(key);
            }
        }
        for keys in want.values_mut() {
            keys.sort();
        }
        let start = rng.random_range(0..10u64);
        want.retain(|r, _| *r > start);
        let mut buf = Buffer {
            released: start,
            ..Default::default()
        };
        let mut complete = vec![start; regions];
        let mut pos = vec![0usize; regions];
        let mut got: Vec<WatchResponse> = Vec::new();
        let mut steps = 0;
        while complete.iter().any(|c| *c < 60) {
            steps += 1;
            assert!(steps < 10_000, "seed {seed}: no progress");
            let r = rng.random_range(0..regions);
            // A server watch started from `complete + 1` sends its next event, or resends
            // one (a duplicate), or reports progress up to its next event (or the end).
            let next = streams[r][pos[r]..]
                .iter()
                .position(|(rev, _)| *rev > complete[r])
                .map(|i| pos[r] + i);
            match (next, rng.random_range(0..4)) {
                (Some(i), 0..=1) => {
                    let (rev, evs) = streams[r][i].clone();
                    buf.add(&mut complete[r], rev, evs);
                    pos[r] = i;
                }
                (_, 2) if pos[r] < streams[r].len() => {
                    let (rev, evs) = streams[r][pos[r]].clone();
                    buf.add(&mut complete[r], rev, evs);
                }
                (Some(i), _) => {
                    let upto = streams[r][i].0 - 1;
                    complete[r] = complete[r].max(upto);
                }
                (None, _) => complete[r] = 60,
            }
            let upto = *complete.iter().min().unwrap();
            for resp in buf.take(upto) {
                assert!(resp.revision <= upto, "seed {seed}: released early");
                got.push(resp);
            }
        }
        got.extend(buf.take(60));
        assert!(
            got.windows(2).all(|w| w[0].revision < w[1].revision),
            "seed {seed}: a revision released twice or out of order"
        );
        let got: BTreeMap<u64, Vec<String>> = got
            .iter()
            .map(|w| {
                let keys = w
                    .events
                    .iter()
                    .map(|e| String::from_utf8(e.kv.key.clone()).unwrap())
                    .collect();
                (w.revision, keys)
            })
            .collect();
        assert_eq!(got, want, "seed {seed}");
        assert_eq!(buf.count, 0);
    }
}
