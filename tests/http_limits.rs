//! Raw-socket tests of the HTTP limits: header and target sizes, body size, the header-read and
//! idle timeouts, and the connection cap.

mod util;

use std::io::Write;
use std::time::{Duration, Instant};

use util::{
    Gateway, TOKEN, chat_request, closed_within, config, error_of, read_for, read_response, read_responses,
    read_to_close, user_body,
};

#[test]
fn header_section_over_16k_is_431() {
    let gw = Gateway::start();
    // Just under the limit is fine.
    let ok = format!("GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(15 * 1024));
    assert_eq!(gw.one(ok.as_bytes()).status, 200);
    let big = format!("GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(17 * 1024));
    let r = gw.one(big.as_bytes());
    assert_eq!(r.status, 431);
    assert_eq!(error_of(&r)["code"], "headers_too_large");
    // A head that never ends is cut off at the limit too, without waiting for the blank line.
    let mut s = gw.connect();
    let endless = format!("GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}", "a".repeat(20 * 1024));
    s.write_all(endless.as_bytes()).unwrap();
    let r = read_response(&mut s).expect("431 before the head ends");
    assert_eq!(r.status, 431);
    // Many small headers.
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = gw.one(format!("GET /health HTTP/1.1\r\nHost: t\r\n{many}\r\n").as_bytes());
    assert_eq!(r.status, 431);
}

#[test]
fn request_target_over_8k_is_414() {
    let gw = Gateway::start();
    let ok = format!("GET /health?q={} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(8000));
    assert_eq!(gw.one(ok.as_bytes()).status, 200);
    let long = format!("GET /health?q={} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(8 * 1024));
    let r = gw.one(long.as_bytes());
    assert_eq!(r.status, 414);
    assert_eq!(error_of(&r)["code"], "uri_too_long");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
}

#[test]
fn declared_body_over_max_is_413_before_it_is_sent() {
    let gw = Gateway::with_config(&config(
        "http: { endpoints: { chatCompletions: { enabled: true, maxBodyBytes: 1024 } } }",
        "",
    ));
    // The body is never sent: the answer must come from the head alone.
    let mut s = gw.connect();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1025\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut s).expect("413 without the body");
    assert_eq!(r.status, 413);
    assert_eq!(error_of(&r)["code"], "payload_too_large");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(closed_within(&mut s, Duration::from_secs(5)));

    // With Expect: 100-continue there is no 100, just the 413.
    let mut s = gw.connect();
    let head = head.replace("Content-Length", "Expect: 100-continue\r\nContent-Length");
    s.write_all(head.as_bytes()).unwrap();
    let got = read_to_close(&mut s);
    assert!(got.starts_with("HTTP/1.1 413 "), "{got:?}");

    // A body of exactly the limit is read.
    let body = user_body("fits", "");
    let padded = format!("{body}{}", " ".repeat(1024 - body.len()));
    let r = gw.one(&util::chat_request(&padded));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn chunked_body_growing_over_max_is_413() {
    let gw = Gateway::with_config(&config(
        "http: { endpoints: { chatCompletions: { enabled: true, maxBodyBytes: 1024 } } }",
        "",
    ));
    let mut s = gw.connect();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let piece = "a".repeat(600);
    s.write_all(format!("258\r\n{piece}\r\n").as_bytes()).unwrap();
    // The second chunk's size line already takes the body over the limit.
    s.write_all(b"258\r\n").unwrap();
    let r = read_response(&mut s).expect("413 on the size line");
    assert_eq!(r.status, 413);
    assert_eq!(error_of(&r)["code"], "payload_too_large");
    assert!(closed_within(&mut s, Duration::from_secs(5)));

    // A huge announced chunk is refused without waiting for its data.
    let mut s = gw.connect();
    s.write_all(format!("{head}ffffffffffffffff\r\n").as_bytes()).unwrap();
    let r = read_response(&mut s).expect("413");
    assert_eq!(r.status, 413);
}

#[test]
fn slow_head_gets_408_after_header_timeout() {
    let gw = Gateway::with_config(&config(
        "http: { headerTimeoutSeconds: 1, endpoints: { chatCompletions: { enabled: true } } }",
        "",
    ));
    let mut s = gw.connect();
    let t0 = Instant::now();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n").unwrap();
    // Trickling bytes does not extend the deadline: it runs from the first byte.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(300));
        let _ = s.write_all(b"X-Slow: 1\r\n");
    }
    let r = read_response(&mut s).expect("408");
    let took = t0.elapsed();
    assert_eq!(r.status, 408);
    assert_eq!(error_of(&r)["code"], "request_timeout");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(took >= Duration::from_millis(900), "took {took:?}");
    assert!(closed_within(&mut s, Duration::from_secs(5)));

    // A body that stalls is cut off too.
    let mut s = gw.connect();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100\r\n\r\n{{"
    );
    s.write_all(head.as_bytes()).unwrap();
    let r = read_response(&mut s).expect("408 for a stalled body");
    assert_eq!(r.status, 408);
}

#[test]
fn idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let gw = Gateway::with_config(&config(
        "http: { idleTimeoutSeconds: 1, endpoints: { chatCompletions: { enabled: true } } }",
        "",
    ));
    let mut s = gw.connect();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    let t0 = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)), "idle connection stays open");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(4), "closed after {took:?}");

    // A connection that never sends anything is closed as well.
    let mut s = gw.connect();
    assert!(closed_within(&mut s, Duration::from_secs(5)));

    // Activity keeps a connection alive past one idle period.
    let mut s = gw.connect();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(600));
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut s).expect("still open").status, 200);
    }
}

