//! The `openai` backend against a scripted upstream: streaming, usage, framing variants, every
//! failure mode, cancellation and deadlines.

mod util;

use std::time::{Duration, Instant};

use serde_json::Value;
use util::sse_client::SseStream;
use util::upstream::{self as up, Gate, Step, Upstream};
use util::{Gateway, chat_request, config};

/// A gateway whose default agent `up` uses the `openai` backend at `base_url`.
fn gateway(base_url: &str, backend_extra: &str, agent_extra: &str, gateway_extra: &str) -> Gateway {
    Gateway::with_config(&config(
        gateway_extra,
        &format!(
            "agents: {{ list: [{{ id: 'up', default: true, systemPrompt: 'Be brief.', {agent_extra} \
               backend: {{ kind: 'openai', baseUrl: '{base_url}', model: 'tiny', apiKey: 'sk-up', {backend_extra} }} }}] }}"
        ),
    ))
}

const STREAM_BODY: &str = r#"{"model":"gatelet","stream":true,"stream_options":{"include_usage":true},
    "messages":[{"role":"user","content":"hi"}]}"#;
const PLAIN_BODY: &str = r#"{"model":"gatelet","messages":[{"role":"user","content":"hi"}]}"#;

fn stream(gw: &Gateway, body: &str) -> SseStream {
    SseStream::open(gw.connect(), &chat_request(body))
}

fn content_of(data: &str) -> Option<String> {
    let v: Value = serde_json::from_str(data).ok()?;
    v["choices"][0]["delta"]["content"].as_str().map(String::from)
}

/// All data payloads of a finished stream.
fn all_data(s: &mut SseStream) -> Vec<String> {
    std::iter::from_fn(|| s.next_data()).collect()
}

fn reply_text(data: &[String]) -> String {
    data.iter().filter_map(|d| content_of(d)).collect()
}

fn finish_reason(data: &[String]) -> Option<String> {
    data.iter().find_map(|d| {
        let v: Value = serde_json::from_str(d).ok()?;
        v["choices"][0]["finish_reason"].as_str().map(String::from)
    })
}

/// A non-streaming request that must fail with 502 `backend_error`; returns the message.
fn backend_error(gw: &Gateway) -> String {
    let r = gw.one(&chat_request(PLAIN_BODY));
    assert_eq!(r.status, 502, "{}", r.text());
    let v = r.json();
    assert_eq!(v["error"]["code"], "backend_error", "{v}");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    v["error"]["message"].as_str().unwrap().to_string()
}

#[test]
fn streams_deltas_usage_and_forwards_the_request() {
    let up = Upstream::start(|_| {
        up::stream_reply(&[
            up::role(),
            up::content("Hel"),
            up::content("lo!"),
            up::finish("stop"),
            up::usage(7, 2),
            up::DONE.into(),
        ])
    });
    let gw = gateway(&up.base_url(), "", "", "");
    let body = r#"{"model":"gatelet","stream":true,"stream_options":{"include_usage":true},
        "max_tokens":42,"temperature":0.3,"top_p":0.9,"stop":["END"],
        "messages":[{"role":"system","content":"Extra."},{"role":"user","content":"hi"}]}"#;
    let mut s = stream(&gw, body);
    assert_eq!(s.status, 200, "{}", s.head);
    let data = all_data(&mut s);
    assert_eq!(reply_text(&data), "Hello!");
    // Role chunk, one chunk per upstream delta, stop, usage, [DONE].
    assert_eq!(data.iter().filter(|d| content_of(d).is_some_and(|c| !c.is_empty())).count(), 2, "{data:?}");
    assert_eq!(finish_reason(&data).as_deref(), Some("stop"));
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 7, "{usage}");
    assert_eq!(usage["usage"]["completion_tokens"], 2);
    assert_eq!(usage["usage"]["total_tokens"], 9);
    assert_eq!(data.last().unwrap(), "[DONE]");

    let reqs = up.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert!(r.head.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"), "{}", r.head);
    assert_eq!(r.header("authorization").as_deref(), Some("Bearer sk-up"));
    assert_eq!(r.header("host"), Some(format!("127.0.0.1:{}", up.port)));
    let j = r.json();
    assert_eq!(j["model"], "tiny");
    assert_eq!(j["stream"], true);
    assert_eq!(j["stream_options"]["include_usage"], true);
    assert_eq!(j["max_tokens"], 42);
    assert_eq!(j["temperature"], 0.3);
    assert_eq!(j["top_p"], 0.9);
    assert_eq!(j["stop"], serde_json::json!(["END"]));
    assert_eq!(
        j["messages"],
        serde_json::json!([{"role":"system","content":"Be brief.\n\nExtra."},{"role":"user","content":"hi"}])
    );
}

