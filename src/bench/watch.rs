//! `tessera bench watch`: W watchers on one prefix, writers putting keys under it at a fixed
//! rate; measures delivered events per second and event latency, from the write's
//! acknowledgement to the event reaching a watcher. Against etcd each watcher has its own
//! `Watch` stream and writes are etcd `Put`s; against tessera, the client's watch.
//!
//! Every write acknowledged during the measured window must reach every watcher exactly
//! once: after the window the writers stop and the watchers get up to `DRAIN` to deliver the
//! rest. An event missing after that, or delivered twice, is reported as an error — so the
//! figure is throughput of a correct watch, not of a lossy one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::StreamExt;
use hdrhistogram::Histogram;

use tonic::transport::Channel;

use super::target::{etcd_channel, Target};
use super::{BenchArgs, Report};
use crate::client::{Client, WatchOptions};
use crate::etcdpb;
use crate::etcdpb::watch_client::WatchClient as EtcdWatch;

/// The prefix every watched key starts with.
const PREFIX: &[u8] = b"bench/watch/";

/// How long the watchers get after the window to deliver the window's writes.
const DRAIN: Duration = Duration::from_secs(10);

/// A watcher's stream of responses, each the revisions of its events.
type Deliveries = futures::stream::BoxStream<'static, Vec<u64>>;

async fn tessera_watcher(client: &Client) -> Result<Deliveries, String> {
    let w = client
        .watch_prefix(PREFIX, WatchOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(w.filter_map(|r| async move {
        r.ok()
            .map(|r| r.events.iter().map(|e| e.kv.mod_revision).collect())
    })
    .boxed())
}

async fn etcd_watcher(ch: Channel) -> Result<Deliveries, String> {
    let create = etcdpb::WatchRequest {
        request_union: Some(etcdpb::watch_request::RequestUnion::CreateRequest(
            etcdpb::WatchCreateRequest {
                key: PREFIX.to_vec(),
                range_end: tessera_api::keys::prefix_end(PREFIX),
                ..Default::default()
            },
        )),
    };
    let mut stream = EtcdWatch::new(ch)
        .watch(futures::stream::iter([create]).chain(futures::stream::pending()))
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    // Wait until etcd says the watch exists: writes after this are seen.
    match stream.message().await {
        Ok(Some(r)) if r.created => {}
        other => return Err(format!("etcd did not create the watch: {other:?}")),
    }
    Ok(stream
        .filter_map(|r| async move {
            let r = r.ok()?;
            Some(
                r.events
                    .iter()
                    .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision as u64))
                    .collect(),
            )
        })
        .boxed())
}

pub async fn run(args: BenchArgs) -> Result<Report, String> {
    let endpoints = crate::client::endpoint_list(&args.endpoints);
    if endpoints.is_empty() {
        return Err("no endpoints given".into());
    }
    let target = Target::connect(
        args.target,
        &endpoints,
        args.connections,
        false,
        false,
        args.access()?,
    )
    .await?;
    let target = Arc::new(target);
    let client = match &*target {
        Target::Tessera(clients) => Some(clients[0].clone()),
        Target::Etcd { .. } => None,
    };
    let rate = if args.rate > 0.0 { args.rate } else { 1000.0 };
    let duration = Duration::from_secs(args.duration.unwrap_or(10));
    let warmup = Duration::from_secs(args.warmup);
    // Revision → when its write was acknowledged, and whether that was inside the window.
    let acked: Arc<DashMap<u64, (Instant, bool)>> = Arc::new(DashMap::new());
    // Revision → events delivered for it, summed over the watchers.
    let seen: Arc<DashMap<u64, u64>> = Arc::new(DashMap::new());
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writers = Arc::new(AtomicBool::new(false));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
    ));
    // etcd: the watchers' streams spread over one channel per endpoint.
    let mut etcd_channels = Vec::new();
    if client.is_none() {
        for ep in &endpoints {
            etcd_channels.push(etcd_channel(ep).await?);
        }
    }
    let mut watchers = Vec::new();
    for i in 0..args.watchers.max(1) {
        let mut w = match &client {
            Some(c) => tessera_watcher(c).await?,
            None => etcd_watcher(etcd_channels[i % etcd_channels.len()].clone()).await?,
        };
        let (acked, seen, measuring, stop, hist) = (
            acked.clone(),
            seen.clone(),
            measuring.clone(),
            stop.clone(),
            hist.clone(),
        );
        watchers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(Some(revisions)) =
                    tokio::time::timeout(Duration::from_millis(200), w.next()).await
                else {
                    continue;
                };
                let now = Instant::now();
                let timed = measuring.load(Ordering::Relaxed);
                for revision in revisions {
                    *seen.entry(revision).or_default() += 1;
                    if timed {
                        // An event can beat its write's answer back: latency 0 then.
                        let lat = acked
                            .get(&revision)
                            .map_or(0, |t| now.saturating_duration_since(t.0).as_micros() as u64);
                        let _ = hist.lock().expect("histogram lock").record(lat.max(1));
                    }
                }
            }
        }));
    }
    // Writers: `concurrency` tasks sharing the rate.
    let writers = args.concurrency.max(1);
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for t in 0..writers {
        let (target, acked, measuring, stop, errors) = (
            target.clone(),
            acked.clone(),
            measuring.clone(),
            stop_writers.clone(),
            errors.clone(),
        );
        let every = Duration::from_secs_f64(writers as f64 / rate);
        let value = vec![b'v'; args.value_size];
        let keys = args.keys.max(1);
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut i = t as u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let key = [PREFIX, format!("{:08}", i % keys).as_bytes()].concat();
                i += writers as u64;
                match target.put_revision(t, &key, &value).await {
                    Ok(revision) => {
                        let in_window = measuring.load(Ordering::Relaxed);
                        acked.insert(revision, (Instant::now(), in_window));
                    }
                    Err(e) => *errors.lock().expect("errors lock").entry(e.0).or_default() += 1,
                }
            }
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop_writers.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    // The window's writes, and the events every watcher owes for them.
    let window: Vec<u64> = acked
        .iter()
        .filter(|e| e.value().1)
        .map(|e| *e.key())
        .collect();
    let watcher_count = watchers.len() as u64;
    let delivered = |seen: &DashMap<u64, u64>| -> (u64, u64, u64) {
        let (mut ops, mut missing, mut doubled) = (0, 0, 0);
        for r in &window {
            let n = seen.get(r).map_or(0, |n| *n);
            ops += n.min(watcher_count);
            missing += watcher_count.saturating_sub(n);
            doubled += n.saturating_sub(watcher_count);
        }
        (ops, missing, doubled)
    };
    let drain = Instant::now();
    while delivered(&seen).1 > 0 && drain.elapsed() < DRAIN {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in watchers {
        let _ = t.await;
    }
    let (ops, missing, doubled) = delivered(&seen);
    let hist = std::mem::replace(
        &mut *hist.lock().expect("histogram lock"),
        Histogram::new(3).map_err(|e| e.to_string())?,
    );
    let mut errors = std::mem::take(&mut *errors.lock().expect("errors lock"));
    if missing > 0 {
        errors.insert(
            format!(
                "events not delivered within {} s of the window",
                DRAIN.as_secs()
            ),
            missing,
        );
    }
    if doubled > 0 {
        errors.insert("events delivered twice".into(), doubled);
    }
    Ok(Report {
        args,
        ops,
        elapsed,
        hist,
        errors,
        retries: target.retries(),
        cas_conflicts: 0,
    })
}
