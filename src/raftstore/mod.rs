//! The multi-Raft store: many regions per node, each owned by one raft worker thread.
//!
//! Data flow (docs/architecture.md, "The node: threads and data flow"):
//! ```text
//! gRPC service ─▶ Router (region → worker inbox) ─▶ Worker round ─▶ Peer (RawNode)
//!                                                     │ one WriteBatch, one fsync per round
//!                                                     │ Transport (one stream per node)
//!                                                     └ replies through oneshot channels
//! ```
//!
//! - [`router`]: region id → worker mailbox;
//! - [`worker`]: the thread loop and the group-commit round;
//! - [`peer`]: one replica: proposals, reads, the two halves of Ready handling;
//! - [`local_read`]: lease reads served on the gRPC thread, without the worker;
//! - [`clock`]: the lease clock (CLOCK_BOOTTIME, which counts suspend);
//! - [`apply`]: the KV state machine;
//! - [`hub`]: the watchers of the regions led here, fed by apply;
//! - [`lessor`]: the leases of the lease regions led here, with their expiry times;
//! - [`cmd`]: commands in the raft log and their results;
//! - [`session`]: exactly-once writes — each region's record of the writes it applied;
//! - [`msg`]: what reaches a worker and the errors that go back;
//! - [`bootstrap`]: first start and restart of a store;
//! - [`store`]: what a node's peers share (settings, engine, the ranges they own).
//!
//! Invariants:
//! - a region is owned by exactly one worker thread at a time, and only that thread
//!   touches its peer; everything else reaches it through the router;
//! - a client is answered only after the batch holding its write's apply is written;
//! - a failure a replica must not survive (a failed write, a panicked worker) stops the
//!   node through `crate::fatal`; a restart recovers from the log.

pub mod apply;
pub mod bootstrap;
pub mod clock;
pub mod cmd;
pub mod hub;
pub mod lessor;
pub mod local_read;
pub mod msg;
pub mod peer;
pub mod router;
pub mod session;
pub mod store;
pub mod worker;
