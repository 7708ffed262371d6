#![no_main]
//! Our request head + framing decision against httparse + the RFC 9112 rules: the invariants are in `gatelet::fuzzing::http_differential`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, http_differential};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| http_differential(data, Depth::Target));
