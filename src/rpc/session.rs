//! One WebSocket connection on the event loop: the frame codec below, the gateway protocol
//! (SPEC §8) above.
//!
//! Bytes in → frames out (into the loop's write buffer). The RFC 6455 layer (UTF-8 validation,
//! pings, the close handshake, limits) is [`Conn`]; its text messages are not parsed here but
//! handed, in order, to the connection's lane, whose request worker parses and answers them (see
//! `rpc::lane`). What the workers and runs post comes back as [`Outgoing`] messages through the
//! loop. On top of the codec the states are: waiting for `connect` (10 s, 64 KiB messages, one
//! message at a time: nothing further is decoded until the worker has answered it) and open
//! (25 MiB messages, `tick` every 30 s).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::lane::{Item, Lane};
use super::protocol;
use super::{Outbox, Outgoing};
use crate::gateway::Gateway;
use crate::util::{now_ms, random_hex, secure_hex};
use crate::ws::conn::{self, Conn, Incoming};
use crate::ws::frame::{self, OpCode, close};

/// Largest message before `connect` succeeds (SPEC §8: over → 1009).
pub const PRE_AUTH_MAX_PAYLOAD: usize = 64 * 1024;
/// Largest message after `connect`.
pub const MAX_PAYLOAD: usize = conn::MAX_MESSAGE;
/// Unsent bytes a connection may hold before it is closed with 1008 as a slow consumer.
pub const MAX_BUFFERED: usize = 8 * 1024 * 1024;
/// Unsent bytes above which no further client message is handled until the peer reads some:
/// its requests and pings then wait in the socket, and TCP holds it back.
pub const PAUSE_OUTPUT: usize = 64 * 1024;
pub use super::lane::{INBOX_BYTES, INBOX_MESSAGES};
/// Time allowed for the `connect` request.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `tick` interval.
pub const TICK_INTERVAL: Duration = Duration::from_secs(30);
pub use crate::ws::conn::CLOSE_TIMEOUT;

/// Methods answered after `connect`.
pub const METHODS: &[&str] = &[
    "health",
    "status",
    "models.list",
    "agents.list",
    "agent",
    "agent.wait",
    "chat.send",
    "chat.abort",
    "chat.history",
    "sessions.list",
    "sessions.reset",
    "sessions.delete",
];
/// Events the server sends.
pub const EVENTS: &[&str] = &["connect.challenge", "agent", "chat", "tick", "shutdown"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitConnect,
    Open,
}

/// One WebSocket connection's protocol state.
#[derive(Debug)]
pub struct Session {
    /// The connection's queue to the request workers, and what it shares with them.
    lane: Arc<Lane>,
    state: State,
    conn: Conn,
    seq: u64,
    deadline: Instant,
    next_tick: Option<Instant>,
    /// A message whose answer decides what comes next (`connect`, a binary message) is with the
    /// workers: nothing further is decoded until it is answered.
    held: bool,
    /// The close frame for a connection that failed or that the peer closed while requests
    /// before it were still with the workers: sent after their answers
    /// ([`Outgoing::Drained`]), as it would have been had they been answered at once.
    close_after: Option<Vec<u8>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.lane.close();
    }
}

fn send_text(out: &mut Vec<u8>, text: &str) {
    frame::encode(out, OpCode::Text, text.as_bytes());
}