#[test]
fn a_connection_answered_by_its_run_idles_out_on_time() {
    // A stream on a kept connection hands the connection back without waking the loop (the next
    // request would): with no next request, the loop must still have it back soon enough for
    // the idle timeout to close it on time.
    let gw = Gateway::with_config(&config(
        "http: { idleTimeoutSeconds: 1, endpoints: { chatCompletions: { enabled: true } } }",
        "",
    ));
    // The stream first, while the loop's periodic turn (every 5 s from its start) is far off.
    for extra in [r#""stream":true"#, ""] {
        let mut s = gw.connect();
        s.write_all(&chat_request(&user_body("one two", extra))).unwrap();
        let r = read_response(&mut s).expect("an answer");
        assert_eq!(r.status, 200, "{}", r.text());
        let t0 = Instant::now();
        assert!(closed_within(&mut s, Duration::from_secs(8)), "idle connection stays open ({extra})");
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(700) && took < Duration::from_secs(3), "closed after {took:?} ({extra})");
    }
}

#[test]
fn a_client_that_does_not_read_a_large_answer_holds_no_worker() {
    // One worker. A's answer (3 MiB) is far more than its socket takes at once and A does not
    // read: the rest waits with the loop, and the worker answers B meanwhile.
    let gw = Gateway::with_config(&config(
        "workers: 1, http: { stallTimeoutSeconds: 60, endpoints: { chatCompletions: { enabled: true, maxBodyBytes: 4194304 } } }",
        "",
    ));
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = gw.addr().parse().unwrap();
    sock.connect(&addr.into()).unwrap();
    let mut a: std::net::TcpStream = sock.into();
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let big = "z".repeat(3 << 20);
    a.write_all(&chat_request(&user_body(&big, ""))).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let mut b = gw.connect();
    let t0 = Instant::now();
    b.write_all(&chat_request(&user_body("meanwhile", ""))).unwrap();
    let r = read_response(&mut b).expect("B answered while A does not read");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(t0.elapsed() < Duration::from_secs(8), "B waited {:?} for the worker", t0.elapsed());

    let r = read_response(&mut a).expect("A's whole answer");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["message"]["content"].as_str().map(str::len), Some(big.len()));
    // And the connection goes on.
    a.write_all(&chat_request(&user_body("again", ""))).unwrap();
    assert_eq!(read_response(&mut a).expect("a second answer").json()["choices"][0]["message"]["content"], "again");
}

