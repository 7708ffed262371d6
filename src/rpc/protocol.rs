//! Gateway protocol 3 frames (SPEC §8): one JSON object per text message.
//!
//! - request `{"type":"req","id","method","params"}` (client → server)
//! - response `{"type":"res","id","ok","payload"|"error":{"code","message","details"}}`
//! - event `{"type":"event","event","payload","seq"}`
//!
//! Parsing and rendering only, called on the request workers and the run threads, never on the
//! event loop; what the methods do lives in `super::handler`.

use std::fmt;

use serde_json::{Map, Value, json};

use crate::agent::RunError;
use crate::agent::registry::RunSummary;
use crate::agent::resolve::ResolveError;

/// The protocol version spoken.
pub const PROTOCOL: u64 = 3;

/// Error codes of `res` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Malformed frame, bad params, unknown method, protocol mismatch.
    InvalidRequest,
    /// Missing or wrong credentials, or locked out.
    Unauthorized,
    /// Unknown run, session or agent.
    NotFound,
    /// The gateway cannot run it now (queue full, backend failure, aborted).
    Unavailable,
    /// The agent's deadline passed.
    AgentTimeout,
}

impl ErrorCode {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::AgentTimeout => "AGENT_TIMEOUT",
        }
    }
}

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorShape {
    /// Code.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
    /// Extra machine-readable data.
    pub details: Option<Value>,
}

impl ErrorShape {
    /// An error without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorShape { code, message: message.into(), details: None }
    }

    /// `INVALID_REQUEST`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// Attach details.
    pub fn with_details(mut self, d: Value) -> Self {
        self.details = Some(d);
        self
    }
}

/// A client request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Request id, echoed in the answers.
    pub id: String,
    /// Method name.
    pub method: String,
    /// Params (`null` when absent).
    pub params: Value,
}

/// Why a text message is not a request. Carries the id when one could be read, so the error can
/// still be answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The request id, if the frame had a usable one.
    pub id: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
thread_local! {
    /// Requests parsed on this thread (tests check that the event loop's thread parses none).
    pub(crate) static PARSED_HERE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Parse one text message as a request frame.
pub fn parse_request(text: &str) -> Result<Request, FrameError> {
    #[cfg(test)]
    PARSED_HERE.with(|n| n.set(n.get() + 1));
    let err = |id: Option<String>, m: &str| FrameError { id, message: m.to_string() };
    let v: Value = serde_json::from_str(text).map_err(|e| err(None, &format!("invalid JSON: {e}")))?;
    let Value::Object(mut o) = v else { return Err(err(None, "a frame must be a JSON object")) };
    let id = match o.get("id") {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    };
    if o.get("type").and_then(Value::as_str) != Some("req") {
        return Err(err(id, "a client frame must have type \"req\""));
    }
    let Some(id) = id else { return Err(err(None, "a request needs a non-empty string id")) };
    let method = match o.get("method") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(err(Some(id), "a request needs a non-empty string method")),
    };
    let params = o.remove("params").unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_)) {
        return Err(err(Some(id), "params must be an object"));
    }
    Ok(Request { id, method, params })
}

/// A successful `res` frame.
pub fn res_ok(id: &str, payload: &Value) -> String {
    json!({ "type": "res", "id": id, "ok": true, "payload": payload }).to_string()
}

/// A failed `res` frame (`id` `null` when the request had none).
pub fn res_err(id: Option<&str>, e: &ErrorShape) -> String {
    let mut err = Map::new();
    err.insert("code".into(), e.code.as_str().into());
    err.insert("message".into(), e.message.clone().into());
    if let Some(d) = &e.details {
        err.insert("details".into(), d.clone());
    }
    json!({ "type": "res", "id": id, "ok": false, "error": err }).to_string()
}

/// An `event` frame around an already-rendered JSON payload.
pub fn event(name: &str, payload_json: &str, seq: u64) -> String {
    let mut s = String::with_capacity(payload_json.len() + name.len() + 48);
    s.push_str("{\"type\":\"event\",\"event\":");
    s.push_str(&Value::from(name).to_string());
    s.push_str(",\"payload\":");
    s.push_str(payload_json);
    s.push_str(",\"seq\":");
    s.push_str(&seq.to_string());
    s.push('}');
    s
}

/// An agent or session key a request names that cannot be used: `NOT_FOUND` for an agent,
/// `INVALID_REQUEST` for a key, in the protocol's own parameter names.
impl From<ResolveError> for ErrorShape {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::NoAgent(id) => ErrorShape::new(ErrorCode::NotFound, format!("no agent {id} is configured")),
            ResolveError::UnknownModel(m) => ErrorShape::new(ErrorCode::NotFound, format!("no model {m}")),
            ResolveError::Key(e) => ErrorShape::invalid(format!("sessionKey {e}")),
            ResolveError::KeyOfOtherAgent { key_agent, agent } => {
                ErrorShape::invalid(format!("sessionKey belongs to agent {key_agent}, not {agent}"))
            }
        }
    }
}

