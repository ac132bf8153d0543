//! `tessera bench`: a closed-loop load generator built on the client library.
//!
//! `concurrency` tasks each keep one request in flight for the run's duration (or until the
//! request count is reached). Latencies go into an HDR histogram (microseconds); the report
//! gives throughput, p50/p90/p99/p99.9/max and errors by kind, as text and optionally JSON.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;

use crate::client::{Client, ClientOptions};

#[cfg(test)]
mod tests {
    #[test]
    fn bench_keys_avoid_the_system_keyspace() {
        for i in 0..200_000u64 {
            assert!(
                !crate::storage::keys::is_system_key(&super::key(i)),
                "key {i}"
            );
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Writes of random keys.
    Put,
    /// Linearizable reads of random (preloaded) keys.
    Get,
    /// Reads and writes, `--read-ratio` of them reads.
    Mixed,
}

#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub workload: Workload,
    /// Comma-separated node addresses.
    #[arg(long, short, default_value = "127.0.0.1:20160")]
    pub endpoints: String,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Run time in seconds (after warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Fraction of reads in the mixed workload.
    #[arg(long, default_value_t = 0.5)]
    pub read_ratio: f64,
    /// Write every key once before a get or mixed run.
    #[arg(long)]
    pub preload: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub struct Report {
    pub ops: u64,
    pub elapsed: Duration,
    pub hist: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    pub retries: u64,
}

impl Report {
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn text(&self, name: &str) -> String {
        let mut s = format!(
            "{name}: {} ops in {:.1}s = {:.0} ops/s\nlatency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\nretries {}",
            self.ops,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.hist.max() as f64 / 1000.0,
            self.retries,
        );
        if self.errors.is_empty() {
            s.push_str("  errors 0");
        }
        for (k, v) in &self.errors {
            s.push_str(&format!("\nerrors {k}: {v}"));
        }
        s
    }

    pub fn json(&self, name: &str) -> String {
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("\"{}\":{v}", k.replace('"', "'")))
            .collect();
        format!(
            "{{\"workload\":\"{name}\",\"ops\":{},\"seconds\":{:.3},\"ops_per_sec\":{:.1},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},\"retries\":{},\"errors\":{{{}}}}}",
            self.ops,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.hist.max() as f64 / 1000.0,
            self.retries,
            errors.join(",")
        )
    }
}

pub fn key(i: u64) -> Vec<u8> {
    // Spread over the whole user keyspace [0x0000, 0xFF00) so every initial region gets
    // traffic (keys starting with 0xFF are reserved for placement): the first two bytes are a
    // hash-like spread of the index.
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 48;
    let spread = ((h * 0xFF00) >> 16) as u16;
    let mut k = spread.to_be_bytes().to_vec();
    k.extend_from_slice(format!("/bench/{i:012}").as_bytes());
    k
}

pub async fn run(args: BenchArgs) -> Result<Report, String> {
    let endpoints: Vec<String> = args
        .endpoints
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let client = Client::connect(&endpoints, ClientOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let value = vec![b'v'; args.value_size];
    if args.preload && args.workload != Workload::Put {
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..args.concurrency.max(1) {
            let (c, next, value, n) = (client.clone(), next.clone(), value.clone(), args.keys);
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), String>(());
                    }
                    c.put(&key(i), &value).await.map_err(|e| e.to_string())?;
                }
            }));
        }
        for t in tasks {
            t.await.map_err(|e| e.to_string())??;
        }
    }

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let errors: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let hist = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
    ));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (c, value) = (client.clone(), value.clone());
        let (measuring, stop, ops, errors, hist) = (
            measuring.clone(),
            stop.clone(),
            ops.clone(),
            errors.clone(),
            hist.clone(),
        );
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut local =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            while !stop.load(Ordering::Relaxed) {
                let (i, read) = {
                    let mut rng = rand::rng();
                    let read = match args.workload {
                        Workload::Put => false,
                        Workload::Get => true,
                        Workload::Mixed => rng.random_bool(args.read_ratio.clamp(0.0, 1.0)),
                    };
                    (rng.random_range(0..args.keys.max(1)), read)
                };
                let t = Instant::now();
                let res = if read {
                    c.get(&key(i)).await.map(|_| ())
                } else {
                    c.put(&key(i), &value).await.map(|_| ())
                };
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match res {
                    Ok(()) => {
                        let _ = local.record(t.elapsed().as_micros().max(1) as u64);
                        ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let kind = e
                            .to_string()
                            .split(':')
                            .next()
                            .unwrap_or("error")
                            .to_string();
                        *errors.lock().expect("errors lock").entry(kind).or_default() += 1;
                    }
                }
            }
            let _ = hist.lock().expect("histogram lock").add(&local);
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let retries_before = client.stats().retries.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    let total = Duration::from_secs(args.duration);
    while start.elapsed() < total {
        tokio::time::sleep(Duration::from_secs(1).min(total.saturating_sub(start.elapsed()))).await;
        eprint!(
            "\r{:>4.0}s  {:>9} ops  {:>9.0} ops/s",
            start.elapsed().as_secs_f64(),
            ops.load(Ordering::Relaxed),
            ops.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
        );
    }
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    eprintln!();
    for t in tasks {
        let _ = t.await;
    }
    let hist = hist.lock().expect("histogram lock").clone();
    let errors = errors.lock().expect("errors lock").clone();
    Ok(Report {
        ops: ops.load(Ordering::Relaxed),
        elapsed,
        hist,
        errors,
        retries: client.stats().retries.load(Ordering::Relaxed) - retries_before,
    })
}
