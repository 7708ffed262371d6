//! The worker side of a chat completion exchange, from the framed request to the last byte.
//!
//! The loop frames `(head, body)`, admits the run (503 `overloaded`, 429 per address) and hands
//! the exchange to a worker: JSON parsing, validation, agent and session resolution and the
//! rendering of every answer happen here, so a large body costs a worker, not the loop. A
//! non-streaming answer goes back to the loop as bytes to write ([`Done::Respond`]); a streaming
//! run asks the loop for the socket ([`Done::Lend`]) and writes its events straight to it.
//! A sticky run continues as a follow-up job queued behind its session's earlier runs.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use super::access::RunInfo;
use super::stream::{self, ChatJob, WRITE_STEP};
use super::{Done, JobGuard, Notifier, handler};
use crate::agent::CancelToken;
use crate::gateway::Gateway;
use crate::http::head::Head;
use crate::openai::{ApiError, chat};

/// Bodies from this size on are parsed in a lane of their own ([`LargeParses`]).
pub const LARGE_BODY: usize = 1024 * 1024;

/// At most `lanes` large bodies are parsed (and turned into a run's messages) at once: tens of
/// milliseconds of CPU each, so that on a small machine concurrent large uploads cannot take
/// every core from the event loop and from small requests. The others wait their turn, holding
/// a worker but no CPU.
#[derive(Debug)]
pub struct LargeParses {
    lanes: usize,
    busy: Mutex<usize>,
    free: Condvar,
}

/// A lane held until dropped.
#[derive(Debug)]
pub struct Lane<'a>(&'a LargeParses);

impl LargeParses {
    /// Up to `lanes` (at least one) at once.
    pub fn new(lanes: usize) -> Self {
        LargeParses { lanes: lanes.max(1), busy: Mutex::new(0), free: Condvar::new() }
    }

    /// The gateway's: one core fewer than the machine has (one on a two-core machine).
    pub fn global() -> &'static LargeParses {
        static G: OnceLock<LargeParses> = OnceLock::new();
        G.get_or_init(|| LargeParses::new(std::thread::available_parallelism().map_or(1, |n| n.get() - 1)))
    }

    /// Wait for a free lane.
    pub fn take(&self) -> Lane<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= self.lanes {
            busy = self.free.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
        Lane(self)
    }

    /// Lanes in use.
    pub fn busy(&self) -> usize {
        *self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Lane<'_> {
    fn drop(&mut self) {
        *self.0.busy.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.free.notify_one();
    }
}

/// The socket a streaming run gets from the loop, with what the loop had not yet written
/// (answers to earlier pipelined requests) and the request's access-log record.
#[derive(Debug)]
pub struct Lent {
    /// The client's socket.
    pub stream: std::net::TcpStream,
    /// Bytes to write first.
    pub prefix: Vec<u8>,
    /// The access-log record, finished by the run.
    pub access: Option<Box<super::access::Pending>>,
}

/// A framed and admitted chat completion request, on its way to a worker.
#[derive(Debug)]
pub struct Exchange {
    /// The gateway the request arrived under.
    pub gw: Arc<Gateway>,
    /// The request head.
    pub head: Box<Head>,
    /// The request body, unparsed.
    pub body: Vec<u8>,
    /// The body's share of the budget for bodies in flight, given back once it is parsed.
    pub ticket: Option<super::budget::Ticket>,
    /// Cancelled when the client goes away or the run is aborted.
    pub cancel: CancelToken,
    /// Set when the client went away.
    pub gone: Arc<AtomicBool>,
    /// `Cache-Control` and CORS headers for the answer.
    pub headers: Vec<(&'static str, String)>,
    /// The way back to the loop.
    pub notifier: Notifier,
    /// Connection slot.
    pub slot: usize,
    /// Connection id.
    pub id: u64,
    /// The client.
    pub peer: SocketAddr,
}

impl Exchange {
    fn guard(&self) -> JobGuard {
        JobGuard {
            notifier: self.notifier.clone(),
            slot: self.slot,
            id: self.id,
            runs: self.gw.runs().clone(),
            summary: None,
            buffered: Some((self.headers.clone(), self.head.method == "HEAD")),
            armed: true,
        }
    }

    /// Answer a request that did not become a run, with the shape the loop used to give it.
    fn refuse(&self, e: ApiError) {
        let rid = format!("req-{}", crate::util::random_hex(24));
        let resp = handler::with_headers(e.response(), self.headers.clone()).header("x-request-id", rid.clone());
        let info = RunInfo { agent: None, session_key: None, request_id: Some(rid) };
        self.notifier.send(Done::Respond {
            slot: self.slot,
            id: self.id,
            resp: Some(resp),
            head_only: false,
            close: self.head.close,
            info: Some(Box::new(info)),
        });
    }

