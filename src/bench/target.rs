//! What the bench drives: a tessera cluster through the client library, or an etcd cluster
//! through etcd's v3 gRPC KV API. Both go through tonic on the same runtime and the same
//! operation code, so the load generator is identical. The connections differ: tessera's
//! are the client library's (its timeouts, retries and multiplexing), etcd's are plain
//! channels with a 2 s connect and a 30 s request timeout.
//!
//! Invariants:
//! - any connection index is valid: it is taken modulo the number of connections;
//! - every failure becomes an [`OpError`] naming its kind; no answer causes a panic;
//! - a compare-and-swap compares the key's version only, and only ever puts.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::client::{CasAction, Client, ClientOptions, Compare, Error};
use crate::etcdpb;
use crate::etcdpb::kv_client::KvClient as EtcdKv;
use crate::proto::ReadConsistency;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    Tessera,
    Etcd,
}

/// A failed operation, by kind (for the error table).
#[derive(Debug)]
pub struct OpError(pub String);

fn tessera_err(e: Error) -> OpError {
    let kind = match e {
        Error::Unavailable(_) => "unavailable",
        Error::Deadline { .. } => "deadline",
        Error::InvalidArgument(_) => "invalid_argument",
        Error::Unknown(_) => "unknown_outcome",
        Error::Server(_) => "server",
        Error::NotFound(_) => "not_found",
        Error::Refused(_) => "refused",
        Error::Compacted { .. } => "compacted",
        Error::QuotaExceeded(_) => "quota_exceeded",
        Error::Unauthenticated(_) => "unauthenticated",
        Error::PermissionDenied(_) => "permission_denied",
    };
    OpError(kind.into())
}

fn etcd_err(s: tonic::Status) -> OpError {
    OpError(format!("{:?}", s.code()).to_lowercase())
}