#[test]
fn max_connections_holds_back_extra_connections_while_all_are_busy() {
    let gw = Gateway::with_config(&config("maxConnections: 2", ""));
    let req = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut a = gw.connect();
    let mut b = gw.connect();
    for s in [&mut a, &mut b] {
        s.write_all(req).unwrap();
        assert_eq!(read_response(s).unwrap().status, 200);
    }
    // Both connections are busy uploading a body: neither may be closed for a newcomer.
    let body = user_body("still here", "");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    for s in [&mut a, &mut b] {
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&body.as_bytes()[..1]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut c = gw.connect();
    c.write_all(req).unwrap();
    let early = read_for(&mut c, Duration::from_millis(1500));
    assert!(early.is_empty(), "third connection served while two are open: {:?}", String::from_utf8_lossy(&early));
    drop(a);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = read_response(&mut c).expect("served once a slot is free");
    assert_eq!(r.status, 200);
    // The other connection is still there: its upload completes.
    b.write_all(&body.as_bytes()[1..]).unwrap();
    let r = read_response(&mut b).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "still here");
}

#[test]
fn body_that_keeps_arriving_is_not_cut_off_by_the_header_timeout() {
    // The body deadline is an idle timeout: a slow upload that makes progress completes.
    let gw = Gateway::with_config(&config(
        "http: { headerTimeoutSeconds: 1, endpoints: { chatCompletions: { enabled: true } } }",
        "",
    ));
    let body = user_body("slow upload arrives", "");
    let mut s = gw.connect();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    let t0 = Instant::now();
    for piece in body.as_bytes().chunks(body.len().div_ceil(6)) {
        std::thread::sleep(Duration::from_millis(400));
        if s.write_all(piece).is_err() {
            break;
        }
    }
    assert!(t0.elapsed() > Duration::from_millis(2000));
    let r = read_response(&mut s).expect("a response");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "slow upload arrives");
}

