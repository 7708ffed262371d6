//! The `command` backend: runs `argv` once per run.
//!
//! The run goes to the program's stdin as one JSON object ([`run_json`]), then stdin is closed.
//! Every line the program writes to stdout is a piece of the reply; a line that is a JSON object
//! with a `delta`, `usage`, `finish`, `error` or `tool_call` key is an event instead
//! ([`parse_line`]). Exit status 0 ends the run (`stop` unless the program said otherwise, or
//! `tool_calls` after a tool call); any other status is an error carrying the last lines of
//! stderr.
//!
//! The program runs in its own process group, so a cancel, the deadline or an error kills it
//! together with everything it started; the child is always waited for, so no zombie is left.
//! Pipes are read on helper threads: the run's own thread waits on a channel in [`TICK`] steps,
//! checking cancel and deadline and ticking the sink between steps. The stdout channel holds at
//! most [`QUEUED_LINES`] lines, so a program that writes faster than the client reads is held
//! back by the pipe instead of filling the gateway's memory.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::agent::tools::ToolCallPiece;
use crate::agent::{Backend, EventSink, FinishReason, RunControl, RunError, RunInput, TICK, Usage};
use crate::config::CommandBackendConfig;

/// Longest stdout line accepted.
pub const MAX_LINE: usize = 1024 * 1024;
/// Stdout lines read ahead of what the run has consumed.
pub const QUEUED_LINES: usize = 8;
/// Stderr lines kept for an error message.
const STDERR_LINES: usize = 10;
/// Longest stderr line kept (longer lines are cut).
const STDERR_LINE_BYTES: usize = 1000;
/// How long stdout may stay open after the program exited (a background child holding it).
const EXIT_GRACE: Duration = Duration::from_millis(500);
/// Secrets of the gateway itself never reach the program unless its `env` sets them.
pub(crate) const HIDDEN_ENV: [&str; 2] = ["GATELET_GATEWAY_TOKEN", "GATELET_GATEWAY_PASSWORD"];

/// A program run per turn.
#[derive(Debug)]
pub struct Command {
    cfg: CommandBackendConfig,
}

impl Command {
    /// A backend for `cfg`.
    pub fn new(cfg: CommandBackendConfig) -> Self {
        Command { cfg }
    }

    fn name(&self) -> &str {
        self.cfg.argv.first().map(String::as_str).unwrap_or("")
    }

    fn fail(&self, msg: impl std::fmt::Display) -> RunError {
        RunError::Backend(format!("command {}: {msg}", self.name()))
    }
}

/// The JSON object written to the program's stdin: the conversation as text, each message's
/// original content parts (`parts`) and tool-calling fields when it had any, and the tools
/// offered (with `toolChoice` when the client set one).
pub fn run_json(input: &RunInput<'_>) -> Value {
    let o = &input.options;
    let messages: Vec<Value> = input
        .messages
        .iter()
        .map(|m| {
            let mut v = json!({"role": m.role.as_str(), "content": m.content});
            if let Some(p @ Value::Array(_)) = &m.raw_content {
                v["parts"] = p.clone();
            }
            if let Some(t) = &m.tool {
                for (k, x) in t {
                    v[k.as_str()] = x.clone();
                }
            }
            v
        })
        .collect();
    let mut v = json!({
        "runId": input.run_id,
        "agentId": input.agent_id,
        "sessionKey": input.session_key,
        "systemPrompt": input.system_prompt,
        "messages": messages,
        "options": { "maxTokens": o.max_tokens, "temperature": o.temperature, "topP": o.top_p, "stop": o.stop },
    });
    if !o.tools.is_empty() {
        v["tools"] = Value::Array(o.tools.clone());
    }
    if let Some(c) = &o.tool_choice {
        v["toolChoice"] = c.clone();
    }
    v
}

