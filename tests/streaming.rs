//! Streaming chat completions over SSE: headers, the exact record sequence, usage, heartbeats,
//! pre-stream errors, HTTP/1.0 close-delimited streams, and connection reuse after a stream.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::{
    FAILING_AGENTS, Gateway, Resp, chat_request, chat_request_with, config, error_of, read_head, read_response,
    read_to_close, sse_data, sse_json, user_body,
};

fn stream_body(text: &str, extra: &str) -> String {
    let sep = if extra.is_empty() { "" } else { "," };
    user_body(text, &format!(r#""stream":true{sep}{extra}"#))
}

/// Reads chunked framing one chunk at a time, noting when each arrived.
struct ChunkReader<'a> {
    s: &'a mut TcpStream,
    buf: Vec<u8>,
}

impl ChunkReader<'_> {
    fn fill(&mut self) {
        let mut b = [0u8; 4096];
        let n = self.s.read(&mut b).expect("read");
        assert!(n > 0, "connection closed inside a chunked body");
        self.buf.extend_from_slice(&b[..n]);
    }

    /// The next chunk's data; empty for the last chunk.
    fn chunk(&mut self) -> Vec<u8> {
        let line_end = loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            self.fill();
        };
        let size = usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16).unwrap();
        self.buf.drain(..line_end + 2);
        while self.buf.len() < size + 2 {
            self.fill();
        }
        let data: Vec<u8> = self.buf.drain(..size).collect();
        assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
        data
    }
}

