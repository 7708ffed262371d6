//! Invariants of every untrusted-input codec, shared by the fuzz targets (`fuzz/fuzz_targets/`,
//! one line each) and by the seed replay test (`tests/fuzz_seeds.rs`), so the two can never
//! drift apart. Not part of the product's API.
//!
//! Each check panics when an invariant breaks. [`Depth::Target`] is what a fuzz target runs per
//! input (the first byte picks a split point where splits matter); [`Depth::Exhaustive`] also
//! tries every split point of small inputs and byte-by-byte feeding, for the replay test.

use serde_json::Value;

use crate::agent::backend::command;
use crate::http::chunked::ChunkError;
use crate::http::framing::{BodyDecoder, Framing, FramingError};
use crate::http::head::{self, HeadError};
use crate::http::upstream;
use crate::rpc::protocol;
use crate::sse::{Event, SseDecoder, SseError};
use crate::ws::frame::{Decoder, Message, ProtocolError};
use crate::ws::handshake;

/// How hard to check one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// One split, chosen by the input's first byte (what a fuzz target runs).
    Target,
    /// Also every split point (inputs up to [`EVERY_CUT_MAX`] bytes) and byte by byte.
    Exhaustive,
}

/// Inputs up to this size are checked at every split point under [`Depth::Exhaustive`].
pub const EVERY_CUT_MAX: usize = 4096;

/// One invariant check.
pub type Check = fn(&[u8], Depth);

/// Every target: its name (the fuzz binary and the `fuzz/seeds/` directory) and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("http_head", http_head),
    ("http_differential", http_differential),
    ("chunked", chunked),
    ("chat_request", chat_request),
    ("sse_decode", sse_decode),
    ("ws_frame", ws_frame),
    ("ws_conn", ws_conn),
    ("ws_handshake", ws_handshake),
    ("upstream_response", upstream_response),
    ("tool_calls", tool_calls),
    ("rpc_request", rpc_request),
    ("command_line", command_line),
];

/// The ways to split `input` compared with one feed, each with a label for failure messages.
fn splits(input: &[u8], target_cut: usize, depth: Depth) -> Vec<(String, Vec<&[u8]>)> {
    let mut out = vec![(format!("cut at {target_cut}"), vec![&input[..target_cut], &input[target_cut..]])];
    if depth == Depth::Exhaustive {
        if input.len() <= EVERY_CUT_MAX {
            out.extend((0..=input.len()).map(|c| (format!("cut at {c}"), vec![&input[..c], &input[c..]])));
        }
        out.push(("byte by byte".to_string(), input.chunks(1).collect()));
    }
    out
}

/// The first byte picks a cut in the rest (`sel * len / 256`), which is the input.
fn cut_input(data: &[u8]) -> Option<(usize, &[u8])> {
    let (&sel, input) = data.split_first()?;
    Some((sel as usize * input.len() / 256, input))
}

// ---- request head ----------------------------------------------------------------------------

/// `http::head::parse`: never panics; a head never claims more bytes than it was given, and
/// depends only on its own bytes (parsing exactly those bytes gives the same head); every error
/// maps to a status the server can send.
pub fn http_head(data: &[u8], _: Depth) {
    match head::parse(data) {
        Ok(Some((h, n))) => {
            assert!(n <= data.len(), "head claims {n} of {} bytes", data.len());
            assert_eq!(head::parse(&data[..n]), Ok(Some((h.clone(), n))), "head depends on later bytes");
            assert!(h.minor <= 1);
            assert!(h.body.is_some());
        }
        Ok(None) => assert!(data.len() <= head::MAX_HEAD_BYTES, "a partial head over the limit"),
        Err(e) => assert!(matches!(e.status(), 400 | 414 | 431 | 501 | 505), "{e:?}"),
    }
}

