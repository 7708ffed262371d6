//! The HTTP/1.1 connection machine: request framing and every per-connection timer, with no
//! socket and no clock (time is passed in), in the manner of quinn-proto's
//! `poll_timeout`/`handle_timeout`.
//!
//! The loop feeds it the bytes it read ([`HttpConn::feed`]) and gets [`Action`]s back: a complete
//! head to route, a complete request to dispatch, an error to answer before closing, or a close.
//! It tells the machine what it did with a request ([`HttpConn::read_body`],
//! [`HttpConn::answered`], [`HttpConn::start_run`], [`HttpConn::upgraded`]) and asks for the
//! next timer with [`HttpConn::deadline`], firing it with [`HttpConn::on_timer`]. Timers:
//!
//! - a new connection's first head must be complete within `min(header, idle)` of accept;
//! - a later head, from its first byte, within `header`;
//! - a body may stall (no byte arriving) for at most `header`;
//! - an idle keep-alive connection is closed after `idle`;
//! - a closing connection gets `linger` to take its last bytes.

use std::time::{Duration, Instant};

use crate::http::framing::{BodyDecoder, Framing};
use crate::http::head::{self, Head};
use crate::openai::ApiError;

/// The connection's timeouts (`gateway.http.headerTimeoutSeconds`, `idleTimeoutSeconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A head (from its first byte), or a body's stall.
    pub header: Duration,
    /// An idle keep-alive connection.
    pub idle: Duration,
    /// A closing connection's time to take its last bytes.
    pub linger: Duration,
}

/// Where a connection is, as the loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for the first byte of a request.
    Idle,
    /// Part of a head has arrived.
    Head,
    /// Reading a request body.
    Body,
    /// A run owns the exchange and writes to the socket; the loop only reads it meanwhile.
    Running,
    /// The connection speaks WebSocket now.
    Upgraded,
    /// Flush what is queued, then close.
    Closing,
}

/// What the loop must do next.
#[derive(Debug)]
pub enum Action {
    /// A complete head: route it, then call [`HttpConn::answered`], [`HttpConn::read_body`] or
    /// [`HttpConn::upgraded`].
    Head(Box<Head>),
    /// A complete request with its body: hand it to a worker ([`HttpConn::start_run`]), or
    /// answer it ([`HttpConn::answered`]).
    Dispatch(Box<Head>, Vec<u8>),
    /// Answer with this error; the connection is closing (a refused framing, a body over the
    /// limit, a request that did not arrive in time). `head` is the request, when known.
    Refuse(ApiError, Option<Box<Head>>),
    /// Close the connection now (idle too long, or done lingering).
    Close,
}

enum Inner {
    Idle,
    Head,
    /// `body[..filled]` is the body so far; bytes past `filled` are zeroed room for the next
    /// in-place read, so each byte is initialised once however short the reads come.
    Body {
        head: Box<Head>,
        reader: BodyDecoder,
        body: Vec<u8>,
        filled: usize,
        limit: u64,
    },
    Running,
    Upgraded,
    Closing,
}

/// One HTTP connection's framing state and timers.
pub struct HttpConn {
    inner: Inner,
    deadline: Option<Instant>,
    t: Timeouts,
    /// A complete head has arrived (the connection is no longer a slow or silent newcomer).
    served: bool,
    /// HTTP minor version of the current request (1.0 keep-alive must be confirmed).
    minor: u8,
}

impl std::fmt::Debug for HttpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpConn({:?}, deadline {:?})", self.state(), self.deadline)
    }
}

impl HttpConn {
    /// A connection accepted at `now`: its first head is due within `min(header, idle)`, so a
    /// silent newcomer is not kept as long as an idle keep-alive connection.
    pub fn new(now: Instant, t: Timeouts) -> Self {
        HttpConn { inner: Inner::Idle, deadline: Some(now + t.header.min(t.idle)), t, served: false, minor: 1 }
    }

    /// Take new timeouts (a config reload); they apply from the next timer set.
    pub fn set_timeouts(&mut self, t: Timeouts) {
        self.t = t;
    }