#[test]
fn non_streaming_client_gets_the_joined_reply_and_upstream_usage() {
    let up = Upstream::start(|_| {
        up::stream_reply(&[up::content("a"), up::content("b"), up::finish("length"), up::usage(3, 2), up::DONE.into()])
    });
    let gw = gateway(&up.base_url(), "", "", "");
    let r = gw.one(&chat_request(PLAIN_BODY));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["choices"][0]["message"]["content"], "ab");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[test]
fn each_delta_is_forwarded_before_the_upstream_sends_the_next() {
    let gate = Gate::new();
    let g = gate.clone();
    let up = Upstream::start(move |_| {
        vec![
            up::sse_head(),
            up::chunk(up::content("first").as_bytes()),
            // The upstream sends nothing more until the test has seen "first" through gatelet.
            Step::Wait(g.clone()),
            up::chunk(up::content(" second").as_bytes()),
            up::chunk(up::finish("stop").as_bytes()),
            up::chunk(up::DONE.as_bytes()),
            up::end_chunks(),
        ]
    });
    let gw = gateway(&up.base_url(), "", "", "");
    let mut s = stream(&gw, STREAM_BODY);
    let mut first = None;
    while let Some(d) = s.next_data() {
        if let Some(c) = content_of(&d).filter(|c| !c.is_empty()) {
            first = Some(c);
            break;
        }
    }
    assert_eq!(first.as_deref(), Some("first"));
    gate.open();
    let rest = all_data(&mut s);
    assert_eq!(reply_text(&rest), " second");
    assert_eq!(rest.last().unwrap(), "[DONE]");
}

#[test]
fn crlf_comments_keepalives_and_no_space_after_colon() {
    let up = Upstream::start(|_| {
        let mut body = String::from(": connected\r\n\r\n");
        body += &up::content("x").replace('\n', "\r\n");
        body += ": keep-alive\r\n\r\n:\r\n\r\n";
        body += &up::content("y").replace("data: ", "data:").replace('\n', "\r\n");
        body += &up::finish("stop").replace('\n', "\r");
        body += "data: [DONE]\r\n\r\n";
        // Split the body into awkward pieces: mid-line, between CR and LF.
        let b = body.into_bytes();
        let mut steps = vec![up::sse_head()];
        for piece in b.chunks(7) {
            steps.push(up::chunk(piece));
        }
        steps.push(up::end_chunks());
        steps
    });
    let gw = gateway(&up.base_url(), "", "", "");
    let mut s = stream(&gw, STREAM_BODY);
    let data = all_data(&mut s);
    assert_eq!(reply_text(&data), "xy");
    assert_eq!(finish_reason(&data).as_deref(), Some("stop"));
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[test]
fn content_length_and_close_delimited_bodies() {
    let body = format!("{}{}{}", up::content("cl"), up::finish("stop"), up::DONE);
    let with_length = body.clone();
    let up1 = Upstream::start(move |_| {
        vec![Step::Write(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\n\r\n{with_length}",
                with_length.len()
            )
            .into_bytes(),
        )]
    });
    let gw = gateway(&up1.base_url(), "", "", "");
    assert_eq!(reply_text(&all_data(&mut stream(&gw, STREAM_BODY))), "cl");
    drop(gw);

    // HTTP/1.0 style: no length, the body ends when the upstream closes. The last record has no
    // blank line after it, which still counts.
    let up2 = Upstream::start(|_| {
        let b = format!("{}{}data: [DONE]", up::content("close"), up::finish("stop"));
        vec![
            Step::Write(format!("HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n{b}").into_bytes()),
            Step::Close,
        ]
    });
    let gw = gateway(&up2.base_url(), "", "", "");
    let data = all_data(&mut stream(&gw, STREAM_BODY));
    assert_eq!(reply_text(&data), "close");
    assert_eq!(data.last().unwrap(), "[DONE]");
}

#[test]
fn an_upstream_that_ignores_stream_true_still_answers() {
    let up = Upstream::start(|_| {
        let b = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"whole"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#;
        vec![Step::Write(
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())
                .into_bytes(),
        )]
    });
    let gw = gateway(&up.base_url(), "", "", "");
    let r = gw.one(&chat_request(PLAIN_BODY));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "whole");
    assert_eq!(r.json()["usage"]["prompt_tokens"], 4);
}