/// What a head parser decided about some bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// More bytes needed.
    Partial,
    /// A request head of `len` bytes.
    Accept {
        /// Method.
        method: String,
        /// Request target.
        target: String,
        /// 0 or 1 (later 1.x minors are served as 1).
        minor: u8,
        /// Body framing.
        framing: Framing,
        /// Bytes of head.
        len: usize,
    },
    /// Refused; `version` when the status is 505.
    Reject {
        /// The status is 505 (unsupported major version).
        version: bool,
    },
}

/// Where gatelet is deliberately stricter than RFC 9112 (listed in `docs/conformance.md`). The
/// differential target accepts a difference from the reference only when it is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrictRule {
    /// A line ending in LF without CR: RFC 9112 §2.2 lets a recipient accept it; we refuse.
    BareLf,
    /// A `Host` with an empty `uri-host` (an empty value, allowed by RFC 9112 §3.2 for targets
    /// without authority, or a port alone, `:80`; RFC 3986's `reg-name` may be empty) or with a
    /// comma (a `reg-name` sub-delimiter): refused.
    HostEmptyOrComma,
    /// Size limits: a target over 8 KiB (414), a head over 16 KiB or more than 64 fields (431).
    Limits,
    /// A `Transfer-Encoding` field line that names no coding (`Transfer-Encoding: ,`), even when
    /// another one names `chunked`: RFC 9110 §5.3 combines the lines into one list and §5.6.1
    /// ignores its empty elements; we refuse such a line (400 + close).
    EmptyTransferEncodingLine,
}

/// Ours, as a [`Verdict`].
fn ours(data: &[u8]) -> Result<Verdict, HeadError> {
    match head::parse(data) {
        Ok(None) => Ok(Verdict::Partial),
        Ok(Some((h, len))) => Ok(Verdict::Accept {
            method: h.method,
            target: h.target,
            minor: h.minor,
            framing: h.body.unwrap_or(Framing::None),
            len,
        }),
        Err(e) => Err(e),
    }
}

