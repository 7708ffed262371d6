//! `POST /v1/chat/completions`: request parsing and validation, agent and session resolution,
//! the non-streaming body and the streaming chunk encoder (SPEC §5).

use serde_json::{Value, json};

use super::ApiError;
use crate::agent::resolve;
use crate::agent::run::RunRequest;
use crate::agent::tools::{MAX_TOOLS, ToolCall, ToolCallPiece, valid_tool_name};
use crate::agent::{ChatMessage, FinishReason, Role, RunOptions, ToolFields, Usage};
use crate::gateway::Gateway;
use crate::session;

/// The request header naming a session key.
pub const SESSION_KEY_HEADER: &str = "x-gatelet-session-key";

/// A validated chat completion request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// `model`, as sent.
    pub model: Option<String>,
    /// System and developer message texts, in order.
    pub system: Vec<String>,
    /// The other messages.
    pub messages: Vec<ChatMessage>,
    /// `stream`.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// `user`.
    pub user: Option<String>,
    /// Sampling options.
    pub options: RunOptions,
}

fn opt<'a>(o: &'a serde_json::Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

fn content_text(v: Option<&Value>, param: &str) -> Result<String, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                let ty = p.get("type").and_then(Value::as_str);
                match ty {
                    Some("text" | "input_text") => match p.get("text").and_then(Value::as_str) {
                        Some(t) => out.push_str(t),
                        None => {
                            return Err(ApiError::invalid_value(
                                format!("{param}[{i}].text"),
                                "text part needs a string `text`",
                            ));
                        }
                    },
                    Some(_) => {}
                    None => {
                        return Err(ApiError::invalid_value(
                            format!("{param}[{i}].type"),
                            "content part needs a string `type`",
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid_value(param, "content must be a string, null, or an array of content parts")),
    }
}

/// Parse and validate a request body.
pub fn parse(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(400, "invalid_json", format!("We could not parse the JSON body of your request: {e}"))
    })?;
    let Value::Object(o) = v else {
        return Err(ApiError::invalid(400, "invalid_json", "The request body must be a JSON object"));
    };
    let model = match opt(&o, "model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid_value("model", "`model` must be a string")),
    };
    let msgs = match opt(&o, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => {
            let mut e = ApiError::invalid(400, "missing_messages", "`messages` must be a non-empty array");
            e.param = Some("messages".into());
            return Err(e);
        }
        Some(_) => return Err(ApiError::invalid_value("messages", "`messages` must be an array of messages")),
        None => {
            let mut e = ApiError::invalid(400, "missing_messages", "Missing required parameter: `messages`");
            e.param = Some("messages".into());
            return Err(e);
        }
    };
    let mut system = Vec::new();
    let mut messages = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let Some(mo) = m.as_object() else {
            return Err(ApiError::invalid_value(format!("messages[{i}]"), "each message must be an object"));
        };
        let role = match mo.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("tool" | "function") => Role::Tool,
            Some(r) => {
                return Err(ApiError::invalid_value(
                    format!("messages[{i}].role"),
                    format!("unknown role {r:?}: expected system, developer, user, assistant or tool"),
                ));
            }
            None => {
                return Err(ApiError::invalid_value(
                    format!("messages[{i}].role"),
                    "each message needs a string `role`",
                ));
            }
        };
        let text = content_text(mo.get("content"), &format!("messages[{i}].content"))?;
        if role == Role::System {
            system.push(text);
        } else {
            let tool: ToolFields = ["tool_call_id", "tool_calls", "name"]
                .iter()
                .filter_map(|k| mo.get(*k).filter(|v| !v.is_null()).map(|v| (k.to_string(), v.clone())))
                .collect();
            // Parts and an explicit `null` travel as sent. An assistant message without
            // `content` (SDKs drop a null one) is a tool-call message: sent on as `null`.
            let raw_content = match mo.get("content") {
                None if role == Role::Assistant => Some(Value::Null),
                c => c.filter(|c| !c.is_string()).cloned(),
            };
            messages.push(ChatMessage { role, content: text, raw_content, tool: (!tool.is_empty()).then_some(tool) });
        }
    }
    let stream = match opt(&o, "stream") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::invalid_value("stream", "`stream` must be a boolean")),
    };
    let include_usage = match opt(&o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => match opt(so, "include_usage") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::invalid_value("stream_options.include_usage", "must be a boolean")),
        },
        Some(_) => return Err(ApiError::invalid_value("stream_options", "`stream_options` must be an object")),
    };
    let user = match opt(&o, "user") {
        None => None,
        // `user` names a sticky session; bounded like the session-key header.
        Some(Value::String(s)) if s.len() > 256 => {
            return Err(ApiError::invalid_value("user", "`user` must be at most 256 bytes"));
        }
        Some(Value::String(s)) => Some(s.clone()).filter(|s| !s.is_empty()),
        Some(_) => return Err(ApiError::invalid_value("user", "`user` must be a string")),
    };
    let uint = |k: &str| -> Result<Option<u64>, ApiError> {
        match opt(&o, k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid_value(k, format!("`{k}` must be a non-negative integer"))),
        }
    };
    let max_tokens = match uint("max_completion_tokens")? {
        Some(n) => Some(n),
        None => uint("max_tokens")?,
    };
    let num = |k: &str, lo: f64, hi: f64| -> Result<Option<f64>, ApiError> {
        match opt(&o, k) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
                _ => Err(ApiError::invalid_value(k, format!("`{k}` must be a number from {lo} to {hi}"))),
            },
        }
    };
    let temperature = num("temperature", 0.0, 2.0)?;
    let top_p = num("top_p", 0.0, 1.0)?;
    let stop = match opt(&o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => {
            a.iter().filter_map(|s| s.as_str().map(String::from)).collect()
        }
        Some(_) => {
            return Err(ApiError::invalid_value("stop", "`stop` must be a string or an array of up to 4 strings"));
        }
    };
    if let Some(n) = opt(&o, "n")
        && n.as_u64() != Some(1)
    {
        return Err(ApiError::invalid_value("n", "agent runs produce exactly one choice: `n` must be 1"));
    }
    let tools = parse_tools(opt(&o, "tools"))?;
    let tool_choice = opt(&o, "tool_choice").map(check_tool_choice).transpose()?;
    let parallel_tool_calls = match opt(&o, "parallel_tool_calls") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => {
            return Err(ApiError::invalid_value("parallel_tool_calls", "`parallel_tool_calls` must be a boolean"));
        }
    };
    let passthrough = PASSTHROUGH.iter().filter_map(|k| opt(&o, k).map(|v| (k.to_string(), v.clone()))).collect();
    Ok(ChatRequest {
        model,
        system,
        messages,
        stream,
        include_usage,
        user,
        options: RunOptions {
            max_tokens,
            temperature,
            top_p,
            stop,
            tools,
            tool_choice,
            parallel_tool_calls,
            passthrough,
        },
    })
}

