#![no_main]
//! SSE decoder: never panics, and any split of the input gives the same events as one feed.
use gatelet::sse::SseDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let cut = (data[0] as usize).min(input.len());
    let run = |parts: &[&[u8]]| {
        let mut d = SseDecoder::new(256);
        let mut out = Vec::new();
        let mut r = Ok(());
        for p in parts {
            r = r.and_then(|_| d.feed(p, &mut out));
        }
        r.and_then(|_| d.finish(&mut out)).map(|_| out)
    };
    let whole = run(&[input]);
    let split = run(&[&input[..cut], &input[cut..]]);
    assert_eq!(whole, split);
});