/// The reference: httparse for the syntax, then the RFC 9112 / RFC 9110 rules written out
/// independently of `http::head`, without our strict rules and limits.
pub fn reference(data: &[u8]) -> Verdict {
    let reject = Verdict::Reject { version: false };
    // RFC 9110 §2.5 / RFC 9112 §2.3: httparse knows HTTP/1.0 and 1.1 only. Look at the last
    // space-separated word of the request line: `HTTP/1.x` (x ≥ 2) is parsed as 1.1, another
    // major is 505 provided the rest of the line is valid.
    let mut patched;
    let mut buf = data;
    let start = data.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(data.len());
    if let Some(end) = data[start..].iter().position(|&b| b == b'\r' || b == b'\n') {
        let line = &data[start..start + end];
        if let Some(sp) = line.iter().rposition(|&b| b == b' ') {
            let v = &line[sp + 1..];
            let well_formed = v.len() == 8
                && v.starts_with(b"HTTP/")
                && v[5].is_ascii_digit()
                && v[6] == b'.'
                && v[7].is_ascii_digit();
            if well_formed && !(v[5] == b'1' && v[7] <= b'1') {
                patched = data.to_vec();
                let at = start + sp + 1;
                patched[at..at + 8].copy_from_slice(b"HTTP/1.1");
                if v[5] != b'1' {
                    // Only the version is wrong if the line parses once it says 1.1.
                    patched.truncate(start + end);
                    patched.extend_from_slice(b"\r\nHost: a\r\n\r\n");
                    let mut h = [httparse::EMPTY_HEADER; 4];
                    return match httparse::Request::new(&mut h).parse(&patched[..]) {
                        Ok(_) => Verdict::Reject { version: true },
                        Err(_) => reject,
                    };
                }
                buf = &patched[..];
            }
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Verdict::Partial,
        Err(_) => return reject,
    };
    let minor = req.version.unwrap_or(1);
    let field =
        |name: &'static str| req.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1, never two; RFC 3986 §3.2.2 for its value.
    let hosts: Vec<&[u8]> = field("host").collect();
    if hosts.len() > 1 || (minor == 1 && hosts.is_empty()) || !hosts.iter().all(|h| rfc3986_host_port(h)) {
        return reject;
    }
    // RFC 9110 §8.6: `Content-Length = 1*DIGIT`; identical values in a list may be merged.
    let mut length: Option<u64> = None;
    for v in field("content-length") {
        for part in v.split(|&b| b == b',') {
            let p = trim_ows(part);
            // Leading zeros are digits like any other; a value past `u64` is refused.
            let n = (!p.is_empty() && p.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(p).ok()?.parse::<u64>().ok())
                .flatten();
            match (n, length) {
                (None, _) => return reject,
                (Some(n), Some(l)) if n != l => return reject,
                (Some(n), _) => length = Some(n),
            }
        }
    }
    // RFC 9112 §6.1 and §6.3: codings as a list (empty elements ignored, §5.6.1 of RFC 9110);
    // none at all, chunked not last or twice, TE with CL, TE in 1.0: faulty framing. An unknown
    // coding is 501, also a refusal.
    let mut codings: Vec<Vec<u8>> = Vec::new();
    let mut te_fields = 0;
    for v in field("transfer-encoding") {
        te_fields += 1;
        codings.extend(v.split(|&b| b == b',').map(trim_ows).filter(|c| !c.is_empty()).map(|c| c.to_ascii_lowercase()));
    }
    let framing = if te_fields > 0 {
        let chunked_last = codings.last().is_some_and(|c| c == b"chunked");
        let chunked_count = codings.iter().filter(|c| *c == b"chunked").count();
        if codings.is_empty()
            || length.is_some()
            || minor == 0
            || !chunked_last
            || chunked_count != 1
            || codings.len() != 1
        {
            return reject;
        }
        Framing::Chunked
    } else {
        match length {
            None | Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
        }
    };
    Verdict::Accept {
        method: req.method.unwrap_or("").to_string(),
        target: req.path.unwrap_or("").to_string(),
        minor,
        framing,
        len,
    }
}

fn trim_ows(b: &[u8]) -> &[u8] {
    let b = &b[b.iter().take_while(|c| matches!(c, b' ' | b'\t')).count()..];
    &b[..b.len() - b.iter().rev().take_while(|c| matches!(c, b' ' | b'\t')).count()]
}

/// RFC 3986 §3.2.2–3.2.3 `host [ ":" port ]`, as the RFC writes it (empty reg-name and commas
/// allowed).
fn rfc3986_host_port(v: &[u8]) -> bool {
    let (host, port): (&[u8], &[u8]) = match v.iter().rposition(|&b| b == b':') {
        Some(i) if !v[i..].contains(&b']') => (&v[..i], &v[i + 1..]),
        _ => (v, b""),
    };
    if !port.iter().all(u8::is_ascii_digit) {
        return false;
    }
    if let Some(inner) = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        if let Some(f) = inner.strip_prefix(b"v").or_else(|| inner.strip_prefix(b"V")) {
            let Some(dot) = f.iter().position(|&b| b == b'.') else { return false };
            return dot > 0
                && f[..dot].iter().all(u8::is_ascii_hexdigit)
                && f.len() > dot + 1
                && f[dot + 1..].iter().all(|&b| b == b':' || unreserved_or_sub_delim(b));
        }
        return std::str::from_utf8(inner).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok());
    }
    // reg-name = *( unreserved / pct-encoded / sub-delims )
    let mut i = 0;
    while i < host.len() {
        if host[i] == b'%' {
            if !host.get(i + 1..i + 3).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
        } else if unreserved_or_sub_delim(host[i]) {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

fn unreserved_or_sub_delim(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b)
}

/// The values of the field lines named `name` (`"host:"`, lowercase, colon included), read as
/// written: the request line may say a later minor, which httparse would not parse.
fn field_lines<'a>(head: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).filter_map(move |line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        (line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name)).then(|| &line[name.len()..])
    })
}

