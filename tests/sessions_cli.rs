//! `gatelet sessions list | show | delete` on a stopped gateway's state dir, and its refusal to
//! touch the store while a gateway runs on it.

mod util;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use util::{Gateway, config, temp_dir};

fn gatelet(dir: &Path, args: &[&str]) -> Output {
    util::run_cli(dir, args)
}

fn out(o: &Output) -> String {
    util::stdout_of(o)
}

fn err(o: &Output) -> String {
    util::stderr_of(o)
}

fn ok_json(dir: &Path, args: &[&str]) -> Value {
    let o = gatelet(dir, args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", err(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", out(&o)))
}

/// Two sessions made through `gatelet agent` (echo backend, persisted).
fn two_sessions(dir: &Path) {
    for (key, msg) in [("alpha", "one"), ("beta", "two"), ("alpha", "three")] {
        let o = gatelet(dir, &["agent", "--session-key", key, "--message", msg]);
        assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    }
}

#[test]
fn list_show_and_delete() {
    let dir = temp_dir("sessions-cli");
    let o = gatelet(&dir, &["sessions", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(out(&o), "no sessions\n");
    two_sessions(&dir);

    let list = ok_json(&dir, &["sessions", "list", "--json"]);
    assert_eq!(list["count"], 2, "{list}");
    let rows = list["sessions"].as_array().unwrap();
    assert_eq!(rows[0]["key"], "agent:main:alpha", "most recently updated first: {list}");
    assert_eq!(rows[0]["messageCount"], 4);
    assert_eq!(rows[0]["agentId"], "main");
    assert_eq!(rows[1]["key"], "agent:main:beta");
    assert!(rows[0]["totalTokens"].as_u64().unwrap() > 0);

    let o = gatelet(&dir, &["sessions", "list"]);
    let text = out(&o);
    assert!(text.lines().next().unwrap().contains("KEY"), "{text}");
    assert!(text.contains("agent:main:alpha") && text.contains("agent:main:beta"), "{text}");

    // show: by full key or as the gateway would store a bare key.
    let shown = ok_json(&dir, &["sessions", "show", "agent:main:alpha", "--json"]);
    let msgs: Vec<(&str, &str)> = shown["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(msgs, [("user", "one"), ("assistant", "one"), ("user", "three"), ("assistant", "three")]);
    assert_eq!(shown["session"]["key"], "agent:main:alpha");
    let o = gatelet(&dir, &["sessions", "show", "beta"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert!(out(&o).contains("key:        agent:main:beta"), "{}", out(&o));
    assert!(out(&o).contains("user:\ntwo"), "{}", out(&o));

    // Unknown keys: exit 1, and nothing changes.
    let o = gatelet(&dir, &["sessions", "show", "nobody"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("no session nobody"), "{}", err(&o));
    let o = gatelet(&dir, &["sessions", "delete", "nobody"]);
    assert_eq!(o.status.code(), Some(1));

    let del = ok_json(&dir, &["sessions", "delete", "alpha", "--json"]);
    assert_eq!(del, serde_json::json!({ "ok": true, "key": "agent:main:alpha" }));
    let o = gatelet(&dir, &["sessions", "delete", "agent:main:beta"]);
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_eq!(out(&o), "deleted agent:main:beta\n");
    assert_eq!(ok_json(&dir, &["sessions", "list", "--json"])["count"], 0);
    let files: Vec<_> = std::fs::read_dir(dir.join("agents/main/sessions"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
        .collect();
    assert!(files.is_empty(), "transcripts removed: {files:?}");
    // A deleted key starts over.
    two_sessions(&dir);
    let shown = ok_json(&dir, &["sessions", "show", "beta", "--json"]);
    assert_eq!(shown["messages"].as_array().unwrap().len(), 2);
}

#[test]
fn help_and_usage_errors() {
    let dir = temp_dir("sessions-cli-help");
    for (args, needle) in [
        (&["sessions", "--help"][..], "gatelet sessions list"),
        (&["sessions", "list", "--help"][..], "--json"),
        (&["sessions", "show", "--help"][..], "transcript"),
        (&["sessions", "delete", "--help"][..], "remove"),
    ] {
        let o = gatelet(&dir, args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(out(&o).contains(needle), "{args:?}: {}", out(&o));
    }
    let o = gatelet(&dir, &["--help"]);
    assert!(out(&o).contains("gatelet sessions"), "{}", out(&o));
    for args in [
        &["sessions"][..],
        &["sessions", "frobnicate"][..],
        &["sessions", "show"][..],
        &["sessions", "delete", "--json"][..],
        &["sessions", "list", "--bogus"][..],
        &["sessions", "list", "extra"][..],
        &["sessions", "list", "--config"][..],
    ] {
        assert_eq!(gatelet(&dir, args).status.code(), Some(2), "{args:?}");
    }
    std::fs::write(dir.join("bad.json5"), "{ session: { maxHistoryMessages: -1 } }").unwrap();
    let o = gatelet(&dir, &["sessions", "list", "--config", dir.join("bad.json5").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(err(&o).contains("session.maxHistoryMessages"), "{}", err(&o));
}

#[test]
fn refuses_to_race_a_running_gateway() {
    let dir = temp_dir("sessions-cli-lock");
    two_sessions(&dir);
    let cfg = config("", "");
    let mut gw = Gateway::in_dir(&cfg, &dir);
    let conf = dir.join("gatelet.json5");
    let conf = conf.to_str().unwrap();
    for args in [&["sessions", "list", "--config", conf][..], &["sessions", "delete", "alpha", "--config", conf][..]] {
        let o = gatelet(&dir, args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", out(&o));
        let e = err(&o);
        assert!(e.contains("is using state dir") && e.contains("running gateway"), "{e}");
        assert!(e.contains(&format!("pid {}", gw.child.id())), "{e}");
    }
    // A second gateway on the same state dir refuses too.
    let o = Command::new(env!("CARGO_BIN_EXE_gatelet"))
        .args(["gateway", "--config", conf])
        .env("GATELET_STATE_DIR", &dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(err(&o).contains("another gatelet process"), "{}", err(&o));
    // Stopped (even by SIGKILL), the lock is gone with it.
    gw.kill();
    let list = ok_json(&dir, &["sessions", "list", "--json", "--config", conf]);
    assert_eq!(list["count"], 2);
}
