//! Replays the fuzz corpus seeds (`fuzz/seeds/<target>/`) on the stable toolchain, through the
//! same entry points and the same invariants as the fuzz targets in `fuzz/fuzz_targets/`, so every
//! test run exercises the corpus without cargo-fuzz.
//!
//! Each seed is checked exactly as its fuzz target checks it (the first byte picks the split
//! point where the target does so), and the split-invariant codecs are also checked at every
//! split point and fed byte by byte.

use std::fs;
use std::path::{Path, PathBuf};

use gatelet::agent::backend::upstream::{BodyDecoder, Framing, parse_head};
use gatelet::http::chunked::{ChunkError, ChunkedDecoder};
use gatelet::sse::{Event, SseDecoder, SseError};
use gatelet::ws::frame::{Decoder, Message, ProtocolError};

/// Inputs up to this size are also checked at every split point (quadratic in the size).
const EVERY_CUT_MAX: usize = 4096;

/// Every file in `fuzz/seeds/<target>/`, sorted by name. A target without seeds is an error.
fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("seed directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// Run `check` on every seed of `target`, naming the seed when it fails.
fn replay(target: &str, check: impl Fn(&[u8])) {
    for (path, data) in seeds(target) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&data)));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            panic!("{target} seed {} failed: {msg}", path.display());
        }
    }
}

/// The ways to split `input` checked against one feed, each with a label for failure messages:
/// the fuzz target's own cut, every cut (for small inputs), and one byte at a time.
fn splits(input: &[u8], target_cut: usize) -> Vec<(String, Vec<&[u8]>)> {
    let mut out = vec![(format!("target cut at {target_cut}"), vec![&input[..target_cut], &input[target_cut..]])];
    if input.len() <= EVERY_CUT_MAX {
        out.extend((0..=input.len()).map(|c| (format!("cut at {c}"), vec![&input[..c], &input[c..]])));
    }
    out.push(("byte by byte".to_string(), input.chunks(1).collect()));
    out
}

// ---- http_head ----------------------------------------------------------------------------

/// `fuzz_targets/http_head.rs`: never panics; a parsed head never claims more bytes than given.
fn check_http_head(data: &[u8]) {
    if let Ok(Some((_, n))) = gatelet::http::head::parse(data) {
        assert!(n <= data.len(), "head claims {n} of {} bytes", data.len());
    }
}

#[test]
fn http_head_seeds() {
    replay("http_head", check_http_head);
}

// ---- chunked ------------------------------------------------------------------------------

