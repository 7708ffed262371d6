#![no_main]
//! Request head + framing decision: never panics, and a parsed head never claims more bytes than
//! it was given.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((_, n))) = gatelet::http::head::parse(data) {
        assert!(n <= data.len());
    }
});
