//! One WebSocket connection: the frame codec below, the gateway protocol (SPEC §8) above.
//!
//! Bytes in → frames out (into the loop's write buffer); runs go to the worker pool and come back
//! as [`Outgoing`] messages through the loop. The RFC 6455 layer (pings, the close handshake,
//! limits) is [`Conn`]; on top of it the states are: waiting for `connect` (10 s, 64 KiB
//! messages) and open (25 MiB messages, `tick` every 30 s).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::protocol::{self, ErrorCode, ErrorShape, FrameError, PROTOCOL, Request};
use super::run::{Kind, Link, WsRun};
use super::{Outbox, Outgoing};
use crate::agent::CancelToken;
use crate::agent::pool::Refused;
use crate::agent::registry::{Start, Wait};
use crate::agent::resolve;
use crate::agent::run::RunRequest;
use crate::auth::AuthResult;
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
/// Text messages longer than this (after `connect`) are parsed on the store thread, not the
/// event loop: a 25 MiB request would otherwise hold every connection for tens of milliseconds.
/// The connection reads nothing further until the parsed request is back, so requests keep
/// their order.
pub const PARSE_OFF_LOOP: usize = 64 * 1024;
/// Time allowed for the `connect` request.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// `tick` interval.
pub const TICK_INTERVAL: Duration = Duration::from_secs(30);
pub use crate::ws::conn::CLOSE_TIMEOUT;
/// Default and largest `agent.wait` timeout.
const WAIT_DEFAULT_MS: u64 = 30_000;
const WAIT_MAX_MS: u64 = 600_000;
/// Pending `agent.wait` requests per connection.
const MAX_WAITS: usize = 256;

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

#[derive(Debug)]
enum WaitKind {
    /// `agent.wait`: answer with the wait payload.
    Wait,
    /// A duplicate `agent` request: answer as the run's second response.
    AgentFinal,
}

#[derive(Debug)]
struct PendingWait {
    token: u64,
    req_id: String,
    run_id: String,
    kind: WaitKind,
    deadline: Option<Instant>,
}

/// What a request handler needs besides the session.
struct Ctx<'a> {
    gw: &'a Arc<Gateway>,
    link: &'a Link,
    conn_id: u64,
    ip: IpAddr,
    now: Instant,
}

/// One WebSocket connection's protocol state.
#[derive(Debug)]
pub struct Session {
    /// Where runs, waiters and the store thread post this connection's messages.
    outbox: Link,
    /// Connection id, for logs and `hello-ok`.
    id: u64,
    state: State,
    conn: Conn,
    seq: u64,
    deadline: Instant,
    next_tick: Option<Instant>,
    /// Runs this connection started that are still going: aborted when it closes.
    runs: HashMap<String, CancelToken>,
    waits: Vec<PendingWait>,
    next_wait: u64,
    /// A large message is being parsed off the loop: no further input is taken meanwhile.
    parsing: bool,
    /// The parsed large message, handled on the next [`Session::on_bytes`].
    parsed: Option<Result<Request, FrameError>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.abort_runs();
    }
}

fn send_text(out: &mut Vec<u8>, text: &str) {
    frame::encode(out, OpCode::Text, text.as_bytes());
}

impl Session {
    /// A new session for connection `id`, right after the handshake response: queues
    /// `connect.challenge`. Messages from other threads reach the connection through `outbox`.
    pub fn new(outbox: Arc<dyn Outbox>, id: u64, now: Instant, out: &mut Vec<u8>) -> Self {
        let mut s = Session {
            outbox,
            id,
            state: State::AwaitConnect,
            conn: Conn::new(PRE_AUTH_MAX_PAYLOAD),
            seq: 0,
            deadline: now + HANDSHAKE_TIMEOUT,
            next_tick: None,
            runs: HashMap::new(),
            waits: Vec::new(),
            next_wait: 0,
            parsing: false,
            parsed: None,
        };
        let payload = json!({ "nonce": challenge_nonce(), "ts": now_ms() });
        s.event(out, "connect.challenge", &payload.to_string());
        s
    }

