//! `tessera lease`: grant, revoke, keep alive, inspect and list leases.
//!
//! Invariants:
//! - TTLs are whole seconds on the command line, as etcdctl's;
//! - `keep-alive` renews at a third of the TTL until the lease is gone (an error, exit
//!   status 2) or it is interrupted; `--once` renews once.

use std::time::Duration;

use serde::Serialize;

use super::{print_json, text, ConnArgs, Error, Result};

#[derive(clap::Subcommand)]
pub enum LeaseOp {
    /// Grant a lease of TTL seconds; prints its id (hex, as etcdctl). Keys put with
    /// `kv put --lease ID` are deleted when it expires or is revoked.
    Grant {
        ttl: u64,
        /// Use this id (hex) instead of a random one.
        #[arg(long)]
        id: Option<String>,
    },
    /// Revoke lease ID (hex): its keys are deleted before this returns.
    Revoke { id: String },
    /// Keep lease ID (hex) alive: renew it at a third of its TTL until interrupted.
    KeepAlive {
        id: String,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Print lease ID's (hex) granted and remaining TTL.
    Ttl {
        id: String,
        /// Also list the keys attached to it.
        #[arg(long)]
        keys: bool,
    },
    /// List the live leases.
    List,
}

/// A lease id as given on the command line: hex, as etcdctl prints them.
pub fn parse_id(s: &str) -> Result<u64> {
    let digits = s.trim_start_matches("0x");
    match u64::from_str_radix(digits, 16) {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(Error::Usage(format!(
            "{s:?} is not a lease id (a positive hex number)"
        ))),
    }
}

#[derive(Serialize)]
struct LeaseJson {
    id: String,
    ttl: u64,
    remaining: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    keys: Option<Vec<String>>,
}

pub async fn run(conn: ConnArgs, op: LeaseOp) -> Result<()> {
    let client = conn.connect(false).await?;
    match op {
        LeaseOp::Grant { ttl, id } => {
            let ttl = Duration::from_secs(ttl);
            let (id, granted) = match id {
                Some(id) => {
                    let id = parse_id(&id)?;
                    (id, client.lease_grant_with_id(id, ttl).await?)
                }
                None => client.lease_grant(ttl).await?,
            };
            if conn.json {
                print_json(&LeaseJson {
                    id: format!("{id:x}"),
                    ttl: granted.as_secs(),
                    remaining: granted.as_secs(),
                    keys: None,
                });
            } else {
                println!("lease {id:x} granted with TTL({}s)", granted.as_secs());
            }
        }
        LeaseOp::Revoke { id } => {
            let id = parse_id(&id)?;
            client.lease_revoke(id).await?;
            if conn.json {
                print_json(&serde_json::json!({ "revoked": format!("{id:x}") }));
            } else {
                println!("lease {id:x} revoked");
            }
        }
        LeaseOp::KeepAlive { id, once } => {
            let id = parse_id(&id)?;
            loop {
                let ttl = client
                    .lease_renew(&[id])
                    .await?
                    .first()
                    .copied()
                    .flatten()
                    .ok_or_else(|| {
                        Error::Client(tessera::client::Error::NotFound(format!(
                            "lease {id:x} expired or was revoked"
                        )))
                    })?;
                if conn.json {
                    print_json(&LeaseJson {
                        id: format!("{id:x}"),
                        ttl: ttl.as_secs(),
                        remaining: ttl.as_secs(),
                        keys: None,
                    });
                } else {
                    println!("lease {id:x} keepalived with TTL({})", ttl.as_secs());
                }
                if once {
                    break;
                }
                tokio::time::sleep(ttl / 3).await;
            }
        }
        LeaseOp::Ttl { id, keys } => {
            let id = parse_id(&id)?;
            let s = client.lease_time_to_live(id, keys).await?;
            let names: Vec<String> = s.keys.iter().map(|k| text(k)).collect();
            if conn.json {
                print_json(&LeaseJson {
                    id: format!("{id:x}"),
                    ttl: s.ttl.as_secs(),
                    remaining: s.remaining.as_secs(),
                    keys: keys.then_some(names),
                });
            } else {
                print!(
                    "lease {id:x} granted with TTL({}s), remaining({}s)",
                    s.ttl.as_secs(),
                    s.remaining.as_secs()
                );
                if keys {
                    print!(", attached keys({names:?})");
                }
                println!();
            }
        }
        LeaseOp::List => {
            let leases = client.leases().await?;
            if conn.json {
                let list: Vec<LeaseJson> = leases
                    .iter()
                    .map(|l| LeaseJson {
                        id: format!("{:x}", l.id),
                        ttl: l.ttl.as_secs(),
                        remaining: l.remaining.as_secs(),
                        keys: None,
                    })
                    .collect();
                print_json(&list);
            } else {
                println!("found {} leases", leases.len());
                for l in leases {
                    println!(
                        "{:x}\tTTL({}s)\tremaining({}s)",
                        l.id,
                        l.ttl.as_secs(),
                        l.remaining.as_secs()
                    );
                }
            }
        }
    }
    Ok(())
}
