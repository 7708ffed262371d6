//! Chat completions without streaming: response shape, agent selection, session keys and
//! history, run serialisation, run errors, overload, timeouts and cancellation on disconnect.

mod util;

use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use util::{
    FAILING_AGENTS, Gateway, Resp, chat_request, chat_request_with, config, error_of, read_response, user_body,
};

fn two_agents() -> Gateway {
    Gateway::with_config(&config(
        "",
        "agents: { list: [ { id: 'main', default: true }, { id: 'other', systemPrompt: 'be kind' } ] }",
    ))
}

fn content(r: &Resp) -> String {
    r.json()["choices"][0]["message"]["content"].as_str().unwrap_or_else(|| panic!("{}", r.text())).to_string()
}

fn session_of(r: &Resp) -> String {
    r.header("x-gatelet-session-key").unwrap_or_else(|| panic!("no session key: {}", r.head))
}

fn prompt_tokens(r: &Resp) -> u64 {
    r.json()["usage"]["prompt_tokens"].as_u64().unwrap_or_else(|| panic!("{}", r.text()))
}

#[test]
fn non_streaming_response_shape() {
    let gw = Gateway::start();
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let r = gw.one(&chat_request(
        r#"{"model":"gatelet","messages":[{"role":"system","content":"sys words here"},{"role":"user","content":"hello  big world"}],"temperature":0.2,"foo":{"bar":1}}"#,
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
    let v = r.json();
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && id.len() > 12, "{id}");
    assert_eq!(v["object"], "chat.completion");
    let created = v["created"].as_u64().expect("created is an integer");
    assert!(created >= before && created <= before + 60, "{created}");
    assert_eq!(v["model"], "gatelet");
    assert_eq!(
        v["choices"],
        json!([{"index":0,"message":{"role":"assistant","content":"hello  big world"},"logprobs":null,"finish_reason":"stop"}])
    );
    // The system prompt counts toward the context: 3 + 3 words.
    assert_eq!(v["usage"], json!({"prompt_tokens":6,"completion_tokens":3,"total_tokens":9}));
    let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["choices", "created", "id", "model", "object", "usage"]);
    assert!(r.header("x-request-id").is_some(), "{}", r.head);
    assert!(session_of(&r).starts_with("agent:main:openai:"), "{}", r.head);
}

