//! `tessera kv`: read and write keys.
//!
//! Invariants:
//! - a value from standard input is read whole before connecting and is at most 64 MiB; a
//!   larger one is a usage error and nothing is sent;
//! - a missing key (`get`) and a failed comparison (`cas`, text output) are errors (exit
//!   status 2); with `--json` a failed comparison is printed as `"succeeded": false`;
//! - `cas` only ever puts; it never deletes.

use std::io::Read;

use serde::Serialize;
use tessera::client::{CasAction, Compare};
use tessera::proto::KeyValue;

use super::{print_json, text, ConnArgs, Error, Result};

/// A value larger than this cannot come from standard input (the cluster refuses values
/// past its own limit anyway; this only bounds what the command reads).
const MAX_STDIN_VALUE: u64 = 64 << 20;

#[derive(clap::Subcommand)]
pub enum KvOp {
    /// Print KEY's value (with --json: value, revisions and version).
    Get {
        key: String,
        /// Serve from any replica's local state (may be stale).
        #[arg(long, conflicts_with = "rev")]
        serializable: bool,
        /// Read the key as of this cluster revision (0 = now).
        #[arg(long, default_value_t = 0)]
        rev: u64,
    },
    /// Set KEY to VALUE; without VALUE, the value is read from standard input (all of it,
    /// as bytes), so values of any size and content can be written.
    Put {
        key: String,
        value: Option<String>,
        /// Attach the key to this lease (hex id, from `tessera lease grant`): it is deleted
        /// when the lease expires or is revoked.
        #[arg(long)]
        lease: Option<String>,
    },
    /// Delete KEY; prints whether it existed.
    Delete { key: String },
    /// Keys in [START, END) in order; END empty = to the end.
    Scan {
        #[arg(default_value = "")]
        start: String,
        #[arg(default_value = "")]
        end: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Read the keys as of this cluster revision (0 = now): one consistent snapshot
        /// across regions.
        #[arg(long, default_value_t = 0)]
        rev: u64,
    },
    /// Drop the history below cluster revision REV (reads below it then fail).
    Compact { rev: u64 },
    /// Compare-and-swap: set KEY to VALUE only if its current value is EXPECTED
    /// (or, with --absent, only if it does not exist).
    Cas {
        key: String,
        value: String,
        #[arg(long, conflicts_with = "absent")]
        expected: Option<String>,
        #[arg(long)]
        absent: bool,
    },
}

#[derive(Serialize)]
struct KvJson {
    key: String,
    value: String,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    /// The lease the key is attached to (hex), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<String>,
}

impl From<&KeyValue> for KvJson {
    fn from(kv: &KeyValue) -> Self {
        Self {
            key: text(&kv.key),
            value: text(&kv.value),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: (kv.lease != 0).then(|| format!("{:x}", kv.lease)),
        }
    }
}

#[derive(Serialize)]
struct Revision {
    revision: u64,
}

#[derive(Serialize)]
struct Deleted {
    deleted: bool,
    revision: u64,
}

#[derive(Serialize)]
struct Compacted {
    compact_revision: u64,
}

#[derive(Serialize)]
struct CasJson {
    succeeded: bool,
    revision: u64,
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin()
        .take(MAX_STDIN_VALUE + 1)
        .read_to_end(&mut buf)
        .map_err(|source| Error::Io {
            what: "cannot read the value from standard input".into(),
            source,
        })?;
    if buf.len() as u64 > MAX_STDIN_VALUE {
        return Err(Error::Usage(format!(
            "the value on standard input is over {MAX_STDIN_VALUE} bytes"
        )));
    }
    Ok(buf)
}

pub async fn run(conn: ConnArgs, op: KvOp) -> Result<()> {
    let serializable = matches!(
        op,
        KvOp::Get {
            serializable: true,
            ..
        }
    );
    // Read standard input before connecting: a pipe that fails fails before any request.
    let stdin_value = match &op {
        KvOp::Put { value: None, .. } => Some(read_stdin()?),
        _ => None,
    };
    let client = conn.connect(serializable).await?;
    match op {
        KvOp::Get { key, rev, .. } => match client.get_at(key.as_bytes(), rev).await? {
            Some(kv) if conn.json => print_json(&KvJson::from(&kv)),
            Some(kv) => println!("{}", text(&kv.value)),
            None => return Err(Error::KeyNotFound(key)),
        },
        KvOp::Put { key, value, lease } => {
            let value = match (value, stdin_value) {
                (Some(v), _) => v.into_bytes(),
                (None, Some(v)) => v,
                (None, None) => Vec::new(),
            };
            let lease = lease.as_deref().map(super::lease::parse_id).transpose()?;
            let r = client
                .put_with_lease(key.as_bytes(), &value, lease.unwrap_or(0))
                .await?;
            if conn.json {
                print_json(&Revision {
                    revision: r.revision,
                });
            } else {
                println!("OK (revision {})", r.revision);
            }
        }
        KvOp::Delete { key } => {
            let r = client.delete(key.as_bytes()).await?;
            let deleted = r.prev.is_some();
            if conn.json {
                print_json(&Deleted {
                    deleted,
                    revision: r.revision,
                });
            } else if deleted {
                println!("deleted");
            } else {
                println!("not found");
            }
        }
        KvOp::Compact { rev } => {
            let now = client.compact(rev).await?;
            if conn.json {
                print_json(&Compacted {
                    compact_revision: now,
                });
            } else {
                println!("compacted up to revision {now}");
            }
        }
        KvOp::Scan {
            start,
            end,
            limit,
            rev,
        } => {
            let kvs = client
                .scan_at(start.as_bytes(), end.as_bytes(), limit, rev)
                .await?;
            if conn.json {
                print_json(&kvs.iter().map(KvJson::from).collect::<Vec<_>>());
            } else {
                for kv in kvs {
                    println!("{}\t{}", text(&kv.key), text(&kv.value));
                }
            }
        }
        KvOp::Cas {
            key,
            value,
            expected,
            absent,
        } => {
            let compare = match (absent, expected) {
                (true, _) => Compare::Absent,
                (false, Some(v)) => Compare::Value(v.into_bytes()),
                (false, None) => {
                    return Err(Error::Usage(
                        "cas needs --expected VALUE or --absent".into(),
                    ))
                }
            };
            let r = client
                .cas(key.as_bytes(), compare, CasAction::Put(value.into_bytes()))
                .await?;
            if conn.json {
                print_json(&CasJson {
                    succeeded: r.succeeded,
                    revision: r.revision,
                });
            } else if r.succeeded {
                println!("OK (revision {})", r.revision);
            } else {
                return Err(Error::CompareFailed);
            }
        }
    }
    Ok(())
}
