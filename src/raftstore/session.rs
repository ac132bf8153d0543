//! Exactly-once writes: each region's record of the writes it applied, per client.
//!
//! A client numbers its writes (`WriteId { client_id, seq, first_incomplete }`) and sends a
//! retry of a write with the same id. When a write applies, the region records its answer
//! under `(client, seq)`; a write whose id is already recorded is answered from the record
//! and applies nothing (Raft dissertation §6.3, extended to many writes in flight per
//! client: the client says which answers it still needs with `first_incomplete`, the lowest
//! seq it has not yet been answered for, and records below it are dropped).
//!
//! Invariants:
//! - the records are part of the replicated state: changed only by applying entries, in the
//!   same batch as the entry's data and applied index, and carried by snapshots and copied
//!   to both halves of a split — every replica answers a retry the same way;
//! - a write with `seq < first_incomplete` (as recorded) is a delayed copy of one the
//!   client has finished with: it is refused, never applied;
//! - clients are forgotten by the log's time, not a local clock: entries carry their
//!   leader's wall clock (`proposed_at_ms`), and a sweep runs when an entry's time passes
//!   the recorded next sweep time, so every replica forgets the same clients at the same
//!   entry. A client idle in the region for `client_session_ttl_secs` is forgotten; a retry
//!   arriving later than that would apply again, which is why the TTL must exceed the
//!   client's deadline for one call by a wide margin.

use std::collections::{BTreeMap, HashMap};

use prost::Message as _;

use super::cmd::{ApplyResult, Command};
use crate::ids::RegionId;
use crate::proto::{self, write_outcome::Kind, ClientSessionRecord, SessionSweepRecord, WriteId};
use crate::storage::{self, keys, Cf, Engine, WriteBatch};

/// What a region knows of a write id.
#[derive(Debug, PartialEq)]
pub enum Seen {
    /// Never applied here: apply it.
    New,
    /// Applied before, with this answer.
    Applied(ApplyResult),
    /// Below the client's `first_incomplete`: a stale copy, not to be applied.
    Stale,
    /// A batch some of whose keys were written under this id here and some not (parts of
    /// one batch sent as one after a merge): neither answer is true, not applied.
    Partly,
}

