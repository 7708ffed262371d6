//! The `command` backend through the real gateway, with the small programs in tests/scripts/.

mod util;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use util::sse_client::SseStream;
use util::{Gateway, chat_request, config, temp_dir};

fn script(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts").join(name).display().to_string()
}

/// A gateway whose default agent runs `argv`.
fn gateway(argv: &[&str], backend_extra: &str, agent_extra: &str) -> Gateway {
    let argv = serde_json::to_string(argv).unwrap();
    Gateway::with_config(&config(
        "",
        &format!(
            "agents: {{ list: [{{ id: 'cmd', default: true, {agent_extra} \
               backend: {{ kind: 'command', argv: {argv}, {backend_extra} }} }}] }}"
        ),
    ))
}

fn ask(gw: &Gateway, text: &str) -> util::Resp {
    let body = serde_json::json!({"model": "gatelet", "messages": [{"role": "user", "content": text}]});
    gw.one(&chat_request(&body.to_string()))
}

fn stream(gw: &Gateway, text: &str) -> SseStream {
    let body = serde_json::json!({"model": "gatelet", "stream": true, "messages": [{"role": "user", "content": text}]});
    SseStream::open(gw.connect(), &chat_request(&body.to_string()))
}

fn content_of(data: &str) -> Option<String> {
    let v: Value = serde_json::from_str(data).ok()?;
    v["choices"][0]["delta"]["content"].as_str().map(String::from)
}

#[test]
fn plain_lines_with_cwd_and_env() {
    let dir = temp_dir("cmd-cwd");
    let gw = gateway(
        &["sh", &script("plain_lines.sh")],
        &format!("cwd: '{}', env: {{ GREETING: 'hi there' }}", dir.display()),
        "",
    );
    let r = ask(&gw, "ping");
    assert_eq!(r.status, 200, "{}", r.text());
    let name = dir.file_name().unwrap().to_str().unwrap();
    assert_eq!(r.json()["choices"][0]["message"]["content"], format!("Hello from {name}\nGREETING=hi there\ngot ping"));
    assert_eq!(r.json()["choices"][0]["finish_reason"], "stop");
}

#[test]
fn json_events_stream_with_usage_and_finish() {
    let gw = gateway(&["python3", &script("json_events.py")], "", "");
    let body = r#"{"model":"gatelet","stream":true,"stream_options":{"include_usage":true},"max_tokens":9,
                   "messages":[{"role":"user","content":"one two three"}]}"#;
    let mut s = SseStream::open(gw.connect(), &chat_request(body));
    assert_eq!(s.status, 200, "{}", s.head);
    let data: Vec<String> = std::iter::from_fn(|| s.next_data()).collect();
    let deltas: Vec<String> = data.iter().filter_map(|d| content_of(d)).filter(|c| !c.is_empty()).collect();
    assert_eq!(deltas, ["one", " two", " three"]);
    let stop: Value = serde_json::from_str(&data[data.len() - 3]).unwrap();
    assert_eq!(stop["choices"][0]["finish_reason"], "length", "{stop}");
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 11);
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[test]
fn a_failing_program_is_a_backend_error_with_its_stderr() {
    let gw = gateway(&["sh", &script("fails.sh")], "", "");
    let r = ask(&gw, "x");
    assert_eq!(r.status, 502, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], "backend_error");
    assert_eq!(
        v["error"]["message"],
        "command sh: exited with status 2: loading model | model file missing: /models/x.gguf"
    );
    // Streaming: the partial line went out, then the error record, and no [DONE].
    let mut s = stream(&gw, "x");
    let data: Vec<String> = std::iter::from_fn(|| s.next_data()).collect();
    assert!(data.iter().any(|d| content_of(d).as_deref() == Some("partial")), "{data:?}");
    let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "backend_error");
    assert!(!data.iter().any(|d| d == "[DONE]"));
}

#[test]
fn a_program_that_cannot_start() {
    let gw = gateway(&["/nonexistent/agent-program"], "", "");
    let r = ask(&gw, "x");
    assert_eq!(r.status, 502);
    let m = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(m.starts_with("command /nonexistent/agent-program: cannot start:"), "{m}");
}

#[test]
fn an_error_event_fails_the_run_and_kills_the_program() {
    let gw = gateway(&["sh", &script("error_event.sh")], "", "");
    let t = Instant::now();
    let mut s = stream(&gw, "x");
    let data: Vec<String> = std::iter::from_fn(|| s.next_data()).collect();
    assert!(t.elapsed() < Duration::from_secs(10), "the run did not wait for the program");
    assert!(data.iter().any(|d| content_of(d).as_deref() == Some("thinking")), "{data:?}");
    let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["message"], "command sh: tool quota exhausted");
}

#[test]
fn a_program_that_exits_while_its_child_holds_stdout_still_finishes() {
    let gw = gateway(&["sh", &script("background_holds_stdout.sh")], "", "");
    let t = Instant::now();
    let r = ask(&gw, "x");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "done");
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// The state letter of a process (`R`, `S`, `Z`…), or `None` when it no longer exists.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

fn wait_pids(dir: &Path) -> (u32, u32) {
    let file = dir.join("pids");
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(s) = std::fs::read_to_string(&file) {
            let v: Vec<u32> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if v.len() == 2 {
                return (v[0], v[1]);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the script did not start");
}

/// Both the program and its child are gone within a few seconds, and the gateway left no
/// zombie of its own behind.
fn assert_killed(gw: &Gateway, program: u32, child: u32) {
    let end = Instant::now() + Duration::from_secs(5);
    let alive = |p| matches!(proc_state(p), Some(s) if s != 'Z');
    while (alive(program) || alive(child)) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(program), "program {program} still running: {:?}", proc_state(program));
    assert!(!alive(child), "its child {child} still running: {:?}", proc_state(child));
    // A zombie whose parent is the gateway would mean a missing wait().
    let gw_pid = gw.child.id();
    let end = Instant::now() + Duration::from_secs(5);
    while proc_state(program).is_some() && parent_of(program) == Some(gw_pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !(proc_state(program) == Some('Z') && parent_of(program) == Some(gw_pid)),
        "program {program} left as a zombie of the gateway"
    );
}

fn pid_dir() -> PathBuf {
    temp_dir("cmd-pids")
}

#[test]
fn client_disconnect_kills_the_program_and_its_children() {
    let dir = pid_dir();
    let gw = gateway(&["sh", &script("hangs.sh")], &format!("env: {{ PID_DIR: '{}' }}", dir.display()), "");
    let mut s = stream(&gw, "x");
    let first = std::iter::from_fn(|| s.next_data()).find_map(|d| content_of(&d).filter(|c| !c.is_empty()));
    assert_eq!(first.as_deref(), Some("started"));
    let (program, child) = wait_pids(&dir);
    assert_eq!(proc_state(program).map(|s| s != 'Z'), Some(true), "the program runs while the client waits");
    drop(s);
    assert_killed(&gw, program, child);
}

#[test]
fn the_deadline_kills_a_hanging_program() {
    let dir = pid_dir();
    let gw = gateway(
        &["sh", &script("hangs.sh")],
        &format!("env: {{ PID_DIR: '{}' }}", dir.display()),
        "timeoutSeconds: 1,",
    );
    let t = Instant::now();
    let r = ask(&gw, "x");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "agent_timeout");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    let (program, child) = wait_pids(&dir);
    assert_killed(&gw, program, child);
}
