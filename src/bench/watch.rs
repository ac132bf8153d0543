//! `tessera bench watch`: W watchers on one prefix, writers putting keys under it at a fixed
//! rate; measures delivered events per second and event latency, from the write's
//! acknowledgement to the event reaching a watcher. Against etcd each watcher has its own
//! `Watch` stream and writes are etcd `Put`s; against tessera, the client's watch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// A watcher's stream of (revision, events) as it delivers them.
type Deliveries = futures::stream::BoxStream<'static, (u64, usize)>;

async fn tessera_watcher(client: &Client) -> Result<Deliveries, String> {
    let w = client
        .watch_prefix(PREFIX, WatchOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(
        w.filter_map(|r| async move { r.ok().map(|r| (r.revision, r.events.len())) })
            .boxed(),
    )
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
            let rev = r.events.first()?.kv.as_ref()?.mod_revision as u64;
            Some((rev, r.events.len()))
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
        args.tls()?,
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
    // Revision → when its write was acknowledged.
    let acked: Arc<DashMap<u64, Instant>> = Arc::new(DashMap::new());
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
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
        let (acked, measuring, stop, events, hist) = (
            acked.clone(),
            measuring.clone(),
            stop.clone(),
            events.clone(),
            hist.clone(),
        );
        watchers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(Some((revision, n))) =
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
                    .get(&revision)
                    .map_or(0, |t| now.saturating_duration_since(*t).as_micros() as u64);
                events.fetch_add(n as u64, Ordering::Relaxed);
                let mut h = hist.lock().expect("histogram lock");
                for _ in 0..n {
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
        let (target, acked, stop, errors) =
            (target.clone(), acked.clone(), stop.clone(), errors.clone());
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
                        acked.insert(revision, Instant::now());
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
        retries: target.retries(),
        cas_conflicts: 0,
    })
}
