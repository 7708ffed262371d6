//! Raw-socket tests of HTTP/1.1 message framing: persistence, pipelining, HTTP/1.0,
//! `Expect: 100-continue`, request bodies and the strict rules against request smuggling.

mod util;

use std::io::Write;
use std::time::Duration;

use util::{
    Gateway, TOKEN, chat_request, closed_within, read_head, read_response, read_responses, read_to_close, user_body,
};

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let gw = Gateway::start();
    let mut s = gw.connect();
    for i in 0..3 {
        s.write_all(HEALTH).unwrap();
        let r = read_response(&mut s).unwrap_or_else(|| panic!("response {i}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), None, "{}", r.head);
        assert_eq!(r.json()["ok"], true);
    }
    s.write_all(&chat_request(&user_body("same socket", ""))).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "same socket");
    s.write_all(HEALTH).unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let gw = Gateway::start();
    let mut s = gw.connect();
    let mut batch = Vec::new();
    batch.extend_from_slice(HEALTH);
    batch.extend_from_slice(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n");
    batch.extend_from_slice(&chat_request(&user_body("first run", "")));
    batch.extend_from_slice(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n");
    batch.extend_from_slice(&chat_request(&user_body("second run", "")));
    batch.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(&batch).unwrap();
    let rs = read_responses(&mut s, 6);
    let statuses: Vec<u16> = rs.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 404, 200, 200, 200, 200]);
    assert_eq!(rs[0].json()["status"], "live");
    assert_eq!(rs[1].json()["error"]["code"], "not_found");
    assert_eq!(rs[2].json()["choices"][0]["message"]["content"], "first run");
    assert_eq!(rs[3].json()["ready"], true);
    assert_eq!(rs[4].json()["choices"][0]["message"]["content"], "second run");
    assert_eq!(rs[5].header("connection").as_deref(), Some("close"));
    assert!(closed_within(&mut s, Duration::from_secs(5)), "Connection: close is honoured");
}

#[test]
fn http10_closes_unless_keep_alive_is_asked() {
    let gw = Gateway::start();
    let mut s = gw.connect();
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(closed_within(&mut s, Duration::from_secs(5)));

    let mut s = gw.connect();
    s.write_all(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    s.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let r = read_response(&mut s).expect("the connection was kept");
    assert_eq!(r.header("connection").as_deref(), Some("close"));
    assert!(closed_within(&mut s, Duration::from_secs(5)));
}

#[test]
fn expect_100_continue_only_after_auth() {
    let gw = Gateway::start();
    let body = user_body("after continue", "");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut s = gw.connect();
    s.write_all(head.as_bytes()).unwrap();
    let cont = read_head(&mut s).expect("interim response");
    assert_eq!(cont.head, "HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(body.as_bytes()).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "after continue");

    // A large body (read by its run rather than the loop) gets the 100 the same way, and the
    // connection goes on after it.
    let big = user_body(&"word ".repeat(600_000), "");
    let big_head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        big.len()
    );
    s.write_all(big_head.as_bytes()).unwrap();
    let cont = read_head(&mut s).expect("interim response before a large body");
    assert_eq!(cont.head, "HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(big.as_bytes()).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["prompt_tokens"], 600_000);
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);

    // A bad token gets the final 401 straight away, without a 100 and without sending the body.
    let bad = head.replace(TOKEN, "wrong");
    let mut s = gw.connect();
    s.write_all(bad.as_bytes()).unwrap();
    let r = read_head(&mut s).expect("final response");
    assert_eq!(r.status, 401, "{}", r.head);
    assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
}

#[test]
fn chunked_request_body_is_decoded() {
    let gw = Gateway::start();
    let body = user_body("chunked body works", "");
    let (a, b) = body.split_at(10);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\nX-Trailer: t\r\n\r\n",
        a.len(),
        b.len()
    );
    let mut s = gw.connect();
    // Byte by byte for the first part, to exercise the incremental decoder on a real socket.
    let bytes = req.as_bytes();
    for chunk in bytes[..60].chunks(7) {
        s.write_all(chunk).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    s.write_all(&bytes[60..]).unwrap();
    s.write_all(HEALTH).unwrap();
    let rs = read_responses(&mut s, 2);
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[0].status, 200, "{}", rs[0].text());
    assert_eq!(rs[0].json()["choices"][0]["message"]["content"], "chunked body works");
    assert_eq!(rs[1].status, 200, "the request after a chunked body is parsed from the right place");
}

