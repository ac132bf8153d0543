//! `tessera bench lease`: `--sessions` sessions, each a lease of `--ttl` seconds with one
//! registration key attached (a broker's or consumer's session), kept alive at a third of the
//! TTL for the measured time. Reports keep-alives per second and the latency of each. The
//! set-up (grants and registrations) is not measured.
//!
//! Against tessera the renewals go as the client library's keep-alive sends them: every
//! 100 ms, the leases due in one request per lease region (`Client::lease_renew`). Against
//! etcd as its client sends them: one `LeaseKeepAlive` message per lease on a stream per
//! connection.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::sync::mpsc;

use super::target::{etcd_channel, Target};
use super::{BenchArgs, Report};
use crate::client::Client;
use crate::etcdpb;
use crate::etcdpb::kv_client::KvClient as EtcdKv;
use crate::etcdpb::lease_client::LeaseClient as EtcdLease;

/// How often a connection looks for leases due.
const TICK: Duration = Duration::from_millis(100);

struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    done: AtomicU64,
    hist: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Shared {
    fn record(&self, n: usize, latency: Duration) {
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        self.done.fetch_add(n as u64, Ordering::Relaxed);
        let mut h = self.hist.lock().expect("histogram lock");
        let _ = h.record_n((latency.as_micros() as u64).max(1), n as u64);
    }

    fn error(&self, e: String) {
        *self
            .errors
            .lock()
            .expect("errors lock")
            .entry(e)
            .or_default() += 1;
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("bench/session/{i:08}").into_bytes()
}

/// Grants `ids.len()` leases and registers a key with each, `conc` at a time.
async fn setup_tessera(
    client: &Client,
    first: usize,
    n: usize,
    ttl: Duration,
    conc: usize,
) -> Result<Vec<u64>, String> {
    futures::stream::iter(first..first + n)
        .map(|i| async move {
            let (id, _) = client.lease_grant(ttl).await.map_err(|e| e.to_string())?;
            client
                .put_with_lease(&key(i), b"alive", id)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<u64, String>(id)
        })
        .buffer_unordered(conc.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn setup_etcd(
    ch: tonic::transport::Channel,
    first: usize,
    n: usize,
    ttl: Duration,
    conc: usize,
) -> Result<Vec<i64>, String> {
    futures::stream::iter(first..first + n)
        .map(|i| {
            let ch = ch.clone();
            async move {
                let g = EtcdLease::new(ch.clone())
                    .lease_grant(etcdpb::LeaseGrantRequest {
                        ttl: ttl.as_secs() as i64,
                        id: 0,
                    })
                    .await
                    .map_err(|s| s.to_string())?
                    .into_inner();
                EtcdKv::new(ch)
                    .put(etcdpb::PutRequest {
                        key: key(i),
                        value: b"alive".to_vec(),
                        lease: g.id,
                        prev_kv: false,
                    })
                    .await
                    .map_err(|s| s.to_string())?;
                Ok::<i64, String>(g.id)
            }
        })
        .buffer_unordered(conc.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Renews `ids` through `client` as its keep-alive does, until stopped.
async fn keep_tessera(client: Client, ids: Vec<u64>, ttl: Duration, shared: Arc<Shared>) {
    let period = ttl / 3;
    // Spread the first renewals over one period, as leases granted over time would be.
    let start = Instant::now();
    let mut due: Vec<(Instant, u64)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                start + period.mul_f64(i as f64 / ids.len().max(1) as f64),
                *id,
            )
        })
        .collect();
    while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        let batch: Vec<u64> = due
            .iter()
            .filter(|(t, _)| *t <= now)
            .map(|(_, id)| *id)
            .collect();
        if batch.is_empty() {
            continue;
        }
        let sent = Instant::now();
        match client.lease_renew(&batch).await {
            Ok(ttls) => {
                let lost = ttls.iter().filter(|t| t.is_none()).count();
                if lost > 0 {
                    shared.error(format!("{lost} leases gone"));
                }
                shared.record(batch.len(), sent.elapsed());
                for d in due.iter_mut().filter(|(t, _)| *t <= now) {
                    d.0 = sent + period;
                }
            }
            Err(e) => shared.error(e.to_string()),
        }
    }
}

/// Renews `ids` on one etcd `LeaseKeepAlive` stream, one message per lease, until stopped.
async fn keep_etcd(
    ch: tonic::transport::Channel,
    ids: Vec<i64>,
    ttl: Duration,
    shared: Arc<Shared>,
) {
    let period = ttl / 3;
    let (tx, rx) = mpsc::channel::<etcdpb::LeaseKeepAliveRequest>(4096);
    // etcd answers the call (its headers) with the first keep-alive: one goes before.
    if let Some(first) = ids.first() {
        let _ = tx.send(etcdpb::LeaseKeepAliveRequest { id: *first }).await;
    }
    let mut answers = match EtcdLease::new(ch)
        .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return shared.error(s.to_string()),
    };
    let sent_at: Arc<dashmap::DashMap<i64, Instant>> = Arc::default();
    let reader = {
        let (sent_at, shared) = (sent_at.clone(), shared.clone());
        tokio::spawn(async move {
            while let Ok(Some(a)) = answers.message().await {
                if let Some((_, t)) = sent_at.remove(&a.id) {
                    shared.record(1, t.elapsed());
                }
                if a.ttl <= 0 {
                    shared.error("lease gone".into());
                }
            }
        })
    };
    let start = Instant::now();
    let mut due: Vec<(Instant, i64)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            (
                start + period.mul_f64(i as f64 / ids.len().max(1) as f64),
                *id,
            )
        })
        .collect();
    'run: while !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        for d in due.iter_mut().filter(|(t, _)| *t <= now) {
            sent_at.insert(d.1, Instant::now());
            if tx
                .send(etcdpb::LeaseKeepAliveRequest { id: d.1 })
                .await
                .is_err()
            {
                break 'run;
            }
            d.0 = now + period;
        }
    }
    drop(tx);
    reader.abort();
}