    /// Where the connection is.
    pub fn state(&self) -> State {
        match self.inner {
            Inner::Idle => State::Idle,
            Inner::Head => State::Head,
            Inner::Body { .. } => State::Body,
            Inner::Running => State::Running,
            Inner::Upgraded => State::Upgraded,
            Inner::Closing => State::Closing,
        }
    }

    /// Whether a complete head has arrived on this connection.
    pub fn served(&self) -> bool {
        self.served
    }

    /// HTTP minor version of the current request.
    pub fn minor(&self) -> u8 {
        self.minor
    }

    /// When [`HttpConn::on_timer`] next has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The request whose body is being read.
    pub fn body_head(&self) -> Option<&Head> {
        match &self.inner {
            Inner::Body { head, .. } => Some(head),
            _ => None,
        }
    }

    /// Bytes of body read so far, while reading one.
    pub fn body_len(&self) -> Option<u64> {
        match &self.inner {
            Inner::Body { filled, .. } => Some(*filled as u64),
            _ => None,
        }
    }

    /// Read up to `max` bytes of a body of declared length straight into place with `read`: a
    /// large upload is then copied once (by the kernel), not through the read buffer. `None`
    /// when no such body is being read (or none of it is left); else what `read` returned.
    pub fn read_body_in_place(
        &mut self,
        max: usize,
        now: Instant,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
    ) -> Option<std::io::Result<usize>> {
        let Inner::Body { reader, body, filled, .. } = &mut self.inner else { return None };
        let left = reader.left_in_place().filter(|&n| n > 0)?;
        let start = *filled;
        let end = start + left.min(max.max(1) as u64) as usize;
        // Within the capacity reserved for the declared length: no reallocation, and only room
        // not zeroed by an earlier call is zeroed now.
        if body.len() < end {
            body.resize(end, 0);
        }
        let r = read(&mut body[start..end]);
        let n = r.as_ref().map_or(0, |&n| n.min(end - start));
        *filled += n;
        reader.read_in_place(n as u64);
        if n > 0 {
            // A slow upload that keeps making progress is not a stalled one.
            self.deadline = Some(now + self.t.header);
        }
        Some(r)
    }

    /// Whether the machine is reading a request (bytes should be read however many are
    /// buffered: a head or body is incomplete until they are).
    pub fn reading_request(&self) -> bool {
        matches!(self.inner, Inner::Idle | Inner::Head | Inner::Body { .. })
    }

    /// Consume what `buf` holds of the current request. `hold` pauses parsing further heads
    /// (the client is not reading its answers). Returns the next action, if any; call again
    /// after acting on it, while it returns one.
    pub fn feed(&mut self, buf: &mut Vec<u8>, now: Instant, hold: bool) -> Option<Action> {
        match &mut self.inner {
            Inner::Idle | Inner::Head => {
                if buf.is_empty() || hold {
                    return None;
                }
                match head::parse(buf) {
                    Ok(None) => {
                        if matches!(self.inner, Inner::Idle) {
                            self.inner = Inner::Head;
                            // A newcomer's head deadline runs from accept (set then).
                            if self.served {
                                self.deadline = Some(now + self.t.header);
                            }
                        }
                        None
                    }
                    Err(e) => {
                        self.closing(now);
                        Some(Action::Refuse(ApiError::from(e), None))
                    }
                    Ok(Some((h, n))) => {
                        buf.drain(..n);
                        self.served = true;
                        self.minor = h.minor;
                        Some(Action::Head(Box::new(h)))
                    }
                }
            }
            Inner::Body { reader, body, filled, limit, .. } => {
                let before = buf.len();
                // Nothing buffered (the body is being read in place): keep the zeroed room.
                let decoded = match buf.is_empty() {
                    true => Ok(0),
                    false => {
                        body.truncate(*filled);
                        let d = reader.decode(buf, body);
                        *filled = body.len();
                        d
                    }
                };
                match decoded {
                    Ok(n) => {
                        buf.drain(..n);
                    }
                    Err(e) => {
                        let err = ApiError::from_chunk(e, *limit);
                        let Inner::Body { head, .. } = std::mem::replace(&mut self.inner, Inner::Idle) else {
                            return None;
                        };
                        self.closing(now);
                        return Some(Action::Refuse(err, Some(head)));
                    }
                }
                if !reader.is_done() {
                    if buf.len() < before {
                        // A slow upload that keeps making progress is not a stalled one.
                        self.deadline = Some(now + self.t.header);
                    }
                    return None;
                }
                let Inner::Body { head, mut body, filled, .. } = std::mem::replace(&mut self.inner, Inner::Running)
                else {
                    return None;
                };
                body.truncate(filled);
                self.deadline = None;
                Some(Action::Dispatch(head, body))
            }
            Inner::Running | Inner::Upgraded | Inner::Closing => None,
        }
    }

