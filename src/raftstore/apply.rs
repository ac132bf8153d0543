//! The KV state machine: applies committed commands into the round's write batch.
//!
//! Invariants:
//! - apply is deterministic: the same entries on the same state give the same writes and
//!   results on every replica. A command that cannot apply (stale epoch, key outside the
//!   region, undecodable) is a deterministic *result*, not an error;
//! - data writes and the applied index go into the same batch (see `Peer::apply_entries`);
//! - a failure that is not deterministic (RocksDB read error) stops the node rather than
//!   letting replicas diverge.
//!
//! Several entries in one round may touch the same key before the batch is written, so reads
//! go through [`ApplyCtx::overlay`] first, then the engine.

use std::collections::HashMap;

use super::cmd::{ApplyResult, CasAction, Command};
use super::msg::{RegionError, Reply};
use crate::proto::{KeyValue, KvRecord};
use crate::storage::{keys, Cf, Engine, WriteBatch};

/// Per-round apply state shared by every region a worker applies in that round.
#[derive(Default)]
pub struct ApplyCtx {
    /// Data keys written into the current batch and not yet on disk. `None` = deleted.
    overlay: HashMap<Vec<u8>, Option<KvRecord>>,
    /// Answers to send once the batch is written.
    pub replies: Vec<(Reply<ApplyResult>, Result<ApplyResult, RegionError>)>,
    /// Entries applied this round (for metrics).
    pub applied_entries: u64,
}

impl ApplyCtx {
    /// Sends every collected answer. Call only after the batch is durable.
    pub fn send_replies(&mut self) {
        for (tx, res) in self.replies.drain(..) {
            let _ = tx.send(res);
        }
        self.overlay.clear();
    }

    fn current(&self, engine: &Engine, data_key: &[u8]) -> Option<KvRecord> {
        if let Some(v) = self.overlay.get(data_key) {
            return v.clone();
        }
        match engine.get_msg::<KvRecord>(Cf::Data, data_key) {
            Ok(v) => v,
            Err(e) => crate::fatal(&format!("apply cannot read {data_key:02x?}: {e}")),
        }
    }

    fn put(&mut self, wb: &mut WriteBatch<'_>, data_key: Vec<u8>, rec: KvRecord) {
        wb.put_msg(Cf::Data, &data_key, &rec);
        self.overlay.insert(data_key, Some(rec));
    }

    fn delete(&mut self, wb: &mut WriteBatch<'_>, data_key: Vec<u8>) {
        wb.delete(Cf::Data, &data_key);
        self.overlay.insert(data_key, None);
    }
}

pub fn key_value(key: &[u8], rec: KvRecord) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        value: rec.value,
        create_revision: rec.create_revision,
        mod_revision: rec.mod_revision,
        version: rec.version,
    }
}

/// Applies one command at raft index `revision`. The caller has checked epoch and range.
pub fn exec(
    cmd: Command,
    revision: u64,
    engine: &Engine,
    wb: &mut WriteBatch<'_>,
    ctx: &mut ApplyCtx,
) -> ApplyResult {
    let dkey = keys::data_key(cmd.key());
    let cur = ctx.current(engine, &dkey);
    let prev = cur.clone().map(|r| key_value(cmd.key(), r));
    let put_record = |value: Vec<u8>| KvRecord {
        value,
        create_revision: cur.as_ref().map_or(revision, |c| c.create_revision),
        mod_revision: revision,
        version: cur.as_ref().map_or(1, |c| c.version + 1),
    };
    match cmd {
        Command::Put { value, .. } => {
            let rec = put_record(value);
            ctx.put(wb, dkey, rec);
            ApplyResult::Put { prev, revision }
        }
        Command::Delete { .. } => {
            if cur.is_some() {
                ctx.delete(wb, dkey);
            }
            ApplyResult::Delete { prev, revision }
        }
        Command::CompareAndSwap {
            compare, action, ..
        } => {
            let succeeded = compare.matches(cur.as_ref());
            if succeeded {
                match action {
                    CasAction::Put(value) => {
                        let rec = put_record(value);
                        ctx.put(wb, dkey, rec);
                    }
                    CasAction::Delete => {
                        if cur.is_some() {
                            ctx.delete(wb, dkey);
                        }
                    }
                }
            }
            ApplyResult::Cas {
                succeeded,
                prev,
                revision,
            }
        }
    }
}
