//! Watchers running through every scenario, and the watch check after healing: each
//! watcher must have received exactly the committed history of its range from its start
//! revision (read again from history after healing), including every acknowledged write.

use futures::StreamExt;
use tessera::check::{check_watch, WatchedEvent};
use tessera::client::{EventKind, WatchOptions, Watcher};

use super::*;

/// A watcher's range, start and what it received.
pub(crate) struct Watched {
    pub(crate) name: &'static str,
    pub(crate) start: Vec<u8>,
    pub(crate) end: Vec<u8>,
    pub(crate) from: u64,
    pub(crate) task: tokio::task::JoinHandle<Received>,
}

#[derive(Debug, Default)]
pub(crate) struct Received {
    pub(crate) events: Vec<WatchedEvent>,
    /// The highest revision the watcher knows complete (events and progress).
    pub(crate) complete: u64,
    pub(crate) error: Option<String>,
}

fn options(from: u64) -> WatchOptions {
    WatchOptions {
        start_revision: from,
        // Progress lets the check know the watcher is complete up to the last write even
        // when its last events came earlier.
        progress_notify: true,
        progress_interval: Duration::from_millis(200),
        ..Default::default()
    }
}

/// Reads `w` until `stop` says the run is over and the watcher is complete up to `upto`
/// (set then), or `limit` passes.
async fn collect(
    mut w: Watcher,
    stop: Arc<std::sync::atomic::AtomicU64>,
    limit: Duration,
) -> Received {
    let mut r = Received::default();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let upto = stop.load(Ordering::Relaxed);
        if upto > 0 && r.complete >= upto {
            return r;
        }
        let next = tokio::time::timeout_at(deadline, w.next()).await;
        match next {
            Ok(Some(Ok(resp))) => {
                r.complete = r.complete.max(resp.revision);
                for e in resp.events {
                    r.events.push(WatchedEvent {
                        revision: resp.revision,
                        value: (e.kind == EventKind::Put).then_some(e.kv.value),
                        key: e.kv.key,
                    });
                }
            }
            Ok(Some(Err(e))) => {
                r.error = Some(e.to_string());
                return r;
            }
            Ok(None) => {
                r.error = Some("the watch ended".into());
                return r;
            }
            Err(_) => {
                r.error = Some(format!(
                    "still incomplete at {} after {limit:?}",
                    r.complete
                ));
                return r;
            }
        }
    }
}

/// Starts the scenario's watchers with a client of default options: the whole keyspace
/// and half the regions from now, and the whole keyspace from revision 1 (history first).
pub(crate) async fn start_watchers(
    addrs: &[String],
    stop: Arc<std::sync::atomic::AtomicU64>,
) -> Vec<Watched> {
    let client = Client::connect(addrs, common::with_tls(addrs, ClientOptions::default()))
        .await
        .expect("watch client");
    let half = key_in_region(REGIONS / 2, REGIONS, "");
    let mut out = Vec::new();
    for (name, start, end, from) in [
        ("all keys from now", Vec::new(), Vec::new(), 0),
        ("half the regions from now", Vec::new(), half, 0),
        ("all keys from revision 1", Vec::new(), Vec::new(), 1),
    ] {
        let w = client
            .watch(&start, &end, options(from))
            .await
            .expect("watch starts");
        out.push(Watched {
            name,
            from: w.start_revision(),
            start,
            end,
            task: tokio::spawn(collect(w, stop.clone(), Duration::from_secs(600))),
        });
    }
    out
}

/// After healing: every watcher complete up to the last acknowledged revision, checked
/// against the history of its range read afresh from its start. Returns the problems.
pub(crate) async fn check_watchers(
    name: &str,
    addrs: &[String],
    watchers: Vec<Watched>,
    stop: Arc<std::sync::atomic::AtomicU64>,
    history: &History,
) -> Vec<String> {
    let reader = Client::connect(addrs, common::with_tls(addrs, ClientOptions::default()))
        .await
        .expect("client");
    let upto = reader.current_revision().await.expect("current revision");
    stop.store(upto, Ordering::Relaxed);
    let mut problems = Vec::new();
    for w in watchers {
        let got = match tokio::time::timeout(Duration::from_secs(60), w.task).await {
            Ok(Ok(r)) => r,
            other => {
                problems.push(format!("{}: watcher did not finish: {other:?}", w.name));
                continue;
            }
        };
        if let Some(e) = &got.error {
            problems.push(format!("{}: {e}", w.name));
            continue;
        }
        let fresh = reader
            .watch(&w.start, &w.end, options(w.from))
            .await
            .expect("reference watch");
        let done = Arc::new(std::sync::atomic::AtomicU64::new(upto));
        let reference = collect(fresh, done, Duration::from_secs(60)).await;
        if let Some(e) = &reference.error {
            problems.push(format!("{}: reading history: {e}", w.name));
            continue;
        }
        let in_range =
            |k: &[u8]| k >= w.start.as_slice() && (w.end.is_empty() || k < w.end.as_slice());
        eprintln!(
            "chaos {name}: watcher \"{}\" from {}: {} events up to {upto}",
            w.name,
            w.from,
            got.events.iter().filter(|e| e.revision <= upto).count()
        );
        if let Err(e) = check_watch(
            &got.events,
            &reference.events,
            history,
            in_range,
            w.from,
            upto,
        ) {
            problems.push(format!("{}: {e}", w.name));
        }
    }
    problems
}
