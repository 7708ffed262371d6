//! Tool calling through the `openai` backend against a scripted upstream: the upstream's streamed
//! and whole tool calls reach the client exactly as OpenAI shapes them, the request fields reach
//! the upstream verbatim (and only those sent), a sticky session's tool round trip sends the
//! history upstream once and in order, and malformed tool calls are clean `backend_error`s.

mod util;

use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use util::upstream::{self as up, Step, Upstream};
use util::{Gateway, chat_request, chat_request_with, config};

fn gateway(base_url: &str) -> Gateway {
    Gateway::with_config(&config(
        "",
        &format!(
            "agents: {{ list: [{{ id: 'up', default: true, \
               backend: {{ kind: 'openai', baseUrl: '{base_url}', model: 'tiny' }} }}] }}"
        ),
    ))
}

/// An upstream record with `delta` for choice 0.
fn delta(d: Value) -> String {
    let v = json!({"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,"model":"m",
        "choices":[{"index":0,"delta":d,"finish_reason":null}]});
    format!("data: {v}\n\n")
}

const TOOLS: &str = r#"[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}},
    {"type":"function","function":{"name":"get_time"}}]"#;

/// Two parallel calls, interleaved, their arguments split mid-token, over several HTTP chunks
/// that cut records in two.
fn two_calls_stream() -> Vec<Step> {
    let records = [
        up::role(),
        delta(
            json!({"tool_calls":[{"index":0,"id":"call_w","type":"function","function":{"name":"get_weather","arguments":""}}]}),
        ),
        delta(json!({"tool_calls":[{"index":0,"function":{"arguments":"{\"ci"}}]})),
        delta(
            json!({"tool_calls":[{"index":1,"id":"call_t","type":"function","function":{"name":"get_time","arguments":"{\"tz"}}]}),
        ),
        delta(json!({"tool_calls":[{"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]})),
        delta(json!({"tool_calls":[{"index":1,"function":{"arguments":"\":\"CET\"}"}}]})),
        up::finish("tool_calls"),
        up::usage(11, 7),
        up::DONE.to_string(),
    ]
    .concat();
    let bytes = records.as_bytes();
    let mut steps = vec![up::sse_head()];
    // Cut the body every 37 bytes: records and JSON strings split across chunks.
    steps.extend(bytes.chunks(37).map(up::chunk));
    steps.push(up::end_chunks());
    steps
}

#[test]
fn streamed_tool_calls_reach_the_client_as_openai_streams_them() {
    let upstream = Upstream::start(|_| two_calls_stream());
    let gw = gateway(&upstream.base_url());
    let body = format!(
        r#"{{"model":"gatelet","stream":true,"tools":{TOOLS},"messages":[{{"role":"user","content":"weather and time?"}}]}}"#
    );
    let r = gw.one(&chat_request(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let data = util::sse_data(text.as_bytes());
    let v: Value = serde_json::from_str(&data[0]).unwrap();
    let (id, created) = (v["id"].as_str().unwrap().to_string(), v["created"].as_u64().unwrap());
    let chunk = |delta: &str, finish: &str| {
        format!(
            r#"data: {{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":"gatelet","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}"#
        ) + "\n\n"
    };
    let args = |i: u32, a: &str| {
        let a = serde_json::to_string(a).unwrap();
        chunk(&format!(r#"{{"tool_calls":[{{"index":{i},"function":{{"arguments":{a}}}}}]}}"#), "null")
    };
    let want = [
        chunk(r#"{"role":"assistant","content":""}"#, "null"),
        chunk(
            r#"{"tool_calls":[{"index":0,"id":"call_w","type":"function","function":{"name":"get_weather","arguments":""}}]}"#,
            "null",
        ),
        args(0, "{\"ci"),
        chunk(
            r#"{"tool_calls":[{"index":1,"id":"call_t","type":"function","function":{"name":"get_time","arguments":""}}]}"#,
            "null",
        ),
        args(1, "{\"tz"),
        args(0, "ty\":\"Paris\"}"),
        args(1, "\":\"CET\"}"),
        chunk("{}", "\"tool_calls\""),
        "data: [DONE]\n\n".to_string(),
    ]
    .concat();
    assert_eq!(text, want);
}

#[test]
fn non_streaming_tool_calls_are_assembled() {
    let upstream = Upstream::start(|_| two_calls_stream());
    let gw = gateway(&upstream.base_url());
    let body = format!(
        r#"{{"model":"gatelet","tools":{TOOLS},"messages":[{{"role":"user","content":"weather and time?"}}]}}"#
    );
    let r = gw.one(&chat_request(&body));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["choices"][0],
        json!({"index":0,"logprobs":null,"finish_reason":"tool_calls","message":{"role":"assistant","content":null,"tool_calls":[
            {"id":"call_w","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},
            {"id":"call_t","type":"function","function":{"name":"get_time","arguments":"{\"tz\":\"CET\"}"}}]}})
    );
    assert_eq!(v["usage"]["prompt_tokens"], 11);
}

#[test]
fn an_upstream_that_answers_whole_gives_its_tool_calls() {
    let upstream = Upstream::start(|_| {
        let body = json!({"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,
            "message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
            "function":{"name":"get_weather","arguments":"{\"city\":\"Oslo\"}"}}]},"finish_reason":"tool_calls"}],
            "usage":{"prompt_tokens":3,"completion_tokens":4}})
        .to_string();
        vec![Step::Write(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )]
    });
    let gw = gateway(&upstream.base_url());
    let body = format!(r#"{{"model":"gatelet","tools":{TOOLS},"messages":[{{"role":"user","content":"w?"}}]}}"#);
    let v = gw.one(&chat_request(&body)).json();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
}

#[test]
fn malformed_tool_calls_are_backend_errors() {
    // A call whose first piece names no function.
    let bad = delta(json!({"tool_calls":[{"index":0,"id":"c","function":{"arguments":"{}"}}]}));
    let b2 = bad.clone();
    let upstream = Upstream::start(move |_| up::stream_reply(&[up::role(), b2.clone(), up::DONE.to_string()]));
    let gw = gateway(&upstream.base_url());
    let body = format!(r#"{{"model":"gatelet","tools":{TOOLS},"messages":[{{"role":"user","content":"w?"}}]}}"#);
    let r = gw.one(&chat_request(&body));
    assert_eq!(r.status, 502, "{}", r.text());
    let e = util::error_of(&r);
    assert_eq!(e["code"], "backend_error");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("malformed tool call") && msg.contains("without a function name"), "{msg}");

    // Mid-stream (after text went out): one error record, no [DONE].
    let bad_index = delta(json!({"tool_calls":[{"index":"zero","function":{"name":"f"}}]}));
    let upstream = Upstream::start(move |_| {
        up::stream_reply(&[up::role(), up::content("Let me look."), bad_index.clone(), up::DONE.to_string()])
    });
    let gw = gateway(&upstream.base_url());
    let body =
        format!(r#"{{"model":"gatelet","stream":true,"tools":{TOOLS},"messages":[{{"role":"user","content":"w?"}}]}}"#);
    let r = gw.one(&chat_request(&body));
    assert_eq!(r.status, 200);
    let data = util::sse_data(r.text().as_bytes());
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "backend_error", "{data:?}");
    assert!(last["error"]["message"].as_str().unwrap().contains("`index` must be a non-negative integer"));
    assert!(!r.text().contains("[DONE]"));
}

#[test]
fn request_fields_reach_the_upstream_verbatim_and_only_when_sent() {
    let upstream = Upstream::start(|_| up::stream_reply(&[up::content("ok"), up::finish("stop"), up::DONE.into()]));
    let gw = gateway(&upstream.base_url());
    let fields = json!({
        "tools": serde_json::from_str::<Value>(TOOLS).unwrap(),
        "tool_choice": {"type":"function","function":{"name":"get_weather"}},
        "parallel_tool_calls": false,
        "response_format": {"type":"json_schema","json_schema":{"name":"w","schema":{"type":"object"},"strict":true}},
        "seed": 42,
        "presence_penalty": 0.25,
        "frequency_penalty": -0.5,
        "logit_bias": {"1234": -100, "99": 5},
        "logprobs": true,
        "top_logprobs": 3,
        "reasoning_effort": "minimal",
        "metadata": {"trace": "abc"},
    });
    let image = json!([{"type":"text","text":"what is in "},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo=","detail":"low"}},
        {"type":"input_audio","input_audio":{"data":"UklGRg==","format":"wav"}},{"type":"file","file":{"file_id":"file-1"}}]);
    let mut body = fields.clone();
    body["model"] = json!("gatelet");
    body["messages"] = json!([{"role":"user","content":image}]);
    // Fields gatelet does not pass on.
    body["top_k"] = json!(5);
    body["store"] = json!(true);
    body["seed_extra"] = json!(1);
    let r = gw.one(&chat_request(&body.to_string()));
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = upstream.requests()[0].json();
    for (k, v) in fields.as_object().unwrap() {
        assert_eq!(&sent[k], v, "{k}");
    }
    assert_eq!(sent["messages"][0], json!({"role":"user","content":image}));
    let mut keys: Vec<&str> = sent.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    let mut want: Vec<&str> = fields.as_object().unwrap().keys().map(String::as_str).collect();
    want.extend(["messages", "model", "stream", "stream_options"]);
    want.sort();
    assert_eq!(keys, want);

    // Nothing of the above when the client sent none of it.
    let r = gw.one(&chat_request(r#"{"model":"gatelet","messages":[{"role":"user","content":"hi"}]}"#));
    assert_eq!(r.status, 200);
    let sent = upstream.requests()[1].json();
    let mut keys: Vec<&str> = sent.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["messages", "model", "stream", "stream_options"]);
}

#[test]
fn a_sticky_tool_round_trip_sends_the_history_once_in_order() {
    // First request: the upstream calls a tool; second: it answers.
    let n = Arc::new(Mutex::new(0));
    let upstream = Upstream::start(move |_| {
        let mut n = n.lock().unwrap();
        *n += 1;
        if *n == 1 {
            up::stream_reply(&[
                up::role(),
                delta(
                    json!({"tool_calls":[{"index":0,"id":"call_w","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]}),
                ),
                up::finish("tool_calls"),
                up::DONE.into(),
            ])
        } else {
            up::stream_reply(&[up::content("Sunny in Paris."), up::finish("stop"), up::DONE.into()])
        }
    });
    let gw = gateway(&upstream.base_url());
    let key = "x-gatelet-session-key: trip";
    let user = json!({"role":"user","content":"weather in Paris?"});
    let first = json!({"model":"gatelet","tools":serde_json::from_str::<Value>(TOOLS).unwrap(),"messages":[user]});
    let r = gw.one(&chat_request_with(&[key], &first.to_string()));
    let msg = r.json()["choices"][0]["message"].clone();
    assert_eq!(msg["content"], Value::Null);
    // The client replays everything, as SDKs do, with the tool result.
    let result = json!({"role":"tool","tool_call_id":"call_w","content":"21 C, sunny"});
    let second = json!({"model":"gatelet","tools":serde_json::from_str::<Value>(TOOLS).unwrap(),
        "messages":[user, msg, result]});
    let r = gw.one(&chat_request_with(&[key], &second.to_string()));
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Sunny in Paris.");
    let sent = upstream.requests()[1].json();
    assert_eq!(
        sent["messages"],
        json!([
            {"role":"user","content":"weather in Paris?"},
            {"role":"assistant","content":null,"tool_calls":[{"id":"call_w","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
            {"role":"tool","content":"21 C, sunny","tool_call_id":"call_w"},
        ])
    );
}

#[test]
fn an_ephemeral_follow_up_keeps_content_null_and_tool_fields() {
    let upstream = Upstream::start(|_| up::stream_reply(&[up::content("ok"), up::finish("stop"), up::DONE.into()]));
    let gw = gateway(&upstream.base_url());
    let history = json!([
        {"role":"user","content":"weather?"},
        {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"call_1","content":"sunny"},
        {"role":"assistant","content":"","tool_calls":[{"id":"call_2","type":"function","function":{"name":"get_time","arguments":"{}"}}]},
        {"role":"tool","tool_call_id":"call_2","content":[{"type":"text","text":"noon"}]},
    ]);
    let body = json!({"model":"gatelet","messages":history});
    assert_eq!(gw.one(&chat_request(&body.to_string())).status, 200);
    // Verbatim: `null` stays null, "" stays "", parts stay parts.
    assert_eq!(upstream.requests()[0].json()["messages"], history);
}

#[test]
fn tool_calls_finish_without_calls_is_a_plain_stop() {
    let upstream =
        Upstream::start(|_| up::stream_reply(&[up::content("done"), up::finish("tool_calls"), up::DONE.into()]));
    let gw = gateway(&upstream.base_url());
    let v = gw.one(&chat_request(r#"{"model":"gatelet","messages":[{"role":"user","content":"x"}]}"#)).json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["message"], json!({"role":"assistant","content":"done"}));
}
