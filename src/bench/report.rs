//! The report of one bench run: throughput, the latency histogram, retries and errors, as
//! text for people and as JSON (`--json`).

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::BenchArgs;

pub struct Report {
    pub args: BenchArgs,
    pub ops: u64,
    pub elapsed: Duration,
    pub hist: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
    pub retries: u64,
    /// Compare-and-swap attempts that lost a race (cas and metadata workloads).
    pub cas_conflicts: u64,
}

const PERCENTILES: [f64; 9] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99, 100.0];

impl Report {
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn name(&self) -> String {
        format!("{:?}", self.args.workload).to_lowercase()
    }

    pub fn text(&self) -> String {
        let a = &self.args;
        let mut s = format!(
            "{} {} ({} in flight, {} connections{}, {:?} keys of {}, {} B values): {} ops in {:.1}s = {:.0} ops/s\nlatency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\nretries {}",
            format!("{:?}", a.target).to_lowercase(),
            self.name(),
            a.concurrency,
            a.connections,
            if a.unary { " (unary calls)" } else { "" },
            a.distribution,
            a.keys,
            a.value_size,
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
        if self.cas_conflicts > 0 {
            s.push_str(&format!("  cas conflicts {}", self.cas_conflicts));
        }
        if self.errors.is_empty() {
            s.push_str("  errors 0");
        }
        for (k, v) in &self.errors {
            s.push_str(&format!("\nerrors {k}: {v}"));
        }
        s
    }

    pub fn json(&self) -> String {
        let a = &self.args;
        let percentiles: Vec<(f64, f64)> = PERCENTILES
            .iter()
            .map(|p| (*p, self.ms(p / 100.0)))
            .collect();
        serde_json::json!({
            "target": format!("{:?}", a.target).to_lowercase(),
            "workload": self.name(),
            "concurrency": a.concurrency,
            "connections": a.connections,
            "keys": a.keys,
            "value_size": a.value_size,
            "distribution": format!("{:?}", a.distribution).to_lowercase(),
            "rate": a.rate,
            "serializable": a.serializable,
            "unary": a.unary,
            "ops": self.ops,
            "seconds": self.elapsed.as_secs_f64(),
            "ops_per_sec": self.throughput(),
            "p50_ms": self.ms(0.5),
            "p90_ms": self.ms(0.9),
            "p99_ms": self.ms(0.99),
            "p999_ms": self.ms(0.999),
            "max_ms": self.hist.max() as f64 / 1000.0,
            "percentiles_ms": percentiles,
            "retries": self.retries,
            "cas_conflicts": self.cas_conflicts,
            "errors": self.errors,
        })
        .to_string()
    }
}