/// A key's hash in the write records of batches (FNV-1a, 64 bits: the same everywhere).
pub fn key_hash(key: &[u8]) -> u64 {
    key.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The sorted union of two sorted hash lists. A list that is empty (a record from before
/// records kept keys) stays unknown: empty.
fn union(a: &[u64], b: &[u64]) -> Vec<u64> {
    if a.is_empty() || b.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<u64> = a.iter().chain(b).copied().collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[derive(Clone, Debug, Default, PartialEq)]
struct ClientState {
    first_incomplete: u64,
    last_active_ms: u64,
    results: BTreeMap<u64, ApplyResult>,
}

/// One region's write records, in memory; every change is also written to the batch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sessions {
    clients: HashMap<u64, ClientState>,
    next_sweep_ms: u64,
}

/// A stored record that does not decode: disk damage (never written by this code).
#[derive(Debug, thiserror::Error)]
#[error("write record {key:02x?} is damaged: {reason}")]
pub struct CorruptRecord {
    key: Vec<u8>,
    reason: String,
}

impl Sessions {
    /// Loads `region`'s records from the engine.
    pub fn load(engine: &Engine, region: RegionId) -> Result<Self, storage::Error> {
        let (start, end) = keys::session_range(region);
        let mut rows = Vec::new();
        engine.scan(Cf::Raft, &start, &end, |k, v| {
            if let Some(suffix) = keys::session_suffix(k) {
                rows.push((suffix.to_vec(), v.to_vec()));
            }
            Ok(true)
        })?;
        Self::from_rows(rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice())))
            .map_err(|e| storage::Error::corrupt(&e.key, e.reason))
    }

    /// Rebuilds the records from stored rows (key suffixes after the region prefix, as
    /// [`keys::session_suffix`] gives them, and their values): from the engine or a snapshot.
    pub fn from_rows<'a>(
        rows: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<Self, CorruptRecord> {
        let mut s = Sessions::default();
        for (suffix, value) in rows {
            let bad = |reason: String| CorruptRecord {
                key: suffix.to_vec(),
                reason,
            };
            match keys::parse_session_suffix(suffix) {
                None if keys::is_session_sweep_suffix(suffix) => {
                    let r = SessionSweepRecord::decode(value).map_err(|e| bad(e.to_string()))?;
                    s.next_sweep_ms = r.next_sweep_ms;
                }
                None => return Err(bad("not a write-record key".into())),
                Some((client, 0)) => {
                    let r = ClientSessionRecord::decode(value).map_err(|e| bad(e.to_string()))?;
                    let c = s.clients.entry(client).or_default();
                    c.first_incomplete = r.first_incomplete;
                    c.last_active_ms = r.last_active_ms;
                }
                Some((client, seq)) => {
                    let o = proto::WriteOutcome::decode(value).map_err(|e| bad(e.to_string()))?;
                    let res = from_outcome(o).ok_or_else(|| bad("unknown outcome kind".into()))?;
                    s.clients
                        .entry(client)
                        .or_default()
                        .results
                        .insert(seq, res);
                }
            }
        }
        Ok(s)
    }

    /// Every stored row of these records, as key suffixes and values (for a snapshot).
    pub fn rows(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        // Any region id will do: only the suffix is kept.
        let region = RegionId(0);
        let suffix = |k: &[u8]| k[keys::REGION_PREFIX_LEN..].to_vec();
        let mut out = vec![(
            suffix(&keys::session_sweep_key(region)),
            SessionSweepRecord {
                next_sweep_ms: self.next_sweep_ms,
            }
            .encode_to_vec(),
        )];
        for (client, c) in &self.clients {
            out.push((
                suffix(&keys::session_key(region, *client, 0)),
                c.record().encode_to_vec(),
            ));
            for (seq, res) in &c.results {
                out.push((
                    suffix(&keys::session_key(region, *client, *seq)),
                    to_outcome(res).encode_to_vec(),
                ));
            }
        }
        out
    }

    /// Writes every record as `region`'s into `wb` (a split's new region starts with a copy
    /// of its parent's records: a retry of a write the parent applied may reach either).
    pub fn write_all(&self, region: RegionId, wb: &mut WriteBatch<'_>) {
        for (suffix, value) in self.rows() {
            wb.put(
                Cf::Raft,
                &keys::session_key_from_suffix(region, &suffix),
                &value,
            );
        }
    }

    /// Adds another region's records to these (a merge: a retry of a write the source
    /// applied may now reach the target). A client in both keeps every answer and the
    /// higher `first_incomplete`; the earlier next sweep wins.
    pub fn absorb(&mut self, other: Sessions) {
        for (id, c) in other.clients {
            let mine = self.clients.entry(id).or_default();
            mine.first_incomplete = mine.first_incomplete.max(c.first_incomplete);
            mine.last_active_ms = mine.last_active_ms.max(c.last_active_ms);
            for (seq, res) in c.results {
                let merged = match (mine.results.remove(&seq), res) {
                    (
                        Some(ApplyResult::Batch { revision, keys: a }),
                        ApplyResult::Batch { keys: b, .. },
                    ) => ApplyResult::Batch {
                        revision,
                        keys: union(&a, &b),
                    },
                    (Some(mine), _) => mine,
                    (None, theirs) => theirs,
                };
                mine.results.insert(seq, merged);
            }
        }
        if other.next_sweep_ms > 0 {
            self.next_sweep_ms = match self.next_sweep_ms {
                0 => other.next_sweep_ms,
                mine => mine.min(other.next_sweep_ms),
            };
        }
    }

    /// Clients with records (for metrics and tests).
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// What this region knows of write `w` (`cmd`: the write as sent now). A batch's parts
    /// in different regions share one id; once those regions merge, a part is recognised by
    /// its keys: applied if all of them were written under the id here, new if none was.
    pub fn seen(&self, w: &WriteId, cmd: &Command) -> Seen {
        let Some(c) = self.clients.get(&w.client_id) else {
            return Seen::New;
        };
        if w.seq < c.first_incomplete {
            return Seen::Stale;
        }
        match (c.results.get(&w.seq), cmd) {
            (Some(ApplyResult::Batch { keys: done, .. }), Command::Batch(ops))
                if !done.is_empty() =>
            {
                let written = ops
                    .iter()
                    .filter(|(k, _)| done.binary_search(&key_hash(k)).is_ok())
                    .count();
                if written == ops.len() {
                    Seen::Applied(c.results[&w.seq].clone())
                } else if written == 0 {
                    Seen::New
                } else {
                    Seen::Partly
                }
            }
            (Some(r), _) => Seen::Applied(r.clone()),
            (None, _) => Seen::New,
        }
    }

    /// Records that write `w` applied at log time `now_ms` with answer `res`, and drops the
    /// answers the client no longer needs.
    pub fn record(
        &mut self,
        region: RegionId,
        w: &WriteId,
        now_ms: u64,
        res: &ApplyResult,
        wb: &mut WriteBatch<'_>,
    ) {
        let c = self.clients.entry(w.client_id).or_default();
        let first = c.first_incomplete.max(w.first_incomplete.min(w.seq));
        if first > c.first_incomplete {
            let keep = c.results.split_off(&first);
            for seq in std::mem::replace(&mut c.results, keep).into_keys() {
                wb.delete(Cf::Raft, &keys::session_key(region, w.client_id, seq));
            }
            c.first_incomplete = first;
        }
        c.last_active_ms = c.last_active_ms.max(now_ms);
        let res = match (c.results.remove(&w.seq), res) {
            // Another part of the same batch applied here before: both parts' keys.
            (
                Some(ApplyResult::Batch { keys: before, .. }),
                ApplyResult::Batch { revision, keys },
            ) => ApplyResult::Batch {
                revision: *revision,
                keys: union(&before, keys),
            },
            _ => res.clone(),
        };
        c.results.insert(w.seq, res.clone());
        wb.put(
            Cf::Raft,
            &keys::session_key(region, w.client_id, w.seq),
            &to_outcome(&res).encode_to_vec(),
        );
        wb.put_msg(
            Cf::Raft,
            &keys::session_key(region, w.client_id, 0),
            &c.record(),
        );
    }

    /// Forgets the clients idle for longer than `ttl_ms` when the log's time `now_ms` has
    /// passed the next sweep time; returns how many were forgotten.
    pub fn maybe_sweep(
        &mut self,
        region: RegionId,
        now_ms: u64,
        ttl_ms: u64,
        wb: &mut WriteBatch<'_>,
    ) -> usize {
        if now_ms < self.next_sweep_ms {
            return 0;
        }
        let idle: Vec<u64> = self
            .clients
            .iter()
            .filter(|(_, c)| c.last_active_ms.saturating_add(ttl_ms) < now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in &idle {
            self.clients.remove(id);
            let (start, end) = keys::session_client_range(region, *id);
            wb.delete_range(Cf::Raft, &start, &end);
        }
        // A few sweeps per TTL: a forgotten client is gone within 1.25 TTL of its last write.
        self.next_sweep_ms = now_ms.saturating_add((ttl_ms / 4).max(1));
        wb.put_msg(
            Cf::Raft,
            &keys::session_sweep_key(region),
            &SessionSweepRecord {
                next_sweep_ms: self.next_sweep_ms,
            },
        );
        idle.len()
    }
}

impl ClientState {
    fn record(&self) -> ClientSessionRecord {
        ClientSessionRecord {
            first_incomplete: self.first_incomplete,
            last_active_ms: self.last_active_ms,
        }
    }
}

fn to_outcome(res: &ApplyResult) -> proto::WriteOutcome {
    if let ApplyResult::Lease {
        ttls_ms,
        attach_deadline_ms,
    } = res
    {
        return proto::WriteOutcome {
            kind: Kind::Lease as i32,
            lease_ttls_ms: ttls_ms.clone(),
            attach_deadline_ms: *attach_deadline_ms,
            ..Default::default()
        };
    }
    let (kind, prev, revision, succeeded) = match res {
        ApplyResult::Put { prev, revision } => (Kind::Put, prev.clone(), *revision, true),
        ApplyResult::Delete { prev, revision } => (Kind::Delete, prev.clone(), *revision, true),
        ApplyResult::Cas {
            succeeded,
            prev,
            revision,
        } => (Kind::Cas, prev.clone(), *revision, *succeeded),
        ApplyResult::Batch { revision, keys } => {
            return proto::WriteOutcome {
                kind: Kind::Batch as i32,
                revision: *revision,
                succeeded: true,
                key_hashes: keys.clone(),
                ..Default::default()
            }
        }
        ApplyResult::Lease { .. } => unreachable!("answered above"),
        // Admin commands carry no write id; `Peer::apply_command` never records them.
        ApplyResult::Split { .. } | ApplyResult::ChangePeers { .. } | ApplyResult::Merge { .. } => {
            crate::fatal("invariant: an admin command's answer reached the write records")
        }
    };
    proto::WriteOutcome {
        kind: kind as i32,
        prev,
        revision,
        succeeded,
        ..Default::default()
    }
}

fn from_outcome(o: proto::WriteOutcome) -> Option<ApplyResult> {
    let revision = o.revision;
    Some(match Kind::try_from(o.kind).ok()? {
        Kind::Put => ApplyResult::Put {
            prev: o.prev,
            revision,
        },
        Kind::Delete => ApplyResult::Delete {
            prev: o.prev,
            revision,
        },
        Kind::Cas => ApplyResult::Cas {
            succeeded: o.succeeded,
            prev: o.prev,
            revision,
        },
        Kind::Batch => ApplyResult::Batch {
            revision,
            keys: o.key_hashes,
        },
        Kind::Lease => ApplyResult::Lease {
            ttls_ms: o.lease_ttls_ms,
            attach_deadline_ms: o.attach_deadline_ms,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client: u64, seq: u64, first_incomplete: u64) -> WriteId {
        WriteId {
            client_id: client,
            seq,
            first_incomplete,
        }
    }

    fn one() -> Command {
        Command::Delete { key: b"k".to_vec() }
    }

    fn batch(keys: &[&str]) -> Command {
        Command::Batch(keys.iter().map(|k| (k.as_bytes().to_vec(), None)).collect())
    }

    fn batch_result(revision: u64, keys: &[&str]) -> ApplyResult {
        let mut keys: Vec<u64> = keys.iter().map(|k| key_hash(k.as_bytes())).collect();
        keys.sort_unstable();
        ApplyResult::Batch { revision, keys }
    }

    /// A batch split over two regions keeps one write id in both parts; once the regions
    /// merge, each part is still told apart by its keys, wherever it applied.
    #[test]
    fn the_parts_of_a_batch_stay_apart_across_a_merge() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &Default::default()).unwrap();
        let mut wb = engine.batch();
        let w = id(1, 7, 7);
        // The left part applied in the target; the right part never applied in the source.
        let mut target = Sessions::default();
        target.record(RegionId(1), &w, 1_000, &batch_result(20, &["a"]), &mut wb);
        target.absorb(Sessions::default());
        assert_eq!(
            target.seen(&w, &batch(&["a"])),
            Seen::Applied(batch_result(20, &["a"]))
        );
        assert_eq!(target.seen(&w, &batch(&["b"])), Seen::New, "the right part");
        assert_eq!(target.seen(&w, &batch(&["a", "b"])), Seen::Partly);
        // Both parts applied, one in each region: after the merge both are recognised.
        let mut source = Sessions::default();
        source.record(RegionId(2), &w, 1_000, &batch_result(21, &["b"]), &mut wb);
        target.absorb(source);
        assert!(matches!(
            target.seen(&w, &batch(&["a", "b"])),
            Seen::Applied(_)
        ));
        assert!(matches!(target.seen(&w, &batch(&["b"])), Seen::Applied(_)));
        // A part applied after the other was recorded adds its keys.
        let mut t2 = Sessions::default();
        t2.record(RegionId(1), &w, 1_000, &batch_result(20, &["a"]), &mut wb);
        t2.record(RegionId(1), &w, 1_000, &batch_result(22, &["b"]), &mut wb);
        assert!(matches!(t2.seen(&w, &batch(&["a", "b"])), Seen::Applied(_)));
        // And the keys survive the stored rows.
        let rows = t2.rows();
        let back =
            Sessions::from_rows(rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))).unwrap();
        assert_eq!(back, t2);
    }

    fn put(revision: u64) -> ApplyResult {
        ApplyResult::Put {
            prev: None,
            revision,
        }
    }

    #[test]
    fn a_retry_gets_the_first_answer_and_old_answers_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &Default::default()).unwrap();
        let region = RegionId(7);
        let mut s = Sessions::default();
        let mut wb = engine.batch();
        // Two writes in flight at once, the first answered later than the second.
        assert_eq!(s.seen(&id(1, 1, 1), &one()), Seen::New);
        s.record(region, &id(1, 2, 1), 1_000, &put(11), &mut wb);
        s.record(region, &id(1, 1, 1), 1_000, &put(12), &mut wb);
        assert_eq!(s.seen(&id(1, 1, 1), &one()), Seen::Applied(put(12)));
        assert_eq!(s.seen(&id(1, 2, 1), &one()), Seen::Applied(put(11)));
        assert_eq!(s.seen(&id(2, 1, 1), &one()), Seen::New, "another client");
        // The client has had both answers: they go, and copies of them are stale.
        s.record(region, &id(1, 3, 3), 2_000, &put(13), &mut wb);
        assert_eq!(s.seen(&id(1, 1, 3), &one()), Seen::Stale);
        assert_eq!(s.seen(&id(1, 2, 3), &one()), Seen::Stale);
        assert_eq!(s.seen(&id(1, 3, 3), &one()), Seen::Applied(put(13)));
        engine.write(wb, false).unwrap();

        // What is on disk is what is in memory, and a snapshot's rows rebuild the same.
        let loaded = Sessions::load(&engine, region).unwrap();
        assert_eq!(loaded, s);
        let rows = s.rows();
        let back =
            Sessions::from_rows(rows.iter().map(|(k, v)| (k.as_slice(), v.as_slice()))).unwrap();
        assert_eq!(back, s);
        assert_eq!(Sessions::load(&engine, RegionId(8)).unwrap().clients(), 0);
    }

    #[test]
    fn idle_clients_are_forgotten_by_log_time_only() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path(), &Default::default()).unwrap();
        let region = RegionId(3);
        let ttl = 60_000;
        let mut s = Sessions::default();
        let mut wb = engine.batch();
        assert_eq!(s.maybe_sweep(region, 1_000, ttl, &mut wb), 0);
        s.record(region, &id(1, 1, 1), 1_000, &put(5), &mut wb);
        s.record(region, &id(2, 1, 1), 50_000, &put(6), &mut wb);
        // Not yet the next sweep time: nothing happens, whatever the ages.
        assert_eq!(s.maybe_sweep(region, 15_000, ttl, &mut wb), 0);
        assert_eq!(s.clients(), 2);
        // Client 1 idle for more than the TTL, client 2 not.
        assert_eq!(s.maybe_sweep(region, 70_000, ttl, &mut wb), 1);
        assert_eq!(s.seen(&id(1, 1, 1), &one()), Seen::New);
        assert_eq!(s.seen(&id(2, 1, 1), &one()), Seen::Applied(put(6)));
        engine.write(wb, false).unwrap();
        assert_eq!(Sessions::load(&engine, region).unwrap(), s);
    }

    #[test]
    fn damaged_rows_are_an_error() {
        let suffix = keys::session_key(RegionId(1), 5, 3)[keys::REGION_PREFIX_LEN..].to_vec();
        let rows = [(suffix.as_slice(), &[0xFFu8, 0xFF, 0xFF][..])];
        assert!(Sessions::from_rows(rows.into_iter()).is_err());
        let rows = [(&[0x04u8, 1, 2][..], &[][..])];
        assert!(Sessions::from_rows(rows.into_iter()).is_err());
    }
}
