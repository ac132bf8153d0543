//! `tessera bench watch`: W watchers on one prefix, writers putting keys under it at a fixed
//! rate; measures delivered events per second and event latency, from the write's
//! acknowledgement to the event reaching a watcher (tessera only so far).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::StreamExt;
use hdrhistogram::Histogram;

use super::{BenchArgs, Report, TargetKind};
use crate::client::{Client, ClientOptions, WatchOptions};

/// The prefix every watched key starts with.
const PREFIX: &[u8] = b"bench/watch/";

pub async fn run(args: BenchArgs) -> Result<Report, String> {
    if args.target != TargetKind::Tessera {
        return Err("the watch workload runs against tessera only so far".into());
    }
    let endpoints = crate::client::endpoint_list(&args.endpoints);
    let client = Client::connect(&endpoints, ClientOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let rate = if args.rate > 0.0 { args.rate } else { 1000.0 };
    let duration = Duration::from_secs(args.duration.unwrap_or(10));
    let warmup = Duration::from_secs(args.warmup);
    // Revision → when its write was acknowledged.
    let acked: Arc<DashMap<u64, Instant>> = Arc::new(DashMap::new());
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
    ));
    let mut watchers = Vec::new();
    for _ in 0..args.watchers.max(1) {
        let mut w = client
            .watch_prefix(PREFIX, WatchOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let (acked, measuring, stop, events, hist) = (
            acked.clone(),
            measuring.clone(),
            stop.clone(),
            events.clone(),
            hist.clone(),
        );
        watchers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(Some(Ok(resp))) =
                    tokio::time::timeout(Duration::from_millis(200), w.next()).await
                else {
                    continue;
                };
                let now = Instant::now();
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                // An event can beat its write's answer back: latency 0 then.
                let lat = acked
                    .get(&resp.revision)
                    .map_or(0, |t| now.saturating_duration_since(*t).as_micros() as u64);
                events.fetch_add(resp.events.len() as u64, Ordering::Relaxed);
                let mut h = hist.lock().expect("histogram lock");
                for _ in &resp.events {
                    let _ = h.record(lat.max(1));
                }
            }
        }));
    }
    // Writers: `concurrency` tasks sharing the rate.
    let writers = args.concurrency.max(1);
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut tasks = Vec::new();
    for t in 0..writers {
        let (client, acked, stop, errors) =
            (client.clone(), acked.clone(), stop.clone(), errors.clone());
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
                match client.put(&key, &value).await {
                    Ok(r) => {
                        acked.insert(r.revision, Instant::now());
                    }
                    Err(e) => {
                        *errors
                            .lock()
                            .expect("errors lock")
                            .entry(e.to_string())
                            .or_default() += 1
                    }
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
    stop.store(true, Ordering::Relaxed);
    for t in tasks.into_iter().chain(watchers) {
        let _ = t.await;
    }
    let hist = std::mem::replace(
        &mut *hist.lock().expect("histogram lock"),
        Histogram::new(3).map_err(|e| e.to_string())?,
    );
    let errors = std::mem::take(&mut *errors.lock().expect("errors lock"));
    Ok(Report {
        args,
        ops: events.load(Ordering::Relaxed),
        elapsed,
        hist,
        errors,
        retries: client.stats().retries.load(Ordering::Relaxed),
        cas_conflicts: 0,
    })
}
