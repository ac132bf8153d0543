//! `tessera bench`: a load generator for tessera and, with the same code path, for etcd.
//!
//! `concurrency` tasks each keep one operation in flight (closed loop) — or, with `--rate`,
//! start operations on a fixed schedule and measure latency from the scheduled start, so a
//! stall shows up in the latencies instead of silently lowering the offered load (no
//! coordinated omission). Latencies go into an HDR histogram (microseconds); the report gives
//! throughput, p50/p90/p99/p99.9/max, errors by kind and client retries, as text and JSON.
//!
//! Workloads:
//! - `put`: overwrite keys chosen by `--distribution` among `--keys`;
//! - `get`: read them (linearizable, or `--serializable`); `--preload` writes them first;
//! - `mixed`: `--read-ratio` reads, the rest writes;
//! - `scan`: read `--scan-length` consecutive keys from a chosen key;
//! - `cas`: contended increments of `--cas-keys` counters: read, compare-and-swap on the
//!   version, retry on conflict; one operation = one successful increment;
//! - `metadata`: what a metadata service sees (many small records under prefixes): 60%
//!   session heartbeats (overwrite a small record), 15% member registrations (write under a
//!   service prefix), 15% listings of a service's members (prefix scan, up to 100), 10%
//!   leader-election rounds (read the service's leader key; create it with a CAS if absent,
//!   renew it with a CAS if held by this client, else nothing).
//!
//! Invariants:
//! - only operations that finish while measuring count: warm-up and the tail after the
//!   measured time are not in the report; a failed operation is counted by kind and never
//!   enters the latency histogram;
//! - with `--rate`, latency runs from the scheduled start, not the actual one;
//! - bench keys never start with 0xFF: the load stays out of the system keyspace;
//! - the arguments are checked before anything connects.

pub mod keys;
mod lease;
mod report;
pub mod target;
mod watch;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;

pub use keys::Distribution;
use keys::KeyChooser;
pub use report::Report;
pub use target::TargetKind;
use target::{OpError, Target};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    Put,
    Get,
    Mixed,
    Scan,
    Cas,
    Metadata,
    /// `--watchers` watchers on one prefix, writers at `--rate` puts/s under it: events
    /// delivered per second and latency from a write's answer to its event.
    Watch,
    /// `--sessions` leases of `--ttl` seconds, each with a registration key, kept alive at a
    /// third of the TTL: keep-alives per second and their latency.
    Lease,
}

#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub workload: Workload,
    /// The system under test.
    #[arg(long, value_enum, default_value = "tessera")]
    pub target: TargetKind,
    /// Comma-separated addresses (tessera nodes, or etcd client URLs as host:port).
    #[arg(long, short, default_value = "127.0.0.1:20160")]
    pub endpoints: String,
    /// Operations in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Client connections (tessera clients, or gRPC channels to etcd spread over the
    /// endpoints); operations are spread over them.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Bytes per key (at least the 21 bytes a bench key needs; 0 = 21).
    #[arg(long, default_value_t = 0)]
    pub key_size: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    #[arg(long, value_enum, default_value = "uniform")]
    pub distribution: Distribution,
    /// Measured seconds (after warm-up). Default 10, or 1 hour as a cap with --ops.
    #[arg(long)]
    pub duration: Option<u64>,
    /// Stop after this many measured operations (0 = run for --duration).
    #[arg(long, default_value_t = 0)]
    pub ops: u64,
    /// Target rate in operations per second over all tasks (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Fraction of reads in the mixed workload.
    #[arg(long, default_value_t = 0.5)]
    pub read_ratio: f64,
    /// Serve reads from any replica's local state (may be stale) instead of linearizably.
    #[arg(long)]
    pub serializable: bool,
    /// tessera only: one unary gRPC call per request, instead of the client's default of
    /// multiplexing every request to a node on one stream.
    #[arg(long)]
    pub unary: bool,
    /// Keys per scan.
    #[arg(long, default_value_t = 10)]
    pub scan_length: usize,
    /// Counters the cas workload contends on.
    #[arg(long, default_value_t = 16)]
    pub cas_keys: u64,
    /// Write every key once before a get, mixed or scan run.
    #[arg(long)]
    pub preload: bool,
    /// Watchers (watch workload).
    #[arg(long, default_value_t = 100)]
    pub watchers: usize,
    /// Sessions: leases with a registration key each (lease workload).
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Lease TTL in seconds (lease workload); renewed at a third of it.
    #[arg(long, default_value_t = 60)]
    pub ttl: u64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// tessera only: the CA of the nodes' certificates, for a cluster that speaks TLS.
    #[arg(long, value_name = "FILE")]
    pub cacert: Option<std::path::PathBuf>,
    /// tessera only: log in as this user, NAME:PASSWORD (a cluster with authentication on).
    #[arg(long, value_name = "NAME:PASSWORD")]
    pub user: Option<String>,
}

