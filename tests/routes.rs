//! Routing, processing order (path → method → auth), the model list, health and readiness,
//! the error envelope, authentication modes and the failure limiter.

mod util;

use std::io::Write;

use util::{Gateway, TOKEN, config, error_of, read_head, user_body};

fn get(path: &str, auth: Option<&str>) -> Vec<u8> {
    let a = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.1\r\nHost: t\r\n{a}\r\n").into_bytes()
}

fn req(method: &str, path: &str, auth: Option<&str>, body: &str) -> Vec<u8> {
    let a = auth.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("{method} {path} HTTP/1.1\r\nHost: t\r\n{a}Content-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
}

#[test]
fn chat_completions_are_disabled_by_default_even_without_credentials() {
    let gw = Gateway::with_config(&format!("{{ gateway: {{ port: 0, auth: {{ token: '{TOKEN}' }} }} }}"));
    let body = user_body("hi", "");
    for (r, what) in [
        (req("POST", "/v1/chat/completions", None, &body), "chat, no auth"),
        (req("POST", "/v1/chat/completions", Some(TOKEN), &body), "chat, auth"),
        (req("GET", "/v1/chat/completions", None, ""), "chat, wrong method"),
        (get("/v1/models", None), "models"),
        (get("/v1/models/gatelet", Some(TOKEN)), "model"),
    ] {
        let r = gw.one(&r);
        assert_eq!(r.status, 404, "{what}: {}", r.text());
        let e = error_of(&r);
        assert_eq!(e["code"], "endpoint_disabled", "{what}");
        assert!(
            e["message"].as_str().unwrap().contains("gateway.http.endpoints.chatCompletions.enabled"),
            "{what}: {e}"
        );
    }
    // Health still answers.
    assert_eq!(gw.one(&get("/health", None)).status, 200);
}

#[test]
fn wrong_method_is_405_with_allow_before_auth() {
    let gw = Gateway::start();
    let cases: &[(&str, &str, &str)] = &[
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("DELETE", "/v1/models", "GET, HEAD"),
        ("POST", "/v1/models/gatelet", "GET, HEAD"),
        ("POST", "/health", "GET, HEAD"),
        ("DELETE", "/healthz", "GET, HEAD"),
        ("POST", "/ready", "GET, HEAD"),
        ("PUT", "/readyz", "GET, HEAD"),
    ];
    for (m, path, allow) in cases {
        // No credentials at all: the method is checked first.
        let r = gw.one(&req(m, path, None, ""));
        assert_eq!(r.status, 405, "{m} {path}: {}", r.text());
        assert_eq!(r.header("allow").as_deref(), Some(*allow), "{m} {path}");
        assert_eq!(error_of(&r)["code"], "method_not_allowed", "{m} {path}");
    }
}

#[test]
fn unknown_paths_are_404_in_the_openai_envelope() {
    let gw = Gateway::start();
    for path in ["/", "/v1", "/v1/chat", "/v1/chat/completions/", "/health/x", "/v1/models/", "/nope?x=1"] {
        let r = gw.one(&get(path, Some(TOKEN)));
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"), "{path}");
        let e = error_of(&r);
        assert_eq!(e["type"], "invalid_request_error", "{path}");
        assert_eq!(e["code"], "not_found", "{path}");
    }
}

#[test]
fn health_and_ready_answer_get_and_head() {
    let gw = Gateway::start();
    for (path, want) in [
        ("/health", serde_json::json!({"ok":true,"status":"live"})),
        ("/healthz", serde_json::json!({"ok":true,"status":"live"})),
        ("/ready", serde_json::json!({"ready":true})),
        ("/readyz", serde_json::json!({"ready":true})),
    ] {
        let r = gw.one(&get(path, None));
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json(), want, "{path}");
        // HEAD: same head, no body, and the connection stays usable.
        let mut s = gw.connect();
        s.write_all(format!("HEAD {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).unwrap();
        let h = read_head(&mut s).expect("HEAD response");
        assert_eq!(h.status, 200, "HEAD {path}");
        assert_eq!(h.header("content-length"), r.header("content-length"), "HEAD {path}");
        s.write_all(&get(path, None)).unwrap();
        let again = util::read_response(&mut s).expect("GET after HEAD");
        assert_eq!(again.status, 200);
        assert_eq!(again.json(), want, "no HEAD body was sent before this response");
    }
}

#[test]
fn models_list_and_lookup() {
    let gw =
        Gateway::with_config(&config("", "agents: { list: [ { id: 'main', default: true }, { id: 'side-agent' } ] }"));
    let r = gw.one(&get("/v1/models", Some(TOKEN)));
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gatelet", "gatelet/default", "gatelet/main", "gatelet/side-agent"]);
    for m in v["data"].as_array().unwrap() {
        assert_eq!(m["object"], "model");
        assert_eq!(m["created"], 0);
        assert_eq!(m["owned_by"], "gatelet");
        assert_eq!(m.as_object().unwrap().len(), 4, "{m}");
    }
    for (raw, id) in [
        ("gatelet", "gatelet"),
        ("gatelet%2Fdefault", "gatelet/default"),
        ("gatelet%2fside-agent", "gatelet/side-agent"),
        ("gatelet/main", "gatelet/main"),
    ] {
        let r = gw.one(&get(&format!("/v1/models/{raw}"), Some(TOKEN)));
        assert_eq!(r.status, 200, "{raw}: {}", r.text());
        assert_eq!(r.json(), serde_json::json!({"id":id,"object":"model","created":0,"owned_by":"gatelet"}));
    }
    for raw in ["gpt-4o", "gatelet%2Fnobody", "main", "gatelet%2F"] {
        let r = gw.one(&get(&format!("/v1/models/{raw}"), Some(TOKEN)));
        assert_eq!(r.status, 404, "{raw}: {}", r.text());
        assert_eq!(error_of(&r)["code"], "model_not_found", "{raw}");
    }
    // Both need credentials.
    for path in ["/v1/models", "/v1/models/gatelet"] {
        let r = gw.one(&get(path, None));
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
    }
}

#[test]
fn bad_credentials_get_401_with_www_authenticate() {
    let gw = Gateway::start();
    let body = user_body("hi", "");
    let cases: &[(Option<&str>, &str)] = &[
        (None, "no header"),
        (Some("Bearer wrong"), "wrong token"),
        (Some(&format!("Basic {TOKEN}")), "wrong scheme"),
        (Some("Bearer"), "no secret"),
        (Some(&format!("Bearer {TOKEN}x")), "token with a suffix"),
    ];
    for (auth, what) in cases {
        let a = auth.map(|v| format!("Authorization: {v}\r\n")).unwrap_or_default();
        let raw =
            format!("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n{a}Content-Length: {}\r\n\r\n{body}", body.len());
        let r = gw.one(raw.as_bytes());
        assert_eq!(r.status, 401, "{what}");
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"), "{what}");
        let e = error_of(&r);
        assert_eq!(e["code"], "invalid_api_key", "{what}");
        assert_eq!(e["type"], "invalid_request_error", "{what}");
        assert!(r.header("x-request-id").is_some(), "{what}: {}", r.head);
    }
    // The scheme is case-insensitive.
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: bEaReR {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(gw.one(raw.as_bytes()).status, 200);
}

#[test]
fn auth_modes_token_password_none() {
    let chat = |t: Option<&str>| req("POST", "/v1/chat/completions", t, &user_body("hi", ""));
    let base = |auth: &str| {
        format!(
            "{{ gateway: {{ port: 0, auth: {{ {auth} }}, http: {{ endpoints: {{ chatCompletions: {{ enabled: true }} }} }} }} }}"
        )
    };
    let gw = Gateway::with_config(&base("mode: 'password', password: 'pw-1', token: 'tok-1'"));
    assert_eq!(gw.one(&chat(Some("pw-1"))).status, 200);
    assert_eq!(gw.one(&chat(Some("tok-1"))).status, 401);
    assert_eq!(gw.one(&chat(None)).status, 401);
    drop(gw);

    // Inferred: a password alone means password mode.
    let gw = Gateway::with_config(&base("password: 'pw-2'"));
    assert_eq!(gw.one(&chat(Some("pw-2"))).status, 200);
    assert_eq!(gw.one(&chat(Some("other"))).status, 401);
    drop(gw);

    let gw = Gateway::with_config(&base("mode: 'token', token: 'tok-3', password: 'pw-3'"));
    assert_eq!(gw.one(&chat(Some("tok-3"))).status, 200);
    assert_eq!(gw.one(&chat(Some("pw-3"))).status, 401);
    drop(gw);

    let gw = Gateway::with_config(&base("mode: 'none'"));
    assert_eq!(gw.one(&chat(None)).status, 200);
    assert_eq!(gw.one(&chat(Some("anything"))).status, 200);
    assert_eq!(gw.one(&get("/v1/models", None)).status, 200);
}

#[test]
fn failure_limiter_locks_out_with_429_and_retry_after() {
    let gw = Gateway::with_config(&format!(
        "{{ gateway: {{ port: 0, auth: {{ token: '{TOKEN}', rateLimit: {{ maxAttempts: 2, exemptLoopback: false, lockoutMs: 60000 }} }}, \
           http: {{ endpoints: {{ chatCompletions: {{ enabled: true }} }} }} }} }}"
    ));
    let chat = |t: &str| req("POST", "/v1/chat/completions", Some(t), &user_body("hi", ""));
    assert_eq!(gw.one(&chat(TOKEN)).status, 200);
    assert_eq!(gw.one(&chat("bad")).status, 401);
    assert_eq!(gw.one(&chat("bad")).status, 401);
    // Locked out now, even with the right token.
    for t in ["bad", TOKEN] {
        let r = gw.one(&chat(t));
        assert_eq!(r.status, 429, "{t}: {}", r.text());
        let e = error_of(&r);
        assert_eq!(e["type"], "rate_limit_error");
        assert_eq!(e["code"], "rate_limit_exceeded");
        let after: u64 = r.header("retry-after").expect("Retry-After").parse().expect("seconds");
        assert!((1..=60).contains(&after), "Retry-After {after}");
    }
    // Unauthenticated routes are not affected.
    assert_eq!(gw.one(&get("/health", None)).status, 200);
    let r = gw.one(&get("/v1/models", Some(TOKEN)));
    assert_eq!(r.status, 429);
}

#[test]
fn non_ascii_target_near_the_scheme_is_404_not_500() {
    // A multi-byte character where `http://` would end must not crash request handling.
    let gw = Gateway::start();
    let r = gw.one("GET http:/\u{e9}x HTTP/1.1\r\nHost: t\r\n\r\n".as_bytes());
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(util::error_of(&r)["code"], "not_found");
}