impl Session {
    /// A new session for connection `id` from `ip`, right after the handshake response: queues
    /// `connect.challenge`. Messages from other threads reach the connection through `outbox`.
    pub fn new(
        outbox: Arc<dyn Outbox>,
        gw: Arc<Gateway>,
        ip: IpAddr,
        id: u64,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Self {
        let mut s = Session {
            lane: Arc::new(Lane::new(outbox, gw, ip, id)),
            state: State::AwaitConnect,
            conn: Conn::new(PRE_AUTH_MAX_PAYLOAD),
            seq: 0,
            deadline: now + HANDSHAKE_TIMEOUT,
            next_tick: None,
            held: false,
            close_after: None,
        };
        let payload = json!({ "nonce": challenge_nonce(), "ts": now_ms() });
        s.event(out, "connect.challenge", &payload.to_string());
        s
    }

    /// Consume client bytes, queueing frames to send in `out` and messages for the request
    /// workers. Returns bytes consumed, which is less than `input` while `out` holds more than
    /// [`PAUSE_OUTPUT`] bytes or the lane is full (see [`INBOX_BYTES`]).
    pub fn on_bytes(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let now = Instant::now();
        let mut pos = 0;
        // Once closing, only the peer's close frame matters and it is always taken.
        while pos < input.len()
            && out.len() < PAUSE_OUTPUT
            && !self.conn.is_closed()
            && self.close_after.is_none()
            && (!self.conn.is_open() || !self.held && !self.lane.full())
        {
            let mark = out.len();
            let (n, ev) = self.conn.feed(&input[pos..], now, out);
            pos += n;
            let Some(ev) = ev else { break };
            match ev {
                Incoming::Ping | Incoming::Pong => {}
                Incoming::Closed(_) | Incoming::Failed { .. } => {
                    if let Incoming::Failed { reason, .. } = ev {
                        crate::log!(Debug, "ws #{}: failing connection: {reason}", self.lane.conn_id);
                    }
                    // The close frame waits for the answers to what came before it (a worker
                    // may have posted them without the loop having taken them yet).
                    if self.lane.push(Item::Mark) {
                        self.close_after = Some(out.split_off(mark));
                    }
                }
                Incoming::Binary(_) => {
                    // Answered with a close after the requests before it.
                    self.held = self.lane.push(Item::Binary { open: self.state == State::Open });
                }
                Incoming::Text(t) if self.state == State::Open => {
                    self.lane.push(Item::Request(t));
                }
                Incoming::Text(t) => self.held = self.lane.push(Item::Connect(t)),
            }
        }
        if self.conn.is_closed() { input.len() } else { pos }
    }

    /// A message from a request worker, a run or a waiter.
    pub fn outgoing(&mut self, msg: Outgoing, out: &mut Vec<u8>) {
        match msg {
            Outgoing::RunEnded { run_id } => {
                self.lane.lock().runs.remove(&run_id);
                return;
            }
            // The loop reads on and re-arms the timer after any message.
            Outgoing::Wake => return,
            Outgoing::Drained => {
                if let Some(c) = self.close_after.take() {
                    out.extend_from_slice(&c);
                }
                self.lane.close();
                return;
            }
            Outgoing::Close { res, code, reason } => {
                self.held = false;
                if self.answering() {
                    if let Some(r) = res {
                        send_text(out, &r);
                    }
                    self.fail(out, code, &reason, Instant::now());
                }
                return;
            }
            Outgoing::Connected { hello } => {
                self.held = false;
                if self.state == State::AwaitConnect && self.answering() {
                    self.state = State::Open;
                    self.conn.set_max_message(MAX_PAYLOAD);
                    self.next_tick = Some(Instant::now() + TICK_INTERVAL);
                    send_text(out, &hello);
                }
                return;
            }
            Outgoing::Res(_) | Outgoing::Event { .. } => {}
        }
        if self.state != State::Open || !self.answering() {
            return;
        }
        if out.len() > MAX_BUFFERED {
            crate::log!(Debug, "ws: closing a slow consumer with {} bytes unsent", out.len());
            return self.fail(out, close::POLICY, "slow consumer: too much unsent data", Instant::now());
        }
        match msg {
            Outgoing::Res(text) => send_text(out, &text),
            Outgoing::Event { name, payload } => self.event(out, name, &payload),
            _ => {}
        }
    }

    /// Timers: the handshake deadline, ticks, `agent.wait` timeouts, the closing handshake.
    pub fn on_timer(&mut self, now: Instant, out: &mut Vec<u8>) {
        self.conn.on_timer(now);
        if !self.conn.is_open() {
            return;
        }
        match self.state {
            State::AwaitConnect if now >= self.deadline => {
                self.fail(out, close::POLICY, "connect timeout", now);
            }
            State::Open => {
                if self.next_tick.is_some_and(|t| now >= t) {
                    self.next_tick = Some(now + TICK_INTERVAL);
                    self.event(out, "tick", &json!({ "ts": now_ms() }).to_string());
                }
                let expired: Vec<_> = {
                    let mut s = self.lane.lock();
                    let (due, keep) =
                        std::mem::take(&mut s.waits).into_iter().partition(|w| w.deadline.is_some_and(|d| now >= d));
                    s.waits = keep;
                    due
                };
                for w in expired {
                    let p = json!({ "runId": w.run_id, "status": "timeout" });
                    send_text(out, &protocol::res_ok(&w.req_id, &p));
                }
            }
            _ => {}
        }
    }

    /// When [`Session::on_timer`] next has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.conn.is_open() {
            return self.conn.deadline();
        }
        let connect = (self.state == State::AwaitConnect).then_some(self.deadline);
        let waits = self.lane.lock().waits.iter().filter_map(|w| w.deadline).min();
        connect.into_iter().chain(self.next_tick).chain(waits).min()
    }

    /// The peer has sent everything it will: nothing more is read. Requests it sent before are
    /// still answered (and a close frame it sent, echoed after them); then the connection is
    /// closed ([`Session::is_closed`]) and its runs aborted. Called again while that happens,
    /// it does nothing more.
    pub fn on_eof(&mut self) {
        if self.conn.is_closed() && self.close_after.is_none() {
            self.lane.close();
            return;
        }
        let closing = !self.conn.is_open();
        self.conn.on_eof();
        if self.close_after.is_none() && !closing && self.lane.push(Item::Mark) {
            self.close_after = Some(Vec::new());
        }
    }

    /// The gateway is stopping: queue the `shutdown` event and a 1001 close.
    pub fn on_shutdown(&mut self, out: &mut Vec<u8>) {
        if self.state == State::Open && self.conn.is_open() {
            let p = json!({ "reason": "gateway stopping", "restartExpectedMs": Value::Null });
            self.event(out, "shutdown", &p.to_string());
        }
        self.fail(out, close::GOING_AWAY, "gateway stopping", Instant::now());
    }

    /// Whether the connection should close once `out` is flushed.
    pub fn is_closed(&self) -> bool {
        self.conn.is_closed() && self.close_after.is_none()
    }

    /// Whether answers may still be sent: the connection is open, or closing once the answers
    /// to what came before its close have been.
    fn answering(&self) -> bool {
        self.conn.is_open() || self.close_after.is_some()
    }

    fn event(&mut self, out: &mut Vec<u8>, name: &str, payload: &str) {
        self.seq += 1;
        send_text(out, &protocol::event(name, payload, self.seq));
    }

    /// Send a close frame and wait (briefly) for the peer's; queued requests are dropped and
    /// runs aborted now.
    fn fail(&mut self, out: &mut Vec<u8>, code: u16, reason: &str, now: Instant) {
        // A close frame already waiting goes now, and this one is not sent.
        if let Some(c) = self.close_after.take() {
            out.extend_from_slice(&c);
        }
        self.conn.close(out, code, reason, now);
        self.lane.close();
    }
}