/// Which strict rule explains `ours` refusing bytes the reference accepts, if any.
fn strict_rule(data: &[u8], e: HeadError, len: usize) -> Option<StrictRule> {
    let head = &data[..len.min(data.len())];
    match e {
        HeadError::BareLf => {
            let bare = head.iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'));
            bare.then_some(StrictRule::BareLf)
        }
        HeadError::HostValue => {
            let odd =
                field_lines(head, b"host:").map(trim_ows).any(|v| v.is_empty() || v[0] == b':' || v.contains(&b','));
            odd.then_some(StrictRule::HostEmptyOrComma)
        }
        HeadError::UriTooLong | HeadError::HeadersTooLarge => Some(StrictRule::Limits),
        HeadError::Framing(FramingError::EmptyTransferEncoding) => {
            let empty = field_lines(head, b"transfer-encoding:")
                .any(|v| v.split(|&b| b == b',').all(|c| trim_ows(c).is_empty()));
            empty.then_some(StrictRule::EmptyTransferEncodingLine)
        }
        _ => None,
    }
}

/// Differential: our head + framing decision against [`reference`] on the same bytes. They
/// agree, or ours refuses by one of the [`StrictRule`]s.
pub fn http_differential(data: &[u8], _: Depth) {
    let (mut a, mut b) = (ours(data), reference(data));
    let mut bytes = data.to_vec();
    // One side waits for the line end to judge what the other already refused: compare them
    // on the completed head instead.
    if (a == Ok(Verdict::Partial)) != (b == Verdict::Partial) {
        bytes.extend_from_slice(b"\r\n\r\n");
        (a, b) = (ours(&bytes), reference(&bytes));
    }
    match (&a, &b) {
        (Ok(x), y) if x == y => {}
        (Err(e), Verdict::Reject { version }) => {
            assert_eq!(*e == HeadError::VersionNotSupported, *version, "505 disagreement: ours {e:?}");
        }
        (Err(e), Verdict::Accept { len, .. }) => {
            let rule = strict_rule(&bytes, *e, *len);
            assert!(rule.is_some(), "we refuse ({e:?}) what RFC 9112 accepts, and no strict rule says so");
        }
        (Err(HeadError::UriTooLong | HeadError::HeadersTooLarge), Verdict::Partial) => {}
        (a, b) => panic!("head verdicts differ: ours {a:?}, reference {b:?}"),
    }
}

// ---- chunked -------------------------------------------------------------------------------

type ChunkedOutcome = (Result<usize, ChunkError>, Vec<u8>, bool);

/// Decode `parts` in order as a connection does: once a part is not fully consumed the body is
/// complete and the rest is pipelined data.
fn chunked_run(parts: &[&[u8]]) -> ChunkedOutcome {
    let mut d = BodyDecoder::new(Framing::Chunked, 1 << 20);
    let mut out = Vec::new();
    let mut total = 0;
    for p in parts {
        match d.decode(p, &mut out) {
            Ok(n) => {
                assert!(n <= p.len(), "consumed {n} of {} bytes", p.len());
                total += n;
                if n < p.len() {
                    assert!(d.is_done(), "stopped short of the input before the end of the body");
                    break;
                }
            }
            Err(e) => return (Err(e), out, d.is_done()),
        }
    }
    (Ok(total), out, d.is_done())
}

