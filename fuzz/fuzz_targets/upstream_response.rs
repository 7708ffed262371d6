#![no_main]
//! Upstream response head + body decoder: the invariants are in `gatelet::fuzzing::upstream_response`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, upstream_response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| upstream_response(data, Depth::Target));
