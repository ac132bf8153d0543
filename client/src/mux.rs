//! Gets, puts, deletes and compare-and-swaps multiplexed on one `Kv.Commands` stream per
//! node connection, instead of one unary call (an HTTP/2 stream with its headers, trailers
//! and server task) each.
//!
//! A background task per connection owns the stream. Callers queue a command with a
//! oneshot for its answer; the task sends everything queued since its last send as one
//! message and hands each answer to its caller by id. Nothing waits to fill a batch: a lone
//! request goes out at once, and batches form only when requests arrive faster than the
//! stream drains — under load. A request larger than [`MAX_STREAM_COMMAND_BYTES`] goes as a
//! unary call, so one big value never holds up or breaks the stream for the others.
//!
//! Failures keep the unary call's meaning: a command the task never sent fails with a
//! status that [`super::retry`] treats as not applied; one in flight when the stream broke,
//! or unanswered within the RPC timeout, fails as ambiguous (`Unavailable`,
//! `DeadlineExceeded`), and the caller drops the connection, which ends the task.
//!
//! Invariants:
//! - only the connection's task touches the stream; command ids are unique per stream;
//! - every caller still waiting gets exactly one answer or failure, and a "not sent"
//!   failure only for a command that never left this process;
//! - a command whose caller gave up before it was sent is never sent;
//! - at most `MAX_IN_FLIGHT` commands are in flight per stream, and a message stops taking
//!   commands once within `MAX_STREAM_COMMAND_BYTES` of `MAX_COMMANDS_MESSAGE_BYTES`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::auth::Ch;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};

use super::Client;
use crate::proto::{self, kv_command::Request as Cmd, kv_command_result::Response as Answer};
use tessera_api::limits::MAX_COMMANDS_MESSAGE_BYTES;

/// A request whose encoding is larger than this is sent as a unary call.
pub const MAX_STREAM_COMMAND_BYTES: usize = 256 << 10;
/// Commands in flight on one stream; callers beyond it wait for answers.
const MAX_IN_FLIGHT: usize = 2048;
/// Commands queued for the task before callers wait.
const QUEUE_LEN: usize = 1024;
/// Marks the failure of a command that never ran: safe to retry anywhere.
pub(super) use tessera_api::limits::NOT_SENT;

pub(super) fn not_sent(why: &str) -> Status {
    Status::unavailable(format!("{NOT_SENT} {why}"))
}

type Reply = oneshot::Sender<Result<Answer, Status>>;

/// `Conn::$name`: the request on the stream, or as the unary call `$unary` when it cannot go
/// there.
macro_rules! command {
    ($name:ident, $req:ident, $resp:ident, $kind:ident, $unary:ident) => {
        pub async fn $name(&self, r: proto::$req) -> Result<proto::$resp, Status> {
            match self.stream(Cmd::$kind(r)).await {
                Ok(a) => match a? {
                    Answer::$kind(v) => Ok(v),
                    other => Err(mismatch(&other)),
                },
                Err(Cmd::$kind(r)) => {
                    let unary = Client::kv(self.ch.clone()).$unary(r).await?;
                    Ok(unary.into_inner())
                }
                Err(_) => Err(Status::internal("command changed kind")),
            }
        }
    };
}

/// A connection to one node: its channel, and its command stream when multiplexing is on.
#[derive(Clone)]
pub(super) struct Conn {
    pub ch: Ch,
    multiplex: bool,
    /// The stream's task, started by the first command (a connection used only for node
    /// calls never opens one).
    mux: Arc<OnceLock<mpsc::Sender<(Cmd, Reply)>>>,
    /// Set when the server has no `Commands` stream (a version before it): every request
    /// then goes as a unary call on this connection.
    unary_only: Arc<AtomicBool>,
    timeout: Duration,
}

impl Conn {
    pub fn new(ch: Ch, multiplex: bool, timeout: Duration) -> Conn {
        Conn {
            ch,
            multiplex,
            mux: Default::default(),
            unary_only: Default::default(),
            timeout,
        }
    }

    /// Whether the server turned out to have no command stream.
    pub fn unary_only(&self) -> bool {
        self.unary_only.load(Ordering::Relaxed)
    }

    /// Sends `cmd` on the stream and waits for its answer; gives `cmd` back when this
    /// connection has no stream or the request is too large for it.
    async fn stream(&self, cmd: Cmd) -> Result<Result<Answer, Status>, Cmd> {
        if !self.multiplex || self.unary_only() || cmd.encoded_len() > MAX_STREAM_COMMAND_BYTES {
            return Err(cmd);
        }
        let mux = self.mux.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE_LEN);
            tokio::spawn(run(self.ch.clone(), rx, self.unary_only.clone()));
            tx
        });
        let (tx, rx) = oneshot::channel();
        // The RPC timeout covers the wait for room in the queue too.
        let deadline = tokio::time::Instant::now() + self.timeout;
        match tokio::time::timeout_at(deadline, mux.send((cmd, tx))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Ok(Err(not_sent("connection closed"))),
            Err(_) => {
                return Ok(Err(not_sent(
                    "the connection's queue stayed full for the RPC timeout",
                )))
            }
        }
        Ok(match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Status::unavailable(
                "connection lost with the request in flight",
            )),
            Err(_) => Err(Status::deadline_exceeded(
                "no answer within the RPC timeout",
            )),
        })
    }

    command!(get, GetRequest, GetResponse, Get, get);
    command!(put, PutRequest, PutResponse, Put, put);
    command!(delete, DeleteRequest, DeleteResponse, Delete, delete);
    command!(cas, CasRequest, CasResponse, Cas, compare_and_swap);
    command!(tso, TsoRequest, TsoResponse, Tso, tso);
    command!(lease, LeaseRequest, LeaseResponse, Lease, lease);
}

