//! One `Kv.Watch` stream per node connection, shared by every watch of the client that has
//! a region led there.
//!
//! A task reads the stream and hands each message to the watch it names, through that
//! watch's bounded queue. A watch whose queue is full is cancelled on the server and told
//! it lost that server watch (`Lost`): it starts again from the last revision it completed,
//! and the server reads history for it. When the stream breaks, every server watch on it is
//! lost the same way.
//!
//! Invariants:
//! - server watch ids are unique in the process, so a watch with server watches on several
//!   nodes never mistakes one's messages for another's;
//! - a server watch's messages reach its queue in the order the server sent them, and
//!   none after it was reported lost or cancelled;
//! - the task holds the stream only while some watch or the client holds the mux: when the
//!   last handle goes, the outbound side closes and the server ends the stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::auth::Ch;
use tokio::sync::{mpsc, Notify};

use crate::proto::{self, watch_message::Body, watch_request::Request as Req};

/// What a server watch said.
#[derive(Debug)]
pub(crate) enum SubMsg {
    Events(u64, Vec<proto::Event>),
    Progress(u64),
    Canceled(proto::WatchCanceled),
}

/// The server watches a watch lost (queue full, stream broken), by id.
#[derive(Default)]
pub(crate) struct Lost {
    ids: Mutex<Vec<u64>>,
    pub notify: Notify,
}

impl Lost {
    fn push(&self, id: u64) {
        self.ids.lock().expect("lost lock poisoned").push(id);
        self.notify.notify_one();
    }

    pub fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.ids.lock().expect("lost lock poisoned"))
    }
}

struct Target {
    tx: mpsc::Sender<(u64, SubMsg)>,
    lost: Arc<Lost>,
}

/// The last server watch id given out.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

#[derive(Clone)]
pub(crate) struct Mux {
    inner: Arc<Inner>,
}

struct Inner {
    out: mpsc::UnboundedSender<proto::WatchRequest>,
    subs: Mutex<HashMap<u64, Target>>,
    dead: AtomicBool,
}

impl Mux {
    /// Opens a watch stream on `ch`.
    pub async fn open(ch: Ch) -> Result<Mux, tonic::Status> {
        let (out, rx) = mpsc::unbounded_channel();
        let mut kv = crate::Client::kv(ch);
        let inbound = kv
            .watch(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        let inner = Arc::new(Inner {
            out,
            subs: Mutex::new(HashMap::new()),
            dead: AtomicBool::new(false),
        });
        tokio::spawn(drive(Arc::downgrade(&inner), inbound));
        Ok(Mux { inner })
    }

    pub fn is_dead(&self) -> bool {
        self.inner.dead.load(Ordering::Acquire)
    }

    /// Starts a server watch; its messages go to `tx` under the returned id. `None` when the
    /// stream is gone.
    pub fn create(
        &self,
        mut c: proto::WatchCreate,
        tx: mpsc::Sender<(u64, SubMsg)>,
        lost: Arc<Lost>,
    ) -> Option<u64> {
        // Unique in the process, not only on this stream: a watch tells its server watches
        // on different nodes apart by id alone.
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed) + 1;
        c.watch_id = id;
        {
            // Checked under the lock the stream's end takes: a watch added after it would
            // never be reported lost.
            let mut subs = self.inner.subs.lock().expect("watch mux lock poisoned");
            if self.is_dead() {
                return None;
            }
            subs.insert(id, Target { tx, lost });
        }
        let req = proto::WatchRequest {
            request: Some(Req::Create(c)),
        };
        if self.inner.out.send(req).is_err() {
            self.inner
                .subs
                .lock()
                .expect("watch mux lock poisoned")
                .remove(&id);
            return None;
        }
        Some(id)
    }

    /// Stops a server watch; nothing more of it is delivered.
    pub fn cancel(&self, id: u64) {
        self.inner.cancel(id);
    }
}

impl Inner {
    fn cancel(&self, id: u64) {
        if self
            .subs
            .lock()
            .expect("watch mux lock poisoned")
            .remove(&id)
            .is_some()
        {
            let _ = self.out.send(proto::WatchRequest {
                request: Some(Req::Cancel(proto::WatchCancel { watch_id: id })),
            });
        }
    }

    fn dispatch(&self, m: proto::WatchMessage) {
        let id = m.watch_id;
        let msg = match m.body {
            Some(Body::Events(e)) => SubMsg::Events(e.revision, e.events),
            Some(Body::Progress(p)) => SubMsg::Progress(p),
            Some(Body::Canceled(c)) => SubMsg::Canceled(c),
            None => return,
        };
        let ended = matches!(msg, SubMsg::Canceled(_));
        let mut subs = self.subs.lock().expect("watch mux lock poisoned");
        let Some(t) = subs.get(&id) else {
            return;
        };
        match t.tx.try_send((id, msg)) {
            Ok(()) if ended => {
                subs.remove(&id);
            }
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // The watch is not keeping up: it continues from history later.
                let t = subs.remove(&id).expect("present");
                drop(subs);
                t.lost.push(id);
                let _ = self.out.send(proto::WatchRequest {
                    request: Some(Req::Cancel(proto::WatchCancel { watch_id: id })),
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                drop(subs);
                self.cancel(id);
            }
        }
    }
}

async fn drive(inner: Weak<Inner>, mut inbound: tonic::Streaming<proto::WatchResponse>) {
    loop {
        let got = inbound.message().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match got {
            Ok(Some(resp)) => {
                for m in resp.messages {
                    inner.dispatch(m);
                }
            }
            Ok(None) | Err(_) => {
                let subs = {
                    let mut subs = inner.subs.lock().expect("watch mux lock poisoned");
                    inner.dead.store(true, Ordering::Release);
                    std::mem::take(&mut *subs)
                };
                for (id, t) in subs {
                    t.lost.push(id);
                }
                return;
            }
        }
    }
}
