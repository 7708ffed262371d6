//! `gatelet sessions list | show KEY | delete KEY`: the session store, offline.
//!
//! These commands take the state dir's `gateway.lock` the way a running gateway does, so they
//! refuse (exit 1) instead of racing a gateway that has the same store loaded; the WebSocket
//! `sessions.*` methods are the way to reach a running one.

use std::path::PathBuf;

use serde_json::{Value, json};

use super::persist::{LockError, StateLock};
use super::{SessionInfo, SessionStore, StoreOptions};
use crate::config::{self, Config, Overrides};

/// `gatelet sessions --help`.
pub const HELP: &str = "gatelet sessions — inspect or delete stored sticky sessions (gateway stopped)

Usage:
  gatelet sessions list [--config P] [--json]
  gatelet sessions show KEY [--config P] [--json]
  gatelet sessions delete KEY [--config P] [--json]

KEY is a session key as listed (agent:<id>:…); a key without the agent: prefix is looked up
under the default agent, as the gateway stores it.
These commands work on <state dir>/agents/*/sessions/ and refuse to run while a gateway holds
the same state dir (<state dir>/gateway.lock). Exit codes: 0 ok, 1 runtime error (unknown KEY,
gateway running, disk error), 2 usage or config error.";

const LIST_HELP: &str = "gatelet sessions list — every stored session, most recently updated first

Options:
  --config P   config file (JSON5); the state dir is GATELET_STATE_DIR or ~/.gatelet
  --json       print one JSON document {count, sessions:[{key, agentId, sessionId, updatedAt,
               inputTokens, outputTokens, totalTokens, messageCount}]}";

const SHOW_HELP: &str = "gatelet sessions show KEY — one session's summary and transcript

Options:
  --config P   config file (JSON5)
  --json       print one JSON document {session:{…}, messages:[…]}";

const DELETE_HELP: &str = "gatelet sessions delete KEY — remove a session's transcript and index entry

Options:
  --config P   config file (JSON5)
  --json       print one JSON document {ok, key}";

fn usage_err(msg: impl std::fmt::Display) -> i32 {
    eprintln!("gatelet: {msg}\n(run `gatelet sessions --help` for usage)");
    2
}

/// Run `gatelet sessions …` (`argv` after `sessions`); returns the exit code.
pub fn main(argv: Vec<String>) -> i32 {
    let mut it = argv.into_iter();
    let cmd = match it.next() {
        None => {
            println!("{HELP}");
            return 2;
        }
        Some(c) => c,
    };
    let help = match cmd.as_str() {
        "--help" | "-h" | "help" => {
            println!("{HELP}");
            return 0;
        }
        "list" => LIST_HELP,
        "show" => SHOW_HELP,
        "delete" => DELETE_HELP,
        other => return usage_err(format!("unknown sessions command {other:?}")),
    };
    let (mut key, mut json_out, mut ov) = (None, false, Overrides { no_listener: true, ..Default::default() });
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => {
                println!("{help}");
                return 0;
            }
            "--json" => json_out = true,
            "--config" => match it.next() {
                Some(p) => ov.config_path = Some(PathBuf::from(p)),
                None => return usage_err("--config needs a value"),
            },
            s if s.starts_with('-') && s.len() > 1 => {
                return usage_err(format!("sessions {cmd}: unknown option {s:?}"));
            }
            _ if key.is_none() && cmd != "list" => key = Some(a),
            _ => return usage_err(format!("sessions {cmd}: unexpected argument {a:?}")),
        }
    }
    if cmd != "list" && key.is_none() {
        return usage_err(format!("sessions {cmd}: KEY is required"));
    }
    let cfg = match config::load(&ov, &config::process_env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gatelet: config error:\n{e}");
            return 2;
        }
    };
    let _lock = match StateLock::acquire(&cfg.state_dir) {
        Ok(l) => l,
        Err(LockError::Held(pid)) => {
            let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            eprintln!(
                "gatelet: another gatelet process{who} is using state dir {}: a running gateway? Stop it \
                 first, or use the WebSocket sessions.* methods",
                cfg.state_dir.display()
            );
            return 1;
        }
        Err(LockError::Io(e)) => {
            eprintln!("gatelet: cannot lock the state dir: {e}");
            return 1;
        }
    };
    let opts = StoreOptions { persist: true, background: false, ..StoreOptions::default() };
    let (store, warnings) = SessionStore::open_with(&cfg.state_dir, opts);
    for w in warnings {
        crate::log!(Warn, "{w}");
    }
    match cmd.as_str() {
        "list" => list(&store, json_out),
        "show" => show(&store, &cfg, key.as_deref().unwrap_or_default(), json_out),
        _ => delete(&store, &cfg, key.as_deref().unwrap_or_default(), json_out),
    }
}

/// The stored key for `given`: itself when stored, else with the default agent's prefix.
fn find(store: &SessionStore, cfg: &Config, given: &str) -> Option<String> {
    if store.info(given).is_some() {
        return Some(given.to_string());
    }
    let agent = &cfg.agents[cfg.default_agent].id;
    let (k, _) = super::key_for(agent, Some(given), None).ok()?;
    store.info(&k).map(|_| k)
}

/// A session summary as JSON (the shape of the WebSocket `sessions.list` rows).
pub fn info_json(s: &SessionInfo) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    v["totalTokens"] = (s.input_tokens + s.output_tokens).into();
    v
}

fn list(store: &SessionStore, json_out: bool) -> i32 {
    let all = store.list();
    if json_out {
        let rows: Vec<Value> = all.iter().map(info_json).collect();
        println!("{}", json!({ "count": rows.len(), "sessions": rows }));
        return 0;
    }
    if all.is_empty() {
        println!("no sessions");
        return 0;
    }
    println!("{:<20}  {:>8}  {:>8}  {:>8}  KEY", "UPDATED (UTC)", "MESSAGES", "IN", "OUT");
    for s in &all {
        println!(
            "{:<20}  {:>8}  {:>8}  {:>8}  {}",
            utc(s.updated_at),
            s.message_count,
            s.input_tokens,
            s.output_tokens,
            s.key
        );
    }
    0
}

fn show(store: &SessionStore, cfg: &Config, given: &str, json_out: bool) -> i32 {
    let Some(key) = find(store, cfg, given) else {
        eprintln!("gatelet: no session {given}");
        return 1;
    };
    let messages = store.transcript(&key, None).unwrap_or_default();
    let Some(info) = store.info(&key) else {
        eprintln!("gatelet: no session {given}");
        return 1;
    };
    if json_out {
        println!("{}", json!({ "session": info_json(&info), "messages": messages }));
        return 0;
    }
    println!("key:        {}", info.key);
    println!("agent:      {}", info.agent_id);
    println!("session id: {}", info.session_id);
    println!("updated:    {} UTC", utc(info.updated_at));
    println!("tokens:     {} in, {} out", info.input_tokens, info.output_tokens);
    println!("messages:   {}", info.message_count);
    for m in &messages {
        let flag = if m.aborted { " (aborted)" } else { "" };
        println!("\n[{}] {}{flag}:\n{}", utc(m.timestamp), m.role.as_str(), m.content);
    }
    0
}

fn delete(store: &SessionStore, cfg: &Config, given: &str, json_out: bool) -> i32 {
    let Some(key) = find(store, cfg, given) else {
        eprintln!("gatelet: no session {given}");
        return 1;
    };
    match store.delete(&key) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("gatelet: no session {given}");
            return 1;
        }
        Err(e) => {
            eprintln!("gatelet: deleting {key} failed: {e}");
            return 1;
        }
    }
    if let Err(e) = store.flush() {
        crate::log!(Warn, "session index snapshot failed (the journal keeps the change): {e}");
    }
    if json_out {
        println!("{}", json!({ "ok": true, "key": key }));
    } else {
        println!("deleted {key}");
    }
    0
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix milliseconds.
fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = crate::util::civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(super::utc(1_796_389_199_000), "2026-12-04 12:59:59");
    }
}
