#![no_main]
//! Chat request parsing: never panics; errors are always 4xx in the OpenAI envelope.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match gatelet::openai::chat::parse(data) {
        Ok(r) => assert!(!r.messages.is_empty() || !r.system.is_empty()),
        Err(e) => {
            assert!((400..500).contains(&e.status));
            let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
            assert!(v["error"]["message"].is_string());
        }
    }
});
