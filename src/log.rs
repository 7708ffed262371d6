//! One-line-per-event logging to stderr, filtered by `GATELET_LOG` (or `gateway.log.level`),
//! as text or, with `GATELET_LOG_FORMAT=json` (or `gateway.log.format: "json"`), one JSON object
//! per line.
//!
//! Once [`start_writer`] has run (the gateway does it), lines are appended to a bounded buffer
//! that a logger thread swaps out and writes: the only thing a serving thread waits for is a
//! `memcpy` under a mutex the logger holds just long enough to swap buffers. A stderr pipe
//! nobody reads fills the buffer, and further lines are dropped and counted ([`dropped`],
//! exported in `/metrics`) instead of stalling the event loop. Before that (CLI commands,
//! tests) lines are written directly.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Severity, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something failed.
    Error = 1,
    /// Something is off but work goes on.
    Warn = 2,
    /// Lifecycle events and the access log.
    Info = 3,
    /// Per-request detail.
    Debug = 4,
    /// Everything.
    Trace = 5,
}

impl Level {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }

    /// Parse a level name (case-insensitive).
    pub fn parse(s: &str) -> Option<Level> {
        Some(match s.to_ascii_lowercase().as_str() {
            "error" => Level::Error,
            "warn" | "warning" => Level::Warn,
            "info" => Level::Info,
            "debug" => Level::Debug,
            "trace" => Level::Trace,
            _ => return None,
        })
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static JSON: AtomicBool = AtomicBool::new(false);
static ACCESS: AtomicBool = AtomicBool::new(true);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static WRITER: OnceLock<Queue> = OnceLock::new();

/// Most bytes waiting for the logger thread; lines beyond are dropped.
const QUEUE_BYTES: usize = 1 << 20;
/// Longest line kept; longer ones are cut (a log line is not a transport).
const MAX_LINE: usize = 16 * 1024;

/// Lines waiting for the logger thread.
struct Queue {
    buf: Mutex<Vec<u8>>,
    wake: Condvar,
    /// The logger thread waits on `wake` (set under `buf`'s lock): only then does a writer
    /// need to notify it.
    idle: AtomicBool,
}

thread_local! {
    /// Per-thread scratch for building a line without allocating.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// Set the level and format from `GATELET_LOG` / `GATELET_LOG_FORMAT` (defaults `info`, text).
/// Unknown values keep the default and warn.
pub fn init_from_env() {
    apply(None, None, true);
}

/// Apply logging settings: the environment (`GATELET_LOG`, `GATELET_LOG_FORMAT`) wins over
/// `level` / `format` from the config file; `access` turns the access log on or off. Called at
/// start and on every config reload.
pub fn apply(level: Option<Level>, format: Option<&str>, access: bool) {
    let env_level = std::env::var("GATELET_LOG").unwrap_or_default();
    let l = if env_level.is_empty() {
        level.unwrap_or(Level::Info)
    } else {
        Level::parse(&env_level).unwrap_or_else(|| {
            let msg = format!("GATELET_LOG={env_level:?} is not error/warn/info/debug/trace; using info");
            write(Level::Warn, format_args!("{msg}"));
            Level::Info
        })
    };
    LEVEL.store(l as u8, Relaxed);
    let env_format = std::env::var("GATELET_LOG_FORMAT").unwrap_or_default();
    let f = if env_format.is_empty() { format.unwrap_or("text").to_string() } else { env_format.to_ascii_lowercase() };
    match f.as_str() {
        "json" => JSON.store(true, Relaxed),
        "text" => JSON.store(false, Relaxed),
        other => {
            JSON.store(false, Relaxed);
            write(Level::Warn, format_args!("GATELET_LOG_FORMAT={other:?} is not text/json; using text"));
        }
    }
    ACCESS.store(access, Relaxed);
}

/// Whether `l` is logged.
pub fn enabled(l: Level) -> bool {
    l as u8 <= LEVEL.load(Relaxed)
}

/// Whether access-log lines are written (`info` enabled and the access log on).
pub fn access_enabled() -> bool {
    ACCESS.load(Relaxed) && enabled(Level::Info)
}

/// Lines dropped because the logger thread could not keep up with stderr.
pub fn dropped() -> u64 {
    DROPPED.load(Relaxed)
}

/// Start the logger thread: from now on lines are queued, never written by the caller. Panics
/// are logged through it too, so a panic message cannot block on a full stderr either.
pub fn start_writer() {
    let q =
        Queue { buf: Mutex::new(Vec::with_capacity(64 * 1024)), wake: Condvar::new(), idle: AtomicBool::new(false) };
    if WRITER.set(q).is_err() {
        return;
    }
    let spawned = std::thread::Builder::new().name("gatelet-log".into()).spawn(writer);
    if spawned.is_err() {
        eprintln!("gatelet: warn: cannot start the logger thread; log lines will be dropped");
    }
    std::panic::set_hook(Box::new(|info| {
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(non-string payload)".into());
        let thread = std::thread::current().name().unwrap_or("?").to_string();
        write(Level::Error, format_args!("panic in thread {thread}{at}: {msg}"));
    }));
}

/// While lines come fast, the logger thread collects them for this long between writes
/// instead of being woken for each one: a wake-up per line (a futex call and a context switch)
/// would cost the serving threads more than the line itself.
const BATCH_WAIT: Duration = Duration::from_millis(10);

fn writer() {
    use std::io::Write;
    let Some(q) = WRITER.get() else { return };
    let mut out = Vec::with_capacity(64 * 1024);
    let mut last_write: Option<Instant> = None;
    loop {
        {
            let mut b = q.buf.lock().unwrap_or_else(|e| e.into_inner());
            while b.is_empty() {
                q.idle.store(true, Relaxed);
                b = q.wake.wait(b).unwrap_or_else(|e| e.into_inner());
            }
            q.idle.store(false, Relaxed);
            std::mem::swap(&mut *b, &mut out);
        }
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(&out);
        let _ = err.flush();
        drop(err);
        out.clear();
        if out.capacity() > 1 << 20 {
            out.shrink_to(64 * 1024);
        }
        // Two writes within BATCH_WAIT mean lines are coming fast: collect for a while before
        // the next one. A quiet gateway's lines are written as they come.
        let now = Instant::now();
        let busy = last_write.is_some_and(|t| now.duration_since(t) < BATCH_WAIT);
        last_write = Some(now);
        if busy {
            std::thread::sleep(BATCH_WAIT);
        }
    }
}

/// Wait (at most `timeout`) until queued lines are written: call before exiting.
pub fn flush(timeout: Duration) {
    let Some(q) = WRITER.get() else { return };
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let empty = q.buf.lock().map(|b| b.is_empty()).unwrap_or(true);
        if empty && q.idle.load(Relaxed) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Queue one line (UTF-8, without its newline).
fn emit(line: &[u8]) {
    let mut cut = line.len().min(MAX_LINE);
    // Back to a character boundary: continuation bytes are 0b10xxxxxx.
    while cut < line.len() && cut > 0 && line[cut] & 0xC0 == 0x80 {
        cut -= 1;
    }
    let (line, ellipsis) = (&line[..cut], cut < line.len());
    let Some(q) = WRITER.get() else {
        eprintln!("{}{}", String::from_utf8_lossy(line), if ellipsis { "…" } else { "" });
        return;
    };
    let mut b = q.buf.lock().unwrap_or_else(|e| e.into_inner());
    if b.len() + line.len() + 4 > QUEUE_BYTES {
        drop(b);
        DROPPED.fetch_add(1, Relaxed);
        return;
    }
    b.extend_from_slice(line);
    if ellipsis {
        b.extend_from_slice("…".as_bytes());
    }
    b.push(b'\n');
    drop(b);
    if q.idle.load(Relaxed) {
        q.wake.notify_one();
    }
}

/// Build a line in this thread's scratch buffer and queue it.
fn with_line(f: impl FnOnce(&mut Vec<u8>)) {
    LINE.with(|l| match l.try_borrow_mut() {
        Ok(mut v) => {
            v.clear();
            f(&mut v);
            emit(&v);
            if v.capacity() > 64 * 1024 {
                v.shrink_to(512);
            }
        }
        // Re-entered (a panic while a line was being built): use a fresh buffer.
        Err(_) => {
            let mut v = Vec::new();
            f(&mut v);
            emit(&v);
        }
    });
}

/// `2026-01-02T03:04:05.678Z` for now.
fn timestamp(out: &mut String) {
    let ms = crate::util::now_ms();
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let (year, month, day) = crate::util::civil_from_days(days);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    );
}

fn json_prefix(out: &mut Vec<u8>, l: Level) {
    let mut s = String::with_capacity(64);
    s.push_str("{\"ts\":\"");
    timestamp(&mut s);
    let _ = write!(s, "\",\"level\":\"{}\"", l.as_str());
    out.extend_from_slice(s.as_bytes());
}

fn push_json_str(out: &mut Vec<u8>, v: &str) {
    // serde_json's string escaping; a `&str` cannot fail to serialize.
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// Printable ASCII only: a crafted path or header cannot forge a second line or a field.
fn push_clean(out: &mut Vec<u8>, v: &str) {
    out.extend(v.bytes().map(|b| if b.is_ascii_graphic() { b } else { b'?' }));
}

/// Write one line.
pub fn write(l: Level, args: std::fmt::Arguments<'_>) {
    let msg = args.to_string();
    with_line(|s| {
        if JSON.load(Relaxed) {
            json_prefix(s, l);
            s.extend_from_slice(b",\"msg\":");
            push_json_str(s, &msg);
            s.push(b'}');
        } else {
            s.extend_from_slice(b"gatelet: ");
            s.extend_from_slice(l.as_str().as_bytes());
            s.extend_from_slice(b": ");
            s.extend_from_slice(msg.as_bytes());
        }
    });
}

/// One access-log record (SPEC §9).
#[derive(Debug)]
pub struct Access<'a> {
    /// Request method (`-` when the head could not be parsed).
    pub method: &'a str,
    /// Request path without the query (`-` when unknown).
    pub path: &'a str,
    /// Response status.
    pub status: u16,
    /// Response bytes written, head included.
    pub bytes: u64,
    /// From the complete request head to the last response byte queued or written.
    pub duration: Duration,
    /// The agent that answered, when the request reached one.
    pub agent: Option<&'a str>,
    /// The session key; only a short hash of it is logged.
    pub session_key: Option<&'a str>,
    /// The `x-request-id` sent back, if any.
    pub request_id: Option<&'a str>,
}

/// Short SHA-256 prefix of a session key: correlates lines without writing the key itself.
pub fn session_hash(key: &str) -> String {
    let mut v = Vec::with_capacity(12);
    push_session_hash(&mut v, key);
    String::from_utf8_lossy(&v).into_owned()
}

fn push_session_hash(out: &mut Vec<u8>, key: &str) {
    use sha2::{Digest, Sha256};
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in &Sha256::digest(key.as_bytes())[..6] {
        out.push(HEX[(b >> 4) as usize]);
        out.push(HEX[(b & 15) as usize]);
    }
}

/// `<ms>.<µs>` without going through float formatting.
fn push_millis(out: &mut Vec<u8>, d: Duration) {
    let us = d.as_micros().min(u64::MAX as u128) as u64;
    crate::util::push_decimal(out, us / 1000);
    out.push(b'.');
    let frac = us % 1000;
    out.extend_from_slice(&[b'0' + (frac / 100) as u8, b'0' + (frac / 10 % 10) as u8, b'0' + (frac % 10) as u8]);
}

/// Write an access-log line at `info` (when the access log is on). Built by hand into one
/// buffer: this runs once per request.
pub fn access(a: &Access<'_>) {
    if !access_enabled() {
        return;
    }
    let mut cut = a.path.len().min(512);
    while !a.path.is_char_boundary(cut) {
        cut -= 1;
    }
    let path = &a.path[..cut];
    with_line(|s| access_line(s, a, path));
}

fn access_line(s: &mut Vec<u8>, a: &Access<'_>, path: &str) {
    if JSON.load(Relaxed) {
        json_prefix(s, Level::Info);
        s.extend_from_slice(b",\"msg\":\"access\",\"method\":");
        push_json_str(s, a.method);
        s.extend_from_slice(b",\"path\":");
        push_json_str(s, path);
        s.extend_from_slice(b",\"status\":");
        crate::util::push_decimal(s, a.status.into());
        s.extend_from_slice(b",\"bytes\":");
        crate::util::push_decimal(s, a.bytes);
        s.extend_from_slice(b",\"duration_ms\":");
        push_millis(s, a.duration);
        s.extend_from_slice(b",\"agent\":");
        match a.agent {
            Some(v) => push_json_str(s, v),
            None => s.extend_from_slice(b"null"),
        }
        s.extend_from_slice(b",\"session\":");
        match a.session_key {
            Some(k) => {
                s.push(b'"');
                push_session_hash(s, k);
                s.push(b'"');
            }
            None => s.extend_from_slice(b"null"),
        }
        s.extend_from_slice(b",\"request_id\":");
        match a.request_id {
            Some(v) => push_json_str(s, v),
            None => s.extend_from_slice(b"null"),
        }
        s.push(b'}');
    } else {
        s.extend_from_slice(b"gatelet: info: access method=");
        push_clean(s, a.method);
        s.extend_from_slice(b" path=");
        push_clean(s, path);
        s.extend_from_slice(b" status=");
        crate::util::push_decimal(s, a.status.into());
        s.extend_from_slice(b" bytes=");
        crate::util::push_decimal(s, a.bytes);
        s.extend_from_slice(b" duration_ms=");
        push_millis(s, a.duration);
        s.extend_from_slice(b" agent=");
        push_clean(s, a.agent.unwrap_or("-"));
        s.extend_from_slice(b" session=");
        match a.session_key {
            Some(k) => push_session_hash(s, k),
            None => s.push(b'-'),
        }
        s.extend_from_slice(b" request_id=");
        push_clean(s, a.request_id.unwrap_or("-"));
    }
}

/// Log at a level: `log!(Info, "listening on {addr}")`.
#[macro_export]
macro_rules! log {
    ($lvl:ident, $($arg:tt)*) => {
        if $crate::log::enabled($crate::log::Level::$lvl) {
            $crate::log::write($crate::log::Level::$lvl, format_args!($($arg)*));
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let mut s = String::new();
        timestamp(&mut s);
        assert_eq!(s.len(), 24, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
        assert!(s.starts_with("20"), "{s}");
    }

    #[test]
    fn session_hash_is_short_and_stable() {
        assert_eq!(session_hash("agent:main:x"), session_hash("agent:main:x"));
        assert_ne!(session_hash("agent:main:x"), session_hash("agent:main:y"));
        assert_eq!(session_hash("k").len(), 12);
        assert!(session_hash("k").bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn millis_have_three_decimals() {
        let mut v = Vec::new();
        push_millis(&mut v, Duration::from_micros(1_234_567));
        assert_eq!(v, b"1234.567");
        v.clear();
        push_millis(&mut v, Duration::from_micros(5));
        assert_eq!(v, b"0.005");
    }

    #[test]
    fn text_fields_cannot_forge_lines() {
        let mut v = Vec::new();
        push_clean(&mut v, "/a b\nx=1\u{e9}");
        assert_eq!(v, b"/a?b?x=1??");
    }

    #[test]
    fn level_names_round_trip() {
        for l in [Level::Error, Level::Warn, Level::Info, Level::Debug, Level::Trace] {
            assert_eq!(Level::parse(l.as_str()), Some(l));
        }
        assert_eq!(Level::parse("loud"), None);
    }
}
