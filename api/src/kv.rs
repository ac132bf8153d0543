//! The compare-and-swap vocabulary: what a comparison checks and what a swap does. The
//! client builds these, the server logs and applies them; both convert through here.
//!
//! Invariants:
//! - [`Compare::matches`] is the one definition of a comparison: every replica applies it
//!   to the same record and decides the same way;
//! - `ModRevision(0)` and `Version(0)` match an absent key, as `Absent` does;
//! - `to_proto` and `from_proto` round-trip every comparison; a message without a target
//!   gives `None`, never a default comparison.

use crate::proto;

/// What a compare-and-swap compares the key's current state against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key must not exist.
    Absent,
    /// The key must exist with exactly this value.
    Value(Vec<u8>),
    /// The key's mod revision must be this (0 = the key must not exist).
    ModRevision(u64),
    /// The key's version must be this (0 = the key must not exist).
    Version(u64),
    /// The key must be attached to this lease (0 = to none; an absent key is attached to
    /// none).
    Lease(u64),
}

/// What a compare-and-swap does when its comparison holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasAction {
    Put(Vec<u8>),
    Delete,
}

impl Compare {
    pub fn to_proto(&self) -> proto::Compare {
        use proto::compare::Target;
        let t = match self {
            Compare::Absent => Target::Absent(true),
            Compare::Value(v) => Target::Value(v.clone()),
            Compare::ModRevision(r) => Target::ModRevision(*r),
            Compare::Version(v) => Target::Version(*v),
            Compare::Lease(l) => Target::Lease(*l),
        };
        proto::Compare { target: Some(t) }
    }

    /// The comparison a message carries; `None` if it carries none.
    pub fn from_proto(c: Option<&proto::Compare>) -> Option<Self> {
        use proto::compare::Target;
        match c.and_then(|c| c.target.as_ref())? {
            Target::Absent(_) => Some(Compare::Absent),
            Target::Value(v) => Some(Compare::Value(v.clone())),
            Target::ModRevision(r) => Some(Compare::ModRevision(*r)),
            Target::Version(v) => Some(Compare::Version(*v)),
            Target::Lease(l) => Some(Compare::Lease(*l)),
        }
    }

    /// Whether the key's current record satisfies the comparison.
    pub fn matches(&self, current: Option<&proto::KvRecord>) -> bool {
        match (self, current) {
            (Compare::Absent, cur) => cur.is_none(),
            (Compare::Value(v), Some(cur)) => &cur.value == v,
            (Compare::Value(_), None) => false,
            (Compare::ModRevision(r), cur) => cur.map_or(0, |c| c.mod_revision) == *r,
            (Compare::Version(v), cur) => cur.map_or(0, |c| c.version) == *v,
            (Compare::Lease(l), cur) => cur.map_or(0, |c| c.lease) == *l,
        }
    }
}