/// Request fields given to the backend exactly as sent (SPEC §5.1).
pub const PASSTHROUGH: [&str; 9] = [
    "response_format",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "reasoning_effort",
    "metadata",
];

/// `tools`: an array of at most 128 `{"type":"function","function":{"name",…}}`, kept verbatim.
fn parse_tools(v: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let list = match v {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) if a.len() <= MAX_TOOLS => a,
        Some(Value::Array(_)) => {
            return Err(ApiError::invalid_value("tools", format!("`tools` may hold at most {MAX_TOOLS} tools")));
        }
        Some(_) => return Err(ApiError::invalid_value("tools", "`tools` must be an array of tools")),
    };
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::invalid_value(
                format!("tools[{i}].type"),
                "each tool must have `type: \"function\"`",
            ));
        }
        let Some(f) = t.get("function").filter(|f| f.is_object()) else {
            return Err(ApiError::invalid_value(format!("tools[{i}].function"), "each tool needs a `function` object"));
        };
        match f.get("name").and_then(Value::as_str) {
            Some(n) if valid_tool_name(n) => {}
            _ => {
                return Err(ApiError::invalid_value(
                    format!("tools[{i}].function.name"),
                    "function names must match [A-Za-z0-9_-]{1,64}",
                ));
            }
        }
        if f.get("parameters").is_some_and(|p| !p.is_object() && !p.is_null()) {
            return Err(ApiError::invalid_value(
                format!("tools[{i}].function.parameters"),
                "`parameters` must be a JSON Schema object",
            ));
        }
        if f.get("description").is_some_and(|d| !d.is_string() && !d.is_null()) {
            return Err(ApiError::invalid_value(
                format!("tools[{i}].function.description"),
                "`description` must be a string",
            ));
        }
    }
    Ok(list.clone())
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"` or `{"type":"function","function":{"name"}}`
/// (other object types OpenAI may add pass as long as they name a `type`).
fn check_tool_choice(v: &Value) -> Result<Value, ApiError> {
    let ok = match v {
        Value::String(s) => matches!(s.as_str(), "none" | "auto" | "required"),
        Value::Object(o) => match o.get("type").and_then(Value::as_str) {
            Some("function") => o.get("function").and_then(|f| f.get("name")).and_then(Value::as_str).is_some(),
            Some(_) => true,
            None => false,
        },
        _ => false,
    };
    if ok {
        Ok(v.clone())
    } else {
        Err(ApiError::invalid_value(
            "tool_choice",
            "`tool_choice` must be \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":…}}",
        ))
    }
}