#[test]
fn a_finish_without_done_is_a_complete_reply() {
    let up = Upstream::start(|_| up::stream_reply(&[up::content("ok"), up::finish("stop")]));
    let gw = gateway(&up.base_url(), "", "", "");
    let r = gw.one(&chat_request(PLAIN_BODY));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "ok");
}

// ---- failure modes: each becomes backend_error naming the upstream ----

#[test]
fn connection_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let gw = gateway(&url, "", "", "");
    let m = backend_error(&gw);
    assert_eq!(m, format!("upstream {url}: connection refused"));
}

#[test]
fn silent_upstream_hits_the_read_timeout() {
    let up = Upstream::start(|_| vec![Step::Sleep(Duration::from_secs(20))]);
    let gw = gateway(&up.base_url(), "readTimeoutMs: 700,", "", "");
    let t = Instant::now();
    let m = backend_error(&gw);
    assert_eq!(m, format!("upstream {}: no data for 700 ms (readTimeoutMs)", up.base_url()));
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    // The upstream sees the connection closed.
    assert!(up.wait_hangup(Duration::from_secs(5)).is_some());
}

#[test]
fn upstream_silent_mid_stream_hits_the_read_timeout() {
    let up = Upstream::start(|_| {
        vec![up::sse_head(), up::chunk(up::content("a").as_bytes()), Step::Sleep(Duration::from_secs(20))]
    });
    let gw = gateway(&up.base_url(), "readTimeoutMs: 700,", "", "");
    let data = all_data(&mut stream(&gw, STREAM_BODY));
    let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "backend_error");
    assert!(err["error"]["message"].as_str().unwrap().contains("no data for 700 ms"), "{err}");
}

#[test]
fn non_2xx_carries_the_upstream_error_message() {
    let up = Upstream::start(|_| {
        let b = r#"{"error":{"code":401,"message":"Invalid API Key","type":"authentication_error"}}"#;
        vec![Step::Write(
            format!(
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )
            .into_bytes(),
        )]
    });
    let gw = gateway(&up.base_url(), "", "", "");
    assert_eq!(backend_error(&gw), format!("upstream {}: HTTP 401: Invalid API Key", up.base_url()));
    // Streaming clients get a real status too, since nothing was sent yet.
    let s = stream(&gw, STREAM_BODY);
    assert_eq!(s.status, 502, "{}", s.head);
}

#[test]
fn non_2xx_with_a_plain_text_body() {
    let up = Upstream::start(|_| {
        vec![
            Step::Write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\nLoading model".to_vec()),
            Step::Close,
        ]
    });
    let gw = gateway(&up.base_url(), "", "", "");
    assert_eq!(backend_error(&gw), format!("upstream {}: HTTP 503: Loading model", up.base_url()));
}

#[test]
fn malformed_records_are_errors() {
    let up = Upstream::start(|_| up::stream_reply(&["data: {not json\n\n".into()]));
    let gw = gateway(&up.base_url(), "", "", "");
    let m = backend_error(&gw);
    assert!(m.starts_with(&format!("upstream {}: malformed stream", up.base_url())), "{m}");
}

#[test]
fn malformed_http_is_an_error() {
    let up = Upstream::start(|_| vec![Step::Write(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec()), Step::Close]);
    let gw = gateway(&up.base_url(), "", "", "");
    let m = backend_error(&gw);
    assert!(m.contains("malformed response head"), "{m}");

    let up2 =
        Upstream::start(|_| vec![up::sse_head(), Step::Write(b"zz\r\n".to_vec()), Step::Sleep(Duration::from_secs(5))]);
    let gw = gateway(&up2.base_url(), "", "", "");
    let m = backend_error(&gw);
    assert!(m.contains("malformed chunked response body"), "{m}");
}

