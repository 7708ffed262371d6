//! The command line: `gatelet gateway`, `gatelet agent`, `gatelet config check`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;

use crate::agent::resolve::{self, ResolveError};
use crate::agent::run::{RunOutcome, RunRequest, execute};
use crate::agent::{CancelToken, RunError, RunSink};
use crate::config::{self, Config, Overrides};
use crate::gateway::Gateway;

const VERSION: &str = env!("CARGO_PKG_VERSION");

const HELP: &str = "gatelet — a small agent gateway (HTTP/1.1 + WebSocket, OpenAI-compatible)

Usage:
  gatelet gateway [--config P] [--port N] [--bind B] [--token T]
  gatelet agent --message TEXT [--config P] [--agent ID] [--session-key K] [--stream] [--json]
  gatelet config check [--config P]
  gatelet sessions list|show KEY|delete KEY [--config P] [--json]
  gatelet --help | --version

Run `gatelet <command> --help` for details.
Environment: GATELET_CONFIG_PATH, GATELET_STATE_DIR, GATELET_GATEWAY_PORT,
GATELET_GATEWAY_TOKEN, GATELET_GATEWAY_PASSWORD, GATELET_LOG (error|warn|info|debug|trace),
GATELET_LOG_FORMAT (text|json).
Signals (gateway): SIGHUP reloads the config file; SIGTERM/SIGINT drain and exit.";

const GATEWAY_HELP: &str = "gatelet gateway — run the gateway in the foreground

Options:
  --config P   config file (JSON5); default $GATELET_CONFIG_PATH or <state dir>/gatelet.json
  --port N     listening port (overrides GATELET_GATEWAY_PORT and gateway.port); 0 picks a free port
  --bind B     loopback | lan | an IP address
  --token T    gateway token (overrides gateway.auth.token and GATELET_GATEWAY_TOKEN)";

const AGENT_HELP: &str = "gatelet agent — run one agent turn in process

Options:
  --message TEXT    the user message (required)
  --config P        config file (JSON5)
  --agent ID        agent id (default: the default agent)
  --session-key K   sticky session key (history is kept and persisted like HTTP sessions)
  --stream          print the reply as it is produced
  --json            print one JSON document: reply, finishReason, usage, sessionKey";

const CONFIG_HELP: &str = "gatelet config check — validate the config and print it with secrets redacted

Options:
  --config P   config file (JSON5)";

/// A usage error (exit 2).
fn usage_err(msg: impl std::fmt::Display) -> i32 {
    eprintln!("gatelet: {msg}\n(run `gatelet --help` for usage)");
    2
}

struct Args {
    rest: std::vec::IntoIter<String>,
}

impl Args {
    fn value(&mut self, flag: &str) -> Result<String, i32> {
        self.rest.next().ok_or_else(|| usage_err(format!("{flag} needs a value")))
    }
}

/// Entry point: parse `argv` (without the program name) and run. Returns the exit code.
pub fn main(argv: Vec<String>) -> i32 {
    crate::log::init_from_env();
    let mut args = Args { rest: argv.into_iter() };
    match args.rest.next().as_deref() {
        None | Some("--help" | "-h" | "help") => {
            println!("{HELP}");
            0
        }
        Some("--version" | "-V") => {
            println!("gatelet {VERSION}");
            0
        }
        Some("gateway") => gateway(args).unwrap_or_else(|c| c),
        Some("agent") => agent(args).unwrap_or_else(|c| c),
        Some("sessions") => {
            crate::log::init_from_env();
            crate::session::cli::main(args.rest.collect())
        }
        Some("config") => match args.rest.next().as_deref() {
            Some("check") => config_check(args).unwrap_or_else(|c| c),
            Some("--help" | "-h") | None => {
                println!("{CONFIG_HELP}");
                if args.rest.len() == 0 { 0 } else { 2 }
            }
            Some(other) => usage_err(format!("unknown config command {other:?}")),
        },
        Some(other) => usage_err(format!("unknown command {other:?}")),
    }
}

fn load(ov: &Overrides) -> Result<Config, i32> {
    match config::load(ov, &config::process_env) {
        Ok(c) => {
            for w in &c.warnings {
                crate::log!(Warn, "{w}");
            }
            Ok(c)
        }
        Err(e) => {
            eprintln!("gatelet: config error:\n{e}");
            Err(2)
        }
    }
}