    /// Consume client bytes, queueing frames to send in `out`. Returns bytes consumed, which is
    /// less than `input` while `out` holds more than [`PAUSE_OUTPUT`] bytes.
    pub fn on_bytes(&mut self, input: &[u8], out: &mut Vec<u8>, gw: &Arc<Gateway>, ip: IpAddr) -> usize {
        let now = Instant::now();
        let link = self.outbox.clone();
        let conn_id = self.id;
        let mut ctx = Ctx { gw, link: &link, conn_id, ip, now };
        if let Some(r) = self.parsed.take()
            && self.conn.is_open()
        {
            self.on_request(r, out, &mut ctx);
        }
        let mut pos = 0;
        while pos < input.len() && out.len() < PAUSE_OUTPUT && !self.conn.is_closed() && !self.parsing {
            let (n, ev) = self.conn.feed(&input[pos..], now, out);
            pos += n;
            let Some(ev) = ev else { break };
            match ev {
                Incoming::Ping | Incoming::Pong => {}
                Incoming::Closed(_) => self.abort_runs(),
                Incoming::Failed { reason, .. } => {
                    crate::log!(Debug, "ws #{conn_id}: failing connection: {reason}");
                    self.waits.clear();
                    self.abort_runs();
                }
                Incoming::Binary(_) if self.state == State::Open => {
                    self.fail(out, close::UNSUPPORTED, "binary messages are not supported", now);
                }
                Incoming::Binary(_) => {
                    self.fail(out, close::POLICY, "the first message must be a connect request", now)
                }
                Incoming::Text(t) => self.on_text(t, out, &mut ctx),
            }
        }
        if self.conn.is_closed() { input.len() } else { pos }
    }

