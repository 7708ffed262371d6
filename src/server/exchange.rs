//! The worker side of a chat completion exchange, from the framed request to the last byte.
//!
//! The loop frames `(head, body)`, admits the run (503 `overloaded`, 429 per address) and hands
//! the exchange to a worker: JSON parsing, validation, agent and session resolution and the
//! rendering of every answer happen here, so a large body costs a worker, not the loop. The
//! exchange comes with the client's socket (a duplicate the connection keeps for its runs) and
//! whatever the loop had not yet written of earlier answers: from dispatch to [`Done`], the run is
//! the only writer to the socket. A non-streaming answer goes back to the loop as a response to
//! write ([`Done::Respond`]), which writes the answers of one turn together; a streaming run
//! writes its events straight to the socket and then gives the connection back
//! ([`Done::Streamed`]) — no round trip to the loop before its first byte, and, on a connection
//! that stays open, no wake-up of the loop just to hand it back (the client's next request wakes
//! it; see [`Notifier::send_quiet`]). A sticky run continues as a follow-up job queued behind its
//! session's earlier runs.
//!
//! A large body (from [`LARGE_INPUT`]) is not read by the loop at all: the exchange comes with
//! what arrived with the head and reads the rest from the socket itself ([`Exchange::rest`]),
//! under the same stall rule the loop applies, then tells the loop ([`Done::BodyRead`]).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::access::RunInfo;
use super::stream::{self, ChatJob, WRITE_TIMEOUT};
use super::{Done, JobGuard, Notifier, handler};
use crate::agent::CancelToken;
use crate::agent::pool::{BulkLanes, LARGE_INPUT};
use crate::gateway::Gateway;
use crate::http::head::Head;
use crate::openai::{ApiError, chat};

/// Bytes a lent body's reader copies per turn in its lane before letting others have it.
const LANE_TURN: u64 = 1024 * 1024;

