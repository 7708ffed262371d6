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

use std::cell::{Cell, RefCell};
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
    /// The second this thread last stamped and its `2026-01-02T03:04:05.` prefix: the date is
    /// computed once a second, not per line.
    static STAMP: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
    /// The last session key this thread hashed and its hash: a sticky session's turns (and a
    /// stream's line after its run) reuse it instead of hashing per line.
    static LAST_HASH: RefCell<(String, [u8; 12])> = const { RefCell::new((String::new(), [0; 12])) };
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

/// Append `2026-01-02T03:04:05.678Z` for `ms` (Unix milliseconds).
fn push_timestamp(out: &mut Vec<u8>, ms: u64) {
    let secs = ms / 1000;
    let (at, mut prefix) = STAMP.get();
    if at != secs {
        prefix = date_prefix(secs);
        STAMP.set((secs, prefix));
    }
    out.extend_from_slice(&prefix);
    let ms = ms % 1000;
    out.extend_from_slice(&[b'0' + (ms / 100) as u8, b'0' + (ms / 10 % 10) as u8, b'0' + (ms % 10) as u8, b'Z']);
}

/// `2026-01-02T03:04:05.` for Unix second `secs`.
fn date_prefix(secs: u64) -> [u8; 20] {
    let (year, month, day) = crate::util::civil_from_days((secs / 86400) as i64);
    let rem = secs % 86400;
    let two = |n: u64| [b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8];
    let y = year.clamp(0, 9999) as u64;
    let mut p = [0u8; 20];
    p[..4].copy_from_slice(&[
        b'0' + (y / 1000) as u8,
        b'0' + (y / 100 % 10) as u8,
        b'0' + (y / 10 % 10) as u8,
        b'0' + (y % 10) as u8,
    ]);
    p[4] = b'-';
    p[5..7].copy_from_slice(&two(month.into()));
    p[7] = b'-';
    p[8..10].copy_from_slice(&two(day.into()));
    p[10] = b'T';
    p[11..13].copy_from_slice(&two(rem / 3600));
    p[13] = b':';
    p[14..16].copy_from_slice(&two(rem % 3600 / 60));
    p[16] = b':';
    p[17..19].copy_from_slice(&two(rem % 60));
    p[19] = b'.';
    p
}

