#![no_main]
//! WebSocket frame decoder: the invariants are in `gatelet::fuzzing::ws_frame`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, ws_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ws_frame(data, Depth::Target));
