//! `[security]`: TLS on the node's port, for clients and peers alike, and mutual TLS between
//! nodes (docs/security.md).
//!
//! Invariants:
//! - TLS is on exactly when `cert_file` is set; then `key_file` and `ca_file` are set too
//!   (a node must verify its peers);
//! - a node presents its own certificate as a client too (to peers, and to placement), so
//!   one certificate per node serves both directions;
//! - the files are read at start, and a file that cannot be read or parsed fails the start;
//!   a running node reads them again on SIGHUP or a change (`transport::tls`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tessera_client::TlsOptions;

use super::{invalid, ConfigError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// This node's certificate (PEM), offered to clients and peers. Empty: no TLS.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The cluster CA (PEM): peers' certificates, and clients' when they present one, must
    /// be signed by it.
    pub ca_file: PathBuf,
    /// Refuse clients that present no certificate of the cluster CA. Off: any client may
    /// use the KV API over TLS; raft, snapshot and admin calls always need one.
    pub client_cert_required: bool,
    /// When set, raft, snapshot and admin calls are accepted only from certificates valid
    /// for one of these names (DNS names or IP addresses, as a client checks a server's).
    /// Empty: any certificate of the cluster CA.
    pub allowed_peer_names: Vec<String>,
    /// How long a user's token is valid (`tessera auth`), in seconds: a client logs in
    /// again after it. 10 to 86,400.
    pub token_ttl_secs: u64,
    /// PBKDF2-HMAC-SHA256 iterations for passwords set through this node; a stored hash
    /// keeps its own count. 1,000 to 10,000,000.
    pub password_iterations: u32,
    /// How often the node reads the cluster's users and roles from placement, in ms (a
    /// change made through this node applies here at once). 50 to 60,000.
    pub auth_refresh_ms: u64,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            ca_file: PathBuf::new(),
            client_cert_required: false,
            allowed_peer_names: Vec::new(),
            token_ttl_secs: 300,
            password_iterations: crate::auth::password::DEFAULT_ITERATIONS,
            auth_refresh_ms: 1_000,
        }
    }
}

/// The PEM files of a TLS node, read.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
    pub client_cert_required: bool,
}

impl SecurityConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let set = |p: &PathBuf| !p.as_os_str().is_empty();
        if !(10..=86_400).contains(&self.token_ttl_secs) {
            return Err(invalid("security.token_ttl_secs", "must be 10 to 86400"));
        }
        if !(1_000..=10_000_000).contains(&self.password_iterations) {
            return Err(invalid(
                "security.password_iterations",
                "must be 1000 to 10000000",
            ));
        }
        if !(50..=60_000).contains(&self.auth_refresh_ms) {
            return Err(invalid("security.auth_refresh_ms", "must be 50 to 60000"));
        }
        if !self.enabled() {
            if set(&self.key_file)
                || set(&self.ca_file)
                || self.client_cert_required
                || !self.allowed_peer_names.is_empty()
            {
                return Err(invalid(
                    "security.cert_file",
                    "must be set when key_file, ca_file, client_cert_required or \
                     allowed_peer_names is",
                ));
            }
            return Ok(());
        }
        if !set(&self.key_file) {
            return Err(invalid("security.key_file", "must be set with cert_file"));
        }
        if !set(&self.ca_file) {
            return Err(invalid(
                "security.ca_file",
                "must be set with cert_file: nodes verify each other's certificates",
            ));
        }
        Ok(())
    }

    /// The files, read; `None` without TLS.
    pub fn load(&self) -> Result<Option<TlsFiles>, ConfigError> {
        if !self.enabled() {
            return Ok(None);
        }
        let read = |field: &'static str, p: &PathBuf| {
            std::fs::read(p).map_err(|e| invalid(field, format!("{}: {e}", p.display())))
        };
        let files = TlsFiles {
            cert: read("security.cert_file", &self.cert_file)?,
            key: read("security.key_file", &self.key_file)?,
            ca: read("security.ca_file", &self.ca_file)?,
            client_cert_required: self.client_cert_required,
        };
        for (field, pem, tag) in [
            ("security.cert_file", &files.cert, "CERTIFICATE"),
            ("security.key_file", &files.key, "PRIVATE KEY"),
            ("security.ca_file", &files.ca, "CERTIFICATE"),
        ] {
            let text = String::from_utf8_lossy(pem);
            if !text.contains("-----BEGIN ") || !text.contains(tag) {
                return Err(invalid(field, format!("is not a PEM file holding a {tag}")));
            }
        }
        Ok(Some(files))
    }
}

impl TlsFiles {
    /// How this node connects to its peers and to placement: the cluster CA, and its own
    /// certificate as the client's.
    pub fn client_options(&self) -> TlsOptions {
        TlsOptions {
            ca_pem: self.ca.clone(),
            identity: Some((self.cert.clone(), self.key.clone())),
            server_name: None,
        }
    }
}
