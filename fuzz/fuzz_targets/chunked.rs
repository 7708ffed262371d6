#![no_main]
//! Chunked decoder: any split of the input gives the same result as one feed.
use libfuzzer_sys::fuzz_target;
use gatelet::http::chunked::ChunkedDecoder;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let input = &data[1..];
    let cut = cut.min(input.len());
    let mut whole = ChunkedDecoder::new(1 << 20);
    let mut out_whole = Vec::new();
    let r_whole = whole.decode(input, &mut out_whole);

    let mut split = ChunkedDecoder::new(1 << 20);
    let mut out_split = Vec::new();
    let r_split = split.decode(&input[..cut], &mut out_split).and_then(|a| {
        if a < cut {
            Ok(a)
        } else {
            split.decode(&input[cut..], &mut out_split).map(|b| a + b)
        }
    });
    match (r_whole, r_split) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a, b);
            assert_eq!(out_whole, out_split);
            assert_eq!(whole.is_done(), split.is_done());
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("split changed the outcome: {a:?} vs {b:?}"),
    }
});
