//! A TLS node's certificates (docs/security.md): read at start, read again on SIGHUP or when
//! a file changes, and used by both sides of every connection — the TLS acceptor of the
//! node's port, and the client settings of the connections it makes to peers and placement.
//!
//! Invariants:
//! - a reload that fails (a missing, unparsable or mismatched file) changes nothing: the
//!   node goes on with the certificates it had, says why in its log and counts it;
//! - a reload that succeeds applies to every handshake after it; connections already made
//!   keep theirs, and the node's own cached connections are dropped so that its next ones
//!   present the new certificate;
//! - a caller is a peer only with a certificate of the cluster CA (the handshake verified
//!   it) and, when `allowed_peer_names` is set, one valid for a listed name.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

use crate::client::TlsOptions;
use crate::config::SecurityConfig;

/// How long a connection may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What one reading of the files gave.
struct Loaded {
    client: TlsOptions,
    server: Arc<ServerConfig>,
}

/// The node's TLS settings, replaceable while it runs.
pub struct NodeTls {
    config: SecurityConfig,
    allowed: Vec<ServerName<'static>>,
    loaded: RwLock<Arc<Loaded>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls")
            .field("cert_file", &self.config.cert_file)
            .field("generation", &self.generation())
            .finish()
    }
}

impl NodeTls {
    /// Reads the files named by `[security]`; `None` without TLS.
    pub fn load(config: &SecurityConfig) -> Result<Option<Arc<NodeTls>>, String> {
        if !config.enabled() {
            return Ok(None);
        }
        let mut allowed = Vec::new();
        for name in &config.allowed_peer_names {
            let n = ServerName::try_from(name.clone())
                .map_err(|e| format!("security.allowed_peer_names: {name:?}: {e}"))?;
            allowed.push(n);
        }
        let loaded = read(config)?;
        Ok(Some(Arc::new(NodeTls {
            config: config.clone(),
            allowed,
            loaded: RwLock::new(Arc::new(loaded)),
            generation: AtomicU64::new(0),
        })))
    }

