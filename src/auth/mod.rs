//! Users, roles and key-range permissions (docs/security.md, "Users and roles").
//!
//! The state is one record in the placement region ([`model::AuthDoc`]); every node keeps a
//! compiled copy in its [`Gate`], refreshed from placement, and checks each request against
//! it: who the caller is ([`Gate::caller`]: a node or operator by its certificate, a user by
//! its token) and whether it may do what it asks ([`Gate::allow`]).
//!
//! Invariants:
//! - off until enabled; once on, deny by default: a request with neither a certificate of
//!   the cluster CA nor a valid token gets `Unauthenticated`, one outside the user's
//!   permissions `PermissionDenied`, and nothing reaches a region;
//! - a password is hashed when set and checked once per token, never per request;
//! - a check reads the gate's current state, so a role revoked or a user deleted applies to
//!   calls and streams already open, once the node has the new state;
//! - until a node has loaded the state once, callers without a certificate are refused
//!   (`Unavailable`) on a TLS node — never let in because the state is unknown;
//! - a node without TLS cannot tell peers from clients: authentication is refused there,
//!   and a node without TLS that finds it on refuses every call but raft traffic.

pub mod access;
pub mod model;
pub mod password;
pub mod token;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ring::hmac;
use tessera_api::limits::NOT_SENT;
use tonic::Status;

use access::UserAccess;
use model::AuthDoc;

/// The metadata a client sends its token in.
pub const TOKEN_METADATA: &str = "authorization";

/// Who is calling.
#[derive(Clone, Debug)]
pub enum Caller {
    /// A node, or an operator, by a certificate of the cluster CA: not checked.
    Node,
    /// Anyone, while authentication is off.
    Anyone,
    /// A user, by a token.
    User { name: Arc<str>, generation: u64 },
}

