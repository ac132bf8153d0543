//! The history of user keys (docs/architecture.md, "History and compaction").
//!
//! Every write of a user key also writes a history row in the `history` column family:
//! `esc(key) ‖ revision (8 bytes, big-endian)` → the key's record as of that revision; a
//! delete writes a tombstone (a record with version 0; live records have version ≥ 1). `esc`
//! is an order-preserving, prefix-free escape (0x00 → 0x00 0xFF, then a 0x00 0x01
//! terminator), so one key's rows are contiguous and in revision order, and no other key's
//! rows sort among them. The current record stays in the data family as before: reads of the
//! present never touch history.
//!
//! Reading key K at revision R is the newest row of K with revision ≤ R. Compacting at C
//! removes, per key, every row below C except the newest one at or below C — and that one
//! too when it is a tombstone — so every read at a revision ≥ C still finds what it found
//! before. Reads below the compacted revision are refused (`Compacted`).
//!
//! Invariants:
//! - history rows are written in the same batch as the write they record (apply), and only
//!   for user keys (the system keyspace keeps no history);
//! - a key's rows are exactly its applied writes at or above the compacted revision, plus at
//!   most one older row (its state at the compacted revision);
//! - the node's compacted revision only rises; it is stored before any row is removed.

use std::collections::BTreeMap;

use super::keys::{self, COMPACTED_KEY};
use super::{Cf, Engine, Error, WriteBatch};
use crate::proto::{KvRecord, Region, SnapshotKv};

/// Bound above every history row (user keys never start with 0xFF: that is the system
/// keyspace, which keeps no history).
const END_OF_HISTORY: &[u8] = &[0xFF];

/// Appends the escaped form of `key` to `out`.
fn escape(key: &[u8], out: &mut Vec<u8>) {
    for &b in key {
        out.push(b);
        if b == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// The escaped key and where it ends in `row`, or `None` if `row` is not a history row.
fn unescape(row: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut key = Vec::with_capacity(row.len());
    let mut i = 0;
    while i + 1 < row.len() {
        match (row[i], row[i + 1]) {
            (0, 1) => return Some((key, i + 2)),
            (0, 0xFF) => {
                key.push(0);
                i += 2;
            }
            (0, _) => return None,
            (b, _) => {
                key.push(b);
                i += 1;
            }
        }
    }
    None
}

/// The history row key of `key` at `revision`.
pub fn history_key(key: &[u8], revision: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 10);
    escape(key, &mut k);
    k.extend_from_slice(&revision.to_be_bytes());
    k
}

/// Every row of `key` starts with this.
fn key_prefix(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 2);
    escape(key, &mut k);
    k
}

/// The rows of the keys in `[start, end)` (empty `end` = to the end of the user keyspace).
pub fn range_bounds(start: &[u8], end: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let hi = if end.is_empty() {
        END_OF_HISTORY.to_vec()
    } else {
        key_prefix(end)
    };
    (key_prefix(start), hi)
}

/// Removes the rows of every key in `[start, end)` (a region's range: its data went).
pub fn delete_range(wb: &mut WriteBatch<'_>, start: &[u8], end: &[u8]) {
    let (lo, hi) = range_bounds(start, end);
    // The system keyspace's range has no rows (and bounds that do not ascend).
    if lo < hi {
        wb.delete_range(Cf::History, &lo, &hi);
    }
}

/// Whether every row (of a snapshot) is a history row of a key in `region`.
pub fn rows_within(rows: &[SnapshotKv], region: &Region) -> bool {
    rows.iter().all(|row| {
        parse_history_key(&row.key)
            .is_some_and(|(k, _)| keys::in_range(&k, &region.start_key, &region.end_key))
    })
}

/// Replaces the history of `region`'s keys with a snapshot's `rows` (checked with
/// [`rows_within`]). The sender may have compacted further than this node (at
/// `compacted`): its rows below that are gone, so this node refuses reads below it too.
pub fn replace_range(
    wb: &mut WriteBatch<'_>,
    region: &Region,
    rows: &[SnapshotKv],
    compacted: u64,
) -> Result<(), Error> {
    delete_range(wb, &region.start_key, &region.end_key);
    for row in rows {
        wb.put(Cf::History, &row.key, &row.value);
    }
    if compacted > wb.engine().compacted_revision() {
        // Stored at once (before the batch): refusing reads early is harmless.
        wb.engine().raise_compacted_revision(compacted)?;
    }
    Ok(())
}

/// The user key and revision of a history row.
pub fn parse_history_key(row: &[u8]) -> Option<(Vec<u8>, u64)> {
    let (key, at) = unescape(row)?;
    let rev: [u8; 8] = row.get(at..)?.try_into().ok()?;
    Some((key, u64::from_be_bytes(rev)))
}

