//! The `openai` backend: an upstream OpenAI-compatible server (llama.cpp `llama-server`, Ollama,
//! vLLM, LM Studio, LiteLLM…), always called with `stream: true`.
//!
//! One run is one HTTP/1.1 request on a kept-alive connection ([`super::client`]), its SSE body decoded
//! incrementally ([`crate::sse`]) and each content delta and tool-call piece forwarded the moment
//! its record is complete (tool-call pieces normalised by [`Assembler`]; the records of one
//! upstream read leave together). Upstream usage and finish reasons are mapped; every failure
//! becomes a [`RunError::Backend`] whose message starts with `upstream <baseUrl>:`. A cancel or
//! the run's deadline drops the connection at once, which is how the upstream learns to stop
//! generating. `fallbacks` are tried in order when an upstream fails before its first delta.

use std::fmt;

use serde_json::{Value, json};

use super::client::{Client, ClientOptions, Exchange};
use super::delta_scan;
use super::upstream::{self, BaseUrl, Stop, UpstreamError};
use crate::agent::tools::{Assembler, Calls, ToolCall, ToolCallPiece};
use crate::agent::{Backend, EventSink, FinishReason, Role, RunControl, RunError, RunInput, RunSink, Usage};
use crate::config::OpenAiBackendConfig;
use crate::sse::{Event, SseDecoder, SseError};

/// Most bytes of an error body kept for the message.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest non-streamed completion accepted (from an upstream that ignores `stream: true`).
const MAX_JSON_BODY: usize = 16 * 1024 * 1024;

/// Why an upstream exchange failed. `Display` omits the upstream's address (the backend adds it).
#[derive(Debug)]
pub enum OpenAiError {
    /// Transport or HTTP framing.
    Upstream(UpstreamError),
    /// The event stream itself.
    Sse(SseError),
    /// A non-2xx status, with the message found in its body.
    Status {
        /// HTTP status.
        code: u16,
        /// `error.message` (or the body's text), possibly empty.
        message: String,
    },
    /// An `{"error": …}` record (or an `event: error`) in the stream.
    ErrorRecord(String),
    /// A record that is not a JSON object.
    NotJson(String),
    /// The stream ended with neither a finish reason nor `[DONE]`.
    EndedEarly,
    /// A tool call that cannot be understood.
    ToolCall(String),
}

impl fmt::Display for OpenAiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenAiError::Upstream(e) => fmt::Display::fmt(e, f),
            OpenAiError::Sse(e) => write!(f, "malformed stream: {e}"),
            OpenAiError::Status { code, message } if message.is_empty() => write!(f, "HTTP {code}"),
            OpenAiError::Status { code, message } => write!(f, "HTTP {code}: {message}"),
            OpenAiError::ErrorRecord(m) => write!(f, "error in stream: {m}"),
            OpenAiError::NotJson(d) => write!(f, "malformed stream: record is not a JSON object: {d}"),
            OpenAiError::EndedEarly => {
                f.write_str("stream ended before the reply finished (no finish_reason, no [DONE])")
            }
            OpenAiError::ToolCall(m) => write!(f, "malformed tool call: {m}"),
        }
    }
}

impl std::error::Error for OpenAiError {}

/// Why an exchange stopped: the run's own reason, or the upstream's fault.
#[derive(Debug)]
pub enum Fail {
    /// Cancel, deadline, client gone.
    Run(RunError),
    /// The upstream failed or sent something malformed.
    Api(OpenAiError),
}

impl From<Stop> for Fail {
    fn from(s: Stop) -> Self {
        match s {
            Stop::Run(e) => Fail::Run(e),
            Stop::Upstream(e) => Fail::Api(OpenAiError::Upstream(e)),
        }
    }
}

impl From<OpenAiError> for Fail {
    fn from(e: OpenAiError) -> Self {
        Fail::Api(e)
    }
}

impl From<UpstreamError> for Fail {
    fn from(e: UpstreamError) -> Self {
        Fail::Api(OpenAiError::Upstream(e))
    }
}

impl From<SseError> for Fail {
    fn from(e: SseError) -> Self {
        Fail::Api(OpenAiError::Sse(e))
    }
}

impl From<RunError> for Fail {
    fn from(e: RunError) -> Self {
        Fail::Run(e)
    }
}

/// Upstream OpenAI-compatible server, with its fallbacks.
#[derive(Debug)]
pub struct OpenAi {
    /// The upstream first, then its fallbacks in order.
    targets: Vec<Target>,
}

/// One upstream: its settings, its client (connection pool) and its fixed request headers.
#[derive(Debug)]
struct Target {
    cfg: OpenAiBackendConfig,
    client: Result<Client, String>,
    headers: Vec<(String, String)>,
}

impl Target {
    fn new(cfg: OpenAiBackendConfig) -> Target {
        let opts = ClientOptions {
            connect_timeout: cfg.connect_timeout,
            read_timeout: cfg.read_timeout,
            max_idle: cfg.max_idle,
            idle_timeout: cfg.idle_timeout,
            ca_certs: cfg.ca_certs.clone(),
        };
        let client = BaseUrl::parse(&cfg.base_url).map_err(|e| e.to_string()).and_then(|u| Client::new(u, opts));
        let mut headers: Vec<(String, String)> = vec![
            ("Content-Type".into(), "application/json".into()),
            ("Accept".into(), "text/event-stream".into()),
            ("User-Agent".into(), concat!("gatelet/", env!("CARGO_PKG_VERSION")).into()),
        ];
        // Configured headers win over the defaults, `Authorization` included.
        headers.retain(|(k, _)| !cfg.headers.iter().any(|(c, _)| c.eq_ignore_ascii_case(k)));
        if let Some(k) = &cfg.api_key
            && !cfg.headers.iter().any(|(c, _)| c.eq_ignore_ascii_case("authorization"))
        {
            headers.push(("Authorization".into(), format!("Bearer {k}")));
        }
        headers.extend(cfg.headers.iter().cloned());
        Target { cfg, client, headers }
    }