/// What one stdout line means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// A plain line of reply text (without its line end).
    Text(String),
    /// `{"delta": "…"}`: text, exactly as given.
    Delta(String),
    /// `{"usage": {"prompt_tokens": n, "completion_tokens": n}}`.
    Usage(Usage),
    /// `{"finish": "stop" | "length"}`.
    Finish(FinishReason),
    /// `{"error": "…"}`: the run fails with this message.
    Error(String),
    /// `{"tool_call": {"id"?, "name", "arguments"}}`: one whole call (arguments a JSON text, or
    /// an object that is serialised).
    ToolCall {
        /// Call id (one is made up when absent).
        id: Option<String>,
        /// Function name.
        name: String,
        /// Arguments JSON text.
        arguments: String,
    },
    /// A `tool_call` event without a valid function name.
    BadToolCall(String),
}

/// Interpret one stdout line (line end already removed). A JSON object counts as events only
/// when it has at least one of the known keys; anything else is plain text.
pub fn parse_line(line: &str) -> Vec<LineEvent> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.trim_start().starts_with('{')
        && let Ok(Value::Object(o)) = serde_json::from_str::<Value>(line)
    {
        let mut ev = Vec::new();
        if let Some(d) = o.get("delta").and_then(Value::as_str) {
            ev.push(LineEvent::Delta(d.to_string()));
        }
        if let Some(u) = o.get("usage") {
            let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
            ev.push(LineEvent::Usage(Usage {
                prompt_tokens: n("prompt_tokens"),
                completion_tokens: n("completion_tokens"),
            }));
        }
        if let Some(f) = o.get("finish").and_then(Value::as_str) {
            ev.push(LineEvent::Finish(if f == "length" { FinishReason::Length } else { FinishReason::Stop }));
        }
        if let Some(tc) = o.get("tool_call").filter(|e| !e.is_null()) {
            let name = tc.get("name").and_then(Value::as_str).filter(|n| crate::agent::tools::valid_tool_name(n));
            let arguments = match tc.get("arguments") {
                None | Some(Value::Null) => "{}".to_string(),
                Some(Value::String(s)) => s.clone(),
                Some(v) => v.to_string(),
            };
            ev.push(match name {
                Some(n) => LineEvent::ToolCall {
                    id: tc.get("id").and_then(Value::as_str).filter(|i| !i.is_empty()).map(String::from),
                    name: n.to_string(),
                    arguments,
                },
                None => LineEvent::BadToolCall(crate::util::truncate_str(&tc.to_string(), 200).to_string()),
            });
        }
        if let Some(e) = o.get("error").filter(|e| !e.is_null()) {
            let msg = e.as_str().map(String::from).or_else(|| e["message"].as_str().map(String::from));
            ev.push(LineEvent::Error(msg.unwrap_or_else(|| e.to_string())));
        }
        if !ev.is_empty() {
            return ev;
        }
    }
    vec![LineEvent::Text(line.to_string())]
}

/// Lines from the stdout reader thread.
enum Msg {
    Line(String),
    TooLong,
    Eof,
}

/// Reads `r` line by line (each at most [`MAX_LINE`] bytes) into `tx`.
fn read_lines(r: impl Read, tx: mpsc::SyncSender<Msg>) {
    let mut r = BufReader::with_capacity(16 * 1024, r);
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            break;
        }
        let (take, complete) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take - complete as usize]);
        r.consume(take);
        if line.len() > MAX_LINE {
            let _ = tx.send(Msg::TooLong);
            return;
        }
        if complete {
            let text = String::from_utf8_lossy(&line).into_owned();
            line.clear();
            if tx.send(Msg::Line(text)).is_err() {
                return;
            }
        }
    }
    if !line.is_empty() {
        let _ = tx.send(Msg::Line(String::from_utf8_lossy(&line).into_owned()));
    }
    let _ = tx.send(Msg::Eof);
}

/// The last stderr lines, shared with the reader thread.
#[derive(Default)]
struct Tail {
    lines: VecDeque<String>,
    done: bool,
}

fn read_tail(r: impl Read, tail: Arc<Mutex<Tail>>) {
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        // A long line is read in pieces; only its first part is kept.
        match r.by_ref().take(64 * 1024).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end();
                if text.is_empty() {
                    continue;
                }
                let mut end = text.len().min(STDERR_LINE_BYTES);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.lines.len() == STDERR_LINES {
                    t.lines.pop_front();
                }
                t.lines.push_back(text[..end].to_string());
            }
        }
    }
    tail.lock().unwrap_or_else(|e| e.into_inner()).done = true;
}