    /// A message from a run or a waiter.
    pub fn outgoing(&mut self, msg: Outgoing, out: &mut Vec<u8>) {
        if let Outgoing::RunEnded { run_id } = &msg {
            self.runs.remove(run_id);
            return;
        }
        if let Outgoing::Parsed(r) = msg {
            // Handled by the next `on_bytes`, which the loop calls right after this.
            self.parsing = false;
            self.parsed = Some(*r);
            return;
        }
        if self.state != State::Open || !self.conn.is_open() {
            return;
        }
        if out.len() > MAX_BUFFERED {
            crate::log!(Debug, "ws: closing a slow consumer with {} bytes unsent", out.len());
            return self.fail(out, close::POLICY, "slow consumer: too much unsent data", Instant::now());
        }
        match msg {
            Outgoing::Res(text) => send_text(out, &text),
            Outgoing::Event { name, payload } => self.event(out, name, &payload),
            Outgoing::Waited { token, summary } => {
                let Some(i) = self.waits.iter().position(|w| w.token == token) else { return };
                let w = self.waits.swap_remove(i);
                let text = match w.kind {
                    WaitKind::Wait => protocol::res_ok(&w.req_id, &protocol::wait_payload(&summary)),
                    WaitKind::AgentFinal => protocol::agent_final(&w.req_id, &summary),
                };
                send_text(out, &text);
            }
            Outgoing::RunEnded { .. } | Outgoing::Parsed(_) => {}
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
                let mut i = 0;
                while i < self.waits.len() {
                    if self.waits[i].deadline.is_some_and(|d| now >= d) {
                        let w = self.waits.swap_remove(i);
                        let p = json!({ "runId": w.run_id, "status": "timeout" });
                        send_text(out, &protocol::res_ok(&w.req_id, &p));
                    } else {
                        i += 1;
                    }
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
        let waits = self.waits.iter().filter_map(|w| w.deadline);
        connect.into_iter().chain(self.next_tick).chain(waits).min()
    }

    /// The peer went away: abort this connection's runs.
    pub fn on_eof(&mut self) {
        self.conn.on_eof();
        self.abort_runs();
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
        self.conn.is_closed()
    }

    fn abort_runs(&mut self) {
        for (_, c) in self.runs.drain() {
            c.cancel();
        }
    }

    fn event(&mut self, out: &mut Vec<u8>, name: &str, payload: &str) {
        self.seq += 1;
        send_text(out, &protocol::event(name, payload, self.seq));
    }

    /// Send a close frame and wait (briefly) for the peer's; runs are aborted now.
    fn fail(&mut self, out: &mut Vec<u8>, code: u16, reason: &str, now: Instant) {
        self.conn.close(out, code, reason, now);
        self.waits.clear();
        self.abort_runs();
    }

    fn on_text(&mut self, text: String, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) {
        if self.state == State::Open && text.len() > PARSE_OFF_LOOP {
            let link = ctx.link.clone();
            let job = Box::new(move || link.post(Outgoing::Parsed(Box::new(protocol::parse_request(&text)))));
            if crate::session::run_off_loop(job) {
                self.parsing = true;
            } else {
                let e = ErrorShape::new(ErrorCode::Unavailable, "the gateway is busy")
                    .with_details(json!({ "retryable": true, "retryAfterMs": 1000 }));
                send_text(out, &protocol::res_err(None, &e));
            }
            return;
        }
        self.on_request(protocol::parse_request(&text), out, ctx);
    }

    fn on_request(&mut self, req: Result<Request, FrameError>, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) {
        let req = match req {
            Ok(r) => r,
            Err(e) => {
                send_text(out, &protocol::res_err(e.id.as_deref(), &ErrorShape::invalid(e.message)));
                if self.state == State::AwaitConnect {
                    self.fail(out, close::POLICY, "the first message must be a connect request", ctx.now);
                }
                return;
            }
        };
        if self.state == State::AwaitConnect {
            return self.connect(req, out, ctx);
        }
        let answer = match req.method.as_str() {
            "connect" => Err(ErrorShape::invalid("already connected")),
            "health" => Ok(json!({ "ok": true, "status": "live", "ts": now_ms() })),
            "status" => Ok(status(ctx.gw)),
            "models.list" => Ok(models(ctx.gw)),
            "agents.list" => Ok(agents(ctx.gw)),
            "agent" => return self.agent(&req, out, ctx),
            "agent.wait" => return self.agent_wait(&req, out, ctx),
            "chat.send" => return self.chat_send(&req, out, ctx),
            "chat.abort" => chat_abort(ctx.gw, &req.params),
            "chat.history" | "sessions.list" | "sessions.reset" | "sessions.delete" => {
                return store_method(req, out, ctx);
            }
            m => Err(ErrorShape::invalid(format!("unknown method: {m}"))),
        };
        send_text(out, &answer_text(&req.id, answer));
    }

    /// The `connect` handshake (SPEC §8).
    fn connect(&mut self, req: Request, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) {
        let refuse = |s: &mut Self, out: &mut Vec<u8>, e: ErrorShape, code: u16| {
            send_text(out, &protocol::res_err(Some(&req.id), &e));
            s.fail(out, code, &e.message, ctx.now);
        };
        if req.method != "connect" {
            let e = ErrorShape::invalid("the first request must be connect");
            return refuse(self, out, e, close::POLICY);
        }
        let p = &req.params;
        let (Some(min), Some(max)) = (p["minProtocol"].as_u64(), p["maxProtocol"].as_u64()) else {
            let e = ErrorShape::invalid("connect needs integer minProtocol and maxProtocol");
            return refuse(self, out, e, close::POLICY);
        };
        if !(min..=max).contains(&PROTOCOL) {
            let e = ErrorShape::invalid("protocol mismatch").with_details(json!({ "expectedProtocol": PROTOCOL }));
            return refuse(self, out, e, close::PROTOCOL);
        }
        let client = &p["client"];
        if let Some(f) = ["id", "version", "platform", "mode"].iter().find(|f| !client[**f].is_string()) {
            let e = ErrorShape::invalid(format!("connect needs client.{f} (a string)"));
            return refuse(self, out, e, close::POLICY);
        }
        let auth = &p["auth"];
        if !matches!(auth, Value::Null | Value::Object(_)) {
            return refuse(self, out, ErrorShape::invalid("auth must be an object"), close::POLICY);
        }
        let secret = auth["token"].as_str().or_else(|| auth["password"].as_str());
        match ctx.gw.auth().check(secret, ctx.ip, ctx.now) {
            AuthResult::Ok => {}
            AuthResult::Invalid => {
                let e = ErrorShape::new(ErrorCode::Unauthorized, "missing or incorrect gateway token or password");
                return refuse(self, out, e, close::POLICY);
            }
            AuthResult::Locked(secs) => {
                let e = ErrorShape::new(
                    ErrorCode::Unauthorized,
                    format!("too many failed authentication attempts; retry after {secs} s"),
                )
                .with_details(json!({ "retryable": true, "retryAfterMs": secs * 1000 }));
                return refuse(self, out, e, close::POLICY);
            }
        }
        self.state = State::Open;
        self.conn.set_max_message(MAX_PAYLOAD);
        self.next_tick = Some(ctx.now + TICK_INTERVAL);
        let hello = json!({
            "type": "hello-ok",
            "protocol": PROTOCOL,
            "server": { "version": env!("CARGO_PKG_VERSION"), "connId": format!("conn-{}", ctx.conn_id) },
            "features": { "methods": METHODS, "events": EVENTS },
            "policy": { "maxPayload": MAX_PAYLOAD, "maxBufferedBytes": MAX_BUFFERED,
                        "tickIntervalMs": TICK_INTERVAL.as_millis() as u64 },
        });
        send_text(out, &protocol::res_ok(&req.id, &hello));
    }

    /// `agent {message, agentId?, sessionKey?, extraSystemPrompt?, idempotencyKey?, timeout?}`.
    fn agent(&mut self, req: &Request, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) {
        let p = &req.params;
        let parsed = (|| {
            let message = message_param(p)?;
            let agent_id = opt_str(p, "agentId")?;
            let key = opt_str(p, "sessionKey")?;
            let extra = opt_str(p, "extraSystemPrompt")?;
            let timeout = match &p["timeout"] {
                Value::Null => None,
                v => match v.as_u64() {
                    Some(s @ 1..=86_400) => Some(Duration::from_secs(s)),
                    _ => return Err(ErrorShape::invalid("timeout must be whole seconds from 1 to 86400")),
                },
            };
            let (agent, session_key, sticky) = resolve(ctx.gw, agent_id, key)?;
            let run = RunRequest {
                extra_system: extra.map(str::to_string).into_iter().collect(),
                timeout,
                ..RunRequest::user_turn(agent, session_key, sticky, message)
            };
            Ok((run, opt_str(p, "idempotencyKey")?))
        })();
        match parsed {
            Ok((run, idem)) => {
                let kind = Kind::Agent { req_id: req.id.clone() };
                self.start_run(req, run, kind, idem.map(|k| format!("agent\0{k}")), out, ctx)
            }
            Err(e) => send_text(out, &protocol::res_err(Some(&req.id), &e)),
        }
    }

    /// `chat.send {sessionKey, message, idempotencyKey?}`.
    fn chat_send(&mut self, req: &Request, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) {
        let p = &req.params;
        let parsed = (|| {
            let key = req_str(p, "sessionKey")?;
            let message = message_param(p)?;
            let (agent, session_key, sticky) = resolve(ctx.gw, None, Some(key))?;
            let run = RunRequest::user_turn(agent, session_key, sticky, message);
            Ok((run, opt_str(p, "idempotencyKey")?))
        })();
        match parsed {
            Ok((run, idem)) => self.start_run(req, run, Kind::Chat, idem.map(|k| format!("chat\0{k}")), out, ctx),
            Err(e) => send_text(out, &protocol::res_err(Some(&req.id), &e)),
        }
    }

    /// Register, admit and submit a run; answer the first response.
    fn start_run(
        &mut self,
        req: &Request,
        run: RunRequest,
        kind: Kind,
        idem: Option<String>,
        out: &mut Vec<u8>,
        ctx: &mut Ctx<'_>,
    ) {
        let gw = ctx.gw;
        let cancel = CancelToken::new();
        match gw.runs().start(&run.run_id, idem.as_deref(), &run.session_key, &cancel) {
            Start::Existing(id) => return self.duplicate(req, &id, &kind, out, ctx),
            Start::New => {}
        }
        let admission = match gw.pool().admit_from(Some(ctx.ip.to_canonical())) {
            Ok(a) => a,
            Err(refused) => {
                gw.runs().forget(&run.run_id);
                let msg = match refused {
                    Refused::Full => "the gateway is overloaded: the run queue is full".to_string(),
                    Refused::PerIp(n) => {
                        format!("too many concurrent runs from this address (gateway.maxRunsPerIp is {n})")
                    }
                };
                let e = ErrorShape::new(ErrorCode::Unavailable, msg)
                    .with_details(json!({ "retryable": true, "retryAfterMs": 1000 }));
                return send_text(out, &protocol::res_err(Some(&req.id), &e));
            }
        };
        let accepted_at = now_ms();
        let first = match kind {
            Kind::Agent { .. } => json!({ "runId": run.run_id, "status": "accepted", "acceptedAt": accepted_at,
                                          "sessionKey": run.session_key }),
            Kind::Chat => json!({ "runId": run.run_id, "status": "started", "sessionKey": run.session_key }),
        };
        send_text(out, &protocol::res_ok(&req.id, &first));
        self.runs.insert(run.run_id.clone(), cancel.clone());
        let agent_id = gw.agents()[run.agent].cfg.id.clone();
        crate::log!(Debug, "ws run {} agent={} session={}", run.run_id, agent_id, run.session_key);
        let sticky = run.sticky.then(|| run.session_key.clone());
        let job = WsRun { gw: gw.clone(), run, agent_id, link: ctx.link.clone(), kind, cancel, accepted_at };
        admission.submit(sticky, move || job.execute());
    }

    /// A start whose idempotency key names run `id`: report that run instead of starting one.
    fn duplicate(&mut self, req: &Request, id: &str, kind: &Kind, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) {
        match kind {
            Kind::Chat => {
                let status = if ctx.gw.runs().is_running(id) { "in_flight" } else { "ok" };
                send_text(out, &protocol::res_ok(&req.id, &json!({ "runId": id, "status": status, "deduped": true })));
            }
            Kind::Agent { .. } => {
                let first = json!({ "runId": id, "status": "accepted", "deduped": true });
                send_text(out, &protocol::res_ok(&req.id, &first));
                self.watch(req, id, WaitKind::AgentFinal, None, out, ctx);
            }
        }
    }

    /// `agent.wait {runId, timeoutMs?}`.
    fn agent_wait(&mut self, req: &Request, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) {
        let p = &req.params;
        let run_id = match req_str(p, "runId") {
            Ok(r) => r.to_string(),
            Err(e) => return send_text(out, &protocol::res_err(Some(&req.id), &e)),
        };
        let ms = match &p["timeoutMs"] {
            Value::Null => WAIT_DEFAULT_MS,
            v => match v.as_u64() {
                Some(ms) => ms.min(WAIT_MAX_MS),
                None => {
                    let e = ErrorShape::invalid("timeoutMs must be a non-negative integer");
                    return send_text(out, &protocol::res_err(Some(&req.id), &e));
                }
            },
        };
        let deadline = ctx.now + Duration::from_millis(ms);
        self.watch(req, &run_id, WaitKind::Wait, Some(deadline), out, ctx);
    }

    /// Answer `req` when run `id` ends (or at `deadline`).
    fn watch(
        &mut self,
        req: &Request,
        id: &str,
        kind: WaitKind,
        deadline: Option<Instant>,
        out: &mut Vec<u8>,
        ctx: &mut Ctx<'_>,
    ) {
        if self.waits.len() >= MAX_WAITS {
            let e = ErrorShape::new(ErrorCode::Unavailable, "too many pending waits on this connection");
            return send_text(out, &protocol::res_err(Some(&req.id), &e));
        }
        self.next_wait += 1;
        let token = self.next_wait;
        let link = ctx.link.clone();
        let waiter = Box::new(move |s: &crate::agent::registry::RunSummary| {
            link.post(Outgoing::Waited { token, summary: Box::new(s.clone()) });
        });
        let answer = |s| match kind {
            WaitKind::Wait => protocol::res_ok(&req.id, &protocol::wait_payload(s)),
            WaitKind::AgentFinal => protocol::agent_final(&req.id, s),
        };
        // A wait whose deadline has already passed only looks: it must not leave a callback
        // behind on a run that may go on for minutes.
        let expired = deadline.is_some_and(|d| d <= ctx.now);
        match ctx.gw.runs().wait(id, (!expired).then_some(waiter as crate::agent::registry::Waiter)) {
            Wait::Busy => {
                let e = ErrorShape::new(ErrorCode::Unavailable, format!("too many waiters on run {id}"));
                send_text(out, &protocol::res_err(Some(&req.id), &e));
            }
            Wait::NotFound => {
                let e = ErrorShape::new(ErrorCode::NotFound, format!("no run {id}"));
                send_text(out, &protocol::res_err(Some(&req.id), &e));
            }
            Wait::Done(s) => send_text(out, &answer(&s)),
            Wait::Pending if expired => {
                send_text(out, &protocol::res_ok(&req.id, &json!({ "runId": id, "status": "timeout" })));
            }
            Wait::Pending => {
                self.waits.push(PendingWait { token, req_id: req.id.clone(), run_id: id.to_string(), kind, deadline })
            }
        }
    }
}

/// A store method, answered from the store thread: it may wait on a session's disk write or
/// read a transcript, which the event loop must never do (SPEC §8).
fn store_method(req: Request, out: &mut Vec<u8>, ctx: &mut Ctx<'_>) {
    let gw = ctx.gw.clone();
    let link = ctx.link.clone();
    let id = req.id.clone();
    let job = Box::new(move || {
        let p = &req.params;
        let answer = match req.method.as_str() {
            "chat.history" => chat_history(&gw, p),
            "sessions.list" => Ok(sessions_list(&gw)),
            "sessions.reset" => sessions_change(&gw, p, false),
            _ => sessions_change(&gw, p, true),
        };
        link.post(Outgoing::Res(answer_text(&req.id, answer)));
    });
    if !crate::session::run_off_loop(job) {
        let e = ErrorShape::new(ErrorCode::Unavailable, "the session store is busy")
            .with_details(json!({ "retryable": true, "retryAfterMs": 1000 }));
        send_text(out, &protocol::res_err(Some(&id), &e));
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

fn answer_text(id: &str, r: Result<Value, ErrorShape>) -> String {
    match r {
        Ok(v) => protocol::res_ok(id, &v),
        Err(e) => protocol::res_err(Some(id), &e),
    }
}

fn opt_str<'a>(p: &'a Value, k: &str) -> Result<Option<&'a str>, ErrorShape> {
    match &p[k] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.as_str()).filter(|s| !s.is_empty())),
        _ => Err(ErrorShape::invalid(format!("{k} must be a string"))),
    }
}