    fn label(&self, e: impl fmt::Display) -> String {
        format!("upstream {}: {e}", self.cfg.base_url)
    }
}

impl OpenAi {
    /// A backend for `cfg` and its fallbacks (their `baseUrl`s were checked when the config was
    /// loaded).
    pub fn new(cfg: OpenAiBackendConfig) -> Self {
        let mut targets = vec![];
        let fallbacks = cfg.fallbacks.clone();
        targets.push(Target::new(OpenAiBackendConfig { fallbacks: Vec::new(), ..cfg }));
        targets.extend(fallbacks.into_iter().map(Target::new));
        OpenAi { targets }
    }
}

/// Whether a failure before the first delta moves the run to the next upstream: the upstream was
/// unreachable, too slow or overloaded (5xx, 429). A request the upstream refuses as such (other
/// 4xx) or a malformed answer would fail the same way elsewhere.
fn falls_back(e: &OpenAiError) -> bool {
    match e {
        OpenAiError::Upstream(u) => matches!(
            u,
            UpstreamError::Resolve(_)
                | UpstreamError::Connect(_)
                | UpstreamError::ConnectTimeout(_)
                | UpstreamError::Write(_)
                | UpstreamError::Read(_)
                | UpstreamError::ReadTimeout(_)
                | UpstreamError::ClosedBeforeHead
                | UpstreamError::Tls(_)
        ),
        OpenAiError::Status { code, .. } => *code >= 500 || *code == 429,
        _ => false,
    }
}

/// Forwards events, noting whether a delta or a tool-call piece went out (after which nothing
/// falls back).
struct Watch<'a> {
    inner: &'a mut dyn EventSink,
    delta: bool,
}

impl RunSink for Watch<'_> {
    fn delta(&mut self, text: &str) -> Result<(), RunError> {
        self.delta = true;
        self.inner.delta(text)
    }
    fn tool_call(&mut self, piece: &ToolCallPiece) -> Result<(), RunError> {
        self.delta = true;
        self.inner.tool_call(piece)
    }
    fn tool_event(&mut self, ev: &crate::agent::tools::ToolEvent<'_>) {
        self.inner.tool_event(ev)
    }
    fn tick(&mut self) -> Result<(), RunError> {
        self.inner.tick()
    }
    fn batch_begin(&mut self) {
        self.inner.batch_begin()
    }
    fn batch_end(&mut self) -> Result<(), RunError> {
        self.inner.batch_end()
    }
}

impl EventSink for Watch<'_> {
    fn usage(&mut self, usage: Usage) {
        self.inner.usage(usage)
    }
    fn finish(&mut self, reason: FinishReason) {
        self.inner.finish(reason)
    }
}

/// The JSON body sent upstream for `input`.
pub fn request_body(model: &str, input: &RunInput<'_>) -> Value {
    let mut messages = Vec::with_capacity(input.messages.len() + 1);
    if !input.system_prompt.is_empty() {
        messages.push(json!({ "role": "system", "content": input.system_prompt }));
    }
    for m in input.messages.iter() {
        let role = match m.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let mut msg = json!({ "role": role, "content": m.wire_content() });
        if let (Some(t), Some(obj)) = (&m.tool, msg.as_object_mut()) {
            obj.extend(t.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        messages.push(msg);
    }
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": { "include_usage": true },
    });
    let o = &input.options;
    if let Some(n) = o.max_tokens {
        body["max_tokens"] = n.into();
    }
    if let Some(t) = o.temperature {
        body["temperature"] = t.into();
    }
    if let Some(p) = o.top_p {
        body["top_p"] = p.into();
    }
    if !o.stop.is_empty() {
        body["stop"] = o.stop.clone().into();
    }
    if !o.tools.is_empty() {
        body["tools"] = Value::Array(o.tools.clone());
    }
    if let Some(c) = &o.tool_choice {
        body["tool_choice"] = c.clone();
    }
    if let Some(p) = o.parallel_tool_calls {
        body["parallel_tool_calls"] = p.into();
    }
    if let Some(obj) = body.as_object_mut() {
        obj.extend(o.passthrough.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    body
}

/// One tool-call piece as an upstream sent it (its own `index`; `id` and `name` when present).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawPiece {
    /// The upstream's `index`.
    pub index: u64,
    /// `id`.
    pub id: Option<String>,
    /// `function.name`.
    pub name: Option<String>,
    /// `function.arguments` (an object is serialised; absent is empty).
    pub arguments: String,
}

fn opt_str(v: Option<&Value>, what: &str) -> Result<Option<String>, OpenAiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => {
            Err(OpenAiError::ToolCall(format!("`{what}` must be a string, got {}", snippet(&other.to_string()))))
        }
    }
}

