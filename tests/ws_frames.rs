//! RFC 6455 framing against the real binary, byte by byte, after the Autobahn|Testsuite case
//! groups: 1 framing, 2 pings and pongs, 3 reserved bits, 4 opcodes, 5 fragmentation, 6 UTF-8,
//! 7 close handling, 9 limits; plus the §4.2 handshake. Each rule's test fails without the rule.

mod util;

use std::io::Write;
use std::time::Duration;

use serde_json::{Value, json};
use util::Gateway;
use util::ws::*;

/// A `health` request whose text has exactly `len` bytes (padded with an ignored param).
fn health_of_len(id: &str, len: usize) -> Vec<u8> {
    let base = json!({ "type": "req", "id": id, "method": "health", "params": { "pad": "" } }).to_string();
    assert!(len >= base.len());
    let v = json!({ "type": "req", "id": id, "method": "health", "params": { "pad": "x".repeat(len - base.len()) } });
    let s = v.to_string();
    assert_eq!(s.len(), len);
    s.into_bytes()
}

fn assert_health(ws: &mut Ws, id: &str) {
    let r = ws.res_for(id);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["payload"]["status"], "live");
}

/// Connect, send `bytes`, expect a close frame with `code`, then the TCP close.
fn expect_failure(gw: &Gateway, bytes: &[u8], code: u16) {
    let mut ws = Ws::connected(gw);
    ws.send(bytes);
    assert_eq!(ws.expect_close_then_eof(), Some(code), "after sending {:02x?}", &bytes[..bytes.len().min(16)]);
}

// ---- §4.2 handshake ----------------------------------------------------------------------

