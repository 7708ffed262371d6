#![no_main]
//! Request head + framing decision: the invariants are in `gatelet::fuzzing::http_head`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, http_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| http_head(data, Depth::Target));
