//! The worker side of a chat completion run.
//!
//! From dispatch to its end a run is the only writer to its client's socket (the loop goes on
//! reading it, for a hang-up or pipelined requests). A streaming run writes its SSE records
//! straight to it, waiting for room when the client is slow, so memory per stream is one reused
//! buffer however slow the client is: a slow reader simply slows the run down. The response head is held back until the backend's
//! first event (or the first heartbeat), so a run that fails at once still gets a real HTTP error
//! status (SPEC §5).

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::agent::registry::RunSummary;
use crate::agent::run::{RunOutcome, RunRequest, execute};
use crate::agent::tools::{ToolCallPiece, ToolEvent};
use crate::agent::{CancelToken, RunError, RunSink};
use crate::gateway::Gateway;
use crate::http::response::{LAST_CHUNK, Response, push_chunk, push_header, push_status_line};
use crate::openai::ApiError;
use crate::openai::chat::{ChunkEncoder, completion_body};

/// Longest one flush to a client may take, however slowly it reads, before the client counts as
/// gone (so a trickling reader cannot hold a worker indefinitely).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest one wait for room in the socket lasts: progress (or its absence) is seen at least
/// this often, so a stall is detected within this much of `gateway.http.stallTimeoutSeconds`.
pub const WRITE_STEP: Duration = Duration::from_secs(1);

thread_local! {
    /// Each worker's own poller, made on the first wait for a slow client and kept.
    static WAITER: RefCell<Option<(mio::Poll, mio::Events)>> = const { RefCell::new(None) };
}

/// Wait up to `timeout` for room in the (non-blocking) socket's send buffer.
fn wait_writable(sock: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    wait_for(sock, mio::Interest::WRITABLE, timeout)
}

/// Wait up to `timeout` for bytes (or the end) to read on the (non-blocking) socket.
pub fn wait_readable(sock: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    wait_for(sock, mio::Interest::READABLE, timeout)
}

fn wait_for(sock: &TcpStream, interest: mio::Interest, timeout: Duration) -> std::io::Result<()> {
    WAITER.with(|w| {
        let mut w = w.borrow_mut();
        let (poll, events) = match &mut *w {
            Some(p) => p,
            none => none.insert((mio::Poll::new()?, mio::Events::with_capacity(1))),
        };
        let fd = sock.as_raw_fd();
        let mut source = mio::unix::SourceFd(&fd);
        poll.registry().register(&mut source, mio::Token(0), interest)?;
        let waited = poll.poll(events, Some(timeout));
        let _ = poll.registry().deregister(&mut source);
        waited
    })
}

