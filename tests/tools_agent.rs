//! Agent tools (run by the gateway itself) and the `command` backend's tool calls, through the
//! real gateway: arguments in, results back to the model, failures, timeouts that take the whole
//! process group, `maxToolSteps`, mixed agent and client tools, WebSocket `tool` events,
//! keep-alive while a tool runs, and a command backend that is read no faster than the client.

mod util;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::ws::Ws;
use util::{Gateway, chat_request, chat_request_with, config, temp_dir};

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts").join(name).display().to_string()
}

/// A tool entry for the config: `name` running `sh <script>` with `extra` in its command.
fn tool(name: &str, sh_script: &str, extra: &str) -> String {
    format!(
        "{{ name: '{name}', description: 'test tool', parameters: {{ type: 'object' }}, \
           command: {{ argv: ['sh', '{}'], {extra} }} }}",
        script(sh_script)
    )
}

/// A gateway whose default agent `main` has `backend` and `tools`.
fn gateway(backend: &str, tools: &[String], agent_extra: &str, gateway_extra: &str) -> Gateway {
    Gateway::with_config(&config(
        gateway_extra,
        &format!(
            "agents: {{ list: [{{ id: 'main', default: true, backend: {backend}, tools: [{}], {agent_extra} }}] }}",
            tools.join(",")
        ),
    ))
}

const ECHO: &str = "{ kind: 'echo' }";

fn model() -> String {
    format!("{{ kind: 'command', argv: ['python3', '{}'] }}", script("tool_model.py"))
}

