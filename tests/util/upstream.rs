//! A scripted OpenAI-compatible upstream for backend tests: a thread per connection on a loopback
//! port, answering each request with a list of raw steps (bytes, pauses, gates), and recording
//! the requests it got, the connections it accepted and whether the client hung up on it. By
//! default a connection carries one request; [`Upstream::keep_alive`] serves requests on a
//! connection until the script says [`Step::Close`] or the client closes it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One thing the upstream does while answering.
#[derive(Clone)]
pub enum Step {
    /// Write these bytes.
    Write(Vec<u8>),
    /// Pause, watching for the client to hang up.
    Sleep(Duration),
    /// Wait (at most 20 s) until the gate is opened, watching for the client to hang up.
    Wait(Arc<Gate>),
    /// Close the connection now.
    Close,
}

/// A one-shot signal from the test to the upstream.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }
    pub fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
    fn is_open(&self) -> bool {
        *self.open.lock().unwrap()
    }
}

/// A request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub head: String,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

#[derive(Default)]
struct Shared {
    requests: Mutex<Vec<Recorded>>,
    /// When the client closed a connection while the script was still running.
    hangups: Mutex<Vec<Instant>>,
    /// When the client closed a kept-alive connection between requests.
    idle_closes: Mutex<Vec<Instant>>,
    /// Connections accepted.
    connections: AtomicUsize,
    keep_alive: bool,
    stop: AtomicBool,
}

type Handler = dyn Fn(&Recorded) -> Vec<Step> + Send + Sync;

/// A running upstream; stops on drop.
pub struct Upstream {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Upstream {
    /// Answer every request with `handler(request)`, one request per connection.
    pub fn start(handler: impl Fn(&Recorded) -> Vec<Step> + Send + Sync + 'static) -> Upstream {
        Self::spawn(handler, false)
    }

    /// Like [`start`](Self::start), but a connection serves request after request until a script
    /// says [`Step::Close`] or the client closes it.
    pub fn keep_alive(handler: impl Fn(&Recorded) -> Vec<Step> + Send + Sync + 'static) -> Upstream {
        Self::spawn(handler, true)
    }