fn json_prefix(out: &mut Vec<u8>, l: Level) {
    out.extend_from_slice(b"{\"ts\":\"");
    push_timestamp(out, crate::util::now_ms());
    out.extend_from_slice(b"\",\"level\":\"");
    out.extend_from_slice(l.as_str().as_bytes());
    out.push(b'"');
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
    with_line(|s| {
        if JSON.load(Relaxed) {
            json_prefix(s, l);
            s.extend_from_slice(b",\"msg\":");
            match args.as_str() {
                Some(msg) => push_json_str(s, msg),
                None => push_json_str(s, &args.to_string()),
            }
            s.push(b'}');
        } else {
            use std::io::Write as _;
            s.extend_from_slice(b"gatelet: ");
            s.extend_from_slice(l.as_str().as_bytes());
            s.extend_from_slice(b": ");
            // Formatted straight into the line; writing to a Vec cannot fail.
            let _ = s.write_fmt(args);
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

/// SHA-256's initial state (FIPS 180-4 §5.3.3).
const SHA256_IV: [u32; 8] =
    [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/// The first 6 bytes of SHA-256(`key`), in lower-case hex. A key of up to 55 bytes (every
/// generated one) is padded by hand into one block and compressed once: the generic digest's
/// buffering and finalisation cost more than the compression itself.
fn hash_hex(key: &str) -> [u8; 12] {
    use sha2::{Digest, Sha256};
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let k = key.as_bytes();
    let mut head = [0u8; 6];
    if k.len() <= 55 {
        let mut block = [0u8; 64];
        block[..k.len()].copy_from_slice(k);
        block[k.len()] = 0x80;
        block[56..].copy_from_slice(&(k.len() as u64 * 8).to_be_bytes());
        let mut state = SHA256_IV;
        sha2::block_api::compress256(&mut state, &[block]);
        head[..4].copy_from_slice(&state[0].to_be_bytes());
        head[4..].copy_from_slice(&state[1].to_be_bytes()[..2]);
    } else {
        head.copy_from_slice(&Sha256::digest(k)[..6]);
    }
    let mut out = [0u8; 12];
    for (i, b) in head.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 15) as usize];
    }
    out
}

/// Append [`session_hash`] of `key`, reusing this thread's last one when the key is the same.
fn push_session_hash(out: &mut Vec<u8>, key: &str) {
    let cached = LAST_HASH.with(|c| {
        let mut c = c.try_borrow_mut().ok()?;
        if c.0 != key {
            // Very long keys are hashed every time rather than kept.
            if key.len() > 1024 {
                return None;
            }
            c.1 = hash_hex(key);
            c.0.clear();
            c.0.push_str(key);
        }
        Some(c.1)
    });
    out.extend_from_slice(&cached.unwrap_or_else(|| hash_hex(key)));
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
    let json = JSON.load(Relaxed);
    with_line(|s| access_line(s, a, path, json.then(crate::util::now_ms)));
}

/// The access line for `a`: JSON stamped `json_ms` when given, text otherwise.
fn access_line(s: &mut Vec<u8>, a: &Access<'_>, path: &str, json_ms: Option<u64>) {
    if let Some(ms) = json_ms {
        s.extend_from_slice(b"{\"ts\":\"");
        push_timestamp(s, ms);
        s.extend_from_slice(b"\",\"level\":\"info\"");
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

    fn stamp(ms: u64) -> String {
        let mut v = Vec::new();
        push_timestamp(&mut v, ms);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(stamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(stamp(951_782_400_007), "2000-02-29T00:00:00.007Z");
        assert_eq!(stamp(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
        let now = crate::util::now_ms();
        let s = stamp(now);
        assert_eq!(s.len(), 24, "{s}");
        assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T' && s.starts_with("20"), "{s}");
    }

    #[test]
    fn the_per_second_date_is_recomputed_when_the_second_changes() {
        // Same second (cached prefix), next second, next day, and back: each must match the
        // stamp computed without the cache.
        for ms in [86_399_000, 86_399_998, 86_400_000, 86_399_500, 1_798_761_600_000, 1_798_761_599_001] {
            let fresh = {
                let mut v = date_prefix(ms / 1000).to_vec();
                v.extend_from_slice(format!("{:03}Z", ms % 1000).as_bytes());
                String::from_utf8(v).unwrap()
            };
            assert_eq!(stamp(ms), fresh);
        }
        assert_eq!(stamp(86_400_000), "1970-01-02T00:00:00.000Z");
        assert_eq!(stamp(86_399_998), "1970-01-01T23:59:59.998Z");
    }

    /// SHA-256 prefix computed here, independently of the cache.
    fn documented_hash(key: &str) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(key.as_bytes())[..6].iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn session_hash_is_the_sha256_prefix_with_or_without_the_cache() {
        // The FIPS 180-2 "abc" vector: SHA-256 = ba7816bf8f01cfea…
        assert_eq!(session_hash("abc"), "ba7816bf8f01");
        assert_eq!(documented_hash("abc"), "ba7816bf8f01");
        // Repeated (cache hit), alternating (miss each time), empty and over-long keys.
        let long = "k".repeat(5000);
        for key in ["agent:main:x", "agent:main:x", "agent:main:y", "agent:main:x", "", &long, &long, "agent:main:y"] {
            assert_eq!(session_hash(key), documented_hash(key), "{key:.20}");
        }
        assert_ne!(session_hash("agent:main:x"), session_hash("agent:main:y"));
        assert_eq!(session_hash("k").len(), 12);
        // Every length around the one-block limit (55 bytes) and past two blocks.
        for n in 0..=140 {
            let key: String = (0..n).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect();
            assert_eq!(session_hash(&key), documented_hash(&key), "length {n}");
        }
    }

    fn line(a: &Access<'_>, json_ms: Option<u64>) -> String {
        let mut v = Vec::new();
        access_line(&mut v, a, a.path, json_ms);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn access_lines_keep_their_documented_format() {
        let full = Access {
            method: "POST",
            path: "/v1/chat/completions",
            status: 200,
            bytes: 1234,
            duration: Duration::from_micros(12_345),
            agent: Some("main"),
            session_key: Some("abc"),
            request_id: Some("chatcmpl-1"),
        };
        assert_eq!(
            line(&full, None),
            "gatelet: info: access method=POST path=/v1/chat/completions status=200 bytes=1234 \
             duration_ms=12.345 agent=main session=ba7816bf8f01 request_id=chatcmpl-1"
        );
        assert_eq!(
            line(&full, Some(1_798_761_599_999)),
            "{\"ts\":\"2026-12-31T23:59:59.999Z\",\"level\":\"info\",\"msg\":\"access\",\"method\":\"POST\",\
             \"path\":\"/v1/chat/completions\",\"status\":200,\"bytes\":1234,\"duration_ms\":12.345,\"agent\":\"main\",\
             \"session\":\"ba7816bf8f01\",\"request_id\":\"chatcmpl-1\"}"
        );
        let bare = Access {
            method: "-",
            path: "/a \"b\"\n",
            status: 400,
            bytes: 0,
            duration: Duration::ZERO,
            agent: None,
            session_key: None,
            request_id: None,
        };
        assert_eq!(
            line(&bare, None),
            "gatelet: info: access method=- path=/a?\"b\"? status=400 bytes=0 duration_ms=0.000 agent=- session=- \
             request_id=-"
        );
        let j: serde_json::Value = serde_json::from_str(&line(&bare, Some(0))).unwrap();
        assert_eq!(j["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(j["path"], "/a \"b\"\n");
        assert!(j["agent"].is_null() && j["session"].is_null() && j["request_id"].is_null(), "{j}");
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