/// What a request needs.
#[derive(Clone, Copy, Debug)]
pub enum Need<'a> {
    /// Any authenticated caller (routing, revisions, leases).
    Any,
    /// The root role (administration).
    Admin,
    ReadKey(&'a [u8]),
    WriteKey(&'a [u8]),
    /// `[start, end)`, `end` `None` = unbounded.
    ReadRange(&'a [u8], Option<&'a [u8]>),
}

struct State {
    loaded: bool,
    enabled: bool,
    generation: u64,
    key: Option<hmac::Key>,
    users: HashMap<String, UserAccess>,
}

/// A node's copy of the cluster's authentication state, and the checks made with it.
pub struct Gate {
    state: RwLock<Arc<State>>,
    /// The node serves TLS: only then can a certificate tell a peer from a client.
    tls: bool,
    token_ttl_secs: u64,
    /// Wakes the refresh loop: a token from a newer state than this node holds arrived, or
    /// a user was refused (perhaps by a state older than a grant).
    wake: tokio::sync::Notify,
    /// Refreshes started, and the number of the last one finished: a caller that wants a
    /// state read after now waits for a finished number above the started count it saw.
    refreshes_started: std::sync::atomic::AtomicU64,
    refreshed: tokio::sync::watch::Sender<u64>,
    /// Logins hashing at once: a password hash takes a core for a fraction of a second,
    /// and logins must not starve raft.
    logins: tokio::sync::Semaphore,
    /// A hash to check unknown users' passwords against, so a login takes as long whether
    /// or not its user exists.
    dummy: std::sync::OnceLock<password::PasswordHash>,
}

fn denied(why: String) -> Status {
    metrics::counter!("tessera_auth_denied_total").increment(1);
    Status::permission_denied(why)
}

impl Gate {
    pub fn new(tls: bool, token_ttl_secs: u64) -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(Arc::new(State {
                loaded: false,
                enabled: false,
                generation: 0,
                key: None,
                users: HashMap::new(),
            })),
            tls,
            token_ttl_secs,
            wake: tokio::sync::Notify::new(),
            refreshes_started: std::sync::atomic::AtomicU64::new(0),
            refreshed: tokio::sync::watch::Sender::new(0),
            logins: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            ),
            dummy: std::sync::OnceLock::new(),
        })
    }

    fn current(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn tls(&self) -> bool {
        self.tls
    }

    /// Installs the stored state (`None`: never written) unless it is older than the one
    /// held.
    pub fn install(&self, doc: Option<&AuthDoc>) {
        let empty = AuthDoc::default();
        let doc = doc.unwrap_or(&empty);
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        if s.loaded && doc.generation <= s.generation {
            return;
        }
        if s.enabled != doc.enabled {
            tracing::info!(enabled = doc.enabled, "authentication switched");
        }
        metrics::gauge!("tessera_auth_enabled").set(if doc.enabled { 1.0 } else { 0.0 });
        *s = Arc::new(State {
            loaded: true,
            enabled: doc.enabled,
            generation: doc.generation,
            key: (doc.enabled && !doc.token_key.is_empty())
                .then(|| hmac::Key::new(hmac::HMAC_SHA256, &doc.token_key)),
            users: access::compile(doc),
        });
    }

    pub fn enabled(&self) -> bool {
        self.current().enabled
    }

    /// Who the caller is: `peer` says whether it showed a certificate of the cluster CA,
    /// `token` is what it sent as [`TOKEN_METADATA`].
    pub fn caller(&self, peer: bool, token: Option<&str>) -> Result<Caller, Status> {
        if peer && self.tls {
            return Ok(Caller::Node);
        }
        let s = self.current();
        if !self.tls {
            // Without TLS a peer cannot be told from a client: with authentication on
            // (a misconfiguration), nobody is let in.
            return if s.enabled {
                Err(Status::failed_precondition(
                    "authentication is on, but this node serves no TLS: it refuses every \
                     call (configure [security] on every node)",
                ))
            } else {
                Ok(Caller::Anyone)
            };
        }
        if !s.loaded {
            return Err(not_loaded());
        }
        if !s.enabled {
            return Ok(Caller::Anyone);
        }
        let Some(token) = token else {
            return Err(Status::unauthenticated(
                "authentication is on: log in as a user (--user) or present a certificate \
                 of the cluster CA",
            ));
        };
        let key = s
            .key
            .as_ref()
            .ok_or_else(|| Status::unauthenticated("authentication has no token key"))?;
        let claims = token::verify(key, token, token::now_secs()).map_err(|e| {
            Status::unauthenticated(match e {
                token::Invalid::Expired => "token expired: log in again",
                token::Invalid::Malformed | token::Invalid::BadSignature => {
                    "invalid token: log in again"
                }
            })
        })?;
        if claims.generation > s.generation {
            // Issued from a newer state than this node has read: it is behind.
            self.wake.notify_one();
            return Err(Status::unavailable(format!(
                "{NOT_SENT} this node's copy of the users is behind the token's; retry"
            )));
        }
        Self::user(&s, claims.name, claims.generation)?;
        Ok(Caller::User {
            name: claims.name.into(),
            generation: claims.generation,
        })
    }

    /// Wakes the refresh loop at once (`auth_service::refresh_loop`).
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    /// The refresh loop starts a read of the state: its number.
    pub fn refresh_started(&self) -> u64 {
        self.refreshes_started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1
    }

    /// The refresh loop finished read number `n` (and installed what it read).
    pub fn refresh_finished(&self, n: u64) {
        self.refreshed.send_if_modified(|v| {
            let newer = n > *v;
            *v = (*v).max(n);
            newer
        });
    }

    /// Runs `check` (permission checks of `caller`); a user it refuses is checked once more
    /// against a state read after the refusal (waiting up to a second for it), so that a
    /// permission granted through another node an instant ago is not refused for this
    /// node's older copy.
    pub async fn recheck(
        &self,
        caller: &Caller,
        check: impl Fn() -> Result<(), Status>,
    ) -> Result<(), Status> {
        match check() {
            Err(s)
                if s.code() == tonic::Code::PermissionDenied
                    && matches!(caller, Caller::User { .. }) =>
            {
                self.fresh().await;
                check()
            }
            r => r,
        }
    }

    /// [`Self::allow`], through [`Self::recheck`].
    pub async fn allow_fresh(&self, caller: &Caller, need: Need<'_>) -> Result<(), Status> {
        self.recheck(caller, || self.allow(caller, need)).await
    }

    /// Waits (up to a second) until the state was read again after now.
    async fn fresh(&self) {
        let mut rx = self.refreshed.subscribe();
        let started = self
            .refreshes_started
            .load(std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            rx.wait_for(|done| *done > started),
        )
        .await;
    }

    /// The user behind `caller`, if it still exists as the token named it.
    fn user<'s>(s: &'s State, name: &str, generation: u64) -> Result<&'s UserAccess, Status> {
        match s.users.get(name) {
            Some(u) if u.generation == generation => Ok(u),
            _ => Err(Status::unauthenticated(
                "the token's user was deleted or changed its password: log in again",
            )),
        }
    }

    /// Whether `caller` may do what `need` says, as the state stands now.
    pub fn allow(&self, caller: &Caller, need: Need<'_>) -> Result<(), Status> {
        let (name, generation) = match caller {
            Caller::Node => return Ok(()),
            Caller::Anyone => {
                // Let in while authentication was off: not once it is on (a stream opened
                // before is refused from then on).
                let s = self.current();
                if s.enabled || (self.tls && !s.loaded) {
                    return Err(if s.loaded {
                        Status::unauthenticated(
                            "authentication was turned on: log in as a user (--user) or \
                             present a certificate of the cluster CA",
                        )
                    } else {
                        not_loaded()
                    });
                }
                return match need {
                    Need::Admin => Err(denied(
                        "an administrative call needs a certificate of the cluster CA".into(),
                    )),
                    _ => Ok(()),
                };
            }
            Caller::User { name, generation } => (name, *generation),
        };
        let s = self.current();
        if !s.enabled {
            // Switched off since the caller logged in.
            return match need {
                Need::Admin => Err(denied(
                    "authentication is off: an administrative call needs a certificate of \
                     the cluster CA"
                        .into(),
                )),
                _ => Ok(()),
            };
        }
        let u = Self::user(&s, name, generation)?;
        if u.root {
            return Ok(());
        }
        let ok = match need {
            Need::Any => true,
            Need::Admin => false,
            Need::ReadKey(k) => u.read.covers_key(k),
            Need::WriteKey(k) => u.write.covers_key(k),
            Need::ReadRange(start, end) => u.read.covers_range(start, end),
        };
        if ok {
            Ok(())
        } else {
            Err(denied(match need {
                Need::Admin => format!("user {name} lacks the root role"),
                Need::ReadKey(k) => format!("user {name} may not read {}", show(k)),
                Need::WriteKey(k) => format!("user {name} may not write {}", show(k)),
                Need::ReadRange(s, e) => format!(
                    "user {name} may not read [{}, {})",
                    show(s),
                    e.map_or("end".into(), show)
                ),
                Need::Any => String::new(),
            }))
        }
    }

    /// Whether `caller` may read `key` (for answers that would show a key's old value).
    pub fn may_read(&self, caller: &Caller, key: &[u8]) -> bool {
        self.allow(caller, Need::ReadKey(key)).is_ok()
    }

    /// Waits for a turn to hash a password (a bounded number at once).
    pub async fn login_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        self.logins
            .acquire()
            .await
            .map_err(|_| Status::unavailable("logins are closed"))
    }

    /// A token for `name` if `password` is its password (run with a [`Self::login_turn`]).
    pub fn authenticate(
        &self,
        doc: &AuthDoc,
        name: &str,
        password: &str,
    ) -> Result<(String, u64), Status> {
        if !doc.enabled {
            return Err(Status::failed_precondition("authentication is not enabled"));
        }
        if !self.tls {
            return Err(Status::failed_precondition(
                "this node serves no TLS: it takes no passwords",
            ));
        }
        let failed = || {
            metrics::counter!("tessera_auth_failures_total").increment(1);
            Status::unauthenticated("wrong user name or password")
        };
        let Some(user) = doc.users.get(name) else {
            // As long as a real check: the answer's time does not tell which users exist.
            let dummy = self.dummy.get_or_init(|| {
                password::PasswordHash::new("", password::DEFAULT_ITERATIONS).unwrap_or_else(|_| {
                    password::PasswordHash {
                        iterations: password::DEFAULT_ITERATIONS,
                        salt: vec![0; 16],
                        hash: vec![0; 32],
                    }
                })
            });
            dummy.verify(password);
            return Err(failed());
        };
        if !user.password.verify(password) {
            return Err(failed());
        }
        let key = hmac::Key::new(hmac::HMAC_SHA256, &doc.token_key);
        let expires = token::now_secs() + self.token_ttl_secs;
        Ok((
            token::sign(&key, name, user.generation, expires),
            self.token_ttl_secs,
        ))
    }
}

fn not_loaded() -> Status {
    Status::unavailable(format!(
        "{NOT_SENT} this node has not loaded the cluster's authentication state yet"
    ))
}

/// A key for a message: text when printable, else hex.
fn show(k: &[u8]) -> String {
    match std::str::from_utf8(k) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => format!(
            "0x{}",
            k.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}
