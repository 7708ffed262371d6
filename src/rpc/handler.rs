//! The worker side of the gateway protocol: what a `gatelet-rpc` worker does with one message a
//! connection's [`Lane`] hands it. It parses the request, validates the params, resolves agent
//! and session, does the work (or hands it on: runs to the run pool, store methods to the store
//! thread) and renders the answer, which it posts to the connection. Nothing here runs on the
//! event loop; the loop only frames what is posted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::Outgoing;
use super::lane::{Item, Lane, PendingWait, WaitKind};
use super::protocol::{self, ErrorCode, ErrorShape, PROTOCOL, Request};
use super::run::{Kind, WsRun};
use super::session::{EVENTS, MAX_BUFFERED, MAX_PAYLOAD, METHODS, TICK_INTERVAL};
use crate::agent::CancelToken;
use crate::agent::pool::Refused;
use crate::agent::registry::{Start, Wait};
use crate::agent::resolve;
use crate::agent::run::RunRequest;
use crate::auth::AuthResult;
use crate::gateway::Gateway;
use crate::util::now_ms;
use crate::ws::frame::close;

/// Default and largest `agent.wait` timeout.
const WAIT_DEFAULT_MS: u64 = 30_000;
const WAIT_MAX_MS: u64 = 600_000;
/// Pending `agent.wait` requests per connection.
const MAX_WAITS: usize = 256;

/// What a request handler needs.
struct Ctx<'a> {
    lane: &'a Arc<Lane>,
    gw: &'a Arc<Gateway>,
    now: Instant,
}

impl Ctx<'_> {
    fn send(&self, text: String) {
        self.lane.outbox.post(Outgoing::Res(text));
    }

    fn send_err(&self, id: &str, e: &ErrorShape) {
        self.send(protocol::res_err(Some(id), e));
    }
}

/// Handle one message from `lane`, posting its answers.
pub(crate) fn handle(lane: &Arc<Lane>, item: Item) {
    let ctx = Ctx { lane, gw: &lane.gw, now: Instant::now() };
    match item {
        Item::Binary { open: true } => {
            let reason = "binary messages are not supported".into();
            lane.outbox.post(Outgoing::Close { res: None, code: close::UNSUPPORTED, reason });
        }
        Item::Binary { open: false } => {
            let reason = "the first message must be a connect request".into();
            lane.outbox.post(Outgoing::Close { res: None, code: close::POLICY, reason });
        }
        Item::Mark => lane.outbox.post(Outgoing::Drained),
        Item::Connect(text) => match protocol::parse_request(&text) {
            Ok(req) => connect(req, &ctx),
            Err(e) => {
                let res = Some(protocol::res_err(e.id.as_deref(), &ErrorShape::invalid(e.message)));
                let reason = "the first message must be a connect request".into();
                lane.outbox.post(Outgoing::Close { res, code: close::POLICY, reason });
            }
        },
        Item::Request(text) => match protocol::parse_request(&text) {
            Ok(req) => request(req, &ctx),
            Err(e) => ctx.send(protocol::res_err(e.id.as_deref(), &ErrorShape::invalid(e.message))),
        },
    }
}

/// A request on an authenticated connection.
fn request(req: Request, ctx: &Ctx<'_>) {
    let gw = ctx.gw;
    let answer = match req.method.as_str() {
        "connect" => Err(ErrorShape::invalid("already connected")),
        "health" => Ok(json!({ "ok": true, "status": "live", "ts": now_ms() })),
        "status" => Ok(status(gw)),
        "models.list" => Ok(models(gw)),
        "agents.list" => Ok(agents(gw)),
        "agent" => return agent(&req, ctx),
        "agent.wait" => return agent_wait(&req, ctx),
        "chat.send" => return chat_send(&req, ctx),
        "chat.abort" => chat_abort(gw, &req.params),
        "chat.history" | "sessions.list" | "sessions.reset" | "sessions.delete" => {
            return store_method(req, ctx);
        }
        m => Err(ErrorShape::invalid(format!("unknown method: {m}"))),
    };
    ctx.send(answer_text(&req.id, answer));
}