/// A framed and admitted chat completion request, on its way to a worker.
#[derive(Debug)]
pub struct Exchange {
    /// The gateway the request arrived under.
    pub gw: Arc<Gateway>,
    /// The request head.
    pub head: Box<Head>,
    /// The request body, unparsed (its start, while `rest` is not zero).
    pub body: Vec<u8>,
    /// Bytes of a declared-length body still in the socket, for the run to read: the loop lent
    /// it the connection's input until [`Done::BodyRead`] (or the run's end).
    pub rest: u64,
    /// The body's share of the budget for bodies in flight, given back once it is parsed.
    pub ticket: Option<super::budget::Ticket>,
    /// Cancelled when the client goes away or the run is aborted.
    pub cancel: CancelToken,
    /// Set when the client went away.
    pub gone: Arc<AtomicBool>,
    /// Set by the loop when bytes arrive for the connection during the run.
    pub held: Arc<AtomicBool>,
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
    /// The client's socket (non-blocking), shared with the loop, which only reads it meanwhile.
    pub sock: Arc<TcpStream>,
    /// Answers to earlier pipelined requests the loop had not written yet: they leave first.
    pub prefix: Vec<u8>,
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
        self.refuse_then(e, self.head.close)
    }

    /// [`Exchange::refuse`], closing the connection after the answer when `close`.
    fn refuse_then(&self, e: ApiError, close: bool) {
        let rid = format!("req-{}", crate::util::random_hex(24));
        let resp = handler::with_headers(e.response(), self.headers.clone()).header("x-request-id", rid.clone());
        let info = RunInfo { agent: None, session_key: None, request_id: Some(rid) };
        self.notifier.send(Done::Respond {
            slot: self.slot,
            id: self.id,
            resp: Some(resp),
            head_only: false,
            close,
            info: Some(Box::new(info)),
        });
    }

    /// The client went away before the run started: the connection closes, nothing is answered.
    fn client_gone(&self) {
        self.gone.store(true, Ordering::SeqCst);
        let (slot, id, status) = (self.slot, self.id, super::access::CLIENT_CLOSED);
        self.notifier.send(Done::Streamed { slot, id, keep: false, status, written: 0, info: None });
    }

    /// Parse, validate and resolve the request, then run it (here, or behind its session's
    /// earlier runs).
    pub fn run(mut self) {
        if !self.prefix.is_empty() {
            let stall = self.gw.config().gateway.stall_timeout;
            let sent = stream::write_bounded(&self.sock, &self.prefix, Instant::now() + WRITE_TIMEOUT, stall);
            self.prefix = Vec::new();
            if !sent {
                // The client does not take the answers it already has: it gets no more.
                return self.client_gone();
            }
        }
        let mut guard = self.guard();
        if self.rest > 0 {
            let stall = self.gw.config().gateway.header_timeout;
            let end = read_rest(&self.sock, &mut self.body, self.rest, stall, &self.cancel, BulkLanes::global());
            let (slot, id) = (self.slot, self.id);
            match end {
                BodyEnd::Complete => self.notifier.send(Done::BodyRead { slot, id }),
                BodyEnd::Gone => {
                    guard.armed = false;
                    return self.client_gone();
                }
                BodyEnd::Stalled => {
                    guard.armed = false;
                    return self.refuse_then(ApiError::timed_out(), true);
                }
            }
        }
        let lane = (self.body.len() >= LARGE_INPUT).then(|| BulkLanes::global().take());
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
            written: Default::default(),
            status: Default::default(),
            run,
        };
        let stage = Stage {
            notifier: self.notifier.clone(),
            slot: self.slot,
            id: self.id,
            stream: req.stream,
            sock: self.sock.clone(),
            held: self.held.clone(),
            job,
        };
        drop(req);
        guard.armed = false;
        match stage.job.run.sticky.then(|| stage.job.run.session_key.clone()) {
            // Turns of one session run one at a time, in order.
            Some(key) => self.gw.pool().follow_up(Some(key), move || stage.run()),
            None => stage.run(),
        }
    }
}

/// How reading the rest of a lent body ended.
#[derive(Debug, PartialEq)]
enum BodyEnd {
    /// Every declared byte is in the body.
    Complete,
    /// The client closed, the socket failed, or the run was cancelled (a drain, say).
    Gone,
    /// No byte arrived for the stall timeout: 408, and the connection closes.
    Stalled,
}

/// Read `rest` more bytes into `body` from the non-blocking `sock`: no byte for `stall` is a
/// stall, as when the loop reads a body. The bytes go straight into the room reserved for them
/// (std's socket reads fill it without zeroing it first). Copying out of the kernel is CPU work
/// like parsing: it is done holding one of `lanes`, for at most [`LANE_TURN`] bytes at a time,
/// and never while waiting for bytes (a slow sender holds none).
fn read_rest(
    sock: &TcpStream,
    body: &mut Vec<u8>,
    rest: u64,
    stall: Duration,
    cancel: &CancelToken,
    lanes: &BulkLanes,
) -> BodyEnd {
    let target = body.len() as u64 + rest;
    body.reserve_exact(usize::try_from(rest).unwrap_or(usize::MAX));
    let mut progress = Instant::now();
    loop {
        let left = target - body.len() as u64;
        if left == 0 {
            return BodyEnd::Complete;
        }
        if cancel.is_cancelled() {
            return BodyEnd::Gone;
        }
        let (before, turn) = (body.len(), left.min(LANE_TURN));
        let read = {
            let _lane = lanes.take();
            sock.take(turn).read_to_end(body)
        };
        if body.len() > before {
            progress = Instant::now();
        }
        match read {
            // The end of this turn's share, or the end of the client's input.
            Ok(n) if (n as u64) < turn => return BodyEnd::Gone,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = (progress + stall).saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return BodyEnd::Stalled;
                }
                // Woken at least once a second to see a cancel.
                match stream::wait_readable(sock, left.min(stream::WRITE_STEP)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return BodyEnd::Gone,
                }
            }
            Err(_) => return BodyEnd::Gone,
        }
    }
}