fn build(cfg: Config, store_owner: bool) -> Arc<Gateway> {
    if cfg.implicit_echo {
        crate::log!(Warn, "no backend configured: agents use the built-in echo backend");
    }
    let (gw, warnings) = Gateway::with_store_writer(cfg, store_owner);
    for w in warnings {
        crate::log!(Warn, "{w}");
    }
    Arc::new(gw)
}

fn gateway(mut args: Args) -> Result<i32, i32> {
    let mut ov = Overrides::default();
    while let Some(a) = args.rest.next() {
        match a.as_str() {
            "--config" => ov.config_path = Some(PathBuf::from(args.value("--config")?)),
            "--port" => {
                let v = args.value("--port")?;
                ov.port = Some(v.parse().map_err(|_| usage_err(format!("--port: {v:?} is not a port number")))?);
            }
            "--bind" => ov.bind = Some(args.value("--bind")?),
            "--token" => ov.token = Some(args.value("--token")?),
            "--help" | "-h" => {
                println!("{GATEWAY_HELP}");
                return Ok(0);
            }
            other => return Err(usage_err(format!("gateway: unknown option {other:?}"))),
        }
    }
    let cfg = load(&ov)?;
    // One gateway per state dir: a second one would overwrite the first's session index, and
    // `gatelet sessions` checks this lock before touching the store.
    let _state_lock = if cfg.persist_sessions {
        match crate::session::persist::StateLock::acquire(&cfg.state_dir) {
            Ok(l) => Some(l),
            Err(crate::session::persist::LockError::Held(pid)) => {
                let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                eprintln!(
                    "gatelet: another gatelet process{who} is using state dir {} (a gateway already running?)",
                    cfg.state_dir.display()
                );
                return Err(1);
            }
            Err(crate::session::persist::LockError::Io(e)) => {
                eprintln!("gatelet: cannot lock the state dir: {e}");
                return Err(1);
            }
        }
    } else {
        None
    };
    let l = &cfg.gateway.log;
    crate::log::apply(l.level, l.format.as_deref(), l.access);
    // From here on no log line is written by the thread that produced it.
    crate::log::start_writer();
    let gw = build(cfg, true);
    let mut server = match crate::server::Server::bind(gw.clone()) {
        Ok(s) => s,
        Err(e) => {
            let g = &gw.config().gateway;
            eprintln!("gatelet: cannot listen on {}:{}: {e}", g.bind, g.port);
            return Err(1);
        }
    };
    server.set_reloader(Box::new(move || config::load(&ov, &config::process_env)));
    let addr = server.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let cc = if gw.config().gateway.chat_completions { "enabled" } else { "disabled" };
    crate::log!(
        Info,
        "listening on http://{addr} (agents: {}; chat completions {cc}; {} workers)",
        gw.agents().iter().map(|a| a.cfg.id.as_str()).collect::<Vec<_>>().join(", "),
        gw.config().gateway.workers
    );
    let code = match server.run() {
        Ok(()) => {
            // Workers finish (or notice the cancel of) what they hold; transcripts are complete.
            gw.pool().shutdown();
            if let Err(e) = gw.sessions().flush() {
                crate::log!(Warn, "session index snapshot failed (the journal keeps the changes): {e}");
            }
            Ok(0)
        }
        Err(e) => {
            crate::log!(Error, "event loop failed: {e}");
            Err(1)
        }
    };
    crate::log::flush(std::time::Duration::from_secs(2));
    code
}

fn config_check(mut args: Args) -> Result<i32, i32> {
    let mut ov = Overrides::default();
    while let Some(a) = args.rest.next() {
        match a.as_str() {
            "--config" => ov.config_path = Some(PathBuf::from(args.value("--config")?)),
            "--help" | "-h" => {
                println!("{CONFIG_HELP}");
                return Ok(0);
            }
            other => return Err(usage_err(format!("config check: unknown option {other:?}"))),
        }
    }
    let cfg = load(&ov)?;
    println!("{}", serde_json::to_string_pretty(&cfg.redacted_json()).unwrap_or_default());
    Ok(0)
}

