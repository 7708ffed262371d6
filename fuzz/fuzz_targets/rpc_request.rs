#![no_main]
//! Gateway protocol (WebSocket) request parser: the invariants are in `gatelet::fuzzing::rpc_request`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, rpc_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rpc_request(data, Depth::Target));
