//! Persistent sticky sessions across gateway restarts and a SIGKILL in the middle of a reply.
//!
//! The agent uses the `openai` backend against a scripted upstream that records every request,
//! so the tests see exactly which history the gateway sends after it comes back.

mod util;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use util::sse_client::SseStream;
use util::upstream::{self as up, Gate, Recorded, Step, Upstream};
use util::{Gateway, chat_request, config, temp_dir};

fn cfg(base_url: &str) -> String {
    config(
        "",
        &format!(
            "session: {{ persist: true }}, agents: {{ list: [{{ id: 'up', default: true, systemPrompt: 'Be brief.', \
               backend: {{ kind: 'openai', baseUrl: '{base_url}' }} }}] }}"
        ),
    )
}

/// The last user message of a recorded upstream request.
fn last_user(r: &Recorded) -> String {
    let j = r.json();
    let msgs = j["messages"].as_array().unwrap();
    msgs.iter().rev().find(|m| m["role"] == "user").unwrap()["content"].as_str().unwrap().to_string()
}

/// The conversation (role, content) an upstream request carried, system prompt excluded.
fn conversation(r: &Recorded) -> Vec<(String, String)> {
    r.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] != "system")
        .map(|m| (m["role"].as_str().unwrap().to_string(), m["content"].as_str().unwrap().to_string()))
        .collect()
}

fn pair(role: &str, content: &str) -> (String, String) {
    (role.to_string(), content.to_string())
}

/// Replies "re: <last user message>"; a message "hang" gets one delta and then a stall until
/// `gate` opens.
fn upstream(gate: std::sync::Arc<Gate>) -> Upstream {
    Upstream::start(move |r| {
        let said = last_user(r);
        if said == "hang" {
            return vec![up::sse_head(), up::chunk(up::content("partial").as_bytes()), Step::Wait(gate.clone())];
        }
        up::stream_reply(&[up::content("re: "), up::content(&said), up::finish("stop"), up::DONE.into()])
    })
}

fn turn(gw: &Gateway, user: &str, text: &str) -> String {
    let body = json!({"model": "gatelet", "user": user, "messages": [{"role": "user", "content": text}]});
    let r = gw.one(&chat_request(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-gatelet-session-key"), Some(format!("agent:up:openai-user:{user}")));
    r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

fn transcript_file(dir: &Path) -> std::path::PathBuf {
    let sdir = dir.join("agents/up/sessions");
    std::fs::read_dir(&sdir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .expect("a transcript file")
}

/// Every line of the transcript parses as JSON (no torn line left in the middle).
fn transcript_lines(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(transcript_file(dir)).unwrap();
    assert!(text.ends_with('\n'), "transcript ends with a complete line");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l:?}: {e}"))).collect()
}

#[test]
fn a_conversation_continues_after_a_restart() {
    let gate = Gate::new();
    let up = upstream(gate);
    let dir = temp_dir("sessions-restart");
    let mut gw = Gateway::in_dir(&cfg(&up.base_url()), &dir);
    assert_eq!(turn(&gw, "bob", "first"), "re: first");
    assert_eq!(turn(&gw, "bob", "second"), "re: second");
    gw.kill();

    let gw = Gateway::in_dir(&cfg(&up.base_url()), &dir);
    assert_eq!(turn(&gw, "bob", "third"), "re: third");
    let reqs = up.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(
        conversation(&reqs[2]),
        vec![
            pair("user", "first"),
            pair("assistant", "re: first"),
            pair("user", "second"),
            pair("assistant", "re: second"),
            pair("user", "third"),
        ]
    );
    // Another user's session is separate.
    assert_eq!(turn(&gw, "alice", "hello"), "re: hello");
    assert_eq!(conversation(&up.requests()[3]), vec![pair("user", "hello")]);

    // On disk: the index names the session, the transcript has a header and six messages.
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir.join("agents/up/sessions/sessions.json")).unwrap()).unwrap();
    assert!(index["agent:up:openai-user:bob"]["sessionId"].is_string(), "{index}");
    assert!(index["agent:up:openai-user:alice"]["sessionId"].is_string(), "{index}");
    let bob = index["agent:up:openai-user:bob"]["sessionId"].as_str().unwrap();
    let text = std::fs::read_to_string(dir.join(format!("agents/up/sessions/{bob}.jsonl"))).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["type"], "session");
    assert_eq!(lines[0]["key"], "agent:up:openai-user:bob");
    assert_eq!(lines.len(), 7, "{text}");
    assert_eq!(lines[6]["role"], "assistant");
    assert_eq!(lines[6]["content"], "re: third");
}

