//! TLS for the client's connections (docs/security.md): the CA that signs the nodes'
//! certificates and, for mutual TLS, the client's own certificate and key, all PEM.
//!
//! Invariants:
//! - without TLS options every connection is plaintext (`http://`); with them every one is
//!   TLS (`https://`) and the server's certificate must chain to the given CA and name the
//!   address dialled (an IP address or a host name), or `server_name` when set;
//! - nothing here reads a file: callers load the PEM bytes ([`TlsOptions::from_files`]).

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// What a client needs to speak TLS to the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// The CA the nodes' certificates are signed by (PEM).
    pub ca_pem: Vec<u8>,
    /// This client's certificate and key (PEM), for nodes that ask for one (peer and admin
    /// calls, or every call when the cluster requires client certificates).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the nodes' certificates must carry, if not the address dialled.
    pub server_name: Option<String>,
}

impl TlsOptions {
    /// Reads the CA and, when both are given, the certificate and key.
    pub fn from_files(
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<TlsOptions, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err("a client certificate needs its key, and a key its certificate".into())
            }
        };
        Ok(TlsOptions {
            ca_pem: read(ca)?,
            identity,
            server_name: None,
        })
    }

    fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            c = c.domain_name(name.clone());
        }
        c
    }
}

/// An endpoint for `addr` (host:port): TLS when `tls` is given, plaintext otherwise.
pub fn endpoint(addr: &str, tls: Option<&TlsOptions>) -> Result<Endpoint, String> {
    match tls {
        None => Endpoint::from_shared(format!("http://{addr}")).map_err(|e| e.to_string()),
        Some(t) => Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| e.to_string())?
            .tls_config(t.config())
            .map_err(|e| format!("TLS settings: {e}")),
    }
}

pub(crate) const PLAINTEXT_HINT: &str = " (if the cluster uses TLS, give its CA: --cacert)";

/// A failed connection, said in full (tonic's own message is only "transport error"), with a
/// hint when a plaintext client seems to have reached a TLS port.
pub fn connect_error(addr: &str, tls: bool, e: &tonic::transport::Error) -> String {
    let mut why = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        why.push_str(": ");
        why.push_str(&s.to_string());
        src = s.source();
    }
    let plain_at_tls = [
        "frame",
        "h2 protocol",
        "connection reset",
        "closed",
        "broken pipe",
    ];
    if !tls && plain_at_tls.iter().any(|w| why.to_lowercase().contains(w)) {
        why.push_str(PLAINTEXT_HINT);
    }
    format!("{addr}: {why}")
}