    fn spawn(handler: impl Fn(&Recorded) -> Vec<Step> + Send + Sync + 'static, keep_alive: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared { keep_alive, ..Shared::default() });
        let handler: Arc<Handler> = Arc::new(handler);
        let sh = shared.clone();
        std::thread::spawn(move || {
            while !sh.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        sh.connections.fetch_add(1, Ordering::SeqCst);
                        let sh = sh.clone();
                        let h = handler.clone();
                        std::thread::spawn(move || serve(s, &sh, &*h));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Upstream { port, shared }
    }

    /// `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// How many kept-alive connections the client closed between requests.
    pub fn idle_closes(&self) -> usize {
        self.shared.idle_closes.lock().unwrap().len()
    }

    /// Wait up to `within` until the client has closed `n` kept-alive connections while idle.
    pub fn wait_idle_closes(&self, n: usize, within: Duration) -> bool {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if self.idle_closes() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Wait up to `within` for the client to hang up on a running script.
    pub fn wait_hangup(&self, within: Duration) -> Option<Instant> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(t) = self.shared.hangups.lock().unwrap().first() {
                return Some(*t);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn find(hay: &[u8], pat: &[u8]) -> Option<usize> {
    hay.windows(pat.len()).position(|w| w == pat)
}

/// Why no request came.
enum NoRequest {
    /// The client closed the connection before sending anything.
    Closed,
    /// Anything else (timeout, partial request, error, upstream stopping).
    Other,
}

/// Read one request; waits until `wait_until` (or the upstream stops) for its first byte.
fn read_request(s: &mut TcpStream, sh: &Shared, wait_until: Instant) -> Result<Recorded, NoRequest> {
    s.set_read_timeout(Some(Duration::from_millis(50))).map_err(|_| NoRequest::Other)?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut tmp) {
            Ok(0) if buf.is_empty() => return Err(NoRequest::Closed),
            Ok(0) => return Err(NoRequest::Other),
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if sh.stop.load(Ordering::SeqCst) || Instant::now() >= wait_until {
                    return Err(NoRequest::Other);
                }
            }
            Err(_) => return Err(NoRequest::Other),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|_| NoRequest::Other)?;
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let rec = Recorded { head, body: Vec::new() };
    let len: usize = rec.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut tmp).map_err(|_| NoRequest::Other)?;
        if n == 0 {
            return Err(NoRequest::Other);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Ok(Recorded { body: buf[head_end..head_end + len].to_vec(), ..rec })
}

/// Whether the peer closed the connection, waiting at most `d`.
fn hung_up(s: &mut TcpStream, d: Duration) -> bool {
    let _ = s.set_read_timeout(Some(d.max(Duration::from_millis(1))));
    let mut tmp = [0u8; 64];
    match s.read(&mut tmp) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
    }
}

fn serve(mut s: TcpStream, sh: &Shared, handler: &Handler) {
    let _ = s.set_nodelay(true);
    let mut first = true;
    loop {
        // A kept-alive connection may sit idle in the client's pool for a long time.
        let wait = if first { Duration::from_secs(10) } else { Duration::from_secs(600) };
        let req = match read_request(&mut s, sh, Instant::now() + wait) {
            Ok(r) => r,
            Err(NoRequest::Closed) if !first => {
                sh.idle_closes.lock().unwrap().push(Instant::now());
                return;
            }
            Err(_) => return,
        };
        first = false;
        if !serve_one(&mut s, sh, handler, req) || !sh.keep_alive {
            return;
        }
    }
}

/// Run the script for one request; false when the connection is done.
fn serve_one(s: &mut TcpStream, sh: &Shared, handler: &Handler, req: Recorded) -> bool {
    sh.requests.lock().unwrap().push(req.clone());
    let hangup = || sh.hangups.lock().unwrap().push(Instant::now());
    for step in handler(&req) {
        match step {
            Step::Write(b) => {
                if s.write_all(&b).is_err() {
                    hangup();
                    return false;
                }
            }
            Step::Sleep(d) => {
                let end = Instant::now() + d;
                while Instant::now() < end {
                    if hung_up(s, Duration::from_millis(20).min(end - Instant::now())) {
                        hangup();
                        return false;
                    }
                }
            }
            Step::Wait(g) => {
                let end = Instant::now() + Duration::from_secs(20);
                while !g.is_open() && Instant::now() < end {
                    if hung_up(s, Duration::from_millis(20)) {
                        hangup();
                        return false;
                    }
                }
            }
            Step::Close => return false,
        }
    }
    true
}

// ---- response builders ----

/// A `200` head for a chunked SSE body.
pub fn sse_head() -> Step {
    Step::Write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
          Transfer-Encoding: chunked\r\n\r\n"
            .to_vec(),
    )
}

/// One HTTP chunk.
pub fn chunk(data: &[u8]) -> Step {
    let mut v = format!("{:x}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v.extend_from_slice(b"\r\n");
    Step::Write(v)
}

/// The last chunk.
pub fn end_chunks() -> Step {
    Step::Write(b"0\r\n\r\n".to_vec())
}

/// `data: <json>\n\n` of a content delta.
pub fn content(text: &str) -> String {
    let v = serde_json::json!({"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,"model":"m",
        "choices":[{"index":0,"delta":{"content":text},"finish_reason":null}]});
    format!("data: {v}\n\n")
}

/// The role chunk llama.cpp sends first.
pub fn role() -> String {
    "data: {\"id\":\"chatcmpl-up\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\
     \"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null},\"finish_reason\":null}]}\n\n"
        .to_string()
}

/// The finish chunk.
pub fn finish(reason: &str) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-up\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\
         \"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"{reason}\"}}]}}\n\n"
    )
}

/// The usage chunk of `stream_options.include_usage`.
pub fn usage(prompt: u64, completion: u64) -> String {
    format!(
        "data: {{\"id\":\"chatcmpl-up\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\
         \"choices\":[],\"usage\":{{\"prompt_tokens\":{prompt},\"completion_tokens\":{completion},\"total_tokens\":{}}}}}\n\n",
        prompt + completion
    )
}

pub const DONE: &str = "data: [DONE]\n\n";

/// A `200` JSON completion with a `Content-Length` body (what an upstream answers a request
/// without `stream: true`).
pub fn json_reply(text: &str) -> Vec<Step> {
    let body = serde_json::json!({"id":"chatcmpl-up","object":"chat.completion","created":1,"model":"m",
        "choices":[{"index":0,"message":{"role":"assistant","content":text},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}})
    .to_string();
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    vec![Step::Write([head.into_bytes(), body.into_bytes()].concat())]
}

/// An error response with a JSON body and a `Content-Length`.
pub fn status_reply(code: u16, message: &str) -> Vec<Step> {
    let body = serde_json::json!({"error":{"message":message,"type":"server_error"}}).to_string();
    let head =
        format!("HTTP/1.1 {code} Oops\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    vec![Step::Write([head.into_bytes(), body.into_bytes()].concat())]
}

/// A complete, well-formed streamed reply: one chunk per record.
pub fn stream_reply(records: &[String]) -> Vec<Step> {
    let mut v = vec![sse_head()];
    v.extend(records.iter().map(|r| chunk(r.as_bytes())));
    v.push(end_chunks());
    v
}
