//! A test-only RFC 6455 client over a raw socket: a masked-frame builder that can set any bit
//! (bad RSV bits, reserved opcodes, fragmented control frames, unmasked frames), and a reader
//! that checks every server frame is unmasked.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::{Gateway, TOKEN};

pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CONT: u8 = 0x0;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

const KEY: [u8; 4] = [0x5a, 0x13, 0xc7, 0x81];

/// A frame with first byte `b0` (FIN, RSV, opcode) and `payload`, masked when `masked`.
pub fn frame_raw(b0: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let m = if masked { 0x80 } else { 0 };
    let mut v = vec![b0];
    let n = payload.len();
    if n < 126 {
        v.push(m | n as u8);
    } else if n <= 0xffff {
        v.push(m | 126);
        v.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        v.push(m | 127);
        v.extend_from_slice(&(n as u64).to_be_bytes());
    }
    if masked {
        v.extend_from_slice(&KEY);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    } else {
        v.extend_from_slice(payload);
    }
    v
}

/// A masked frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_raw(if fin { 0x80 } else { 0 } | opcode, payload, true)
}

/// A masked close frame with `code` and `reason`.
pub fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    frame(true, CLOSE, &p)
}

/// A masked text frame holding a request.
pub fn req_frame(id: &str, method: &str, params: Value) -> Vec<u8> {
    let v = json!({ "type": "req", "id": id, "method": method, "params": params });
    frame(true, TEXT, v.to_string().as_bytes())
}

/// The `connect` params for `token`.
pub fn connect_params(token: &str) -> Value {
    json!({
        "minProtocol": 3, "maxProtocol": 3,
        "client": { "id": "gatelet-tests", "version": "1.0.0", "platform": "linux", "mode": "test" },
        "auth": { "token": token },
    })
}

/// The upgrade request for `key`.
pub fn upgrade_request(extra: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a close frame (`None` for an empty body).
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, CLOSE, "not a close frame: {self:?}");
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
    pub fn json(&self) -> Value {
        assert_eq!(self.opcode, TEXT, "not a text frame: {self:?}");
        serde_json::from_slice(&self.payload).unwrap()
    }
}

/// A raw WebSocket client connection.
pub struct Ws {
    pub s: TcpStream,
    pub buf: Vec<u8>,
    /// Events read while looking for something else.
    pub events: Vec<Value>,
    /// Responses read while looking for something else.
    pub stash: Vec<Value>,
}

impl Ws {
    /// Connect and complete the HTTP upgrade; panics unless the answer is 101.
    pub fn open(gw: &Gateway) -> Ws {
        let mut s = gw.connect();
        s.write_all(upgrade_request("").as_bytes()).unwrap();
        let mut ws = Ws { s, buf: Vec::new(), events: Vec::new(), stash: Vec::new() };
        let head = ws.read_until(b"\r\n\r\n").expect("upgrade response");
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{head}");
        ws
    }