/// The pieces in a `tool_calls` array (`delta.tool_calls` or `message.tool_calls`). An element
/// without `index` takes its position in the array.
pub fn tool_pieces(v: Option<&Value>) -> Result<Vec<RawPiece>, OpenAiError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(OpenAiError::ToolCall(format!(
                "`tool_calls` must be an array, got {}",
                snippet(&other.to_string())
            )));
        }
    };
    let mut out = Vec::with_capacity(list.len());
    for (pos, c) in list.iter().enumerate() {
        let Some(o) = c.as_object() else {
            return Err(OpenAiError::ToolCall(format!("tool call must be an object, got {}", snippet(&c.to_string()))));
        };
        let index = match o.get("index") {
            None | Some(Value::Null) => pos as u64,
            Some(i) => i.as_u64().ok_or_else(|| {
                OpenAiError::ToolCall(format!(
                    "`index` must be a non-negative integer, got {}",
                    snippet(&i.to_string())
                ))
            })?,
        };
        let f = match o.get("function") {
            None | Some(Value::Null) => None,
            Some(f @ Value::Object(_)) => Some(f),
            Some(other) => {
                return Err(OpenAiError::ToolCall(format!(
                    "`function` must be an object, got {}",
                    snippet(&other.to_string())
                )));
            }
        };
        let arguments = match f.and_then(|f| f.get("arguments")) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            // Some servers send the arguments as an object rather than its JSON text.
            Some(v @ Value::Object(_)) => v.to_string(),
            Some(other) => {
                return Err(OpenAiError::ToolCall(format!(
                    "`arguments` must be a string, got {}",
                    snippet(&other.to_string())
                )));
            }
        };
        out.push(RawPiece {
            index,
            id: opt_str(o.get("id"), "id")?,
            name: opt_str(f.and_then(|f| f.get("name")), "function.name")?,
            arguments,
        });
    }
    Ok(out)
}

/// What one stream record says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// `choices[0].delta.content`.
    pub content: Option<String>,
    /// `choices[0].delta.tool_calls`.
    pub tool_calls: Vec<RawPiece>,
    /// `choices[0].finish_reason`, mapped (`length` → length, `tool_calls` → tool_calls, any
    /// other reason → stop).
    pub finish: Option<FinishReason>,
    /// `usage`, when it carries the two counts.
    pub usage: Option<Usage>,
    /// The record was `[DONE]`.
    pub done: bool,
}

/// The message of an OpenAI-style error body: `error.message`, `error` (a string), `message`
/// or `detail`, else the compact JSON.
pub fn error_message(v: &Value) -> String {
    let s = v["error"]["message"]
        .as_str()
        .or_else(|| v["error"].as_str())
        .or_else(|| v["message"].as_str())
        .or_else(|| v["detail"].as_str());
    match s {
        Some(s) => s.to_string(),
        None => snippet(&v.to_string()),
    }
}

fn snippet(s: &str) -> String {
    const MAX: usize = 300;
    let s = s.trim();
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn finish_of(v: &Value) -> Option<FinishReason> {
    match v.as_str()? {
        "length" => Some(FinishReason::Length),
        "tool_calls" | "function_call" => Some(FinishReason::ToolCalls),
        _ => Some(FinishReason::Stop),
    }
}

/// The first choice (the one with `index` 0 when indices are given).
fn first_choice(v: &Value) -> Option<&Value> {
    let choices = v["choices"].as_array()?;
    choices.iter().find(|c| c["index"].as_u64() == Some(0)).or_else(|| choices.first())
}

fn is_truthy(v: &Value) -> bool {
    !matches!(v, Value::Null | Value::Bool(false)) && v != &Value::String(String::new())
}

/// Interpret one stream record.
pub fn parse_event(ev: &Event) -> Result<Chunk, OpenAiError> {
    let data = ev.data.trim();
    if data == "[DONE]" {
        return Ok(Chunk { done: true, ..Chunk::default() });
    }
    let v: Option<Value> = serde_json::from_str(data).ok();
    if ev.event.as_deref() == Some("error") {
        return Err(OpenAiError::ErrorRecord(v.as_ref().map(error_message).unwrap_or_else(|| snippet(data))));
    }
    let Some(v @ Value::Object(_)) = v else { return Err(OpenAiError::NotJson(snippet(data))) };
    if v.get("error").is_some_and(is_truthy) {
        return Err(OpenAiError::ErrorRecord(error_message(&v)));
    }
    let mut chunk = Chunk { usage: v.get("usage").and_then(Usage::from_json), ..Chunk::default() };
    if let Some(c) = first_choice(&v) {
        chunk.content = c["delta"]["content"].as_str().map(String::from);
        chunk.tool_calls = tool_pieces(c["delta"].get("tool_calls"))?;
        chunk.finish = finish_of(&c["finish_reason"]);
    }
    Ok(chunk)
}

/// Interpret a whole `chat.completion` (an upstream that answered without streaming).
pub fn parse_completion(body: &[u8]) -> Result<Chunk, OpenAiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|_| OpenAiError::NotJson(snippet(&String::from_utf8_lossy(body))))?;
    if v.get("error").is_some_and(is_truthy) {
        return Err(OpenAiError::ErrorRecord(error_message(&v)));
    }
    let c = first_choice(&v).ok_or_else(|| OpenAiError::NotJson(snippet(&v.to_string())))?;
    Ok(Chunk {
        content: c["message"]["content"].as_str().map(String::from),
        tool_calls: tool_pieces(c["message"].get("tool_calls"))?,
        finish: finish_of(&c["finish_reason"]).or(Some(FinishReason::Stop)),
        usage: v.get("usage").and_then(Usage::from_json),
        done: true,
    })
}

/// Where the stream stands.
#[derive(Default)]
pub struct Progress {
    finished: bool,
    done: bool,
    calls: Assembler,
}

/// Forward what `chunk` says to `out`.
pub fn apply(chunk: Chunk, p: &mut Progress, out: &mut dyn EventSink) -> Result<(), Fail> {
    if let Some(text) = chunk.content.as_deref().filter(|t| !t.is_empty()) {
        out.delta(text)?;
    }
    for r in &chunk.tool_calls {
        let piece =
            p.calls.push(r.index, r.id.as_deref(), r.name.as_deref(), &r.arguments).map_err(OpenAiError::ToolCall)?;
        out.tool_call(&piece)?;
    }
    if let Some(u) = chunk.usage {
        out.usage(u);
    }
    if let Some(f) = chunk.finish {
        out.finish(f);
        p.finished = true;
    }
    p.done |= chunk.done;
    Ok(())
}

