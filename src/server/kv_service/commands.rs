//! The `Commands` stream: gets, puts, deletes and compare-and-swaps of one client
//! connection multiplexed on one bidirectional stream. A message holds whatever the client
//! had queued; the commands run concurrently, each as its unary call would; each answer
//! message holds whatever had finished, up to the message size limit. A command's error
//! travels in its own answer and does not end the stream.
//!
//! Invariants:
//! - a command is served exactly as its unary call and answered once, under its own id;
//!   its error never ends the stream;
//! - the stream's caller is fixed when it opens; each command is checked against that
//!   user's permissions as they stand when it runs;
//! - at most 4,096 commands of one stream run at once; past that the stream is not read;
//! - an answer message takes no more answers once it reaches `MAX_COMMANDS_MESSAGE_BYTES`,
//!   so it passes that by at most one answer;
//! - no command task outlives its stream: when the stream breaks or the node stops, the
//!   running commands are aborted and their answers lost, as with a broken connection.

use std::sync::Arc;

use futures::future::Either;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::access::{authorize_fresh, Hide};
use super::KvCore;
use crate::auth::Caller;
use crate::proto;

/// Commands of one `Commands` stream being served at once; beyond this the stream is not
/// read until some finish (HTTP/2 flow control then holds the client back).
const MAX_STREAM_COMMANDS: usize = 4096;

impl KvCore {
    /// Serves one command of a `Commands` stream as its unary call would.
    async fn execute(
        self: Arc<Self>,
        c: proto::KvCommand,
        caller: Arc<Caller>,
    ) -> proto::KvCommandResult {
        use proto::kv_command::Request as Q;
        use proto::kv_command_result::Response as A;
        let op = match &c.request {
            Some(Q::Get(_)) => "get",
            Some(Q::Put(_)) => "put",
            Some(Q::Delete(_)) => "delete",
            Some(Q::Cas(_)) => "cas",
            Some(Q::Tso(_)) => "tso",
            Some(Q::Lease(_)) => "lease",
            None => "none",
        };
        let started = std::time::Instant::now();
        let (gate, caller) = (&*self.gate, &*caller);
        // Checked as its unary call would be: permissions before, old values after.
        macro_rules! run {
            ($r:ident, $op:ident, $answer:path) => {
                match authorize_fresh(&$r, gate, caller).await {
                    Ok(()) => self.$op($r, caller).await.map(|mut a| {
                        a.hide(gate, caller);
                        $answer(a)
                    }),
                    Err(s) => Err(s),
                }
            };
        }
        let answer = match c.request {
            Some(Q::Get(r)) => run!(r, get, A::Get),
            Some(Q::Put(r)) => run!(r, put, A::Put),
            Some(Q::Delete(r)) => run!(r, delete, A::Delete),
            Some(Q::Cas(r)) => run!(r, compare_and_swap, A::Cas),
            Some(Q::Tso(r)) => run!(r, tso, A::Tso),
            Some(Q::Lease(r)) => run!(r, lease, A::Lease),
            None => Err(Status::invalid_argument("command carries no request")),
        };
        metrics::histogram!("tessera_request_seconds", "op" => op)
            .record(started.elapsed().as_secs_f64());
        proto::KvCommandResult {
            id: c.id,
            response: Some(answer.unwrap_or_else(|s| {
                A::Error(proto::CommandError {
                    code: s.code() as i32,
                    message: s.message().to_string(),
                })
            })),
        }
    }
}

/// Reads a `Commands` stream, runs its commands concurrently and answers each batch of
/// finished ones in one message, until the client closes its side and every command is
/// answered, the stream breaks, or the node stops.
pub(super) async fn serve_commands(
    core: Arc<KvCore>,
    mut inbound: Streaming<proto::KvCommands>,
    privileged: bool,
    caller: Caller,
    out: mpsc::Sender<Result<proto::KvCommandResults, Status>>,
) {
    let caller = Arc::new(caller);
    // With more than one runtime thread each command runs as its own task, so that one
    // connection's commands (lease reads above all) spread over the threads as unary calls
    // do; with one thread they run inside this task, which saves a spawn per command.
    let spread = tokio::runtime::Handle::current().metrics().num_workers() > 1;
    let mut running = FuturesUnordered::new();
    let mut open = true;
    let mut stopping = core.stopping.clone();
    loop {
        tokio::select! {
            // The commands still running lose their answers, as when a connection breaks.
            _ = stopping.wait_for(|s| *s).map(|_| ()) => return,
            m = inbound.message(), if open && running.len() < MAX_STREAM_COMMANDS => match m {
                Ok(Some(batch)) => {
                    metrics::histogram!("tessera_kv_stream_batch_commands")
                        .record(batch.commands.len() as f64);
                    for mut c in batch.commands {
                        if !privileged {
                            drop_system(&mut c);
                        }
                        let id = c.id;
                        let run = core.clone().execute(c, caller.clone());
                        running.push(if spread {
                            Either::Left(Spawned { id, task: tokio::spawn(run) })
                        } else {
                            Either::Right(run)
                        });
                    }
                }
                Ok(None) => open = false,
                Err(s) => {
                    // Undecodable or oversize input: say why, and stop; the client's
                    // commands still running lose their answers, as with a broken connection.
                    tracing::debug!(error = %s, "commands stream failed");
                    let _ = out.send(Err(s)).await;
                    return;
                }
            },
            Some(first) = running.next() => {
                // Whatever else has finished goes along, up to a size that keeps the message
                // far below gRPC's limit however large the values (the rest go next).
                let mut bytes = first.encoded_len();
                let mut results = vec![first];
                while bytes < tessera_api::limits::MAX_COMMANDS_MESSAGE_BYTES {
                    match running.next().now_or_never() {
                        Some(Some(r)) => {
                            bytes += r.encoded_len();
                            results.push(r);
                        }
                        _ => break,
                    }
                }
                if out.send(Ok(proto::KvCommandResults { results })).await.is_err() {
                    return;
                }
            }
            else => return,
        }
    }
}

/// A command running as its own task. Dropped with its stream (the stream broke, or the
/// node stops), it is aborted, so no task outlives the stream holding the node's state.
struct Spawned {
    id: u64,
    task: tokio::task::JoinHandle<proto::KvCommandResult>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::future::Future for Spawned {
    type Output = proto::KvCommandResult;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let id = self.id;
        std::pin::Pin::new(&mut self.task).poll(cx).map(|r| {
            r.unwrap_or_else(|e| {
                // Only a panic gets here (an aborted task's stream is gone): whether the
                // command took effect is unknown, and the client will say so.
                proto::KvCommandResult {
                    id,
                    response: Some(proto::kv_command_result::Response::Error(
                        proto::CommandError {
                            code: tonic::Code::Unknown as i32,
                            message: format!("command task failed: {e}"),
                        },
                    )),
                }
            })
        })
    }
}

/// Drops a command's system access (a caller without a certificate of the cluster CA on a
/// TLS node).
fn drop_system(c: &mut proto::KvCommand) {
    use super::grpc::SystemAccess;
    use proto::kv_command::Request as Q;
    match c.request.as_mut() {
        Some(Q::Get(r)) => r.drop_system(),
        Some(Q::Put(r)) => r.drop_system(),
        Some(Q::Delete(r)) => r.drop_system(),
        Some(Q::Cas(r)) => r.drop_system(),
        Some(Q::Tso(r)) => r.drop_system(),
        Some(Q::Lease(r)) => r.drop_system(),
        None => {}
    }
}