fn req_str<'a>(p: &'a Value, k: &str) -> Result<&'a str, ErrorShape> {
    opt_str(p, k)?.ok_or_else(|| ErrorShape::invalid(format!("missing required param {k}")))
}

fn message_param(p: &Value) -> Result<String, ErrorShape> {
    let m = req_str(p, "message")?;
    if m.trim().is_empty() {
        return Err(ErrorShape::invalid("message must not be blank"));
    }
    Ok(m.to_string())
}

/// Agent and session key for a WebSocket run: the shared rule ([`resolve::agent_for_key`]).
fn resolve(gw: &Gateway, agent_id: Option<&str>, key: Option<&str>) -> Result<(usize, String, bool), ErrorShape> {
    Ok(resolve::agent_for_key(gw.agents(), gw.default_agent(), agent_id, key)?)
}

/// A session key as given, or with the default agent's prefix (how runs store it).
fn normalize_key(gw: &Gateway, key: &str) -> Result<String, ErrorShape> {
    resolve(gw, None, Some(key)).map(|(_, k, _)| k)
}

fn status(gw: &Gateway) -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": PROTOCOL,
        "uptimeMs": gw.runs().started().elapsed().as_millis() as u64,
        "runs": { "active": gw.runs().active(), "queued": gw.pool().pending() },
        "workers": gw.config().gateway.workers,
        "agents": gw.agents().iter().map(|a| a.cfg.id.as_str()).collect::<Vec<_>>(),
        "defaultAgentId": gw.agents()[gw.default_agent()].cfg.id,
        "sessions": gw.sessions().count(),
    })
}

