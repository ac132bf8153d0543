//! Network faults on the links of this node, for the chaos tests: the kernel here has no
//! `netem`, so delay, loss and partitions are injected where raft messages leave the node.
//!
//! Each link is controlled by the fail point `net_to_<node id>` (set at start through
//! `FAILPOINTS` or at run time through `Node.SetFailpoint`), whose `return(...)` argument is a
//! comma-separated list:
//!
//! - `drop` — every message and snapshot to that node is lost, and [`super::Transport::probe`]
//!   finds the node unreachable: a partition in that direction only. Two nodes setting it for
//!   each other are cut apart; one node setting it for all others is isolated.
//! - `loss=P` — each raft message is lost with probability `P` (0..1).
//! - `delay=MS` or `delay=MIN-MAX` — each batch (and snapshot) waits that long, drawn
//!   uniformly, before it is sent; the link stays ordered, as a slow TCP link would.
//!
//! Without the `failpoints` feature none of this is compiled in: [`link`] is always `None`.
//!
//! Invariants:
//! - faults act only on what this node sends (raft batches, snapshots, probes), never on
//!   what it receives;
//! - a specification that does not parse as a whole is ignored as a whole (with a
//!   warning), never applied in part;
//! - a fault loses or delays messages; it never reorders or alters them.

use crate::ids::NodeId;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkFault {
    pub drop_all: bool,
    pub loss: f64,
    pub delay_ms: (u64, u64),
}

impl LinkFault {
    /// Parses the fail point's argument; `None` for anything it does not understand (the
    /// fail point is then ignored, with a warning).
    pub fn parse(spec: &str) -> Option<LinkFault> {
        let mut f = LinkFault::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None if part == "drop" => f.drop_all = true,
                Some(("loss", p)) => {
                    f.loss = p.parse().ok().filter(|p: &f64| (0.0..=1.0).contains(p))?
                }
                Some(("delay", d)) => {
                    f.delay_ms = match d.split_once('-') {
                        Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
                        None => {
                            let ms = d.parse().ok()?;
                            (ms, ms)
                        }
                    };
                    if f.delay_ms.0 > f.delay_ms.1 {
                        return None;
                    }
                }
                _ => return None,
            }
        }
        Some(f)
    }

    /// How long the next batch waits.
    pub fn delay(&self) -> std::time::Duration {
        let (lo, hi) = self.delay_ms;
        let ms = if hi > lo {
            rand::random_range(lo..=hi)
        } else {
            lo
        };
        std::time::Duration::from_millis(ms)
    }

    /// Whether one message is lost.
    pub fn lose(&self) -> bool {
        self.drop_all || (self.loss > 0.0 && rand::random::<f64>() < self.loss)
    }
}

/// The fault currently set on the link to `node`, if any.
#[cfg(feature = "failpoints")]
pub fn link(node: NodeId) -> Option<LinkFault> {
    let name = format!("net_to_{}", node.0);
    let spec = fail::eval(&name, |arg| arg.unwrap_or_default())?;
    let f = LinkFault::parse(&spec);
    if f.is_none() {
        tracing::warn!(name, spec, "unrecognised link fault ignored");
    }
    f
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn link(_node: NodeId) -> Option<LinkFault> {
    None
}

#[cfg(test)]
mod tests {
    use super::LinkFault;

    #[test]
    fn parses_link_faults() {
        assert_eq!(
            LinkFault::parse("drop"),
            Some(LinkFault {
                drop_all: true,
                ..Default::default()
            })
        );
        assert_eq!(
            LinkFault::parse("loss=0.1, delay=5-40"),
            Some(LinkFault {
                drop_all: false,
                loss: 0.1,
                delay_ms: (5, 40)
            })
        );
        assert_eq!(
            LinkFault::parse("delay=7").map(|f| f.delay_ms),
            Some((7, 7))
        );
        for bad in ["loss=2", "delay=9-3", "delay=x", "cut", "loss"] {
            assert_eq!(LinkFault::parse(bad), None, "{bad}");
        }
        let f = LinkFault::parse("delay=5-40").unwrap();
        for _ in 0..100 {
            let d = f.delay().as_millis();
            assert!((5..=40).contains(&d));
            assert!(!f.lose());
        }
        assert!(LinkFault::parse("drop").unwrap().lose());
    }
}
