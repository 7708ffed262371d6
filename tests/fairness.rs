//! Raw-socket tests of the rules that keep one client from taking the gateway from the others:
//! the per-address connection cap, eviction of slow or silent newcomers when full, the first
//! request's deadline, the stall cut of a stream nobody reads, the per-address run limit and the
//! coalescing of WebSocket `agent` events.

mod util;

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::ws::Ws;
use util::{Gateway, chat_request, closed_within, config, error_of, read_for, read_response, user_body};

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";

fn health(s: &mut std::net::TcpStream) -> u16 {
    s.write_all(HEALTH).unwrap();
    read_response(s).map_or(0, |r| r.status)
}

#[test]
fn connections_over_the_per_address_cap_are_closed_at_accept() {
    let gw = Gateway::with_config(&config("maxConnectionsPerIp: 2", ""));
    let mut a = gw.connect();
    let mut b = gw.connect();
    assert_eq!(health(&mut a), 200);
    assert_eq!(health(&mut b), 200);
    let mut c = gw.connect();
    let _ = c.write_all(HEALTH);
    assert!(closed_within(&mut c, Duration::from_secs(5)), "a third connection from one address was kept");
    // The cap counts open connections: once one closes, the address may connect again.
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    let mut d = gw.connect();
    assert_eq!(health(&mut d), 200);
    assert_eq!(health(&mut b), 200);
}

#[test]
fn when_full_a_newcomer_replaces_the_oldest_connection_without_a_request() {
    let gw = Gateway::with_config(&config("maxConnections: 3", ""));
    // Oldest of all: a keep-alive connection that has been served and is idle.
    let mut kept = gw.connect();
    assert_eq!(health(&mut kept), 200);
    std::thread::sleep(Duration::from_millis(200));
    let mut silent = gw.connect();
    std::thread::sleep(Duration::from_millis(200));
    let mut slow = gw.connect();
    slow.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(200));

    // Full. A newcomer is served at once, in place of the silent connection (the oldest that
    // never sent a complete request), not of the older but served keep-alive one.
    let mut c = gw.connect();
    assert_eq!(health(&mut c), 200, "newcomer not served while the gateway is full");
    assert!(closed_within(&mut silent, Duration::from_secs(5)), "the silent connection was kept");
    assert_eq!(health(&mut kept), 200);
    // The next one replaces the slow head.
    let mut d = gw.connect();
    assert_eq!(health(&mut d), 200);
    assert!(closed_within(&mut slow, Duration::from_secs(5)), "the slow head was kept");
    assert_eq!(health(&mut kept), 200);
}

/// A connection from another loopback address (Linux routes all of 127.0.0.0/8 to lo).
fn connect_from(gw: &Gateway, source: &str) -> std::net::TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    sock.bind(&src.into()).unwrap();
    let dst: std::net::SocketAddr = gw.addr().parse().unwrap();
    sock.connect(&dst.into()).unwrap();
    let s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn when_full_the_address_holding_most_connections_loses_one_of_its_own() {
    let gw = Gateway::with_config(&config("maxConnections: 3", ""));
    // Oldest: a silent newcomer from another address (its request might still be on its way).
    let mut other = connect_from(&gw, "127.0.0.2");
    std::thread::sleep(Duration::from_millis(200));
    let mut a = gw.connect();
    std::thread::sleep(Duration::from_millis(200));
    let _b = gw.connect();
    std::thread::sleep(Duration::from_millis(200));
    // 127.0.0.1 holds two of three: its own oldest silent connection makes room.
    let mut c = gw.connect();
    assert_eq!(health(&mut c), 200);
    assert!(closed_within(&mut a, Duration::from_secs(5)), "the flooding address kept its oldest");
    assert!(!closed_within(&mut other, Duration::from_millis(1500)), "the other address lost its connection");
    assert_eq!(health(&mut other), 200);
}

#[test]
fn a_silent_newcomer_gets_the_head_deadline_a_served_connection_the_idle_one() {
    let gw = Gateway::with_config(&config(
        "http: { headerTimeoutSeconds: 1, idleTimeoutSeconds: 60, endpoints: { chatCompletions: { enabled: true } } }",
        "",
    ));
    let mut silent = gw.connect();
    let t0 = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(15)), "a silent connection was kept for the idle timeout");
    assert!(t0.elapsed() >= Duration::from_millis(500), "closed before the deadline: {:?}", t0.elapsed());
    // After a first request, the connection may idle for the (longer) idle timeout.
    let mut kept = gw.connect();
    assert_eq!(health(&mut kept), 200);
    assert!(read_for(&mut kept, Duration::from_millis(2500)).is_empty());
    assert_eq!(health(&mut kept), 200);
}

