//! The placement client a node uses: a tessera client with access to the system keyspace,
//! connected on first use to the nodes this node knows.
//!
//! Invariants:
//! - one client per node, built on first use and shared; a failed connect is not kept, the
//!   next call tries again;
//! - it always has system-keyspace access and a 5 s deadline (`ClientOptions::deadline`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OnceCell;

use crate::client::{Client, ClientOptions};
use crate::transport::Transport;

/// A client with system-keyspace access, connected on first use to the nodes this node
/// knows (it needs the gRPC server running, so it cannot be built during start-up).
#[derive(Clone)]
pub struct SystemClient {
    transport: Transport,
    /// Addresses to try besides the known nodes (a joining node's `cluster.join`).
    seeds: Vec<String>,
    cell: Arc<OnceCell<Client>>,
}

impl SystemClient {
    pub fn new(transport: Transport, seeds: Vec<String>) -> Self {
        Self {
            transport,
            seeds,
            cell: Arc::new(OnceCell::new()),
        }
    }

    pub async fn get(&self) -> Result<Client, crate::client::Error> {
        self.cell
            .get_or_try_init(|| async {
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
                    tls: self.transport.tls().cloned(),
                    ..Default::default()
                };
                Client::connect(&endpoints, opts).await
            })
            .await
            .cloned()
    }
}
