//! Identifier newtypes.
//!
//! Region, peer and node ids are all `u64` on the wire; keeping them as distinct types in
//! signatures stops a peer id from being passed where a region id is meant. Ids are never 0:
//! raft-rs reserves 0 for "none" (no leader, no vote).
//!
//! Invariants:
//! - the types only wrap a `u64` and check nothing: `From<u64>` and `Default` accept 0, so
//!   "never 0" is kept by whoever assigns ids (bootstrap, placement), not by these types;
//! - the types differ only in name and display prefix (`r`, `p`, `n`, `c`); turning one
//!   into another goes through `u64`, explicitly.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl $name {
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                $name(v)
            }
        }

        /// A number, with or without the display prefix (`7` or `r7` for region 7).
        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                s.strip_prefix($prefix)
                    .unwrap_or(s)
                    .parse::<u64>()
                    .map($name)
                    .map_err(|_| format!(concat!("{:?} is not a ", stringify!($name)), s))
            }
        }
    };
}

id_type!(
    /// One Raft group replicating one key range.
    RegionId,
    "r"
);
id_type!(
    /// One replica of a region; unique across the cluster (it is the raft-rs node id).
    PeerId,
    "p"
);
id_type!(
    /// One `tessera server` process with its own data directory.
    NodeId,
    "n"
);
id_type!(
    /// The cluster a node belongs to; a node refuses traffic and data of another cluster.
    ClusterId,
    "c"
);
