//! First ring of end-to-end checks against the real binary.

mod util;

use util::{Gateway, chat_request};

#[test]
fn health_and_a_chat_turn() {
    let gw = Gateway::start();
    let r = gw.one(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "live");
    let r = gw.one(&chat_request(r#"{"model":"gatelet","messages":[{"role":"user","content":"hi there"}]}"#));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "hi there");
}