/// The `connect` handshake (SPEC §8): answered with [`Outgoing::Connected`] (the loop then
/// opens the connection) or [`Outgoing::Close`].
fn connect(req: Request, ctx: &Ctx<'_>) {
    let refuse = |e: ErrorShape, code: u16| {
        let res = Some(protocol::res_err(Some(&req.id), &e));
        ctx.lane.outbox.post(Outgoing::Close { res, code, reason: e.message });
    };
    if req.method != "connect" {
        return refuse(ErrorShape::invalid("the first request must be connect"), close::POLICY);
    }
    let p = &req.params;
    let (Some(min), Some(max)) = (p["minProtocol"].as_u64(), p["maxProtocol"].as_u64()) else {
        return refuse(ErrorShape::invalid("connect needs integer minProtocol and maxProtocol"), close::POLICY);
    };
    if !(min..=max).contains(&PROTOCOL) {
        let e = ErrorShape::invalid("protocol mismatch").with_details(json!({ "expectedProtocol": PROTOCOL }));
        return refuse(e, close::PROTOCOL);
    }
    let client = &p["client"];
    if let Some(f) = ["id", "version", "platform", "mode"].iter().find(|f| !client[**f].is_string()) {
        return refuse(ErrorShape::invalid(format!("connect needs client.{f} (a string)")), close::POLICY);
    }
    let auth = &p["auth"];
    if !matches!(auth, Value::Null | Value::Object(_)) {
        return refuse(ErrorShape::invalid("auth must be an object"), close::POLICY);
    }
    let secret = auth["token"].as_str().or_else(|| auth["password"].as_str());
    match ctx.gw.auth().check(secret, ctx.lane.ip, ctx.now) {
        AuthResult::Ok => {}
        AuthResult::Invalid => {
            let e = ErrorShape::new(ErrorCode::Unauthorized, "missing or incorrect gateway token or password");
            return refuse(e, close::POLICY);
        }
        AuthResult::Locked(secs) => {
            let e = ErrorShape::new(
                ErrorCode::Unauthorized,
                format!("too many failed authentication attempts; retry after {secs} s"),
            )
            .with_details(json!({ "retryable": true, "retryAfterMs": secs * 1000 }));
            return refuse(e, close::POLICY);
        }
    }
    let hello = json!({
        "type": "hello-ok",
        "protocol": PROTOCOL,
        "server": { "version": env!("CARGO_PKG_VERSION"), "connId": format!("conn-{}", ctx.lane.conn_id) },
        "features": { "methods": METHODS, "events": EVENTS },
        "policy": { "maxPayload": MAX_PAYLOAD, "maxBufferedBytes": MAX_BUFFERED,
                    "tickIntervalMs": TICK_INTERVAL.as_millis() as u64 },
    });
    ctx.lane.outbox.post(Outgoing::Connected { hello: protocol::res_ok(&req.id, &hello) });
}

/// `agent {message, agentId?, sessionKey?, extraSystemPrompt?, idempotencyKey?, timeout?}`.
fn agent(req: &Request, ctx: &Ctx<'_>) {
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
            start_run(req, run, kind, idem.map(|k| format!("agent\0{k}")), ctx)
        }
        Err(e) => ctx.send_err(&req.id, &e),
    }
}

/// `chat.send {sessionKey, message, idempotencyKey?}`.
fn chat_send(req: &Request, ctx: &Ctx<'_>) {
    let p = &req.params;
    let parsed = (|| {
        let key = req_str(p, "sessionKey")?;
        let message = message_param(p)?;
        let (agent, session_key, sticky) = resolve(ctx.gw, None, Some(key))?;
        let run = RunRequest::user_turn(agent, session_key, sticky, message);
        Ok((run, opt_str(p, "idempotencyKey")?))
    })();
    match parsed {
        Ok((run, idem)) => start_run(req, run, Kind::Chat, idem.map(|k| format!("chat\0{k}")), ctx),
        Err(e) => ctx.send_err(&req.id, &e),
    }
}

/// Register, admit and submit a run; answer the first response.
fn start_run(req: &Request, run: RunRequest, kind: Kind, idem: Option<String>, ctx: &Ctx<'_>) {
    let gw = ctx.gw;
    let cancel = CancelToken::new();
    match gw.runs().start(&run.run_id, idem.as_deref(), &run.session_key, &cancel) {
        Start::Existing(id) => return duplicate(req, &id, &kind, ctx),
        Start::New => {}
    }
    let admission = match gw.pool().admit_from(Some(ctx.lane.ip.to_canonical())) {
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
            return ctx.send_err(&req.id, &e);
        }
    };
    // Registered with the connection before anything is sent, so that its close aborts it;
    // a connection that closed meanwhile gets its run cancelled right away.
    {
        let mut s = ctx.lane.lock();
        if s.closed {
            cancel.cancel();
        } else {
            s.runs.insert(run.run_id.clone(), cancel.clone());
        }
    }
    let accepted_at = now_ms();
    let first = match kind {
        Kind::Agent { .. } => json!({ "runId": run.run_id, "status": "accepted", "acceptedAt": accepted_at,
                                      "sessionKey": run.session_key }),
        Kind::Chat => json!({ "runId": run.run_id, "status": "started", "sessionKey": run.session_key }),
    };
    ctx.send(protocol::res_ok(&req.id, &first));
    let agent_id = gw.agents()[run.agent].cfg.id.clone();
    crate::log!(Debug, "ws run {} agent={} session={}", run.run_id, agent_id, run.session_key);
    let sticky = run.sticky.then(|| run.session_key.clone());
    let job = WsRun { gw: gw.clone(), run, agent_id, link: ctx.lane.outbox.clone(), kind, cancel, accepted_at };
    admission.submit(sticky, move || job.execute());
}

/// A start whose idempotency key names run `id`: report that run instead of starting one.
fn duplicate(req: &Request, id: &str, kind: &Kind, ctx: &Ctx<'_>) {
    match kind {
        Kind::Chat => {
            let status = if ctx.gw.runs().is_running(id) { "in_flight" } else { "ok" };
            ctx.send(protocol::res_ok(&req.id, &json!({ "runId": id, "status": status, "deduped": true })));
        }
        Kind::Agent { .. } => {
            let first = json!({ "runId": id, "status": "accepted", "deduped": true });
            ctx.send(protocol::res_ok(&req.id, &first));
            watch(req, id, WaitKind::AgentFinal, None, ctx);
        }
    }
}