#[test]
fn a_stream_nobody_reads_is_cut_after_the_stall_timeout_and_frees_its_worker() {
    // One worker, no queue: while the stuck stream holds the worker, anything else gets 503.
    let gw = Gateway::with_config(&config(
        "workers: 1, maxQueuedRuns: 0, maxRunsPerIp: 0, \
         http: { stallTimeoutSeconds: 1, endpoints: { chatCompletions: { enabled: true } } }",
        "",
    ));
    // A reply far larger than the socket buffers of both ends (~27 MB of SSE).
    let words = "w ".repeat(150_000);
    let mut stuck = gw.connect();
    stuck.write_all(&chat_request(&user_body(&words, r#""stream":true"#))).unwrap();
    // Well past the stall timeout (and the time to fill the buffers), well before the 30 s
    // per-flush bound that applied before.
    std::thread::sleep(Duration::from_secs(8));
    let r = util::Gateway::one(&gw, &chat_request(&user_body("hello", "")));
    assert_eq!(r.status, 200, "the stuck stream still holds the worker: {}", r.text());
    // The stuck stream was ended early: no end of stream.
    let got = util::read_to_close(&mut stuck);
    assert!(!got.is_empty());
    assert!(!got.contains("[DONE]"), "the whole stream was delivered");
}

#[test]
fn runs_over_the_per_address_limit_get_429_with_retry_after() {
    let gw = Gateway::with_config(&config(
        "workers: 4, maxRunsPerIp: 1",
        "agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 300 } } ] }",
    ));
    let mut a = gw.connect();
    a.write_all(&chat_request(&user_body("one two three four", ""))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = gw.one(&chat_request(&user_body("second", "")));
    assert_eq!(r.status, 429, "{}", r.text());
    let e = error_of(&r);
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(e["message"].as_str().unwrap().contains("gateway.maxRunsPerIp"), "{e}");
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    // The same address over WebSocket is counted too.
    let mut ws = Ws::connected(&gw);
    let w = ws.call("x", "agent", json!({ "message": "ws" }));
    assert_eq!(w["error"]["code"], "UNAVAILABLE", "{w}");
    assert!(w["error"]["message"].as_str().unwrap().contains("maxRunsPerIp"), "{w}");
    // Once the first run is over, the address may start another.
    assert_eq!(read_response(&mut a).unwrap().status, 200);
    assert_eq!(gw.one(&chat_request(&user_body("third", ""))).status, 200);
}

#[test]
fn websocket_agent_events_are_coalesced_to_one_per_50_ms() {
    let gw = Gateway::with_config(&config("", "agents: { defaults: { backend: { kind: 'echo', tokenDelayMs: 2 } } }"));
    let mut ws = Ws::connected(&gw);
    let message = (0..300).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    let t0 = Instant::now();
    ws.request("a", "agent", json!({ "message": message }));
    assert_eq!(ws.res_for("a")["payload"]["status"], "accepted");
    let last = ws.res_for("a");
    let elapsed = t0.elapsed();
    assert_eq!(last["payload"]["status"], "ok", "{last}");
    let run_id = last["payload"]["runId"].as_str().unwrap();
    let assistant: Vec<&Value> = ws
        .events
        .iter()
        .filter(|e| e["event"] == "agent" && e["payload"]["runId"] == run_id && e["payload"]["stream"] == "assistant")
        .collect();
    // One event per 50 ms of the run at most, plus the last one: far fewer than the 300 words.
    let bound = elapsed.as_millis() as usize / 50 + 2;
    assert!(assistant.len() <= bound.min(150), "{} events in {elapsed:?}", assistant.len());
    let mut so_far = String::new();
    for e in &assistant {
        so_far.push_str(e["payload"]["data"]["delta"].as_str().unwrap());
        assert_eq!(e["payload"]["data"]["text"], so_far.as_str());
    }
    assert_eq!(so_far, message);
}

#[test]
fn admission_comes_before_the_body_is_parsed_on_a_worker() {
    // The loop admits; a worker parses. With the one worker busy and no queue, a request is
    // refused with 503 before its body is looked at, even when the body is not JSON.
    let gw = Gateway::with_config(&config(
        "workers: 1, maxQueuedRuns: 0, maxRunsPerIp: 0",
        "agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 300 } } ] }",
    ));
    let mut a = gw.connect();
    a.write_all(&chat_request(&user_body("one two three four", ""))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let r = gw.one(&chat_request("{"));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(error_of(&r)["code"], "overloaded");
    assert_eq!(read_response(&mut a).unwrap().status, 200);
    // With the worker free, the same body is parsed there and refused with the same 400 as ever.
    // The run gave its place back before its answer left, so the very next request gets it.
    let r = gw.one(&chat_request("{"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(error_of(&r)["code"], "invalid_json");
    assert!(r.header("x-request-id").is_some_and(|v| v.starts_with("req-")), "{}", r.head);
}
