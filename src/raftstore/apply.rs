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
use prost::Message as _;

/// Per-round apply state shared by every region a worker applies in that round.
#[derive(Default)]
pub struct ApplyCtx {
    /// Data keys written into the current batch and not yet on disk. `None` = deleted.
    overlay: HashMap<Vec<u8>, Option<KvRecord>>,
    /// Answers to send once the batch is written.
    pub replies: Vec<(Reply<ApplyResult>, Result<ApplyResult, RegionError>)>,
    /// Entries applied this round (for metrics).
    pub applied_entries: u64,
    /// Change of the applying region's live keys and bytes; the peer takes it after each
    /// command.
    pub delta_keys: i64,
    pub delta_bytes: i64,
    /// Peers of regions created by splits applied this round, with whether to campaign at
    /// once. The worker starts them after the batch holding their state is written.
    pub new_peers: Vec<(super::peer::Peer, bool)>,
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

    fn put(
        &mut self,
        wb: &mut WriteBatch<'_>,
        data_key: Vec<u8>,
        old: Option<&KvRecord>,
        rec: KvRecord,
    ) {
        let key_len = data_key.len() as i64 - 1;
        match old {
            Some(o) => self.delta_bytes -= key_len + o.encoded_len() as i64,
            None => self.delta_keys += 1,
        }
        self.delta_bytes += key_len + rec.encoded_len() as i64;
        wb.put_msg(Cf::Data, &data_key, &rec);
        self.overlay.insert(data_key, Some(rec));
    }

    /// Deletes the key if it exists.
    fn delete(&mut self, wb: &mut WriteBatch<'_>, data_key: Vec<u8>, old: Option<&KvRecord>) {
        let Some(o) = old else { return };
        self.delta_keys -= 1;
        self.delta_bytes -= data_key.len() as i64 - 1 + o.encoded_len() as i64;
        wb.delete(Cf::Data, &data_key);
        self.overlay.insert(data_key, None);
    }

    /// The size a stored key counts for in region statistics: user key plus record.
    pub fn stored_size(data_key_len: usize, value_len: usize) -> u64 {
        (data_key_len.saturating_sub(1) + value_len) as u64
    }
}

fn put_record(cur: Option<&KvRecord>, value: Vec<u8>, revision: u64) -> KvRecord {
    KvRecord {
        value,
        create_revision: cur.map_or(revision, |c| c.create_revision),
        mod_revision: revision,
        version: cur.map_or(1, |c| c.version + 1),
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
    match cmd {
        Command::Put { key, value } => {
            let dkey = keys::data_key(&key);
            let cur = ctx.current(engine, &dkey);
            let rec = put_record(cur.as_ref(), value, revision);
            ctx.put(wb, dkey, cur.as_ref(), rec);
            let prev = cur.map(|r| key_value(&key, r));
            ApplyResult::Put { prev, revision }
        }
        Command::Delete { key } => {
            let dkey = keys::data_key(&key);
            let cur = ctx.current(engine, &dkey);
            ctx.delete(wb, dkey, cur.as_ref());
            let prev = cur.map(|r| key_value(&key, r));
            ApplyResult::Delete { prev, revision }
        }
        Command::CompareAndSwap {
            key,
            compare,
            action,
        } => {
            let dkey = keys::data_key(&key);
            let cur = ctx.current(engine, &dkey);
            let succeeded = compare.matches(cur.as_ref());
            if succeeded {
                match action {
                    CasAction::Put(value) => {
                        let rec = put_record(cur.as_ref(), value, revision);
                        ctx.put(wb, dkey, cur.as_ref(), rec);
                    }
                    CasAction::Delete => ctx.delete(wb, dkey, cur.as_ref()),
                }
            }
            ApplyResult::Cas {
                succeeded,
                prev: cur.map(|r| key_value(&key, r)),
                revision,
            }
        }
        Command::Batch(ops) => {
            for (key, value) in ops {
                let dkey = keys::data_key(&key);
                let cur = ctx.current(engine, &dkey);
                match value {
                    Some(v) => {
                        let rec = put_record(cur.as_ref(), v, revision);
                        ctx.put(wb, dkey, cur.as_ref(), rec);
                    }
                    None => ctx.delete(wb, dkey, cur.as_ref()),
                }
            }
            ApplyResult::Batch { revision }
        }
        // Admin commands change the region, not its data: the peer applies them.
        Command::Split { .. } => crate::fatal("invariant: a split reached the data apply path"),
    }
}

/// Live keys and bytes of the data keys in `[start, end)` as this round's apply sees them:
/// the engine's contents with the round's unwritten changes laid over them. Used to divide
/// a region's statistics at a split, identically on every replica.
pub fn range_stats(engine: &Engine, ctx: &ApplyCtx, start: &[u8], end: &[u8]) -> (u64, u64) {
    let size = |k: &[u8], v_len: usize| ApplyCtx::stored_size(k.len(), v_len) as i64;
    let (mut keys, mut bytes) = (0i64, 0i64);
    let scanned = engine.scan(Cf::Data, start, end, |k, v| {
        keys += 1;
        bytes += size(k, v.len());
        Ok(true)
    });
    if let Err(e) = scanned {
        crate::fatal(&format!("split cannot scan its range: {e}"));
    }
    for (k, new) in ctx.overlay.iter() {
        if k.as_slice() < start || (!end.is_empty() && k.as_slice() >= end) {
            continue;
        }
        let old = match engine.get(Cf::Data, k) {
            Ok(v) => v,
            Err(e) => crate::fatal(&format!("split cannot read {k:02x?}: {e}")),
        };
        if let Some(o) = old {
            keys -= 1;
            bytes -= size(k, o.len());
        }
        if let Some(n) = new {
            keys += 1;
            bytes += size(k, n.encoded_len());
        }
    }
    (keys.max(0) as u64, bytes.max(0) as u64)
}