#[test]
fn handshake_101_accept_key_and_no_extensions() {
    let gw = Gateway::start();
    let mut s = gw.connect();
    s.write_all(upgrade_request("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n").as_bytes())
        .unwrap();
    let mut ws = Ws { s, buf: Vec::new(), events: Vec::new(), stash: Vec::new() };
    let f = {
        // The 101 head, then the challenge as the first frame.
        let r = ws.read_head();
        assert!(r.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{r}");
        let lower = r.to_ascii_lowercase();
        assert!(lower.contains("\r\nupgrade: websocket\r\n") && lower.contains("\r\nconnection: upgrade\r\n"), "{r}");
        assert!(r.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{r}");
        assert!(!lower.contains("sec-websocket-extensions"), "no compression is offered: {r}");
        ws.read_frame().unwrap()
    };
    assert_eq!(f.json()["event"], "connect.challenge");
}

#[test]
fn handshake_refusals() {
    let gw = Gateway::start();
    let ok = upgrade_request("");
    // Wrong or missing version: 426 with the version we speak (§4.4).
    for req in [ok.replace("Version: 13", "Version: 8"), ok.replace("Sec-WebSocket-Version: 13\r\n", "")] {
        let r = gw.one(req.as_bytes());
        assert_eq!(r.status, 426, "{req}");
        assert_eq!(r.header("sec-websocket-version").as_deref(), Some("13"));
    }
    // A key that is not base64 of 16 bytes, a missing key, no upgrade token, HTTP/1.0: 400.
    for req in [
        ok.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZSE="),
        ok.replace("dGhlIHNhbXBsZSBub25jZQ==", "%%%"),
        ok.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
        ok.replace("Connection: Upgrade", "Connection: keep-alive"),
        ok.replace("HTTP/1.1", "HTTP/1.0"),
    ] {
        let r = gw.one(req.as_bytes());
        assert_eq!(r.status, 400, "{req}");
    }
    // A plain GET / stays HTTP, and the connection keeps serving HTTP.
    let mut s = gw.connect();
    s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let rs = util::read_responses(&mut s, 2);
    assert_eq!(rs.iter().map(|r| r.status).collect::<Vec<_>>(), [404, 200]);
    // Upgrade on another path is not a WebSocket endpoint.
    let r = gw.one(ok.replace("GET / ", "GET /v1/ws ").as_bytes());
    assert_eq!(r.status, 404);
}

// ---- group 1: framing --------------------------------------------------------------------

#[test]
fn g1_text_of_each_length_encoding() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    for (i, len) in [80, 125, 126, 127, 128, 65535, 65536, 100_000, 1 << 20].into_iter().enumerate() {
        let id = format!("t{i}");
        ws.send(&frame(true, TEXT, &health_of_len(&id, len)));
        assert_health(&mut ws, &id);
    }
    // The same, written one byte at a time.
    ws.send_slowly(&frame(true, TEXT, &health_of_len("slow", 200)));
    assert_health(&mut ws, "slow");
}

#[test]
fn g1_binary_message_is_refused_1003() {
    let gw = Gateway::start();
    expect_failure(&gw, &frame(true, BINARY, b"\x00\x01"), 1003);
}

#[test]
fn g1_unmasked_client_frame_1002() {
    let gw = Gateway::start();
    let text = health_of_len("u", 100);
    expect_failure(&gw, &frame_raw(0x80 | TEXT, &text, false), 1002);
    // Also before connect.
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    ws.send(&frame_raw(0x80 | TEXT, b"{}", false));
    assert_eq!(ws.expect_close_then_eof(), Some(1002));
}

#[test]
fn g1_length_encoding_rules_1002() {
    let gw = Gateway::start();
    // 16-bit length used for 5 bytes: not minimal (§5.2).
    let mut f = vec![0x81, 0x80 | 126, 0, 5, 1, 2, 3, 4];
    f.extend_from_slice(b"hello");
    expect_failure(&gw, &f, 1002);
    // 64-bit length with the high bit set.
    let f = [0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
    expect_failure(&gw, &f, 1002);
}

// ---- group 2: pings and pongs ------------------------------------------------------------

#[test]
fn g2_ping_gets_pong_with_same_payload() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    for payload in [&b""[..], b"Hello, world!", &[0xfe, 0xff, 0x00, 0x01][..], &[0x5a; 125][..]] {
        ws.send(&frame(true, PING, payload));
        let f = ws.read_frame().unwrap();
        assert_eq!((f.fin, f.opcode, f.payload.as_slice()), (true, PONG, payload));
    }
    // Byte by byte.
    ws.send_slowly(&frame(true, PING, b"slow ping"));
    assert_eq!(ws.read_frame().unwrap().payload, b"slow ping");
    // Ten pings in one write: ten pongs, in order.
    let mut burst = Vec::new();
    for i in 0..10u8 {
        burst.extend(frame(true, PING, &[i]));
    }
    ws.send(&burst);
    for i in 0..10u8 {
        let f = ws.read_frame().unwrap();
        assert_eq!((f.opcode, f.payload), (PONG, vec![i]));
    }
}

#[test]
fn g2_unsolicited_pong_is_ignored() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    ws.send(&frame(true, PONG, b"unsolicited"));
    ws.send(&frame(true, PONG, b""));
    ws.send(&frame(true, PING, b"after"));
    let f = ws.read_frame().unwrap();
    assert_eq!((f.opcode, f.payload.as_slice()), (PONG, &b"after"[..]));
}

#[test]
fn g2_ping_of_126_bytes_1002() {
    let gw = Gateway::start();
    expect_failure(&gw, &frame(true, PING, &[0; 126]), 1002);
}

#[test]
fn g2_ping_answered_before_connect() {
    let gw = Gateway::start();
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    ws.send(&frame(true, PING, b"early"));
    assert_eq!(ws.read_frame().unwrap().payload, b"early");
}

// ---- group 3: reserved bits --------------------------------------------------------------