/// Turn a validated request into a run request.
pub fn to_run(
    gw: &Gateway,
    req: &ChatRequest,
    agent_header: Option<&str>,
    session_header: Option<&str>,
) -> Result<RunRequest, ApiError> {
    let agent = resolve::agent_for_model(gw.agents(), gw.default_agent(), agent_header, req.model.as_deref())?;
    let (session_key, sticky) = session::key_for(&gw.agents()[agent].cfg.id, session_header, req.user.as_deref())
        .map_err(resolve::ResolveError::from)?;
    Ok(RunRequest {
        run_id: format!("chatcmpl-{}", crate::util::random_hex(24)),
        agent,
        session_key,
        sticky,
        extra_system: req.system.clone(),
        messages: req.messages.clone(),
        options: req.options.clone(),
        timeout: None,
    })
}

/// The `model` echoed in responses: the request's, else the agent target.
pub fn echo_model(req: &ChatRequest, agent_id: &str) -> String {
    req.model.clone().unwrap_or_else(|| format!("gatelet/{agent_id}"))
}

/// The non-streaming `chat.completion` body. With tool calls, `content` is `null` when there is
/// no text and `message.tool_calls` lists the calls (SPEC §5.1).
pub fn completion_body(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    calls: &[ToolCall],
    finish: FinishReason,
    usage: Usage,
) -> Vec<u8> {
    let mut message = json!({ "role": "assistant", "content": text });
    if !calls.is_empty() {
        if text.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = calls.iter().map(ToolCall::to_json).collect();
    }
    let v = json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{ "index": 0, "message": message, "logprobs": null, "finish_reason": finish.as_str() }],
        "usage": usage.to_json(false),
    });
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Builds the `data: …\n\n` records of one stream. Every chunk shares one prefix
/// (`id`, `object`, `created`, `model`), rendered once.
#[derive(Debug, Clone)]
pub struct ChunkEncoder {
    prefix: Vec<u8>,
    include_usage: bool,
}

impl ChunkEncoder {
    /// An encoder for one stream.
    pub fn new(id: &str, created: u64, model: &str, include_usage: bool) -> Self {
        let mut prefix = b"data: {\"id\":".to_vec();
        let _ = serde_json::to_writer(&mut prefix, id);
        prefix.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
        crate::util::push_decimal(&mut prefix, created);
        prefix.extend_from_slice(b",\"model\":");
        let _ = serde_json::to_writer(&mut prefix, model);
        prefix.extend_from_slice(b",\"choices\":");
        ChunkEncoder { prefix, include_usage }
    }

