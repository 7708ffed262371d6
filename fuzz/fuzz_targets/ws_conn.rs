#![no_main]
//! WebSocket connection (pings, close handshake, limits): the invariants are in
//! `gatelet::fuzzing::ws_conn`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, ws_conn};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| ws_conn(data, Depth::Target));