impl BenchArgs {
    /// How the clients reach the nodes: TLS (`None`: plaintext) and the user to log in as.
    pub fn access(&self) -> Result<target::Access, String> {
        let ca = self.cacert.as_deref();
        let tls = ca
            .map(|ca| crate::client::TlsOptions::from_files(ca, None, None))
            .transpose()?;
        let credentials = match &self.user {
            None => None,
            Some(u) => {
                let (user, password) = u.split_once(':').ok_or("--user takes NAME:PASSWORD")?;
                Some(crate::client::Credentials {
                    user: user.into(),
                    password: password.into(),
                })
            }
        };
        Ok(target::Access { tls, credentials })
    }
}

/// Bench key `i`: two bytes that spread keys over the whole user keyspace [0x0000, 0xFF00)
/// — every initial region gets traffic, and 0xFF (reserved for placement) never starts a
/// key — then a readable suffix, padded to `size` bytes.
pub fn key(i: u64, size: usize) -> Vec<u8> {
    let mut k = spread_prefix(i).to_vec();
    k.extend_from_slice(format!("/bench/{i:012}").as_bytes());
    k.resize(size.max(k.len()), b'k');
    k
}

fn spread_prefix(i: u64) -> [u8; 2] {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48;
    (((h * 0xFF00) >> 16) as u16).to_be_bytes()
}

/// The metadata workload's keys: each service's records share a prefix (hash-spread per
/// service, as a deployment that wants its services on different regions would do).
fn svc_prefix(svc: u64) -> Vec<u8> {
    let mut k = spread_prefix(svc).to_vec();
    k.extend_from_slice(format!("/svc/{svc:06}/").as_bytes());
    k
}

struct Shared {
    target: Target,
    args: BenchArgs,
    chooser: KeyChooser,
    value: Vec<u8>,
    measuring: AtomicBool,
    stop: AtomicBool,
    ops: AtomicU64,
    issued: AtomicU64,
    cas_conflicts: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    hist: Mutex<Histogram<u64>>,
    start: Instant,
}

impl Shared {
    fn error(&self, e: OpError) {
        *self
            .errors
            .lock()
            .expect("errors lock")
            .entry(e.0)
            .or_default() += 1;
    }
}