/// `agent.wait {runId, timeoutMs?}`.
fn agent_wait(req: &Request, ctx: &Ctx<'_>) {
    let p = &req.params;
    let run_id = match req_str(p, "runId") {
        Ok(r) => r.to_string(),
        Err(e) => return ctx.send_err(&req.id, &e),
    };
    let ms = match &p["timeoutMs"] {
        Value::Null => WAIT_DEFAULT_MS,
        v => match v.as_u64() {
            Some(ms) => ms.min(WAIT_MAX_MS),
            None => return ctx.send_err(&req.id, &ErrorShape::invalid("timeoutMs must be a non-negative integer")),
        },
    };
    let deadline = ctx.now + Duration::from_millis(ms);
    watch(req, &run_id, WaitKind::Wait, Some(deadline), ctx);
}

/// The answer to a wait of `kind` for request `req_id` on a run that ended as `s`.
pub(crate) fn wait_answer(kind: WaitKind, req_id: &str, s: &crate::agent::registry::RunSummary) -> String {
    match kind {
        WaitKind::Wait => protocol::res_ok(req_id, &protocol::wait_payload(s)),
        WaitKind::AgentFinal => protocol::agent_final(req_id, s),
    }
}

/// Answer `req` when run `id` ends (or at `deadline`, which the loop's timer watches).
fn watch(req: &Request, id: &str, kind: WaitKind, deadline: Option<Instant>, ctx: &Ctx<'_>) {
    // A wait whose deadline has already passed only looks: it must not leave a callback behind
    // on a run that may go on for minutes.
    let expired = deadline.is_some_and(|d| d <= ctx.now);
    let token = {
        let mut s = ctx.lane.lock();
        if s.waits.len() >= MAX_WAITS {
            drop(s);
            let e = ErrorShape::new(ErrorCode::Unavailable, "too many pending waits on this connection");
            return ctx.send_err(&req.id, &e);
        }
        s.next_wait += 1;
        let token = s.next_wait;
        // Filed before the run can end, so that its callback finds it.
        if !expired && !s.closed {
            s.waits.push(PendingWait { token, req_id: req.id.clone(), run_id: id.to_string(), kind, deadline });
        }
        token
    };
    let lane = ctx.lane.clone();
    // Called on the run's worker when it ends: answers unless the loop's timer answered first.
    let waiter = Box::new(move |s: &crate::agent::registry::RunSummary| {
        let w = {
            let mut g = lane.lock();
            let i = g.waits.iter().position(|w| w.token == token);
            i.map(|i| g.waits.swap_remove(i))
        };
        if let Some(w) = w {
            lane.outbox.post(Outgoing::Res(wait_answer(w.kind, &w.req_id, s)));
        }
    });
    let forget = || {
        let mut g = ctx.lane.lock();
        if let Some(i) = g.waits.iter().position(|w| w.token == token) {
            g.waits.swap_remove(i);
        }
    };
    match ctx.gw.runs().wait(id, (!expired).then_some(waiter as crate::agent::registry::Waiter)) {
        Wait::Busy => {
            forget();
            ctx.send_err(&req.id, &ErrorShape::new(ErrorCode::Unavailable, format!("too many waiters on run {id}")));
        }
        Wait::NotFound => {
            forget();
            ctx.send_err(&req.id, &ErrorShape::new(ErrorCode::NotFound, format!("no run {id}")));
        }
        Wait::Done(s) => {
            forget();
            ctx.send(wait_answer(kind, &req.id, &s));
        }
        Wait::Pending if expired => {
            ctx.send(protocol::res_ok(&req.id, &json!({ "runId": id, "status": "timeout" })));
        }
        // The loop files the new deadline under its timers when it takes this.
        Wait::Pending if deadline.is_some() => ctx.lane.outbox.post(Outgoing::Wake),
        Wait::Pending => {}
    }
}

/// A store method, answered from the store thread: it may wait on a session's disk write or
/// read a transcript, which would hold this worker (and the connections behind it) meanwhile.
fn store_method(req: Request, ctx: &Ctx<'_>) {
    let gw = ctx.gw.clone();
    let outbox = ctx.lane.outbox.clone();
    let id = req.id.clone();
    let job = Box::new(move || {
        let p = &req.params;
        let answer = match req.method.as_str() {
            "chat.history" => chat_history(&gw, p),
            "sessions.list" => Ok(sessions_list(&gw)),
            "sessions.reset" => sessions_change(&gw, p, false),
            _ => sessions_change(&gw, p, true),
        };
        outbox.post(Outgoing::Res(answer_text(&req.id, answer)));
    });
    if !crate::session::run_off_loop(job) {
        let e = ErrorShape::new(ErrorCode::Unavailable, "the session store is busy")
            .with_details(json!({ "retryable": true, "retryAfterMs": 1000 }));
        ctx.send_err(&id, &e);
    }
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
