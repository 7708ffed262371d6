//! Tool calling over HTTP (SPEC §5.1) with the `echo` tool mode: the exact streaming and
//! non-streaming shapes, the follow-up turn, sticky transcripts, and request validation.

mod util;

use serde_json::{Value, json};
use util::{Gateway, chat_request, chat_request_with, config};

const WEATHER: &str = r#"{"type":"function","function":{"name":"get_weather","description":"Weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}}"#;

fn tool_body(stream: bool, extra: &str) -> String {
    format!(
        r#"{{"model":"gatelet","stream":{stream},"tools":[{WEATHER}],"messages":[{{"role":"user","content":"/tool get_weather {{\"city\":\"Paris\"}}"}}]{extra}}}"#
    )
}

/// `(id, created)` of a stream, from its first record.
fn stream_ids(records: &[String]) -> (String, u64) {
    let v: Value = serde_json::from_str(&records[0]).unwrap();
    (v["id"].as_str().unwrap().to_string(), v["created"].as_u64().unwrap())
}

#[test]
fn echo_tool_call_streams_exactly_as_openai_does() {
    let gw = Gateway::start();
    let r = gw.one(&chat_request(&tool_body(true, "")));
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.text();
    let data = util::sse_data(body.as_bytes());
    let (id, created) = stream_ids(&data);
    let chunk = |delta: &str, finish: &str| {
        format!(
            r#"data: {{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":"gatelet","choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}]}}"#
        ) + "\n\n"
    };
    let call = "{\"city\":\"Paris\"}";
    let mut want = chunk(r#"{"role":"assistant","content":""}"#, "null");
    // The call id is `call_<n>`; the first delta opens the call with empty arguments.
    want += &chunk(
        r#"{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get_weather","arguments":""}}]}"#,
        "null",
    );
    // Then the arguments in pieces of at most 8 bytes.
    let mut pieces = Vec::new();
    let mut rest = call;
    while !rest.is_empty() {
        let n = rest.len().min(8);
        pieces.push(&rest[..n]);
        rest = &rest[n..];
    }
    assert_eq!(pieces, ["{\"city\":", "\"Paris\"}"]);
    for p in &pieces {
        let piece = serde_json::to_string(p).unwrap();
        want += &chunk(&format!(r#"{{"tool_calls":[{{"index":0,"function":{{"arguments":{piece}}}}}]}}"#), "null");
    }
    want += &chunk("{}", "\"tool_calls\"");
    want += "data: [DONE]\n\n";
    assert_eq!(body, want);
}

#[test]
fn echo_tool_call_non_streaming_shape() {
    let gw = Gateway::start();
    let r = gw.one(&chat_request(&tool_body(false, "")));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["choices"],
        json!([{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[
            {"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
            "logprobs":null,"finish_reason":"tool_calls"}])
    );
    // `content` is a literal null in the body, not an absent key.
    assert!(r.text().contains(r#""content":null"#), "{}", r.text());
}

#[test]
fn without_tools_a_tool_command_is_plain_text() {
    let gw = Gateway::start();
    let body = r#"{"model":"gatelet","messages":[{"role":"user","content":"/tool f {}"}]}"#;
    let v = gw.one(&chat_request(body)).json();
    assert_eq!(v["choices"][0]["message"], json!({"role":"assistant","content":"/tool f {}"}));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

const FOLLOW_UP: &str = r#"{"model":"gatelet","tools":[TOOL],"messages":[
    {"role":"user","content":"/tool get_weather {\"city\":\"Paris\"}"},
    {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
    {"role":"tool","tool_call_id":"call_1","content":"sunny, 21 C"}]}"#;

#[test]
fn the_follow_up_turn_gets_a_text_answer() {
    let gw = Gateway::start();
    let body = FOLLOW_UP.replace("TOOL", WEATHER);
    let v = gw.one(&chat_request(&body)).json();
    assert_eq!(v["choices"][0]["message"], json!({"role":"assistant","content":"tool said: sunny, 21 C"}));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

#[test]
fn sticky_sessions_store_tool_calls_and_results_as_messages() {
    let dir = util::temp_dir("tools-sticky");
    let gw = Gateway::in_dir(&config("", ""), &dir);
    let key = "x-gatelet-session-key: trip";
    let r = gw.one(&chat_request_with(&[key], &tool_body(false, "")));
    assert_eq!(r.json()["choices"][0]["finish_reason"], "tool_calls");
    // Second turn: the client sends the whole conversation back, as SDKs do.
    let r = gw.one(&chat_request_with(&[key], &FOLLOW_UP.replace("TOOL", WEATHER)));
    assert_eq!(r.json()["choices"][0]["message"]["content"], "tool said: sunny, 21 C");
    // The transcript holds each message once, in order, the call and the result as their own.
    let file = std::fs::read_dir(dir.join("agents/main/sessions"))
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        .unwrap()
        .path();
    let lines: Vec<Value> =
        std::fs::read_to_string(file).unwrap().lines().skip(1).map(|l| serde_json::from_str(l).unwrap()).collect();
    let roles: Vec<&str> = lines.iter().map(|l| l["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
    assert_eq!(lines[1]["tool"]["tool_calls"][0]["id"], "call_1");
    assert_eq!(lines[1]["content"], "", "content stays a string for every reader");
    assert_eq!(lines[1]["rawContent"], Value::Null);
    assert!(lines[1].get("rawContent").is_some());
    assert_eq!(lines[2]["tool"]["tool_call_id"], "call_1");
    assert_eq!(lines[2]["content"], "sunny, 21 C");
    assert_eq!(lines[3]["content"], "tool said: sunny, 21 C");
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_tools_are_400_with_the_param() {
    let gw = Gateway::start();
    let bad = [
        (r#""tools":[{"type":"function","function":{"name":"has space"}}]"#, "tools[0].function.name"),
        (r#""tools":[{"type":"function"}]"#, "tools[0].function"),
        (r#""tools":"get_weather""#, "tools"),
        (r#""tool_choice":"sometimes""#, "tool_choice"),
        (r#""parallel_tool_calls":1"#, "parallel_tool_calls"),
    ];
    for (extra, param) in bad {
        let body = format!(r#"{{"model":"gatelet","messages":[{{"role":"user","content":"x"}}],{extra}}}"#);
        let r = gw.one(&chat_request(&body));
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        let e = util::error_of(&r);
        assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("invalid_value"), Some(param)), "{e}");
    }
}
