//! Shared helpers for integration tests: start the real `gatelet` binary on a free port with a
//! config written to a temp dir, and talk to it over raw sockets.
#![allow(dead_code)]

pub mod sse_client;
pub mod upstream;
pub mod ws;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The token every test config uses unless it says otherwise.
pub const TOKEN: &str = "test-token";

/// A running gateway; killed on drop.
pub struct Gateway {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// Lines the gateway wrote to stderr so far are collected here.
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Remove `dir` on drop (it was made for this gateway alone).
    owns_dir: bool,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    // Under target/ (cargo's scratch dir for integration tests), never littering /tmp.
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("gatelet-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The default test config: echo agent, chat completions on, token auth. `extra` is spliced into
/// the top-level object (JSON5), e.g. `agents: {...}`; `gateway_extra` into `gateway`.
pub fn config(gateway_extra: &str, extra: &str) -> String {
    format!(
        "{{ gateway: {{ port: 0, auth: {{ token: '{TOKEN}' }}, \
           http: {{ endpoints: {{ chatCompletions: {{ enabled: true }} }} }}, {gateway_extra} }}, {extra} }}"
    )
}

impl Gateway {
    /// Start with the default config.
    pub fn start() -> Gateway {
        Self::with_config(&config("", ""))
    }

    /// Start with `cfg` (JSON5 text) in a fresh state dir.
    pub fn with_config(cfg: &str) -> Gateway {
        let dir = temp_dir("gw");
        let mut gw = Self::in_dir(cfg, &dir);
        gw.owns_dir = true;
        gw
    }

    /// Start with `cfg` using `dir` as the state dir (to restart on the same state).
    pub fn in_dir(cfg: &str, dir: &Path) -> Gateway {
        Self::in_dir_env(cfg, dir, &[])
    }

    /// As [`Gateway::in_dir`], with extra environment variables.
    pub fn in_dir_env(cfg: &str, dir: &Path, env: &[(&str, &str)]) -> Gateway {
        let cfg_path = dir.join("gatelet.json5");
        std::fs::write(&cfg_path, cfg).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_gatelet"))
            .args(["gateway", "--config"])
            .arg(&cfg_path)
            .env("GATELET_STATE_DIR", dir)
            .env_remove("GATELET_GATEWAY_TOKEN")
            .env_remove("GATELET_GATEWAY_PASSWORD")
            .env_remove("GATELET_GATEWAY_PORT")
            .env("GATELET_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gatelet");
        let stderr = child.stderr.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let port = rest.split_whitespace().next().and_then(|a| a.rsplit(':').next()?.parse::<u16>().ok());
                    if let (Some(p), Some(t)) = (port, tx.take()) {
                        let _ = t.send(p);
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                panic!("gatelet did not start: {:?}", lines.lock().unwrap());
            }
        };
        Gateway { child, port, dir: dir.to_path_buf(), stderr: lines, owns_dir: false }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A connected socket with read/write timeouts.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Send raw bytes on a new connection and read until the server closes (or 10 s pass).
    pub fn raw(&self, req: &[u8]) -> String {
        let mut s = self.connect();
        s.write_all(req).unwrap();
        read_to_close(&mut s)
    }

    /// Send raw bytes and read exactly one response (by Content-Length or chunked framing).
    pub fn one(&self, req: &[u8]) -> Resp {
        let mut s = self.connect();
        s.write_all(req).unwrap();
        read_response(&mut s).expect("a response")
    }

    /// [`one`](Self::one) once a run's place is free again: a run whose client went away holds
    /// its place (against the pool and its address's limit) until the run has noticed and
    /// ended, so a request sent at once may get 503 or 429. Gives up (returning that answer)
    /// after 30 s.
    pub fn one_when_free(&self, req: &[u8]) -> Resp {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.one(req);
            if !matches!(r.status, 503 | 429) || Instant::now() > end {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop the process with SIGTERM (a drain) and wait for it to exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("gatelet did not exit after SIGTERM");
    }

    /// Kill the process hard (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Read everything until EOF, a reset, or a 10 s timeout.
pub fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Read one response from `s` (skipping `100 Continue`). `None` on EOF before a status line.
pub fn read_response(s: &mut TcpStream) -> Option<Resp> {
    let mut r = ByteReader { s, buf: Vec::new() };
    loop {
        let head = r.until(b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
        if status == 100 {
            continue;
        }
        let resp = Resp { status, head: head.clone(), body: Vec::new() };
        let body = if resp.header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            loop {
                let line = r.until(b"\r\n")?;
                let n = usize::from_str_radix(String::from_utf8_lossy(&line[..line.len() - 2]).trim(), 16).ok()?;
                if n == 0 {
                    r.until(b"\r\n")?;
                    break;
                }
                body.extend_from_slice(&r.exact(n + 2)?[..n]);
            }
            body
        } else if let Some(n) = resp.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            r.exact(n)?
        } else {
            let mut rest = std::mem::take(&mut r.buf);
            let mut tmp = [0u8; 8192];
            while let Ok(n) = r.s.read(&mut tmp) {
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&tmp[..n]);
            }
            rest
        };
        // Anything read past this response belongs to the next one; tests that pipeline use
        // `read_responses` instead.
        return Some(Resp { body, ..resp });
    }
}

/// Read `n` responses from one connection (pipelining).
pub fn read_responses(s: &mut TcpStream, n: usize) -> Vec<Resp> {
    let mut all = Vec::new();
    let mut r = ByteReader { s, buf: Vec::new() };
    for _ in 0..n {
        let Some(head) = r.until(b"\r\n\r\n") else { break };
        let head = String::from_utf8_lossy(&head).into_owned();
        let status: u16 = head.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
        let resp = Resp { status, head: head.clone(), body: Vec::new() };
        let len = resp.header("content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        let body = r.exact(len).unwrap_or_default();
        all.push(Resp { body, ..resp });
    }
    all
}

struct ByteReader<'a> {
    s: &'a mut TcpStream,
    buf: Vec<u8>,
}

impl ByteReader<'_> {
    fn fill(&mut self) -> Option<()> {
        let mut tmp = [0u8; 8192];
        match self.s.read(&mut tmp) {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Some(())
            }
        }
    }
    fn until(&mut self, pat: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(pat.len()).position(|w| w == pat) {
                let out: Vec<u8> = self.buf.drain(..i + pat.len()).collect();
                return Some(out);
            }
            self.fill()?;
        }
    }
    fn exact(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Some(self.buf.drain(..n).collect())
    }
}