#[test]
fn pipelining_client_that_never_reads_does_not_grow_server_memory() {
    // Each small request is answered with a larger response; a client that pipelines without
    // reading must be held back by TCP, not buffered without bound by the server.
    let gw = Gateway::start();
    let before = util::rss_kib(gw.child.id());
    let mut s = gw.connect();
    let sent = util::flood(&mut s, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n", 48 << 20, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(500));
    let grown = util::rss_kib(gw.child.id()).saturating_sub(before);
    assert!(grown < 32 * 1024, "server grew by {grown} KiB after {sent} bytes of unread pipelined requests");
}

#[test]
fn pipelined_requests_held_back_by_an_unread_backlog_are_all_answered() {
    // Far more responses than the socket buffers hold: the server must stop and resume, never
    // stall with requests still buffered.
    let gw = Gateway::start();
    let mut s = gw.connect();
    let n = 30_000;
    let batch = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n".repeat(n);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&batch).is_ok());
    std::thread::sleep(Duration::from_millis(1000));
    let rs = util::read_responses(&mut s, n);
    assert!(writer.join().unwrap());
    assert_eq!(rs.len(), n);
    assert!(rs.iter().all(|r| r.status == 200));
}

#[test]
fn bodies_over_the_in_flight_budget_get_503_and_the_budget_comes_back() {
    // maxBodyBytes 1000, 2000 bytes of bodies in flight at once.
    let gw = Gateway::with_config(&config(
        "http: { maxBodyBytesInFlight: 2000, endpoints: { chatCompletions: { enabled: true, maxBodyBytes: 1000 } } }",
        "",
    ));
    let body = |n: usize| {
        let b = user_body("hi", "");
        format!("{b}{}", " ".repeat(n - b.len()))
    };
    let head = |len: usize| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    // Two declared bodies of 1000 bytes, each half sent: the budget is taken.
    let (full, mut held) = (body(1000), Vec::new());
    for _ in 0..2 {
        let mut s = gw.connect();
        s.write_all(head(1000).as_bytes()).unwrap();
        s.write_all(&full.as_bytes()[..500]).unwrap();
        held.push(s);
    }
    std::thread::sleep(Duration::from_millis(300));
    let small = body(100);
    let r = gw.one(format!("{}{small}", head(100)).as_bytes());
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(error_of(&r)["code"], "overloaded");
    assert!(error_of(&r)["message"].as_str().unwrap().contains("maxBodyBytesInFlight"));
    assert_eq!(r.header("retry-after").as_deref(), Some("1"));
    // A chunked body is counted as it arrives.
    let mut c = gw.connect();
    let chunked = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{small}\r\n0\r\n\r\n",
        small.len()
    );
    c.write_all(chunked.as_bytes()).unwrap();
    let r = read_response(&mut c).expect("an answer");
    assert_eq!(r.status, 503, "{}", r.text());
    // Finished bodies are parsed and give their share back.
    for s in &mut held {
        s.write_all(&full.as_bytes()[500..]).unwrap();
        assert_eq!(read_response(s).expect("an answer").status, 200);
    }
    let r = gw.one(format!("{}{small}", head(100)).as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_request_sent_with_the_end_of_input_is_answered_then_closed() {
    let gw = Gateway::start();
    // The request and the client's FIN usually arrive together: the gateway must still see the
    // end after a short read, answer, and close rather than wait for the idle timeout. (A chat
    // run's client that closes its side counts as gone: the run is cancelled, see `streaming.rs`.)
    for _ in 0..20 {
        let mut s = gw.connect();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let r = read_response(&mut s).expect("an answer to the request sent before the end");
        assert_eq!(r.status, 200);
        assert!(closed_within(&mut s, Duration::from_secs(10)), "closed after the answer");
    }
}

/// A gateway taking chat bodies up to 4 MiB, with a stall timeout of `secs`.
fn large_body_gateway(secs: u32) -> Gateway {
    Gateway::with_config(&config(
        &format!(
            "http: {{ headerTimeoutSeconds: {secs}, endpoints: {{ chatCompletions: {{ enabled: true, maxBodyBytes: 4194304 }} }} }}"
        ),
        "",
    ))
}

/// A chat request whose first message is `big` bytes of one word and whose last is `last`.
fn large_chat(big: usize, last: &str) -> (Vec<u8>, usize) {
    let body = format!(
        r#"{{"model":"gatelet","messages":[{{"role":"user","content":"{}"}},{{"role":"user","content":"{last}"}}]}}"#,
        "y".repeat(big)
    );
    let req = chat_request(&body);
    let head = req.len() - body.len();
    (req, head)
}

#[test]
fn a_large_body_is_read_by_its_run_at_any_pace_and_the_connection_goes_on() {
    let gw = large_body_gateway(2);
    let (req, head) = large_chat(3 << 20, "after the big one");
    let mut s = gw.connect();
    // The head with a little of the body, then the rest in pieces, each pause under the stall
    // timeout (the stall rule runs from the last byte, not from the head).
    s.write_all(&req[..head + 100]).unwrap();
    for piece in req[head + 100..].chunks(1 << 20) {
        std::thread::sleep(Duration::from_millis(700));
        s.write_all(piece).unwrap();
    }
    // A second request right behind it on the same connection.
    s.write_all(&chat_request(&user_body("second", ""))).unwrap();
    let rs = read_responses(&mut s, 2);
    assert_eq!(rs.len(), 2, "both answered");
    assert_eq!(rs[0].status, 200, "{}", rs[0].text());
    let first = rs[0].json();
    assert_eq!(first["choices"][0]["message"]["content"], "after the big one");
    // Every byte was read and parsed: one word of 3 MiB and four more.
    assert_eq!(first["usage"]["prompt_tokens"], 5, "{first}");
    assert_eq!(rs[1].status, 200);
    assert_eq!(rs[1].json()["choices"][0]["message"]["content"], "second");
    // The loop listens to the connection again: a request sent later is heard and answered.
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).expect("a later request is answered").status, 200);
}

#[test]
fn a_large_body_that_stalls_gets_408_and_one_cut_short_harms_nobody() {
    let gw = large_body_gateway(1);
    let (req, head) = large_chat(2 << 20, "never sent");
    let mut s = gw.connect();
    s.write_all(&req[..head + (3 << 19)]).unwrap();
    let t0 = Instant::now();
    let r = read_response(&mut s).expect("408 for a stalled large body");
    let took = t0.elapsed();
    assert_eq!(r.status, 408);
    assert_eq!(error_of(&r)["code"], "request_timeout");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(took >= Duration::from_millis(800), "took {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(closed_within(&mut s, Duration::from_secs(5)));

    // A client that leaves in the middle of a large body gets nothing and harms nobody.
    let mut c = gw.connect();
    c.write_all(&req[..head + (1 << 20)]).unwrap();
    drop(c);
    let (req, _) = large_chat(2 << 20, "whole");
    let r = gw.one(&req);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "whole");
    assert_eq!(gw.one(&chat_request(&user_body("small", ""))).status, 200);
}
