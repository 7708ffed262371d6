//! One connection's lane to the request workers: the text messages the loop has decoded and not
//! yet handed over, taken by one worker at a time in arrival order, and the state the loop and
//! those workers share (the connection's runs and pending waits).
//!
//! The event loop only frames: it decodes a text message (RFC 6455 work) and pushes it here.
//! A `gatelet-rpc` worker parses it, validates it, resolves agent and session, does the work
//! and renders the answer, which it posts to the connection through its [`Outbox`]. A
//! connection is scheduled on at most one worker at a time and its worker takes messages in
//! order, so answers leave in request order; one worker takes up to [`BATCH`] messages per
//! turn, so a burst of pipelined requests costs one hand-off, not one per request.
//!
//! The lane is bounded: the loop stops decoding while it holds [`INBOX_BYTES`] bytes or
//! [`INBOX_MESSAGES`] messages (one larger message is taken alone), and the worker that brings
//! it back under half of that posts [`Outgoing::Wake`] so the loop reads on.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, OnceLock};
use std::time::Instant;

use super::{Outbox, Outgoing};
use crate::agent::CancelToken;
use crate::gateway::Gateway;

/// Bytes of decoded, unhandled messages a connection may hold before the loop stops decoding.
pub const INBOX_BYTES: usize = 64 * 1024;
/// Unhandled messages a connection may hold before the loop stops decoding.
pub const INBOX_MESSAGES: usize = 256;
/// Messages one worker handles for a connection before it lets other connections go first.
pub const BATCH: usize = 32;
/// Most request workers, whatever the machine: handling a request is short (runs go to the run
/// pool, store methods to the store thread).
const MAX_THREADS: usize = 4;

/// A message the loop hands to the workers.
#[derive(Debug)]
pub(crate) enum Item {
    /// The first message, before `connect` succeeded.
    Connect(String),
    /// A request on an authenticated connection.
    Request(String),
    /// A binary message (answered with a close, after what came before it).
    Binary {
        /// Whether the connection had authenticated.
        open: bool,
    },
    /// The connection is closing: answered with [`Outgoing::Drained`] once everything before it
    /// has been, so that its close frame follows their answers.
    Mark,
}

impl Item {
    fn len(&self) -> usize {
        match self {
            Item::Connect(t) | Item::Request(t) => t.len(),
            Item::Binary { .. } | Item::Mark => 0,
        }
    }
}

/// What `agent.wait` or a duplicate `agent` request answers with.
#[derive(Debug, Clone, Copy)]
pub(crate) enum WaitKind {
    /// `agent.wait`: answer with the wait payload.
    Wait,
    /// A duplicate `agent` request: answer as the run's second response.
    AgentFinal,
}

/// A request answered when a run ends (or at its deadline, by the loop's timer).
#[derive(Debug)]
pub(crate) struct PendingWait {
    pub token: u64,
    pub req_id: String,
    pub run_id: String,
    pub kind: WaitKind,
    pub deadline: Option<Instant>,
}

/// The part of a lane behind its lock.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    queue: VecDeque<Item>,
    queued_bytes: usize,
    /// A worker has this lane (queued in the pool or running it).
    scheduled: bool,
    /// The loop stopped decoding because the lane was full.
    paused: bool,
    /// The connection is closing: queued messages are dropped, runs started late are cancelled.
    pub closed: bool,
    /// Runs this connection started that are still going: aborted when it closes.
    pub runs: HashMap<String, CancelToken>,
    pub waits: Vec<PendingWait>,
    pub next_wait: u64,
}

/// One connection's lane.
#[derive(Debug)]
pub(crate) struct Lane {
    /// Where answers go.
    pub outbox: Arc<dyn Outbox>,
    pub gw: Arc<Gateway>,
    /// The client's address (authentication lockout, per-address run limit).
    pub ip: IpAddr,
    /// Connection id, for logs and `hello-ok`.
    pub conn_id: u64,
    shared: Mutex<Shared>,
}

impl Lane {
    pub fn new(outbox: Arc<dyn Outbox>, gw: Arc<Gateway>, ip: IpAddr, conn_id: u64) -> Self {
        Lane { outbox, gw, ip, conn_id, shared: Mutex::new(Shared::default()) }
    }

    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the loop should decode no further message for now; if so, the worker that makes
    /// room will post [`Outgoing::Wake`].
    pub fn full(&self) -> bool {
        let mut s = self.lock();
        let full = s.queued_bytes >= INBOX_BYTES || s.queue.len() >= INBOX_MESSAGES;
        s.paused |= full;
        full
    }

