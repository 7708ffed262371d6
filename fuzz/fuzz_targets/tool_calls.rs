#![no_main]
//! Tool-call decoding of an `openai` upstream's event stream: the invariants are in
//! `gatelet::fuzzing::tool_calls`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, tool_calls};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tool_calls(data, Depth::Target));