    /// Parse, validate and resolve the request, then run it (here, or behind its session's
    /// earlier runs).
    pub fn run(mut self) {
        let mut guard = self.guard();
        let lane = (self.body.len() >= LARGE_BODY).then(|| LargeParses::global().take());
        let parsed = chat::parse(&self.body);
        self.body = Vec::new();
        self.ticket = None;
        let mut req = match parsed {
            Ok(r) => r,
            Err(e) => {
                guard.armed = false;
                return self.refuse(e);
            }
        };
        let gw = &self.gw;
        let h = &self.head;
        let run = match chat::to_run(gw, &mut req, h.agent_id.as_deref(), h.session_key.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                guard.armed = false;
                return self.refuse(e);
            }
        };
        drop(lane);
        let agent_id = gw.agents()[run.agent].cfg.id.clone();
        crate::log!(Debug, "run {} {} agent={} stream={}", run.run_id, self.peer, agent_id, req.stream);
        // In the run registry, so that WebSocket `status` counts it and `chat.abort` on its
        // session reaches it.
        gw.runs().start_transient(&run.run_id, &run.session_key, &self.cancel);
        let accepted_at = crate::util::now_ms();
        let job = ChatJob {
            gw: gw.clone(),
            model: chat::echo_model(&req, &agent_id),
            include_usage: req.include_usage,
            cancel: self.cancel.clone(),
            client_gone: self.gone.clone(),
            accepted_at,
            http10: h.minor == 0,
            close: h.close,
            head_only: h.method == "HEAD",
            headers: self.headers.clone(),
            access: None,
            written: Default::default(),
            status: Default::default(),
            run,
        };
        let stage = Stage { notifier: self.notifier.clone(), slot: self.slot, id: self.id, stream: req.stream, job };
        drop(req);
        guard.armed = false;
        match stage.job.run.sticky.then(|| stage.job.run.session_key.clone()) {
            // Turns of one session run one at a time, in order.
            Some(key) => self.gw.pool().follow_up(Some(key), move || stage.run()),
            None => stage.run(),
        }
    }
}

/// A resolved run, ready to execute.
struct Stage {
    notifier: Notifier,
    slot: usize,
    id: u64,
    stream: bool,
    job: ChatJob,
}

impl Stage {
    fn run(self) {
        let Stage { notifier, slot, id, stream, mut job } = self;
        let summary = stream::summary(&job.gw, &job.run, job.accepted_at, crate::agent::run::RunOutcome::nothing(None));
        let info = RunInfo {
            agent: Some(summary.agent_id.clone()),
            session_key: Some(job.run.session_key.clone()),
            request_id: Some(job.run.run_id.clone()),
        };
        let mut guard = JobGuard {
            notifier: notifier.clone(),
            slot,
            id,
            runs: job.gw.runs().clone(),
            summary: Some(summary),
            buffered: Some((job.headers.clone(), job.head_only)),
            armed: true,
        };
        if !stream {
            let resp = job.run_buffered();
            guard.armed = false;
            let (head_only, close) = (job.head_only, job.close);
            notifier.send(Done::Respond { slot, id, resp, head_only, close, info: Some(Box::new(info)) });
            return;
        }
        // Streaming: ask the loop for the socket.
        let (tx, rx) = sync_channel(1);
        notifier.send(Done::Lend { slot, id, reply: tx });
        let Ok(lent) = rx.recv() else {
            // The connection is gone: the run never starts.
            guard.armed = false;
            job.gw.runs().finish(stream::summary(
                &job.gw,
                &job.run,
                job.accepted_at,
                crate::agent::run::RunOutcome::nothing(Some(crate::agent::RunError::Cancelled)),
            ));
            return;
        };
        // From here a panic closes the connection: part of the answer may be on the wire.
        guard.buffered = None;
        let Lent { stream: mut sock, prefix, access } = lent;
        job.access = access.map(|mut a| {
            info.apply(&mut a);
            a
        });
        let earlier = prefix.len() as u64;
        let ok = sock.set_nonblocking(false).is_ok() && sock.set_write_timeout(Some(WRITE_STEP)).is_ok();
        let reuse = ok && job.run_streaming(&mut sock, prefix) && !job.close;
        if let Some(a) = &job.access {
            // The prefix holds earlier responses' bytes.
            a.finish(job.status.get(), job.written.get().saturating_sub(earlier));
        }
        guard.armed = false;
        notifier.send(Done::Return { slot, id, stream: reuse.then_some(sock) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn large_parses_take_turns_in_their_lanes() {
        let lanes = Arc::new(LargeParses::new(2));
        let (inside, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (lanes, inside, most) = (lanes.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let _lane = lanes.take();
                        let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(n, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(most.load(Ordering::SeqCst) <= 2, "{} at once", most.load(Ordering::SeqCst));
        assert_eq!(lanes.busy(), 0, "every lane given back");
        // A lane is given back when its holder panics, too.
        let l = lanes.clone();
        assert!(
            std::thread::spawn(move || {
                let _lane = l.take();
                panic!("parse failed")
            })
            .join()
            .is_err()
        );
        assert_eq!(lanes.busy(), 0);
        let zero = LargeParses::new(0);
        drop(zero.take());
    }
}
