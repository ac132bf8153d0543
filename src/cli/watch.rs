//! `tessera watch`: prints the changes of a key prefix as they come, one line each, until
//! interrupted (or `--count` events). It resumes by itself across region changes, leader
//! changes and reconnects; it ends with status 3 when its start revision is compacted and 4
//! when the cluster stays unreachable past the client's deadline.

use futures::StreamExt;
use serde::Serialize;
use tessera::client::{EventKind, WatchOptions};
use tessera::proto::KeyValue;

use super::{print_json, text, ConnArgs, Error, Result};

#[derive(clap::Args)]
pub struct WatchArgs {
    /// Watch every key that starts with this ("" = every key).
    pub prefix: String,
    /// Start at this cluster revision (history first); 0 = changes from now on.
    #[arg(long, default_value_t = 0)]
    pub rev: u64,
    /// Print each key's previous value too.
    #[arg(long)]
    pub prev_kv: bool,
    /// Stop after this many events (0 = never).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
}

#[derive(Serialize)]
struct EventJson {
    revision: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    key: String,
    value: String,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_value: Option<String>,
}

fn kind(k: EventKind) -> &'static str {
    match k {
        EventKind::Put => "PUT",
        EventKind::Delete => "DELETE",
    }
}

pub async fn run(conn: ConnArgs, args: WatchArgs) -> Result<()> {
    let client = conn.connect(false).await?;
    let opts = WatchOptions {
        start_revision: args.rev,
        prev_kv: args.prev_kv,
        ..Default::default()
    };
    let mut watch = client
        .watch_prefix(args.prefix.as_bytes(), opts)
        .await
        .map_err(watch_error)?;
    let mut seen = 0u64;
    while let Some(resp) = watch.next().await {
        let resp = resp.map_err(watch_error)?;
        for e in resp.events {
            let prev = e.prev_kv.as_ref().map(|p: &KeyValue| text(&p.value));
            if conn.json {
                print_json(&EventJson {
                    revision: resp.revision,
                    kind: kind(e.kind),
                    key: text(&e.kv.key),
                    value: text(&e.kv.value),
                    create_revision: e.kv.create_revision,
                    mod_revision: e.kv.mod_revision,
                    version: e.kv.version,
                    prev_value: prev,
                });
            } else {
                let mut line = format!("{} {} {}", resp.revision, kind(e.kind), text(&e.kv.key));
                if e.kind == EventKind::Put {
                    line.push(' ');
                    line.push_str(&text(&e.kv.value));
                }
                if let Some(p) = prev {
                    line.push_str(&format!(" (was {p})"));
                }
                println!("{line}");
            }
            seen += 1;
            if args.count > 0 && seen >= args.count {
                return Ok(());
            }
        }
    }
    Err(Error::WatchLost("the watch ended".into()))
}

fn watch_error(e: tessera::client::Error) -> Error {
    use tessera::client::Error as C;
    match e {
        C::Compacted { compact_revision } => Error::WatchCompacted(compact_revision),
        C::Unavailable(m) => Error::WatchLost(m),
        C::Deadline { last, .. } => Error::WatchLost(last),
        e => Error::Client(e),
    }
}