#[test]
fn max_tokens_cuts_the_reply_with_finish_length() {
    let gw = Gateway::start();
    let r = gw.one(&chat_request(&user_body("one two three four", r#""max_tokens":2"#)));
    assert_eq!(content(&r), "one two");
    assert_eq!(r.json()["choices"][0]["finish_reason"], "length");
    assert_eq!(r.json()["usage"]["completion_tokens"], 2);
    let r = gw.one(&chat_request(&user_body("one two three four", r#""max_completion_tokens":3,"max_tokens":1"#)));
    assert_eq!(content(&r), "one two three");
    // Content as an array of parts, null content and the developer role are accepted.
    let r = gw.one(&chat_request(
        r#"{"messages":[{"role":"developer","content":"d"},{"role":"assistant","content":null},{"role":"user","content":[{"type":"text","text":"part one"},{"type":"image_url","image_url":{"url":"x"}},{"type":"input_text","text":" two"}]}]}"#,
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(content(&r), "part one two");
}

#[test]
fn invalid_requests_are_400_with_param() {
    let gw = Gateway::start();
    let cases: &[(&str, &str, Value)] = &[
        ("{not json", "invalid_json", Value::Null),
        (r#"{"model":"gatelet"}"#, "missing_messages", json!("messages")),
        (r#"{"messages":[]}"#, "missing_messages", json!("messages")),
        (r#"{"messages":[{"role":"robot","content":"x"}]}"#, "invalid_value", json!("messages[0].role")),
        (r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#, "invalid_value", json!("stream")),
    ];
    for (body, code, param) in cases {
        let r = gw.one(&chat_request(body));
        assert_eq!(r.status, 400, "{body}");
        let e = error_of(&r);
        assert_eq!(e["code"], *code, "{body}");
        assert_eq!(e["param"], *param, "{body}");
        assert_eq!(e["type"], "invalid_request_error");
        assert!(r.header("x-request-id").is_some(), "{body}: {}", r.head);
    }
}

#[test]
fn agent_selection_header_then_model_then_default() {
    let gw = two_agents();
    let msg = r#""messages":[{"role":"user","content":"hi"}]"#;
    // (agent header, model) → expected agent, or None for 404 model_not_found.
    let cases: &[(Option<&str>, Option<&str>, Option<&str>)] = &[
        (None, None, Some("main")),
        (None, Some("gatelet"), Some("main")),
        (None, Some("GATELET/Default"), Some("main")),
        (None, Some("gatelet/other"), Some("other")),
        (None, Some("gatelet:other"), Some("other")),
        (None, Some("agent:other"), Some("other")),
        (None, Some("other"), Some("other")),
        (None, Some("OTHER"), Some("other")),
        (None, Some("Gatelet/Main"), Some("main")),
        (None, Some("gpt-4o"), None),
        (None, Some("gatelet/nobody"), None),
        (None, Some("agent:nobody"), None),
        (Some("other"), Some("gpt-4o"), Some("other")),
        (Some("Other"), Some("gatelet/main"), Some("other")),
        (Some("main"), None, Some("main")),
        (Some("nobody"), Some("gatelet"), None),
    ];
    for (header, model, want) in cases {
        let m = model.map(|m| format!(r#""model":"{m}","#)).unwrap_or_default();
        let body = format!("{{{m}{msg}}}");
        let h = header.map(|h| format!("x-gatelet-agent-id: {h}"));
        let hs: Vec<&str> = h.iter().map(String::as_str).collect();
        let r = gw.one(&chat_request_with(&hs, &body));
        let what = format!("header {header:?} model {model:?}");
        match want {
            Some(agent) => {
                assert_eq!(r.status, 200, "{what}: {}", r.text());
                assert!(session_of(&r).starts_with(&format!("agent:{agent}:openai:")), "{what}: {}", r.head);
                // The model is echoed as sent (or the agent target when absent).
                let echoed = model.map(str::to_string).unwrap_or_else(|| format!("gatelet/{agent}"));
                assert_eq!(r.json()["model"], echoed, "{what}");
            }
            None => {
                assert_eq!(r.status, 404, "{what}: {}", r.text());
                assert_eq!(error_of(&r)["code"], "model_not_found", "{what}");
            }
        }
    }
    // The message for an unknown model lists the accepted forms.
    let r = gw.one(&chat_request(&format!(r#"{{"model":"gpt-4o",{msg}}}"#)));
    let m = error_of(&r)["message"].as_str().unwrap().to_string();
    assert!(m.contains("gatelet/<agentId>") && m.contains("agent:<agentId>"), "{m}");
}

#[test]
fn session_key_header_is_prefixed_and_validated() {
    let gw = two_agents();
    let cases: &[(&str, &str)] = &[
        ("abc", "agent:main:abc"),
        ("agent:main:abc", "agent:main:abc"),
        ("agent:other:abc", "agent:main:agent:other:abc"),
        ("with spaces and :colons:", "agent:main:with spaces and :colons:"),
    ];
    for (key, want) in cases {
        let r = gw.one(&chat_request_with(&[&format!("x-gatelet-session-key: {key}")], &user_body("hi", "")));
        assert_eq!(r.status, 200, "{key}: {}", r.text());
        assert_eq!(session_of(&r), *want);
    }
    let r = gw.one(&chat_request_with(
        &["x-gatelet-session-key: k1", "x-gatelet-agent-id: other"],
        &user_body("hi", r#""user":"ignored-when-header""#),
    ));
    assert_eq!(session_of(&r), "agent:other:k1");
    let long = "k".repeat(257);
    let ok = "k".repeat(256);
    assert_eq!(
        gw.one(&chat_request_with(&[&format!("x-gatelet-session-key: {ok}")], &user_body("hi", ""))).status,
        200
    );
    for bad in [long.as_str(), "tab\there", "caf\u{e9}"] {
        let r = gw.one(&chat_request_with(&[&format!("x-gatelet-session-key: {bad}")], &user_body("hi", "")));
        assert_eq!(r.status, 400, "{bad:?}: {}", r.text());
        let e = error_of(&r);
        assert_eq!(e["code"], "invalid_value");
        assert_eq!(e["param"], "x-gatelet-session-key");
    }
    // `user` gives a stable key; nothing gives a fresh one per request.
    let a = gw.one(&chat_request(&user_body("hi", r#""user":"bob""#)));
    let b = gw.one(&chat_request(&user_body("hi", r#""user":"bob""#)));
    assert_eq!(session_of(&a), "agent:main:openai-user:bob");
    assert_eq!(session_of(&b), "agent:main:openai-user:bob");
    let c = gw.one(&chat_request(&user_body("hi", "")));
    let d = gw.one(&chat_request(&user_body("hi", r#""user":"""#)));
    assert!(session_of(&c).starts_with("agent:main:openai:"));
    assert!(session_of(&d).starts_with("agent:main:openai:"));
    assert_ne!(session_of(&c), session_of(&d));
}

#[test]
fn sticky_sessions_keep_history_and_ephemeral_ones_do_not() {
    let gw = two_agents();
    // Sticky by `user`: each turn sees the stored transcript plus the new turn.
    let t1 = gw.one(&chat_request(&user_body("one two", r#""user":"alice""#)));
    assert_eq!(prompt_tokens(&t1), 2);
    let t2 = gw.one(&chat_request(&user_body("three", r#""user":"alice""#)));
    // user "one two" + assistant "one two" + user "three".
    assert_eq!(prompt_tokens(&t2), 5);
    assert_eq!(content(&t2), "three");
    // A client that resends the whole conversation does not duplicate history: only the
    // messages after its last assistant message are new.
    let resend = r#"{"user":"alice","messages":[{"role":"user","content":"one two"},{"role":"assistant","content":"one two"},{"role":"user","content":"three"},{"role":"assistant","content":"three"},{"role":"user","content":"four five"}]}"#;
    let t3 = gw.one(&chat_request(resend));
    assert_eq!(prompt_tokens(&t3), 5 + 1 + 2);
    assert_eq!(content(&t3), "four five");

    // The same user on the other agent is another session (with its system prompt: 2 words).
    let o1 = gw.one(&chat_request(&user_body("one two", r#""user":"alice","model":"gatelet/other""#)));
    assert_eq!(session_of(&o1), "agent:other:openai-user:alice");
    assert_eq!(prompt_tokens(&o1), 2 + 2);
    let o2 = gw.one(&chat_request(&user_body("x", r#""user":"alice","model":"gatelet/other""#)));
    assert_eq!(prompt_tokens(&o2), 2 + 2 + 2 + 1);

    // Sticky by header.
    let h = |text: &str| gw.one(&chat_request_with(&["x-gatelet-session-key: conv-1"], &user_body(text, "")));
    assert_eq!(prompt_tokens(&h("a b c")), 3);
    assert_eq!(prompt_tokens(&h("d")), 3 + 3 + 1);

    // Ephemeral: no growth.
    for _ in 0..3 {
        let e = gw.one(&chat_request(&user_body("one two", "")));
        assert_eq!(prompt_tokens(&e), 2);
    }
}

#[test]
fn runs_on_one_session_are_serialised() {
    let gw = Gateway::with_config(&config(
        // Enough workers that three parallel runs from one address stay within maxRunsPerIp.
        "workers: 8",
        "agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 300 } } ] }",
    ));
    let key = "x-gatelet-session-key: serial";
    let first = chat_request_with(&[key], &user_body("alpha beta gamma", ""));
    let second = chat_request_with(&[key], &user_body("delta", ""));
    let mut a = gw.connect();
    let mut b = gw.connect();
    a.write_all(&first).unwrap();
    // Well inside the first run (~600 ms), so the arrival order is certain.
    std::thread::sleep(Duration::from_millis(250));
    b.write_all(&second).unwrap();
    let ra = read_response(&mut a).unwrap();
    let rb = read_response(&mut b).unwrap();
    assert_eq!(content(&ra), "alpha beta gamma");
    assert_eq!(prompt_tokens(&ra), 3);
    // The second run started after the first finished: its context holds the first reply.
    assert_eq!(content(&rb), "delta");
    assert_eq!(prompt_tokens(&rb), 3 + 3 + 1, "{}", rb.text());

    // Different sessions run side by side.
    let t0 = Instant::now();
    let mut conns: Vec<_> = (0..3)
        .map(|i| {
            let mut s = gw.connect();
            s.write_all(&chat_request_with(&[&format!("x-gatelet-session-key: par-{i}")], &user_body("a b c d", "")))
                .unwrap();
            s
        })
        .collect();
    for s in &mut conns {
        assert_eq!(read_response(s).unwrap().status, 200);
    }
    // Three runs of ~0.9 s each in parallel, not ~2.7 s in sequence.
    assert!(t0.elapsed() < Duration::from_millis(2400), "{:?}", t0.elapsed());
}

#[test]
fn failing_backends_give_502_before_anything_is_sent() {
    let gw = Gateway::with_config(&config("", FAILING_AGENTS));
    for model in ["gatelet/cmd", "gatelet/up"] {
        let r = gw.one(&chat_request(&user_body("hi", &format!(r#""model":"{model}","user":"u""#))));
        assert_eq!(r.status, 502, "{model}: {}", r.text());
        let e = error_of(&r);
        assert_eq!(e["type"], "server_error", "{model}");
        assert_eq!(e["code"], "backend_error", "{model}");
        assert!(r.header("x-request-id").is_some(), "{model}: {}", r.head);
        assert!(session_of(&r).ends_with(":openai-user:u"), "{model}");
    }
}

#[test]
fn slow_run_past_timeout_is_504() {
    let gw = Gateway::with_config(&config(
        "",
        "agents: { list: [ { id: 'main', timeoutSeconds: 1, backend: { kind: 'echo', tokenDelayMs: 400 } } ] }",
    ));
    let t0 = Instant::now();
    let r = gw.one(&chat_request(&user_body("a b c d e f g h i j", "")));
    assert_eq!(r.status, 504, "{}", r.text());
    let e = error_of(&r);
    assert_eq!(e["code"], "agent_timeout");
    assert_eq!(e["type"], "server_error");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(session_of(&r).starts_with("agent:main:"));
    // A fast reply still fits.
    assert_eq!(gw.one(&chat_request(&user_body("a b", ""))).status, 200);
}

#[test]
fn full_queue_is_503_overloaded_with_retry_after() {
    let gw = Gateway::with_config(&config(
        "workers: 1, maxQueuedRuns: 0",
        "agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 500 } } ] }",
    ));
    // A streaming run shows by its first chunk that it holds the only worker.
    let mut busy = gw.connect();
    busy.write_all(&chat_request(&user_body("w1 w2 w3 w4 w5 w6", r#""stream":true"#))).unwrap();
    let head = util::read_head(&mut busy).expect("stream started");
    assert_eq!(head.status, 200);
    let r = gw.one(&chat_request(&user_body("hi", "")));
    assert_eq!(r.status, 503, "{}", r.text());
    let e = error_of(&r);
    assert_eq!(e["code"], "overloaded");
    assert_eq!(e["type"], "server_error");
    let after: u64 = r.header("retry-after").expect("Retry-After").parse().unwrap();
    assert!(after >= 1);
    assert!(r.header("x-request-id").is_some());
    // Once the run is over the worker takes new runs again.
    let _ = util::read_to_close_or(&mut busy, b"data: [DONE]\n\n", Duration::from_secs(10));
    let t0 = Instant::now();
    loop {
        let r = gw.one(&chat_request(&user_body("hi", "")));
        if r.status == 200 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "still {}", r.status);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Drop the client mid-run: the only worker must be free again within about a second.
fn disconnect_frees_the_worker(stream: bool) {
    // No per-address limit: the next request from this address queues behind the cancelled run.
    let gw = Gateway::with_config(&config(
        "workers: 1, maxRunsPerIp: 0",
        "agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 5000 } } ] }",
    ));
    let words: Vec<String> = (0..30).map(|i| format!("w{i}")).collect();
    let extra = format!(r#""user":"leaver","stream":{stream}"#);
    let mut s = gw.connect();
    s.write_all(&chat_request(&user_body(&words.join(" "), &extra))).unwrap();
    if stream {
        let h = util::read_head(&mut s).expect("stream head");
        assert_eq!(h.status, 200);
    }
    // The first word goes out at once, the next after 5 s: drop the client in between.
    std::thread::sleep(Duration::from_millis(700));
    drop(s);
    // One word needs no delay; served as soon as the worker is back.
    let t0 = Instant::now();
    let r = gw.one(&chat_request(&user_body("next", "")));
    let took = t0.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(took < Duration::from_secs(3), "the cancelled run held the worker for {took:?}");
    // The partial reply is in the sticky session's transcript, marked aborted.
    let r = gw.one(&chat_request(&user_body("again", r#""user":"leaver""#)));
    let p = prompt_tokens(&r);
    // 30 words of request + a partial reply (1..29 words) + 1.
    assert!(p > 31 && p < 61, "prompt_tokens {p}");
    let dir = gw.dir.join("agents/main/sessions");
    let mut aborted = 0;
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "jsonl") {
            let text = std::fs::read_to_string(e.path()).unwrap();
            for line in text.lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                if v.to_string().contains("\"aborted\":true") {
                    aborted += 1;
                    let c = v.to_string();
                    assert!(c.contains("w0") && !c.contains("w29"), "partial reply: {c}");
                }
            }
        }
    }
    assert_eq!(aborted, 1, "one aborted reply in {dir:?}");
}

#[test]
fn client_disconnect_cancels_a_non_streaming_run() {
    disconnect_frees_the_worker(false);
}

#[test]
fn client_disconnect_cancels_a_streaming_run() {
    disconnect_frees_the_worker(true);
}
