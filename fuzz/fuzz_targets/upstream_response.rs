#![no_main]
//! Upstream response head + body decoder: never panics; a parsed head never claims more bytes than
//! it was given; the first byte picks a split point, and decoding the body in one feed and in two
//! gives the same bytes, the same consumption, the same `is_done()` or the same error; a
//! `Content-Length` body never yields more than its length.
use gatelet::agent::backend::upstream::{BodyDecoder, Framing, parse_head};
use libfuzzer_sys::fuzz_target;

type Outcome = Result<(Vec<u8>, usize, bool), String>;

fn run(framing: Framing, parts: &[&[u8]]) -> Outcome {
    let mut d = BodyDecoder::new(framing);
    let mut out = Vec::new();
    let mut used = 0;
    for p in parts {
        let n = d.decode(p, &mut out).map_err(|e| e.to_string())?;
        assert!(n <= p.len());
        used += n;
        if n < p.len() {
            // Only the end of the body leaves bytes unconsumed.
            assert!(d.is_done());
            break;
        }
    }
    Ok((out, used, d.is_done()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else { return };
    let Ok(Some((head, n))) = parse_head(input) else { return };
    assert!(n <= input.len());
    let body = &input[n..];
    let cut = sel as usize % (body.len() + 1);
    let whole = run(head.framing, &[body]);
    let split = run(head.framing, &[&body[..cut], &body[cut..]]);
    assert_eq!(whole, split);
    if let (Framing::Length(k), Ok((out, _, done))) = (head.framing, &whole) {
        assert!(out.len() as u64 <= k);
        assert_eq!(*done, out.len() as u64 == k);
    }
});
