//! The gateway protocol over WebSocket (SPEC §8) against the real binary: the connect
//! handshake, auth, methods, agent runs with streamed events, chat, sessions, aborts.

mod util;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::ws::{self, Ws, connect_params, req_frame};
use util::{Gateway, TOKEN, chat_request, config};

/// Echo agent that sleeps between words, for runs that are still going when we look.
fn slow_config(delay_ms: u64) -> String {
    config("", &format!("agents: {{ defaults: {{ backend: {{ kind: 'echo', tokenDelayMs: {delay_ms} }} }} }}"))
}

fn events_named<'a>(ws: &'a Ws, name: &str, run_id: &str) -> Vec<&'a Value> {
    ws.events.iter().filter(|e| e["event"] == name && e["payload"]["runId"] == run_id).collect()
}

#[test]
fn challenge_then_hello_ok() {
    let gw = Gateway::start();
    let mut ws = Ws::open(&gw);
    let ch = ws.read_frame().unwrap().json();
    assert_eq!(ch["type"], "event");
    assert_eq!(ch["event"], "connect.challenge");
    assert_eq!(ch["payload"]["nonce"].as_str().unwrap().len(), 32);
    assert!(ch["payload"]["ts"].as_u64().unwrap() > 1_600_000_000_000);
    assert!(ch["seq"].is_u64());
    ws.send(&req_frame("c1", "connect", connect_params(TOKEN)));
    let hello = ws.read_frame().unwrap().json();
    assert_eq!(hello["type"], "res");
    assert_eq!(hello["id"], "c1");
    assert_eq!(hello["ok"], true);
    let p = &hello["payload"];
    assert_eq!(p["type"], "hello-ok");
    assert_eq!(p["protocol"], 3);
    assert!(p["server"]["version"].is_string() && p["server"]["connId"].is_string());
    let methods: Vec<&str> = p["features"]["methods"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for m in ["health", "agent", "agent.wait", "chat.send", "chat.abort", "sessions.list", "sessions.delete"] {
        assert!(methods.contains(&m), "{m} missing from {methods:?}");
    }
    let events: Vec<&str> = p["features"]["events"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(events.contains(&"agent") && events.contains(&"tick") && events.contains(&"shutdown"));
    assert_eq!(p["policy"]["maxPayload"], 25 * 1024 * 1024);
    assert_eq!(p["policy"]["tickIntervalMs"], 30_000);
    // A second connect is refused but the connection stays usable.
    let r = ws.call("c2", "connect", connect_params(TOKEN));
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
    assert_eq!(ws.call("h", "health", Value::Null)["payload"]["ok"], true);
}

#[test]
fn protocol_mismatch_closes_1002() {
    let gw = Gateway::start();
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    let mut p = connect_params(TOKEN);
    p["minProtocol"] = json!(4);
    p["maxProtocol"] = json!(5);
    ws.send(&req_frame("c1", "connect", p));
    let r = ws.read_frame().unwrap().json();
    assert_eq!(r["ok"], false);
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
    assert_eq!(r["error"]["details"]["expectedProtocol"], 3);
    assert_eq!(ws.expect_close_then_eof(), Some(1002));
}

#[test]
fn bad_auth_closes_1008() {
    let gw = Gateway::start();
    for auth in [json!({ "token": "wrong" }), json!({}), Value::Null, json!({ "password": "nope" })] {
        let mut ws = Ws::open(&gw);
        ws.read_frame().unwrap();
        let mut p = connect_params(TOKEN);
        p["auth"] = auth.clone();
        ws.send(&req_frame("c1", "connect", p));
        let r = ws.read_frame().unwrap().json();
        assert_eq!(r["error"]["code"], "UNAUTHORIZED", "{auth}");
        assert_eq!(ws.expect_close_then_eof(), Some(1008), "{auth}");
    }
}

#[test]
fn password_mode_accepts_the_password() {
    let gw = Gateway::with_config(&config("auth: { mode: 'password', password: 'pw' }", ""));
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    let mut p = connect_params("x");
    p["auth"] = json!({ "password": "pw" });
    ws.send(&req_frame("c1", "connect", p));
    assert_eq!(ws.read_frame().unwrap().json()["payload"]["type"], "hello-ok");
}

#[test]
fn failure_limiter_is_shared_with_http() {
    let gw = Gateway::with_config(&config(
        "auth: { token: 'test-token', rateLimit: { maxAttempts: 2, windowMs: 60000, lockoutMs: 60000, exemptLoopback: false } }",
        "",
    ));
    for _ in 0..2 {
        let mut ws = Ws::open(&gw);
        ws.read_frame().unwrap();
        ws.send(&req_frame("c1", "connect", connect_params("wrong")));
        assert_eq!(ws.read_frame().unwrap().json()["error"]["code"], "UNAUTHORIZED");
    }
    // Locked out now: even the right token is refused, over WebSocket and over HTTP.
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    ws.send(&req_frame("c1", "connect", connect_params(TOKEN)));
    let r = ws.read_frame().unwrap().json();
    assert_eq!(r["error"]["code"], "UNAUTHORIZED");
    assert!(r["error"]["details"]["retryAfterMs"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(ws.expect_close(), Some(1008));
    let resp = gw.one(&chat_request(r#"{"messages":[{"role":"user","content":"hi"}]}"#));
    assert_eq!(resp.status, 429);
}

#[test]
fn first_frame_must_be_connect() {
    let gw = Gateway::start();
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    ws.send(&req_frame("h1", "health", Value::Null));
    let r = ws.read_frame().unwrap().json();
    assert_eq!((r["id"].as_str(), r["ok"].as_bool()), (Some("h1"), Some(false)));
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
    assert_eq!(ws.expect_close_then_eof(), Some(1008));
    // Not even JSON.
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    ws.send(&ws::frame(true, ws::TEXT, b"hello"));
    assert_eq!(ws.read_frame().unwrap().json()["error"]["code"], "INVALID_REQUEST");
    assert_eq!(ws.expect_close_then_eof(), Some(1008));
    // Binary.
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    ws.send(&ws::frame(true, ws::BINARY, b"{}"));
    assert_eq!(ws.expect_close_then_eof(), Some(1008));
}

#[test]
fn connect_params_are_checked() {
    let gw = Gateway::start();
    let mut p = connect_params(TOKEN);
    p["client"].as_object_mut().unwrap().remove("platform");
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    ws.send(&req_frame("c1", "connect", p));
    let r = ws.read_frame().unwrap().json();
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
    assert!(r["error"]["message"].as_str().unwrap().contains("client.platform"), "{r}");
    assert_eq!(ws.expect_close(), Some(1008));
}

#[test]
fn no_connect_within_10s_closes() {
    let gw = Gateway::start();
    let mut ws = Ws::open(&gw);
    ws.s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let t0 = Instant::now();
    ws.read_frame().unwrap();
    assert_eq!(ws.expect_close_then_eof(), Some(1008));
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(14), "{took:?}");
}

#[test]
fn info_methods() {
    let gw = Gateway::with_config(&config("", "agents: { list: [ { id: 'main', default: true }, { id: 'alt' } ] }"));
    let mut ws = Ws::connected(&gw);
    let h = ws.call("1", "health", Value::Null);
    assert_eq!(h["payload"]["ok"], true);
    let s = ws.call("2", "status", Value::Null);
    assert_eq!(s["payload"]["protocol"], 3);
    assert_eq!(s["payload"]["agents"], json!(["main", "alt"]));
    let m = ws.call("3", "models.list", Value::Null);
    let ids: Vec<&str> = m["payload"]["models"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["gatelet", "gatelet/default", "gatelet/main", "gatelet/alt"]);
    let a = ws.call("4", "agents.list", Value::Null);
    assert_eq!(a["payload"]["defaultId"], "main");
    assert_eq!(a["payload"]["agents"][1], json!({ "id": "alt", "default": false }));
    let u = ws.call("5", "no.such.method", Value::Null);
    assert_eq!(u["error"]["code"], "INVALID_REQUEST");
    // A request that is not a request frame gets an error, and the connection stays.
    ws.send(&ws::frame(true, ws::TEXT, br#"{"type":"req","id":"6"}"#));
    assert_eq!(ws.next_res()["error"]["code"], "INVALID_REQUEST");
    ws.send(&ws::frame(true, ws::TEXT, b"not json"));
    let r = ws.next_res();
    assert_eq!((r["id"].clone(), r["error"]["code"].clone()), (Value::Null, json!("INVALID_REQUEST")));
    assert_eq!(ws.call("7", "health", Value::Null)["ok"], true);
}

#[test]
fn agent_run_streams_events_and_answers_twice() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    ws.request("a1", "agent", json!({ "message": "hello brave new world", "sessionKey": "k1" }));
    let first = ws.res_for("a1");
    assert_eq!(first["ok"], true, "{first}");
    assert_eq!(first["payload"]["status"], "accepted");
    let run_id = first["payload"]["runId"].as_str().unwrap().to_string();
    let last = ws.res_for("a1");
    assert_eq!(last["ok"], true, "{last}");
    assert_eq!(last["payload"]["runId"], run_id.as_str());
    assert_eq!(last["payload"]["status"], "ok");
    let result = &last["payload"]["result"];
    assert_eq!(result["text"], "hello brave new world");
    assert_eq!(result["finishReason"], "stop");
    assert_eq!(result["usage"]["completionTokens"], 4);
    assert_eq!(result["sessionKey"], "agent:main:k1");
    let evs = events_named(&ws, "agent", &run_id);
    let n = evs.len();
    let streams: Vec<&str> = evs.iter().map(|e| e["payload"]["stream"].as_str().unwrap()).collect();
    // Assistant events are coalesced (at most one per 50 ms): between one and four of them.
    assert!((3..=6).contains(&n), "{streams:?}");
    assert_eq!(streams[0], "lifecycle");
    assert_eq!(streams[n - 1], "lifecycle");
    assert!(streams[1..n - 1].iter().all(|s| *s == "assistant"), "{streams:?}");
    assert_eq!(evs[0]["payload"]["data"]["phase"], "start");
    assert_eq!(evs[n - 1]["payload"]["data"]["phase"], "end");
    // The first word goes out at once; each event's delta is what was added since the last,
    // and its text is everything so far.
    assert_eq!(evs[1]["payload"]["data"]["delta"], "hello");
    let mut so_far = String::new();
    for e in &evs[1..n - 1] {
        so_far.push_str(e["payload"]["data"]["delta"].as_str().unwrap());
        assert_eq!(e["payload"]["data"]["text"], so_far.as_str());
    }
    assert_eq!(so_far, "hello brave new world");
    // Per-run seq counts up from 1; the frame seq counts up per connection.
    let seqs: Vec<u64> = evs.iter().map(|e| e["payload"]["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=n as u64).collect::<Vec<_>>());
    let frame_seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(frame_seqs.windows(2).all(|w| w[1] == w[0] + 1), "{frame_seqs:?}");
    // The run went through the shared session store: HTTP sees the same transcript.
    let h = ws.call("h", "chat.history", json!({ "sessionKey": "k1" }));
    let msgs = h["payload"]["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(msgs[1]["content"], "hello brave new world");
}

#[test]
fn agent_param_errors() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    let cases = [
        (json!({}), "INVALID_REQUEST"),
        (json!({ "message": 5 }), "INVALID_REQUEST"),
        (json!({ "message": "  " }), "INVALID_REQUEST"),
        (json!({ "message": "hi", "agentId": "ghost" }), "NOT_FOUND"),
        (json!({ "message": "hi", "sessionKey": "agent:ghost:x" }), "NOT_FOUND"),
        (json!({ "message": "hi", "timeout": 0 }), "INVALID_REQUEST"),
        (json!({ "message": "hi", "sessionKey": "tab\there" }), "INVALID_REQUEST"),
    ];
    for (i, (p, code)) in cases.into_iter().enumerate() {
        let id = format!("e{i}");
        let r = ws.call(&id, "agent", p.clone());
        assert_eq!(r["error"]["code"], code, "{p}: {r}");
    }
}

#[test]
fn runs_interleave_on_one_connection() {
    // Words further apart than the 50 ms coalescing interval: one event per word.
    let gw = Gateway::with_config(&slow_config(80));
    let mut ws = Ws::connected(&gw);
    ws.request("a", "agent", json!({ "message": "a1 a2 a3 a4 a5 a6" }));
    ws.request("b", "agent", json!({ "message": "b1 b2 b3 b4 b5 b6" }));
    let (mut ra, mut rb) = (None, None);
    let mut finals = 0;
    while finals < 2 {
        let v = ws.next_res();
        let st = v["payload"]["status"].as_str().unwrap_or("").to_string();
        match (v["id"].as_str(), st.as_str()) {
            (Some("a"), "accepted") => ra = v["payload"]["runId"].as_str().map(String::from),
            (Some("b"), "accepted") => rb = v["payload"]["runId"].as_str().map(String::from),
            (_, "ok") => finals += 1,
            _ => panic!("unexpected {v}"),
        }
    }
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_ne!(ra, rb);
    let order: Vec<&str> = ws
        .events
        .iter()
        .filter(|e| e["event"] == "agent" && e["payload"]["stream"] == "assistant")
        .map(|e| if e["payload"]["runId"] == ra.as_str() { "a" } else { "b" })
        .collect();
    assert_eq!(order.len(), 12);
    // Both runs were in flight at once: their deltas interleave.
    assert!(order.windows(2).any(|w| w[0] != w[1]) && order[..6].contains(&"b"), "{order:?}");
    let text_a = &events_named(&ws, "agent", &ra).iter().rev().nth(1).unwrap()["payload"]["data"]["text"];
    assert_eq!(text_a, "a1 a2 a3 a4 a5 a6");
}

#[test]
fn agent_wait_ok_timeout_and_unknown() {
    let gw = Gateway::with_config(&slow_config(100));
    let mut ws = Ws::connected(&gw);
    let first = ws.call("a", "agent", json!({ "message": "one two three four five" }));
    let run_id = first["payload"]["runId"].as_str().unwrap().to_string();
    let r = ws.call("w0", "agent.wait", json!({ "runId": run_id, "timeoutMs": 50 }));
    assert_eq!(r["payload"]["status"], "timeout", "{r}");
    let r = ws.call("w1", "agent.wait", json!({ "runId": run_id, "timeoutMs": 10_000 }));
    assert_eq!(r["payload"]["status"], "ok", "{r}");
    assert!(r["payload"]["endedAt"].as_u64() >= r["payload"]["startedAt"].as_u64());
    // After the end it answers at once, from any connection.
    let mut other = Ws::connected(&gw);
    let r = other.call("w2", "agent.wait", json!({ "runId": run_id }));
    assert_eq!(r["payload"]["status"], "ok");
    let r = other.call("w3", "agent.wait", json!({ "runId": "run-nope" }));
    assert_eq!(r["error"]["code"], "NOT_FOUND");
    let r = other.call("w4", "agent.wait", json!({}));
    assert_eq!(r["error"]["code"], "INVALID_REQUEST");
}

#[test]
fn duplicate_idempotency_key_returns_the_first_run() {
    let gw = Gateway::with_config(&slow_config(20));
    let mut ws = Ws::connected(&gw);
    let p = json!({ "message": "only once", "sessionKey": "idem", "idempotencyKey": "key-1" });
    let a = ws.call("a", "agent", p.clone());
    let b = ws.call("b", "agent", p.clone());
    let run_id = a["payload"]["runId"].as_str().unwrap();
    assert_eq!(b["payload"]["runId"], run_id);
    // Both requests get their second answer, with the same result.
    let (fa, fb) = (ws.res_for("a"), ws.res_for("b"));
    assert_eq!(fa["payload"]["result"]["text"], "only once");
    assert_eq!(fb["payload"]["result"]["text"], "only once");
    assert_eq!(fb["payload"]["runId"], run_id);
    // From another connection, after the run ended: still the first run.
    let mut other = Ws::connected(&gw);
    let c = other.call("c", "agent", p);
    assert_eq!(c["payload"]["runId"], run_id);
    // The finished run's reply was kept for its key: the repeat gets the whole result.
    let fc = other.res_for("c");
    assert_eq!(fc["payload"]["status"], "ok");
    assert_eq!(fc["payload"]["result"]["text"], "only once", "{fc}");
    // One turn in the transcript, not three.
    let h = other.call("h", "chat.history", json!({ "sessionKey": "idem" }));
    assert_eq!(h["payload"]["messages"].as_array().unwrap().len(), 2, "{h}");
    // chat.send keys are separate from agent keys.
    let s = other.call("s", "chat.send", json!({ "sessionKey": "idem", "message": "x", "idempotencyKey": "key-1" }));
    assert_ne!(s["payload"]["runId"], run_id);
    let s2 = other.call("s2", "chat.send", json!({ "sessionKey": "idem", "message": "x", "idempotencyKey": "key-1" }));
    assert_eq!(s2["payload"]["runId"], s["payload"]["runId"]);
    assert!(s2["payload"]["status"] == "in_flight" || s2["payload"]["status"] == "ok", "{s2}");
}

#[test]
fn chat_send_events_history_and_sessions() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    let r = ws.call("s1", "chat.send", json!({ "sessionKey": "room", "message": "good morning all" }));
    assert_eq!(r["payload"]["status"], "started", "{r}");
    let run_id = r["payload"]["runId"].as_str().unwrap().to_string();
    ws.until_event(|e| e["event"] == "chat" && e["payload"]["state"] == "final");
    let evs = events_named(&ws, "chat", &run_id);
    let last = evs.last().unwrap();
    assert_eq!(last["payload"]["sessionKey"], "agent:main:room");
    assert_eq!(last["payload"]["message"]["content"][0]["text"], "good morning all");
    assert_eq!(last["payload"]["stopReason"], "stop");
    assert!(evs.iter().all(|e| e["payload"]["state"] == "delta" || e == last));
    let h = ws.call("h", "chat.history", json!({ "sessionKey": "room", "limit": 1 }));
    assert_eq!(h["payload"]["messages"].as_array().unwrap().len(), 1);
    assert_eq!(h["payload"]["messages"][0]["role"], "assistant");
    let l = ws.call("l", "sessions.list", Value::Null);
    let s = &l["payload"]["sessions"][0];
    assert_eq!(s["key"], "agent:main:room");
    assert_eq!(s["agentId"], "main");
    assert!(s["updatedAt"].as_u64().unwrap() > 0);
    assert_eq!(s["outputTokens"], 3);
    assert_eq!(s["totalTokens"], s["inputTokens"].as_u64().unwrap() + 3);
    // reset keeps the key, delete removes it.
    assert_eq!(ws.call("r", "sessions.reset", json!({ "key": "agent:main:room" }))["payload"]["ok"], true);
    let l = ws.call("l2", "sessions.list", Value::Null);
    assert_eq!(l["payload"]["sessions"][0]["messageCount"], 0);
    assert_eq!(ws.call("d", "sessions.delete", json!({ "key": "room" }))["payload"]["ok"], true);
    assert_eq!(ws.call("l3", "sessions.list", Value::Null)["payload"]["count"], 0);
    assert_eq!(ws.call("d2", "sessions.delete", json!({ "key": "room" }))["error"]["code"], "NOT_FOUND");
    assert_eq!(ws.call("c", "chat.send", json!({ "message": "x" }))["error"]["code"], "INVALID_REQUEST");
}

#[test]
fn chat_abort_stops_the_run() {
    let gw = Gateway::with_config(&slow_config(200));
    let mut ws = Ws::connected(&gw);
    let words = (0..50).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let r = ws.call("s", "chat.send", json!({ "sessionKey": "long", "message": words }));
    let run_id = r["payload"]["runId"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let a = ws.call("a", "chat.abort", json!({ "sessionKey": "long" }));
    assert_eq!(a["payload"]["aborted"], true, "{a}");
    assert_eq!(a["payload"]["runIds"], json!([run_id]));
    ws.until_event(|e| e["event"] == "chat" && e["payload"]["state"] == "aborted");
    assert!(t0.elapsed() < Duration::from_secs(2));
    let h = ws.call("h", "chat.history", json!({ "sessionKey": "long" }));
    assert_eq!(h["payload"]["messages"][1]["aborted"], true, "{h}");
    let again = ws.call("a2", "chat.abort", json!({ "sessionKey": "long" }));
    assert_eq!(again["payload"]["aborted"], false);
}

#[test]
fn closing_the_connection_aborts_its_runs_not_the_session() {
    let gw = Gateway::with_config(&slow_config(200));
    let mut ws = Ws::connected(&gw);
    let words = (0..50).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let r = ws.call("a", "agent", json!({ "message": words, "sessionKey": "gone" }));
    let run_id = r["payload"]["runId"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    drop(ws);
    let mut other = Ws::connected(&gw);
    let w = other.call("w", "agent.wait", json!({ "runId": run_id, "timeoutMs": 2000 }));
    assert_eq!(w["payload"]["status"], "error", "{w}");
    let h = other.call("h", "chat.history", json!({ "sessionKey": "gone" }));
    assert_eq!(h["payload"]["messages"][1]["aborted"], true, "{h}");
    assert_eq!(other.call("l", "sessions.list", Value::Null)["payload"]["count"], 1);
}

#[test]
fn http_and_ws_share_sessions_and_the_port() {
    let gw = Gateway::start();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         x-gatelet-session-key: shared\r\nContent-Length: {}\r\n\r\n{}",
        r#"{"messages":[{"role":"user","content":"from http"}]}"#.len(),
        r#"{"messages":[{"role":"user","content":"from http"}]}"#
    );
    assert_eq!(gw.one(req.as_bytes()).status, 200);
    let mut ws = Ws::connected(&gw);
    ws.call("a", "chat.send", json!({ "sessionKey": "shared", "message": "from ws" }));
    ws.until_event(|e| e["event"] == "chat" && e["payload"]["state"] == "final");
    let h = ws.call("h", "chat.history", json!({ "sessionKey": "agent:main:shared" }));
    let contents: Vec<&str> =
        h["payload"]["messages"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(contents, ["from http", "from http", "from ws", "from ws"]);
}

#[test]
fn full_queue_answers_unavailable() {
    let gw = Gateway::with_config(&config(
        "workers: 1, maxQueuedRuns: 0",
        "agents: { defaults: { backend: { kind: 'echo', tokenDelayMs: 300 } } }",
    ));
    let mut ws = Ws::connected(&gw);
    let a = ws.call("a", "agent", json!({ "message": "slow words here" }));
    assert_eq!(a["payload"]["status"], "accepted");
    let b = ws.call("b", "agent", json!({ "message": "second" }));
    assert_eq!(b["error"]["code"], "UNAVAILABLE", "{b}");
}

#[test]
fn agent_timeout_is_reported() {
    let gw = Gateway::with_config(&slow_config(700));
    let mut ws = Ws::connected(&gw);
    ws.request("a", "agent", json!({ "message": "a b c d e", "timeout": 1 }));
    assert_eq!(ws.res_for("a")["payload"]["status"], "accepted");
    let f = ws.res_for("a");
    assert_eq!(f["ok"], false);
    assert_eq!(f["error"]["code"], "AGENT_TIMEOUT", "{f}");
    assert_eq!(f["error"]["details"]["status"], "error");
    assert!(ws.events.iter().any(|e| e["payload"]["stream"] == "error"));
}

#[test]
fn slow_reader_gets_merged_events_not_a_growing_queue() {
    // Each assistant event carries the whole text so far. Sent per token, ~4000 words would be
    // ~50 MB per run; coalescing and holding back while the client does not read keep it to a
    // few events per run, all delivered once the client reads.
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    let words = (0..4000).map(|i| format!("word{i:05}")).collect::<Vec<_>>().join(" ");
    for i in 0..3 {
        ws.request(&format!("a{i}"), "agent", json!({ "message": words }));
    }
    std::thread::sleep(Duration::from_secs(3));
    ws.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut bytes = 0;
    let mut finals = 0;
    while finals < 3 {
        let f = ws.read_frame().expect("a frame, not a close");
        bytes += f.payload.len();
        let v = f.json();
        if v["type"] == "res" && v["payload"]["status"] == "ok" {
            finals += 1;
        }
        if v["type"] == "event" {
            ws.events.push(v);
        }
    }
    assert!(bytes < 8 << 20, "{bytes} bytes for three 4000-word replies");
    let run_ids: std::collections::BTreeSet<&str> =
        ws.events.iter().filter(|e| e["event"] == "agent").filter_map(|e| e["payload"]["runId"].as_str()).collect();
    assert_eq!(run_ids.len(), 3);
    for id in run_ids {
        let evs = events_named(&ws, "agent", id);
        let deltas: String = evs
            .iter()
            .filter(|e| e["payload"]["stream"] == "assistant")
            .map(|e| e["payload"]["data"]["delta"].as_str().unwrap())
            .collect();
        assert_eq!(deltas, words);
    }
    // And the server stays healthy.
    let mut other = Ws::connected(&gw);
    assert_eq!(other.call("h", "health", Value::Null)["ok"], true);
}

#[test]
fn http_runs_are_counted_by_status_and_aborted_by_chat_abort() {
    let gw = Gateway::with_config(&slow_config(200));
    let words = (0..50).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let body = format!(r#"{{"model":"gatelet","messages":[{{"role":"user","content":"{words}"}}]}}"#);
    let req = util::chat_request_with(&["x-gatelet-session-key: http-long"], &body);
    let mut http = gw.connect();
    std::io::Write::write_all(&mut http, &req).unwrap();
    let mut ws = Ws::connected(&gw);
    // The HTTP run shows up in `status` once it is admitted.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let s = ws.call("st", "status", Value::Null);
        if s["payload"]["runs"]["active"] == 1 {
            break;
        }
        assert!(Instant::now() < end, "the HTTP run never counted: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let a = ws.call("a", "chat.abort", json!({ "sessionKey": "http-long" }));
    assert_eq!(a["payload"]["aborted"], true, "{a}");
    let ids = a["payload"]["runIds"].as_array().unwrap();
    assert!(ids.len() == 1 && ids[0].as_str().unwrap().starts_with("chatcmpl-"), "{a}");
    // The client is still there: it is told the run was cancelled, well before the reply's 10 s.
    let r = util::read_response(&mut http).expect("an answer to the aborted run");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("cancelled"), "{}", r.text());
    assert_eq!(ws.call("st2", "status", Value::Null)["payload"]["runs"]["active"], 0);
}

#[test]
fn pipelined_requests_are_answered_in_order_even_when_the_client_stops_sending() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    // Parsed and answered off the event loop, one connection's requests in order: a flood,
    // with a large request among small ones and the end of input right behind the last.
    let pad = "x".repeat(200 * 1024);
    let mut bytes = Vec::new();
    let mut want = Vec::new();
    for i in 0..400 {
        let id = format!("r{i}");
        let params = match i % 100 {
            50 => json!({ "pad": pad }),
            _ => Value::Null,
        };
        let method = if i % 7 == 3 { "models.list" } else { "health" };
        bytes.extend(req_frame(&id, method, params));
        want.push(id);
    }
    // Last, a large one: its answer comes well after the end of input has been read.
    bytes.extend(req_frame("last", "health", json!({ "pad": "y".repeat(8 << 20) })));
    want.push("last".to_string());
    ws.send(&bytes);
    ws.s.shutdown(std::net::Shutdown::Write).unwrap();
    let got: Vec<String> = want.iter().map(|_| ws.next_res()["id"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(got, want);
    assert!(ws.eof_within(Duration::from_secs(30)), "the connection is closed once they are answered");
}