    /// The request with `head` has a body to read (up to `limit` bytes when chunked; a declared
    /// length was checked against the limit by the router).
    pub fn read_body(&mut self, head: Box<Head>, limit: u64, now: Instant) {
        let framing = head.body.unwrap_or(Framing::None);
        // A declared length (at most `limit`, and within the body budget) is reserved at once:
        // growing by doubling would copy a large body several times on the loop.
        let body = match framing {
            Framing::Length(n) => Vec::with_capacity(n.min(limit) as usize),
            _ => Vec::new(),
        };
        let reader = BodyDecoder::new(framing, limit);
        self.deadline = Some(now + self.t.header);
        self.inner = Inner::Body { head, reader, body, filled: 0, limit };
    }

    /// The current request has been answered: wait for the next one, or close.
    pub fn answered(&mut self, close: bool, now: Instant) {
        if close {
            self.closing(now);
        } else {
            self.inner = Inner::Idle;
            self.deadline = Some(now + self.t.idle);
        }
    }

    /// A run owns the exchange; no timer runs meanwhile.
    pub fn start_run(&mut self) {
        self.inner = Inner::Running;
        self.deadline = None;
    }

    /// The connection was upgraded to WebSocket, which keeps its own timers.
    pub fn upgraded(&mut self) {
        self.inner = Inner::Upgraded;
        self.deadline = None;
    }

    /// Stop taking requests: flush what is queued, then close (within `linger`).
    pub fn closing(&mut self, now: Instant) {
        if !matches!(self.inner, Inner::Closing) || self.deadline.is_none() {
            self.deadline = Some(now + self.t.linger);
        }
        self.inner = Inner::Closing;
    }