/// What an event-stream body says, decoded exactly as the backend decodes a live stream: for
/// tests and fuzzing, which feed it in arbitrary parts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoded {
    /// The reply text.
    pub text: String,
    /// The tool calls, whole.
    pub calls: Vec<ToolCall>,
    /// The finish reason, if one came.
    pub finish: Option<FinishReason>,
    /// `[DONE]` arrived (decoding stops there, as the backend does).
    pub done: bool,
}

struct Collect<'a>(&'a mut Decoded, Calls);

impl RunSink for Collect<'_> {
    fn delta(&mut self, text: &str) -> Result<(), RunError> {
        self.0.text.push_str(text);
        Ok(())
    }
    fn tool_call(&mut self, piece: &ToolCallPiece) -> Result<(), RunError> {
        self.1.add(piece).map_err(RunError::Backend)
    }
}

impl EventSink for Collect<'_> {
    fn usage(&mut self, _: Usage) {}
    fn finish(&mut self, reason: FinishReason) {
        self.0.finish = Some(reason);
    }
}

/// Decode an event-stream body given in `parts`; the error is the message a run would fail with.
pub fn decode_body(parts: &[&[u8]]) -> Result<Decoded, String> {
    let mut d = Decoded::default();
    let mut sink = Collect(&mut d, Calls::default());
    let mut dec = SseDecoder::default();
    let mut p = Progress::default();
    let mut events = Vec::new();
    let fail = |e: Fail| match e {
        Fail::Api(e) => e.to_string(),
        Fail::Run(e) => e.to_string(),
    };
    // Events decoded before a stream error still count, and nothing after `[DONE]` does, so
    // the result does not depend on how the body was cut.
    for part in parts.iter().map(Some).chain([None]) {
        let r = match part {
            Some(b) => dec.feed(b, &mut events),
            None => dec.finish(&mut events),
        };
        for ev in &events {
            handle(ev, &mut p, &mut sink).map_err(fail)?;
            if p.done {
                break;
            }
        }
        dec.recycle(&mut events);
        if p.done {
            break;
        }
        r.map_err(|e| OpenAiError::Sse(e).to_string())?;
    }
    let calls = sink.1.take();
    d.calls = calls;
    d.done = p.done;
    Ok(d)
}

impl Target {
    fn exchange(&self, input: &RunInput<'_>, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), Fail> {
        let client = match &self.client {
            Ok(c) => c,
            Err(e) => return Err(Fail::Run(RunError::Backend(self.label(e)))),
        };
        let model = self.cfg.model.as_deref().unwrap_or(&input.agent_id);
        let body = serde_json::to_vec(&request_body(model, input)).unwrap_or_default();
        let mut req = Vec::with_capacity(body.len() + 512);
        let headers = self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        upstream::encode_request(&mut req, client.url(), "/chat/completions", headers, &body);
        drop(body);

        let mut ex = client.send(&req, ctl, out)?;
        drop(req);
        if !(200..300).contains(&ex.head.status) {
            let text = read_capped(&mut ex, MAX_ERROR_BODY, ctl, out);
            let message = match serde_json::from_slice::<Value>(&text) {
                Ok(v) => error_message(&v),
                Err(_) => snippet(&String::from_utf8_lossy(&text)),
            };
            let code = ex.head.status;
            client.release(ex);
            return Err(OpenAiError::Status { code, message }.into());
        }
        if ex.head.content_type.as_deref().is_some_and(|t| t == "application/json" || t.ends_with("+json")) {
            let text = read_capped(&mut ex, MAX_JSON_BODY, ctl, out);
            let complete = ex.is_done();
            client.release(ex);
            let chunk = parse_completion(&text);
            if chunk.is_err() && !complete {
                return Err(UpstreamError::ClosedMidBody.into());
            }
            return apply(chunk?, &mut Progress::default(), out);
        }
        stream(client, ex, ctl, out)
    }
}

fn stream(client: &Client, mut ex: Exchange, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), Fail> {
    let mut dec = SseDecoder::default();
    let mut plain = Vec::with_capacity(16 * 1024);
    let mut events = Vec::new();
    let mut p = Progress::default();
    let eof = loop {
        plain.clear();
        let more = match ex.read_body(&mut plain, ctl, out) {
            Ok(more) => more,
            Err(Stop::Upstream(e @ UpstreamError::ClosedMidBody)) => break Err(e),
            Err(e) => return Err(e.into()),
        };
        dec.feed(&plain, &mut events)?;
        // The records of one read leave together, and at once: nothing waits for the next read.
        out.batch_begin();
        let mut applied = Ok(());
        for ev in &events {
            applied = handle(ev, &mut p, out);
            if applied.is_err() || p.done {
                break;
            }
        }
        dec.recycle(&mut events);
        // When `[DONE]` came with the end of the body, the run ends right here: what the sink
        // holds leaves in one write with the end of the stream instead of two.
        let ends_now = p.done && ex.is_done();
        if applied.is_err() || !ends_now {
            out.batch_end()?;
        }
        applied?;
        if p.done {
            // Nothing after `[DONE]` matters: keep the connection when the body ends right
            // after it, else close it rather than wait.
            if ex.finish_quietly(MAX_ERROR_BODY, ctl, out) {
                client.release(ex);
            }
            return Ok(());
        }
        if !more {
            break Ok(());
        }
    };
    // An unterminated last record counts only when the body itself ended cleanly.
    if eof.is_ok() {
        dec.finish(&mut events)?;
        for ev in events.drain(..) {
            handle(&ev, &mut p, out)?;
        }
        client.release(ex);
    }
    // A finish reason means the reply is whole even when `[DONE]` never came.
    if p.done || p.finished {
        return Ok(());
    }
    eof?;
    Err(OpenAiError::EndedEarly.into())
}