#[test]
fn sigkill_mid_stream_leaves_a_transcript_that_loads_and_continues() {
    let gate = Gate::new();
    let up = upstream(gate.clone());
    let dir = temp_dir("sessions-sigkill");
    let mut gw = Gateway::in_dir(&cfg(&up.base_url()), &dir);
    assert_eq!(turn(&gw, "carol", "first"), "re: first");

    // A streamed reply is under way when the gateway is killed.
    let body = json!({"model": "gatelet", "user": "carol", "stream": true,
                      "messages": [{"role": "user", "content": "hang"}]});
    let mut s = SseStream::open(gw.connect(), &chat_request(&body.to_string()));
    assert_eq!(s.status, 200);
    let first = std::iter::from_fn(|| s.next_data()).find_map(|d| {
        let v: Value = serde_json::from_str(&d).ok()?;
        v["choices"][0]["delta"]["content"].as_str().filter(|c| !c.is_empty()).map(String::from)
    });
    assert_eq!(first.as_deref(), Some("partial"));
    gw.kill();
    gate.open();
    // The client sees the stream end without [DONE].
    assert!(s.rest().iter().all(|r| r != "data: [DONE]"));

    // Simulate the worst case of a crash during a write as well: a torn last line.
    let file = transcript_file(&dir);
    let mut f = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    std::io::Write::write_all(&mut f, b"{\"type\":\"message\",\"role\":\"user\",\"cont").unwrap();
    drop(f);

    let gw = Gateway::in_dir(&cfg(&up.base_url()), &dir);
    assert_eq!(turn(&gw, "carol", "again"), "re: again");
    let reqs = up.requests();
    let last = reqs.last().unwrap();
    assert_eq!(conversation(last), vec![pair("user", "first"), pair("assistant", "re: first"), pair("user", "again")]);
    // The torn line was reported, cut off, and the next turn appended cleanly after it.
    let warned = gw.stderr.lock().unwrap().iter().any(|l| l.contains("unreadable transcript line skipped"));
    assert!(warned, "{:?}", gw.stderr.lock().unwrap());
    let lines = transcript_lines(&dir);
    assert_eq!(lines.len(), 5, "{lines:?}");
    assert_eq!(lines[4]["content"], "re: again");
}

#[test]
fn a_client_that_leaves_mid_reply_leaves_an_aborted_turn() {
    let gate = Gate::new();
    let up = upstream(gate.clone());
    let dir = temp_dir("sessions-abort");
    let gw = Gateway::in_dir(&cfg(&up.base_url()), &dir);
    let body = json!({"model": "gatelet", "user": "dan", "stream": true,
                      "messages": [{"role": "user", "content": "hang"}]});
    let mut s = SseStream::open(gw.connect(), &chat_request(&body.to_string()));
    let _ = s.next_data();
    let _ = s.next_data();
    drop(s);
    // The run ends within a second or so; then the aborted turn is on disk.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let lines = loop {
        if let Ok(Some(p)) = std::fs::read_dir(dir.join("agents/up/sessions"))
            .map(|d| d.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "jsonl")))
        {
            let text = std::fs::read_to_string(p).unwrap();
            if text.lines().count() >= 3 {
                break text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).collect::<Vec<_>>();
            }
        }
        assert!(std::time::Instant::now() < end, "no aborted turn written");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines[1]["content"], "hang");
    assert_eq!(lines[2]["role"], "assistant");
    assert_eq!(lines[2]["content"], "partial");
    assert_eq!(lines[2]["aborted"], true);
    gate.open();
}
