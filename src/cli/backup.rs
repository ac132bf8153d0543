//! `tessera backup` and `tessera restore` (docs/operations.md, "Backup and restore").
//!
//! Invariants:
//! - progress goes to stderr (redrawn in place on a terminal, a line every few seconds
//!   otherwise); the result goes to stdout, as text or `--json`;
//! - a restore reads its node's config as `tessera server` does, and writes nothing when the
//!   backup or the config is refused.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tessera::backup;

use super::{print_json, ConnArgs, Error, Result};

#[derive(clap::Args)]
pub struct BackupArgs {
    /// The directory to write the backup into (created; must be empty).
    pub out: PathBuf,
}

#[derive(clap::Args)]
pub struct RestoreArgs {
    /// The backup directory.
    pub backup: PathBuf,
    /// This node's config (TOML): a founding node of the new cluster, with a cluster id
    /// other than the backup's and an empty data directory.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Start the new cluster's revisions this far above the last one the backed-up cluster
    /// had handed out when the backup finished, so that revisions its clients saw are not
    /// reused (reads below the new start are "compacted"). Give every node the same value.
    #[arg(long, default_value_t = backup::restore::DEFAULT_BUMP)]
    pub bump_revision: u64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl From<backup::Error> for Error {
    fn from(e: backup::Error) -> Self {
        match e {
            backup::Error::Client(c) => Error::Client(c),
            other => Error::Server(other.to_string()),
        }
    }
}

/// Redraws one line of progress on stderr: in place on a terminal, else every 5 s.
struct Meter {
    tty: bool,
    started: Instant,
    last: Option<Instant>,
}

impl Meter {
    fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            last: None,
        }
    }

    fn show(&mut self, line: &str, last: bool) {
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(5)
        };
        if !last && self.last.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        self.last = Some(Instant::now());
        let secs = self.started.elapsed().as_secs_f64();
        if self.tty {
            eprint!("\r\x1b[K{line} ({secs:.1} s)");
            if last {
                eprintln!();
            }
        } else {
            eprintln!("{line} ({secs:.1} s)");
        }
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

pub async fn backup(conn: ConnArgs, args: BackupArgs) -> Result<()> {
    let client = conn.connect(false).await?;
    let progress = backup::take::Progress::default();
    let started = Instant::now();
    let task = backup::take::take(&client, &args.out, &progress);
    tokio::pin!(task);
    let mut meter = Meter::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let line = |p: &backup::take::Progress| {
        format!(
            "regions {}/{}, {} keys, {:.1} MiB",
            p.regions_done.load(Ordering::Relaxed),
            p.regions_total.load(Ordering::Relaxed),
            p.keys.load(Ordering::Relaxed),
            mb(p.bytes.load(Ordering::Relaxed)),
        )
    };
    let summary = loop {
        tokio::select! {
            r = &mut task => break r?,
            _ = tick.tick() => meter.show(&line(&progress), false),
        }
    };
    meter.show(&line(&progress), true);
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    if conn.json {
        print_json(&serde_json::json!({
            "dir": args.out.display().to_string(),
            "revision": summary.revision,
            "regions": summary.regions,
            "keys": summary.keys,
            "bytes": summary.bytes,
            "leases": summary.leases,
            "seconds": secs,
        }));
    } else {
        println!(
            "backup of revision {} in {}: {} regions, {} keys, {:.1} MiB, {} leases \
             ({:.0} keys/s, {:.1} MiB/s)",
            summary.revision,
            args.out.display(),
            summary.regions,
            summary.keys,
            mb(summary.bytes),
            summary.leases,
            summary.keys as f64 / secs,
            mb(summary.bytes) / secs,
        );
    }
    Ok(())
}

pub fn restore(args: RestoreArgs) -> Result<()> {
    let server = super::server::ServerArgs {
        config: Some(args.config.clone()),
        data_dir: None,
        listen_addr: None,
        join: None,
        check: false,
    };
    let cfg = super::server::load_config(&server)?;
    let started = Instant::now();
    let mut meter = Meter::new();
    let summary = backup::restore::restore(&cfg, &args.backup, args.bump_revision, |what, n| {
        meter.show(&format!("{what} {n} keys"), false);
    })?;
    meter.show(&format!("written {} keys", summary.keys), true);
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    if args.json {
        print_json(&serde_json::json!({
            "revision": summary.revision,
            "base_revision": summary.base_revision,
            "node": cfg.node.id,
            "cluster_id": cfg.cluster.cluster_id,
            "regions": summary.regions,
            "keys": summary.keys,
            "leases": summary.leases,
            "seconds": secs,
        }));
    } else {
        println!(
            "restored revision {} into node {} of cluster {}: {} regions, {} keys, {} leases \
             ({:.0} keys/s); new revisions start after {}; start the node with this config",
            summary.revision,
            cfg.node.id,
            cfg.cluster.cluster_id,
            summary.regions,
            summary.keys,
            summary.leases,
            summary.keys as f64 / secs,
            summary.base_revision,
        );
    }
    Ok(())
}
