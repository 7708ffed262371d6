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

    let mut gw = Gateway::in_dir(&cfg(&up.base_url()), &dir);
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

    // On disk, after a drain: the index snapshot names the sessions, the transcript has a header
    // and six messages.
    gw.terminate();
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
    // Log lines are written by the gateway's logger thread, a moment after the answer.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let warned = || gw.stderr.lock().unwrap().iter().any(|l| l.contains("unreadable transcript line skipped"));
    while !warned() && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(warned(), "{:?}", gw.stderr.lock().unwrap());
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

/// `gatelet sessions …` on `dir` with the test config.
fn sessions_cli(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_gatelet"))
        .arg("sessions")
        .args(args)
        .arg("--config")
        .arg(dir.join("gatelet.json5"))
        .env("GATELET_STATE_DIR", dir)
        .env_remove("GATELET_LOG")
        .output()
        .expect("run gatelet sessions")
}

fn listed(dir: &Path) -> Value {
    let o = sessions_cli(dir, &["list", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn listed_keys(dir: &Path) -> Vec<String> {
    let mut keys: Vec<String> =
        listed(dir)["sessions"].as_array().unwrap().iter().map(|s| s["key"].as_str().unwrap().to_string()).collect();
    keys.sort();
    keys
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(std::time::Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A transcript from before the index journal (an older gatelet), for a session the index does
/// not list: start-up reads it and then wants a snapshot.
fn write_old_transcript(dir: &Path, id: &str, user: &str, ts: u64) {
    let sdir = dir.join("agents/up/sessions");
    std::fs::create_dir_all(&sdir).unwrap();
    let key = format!("agent:up:openai-user:{user}");
    let lines = [
        json!({"type": "session", "version": 1, "id": id, "key": key, "agentId": "up", "timestamp": ts}),
        json!({"type": "message", "role": "user", "content": "old question", "timestamp": ts}),
        json!({"type": "message", "role": "assistant", "content": "old answer", "timestamp": ts,
               "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(sdir.join(format!("{id}.jsonl")), text).unwrap();
}

#[test]
fn sigkill_while_the_index_snapshot_is_written_loses_nothing() {
    let gate = Gate::new();
    let up = upstream(gate);
    let dir = temp_dir("sessions-snapkill");
    let sdir = dir.join("agents/up/sessions");
    let mut gw = Gateway::in_dir(&cfg(&up.base_url()), &dir);
    assert_eq!(turn(&gw, "bob", "first"), "re: first");
    assert_eq!(turn(&gw, "alice", "hello"), "re: hello");
    gw.kill();
    assert!(!sdir.join("sessions.json").exists(), "turns write the journal, not a snapshot");

    // A transcript the index does not know makes the next start want a snapshot at once; the
    // test hook stalls that snapshot half-way through its temp file.
    write_old_transcript(&dir, "0ld0ld", "carol", 1_700_000_000_000);
    let mut gw = Gateway::in_dir_env(&cfg(&up.base_url()), &dir, &[("GATELET_TEST_SNAPSHOT_PAUSE_MS", "120000")]);
    wait_for("the snapshot to start", || sdir.join("sessions.json.tmp").exists());
    // A turn while the snapshot is being written goes to the new journal.
    assert_eq!(turn(&gw, "bob", "second"), "re: second");
    gw.kill();
    assert!(!sdir.join("sessions.json").exists(), "killed before the snapshot was in place");

    let mut gw = Gateway::in_dir(&cfg(&up.base_url()), &dir);
    assert_eq!(turn(&gw, "bob", "third"), "re: third");
    assert_eq!(
        conversation(up.requests().last().unwrap()),
        vec![
            pair("user", "first"),
            pair("assistant", "re: first"),
            pair("user", "second"),
            pair("assistant", "re: second"),
            pair("user", "third"),
        ]
    );
    assert_eq!(turn(&gw, "carol", "new"), "re: new");
    assert_eq!(
        conversation(up.requests().last().unwrap()),
        vec![pair("user", "old question"), pair("assistant", "old answer"), pair("user", "new")]
    );
    gw.terminate();
    let keys = listed_keys(&dir);
    assert_eq!(keys, ["agent:up:openai-user:alice", "agent:up:openai-user:bob", "agent:up:openai-user:carol"]);
    let left: Vec<String> = std::fs::read_dir(&sdir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sessions.journal."))
        .collect();
    assert!(left.is_empty(), "the drain's snapshot covers the rotated journals: {left:?}");
}

/// An openai upstream that records requests and answers "ok".
fn recording_upstream() -> Upstream {
    Upstream::start(|_| up::stream_reply(&[up::content("ok"), up::finish("stop"), up::DONE.into()]))
}

#[test]
fn max_history_sends_the_newest_messages_and_keeps_tool_results_with_their_call() {
    let up = recording_upstream();
    let dir = temp_dir("sessions-maxhist");
    let config = config(
        "",
        &format!(
            "session: {{ persist: true, maxHistoryMessages: 4 }}, agents: {{ list: [{{ id: 'up', default: true, \
               backend: {{ kind: 'openai', baseUrl: '{}' }} }}] }}",
            up.base_url()
        ),
    );
    let mut gw = Gateway::in_dir(&config, &dir);
    let send = |messages: Value| {
        let body = json!({"model": "gatelet", "user": "tim", "messages": messages});
        let r = gw.one(&chat_request(&body.to_string()));
        assert_eq!(r.status, 200, "{}", r.text());
    };
    let roles = |r: &Recorded| -> Vec<String> {
        r.json()["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["role"] != "system")
            .map(|m| format!("{}:{}", m["role"].as_str().unwrap(), m["content"].as_str().unwrap_or("")))
            .collect()
    };
    send(json!([{"role": "user", "content": "q1"}]));
    // The client ran two tools for the assistant's calls and sends their results.
    send(json!([
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "r1"},
        {"role": "tool", "tool_call_id": "c2", "content": "r2"},
    ]));
    let reqs = up.requests();
    assert_eq!(roles(&reqs[1]), ["user:q1", "assistant:ok", "tool:r1", "tool:r2"], "four fit");
    assert_eq!(reqs[1].json()["messages"][2]["tool_call_id"], "c1", "{}", reqs[1].json());
    // Stored now: q1 ok r1 r2 ok. With q3 that is six; the newest four would start on r2, a tool
    // result without its call, so the cut moves past the group.
    send(json!([{"role": "user", "content": "q3"}]));
    assert_eq!(roles(&up.requests()[2]), ["assistant:ok", "user:q3"]);
    // Two more tool results as the newest messages: cut back to the message before them.
    send(json!([
        {"role": "assistant", "content": "ok"},
        {"role": "tool", "tool_call_id": "c3", "content": "r3"},
        {"role": "tool", "tool_call_id": "c4", "content": "r4"},
        {"role": "tool", "tool_call_id": "c5", "content": "r5"},
        {"role": "tool", "tool_call_id": "c6", "content": "r6"},
    ]));
    assert_eq!(roles(&up.requests()[3]), ["assistant:ok", "tool:r3", "tool:r4", "tool:r5", "tool:r6"]);
    // The transcript keeps everything.
    gw.terminate();
    let o = sessions_cli(&dir, &["show", "agent:up:openai-user:tim", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let shown: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(shown["messages"].as_array().unwrap().len(), 12, "{shown}");
    assert_eq!(shown["session"]["messageCount"], 12);
}

#[test]
fn idle_sessions_are_removed_in_the_background() {
    let up = recording_upstream();
    let dir = temp_dir("sessions-idle");
    let config = config(
        "",
        &format!(
            "session: {{ persist: true, idleDays: 30 }}, agents: {{ list: [{{ id: 'up', default: true, \
               backend: {{ kind: 'openai', baseUrl: '{}' }} }}] }}",
            up.base_url()
        ),
    );
    let sdir = dir.join("agents/up/sessions");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    write_old_transcript(&dir, "f0f0f0", "stale", now - 31 * 86_400_000);
    write_old_transcript(&dir, "e1e1e1", "recent", now - 29 * 86_400_000);
    let mut gw = Gateway::in_dir(&config, &dir);
    let body = json!({"model": "gatelet", "user": "fresh", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(gw.one(&chat_request(&body.to_string())).status, 200);
    wait_for("the idle session to go", || !sdir.join("f0f0f0.jsonl").exists());
    assert!(sdir.join("e1e1e1.jsonl").exists());
    gw.terminate();
    assert_eq!(listed_keys(&dir), ["agent:up:openai-user:fresh", "agent:up:openai-user:recent"]);
}

#[test]
fn a_state_dir_from_before_the_journal_keeps_working() {
    let gate = Gate::new();
    let up = upstream(gate);
    let dir = temp_dir("sessions-oldlayout");
    let sdir = dir.join("agents/up/sessions");
    // What an older gatelet left: transcripts plus a pretty-printed sessions.json without message
    // counts (advisory: its token figures lag one turn behind dave's transcript here).
    write_old_transcript(&dir, "0a0a0a", "dave", 1_700_000_000_000);
    write_old_transcript(&dir, "0b0b0b", "erin", 1_700_000_001_000);
    let old_index = json!({
        "agent:up:openai-user:dave": { "sessionId": "0a0a0a", "updatedAt": 1_700_000_000_000u64,
                                       "inputTokens": 0, "outputTokens": 0 },
        "agent:up:openai-user:erin": { "sessionId": "0b0b0b", "updatedAt": 1_700_000_001_000u64,
                                       "inputTokens": 2, "outputTokens": 2 },
    });
    std::fs::write(sdir.join("sessions.json"), serde_json::to_vec_pretty(&old_index).unwrap()).unwrap();
    let mut gw = Gateway::in_dir(&cfg(&up.base_url()), &dir);
    assert_eq!(turn(&gw, "dave", "still there?"), "re: still there?");
    assert_eq!(
        conversation(up.requests().last().unwrap()),
        vec![pair("user", "old question"), pair("assistant", "old answer"), pair("user", "still there?")]
    );
    gw.terminate();
    let list = listed(&dir);
    let dave = list["sessions"].as_array().unwrap().iter().find(|s| s["key"] == "agent:up:openai-user:dave").unwrap();
    assert_eq!(dave["messageCount"], 4, "{list}");
    assert_eq!(list["count"], 2, "{list}");
    // The snapshot is in the new form now.
    let index: Value = serde_json::from_slice(&std::fs::read(sdir.join("sessions.json")).unwrap()).unwrap();
    assert_eq!(index["agent:up:openai-user:erin"]["messageCount"], 2, "{index}");
    // From the transcript (2), not the stale index (0), plus this turn's prompt as the gateway
    // counts it when the upstream reports no usage: "Be brief." + the three messages, 8 words.
    assert_eq!(index["agent:up:openai-user:dave"]["inputTokens"], 2 + 8, "{index}");
}
