//! What a run is checked for besides linearizability: leadership recovered, one leader
//! per region and term, no lost write, no stale read, replicas converged; and the node
//! metrics the checks read.

use super::*;

/// Until every region has a leader on a live node, as the live nodes see it.
/// Node `i` (0-based) of the process cluster has id `i + 1` and address `addrs[i]`.
pub(crate) async fn leadership_recovered(
    addrs: &[String],
    live: &[usize],
    timeout: Duration,
) -> Option<Duration> {
    leadership_seen_by(addrs, live, live, timeout).await
}

/// Until every region has a leader on one of `leaders`, as each of `observers` sees it.
pub(crate) async fn leadership_seen_by(
    addrs: &[String],
    observers: &[usize],
    leaders: &[usize],
    timeout: Duration,
) -> Option<Duration> {
    let t = Instant::now();
    let live_ids: Vec<u64> = leaders.iter().map(|i| *i as u64 + 1).collect();
    let live: Vec<String> = observers.iter().map(|i| addrs[*i].clone()).collect();
    let mut reported_slow = false;
    while t.elapsed() < timeout {
        let mut leaders: BTreeMap<u64, u64> = BTreeMap::new();
        let mut ok = true;
        for a in &live {
            match regions_of(a).await {
                Some(rs) => {
                    for r in rs {
                        let id = r.region.map_or(0, |r| r.id);
                        match r.leader {
                            Some(l) if live_ids.contains(&l.node_id) => {
                                leaders.insert(id, l.node_id);
                            }
                            _ => ok = false,
                        }
                    }
                }
                None => ok = false,
            }
        }
        if ok && leaders.len() > REGIONS as usize {
            return Some(t.elapsed());
        }
        // Slow recoveries say which regions they waited for: once after 5 s, and at the end.
        let slow_once = !reported_slow && t.elapsed() > Duration::from_secs(5);
        reported_slow |= slow_once;
        if slow_once || t.elapsed() + Duration::from_millis(60) >= timeout {
            for a in &live {
                let view: Vec<String> = regions_of(a)
                    .await
                    .unwrap_or_default()
                    .iter()
                    .map(|r| {
                        format!(
                            "{}:{:?}@{}",
                            r.region.as_ref().map_or(0, |r| r.id),
                            r.leader.map(|l| l.node_id),
                            r.term
                        )
                    })
                    .collect();
                eprintln!(
                    "leadership not recovered after {:?}; {a} sees {view:?}",
                    t.elapsed()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Watches (region, term) → leader as every node reports it; two leaders in one term of a
/// region is a split brain.
pub(crate) async fn watch_leaders(
    addrs: Vec<String>,
    stop: Arc<AtomicBool>,
) -> Result<usize, String> {
    let mut seen: HashMap<(u64, u64), u64> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        for a in &addrs {
            if let Some(rs) = regions_of(a).await {
                for r in rs {
                    let (Some(region), Some(leader)) = (r.region, r.leader) else {
                        continue;
                    };
                    if let Some(prev) = seen.insert((region.id, r.term), leader.node_id) {
                        if prev != leader.node_id {
                            return Err(format!(
                                "region {} term {}: leaders on nodes {prev} and {}",
                                region.id, r.term, leader.node_id
                            ));
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(seen.len())
}

/// Acknowledged writes not reflected by the final read of their key, and reads that saw a
/// revision older than a write acknowledged before the read began.
pub(crate) fn lost_and_stale(h: &History, final_from: u64) -> (usize, usize) {
    let mut lost = 0;
    let mut stale = 0;
    let mut by_key: BTreeMap<&[u8], Vec<&Op>> = BTreeMap::new();
    for op in &h.ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    for ops in by_key.values() {
        let acked: Vec<(u64, u64)> = ops
            .iter()
            .filter_map(|o| match &o.ret {
                Some((t, Output::Put { revision }))
                | Some((
                    t,
                    Output::Cas {
                        succeeded: true,
                        revision,
                    },
                )) => Some((*t, *revision)),
                _ => None,
            })
            .collect();
        for o in ops {
            let Some((_, Output::Get(got))) = &o.ret else {
                continue;
            };
            let seen = got.as_ref().map_or(0, |g| g.mod_revision);
            let newest_before = acked
                .iter()
                .filter(|(t, _)| *t < o.invoke)
                .map(|(_, r)| *r)
                .max()
                .unwrap_or(0);
            if seen < newest_before {
                if o.invoke >= final_from {
                    lost += 1;
                } else {
                    stale += 1;
                }
            }
        }
    }
    (lost, stale)
}

/// The test's keys that fall in one node's regions, with the value and revision its
/// replicas hold (`None`: absent there).
pub(crate) type LocalView = BTreeMap<Vec<u8>, Option<(Vec<u8>, u64)>>;

pub(crate) async fn local_scan_all(addr: &str, env: &Env) -> Option<LocalView> {
    let mut kv = tokio::time::timeout(Duration::from_secs(1), common::channel(addr))
        .await
        .ok()?
        .ok()
        .map(KvClient::new)?;
    // The node's own regions as they are now (they may have split since the start).
    let mut regions: Vec<Region> = regions_of(addr)
        .await?
        .into_iter()
        .filter_map(|i| i.region)
        .filter(|r| !tessera::storage::keys::is_system_key(&r.start_key))
        .collect();
    regions.sort_by(|a, b| a.start_key.cmp(&b.start_key));
    let mut out = LocalView::new();
    for r in &regions {
        let resp = kv
            .scan(ScanRequest {
                revision: 0,
                header: Some(RequestHeader {
                    region_id: r.id,
                    region_epoch: r.epoch,
                    consistency: ReadConsistency::Serializable as i32,
                    system: false,
                    write_id: None,
                }),
                start_key: r.start_key.clone(),
                end_key: r.end_key.clone(),
                limit: 0,
                keys_only: false,
            })
            .await
            .ok()?
            .into_inner();
        if resp.region_error.is_some() {
            return None;
        }
        for k in &env.keys {
            if tessera::storage::keys::in_range(k, &r.start_key, &r.end_key) {
                out.insert(k.clone(), None);
            }
        }
        for kv in resp.kvs {
            if env.keys.contains(&kv.key) {
                out.insert(kv.key, Some((kv.value, kv.mod_revision)));
            }
        }
    }
    Some(out)
}

/// A counter's value from a node's Prometheus endpoint (0 if absent).
pub(crate) fn metric(addr: &str, name: &str) -> u64 {
    common::metric_sum(&common::scrape_metrics(addr), name, "") as u64
}

pub(crate) fn percentile(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() - 1) as f64 * p).round() as usize]
}
