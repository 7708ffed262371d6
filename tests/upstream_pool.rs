//! Kept-alive upstream connections, counted at a scripted upstream: reuse, stale connections,
//! failures that must not be retried, cancellation and idle expiry; and `fallbacks`.

mod util;

use std::time::Duration;

use serde_json::Value;
use util::sse_client::SseStream;
use util::upstream::{self as up, Gate, Step, Upstream};
use util::{Gateway, chat_request, config};

fn gateway_for(backend: &str, gateway_extra: &str) -> Gateway {
    Gateway::with_config(&config(
        gateway_extra,
        &format!(
            "agents: {{ list: [{{ id: 'up', default: true, backend: {{ kind: 'openai', model: 'tiny', {backend} }} }}] }}"
        ),
    ))
}

fn gateway(base_url: &str, extra: &str) -> Gateway {
    gateway_for(&format!("baseUrl: '{base_url}', {extra}"), "")
}

const STREAM_BODY: &str = r#"{"model":"gatelet","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const PLAIN_BODY: &str = r#"{"model":"gatelet","messages":[{"role":"user","content":"hi"}]}"#;

fn reply() -> Vec<Step> {
    up::stream_reply(&[up::role(), up::content("Hel"), up::content("lo"), up::finish("stop"), up::DONE.into()])
}

/// A non-streaming run: (status, reply text or error message).
fn ask(gw: &Gateway) -> (u16, String) {
    let r = gw.one(&chat_request(PLAIN_BODY));
    let v: Value = r.json();
    let text = v["choices"][0]["message"]["content"].as_str().or(v["error"]["message"].as_str()).unwrap_or("");
    (r.status, text.to_string())
}

fn streamed(gw: &Gateway) -> (String, Vec<String>) {
    let mut s = SseStream::open(gw.connect(), &chat_request(STREAM_BODY));
    assert_eq!(s.status, 200, "{}", s.head);
    let data: Vec<String> = std::iter::from_fn(|| s.next_data()).collect();
    let text = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(String::from))
        .collect();
    (text, data)
}

#[test]
fn runs_reuse_one_upstream_connection() {
    let up = Upstream::keep_alive(|_| reply());
    let gw = gateway(&up.base_url(), "");
    for _ in 0..3 {
        assert_eq!(ask(&gw), (200, "Hello".into()));
    }
    assert_eq!(streamed(&gw).0, "Hello");
    assert_eq!(up.requests().len(), 4);
    assert_eq!(up.connections(), 1, "every run after the first reuses the kept-alive connection");
    for r in up.requests() {
        assert!(r.header("connection").is_none(), "no Connection: close: {}", r.head);
    }
}

#[test]
fn json_and_error_responses_with_a_length_keep_the_connection_too() {
    let up = Upstream::keep_alive(|r| {
        if r.json()["messages"][0]["content"] == "hi" { up::json_reply("plain") } else { up::status_reply(400, "no") }
    });
    let gw = gateway(&up.base_url(), "");
    assert_eq!(ask(&gw), (200, "plain".into()));
    let r = gw.one(&chat_request(&PLAIN_BODY.replace("\"hi\"", "\"bad\"")));
    assert_eq!(r.status, 502);
    assert_eq!(ask(&gw), (200, "plain".into()));
    assert_eq!(up.connections(), 1);
}

#[test]
fn max_idle_zero_opens_a_connection_per_run() {
    let up = Upstream::keep_alive(|_| reply());
    let gw = gateway(&up.base_url(), "maxIdleConnections: 0,");
    assert_eq!(ask(&gw).0, 200);
    assert_eq!(ask(&gw).0, 200);
    assert_eq!(up.connections(), 2);
}

