#![no_main]
//! WebSocket frame decoder: never panics, never consumes more than it was given, respects the
//! message and control-frame limits, and any split of the input gives the same messages and the
//! same error as one feed (the decoder is a pure function of the byte stream).
use gatelet::ws::frame::{Decoder, Message, ProtocolError};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

/// Decode what `buf` holds, leaving unconsumed bytes (a partial header) in it, as the event
/// loop does with its read buffer.
fn feed(d: &mut Decoder, buf: &mut Vec<u8>, out: &mut Vec<Message>) -> Result<(), ProtocolError> {
    loop {
        let (n, m) = d.decode(buf)?;
        assert!(n <= buf.len());
        buf.drain(..n);
        match m {
            Some(m) => {
                match &m {
                    Message::Text(t) => assert!(t.len() <= MAX),
                    Message::Binary(b) => assert!(b.len() <= MAX),
                    Message::Ping(p) | Message::Pong(p) => assert!(p.len() <= 125),
                    Message::Close(_) => {}
                }
                out.push(m);
            }
            None => {
                // Only an incomplete frame header may be left over.
                assert!(buf.len() < 14);
                return Ok(());
            }
        }
    }
}

fn run(chunks: &[&[u8]]) -> (Vec<Message>, Option<ProtocolError>) {
    let mut d = Decoder::new(MAX);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        if let Err(e) = feed(&mut d, &mut buf, &mut out) {
            return (out, Some(e));
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else { return };
    let cut = if input.is_empty() { 0 } else { sel as usize * input.len() / 256 };
    let whole = run(&[input]);
    let split = run(&[&input[..cut], &input[cut..]]);
    assert_eq!(whole, split, "cut at {cut}");
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(whole, run(&bytes), "byte by byte");
});