#[test]
fn g3_reserved_bits_1002() {
    let gw = Gateway::start();
    let text = health_of_len("r", 100);
    for rsv in [0x40, 0x20, 0x10, 0x70] {
        expect_failure(&gw, &frame_raw(0x80 | rsv | TEXT, &text, true), 1002);
    }
    expect_failure(&gw, &frame_raw(0x80 | 0x40 | BINARY, b"x", true), 1002);
    expect_failure(&gw, &frame_raw(0x80 | 0x20 | PING, b"x", true), 1002);
    // A valid request before the bad frame is still answered first.
    let mut ws = Ws::connected(&gw);
    let mut v = frame(true, TEXT, &health_of_len("ok", 100));
    v.extend(frame_raw(0x80 | 0x10 | TEXT, b"x", true));
    ws.send(&v);
    assert_health(&mut ws, "ok");
    assert_eq!(ws.expect_close_then_eof(), Some(1002));
}

// ---- group 4: opcodes --------------------------------------------------------------------

#[test]
fn g4_reserved_opcodes_1002() {
    let gw = Gateway::start();
    for op in [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        expect_failure(&gw, &frame(true, op, b"payload"), 1002);
    }
    expect_failure(&gw, &frame(true, 0xB, b""), 1002);
}

// ---- group 5: fragmentation --------------------------------------------------------------

#[test]
fn g5_fragmented_text_with_interleaved_controls() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    let text = health_of_len("f", 300);
    let mut v = frame(false, TEXT, &text[..100]);
    v.extend(frame(true, PING, b"mid"));
    v.extend(frame(false, CONT, &text[100..200]));
    v.extend(frame(true, PONG, b"x"));
    v.extend(frame(false, CONT, b""));
    v.extend(frame(true, CONT, &text[200..]));
    ws.send(&v);
    // The pong for the interleaved ping comes before the answer to the message.
    let f = ws.read_frame().unwrap();
    assert_eq!((f.opcode, f.payload.as_slice()), (PONG, &b"mid"[..]));
    assert_health(&mut ws, "f");
    // One byte per fragment, sent slowly.
    let text = health_of_len("tiny", 90);
    let mut v = Vec::new();
    for (i, b) in text.iter().enumerate() {
        let first = i == 0;
        let last = i == text.len() - 1;
        v.extend(frame(last, if first { TEXT } else { CONT }, &[*b]));
    }
    ws.send_slowly(&v);
    assert_health(&mut ws, "tiny");
}

#[test]
fn g5_fragmentation_rules_1002() {
    let gw = Gateway::start();
    // Continuation with nothing to continue.
    expect_failure(&gw, &frame(true, CONT, b"x"), 1002);
    expect_failure(&gw, &frame(false, CONT, b"x"), 1002);
    // A new text frame while a fragmented message is open.
    let mut v = frame(false, TEXT, b"{\"a\":");
    v.extend(frame(true, TEXT, b"1}"));
    expect_failure(&gw, &v, 1002);
    // Fragmented control frames.
    expect_failure(&gw, &frame(false, PING, b"x"), 1002);
    expect_failure(&gw, &frame(false, PONG, b"x"), 1002);
    let mut v = frame(false, CLOSE, &1000u16.to_be_bytes());
    v.extend(frame(true, CONT, b""));
    expect_failure(&gw, &v, 1002);
}

// ---- group 6: UTF-8 ----------------------------------------------------------------------

#[test]
fn g6_valid_utf8_split_anywhere() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    let id = "κόσμε-€-𝄞";
    let text = json!({ "type": "req", "id": id, "method": "health" }).to_string().into_bytes();
    for cut in 1..text.len() {
        let mut v = frame(false, TEXT, &text[..cut]);
        v.extend(frame(true, CONT, &text[cut..]));
        ws.send(&v);
        assert_health(&mut ws, id);
    }
}

#[test]
fn g6_invalid_utf8_1007() {
    let gw = Gateway::start();
    let bad: [&[u8]; 6] = [
        b"\xff",
        b"{\"a\":\"\xc0\xaf\"}",             // over-long '/'
        b"{\"a\":\"\xed\xa0\x80\"}",         // surrogate
        b"{\"a\":\"\xf4\x90\x80\x80\"}",     // above U+10FFFF
        b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce", // truncated at the end
        b"\x80",                             // lone continuation byte
    ];
    for b in bad {
        expect_failure(&gw, &frame(true, TEXT, b), 1007);
    }
    // Invalid across a fragment boundary: each half alone could be valid.
    let mut v = frame(false, TEXT, b"{\"a\":\"\xe2\x82");
    v.extend(frame(true, CONT, b"\x28\"}"));
    expect_failure(&gw, &v, 1007);
    // Valid fragments, then an invalid one.
    let mut v = frame(false, TEXT, "κόσμε".as_bytes());
    v.extend(frame(false, CONT, b"ok"));
    v.extend(frame(true, CONT, b"\xed\xa0\x80"));
    expect_failure(&gw, &v, 1007);
}