#[test]
fn a_close_delimited_response_is_not_reused() {
    let up = Upstream::keep_alive(|_| {
        let mut body = String::new();
        for r in [up::content("x"), up::finish("stop"), up::DONE.into()] {
            body.push_str(&r);
        }
        vec![
            Step::Write(format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n{body}").into_bytes()),
            Step::Close,
        ]
    });
    let gw = gateway(&up.base_url(), "");
    assert_eq!(ask(&gw), (200, "x".into()));
    assert_eq!(ask(&gw), (200, "x".into()));
    assert_eq!(up.connections(), 2);
}

#[test]
fn a_kept_connection_the_upstream_closed_while_idle_is_replaced() {
    // The upstream answers in full, then closes the connection the gateway keeps.
    let up = Upstream::keep_alive(|_| {
        let mut v = reply();
        v.push(Step::Close);
        v
    });
    let gw = gateway(&up.base_url(), "");
    assert_eq!(ask(&gw), (200, "Hello".into()));
    // At once (the close may still be in flight: the write or the read finds it dead)…
    assert_eq!(ask(&gw), (200, "Hello".into()));
    // …and after a while (the probe before reuse finds it closed).
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(ask(&gw), (200, "Hello".into()));
    assert_eq!(streamed(&gw).0, "Hello");
    assert_eq!(up.requests().len(), 4, "each run reached the upstream once");
}

#[test]
fn an_upstream_that_dies_mid_response_is_not_retried() {
    let up = Upstream::keep_alive(|r| {
        if r.json()["messages"][0]["content"] == "hi" {
            reply()
        } else {
            vec![up::sse_head(), up::chunk(up::content("par").as_bytes()), Step::Close]
        }
    });
    let gw = gateway(&up.base_url(), "");
    assert_eq!(ask(&gw).0, 200); // a kept connection is ready
    let (status, msg) = {
        let r = gw.one(&chat_request(&PLAIN_BODY.replace("\"hi\"", "\"die\"")));
        (r.status, r.json()["error"]["message"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(status, 502, "{msg}");
    assert!(msg.contains("closed in the middle of the response body"), "{msg}");
    assert_eq!(up.requests().len(), 2, "a response byte had arrived: no retry");

    // Streaming: the delta, then an error record.
    let mut s = SseStream::open(gw.connect(), &chat_request(&STREAM_BODY.replace("\"hi\"", "\"die\"")));
    let data: Vec<String> = std::iter::from_fn(|| s.next_data()).collect();
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "backend_error", "{data:?}");
    assert_eq!(up.requests().len(), 3);
}

#[test]
fn a_response_head_that_stops_short_is_not_retried() {
    let up = Upstream::keep_alive(|r| {
        if r.json()["messages"][0]["content"] == "hi" {
            reply()
        } else {
            vec![Step::Write(b"HTTP/1.1 200 OK\r\nContent-Ty".to_vec()), Step::Close]
        }
    });
    let gw = gateway(&up.base_url(), "");
    assert_eq!(ask(&gw).0, 200);
    let r = gw.one(&chat_request(&PLAIN_BODY.replace("\"hi\"", "\"die\"")));
    assert_eq!(r.status, 502);
    assert_eq!(up.requests().len(), 2);
}

#[test]
fn cancel_closes_the_runs_connection_and_it_is_not_reused() {
    let gate = Gate::new();
    let g = gate.clone();
    let up = Upstream::keep_alive(move |r| {
        if r.json()["messages"][0]["content"] == "slow" {
            vec![up::sse_head(), up::chunk(up::content("tok").as_bytes()), Step::Wait(g.clone())]
        } else {
            reply()
        }
    });
    let gw = gateway(&up.base_url(), "");
    assert_eq!(ask(&gw).0, 200);
    assert_eq!(up.connections(), 1);
    // The slow run takes the kept connection; the client leaves mid-reply.
    let mut s = SseStream::open(gw.connect(), &chat_request(&STREAM_BODY.replace("\"hi\"", "\"slow\"")));
    let first = std::iter::from_fn(|| s.next_data()).find(|d| d.contains("tok"));
    assert!(first.is_some());
    drop(s);
    assert!(up.wait_hangup(Duration::from_secs(10)).is_some(), "the run's upstream connection was closed");
    gate.open();
    // The next run needs a new connection: the cancelled one was not pooled.
    assert_eq!(ask(&gw), (200, "Hello".into()));
    assert_eq!(up.connections(), 2);
}

#[test]
fn idle_connections_expire() {
    let up = Upstream::keep_alive(|_| reply());
    let gw = gateway(&up.base_url(), "idleTimeoutMs: 300,");
    assert_eq!(ask(&gw).0, 200);
    assert!(up.wait_idle_closes(1, Duration::from_secs(10)), "the idle connection was closed by the gateway");
    assert_eq!(ask(&gw).0, 200);
    assert_eq!(up.connections(), 2);
}

#[test]
fn idle_connections_are_bounded() {
    // Three concurrent runs need three connections; only two stay.
    let gate = Gate::new();
    let g = gate.clone();
    let up = Upstream::keep_alive(move |_| {
        let mut v = vec![Step::Wait(g.clone())];
        v.extend(reply());
        v
    });
    let gw =
        gateway_for(&format!("baseUrl: '{}', maxIdleConnections: 2,", up.base_url()), "workers: 3, maxRunsPerIp: 0,");
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let mut s = gw.connect();
            std::io::Write::write_all(&mut s, &chat_request(PLAIN_BODY)).unwrap();
            s
        })
        .collect();
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while up.requests().len() < 3 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    gate.open();
    for mut s in runs {
        assert_eq!(util::read_response(&mut s).unwrap().status, 200);
    }
    assert_eq!(up.connections(), 3);
    assert!(up.wait_idle_closes(1, Duration::from_secs(10)), "the connection over maxIdleConnections was closed");
    for _ in 0..2 {
        assert_eq!(ask(&gw).0, 200);
    }
    assert_eq!(up.connections(), 3, "two kept connections served the next runs");
}

// ---- fallbacks ----

fn refused_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}/v1")
}