/// The record a delete leaves in history.
pub fn tombstone(revision: u64) -> KvRecord {
    KvRecord {
        value: Vec::new(),
        create_revision: 0,
        mod_revision: revision,
        version: 0,
        lease: 0,
    }
}

pub fn is_tombstone(rec: &KvRecord) -> bool {
    rec.version == 0
}

/// Adds `key`'s record as of `revision` (a tombstone for a delete) to the batch.
pub fn record(wb: &mut WriteBatch<'_>, key: &[u8], revision: u64, rec: &KvRecord) {
    wb.put_msg(Cf::History, &history_key(key, revision), rec);
}

/// `key` as of `revision`: its newest row at or below it, unless that is a tombstone.
pub fn get_at(engine: &Engine, key: &[u8], revision: u64) -> Result<Option<KvRecord>, Error> {
    let lo = history_key(key, 0);
    let hi = history_key(key, revision.saturating_add(1));
    let Some((k, v)) = engine.last_entry(Cf::History, &lo, &hi)? else {
        return Ok(None);
    };
    let rec: KvRecord = prost::Message::decode(v.as_slice()).map_err(|e| Error::corrupt(&k, e))?;
    Ok((!is_tombstone(&rec)).then_some(rec))
}

/// Calls `f` with each key in `[start, end)` that exists at `revision`, in key order, with
/// its record then, until `f` returns `Ok(false)`. Per key it jumps to the newest row at or
/// below `revision` and then past the key's other rows: the cost is per key, not per
/// version.
pub fn scan_at(
    engine: &Engine,
    start: &[u8],
    end: &[u8],
    revision: u64,
    mut f: impl FnMut(Vec<u8>, KvRecord) -> Result<bool, Error>,
) -> Result<(), Error> {
    let (lo, hi) = range_bounds(start, end);
    if lo >= hi {
        return Ok(());
    }
    let mut cur = engine.cursor(Cf::History, &lo, &hi);
    cur.seek(&lo);
    loop {
        let key = match cur.entry()? {
            None => return Ok(()),
            Some((k, _)) => {
                parse_history_key(k)
                    .ok_or_else(|| Error::corrupt(k, "not a history row"))?
                    .0
            }
        };
        cur.seek_for_prev(&history_key(&key, revision));
        if let Some((k, v)) = cur.entry()? {
            let (row_key, _) =
                parse_history_key(k).ok_or_else(|| Error::corrupt(k, "not a history row"))?;
            if row_key == key {
                let rec: KvRecord = prost::Message::decode(v).map_err(|e| Error::corrupt(k, e))?;
                if !is_tombstone(&rec) && !f(key.clone(), rec)? {
                    return Ok(());
                }
            }
        }
        // Past every row of this key: the first row after its newest possible revision.
        cur.seek(&history_key(&key, u64::MAX));
        if let Some((k, _)) = cur.entry()? {
            if parse_history_key(k).is_some_and(|(row_key, _)| row_key == key) {
                cur.next();
            }
        }
    }
}

/// This node's compacted revision (0 = never compacted).
pub fn load_compacted(engine: &Engine) -> Result<u64, Error> {
    match engine.get(Cf::Raft, &COMPACTED_KEY)? {
        None => Ok(0),
        Some(v) => v
            .as_slice()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| Error::corrupt(&COMPACTED_KEY, "compacted revision is not 8 bytes")),
    }
}

/// Puts the compacted revision in a batch: only `Engine::raise_compacted_revision` (which
/// keeps it rising) and tests call this.
pub fn store_compacted(wb: &mut WriteBatch<'_>, revision: u64) {
    wb.put(Cf::Raft, &COMPACTED_KEY, &revision.to_be_bytes());
}

/// Rows removed per write batch while compacting.
const COMPACT_BATCH: usize = 4096;

