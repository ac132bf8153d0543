//! The placement client a node uses: a tessera client with access to the system keyspace,
//! connected on first use to the nodes this node knows.
//!
//! Invariants:
//! - one client per node, built on first use and shared; a failed connect is not kept, the
//!   next call tries again; after the node's certificates are reloaded the next call builds
//!   a new one that presents them;
//! - it always has system-keyspace access and a 5 s deadline (`ClientOptions::deadline`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::client::{Client, ClientOptions};
use crate::transport::Transport;

/// A client with system-keyspace access, connected on first use to the nodes this node
/// knows (it needs the gRPC server running, so it cannot be built during start-up).
#[derive(Clone)]
pub struct SystemClient {
    transport: Transport,
    /// Addresses to try besides the known nodes (a joining node's `cluster.join`).
    seeds: Vec<String>,
    /// The client, and the generation of the node's certificates it was made with.
    cell: Arc<tokio::sync::Mutex<Option<(u64, Client)>>>,
    /// A caller is connecting a new client after a reload.
    rebuilding: Arc<AtomicBool>,
}

impl SystemClient {
    pub fn new(transport: Transport, seeds: Vec<String>) -> Self {
        Self {
            transport,
            seeds,
            cell: Arc::new(tokio::sync::Mutex::new(None)),
            rebuilding: Arc::default(),
        }
    }

    pub async fn get(&self) -> Result<Client, crate::client::Error> {
        let generation = self.transport.node_tls().map_or(0, |t| t.generation());
        let mut cell = self.cell.lock().await;
        let old = match cell.as_ref() {
            Some((g, c)) if *g == generation => return Ok(c.clone()),
            Some((_, c)) => Some(c.clone()),
            None => None,
        };
        if let Some(old) = old {
            // Certificates were reloaded. Callers go on with the old client (its connections
            // still work) while one of them connects anew, outside the lock.
            drop(cell);
            if self.rebuilding.swap(true, Ordering::AcqRel) {
                return Ok(old);
            }
            let rebuilt = self.connect().await;
            self.rebuilding.store(false, Ordering::Release);
            return match rebuilt {
                Ok(client) => {
                    *self.cell.lock().await = Some((generation, client.clone()));
                    Ok(client)
                }
                Err(e) => {
                    tracing::debug!(error = %e, "placement client not rebuilt yet");
                    Ok(old)
                }
            };
        }
        let client = self.connect().await?;
        *cell = Some((generation, client.clone()));
        Ok(client)
    }

    async fn connect(&self) -> Result<Client, crate::client::Error> {
        let mut endpoints: Vec<String> = self
            .transport
            .addresses()
            .into_iter()
            .map(|(_, a)| a)
            .collect();
        for s in &self.seeds {
            if !endpoints.contains(s) {
                endpoints.push(s.clone());
            }
        }
        let opts = ClientOptions {
            system: true,
            deadline: Duration::from_secs(5),
            tls: self.transport.tls(),
            ..Default::default()
        };
        Client::connect(&endpoints, opts).await
    }
}