/// A channel to the etcd endpoint `ep` (host:port).
pub async fn etcd_channel(ep: &str) -> Result<Channel, String> {
    Endpoint::from_shared(format!("http://{ep}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| format!("etcd at {ep}: {e}"))
}

/// A value with the key's version (0 = the key does not exist).
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: u64,
}

/// How a tessera target is reached: TLS, and the user to log in as.
#[derive(Default)]
pub struct Access {
    pub tls: Option<crate::client::TlsOptions>,
    pub credentials: Option<crate::client::Credentials>,
}

pub enum Target {
    /// One client per connection; each has its own channels to the nodes.
    Tessera(Vec<Client>),
    Etcd {
        conns: Vec<EtcdKv<Channel>>,
        serializable: bool,
    },
}

impl Target {
    pub async fn connect(
        kind: TargetKind,
        endpoints: &[String],
        connections: usize,
        serializable: bool,
        unary: bool,
        access: Access,
    ) -> Result<Target, String> {
        let connections = connections.max(1);
        match kind {
            TargetKind::Tessera => {
                let opts = ClientOptions {
                    consistency: if serializable {
                        ReadConsistency::Serializable
                    } else {
                        ReadConsistency::Linearizable
                    },
                    multiplex: !unary,
                    tls: access.tls,
                    credentials: access.credentials,
                    ..Default::default()
                };
                let mut clients = Vec::with_capacity(connections);
                for _ in 0..connections {
                    clients.push(
                        Client::connect(endpoints, opts.clone())
                            .await
                            .map_err(|e| e.to_string())?,
                    );
                }
                Ok(Target::Tessera(clients))
            }
            TargetKind::Etcd => {
                let mut conns = Vec::with_capacity(connections);
                for i in 0..connections {
                    let ep = &endpoints[i % endpoints.len()];
                    let ch = etcd_channel(ep).await?;
                    conns.push(EtcdKv::new(ch));
                }
                Ok(Target::Etcd {
                    conns,
                    serializable,
                })
            }
        }
    }

    pub fn connections(&self) -> usize {
        match self {
            Target::Tessera(c) => c.len(),
            Target::Etcd { conns, .. } => conns.len(),
        }
    }

    /// Client-side retries so far (tessera's routing retries; etcd's client does none).
    pub fn retries(&self) -> u64 {
        match self {
            Target::Tessera(c) => c
                .iter()
                .map(|c| c.stats().retries.load(std::sync::atomic::Ordering::Relaxed))
                .sum(),
            Target::Etcd { .. } => 0,
        }
    }

    pub async fn get(&self, conn: usize, key: &[u8]) -> Result<Option<Versioned>, OpError> {
        match self {
            Target::Tessera(c) => {
                Ok(c[conn % c.len()]
                    .get(key)
                    .await
                    .map_err(tessera_err)?
                    .map(|kv| Versioned {
                        value: kv.value,
                        version: kv.version,
                    }))
            }
            Target::Etcd {
                conns,
                serializable,
            } => {
                let r = conns[conn % conns.len()]
                    .clone()
                    .range(etcdpb::RangeRequest {
                        key: key.to_vec(),
                        serializable: *serializable,
                        ..Default::default()
                    })
                    .await
                    .map_err(etcd_err)?
                    .into_inner();
                Ok(r.kvs.into_iter().next().map(|kv| Versioned {
                    value: kv.value,
                    version: kv.version.max(0) as u64,
                }))
            }
        }
    }

    pub async fn put(&self, conn: usize, key: &[u8], value: &[u8]) -> Result<(), OpError> {
        self.put_revision(conn, key, value).await.map(|_| ())
    }

    /// A put that answers the write's revision.
    pub async fn put_revision(
        &self,
        conn: usize,
        key: &[u8],
        value: &[u8],
    ) -> Result<u64, OpError> {
        match self {
            Target::Tessera(c) => c[conn % c.len()]
                .put(key, value)
                .await
                .map(|r| r.revision)
                .map_err(tessera_err),
            Target::Etcd { conns, .. } => conns[conn % conns.len()]
                .clone()
                .put(etcdpb::PutRequest {
                    key: key.to_vec(),
                    value: value.to_vec(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().header.map_or(0, |h| h.revision as u64))
                .map_err(etcd_err),
        }
    }

    /// Up to `limit` keys from `start` (inclusive) to `end` (exclusive); returns how many.
    pub async fn scan(
        &self,
        conn: usize,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<usize, OpError> {
        match self {
            Target::Tessera(c) => c[conn % c.len()]
                .scan(start, end, limit)
                .await
                .map(|kvs| kvs.len())
                .map_err(tessera_err),
            Target::Etcd {
                conns,
                serializable,
            } => {
                let r = conns[conn % conns.len()]
                    .clone()
                    .range(etcdpb::RangeRequest {
                        key: start.to_vec(),
                        range_end: end.to_vec(),
                        limit: limit as i64,
                        serializable: *serializable,
                        ..Default::default()
                    })
                    .await
                    .map_err(etcd_err)?
                    .into_inner();
                Ok(r.kvs.len())
            }
        }
    }

    /// Writes `value` only if the key's version is `version` (0 = absent).
    pub async fn cas(
        &self,
        conn: usize,
        key: &[u8],
        version: u64,
        value: &[u8],
    ) -> Result<bool, OpError> {
        match self {
            Target::Tessera(c) => c[conn % c.len()]
                .cas(
                    key,
                    Compare::Version(version),
                    CasAction::Put(value.to_vec()),
                )
                .await
                .map(|r| r.succeeded)
                .map_err(tessera_err),
            Target::Etcd { conns, .. } => {
                let r = conns[conn % conns.len()]
                    .clone()
                    .txn(etcdpb::TxnRequest {
                        compare: vec![etcdpb::Compare {
                            result: etcdpb::compare::CompareResult::Equal as i32,
                            target: etcdpb::compare::CompareTarget::Version as i32,
                            key: key.to_vec(),
                            target_union: Some(etcdpb::compare::TargetUnion::Version(
                                version as i64,
                            )),
                        }],
                        success: vec![etcdpb::RequestOp {
                            request: Some(etcdpb::request_op::Request::RequestPut(
                                etcdpb::PutRequest {
                                    key: key.to_vec(),
                                    value: value.to_vec(),
                                    ..Default::default()
                                },
                            )),
                        }],
                        failure: vec![],
                    })
                    .await
                    .map_err(etcd_err)?
                    .into_inner();
                Ok(r.succeeded)
            }
        }
    }
}