/// Prints deltas as they arrive (with `--stream`).
struct Printer {
    stream: bool,
}

impl RunSink for Printer {
    fn delta(&mut self, text: &str) -> Result<(), RunError> {
        if self.stream {
            let mut out = std::io::stdout().lock();
            if out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err() {
                return Err(RunError::Cancelled);
            }
        }
        Ok(())
    }
    fn tool_call(&mut self, _: &crate::agent::tools::ToolCallPiece) -> Result<(), RunError> {
        Ok(())
    }
}

fn agent(mut args: Args) -> Result<i32, i32> {
    let mut ov = Overrides { no_listener: true, ..Default::default() };
    let (mut message, mut agent_id, mut key, mut stream, mut json) = (None, None, None, false, false);
    while let Some(a) = args.rest.next() {
        match a.as_str() {
            "--message" | "-m" => message = Some(args.value("--message")?),
            "--config" => ov.config_path = Some(PathBuf::from(args.value("--config")?)),
            "--agent" => agent_id = Some(args.value("--agent")?),
            "--session-key" => key = Some(args.value("--session-key")?),
            "--stream" => stream = true,
            "--json" => json = true,
            "--help" | "-h" => {
                println!("{AGENT_HELP}");
                return Ok(0);
            }
            other => return Err(usage_err(format!("agent: unknown option {other:?}"))),
        }
    }
    let Some(message) = message else { return Err(usage_err("agent: --message is required")) };
    let cfg = load(&ov)?;
    // Alone on the state dir, this process may maintain the session index; next to a running
    // gateway it only appends its turn.
    let state_lock =
        if cfg.persist_sessions { crate::session::persist::StateLock::acquire(&cfg.state_dir).ok() } else { None };
    let gw = build(cfg, state_lock.is_some());
    // The WebSocket rule: --agent wins, else a key `agent:<id>:…` names its agent, else the default.
    let (agent, session_key, sticky) =
        resolve::agent_for_key(gw.agents(), gw.default_agent(), agent_id.as_deref(), key.as_deref()).map_err(|e| {
            usage_err(match e {
                ResolveError::NoAgent(id) => format!("agent: no agent {id:?} (configured: {})", gw.agent_ids()),
                ResolveError::Key(e) => format!("agent: --session-key {e}"),
                ResolveError::KeyOfOtherAgent { key_agent, agent } => {
                    format!("agent: --session-key belongs to agent {key_agent}, not {agent}")
                }
                e => format!("agent: {e}"),
            })
        })?;
    let run = RunRequest::user_turn(agent, session_key, sticky, message);
    // The same worker pool as the gateway, so the run path is identical.
    let (tx, rx) = mpsc::channel::<RunOutcome>();
    let Some(adm) = gw.pool().admit() else { return Err(1) };
    let gw2 = gw.clone();
    let run2 = run.clone();
    adm.submit(run.sticky.then(|| run.session_key.clone()), move || {
        let mut p = Printer { stream: stream && !json };
        let _ = tx.send(execute(&gw2.agents()[run2.agent], gw2.sessions(), &run2, &CancelToken::new(), &mut p));
    });
    let Ok(out) = rx.recv() else {
        eprintln!("gatelet: the run ended without a result");
        return Err(1);
    };
    if json {
        let v = serde_json::json!({
            "reply": out.text, "finishReason": out.error.as_ref().map_or(out.finish.as_str(), |_| "error"),
            "usage": out.usage.to_json(false),
            "sessionKey": run.session_key, "agentId": gw.agents()[agent].cfg.id,
            "error": out.error.as_ref().map(|e| e.to_string()),
        });
        let mut v = v;
        if !out.tool_calls.is_empty() {
            v["toolCalls"] = out.tool_calls.iter().map(crate::agent::tools::ToolCall::to_json).collect();
        }
        println!("{v}");
    } else if stream {
        println!();
    } else {
        println!("{}", out.text);
    }
    gw.pool().shutdown();
    if state_lock.is_some() {
        gw.sessions().snapshot_if_due();
    }
    match out.error {
        None => Ok(0),
        Some(e) => {
            eprintln!("gatelet: run failed: {e}");
            Err(1)
        }
    }
}
