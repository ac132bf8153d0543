//! What tessera's clients and servers share, and nothing else: the wire types generated from
//! `proto/`, the identifier newtypes, the rules of the user keyspace, the compare-and-swap
//! vocabulary, and the message size limits both sides must agree on.
//!
//! Depends on tonic and prost only, so a program that embeds the client does not build the
//! server's storage engine or consensus library.
//!
//! - [`proto`]: tessera's gRPC services and messages (`proto/tessera.proto`);
//! - [`etcdpb`]: the subset of etcd's v3 KV API the load generator speaks;
//! - [`hex`]: bytes as hex and back;
//! - [`ids`]: region, peer, node and cluster ids as distinct types;
//! - [`keys`]: which user keys exist and which belong to the system keyspace;
//! - [`kv`]: compare-and-swap comparisons and actions;
//! - [`limits`]: message sizes.
//!
//! Invariants:
//! - the shared rules (key ranges, comparisons, limits) are constants and pure functions
//!   used by both sides as they are, so a client and a server of one build cannot disagree
//!   on them;
//! - `proto/` is the one definition of the wire format: nothing here encodes a message by
//!   hand.

pub mod hex;
pub mod ids;
pub mod keys;
pub mod kv;
pub mod limits;

pub mod proto {
    //! Generated wire and storage types (`proto/tessera.proto`).
    tonic::include_proto!("tessera");
}

pub mod etcdpb {
    //! The subset of etcd's v3 KV API that the bench speaks (`proto/etcd.proto`).
    tonic::include_proto!("etcdserverpb");
}
