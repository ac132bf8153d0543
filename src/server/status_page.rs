//! The metrics port: Prometheus text at `/metrics`, and a status page at `/` — the cluster
//! at a glance (nodes, regions and leaders per node, unhealthy regions, the newest regions),
//! one self-contained HTML page that refreshes itself from `/status.json`. No external
//! assets: it works on a host without internet access.
//!
//! Invariants:
//! - a request that is not `GET` of a known path gets 404 or 405; every connection is
//!   answered once and closed; a slow or idle client is dropped after `CLIENT_TIMEOUT`;
//! - `/status.json` is read through an ordinary client of this node's own KV port, so it
//!   shows what any client would see; a failure is a 503 with the reason.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OnceCell;

use crate::client::{Client, ClientOptions};

const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
const PAGE: &str = include_str!("status_page.html");

#[derive(Serialize)]
struct NodeRow {
    id: u64,
    addr: String,
    state: &'static str,
    regions: u64,
    leaders: u64,
    heartbeat_age_ms: u64,
}

#[derive(Serialize)]
struct RegionRow {
    id: u64,
    start: String,
    end: String,
    leader: u64,
    peers: Vec<u64>,
    version: u64,
}

#[derive(Serialize)]
struct Status {
    health: &'static str,
    regions: u64,
    regions_without_leader: u64,
    regions_unavailable: u64,
    placement_leader_node: u64,
    nodes: Vec<NodeRow>,
    /// Regions without a leader.
    unhealthy: Vec<RegionRow>,
    /// The newest regions (highest ids: made by the latest splits).
    newest: Vec<RegionRow>,
}

fn hex(k: &[u8]) -> String {
    if k.is_empty() {
        "-".into()
    } else {
        k.iter().map(|b| format!("{b:02x}")).collect()
    }
}

async fn status(client: &Client) -> Result<Status, String> {
    let st = client.status().await.map_err(|e| e.to_string())?;
    let routes = client.routes().await.map_err(|e| e.to_string())?;
    let row = |r: &crate::proto::RegionRoute| {
        let region = r.region.clone().unwrap_or_default();
        RegionRow {
            id: region.id,
            start: hex(&region.start_key),
            end: hex(&region.end_key),
            leader: r.leader.map_or(0, |l| l.node_id),
            peers: region.peers.iter().map(|p| p.node_id).collect(),
            version: region.epoch.map_or(0, |e| e.version),
        }
    };
    let mut newest: Vec<RegionRow> = routes.iter().map(row).collect();
    newest.sort_by_key(|r| std::cmp::Reverse(r.id));
    newest.truncate(10);
    let nodes = st
        .nodes
        .iter()
        .map(|n| {
            let rec = n.record.clone().unwrap_or_default();
            NodeRow {
                id: rec.node_id,
                addr: rec.addr,
                state: match crate::proto::NodeState::try_from(n.state) {
                    Ok(crate::proto::NodeState::Up) => "up",
                    Ok(crate::proto::NodeState::Down) => "down",
                    Ok(crate::proto::NodeState::Removed) => "removed",
                    Err(_) => "unknown",
                },
                regions: rec.regions,
                leaders: rec.leaders,
                heartbeat_age_ms: n.heartbeat_age_ms,
            }
        })
        .collect();
    Ok(Status {
        health: crate::client::Health::of(&st).as_str(),
        regions: st.regions,
        regions_without_leader: st.regions_without_leader,
        regions_unavailable: st.regions_unavailable,
        placement_leader_node: st.placement_leader_node,
        nodes,
        unhealthy: routes
            .iter()
            .filter(|r| r.leader.is_none())
            .map(row)
            .collect(),
        newest,
    })
}

fn response(code: &str, kind: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

async fn answer(
    mut conn: TcpStream,
    metrics: &PrometheusHandle,
    client: &OnceCell<Client>,
    kv: SocketAddr,
    opts: ClientOptions,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    // The request line and headers; the body (if any) is not needed.
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return conn
                .write_all(&response(
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    b"",
                ))
                .await;
        }
        let n = conn.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let out = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => response(
            "200 OK",
            "text/plain; version=0.0.4",
            metrics.render().as_bytes(),
        ),
        ("GET", "/") => response("200 OK", "text/html; charset=utf-8", PAGE.as_bytes()),
        ("GET", "/status.json") => {
            let c = client
                .get_or_try_init(|| async move { Client::connect(&[kv.to_string()], opts).await })
                .await;
            let st = match c {
                Ok(c) => status(c).await,
                Err(e) => Err(e.to_string()),
            };
            match st.and_then(|s| serde_json::to_vec(&s).map_err(|e| e.to_string())) {
                Ok(body) => response("200 OK", "application/json", &body),
                Err(e) => response("503 Service Unavailable", "text/plain", e.as_bytes()),
            }
        }
        ("GET", _) => response("404 Not Found", "text/plain", b"not found"),
        _ => response("405 Method Not Allowed", "text/plain", b"GET only"),
    };
    conn.write_all(&out).await
}

/// Serves the metrics port on `listener` until the task is aborted; `kv` is this node's KV
/// address, reached with the node's TLS settings (`tls`), as of their last reload.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    kv: SocketAddr,
    tls: Option<std::sync::Arc<crate::transport::tls::NodeTls>>,
) {
    let generation = |t: &Option<std::sync::Arc<crate::transport::tls::NodeTls>>| {
        t.as_ref().map_or(0, |t| t.generation())
    };
    let options = |t: &Option<std::sync::Arc<crate::transport::tls::NodeTls>>| ClientOptions {
        tls: t.as_ref().map(|t| t.client()),
        ..Default::default()
    };
    let mut built = generation(&tls);
    let mut opts = options(&tls);
    let mut client = std::sync::Arc::new(OnceCell::new());
    // Histogram upkeep, ended with this task (the guard aborts it when dropped).
    struct Upkeep(tokio::task::JoinHandle<()>);
    impl Drop for Upkeep {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _upkeep = Upkeep({
        let metrics = metrics.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                metrics.run_upkeep();
            }
        })
    });
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        if generation(&tls) != built {
            // Certificates reloaded: the next status read connects with the new ones.
            built = generation(&tls);
            opts = options(&tls);
            client = std::sync::Arc::new(OnceCell::new());
        }
        let (metrics, client, opts) = (metrics.clone(), client.clone(), opts.clone());
        tokio::spawn(async move {
            let served = answer(conn, &metrics, &client, kv, opts);
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, served).await;
        });
    }
}
