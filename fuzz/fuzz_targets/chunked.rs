#![no_main]
//! Chunked request body decoder: the invariants are in `gatelet::fuzzing::chunked`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, chunked};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chunked(data, Depth::Target));