    /// Open, read the challenge, and `connect` with the test token; returns hello-ok's payload.
    pub fn connected(gw: &Gateway) -> Ws {
        let mut ws = Ws::open(gw);
        let ch = ws.read_frame().unwrap().json();
        assert_eq!(ch["event"], "connect.challenge", "{ch}");
        ws.send(&req_frame("c1", "connect", connect_params(TOKEN)));
        let hello = ws.read_frame().unwrap().json();
        assert_eq!(hello["ok"], true, "{hello}");
        assert_eq!(hello["payload"]["type"], "hello-ok", "{hello}");
        ws
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).unwrap();
    }

    /// Send bytes one at a time with a flush in between (Nagle is off on the test socket).
    pub fn send_slowly(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn request(&mut self, id: &str, method: &str, params: Value) {
        self.send(&req_frame(id, method, params));
    }

    fn fill(&mut self) -> Option<()> {
        let mut tmp = [0u8; 65536];
        match self.s.read(&mut tmp) {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Some(())
            }
        }
    }

    /// The HTTP response head (through the blank line).
    pub fn read_head(&mut self) -> String {
        String::from_utf8(self.read_until(b"\r\n\r\n").expect("a response head")).unwrap()
    }

    fn read_until(&mut self, pat: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(pat.len()).position(|w| w == pat) {
                return Some(self.buf.drain(..i + pat.len()).collect());
            }
            self.fill()?;
        }
    }

    fn need(&mut self, n: usize) -> Option<()> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Some(())
    }

    /// The next frame, `None` on EOF. Asserts the server never masks (RFC 6455 §5.1) and never
    /// sets RSV bits.
    pub fn read_frame(&mut self) -> Option<Frame> {
        self.need(2)?;
        let (b0, b1) = (self.buf[0], self.buf[1]);
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        assert_eq!(b0 & 0x70, 0, "server frames must not set RSV bits");
        let (len, hl) = match b1 & 0x7f {
            126 => {
                self.need(4)?;
                (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
            }
            127 => {
                self.need(10)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(&self.buf[2..10]);
                (u64::from_be_bytes(a) as usize, 10)
            }
            n => (n as usize, 2),
        };
        self.need(hl + len)?;
        let payload = self.buf[hl..hl + len].to_vec();
        self.buf.drain(..hl + len);
        Some(Frame { fin: b0 & 0x80 != 0, opcode: b0 & 0x0f, payload })
    }

    /// Read until a close frame; returns its code. Panics on EOF before one.
    pub fn expect_close(&mut self) -> Option<u16> {
        loop {
            let f = self.read_frame().expect("a close frame before EOF");
            if f.opcode == CLOSE {
                return f.close_code();
            }
        }
    }

    /// Read until a close frame, answer it as a client does (RFC 6455 §5.5.1), then check the
    /// server closes the TCP connection.
    pub fn expect_close_then_eof(&mut self) -> Option<u16> {
        let code = self.expect_close();
        let _ = self.s.write_all(&close_frame(code.unwrap_or(1000), b""));
        assert!(self.eof_within(Duration::from_secs(5)), "the server should close the TCP connection");
        code
    }

    /// Whether the server closes the connection within `d` (any further frames are ignored).
    pub fn eof_within(&mut self, d: Duration) -> bool {
        let end = Instant::now() + d;
        self.s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut tmp = [0u8; 65536];
        while Instant::now() < end {
            match self.s.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    }

    /// The next JSON frame that is not an event (events are kept in `self.events`).
    pub fn next_res(&mut self) -> Value {
        if !self.stash.is_empty() {
            return self.stash.remove(0);
        }
        loop {
            let v = self.next_json();
            if v["type"] == "event" {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    fn next_json(&mut self) -> Value {
        let f = self.read_frame().expect("a frame");
        assert_eq!(f.opcode, TEXT, "expected a text frame, got {f:?}");
        f.json()
    }

    /// The next response to request `id` (other responses are stashed, events kept).
    pub fn res_for(&mut self, id: &str) -> Value {
        if let Some(i) = self.stash.iter().position(|v| v["id"] == id) {
            return self.stash.remove(i);
        }
        loop {
            let v = self.next_json();
            if v["type"] == "event" {
                self.events.push(v);
            } else if v["id"] == id {
                return v;
            } else {
                self.stash.push(v);
            }
        }
    }

    /// Read until an event matching `f` has arrived (it may already have); returns it.
    pub fn until_event(&mut self, f: impl Fn(&Value) -> bool) -> Value {
        if let Some(e) = self.events.iter().find(|e| f(e)) {
            return e.clone();
        }
        loop {
            let v = self.next_json();
            if v["type"] == "event" {
                self.events.push(v.clone());
                if f(&v) {
                    return v;
                }
            } else {
                self.stash.push(v);
            }
        }
    }

    /// A request and its (first) answer.
    pub fn call(&mut self, id: &str, method: &str, params: Value) -> Value {
        self.request(id, method, params);
        self.res_for(id)
    }
}