/// A resolved run, ready to execute.
struct Stage {
    notifier: Notifier,
    slot: usize,
    id: u64,
    stream: bool,
    sock: Arc<TcpStream>,
    held: Arc<AtomicBool>,
    job: ChatJob,
}

impl Stage {
    fn run(self) {
        let Stage { notifier, slot, id, stream, sock, held, job } = self;
        let summary = stream::summary(&job.gw, &job.run, job.accepted_at, crate::agent::run::RunOutcome::nothing(None));
        let info = Box::new(RunInfo {
            agent: Some(summary.agent_id.clone()),
            session_key: Some(job.run.session_key.clone()),
            request_id: Some(job.run.run_id.clone()),
        });
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
            drop(sock);
            let resp = job.run_buffered();
            guard.armed = false;
            let (head_only, close) = (job.head_only, job.close);
            notifier.send(Done::Respond { slot, id, resp, head_only, close, info: Some(info) });
            return;
        }
        // From here a panic closes the connection: part of the answer may be on the wire.
        guard.buffered = None;
        let _quiet = notifier.quiet_run();
        let keep = job.run_streaming(&sock) && !job.close;
        drop(sock);
        guard.armed = false;
        let (status, written) = (job.status.get(), job.written.get());
        let done = Done::Streamed { slot, id, keep, status, written, info: Some(info) };
        // The answer is on the wire: a kept connection's next request will wake the loop, unless
        // the loop already holds bytes for it (then nothing else may wake it).
        if keep && !held.load(Ordering::SeqCst) { notifier.send_quiet(done) } else { notifier.send(done) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, s)
    }

    #[test]
    fn a_lent_body_is_read_to_its_length_and_no_further() {
        use std::io::Write;
        let (mut c, s) = pair();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            for piece in sent.chunks(300_000) {
                c.write_all(piece).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            c.write_all(b"NEXT").unwrap();
            c
        });
        let lanes = BulkLanes::new(1);
        let mut body = b"head".to_vec();
        let end = read_rest(&s, &mut body, data.len() as u64, Duration::from_secs(5), &CancelToken::new(), &lanes);
        assert_eq!(end, BodyEnd::Complete);
        assert_eq!(body.len(), 4 + data.len());
        assert!(body[..4] == *b"head" && body[4..] == data[..], "bytes in order");
        assert_eq!(lanes.busy(), 0, "the lane is given back");
        // What follows the body (the next request) is left in the socket.
        let mut c = writer.join().unwrap();
        s.set_nonblocking(false).unwrap();
        let mut next = [0u8; 4];
        (&s).read_exact(&mut next).unwrap();
        assert_eq!(&next, b"NEXT");

        // Silence for the stall timeout: stalled; the end of input first: gone.
        s.set_nonblocking(true).unwrap();
        c.write_all(b"12").unwrap();
        let t0 = Instant::now();
        let mut body = Vec::new();
        let end = read_rest(&s, &mut body, 10, Duration::from_millis(300), &CancelToken::new(), &lanes);
        assert_eq!(end, BodyEnd::Stalled);
        assert!(t0.elapsed() >= Duration::from_millis(300), "{:?}", t0.elapsed());
        assert_eq!(body, b"12");
        drop(c);
        let end = read_rest(&s, &mut body, 8, Duration::from_secs(5), &CancelToken::new(), &lanes);
        assert_eq!(end, BodyEnd::Gone);
        // A cancelled run stops reading.
        let (_c, s) = pair();
        let cancel = CancelToken::new();
        cancel.cancel();
        assert_eq!(read_rest(&s, &mut Vec::new(), 8, Duration::from_secs(5), &cancel, &lanes), BodyEnd::Gone);
    }
}