/// `http::framing::BodyDecoder` for a chunked body (the decoder of request and upstream response
/// bodies, over `http::chunked::ChunkedDecoder`): any split of the input gives the same bytes
/// consumed, body, `is_done()` or error as one feed; the body never exceeds the bytes given.
pub fn chunked(data: &[u8], depth: Depth) {
    let Some((cut, input)) = cut_input(data) else { return };
    let whole = chunked_run(&[input]);
    assert!(whole.1.len() <= input.len());
    for (how, parts) in splits(input, cut, depth) {
        let split = chunked_run(&parts);
        match (&whole.0, &split.0) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "consumed, {how}");
                assert_eq!(whole.1, split.1, "decoded body, {how}");
                assert_eq!(whole.2, split.2, "is_done, {how}");
            }
            (Err(a), Err(b)) => assert_eq!(a, b, "{how}"),
            (a, b) => panic!("{how} changed the outcome: {a:?} vs {b:?}"),
        }
    }
}

// ---- chat request ------------------------------------------------------------------------

/// `openai::chat::parse`: never panics; an accepted request has messages or a system prompt;
/// every error is a 4xx in the OpenAI envelope.
pub fn chat_request(data: &[u8], _: Depth) {
    match crate::openai::chat::parse(data) {
        Ok(r) => assert!(!r.messages.is_empty() || !r.system.is_empty()),
        Err(e) => {
            assert!((400..500).contains(&e.status), "status {}", e.status);
            let v: Value = serde_json::from_slice(&e.body()).expect("error body is JSON");
            assert!(v["error"]["message"].is_string(), "{v}");
        }
    }
}

// ---- SSE -----------------------------------------------------------------------------------

fn sse_run(parts: &[&[u8]]) -> Result<Vec<Event>, SseError> {
    let mut d = SseDecoder::new(256);
    let mut out = Vec::new();
    for p in parts {
        d.feed(p, &mut out)?;
    }
    d.finish(&mut out).map(|_| out)
}

/// `sse::SseDecoder` (limit 256): any split gives the same events or error as one feed.
pub fn sse_decode(data: &[u8], depth: Depth) {
    let Some((&sel, input)) = data.split_first() else { return };
    let cut = (sel as usize).min(input.len());
    let whole = sse_run(&[input]);
    if let Ok(events) = &whole {
        assert!(events.iter().all(|e| e.data.len() <= 256));
    }
    for (how, parts) in splits(input, cut, depth) {
        assert_eq!(whole, sse_run(&parts), "{how}");
    }
}

// ---- WebSocket frames ------------------------------------------------------------------------

const WS_MAX: usize = 4096;

/// Decode what `buf` holds, leaving a partial frame header in it, as a connection does.
fn ws_feed(d: &mut Decoder, buf: &mut Vec<u8>, out: &mut Vec<Message>) -> Result<(), ProtocolError> {
    loop {
        let (n, m) = d.decode(buf)?;
        assert!(n <= buf.len(), "consumed {n} of {} bytes", buf.len());
        buf.drain(..n);
        match m {
            Some(m) => {
                match &m {
                    Message::Text(t) => assert!(t.len() <= WS_MAX),
                    Message::Binary(b) => assert!(b.len() <= WS_MAX),
                    Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= 125),
                    Message::Close(_) => {}
                }
                out.push(m);
            }
            None => {
                // Only an incomplete frame header may be left over.
                assert!(buf.len() < 14, "{} bytes left undecoded", buf.len());
                return Ok(());
            }
        }
    }
}

fn ws_run(chunks: &[&[u8]]) -> (Vec<Message>, Option<ProtocolError>) {
    let mut d = Decoder::new(WS_MAX);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        if let Err(e) = ws_feed(&mut d, &mut buf, &mut out) {
            return (out, Some(e));
        }
    }
    (out, None)
}

/// `ws::frame::Decoder` (limit 4096): never consumes more than given, respects the message and
/// control limits, and any split (and byte-by-byte feeding) gives the same messages and error.
pub fn ws_frame(data: &[u8], depth: Depth) {
    let Some((cut, input)) = cut_input(data) else { return };
    let whole = ws_run(&[input]);
    let mut ways = splits(input, cut, depth);
    if depth == Depth::Target {
        // Byte by byte is cheap here and catches state carried across calls.
        ways.push(("byte by byte".to_string(), input.chunks(1).collect()));
    }
    for (how, parts) in ways {
        assert_eq!(whole, ws_run(&parts), "{how}");
    }
}

