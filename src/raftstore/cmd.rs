//! Commands that go through a region's raft log, and their results.
//!
//! Commands are Rust enums; the log stores them as `proto::RaftCommand`. The conversion is
//! here, in one place, and decoding is total: a malformed entry becomes an error value, the
//! same on every replica, never a panic.
//!
//! Invariants:
//! - `decode(encode(c, e))` gives back `(c, e)` for every command and envelope (tested);
//! - `decode` depends only on the bytes, never panics, and never returns a command without
//!   an epoch; what a caller does with an error is its own (an undecodable committed entry
//!   stops the node, see `peer::command`);
//! - a result's `revision` is the command's cluster revision (from the timestamp oracle,
//!   carried in the envelope) for user-data writes, and the raft index of its entry for
//!   system-key writes;
//! - `Split` is applied by the peer, never by `apply::exec`.

use crate::proto;
use crate::storage::keys;

pub use tessera_api::kv::{CasAction, Compare};

/// A write to a region's state machine.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        /// The lease the key is attached to (`None`: attached to none).
        lease: Option<Box<Attachment>>,
    },
    Delete {
        key: Vec<u8>,
    },
    CompareAndSwap {
        key: Vec<u8>,
        compare: Compare,
        action: CasAction,
        /// The lease a put attaches the key to (`None`: to none).
        lease: Option<Box<Attachment>>,
    },
    /// Puts (`Some(value)`) and deletes (`None`) of keys of one region, applied together at
    /// one revision.
    Batch(Vec<(Vec<u8>, Option<Vec<u8>>)>),
    /// Splits the region at `split_key`: the region keeps `[start, split_key)`, a new region
    /// `new_region_id` takes `[split_key, end)` with peers `new_peer_ids` on the same nodes,
    /// in the order of the region's peers. An admin command: the peer applies it, not
    /// [`super::apply::exec`].
    Split {
        split_key: Vec<u8>,
        new_region_id: u64,
        new_peer_ids: Vec<u64>,
    },
    /// A write to the lease keyspace (`lease`).
    Lease(LeaseCmd),
    /// A step of a region merge (applied by the peer, `peer::merge`). Boxed: every worker
    /// message is as large as the largest command.
    Merge(Box<proto::merge_cmd::Op>),
}

/// A put's lease: attached in the lease's region until `deadline_ms`, by when the put must
/// be proposed (docs/architecture.md, "Leases"). Boxed in commands: few puts carry one, and
/// every worker message is as large as the largest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub lease: u64,
    pub deadline_ms: u64,
}

/// The writes of the lease keyspace (applied by `apply::lease`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseCmd {
    Grant {
        id: u64,
        ttl_ms: u64,
    },
    /// Each live lease's deadline becomes the proposer's clock plus its TTL.
    Renew {
        ids: Vec<u64>,
    },
    /// Revokes the leases; an expiry (`deadlines_ms` non-empty, one per id) only those whose
    /// deadline is still the one given, and past.
    Revoke {
        ids: Vec<u64>,
        deadlines_ms: Vec<u64>,
    },
    /// Records that `key` is about to be put with lease `id`, if the lease is live; the put
    /// must be proposed within `window_ms`.
    Attach {
        id: u64,
        key: Vec<u8>,
        window_ms: u64,
    },
    /// Removes revoked leases whose keys are deleted: their records and attached rows.
    Remove {
        ids: Vec<u64>,
    },
}

impl LeaseCmd {
    pub fn ids(&self) -> Vec<u64> {
        match self {
            LeaseCmd::Grant { id, .. } | LeaseCmd::Attach { id, .. } => vec![*id],
            LeaseCmd::Renew { ids } | LeaseCmd::Revoke { ids, .. } | LeaseCmd::Remove { ids } => {
                ids.clone()
            }
        }
    }
}

impl Command {
    /// Every key the command writes.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        match self {
            Command::Lease(l) => l
                .ids()
                .into_iter()
                .map(tessera_api::keys::lease_key)
                .collect(),
            other => other.written().into_iter().map(<[u8]>::to_vec).collect(),
        }
    }

    /// The keys of the user and placement keyspaces the command writes.
    fn written(&self) -> Vec<&[u8]> {
        match self {
            Command::Put { key, .. }
            | Command::Delete { key }
            | Command::CompareAndSwap { key, .. } => vec![key],
            Command::Batch(ops) => ops.iter().map(|(k, _)| k.as_slice()).collect(),
            Command::Split { split_key, .. } => vec![split_key],
            Command::Lease(_) | Command::Merge(_) => Vec::new(),
        }
    }

    /// Whether the command writes user data, and so takes a cluster revision from the
    /// timestamp oracle before it is proposed. System-key writes (placement's own records,
    /// the oracle's mark among them) and admin commands keep their raft index.
    pub fn needs_revision(&self) -> bool {
        match self {
            Command::Split { .. } | Command::Lease(_) | Command::Merge(_) => false,
            other => other.written().iter().any(|k| !keys::is_system_key(k)),
        }
    }
}