#[test]
fn g6_invalid_utf8_fails_fast() {
    let gw = Gateway::start();
    // A frame announcing 1000 bytes whose first bytes are already invalid: the server must not
    // wait for the rest (Autobahn 6.4.x).
    let mut ws = Ws::connected(&gw);
    let mut payload = b"{\"a\":\"\xf4\x90".to_vec();
    payload.resize(1000, b'x');
    let f = frame(true, TEXT, &payload);
    ws.send(&f[..2 + 2 + 4 + 8]);
    ws.s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(ws.expect_close(), Some(1007));
    // Same across fragments: a fragment ends in a prefix that can never complete.
    let mut ws = Ws::connected(&gw);
    ws.send(&frame(false, TEXT, b"{\"a\":\"\xed"));
    ws.send(&frame(false, CONT, b"\xa0"));
    ws.s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(ws.expect_close(), Some(1007));
}

#[test]
fn g6_binary_is_not_utf8_checked_but_refused_1003() {
    let gw = Gateway::start();
    expect_failure(&gw, &frame(true, BINARY, b"\xff\xfe"), 1003);
}

// ---- group 7: close handling -------------------------------------------------------------

#[test]
fn g7_close_codes_are_echoed() {
    let gw = Gateway::start();
    for code in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
        let mut ws = Ws::connected(&gw);
        ws.send(&close_frame(code, b"bye"));
        assert_eq!(ws.expect_close_then_eof(), Some(code), "{code}");
    }
    // An empty close body gets an empty close back.
    let mut ws = Ws::connected(&gw);
    ws.send(&frame(true, CLOSE, b""));
    assert_eq!(ws.expect_close_then_eof(), None);
    // A 123-byte reason (the largest that fits) is fine.
    let mut ws = Ws::connected(&gw);
    ws.send(&close_frame(1000, &[b'r'; 123]));
    assert_eq!(ws.expect_close_then_eof(), Some(1000));
}

#[test]
fn g7_invalid_close_frames() {
    let gw = Gateway::start();
    expect_failure(&gw, &frame(true, CLOSE, &[0x03]), 1002);
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        expect_failure(&gw, &close_frame(code, b""), 1002);
    }
    expect_failure(&gw, &close_frame(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80"), 1007);
    // A close payload over 125 bytes is an oversized control frame.
    expect_failure(&gw, &close_frame(1000, &[b'r'; 124]), 1002);
}

#[test]
fn g7_nothing_is_processed_after_close() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    let mut v = close_frame(1000, b"");
    v.extend(frame(true, PING, b"late"));
    v.extend(frame(true, TEXT, &health_of_len("late", 100)));
    ws.send(&v);
    let f = ws.read_frame().unwrap();
    assert_eq!(f.close_code(), Some(1000));
    // No pong and no answer follow: only the TCP close.
    assert!(ws.read_frame().is_none());
}

#[test]
fn g7_server_waits_for_the_close_reply_then_closes() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    ws.send(&frame(true, 3, b""));
    assert_eq!(ws.expect_close(), Some(1002));
    // The client completes the closing handshake: the server ends the TCP connection.
    ws.send(&close_frame(1002, b""));
    assert!(ws.eof_within(Duration::from_secs(1)));
    // A client that never answers is dropped after a short wait.
    let mut ws = Ws::connected(&gw);
    ws.send(&frame(true, 3, b""));
    assert_eq!(ws.expect_close(), Some(1002));
    let t0 = std::time::Instant::now();
    assert!(ws.eof_within(Duration::from_secs(5)));
    assert!(t0.elapsed() >= Duration::from_millis(1500), "{:?}", t0.elapsed());
}