// ---- WebSocket connection -------------------------------------------------------------------

/// Feed `parts` to a connection as the event loop does (unconsumed bytes stay buffered); the
/// events and every byte it queued to send.
fn ws_conn_run(parts: &[&[u8]]) -> (Vec<crate::ws::conn::Incoming>, Vec<u8>, bool) {
    let now = std::time::Instant::now();
    let mut c = crate::ws::conn::Conn::new(WS_MAX);
    let (mut events, mut out, mut buf) = (Vec::new(), Vec::new(), Vec::new());
    for p in parts {
        buf.extend_from_slice(p);
        loop {
            let (n, ev) = c.feed(&buf, now, &mut out);
            assert!(n <= buf.len());
            buf.drain(..n);
            match ev {
                Some(e) => events.push(e),
                None => break,
            }
        }
        if c.is_closed() {
            break;
        }
    }
    (events, out, c.is_closed())
}

/// `ws::conn::Conn` (limit 4096): any split gives the same events and the same bytes to send
/// (and, unless the connection failed, the same closed state);
/// what it sends is well-formed unmasked server frames (pongs echo their ping, at most one close
/// frame, nothing after it); a failure sends a close with the failure's code; nothing follows a
/// close.
pub fn ws_conn(data: &[u8], depth: Depth) {
    use crate::ws::conn::Incoming;
    let Some((cut, input)) = cut_input(data) else { return };
    let whole = ws_conn_run(&[input]);
    let failed = whole.0.iter().any(|e| matches!(e, Incoming::Failed { .. }));
    for (how, parts) in splits(input, cut, depth) {
        let split = ws_conn_run(&parts);
        assert_eq!((&whole.0, &whole.1), (&split.0, &split.1), "{how}");
        // After a failure the peer's bytes are unframed garbage, looked at only for its close
        // frame: where the reads fall may decide whether one is seen (else the close timer ends
        // the connection), but never what is sent.
        if !failed {
            assert_eq!(whole.2, split.2, "closed, {how}");
        }
    }
    let (events, out, _) = &whole;
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos < out.len() {
        let (h, n) = crate::ws::frame::parse_header(&out[pos..]).expect("valid header").expect("complete header");
        assert!(h.fin && h.rsv == 0 && h.mask.is_none());
        let end = pos + n + h.len as usize;
        assert!(end <= out.len());
        frames.push((h.opcode, out[pos + n..end].to_vec()));
        pos = end;
    }
    let closes = frames.iter().filter(|f| f.0 == 0x8).count();
    assert!(closes <= 1, "{closes} close frames");
    if closes == 1 {
        assert_eq!(frames.last().map(|f| f.0), Some(0x8), "a frame after the close");
    }
    let pongs: Vec<&Vec<u8>> = frames.iter().filter(|f| f.0 == 0xA).map(|f| &f.1).collect();
    assert_eq!(pongs.len(), events.iter().filter(|e| **e == Incoming::Ping).count());
    for (i, e) in events.iter().enumerate() {
        let last = i + 1 == events.len();
        match e {
            Incoming::Failed { code, .. } => {
                assert!(last && matches!(code, 1002 | 1007 | 1009));
                assert_eq!(frames.last().map(|f| &f.1[..2]), Some(&code.to_be_bytes()[..]));
            }
            Incoming::Closed(code) => {
                assert!(last);
                let body = &frames.last().expect("close echoed").1;
                assert_eq!(code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default(), body.get(..2).unwrap_or(&[]));
            }
            _ => {}
        }
    }
}

// ---- WebSocket handshake -------------------------------------------------------------------

