//! Which key an operation touches: uniform, zipfian (YCSB's generator, skew 0.99) or
//! sequential over `n` keys.
//!
//! Invariants:
//! - every choice is in `0..n` (`n` taken as at least 1); sequential wraps around;
//! - zipfian rank 0 is the hottest; spreading ranks over the keyspace is the caller's job;
//! - the zipfian set-up is O(n), once; each sample is O(1).

use rand::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Distribution {
    Uniform,
    /// A few keys take most of the traffic (YCSB's zipfian, theta 0.99).
    Zipfian,
    /// Keys in order, wrapping around.
    Sequential,
}

pub struct KeyChooser {
    n: u64,
    dist: Distribution,
    zipf: Option<Zipf>,
    next: std::sync::atomic::AtomicU64,
}

impl KeyChooser {
    pub fn new(n: u64, dist: Distribution) -> Self {
        let n = n.max(1);
        Self {
            n,
            dist,
            zipf: (dist == Distribution::Zipfian).then(|| Zipf::new(n, 0.99)),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match (&self.dist, &self.zipf) {
            (Distribution::Sequential, _) => {
                self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.n
            }
            (Distribution::Zipfian, Some(z)) => z.sample(rng),
            _ => rng.random_range(0..self.n),
        }
    }
}

/// Gray et al.'s method as used by YCSB: constant-time samples after an O(n) set-up.
/// Rank 0 is the hottest; the caller's key function spreads ranks over the keyspace.
struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

impl Zipf {
    fn new(n: u64, theta: f64) -> Self {
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2.min(n), theta);
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Self {
            n,
            theta,
            alpha,
            zetan,
            eta,
        }
    }

    fn sample(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        let v = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        v.min(self.n - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_stay_in_range_and_have_their_shape() {
        let mut rng = rand::rng();
        let n = 1000;
        for d in [
            Distribution::Uniform,
            Distribution::Zipfian,
            Distribution::Sequential,
        ] {
            let c = KeyChooser::new(n, d);
            let mut counts = vec![0u32; n as usize];
            for _ in 0..100_000 {
                let k = c.next(&mut rng);
                assert!(k < n);
                counts[k as usize] += 1;
            }
            let top = *counts.iter().max().unwrap();
            match d {
                // 100 per key on average; uniform stays well under 2x that.
                Distribution::Uniform => assert!(top < 200, "{top}"),
                // Zipf 0.99 over 1000 keys: the hottest key gets ~13% of the traffic.
                Distribution::Zipfian => {
                    assert!(top > 8_000, "{top}");
                    assert_eq!(counts[0], top);
                }
                Distribution::Sequential => assert!(counts.iter().all(|c| *c == 100)),
            }
        }
    }
}