/// Sends `req` on a new connection; expects exactly one response with `status`, a
/// `Connection: close`, and then the close (never a second response).
fn refused_and_closed(gw: &Gateway, req: &[u8], status: u16, what: &str) {
    let all = gw.raw(req);
    let first = all.split("\r\n").next().unwrap_or("");
    assert!(first.starts_with(&format!("HTTP/1.1 {status} ")), "{what}: got {all:?}");
    assert_eq!(all.matches("\r\nDate: ").count(), 1, "{what}: only one response: {all:?}");
    assert!(all.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{what}: {all:?}");
    let body = &all[all.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
    assert_eq!(v["error"]["type"], "invalid_request_error", "{what}");
}

fn post(headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n{headers}\r\n{body}\
         GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn ambiguous_framing_is_refused_and_the_connection_closed() {
    let gw = Gateway::start();
    let body = user_body("x", "");
    let n = body.len();
    // Every request is followed by a smuggled GET that must never be answered.
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n"), 400, "CL and TE"),
        (format!("Transfer-Encoding: chunked\r\nContent-Length: {n}\r\n"), 400, "TE and CL"),
        (format!("Content-Length: +{n}\r\n"), 400, "CL with a sign"),
        (format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n + 1), 400, "differing CLs"),
        ("Content-Length: 1,2\r\n".into(), 400, "CL list with differing values"),
        (format!("Content-Length: 0x{n:x}\r\n"), 400, "hex CL"),
        (format!("Content-Length: {n} \r\nContent-Length: x\r\n"), 400, "non-digit CL"),
        ("Transfer-Encoding: gzip\r\n".into(), 501, "unknown coding"),
        ("Transfer-Encoding: gzip, chunked\r\n".into(), 400, "chunked after another coding"),
        ("Transfer-Encoding: chunked, gzip\r\n".into(), 400, "chunked not last"),
        ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n".into(), 400, "chunked twice"),
        ("Transfer-Encoding: chunked\t,\r\nTransfer-Encoding: identity\r\n".into(), 400, "identity after chunked"),
    ];
    for (headers, status, what) in &cases {
        refused_and_closed(&gw, &post(headers, &body), *status, what);
    }
    // Transfer-Encoding in HTTP/1.0 is a framing fault too.
    refused_and_closed(
        &gw,
        b"POST /v1/chat/completions HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "TE in HTTP/1.0",
    );
    // A space before the colon (the classic TE smuggling vector) and obs-fold.
    refused_and_closed(&gw, &post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"), 400, "space before colon");
    refused_and_closed(&gw, &post("X-A: a\r\n  folded\r\nContent-Length: 0\r\n", ""), 400, "obs-fold");
}

#[test]
fn malformed_chunked_bodies_are_refused_and_the_connection_closed() {
    let gw = Gateway::start();
    let te = "Transfer-Encoding: chunked\r\n";
    let cases: &[(&str, &str)] = &[
        // 17 hex digits: must not wrap around to 3 and let the GET through as body.
        ("f0000000000000003\r\nabc\r\n0\r\n\r\n", "chunk-size overflow"),
        ("4;a\nb\r\nabcd\r\n0\r\n\r\n", "bare LF in a chunk extension"),
        ("4\nabcd\r\n0\r\n\r\n", "bare LF after the size"),
        ("\r\nabcd\r\n0\r\n\r\n", "empty chunk-size line"),
        ("0x4\r\nabcd\r\n0\r\n\r\n", "0x prefix"),
        ("-4\r\nabcd\r\n0\r\n\r\n", "negative size"),
        ("4\r\nabcdXX0\r\n\r\n", "chunk data longer than its size"),
        ("4\r\nabcd\r\n0\r\n\n", "bare LF ending the body"),
    ];
    for (chunks, what) in cases {
        refused_and_closed(&gw, &post(te, chunks), 400, what);
    }
}

#[test]
fn bare_lf_and_bad_heads_are_refused() {
    let gw = Gateway::start();
    let cases: &[(&[u8], u16, &str)] = &[
        (b"GET /health HTTP/1.1\nHost: t\n\n", 400, "bare LF line ends"),
        (b"GET /health HTTP/1.1\r\n\r\n", 400, "no Host"),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "two Hosts"),
        (b"GET /health HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400, "bare CR in a value"),
        (b"GET /health HTTP/2.0\r\nHost: a\r\n\r\n", 505, "HTTP/2.0"),
    ];
    for (req, status, what) in cases {
        let all = gw.raw(req);
        assert!(all.starts_with(&format!("HTTP/1.1 {status} ")), "{what}: {all:?}");
        assert_eq!(all.matches("\r\nDate: ").count(), 1, "{what}: {all:?}");
    }
}

/// The RFC 9112 grammar rules of SPEC §4, one row each: every request is followed by a second one
/// (`GET /health`) that a server which resynchronised after the fault would answer.
#[test]
fn rfc9112_grammar_violations_are_refused_and_the_connection_closed() {
    let gw = Gateway::start();
    let port = gw.addr().rsplit(':').next().unwrap().to_string();
    let smuggled = "GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    // RFC 9112 §3.2 / RFC 3986 §3.2.2: `Host = uri-host [ ":" port ]`.
    let hosts = [
        (format!("user@127.0.0.1:{port}"), "Host with userinfo"),
        (format!("127.0.0.1:{port}/path"), "Host with a path"),
        (format!("127.0.0.1:{port}, other.example.com"), "Host with a second host"),
        (String::new(), "empty Host"),
        ("a b".to_string(), "Host with a space"),
    ];
    for (host, what) in &hosts {
        let req = format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n{smuggled}");
        refused_and_closed(&gw, req.as_bytes(), 400, what);
    }
    // RFC 9112 §3 and §2.3: `method SP request-target SP "HTTP/" DIGIT "." DIGIT`.
    let lines = [
        ("GET /health HTTP/1", "version without a minor"),
        ("GET /health HTTP/01.01", "two-digit version"),
        ("GET /health HTTP/ 1.1", "space inside the version"),
        ("GET /health http/1.1", "lower-case HTTP name"),
        ("GET /pa th HTTP/1.1", "space inside the target"),
    ];
    for (line, what) in lines {
        let req = format!("{line}\r\nHost: t\r\n\r\n{smuggled}");
        refused_and_closed(&gw, req.as_bytes(), 400, what);
    }
    // RFC 9112 §6.1: a Transfer-Encoding with no coding frames nothing; the body must not be
    // read as the next request.
    let body = "0\r\n\r\n";
    refused_and_closed(&gw, &post("Transfer-Encoding:\r\n", body), 400, "empty Transfer-Encoding");
    refused_and_closed(&gw, &post("Transfer-Encoding: ,\r\n", body), 400, "Transfer-Encoding of empty elements");
    // RFC 9112 §7.1 / §7.1.1: `chunk-size [ chunk-ext ] CRLF` exactly.
    let te = "Transfer-Encoding: chunked\r\n";
    let chunks: &[(&str, &str)] = &[
        ("5;\r\nhello\r\n0\r\n\r\n", "chunk extension without a name"),
        ("5;bad[=x\r\nhello\r\n0\r\n\r\n", "chunk extension name that is not a token"),
        ("5;\x00ext\r\nhello\r\n0\r\n\r\n", "control byte in a chunk extension"),
        ("5 \r\nhello\r\n0\r\n\r\n", "space after the chunk size"),
        ("5 ;a\r\nhello\r\n0\r\n\r\n", "whitespace before a chunk extension"),
        ("5;a=\"x\r\nhello\r\n0\r\n\r\n", "unterminated quoted chunk extension value"),
    ];
    for (chunks, what) in chunks {
        refused_and_closed(&gw, &post(te, chunks), 400, what);
    }
}

#[test]
fn later_http1_minor_versions_are_served_as_http11() {
    // RFC 9110 §2.5: a recipient answers a higher minor version as the highest it supports.
    let gw = Gateway::start();
    let mut s = gw.connect();
    for minor in [2, 9] {
        s.write_all(format!("GET /health HTTP/1.{minor}\r\nHost: t\r\n\r\n").as_bytes()).unwrap();
        let r = read_response(&mut s).unwrap_or_else(|| panic!("HTTP/1.{minor}"));
        assert!(r.head.starts_with("HTTP/1.1 200 "), "{}", r.head);
        assert_eq!(r.header("connection"), None, "kept alive as 1.1: {}", r.head);
    }
    // A chunked body is framed as on 1.1, and the next request is read from the right place.
    let body = user_body("one point two", "");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.2\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n{}",
        body.len(),
        std::str::from_utf8(HEALTH).unwrap()
    );
    s.write_all(req.as_bytes()).unwrap();
    let rs = read_responses(&mut s, 2);
    assert_eq!(rs[0].json()["choices"][0]["message"]["content"], "one point two", "{}", rs[0].text());
    assert_eq!(rs[1].status, 200);
}

#[test]
fn smuggled_request_after_overflowing_chunk_size_is_never_answered() {
    let gw = Gateway::start();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Transfer-Encoding: chunked\r\n\r\nf0000000000000003\r\nabc\r\n0\r\n\r\n\
         GET /health HTTP/1.1\r\nHost: t\r\n\r\n"
    );
    let mut s = gw.connect();
    s.write_all(req.as_bytes()).unwrap();
    let all = read_to_close(&mut s);
    assert!(all.starts_with("HTTP/1.1 400 "), "{all:?}");
    assert!(!all.contains("\"live\""), "the smuggled GET was answered: {all:?}");
    assert!(!all.contains("HTTP/1.1 200"), "{all:?}");
}