/// `ws::handshake`: for any request head, `validate` either accepts a GET on HTTP/1.1 with
/// version 13 and a key of 16 bytes, answered by a well-formed 101, or refuses with 400 or 426.
pub fn ws_handshake(data: &[u8], _: Depth) {
    let Ok(Some((h, _))) = head::parse(data) else { return };
    match handshake::validate(&h) {
        Ok(key) => {
            use base64::Engine;
            assert_eq!(h.method, "GET");
            assert!(h.minor >= 1);
            assert_eq!(h.ws_version.as_deref(), Some("13"));
            let raw = base64::engine::general_purpose::STANDARD.decode(key).expect("key is base64");
            assert_eq!(raw.len(), 16);
            let resp = handshake::accept(&h).expect("validated head is accepted");
            let text = std::str::from_utf8(&resp).expect("101 is ASCII");
            assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{text}");
            assert!(text.ends_with("\r\n\r\n"));
            let accept = handshake::accept_key(key);
            assert_eq!(accept.len(), 28);
            assert!(text.contains(&format!("\r\nSec-WebSocket-Accept: {accept}\r\n")));
            assert_eq!(text.matches("\r\n").count(), 5, "no header injected: {text}");
        }
        Err(e) => {
            let r = crate::openai::ApiError::from(e);
            assert!(matches!(r.status, 400 | 426), "{e:?}");
            assert!(handshake::accept(&h).is_err());
        }
    }
}

// ---- upstream response -----------------------------------------------------------------------

type UpstreamOutcome = Result<(Option<(upstream::ResponseHead, usize)>, Vec<u8>, usize, bool), String>;

/// Parse a response head from the joined parts, then decode its body from the remaining parts in
/// order, as the upstream client does with its reads.
fn upstream_run(parts: &[&[u8]]) -> UpstreamOutcome {
    let mut buf = Vec::new();
    let mut rest = parts.iter();
    let (head, n) = loop {
        match upstream::parse_head(&buf).map_err(|e| e.to_string())? {
            Some(h) => break h,
            None => match rest.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return Ok((None, Vec::new(), 0, false)),
            },
        }
    };
    assert!(n <= buf.len());
    let mut body = Vec::new();
    let mut d = BodyDecoder::new(head.framing, u64::MAX);
    let mut consumed = 0;
    let mut pending: Vec<&[u8]> = vec![&buf[n..]];
    pending.extend(rest.copied());
    for p in pending {
        let c = d.decode(p, &mut body).map_err(|e| upstream::UpstreamError::Chunked(e).to_string())?;
        assert!(c <= p.len());
        consumed += c;
        if c < p.len() {
            assert!(d.is_done(), "stopped short before the end of the body");
            break;
        }
    }
    match head.framing {
        Framing::Length(l) => assert!(body.len() as u64 <= l),
        Framing::None => assert!(body.is_empty() && d.is_done()),
        Framing::CloseDelimited => assert!(d.complete_at_close()),
        Framing::Chunked => {}
    }
    let done = d.is_done();
    assert_eq!(d.complete_at_close(), done || head.framing == Framing::CloseDelimited);
    Ok((Some((head, n)), body, consumed, done))
}

/// `http::upstream::parse_head` and `http::framing::BodyDecoder`: never panics; the head never claims
/// more than it was given; 204/304 have no body; any split of head and body gives the same
/// head, body, bytes consumed and end-of-body as one read.
pub fn upstream_response(data: &[u8], depth: Depth) {
    let Some((cut, input)) = cut_input(data) else { return };
    let whole = upstream_run(&[input]);
    if let Ok((Some((h, _)), body, _, _)) = &whole
        && (h.status == 204 || h.status == 304)
    {
        assert!(body.is_empty());
    }
    for (how, parts) in splits(input, cut, depth) {
        // A head split across reads may be refused as too large only once it is complete, which
        // is the same either way; compare everything.
        assert_eq!(whole, upstream_run(&parts), "{how}");
    }
}

// ---- upstream tool calls ------------------------------------------------------------------

