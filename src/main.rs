//! The `tessera` binary: one executable for the server and the command-line client.
//!
//! Invariants:
//! - a command that fails prints one line on stderr and exits with status 2 (a watch: 3
//!   compacted, 4 cluster lost); success is 0
//!   (a node that must stop exits with 70 through `tessera::fatal`);
//! - SIGPIPE gets its default action back for every command but `server`, so a closed pipe
//!   ends a listing quietly and never kills a node;
//! - a server's runtime is sized from its validated configuration, read before the runtime
//!   starts.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

use cli::kv::KvOp;
use cli::lease::LeaseOp;
use cli::nodes::NodesOp;
use cli::regions::RegionsOp;
use cli::server::ServerArgs;
use cli::ConnArgs;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "A multi-Raft sharded metadata service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Server(ServerArgs),
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Read and write keys.
    Kv {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: KvOp,
    },
    /// Grant, revoke, keep alive and inspect leases (keys attached to a lease are deleted
    /// when it expires or is revoked).
    Lease {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: LeaseOp,
    },
    /// Campaign in election NAME with PROPOSAL and hold leadership until interrupted, or
    /// without PROPOSAL print the leader each time it changes.
    Elect {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        args: cli::elect::ElectArgs,
    },
    /// Take lock NAME; run COMMAND (after `--`) while holding it, or hold it until
    /// interrupted. COMMAND sees the lock's key and fencing token in TESSERA_LOCK_KEY and
    /// TESSERA_LOCK_TOKEN.
    Lock {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        args: cli::elect::LockArgs,
    },
    /// List the nodes in the placement registry with their state, or remove one.
    Nodes {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: Option<NodesOp>,
    },
    /// The cluster's alarms (NOSPACE: writes refused), or disarm them.
    Alarm {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: Option<cli::alarm::AlarmOp>,
    },
    /// Turn authentication on or off (users, roles and permissions: `user`, `role`).
    Auth {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: cli::auth::AuthOp,
    },
    /// Add, delete and list users, change passwords, grant and revoke roles.
    User {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: cli::auth::UserOp,
    },
    /// Add, delete and list roles, grant and revoke their key-range permissions.
    Role {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: cli::auth::RoleOp,
    },
    /// Load-test a cluster.
    Bench(tessera::bench::BenchArgs),
    /// List the regions (range, epoch, peers, leader, load), or split, move or change one.
    Regions {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(subcommand)]
        op: Option<RegionsOp>,
    },
    /// The cluster at a glance: nodes up/down, regions, leaderless regions, data size.
    Status {
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print the changes of the keys under PREFIX as they happen (from --rev R: history
    /// first). Exit status 3: the start revision is compacted; 4: the cluster was lost.
    Watch {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        args: cli::watch::WatchArgs,
    },
    /// Write a backup of the cluster's user data, all of it as of one cluster revision,
    /// into the new directory OUT (a manifest with checksums and one file per region).
    Backup {
        #[command(flatten)]
        conn: ConnArgs,
        #[command(flatten)]
        args: cli::backup::BackupArgs,
    },
    /// Seed this founding node of a new cluster (its config: a new cluster id, an empty
    /// data directory) from a backup; run it on every founding node, then start them.
    Restore(cli::backup::RestoreArgs),
    /// Drop the history below cluster revision REV: reads below it then fail with
    /// "revision compacted" (the same as `tessera kv compact REV`).
    Compact {
        #[command(flatten)]
        conn: ConnArgs,
        rev: u64,
    },
}

/// jemalloc, not glibc malloc: less CPU per allocation under the servers' cross-thread
/// pattern (buffers made on gRPC threads, freed on raft workers) and less retained memory.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Runs `task` on a multi-threaded runtime of `threads` threads (tokio's default: one per
/// core).
fn block_on(
    threads: Option<usize>,
    task: impl std::future::Future<Output = cli::Result<()>>,
) -> cli::Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let rt = builder
        .enable_all()
        .build()
        .map_err(|source| cli::Error::Io {
            what: "cannot start runtime".into(),
            source,
        })?;
    rt.block_on(task)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Rust ignores SIGPIPE, so printing into a closed pipe (`tessera regions | head`) would
    // panic; a command-line tool should just end quietly, as with the default action. Not
    // the server: there the default action would kill the node whenever a peer or client
    // closes a connection it is writing to.
    if !matches!(cli.command, Command::Server(_)) {
        // SAFETY: called in main before the runtime or any other thread exists.
        #[cfg(unix)]
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        // A server's runtime is sized by its configuration, so that is read first.
        Command::Server(args) => cli::server::load_config(&args).and_then(|cfg| {
            let threads = cfg.grpc_threads();
            block_on(Some(threads), cli::server::run(args, cfg))
        }),
        Command::DefaultConfig => {
            print!("{}", tessera::config::DEFAULT_CONFIG_TOML);
            Ok(())
        }
        Command::Kv { conn, op } => block_on(None, cli::kv::run(conn, op)),
        Command::Lease { conn, op } => block_on(None, cli::lease::run(conn, op)),
        Command::Elect { conn, args } => block_on(None, cli::elect::elect(conn, args)),
        Command::Lock { conn, args } => block_on(None, cli::elect::lock(conn, args)),
        Command::Regions { conn, op } => block_on(None, cli::regions::run(conn, op)),
        Command::Bench(args) => block_on(None, cli::bench::run(args)),
        Command::Nodes { conn, op } => block_on(None, cli::nodes::run(conn, op)),
        Command::Alarm { conn, op } => block_on(None, cli::alarm::run(conn, op)),
        Command::Auth { conn, op } => block_on(None, cli::auth::auth(conn, op)),
        Command::User { conn, op } => block_on(None, cli::auth::user(conn, op)),
        Command::Role { conn, op } => block_on(None, cli::auth::role(conn, op)),
        Command::Status { conn } => block_on(None, cli::status::run(conn)),
        Command::Watch { conn, args } => block_on(None, cli::watch::run(conn, args)),
        Command::Backup { conn, args } => block_on(None, cli::backup::backup(conn, args)),
        Command::Restore(args) => cli::backup::restore(args),
        Command::Compact { conn, rev } => block_on(None, cli::kv::run(conn, KvOp::Compact { rev })),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tessera: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
