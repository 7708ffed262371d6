//! One RFC 6455 connection after the handshake, without sockets or clocks: bytes and `now` in,
//! messages out, frames to send appended to the caller's buffer.
//!
//! It answers pings (§5.5.2), runs the close handshake (§5.5.1, §7.1: the peer's close is
//! echoed with its code and the connection is then closed by us, the server, first), fails the
//! connection on any protocol error with the close code the error names (§7.1.7), enforces the
//! message size limit while the message streams in, and times out a close handshake the peer
//! never finishes ([`Conn::deadline`] / [`Conn::on_timer`]). What a message means is up to the
//! caller: the gateway protocol (`rpc::session`) or an echo server (`examples/ws_echo.rs`).

use std::time::{Duration, Instant};

use super::frame::{self, Decoder, Message, OpCode};

/// The gateway's largest message once a client is authenticated (SPEC §8).
pub const MAX_MESSAGE: usize = 25 * 1024 * 1024;
/// How long to wait for the peer's close frame after sending ours.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the peer sent that the caller must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A complete, UTF-8-validated text message.
    Text(String),
    /// A complete binary message.
    Binary(Vec<u8>),
    /// A ping, already answered with a pong.
    Ping,
    /// An unsolicited or answering pong (ignored, §5.5.3).
    Pong,
    /// The peer closed (with this code, if it sent one); our echo is queued and the connection
    /// is now closed: flush the output, then close the socket.
    Closed(Option<u16>),
    /// The peer broke the protocol: a close frame with `code` is queued and the connection is
    /// closing (waiting for the peer's close frame, at most [`CLOSE_TIMEOUT`]).
    Failed {
        /// The close code sent (1002, 1007 or 1009).
        code: u16,
        /// What was wrong.
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    /// Our close frame is sent; the peer's is awaited until the deadline.
    Closing(Instant),
    Closed,
}

/// One connection's RFC 6455 state.
#[derive(Debug)]
pub struct Conn {
    decoder: Decoder,
    state: State,
    close_timeout: Duration,
}

