//! The clock of leader leases: CLOCK_BOOTTIME.
//!
//! A lease is a promise that no other leader can exist before a deadline, so the deadline
//! must be measured on a clock that never runs slower than real time. `std::time::Instant`
//! is CLOCK_MONOTONIC on Linux, which stops while the system is suspended (clock_gettime(2)):
//! a leader whose host was suspended past its lease would resume believing the lease still
//! holds while the other nodes, whose clocks ran on, have elected another leader and taken
//! writes. CLOCK_BOOTTIME is CLOCK_MONOTONIC plus the time spent suspended, so the lease
//! ends on time. (A stopped process — SIGSTOP — is no such hole: both clocks run on.)
//!
//! Invariants:
//! - a `BootInstant` never goes backwards and counts time spent suspended;
//! - reading the clock cannot fail silently: a failure stops the node, with no fallback to
//!   another clock;
//! - subtracting a duration saturates at zero instead of panicking.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time on CLOCK_BOOTTIME (elapsed since boot, suspend included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BootInstant(Duration);

impl BootInstant {
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on every Linux
        // since 2.6.39.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        if rc != 0 {
            crate::fatal("clock_gettime(CLOCK_BOOTTIME) failed");
        }
        BootInstant(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(&self, earlier: BootInstant) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for BootInstant {
    type Output = BootInstant;
    fn add(self, d: Duration) -> BootInstant {
        BootInstant(self.0 + d)
    }
}

impl Sub<Duration> for BootInstant {
    type Output = BootInstant;
    fn sub(self, d: Duration) -> BootInstant {
        BootInstant(self.0.saturating_sub(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_at_least_as_fast_as_the_monotonic_clock() {
        let (b0, m0) = (BootInstant::now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (b1, m1) = (BootInstant::now(), std::time::Instant::now());
        let boot = b1.saturating_duration_since(b0);
        let mono = m1.duration_since(m0);
        assert!(boot >= Duration::from_millis(20));
        // Suspend is the only difference; none happens here, so they agree closely.
        assert!(
            boot + Duration::from_millis(5) >= mono,
            "{boot:?} vs {mono:?}"
        );
        assert!(b1 > b0 && b0 + boot == b1 && b1 - boot == b0);
    }
}