fn assert_stream_headers(r: &Resp) {
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(r.header("content-type").as_deref(), Some("text/event-stream; charset=utf-8"));
    assert_eq!(r.header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(r.header("x-accel-buffering").as_deref(), Some("no"));
    assert_eq!(r.header("connection").as_deref(), Some("keep-alive"));
    assert_eq!(r.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(r.header("content-length"), None);
    assert!(r.header("x-request-id").is_some(), "{}", r.head);
    assert!(r.header("x-gatelet-session-key").is_some_and(|k| k.starts_with("agent:main:")), "{}", r.head);
}

/// Every record is exactly `data: <compact json or [DONE]>\n\n`.
fn assert_only_data_records(body: &[u8]) {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text:?}");
    let recs: Vec<&str> = text.strip_suffix("\n\n").unwrap().split("\n\n").collect();
    for rec in &recs {
        let data = rec.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data record: {rec:?}"));
        assert!(!data.contains('\n') && !data.contains('\r'), "{rec:?}");
        if data != "[DONE]" {
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(serde_json::to_string(&v).unwrap().len(), data.len(), "not compact: {data}");
        }
    }
    assert_eq!(recs.iter().filter(|r| **r == "data: [DONE]").count(), 1);
}

#[test]
fn stream_has_the_exact_record_sequence() {
    let gw = Gateway::start();
    let r = gw.one(&chat_request(&stream_body("hello big  world", r#""model":"Gatelet""#)));
    assert_stream_headers(&r);
    assert_only_data_records(&r.body);
    let recs = sse_json(&r.body);
    let id = recs[0]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("chatcmpl-"));
    let created = recs[0]["created"].as_u64().unwrap();
    for c in &recs {
        assert_eq!(c["id"], id.as_str());
        assert_eq!(c["created"], created);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["model"], "Gatelet");
        assert!(c.get("usage").is_none(), "no usage key without include_usage: {c}");
    }
    let choices: Vec<Value> = recs.iter().map(|c| c["choices"].clone()).collect();
    let ch = |delta: Value, finish: Value| json!([{"index":0,"delta":delta,"logprobs":null,"finish_reason":finish}]);
    assert_eq!(
        choices,
        vec![
            ch(json!({"role":"assistant","content":""}), Value::Null),
            ch(json!({"content":"hello"}), Value::Null),
            ch(json!({"content":" big"}), Value::Null),
            ch(json!({"content":"  world"}), Value::Null),
            ch(json!({}), json!("stop")),
        ]
    );
    assert_eq!(sse_data(&r.body).last().map(String::as_str), Some("[DONE]"));
}

#[test]
fn include_usage_adds_a_usage_chunk_and_null_usage_elsewhere() {
    let gw = Gateway::start();
    let r = gw.one(&chat_request(&stream_body("one two three", r#""stream_options":{"include_usage":true}"#)));
    assert_stream_headers(&r);
    assert_only_data_records(&r.body);
    let recs = sse_json(&r.body);
    assert_eq!(recs.len(), 1 + 3 + 1 + 1);
    for c in &recs[..5] {
        assert!(c.get("usage").is_some_and(Value::is_null), "{c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    let last = &recs[5];
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], json!({"prompt_tokens":3,"completion_tokens":3,"total_tokens":6}));
    assert_eq!(last["id"], recs[0]["id"]);
    // include_usage: false is the same as leaving it out.
    let r = gw.one(&chat_request(&stream_body("x", r#""stream_options":{"include_usage":false}"#)));
    assert!(sse_json(&r.body).iter().all(|c| c.get("usage").is_none()));
}

#[test]
fn stream_with_max_tokens_finishes_with_length() {
    let gw = Gateway::start();
    let r = gw.one(&chat_request(&stream_body("a b c d", r#""max_tokens":2"#)));
    let recs = sse_json(&r.body);
    let texts: Vec<&str> = recs.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(texts.concat(), "a b");
    assert_eq!(recs.last().unwrap()["choices"][0]["finish_reason"], "length");
}

#[test]
fn chunks_are_flushed_as_they_are_produced() {
    let gw = Gateway::with_config(&config(
        "",
        "agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 400 } } ] }",
    ));
    let mut s = gw.connect();
    let t0 = Instant::now();
    s.write_all(&chat_request(&stream_body("a b c d", ""))).unwrap();
    let head = read_head(&mut s).unwrap();
    assert_stream_headers(&head);
    let mut rd = ChunkReader { s: &mut s, buf: Vec::new() };
    let mut arrivals = Vec::new();
    let mut body = Vec::new();
    loop {
        let c = rd.chunk();
        if c.is_empty() {
            break;
        }
        arrivals.push((t0.elapsed(), String::from_utf8(c.clone()).unwrap()));
        body.extend_from_slice(&c);
    }
    let first_word = arrivals.iter().find(|(_, t)| t.contains("\"content\":\"a\"")).expect("first word").0;
    let last_word = arrivals.iter().find(|(_, t)| t.contains("\"content\":\" d\"")).expect("last word").0;
    // Three 400 ms pauses separate the first word from the last.
    assert!(last_word - first_word >= Duration::from_millis(900), "{arrivals:?}");
    assert!(first_word < Duration::from_millis(900), "{arrivals:?}");
    assert_only_data_records(&body);
}

#[test]
fn silence_carries_keep_alive_comments() {
    let gw = Gateway::with_config(&config(
        "keepaliveSeconds: 1",
        "agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 2500 } } ] }",
    ));
    let r = gw.one(&chat_request(&stream_body("slow reply", "")));
    assert_stream_headers(&r);
    let text = String::from_utf8(r.body.clone()).unwrap();
    let beats = text.matches(": keep-alive\n\n").count();
    assert!(beats >= 1, "{text:?}");
    // Heartbeats sit between records, never inside one.
    let without = text.replace(": keep-alive\n\n", "");
    assert_only_data_records(without.as_bytes());
    let recs = sse_json(without.as_bytes());
    let texts: Vec<&str> = recs.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(texts.concat(), "slow reply");

    // keepaliveSeconds: 0 turns them off.
    let gw = Gateway::with_config(&config(
        "keepaliveSeconds: 0",
        "agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 1500 } } ] }",
    ));
    let r = gw.one(&chat_request(&stream_body("slow reply", "")));
    assert!(!String::from_utf8_lossy(&r.body).contains("keep-alive"));
}

#[test]
fn run_failing_before_the_stream_gets_a_real_status() {
    let gw = Gateway::with_config(&config("", FAILING_AGENTS));
    for model in ["gatelet/cmd", "gatelet/up"] {
        let mut s = gw.connect();
        s.write_all(&chat_request(&stream_body("hi", &format!(r#""model":"{model}""#)))).unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, 502, "{model}: {}", r.text());
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
        let e = error_of(&r);
        assert_eq!(e["code"], "backend_error", "{model}");
        assert_eq!(e["type"], "server_error", "{model}");
        assert!(r.header("x-request-id").is_some(), "{model}");
        assert!(r.header("x-gatelet-session-key").is_some_and(|k| k.starts_with("agent:")), "{model}");
        // The connection is still good for the next request.
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut s).unwrap().status, 200, "{model}");
    }
}

#[test]
fn timeout_during_a_stream_ends_it_with_an_error_record() {
    let gw = Gateway::with_config(&config(
        "",
        "agents: { list: [ { id: 'main', timeoutSeconds: 1, backend: { kind: 'echo', tokenDelayMs: 400 } } ] }",
    ));
    let r = gw.one(&chat_request(&stream_body("a b c d e f g h", "")));
    assert_eq!(r.status, 200);
    let data = sse_data(&r.body);
    assert!(!data.iter().any(|d| d == "[DONE]"), "no [DONE] after an error: {data:?}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(
        last,
        json!({"error":{"message":last["error"]["message"],"type":"server_error","param":null,"code":"agent_timeout"}})
    );
}

#[test]
fn http10_stream_is_close_delimited() {
    let gw = Gateway::start();
    let body = stream_body("old client here", "");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n{body}",
        util::TOKEN,
        body.len()
    );
    let mut s = gw.connect();
    s.write_all(req.as_bytes()).unwrap();
    let all = read_to_close(&mut s);
    let (head, body) = all.split_once("\r\n\r\n").unwrap();
    let r = Resp { status: 200, head: format!("{head}\r\n\r\n"), body: body.as_bytes().to_vec() };
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    assert_eq!(r.header("transfer-encoding"), None, "{head}");
    assert_eq!(r.header("content-length"), None, "{head}");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert_eq!(r.header("content-type").as_deref(), Some("text/event-stream; charset=utf-8"));
    // The body is the raw records, no chunk framing, and EOF ends it.
    assert!(body.starts_with("data: {"), "{body:?}");
    assert_only_data_records(body.as_bytes());
    let texts: Vec<String> = sse_json(body.as_bytes())
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect();
    assert_eq!(texts.concat(), "old client here");
}

#[test]
fn keep_alive_connection_is_reused_after_a_stream() {
    let gw = Gateway::start();
    let mut s = gw.connect();
    s.write_all(&chat_request(&stream_body("first stream", ""))).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_stream_headers(&r);
    assert_only_data_records(&r.body);
    s.write_all(&chat_request(&user_body("then plain", ""))).unwrap();
    let r = read_response(&mut s).expect("second response on the same connection");
    assert_eq!(r.json()["choices"][0]["message"]["content"], "then plain");
    s.write_all(&chat_request(&stream_body("and a stream again", ""))).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_only_data_records(&r.body);
}

#[test]
fn request_pipelined_behind_a_stream_is_answered_after_it() {
    let gw = Gateway::with_config(&config(
        "",
        "agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 200 } } ] }",
    ));
    let mut s = gw.connect();
    let mut batch = chat_request(&stream_body("x y z", ""));
    batch.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    batch.extend_from_slice(&chat_request_with(&["Connection: close"], &user_body("last", "")));
    s.write_all(&batch).unwrap();
    let all = read_to_close(&mut s);
    let first = all.find("HTTP/1.1 200").unwrap();
    let done = all.find("data: [DONE]\n\n\r\n0\r\n\r\n").expect("stream ends with [DONE] and the last chunk");
    let health = all.find("\"live\"").expect("health answered");
    let last = all.find("\"content\":\"last\"").expect("third answered");
    assert!(first < done && done < health && health < last, "{all:?}");
    assert_eq!(all.matches("HTTP/1.1 200").count(), 3, "{all:?}");
}

#[test]
fn stream_on_a_closing_connection_says_connection_close() {
    let gw = Gateway::with_config(&config(
        "",
        "agents: { list: [ { id: 'main', default: true }, { id: 'up', backend: { kind: 'openai', baseUrl: 'http://127.0.0.1:1/v1' } } ] }",
    ));
    let mut s = gw.connect();
    s.write_all(&chat_request_with(&["Connection: close"], &stream_body("bye now", ""))).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection").as_deref(), Some("close"), "{}", r.head);
    assert_eq!(r.header("transfer-encoding").as_deref(), Some("chunked"));
    assert_only_data_records(&r.body);
    assert!(util::closed_within(&mut s, Duration::from_secs(5)));
    // The same for an error answered before the stream starts.
    let mut s = gw.connect();
    s.write_all(&chat_request_with(&["Connection: close"], &stream_body("x", r#""model":"gatelet/up""#))).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.header("connection").as_deref(), Some("close"), "{}", r.head);
    assert!(util::closed_within(&mut s, Duration::from_secs(5)));
}