#[test]
fn response_carries_a_date_header() {
    let gw = Gateway::start();
    let mut s = gw.connect();
    s.write_all(HEALTH).unwrap();
    let r1 = read_response(&mut s).unwrap();
    s.write_all(b"GET /missing HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let r2 = read_response(&mut s).unwrap();
    for r in [&r1, &r2] {
        let d = r.header("date").unwrap_or_else(|| panic!("no Date: {}", r.head));
        // IMF-fixdate: `Sun, 06 Nov 1994 08:49:37 GMT`.
        assert_eq!(d.len(), 29, "{d}");
        assert!(d.ends_with(" GMT") && d.as_bytes()[3] == b',', "{d}");
        let days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        assert!(days.contains(&&d[..3]), "{d}");
    }
    // The server's clock agrees with ours to within a minute (the cache is refreshed).
    let d = r1.header("date").unwrap();
    let hms: Vec<u64> = d[17..25].split(':').map(|x| x.parse().unwrap()).collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let ours = now % 86400;
    let theirs = hms[0] * 3600 + hms[1] * 60 + hms[2];
    let diff = ours.abs_diff(theirs).min(86400 - ours.abs_diff(theirs));
    assert!(diff < 60, "Date {d} is {diff} s off");
}

#[test]
fn http10_keep_alive_response_says_keep_alive() {
    // An HTTP/1.0 client only keeps the connection when the response says so (RFC 9112
    // Appendix C.2.2); without the header it waits for a close that never comes.
    let gw = Gateway::start();
    let mut s = gw.connect();
    let body = user_body("one oh", "");
    let chat = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let bad = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 2\r\n\r\n{{}}"
    );
    let reqs: [&[u8]; 4] = [
        b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        b"GET /nope HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        chat.as_bytes(),
        bad.as_bytes(),
    ];
    for (i, req) in reqs.iter().enumerate() {
        s.write_all(req).unwrap();
        let r = read_response(&mut s).unwrap_or_else(|| panic!("response {i}"));
        assert_eq!(r.header("connection").as_deref(), Some("keep-alive"), "{i}: {}", r.head);
    }
}