/// SIGKILL every process in group `pgid` (std has no killpg; `kill(1)` does it safely).
pub(crate) fn kill_group(pgid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The running program; dropping it kills the whole process group and reaps the child.
struct Running {
    child: Child,
    exited: Option<ExitStatus>,
}

impl Running {
    fn kill(&mut self) {
        if self.exited.is_some() {
            return;
        }
        // The child is not reaped yet, so its pid still names its process group.
        kill_group(self.child.id());
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Backend for Command {
    fn run(&self, input: &RunInput<'_>, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), RunError> {
        let argv = &self.cfg.argv;
        let Some(prog) = argv.first() else { return Err(self.fail("empty argv")) };
        let mut cmd = std::process::Command::new(prog);
        cmd.args(&argv[1..]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        for k in HIDDEN_ENV {
            cmd.env_remove(k);
        }
        cmd.envs(&self.cfg.env);
        if let Some(d) = &self.cfg.cwd {
            cmd.current_dir(d);
        }
        let mut child = cmd.spawn().map_err(|e| self.fail(format!("cannot start: {e}")))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut run = Running { child, exited: None };

        // The run goes in on its own thread: a program that never reads stdin must not block us.
        let payload = serde_json::to_vec(&run_json(input)).unwrap_or_default();
        if let Some(mut w) = stdin {
            std::thread::spawn(move || {
                let _ = w.write_all(&payload).and_then(|_| w.write_all(b"\n"));
            });
        }
        // Bounded: when the run is slow to take lines (a slow client), the reader blocks, the
        // pipe fills and the program waits.
        let (tx, rx) = mpsc::sync_channel(QUEUED_LINES);
        if let Some(o) = stdout {
            std::thread::spawn(move || read_lines(o, tx));
        }
        let tail = Arc::new(Mutex::new(Tail::default()));
        if let Some(e) = stderr {
            let t = tail.clone();
            std::thread::spawn(move || read_tail(e, t));
        }

        let mut plain_seen = false;
        let mut calls = 0usize;
        let mut finished = false;
        let mut exited_at: Option<Instant> = None;
        loop {
            match rx.recv_timeout(TICK) {
                Ok(Msg::Line(line)) => {
                    for ev in parse_line(&line) {
                        match ev {
                            LineEvent::Text(t) => {
                                if plain_seen {
                                    out.delta(&format!("\n{t}"))?;
                                } else {
                                    out.delta(&t)?;
                                }
                                plain_seen = true;
                            }
                            LineEvent::Delta(d) => out.delta(&d)?,
                            LineEvent::Usage(u) => out.usage(u),
                            LineEvent::Finish(f) => {
                                finished = true;
                                out.finish(f)
                            }
                            LineEvent::Error(m) => return Err(self.fail(m)),
                            LineEvent::ToolCall { id, name, arguments } => {
                                if calls >= crate::agent::tools::MAX_CALLS {
                                    return Err(self.fail("too many tool calls in one reply"));
                                }
                                let id = id.unwrap_or_else(crate::agent::tools::new_call_id);
                                let piece = ToolCallPiece { index: calls, id: Some(id), name: Some(name), arguments };
                                calls += 1;
                                out.tool_call(&piece)?;
                            }
                            LineEvent::BadToolCall(t) => {
                                return Err(self.fail(format!("tool_call needs a valid function `name`: {t}")));
                            }
                        }
                    }
                    ctl.check()?;
                }
                Ok(Msg::TooLong) => return Err(self.fail(format!("stdout line longer than {MAX_LINE} bytes"))),
                Ok(Msg::Eof) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    ctl.check()?;
                    out.tick()?;
                    // The program may be gone while something it started still holds stdout.
                    if run.exited.is_none()
                        && let Ok(Some(st)) = run.child.try_wait()
                    {
                        run.exited = Some(st);
                        exited_at = Some(Instant::now());
                    }
                    if exited_at.is_some_and(|t| t.elapsed() >= EXIT_GRACE) {
                        // What it left behind holds stdout, so the group still exists and its
                        // id cannot have been reused.
                        kill_group(run.child.id());
                        break;
                    }
                }
            }
        }
        // Stdout is closed: wait for the exit, still honouring cancel and deadline.
        let status = loop {
            if let Some(st) = run.exited {
                break st;
            }
            match run.child.try_wait() {
                Ok(Some(st)) => {
                    run.exited = Some(st);
                    break st;
                }
                Ok(None) => {}
                Err(e) => return Err(self.fail(format!("cannot wait for the program: {e}"))),
            }
            ctl.check()?;
            out.tick()?;
            ctl.cancel.wait(Duration::from_millis(10));
        };
        if status.success() {
            if calls > 0 && !finished {
                out.finish(FinishReason::ToolCalls);
            }
            return Ok(());
        }
        // Give the stderr reader a moment to collect the last lines.
        let end = Instant::now() + Duration::from_millis(300);
        while !tail.lock().unwrap_or_else(|e| e.into_inner()).done && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        let lines: Vec<String> = tail.lock().unwrap_or_else(|e| e.into_inner()).lines.iter().cloned().collect();
        let how = match (status.code(), status.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("was killed by signal {s}"),
            _ => "failed".to_string(),
        };
        Err(if lines.is_empty() { self.fail(how) } else { self.fail(format!("{how}: {}", lines.join(" | "))) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::RunSink;
    use crate::agent::{CancelToken, ChatMessage, Role, RunOptions};
    use std::collections::BTreeMap;

    #[test]
    fn lines() {
        let t = |s: &str| vec![LineEvent::Text(s.into())];
        assert_eq!(parse_line("hello world"), t("hello world"));
        assert_eq!(parse_line("crlf\r"), t("crlf"));
        assert_eq!(parse_line(""), t(""));
        assert_eq!(parse_line(r#"{"delta":"a b"}"#), vec![LineEvent::Delta("a b".into())]);
        assert_eq!(
            parse_line(r#"{"usage":{"prompt_tokens":3,"completion_tokens":4},"finish":"length"}"#),
            vec![
                LineEvent::Usage(Usage { prompt_tokens: 3, completion_tokens: 4 }),
                LineEvent::Finish(FinishReason::Length)
            ]
        );
        assert_eq!(parse_line(r#"{"finish":"stop"}"#), vec![LineEvent::Finish(FinishReason::Stop)]);
        assert_eq!(parse_line(r#"{"error":"no key"}"#), vec![LineEvent::Error("no key".into())]);
        assert_eq!(parse_line(r#"{"error":{"message":"m"}}"#), vec![LineEvent::Error("m".into())]);
        // JSON that is not an event is reply text.
        assert_eq!(parse_line(r#"{"answer":42}"#), t(r#"{"answer":42}"#));
        assert_eq!(parse_line("{not json"), t("{not json"));
        assert_eq!(parse_line("[1]"), t("[1]"));
    }

    #[test]
    fn tool_call_lines() {
        assert_eq!(
            parse_line(r#"{"tool_call":{"id":"c1","name":"get_weather","arguments":"{\"city\":\"Rome\"}"}}"#),
            vec![LineEvent::ToolCall {
                id: Some("c1".into()),
                name: "get_weather".into(),
                arguments: r#"{"city":"Rome"}"#.into()
            }]
        );
        // Arguments given as an object are sent as its JSON text; absent ones as `{}`.
        assert_eq!(
            parse_line(r#"{"tool_call":{"name":"f","arguments":{"a":1}}}"#),
            vec![LineEvent::ToolCall { id: None, name: "f".into(), arguments: r#"{"a":1}"#.into() }]
        );
        assert_eq!(
            parse_line(r#"{"tool_call":{"name":"f"}}"#),
            vec![LineEvent::ToolCall { id: None, name: "f".into(), arguments: "{}".into() }]
        );
        assert!(matches!(parse_line(r#"{"tool_call":{"name":"bad name"}}"#)[..], [LineEvent::BadToolCall(_)]));
        assert!(matches!(parse_line(r#"{"tool_call":{}}"#)[..], [LineEvent::BadToolCall(_)]));
    }

    #[test]
    fn run_json_carries_tools_parts_and_tool_fields() {
        let mut i = input();
        let parts = json!([{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:,"}}]);
        i.messages.to_mut()[0].raw_content = Some(parts.clone());
        i.messages.to_mut().push(crate::agent::ChatMessage::tool_result("c1", "42"));
        i.options.tools = vec![json!({"type":"function","function":{"name":"f"}})];
        i.options.tool_choice = Some(json!("auto"));
        let v = run_json(&i);
        assert_eq!(v["messages"][0], json!({"role":"user","content":"hi","parts":parts}));
        assert_eq!(v["messages"][1], json!({"role":"tool","content":"42","tool_call_id":"c1"}));
        assert_eq!(v["tools"][0]["function"]["name"], "f");
        assert_eq!(v["toolChoice"], "auto");
        assert!(run_json(&input()).get("tools").is_none());
    }

    fn input() -> RunInput<'static> {
        RunInput {
            run_id: "r1".into(),
            agent_id: "a".into(),
            session_key: "agent:a:k".into(),
            system_prompt: "S".into(),
            messages: vec![ChatMessage::new(Role::User, "hi")].into(),
            options: RunOptions { max_tokens: Some(3), ..Default::default() },
            prompt_words: 0,
        }
    }

    #[test]
    fn stdin_object() {
        assert_eq!(
            run_json(&input()),
            json!({"runId":"r1","agentId":"a","sessionKey":"agent:a:k","systemPrompt":"S",
                   "messages":[{"role":"user","content":"hi"}],
                   "options":{"maxTokens":3,"temperature":null,"topP":null,"stop":[]}})
        );
    }

    #[derive(Default)]
    struct Collect {
        text: String,
        finish: Option<FinishReason>,
        calls: Vec<ToolCallPiece>,
    }
    impl RunSink for Collect {
        fn delta(&mut self, t: &str) -> Result<(), RunError> {
            self.text.push_str(t);
            Ok(())
        }
        fn tool_call(&mut self, p: &ToolCallPiece) -> Result<(), RunError> {
            self.calls.push(p.clone());
            Ok(())
        }
    }

    impl EventSink for Collect {
        fn usage(&mut self, _: Usage) {}
        fn finish(&mut self, f: FinishReason) {
            self.finish = Some(f);
        }
    }

    fn sh(script: &str) -> Command {
        Command::new(CommandBackendConfig {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            cwd: None,
            env: BTreeMap::from([("GREETING".to_string(), "hey".to_string())]),
        })
    }

    #[test]
    fn plain_lines_env_and_stdin() {
        let mut c = Collect::default();
        let ctl = RunControl::new(CancelToken::new(), Duration::from_secs(10));
        sh(r#"read -r run; echo "$GREETING"; echo; printf '%s\n' "$run" | grep -c '"content":"hi"'"#)
            .run(&input(), &ctl, &mut c)
            .unwrap();
        assert_eq!(c.text, "hey\n\n1");
    }

    #[test]
    fn exit_status_and_stderr() {
        let mut c = Collect::default();
        let ctl = RunControl::new(CancelToken::new(), Duration::from_secs(10));
        let e = sh("echo part; echo one >&2; echo two >&2; exit 3").run(&input(), &ctl, &mut c).unwrap_err();
        assert_eq!(e, RunError::Backend("command sh: exited with status 3: one | two".into()));
        assert_eq!(c.text, "part");
        let e = sh("echo x").run(&input(), &RunControl::new(CancelToken::new(), Duration::ZERO), &mut c);
        assert_eq!(e, Err(RunError::Timeout));
        let missing = Command::new(CommandBackendConfig {
            argv: vec!["/nonexistent/prog".into()],
            cwd: None,
            env: BTreeMap::new(),
        });
        let e = missing.run(&input(), &ctl, &mut c).unwrap_err().to_string();
        assert!(e.starts_with("command /nonexistent/prog: cannot start:"), "{e}");
    }
}
