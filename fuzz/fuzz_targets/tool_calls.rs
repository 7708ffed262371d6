#![no_main]
//! Tool-call decoding of an `openai` upstream's event stream: never panics; the first byte picks
//! a split point and one feed and two feeds give the same text, calls, finish and error; every
//! decoded call has an id and a non-empty name, and the calls respect the per-reply bounds.
use gatelet::agent::backend::openai::{Decoded, decode_body};
use gatelet::agent::tools::{MAX_ARGUMENT_BYTES, MAX_CALLS};
use libfuzzer_sys::fuzz_target;

/// What must not depend on the split (made-up ids differ from run to run).
fn comparable(r: &Result<Decoded, String>) -> Result<(String, Vec<(String, String)>, Option<&'static str>, bool), String> {
    r.as_ref().map_err(Clone::clone).map(|d| {
        let calls = d.calls.iter().map(|c| (c.name.clone(), c.arguments.clone())).collect();
        (d.text.clone(), calls, d.finish.map(|f| f.as_str()), d.done)
    })
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let input = &data[1..];
    let cut = (data[0] as usize).min(input.len());
    let whole = decode_body(&[input]);
    if let Ok(d) = &whole {
        assert!(d.calls.len() <= MAX_CALLS);
        assert!(d.calls.iter().map(|c| c.arguments.len()).sum::<usize>() <= MAX_ARGUMENT_BYTES);
        for c in &d.calls {
            assert!(!c.id.is_empty() && !c.name.is_empty(), "{c:?}");
        }
    }
    let split = decode_body(&[&input[..cut], &input[cut..]]);
    assert_eq!(comparable(&whole), comparable(&split));
});
