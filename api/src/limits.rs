//! Message size limits that clients and servers must agree on.

/// The largest gRPC message either side encodes or decodes on the node-to-node and admin
/// services (raft batches and snapshot chunks stay far below it).
pub const MAX_GRPC_MESSAGE_BYTES: usize = 64 << 20;

/// The largest message of the multiplexed `Kv.Commands` stream a client sends or a server
/// answers with: what else is ready waits for the next message. The server decodes messages
/// up to at least twice this.
pub const MAX_COMMANDS_MESSAGE_BYTES: usize = 4 << 20;