/// The `connect.challenge` nonce: 16 bytes from the operating system's cryptographic source.
/// Without one (no `/dev/urandom`, e.g. a bare chroot) the nonce comes from the per-thread id
/// generator, which is not unpredictable; that is logged once.
fn challenge_nonce() -> String {
    static WARNED: std::sync::Once = std::sync::Once::new();
    secure_hex(16).unwrap_or_else(|| {
        WARNED.call_once(|| {
            crate::log!(Warn, "/dev/urandom is unreadable: WebSocket challenge nonces are not cryptographically random")
        });
        random_hex(32)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::CancelToken;

    /// An outbox that keeps nothing: these tests drive the session from the loop's side only.
    #[derive(Debug)]
    struct Nowhere;

    impl Outbox for Nowhere {
        fn post(&self, _: Outgoing) {}
        fn congested(&self) -> bool {
            false
        }
    }

    fn outbox() -> Arc<dyn Outbox> {
        Arc::new(Nowhere)
    }

    fn gateway() -> Arc<Gateway> {
        let text = "{ gateway: { auth: { token: 't' } }, session: { persist: false } }";
        let cfg = crate::config::parse(text, None, std::env::temp_dir(), &Default::default(), &|_| None).unwrap();
        Arc::new(Gateway::new(cfg).0)
    }

    /// An outbox that hands what is posted to the test, as the loop's channel would.
    #[derive(Debug)]
    struct Chan(std::sync::Mutex<std::sync::mpsc::Sender<Outgoing>>);

    impl Outbox for Chan {
        fn post(&self, msg: Outgoing) {
            let _ = self.0.lock().unwrap().send(msg);
        }
        fn congested(&self) -> bool {
            false
        }
    }

    fn session(ob: Arc<dyn Outbox>, now: Instant, out: &mut Vec<u8>) -> Session {
        Session::new(ob, gateway(), IpAddr::from([127, 0, 0, 1]), 1, now, out)
    }

    /// A masked client text frame.
    fn client_text(payload: &str) -> Vec<u8> {
        let mut v = Vec::new();
        frame::encode_masked(&mut v, 0x81, payload.as_bytes(), [1, 2, 3, 4]);
        v
    }

    const CONNECT: &str = r#"{"type":"req","id":"c","method":"connect","params":{"minProtocol":3,"maxProtocol":3,
        "client":{"id":"t","version":"1","platform":"test","mode":"test"},"auth":{"token":"t"}}}"#;

    /// Plays the event loop for `s`: feeds `input` as far as the session takes it, hands it what
    /// the workers post, and "writes" its output. Returns the `res` frames' ids in the order
    /// they were sent, once `want` have been, and the largest number of bytes the session took
    /// from one call.
    fn play(
        s: &mut Session,
        rx: &std::sync::mpsc::Receiver<Outgoing>,
        input: &[u8],
        want: usize,
    ) -> (Vec<String>, usize) {
        let (mut pos, mut ids, mut most, mut out) = (0, Vec::new(), 0, Vec::new());
        loop {
            let n = s.on_bytes(&input[pos..], &mut out);
            pos += n;
            most = most.max(n);
            for (op, p) in frames(&out) {
                let v: Value = serde_json::from_slice(&p).unwrap_or_default();
                if op == 1 && v["type"] == "res" {
                    ids.push(v["id"].as_str().unwrap_or_default().to_string());
                }
            }
            out.clear();
            if ids.len() >= want {
                return (ids, most);
            }
            let msg = rx.recv_timeout(Duration::from_secs(120)).expect("the request workers never answered");
            s.outgoing(msg, &mut out);
            while let Ok(msg) = rx.try_recv() {
                s.outgoing(msg, &mut out);
            }
        }
    }

    #[test]
    fn no_request_is_parsed_on_the_loop_and_a_pipelined_flood_keeps_its_order() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut out = Vec::new();
        let mut s = session(Arc::new(Chan(std::sync::Mutex::new(tx))), Instant::now(), &mut out);
        let before = protocol::PARSED_HERE.with(|n| n.get());
        // `connect` and a request right behind it: the request waits for the answer to connect.
        let mut input = client_text(CONNECT);
        let first = input.len();
        input.extend(client_text(r#"{"type":"req","id":"h","method":"health"}"#));
        assert_eq!(s.on_bytes(&input, &mut out), first, "nothing is decoded while connect is being answered");
        let (ids, _) = play(&mut s, &rx, &input[first..], 2);
        assert_eq!(ids, ["c", "h"]);
        assert_eq!(s.state, State::Open);
        // A flood of small requests, with large ones and bad ones among them.
        let pad = "x".repeat(INBOX_BYTES);
        let mut input = Vec::new();
        let mut want = Vec::new();
        for i in 0..3000 {
            let id = format!("r{i}");
            let text = match i % 500 {
                7 => format!(r#"{{"type":"req","id":"{id}","method":"health","params":{{"pad":"{pad}"}}}}"#),
                8 => format!(r#"{{"type":"req","id":"{id}","method":"no.such.method"}}"#),
                9 => format!(r#"{{"type":"req","id":"{id}","method":"health","params":"#),
                10 => format!(r#"{{"type":"req","id":"{id}","method":"models.list"}}"#),
                _ => format!(r#"{{"type":"req","id":"{id}","method":"health"}}"#),
            };
            input.extend(client_text(&text));
            // Unparseable JSON is answered without an id.
            want.push(if i % 500 == 9 { String::new() } else { id });
        }
        let (ids, most) = play(&mut s, &rx, &input, want.len());
        assert_eq!(ids, want, "answers in request order");
        assert!(most < input.len() / 4, "the loop holds back while the lane is full (took {most} bytes at once)");
        assert_eq!(protocol::PARSED_HERE.with(|n| n.get()), before, "a request was parsed on the loop's thread");
    }

    #[test]
    fn requests_before_the_end_of_input_are_answered_then_the_connection_closes() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut out = Vec::new();
        let mut s = session(Arc::new(Chan(std::sync::Mutex::new(tx))), Instant::now(), &mut out);
        let connect = client_text(CONNECT);
        assert_eq!(play(&mut s, &rx, &connect, 1).0, ["c"]);
        let mut input = Vec::new();
        for id in ["a", "b", "c2"] {
            input.extend(client_text(&format!(r#"{{"type":"req","id":"{id}","method":"health"}}"#)));
        }
        out.clear();
        assert_eq!(s.on_bytes(&input, &mut out), input.len());
        s.on_eof();
        s.on_eof();
        assert!(!s.is_closed(), "closed before its requests were answered");
        while !s.is_closed() {
            let msg = rx.recv_timeout(Duration::from_secs(120)).expect("the request workers never answered");
            s.outgoing(msg, &mut out);
        }
        let ids: Vec<String> = frames(&out)
            .iter()
            .map(|(_, p)| serde_json::from_slice::<Value>(p).unwrap()["id"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(ids, ["a", "b", "c2"]);
    }

    #[test]
    fn a_failed_connect_closes_after_its_answer_and_nothing_behind_it_is_handled() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut out = Vec::new();
        let mut s = session(Arc::new(Chan(std::sync::Mutex::new(tx))), Instant::now(), &mut out);
        out.clear();
        let mut input = client_text(&CONNECT.replace(r#""token":"t""#, r#""token":"wrong""#));
        input.extend(client_text(r#"{"type":"req","id":"h","method":"health"}"#));
        let n = s.on_bytes(&input, &mut out);
        let msg = rx.recv_timeout(Duration::from_secs(120)).expect("the request worker never answered");
        s.outgoing(msg, &mut out);
        s.on_bytes(&input[n..], &mut out);
        let f = frames(&out);
        let v: Value = serde_json::from_slice(&f[0].1).unwrap();
        assert_eq!((v["id"].as_str(), v["error"]["code"].as_str()), (Some("c"), Some("UNAUTHORIZED")));
        assert_eq!((f[1].0, close_code(&f[1].1)), (0x8, 1008));
        assert_eq!(f.len(), 2);
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err(), "the request after it was handled");
    }

    /// Server frames in `out`, as (opcode, payload).
    fn frames(out: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut v = Vec::new();
        let mut pos = 0;
        while pos < out.len() {
            let (h, n) = frame::parse_header(&out[pos..]).unwrap().unwrap();
            assert!(h.mask.is_none() && h.fin && h.rsv == 0);
            let end = pos + n + h.len as usize;
            v.push((h.opcode, out[pos + n..end].to_vec()));
            pos = end;
        }
        v
    }

    fn event_name(p: &[u8]) -> String {
        let v: Value = serde_json::from_slice(p).unwrap();
        v["event"].as_str().unwrap_or_default().to_string()
    }

    fn close_code(p: &[u8]) -> u16 {
        u16::from_be_bytes([p[0], p[1]])
    }

    #[test]
    fn challenge_then_handshake_deadline() {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut s = session(outbox(), t0, &mut out);
        let f = frames(&out);
        assert_eq!(event_name(&f[0].1), "connect.challenge");
        out.clear();
        assert_eq!(s.deadline(), Some(t0 + HANDSHAKE_TIMEOUT));
        s.on_timer(t0 + Duration::from_secs(9), &mut out);
        assert!(out.is_empty());
        s.on_timer(t0 + HANDSHAKE_TIMEOUT, &mut out);
        assert_eq!(s.deadline(), Some(t0 + HANDSHAKE_TIMEOUT + CLOSE_TIMEOUT));
        let f = frames(&out);
        assert_eq!((f[0].0, close_code(&f[0].1)), (0x8, 1008));
        assert!(!s.is_closed(), "waits for the client's close frame first");
        s.on_timer(t0 + HANDSHAKE_TIMEOUT + CLOSE_TIMEOUT, &mut out);
        assert!(s.is_closed());
    }

    #[test]
    fn ticks_every_30s_and_shutdown_closes_1001() {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut s = session(outbox(), t0, &mut out);
        s.state = State::Open;
        s.next_tick = Some(t0 + TICK_INTERVAL);
        out.clear();
        assert_eq!(s.deadline(), Some(t0 + TICK_INTERVAL));
        s.on_timer(t0 + Duration::from_secs(29), &mut out);
        assert!(out.is_empty());
        s.on_timer(t0 + TICK_INTERVAL, &mut out);
        s.on_timer(t0 + TICK_INTERVAL + Duration::from_secs(1), &mut out);
        let f = frames(&out);
        assert_eq!(f.len(), 1);
        assert_eq!(event_name(&f[0].1), "tick");
        out.clear();
        s.on_timer(t0 + 2 * TICK_INTERVAL, &mut out);
        assert_eq!(event_name(&frames(&out)[0].1), "tick");
        out.clear();
        s.on_shutdown(&mut out);
        let f = frames(&out);
        assert_eq!(event_name(&f[0].1), "shutdown");
        assert_eq!((f[1].0, close_code(&f[1].1)), (0x8, 1001));
        // Nothing more is sent once closing.
        out.clear();
        s.outgoing(Outgoing::Res("{}".into()), &mut out);
        s.on_timer(t0 + 3 * TICK_INTERVAL, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn slow_consumer_is_closed_and_its_runs_aborted() {
        let mut out = Vec::new();
        let mut s = session(outbox(), Instant::now(), &mut out);
        s.state = State::Open;
        let c = CancelToken::new();
        s.lane.lock().runs.insert("run-1".into(), c.clone());
        let big = "x".repeat(1 << 20);
        // 8 MiB and a little are queued: still within the limit when the last one was added.
        for _ in 0..8 {
            s.outgoing(Outgoing::Event { name: "agent", payload: format!("\"{big}\"") }, &mut out);
        }
        assert!(!c.is_cancelled());
        s.outgoing(Outgoing::Event { name: "agent", payload: "1".into() }, &mut out);
        let f = frames(&out);
        let last = f.last().unwrap();
        assert_eq!((last.0, close_code(&last.1)), (0x8, 1008));
        assert!(c.is_cancelled());
    }

    #[test]
    fn dropping_a_session_aborts_its_runs() {
        let mut out = Vec::new();
        let mut s = session(outbox(), Instant::now(), &mut out);
        let c = CancelToken::new();
        s.lane.lock().runs.insert("run-1".into(), c.clone());
        s.outgoing(Outgoing::RunEnded { run_id: "run-2".into() }, &mut out);
        drop(s);
        assert!(c.is_cancelled());
    }
}