    /// Queue `item` (loop side) and make sure a worker will take it; false when the
    /// connection is already closing (nothing is taken then).
    pub fn push(self: &Arc<Self>, item: Item) -> bool {
        let schedule = {
            let mut s = self.lock();
            if s.closed {
                return false;
            }
            s.queued_bytes += item.len();
            s.queue.push_back(item);
            !std::mem::replace(&mut s.scheduled, true)
        };
        if schedule {
            pool().schedule(self.clone());
        }
        true
    }

    /// The connection is closing: drop what is queued and pending, cancel its runs.
    pub fn close(&self) {
        let runs = {
            let mut s = self.lock();
            s.closed = true;
            s.queue.clear();
            s.queued_bytes = 0;
            s.waits.clear();
            std::mem::take(&mut s.runs)
        };
        for (_, c) in runs {
            c.cancel();
        }
    }

    /// Worker side: handle up to [`BATCH`] messages in order. Returns whether more are queued.
    fn work(self: &Arc<Self>) -> bool {
        for _ in 0..BATCH {
            let (item, wake) = {
                let mut s = self.lock();
                let Some(item) = s.queue.pop_front() else {
                    s.scheduled = false;
                    return false;
                };
                s.queued_bytes -= item.len();
                let room = s.queued_bytes < INBOX_BYTES / 2 && s.queue.len() < INBOX_MESSAGES / 2;
                (item, room && std::mem::take(&mut s.paused))
            };
            if wake {
                // Before handling: the loop decodes the next messages meanwhile.
                self.outbox.post(Outgoing::Wake);
            }
            // A panicking request must not take the worker down, nor leave the connection
            // waiting for an answer that never comes.
            let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| super::handler::handle(self, item)));
            if handled.is_err() {
                crate::log!(
                    Error,
                    "internal error while handling a request on ws #{}; connection closed",
                    self.conn_id
                );
                let reason = "internal error".to_string();
                self.outbox.post(Outgoing::Close { res: None, code: crate::ws::frame::close::INTERNAL, reason });
            }
        }
        true
    }
}

/// The request workers: connections with queued messages, taken in turn.
struct Pool {
    ready: Mutex<VecDeque<Arc<Lane>>>,
    cv: Condvar,
    /// Worker threads started.
    threads: AtomicUsize,
}

/// The request workers, started on first use (a gateway nobody opens a WebSocket to has none).
fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    static START: Once = Once::new();
    let p: &'static Pool = POOL.get_or_init(|| Pool {
        ready: Mutex::new(VecDeque::new()),
        cv: Condvar::new(),
        threads: AtomicUsize::new(0),
    });
    START.call_once(|| {
        // One core fewer than the machine has (one on two cores): requests are short, and every
        // thread keeps an allocator arena for the life of the process.
        let want = std::thread::available_parallelism().map_or(2, |n| n.get()).saturating_sub(1).clamp(1, MAX_THREADS);
        let started = (0..want)
            .filter(|_| std::thread::Builder::new().name("gatelet-rpc".into()).spawn(move || p.worker()).is_ok())
            .count();
        if started == 0 {
            crate::log!(Error, "could not start a request worker: WebSocket requests are handled on the event loop");
        }
        p.threads.store(started, Ordering::Relaxed);
    });
    p
}

impl Pool {
    fn schedule(&self, lane: Arc<Lane>) {
        if self.threads.load(Ordering::Relaxed) == 0 {
            // No worker could be started: better slow than deaf.
            while lane.work() {}
            return;
        }
        self.ready.lock().unwrap_or_else(|e| e.into_inner()).push_back(lane);
        self.cv.notify_one();
    }

    fn worker(&self) {
        loop {
            let lane = {
                let mut q = self.ready.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    if let Some(l) = q.pop_front() {
                        break l;
                    }
                    q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            if lane.work() {
                // More queued: behind the connections already waiting.
                self.ready.lock().unwrap_or_else(|e| e.into_inner()).push_back(lane);
                self.cv.notify_one();
            }
        }
    }
}