    fn choice(&self, out: &mut Vec<u8>, delta: &[u8], text: Option<&str>, finish: Option<FinishReason>) {
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(b"[{\"index\":0,\"delta\":");
        out.extend_from_slice(delta);
        if let Some(t) = text {
            let _ = serde_json::to_writer(&mut *out, t);
            out.push(b'}');
        }
        out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":");
        match finish {
            Some(f) => {
                out.push(b'"');
                out.extend_from_slice(f.as_str().as_bytes());
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(if self.include_usage { b"}],\"usage\":null}\n\n" } else { b"}]}\n\n" });
    }

    /// `delta: {"role":"assistant","content":""}`.
    pub fn role(&self, out: &mut Vec<u8>) {
        self.choice(out, b"{\"role\":\"assistant\",\"content\":\"\"}", None, None);
    }

    /// `delta: {"content": text}`.
    pub fn content(&self, out: &mut Vec<u8>, text: &str) {
        self.choice(out, b"{\"content\":", Some(text), None);
    }

    /// A tool-call piece: the first of a call opens it with its id, name and empty arguments
    /// (and a second record carries its arguments, if it had any); later ones carry only
    /// `{"index","function":{"arguments"}}` (SPEC §5.1).
    pub fn tool_call(&self, out: &mut Vec<u8>, p: &ToolCallPiece) {
        if p.id.is_none() && p.arguments.is_empty() {
            return;
        }
        let mut d = Vec::with_capacity(96 + p.arguments.len());
        if let (Some(id), Some(name)) = (&p.id, &p.name) {
            d.extend_from_slice(b"{\"tool_calls\":[{\"index\":");
            crate::util::push_decimal(&mut d, p.index as u64);
            d.extend_from_slice(b",\"id\":");
            let _ = serde_json::to_writer(&mut d, id);
            d.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
            let _ = serde_json::to_writer(&mut d, name);
            d.extend_from_slice(b",\"arguments\":\"\"}}]}");
            self.choice(out, &d, None, None);
            if p.arguments.is_empty() {
                return;
            }
            d.clear();
        }
        d.extend_from_slice(b"{\"tool_calls\":[{\"index\":");
        crate::util::push_decimal(&mut d, p.index as u64);
        d.extend_from_slice(b",\"function\":{\"arguments\":");
        let _ = serde_json::to_writer(&mut d, &p.arguments);
        d.extend_from_slice(b"}}]}");
        self.choice(out, &d, None, None);
    }

    /// `delta: {}` with the finish reason.
    pub fn stop(&self, out: &mut Vec<u8>, finish: FinishReason) {
        self.choice(out, b"{}", None, Some(finish));
    }

    /// The usage chunk (only when `include_usage`).
    pub fn usage(&self, out: &mut Vec<u8>, usage: Usage) {
        if !self.include_usage {
            return;
        }
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(b"[],\"usage\":");
        let _ = serde_json::to_writer(&mut *out, &usage.to_json(false));
        out.extend_from_slice(b"}\n\n");
    }

    /// `data: [DONE]`.
    pub fn done(out: &mut Vec<u8>) {
        out.extend_from_slice(b"data: [DONE]\n\n");
    }

    /// The mid-stream error record.
    pub fn error(out: &mut Vec<u8>, err: &ApiError) {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&err.body());
        out.extend_from_slice(b"\n\n");
    }

