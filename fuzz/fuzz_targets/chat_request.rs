#![no_main]
//! Chat completion request parser: the invariants are in `gatelet::fuzzing::chat_request`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, chat_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chat_request(data, Depth::Target));
