#![no_main]
//! Command backend stdout line parser: the invariants are in `gatelet::fuzzing::command_line`, shared with `tests/fuzz_seeds.rs`.
use gatelet::fuzzing::{Depth, command_line};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| command_line(data, Depth::Target));