/// What must not depend on how the body was cut (ids made up for id-less calls differ).
type ToolCallsView = Result<(String, Vec<(String, String)>, Option<&'static str>, bool), String>;

/// The split-independent part of a decoded tool-call stream.
pub fn tool_calls_view(r: &Result<crate::agent::backend::openai::Decoded, String>) -> ToolCallsView {
    r.as_ref().map_err(Clone::clone).map(|d| {
        let calls = d.calls.iter().map(|c| (c.name.clone(), c.arguments.clone())).collect();
        (d.text.clone(), calls, d.finish.map(|f| f.as_str()), d.done)
    })
}

/// `agent::backend::openai::decode_body` (an `openai` upstream's event stream): never panics;
/// every decoded call has an id and a non-empty name, and the calls respect the per-reply bounds;
/// any split gives the same text, calls, finish and error as one feed.
pub fn tool_calls(data: &[u8], depth: Depth) {
    use crate::agent::backend::openai::decode_body;
    use crate::agent::tools::{MAX_ARGUMENT_BYTES, MAX_CALLS};
    let Some((&sel, input)) = data.split_first() else { return };
    let cut = (sel as usize).min(input.len());
    let whole = decode_body(&[input]);
    if let Ok(d) = &whole {
        assert!(d.calls.len() <= MAX_CALLS);
        assert!(d.calls.iter().map(|c| c.arguments.len()).sum::<usize>() <= MAX_ARGUMENT_BYTES);
        for c in &d.calls {
            assert!(!c.id.is_empty() && !c.name.is_empty(), "{c:?}");
        }
    }
    let want = tool_calls_view(&whole);
    for (how, parts) in splits(input, cut, depth) {
        assert_eq!(want, tool_calls_view(&decode_body(&parts)), "{how}");
    }
}

// ---- gateway protocol --------------------------------------------------------------------

/// `rpc::protocol::parse_request` on a text message: never panics; an accepted request has a
/// non-empty id and method and object-or-null params; every answer it leads to is one JSON
/// `res` frame carrying the request's id.
pub fn rpc_request(data: &[u8], _: Depth) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match protocol::parse_request(text) {
        Ok(r) => {
            assert!(!r.id.is_empty() && !r.method.is_empty());
            assert!(matches!(r.params, Value::Null | Value::Object(_)));
            let v: Value = serde_json::from_str(&protocol::res_ok(&r.id, &r.params)).expect("res is JSON");
            assert_eq!(
                (v["type"].as_str(), v["id"].as_str(), v["ok"].as_bool()),
                (Some("res"), Some(&*r.id), Some(true))
            );
        }
        Err(e) => {
            let err = protocol::ErrorShape::invalid(e.message.clone());
            let v: Value = serde_json::from_str(&protocol::res_err(e.id.as_deref(), &err)).expect("res is JSON");
            assert_eq!(v["ok"], false);
            assert_eq!(v["id"].as_str(), e.id.as_deref());
            assert!(v["error"]["message"].is_string());
        }
    }
}

// ---- command backend ---------------------------------------------------------------------

/// `agent::backend::command::parse_line` on one stdout line: never panics, always at least one
/// event; a line that is not a JSON object with a known key is exactly one text event holding
/// the line (without a trailing CR).
pub fn command_line(data: &[u8], _: Depth) {
    let line = String::from_utf8_lossy(data);
    let events = command::parse_line(&line);
    assert!(!events.is_empty());
    let bare = line.strip_suffix('\r').unwrap_or(&line);
    let is_object = serde_json::from_str::<Value>(bare).is_ok_and(|v| v.is_object());
    if !is_object || !bare.trim_start().starts_with('{') {
        assert_eq!(events, vec![command::LineEvent::Text(bare.to_string())]);
    }
    for e in &events {
        if let command::LineEvent::Text(t) = e {
            assert_eq!(t, bare);
        }
    }
}
