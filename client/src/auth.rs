//! Logging in as a user (`ClientOptions::credentials`) and the cluster's users and roles.
//!
//! The client logs in once at connect time and keeps a signed token, which every call
//! carries as its `authorization` metadata; a background task logs in again before the
//! token expires, so open streams and new calls never find it expired. A call refused as
//! `Unauthenticated` (the token was invalidated: a password change, the user re-created)
//! logs in once more and retries.
//!
//! Invariants:
//! - the password stays in the client's options only; it is sent to a node only in a login,
//!   and only over TLS;
//! - a login refused for a wrong password ends the call (or `connect`) with
//!   [`Error::Unauthenticated`]; it is never retried with the same password;
//! - with credentials given to a cluster whose authentication is off, the client works
//!   without a token and tries to log in again every few seconds.

use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::{Client, Error, Inner, Result};
use crate::proto::auth_change_request::Op;
use crate::proto::auth_client::AuthClient;
use crate::proto::{self, AuthChangeRequest, AuthShowRequest, AuthenticateRequest};

/// The metadata key the token travels in.
pub const TOKEN_METADATA: &str = "authorization";

/// A user's name and password.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// The current token, shared by every connection of a client.
#[derive(Clone, Default)]
pub struct Token(Arc<RwLock<Option<MetadataValue<Ascii>>>>);

impl Token {
    fn set(&self, token: Option<MetadataValue<Ascii>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = token;
    }
}

impl Interceptor for Token {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(t) = self.0.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            request.metadata_mut().insert(TOKEN_METADATA, t.clone());
        }
        Ok(request)
    }
}

/// A connection to a node, each request carrying the client's token.
pub type Ch = InterceptedService<Channel, Token>;

/// How long to wait before trying to log in again after a failure, or while the cluster
/// has authentication off.
const RELOGIN_RETRY: Duration = Duration::from_secs(5);

impl Client {
    /// Logs in with the client's credentials (if any); returns the token's lifetime, or
    /// `None` when there are no credentials or the cluster has authentication off.
    pub(super) async fn login(&self) -> Result<Option<Duration>> {
        let Some(creds) = self.inner.opts.credentials.clone() else {
            return Ok(None);
        };
        if self.inner.opts.tls.is_none() {
            // A cluster without TLS cannot have authentication on, and the password would
            // cross the network in clear text: it is never sent.
            return Ok(None);
        }
        let request = AuthenticateRequest {
            name: creds.user.clone(),
            password: creds.password.clone(),
        };
        let answer = self
            .any_channel(|ch| {
                let request = request.clone();
                async move { AuthClient::new(ch).authenticate(request).await }
            })
            .await;
        match answer {
            Ok(r) => {
                let r = r.into_inner();
                let token = MetadataValue::try_from(r.token.as_str()).map_err(|_| {
                    Error::Server("the server sent a token that is not ASCII".into())
                })?;
                self.inner.token.set(Some(token));
                Ok(Some(Duration::from_secs(r.ttl_secs.max(1))))
            }
            // Authentication is off (`FailedPrecondition`): nothing to log in to.
            Err(Error::Refused(_)) => {
                self.inner.token.set(None);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Logs in again at two thirds of each token's lifetime, while the client lives.
    pub(super) fn keep_logged_in(&self, first: Option<Duration>) {
        if self.inner.opts.credentials.is_none() || self.inner.opts.tls.is_none() {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut wait = first.map_or(RELOGIN_RETRY, |ttl| ttl * 2 / 3);
            loop {
                tokio::time::sleep(wait).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let client = Client { inner };
                wait = match client.login().await {
                    Ok(Some(ttl)) => ttl * 2 / 3,
                    Ok(None) => RELOGIN_RETRY,
                    Err(e) => {
                        tracing::warn!(error = %e, "logging in again failed");
                        RELOGIN_RETRY
                    }
                };
            }
        });
    }

    /// Makes one change to users, roles, permissions or the switch (root, or a
    /// certificate of the cluster CA).
    pub async fn auth_change(&self, op: Op) -> Result<()> {
        let req = AuthChangeRequest { op: Some(op) };
        self.any_channel(|ch| {
            let req = req.clone();
            async move { AuthClient::new(ch).change(req).await.map(|_| ()) }
        })
        .await
    }

    /// Whether authentication is on, the users and the roles.
    pub async fn auth_show(&self) -> Result<proto::AuthShowResponse> {
        self.any_channel(|ch| async move {
            AuthClient::new(ch)
                .show(AuthShowRequest {})
                .await
                .map(|r| r.into_inner())
        })
        .await
    }
}