fn models(gw: &Gateway) -> Value {
    let m: Vec<Value> =
        gw.model_ids().into_iter().map(|id| json!({ "id": id, "name": id, "provider": "gatelet" })).collect();
    json!({ "models": m })
}

fn agents(gw: &Gateway) -> Value {
    let d = gw.default_agent();
    let list: Vec<Value> =
        gw.agents().iter().enumerate().map(|(i, a)| json!({ "id": a.cfg.id, "default": i == d })).collect();
    json!({ "defaultId": gw.agents()[d].cfg.id, "agents": list })
}

fn chat_abort(gw: &Gateway, p: &Value) -> Result<Value, ErrorShape> {
    let key = normalize_key(gw, req_str(p, "sessionKey")?)?;
    let run_id = opt_str(p, "runId")?;
    let ids = gw.runs().abort(&key, run_id);
    Ok(json!({ "ok": true, "aborted": !ids.is_empty(), "runIds": ids, "sessionKey": key }))
}

fn chat_history(gw: &Gateway, p: &Value) -> Result<Value, ErrorShape> {
    let key = normalize_key(gw, req_str(p, "sessionKey")?)?;
    let limit = match &p["limit"] {
        Value::Null => None,
        v => Some(v.as_u64().ok_or_else(|| ErrorShape::invalid("limit must be a non-negative integer"))? as usize),
    };
    let messages = gw.sessions().transcript(&key, limit).unwrap_or_default();
    Ok(json!({ "sessionKey": key, "messages": messages }))
}

