//! `proto::Auth`: logging in, and changes to users, roles and permissions
//! (docs/security.md, "Users and roles"); and the loop that keeps the node's [`Gate`]
//! current.
//!
//! Invariants:
//! - a login checks the password against the state read from placement (linearizable),
//!   so a changed password works at once on every node;
//! - a change is allowed to a root user while authentication is on, else only to a caller
//!   that may make peer-only calls; enabling needs TLS on the node serving the change;
//! - a change applies on the node that made it before it is answered, on the others at
//!   their next refresh (`security.auth_refresh_ms`).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::auth::model::{AuthDoc, Change};
use crate::auth::password::PasswordHash;
use crate::auth::{Gate, Need};
use crate::placement::client::SystemClient;
use crate::proto::{self, auth_server};
use crate::transport::Transport;

pub struct AuthService {
    gate: Arc<Gate>,
    placement: SystemClient,
    transport: Transport,
    password_iterations: u32,
}

impl AuthService {
    pub fn new(
        gate: Arc<Gate>,
        placement: SystemClient,
        transport: Transport,
        password_iterations: u32,
    ) -> Self {
        Self {
            gate,
            placement,
            transport,
            password_iterations,
        }
    }

    async fn load(&self) -> Result<(crate::client::Client, Option<AuthDoc>), Status> {
        let client = self
            .placement
            .get()
            .await
            .map_err(|e| Status::unavailable(format!("placement not reachable: {e}")))?;
        let doc = crate::placement::auth::load(&client)
            .await
            .map_err(|e| Status::unavailable(format!("reading the auth state: {e}")))?;
        self.gate.install(doc.as_ref());
        Ok((client, doc))
    }

    /// Changes and listings: root once enabled, else a caller with peer rights.
    fn may_administer<T>(&self, request: &Request<T>, doc: Option<&AuthDoc>) -> Result<(), Status> {
        let tls = self.transport.node_tls();
        if doc.is_some_and(|d| d.enabled) {
            let caller = super::caller(&self.gate, tls, request)?;
            self.gate.allow(&caller, Need::Admin)
        } else {
            super::require_peer(tls, request, "changing users and roles")
        }
    }
}

#[tonic::async_trait]
impl auth_server::Auth for AuthService {
    async fn authenticate(
        &self,
        request: Request<proto::AuthenticateRequest>,
    ) -> Result<Response<proto::AuthenticateResponse>, Status> {
        let (_, doc) = self.load().await?;
        let r = request.into_inner();
        let doc = doc.unwrap_or_default();
        // The hash is slow on purpose: off the runtime's threads, a bounded number at once.
        let _turn = self.gate.login_turn().await?;
        let gate = self.gate.clone();
        let (token, ttl_secs) =
            tokio::task::spawn_blocking(move || gate.authenticate(&doc, &r.name, &r.password))
                .await
                .map_err(|e| Status::internal(format!("login task failed: {e}")))??;
        Ok(Response::new(proto::AuthenticateResponse {
            token,
            ttl_secs,
        }))
    }

    async fn change(
        &self,
        request: Request<proto::AuthChangeRequest>,
    ) -> Result<Response<proto::AuthChangeResponse>, Status> {
        let (client, doc) = self.load().await?;
        self.may_administer(&request, doc.as_ref())?;
        let op = request
            .into_inner()
            .op
            .ok_or_else(|| Status::invalid_argument("the change names no operation"))?;
        if matches!(op, proto::auth_change_request::Op::Enable(true)) && !self.gate.tls() {
            return Err(Status::failed_precondition(
                "authentication needs TLS on every node (security.cert_file): without it \
                 a peer cannot be told from a client, and passwords cross the network in \
                 clear text",
            ));
        }
        let iterations = self.password_iterations;
        let change = tokio::task::spawn_blocking(move || {
            Change::from_proto(
                op,
                |p| PasswordHash::new(p, iterations),
                || {
                    let mut key = vec![0u8; 32];
                    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                        .map_err(|_| "no randomness for a token key".to_string())?;
                    Ok(key)
                },
            )
        })
        .await
        .map_err(|e| Status::internal(format!("hashing task failed: {e}")))?
        .map_err(Status::invalid_argument)?;
        let doc = crate::placement::auth::change(&client, &change)
            .await
            .map_err(|e| match e {
                // It may have been written: the caller must not send it again elsewhere.
                crate::client::Error::Unknown(_) | crate::client::Error::Deadline { .. } => {
                    Status::aborted(format!("result unknown: writing the auth state: {e}"))
                }
                e => Status::unavailable(format!("writing the auth state: {e}")),
            })?
            .map_err(Status::failed_precondition)?;
        self.gate.install(Some(&doc));
        Ok(Response::new(proto::AuthChangeResponse {}))
    }

    async fn show(
        &self,
        request: Request<proto::AuthShowRequest>,
    ) -> Result<Response<proto::AuthShowResponse>, Status> {
        let (_, doc) = self.load().await?;
        self.may_administer(&request, doc.as_ref())?;
        Ok(Response::new(doc.unwrap_or_default().show()))
    }
}

/// Keeps `gate` current: reads the state from placement every `interval` (every 200 ms
/// until the first read succeeds). Runs until aborted.
pub async fn refresh_loop(gate: Arc<Gate>, placement: SystemClient, interval: Duration) {
    let mut loaded = false;
    loop {
        let n = gate.refresh_started();
        if let Ok(client) = placement.get().await {
            match crate::placement::auth::load(&client).await {
                Ok(doc) => {
                    gate.install(doc.as_ref());
                    loaded = true;
                }
                Err(e) => tracing::debug!(error = %e, "auth state not read"),
            }
        }
        gate.refresh_finished(n);
        let wait = if loaded {
            interval
        } else {
            Duration::from_millis(200)
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = gate.woken() => {}
        }
    }
}
