//! Message size limits that clients and servers must agree on.
//!
//! Invariants:
//! - `MAX_COMMANDS_MESSAGE_BYTES` stays far below `MAX_GRPC_MESSAGE_BYTES`: a `Commands`
//!   message may run past the former by one command or answer and still decodes;
//! - the server, the transport and the client take these values from here; none keeps a
//!   copy.

/// The largest gRPC message either side encodes or decodes on the node-to-node and admin
/// services (raft batches and snapshot chunks stay far below it).
pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 << 20;

/// The largest message of the multiplexed `Kv.Commands` stream a client sends or a server
/// answers with: what else is ready waits for the next message. The server decodes messages
/// up to at least twice this.
pub const MAX_COMMANDS_MESSAGE_BYTES: usize = 4 << 20;

/// The shortest lease TTL: a grant asking for less gets this (as etcd raises TTLs below
/// one and a half election timeouts).
pub const MIN_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// The longest lease TTL (etcd's limit).
pub const MAX_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(9_000_000_000);

/// How the message of a write refused for lack of space starts (a `RESOURCE_EXHAUSTED`
/// status): the client turns it into its `QuotaExceeded` error.
pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";

/// How the message of an `UNAVAILABLE` status starts when the request was refused before
/// anything ran (the client's own failures to send, and a node refusing a call it cannot
/// check yet): the client then retries it anywhere, writes included, as never executed.
pub const NOT_SENT: &str = "not sent:";