/// What applying a command did, at `revision` (see the module's invariants).
#[derive(Clone, Debug, PartialEq)]
pub enum ApplyResult {
    Put {
        prev: Option<proto::KeyValue>,
        revision: u64,
    },
    Delete {
        prev: Option<proto::KeyValue>,
        revision: u64,
    },
    Cas {
        succeeded: bool,
        prev: Option<proto::KeyValue>,
        revision: u64,
    },
    Batch {
        revision: u64,
        /// The written keys' hashes, sorted (`session::key_hash`): a write id shared by the
        /// parts of a batch split over regions is told apart by its keys.
        keys: Vec<u64>,
    },
    /// A lease command: per lease id of the command, its TTL if it is live afterwards (and
    /// for a grant: was granted by it; for a revoke: was live before), else 0; and for an
    /// attach, the deadline of the put.
    Lease {
        ttls_ms: Vec<u64>,
        attach_deadline_ms: u64,
    },
    /// The regions covering the split region's old range, in key order.
    Split { regions: Vec<proto::Region> },
    /// The region after a membership change applied.
    ChangePeers { region: proto::Region },
    /// The region after a merge step applied.
    Merge { region: proto::Region },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("raft command does not decode: {0}")]
    Proto(String),
    #[error("raft command is missing its {0}")]
    Missing(&'static str),
}

/// What a logged command carries besides itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Envelope {
    /// The epoch it was proposed under (checked again at apply).
    pub epoch: proto::RegionEpoch,
    /// The client's id of the write (exactly-once, see `session`).
    pub write_id: Option<proto::WriteId>,
    /// The proposing leader's wall clock, ms since the Unix epoch (0 = not stamped).
    pub proposed_at_ms: u64,
    /// The proposing leader's write-record TTL in ms (see `session`).
    pub session_ttl_ms: u64,
    /// The write's cluster revision from the timestamp oracle (0 = none: a system-key
    /// write or an admin command, whose revision is its raft index).
    pub revision: u64,
}

impl Envelope {
    pub fn with_epoch(epoch: proto::RegionEpoch) -> Self {
        Self {
            epoch,
            ..Default::default()
        }
    }
}