fn ask(gw: &Gateway, text: &str, extra: &str) -> util::Resp {
    let msg = serde_json::to_string(text).unwrap();
    gw.one(&chat_request(&format!(r#"{{"model":"gatelet","messages":[{{"role":"user","content":{msg}}}]{extra}}}"#)))
}

fn reply(r: &util::Resp) -> (String, String) {
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let c = &v["choices"][0];
    (c["message"]["content"].as_str().unwrap_or("<null>").to_string(), c["finish_reason"].as_str().unwrap().to_string())
}

#[test]
fn an_agent_tool_gets_its_arguments_and_its_result_goes_back_to_the_model() {
    let dir = temp_dir("tool-cwd");
    let gw = gateway(ECHO, &[tool("lookup", "tool_args.sh", &format!("cwd: '{}'", dir.display()))], "", "");
    let r = ask(&gw, r#"/tool lookup {"q":"gatelet"}"#, "");
    let name = dir.file_name().unwrap().to_str().unwrap();
    assert_eq!(reply(&r), (format!(r#"tool said: args were {{"q":"gatelet"}} in {name}"#), "stop".into()));
}

#[test]
fn agent_tool_calls_never_reach_an_http_client() {
    let gw = gateway(ECHO, &[tool("lookup", "tool_args.sh", "")], "", "");
    let body = r#"{"model":"gatelet","stream":true,"messages":[{"role":"user","content":"/tool lookup {\"q\":1}"}]}"#;
    let r = gw.one(&chat_request(body));
    let text = r.text();
    assert!(!text.contains("tool_calls"), "{text}");
    let data = util::sse_json(text.as_bytes());
    let content: String = data.iter().filter_map(|v| v["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(content.starts_with(r#"tool said: args were {"q":1}"#), "{content}");
    let finish: Vec<&str> = data.iter().filter_map(|v| v["choices"][0]["finish_reason"].as_str()).collect();
    assert_eq!(finish, ["stop"]);
}

#[test]
fn a_failing_tool_reports_its_status_and_stderr_to_the_model() {
    let gw = gateway(ECHO, &[tool("lookup", "tool_fails.sh", "")], "", "");
    let r = ask(&gw, r#"/tool lookup {"city":"Atlantis"}"#, "");
    assert_eq!(
        reply(&r),
        (
            "tool said: tool lookup exited with status 3; stderr: no such city; stdout: partial output".into(),
            "stop".into()
        )
    );
}

/// The state letter of a process (`R`, `S`, `Z`…), or `None` when it no longer exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn alive(pid: u32) -> bool {
    matches!(proc_state(pid), Some(s) if s != 'Z')
}

fn read_pids(dir: &Path) -> (u32, u32) {
    let s = std::fs::read_to_string(dir.join("pids")).expect("the tool recorded its pids");
    let v: Vec<u32> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    (v[0], v[1])
}

#[test]
fn a_hanging_tool_is_killed_with_its_process_group_at_its_timeout() {
    let dir = temp_dir("tool-pids");
    let gw = gateway(
        ECHO,
        &[tool("lookup", "tool_hangs.sh", &format!("timeoutSeconds: 1, env: {{ PID_DIR: '{}' }}", dir.display()))],
        "",
        "",
    );
    let t = Instant::now();
    let r = ask(&gw, r#"/tool lookup {}"#, "");
    let took = t.elapsed();
    assert_eq!(reply(&r), ("tool said: tool lookup timed out after 1 s and was killed".into(), "stop".into()));
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let (tool_pid, grandchild) = read_pids(&dir);
    let end = Instant::now() + Duration::from_secs(5);
    while (alive(tool_pid) || alive(grandchild)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(tool_pid), "tool {tool_pid} still running");
    assert!(!alive(grandchild), "the tool's child {grandchild} still running");
}

#[test]
fn a_client_that_goes_away_kills_a_running_tool() {
    let dir = temp_dir("tool-cancel");
    let gw =
        gateway(ECHO, &[tool("lookup", "tool_hangs.sh", &format!("env: {{ PID_DIR: '{}' }}", dir.display()))], "", "");
    let body = r#"{"model":"gatelet","stream":true,"messages":[{"role":"user","content":"/tool lookup {}"}]}"#;
    let mut s = gw.connect();
    s.write_all(&chat_request(body)).unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !dir.join("pids").exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (tool_pid, grandchild) = read_pids(&dir);
    assert!(alive(tool_pid));
    drop(s);
    let end = Instant::now() + Duration::from_secs(5);
    while (alive(tool_pid) || alive(grandchild)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(tool_pid) && !alive(grandchild), "tool {tool_pid} or its child {grandchild} survived the cancel");
}

#[test]
fn too_many_tool_steps_end_with_length() {
    let dir = temp_dir("tool-count");
    let count = dir.join("count");
    let gw = gateway(
        &model(),
        &[tool("again", "tool_count.sh", &format!("env: {{ COUNT_FILE: '{}' }}", count.display()))],
        "maxToolSteps: 3, timeoutSeconds: 30,",
        "",
    );
    let r = ask(&gw, "loop again", "");
    let (content, finish) = reply(&r);
    assert_eq!(finish, "length");
    assert_eq!(content, "", "no text was produced");
    assert!(r.json()["choices"][0]["message"].get("tool_calls").is_none(), "agent calls stay inside: {}", r.text());
    assert_eq!(std::fs::read_to_string(&count).unwrap().lines().count(), 3);
}

#[test]
fn mixed_agent_and_client_tools_return_only_the_client_call() {
    let dir = temp_dir("tool-mixed");
    let count = dir.join("count");
    let gw = gateway(
        &model(),
        &[tool("lookup", "tool_count.sh", &format!("env: {{ COUNT_FILE: '{}' }}", count.display()))],
        "",
        "",
    );
    let client_tools = r#""tools":[{"type":"function","function":{"name":"get_weather"}}]"#;
    let text = r#"calls [["lookup","{}"],["get_weather","{\"city\":\"Rome\"}"]]"#;
    let msg = serde_json::to_string(text).unwrap();
    let body =
        format!(r#"{{"model":"gatelet","stream":true,{client_tools},"messages":[{{"role":"user","content":{msg}}}]}}"#);
    let r = gw.one(&chat_request_with(&["x-gatelet-session-key: mixed"], &body));
    let data = util::sse_json(r.text().as_bytes());
    let calls: Vec<&Value> = data.iter().filter_map(|v| v["choices"][0]["delta"].get("tool_calls")).collect();
    assert_eq!(
        calls[0],
        &json!([{"index":0,"id":"call_m1_1","type":"function","function":{"name":"get_weather","arguments":""}}]),
        "{data:?}"
    );
    assert_eq!(calls[1], &json!([{"index":0,"function":{"arguments":"{\"city\":\"Rome\"}"}}]));
    assert_eq!(calls.len(), 2);
    let finish: Vec<&str> = data.iter().filter_map(|v| v["choices"][0]["finish_reason"].as_str()).collect();
    assert_eq!(finish, ["tool_calls"]);
    assert_eq!(std::fs::read_to_string(&count).unwrap(), "x\n", "the agent tool ran once");

    // The client answers its call; the model sees both results, each once.
    let follow = json!({"model":"gatelet","tools":[{"type":"function","function":{"name":"get_weather"}}],"messages":[
        {"role":"user","content":text},
        {"role":"assistant","content":null,"tool_calls":[{"id":"call_m1_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Rome\"}"}}]},
        {"role":"tool","tool_call_id":"call_m1_1","content":"sunny"}]});
    let r = gw.one(&chat_request_with(&["x-gatelet-session-key: mixed"], &follow.to_string()));
    assert_eq!(reply(&r), ("final: call 1 | sunny".into(), "stop".into()));
}

#[test]
fn command_backend_gets_tools_and_parts_and_its_tool_calls_reach_the_client() {
    let gw = gateway(&model(), &[tool("lookup", "tool_args.sh", "")], "", "");
    let parts =
        json!([{"type":"text","text":"inspect"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]);
    let body = json!({"model":"gatelet","tools":[{"type":"function","function":{"name":"get_weather"}}],
        "tool_choice":"auto","messages":[{"role":"user","content":parts}]});
    let r = gw.one(&chat_request(&body.to_string()));
    let (content, _) = reply(&r);
    let seen: Value = serde_json::from_str(&content).unwrap();
    assert_eq!(seen, json!({"tools":["get_weather","lookup"],"parts":parts,"toolChoice":"auto"}));

    let r = ask(
        &gw,
        r#"call get_weather {"city":"Lima"}"#,
        r#","tools":[{"type":"function","function":{"name":"get_weather"}}]"#,
    );
    let v = r.json();
    assert_eq!(
        v["choices"][0],
        json!({"index":0,"logprobs":null,"finish_reason":"tool_calls","message":{"role":"assistant","content":null,
            "tool_calls":[{"id":"call_m1_0","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Lima\"}"}}]}})
    );
}

#[test]
fn a_command_tool_call_without_a_valid_name_is_a_backend_error() {
    let gw = gateway(&model(), &[], "", "");
    let r = ask(&gw, "call bad%name {}", "");
    assert_eq!(r.status, 502, "{}", r.text());
    let e = util::error_of(&r);
    assert!(e["message"].as_str().unwrap().contains("tool_call needs a valid function `name`"), "{e}");
}

#[test]
fn http_streams_keep_alive_while_a_tool_runs() {
    let gw = gateway(ECHO, &[tool("slow", "tool_slow.sh", "")], "", "keepaliveSeconds: 1,");
    let body = r#"{"model":"gatelet","stream":true,"messages":[{"role":"user","content":"/tool slow {}"}]}"#;
    let r = gw.one(&chat_request(body));
    let text = r.text();
    let ka =
        text.find(": keep-alive\n\n").unwrap_or_else(|| panic!("no keep-alive comment while the tool ran: {text}"));
    let answer = text.find(r#""content":"tool""#).expect("the answer");
    assert!(ka < answer, "{text}");
    let data = util::sse_json(text.as_bytes());
    let content: String = data.iter().filter_map(|v| v["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "tool said: slow result");
}

#[test]
fn websocket_agent_runs_show_tool_events() {
    let gw = gateway(ECHO, &[tool("lookup", "tool_args.sh", ""), tool("broken", "tool_fails.sh", "")], "", "");
    let mut ws = Ws::connected(&gw);
    ws.request("a1", "agent", json!({"message": r#"/tool lookup {"q":"ws"}"#, "idempotencyKey": "k1"}));
    let start = ws.until_event(|e| e["payload"]["stream"] == "tool" && e["payload"]["data"]["phase"] == "start");
    let d = &start["payload"]["data"];
    assert_eq!(d["phase"], "start");
    assert_eq!(d["name"], "lookup");
    assert_eq!(d["args"], r#"{"q":"ws"}"#);
    let id = d["toolCallId"].as_str().unwrap().to_string();
    let result = ws.until_event(|e| e["payload"]["stream"] == "tool" && e["payload"]["data"]["phase"] == "result");
    let d = &result["payload"]["data"];
    assert_eq!((d["phase"].as_str(), d["toolCallId"].as_str()), (Some("result"), Some(id.as_str())));
    assert!(d["result"].as_str().unwrap().starts_with(r#"args were {"q":"ws"}"#), "{d}");
    let fin = ws.res_for("a1");
    let fin = if fin["payload"]["status"] == "accepted" { ws.res_for("a1") } else { fin };
    assert!(fin["payload"]["result"]["text"].as_str().unwrap().starts_with("tool said: args were"), "{fin}");

    ws.request("a2", "agent", json!({"message": "/tool broken {}", "idempotencyKey": "k2"}));
    let err = ws.until_event(|e| e["event"] == "agent" && e["payload"]["data"]["phase"] == "error");
    assert_eq!(err["payload"]["stream"], "tool");
    assert!(err["payload"]["data"]["error"].as_str().unwrap().contains("exited with status 3"), "{err}");
}

#[test]
fn websocket_results_carry_client_tool_calls() {
    // A model that calls a tool the agent does not have: the run ends on it and the result says so.
    let gw = gateway(&model(), &[], "", "");
    let mut ws = Ws::connected(&gw);
    ws.request("a1", "agent", json!({"message": r#"call get_weather {"city":"Oslo"}"#, "idempotencyKey": "k"}));
    let mut fin = ws.res_for("a1");
    if fin["payload"]["status"] == "accepted" {
        fin = ws.res_for("a1");
    }
    let result = &fin["payload"]["result"];
    assert_eq!(result["finishReason"], "tool_calls", "{fin}");
    assert_eq!(
        result["toolCalls"],
        json!([{"id":"call_m1_0","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}}])
    );
}

#[test]
fn bad_agent_tool_config_names_file_line_column_and_key() {
    let dir = temp_dir("tool-cfg");
    let path: PathBuf = dir.join("gatelet.json5");
    let cases = [
        ("{ name: 'has space', command: { argv: ['true'] } }", "agents.list[0].tools[0].name"),
        (
            "{ name: 'a', command: { argv: ['true'] } }, { name: 'a', command: { argv: ['true'] } }",
            "agents.list[0].tools[1].name",
        ),
        ("{ name: 'a' }", "agents.list[0].tools[0].command"),
        ("{ name: 'a', command: { argv: [] } }", "agents.list[0].tools[0].command.argv"),
        (
            "{ name: 'a', command: { argv: ['x'], timeoutSeconds: 0 } }",
            "agents.list[0].tools[0].command.timeoutSeconds",
        ),
    ];
    for (tools, key) in cases {
        let cfg = config("", &format!("agents: {{ list: [{{ id: 'main',\n  tools: [{tools}] }}] }}"));
        std::fs::write(&path, &cfg).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatelet"))
            .args(["config", "check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{tools}");
        let err = String::from_utf8_lossy(&out.stderr);
        let want = format!("{}:2:", path.display());
        assert!(err.contains(&want) && err.contains(&format!("`{key}`")), "{tools}: {err}");
    }
}

#[test]
fn a_command_backend_is_read_no_faster_than_the_client() {
    // `yes` writes without end; the client reads a little at a time. The gateway's memory must
    // stay flat: the pipe holds the program back.
    let gw = Gateway::with_config(&config(
        "",
        "agents: { list: [{ id: 'main', default: true, backend: { kind: 'command', argv: ['yes'] } }] }",
    ));
    let body = r#"{"model":"gatelet","stream":true,"messages":[{"role":"user","content":"x"}]}"#;
    let mut s = gw.connect();
    s.write_all(&chat_request(body)).unwrap();
    let pid = gw.child.id();
    let mut buf = [0u8; 4096];
    let mut got = 0usize;
    let mut peak = 0;
    let end = Instant::now() + Duration::from_secs(6);
    while Instant::now() < end {
        got += s.read(&mut buf).unwrap_or(0);
        std::thread::sleep(Duration::from_millis(20));
        peak = peak.max(util::rss_kib(pid));
        if peak >= 64 * 1024 {
            break;
        }
    }
    assert!(got > 0, "the stream flowed");
    assert!(peak < 64 * 1024, "gateway RSS reached {peak} KiB while a slow client read {got} bytes");
}

#[test]
fn agent_tool_steps_are_recorded_in_the_sticky_transcript() {
    let dir = temp_dir("tool-transcript");
    let cfg = config(
        "",
        &format!(
            "agents: {{ list: [{{ id: 'main', default: true, backend: {{ kind: 'echo' }}, tools: [{}] }}] }}",
            tool("lookup", "tool_args.sh", "")
        ),
    );
    let gw = Gateway::in_dir(&cfg, &dir);
    let body = r#"{"model":"gatelet","user":"ann","messages":[{"role":"user","content":"/tool lookup {\"q\":2}"}]}"#;
    assert_eq!(gw.one(&chat_request(body)).status, 200);
    let file = std::fs::read_dir(dir.join("agents/main/sessions"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        .unwrap()
        .path();
    let lines: Vec<Value> =
        std::fs::read_to_string(file).unwrap().lines().skip(1).map(|l| serde_json::from_str(l).unwrap()).collect();
    let roles: Vec<&str> = lines.iter().map(|l| l["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    let call = &lines[1]["tool"]["tool_calls"][0];
    assert_eq!(call["function"], json!({"name":"lookup","arguments":"{\"q\":2}"}));
    assert_eq!(lines[2]["tool"]["tool_call_id"], call["id"]);
    assert!(lines[2]["content"].as_str().unwrap().starts_with(r#"args were {"q":2}"#));
    assert!(lines[1].get("usage").is_none() && lines[3].get("usage").is_some(), "usage on the reply only");
}

#[test]
fn chat_send_final_events_carry_client_tool_calls() {
    let gw = gateway(&model(), &[], "", "");
    let mut ws = Ws::connected(&gw);
    let r = ws.call(
        "c1",
        "chat.send",
        json!({"sessionKey": "agent:main:ws-tools", "message": r#"call get_weather {"city":"Oslo"}"#, "idempotencyKey": "i1"}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let fin = ws.until_event(|e| e["event"] == "chat" && e["payload"]["state"] == "final");
    assert_eq!(fin["payload"]["stopReason"], "tool_calls", "{fin}");
    assert_eq!(fin["payload"]["toolCalls"][0]["function"]["name"], "get_weather");
}