fn mismatch(a: &Answer) -> Status {
    let kind = match a {
        Answer::Get(_) => "get",
        Answer::Put(_) => "put",
        Answer::Delete(_) => "delete",
        Answer::Cas(_) => "compare-and-swap",
        Answer::Tso(_) => "revisions",
        Answer::Lease(_) => "lease",
        Answer::Error(_) => "error",
    };
    Status::internal(format!("the server answered with a {kind} result"))
}

/// An answer as the caller sees it: a command's error becomes the status its unary call
/// would have failed with.
fn answer(r: proto::KvCommandResult) -> Result<Answer, Status> {
    match r.response {
        Some(Answer::Error(e)) => Err(Status::new(Code::from(e.code), e.message)),
        Some(a) => Ok(a),
        None => Err(Status::internal("the server sent an empty answer")),
    }
}

/// Owns one connection's command stream until every `Conn` is dropped or the stream breaks;
/// then fails whatever is still waiting.
async fn run(ch: Ch, mut queue: mpsc::Receiver<(Cmd, Reply)>, unary_only: Arc<AtomicBool>) {
    let (out, out_rx) = mpsc::channel::<proto::KvCommands>(8);
    let mut kv = Client::kv(ch);
    let call = kv.commands(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    let mut inbound = match call.await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            tracing::debug!(error = %s, "cannot open a commands stream");
            if s.code() == Code::Unimplemented {
                // An older server: the callers' retries go as unary calls.
                unary_only.store(true, Ordering::Relaxed);
            }
            // Nothing was sent: the callers may try again elsewhere — or, refused for
            // want of a login or a permission, learn why.
            let refusal =
                matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied).then_some(s);
            refuse_queued(queue, refusal).await;
            return;
        }
    };
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut next_id = 0u64;
    // A message the stream has not taken yet (HTTP/2 flow control), and the ids in it.
    let mut outgoing: Option<proto::KvCommands> = None;
    let mut taking = true;
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    let why = loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(batch)) => {
                    for r in batch.results {
                        if let Some(reply) = pending.remove(&r.id) {
                            let _ = reply.send(answer(r));
                        }
                    }
                    if !taking && pending.is_empty() {
                        return;
                    }
                }
                Ok(None) => break "the server closed the stream".to_string(),
                Err(s) => break s.message().to_string(),
            },
            permit = out.reserve(), if outgoing.is_some() => match (permit, outgoing.take()) {
                (Ok(p), Some(batch)) => p.send(batch),
                (_, batch) => {
                    outgoing = batch;
                    break "the stream stopped taking requests".to_string();
                }
            },
            c = queue.recv(), if taking && outgoing.is_none() && pending.len() < MAX_IN_FLIGHT => {
                let Some(mut c) = c else {
                    // Every `Conn` is gone: wait only for the answers still owed.
                    taking = false;
                    if pending.is_empty() {
                        return;
                    }
                    continue;
                };
                let mut commands = Vec::new();
                let mut bytes = 0;
                loop {
                    let (cmd, reply) = c;
                    // A caller that gave up while its command was queued (timeout, dropped
                    // future) must not have it applied later, as a unary call cancelled
                    // before it was sent would not be.
                    if !reply.is_closed() {
                        next_id += 1;
                        pending.insert(next_id, reply);
                        let command = proto::KvCommand { id: next_id, request: Some(cmd) };
                        bytes += command.encoded_len();
                        commands.push(command);
                    }
                    if bytes >= MAX_COMMANDS_MESSAGE_BYTES - MAX_STREAM_COMMAND_BYTES
                        || pending.len() >= MAX_IN_FLIGHT
                    {
                        break;
                    }
                    match queue.try_recv() {
                        Ok(next) => c = next,
                        Err(_) => break,
                    }
                }
                if !commands.is_empty() {
                    outgoing = Some(proto::KvCommands { commands });
                }
            },
            _ = sweep.tick() => {
                // Callers that gave up (timeout, dropped future) no longer need an answer.
                pending.retain(|_, r| !r.is_closed());
                if !taking && pending.is_empty() {
                    return;
                }
            }
        }
    };
    tracing::debug!(error = %why, "commands stream ended");
    // What never left is safe to retry; what did may have been applied.
    for c in outgoing.map(|b| b.commands).unwrap_or_default() {
        if let Some(reply) = pending.remove(&c.id) {
            let _ = reply.send(Err(not_sent("connection closed")));
        }
    }
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(Status::unavailable(format!(
            "connection lost with the request in flight: {why}"
        ))));
    }
    refuse_queued(queue, None).await;
}