/// Encodes a command with its envelope, as stored in the raft log.
pub fn encode(cmd: &Command, env: &Envelope) -> Vec<u8> {
    use proto::raft_command::Cmd;
    let c = match cmd {
        Command::Put { key, value, lease } => Cmd::Put(proto::PutCmd {
            key: key.clone(),
            value: value.clone(),
            lease: lease.as_ref().map_or(0, |a| a.lease),
            attach_deadline_ms: lease.as_ref().map_or(0, |a| a.deadline_ms),
        }),
        Command::Delete { key } => Cmd::Delete(proto::DeleteCmd { key: key.clone() }),
        Command::CompareAndSwap {
            key,
            compare,
            action,
            lease,
        } => Cmd::Cas(proto::CasCmd {
            lease: lease.as_ref().map_or(0, |a| a.lease),
            attach_deadline_ms: lease.as_ref().map_or(0, |a| a.deadline_ms),
            key: key.clone(),
            compare: Some(compare.to_proto()),
            action: Some(match action {
                CasAction::Put(v) => proto::cas_cmd::Action::Put(v.clone()),
                CasAction::Delete => proto::cas_cmd::Action::Delete(true),
            }),
        }),
        Command::Batch(ops) => Cmd::Batch(proto::BatchCmd {
            ops: ops
                .iter()
                .map(|(key, value)| proto::BatchWriteOp {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
        }),
        Command::Split {
            split_key,
            new_region_id,
            new_peer_ids,
        } => Cmd::Split(proto::SplitCmd {
            split_key: split_key.clone(),
            new_region_id: *new_region_id,
            new_peer_ids: new_peer_ids.clone(),
        }),
        Command::Lease(l) => Cmd::Lease(encode_lease(l)),
        Command::Merge(op) => Cmd::Merge(proto::MergeCmd {
            op: Some((**op).clone()),
        }),
    };
    prost::Message::encode_to_vec(&proto::RaftCommand {
        region_epoch: Some(env.epoch),
        cmd: Some(c),
        write_id: env.write_id,
        proposed_at_ms: env.proposed_at_ms,
        revision: env.revision,
        session_ttl_ms: env.session_ttl_ms,
    })
}

pub fn decode(data: &[u8]) -> Result<(Command, Envelope), DecodeError> {
    use proto::raft_command::Cmd;
    let rc = <proto::RaftCommand as prost::Message>::decode(data)
        .map_err(|e| DecodeError::Proto(e.to_string()))?;
    let epoch = rc.region_epoch.ok_or(DecodeError::Missing("epoch"))?;
    let cmd = match rc.cmd.ok_or(DecodeError::Missing("command"))? {
        Cmd::Put(p) => Command::Put {
            key: p.key,
            value: p.value,
            lease: (p.lease != 0).then(|| {
                Box::new(Attachment {
                    lease: p.lease,
                    deadline_ms: p.attach_deadline_ms,
                })
            }),
        },
        Cmd::Delete(d) => Command::Delete { key: d.key },
        Cmd::Cas(c) => Command::CompareAndSwap {
            compare: Compare::from_proto(c.compare.as_ref())
                .ok_or(DecodeError::Missing("compare target"))?,
            action: match c.action.ok_or(DecodeError::Missing("cas action"))? {
                proto::cas_cmd::Action::Put(v) => CasAction::Put(v),
                proto::cas_cmd::Action::Delete(_) => CasAction::Delete,
            },
            lease: (c.lease != 0).then(|| {
                Box::new(Attachment {
                    lease: c.lease,
                    deadline_ms: c.attach_deadline_ms,
                })
            }),
            key: c.key,
        },
        Cmd::Batch(b) => Command::Batch(b.ops.into_iter().map(|o| (o.key, o.value)).collect()),
        Cmd::Split(s) => Command::Split {
            split_key: s.split_key,
            new_region_id: s.new_region_id,
            new_peer_ids: s.new_peer_ids,
        },
        Cmd::Lease(l) => Command::Lease(decode_lease(l)?),
        Cmd::Merge(m) => Command::Merge(Box::new(m.op.ok_or(DecodeError::Missing("merge step"))?)),
    };
    let env = Envelope {
        epoch,
        write_id: rc.write_id,
        proposed_at_ms: rc.proposed_at_ms,
        revision: rc.revision,
        session_ttl_ms: rc.session_ttl_ms,
    };
    Ok((cmd, env))
}

fn encode_lease(l: &LeaseCmd) -> proto::LeaseCmd {
    use proto::lease_cmd::Op;
    let ids = |ids: &[u64]| proto::LeaseIds { ids: ids.to_vec() };
    let op = match l {
        LeaseCmd::Grant { id, ttl_ms } => Op::Grant(proto::LeaseGrantOp {
            id: *id,
            ttl_ms: *ttl_ms,
        }),
        LeaseCmd::Renew { ids: i } => Op::Renew(ids(i)),
        LeaseCmd::Revoke { ids, deadlines_ms } => Op::Revoke(proto::LeaseRevokeCmd {
            ids: ids.clone(),
            deadlines_ms: deadlines_ms.clone(),
        }),
        LeaseCmd::Attach { id, key, window_ms } => Op::Attach(proto::LeaseAttachCmd {
            id: *id,
            key: key.clone(),
            window_ms: *window_ms,
        }),
        LeaseCmd::Remove { ids: i } => Op::Remove(ids(i)),
    };
    proto::LeaseCmd { op: Some(op) }
}

fn decode_lease(l: proto::LeaseCmd) -> Result<LeaseCmd, DecodeError> {
    use proto::lease_cmd::Op;
    Ok(match l.op.ok_or(DecodeError::Missing("lease operation"))? {
        Op::Grant(g) => LeaseCmd::Grant {
            id: g.id,
            ttl_ms: g.ttl_ms,
        },
        Op::Renew(r) => LeaseCmd::Renew { ids: r.ids },
        Op::Revoke(r) => LeaseCmd::Revoke {
            ids: r.ids,
            deadlines_ms: r.deadlines_ms,
        },
        Op::Attach(a) => LeaseCmd::Attach {
            id: a.id,
            key: a.key,
            window_ms: a.window_ms,
        },
        Op::Remove(r) => LeaseCmd::Remove { ids: r.ids },
    })
}

/// A key's stored record as the client sees it.
pub fn key_value(key: &[u8], rec: proto::KvRecord) -> proto::KeyValue {
    proto::KeyValue {
        key: key.to_vec(),
        value: rec.value,
        create_revision: rec.create_revision,
        mod_revision: rec.mod_revision,
        version: rec.version,
        lease: rec.lease,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_cmd() -> impl Strategy<Value = Command> {
        let bytes = proptest::collection::vec(any::<u8>(), 0..16);
        let compare = prop_oneof![
            Just(Compare::Absent),
            bytes.clone().prop_map(Compare::Value),
            any::<u64>().prop_map(Compare::ModRevision),
            any::<u64>().prop_map(Compare::Version),
        ];
        let action = prop_oneof![
            bytes.clone().prop_map(CasAction::Put),
            Just(CasAction::Delete)
        ];
        prop_oneof![
            (
                bytes.clone(),
                bytes.clone(),
                proptest::option::of((1..u64::MAX, any::<u64>()))
            )
                .prop_map(|(key, value, l)| Command::Put {
                    key,
                    value,
                    lease: l
                        .map(|(lease, deadline_ms)| Box::new(Attachment { lease, deadline_ms })),
                }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(id, ttl_ms)| Command::Lease(LeaseCmd::Grant { id, ttl_ms })),
            proptest::collection::vec(any::<u64>(), 0..4)
                .prop_map(|ids| Command::Lease(LeaseCmd::Renew { ids })),
            (
                proptest::collection::vec(any::<u64>(), 0..4),
                proptest::collection::vec(any::<u64>(), 0..4)
            )
                .prop_map(|(ids, deadlines_ms)| Command::Lease(LeaseCmd::Revoke {
                    ids,
                    deadlines_ms
                })),
            (any::<u64>(), bytes.clone(), any::<u64>()).prop_map(|(id, key, window_ms)| {
                Command::Lease(LeaseCmd::Attach { id, key, window_ms })
            }),
            proptest::collection::vec(any::<u64>(), 0..4)
                .prop_map(|ids| Command::Lease(LeaseCmd::Remove { ids })),
            bytes.clone().prop_map(|key| Command::Delete { key }),
            (
                bytes.clone(),
                compare,
                action,
                proptest::option::of((1..u64::MAX, any::<u64>()))
            )
                .prop_map(|(key, compare, action, l)| Command::CompareAndSwap {
                    key,
                    compare,
                    action,
                    lease: l
                        .map(|(lease, deadline_ms)| Box::new(Attachment { lease, deadline_ms })),
                }),
            proptest::collection::vec((bytes.clone(), proptest::option::of(bytes.clone())), 0..4)
                .prop_map(Command::Batch),
            (
                bytes,
                any::<u64>(),
                proptest::collection::vec(any::<u64>(), 0..4)
            )
                .prop_map(|(split_key, new_region_id, new_peer_ids)| Command::Split {
                    split_key,
                    new_region_id,
                    new_peer_ids,
                }),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(source_id, conf_ver, version)| {
                    Command::Merge(Box::new(proto::merge_cmd::Op::Lock(proto::MergeLockOp {
                        source_id,
                        source_epoch: Some(proto::RegionEpoch { conf_ver, version }),
                    })))
                }
            ),
            any::<u64>().prop_map(|id| {
                Command::Merge(Box::new(proto::merge_cmd::Op::Unlock(proto::MergeLockOp {
                    source_id: id,
                    source_epoch: None,
                })))
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(
            cmd in arb_cmd(),
            v in any::<u64>(),
            c in any::<u64>(),
            w in proptest::option::of((1..u64::MAX, 1..u64::MAX, any::<u64>())),
            at in any::<u64>(),
            ttl in any::<u64>(),
            revision in any::<u64>(),
        ) {
            let env = Envelope {
                epoch: proto::RegionEpoch { conf_ver: c, version: v },
                write_id: w.map(|(client_id, seq, f)| proto::WriteId {
                    client_id,
                    seq,
                    first_incomplete: f % seq,
                }),
                proposed_at_ms: at,
                session_ttl_ms: ttl,
                revision,
            };
            let (back, e) = decode(&encode(&cmd, &env)).unwrap();
            prop_assert_eq!(back, cmd);
            prop_assert_eq!(e, env);
        }

        /// Garbage never panics; it decodes to an error (or, rarely, a valid command).
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&data);
        }
    }

    #[test]
    fn compare_semantics() {
        let rec = proto::KvRecord {
            value: b"v".to_vec(),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            lease: 9,
        };
        assert!(Compare::Absent.matches(None));
        assert!(!Compare::Absent.matches(Some(&rec)));
        assert!(Compare::Value(b"v".to_vec()).matches(Some(&rec)));
        assert!(!Compare::Value(b"w".to_vec()).matches(Some(&rec)));
        assert!(!Compare::Value(vec![]).matches(None));
        assert!(Compare::ModRevision(7).matches(Some(&rec)));
        assert!(Compare::ModRevision(0).matches(None));
        assert!(Compare::Lease(9).matches(Some(&rec)));
        assert!(!Compare::Lease(8).matches(Some(&rec)));
        assert!(Compare::Lease(0).matches(None));
        assert!(Compare::Version(2).matches(Some(&rec)));
        assert!(!Compare::Version(1).matches(Some(&rec)));
        assert!(decode(&[]).is_err());
    }
}