/// Decode `parts` in order as a connection would: once a part is not fully consumed the body is
/// complete and the rest is pipelined data, so decoding stops.
fn chunked_run(parts: &[&[u8]]) -> ChunkedOutcome {
    let mut d = ChunkedDecoder::new(1 << 20);
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

type ChunkedOutcome = (Result<usize, ChunkError>, Vec<u8>, bool);

fn chunked_same(whole: &ChunkedOutcome, split: &ChunkedOutcome, how: &str) {
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

/// `fuzz_targets/chunked.rs`: any split of the input gives the same result as one feed.
fn check_chunked(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let input = &data[1..];
    let cut = cut.min(input.len());
    let whole = chunked_run(&[input]);
    for (how, parts) in splits(input, cut) {
        chunked_same(&whole, &chunked_run(&parts), &how);
    }
}

#[test]
fn chunked_seeds() {
    replay("chunked", check_chunked);
}

// ---- chat_request -------------------------------------------------------------------------

/// `fuzz_targets/chat_request.rs`: never panics; errors are 4xx in the OpenAI error envelope.
fn check_chat_request(data: &[u8]) {
    match gatelet::openai::chat::parse(data) {
        Ok(r) => assert!(!r.messages.is_empty() || !r.system.is_empty()),
        Err(e) => {
            assert!((400..500).contains(&e.status), "status {}", e.status);
            let v: serde_json::Value = serde_json::from_slice(&e.body()).expect("error body is JSON");
            assert!(v["error"]["message"].is_string(), "{v}");
        }
    }
}

#[test]
fn chat_request_seeds() {
    replay("chat_request", check_chat_request);
}

// ---- sse_decode ---------------------------------------------------------------------------

fn sse_run(parts: &[&[u8]]) -> Result<Vec<Event>, SseError> {
    let mut d = SseDecoder::new(256);
    let mut out = Vec::new();
    let mut r = Ok(());
    for p in parts {
        r = r.and_then(|_| d.feed(p, &mut out));
    }
    r.and_then(|_| d.finish(&mut out)).map(|_| out)
}

/// `fuzz_targets/sse_decode.rs`: never panics; any split gives the same events as one feed.
fn check_sse(data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let cut = (data[0] as usize).min(input.len());
    let whole = sse_run(&[input]);
    for (how, parts) in splits(input, cut) {
        assert_eq!(whole, sse_run(&parts), "{how}");
    }
}

#[test]
fn sse_decode_seeds() {
    replay("sse_decode", check_sse);
}

// ---- ws_frame -----------------------------------------------------------------------------

const WS_MAX: usize = 4096;

/// Decode what `buf` holds, leaving a partial frame header in it, as the event loop does.
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

/// `fuzz_targets/ws_frame.rs`: never panics, never consumes more than given, respects the
/// limits, and any split (and byte-by-byte feeding) gives the same messages and error.
fn check_ws(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else { return };
    let cut = if input.is_empty() { 0 } else { sel as usize * input.len() / 256 };
    let whole = ws_run(&[input]);
    for (how, parts) in splits(input, cut) {
        assert_eq!(whole, ws_run(&parts), "{how}");
    }
}

#[test]
fn ws_frame_seeds() {
    replay("ws_frame", check_ws);
}

// ---- tool_calls ---------------------------------------------------------------------------

/// What must not depend on how the body was cut (ids made up for id-less calls differ).
type ToolCallsView = Result<(String, Vec<(String, String)>, Option<&'static str>, bool), String>;

fn tool_calls_view(r: &Result<gatelet::agent::backend::openai::Decoded, String>) -> ToolCallsView {
    r.as_ref().map_err(Clone::clone).map(|d| {
        let calls = d.calls.iter().map(|c| (c.name.clone(), c.arguments.clone())).collect();
        (d.text.clone(), calls, d.finish.map(|f| f.as_str()), d.done)
    })
}

/// `fuzz_targets/tool_calls.rs`: never panics; whole calls have an id and a name and respect the
/// bounds; any split gives the same text, calls, finish and error as one feed.
fn check_tool_calls(data: &[u8]) {
    use gatelet::agent::backend::openai::decode_body;
    use gatelet::agent::tools::{MAX_ARGUMENT_BYTES, MAX_CALLS};
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let cut = (data[0] as usize).min(input.len());
    let whole = decode_body(&[input]);
    if let Ok(d) = &whole {
        assert!(d.calls.len() <= MAX_CALLS);
        assert!(d.calls.iter().map(|c| c.arguments.len()).sum::<usize>() <= MAX_ARGUMENT_BYTES);
        for c in &d.calls {
            assert!(!c.id.is_empty() && !c.name.is_empty(), "{c:?}");
        }
    }
    let want = tool_calls_view(&whole);
    for (how, parts) in splits(input, cut) {
        assert_eq!(want, tool_calls_view(&decode_body(&parts)), "{how}");
    }
}

#[test]
fn tool_calls_seeds() {
    replay("tool_calls", check_tool_calls);
    // The hand-written seeds decode to what they were written to hold.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/tool_calls");
    let decode = |name: &str| gatelet::agent::backend::openai::decode_body(&[&fs::read(dir.join(name)).unwrap()[1..]]);
    let d = decode("interleaved").unwrap();
    let calls: Vec<(&str, &str)> = d.calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(calls, [("get_weather", r#"{"city":"Paris"}"#), ("get_time", r#"{"tz":"CET"}"#)]);
    assert_eq!(d.finish.map(|f| f.as_str()), Some("tool_calls"));
    assert_eq!(tool_calls_view(&decode("crlf_split")), tool_calls_view(&Ok(d)));
    assert!(decode("no_name").unwrap_err().contains("without a function name"));
    assert!(decode("bad_index").unwrap_err().contains("`index`"));
    assert!(decode("not_array").unwrap_err().contains("must be an array"));
    assert!(decode("after_done").unwrap().done);
}

// ---- upstream_response ----

type UpstreamOutcome = Result<(Vec<u8>, usize, bool), String>;

fn upstream_run(framing: Framing, parts: &[&[u8]]) -> UpstreamOutcome {
    let mut d = BodyDecoder::new(framing);
    let mut out = Vec::new();
    let mut used = 0;
    for p in parts {
        let n = d.decode(p, &mut out).map_err(|e| e.to_string())?;
        assert!(n <= p.len());
        used += n;
        if n < p.len() {
            assert!(d.is_done(), "bytes left unconsumed before the end of the body");
            break;
        }
    }
    Ok((out, used, d.is_done()))
}

/// As `fuzz/fuzz_targets/upstream_response.rs`, plus every split point and byte-by-byte.
fn check_upstream_response(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else { return };
    let Ok(Some((head, n))) = parse_head(input) else { return };
    assert!(n <= input.len());
    let body = &input[n..];
    let cut = sel as usize % (body.len() + 1);
    let whole = upstream_run(head.framing, &[body]);
    for (how, parts) in splits(body, cut) {
        assert_eq!(upstream_run(head.framing, &parts), whole, "{how}");
    }
    if let (Framing::Length(k), Ok((out, _, done))) = (head.framing, &whole) {
        assert!(out.len() as u64 <= k);
        assert_eq!(*done, out.len() as u64 == k);
    }
}

#[test]
fn upstream_response_seeds() {
    replay("upstream_response", check_upstream_response);
    // The seeds reach a complete body through each framing.
    let framings: Vec<Framing> = seeds("upstream_response")
        .iter()
        .filter_map(|(_, d)| parse_head(&d[1..]).ok().flatten().map(|(h, _)| h.framing))
        .collect();
    assert!(framings.contains(&Framing::Chunked) && framings.contains(&Framing::Close));
    assert!(framings.iter().any(|f| matches!(f, Framing::Length(n) if *n > 0)));
}
