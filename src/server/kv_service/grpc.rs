//! The `Kv` gRPC service's methods: each hands its request to [`KvCore`].

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::access::{authorize_fresh, Authorize, Hide};
use super::commands::serve_commands;
use super::{lease, watch_stream, KvService};
use crate::auth::Caller;
use crate::proto;
use crate::proto::kv_server::Kv;

/// Requests whose header may ask for system access (placement's keys).
pub(super) trait SystemAccess {
    fn drop_system(&mut self);
}

macro_rules! system_access {
    ($($t:ty),*) => {$(
        impl SystemAccess for $t {
            fn drop_system(&mut self) {
                if let Some(h) = self.header.as_mut() {
                    h.system = false;
                }
            }
        }
    )*};
}

system_access!(
    proto::GetRequest,
    proto::PutRequest,
    proto::DeleteRequest,
    proto::ScanRequest,
    proto::CasRequest,
    proto::BatchGetRequest,
    proto::BatchWriteRequest,
    proto::TsoRequest,
    proto::LeaseRequest
);

impl KvService {
    /// Whether the caller may use system access: on a TLS node only a caller with a
    /// certificate of the cluster CA (a node, or an operator: `Caller::Node`) may.
    fn privileged(&self, caller: &Caller) -> bool {
        self.core.transport.node_tls().is_none() || matches!(caller, Caller::Node)
    }

    /// Who is calling (`crate::auth`): refused here when authentication is on and the
    /// caller shows neither a certificate of the cluster CA nor a valid token.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        crate::server::caller(&self.core.gate, self.core.transport.node_tls(), request)
    }

    /// The request, its system access dropped unless the caller may have it: a user's
    /// client then gets the usual refusal for placement's keys.
    fn checked<T: SystemAccess>(&self, request: Request<T>, caller: &Caller) -> T {
        let mut r = request.into_inner();
        if !self.privileged(caller) {
            r.drop_system();
        }
        r
    }
}

/// A unary KV call: who calls, system access dropped unless allowed, the caller's
/// permissions checked, the request served, and old values it may not read left out.
macro_rules! serve {
    ($self:ident, $request:ident, $op:ident) => {{
        let caller = $self.caller(&$request)?;
        let r = $self.checked($request, &caller);
        authorize_fresh(&r, &$self.core.gate, &caller).await?;
        let mut resp = $self.core.$op(r, &caller).await?;
        resp.hide(&$self.core.gate, &caller);
        Ok(Response::new(resp))
    }};
}

#[tonic::async_trait]
impl Kv for KvService {
    type CommandsStream = ReceiverStream<Result<proto::KvCommandResults, Status>>;

    async fn commands(
        &self,
        request: Request<Streaming<proto::KvCommands>>,
    ) -> Result<Response<Self::CommandsStream>, Status> {
        let caller = self.caller(&request)?;
        let (tx, rx) = mpsc::channel(16);
        let privileged = self.privileged(&caller);
        tokio::spawn(serve_commands(
            self.core.clone(),
            request.into_inner(),
            privileged,
            caller,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn revision(
        &self,
        request: Request<proto::RevisionRequest>,
    ) -> Result<Response<proto::RevisionResponse>, Status> {
        let caller = self.caller(&request)?;
        request.get_ref().authorize(&self.core.gate, &caller)?;
        self.core.current_revision().await.map(Response::new)
    }

    type WatchStream = ReceiverStream<Result<proto::WatchResponse, Status>>;

    async fn watch(
        &self,
        request: Request<Streaming<proto::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = self.caller(&request)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(watch_stream::serve_watch(
            self.core.clone(),
            request.into_inner(),
            caller,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> Result<Response<proto::GetResponse>, Status> {
        serve!(self, request, get)
    }

    async fn put(
        &self,
        request: Request<proto::PutRequest>,
    ) -> Result<Response<proto::PutResponse>, Status> {
        serve!(self, request, put)
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        serve!(self, request, delete)
    }

    async fn scan(
        &self,
        request: Request<proto::ScanRequest>,
    ) -> Result<Response<proto::ScanResponse>, Status> {
        serve!(self, request, scan)
    }

    async fn compare_and_swap(
        &self,
        request: Request<proto::CasRequest>,
    ) -> Result<Response<proto::CasResponse>, Status> {
        serve!(self, request, compare_and_swap)
    }

    async fn batch_get(
        &self,
        request: Request<proto::BatchGetRequest>,
    ) -> Result<Response<proto::BatchGetResponse>, Status> {
        serve!(self, request, batch_get)
    }

    async fn batch_write(
        &self,
        request: Request<proto::BatchWriteRequest>,
    ) -> Result<Response<proto::BatchWriteResponse>, Status> {
        serve!(self, request, batch_write)
    }

    async fn tso(
        &self,
        request: Request<proto::TsoRequest>,
    ) -> Result<Response<proto::TsoResponse>, Status> {
        serve!(self, request, tso)
    }

    async fn compact(
        &self,
        request: Request<proto::CompactRequest>,
    ) -> Result<Response<proto::CompactResponse>, Status> {
        crate::server::require_admin(
            &self.core.gate,
            self.core.transport.node_tls(),
            &request,
            "compaction",
        )?;
        self.core
            .compact(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn lease(
        &self,
        request: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::LeaseResponse>, Status> {
        serve!(self, request, lease)
    }

    type LeaseKeepAliveStream = ReceiverStream<Result<proto::LeaseKeepAliveResponse, Status>>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<proto::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let caller = self.caller(&request)?;
        self.core.gate.allow(&caller, crate::auth::Need::Any)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(lease::serve_keep_alive(
            self.core.clone(),
            request.into_inner(),
            caller,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