/// One operation of the workload on connection `conn` by task `task`.
async fn one_op(sh: &Shared, conn: usize, task: usize) -> Result<(), OpError> {
    let a = &sh.args;
    let (i, roll) = {
        let mut rng = rand::rng();
        (sh.chooser.next(&mut rng), rng.random::<f64>())
    };
    let t = &sh.target;
    match a.workload {
        Workload::Put => t.put(conn, &key(i, a.key_size), &sh.value).await,
        Workload::Get => t.get(conn, &key(i, a.key_size)).await.map(|_| ()),
        Workload::Mixed if roll < a.read_ratio => {
            t.get(conn, &key(i, a.key_size)).await.map(|_| ())
        }
        Workload::Mixed => t.put(conn, &key(i, a.key_size), &sh.value).await,
        Workload::Scan => {
            // `scan_length` consecutive keys from key i. The range is bounded to the
            // two-byte prefixes that hold about twice that many keys, not left open to the
            // end of the keyspace: an open range is what a user would not send, and etcd
            // counts every key of the range even with a limit (446 scans/s against 50,000
            // keys in the first comparison run, most of it spent counting).
            let start = key(i, a.key_size);
            let buckets = (a.scan_length as u64 * 2 * 0xFF00).div_ceil(a.keys.max(1));
            let end_prefix =
                (u64::from(u16::from_be_bytes([start[0], start[1]])) + buckets).min(0xFF00) as u16;
            t.scan(conn, &start, &end_prefix.to_be_bytes(), a.scan_length)
                .await
                .map(|_| ())
        }
        // Runs its own loop (`watch::run`), never this one.
        Workload::Watch | Workload::Lease => Err(OpError(
            "the watch and lease workloads run their own loops".into(),
        )),
        Workload::Cas => {
            let k = key(i % a.cas_keys.max(1), a.key_size);
            loop {
                let cur = t.get(conn, &k).await?;
                let (n, version) = match cur {
                    Some(v) => (parse_counter(&v.value) + 1, v.version),
                    None => (1, 0),
                };
                if t.cas(conn, &k, version, n.to_string().as_bytes()).await? {
                    return Ok(());
                }
                sh.cas_conflicts.fetch_add(1, Ordering::Relaxed);
                if sh.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
        }
        Workload::Metadata => {
            let services = (a.keys / 100).max(1);
            let svc = i % services;
            let prefix = svc_prefix(svc);
            if roll < 0.60 {
                let mut k = prefix.clone();
                k.extend_from_slice(format!("sessions/{:03}", i % 100).as_bytes());
                t.put(conn, &k, &sh.value[..sh.value.len().min(64)]).await
            } else if roll < 0.75 {
                let mut k = prefix.clone();
                k.extend_from_slice(format!("members/{:03}", i % 100).as_bytes());
                t.put(conn, &k, &sh.value).await
            } else if roll < 0.90 {
                let mut start = prefix.clone();
                start.extend_from_slice(b"members/");
                let mut end = prefix.clone();
                end.extend_from_slice(b"members0");
                t.scan(conn, &start, &end, 100).await.map(|_| ())
            } else {
                let mut k = prefix;
                k.extend_from_slice(b"leader");
                let me = format!("candidate-{task}");
                match t.get(conn, &k).await? {
                    None => {
                        if !t.cas(conn, &k, 0, me.as_bytes()).await? {
                            sh.cas_conflicts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(v) if v.value == me.as_bytes() => {
                        if !t.cas(conn, &k, v.version, me.as_bytes()).await? {
                            sh.cas_conflicts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(_) => {}
                }
                Ok(())
            }
        }
    }
}

fn parse_counter(v: &[u8]) -> u64 {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn worker(sh: Arc<Shared>, task: usize) {
    let conn = task % sh.target.connections();
    let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    while !sh.stop.load(Ordering::Relaxed) {
        let began = if sh.args.rate > 0.0 {
            // The n-th operation is due at start + n / rate; its latency counts from then.
            let n = sh.issued.fetch_add(1, Ordering::Relaxed);
            let due = sh.start + Duration::from_secs_f64(n as f64 / sh.args.rate);
            tokio::time::sleep_until(due.into()).await;
            due
        } else {
            Instant::now()
        };
        let res = one_op(&sh, conn, task).await;
        if !sh.measuring.load(Ordering::Relaxed) {
            continue;
        }
        match res {
            Ok(()) => {
                let _ = local.record(began.elapsed().as_micros().max(1) as u64);
                sh.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => sh.error(e),
        }
    }
    let _ = sh.hist.lock().expect("histogram lock").add(&local);
}

async fn preload(target: &Target, args: &BenchArgs, value: &[u8]) -> Result<(), String> {
    let next = AtomicU64::new(0);
    let one = |c: usize| {
        let next = &next;
        async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= args.keys {
                    return Ok::<(), String>(());
                }
                target
                    .put(c, &key(i, args.key_size), value)
                    .await
                    .map_err(|e| format!("preload: {}", e.0))?;
            }
        }
    };
    let tasks: Vec<_> = (0..args.concurrency.max(1)).map(one).collect();
    for r in futures::future::join_all(tasks).await {
        r?;
    }
    Ok(())
}

fn progress(done: f64, total: f64, ops: u64, rate_now: f64, tty: bool) {
    if tty {
        let width = 30usize;
        let filled = ((done / total.max(1e-9)) * width as f64).min(width as f64) as usize;
        eprint!(
            "\r[{}{}] {:>5.1}s {:>10} ops {:>9.0} ops/s ",
            "#".repeat(filled),
            "-".repeat(width - filled),
            done,
            ops,
            rate_now
        );
    } else {
        eprintln!("{done:>6.1}s {ops:>10} ops {rate_now:>9.0} ops/s");
    }
}

pub async fn run(args: BenchArgs) -> Result<Report, String> {
    if args.workload == Workload::Lease {
        return lease::run(args).await;
    }
    if args.workload == Workload::Watch {
        return watch::run(args).await;
    }
    if !(0.0..=1.0).contains(&args.read_ratio) {
        return Err("--read-ratio must be within 0..=1".into());
    }
    if args.rate < 0.0 || !args.rate.is_finite() {
        return Err("--rate must be a non-negative number".into());
    }
    let endpoints = crate::client::endpoint_list(&args.endpoints);
    if endpoints.is_empty() {
        return Err("no endpoints given".into());
    }
    let target = Target::connect(
        args.target,
        &endpoints,
        args.connections,
        args.serializable,
        args.unary,
        args.access()?,
    )
    .await?;
    let value = vec![b'v'; args.value_size];
    if args.preload
        && matches!(
            args.workload,
            Workload::Get | Workload::Mixed | Workload::Scan
        )
    {
        eprintln!("preloading {} keys...", args.keys);
        preload(&target, &args, &value).await?;
    }
    let duration =
        Duration::from_secs(
            args.duration
                .unwrap_or(if args.ops > 0 { 3600 } else { 10 }),
        );
    let sh = Arc::new(Shared {
        target,
        chooser: KeyChooser::new(args.keys, args.distribution),
        value,
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
        issued: AtomicU64::new(0),
        cas_conflicts: AtomicU64::new(0),
        errors: Mutex::default(),
        hist: Mutex::new(
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
        ),
        start: Instant::now(),
        args: args.clone(),
    });
    let tasks: Vec<_> = (0..args.concurrency.max(1))
        .map(|t| tokio::spawn(worker(sh.clone(), t)))
        .collect();
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let retries_before = sh.target.retries();
    let conflicts_before = sh.cas_conflicts.load(Ordering::Relaxed);
    sh.measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let (mut last_ops, mut last_t) = (0u64, Instant::now());
    let mut last_print = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ops = sh.ops.load(Ordering::Relaxed);
        if start.elapsed() >= duration || (args.ops > 0 && ops >= args.ops) {
            break;
        }
        let every = if tty { 1 } else { 5 };
        if last_print.elapsed() >= Duration::from_secs(every) {
            let now_rate = (ops - last_ops) as f64 / last_t.elapsed().as_secs_f64();
            let total = if args.ops > 0 {
                args.ops as f64
            } else {
                duration.as_secs_f64()
            };
            let done = if args.ops > 0 {
                ops as f64
            } else {
                start.elapsed().as_secs_f64()
            };
            progress(done, total, ops, now_rate, tty);
            (last_ops, last_t, last_print) = (ops, Instant::now(), Instant::now());
        }
    }
    sh.measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    sh.stop.store(true, Ordering::Relaxed);
    if tty {
        eprintln!();
    }
    for t in tasks {
        let _ = t.await;
    }
    let hist = sh.hist.lock().expect("histogram lock").clone();
    let errors = sh.errors.lock().expect("errors lock").clone();
    Ok(Report {
        ops: sh.ops.load(Ordering::Relaxed),
        elapsed,
        hist,
        errors,
        retries: sh.target.retries() - retries_before,
        cas_conflicts: sh.cas_conflicts.load(Ordering::Relaxed) - conflicts_before,
        args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_keys_avoid_the_system_keyspace_and_have_their_size() {
        for i in 0..200_000u64 {
            assert!(!crate::storage::keys::is_system_key(&key(i, 0)), "key {i}");
        }
        assert_eq!(key(7, 0).len(), 21);
        assert_eq!(key(7, 64).len(), 64);
        for s in 0..10_000 {
            assert!(!crate::storage::keys::is_system_key(&svc_prefix(s)));
        }
    }
}