    /// Fire the timer if it is due: a request that did not arrive in time gets 408, an idle or
    /// lingering connection is closed.
    pub fn on_timer(&mut self, now: Instant) -> Option<Action> {
        if self.deadline.is_none_or(|d| now < d) {
            return None;
        }
        match std::mem::replace(&mut self.inner, Inner::Closing) {
            Inner::Head => {
                self.deadline = Some(now + self.t.linger);
                Some(Action::Refuse(ApiError::timed_out(), None))
            }
            Inner::Body { head, .. } => {
                self.deadline = Some(now + self.t.linger);
                Some(Action::Refuse(ApiError::timed_out(), Some(head)))
            }
            Inner::Idle | Inner::Closing => {
                self.deadline = None;
                Some(Action::Close)
            }
            other => {
                // No timer runs in these states.
                self.inner = other;
                self.deadline = None;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts =
        Timeouts { header: Duration::from_secs(30), idle: Duration::from_secs(60), linger: Duration::from_secs(10) };

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn status(a: Option<Action>) -> u16 {
        match a {
            Some(Action::Refuse(e, _)) => e.status,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn head_of(c: &mut HttpConn, bytes: &[u8], now: Instant) -> Box<Head> {
        let mut buf = bytes.to_vec();
        match c.feed(&mut buf, now, false) {
            Some(Action::Head(h)) => h,
            other => panic!("expected a head, got {other:?}"),
        }
    }

    const GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn a_silent_newcomer_is_closed_at_the_head_timeout_counted_from_accept() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        assert_eq!(c.deadline(), Some(t0 + secs(30)));
        assert!(c.on_timer(t0 + secs(29)).is_none());
        assert!(matches!(c.on_timer(t0 + secs(30)), Some(Action::Close)));
    }

    #[test]
    fn a_newcomer_whose_idle_timeout_is_shorter_gets_that() {
        let t0 = Instant::now();
        let c = HttpConn::new(t0, Timeouts { idle: secs(5), ..T });
        assert_eq!(c.deadline(), Some(t0 + secs(5)));
    }

    #[test]
    fn a_newcomers_partial_head_keeps_the_deadline_from_accept() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        let mut buf = b"GET / HT".to_vec();
        assert!(c.feed(&mut buf, t0 + secs(20), false).is_none());
        assert_eq!(c.state(), State::Head);
        assert_eq!(c.deadline(), Some(t0 + secs(30)), "a trickle does not extend it");
        assert_eq!(status(c.on_timer(t0 + secs(30))), 408);
        assert_eq!(c.state(), State::Closing);
        assert_eq!(c.deadline(), Some(t0 + secs(40)), "then lingers");
        assert!(matches!(c.on_timer(t0 + secs(40)), Some(Action::Close)));
    }

    #[test]
    fn a_slow_head_on_a_kept_alive_connection_gets_408_after_the_header_timeout() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        head_of(&mut c, GET, t0);
        c.answered(false, t0 + secs(1));
        assert_eq!(c.deadline(), Some(t0 + secs(61)), "idle timeout");
        let mut buf = b"GET /healthz HTTP/1.1\r\n".to_vec();
        assert!(c.feed(&mut buf, t0 + secs(50), false).is_none());
        assert_eq!(c.deadline(), Some(t0 + secs(80)), "the head timer starts at its first byte");
        assert!(c.on_timer(t0 + secs(79)).is_none());
        assert_eq!(status(c.on_timer(t0 + secs(80))), 408);
    }

    #[test]
    fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        head_of(&mut c, GET, t0);
        c.answered(false, t0);
        assert!(c.on_timer(t0 + secs(59)).is_none());
        assert!(matches!(c.on_timer(t0 + secs(60)), Some(Action::Close)));
    }

    #[test]
    fn a_body_that_keeps_arriving_is_not_cut_but_a_stalled_one_gets_408() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        let h = head_of(&mut c, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n", t0);
        c.read_body(h, 100, t0);
        let mut buf = b"a".to_vec();
        for i in 1..=3u64 {
            // Each byte arrives 20 s after the last: never 30 s without progress.
            assert!(c.on_timer(t0 + secs(20 * i - 1)).is_none());
            assert!(c.feed(&mut buf, t0 + secs(20 * i), false).is_none());
            buf.push(b'b');
            buf.truncate(1);
        }
        assert_eq!(c.deadline(), Some(t0 + secs(90)));
        match c.on_timer(t0 + secs(90)) {
            Some(Action::Refuse(e, Some(h))) => {
                assert_eq!(e.status, 408);
                assert_eq!(h.method, "POST", "the request is known for the access log");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_complete_body_is_dispatched_and_no_timer_runs_during_the_run() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        let h =
            head_of(&mut c, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", t0);
        c.read_body(h, 100, t0);
        let mut buf = b"3\r\nabc\r\n0\r\n\r\nGET".to_vec();
        match c.feed(&mut buf, t0, false) {
            Some(Action::Dispatch(_, body)) => assert_eq!(body, b"abc"),
            other => panic!("{other:?}"),
        }
        assert_eq!(buf, b"GET", "pipelined bytes stay for the next request");
        c.start_run();
        assert_eq!((c.state(), c.deadline()), (State::Running, None));
        assert!(c.feed(&mut buf, t0, false).is_none(), "no parsing while a run owns the exchange");
        assert!(c.on_timer(t0 + secs(1000)).is_none());
        c.answered(false, t0 + secs(5));
        assert_eq!(c.deadline(), Some(t0 + secs(65)));
    }

    #[test]
    fn a_declared_body_is_read_in_place_and_dispatched_whole() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        let h = head_of(&mut c, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\n", t0);
        c.read_body(h, 100, t0);
        // What came with the head is taken from the buffer; the rest is read straight in.
        let mut buf = b"ab".to_vec();
        assert!(c.feed(&mut buf, t0, false).is_none());
        assert!(buf.is_empty());
        let r = c.read_body_in_place(3, t0 + secs(20), |b| {
            assert_eq!(b.len(), 3, "at most `max` bytes");
            b.copy_from_slice(b"cde");
            Ok(3)
        });
        assert_eq!(r.unwrap().unwrap(), 3);
        assert_eq!(c.deadline(), Some(t0 + secs(50)), "progress in place is progress");
        assert_eq!(c.body_len(), Some(5));
        assert!(c.feed(&mut buf, t0 + secs(20), false).is_none(), "one byte still to come");
        // A read that fails or finds nothing leaves the body as it was.
        let e = c.read_body_in_place(64, t0 + secs(21), |_| Err(std::io::ErrorKind::WouldBlock.into()));
        assert!(e.unwrap().is_err());
        assert_eq!(c.body_len(), Some(5));
        let r = c.read_body_in_place(64, t0 + secs(21), |b| {
            assert_eq!(b.len(), 1, "never past the declared length");
            b[0] = b'f';
            Ok(1)
        });
        assert_eq!(r.unwrap().unwrap(), 1);
        assert!(c.read_body_in_place(64, t0, |_| panic!("nothing left to read")).is_none());
        let mut next = b"GET".to_vec();
        match c.feed(&mut next, t0 + secs(21), false) {
            Some(Action::Dispatch(_, body)) => assert_eq!(body, b"abcdef"),
            other => panic!("{other:?}"),
        }
        assert_eq!(next, b"GET", "pipelined bytes stay for the next request");
        assert!(c.read_body_in_place(64, t0, |_| panic!("not reading a body")).is_none());
    }

    #[test]
    fn short_reads_in_place_keep_only_what_was_read() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        let h = head_of(&mut c, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n", t0);
        c.read_body(h, 100, t0);
        // A read that scribbles past what it reports: the room stays, the scribble is not body.
        let r = c.read_body_in_place(6, t0, |b| {
            assert_eq!(b.len(), 6);
            b.copy_from_slice(b"abZZZZ");
            Ok(2)
        });
        assert_eq!(r.unwrap().unwrap(), 2);
        assert_eq!(c.body_len(), Some(2));
        assert!(c.feed(&mut Vec::new(), t0, false).is_none(), "six bytes still to come");
        // The next read starts where the last one stopped, and a larger `max` grows the room.
        let r = c.read_body_in_place(64, t0, |b| {
            assert_eq!(b.len(), 6, "the rest of the declared length");
            assert_eq!(&b[..4], b"ZZZZ", "room already initialised is not written again");
            b[..3].copy_from_slice(b"cde");
            Ok(3)
        });
        assert_eq!(r.unwrap().unwrap(), 3);
        // Bytes that arrive buffered (after the head of a pipelined read) append after those.
        let mut buf = b"fghGET".to_vec();
        match c.feed(&mut buf, t0, false) {
            Some(Action::Dispatch(_, body)) => assert_eq!(body, b"abcdefgh"),
            other => panic!("{other:?}"),
        }
        assert_eq!(buf, b"GET");
    }

    #[test]
    fn a_chunked_body_over_the_limit_is_413_and_closes() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        let h =
            head_of(&mut c, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", t0);
        c.read_body(h, 2, t0);
        let mut buf = b"3\r\nabc\r\n".to_vec();
        assert_eq!(status(c.feed(&mut buf, t0, false)), 413);
        assert_eq!(c.state(), State::Closing);
        assert_eq!(c.deadline(), Some(t0 + secs(10)));
    }

    #[test]
    fn a_refused_head_is_answered_then_the_connection_lingers() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        let mut buf = b"GET / HTTP/1.1\nHost: x\n\n".to_vec();
        assert_eq!(status(c.feed(&mut buf, t0 + secs(1), false)), 400);
        assert_eq!((c.state(), c.deadline()), (State::Closing, Some(t0 + secs(11))));
    }

    #[test]
    fn heads_wait_while_answers_are_held_back() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        let mut buf = GET.to_vec();
        assert!(c.feed(&mut buf, t0, true).is_none());
        assert_eq!(buf.len(), GET.len());
        assert!(matches!(c.feed(&mut buf, t0, false), Some(Action::Head(_))));
        assert!(buf.is_empty());
    }

    #[test]
    fn an_upgraded_connection_has_no_http_timer() {
        let t0 = Instant::now();
        let mut c = HttpConn::new(t0, T);
        head_of(&mut c, GET, t0);
        c.upgraded();
        assert_eq!(c.deadline(), None);
        assert!(c.on_timer(t0 + secs(1000)).is_none());
        assert_eq!(c.state(), State::Upgraded);
    }
}