/// Removes the history below `revision` that no read at or above it needs. Runs beside
/// the writers (it removes only rows that newer rows already supersede, and writers only
/// add rows above it); returns how many rows it removed.
pub fn compact(engine: &Engine, revision: u64) -> Result<u64, Error> {
    let mut removed = 0u64;
    let mut doomed: Vec<Vec<u8>> = Vec::new();
    // The newest row below `revision` of the key being read, and whether it is a
    // tombstone: dropped as soon as a newer row at or below `revision` appears.
    let mut keep: Option<(Vec<u8>, Vec<u8>, bool)> = None;
    let flush = |doomed: &mut Vec<Vec<u8>>, removed: &mut u64| -> Result<(), Error> {
        if doomed.is_empty() {
            return Ok(());
        }
        let mut wb = engine.batch();
        for k in doomed.drain(..) {
            wb.delete(Cf::History, &k);
            *removed += 1;
        }
        engine.write(wb, false)
    };
    engine.scan(Cf::History, &[], END_OF_HISTORY, |k, v| {
        let (key, rev) =
            parse_history_key(k).ok_or_else(|| Error::corrupt(k, "not a history row"))?;
        let same_key = keep.as_ref().is_some_and(|(kk, _, _)| *kk == key);
        if !same_key {
            // The previous key's newest old row stays, unless it records a delete.
            if let Some((_, row, true)) = keep.take() {
                doomed.push(row);
            }
        }
        if rev <= revision {
            if let Some((_, older, _)) = keep.take().filter(|_| same_key) {
                doomed.push(older);
            }
            let rec: KvRecord = prost::Message::decode(v).map_err(|e| Error::corrupt(k, e))?;
            keep = Some((key, k.to_vec(), is_tombstone(&rec)));
        } else if same_key {
            // A newer row exists: the kept one stays only if it is a live record.
            if let Some((_, row, true)) = keep.take() {
                doomed.push(row);
            }
        }
        if doomed.len() >= COMPACT_BATCH {
            flush(&mut doomed, &mut removed)?;
        }
        Ok(true)
    })?;
    if let Some((_, row, true)) = keep.take() {
        doomed.push(row);
    }
    flush(&mut doomed, &mut removed)?;
    Ok(removed)
}

/// A key's change at a revision, with its record before (for watchers reading history).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub key: Vec<u8>,
    /// The key's record as of the change (a tombstone for a delete).
    pub record: KvRecord,
    /// Its record just before, if it existed then.
    pub prev: Option<KvRecord>,
}

/// The changes of the keys in `[start, end)` with revisions in `[from, to]`, by revision,
/// each revision's changes in key order (the rows' order). At most about `limit` changes: when there are
/// more, only the lowest revisions are returned, every change of each (at least one
/// revision, however many changes it has), and the second value is the last revision the
/// result covers completely (`to` when nothing was left out). Per key it jumps to its
/// first row at or above `from`, so keys without changes cost one seek.
pub fn changes(
    engine: &Engine,
    start: &[u8],
    end: &[u8],
    from: u64,
    to: u64,
    limit: usize,
) -> Result<(BTreeMap<u64, Vec<Change>>, u64), Error> {
    let mut out: BTreeMap<u64, Vec<Change>> = BTreeMap::new();
    let mut upto = to;
    let mut held = 0usize;
    let (lo, hi) = range_bounds(start, end);
    if lo >= hi || from == 0 || from > to {
        return Ok((out, upto));
    }
    let row_of =
        |k: &[u8]| parse_history_key(k).ok_or_else(|| Error::corrupt(k, "not a history row"));
    let mut cur = engine.cursor(Cf::History, &lo, &hi);
    cur.seek(&lo);
    loop {
        let key = match cur.entry()? {
            None => return Ok((out, upto)),
            Some((k, _)) => row_of(k)?.0,
        };
        // The key's record before `from`.
        cur.seek_for_prev(&history_key(&key, from - 1));
        let mut prev = match cur.entry()? {
            Some((k, v)) if row_of(k)?.0 == key => {
                let rec: KvRecord = prost::Message::decode(v).map_err(|e| Error::corrupt(k, e))?;
                (!is_tombstone(&rec)).then_some(rec)
            }
            _ => None,
        };
        cur.seek(&history_key(&key, from));
        while let Some((k, v)) = cur.entry()? {
            let (row_key, rev) = row_of(k)?;
            if row_key != key || rev > upto {
                break;
            }
            let rec: KvRecord = prost::Message::decode(v).map_err(|e| Error::corrupt(k, e))?;
            let next_prev = (!is_tombstone(&rec)).then(|| rec.clone());
            out.entry(rev).or_default().push(Change {
                key: key.clone(),
                record: rec,
                prev: std::mem::replace(&mut prev, next_prev),
            });
            held += 1;
            // Over the limit: drop whole revisions from the top while more than one is left.
            while held > limit && out.len() > 1 {
                let (rev, dropped) = out.pop_last().expect("more than one revision");
                held -= dropped.len();
                upto = rev - 1;
            }
            cur.next();
        }
        // Past every row of this key.
        cur.seek(&history_key(&key, u64::MAX));
        if let Some((k, _)) = cur.entry()? {
            if row_of(k)?.0 == key {
                cur.next();
            }
        }
    }
}

#[cfg(test)]
mod tests;