/// The error answer for a failed run.
pub fn run_error(e: &RunError) -> ErrorShape {
    match e {
        RunError::Timeout => ErrorShape::new(ErrorCode::AgentTimeout, "the agent run timed out"),
        RunError::Cancelled => ErrorShape::new(ErrorCode::Unavailable, "the run was aborted"),
        RunError::Backend(m) => ErrorShape::new(ErrorCode::Unavailable, m.clone()),
    }
}

/// `"ok"`, `"aborted"` or `"error"`.
pub fn run_status(s: &RunSummary) -> &'static str {
    match &s.error {
        None => "ok",
        Some(RunError::Cancelled) => "aborted",
        Some(_) => "error",
    }
}

/// The result object of a finished run: reply text, finish reason and usage, and the tool calls
/// when the run ended on calls to tools the caller runs.
pub fn run_result(s: &RunSummary) -> Value {
    let mut v = json!({
        "text": s.text,
        "finishReason": if s.error.is_some() { "error" } else { s.finish.as_str() },
        "usage": s.usage.to_json(true),
        "sessionKey": s.session_key,
        "agentId": s.agent_id,
    });
    if !s.tool_calls.is_empty() {
        v["toolCalls"] = s.tool_calls.iter().map(crate::agent::tools::ToolCall::to_json).collect();
    }
    v
}

/// The second answer to an `agent` request.
pub fn agent_final(req_id: &str, s: &RunSummary) -> String {
    match &s.error {
        None => res_ok(
            req_id,
            &json!({ "runId": s.run_id, "status": "ok", "summary": "completed", "result": run_result(s) }),
        ),
        Some(e) => res_err(
            Some(req_id),
            &run_error(e).with_details(json!({ "runId": s.run_id, "status": run_status(s), "result": run_result(s) })),
        ),
    }
}

/// The `agent.wait` payload for a finished run.
pub fn wait_payload(s: &RunSummary) -> Value {
    let mut v = json!({
        "runId": s.run_id,
        "status": if s.error.is_none() { "ok" } else { "error" },
        "startedAt": s.started_at,
        "endedAt": s.ended_at,
    });
    if let Some(e) = &s.error {
        v["error"] = e.to_string().into();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let r = parse_request(r#"{"type":"req","id":"1","method":"health"}"#).unwrap();
        assert_eq!((r.id.as_str(), r.method.as_str(), &r.params), ("1", "health", &Value::Null));
        let r = parse_request(r#"{"type":"req","id":"a","method":"agent","params":{"message":"hi"}}"#).unwrap();
        assert_eq!(r.params["message"], "hi");
        let cases: &[(&str, Option<&str>)] = &[
            ("nope", None),
            ("[]", None),
            (r#"{"type":"res","id":"1","method":"x"}"#, Some("1")),
            (r#"{"type":"req","id":1,"method":"x"}"#, None),
            (r#"{"type":"req","id":"","method":"x"}"#, None),
            (r#"{"type":"req","id":"2"}"#, Some("2")),
            (r#"{"type":"req","id":"3","method":"x","params":[1]}"#, Some("3")),
        ];
        for (text, id) in cases {
            assert_eq!(parse_request(text).unwrap_err().id.as_deref(), *id, "{text}");
        }
    }

    #[test]
    fn frames_render() {
        let v: Value = serde_json::from_str(&res_ok("7", &json!({"a":1}))).unwrap();
        assert_eq!(v, json!({"type":"res","id":"7","ok":true,"payload":{"a":1}}));
        let e = ErrorShape::new(ErrorCode::NotFound, "no run").with_details(json!({"runId":"r"}));
        let v: Value = serde_json::from_str(&res_err(Some("8"), &e)).unwrap();
        assert_eq!(
            v,
            json!({"type":"res","id":"8","ok":false,"error":{"code":"NOT_FOUND","message":"no run","details":{"runId":"r"}}})
        );
        let v: Value = serde_json::from_str(&res_err(None, &ErrorShape::invalid("x"))).unwrap();
        assert_eq!(v["id"], Value::Null);
        let v: Value = serde_json::from_str(&event("tick", r#"{"ts":1}"#, 9)).unwrap();
        assert_eq!(v, json!({"type":"event","event":"tick","payload":{"ts":1},"seq":9}));
    }
}
