//! `tessera elect` and `tessera lock`: leader election and locks from the command line, as
//! etcdctl's `elect` and `lock`.
//!
//! Invariants:
//! - a campaign or lock runs in a session (a lease kept alive); the session is closed (its
//!   keys deleted) when the command ends, by itself or by Ctrl-C;
//! - `lock NAME -- COMMAND` runs COMMAND only while the lock is held and exits with its
//!   status; if the session is lost meanwhile the command is killed and `lock` fails.

use std::time::Duration;

use tessera::client::concurrency::{Election, Mutex, Session};

use super::{text, ConnArgs, Error, Result};

#[derive(clap::Args)]
pub struct ElectArgs {
    /// The election's name (a key prefix).
    pub name: String,
    /// Campaign with this value and hold leadership until interrupted; without it, print
    /// the leader each time it changes.
    pub proposal: Option<String>,
    /// TTL of the session's lease, in seconds.
    #[arg(long, default_value_t = 10)]
    pub ttl: u64,
}

#[derive(clap::Args)]
pub struct LockArgs {
    /// The lock's name (a key prefix).
    pub name: String,
    /// Run this while holding the lock, then release it; without it, hold the lock until
    /// interrupted.
    #[arg(last = true)]
    pub command: Vec<String>,
    /// TTL of the session's lease, in seconds.
    #[arg(long, default_value_t = 10)]
    pub ttl: u64,
}

fn lost(why: String) -> Error {
    Error::Client(tessera::client::Error::Refused(why))
}

pub async fn elect(conn: ConnArgs, args: ElectArgs) -> Result<()> {
    let client = conn.connect(false).await?;
    let Some(proposal) = args.proposal else {
        let mut observer = Election::observe(&client, args.name.as_bytes());
        loop {
            match observer.next().await? {
                Some(kv) => println!("{}\n{}", text(&kv.key), text(&kv.value)),
                None => println!("no leader"),
            }
        }
    };
    let mut session = Session::new(&client, Duration::from_secs(args.ttl)).await?;
    let mut election = Election::new(&session, args.name.as_bytes());
    tokio::select! {
        r = election.campaign(proposal.as_bytes()) => r?,
        why = session.lost() => return Err(lost(why)),
        _ = tokio::signal::ctrl_c() => {
            session.close().await?;
            return Ok(());
        }
    }
    println!("{}\n{proposal}", text(election.key_bytes()));
    let outcome = tokio::select! {
        why = session.lost() => Err(lost(why)),
        _ = tokio::signal::ctrl_c() => Ok(()),
    };
    let _ = election.resign().await;
    session.close().await?;
    outcome
}

pub async fn lock(conn: ConnArgs, args: LockArgs) -> Result<()> {
    let client = conn.connect(false).await?;
    let mut session = Session::new(&client, Duration::from_secs(args.ttl)).await?;
    let mut mutex = Mutex::new(&session, args.name.as_bytes());
    tokio::select! {
        r = mutex.lock() => r?,
        why = session.lost() => return Err(lost(why)),
        _ = tokio::signal::ctrl_c() => {
            session.close().await?;
            return Ok(());
        }
    }
    let outcome = match args.command.split_first() {
        None => {
            println!("{}", text(mutex.key()));
            tokio::select! {
                why = session.lost() => Err(lost(why)),
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
        Some((program, rest)) => {
            let mut child = tokio::process::Command::new(program)
                .args(rest)
                .env("TESSERA_LOCK_KEY", text(mutex.key()))
                .env("TESSERA_LOCK_TOKEN", mutex.token().to_string())
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| Error::Io {
                    what: format!("cannot run {program}"),
                    source,
                })?;
            tokio::select! {
                status = child.wait() => match status {
                    Ok(s) if s.success() => Ok(()),
                    Ok(s) => Err(Error::Usage(format!("{program} exited with {s}"))),
                    Err(source) => Err(Error::Io { what: format!("waiting for {program}"), source }),
                },
                why = session.lost() => {
                    let _ = child.kill().await;
                    Err(lost(why))
                }
            }
        }
    };
    let _ = mutex.unlock().await;
    session.close().await?;
    outcome
}
