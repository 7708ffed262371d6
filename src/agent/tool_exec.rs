//! Running one agent tool call (SPEC §5.1): the tool's program gets the arguments JSON on stdin;
//! what it prints on stdout (at most [`MAX_RESULT`] bytes) is the result. A failure (non-zero
//! exit, timeout, cannot start) is not a run error: it goes back to the model as the result, with
//! the exit status and the tail of stderr, so the model can react.
//!
//! One trailing line end of the output is dropped (most programs end with one).
//!
//! The program runs in a process group of its own. On cancel, the run's deadline or the tool's
//! `timeoutSeconds`, the whole group is killed (`kill -KILL -<pgid>`, run as a separate program
//! because the crate forbids `unsafe` and std has no `killpg`), so whatever the tool started goes
//! too. The group is also killed once the tool exits, so nothing it left behind outlives the call.

use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::backend::command::{HIDDEN_ENV, kill_group};
use super::{EventSink, RunControl, RunError, TICK};
use crate::config::AgentToolConfig;

/// Most stdout bytes kept as the result (the rest is read and dropped).
pub const MAX_RESULT: usize = 64 * 1024;
/// Most stderr bytes kept for a failure report.
const STDERR_TAIL: usize = 2048;
/// How long the pipes may stay open after the tool exited (something it started holding them).
const EXIT_GRACE: Duration = Duration::from_millis(500);

#[derive(Default)]
struct Captured {
    out: Vec<u8>,
    truncated: bool,
    err: Vec<u8>,
    open: u8,
}