#[test]
fn a_stream_that_ends_without_finish_or_done_is_an_error() {
    // Properly terminated body, but the reply never finished.
    let up = Upstream::start(|_| up::stream_reply(&[up::content("par")]));
    let gw = gateway(&up.base_url(), "", "", "");
    let data = all_data(&mut stream(&gw, STREAM_BODY));
    assert_eq!(reply_text(&data), "par");
    let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "backend_error", "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("stream ended before the reply finished"), "{err}");
    assert!(!data.iter().any(|d| d == "[DONE]"));

    // The connection drops in the middle of a chunk.
    let up2 = Upstream::start(|_| {
        vec![
            up::sse_head(),
            up::chunk(up::content("cut").as_bytes()),
            Step::Write(b"40\r\ndata: {".to_vec()),
            Step::Close,
        ]
    });
    let gw = gateway(&up2.base_url(), "", "", "");
    let data = all_data(&mut stream(&gw, STREAM_BODY));
    assert_eq!(reply_text(&data), "cut");
    let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert!(
        err["error"]["message"].as_str().unwrap().contains("connection closed in the middle of the response body"),
        "{err}"
    );

    // Closed before any response.
    let up3 = Upstream::start(|_| vec![Step::Close]);
    let gw = gateway(&up3.base_url(), "", "", "");
    assert!(backend_error(&gw).ends_with("connection closed before a response"));
}

#[test]
fn a_mid_stream_error_record_becomes_an_error_record() {
    let up = Upstream::start(|_| {
        up::stream_reply(&[
            up::role(),
            up::content("Hel"),
            r#"data: {"error":{"message":"model crashed","type":"server_error","code":500}}"#.to_string() + "\n\n",
        ])
    });
    let gw = gateway(&up.base_url(), "", "", "");
    let mut s = stream(&gw, STREAM_BODY);
    assert_eq!(s.status, 200);
    let data = all_data(&mut s);
    assert_eq!(reply_text(&data), "Hel");
    let err: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "backend_error");
    assert_eq!(err["error"]["message"], format!("upstream {}: error in stream: model crashed", up.base_url()));
    assert!(!data.iter().any(|d| d == "[DONE]"), "no [DONE] after an error: {data:?}");
    assert!(s.ended);
}

// ---- cancellation, deadlines, heartbeats ----

#[test]
fn client_disconnect_closes_the_upstream_and_frees_the_worker() {
    let up = Upstream::start(|r| {
        if r.json()["messages"][1]["content"] == "slow" {
            vec![up::sse_head(), up::chunk(up::content("tok").as_bytes()), Step::Sleep(Duration::from_secs(30))]
        } else {
            up::stream_reply(&[up::content("fast"), up::finish("stop"), up::DONE.into()])
        }
    });
    let gw = gateway(&up.base_url(), "", "", "workers: 1,");
    let mut s = stream(&gw, &STREAM_BODY.replace("\"hi\"", "\"slow\""));
    let first = std::iter::from_fn(|| s.next_data()).find_map(|d| content_of(&d).filter(|c| !c.is_empty()));
    assert_eq!(first.as_deref(), Some("tok"));
    let t = Instant::now();
    drop(s);
    let closed = up.wait_hangup(Duration::from_secs(10)).expect("upstream connection closed after the client left");
    assert!(closed.duration_since(t) < Duration::from_secs(5), "{:?}", closed.duration_since(t));
    // The only worker is free again. Its place is given back just after it let go of the
    // upstream (and a run's place counts until its worker is back), so a 503 may come first.
    let r = gw.one_when_free(&chat_request(PLAIN_BODY));
    assert_eq!(r.json()["choices"][0]["message"]["content"], "fast", "{}", r.text());
}

#[test]
fn the_run_deadline_closes_the_upstream() {
    let up = Upstream::start(|_| vec![up::sse_head(), Step::Sleep(Duration::from_secs(30))]);
    let gw = gateway(&up.base_url(), "", "timeoutSeconds: 1,", "");
    let t = Instant::now();
    let r = gw.one(&chat_request(PLAIN_BODY));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "agent_timeout");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    assert!(up.wait_hangup(Duration::from_secs(5)).is_some());
}

#[test]
fn heartbeats_flow_while_the_upstream_is_silent() {
    let up = Upstream::start(|_| {
        vec![
            up::sse_head(),
            up::chunk(up::content("a").as_bytes()),
            Step::Sleep(Duration::from_millis(2600)),
            up::chunk(up::content("b").as_bytes()),
            up::chunk(up::finish("stop").as_bytes()),
            up::chunk(up::DONE.as_bytes()),
            up::end_chunks(),
        ]
    });
    let gw = gateway(&up.base_url(), "", "", "keepaliveSeconds: 1,");
    let mut s = stream(&gw, STREAM_BODY);
    let recs = s.rest();
    assert!(recs.iter().any(|r| r == ": keep-alive"), "{recs:?}");
    assert_eq!(recs.last().unwrap(), "data: [DONE]");
}