/// A POST /v1/chat/completions request with the test token.
pub fn chat_request(body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|rec| rec.strip_prefix("data: ").map(str::to_string))
        .collect()
}

/// A POST /v1/chat/completions request with the test token and extra header lines
/// (each `Name: value`, without CRLF).
pub fn chat_request_with(headers: &[&str], body: &str) -> Vec<u8> {
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A chat body with one user message (JSON-escaped) and extra top-level fields (`"k":v,…`).
pub fn user_body(text: &str, extra: &str) -> String {
    let msg = serde_json::to_string(text).unwrap();
    let sep = if extra.is_empty() { "" } else { "," };
    format!(r#"{{"model":"gatelet","messages":[{{"role":"user","content":{msg}}}]{sep}{extra}}}"#)
}

/// Read one response head (up to the blank line) and nothing more: for HEAD requests and
/// responses whose body the test reads itself.
pub fn read_head(s: &mut TcpStream) -> Option<Resp> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Resp { status, head, body: Vec::new() })
}

/// True when the server closes `s` (EOF or reset) within `within`, with no further bytes.
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted),
    }
}

/// Read whatever arrives within `within` (used to show that nothing is sent).
pub fn read_for(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    read_until(s, None, within)
}

/// The parsed JSON of every `data:` record except `[DONE]`.
pub fn sse_json(body: &[u8]) -> Vec<serde_json::Value> {
    sse_data(body)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("record is not JSON ({e}): {d}")))
        .collect()
}

/// The keys of an OpenAI error envelope, asserting its exact shape; returns `error`.
pub fn error_of(r: &Resp) -> serde_json::Value {
    let v = r.json();
    let obj = v.as_object().unwrap_or_else(|| panic!("not an object: {v}"));
    assert_eq!(obj.keys().collect::<Vec<_>>(), vec!["error"], "{v}");
    let e = &v["error"];
    let mut keys: Vec<&String> = e.as_object().unwrap_or_else(|| panic!("error not an object: {v}")).keys().collect();
    keys.sort();
    assert_eq!(keys, vec!["code", "message", "param", "type"], "{v}");
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e["param"].is_null() || e["param"].is_string(), "{v}");
    assert!(e["code"].is_null() || e["code"].is_string(), "{v}");
    e.clone()
}

/// Read until `pat` has arrived, the server closes, or `within` passes; returns what was read.
pub fn read_to_close_or(s: &mut TcpStream, pat: &[u8], within: Duration) -> Vec<u8> {
    read_until(s, Some(pat), within)
}

fn read_until(s: &mut TcpStream, pat: Option<&[u8]>, within: Duration) -> Vec<u8> {
    let end = Instant::now() + within;
    let mut out = Vec::new();
    let mut b = [0u8; 4096];
    while !pat.is_some_and(|p| out.windows(p.len()).any(|w| w == p)) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut b) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&b[..n]),
        }
    }
    out
}

/// Agents whose backends fail at once: `cmd` (a program that does not exist) and `up` (an
/// upstream nobody listens on), beside the echo agent `main`.
pub const FAILING_AGENTS: &str = "agents: { list: [ { id: 'main', default: true }, \
    { id: 'cmd', backend: { kind: 'command', argv: ['/nonexistent'] } }, \
    { id: 'up', backend: { kind: 'openai', baseUrl: 'http://127.0.0.1:1/v1', model: 'm' } } ] }";

/// Resident memory of process `pid` in KiB (Linux `/proc`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("VmRSS value")
}

/// Write `unit` over and over, never reading, until `total` bytes are written or a write blocks
/// for `stall`. Returns the bytes written.
pub fn flood(s: &mut TcpStream, unit: &[u8], total: usize, stall: Duration) -> usize {
    let mut chunk = Vec::new();
    while chunk.len() < 64 * 1024 {
        chunk.extend_from_slice(unit);
    }
    s.set_write_timeout(Some(stall)).unwrap();
    let mut written = 0;
    while written < total {
        match s.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n,
        }
    }
    written
}

/// Run the `gatelet` binary with `args` on state dir `dir`, with no `GATELET_*` setting inherited
/// from the environment that could change what it does.
pub fn run_cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gatelet"))
        .args(args)
        .env("GATELET_STATE_DIR", dir)
        .env_remove("GATELET_CONFIG_PATH")
        .env_remove("GATELET_GATEWAY_TOKEN")
        .env_remove("GATELET_GATEWAY_PASSWORD")
        .env_remove("GATELET_GATEWAY_PORT")
        .env_remove("GATELET_LOG")
        .output()
        .expect("run gatelet")
}

/// A command's standard output, as text.
pub fn stdout_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command's standard error, as text.
pub fn stderr_of(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
