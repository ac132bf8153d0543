//! Applying the lease keyspace's commands (docs/architecture.md, "Leases").
//!
//! A lease is one record at `lease_key(id)` (a [`proto::LeaseRecord`] as the stored value)
//! and one empty row per key attached to it. Time comes only from the entry
//! (`proposed_at_ms`, the proposing leader's clock), so every replica decides alike.
//!
//! Invariants:
//! - a lease is live from its grant until a revoke or an expiry marks it revoked; only a
//!   live lease is renewed or takes attachments, and a revoked one never lives again;
//! - an expiry revokes a lease only if its deadline is still the one the proposer saw pass
//!   and has passed by the entry's time: a renewal committed in between wins;
//! - `Remove` takes only revoked leases, with every attached row;
//! - the changes that the node's lessor must see are returned, in apply order.

use prost::Message as _;

use super::{put_record, ApplyCtx};
use crate::proto::{self, KvRecord};
use crate::raftstore::cmd::{ApplyResult, LeaseCmd};
use crate::storage::{keys, Cf, Engine, WriteBatch};
use tessera_api::keys::{lease_attached_row, lease_key, lease_rows};

/// What the node's lessor learns from an applied lease command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseChange {
    /// Granted, or renewed: live until `deadline_ms`.
    Live {
        id: u64,
        ttl_ms: u64,
        deadline_ms: u64,
    },
    /// Revoked or expired at `at_ms`: its keys are to be deleted.
    Revoked { id: u64, at_ms: u64 },
    /// Gone, with its rows.
    Removed { id: u64 },
}

fn read(ctx: &mut ApplyCtx, engine: &Engine, id: u64) -> Option<(KvRecord, proto::LeaseRecord)> {
    let dkey = keys::data_key(&lease_key(id));
    let rec = ctx.current(engine, &dkey)?;
    // Only lease commands write here (the service refuses other writes), but a record that
    // does not decode is taken as absent — the same on every replica — rather than
    // stopping every node of the region.
    match proto::LeaseRecord::decode(rec.value.as_slice()) {
        Ok(l) => Some((rec, l)),
        Err(e) => {
            tracing::error!(lease = id, error = %e, "lease record does not decode; taken as absent");
            None
        }
    }
}

fn write(
    ctx: &mut ApplyCtx,
    wb: &mut WriteBatch<'_>,
    id: u64,
    old: Option<&KvRecord>,
    lease: &proto::LeaseRecord,
    revision: u64,
) {
    let rec = put_record(old, lease.encode_to_vec(), revision, 0);
    ctx.put(wb, keys::data_key(&lease_key(id)), old, rec);
}

/// Applies `cmd` at raft index `revision`, at the entry's time `now_ms`.
pub fn exec(
    cmd: LeaseCmd,
    revision: u64,
    now_ms: u64,
    engine: &Engine,
    wb: &mut WriteBatch<'_>,
    ctx: &mut ApplyCtx,
    changes: &mut Vec<LeaseChange>,
) -> ApplyResult {
    let mut ttls_ms = Vec::new();
    let mut attach_deadline_ms = 0;
    match cmd {
        LeaseCmd::Grant { id, ttl_ms } => {
            if read(ctx, engine, id).is_some() || ttl_ms == 0 {
                ttls_ms.push(0);
            } else {
                let lease = proto::LeaseRecord {
                    ttl_ms,
                    deadline_ms: now_ms.saturating_add(ttl_ms),
                    revoked_at_ms: 0,
                };
                write(ctx, wb, id, None, &lease, revision);
                changes.push(LeaseChange::Live {
                    id,
                    ttl_ms,
                    deadline_ms: lease.deadline_ms,
                });
                ttls_ms.push(ttl_ms);
            }
        }
        LeaseCmd::Renew { ids } => {
            for id in ids {
                match read(ctx, engine, id) {
                    Some((rec, mut lease)) if lease.revoked_at_ms == 0 => {
                        lease.deadline_ms =
                            lease.deadline_ms.max(now_ms.saturating_add(lease.ttl_ms));
                        write(ctx, wb, id, Some(&rec), &lease, revision);
                        changes.push(LeaseChange::Live {
                            id,
                            ttl_ms: lease.ttl_ms,
                            deadline_ms: lease.deadline_ms,
                        });
                        ttls_ms.push(lease.ttl_ms);
                    }
                    _ => ttls_ms.push(0),
                }
            }
        }
        LeaseCmd::Revoke { ids, deadlines_ms } => {
            let expiry = !deadlines_ms.is_empty();
            for (i, id) in ids.into_iter().enumerate() {
                let seen = deadlines_ms.get(i).copied();
                match read(ctx, engine, id) {
                    Some((rec, mut lease)) if lease.revoked_at_ms == 0 => {
                        let due = !expiry
                            || (seen == Some(lease.deadline_ms) && lease.deadline_ms <= now_ms);
                        if due {
                            lease.revoked_at_ms = now_ms.max(1);
                            write(ctx, wb, id, Some(&rec), &lease, revision);
                            changes.push(LeaseChange::Revoked {
                                id,
                                at_ms: lease.revoked_at_ms,
                            });
                            ttls_ms.push(lease.ttl_ms);
                        } else {
                            ttls_ms.push(0);
                        }
                    }
                    _ => ttls_ms.push(0),
                }
            }
        }
        LeaseCmd::Attach { id, key, window_ms } => match read(ctx, engine, id) {
            Some((_, lease)) if lease.revoked_at_ms == 0 => {
                let row = keys::data_key(&lease_attached_row(id, &key));
                let old = ctx.current(engine, &row);
                let rec = put_record(old.as_ref(), Vec::new(), revision, 0);
                ctx.put(wb, row, old.as_ref(), rec);
                attach_deadline_ms = now_ms.saturating_add(window_ms);
                ttls_ms.push(lease.ttl_ms);
            }
            _ => ttls_ms.push(0),
        },
        LeaseCmd::Remove { ids } => {
            for id in ids {
                match read(ctx, engine, id) {
                    Some((_, lease)) if lease.revoked_at_ms > 0 => {
                        let (lo, hi) = lease_rows(id);
                        for row in ctx.live_keys(engine, &keys::data_key(&lo), &keys::data_key(&hi))
                        {
                            let old = ctx.current(engine, &row);
                            ctx.delete(wb, row, old.as_ref(), revision);
                        }
                        changes.push(LeaseChange::Removed { id });
                        ttls_ms.push(lease.ttl_ms);
                    }
                    _ => ttls_ms.push(0),
                }
            }
        }
    }
    ApplyResult::Lease {
        ttls_ms,
        attach_deadline_ms,
    }
}

/// The leases stored in `[start, end)` (data keys), as the engine has them: id and record.
pub fn load(
    engine: &Engine,
    start: &[u8],
    end: &[u8],
) -> Result<Vec<(u64, proto::LeaseRecord)>, String> {
    let mut raw = Vec::new();
    engine
        .scan(Cf::Data, start, end, |k, v| {
            if let Some(id) = tessera_api::keys::parse_lease_key(&k[1..]) {
                raw.push((id, v.to_vec()));
            }
            Ok(true)
        })
        .map_err(|e| e.to_string())?;
    // Records that do not decode are absent for apply too (`read`).
    Ok(raw
        .into_iter()
        .filter_map(|(id, v)| {
            let rec = KvRecord::decode(v.as_slice()).ok()?;
            let lease = proto::LeaseRecord::decode(rec.value.as_slice()).ok()?;
            Some((id, lease))
        })
        .collect())
}
