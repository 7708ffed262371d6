//! The worker side of a chat completion exchange, from the framed request to the last byte.
//!
//! The loop frames `(head, body)`, admits the run (503 `overloaded`, 429 per address) and hands
//! the exchange to a worker: JSON parsing, validation, agent and session resolution and the
//! rendering of every answer happen here, so a large body costs a worker, not the loop. A
//! non-streaming answer goes back to the loop as bytes to write ([`Done::Respond`]); a streaming
//! run asks the loop for the socket ([`Done::Lend`]) and writes its events straight to it.
//! A sticky run continues as a follow-up job queued behind its session's earlier runs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::sync_channel;

use super::access::RunInfo;
use super::stream::{self, ChatJob, WRITE_STEP};
use super::{Done, JobGuard, Notifier, handler};
use crate::agent::CancelToken;
use crate::gateway::Gateway;
use crate::http::head::Head;
use crate::openai::{ApiError, chat};

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
        let parsed = chat::parse(&self.body);
        self.body = Vec::new();
        self.ticket = None;
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                guard.armed = false;
                return self.refuse(e);
            }
        };
        let gw = &self.gw;
        let h = &self.head;
        let run = match chat::to_run(gw, &req, h.agent_id.as_deref(), h.session_key.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                guard.armed = false;
                return self.refuse(e);
            }
        };
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
        let summary = stream::summary(
            &job.gw,
            &job.run,
            job.accepted_at,
            crate::agent::run::RunOutcome {
                text: String::new(),
                tool_calls: Vec::new(),
                usage: Default::default(),
                finish: crate::agent::FinishReason::Stop,
                error: None,
            },
        );
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
                crate::agent::run::RunOutcome {
                    text: String::new(),
                    tool_calls: Vec::new(),
                    usage: Default::default(),
                    finish: crate::agent::FinishReason::Stop,
                    error: Some(crate::agent::RunError::Cancelled),
                },
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
