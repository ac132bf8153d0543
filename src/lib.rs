//! tessera: a multi-Raft sharded metadata service — the server and the command line.
//!
//! # Layout
//!
//! The workspace has three crates: `tessera-api` (wire types generated from `proto/`, ids,
//! key rules, limits), `tessera-client` (the Rust client, which builds without the server),
//! and this one. Dependencies point one way: the server modules use `api`; only placement
//! (and the node service, through it), the CLI, backups and the load generator use
//! `client`.
//!
//! - [`config`]: the node configuration (TOML), its defaults and validation;
//! - [`storage`]: one RocksDB per node — key layout, engine, `raft::Storage` per region;
//! - [`raftstore`]: raft workers with group commit, the router, peers and the KV state
//!   machine;
//! - [`transport`]: raft messages between nodes, one multiplexed stream per node;
//! - [`placement`]: the cluster's metadata (node registry, id counter, routing table) in its
//!   own region, and the scheduler;
//! - [`server`]: a running node — start-up, gRPC services, shutdown;
//! - [`auth`]: users, roles and key-range permissions, and the checks every request
//!   passes once authentication is on;
//! - [`backup`]: backups of the user data at one revision, and restoring one into a new
//!   cluster;
//! - [`bench`]: the load generator behind `tessera bench`;
//! - [`check`]: the linearizability and history checks the chaos tests run;
//! - [`logging`]: `tracing` setup and the raft-rs log bridge;
//! - [`proto`], [`ids`], [`etcdpb`] (from `tessera-api`) and [`client`] (`tessera-client`),
//!   re-exported so that `tessera::client::Client` and `tessera::proto` name the same items.
//!
//! The command-line commands themselves live in the binary (`src/main.rs`, `src/cli/`), not
//! in this library.
//!
//! Invariants:
//! - [`proto`], [`ids`], [`etcdpb`] and [`client`] are the `tessera-api` and
//!   `tessera-client` items themselves, never copies;
//! - a failure a node must not survive (a failed synced write, a non-deterministic apply
//!   error, a panicked raft worker) ends in [`fatal`]: it logs and exits with status 70.

pub mod auth;
pub mod backup;
pub mod bench;
pub mod check;
pub mod config;
pub mod logging;
pub mod placement;
pub mod raftstore;
pub mod server;
pub mod storage;
pub mod transport;

/// The wire types, ids and shared rules (the `tessera-api` crate).
pub use tessera_api::{etcdpb, ids, proto};
/// The Rust client (the `tessera-client` crate, which builds without the server).
pub use tessera_client as client;

/// Stops the process after a failure that must not be survived: a failed synced write or a
/// non-deterministic apply error would otherwise let this replica diverge from the others or
/// acknowledge what is not durable. Raft recovers the node from its log after a restart.
pub fn fatal(msg: &str) -> ! {
    tracing::error!("fatal: {msg}");
    eprintln!("tessera: fatal: {msg}");
    std::process::exit(70)
}