/// Forward one stream record: a plain content delta straight from borrowed strings (the common
/// case, no JSON tree), any other record through [`parse_event`] and [`apply`].
fn handle(ev: &Event, p: &mut Progress, out: &mut dyn EventSink) -> Result<(), Fail> {
    match plain_content(ev) {
        Some(text) if text.is_empty() => Ok(()),
        Some(text) => Ok(out.delta(&text)?),
        None => apply(parse_event(ev)?, p, out),
    }
}

/// The text of a record that is nothing but a content delta of the first choice (no finish
/// reason, usage, error, role change matters not, no tool or function call), read straight into
/// borrowed strings; `None` for any other record, which [`parse_event`] then reads in full. The
/// same meaning as `parse_event` for the records it accepts, at a fraction of the cost per token:
/// the usual record (no escapes) in one pass by [`delta_scan::plain_text`], the rest by
/// [`typed_plain_content`].
fn plain_content(ev: &Event) -> Option<std::borrow::Cow<'_, str>> {
    if ev.event.is_some() || !ev.data.trim_start().starts_with('{') {
        return None;
    }
    if let Some(text) = delta_scan::plain_text(&ev.data) {
        // Every debug build (tests, fuzzing) checks the one-pass reader against the typed one.
        debug_assert_eq!(typed_plain_content(&ev.data).as_deref(), Some(text), "{}", ev.data);
        return Some(std::borrow::Cow::Borrowed(text));
    }
    typed_plain_content(&ev.data)
}

/// [`plain_content`] for any JSON record, through serde's typed reader (borrowed where the text
/// has no escapes).
fn typed_plain_content(data: &str) -> Option<std::borrow::Cow<'_, str>> {
    use serde::Deserialize;
    use serde::de::IgnoredAny;
    use std::borrow::Cow;

    #[derive(Deserialize)]
    struct Record<'a> {
        #[serde(borrow)]
        choices: OnlyOne<Choice<'a>>,
        usage: Option<IgnoredAny>,
        error: Option<IgnoredAny>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        index: Option<u64>,
        #[serde(borrow)]
        delta: Delta<'a>,
        finish_reason: Option<IgnoredAny>,
    }
    #[derive(Deserialize)]
    struct Delta<'a> {
        #[serde(borrow)]
        content: Option<Cow<'a, str>>,
        tool_calls: Option<IgnoredAny>,
        function_call: Option<IgnoredAny>,
    }

    let r: Record<'_> = serde_json::from_str(data).ok()?;
    let c = r.choices.0?;
    let plain = r.usage.is_none()
        && r.error.is_none()
        && c.index.is_none_or(|i| i == 0)
        && c.finish_reason.is_none()
        && c.delta.tool_calls.is_none()
        && c.delta.function_call.is_none();
    if !plain {
        return None;
    }
    c.delta.content
}

/// The element of a one-element JSON array, without collecting the array (`None` for any other
/// length).
struct OnlyOne<T>(Option<T>);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for OnlyOne<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Seq<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Seq<T> {
            type Value = OnlyOne<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<T>()?;
                let mut more = false;
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    more = true;
                }
                Ok(OnlyOne(first.filter(|_| !more)))
            }
        }
        d.deserialize_seq(Seq(std::marker::PhantomData))
    }
}

/// Read the rest of a body, at most `cap` bytes (best effort: a read error ends it).
fn read_capped(ex: &mut Exchange, cap: usize, ctl: &RunControl, out: &mut dyn EventSink) -> Vec<u8> {
    let mut text = Vec::new();
    while let Ok(true) = ex.read_body(&mut text, ctl, out) {
        if text.len() >= cap {
            break;
        }
    }
    text.truncate(cap);
    text
}

