//! In-process cluster tests: three nodes on `127.0.0.1:0` in one process, real gRPC between
//! them, each with its own RocksDB.

#[path = "../common/mod.rs"]
mod common;

mod auth;
mod errors;
mod exactly_once;
mod history;
mod kv;
mod leases;
mod lifecycle;
mod merge;
mod placement;
mod routing;
mod snapshot;
mod wake;
mod watch;