    fn current(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How this node connects to its peers and to placement: the cluster CA, and its own
    /// certificate as the client's.
    pub fn client(&self) -> TlsOptions {
        self.current().client.clone()
    }

    /// Bumped by every reload that took effect.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Reads the files again. On success the new settings apply to the next handshake and
    /// the next connection this node makes; on failure nothing changes.
    pub fn reload(&self) -> Result<(), String> {
        let result = read(&self.config);
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::counter!("tessera_tls_reloads_total", "result" => outcome).increment(1);
        let loaded = result?;
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(loaded);
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Peer-only calls (raft, snapshots, admin): the caller must have presented a
    /// certificate of the cluster CA — and, with `allowed_peer_names`, one valid for a
    /// listed name.
    pub fn check_peer(&self, certs: Option<&[CertificateDer<'static>]>) -> Result<(), String> {
        let Some(leaf) = certs.and_then(|c| c.first()) else {
            return Err("needs a client certificate signed by the cluster CA".into());
        };
        if self.allowed.is_empty() {
            return Ok(());
        }
        let parsed = ParsedCertificate::try_from(leaf)
            .map_err(|e| format!("has an unreadable client certificate: {e}"))?;
        if self
            .allowed
            .iter()
            .any(|n| rustls::client::verify_server_name(&parsed, n).is_ok())
        {
            return Ok(());
        }
        Err("needs a client certificate for one of security.allowed_peer_names".into())
    }

    /// Accepts TLS connections on `listener` with the settings current at each handshake,
    /// each handshake in its own task (bounded by [`HANDSHAKE_TIMEOUT`]); failed handshakes
    /// are counted and dropped.
    pub fn incoming(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                // The server stopped (it dropped the stream): stop listening too.
                let accepted = tokio::select! {
                    _ = tx.closed() => return,
                    a = listener.accept() => a,
                };
                let conn = match accepted {
                    Ok((conn, _)) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, then go on.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = conn.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(self.current().server.clone());
                let sink = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await {
                        Ok(Ok(tls)) => {
                            let _ = sink.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => {
                            metrics::counter!("tessera_tls_handshakes_failed_total").increment(1);
                            tracing::debug!(error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            metrics::counter!("tessera_tls_handshakes_failed_total").increment(1);
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

fn files(config: &SecurityConfig) -> [&PathBuf; 3] {
    [&config.cert_file, &config.key_file, &config.ca_file]
}

fn stamps(config: &SecurityConfig) -> Vec<Option<(SystemTime, u64)>> {
    files(config)
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// Reads and checks the three files: the key must match the certificate, the CA file must
/// hold at least one certificate, and the certificate must chain to it and be valid now.
fn read(config: &SecurityConfig) -> Result<Loaded, String> {
    let files = config
        .load()
        .map_err(|e| e.to_string())?
        .ok_or("TLS is off")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("security.cert_file: {e}"))?;
    if certs.is_empty() {
        return Err("security.cert_file holds no certificate".into());
    }
    let key =
        PrivateKeyDer::from_pem_slice(&files.key).map_err(|e| format!("security.key_file: {e}"))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&files.ca) {
        let ca = ca.map_err(|e| format!("security.ca_file: {e}"))?;
        roots
            .add(ca)
            .map_err(|e| format!("security.ca_file: {e}"))?;
    }
    if roots.is_empty() {
        return Err("security.ca_file holds no certificate".into());
    }
    // ring, as tonic's client side: aws-lc would add a C and cmake build. rustls marks it
    // deprecated for lacking post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // A certificate its peers would refuse (expired, not yet valid, of another CA, or not
    // for serving) is refused here, before it replaces a working one.
    let leaf =
        ParsedCertificate::try_from(&certs[0]).map_err(|e| format!("security.cert_file: {e}"))?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &leaf,
        &roots,
        &certs[1..],
        UnixTime::now(),
        provider.signature_verification_algorithms.all,
    )
    .map_err(|e| format!("security.cert_file is not valid under security.ca_file: {e}"))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let verifier = if files.client_cert_required {
        verifier.build()
    } else {
        verifier.allow_unauthenticated().build()
    }
    .map_err(|e| format!("security.ca_file: {e}"))?;
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| format!("security.cert_file and key_file: {e}"))?;
    // gRPC is HTTP/2; clients refuse a server that does not agree to it.
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        client: files.client_options(),
        server: Arc::new(server),
    })
}

/// Reads the certificates again on SIGHUP and whenever one of the files changes (checked
/// every [`WATCH_INTERVAL`]), until aborted. A failed reload is logged and the node goes on
/// with the certificates it has; the next change or SIGHUP tries again.
///
/// Without TLS, SIGHUP is logged and otherwise ignored (it no longer stops the node, so a
/// `systemctl reload` is harmless).
pub async fn reload_loop(transport: super::Transport) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    let mut hup: Option<()> = None;
    let Some(tls) = transport.node_tls().cloned() else {
        while hangup(&mut hup).await.is_some() {
            tracing::info!("SIGHUP: nothing to reload (TLS is off)");
        }
        return;
    };
    let mut seen = stamps(&tls.config);
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let trigger = tokio::select! {
            _ = tick.tick() => {
                let now = stamps(&tls.config);
                if now == seen {
                    continue;
                }
                seen = now;
                "a certificate file changed"
            }
            Some(()) = hangup(&mut hup) => "SIGHUP",
        };
        match transport.reload_tls() {
            Ok(()) => tracing::info!(trigger, "TLS certificates reloaded"),
            Err(e) => tracing::error!(
                trigger,
                error = %e,
                "TLS certificates not reloaded; the node keeps the ones it has"
            ),
        }
    }
}

#[cfg(unix)]
async fn hangup(hup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hup.as_mut() {
        Some(h) => h.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn hangup(_: &mut Option<()>) -> Option<()> {
    std::future::pending().await
}
