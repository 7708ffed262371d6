//! The command line: `gatelet agent`, `gatelet config check`, exit codes, help and version.

mod util;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use util::temp_dir;

fn gatelet(dir: &Path, args: &[&str]) -> Output {
    util::run_cli(dir, args)
}

fn stdout(o: &Output) -> String {
    util::stdout_of(o)
}

fn stderr(o: &Output) -> String {
    util::stderr_of(o)
}

#[test]
fn agent_prints_the_reply() {
    let dir = temp_dir("cli");
    let o = gatelet(&dir, &["agent", "--message", "hi"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "hi\n");

    let o = gatelet(&dir, &["agent", "--message", "several words here", "--stream"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "several words here\n");
}

#[test]
fn agent_json_has_reply_finish_usage_and_session_key() {
    let dir = temp_dir("cli");
    let o = gatelet(&dir, &["agent", "--message", "one two three", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    assert_eq!(v["reply"], "one two three");
    assert_eq!(v["finishReason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 6);
    assert!(v["sessionKey"].as_str().unwrap().starts_with("agent:main:"), "{v}");

    // A sticky session keeps history across invocations (same run path as HTTP).
    let run = |m: &str| {
        let o = gatelet(&dir, &["agent", "--message", m, "--json", "--session-key", "cli-s"]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        serde_json::from_str::<Value>(stdout(&o).trim()).unwrap()
    };
    let a = run("a b");
    assert_eq!(a["sessionKey"], "agent:main:cli-s");
    assert_eq!(a["usage"]["prompt_tokens"], 2);
    let b = run("c");
    assert_eq!(b["usage"]["prompt_tokens"], 2 + 2 + 1);
}

#[test]
fn agent_picks_the_agent_and_rejects_unknown_ones() {
    let dir = temp_dir("cli");
    let cfg = dir.join("c.json5");
    std::fs::write(
        &cfg,
        "{ agents: { list: [ { id: 'main' }, { id: 'cut', backend: { kind: 'echo', maxTokens: 1 } } ] } }",
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let o = gatelet(&dir, &["agent", "--config", cfg, "--agent", "cut", "--message", "a b c", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["reply"], "a");
    assert_eq!(v["finishReason"], "length");
    let o = gatelet(&dir, &["agent", "--config", cfg, "--agent", "nobody", "--message", "x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nobody"), "{}", stderr(&o));
    let o = gatelet(&dir, &["agent"]);
    assert_eq!(o.status.code(), Some(2), "--message is required");
}

#[test]
fn config_check_redacts_secrets() {
    let dir = temp_dir("cli");
    let cfg = dir.join("c.json5");
    std::fs::write(
        &cfg,
        "{ gateway: { auth: { token: 'tok-SECRET-1', password: 'pw-SECRET-2' } },
           agents: { list: [ { id: 'up', backend: { kind: 'openai', baseUrl: 'http://127.0.0.1:9/v1', apiKey: 'sk-SECRET-3' } },
                             { id: 'cmd', backend: { kind: 'command', argv: ['x'], env: { API_KEY: 'env-SECRET-4' } } } ] } }",
    )
    .unwrap();
    let o = gatelet(&dir, &["config", "check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(!out.contains("SECRET"), "a secret leaked: {out}");
    assert!(!stderr(&o).contains("SECRET"), "a secret leaked: {}", stderr(&o));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["gateway"]["auth"]["token"], "<redacted>");
    assert_eq!(v["gateway"]["auth"]["password"], "<redacted>");
    assert_eq!(v["agents"]["list"][0]["backend"]["apiKey"], "<redacted>");
    assert_eq!(v["agents"]["list"][0]["backend"]["baseUrl"], "http://127.0.0.1:9/v1");
    assert_eq!(v["gateway"]["port"], 18789);

    // Secrets from the environment are redacted as well.
    let o = Command::new(env!("CARGO_BIN_EXE_gatelet"))
        .args(["config", "check"])
        .env("GATELET_STATE_DIR", &dir)
        .env_remove("GATELET_CONFIG_PATH")
        .env("GATELET_GATEWAY_TOKEN", "env-tok-SECRET")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stdout(&o).contains("SECRET"));
    assert!(stdout(&o).contains("<redacted>"));
}

#[test]
fn bad_config_exits_2_with_location_and_key_path() {
    let dir = temp_dir("cli");
    let cases: &[(&str, &str, &str)] = &[
        ("{\n  gateway: {\n    auth: { mode: 'tokn', token: 'x' },\n  },\n}", ":3:", "gateway.auth.mode"),
        ("{\n  gateway: {\n    auth: { token: 'x' },\n    workers: 'many',\n  },\n}", ":4:", "gateway.workers"),
        (
            "{\n gateway: { auth: { token: 'x' } },\n agents: { list: [ { id: 'Bad Id' } ] },\n}",
            ":3:",
            "agents.list[0].id",
        ),
        ("{\n  gateway: {\n    port: ,\n  }\n}", ":3:", "JSON5"),
    ];
    for (text, line, key) in cases {
        let cfg = dir.join("bad.json5");
        std::fs::write(&cfg, text).unwrap();
        let path = cfg.to_str().unwrap();
        for args in [vec!["config", "check", "--config", path], vec!["gateway", "--config", path, "--port", "0"]] {
            let o = gatelet(&dir, &args);
            assert_eq!(o.status.code(), Some(2), "{args:?} {text}: {}", stderr(&o));
            let err = stderr(&o);
            assert!(err.contains(&format!("{path}{line}")), "file:line:col missing for {key}: {err}");
            assert!(err.contains(key), "{key} missing: {err}");
        }
    }
    // Token mode without a token refuses to start the gateway.
    let o = gatelet(&dir, &["gateway", "--port", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("gateway.auth.token"), "{}", stderr(&o));
    // A config file named explicitly must exist.
    let o = gatelet(&dir, &["config", "check", "--config", dir.join("missing.json5").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn help_version_and_usage_errors() {
    let dir = temp_dir("cli");
    let o = gatelet(&dir, &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    for cmd in ["gatelet gateway", "gatelet agent", "gatelet config check"] {
        assert!(stdout(&o).contains(cmd), "{cmd}: {}", stdout(&o));
    }
    let o = gatelet(&dir, &["--version"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(stdout(&o).trim(), format!("gatelet {}", env!("CARGO_PKG_VERSION")));
    for (args, needle) in [
        (&["gateway", "--help"][..], "--port"),
        (&["agent", "--help"][..], "--message"),
        (&["config", "check", "--help"][..], "--config"),
        (&["config", "--help"][..], "--config"),
    ] {
        let o = gatelet(&dir, args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(stdout(&o).contains(needle), "{args:?}: {}", stdout(&o));
    }
    for args in
        [&["frobnicate"][..], &["gateway", "--nope"][..], &["gateway", "--port", "x"][..], &["config", "zap"][..]]
    {
        let o = gatelet(&dir, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(!stderr(&o).is_empty(), "{args:?}");
    }
}