fn with_fallback(primary: &str, fallback: &Upstream) -> Gateway {
    gateway_for(
        &format!(
            "baseUrl: '{primary}', fallbacks: [{{ kind: 'openai', baseUrl: '{}', model: 'big' }}],",
            fallback.base_url()
        ),
        "",
    )
}

#[test]
fn refused_500_and_429_before_the_first_delta_move_on() {
    let fallback = Upstream::keep_alive(|_| reply());
    let gw = with_fallback(&refused_url(), &fallback);
    assert_eq!(ask(&gw), (200, "Hello".into()));
    assert_eq!(streamed(&gw).0, "Hello");
    assert_eq!(fallback.requests()[0].json()["model"], "big", "the fallback's own model");

    for code in [500, 503, 429] {
        let primary = Upstream::keep_alive(move |_| up::status_reply(code, "busy"));
        let gw = with_fallback(&primary.base_url(), &fallback);
        assert_eq!(ask(&gw), (200, "Hello".into()), "{code}");
        assert_eq!(primary.requests().len(), 1, "{code}");
    }
}

#[test]
fn a_client_error_does_not_move_on() {
    let fallback = Upstream::keep_alive(|_| reply());
    let primary = Upstream::keep_alive(|_| up::status_reply(400, "bad request"));
    let gw = with_fallback(&primary.base_url(), &fallback);
    let (status, msg) = ask(&gw);
    assert_eq!(status, 502);
    assert!(msg.contains("HTTP 400: bad request"), "{msg}");
    assert!(fallback.requests().is_empty());
}

#[test]
fn every_upstream_tried_is_named() {
    let fallback = Upstream::keep_alive(|_| up::status_reply(500, "also down"));
    let primary = refused_url();
    let gw = with_fallback(&primary, &fallback);
    let (status, msg) = ask(&gw);
    assert_eq!(status, 502);
    assert_eq!(
        msg,
        format!("upstream {primary}: connection refused; then upstream {}: HTTP 500: also down", fallback.base_url())
    );
}

#[test]
fn a_failure_after_the_first_delta_does_not_move_on() {
    let fallback = Upstream::keep_alive(|_| reply());
    let primary = Upstream::keep_alive(|_| vec![up::sse_head(), up::chunk(up::content("par").as_bytes()), Step::Close]);
    let gw = with_fallback(&primary.base_url(), &fallback);
    let (text, data) = streamed(&gw);
    assert_eq!(text, "par");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "backend_error", "{data:?}");
    let msg = last["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with(&format!("upstream {}:", primary.base_url())) && !msg.contains("then"), "{msg}");
    assert!(fallback.requests().is_empty(), "nothing falls back after the first delta");
}

#[test]
fn a_body_that_does_not_end_after_done_is_not_waited_for() {
    // `[DONE]` arrives, the chunked body never ends: the reply is complete, the run must not sit
    // out the read timeout, and the connection cannot be reused.
    let up = Upstream::keep_alive(|_| {
        vec![
            up::sse_head(),
            up::chunk(up::content("done").as_bytes()),
            up::chunk(up::DONE.as_bytes()),
            Step::Sleep(Duration::from_secs(30)),
        ]
    });
    let gw = gateway(&up.base_url(), "readTimeoutMs: 60000,");
    let t = std::time::Instant::now();
    assert_eq!(ask(&gw), (200, "done".into()));
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert!(up.wait_hangup(Duration::from_secs(10)).is_some(), "the unfinished connection was closed");
    assert_eq!(ask(&gw), (200, "done".into()));
    assert_eq!(up.connections(), 2);
}