// ---- group 9: limits ---------------------------------------------------------------------

#[test]
fn g9_64k_limit_before_connect_1009() {
    let gw = Gateway::start();
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    // Refused on the header alone: the payload is never sent.
    let f = frame(true, TEXT, &vec![b' '; 64 * 1024 + 1]);
    ws.send(&f[..14]);
    assert_eq!(ws.expect_close_then_eof(), Some(1009));
    // Across fragments too.
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    ws.send(&frame(false, TEXT, &vec![b' '; 40 * 1024]));
    ws.send(&frame(true, CONT, &vec![b' '; 30 * 1024]));
    assert_eq!(ws.expect_close_then_eof(), Some(1009));
    // Exactly 64 KiB is allowed (and then must be a connect request).
    let mut ws = Ws::open(&gw);
    ws.read_frame().unwrap();
    let mut p = connect_params(util::TOKEN);
    p["pad"] = Value::String(String::new());
    let base = json!({ "type": "req", "id": "c", "method": "connect", "params": p }).to_string().len();
    p["pad"] = Value::String("x".repeat(64 * 1024 - base));
    let text = json!({ "type": "req", "id": "c", "method": "connect", "params": p }).to_string();
    assert_eq!(text.len(), 64 * 1024);
    ws.send(&frame(true, TEXT, text.as_bytes()));
    assert_eq!(ws.read_frame().unwrap().json()["payload"]["type"], "hello-ok");
}

#[test]
fn g9_large_messages_after_connect() {
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    // 4 MiB in 64 KiB fragments, then 4 MiB in one frame.
    let text = health_of_len("big", 4 << 20);
    let mut v = Vec::new();
    let chunks: Vec<&[u8]> = text.chunks(64 * 1024).collect();
    for (i, c) in chunks.iter().enumerate() {
        v.extend(frame(i == chunks.len() - 1, if i == 0 { TEXT } else { CONT }, c));
    }
    ws.send(&v);
    assert_health(&mut ws, "big");
    ws.send(&frame(true, TEXT, &health_of_len("big2", 4 << 20)));
    assert_health(&mut ws, "big2");
    // Over 25 MiB: refused from the header.
    let mut hdr = vec![0x81, 0x80 | 127];
    hdr.extend_from_slice(&((25u64 << 20) + 1).to_be_bytes());
    hdr.extend_from_slice(&[1, 2, 3, 4]);
    ws.send(&hdr);
    assert_eq!(ws.expect_close_then_eof(), Some(1009));
}

#[test]
fn ping_flood_from_a_client_that_never_reads_does_not_grow_server_memory() {
    // Every ping is answered with a pong; a client that never reads must be held back (or
    // dropped as a slow consumer), not buffered without bound.
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    let before = util::rss_kib(gw.child.id());
    let ping = frame(true, PING, &[b'p'; 125]);
    let sent = util::flood(&mut ws.s, &ping, 48 << 20, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(500));
    let grown = util::rss_kib(gw.child.id()).saturating_sub(before);
    assert!(grown < 32 * 1024, "server grew by {grown} KiB after {sent} bytes of unanswered pings");
}

#[test]
fn pings_held_back_by_an_unread_backlog_are_all_answered() {
    // More pongs than the socket buffers hold: handling pauses and must resume once read.
    let gw = Gateway::start();
    let mut ws = Ws::connected(&gw);
    let n = 40_000;
    let pings = frame(true, PING, &[b'p'; 125]).repeat(n);
    let mut w = ws.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&pings).is_ok());
    std::thread::sleep(Duration::from_millis(1000));
    let mut pongs = 0;
    while pongs < n {
        let f = ws.read_frame().unwrap_or_else(|| panic!("stalled after {pongs} pongs"));
        if f.opcode == PONG {
            pongs += 1;
        }
    }
    assert!(writer.join().unwrap());
}