/// Closes the queue and fails what is still in it as never sent.
async fn refuse_queued(mut queue: mpsc::Receiver<(Cmd, Reply)>, refusal: Option<Status>) {
    queue.close();
    while let Some((_, reply)) = queue.recv().await {
        let _ = reply.send(Err(refusal
            .clone()
            .unwrap_or_else(|| not_sent("connection closed"))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::kv_server::{Kv, KvServer};
    use tonic::{Request, Response, Streaming};

    /// A server from before `Commands`: gets answer, the stream does not exist.
    struct OldServer;

    type Unary<T> = Result<Response<T>, Status>;

    #[tonic::async_trait]
    impl Kv for OldServer {
        type CommandsStream =
            tokio_stream::wrappers::ReceiverStream<Result<proto::KvCommandResults, Status>>;

        async fn commands(
            &self,
            _: Request<Streaming<proto::KvCommands>>,
        ) -> Unary<Self::CommandsStream> {
            Err(Status::unimplemented("no such method"))
        }
        type WatchStream =
            tokio_stream::wrappers::ReceiverStream<Result<proto::WatchResponse, Status>>;
        async fn watch(
            &self,
            _: Request<Streaming<proto::WatchRequest>>,
        ) -> Unary<Self::WatchStream> {
            Err(Status::unimplemented("no such method"))
        }
        async fn revision(
            &self,
            _: Request<proto::RevisionRequest>,
        ) -> Unary<proto::RevisionResponse> {
            Err(Status::unimplemented(""))
        }
        async fn get(&self, r: Request<proto::GetRequest>) -> Unary<proto::GetResponse> {
            Ok(Response::new(proto::GetResponse {
                revision: 0,
                region_error: None,
                kv: Some(proto::KeyValue {
                    key: r.into_inner().key,
                    value: b"unary".to_vec(),
                    ..Default::default()
                }),
            }))
        }
        async fn put(&self, _: Request<proto::PutRequest>) -> Unary<proto::PutResponse> {
            Err(Status::unimplemented(""))
        }
        async fn delete(&self, _: Request<proto::DeleteRequest>) -> Unary<proto::DeleteResponse> {
            Err(Status::unimplemented(""))
        }
        async fn scan(&self, _: Request<proto::ScanRequest>) -> Unary<proto::ScanResponse> {
            Err(Status::unimplemented(""))
        }
        async fn compare_and_swap(
            &self,
            _: Request<proto::CasRequest>,
        ) -> Unary<proto::CasResponse> {
            Err(Status::unimplemented(""))
        }
        async fn batch_get(
            &self,
            _: Request<proto::BatchGetRequest>,
        ) -> Unary<proto::BatchGetResponse> {
            Err(Status::unimplemented(""))
        }
        async fn batch_write(
            &self,
            _: Request<proto::BatchWriteRequest>,
        ) -> Unary<proto::BatchWriteResponse> {
            Err(Status::unimplemented(""))
        }
        async fn tso(&self, _: Request<proto::TsoRequest>) -> Unary<proto::TsoResponse> {
            Err(Status::unimplemented(""))
        }
        async fn compact(
            &self,
            _: Request<proto::CompactRequest>,
        ) -> Unary<proto::CompactResponse> {
            Err(Status::unimplemented(""))
        }
        async fn lease(&self, _: Request<proto::LeaseRequest>) -> Unary<proto::LeaseResponse> {
            Err(Status::unimplemented(""))
        }
        type LeaseKeepAliveStream =
            tokio_stream::wrappers::ReceiverStream<Result<proto::LeaseKeepAliveResponse, Status>>;
        async fn lease_keep_alive(
            &self,
            _: Request<Streaming<proto::LeaseKeepAliveRequest>>,
        ) -> Unary<Self::LeaseKeepAliveStream> {
            Err(Status::unimplemented("no such method"))
        }
    }

    #[tokio::test]
    async fn a_server_without_the_stream_gets_unary_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(KvServer::new(OldServer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let ch = tonic::service::interceptor::InterceptedService::new(ch, Default::default());
        let conn = Conn::new(ch, true, Duration::from_secs(5));
        let get = || proto::GetRequest {
            revision: 0,
            header: None,
            key: b"k".to_vec(),
        };
        // The first command finds out: it was never sent, so the caller may retry it.
        let first = conn.get(get()).await.unwrap_err();
        assert!(first.message().starts_with(NOT_SENT), "{first:?}");
        assert!(conn.unary_only());
        // From then on, unary calls.
        let kv = conn.get(get()).await.unwrap().kv.unwrap();
        assert_eq!(kv.value, b"unary");
    }
}