pub async fn run(args: BenchArgs) -> Result<Report, String> {
    let endpoints = crate::client::endpoint_list(&args.endpoints);
    if endpoints.is_empty() {
        return Err("no endpoints given".into());
    }
    let sessions = args.sessions.max(1);
    let ttl = Duration::from_secs(args.ttl.max(2));
    let conns = args.connections.max(1);
    let per = sessions.div_ceil(conns);
    let shared = Arc::new(Shared {
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        done: AtomicU64::new(0),
        hist: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?),
        errors: Mutex::default(),
    });
    let setup = Instant::now();
    let target =
        Target::connect(args.target, &endpoints, conns, false, false, args.access()?).await?;
    let mut tasks = Vec::new();
    match &target {
        Target::Tessera(clients) => {
            let mut all = Vec::new();
            for (c, client) in clients.iter().enumerate() {
                let first = c * per;
                let n = per.min(sessions.saturating_sub(first));
                all.push(setup_tessera(
                    client,
                    first,
                    n,
                    ttl,
                    args.concurrency / conns + 1,
                ));
            }
            let ids = futures::future::try_join_all(all).await?;
            for (client, ids) in clients.iter().zip(ids) {
                tasks.push(tokio::spawn(keep_tessera(
                    client.clone(),
                    ids,
                    ttl,
                    shared.clone(),
                )));
            }
        }
        Target::Etcd { .. } => {
            let mut chans = Vec::new();
            for c in 0..conns {
                chans.push(etcd_channel(&endpoints[c % endpoints.len()]).await?);
            }
            let mut all = Vec::new();
            for (c, ch) in chans.iter().enumerate() {
                let first = c * per;
                let n = per.min(sessions.saturating_sub(first));
                all.push(setup_etcd(
                    ch.clone(),
                    first,
                    n,
                    ttl,
                    args.concurrency / conns + 1,
                ));
            }
            let ids = futures::future::try_join_all(all).await?;
            for (ch, ids) in chans.into_iter().zip(ids) {
                tasks.push(tokio::spawn(keep_etcd(ch, ids, ttl, shared.clone())));
            }
        }
    }
    eprintln!(
        "bench lease: {sessions} sessions (lease + key) set up in {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration.unwrap_or(10))).await;
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let hist = std::mem::replace(
        &mut *shared.hist.lock().expect("histogram lock"),
        Histogram::new(3).map_err(|e| e.to_string())?,
    );
    let errors = std::mem::take(&mut *shared.errors.lock().expect("errors lock"));
    Ok(Report {
        args,
        ops: shared.done.load(Ordering::Relaxed),
        elapsed,
        hist,
        errors,
        retries: target.retries(),
        cas_conflicts: 0,
    })
}
