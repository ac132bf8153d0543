//! tessera: a multi-Raft sharded metadata service.
//!
//! # Layout
//!
//! - [`config`]: the node configuration (TOML), its defaults and validation;
//! - [`storage`]: one RocksDB per node — key layout, engine, `raft::Storage` per region;
//! - [`raftstore`]: raft workers with group commit, the router, peers and the KV state
//!   machine;
//! - [`transport`]: raft messages between nodes, one multiplexed stream per node;
//! - [`placement`]: the cluster's metadata (node registry, id counter) in its own region;
//! - [`server`]: a running node — start-up, gRPC services, shutdown;
//! - [`client`]: the Rust client with its region cache;
//! - [`bench`]: the load generator behind `tessera bench`;
//! - [`logging`]: `tracing` setup and the raft-rs log bridge.

pub mod bench;
pub mod check;
pub mod client;
pub mod config;
pub mod ids;
pub mod logging;
pub mod placement;
pub mod raftstore;
pub mod server;
pub mod storage;
pub mod transport;

pub mod proto {
    //! Generated wire and storage types (`proto/tessera.proto`).
    tonic::include_proto!("tessera");
}

pub mod etcdpb {
    //! The subset of etcd's v3 KV API that the bench speaks (`proto/etcd.proto`).
    tonic::include_proto!("etcdserverpb");
}

/// Stops the process after a failure that must not be survived: a failed synced write or a
/// non-deterministic apply error would otherwise let this replica diverge from the others or
/// acknowledge what is not durable. Raft recovers the node from its log after a restart.
pub fn fatal(msg: &str) -> ! {
    tracing::error!("fatal: {msg}");
    eprintln!("tessera: fatal: {msg}");
    std::process::exit(70)
}