impl Backend for OpenAi {
    fn run(&self, input: &RunInput<'_>, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), RunError> {
        let mut tried: Vec<String> = Vec::new();
        for (i, t) in self.targets.iter().enumerate() {
            let mut watch = Watch { inner: out, delta: false };
            let e = match t.exchange(input, ctl, &mut watch) {
                Ok(()) => return Ok(()),
                Err(Fail::Run(e)) => return Err(e),
                Err(Fail::Api(e)) => e,
            };
            let last = i + 1 == self.targets.len();
            let go_on = !last && !watch.delta && falls_back(&e);
            tried.push(t.label(&e));
            if !go_on {
                break;
            }
            crate::log!(Warn, "{}; trying the next fallback", t.label(&e));
        }
        Err(RunError::Backend(tried.join("; then ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{ChatMessage, RunOptions};

    fn ev(data: &str) -> Event {
        Event { event: None, data: data.into() }
    }

    #[test]
    fn request_body_carries_context_and_options() {
        let input = RunInput {
            run_id: "r".into(),
            agent_id: "a".into(),
            session_key: "agent:a:k".into(),
            system_prompt: "Be brief.".into(),
            messages: vec![ChatMessage::new(Role::User, "hi"), ChatMessage::new(Role::Assistant, "yo")].into(),
            options: RunOptions {
                max_tokens: Some(5),
                temperature: Some(0.5),
                stop: vec!["\n".into()],
                ..Default::default()
            },
            prompt_words: 0,
        };
        let b = request_body("m", &input);
        assert_eq!(
            b,
            json!({"model":"m","stream":true,"stream_options":{"include_usage":true},
                   "messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"},
                               {"role":"assistant","content":"yo"}],
                   "max_tokens":5,"temperature":0.5,"stop":["\n"]})
        );
        let bare = RunInput { system_prompt: String::new(), options: RunOptions::default(), ..input };
        let b = request_body("m", &bare);
        assert_eq!(b["messages"][0]["role"], "user");
        assert!(b.get("max_tokens").is_none() && b.get("stop").is_none() && b.get("top_p").is_none());
    }

    #[test]
    fn tool_calling_fields_go_upstream_verbatim() {
        let call = json!([{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]);
        let mut asst = ChatMessage::new(Role::Assistant, "");
        asst.tool = Some([("tool_calls".to_string(), call.clone())].into_iter().collect());
        let mut tool = ChatMessage::new(Role::Tool, "42");
        tool.tool = Some([("tool_call_id".to_string(), json!("call_1"))].into_iter().collect());
        let input = RunInput {
            run_id: "r".into(),
            agent_id: "a".into(),
            session_key: "agent:a:k".into(),
            system_prompt: String::new(),
            messages: vec![ChatMessage::new(Role::User, "hi"), asst, tool].into(),
            options: RunOptions::default(),
            prompt_words: 0,
        };
        let b = request_body("m", &input);
        assert_eq!(b["messages"][1], json!({"role":"assistant","content":"","tool_calls":call}));
        assert_eq!(b["messages"][2], json!({"role":"tool","content":"42","tool_call_id":"call_1"}));
    }

    #[test]
    fn records() {
        let ok = |content: Option<&str>, finish, usage, done| {
            Ok(Chunk { content: content.map(String::from), tool_calls: Vec::new(), finish, usage, done })
        };
        let u = Some(Usage { prompt_tokens: 3, completion_tokens: 2 });
        let cases: Vec<(&str, Result<Chunk, String>)> = vec![
            ("[DONE]", ok(None, None, None, true)),
            (r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#, ok(None, None, None, false)),
            (
                r#"{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
                ok(Some("Hi"), None, None, false),
            ),
            (
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#,
                ok(None, Some(FinishReason::Length), None, false),
            ),
            (
                r#"{"choices":[{"delta":{},"finish_reason":"tool_calls"}]}"#,
                ok(None, Some(FinishReason::ToolCalls), None, false),
            ),
            (
                r#"{"choices":[{"index":1,"delta":{"content":"B"}},{"index":0,"delta":{"content":"A"}}]}"#,
                ok(Some("A"), None, None, false),
            ),
            (
                r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
                ok(None, None, u, false),
            ),
            // llama.cpp puts usage on the finish chunk.
            (
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#,
                ok(None, Some(FinishReason::Stop), u, false),
            ),
            (
                r#"{"choices":[{"index":0,"delta":{"content":"x"}}],"usage":null,"error":null}"#,
                ok(Some("x"), None, None, false),
            ),
            (r#"{"error":{"message":"boom","type":"server_error","code":500}}"#, Err("error in stream: boom".into())),
            (r#"{"error":"Unauthorized"}"#, Err("error in stream: Unauthorized".into())),
            ("not json", Err("malformed stream: record is not a JSON object: not json".into())),
            ("[1,2]", Err("malformed stream: record is not a JSON object: [1,2]".into())),
        ];
        for (data, want) in cases {
            let got = parse_event(&ev(data)).map_err(|e| e.to_string());
            assert_eq!(got, want, "{data}");
        }
        let named = Event { event: Some("error".into()), data: r#"{"message":"overloaded"}"#.into() };
        assert_eq!(parse_event(&named).unwrap_err().to_string(), "error in stream: overloaded");
    }

    #[test]
    fn plain_content_records_match_the_full_reader() {
        let cases = [
            (r#"{"id":"x","choices":[{"index":0,"delta":{"content":"Hi \"q\" \u00e9"},"finish_reason":null}]}"#, true),
            (r#"{"choices":[{"delta":{"role":"assistant","content":"a"},"logprobs":null}],"usage":null}"#, true),
            (r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null}}]}"#, false),
            (r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}"#, false),
            (
                r#"{"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
                false,
            ),
            (r#"{"choices":[{"index":1,"delta":{"content":"x"}}]}"#, false),
            (r#"{"choices":[{"index":1,"delta":{"content":"B"}},{"index":0,"delta":{"content":"A"}}]}"#, false),
            (r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{"}}]}}]}"#, false),
            (r#"{"choices":[{"index":0,"delta":{"content":"x"}}],"error":{"message":"boom"}}"#, false),
            (r#"{"choices":[]}"#, false),
            ("[DONE]", false),
            ("not json", false),
        ];
        for (data, fast) in cases {
            let e = ev(data);
            let got = plain_content(&e);
            assert_eq!(got.is_some(), fast, "{data}");
            if let Some(text) = got {
                let full = parse_event(&ev(data)).unwrap();
                assert_eq!(full.content.unwrap_or_default(), text, "{data}");
                assert!(full.finish.is_none() && full.usage.is_none() && !full.done, "{data}");
            }
        }
        let named = Event { event: Some("error".into()), data: r#"{"choices":[{"delta":{"content":"x"}}]}"#.into() };
        assert!(plain_content(&named).is_none());
    }

    #[test]
    fn the_one_pass_reader_agrees_with_the_typed_one_on_mutated_records() {
        let seeds = [
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" tok5"},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"choices":[{"delta":{"role":"assistant","content":""}}],"usage":null,"error":null}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"x","tool_calls":null,"function_call":null},"finish_reason":"stop"}]}"#,
            r#"{"x":[1,-2.5e+3,{"y":[true,false,null]}],"choices":[{"delta":{"content":"é ü"}}],"usage":{"total_tokens":3}}"#,
        ];
        // Pieces a mutation inserts: JSON's own punctuation and words, and the keys that matter.
        let pieces: &[&str] = &[
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            "\"",
            "\\",
            " ",
            "0",
            "1",
            "-",
            ".",
            "e",
            "null",
            "true",
            "\"content\":",
            "\"choices\":",
            "\"index\":",
            "\"delta\":",
            "\"usage\":",
            "\"finish_reason\":",
            "\"tool_calls\":",
            "\u{1}",
        ];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let (mut fast, mut total) = (0, 0);
        for round in 0..40_000 {
            let mut r = seeds[round % seeds.len()].to_string();
            for _ in 0..1 + next(3) {
                let at = (0..=next(r.len() + 1)).rev().find(|&i| r.is_char_boundary(i)).unwrap_or(0);
                match next(3) {
                    0 => r.insert_str(at, pieces[next(pieces.len())]),
                    1 => {
                        let end = (at + 1..=r.len()).find(|&i| r.is_char_boundary(i)).unwrap_or(r.len());
                        r.replace_range(at..end, "");
                    }
                    _ => {
                        let end = (at + 1 + next(8)..=r.len()).find(|&i| r.is_char_boundary(i)).unwrap_or(r.len());
                        r.replace_range(at..end.max(at), pieces[next(pieces.len())]);
                    }
                }
            }
            total += 1;
            if let Some(text) = delta_scan::plain_text(&r) {
                fast += 1;
                assert_eq!(typed_plain_content(&r).as_deref(), Some(text), "{r}");
            }
        }
        // The mutations leave a good share of records plain, so the agreement is tested.
        assert!(fast > total / 20, "{fast} of {total}");
        for seed in &seeds[..2] {
            assert!(delta_scan::plain_text(seed).is_some(), "{seed}");
        }
    }

    #[test]
    fn whole_completion() {
        let c = parse_completion(
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],
                "usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        )
        .unwrap();
        assert_eq!(c.content.as_deref(), Some("Hello"));
        assert_eq!(c.finish, Some(FinishReason::Stop));
        assert!(parse_completion(b"{}").is_err());
        assert!(parse_completion(br#"{"error":{"message":"no"}}"#).unwrap_err().to_string().contains("no"));
    }

    #[derive(Default)]
    struct Seen {
        text: String,
        pieces: Vec<ToolCallPiece>,
        calls: Calls,
    }
    impl RunSink for Seen {
        fn delta(&mut self, t: &str) -> Result<(), RunError> {
            self.text.push_str(t);
            Ok(())
        }
        fn tool_call(&mut self, p: &ToolCallPiece) -> Result<(), RunError> {
            self.calls.add(p).map_err(RunError::Backend)?;
            self.pieces.push(p.clone());
            Ok(())
        }
    }

    impl EventSink for Seen {
        fn usage(&mut self, _: Usage) {}
        fn finish(&mut self, _: FinishReason) {}
    }

    /// Decode `bytes` as an SSE body fed in pieces of `step` bytes.
    fn decode(bytes: &[u8], step: usize) -> Result<Seen, String> {
        let mut dec = SseDecoder::default();
        let mut events = Vec::new();
        let mut p = Progress::default();
        let mut seen = Seen::default();
        for part in bytes.chunks(step) {
            dec.feed(part, &mut events).map_err(|e| e.to_string())?;
            for ev in events.drain(..) {
                let chunk = parse_event(&ev).map_err(|e| e.to_string())?;
                apply(chunk, &mut p, &mut seen).map_err(|e| match e {
                    Fail::Api(e) => e.to_string(),
                    Fail::Run(e) => e.to_string(),
                })?;
            }
        }
        Ok(seen)
    }

    fn rec(delta: Value) -> String {
        format!("data: {}\n\n", json!({"choices":[{"index":0,"delta":delta,"finish_reason":null}]}))
    }

    #[test]
    fn tool_calls_decode_whatever_the_split() {
        let stream = [
            rec(json!({"role":"assistant","content":null})),
            rec(json!({"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":""}}]})),
            rec(json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]})),
            // A second call starts while the first is unfinished (interleaved by index).
            rec(json!({"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"get_time","arguments":"{\"tz\""}}]})),
            rec(json!({"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]})),
            rec(json!({"tool_calls":[{"index":1,"function":{"arguments":":\"CET\"}"}}]})),
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\ndata: [DONE]\n\n".to_string(),
        ]
        .concat();
        let want = [
            ToolCall { id: "call_a".into(), name: "get_weather".into(), arguments: "{\"city\":\"Paris\"}".into() },
            ToolCall { id: "call_b".into(), name: "get_time".into(), arguments: "{\"tz\":\"CET\"}".into() },
        ];
        for step in [1, 2, 3, 7, 64, stream.len()] {
            let seen = decode(stream.as_bytes(), step).unwrap();
            assert_eq!(seen.calls.calls(), &want[..], "step {step}");
            assert_eq!(seen.text, "");
            // Each upstream piece is forwarded as its own piece, in arrival order.
            let args: Vec<(usize, &str)> = seen.pieces.iter().map(|p| (p.index, p.arguments.as_str())).collect();
            assert_eq!(
                args,
                vec![(0, ""), (0, "{\"ci"), (1, "{\"tz\""), (0, "ty\":\"Paris\"}"), (1, ":\"CET\"}")],
                "step {step}"
            );
        }
    }

    #[test]
    fn upstream_indexes_are_renumbered_and_ids_made_up() {
        // Some servers number from 1, or leave out the id or the index.
        let stream = [
            rec(json!({"tool_calls":[{"index":3,"function":{"name":"f","arguments":"{}"}}]})),
            rec(json!({"tool_calls":[{"function":{"name":"g","arguments":{"a":1}}}]})),
        ]
        .concat();
        let seen = decode(stream.as_bytes(), 5).unwrap();
        let c = seen.calls.calls();
        assert_eq!((c[0].name.as_str(), c[0].arguments.as_str()), ("f", "{}"));
        assert!(c[0].id.starts_with("call_"));
        assert_eq!((c[1].name.as_str(), c[1].arguments.as_str()), ("g", "{\"a\":1}"));
    }

    #[test]
    fn malformed_tool_calls_are_backend_errors() {
        let cases = [
            (json!({"tool_calls":{"index":0}}), "`tool_calls` must be an array"),
            (json!({"tool_calls":[5]}), "tool call must be an object"),
            (json!({"tool_calls":[{"index":-1,"function":{"name":"f"}}]}), "`index` must be a non-negative integer"),
            (json!({"tool_calls":[{"index":"0","function":{"name":"f"}}]}), "`index` must be a non-negative integer"),
            (json!({"tool_calls":[{"index":0,"function":"f"}]}), "`function` must be an object"),
            (json!({"tool_calls":[{"index":0,"function":{"name":7}}]}), "`function.name` must be a string"),
            (json!({"tool_calls":[{"index":0,"id":1,"function":{"name":"f"}}]}), "`id` must be a string"),
            (
                json!({"tool_calls":[{"index":0,"function":{"name":"f","arguments":[1]}}]}),
                "`arguments` must be a string",
            ),
            // A call's first piece must name the function.
            (
                json!({"tool_calls":[{"index":0,"id":"c","function":{"arguments":"{}"}}]}),
                "starts without a function name",
            ),
        ];
        for (delta, want) in cases {
            let err = decode(rec(delta.clone()).as_bytes(), 3).map(|_| ()).unwrap_err();
            assert!(err.starts_with("malformed tool call: ") && err.contains(want), "{delta}: {err}");
        }
        let whole = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":"x"}}]}"#;
        assert!(parse_completion(whole).unwrap_err().to_string().contains("`tool_calls` must be an array"));
    }

    #[test]
    fn whole_completion_with_tool_calls() {
        let c = parse_completion(
            br#"{"choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}},
                {"id":"call_2","type":"function","function":{"name":"g","arguments":"{}"}}]},
                "finish_reason":"tool_calls"}]}"#,
        )
        .unwrap();
        assert_eq!(c.finish, Some(FinishReason::ToolCalls));
        assert_eq!(c.content, None);
        let mut seen = Seen::default();
        assert!(apply(c, &mut Progress::default(), &mut seen).is_ok());
        let calls = seen.calls.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[0].id.as_str(), calls[0].arguments.as_str()), ("call_1", "{\"x\":1}"));
        assert_eq!(calls[1].name, "g");
    }

    #[test]
    fn request_body_forwards_tool_and_output_fields_only_when_sent() {
        let mut o = RunOptions::default();
        let base = RunInput {
            run_id: "r".into(),
            agent_id: "a".into(),
            session_key: "agent:a:k".into(),
            system_prompt: String::new(),
            messages: vec![ChatMessage::new(Role::User, "hi")].into(),
            options: o.clone(),
            prompt_words: 0,
        };
        let keys = |b: &Value| b.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&request_body("m", &base)), vec!["messages", "model", "stream", "stream_options"]);
        o.tools = vec![json!({"type":"function","function":{"name":"f"}})];
        o.tool_choice = Some(json!("required"));
        o.parallel_tool_calls = Some(false);
        o.passthrough.insert("seed".into(), json!(7));
        o.passthrough.insert("response_format".into(), json!({"type":"json_object"}));
        let b = request_body("m", &RunInput { options: o, ..base });
        assert_eq!(b["tools"], json!([{"type":"function","function":{"name":"f"}}]));
        assert_eq!(b["tool_choice"], "required");
        assert_eq!(b["parallel_tool_calls"], false);
        assert_eq!(b["seed"], 7);
        assert_eq!(b["response_format"], json!({"type":"json_object"}));
    }

    #[test]
    fn content_parts_and_null_go_upstream_verbatim() {
        let parts = json!([{"type":"text","text":"what is this?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]);
        let mut user = ChatMessage::new(Role::User, "what is this?");
        user.raw_content = Some(parts.clone());
        let asst =
            ChatMessage::assistant_calls("", &[ToolCall { id: "c".into(), name: "f".into(), arguments: "{}".into() }]);
        let input = RunInput {
            run_id: "r".into(),
            agent_id: "a".into(),
            session_key: "agent:a:k".into(),
            system_prompt: String::new(),
            messages: vec![user, asst].into(),
            options: RunOptions::default(),
            prompt_words: 0,
        };
        let b = request_body("m", &input);
        assert_eq!(b["messages"][0]["content"], parts);
        assert_eq!(b["messages"][1]["content"], Value::Null);
        assert_eq!(b["messages"][1]["tool_calls"][0]["function"]["name"], "f");
    }

    #[test]
    fn error_messages() {
        assert_eq!(error_message(&json!({"detail":"Not Found"})), "Not Found");
        assert_eq!(error_message(&json!({"message":"m"})), "m");
        assert_eq!(error_message(&json!({"x":1})), r#"{"x":1}"#);
        assert_eq!(snippet(&"é".repeat(400)).chars().count(), 151);
    }
}
