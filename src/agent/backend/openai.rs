//! The `openai` backend: an upstream OpenAI-compatible server (llama.cpp `llama-server`, Ollama,
//! vLLM, LM Studio, LiteLLM…), always called with `stream: true`.
//!
//! One run is one HTTP/1.1 request on a kept-alive connection ([`client`]), its SSE body decoded
//! incrementally ([`crate::sse`]) and each content delta forwarded the moment its record is
//! complete (the records of one upstream read leave together). Upstream usage and finish reasons
//! are mapped; every failure becomes a [`RunError::Backend`] whose message starts with
//! `upstream <baseUrl>:`. A cancel or the run's deadline drops the connection at once, which is
//! how the upstream learns to stop generating. `fallbacks` are tried in order when an upstream
//! fails before its first delta.

use std::fmt;

use serde_json::{Value, json};

use super::client::{Client, ClientOptions, Exchange};
use super::upstream::{self, BaseUrl, Stop, UpstreamError};
use crate::agent::{Backend, EventSink, FinishReason, Role, RunControl, RunError, RunInput, Usage};
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
        }
    }
}

impl std::error::Error for OpenAiError {}

enum Fail {
    Run(RunError),
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

    /// Idle pooled connections of the first upstream (for tests and diagnostics).
    pub fn idle_connections(&self) -> usize {
        self.targets[0].client.as_ref().map_or(0, Client::idle_count)
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

/// Forwards events, noting whether a delta went out (after which nothing falls back).
struct Watch<'a> {
    inner: &'a mut dyn EventSink,
    delta: bool,
}

impl EventSink for Watch<'_> {
    fn delta(&mut self, text: &str) -> Result<(), RunError> {
        self.delta = true;
        self.inner.delta(text)
    }
    fn usage(&mut self, usage: Usage) {
        self.inner.usage(usage)
    }
    fn finish(&mut self, reason: FinishReason) {
        self.inner.finish(reason)
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

/// The JSON body sent upstream for `input`.
pub fn request_body(model: &str, input: &RunInput) -> Value {
    let mut messages = Vec::with_capacity(input.messages.len() + 1);
    if !input.system_prompt.is_empty() {
        messages.push(json!({ "role": "system", "content": input.system_prompt }));
    }
    for m in &input.messages {
        let role = match m.role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let mut msg = json!({ "role": role, "content": m.content });
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
    body
}

/// What one stream record says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chunk {
    /// `choices[0].delta.content`.
    pub content: Option<String>,
    /// `choices[0].finish_reason`, mapped (`length` → length, any other reason → stop).
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

fn usage_of(v: &Value) -> Option<Usage> {
    Some(Usage { prompt_tokens: v["prompt_tokens"].as_u64()?, completion_tokens: v["completion_tokens"].as_u64()? })
}

fn finish_of(v: &Value) -> Option<FinishReason> {
    match v.as_str()? {
        "length" => Some(FinishReason::Length),
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
    let mut chunk = Chunk { usage: v.get("usage").and_then(usage_of), ..Chunk::default() };
    if let Some(c) = first_choice(&v) {
        chunk.content = c["delta"]["content"].as_str().map(String::from);
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
        finish: finish_of(&c["finish_reason"]).or(Some(FinishReason::Stop)),
        usage: v.get("usage").and_then(usage_of),
        done: true,
    })
}

/// Where the stream stands.
#[derive(Default)]
struct Progress {
    finished: bool,
    done: bool,
}

fn apply(chunk: Chunk, p: &mut Progress, out: &mut dyn EventSink) -> Result<(), RunError> {
    if let Some(text) = chunk.content.as_deref().filter(|t| !t.is_empty()) {
        out.delta(text)?;
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

impl Target {
    fn exchange(&self, input: &RunInput, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), Fail> {
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
            return Ok(apply(chunk?, &mut Progress::default(), out)?);
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
        for ev in events.drain(..) {
            if let Some(text) = plain_content(&ev) {
                // The common record, read without building a JSON tree.
                applied = if text.is_empty() { Ok(()) } else { out.delta(&text).map_err(Fail::from) };
                if applied.is_err() {
                    break;
                }
                continue;
            }
            applied = parse_event(&ev).map_err(Fail::from).and_then(|c| apply(c, &mut p, out).map_err(Fail::from));
            if applied.is_err() || p.done {
                break;
            }
        }
        out.batch_end()?;
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
            apply(parse_event(&ev)?, &mut p, out)?;
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

/// The text of a record that is nothing but a content delta of the first choice (no finish
/// reason, usage, error, role change matters not, no tool or function call), read straight into
/// borrowed strings; `None` for any other record, which [`parse_event`] then reads in full. The
/// same meaning as `parse_event` for the records it accepts, at a fraction of the cost per token.
fn plain_content(ev: &Event) -> Option<std::borrow::Cow<'_, str>> {
    use serde::Deserialize;
    use serde::de::IgnoredAny;
    use std::borrow::Cow;

    #[derive(Deserialize)]
    struct Record<'a> {
        #[serde(borrow)]
        choices: Vec<Choice<'a>>,
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

    if ev.event.is_some() || !ev.data.trim_start().starts_with('{') {
        return None;
    }
    let r: Record<'_> = serde_json::from_str(&ev.data).ok()?;
    let [c] = <[Choice<'_>; 1]>::try_from(r.choices).ok()?;
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
    fn run(&self, input: &RunInput, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), RunError> {
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
            messages: vec![ChatMessage::new(Role::User, "hi"), ChatMessage::new(Role::Assistant, "yo")],
            options: RunOptions { max_tokens: Some(5), temperature: Some(0.5), top_p: None, stop: vec!["\n".into()] },
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
            messages: vec![ChatMessage::new(Role::User, "hi"), asst, tool],
            options: RunOptions::default(),
        };
        let b = request_body("m", &input);
        assert_eq!(b["messages"][1], json!({"role":"assistant","content":"","tool_calls":call}));
        assert_eq!(b["messages"][2], json!({"role":"tool","content":"42","tool_call_id":"call_1"}));
    }

    #[test]
    fn records() {
        let ok = |content: Option<&str>, finish, usage, done| {
            Ok(Chunk { content: content.map(String::from), finish, usage, done })
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
                ok(None, Some(FinishReason::Stop), None, false),
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

    #[test]
    fn error_messages() {
        assert_eq!(error_message(&json!({"detail":"Not Found"})), "Not Found");
        assert_eq!(error_message(&json!({"message":"m"})), "m");
        assert_eq!(error_message(&json!({"x":1})), r#"{"x":1}"#);
        assert_eq!(snippet(&"é".repeat(400)).chars().count(), 151);
    }
}
