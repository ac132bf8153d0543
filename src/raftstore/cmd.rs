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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        key: Vec<u8>,
    },
    CompareAndSwap {
        key: Vec<u8>,
        compare: Compare,
        action: CasAction,
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
}

impl Command {
    /// Every key the command writes.
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            Command::Put { key, .. }
            | Command::Delete { key }
            | Command::CompareAndSwap { key, .. } => vec![key],
            Command::Batch(ops) => ops.iter().map(|(k, _)| k.as_slice()).collect(),
            Command::Split { split_key, .. } => vec![split_key],
        }
    }

    /// Whether the command writes user data, and so takes a cluster revision from the
    /// timestamp oracle before it is proposed. System-key writes (placement's own records,
    /// the oracle's mark among them) and admin commands keep their raft index.
    pub fn needs_revision(&self) -> bool {
        match self {
            Command::Split { .. } => false,
            other => other.keys().iter().any(|k| !keys::is_system_key(k)),
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
    },
    /// The regions covering the split region's old range, in key order.
    Split {
        regions: Vec<proto::Region>,
    },
    /// The region after a membership change applied.
    ChangePeers {
        region: proto::Region,
    },
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
        Command::Put { key, value } => Cmd::Put(proto::PutCmd {
            key: key.clone(),
            value: value.clone(),
        }),
        Command::Delete { key } => Cmd::Delete(proto::DeleteCmd { key: key.clone() }),
        Command::CompareAndSwap {
            key,
            compare,
            action,
        } => Cmd::Cas(proto::CasCmd {
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
        },
        Cmd::Delete(d) => Command::Delete { key: d.key },
        Cmd::Cas(c) => Command::CompareAndSwap {
            compare: Compare::from_proto(c.compare.as_ref())
                .ok_or(DecodeError::Missing("compare target"))?,
            action: match c.action.ok_or(DecodeError::Missing("cas action"))? {
                proto::cas_cmd::Action::Put(v) => CasAction::Put(v),
                proto::cas_cmd::Action::Delete(_) => CasAction::Delete,
            },
            key: c.key,
        },
        Cmd::Batch(b) => Command::Batch(b.ops.into_iter().map(|o| (o.key, o.value)).collect()),
        Cmd::Split(s) => Command::Split {
            split_key: s.split_key,
            new_region_id: s.new_region_id,
            new_peer_ids: s.new_peer_ids,
        },
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

/// A key's stored record as the client sees it.
pub fn key_value(key: &[u8], rec: proto::KvRecord) -> proto::KeyValue {
    proto::KeyValue {
        key: key.to_vec(),
        value: rec.value,
        create_revision: rec.create_revision,
        mod_revision: rec.mod_revision,
        version: rec.version,
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
            (bytes.clone(), bytes.clone()).prop_map(|(key, value)| Command::Put { key, value }),
            bytes.clone().prop_map(|key| Command::Delete { key }),
            (bytes.clone(), compare, action).prop_map(|(key, compare, action)| {
                Command::CompareAndSwap {
                    key,
                    compare,
                    action,
                }
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
        };
        assert!(Compare::Absent.matches(None));
        assert!(!Compare::Absent.matches(Some(&rec)));
        assert!(Compare::Value(b"v".to_vec()).matches(Some(&rec)));
        assert!(!Compare::Value(b"w".to_vec()).matches(Some(&rec)));
        assert!(!Compare::Value(vec![]).matches(None));
        assert!(Compare::ModRevision(7).matches(Some(&rec)));
        assert!(Compare::ModRevision(0).matches(None));
        assert!(Compare::Version(2).matches(Some(&rec)));
        assert!(!Compare::Version(1).matches(Some(&rec)));
        assert!(decode(&[]).is_err());
    }
}