impl Conn {
    /// A connection accepting messages of at most `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Conn { decoder: Decoder::new(max_message), state: State::Open, close_timeout: CLOSE_TIMEOUT }
    }

    /// Change the message limit (the gateway raises it once a client has authenticated).
    pub fn set_max_message(&mut self, max: usize) {
        self.decoder.set_max_message(max);
    }

    /// Whether messages may still be sent and received.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Whether the connection is over: flush what is queued, then close the socket.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// When [`Conn::on_timer`] next has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Closing(d) => Some(d),
            _ => None,
        }
    }

    /// A close handshake the peer did not finish in time ends the connection.
    pub fn on_timer(&mut self, now: Instant) {
        if let State::Closing(d) = self.state
            && now >= d
        {
            self.state = State::Closed;
        }
    }

    /// The socket reached end of file or failed: nothing more can be sent.
    pub fn on_eof(&mut self) {
        self.state = State::Closed;
    }

    /// Consume bytes from `input` until one event happens or more bytes are needed. Returns the
    /// bytes consumed and the event; call again with the rest while it returns one. Frames to
    /// send (pongs, close frames) are appended to `out`.
    pub fn feed(&mut self, input: &[u8], now: Instant, out: &mut Vec<u8>) -> (usize, Option<Incoming>) {
        let mut pos = 0;
        while self.state != State::Closed {
            let (n, msg) = match self.decoder.decode(&input[pos..]) {
                Ok(r) => r,
                Err(e) => {
                    pos = input.len();
                    if self.state != State::Open {
                        // Already closing: nothing left to tell the peer.
                        self.state = State::Closed;
                        return (pos, None);
                    }
                    let (code, reason) = (e.close_code(), e.to_string());
                    self.close(out, code, &reason, now);
                    return (pos, Some(Incoming::Failed { code, reason }));
                }
            };
            pos += n;
            let Some(msg) = msg else { return (pos, None) };
            if self.state != State::Open {
                // After our close frame only the peer's close matters (§5.5.1).
                if let Message::Close(_) = msg {
                    self.state = State::Closed;
                }
                continue;
            }
            let ev = match msg {
                Message::Text(t) => Incoming::Text(t),
                Message::Binary(b) => Incoming::Binary(b),
                Message::Ping(p) => {
                    frame::encode(out, OpCode::Pong, &p);
                    Incoming::Ping
                }
                Message::Pong(_) => Incoming::Pong,
                Message::Close(c) => {
                    // Echo the peer's code (§5.5.1); the server then closes the TCP connection
                    // first (§7.1.1).
                    let code = c.map(|c| c.code);
                    frame::encode_close(out, code, "");
                    self.state = State::Closed;
                    Incoming::Closed(code)
                }
            };
            return (pos, Some(ev));
        }
        (input.len(), None)
    }

    /// Queue a text message. Ignored unless the connection is open.
    pub fn send_text(&mut self, out: &mut Vec<u8>, text: &str) {
        if self.is_open() {
            frame::encode(out, OpCode::Text, text.as_bytes());
        }
    }

    /// Queue a binary message. Ignored unless the connection is open.
    pub fn send_binary(&mut self, out: &mut Vec<u8>, data: &[u8]) {
        if self.is_open() {
            frame::encode(out, OpCode::Binary, data);
        }
    }

    /// Start the close handshake with `code` and `reason` (§7.1.2); the peer's close frame is
    /// awaited until `now` + [`CLOSE_TIMEOUT`]. Ignored unless the connection is open.
    pub fn close(&mut self, out: &mut Vec<u8>, code: u16, reason: &str, now: Instant) {
        if self.is_open() {
            frame::encode_close(out, Some(code), reason);
            self.state = State::Closing(now + self.close_timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::{close, encode_masked, parse_header};

    fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_masked(&mut v, if fin { 0x80 } else { 0 } | op, payload, [9, 8, 7, 6]);
        v
    }

    /// Feed everything; collect events.
    fn drive(c: &mut Conn, input: &[u8], now: Instant, out: &mut Vec<u8>) -> Vec<Incoming> {
        let mut pos = 0;
        let mut ev = Vec::new();
        loop {
            let (n, e) = c.feed(&input[pos..], now, out);
            pos += n;
            match e {
                Some(e) => ev.push(e),
                None => return ev,
            }
        }
    }

    /// Server frames as (opcode, payload).
    fn frames(out: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        let mut pos = 0;
        while pos < out.len() {
            let (h, n) = parse_header(&out[pos..]).unwrap().unwrap();
            assert!(h.mask.is_none() && h.fin);
            v.push((h.opcode, out[pos + n..pos + n + h.len as usize].to_vec()));
            pos += n + h.len as usize;
        }
        v
    }

    #[test]
    fn messages_pings_and_the_peers_close() {
        let t = Instant::now();
        let mut c = Conn::new(1 << 20);
        let mut out = Vec::new();
        let mut input = frame(false, 1, b"hel");
        input.extend(frame(true, 9, b"p"));
        input.extend(frame(true, 0, b"lo"));
        input.extend(frame(true, 2, &[0, 1]));
        input.extend(frame(true, 10, b""));
        input.extend(frame(true, 8, &1000u16.to_be_bytes()));
        input.extend(frame(true, 1, b"after close"));
        let ev = drive(&mut c, &input, t, &mut out);
        assert_eq!(
            ev,
            vec![
                Incoming::Ping,
                Incoming::Text("hello".into()),
                Incoming::Binary(vec![0, 1]),
                Incoming::Pong,
                Incoming::Closed(Some(1000)),
            ]
        );
        assert_eq!(frames(&out), vec![(0xA, b"p".to_vec()), (0x8, 1000u16.to_be_bytes().to_vec())]);
        assert!(c.is_closed());
        // Nothing is sent once closed.
        out.clear();
        c.send_text(&mut out, "x");
        assert!(out.is_empty());
    }

    #[test]
    fn an_empty_close_is_echoed_empty() {
        let mut c = Conn::new(10);
        let mut out = Vec::new();
        assert_eq!(drive(&mut c, &frame(true, 8, b""), Instant::now(), &mut out), vec![Incoming::Closed(None)]);
        assert_eq!(frames(&out), vec![(0x8, vec![])]);
    }

    #[test]
    fn protocol_errors_fail_with_their_code_then_wait_for_the_close() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (frame(true, 1, &[0xff]), close::INVALID_DATA),
            (frame(true, 2, &[0; 11]), close::TOO_BIG),
            (frame(true, 3, b""), close::PROTOCOL),
            (vec![0x81, 0x00], close::PROTOCOL),
        ];
        for (bytes, code) in cases {
            let t = Instant::now();
            let mut c = Conn::new(10);
            let mut out = Vec::new();
            let ev = drive(&mut c, &bytes, t, &mut out);
            assert!(matches!(&ev[..], [Incoming::Failed { code: c, .. }] if *c == code), "{ev:?}");
            assert_eq!(frames(&out)[0].0, 0x8);
            assert_eq!(u16::from_be_bytes([frames(&out)[0].1[0], frames(&out)[0].1[1]]), code);
            assert!(!c.is_open() && !c.is_closed());
            assert_eq!(c.deadline(), Some(t + CLOSE_TIMEOUT));
            // Data while closing is discarded; the peer's close ends it.
            out.clear();
            let mut more = frame(true, 1, b"late");
            more.extend(frame(true, 8, &code.to_be_bytes()));
            assert_eq!(drive(&mut c, &more, t, &mut out), vec![]);
            assert!(out.is_empty());
            assert!(c.is_closed());
        }
    }

    #[test]
    fn the_rest_of_a_failed_message_then_the_close() {
        // Invalid UTF-8 completing a code point left open by the first fragment; the peer sends
        // the rest of its message before it reads our close (found by the `ws_conn` fuzz target).
        let t = Instant::now();
        let mut c = Conn::new(1 << 20);
        let mut out = Vec::new();
        let mut first = frame(false, 1, b"a\xf0\x90\x80");
        first.extend(frame(false, 0, b"A"));
        let ev = drive(&mut c, &first, t, &mut out);
        assert!(matches!(&ev[..], [Incoming::Failed { code: 1007, .. }]), "{ev:?}");
        // The broken message was dropped: its next fragment continues nothing, which ends the
        // wait for the peer's close.
        out.clear();
        assert_eq!(drive(&mut c, &frame(false, 0, b"B"), t, &mut out), vec![]);
        assert!(c.is_closed() && out.is_empty());
    }

    #[test]
    fn close_handshake_times_out() {
        let t = Instant::now();
        let mut c = Conn::new(10);
        let mut out = Vec::new();
        c.close(&mut out, close::GOING_AWAY, "bye", t);
        assert_eq!(frames(&out)[0].1, [&1001u16.to_be_bytes()[..], b"bye"].concat());
        c.on_timer(t + CLOSE_TIMEOUT - Duration::from_millis(1));
        assert!(!c.is_closed());
        c.on_timer(t + CLOSE_TIMEOUT);
        assert!(c.is_closed());
        assert_eq!(c.deadline(), None);
        // A second close is not sent.
        out.clear();
        c.close(&mut out, 1000, "", t);
        assert!(out.is_empty());
    }

    #[test]
    fn garbage_while_closing_just_closes() {
        let t = Instant::now();
        let mut c = Conn::new(10);
        let mut out = Vec::new();
        c.close(&mut out, 1000, "", t);
        out.clear();
        assert_eq!(drive(&mut c, &[0x83, 0x80, 0, 0, 0, 0], t, &mut out), vec![]);
        assert!(c.is_closed() && out.is_empty());
    }

    #[test]
    fn limit_can_be_raised() {
        let mut c = Conn::new(4);
        c.set_max_message(8);
        let mut out = Vec::new();
        let ev = drive(&mut c, &frame(true, 2, &[1; 8]), Instant::now(), &mut out);
        assert_eq!(ev, vec![Incoming::Binary(vec![1; 8])]);
    }
}
