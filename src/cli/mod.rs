//! The command-line client's commands, one file per command group. Every command prints
//! text for people or, with `--json`, one JSON document per result, one line each
//! (serialised by serde, so quotes and control characters are escaped; key and value bytes
//! that are not UTF-8 are replaced, region boundaries are printed in hex). Failures are
//! [`Error`]s: `main` prints one line on stderr and exits with status 2 (`watch`: 3 when
//! its start is compacted, 4 when it lost the cluster).
//!
//! Invariants:
//! - no command panics on what the cluster returns: key and value bytes go through [`text`]
//!   (lossy UTF-8) or [`hex`], never assumed to be text;
//! - every failure is an [`Error`] returned to `main`; nothing here exits the process;
//! - commands connect with the client library's defaults but a 15 s deadline, and read
//!   linearizably unless a command asks for a serializable read.

pub mod alarm;
pub mod auth;
pub mod backup;
pub mod bench;
pub mod elect;
pub mod kv;
pub mod lease;
pub mod nodes;
pub mod regions;
pub mod server;
pub mod status;
pub mod watch;

use tessera::client::{Client, ClientOptions};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster answered with an error (or could not be reached).
    #[error(transparent)]
    Client(#[from] tessera::client::Error),
    /// The configuration could not be read or is invalid.
    #[error("{0}")]
    Config(String),
    /// The arguments do not make a valid request.
    #[error("{0}")]
    Usage(String),
    /// The key asked for does not exist.
    #[error("key {0:?} not found")]
    KeyNotFound(String),
    /// A compare-and-swap's comparison did not hold: nothing was written.
    #[error("compare failed: key not changed")]
    CompareFailed,
    /// Reading standard input or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// The server could not start or stopped with an error.
    #[error("{0}")]
    Server(String),
    /// The load test could not run.
    #[error("{0}")]
    Bench(String),
    /// A watch's start revision is compacted away.
    #[error("revision compacted: history starts at revision {0}")]
    WatchCompacted(u64),
    /// A watch lost the cluster for longer than the client's deadline.
    #[error("watch lost the cluster: {0}")]
    WatchLost(String),
}

impl Error {
    /// The process's exit status for this failure: 3 for a compacted watch, 4 for a watch
    /// that lost the cluster, 2 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::WatchCompacted(_) => 3,
            Error::WatchLost(_) => 4,
            _ => 2,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(clap::Args)]
pub struct ConnArgs {
    /// Comma-separated node addresses (host:port).
    #[arg(long, short, default_value = "127.0.0.1:20160", global = true)]
    pub endpoints: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Speak TLS, trusting this CA (PEM) for the nodes' certificates.
    #[arg(long, global = true, value_name = "FILE")]
    pub cacert: Option<std::path::PathBuf>,
    /// This client's certificate (PEM), for admin commands on a TLS cluster or a cluster
    /// that requires client certificates; needs --key and --cacert.
    #[arg(long = "cert", id = "client_cert", global = true, value_name = "FILE")]
    pub cert: Option<std::path::PathBuf>,
    /// The key of --cert (PEM).
    #[arg(long = "key", id = "client_key", global = true, value_name = "FILE")]
    pub key: Option<std::path::PathBuf>,
    /// Log in as this user (a cluster with authentication on): NAME, or NAME:PASSWORD.
    #[arg(long, global = true, value_name = "NAME[:PASSWORD]")]
    pub user: Option<String>,
    /// The password of --user (else after the colon in --user, or in TESSERA_PASSWORD).
    #[arg(long, global = true, value_name = "PASSWORD")]
    pub password: Option<String>,
}

impl ConnArgs {
    /// A client for these endpoints: the library's defaults, with a deadline a person at a
    /// terminal waits for.
    pub async fn connect(&self, serializable: bool) -> Result<Client> {
        let endpoints = tessera::client::endpoint_list(&self.endpoints);
        let mut opts = ClientOptions {
            deadline: std::time::Duration::from_secs(15),
            ..Default::default()
        };
        if serializable {
            opts.consistency = tessera::proto::ReadConsistency::Serializable;
        }
        opts.tls = self.tls()?;
        opts.credentials = self.credentials()?;
        Ok(Client::connect(&endpoints, opts).await?)
    }

    /// The user the flags name, with its password from `--password`, `--user
    /// NAME:PASSWORD` or `TESSERA_PASSWORD`.
    pub fn credentials(&self) -> Result<Option<tessera::client::Credentials>> {
        let Some(user) = &self.user else {
            return Ok(None);
        };
        let (user, inline) = match user.split_once(':') {
            Some((u, p)) => (u.to_string(), Some(p.to_string())),
            None => (user.clone(), None),
        };
        let password = self
            .password
            .clone()
            .or(inline)
            .or_else(|| std::env::var("TESSERA_PASSWORD").ok())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--user {user} needs a password: --password, --user {user}:PASSWORD or \
                     TESSERA_PASSWORD"
                ))
            })?;
        Ok(Some(tessera::client::Credentials { user, password }))
    }

    /// The TLS settings the flags give (`None`: plaintext).
    pub fn tls(&self) -> Result<Option<tessera::client::TlsOptions>> {
        match &self.cacert {
            None if self.cert.is_some() || self.key.is_some() => Err(Error::Usage(
                "--cert and --key need --cacert (the CA of the nodes' certificates)".into(),
            )),
            None => Ok(None),
            Some(ca) => tessera::client::TlsOptions::from_files(
                ca,
                self.cert.as_deref(),
                self.key.as_deref(),
            )
            .map(Some)
            .map_err(Error::Usage),
        }
    }
}

/// Prints `v` as one line of JSON.
pub fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        // Only a map with non-string keys or a failing Serialize impl can fail; ours have
        // neither.
        Err(e) => eprintln!("tessera: cannot format JSON: {e}"),
    }
}

/// Bytes as text, invalid UTF-8 replaced.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A region boundary in hex, `-` for the keyspace's edge.
pub fn hex(k: &[u8]) -> String {
    if k.is_empty() {
        "-".to_string()
    } else {
        k.iter().map(|b| format!("{b:02x}")).collect()
    }
}

pub fn decode_hex(s: &str) -> Result<Vec<u8>> {
    if s.len() % 2 != 0 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Usage(format!(
            "{s:?} is not an even number of hex digits"
        )));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| Error::Usage(e.to_string())))
        .collect()
}

pub fn state_name(s: i32) -> &'static str {
    use tessera::proto::NodeState;
    match NodeState::try_from(s) {
        Ok(NodeState::Up) => "up",
        Ok(NodeState::Down) => "down",
        Ok(NodeState::Removed) => "removed",
        Err(_) => "unknown",
    }
}