/// Write all of `buf` to a non-blocking socket before `deadline`; false on error, when time
/// runs out, or when the peer takes no bytes for `stall` (within [`WRITE_STEP`]). A client that
/// reads costs one `write` per call; only a full send buffer makes the worker wait.
pub fn write_bounded(mut sock: &TcpStream, mut buf: &[u8], deadline: Instant, stall: Duration) -> bool {
    let mut progress = Instant::now();
    while !buf.is_empty() {
        match sock.write(buf) {
            Ok(0) => return false,
            Ok(n) => {
                buf = &buf[n..];
                progress = Instant::now();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.min(progress + stall).saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                match wait_writable(sock, left.min(WRITE_STEP)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// One chat run as handed to a worker.
#[derive(Debug)]
pub struct ChatJob {
    /// The shared gateway.
    pub gw: Arc<Gateway>,
    /// The run.
    pub run: RunRequest,
    /// `model` to echo.
    pub model: String,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Cancelled by the loop when the client goes away, or through the run registry
    /// (WebSocket `chat.abort` on the run's session).
    pub cancel: CancelToken,
    /// Set by the loop (before cancelling) when the client went away: a cancelled run whose
    /// client is still there was aborted, and its client gets an answer saying so.
    pub client_gone: Arc<AtomicBool>,
    /// Unix ms when the run was accepted (for the run registry).
    pub accepted_at: u64,
    /// The request was HTTP/1.0 (close-delimited stream).
    pub http10: bool,
    /// The connection closes after this response (`Connection: close` from the client).
    pub close: bool,
    /// HEAD request: no body.
    pub head_only: bool,
    /// Extra headers for the answer (`Cache-Control`, CORS); `Cache-Control` is left off SSE.
    pub headers: Vec<(&'static str, String)>,
    /// Bytes written to the socket by [`ChatJob::run_streaming`].
    pub written: Cell<u64>,
    /// The status [`ChatJob::run_streaming`] answered with (499 when the client left first).
    pub status: Cell<u16>,
}

/// The run registry's record of an HTTP run's end.
pub fn summary(gw: &Gateway, run: &RunRequest, accepted_at: u64, out: RunOutcome) -> RunSummary {
    RunSummary {
        run_id: run.run_id.clone(),
        session_key: run.session_key.clone(),
        agent_id: gw.agents().get(run.agent).map(|a| a.cfg.id.clone()).unwrap_or_default(),
        started_at: accepted_at,
        ended_at: crate::util::now_ms(),
        text: out.text,
        tool_calls: out.tool_calls,
        finish: out.finish,
        usage: out.usage,
        error: out.error,
    }
}

impl ChatJob {
    /// Whether the client left (as opposed to the run being aborted while it waits).
    fn gone(&self) -> bool {
        self.client_gone.load(Ordering::SeqCst)
    }

    /// Tell the run registry the run ended, and give its place in the pool back: only the answer
    /// is left to deliver, and a client may send its next request the moment it has it.
    fn ended(&self, out: &RunOutcome) {
        self.gw.runs().finish(summary(&self.gw, &self.run, self.accepted_at, out.clone()));
        self.gw.pool().release_place();
    }

    /// The connection closes after this answer: the client asked, or the gateway is draining
    /// (a keep-alive answer would invite a request that is never read).
    fn closing(&self) -> bool {
        self.close || !self.gw.is_ready()
    }

    fn headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [("x-gatelet-session-key", self.run.session_key.as_str()), ("x-request-id", self.run.run_id.as_str())]
            .into_iter()
            .chain(self.headers.iter().map(|(k, v)| (*k, v.as_str())))
    }

    /// A non-streaming run: the full response bytes, or `None` when the client went away.
    pub fn run_buffered(&self) -> Option<Response> {
        let created = crate::util::now_secs();
        let out = execute(&self.gw.agents()[self.run.agent], self.gw.sessions(), &self.run, &self.cancel, &mut ());
        self.ended(&out);
        let mut resp = match &out.error {
            None => Response::json(
                200,
                completion_body(
                    &self.run.run_id,
                    created,
                    &self.model,
                    &out.text,
                    &out.tool_calls,
                    out.finish,
                    out.usage,
                ),
            ),
            Some(RunError::Cancelled) if self.gone() => return None,
            Some(e) => ApiError::from(e).response(),
        };
        for (k, v) in self.headers() {
            resp = resp.header(k, v);
        }
        Some(resp)
    }

    /// A streaming run over `sock`. Returns whether the connection can be kept alive.
    pub fn run_streaming(&self, sock: &TcpStream) -> bool {
        let _stream = crate::metrics::stream_guard();
        self.status.set(super::access::CLIENT_CLOSED);
        let mut sink = SseSink {
            job: self,
            sock,
            // Room for the records of one upstream read of a typical reply (64 records of a
            // token each are about 15 KiB), so a batch does not grow it step by step.
            out: Vec::with_capacity(16 * 1024),
            rec: Vec::with_capacity(512),
            enc: ChunkEncoder::new(&self.run.run_id, crate::util::now_secs(), &self.model, self.include_usage),
            head_sent: false,
            dead: false,
            batching: false,
            started: Instant::now(),
            last_write: Instant::now(),
            keepalive: self.gw.config().gateway.keepalive,
        };
        let out = execute(&self.gw.agents()[self.run.agent], self.gw.sessions(), &self.run, &self.cancel, &mut sink);
        self.ended(&out);
        if sink.dead || (out.error == Some(RunError::Cancelled) && self.gone()) {
            return false;
        }
        match &out.error {
            None => {
                if sink.start().is_err() {
                    return false;
                }
                sink.enc.stop(&mut sink.rec, out.finish);
                sink.enc.usage(&mut sink.rec, out.usage);
                ChunkEncoder::done(&mut sink.rec);
                sink.end()
            }
            Some(e) if !sink.head_sent => {
                // Nothing sent yet: a real HTTP error status.
                let mut resp = ApiError::from(e).response();
                for (k, v) in self.headers() {
                    resp = resp.header(k, v);
                }
                self.status.set(resp.status);
                let close = self.http10 || self.closing();
                resp.encode(&mut sink.out, &super::http_date(), self.head_only, close);
                sink.write_out() && !close
            }
            Some(e) => {
                ChunkEncoder::error(&mut sink.rec, &ApiError::from(e));
                sink.end()
            }
        }
    }
}

struct SseSink<'a> {
    job: &'a ChatJob,
    sock: &'a TcpStream,
    /// Bytes ready for the socket.
    out: Vec<u8>,
    /// The SSE records being built (framed into `out` on send).
    rec: Vec<u8>,
    enc: ChunkEncoder,
    head_sent: bool,
    dead: bool,
    /// Deltas are held in `rec` until the backend's batch ends (one chunk, one write).
    batching: bool,
    started: Instant,
    last_write: Instant,
    keepalive: Duration,
}

impl SseSink<'_> {
    /// Commit the 200 head and the role chunk, once.
    fn start(&mut self) -> Result<(), RunError> {
        if self.head_sent {
            return Ok(());
        }
        self.head_sent = true;
        self.job.status.set(200);
        let out = &mut self.out;
        push_status_line(out, 200, &super::http_date());
        push_header(out, "Content-Type", b"text/event-stream; charset=utf-8");
        push_header(out, "Cache-Control", b"no-cache");
        push_header(out, "X-Accel-Buffering", b"no");
        for (k, v) in self.job.headers().filter(|(k, _)| *k != "Cache-Control") {
            push_header(out, k, v.as_bytes());
        }
        if self.job.http10 {
            push_header(out, "Connection", b"close");
        } else {
            push_header(out, "Connection", if self.job.closing() { b"close" } else { b"keep-alive" });
            push_header(out, "Transfer-Encoding", b"chunked");
        }
        out.extend_from_slice(b"\r\n");
        if self.job.head_only {
            return Ok(());
        }
        let mut rec = std::mem::take(&mut self.rec);
        self.enc.role(&mut rec);
        self.rec = rec;
        Ok(())
    }

    /// Frame the pending records and write everything.
    fn send(&mut self) -> Result<(), RunError> {
        self.frame();
        if self.write_out() { Ok(()) } else { Err(RunError::Cancelled) }
    }

    fn frame(&mut self) {
        if self.job.head_only {
            self.rec.clear();
        } else if self.job.http10 {
            self.out.extend_from_slice(&self.rec);
        } else {
            push_chunk(&mut self.out, &self.rec);
        }
        self.rec.clear();
    }

    fn write_out(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let stall = self.job.gw.config().gateway.stall_timeout;
        let ok = write_bounded(self.sock, &self.out, Instant::now() + WRITE_TIMEOUT, stall);
        if ok {
            self.job.written.set(self.job.written.get() + self.out.len() as u64);
        }
        self.out.clear();
        if self.out.capacity() > 64 * 1024 {
            self.out.shrink_to(4096);
        }
        self.last_write = Instant::now();
        if !ok {
            self.dead = true;
            self.job.cancel.cancel();
        }
        ok
    }

    /// Send the final records and end the body. Returns keep-alive.
    fn end(&mut self) -> bool {
        self.frame();
        if !self.job.http10 && !self.job.head_only {
            self.out.extend_from_slice(LAST_CHUNK);
        }
        self.write_out() && !self.job.http10 && !self.job.closing()
    }
}

impl RunSink for SseSink<'_> {
    fn delta(&mut self, text: &str) -> Result<(), RunError> {
        self.start()?;
        self.enc.content(&mut self.rec, text);
        if self.batching { Ok(()) } else { self.send() }
    }

    fn batch_begin(&mut self) {
        self.batching = true;
    }

    fn batch_end(&mut self) -> Result<(), RunError> {
        self.batching = false;
        if self.rec.is_empty() && self.out.is_empty() { Ok(()) } else { self.send() }
    }

    fn tool_event(&mut self, _: &ToolEvent<'_>) {
        // An agent tool may take a while: whatever a backend left held back (its last batch,
        // when its stream ended with it) leaves before the tool runs.
        self.batching = false;
        if !(self.rec.is_empty() && self.out.is_empty()) {
            // A failed write marks the sink dead; the run sees it at its next step.
            let _ = self.send();
        }
    }

    fn tool_call(&mut self, piece: &ToolCallPiece) -> Result<(), RunError> {
        self.start()?;
        self.enc.tool_call(&mut self.rec, piece);
        self.send()
    }

    fn tick(&mut self) -> Result<(), RunError> {
        if self.dead {
            return Err(RunError::Cancelled);
        }
        if self.keepalive.is_zero() {
            return Ok(());
        }
        let now = Instant::now();
        if !self.head_sent {
            if now.duration_since(self.started) >= self.keepalive {
                self.start()?;
                return self.send();
            }
        } else if now.duration_since(self.last_write) >= self.keepalive {
            self.rec.extend_from_slice(ChunkEncoder::KEEPALIVE);
            return self.send();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_that_never_reads_cannot_hold_a_write_past_its_deadline() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        w.set_nonblocking(true).unwrap();
        let (_peer, _) = l.accept().unwrap(); // accepted, never read
        let t0 = Instant::now();
        let big = vec![b'x'; 64 << 20];
        let long = Duration::from_secs(60);
        assert!(!write_bounded(&w, &big, Instant::now() + Duration::from_millis(300), long));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // A small write to a live peer completes.
        let (a, mut b) = {
            let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            (c, l.accept().unwrap().0)
        };
        a.set_nonblocking(true).unwrap();
        assert!(write_bounded(&a, b"hello", Instant::now() + Duration::from_secs(5), long));
        let mut got = [0u8; 5];
        std::io::Read::read_exact(&mut b, &mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn a_slow_reader_gets_every_byte_through_the_waits_for_room() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        w.set_nonblocking(true).unwrap();
        let (mut peer, _) = l.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let (mut got, mut b) = (0, vec![0u8; 64 * 1024]);
            loop {
                std::thread::sleep(Duration::from_millis(1));
                match std::io::Read::read(&mut peer, &mut b) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got += n,
                }
            }
        });
        // Far more than the socket buffers hold: the writer must wait for room many times.
        let big = vec![b'y'; 16 << 20];
        assert!(write_bounded(&w, &big, Instant::now() + Duration::from_secs(120), Duration::from_secs(60)));
        drop(w);
        assert_eq!(reader.join().unwrap(), big.len());
    }

    #[test]
    fn a_reader_that_takes_nothing_is_cut_at_the_stall_bound_not_the_flush_bound() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        w.set_nonblocking(true).unwrap();
        let (_peer, _) = l.accept().unwrap(); // accepted, never read
        let big = vec![b'x'; 64 << 20];
        let t0 = Instant::now();
        let far = Instant::now() + Duration::from_secs(120);
        assert!(!write_bounded(&w, &big, far, Duration::from_millis(500)));
        // Far below the flush deadline: only the stall bound can have ended it.
        assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    }
}