fn drain(mut r: impl Read, cap: Arc<Mutex<Captured>>, stdout: bool) {
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let mut c = cap.lock().unwrap_or_else(|e| e.into_inner());
                if stdout {
                    let room = MAX_RESULT - c.out.len();
                    c.truncated |= n > room;
                    c.out.extend_from_slice(&buf[..n.min(room)]);
                } else {
                    c.err.extend_from_slice(&buf[..n]);
                    if c.err.len() > 2 * STDERR_TAIL {
                        let cut = c.err.len() - STDERR_TAIL;
                        c.err.drain(..cut);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    cap.lock().unwrap_or_else(|e| e.into_inner()).open -= 1;
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(STDERR_TAIL);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// Run `tool` with `args`. `Ok(Ok(result))` when it succeeded, `Ok(Err(report))` when it failed
/// (the report goes to the model), `Err` when the run itself must stop (cancel, deadline, the
/// client gone). `out` is ticked while the tool runs, which keeps HTTP streams alive.
pub fn run(
    tool: &AgentToolConfig,
    args: &str,
    ctl: &RunControl,
    out: &mut dyn EventSink,
) -> Result<Result<String, String>, RunError> {
    let argv = &tool.command.argv;
    let Some(prog) = argv.first() else { return Ok(Err(format!("tool {}: empty argv", tool.name))) };
    let mut cmd = std::process::Command::new(prog);
    cmd.args(&argv[1..]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    for k in HIDDEN_ENV {
        cmd.env_remove(k);
    }
    cmd.envs(&tool.command.env);
    if let Some(d) = &tool.command.cwd {
        cmd.current_dir(d);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ok(Err(format!("tool {} could not start: {e}", tool.name))),
    };
    let pgid = child.id();
    let cap = Arc::new(Mutex::new(Captured { open: 2, ..Default::default() }));
    if let Some(mut w) = child.stdin.take() {
        let payload = args.as_bytes().to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&payload);
        });
    }
    for (stdout, pipe) in [
        (true, child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
        (false, child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>)),
    ] {
        match pipe {
            Some(p) => {
                let c = cap.clone();
                std::thread::spawn(move || drain(p, c, stdout));
            }
            None => cap.lock().unwrap_or_else(|e| e.into_inner()).open -= 1,
        }
    }
    let until = Instant::now() + tool.timeout;
    let mut last_tick = Instant::now();
    let mut status = None;
    let mut exited_at = None;
    let outcome = loop {
        if let Err(e) = ctl.check() {
            break Err(e);
        }
        if status.is_none()
            && let Ok(Some(st)) = child.try_wait()
        {
            status = Some(st);
            exited_at = Some(Instant::now());
        }
        let open = cap.lock().unwrap_or_else(|e| e.into_inner()).open;
        if status.is_some() && (open == 0 || exited_at.is_some_and(|t| t.elapsed() >= EXIT_GRACE)) {
            break Ok(());
        }
        if Instant::now() >= until {
            break Ok(());
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            if let Err(e) = out.tick() {
                break Err(e);
            }
        }
        ctl.cancel.wait(Duration::from_millis(10));
    };
    // The child is not reaped yet (or has just been), so its pid still names the group.
    kill_group(pgid);
    let _ = child.kill();
    let status = status.or_else(|| child.wait().ok());
    outcome?;
    let c = cap.lock().unwrap_or_else(|e| e.into_inner());
    let stdout = String::from_utf8_lossy(&c.out).into_owned();
    let timed_out = exited_at.is_none();
    match status {
        _ if timed_out => {
            let mut m = format!("tool {} timed out after {} s and was killed", tool.name, tool.timeout.as_secs());
            let t = tail(&c.err);
            if !t.is_empty() {
                m.push_str(&format!("; stderr: {t}"));
            }
            Ok(Err(m))
        }
        Some(st) if st.success() => {
            // The line end most programs finish with is not part of the result.
            let mut r =
                stdout.strip_suffix('\n').map(|s| s.strip_suffix('\r').unwrap_or(s)).unwrap_or(&stdout).to_string();
            if c.truncated {
                r.push_str(&format!("\n[output truncated at {MAX_RESULT} bytes]"));
            }
            Ok(Ok(r))
        }
        st => {
            let how = match (st.and_then(|s| s.code()), st.and_then(|s| s.signal())) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => format!("was killed by signal {sig}"),
                _ => "failed".to_string(),
            };
            let mut m = format!("tool {} {how}", tool.name);
            let t = tail(&c.err);
            if !t.is_empty() {
                m.push_str(&format!("; stderr: {t}"));
            }
            if !stdout.trim().is_empty() {
                m.push_str(&format!("; stdout: {}", stdout.trim()));
            }
            Ok(Err(m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::CancelToken;
    use crate::config::CommandBackendConfig;
    use std::collections::BTreeMap;

    fn tool(script: &str, timeout: u64) -> AgentToolConfig {
        AgentToolConfig {
            name: "t".into(),
            description: None,
            parameters: None,
            command: CommandBackendConfig {
                argv: vec!["sh".into(), "-c".into(), script.into()],
                cwd: None,
                env: BTreeMap::new(),
            },
            timeout: Duration::from_secs(timeout),
        }
    }

    fn ctl() -> RunControl {
        RunControl::new(CancelToken::new(), Duration::from_secs(60))
    }

    #[test]
    fn arguments_in_result_out() {
        let r = run(&tool("read -r a; echo \"got $a\"", 10), "{\"x\":1}", &ctl(), &mut ()).unwrap();
        assert_eq!(r, Ok("got {\"x\":1}".to_string()));
    }

    #[test]
    fn failure_reports_status_and_stderr() {
        let r = run(&tool("echo bad input >&2; exit 4", 10), "{}", &ctl(), &mut ()).unwrap();
        assert_eq!(r, Err("tool t exited with status 4; stderr: bad input".to_string()));
        let mut t = tool("", 10);
        t.command.argv = vec!["/nonexistent/tool".into()];
        assert!(run(&t, "{}", &ctl(), &mut ()).unwrap().unwrap_err().contains("could not start"));
    }

    #[test]
    fn output_is_capped() {
        let r = run(&tool("head -c 200000 /dev/zero | tr '\\0' x", 10), "{}", &ctl(), &mut ()).unwrap().unwrap();
        assert!(r.starts_with(&"x".repeat(MAX_RESULT)));
        assert!(r.ends_with("[output truncated at 65536 bytes]"), "{}", &r[r.len() - 50..]);
    }

    #[test]
    fn cancel_stops_the_run() {
        let c = CancelToken::new();
        c.cancel();
        let ctl = RunControl::new(c, Duration::from_secs(60));
        assert_eq!(run(&tool("sleep 30", 10), "{}", &ctl, &mut ()), Err(RunError::Cancelled));
    }
}