    /// The heartbeat comment.
    pub const KEEPALIVE: &'static [u8] = b": keep-alive\n\n";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(rec: &[u8]) -> Value {
        let s = std::str::from_utf8(rec).unwrap();
        assert!(s.starts_with("data: ") && s.ends_with("\n\n"), "{s:?}");
        serde_json::from_str(&s[6..s.len() - 2]).unwrap()
    }

    #[test]
    fn parses_lenient_shapes() {
        let r = parse(
            br#"{"model":"gatelet","messages":[{"role":"developer","content":[{"type":"text","text":"be "},{"type":"input_text","text":"brief"},{"type":"image_url","image_url":{}}]},{"role":"user","content":"hi"},{"role":"assistant","content":null},{"role":"function","name":"f","content":"x"}],"stream":null,"temperature":null,"max_tokens":7,"max_completion_tokens":5,"foo":1}"#,
        )
        .unwrap();
        assert_eq!(r.system, vec!["be brief"]);
        assert_eq!(r.messages.len(), 3);
        assert_eq!(r.messages[2].role, Role::Tool);
        assert!(!r.stream);
        assert_eq!(r.options.max_tokens, Some(5));
    }

    #[test]
    fn rejects_bad_requests_with_params() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("{", "invalid_json", None),
            ("[]", "invalid_json", None),
            ("{}", "missing_messages", Some("messages")),
            (r#"{"messages":[]}"#, "missing_messages", Some("messages")),
            (r#"{"messages":"hi"}"#, "invalid_value", Some("messages")),
            (r#"{"messages":[{"role":"wizard","content":"x"}]}"#, "invalid_value", Some("messages[0].role")),
            (r#"{"messages":[{"content":"x"}]}"#, "invalid_value", Some("messages[0].role")),
            (r#"{"messages":[{"role":"user","content":5}]}"#, "invalid_value", Some("messages[0].content")),
            (r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, "invalid_value", Some("stream")),
            (r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#, "invalid_value", Some("max_tokens")),
            (r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#, "invalid_value", Some("temperature")),
            (r#"{"messages":[{"role":"user","content":"x"}],"n":2}"#, "invalid_value", Some("n")),
            (r#"{"messages":[{"role":"user","content":"x"}],"model":5}"#, "invalid_value", Some("model")),
            (r#"{"messages":[{"role":"user","content":"x"}],"user":5}"#, "invalid_value", Some("user")),
        ];
        for (body, code, param) in cases {
            let e = parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.code, Some(*code), "{body}");
            assert_eq!(e.param.as_deref(), *param, "{body}");
        }
    }

    #[test]
    fn tool_calling_fields_are_kept() {
        let r = parse(
            br#"{"messages":[{"role":"user","content":"hi"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
                {"role":"tool","tool_call_id":"c1","content":"42"},{"role":"user","content":"ok","name":null}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].tool, None);
        assert_eq!(r.messages[1].tool.as_ref().unwrap()["tool_calls"][0]["id"], "c1");
        assert_eq!(r.messages[2].tool.as_ref().unwrap()["tool_call_id"], "c1");
        assert_eq!(r.messages[3].tool, None, "null fields are absent");
    }

    #[test]
    fn tools_are_validated_with_params() {
        let with = |extra: &str| format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{extra}}}"#);
        let tool = r#"{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}"#;
        let many = format!(r#""tools":[{}]"#, vec![tool; 129].join(","));
        let cases: Vec<(String, &str)> = vec![
            (with(r#""tools":{}"#), "tools"),
            (with(&many), "tools"),
            (with(r#""tools":[{"type":"retrieval"}]"#), "tools[0].type"),
            (with(&format!(r#""tools":[{tool},{{"type":"function"}}]"#)), "tools[1].function"),
            (with(r#""tools":[{"type":"function","function":{"name":"get weather"}}]"#), "tools[0].function.name"),
            (with(r#""tools":[{"type":"function","function":{}}]"#), "tools[0].function.name"),
            (
                with(&format!(r#""tools":[{{"type":"function","function":{{"name":"{}"}}}}]"#, "n".repeat(65))),
                "tools[0].function.name",
            ),
            (
                with(r#""tools":[{"type":"function","function":{"name":"f","parameters":"x"}}]"#),
                "tools[0].function.parameters",
            ),
            (with(r#""tool_choice":"always""#), "tool_choice"),
            (with(r#""tool_choice":{"type":"function"}"#), "tool_choice"),
            (with(r#""tool_choice":5"#), "tool_choice"),
            (with(r#""parallel_tool_calls":"yes""#), "parallel_tool_calls"),
        ];
        for (body, param) in cases {
            let e = parse(body.as_bytes()).unwrap_err();
            assert_eq!((e.status, e.code, e.param.as_deref()), (400, Some("invalid_value"), Some(param)), "{body}");
        }
        let ok = parse(
            with(&format!(
                r#""tools":[{tool}],"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}},"parallel_tool_calls":false"#
            ))
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(ok.options.tools, vec![serde_json::from_str::<Value>(tool).unwrap()]);
        assert_eq!(ok.options.tool_choice, Some(json!({"type":"function","function":{"name":"get_weather"}})));
        assert_eq!(ok.options.parallel_tool_calls, Some(false));
        let ok =
            parse(with(&format!(r#""tools":[{}],"tool_choice":"required""#, vec![tool; 128].join(","))).as_bytes());
        assert_eq!(ok.unwrap().options.tools.len(), 128);
    }

    #[test]
    fn output_fields_pass_through_only_when_set() {
        let r = parse(
            br#"{"messages":[{"role":"user","content":"x"}],"seed":7,"response_format":{"type":"json_schema","json_schema":{"name":"s"}},
                "presence_penalty":0.5,"frequency_penalty":-1,"logit_bias":{"50256":-100},"logprobs":true,"top_logprobs":2,
                "reasoning_effort":"low","metadata":{"k":"v"},"top_k":3,"store":true,"user_defined":null}"#,
        )
        .unwrap();
        let keys: Vec<&str> = r.options.passthrough.keys().map(String::as_str).collect();
        let mut want = PASSTHROUGH.to_vec();
        want.sort();
        assert_eq!(keys, want);
        assert_eq!(r.options.passthrough["frequency_penalty"], json!(-1));
        assert_eq!(r.options.passthrough["logit_bias"], json!({"50256":-100}));
        let r = parse(br#"{"messages":[{"role":"user","content":"x"}],"seed":null}"#).unwrap();
        assert!(r.options.passthrough.is_empty());
    }

    #[test]
    fn content_parts_and_null_are_kept() {
        let r = parse(
            br#"{"messages":[{"role":"user","content":[{"type":"text","text":"look: "},{"type":"image_url","image_url":{"url":"data:,x"}}]},
                {"role":"assistant","content":null,"tool_calls":[]},{"role":"user","content":"plain"}]}"#,
        )
        .unwrap();
        assert_eq!(r.messages[0].content, "look: ");
        assert_eq!(r.messages[0].raw_content.as_ref().unwrap()[1]["type"], "image_url");
        assert_eq!(r.messages[1].raw_content, Some(Value::Null));
        assert_eq!(r.messages[2].raw_content, None);
    }

    #[test]
    fn tool_call_chunks() {
        let enc = ChunkEncoder::new("c", 1, "m", false);
        let mut out = Vec::new();
        let first =
            ToolCallPiece { index: 1, id: Some("call_9".into()), name: Some("f".into()), arguments: "{\"a\"".into() };
        enc.tool_call(&mut out, &first);
        let s = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            s,
            concat!(
                r#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_9","type":"function","function":{"name":"f","arguments":""}}]},"logprobs":null,"finish_reason":null}]}"#,
                "\n\n",
                r#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"a\""}}]},"logprobs":null,"finish_reason":null}]}"#,
                "\n\n"
            )
        );
        out.clear();
        enc.tool_call(&mut out, &ToolCallPiece { index: 0, id: None, name: None, arguments: String::new() });
        assert!(out.is_empty(), "an empty later piece sends nothing");
        enc.tool_call(
            &mut out,
            &ToolCallPiece { index: 0, id: Some("x".into()), name: Some("g".into()), arguments: String::new() },
        );
        assert_eq!(sse_records(&out), 1);
        out.clear();
        enc.stop(&mut out, FinishReason::ToolCalls);
        assert_eq!(data(&out)["choices"][0]["finish_reason"], "tool_calls");
    }

    fn sse_records(b: &[u8]) -> usize {
        String::from_utf8_lossy(b).matches("\n\n").count()
    }

    #[test]
    fn completion_with_tool_calls() {
        let calls = [ToolCall { id: "call_1".into(), name: "f".into(), arguments: "{}".into() }];
        let b = completion_body("c", 1, "m", "", &calls, FinishReason::ToolCalls, Usage::default());
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v["choices"][0],
            json!({"index":0,"message":{"role":"assistant","content":null,"tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]},
                "logprobs":null,"finish_reason":"tool_calls"})
        );
        let b = completion_body("c", 1, "m", "hi", &calls, FinishReason::ToolCalls, Usage::default());
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "hi");
        let b = completion_body("c", 1, "m", "", &[], FinishReason::Stop, Usage::default());
        let v: Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["choices"][0]["message"], json!({"role":"assistant","content":""}));
    }

    #[test]
    fn user_is_bounded() {
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"user":"{}"}}"#, "u".repeat(257));
        assert_eq!(parse(body.as_bytes()).unwrap_err().param.as_deref(), Some("user"));
        let body = format!(r#"{{"messages":[{{"role":"user","content":"x"}}],"user":"{}"}}"#, "u".repeat(256));
        assert_eq!(parse(body.as_bytes()).unwrap().user.map(|u| u.len()), Some(256));
    }

    #[test]
    fn chunk_records_are_valid_json() {
        let enc = ChunkEncoder::new("chatcmpl-1", 7, "m\"x", true);
        let mut out = Vec::new();
        enc.role(&mut out);
        let v = data(&out);
        assert_eq!(v["choices"][0]["delta"], json!({"role":"assistant","content":""}));
        assert_eq!(v["usage"], Value::Null);
        assert_eq!(v["model"], "m\"x");
        out.clear();
        enc.content(&mut out, "a \"q\"\n");
        assert_eq!(data(&out)["choices"][0]["delta"]["content"], "a \"q\"\n");
        out.clear();
        enc.stop(&mut out, FinishReason::Length);
        assert_eq!(data(&out)["choices"][0]["finish_reason"], "length");
        out.clear();
        enc.usage(&mut out, Usage { prompt_tokens: 2, completion_tokens: 3 });
        let v = data(&out);
        assert_eq!(v["choices"], json!([]));
        assert_eq!(v["usage"]["total_tokens"], 5);
        // Without include_usage no usage key appears at all.
        let enc = ChunkEncoder::new("c", 1, "m", false);
        out.clear();
        enc.stop(&mut out, FinishReason::Stop);
        assert!(data(&out).get("usage").is_none());
        out.clear();
        enc.usage(&mut out, Usage::default());
        assert!(out.is_empty());
    }
}
