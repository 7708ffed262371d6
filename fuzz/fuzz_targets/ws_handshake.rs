#![no_main]
//! WebSocket upgrade validation: the invariants are in `gatelet::fuzzing::ws_handshake`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, ws_handshake};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ws_handshake(data, Depth::Target));