// ---- the proxied hot path ----

/// The data payloads in each HTTP chunk of a raw chunked SSE response.
fn records_per_chunk(raw: &[u8]) -> Vec<Vec<String>> {
    let body_at = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a head") + 4;
    let mut rest = &raw[body_at..];
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
        if size == 0 {
            return out;
        }
        let data = String::from_utf8(rest[line_end + 2..line_end + 2 + size].to_vec()).unwrap();
        out.push(data.lines().filter_map(|l| l.strip_prefix("data: ")).map(String::from).collect());
        rest = &rest[line_end + 2 + size + 2..];
    }
}

#[test]
fn records_from_one_upstream_read_leave_in_one_chunk() {
    // Five deltas in one upstream write, then a pause, then one more: the five go out together,
    // at once, and the last one on its own.
    let gate = Gate::new();
    let g = gate.clone();
    let up = Upstream::keep_alive(move |_| {
        let five: String = (0..5).map(|i| up::content(&format!("w{i} "))).collect();
        vec![
            up::sse_head(),
            up::chunk(five.as_bytes()),
            Step::Wait(g.clone()),
            up::chunk(up::content("last").as_bytes()),
            up::chunk((up::finish("stop") + up::DONE).as_bytes()),
            up::end_chunks(),
        ]
    });
    let gw = gateway(&up.base_url(), "");
    let mut s = gw.connect();
    std::io::Write::write_all(&mut s, &chat_request(STREAM_BODY)).unwrap();
    // All five arrive while the upstream is still holding the rest back.
    let early = util::read_to_close_or(&mut s, b"w4 ", Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&early).contains("w4 "), "{}", String::from_utf8_lossy(&early));
    gate.open();
    let mut raw = early;
    raw.extend(util::read_to_close_or(&mut s, b"\r\n0\r\n\r\n", Duration::from_secs(10)));
    let chunks = records_per_chunk(&raw);
    let content = |d: &String| -> Option<String> {
        let v: Value = serde_json::from_str(d).ok()?;
        v["choices"][0]["delta"]["content"].as_str().map(String::from)
    };
    let with_five = chunks.iter().find(|c| c.iter().any(|d| content(d).as_deref() == Some("w0 "))).unwrap();
    let texts: Vec<String> = with_five.iter().filter_map(content).collect();
    assert!(texts.ends_with(&["w0 ", "w1 ", "w2 ", "w3 ", "w4 "].map(String::from)), "{chunks:?}");
    let with_last = chunks.iter().find(|c| c.iter().any(|d| content(d).as_deref() == Some("last"))).unwrap();
    assert!(!with_last.iter().any(|d| content(d).as_deref() == Some("w4 ")), "{chunks:?}");
}

#[test]
fn a_host_name_is_resolved_and_its_addresses_tried_in_turn() {
    // `localhost` may give ::1 first; the mock listens on 127.0.0.1 only.
    let up = Upstream::keep_alive(|_| reply());
    let gw = gateway(&format!("http://localhost:{}/v1", up.port), "");
    assert_eq!(ask(&gw), (200, "Hello".into()));
    assert_eq!(ask(&gw), (200, "Hello".into()));
    assert_eq!(up.connections(), 1);
    assert!(up.requests()[0].header("host").is_some_and(|h| h == format!("localhost:{}", up.port)));
}

/// The value of one unlabelled series in a `/metrics` scrape.
fn metric(gw: &Gateway, name: &str) -> f64 {
    let r =
        gw.one(format!("GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\r\n", util::TOKEN).as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name}:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn metrics_count_upstream_connections_opened_reused_and_idle() {
    let up = Upstream::keep_alive(|_| reply());
    let gw = gateway(&up.base_url(), "");
    for _ in 0..3 {
        assert_eq!(ask(&gw), (200, "Hello".into()));
    }
    assert_eq!(up.connections(), 1);
    assert_eq!(metric(&gw, "gatelet_upstream_connections_opened_total"), 1.0);
    assert_eq!(metric(&gw, "gatelet_upstream_connections_reused_total"), 2.0);
    assert_eq!(metric(&gw, "gatelet_upstream_pool_idle_connections"), 1.0);
}
