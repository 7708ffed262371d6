#![no_main]
//! SSE decoder (upstream streams): the invariants are in `gatelet::fuzzing::sse_decode`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, sse_decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sse_decode(data, Depth::Target));