fn sessions_list(gw: &Gateway) -> Value {
    let list: Vec<Value> = gw.sessions().list().iter().map(crate::session::cli::info_json).collect();
    json!({ "count": list.len(), "sessions": list })
}

fn sessions_change(gw: &Gateway, p: &Value, delete: bool) -> Result<Value, ErrorShape> {
    let given = req_str(p, "key")?;
    let mut keys = vec![given.to_string()];
    if let Ok(k) = normalize_key(gw, given) {
        keys.push(k);
    }
    for key in keys {
        let r = if delete { gw.sessions().delete(&key) } else { gw.sessions().reset(&key) };
        match r {
            Ok(true) => return Ok(json!({ "ok": true, "key": key })),
            Ok(false) => {}
            Err(e) => return Err(ErrorShape::new(ErrorCode::Unavailable, e)),
        }
    }
    Err(ErrorShape::new(ErrorCode::NotFound, format!("no session {given}")))
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// An outbox that keeps what is posted, as the loop's channel would.
    #[derive(Debug, Default)]
    struct Collect(std::sync::Mutex<Vec<Outgoing>>);

    impl Outbox for Collect {
        fn post(&self, msg: Outgoing) {
            self.0.lock().unwrap().push(msg);
        }
        fn congested(&self) -> bool {
            false
        }
    }

    /// A masked client text frame.
    fn client_text(payload: &str) -> Vec<u8> {
        let mut v = Vec::new();
        frame::encode_masked(&mut v, 0x81, payload.as_bytes(), [1, 2, 3, 4]);
        v
    }

    #[test]
    fn a_large_request_is_parsed_off_the_loop_and_later_ones_wait_for_it() {
        let gw = gateway();
        let ob = Arc::new(Collect::default());
        let mut out = Vec::new();
        let mut s = Session::new(ob.clone(), 1, Instant::now(), &mut out);
        s.state = State::Open;
        s.conn.set_max_message(MAX_PAYLOAD);
        out.clear();
        let pad = "x".repeat(PARSE_OFF_LOOP);
        let big = client_text(&format!(r#"{{"type":"req","id":"big","method":"health","params":{{"pad":"{pad}"}}}}"#));
        let mut input = big.clone();
        input.extend(client_text(r#"{"type":"req","id":"small","method":"health"}"#));
        let ip = IpAddr::from([127, 0, 0, 1]);
        let n = s.on_bytes(&input, &mut out, &gw, ip);
        assert_eq!(n, big.len(), "nothing after the large message is taken while it is parsed");
        assert!(out.is_empty(), "the loop did not answer it");
        let t0 = Instant::now();
        let parsed = loop {
            if let Some(m) = ob.0.lock().unwrap().pop() {
                break m;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "the store thread never answered");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(matches!(parsed, Outgoing::Parsed(_)));
        s.outgoing(parsed, &mut out);
        assert_eq!(s.on_bytes(&input[n..], &mut out, &gw, ip), input.len() - n);
        let ids: Vec<String> = frames(&out)
            .iter()
            .map(|(_, p)| serde_json::from_slice::<Value>(p).unwrap()["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["big", "small"]);
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
        let mut s = Session::new(outbox(), 1, t0, &mut out);
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
        let mut s = Session::new(outbox(), 1, t0, &mut out);
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
        let mut s = Session::new(outbox(), 1, Instant::now(), &mut out);
        s.state = State::Open;
        let c = CancelToken::new();
        s.runs.insert("run-1".into(), c.clone());
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
        let mut s = Session::new(outbox(), 1, Instant::now(), &mut out);
        let c = CancelToken::new();
        s.runs.insert("run-1".into(), c.clone());
        s.outgoing(Outgoing::RunEnded { run_id: "run-2".into() }, &mut out);
        drop(s);
        assert!(c.is_cancelled());
    }
}
