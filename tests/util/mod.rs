//! Shared helpers for integration tests: start the real `gatelet` binary on a free port with a
//! config written to a temp dir, and talk to it over raw sockets.
#![allow(dead_code)]

pub mod sse_client;
pub mod upstream;

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
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let d = std::env::temp_dir().join(format!("gatelet-test-{}-{tag}-{n}", std::process::id()));
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
        Self::in_dir(cfg, &dir)
    }

    /// Start with `cfg` using `dir` as the state dir (to restart on the same state).
    pub fn in_dir(cfg: &str, dir: &Path) -> Gateway {
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
        Gateway { child, port, dir: dir.to_path_buf(), stderr: lines }
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

    /// Kill the process hard (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
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
