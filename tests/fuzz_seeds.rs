//! Replays the fuzz corpus seeds (`fuzz/seeds/<target>/`) on the stable toolchain through the
//! same invariants as the fuzz targets (`gatelet::fuzzing`, which the targets call too), at
//! [`Depth::Exhaustive`]: every split point of small seeds and byte-by-byte feeding as well as
//! the target's own split. A new seed needs no code: drop the file in `fuzz/seeds/<target>/`.

use std::fs;
use std::path::{Path, PathBuf};

use gatelet::fuzzing::{Depth, TARGETS};

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

/// Every file in `fuzz/seeds/<target>/`, sorted by name. A target without seeds is an error.
fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = seeds_dir().join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("seed directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let data = fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// Run the target's check on every seed, naming the seed when it fails.
fn replay(target: &str) {
    let (_, check) = TARGETS.iter().find(|(t, _)| *t == target).unwrap_or_else(|| panic!("no target {target}"));
    for (path, data) in seeds(target) {
        let r = std::panic::catch_unwind(|| check(&data, Depth::Exhaustive));
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            panic!("{target} seed {} failed: {msg}", path.display());
        }
    }
}

#[test]
fn every_target_has_seeds_a_fuzz_binary_and_a_test() {
    let manifest = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml")).unwrap();
    let this = fs::read_to_string(file!()).unwrap();
    for (t, _) in TARGETS {
        assert!(manifest.contains(&format!("name = \"{t}\"")), "fuzz/Cargo.toml has no bin {t}");
        assert!(this.contains(&format!("fn {t}_seeds()")), "no seed test for {t}");
        assert!(!seeds(t).is_empty());
    }
    for d in fs::read_dir(seeds_dir()).unwrap() {
        let name = d.unwrap().file_name().into_string().unwrap();
        assert!(TARGETS.iter().any(|(t, _)| *t == name), "seeds/{name} belongs to no target");
    }
}

#[test]
fn http_head_seeds() {
    replay("http_head");
}

#[test]
fn http_differential_seeds() {
    replay("http_differential");
}

#[test]
fn chunked_seeds() {
    replay("chunked");
}

#[test]
fn chat_request_seeds() {
    replay("chat_request");
}

#[test]
fn sse_decode_seeds() {
    replay("sse_decode");
}

#[test]
fn ws_frame_seeds() {
    replay("ws_frame");
}

#[test]
fn ws_conn_seeds() {
    replay("ws_conn");
}

#[test]
fn ws_handshake_seeds() {
    replay("ws_handshake");
}

#[test]
fn upstream_response_seeds() {
    replay("upstream_response");
}

#[test]
fn rpc_request_seeds() {
    replay("rpc_request");
}

#[test]
fn command_line_seeds() {
    replay("command_line");
}

#[test]
fn tool_calls_seeds() {
    use gatelet::fuzzing::tool_calls_view;
    replay("tool_calls");
    // The hand-written seeds decode to what they were written to hold.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/tool_calls");
    let decode = |name: &str| gatelet::agent::backend::openai::decode_body(&[&fs::read(dir.join(name)).unwrap()[1..]]);
    let d = decode("interleaved").unwrap();
    let calls: Vec<(&str, &str)> = d.calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect();
    assert_eq!(calls, [("get_weather", r#"{"city":"Paris"}"#), ("get_time", r#"{"tz":"CET"}"#)]);
    assert_eq!(d.finish.map(|f| f.as_str()), Some("tool_calls"));
    assert_eq!(tool_calls_view(&decode("crlf_split")), tool_calls_view(&Ok(d)));
    assert!(decode("no_name").unwrap_err().contains("without a function name"));
    assert!(decode("bad_index").unwrap_err().contains("`index`"));
    assert!(decode("not_array").unwrap_err().contains("must be an array"));
    assert!(decode("after_done").unwrap().done);
}
