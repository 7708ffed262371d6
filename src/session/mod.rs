//! Sticky sessions: the conversation history behind a session key.
//!
//! Ephemeral sessions (`agent:<id>:openai:<random>`) are never stored. Sticky sessions keep their
//! transcript here; `persist` adds an append-only JSONL file per session (SPEC §7), see
//! [`persist`] for the layout.
//!
//! Locking: the key → session map is locked only for lookups and inserts; each session has its
//! own lock, held across that session's disk writes and nobody else's; its summary (for lists)
//! sits behind a third lock never held across I/O. So sessions never wait on each other's disk
//! writes, and listing never waits on a disk write at all.

pub mod cli;
pub mod message;
pub mod persist;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::util::now_ms;
pub use message::{ChatMessage, Role, ToolFields, Usage};

/// One transcript entry.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredMessage {
    /// Who said it.
    pub role: Role,
    /// Text.
    pub content: String,
    /// The content as sent when it was not plain text (parts, or `null` beside tool calls).
    #[serde(rename = "rawContent", skip_serializing_if = "Option::is_none")]
    pub raw_content: Option<serde_json::Value>,
    /// Unix milliseconds.
    pub timestamp: u64,
    /// Usage of the turn (on assistant messages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Tool-calling fields of the message (`tool_call_id`, `tool_calls`, `name`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<ToolFields>,
    /// The reply was cut short by a cancel, timeout or error.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub aborted: bool,
}

/// A summary row of `sessions.list`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    /// Session key.
    pub key: String,
    /// Owning agent.
    pub agent_id: String,
    /// Stable id (file name of the transcript).
    pub session_id: String,
    /// Unix milliseconds of the last change.
    pub updated_at: u64,
    /// Sum of prompt tokens over the session's runs.
    pub input_tokens: u64,
    /// Sum of completion tokens over the session's runs.
    pub output_tokens: u64,
    /// Transcript length.
    pub message_count: usize,
}

/// Why a client's session key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyError {
    /// Over [`MAX_KEY_BYTES`] bytes, or a byte outside printable ASCII (SPEC §5).
    Invalid,
}

impl std::fmt::Display for KeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyError::Invalid => write!(f, "must be at most {MAX_KEY_BYTES} printable ASCII characters"),
        }
    }
}

impl std::error::Error for KeyError {}

/// The longest session key a client may give.
pub const MAX_KEY_BYTES: usize = 256;

/// The session key of a run of agent `agent_id` (SPEC §5) and whether it is sticky: a given
/// key, prefixed with `agent:<id>:` unless it already is; else the `user`'s key; else a fresh
/// ephemeral key, never stored.
pub fn key_for(agent_id: &str, given: Option<&str>, user: Option<&str>) -> Result<(String, bool), KeyError> {
    if let Some(k) = given.filter(|k| !k.is_empty()) {
        if k.len() > MAX_KEY_BYTES || !k.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(KeyError::Invalid);
        }
        let prefix = format!("agent:{agent_id}:");
        let key = if k.starts_with(&prefix) { k.to_string() } else { format!("{prefix}{k}") };
        return Ok((key, true));
    }
    if let Some(u) = user {
        return Ok((format!("agent:{agent_id}:openai-user:{u}"), true));
    }
    Ok((format!("agent:{agent_id}:openai:{}", crate::util::random_hex(24)), false))
}

/// The agent id inside `agent:<id>:…`.
pub fn agent_of(key: &str) -> Option<&str> {
    key.strip_prefix("agent:")?.split(':').next()
}

/// Reads the time in Unix milliseconds; injectable so retention can be tested without waiting.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// How a [`SessionStore`] behaves.
#[derive(Clone)]
pub struct StoreOptions {
    /// Keep transcripts on disk.
    pub persist: bool,
    /// At most this many stored-plus-new messages go to the backend (0 = all).
    pub max_history: usize,
    /// Remove sessions untouched this long (`None` = keep forever).
    pub idle: Option<Duration>,
    /// The time source.
    pub clock: Clock,
    /// Run the background thread (index snapshots and retention). Off for a process that shares
    /// the state dir with a running gateway: only the gateway writes snapshots.
    pub background: bool,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("persist", &self.persist)
            .field("max_history", &self.max_history)
            .field("idle", &self.idle)
            .field("background", &self.background)
            .finish()
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { persist: false, max_history: 200, idle: None, clock: Arc::new(now_ms), background: true }
    }
}

/// The store options a config asks for.
pub fn options(cfg: &crate::config::Config) -> StoreOptions {
    StoreOptions {
        persist: cfg.persist_sessions,
        max_history: cfg.session_max_history,
        idle: cfg.session_idle_days.map(|d| Duration::from_secs(d * 86_400)),
        ..StoreOptions::default()
    }
}

/// How often the background thread looks for due snapshots (it is also woken by a long journal).
const BACKGROUND_TICK: Duration = Duration::from_secs(1);
/// How often idle sessions are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Slot {
    key: String,
    /// The summary; never held across I/O.
    info: Mutex<SessionInfo>,
    /// The transcript; held across this session's disk I/O.
    body: Mutex<Body>,
}

#[derive(Debug)]
struct Body {
    /// `None` until first used after start-up (read lazily from disk).
    messages: Option<Vec<StoredMessage>>,
    /// Whether the transcript file has its header.
    on_disk: bool,
    /// Removed from the store (delete, retention); a writer that finds this starts over.
    gone: bool,
}

#[derive(Debug)]
struct Inner {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    disk: Option<persist::Disk>,
    opts: StoreOptions,
    /// Wakes the background thread; `true` asks it to stop.
    wake: (Mutex<bool>, Condvar),
}

/// All sticky sessions, in memory and (optionally) on disk.
#[derive(Debug)]
pub struct SessionStore {
    inner: Arc<Inner>,
    background: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl SessionStore {
    /// A store that keeps everything in memory.
    pub fn in_memory() -> Self {
        Self::open_with(Path::new(""), StoreOptions::default()).0
    }

    /// A store persisted under `<state_dir>/agents/<id>/sessions/`, loading what is there.
    /// Load problems (torn lines, unreadable files) are returned as warnings.
    pub fn open(state_dir: &Path, persist: bool) -> (Self, Vec<String>) {
        Self::open_with(state_dir, StoreOptions { persist, ..StoreOptions::default() })
    }

    /// A store with explicit options. Loading reads the index, not the transcripts.
    pub fn open_with(state_dir: &Path, opts: StoreOptions) -> (Self, Vec<String>) {
        let mut map = HashMap::new();
        let mut warnings = Vec::new();
        let disk = if opts.persist {
            let t0 = Instant::now();
            let (disk, found, w) = persist::Disk::open(state_dir);
            warnings = w;
            for f in found {
                let slot = Slot {
                    key: f.info.key.clone(),
                    body: Mutex::new(Body { on_disk: true, messages: f.messages, gone: false }),
                    info: Mutex::new(f.info),
                };
                map.insert(slot.key.clone(), Arc::new(slot));
            }
            crate::log!(Debug, "sessions: {} loaded in {} ms", map.len(), t0.elapsed().as_millis());
            Some(disk)
        } else {
            None
        };
        let background = opts.background && (opts.persist || opts.idle.is_some());
        let inner = Arc::new(Inner { slots: Mutex::new(map), disk, opts, wake: (Mutex::new(false), Condvar::new()) });
        let handle = if background {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new().name("gatelet-sessions".into()).spawn(move || background_loop(weak)).ok()
        } else {
            None
        };
        (SessionStore { inner, background: Mutex::new(handle) }, warnings)
    }

    fn now(&self) -> u64 {
        (self.inner.opts.clock)()
    }

    fn slot(&self, key: &str) -> Option<Arc<Slot>> {
        lock(&self.inner.slots).get(key).cloned()
    }

    /// Read a session's transcript on first use; the summary is corrected from it if the index
    /// was behind (a crash between the transcript write and its journal line).
    fn ensure_loaded<'a>(&self, slot: &Slot, body: &'a mut Body) -> &'a mut Vec<StoredMessage> {
        if body.messages.is_none() {
            let info = lock(&slot.info).clone();
            let mut warnings = Vec::new();
            let read = self.inner.disk.as_ref().and_then(|d| d.read(&info, &mut warnings));
            for w in warnings {
                crate::log!(Warn, "{w}");
            }
            match read {
                Some((from_disk, messages)) => {
                    let mut i = lock(&slot.info);
                    let fixed = SessionInfo { updated_at: i.updated_at.max(from_disk.updated_at), ..from_disk };
                    let fixed = SessionInfo { key: i.key.clone(), agent_id: i.agent_id.clone(), ..fixed };
                    if *i != fixed {
                        *i = fixed.clone();
                        drop(i);
                        if let Some(d) = &self.inner.disk
                            && let Err(e) = d.put(&fixed)
                        {
                            crate::log!(Warn, "session {}: {e}", slot.key);
                        }
                    }
                    body.messages = Some(messages);
                }
                None => {
                    // Kept aside for a human, not appended to: a transcript without a readable
                    // header would lose every later turn too.
                    let aside = self.inner.disk.as_ref().and_then(|d| d.set_aside(&info));
                    let kept = aside.map(|p| format!(" (kept as {})", p.display())).unwrap_or_default();
                    crate::log!(
                        Warn,
                        "session {}: transcript missing or unreadable{kept}; continuing with an empty history",
                        slot.key
                    );
                    body.on_disk = false;
                    body.messages = Some(Vec::new());
                    let mut i = lock(&slot.info);
                    (i.message_count, i.input_tokens, i.output_tokens) = (0, 0, 0);
                }
            }
        }
        body.messages.get_or_insert_with(Vec::new)
    }

    /// The stored conversation of `key` (empty for unknown or ephemeral keys), all of it.
    pub fn history(&self, key: &str) -> Vec<ChatMessage> {
        self.context(key, &[], 0)
    }

    /// What a sticky run sends to the backend: the stored conversation of `key` followed by the
    /// request's new `turn`, bounded by `session.maxHistoryMessages` (see [`history_start`]).
    pub fn context_for_run(&self, key: &str, turn: &[ChatMessage]) -> Vec<ChatMessage> {
        self.context(key, turn, self.inner.opts.max_history)
    }

    fn context(&self, key: &str, turn: &[ChatMessage], max: usize) -> Vec<ChatMessage> {
        let Some(slot) = self.slot(key) else {
            let from = history_start(turn.len(), max, |i| turn[i].role);
            return turn[from..].to_vec();
        };
        let mut body = lock(&slot.body);
        let stored = self.ensure_loaded(&slot, &mut body);
        let n = stored.len();
        let role = |i: usize| if i < n { stored[i].role } else { turn[i - n].role };
        let from = history_start(n + turn.len(), max, role);
        let mut out: Vec<ChatMessage> = stored[from.min(n)..].iter().map(StoredMessage::to_chat).collect();
        out.extend_from_slice(&turn[from.saturating_sub(n)..]);
        out
    }

    /// Append a finished (or aborted) turn: the new request messages, then what the run produced
    /// (agent-tool calls and their results, then the reply; an empty reply when `produced` is
    /// empty). The last assistant message carries the usage and the `aborted` flag.
    pub fn append_turn(
        &self,
        key: &str,
        agent_id: &str,
        turn: &[ChatMessage],
        produced: &[ChatMessage],
        usage: Usage,
        aborted: bool,
    ) -> Result<(), String> {
        let empty = [ChatMessage::new(Role::Assistant, "")];
        let produced = if produced.is_empty() { &empty[..] } else { produced };
        let last = turn.len() + produced.iter().rposition(|m| m.role == Role::Assistant).unwrap_or(produced.len() - 1);
        loop {
            let now = self.now();
            let slot = lock(&self.inner.slots)
                .entry(key.to_string())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        key: key.to_string(),
                        info: Mutex::new(SessionInfo {
                            key: key.to_string(),
                            agent_id: agent_id.to_string(),
                            session_id: crate::util::random_hex(16),
                            updated_at: now,
                            input_tokens: 0,
                            output_tokens: 0,
                            message_count: 0,
                        }),
                        body: Mutex::new(Body { messages: Some(Vec::new()), on_disk: false, gone: false }),
                    })
                })
                .clone();
            let mut body = lock(&slot.body);
            if body.gone {
                // Deleted meanwhile: this turn starts a new session.
                continue;
            }
            self.ensure_loaded(&slot, &mut body);
            let new: Vec<StoredMessage> = turn
                .iter()
                .chain(produced)
                .enumerate()
                .map(|(i, m)| {
                    let mine = i == last;
                    StoredMessage {
                        role: m.role,
                        content: m.content.clone(),
                        raw_content: m.raw_content.clone(),
                        timestamp: now,
                        usage: mine.then_some(usage),
                        tool: m.tool.clone(),
                        aborted: mine && aborted,
                    }
                })
                .collect();
            let info = {
                let mut i = lock(&slot.info);
                i.updated_at = now;
                i.input_tokens += usage.prompt_tokens;
                i.output_tokens += usage.completion_tokens;
                i.message_count += new.len();
                i.clone()
            };
            let written = match &self.inner.disk {
                Some(d) => {
                    let r = d.append(&info, !body.on_disk, &new);
                    if r.is_ok() {
                        body.on_disk = true;
                    }
                    // The journal line comes after the transcript: a crash between the two leaves
                    // a transcript that load finds (and reads) or an entry one turn behind that
                    // the first use corrects.
                    r.and_then(|_| d.put(&info))
                }
                None => Ok(()),
            };
            body.messages.get_or_insert_with(Vec::new).extend(new);
            drop(body);
            if self.inner.disk.as_ref().is_some_and(|d| d.snapshot_due()) {
                self.inner.wake.1.notify_one();
            }
            return written;
        }
    }

    /// Transcript entries of `key`, the last `limit` when given.
    pub fn transcript(&self, key: &str, limit: Option<usize>) -> Option<Vec<StoredMessage>> {
        let slot = self.slot(key)?;
        let mut body = lock(&slot.body);
        if body.gone {
            return None;
        }
        let all = self.ensure_loaded(&slot, &mut body);
        let from = limit.map(|l| all.len().saturating_sub(l)).unwrap_or(0);
        Some(all[from..].to_vec())
    }

    /// The summary of `key`.
    pub fn info(&self, key: &str) -> Option<SessionInfo> {
        self.slot(key).map(|s| lock(&s.info).clone())
    }

    /// Every sticky session, most recently updated first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.slots).values().cloned().collect();
        let mut v: Vec<SessionInfo> = slots.iter().map(|s| lock(&s.info).clone()).collect();
        v.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then_with(|| a.key.cmp(&b.key)));
        v
    }

    /// How many sticky sessions there are.
    pub fn count(&self) -> usize {
        lock(&self.inner.slots).len()
    }

    /// Clear the history of `key`, keeping the key. False when unknown.
    pub fn reset(&self, key: &str) -> Result<bool, String> {
        let Some(slot) = self.slot(key) else { return Ok(false) };
        let mut body = lock(&slot.body);
        if body.gone {
            return Ok(false);
        }
        let info = {
            let mut i = lock(&slot.info);
            i.message_count = 0;
            i.input_tokens = 0;
            i.output_tokens = 0;
            i.updated_at = self.now();
            i.clone()
        };
        body.messages = Some(Vec::new());
        if let Some(d) = &self.inner.disk {
            d.rewrite(&info, &[])?;
            body.on_disk = true;
            d.put(&info)?;
        }
        Ok(true)
    }

    /// Forget `key` and its transcript. False when unknown.
    pub fn delete(&self, key: &str) -> Result<bool, String> {
        let slot = lock(&self.inner.slots).get(key).cloned();
        match slot {
            Some(slot) => self.inner.remove(&slot, None),
            None => Ok(false),
        }
    }

    /// Remove every session untouched for `session.idleDays`; returns how many went. The
    /// background thread calls this every minute; each removal waits only for its own session.
    pub fn sweep_idle(&self) -> usize {
        self.inner.sweep_idle()
    }

    /// Write the index snapshots whose journal has grown long (what the background thread does).
    pub fn snapshot_if_due(&self) {
        if let Some(d) = &self.inner.disk {
            for e in d.snapshot(false) {
                crate::log!(Warn, "session index snapshot failed: {e}");
            }
        }
    }

    /// Write the index snapshots now (on drain): the next start reads no journal.
    pub fn flush(&self) -> Result<(), String> {
        let Some(d) = &self.inner.disk else { return Ok(()) };
        let errors = d.snapshot(true);
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
    }
}

impl Inner {
    /// Remove a session (only if untouched since `older_than`, when given).
    fn remove(&self, slot: &Arc<Slot>, older_than: Option<u64>) -> Result<bool, String> {
        let mut body = lock(&slot.body);
        if body.gone {
            return Ok(false);
        }
        let info = lock(&slot.info).clone();
        if older_than.is_some_and(|t| info.updated_at >= t) {
            return Ok(false);
        }
        body.gone = true;
        {
            let mut map = lock(&self.slots);
            if map.get(&slot.key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                map.remove(&slot.key);
            }
        }
        if let Some(d) = &self.disk {
            // The file first: a crash between the two leaves an entry without a transcript,
            // which load drops; the other order could leave a transcript load would revive.
            d.remove(&info)?;
            d.forget(&info)?;
        }
        Ok(true)
    }

    fn sweep_idle(&self) -> usize {
        let Some(idle) = self.opts.idle else { return 0 };
        let cutoff = (self.opts.clock)().saturating_sub(idle.as_millis() as u64);
        let old: Vec<Arc<Slot>> =
            lock(&self.slots).values().filter(|s| lock(&s.info).updated_at < cutoff).cloned().collect();
        let mut n = 0;
        for slot in old {
            match self.remove(&slot, Some(cutoff)) {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => crate::log!(Warn, "session {}: removing an idle session failed: {e}", slot.key),
            }
        }
        if n > 0 {
            crate::log!(Info, "removed {n} session(s) idle for over {} s", idle.as_secs());
        }
        n
    }
}

impl Drop for SessionStore {
    fn drop(&mut self) {
        *lock(&self.inner.wake.0) = true;
        self.inner.wake.1.notify_all();
        if let Some(h) = lock(&self.background).take() {
            let _ = h.join();
        }
    }
}

/// Snapshots when a journal grows long, and retention.
fn background_loop(inner: Weak<Inner>) {
    let mut last_sweep: Option<Instant> = None;
    loop {
        let Some(strong) = inner.upgrade() else { return };
        {
            let mut stop = lock(&strong.wake.0);
            if !*stop {
                stop = strong.wake.1.wait_timeout(stop, BACKGROUND_TICK).unwrap_or_else(|e| e.into_inner()).0;
            }
            if *stop {
                return;
            }
        }
        if let Some(d) = &strong.disk {
            for e in d.snapshot(false) {
                crate::log!(Warn, "session index snapshot failed: {e}");
            }
        }
        if strong.opts.idle.is_some() && last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
            last_sweep = Some(Instant::now());
            strong.sweep_idle();
        }
    }
}

type OffLoopJob = Box<dyn FnOnce() + Send + 'static>;

/// Store requests from the event loop (WebSocket `sessions.*`, `chat.history`) that may wait on a
/// session's disk write or read a transcript run on this thread, in arrival order.
const OFF_LOOP_QUEUE: usize = 1024;

/// Run `job` on the store thread; false when its queue is full (answer "busy, retry").
pub fn run_off_loop(job: OffLoopJob) -> bool {
    static QUEUE: std::sync::OnceLock<Option<std::sync::mpsc::SyncSender<OffLoopJob>>> = std::sync::OnceLock::new();
    let tx = QUEUE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<OffLoopJob>(OFF_LOOP_QUEUE);
        let spawned = std::thread::Builder::new().name("gatelet-store".into()).spawn(move || {
            for job in rx {
                // A panicking request must not take the thread (and every later request) down.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
        });
        spawned.ok().map(|_| tx)
    });
    match tx {
        Some(tx) => tx.try_send(job).is_ok(),
        None => false,
    }
}

/// Where the part of a conversation of `len` messages sent to the backend starts: the newest
/// `max` messages (all when `max` is 0), never starting on a `tool` message, so a tool result
/// never goes without the assistant message that asked for it. When the cut falls inside a run
/// of tool results it moves forward past them; when those results are the newest messages of
/// all, it moves back to include the message that made the calls instead.
pub fn history_start(len: usize, max: usize, role: impl Fn(usize) -> Role) -> usize {
    if max == 0 || len <= max {
        return 0;
    }
    let cut = len - max;
    let mut forward = cut;
    while forward < len && role(forward) == Role::Tool {
        forward += 1;
    }
    if forward < len {
        return forward;
    }
    let mut back = cut;
    while back > 0 && role(back) == Role::Tool {
        back -= 1;
    }
    back
}

impl StoredMessage {
    fn to_chat(&self) -> ChatMessage {
        ChatMessage {
            role: self.role,
            content: self.content.clone(),
            raw_content: self.raw_content.clone(),
            tool: self.tool.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("gatelet-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn msg(role: Role, text: &str) -> ChatMessage {
        ChatMessage::new(role, text)
    }

    fn roles(s: &str) -> Vec<Role> {
        s.chars()
            .map(|c| match c {
                's' => Role::System,
                'u' => Role::User,
                'a' => Role::Assistant,
                _ => Role::Tool,
            })
            .collect()
    }

    fn cut(pattern: &str, max: usize) -> usize {
        let r = roles(pattern);
        history_start(r.len(), max, |i| r[i])
    }

    #[test]
    fn session_keys() {
        assert_eq!(key_for("main", Some("abc"), Some("u")).unwrap(), ("agent:main:abc".into(), true));
        assert_eq!(key_for("main", Some("agent:main:abc"), None).unwrap(), ("agent:main:abc".into(), true));
        assert_eq!(key_for("main", None, Some("bob")).unwrap(), ("agent:main:openai-user:bob".into(), true));
        let (k, sticky) = key_for("main", None, None).unwrap();
        assert!(k.starts_with("agent:main:openai:") && !sticky);
        assert_ne!(k, key_for("main", None, None).unwrap().0);
        assert!(key_for("main", Some(&"x".repeat(257)), None).is_err());
        assert!(key_for("main", Some("tab\there"), None).is_err());
    }

    #[test]
    fn turns_are_stored() {
        let s = SessionStore::in_memory();
        let turn = [ChatMessage::new(Role::User, "hi")];
        s.append_turn(
            "agent:main:openai-user:bob",
            "main",
            &turn,
            &[ChatMessage::new(Role::Assistant, "hi")],
            Usage::default(),
            false,
        )
        .unwrap();
        assert_eq!(s.list().len(), 1);
        assert_eq!(s.history("agent:main:openai-user:bob").len(), 2);
    }

    #[test]
    fn reset_keeps_key_delete_removes_it() {
        let s = SessionStore::in_memory();
        let turn = [ChatMessage::new(Role::User, "hi")];
        s.append_turn(
            "agent:main:k",
            "main",
            &turn,
            &[ChatMessage::new(Role::Assistant, "yo")],
            Usage { prompt_tokens: 1, completion_tokens: 1 },
            false,
        )
        .unwrap();
        assert!(s.reset("agent:main:k").unwrap());
        assert_eq!(s.list()[0].message_count, 0);
        assert!(s.history("agent:main:k").is_empty());
        assert!(s.delete("agent:main:k").unwrap());
        assert!(!s.delete("agent:main:k").unwrap());
        assert!(s.list().is_empty());
    }

    #[test]
    fn the_cut_keeps_the_newest_and_never_starts_on_a_tool_result() {
        // Short enough, or no bound: everything.
        assert_eq!(cut("uaua", 4), 0);
        assert_eq!(cut("uauatta", 0), 0);
        // A plain cut.
        assert_eq!(cut("uauaua", 2), 4);
        // The cut lands on a tool result: it moves past the whole group (and its assistant).
        //            0123456
        assert_eq!(cut("uattaua", 4), 4);
        assert_eq!(cut("uattaua", 5), 4);
        // Landing on the assistant that made the calls keeps the group whole.
        assert_eq!(cut("uattaua", 6), 1);
        // The newest messages are all tool results: back to the call, over the bound.
        assert_eq!(cut("uauatt", 1), 3);
        assert_eq!(cut("uauatt", 2), 3);
        assert_eq!(cut("uauattt", 2), 3);
        // Never on a tool message, whatever the bound.
        for pattern in ["uattaua", "uatatatu", "atttuatt", "uauattt", "tttuat"] {
            let r = roles(pattern);
            for max in 1..r.len() {
                let from = history_start(r.len(), max, |i| r[i]);
                assert!(from < r.len(), "{pattern} {max}");
                assert!(from == 0 || r[from] != Role::Tool, "{pattern} max {max} starts on a tool result at {from}");
                // Within the bound unless the newest messages are a tool group.
                let tail_is_tools = r[r.len() - max..].iter().all(|x| *x == Role::Tool);
                assert!(r.len() - from <= max || tail_is_tools, "{pattern} max {max} from {from}");
            }
        }
    }

    #[test]
    fn runs_get_the_newest_messages_and_the_transcript_keeps_all() {
        let s = SessionStore::open_with(Path::new(""), StoreOptions { max_history: 4, ..StoreOptions::default() }).0;
        let key = "agent:main:k";
        let u = Usage::default();
        s.append_turn(key, "main", &[msg(Role::User, "q1")], &[ChatMessage::new(Role::Assistant, "a1")], u, false)
            .unwrap();
        let mut call = msg(Role::Tool, "r1");
        call.tool = Some([("tool_call_id".to_string(), serde_json::json!("c1"))].into_iter().collect());
        let mut call2 = call.clone();
        call2.content = "r2".into();
        s.append_turn(key, "main", &[call, call2], &[ChatMessage::new(Role::Assistant, "a2")], u, false).unwrap();
        // Stored: q1 a1 r1 r2 a2; with q3 that is six, the newest four would start on r2.
        let ctx = s.context_for_run(key, &[msg(Role::User, "q3")]);
        let texts: Vec<&str> = ctx.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["a2", "q3"]);
        // New tool results at the very end keep the message before them.
        let ctx = s.context_for_run(key, &[msg(Role::Tool, "x1"), msg(Role::Tool, "x2"), msg(Role::Tool, "x3")]);
        let texts: Vec<&str> = ctx.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(texts, ["a2", "x1", "x2", "x3"]);
        assert_eq!(s.transcript(key, None).unwrap().len(), 5);
        assert_eq!(s.history(key).len(), 5);
        // Tool fields reach the backend.
        let ctx = s.context_for_run(key, &[]);
        assert_eq!(ctx[1].tool.as_ref().unwrap()["tool_call_id"], "c1");
    }

    #[test]
    fn idle_sessions_go_with_a_moved_clock() {
        let dir = tmpdir("idle");
        let now = Arc::new(AtomicU64::new(1_000_000_000_000));
        let clock = now.clone();
        let opts = StoreOptions {
            persist: true,
            idle: Some(Duration::from_secs(2 * 86_400)),
            clock: Arc::new(move || clock.load(Ordering::SeqCst)),
            background: false,
            ..StoreOptions::default()
        };
        let day = 86_400_000;
        let (s, _) = SessionStore::open_with(&dir, opts.clone());
        let u = Usage::default();
        for k in ["agent:main:old", "agent:main:touched", "agent:other:old2"] {
            s.append_turn(
                k,
                agent_of(k).unwrap(),
                &[msg(Role::User, "hi")],
                &[ChatMessage::new(Role::Assistant, "yo")],
                u,
                false,
            )
            .unwrap();
        }
        now.fetch_add(day, Ordering::SeqCst);
        s.append_turn(
            "agent:main:new",
            "main",
            &[msg(Role::User, "hi")],
            &[ChatMessage::new(Role::Assistant, "yo")],
            u,
            false,
        )
        .unwrap();
        assert_eq!(s.sweep_idle(), 0, "nothing is two days old yet");
        now.fetch_add(day + 1, Ordering::SeqCst);
        s.append_turn(
            "agent:main:touched",
            "main",
            &[msg(Role::User, "again")],
            &[ChatMessage::new(Role::Assistant, "yo")],
            u,
            false,
        )
        .unwrap();
        assert_eq!(s.sweep_idle(), 2);
        let mut keys: Vec<String> = s.list().into_iter().map(|i| i.key).collect();
        keys.sort();
        assert_eq!(keys, ["agent:main:new", "agent:main:touched"]);
        // Gone from disk too: transcripts and index.
        let files = |agent: &str| {
            std::fs::read_dir(dir.join(format!("agents/{agent}/sessions")))
                .unwrap()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                .count()
        };
        assert_eq!(files("main"), 2);
        assert_eq!(files("other"), 0);
        drop(s);
        let (s, w) = SessionStore::open_with(&dir, opts);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.count(), 2);
        assert_eq!(s.history("agent:main:touched").len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_session_writing_to_disk_does_not_hold_up_the_others() {
        let dir = tmpdir("locks");
        let (s, _) = SessionStore::open_with(&dir, StoreOptions { persist: true, ..StoreOptions::default() });
        let s = Arc::new(s);
        let u = Usage::default();
        s.append_turn(
            "agent:main:a",
            "main",
            &[msg(Role::User, "hi")],
            &[ChatMessage::new(Role::Assistant, "yo")],
            u,
            false,
        )
        .unwrap();
        // Session a is "in the middle of a disk write" for as long as this guard lives.
        let slot_a = s.slot("agent:main:a").unwrap();
        let guard = lock(&slot_a.body);
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            s2.append_turn(
                "agent:main:b",
                "main",
                &[msg(Role::User, "hi")],
                &[ChatMessage::new(Role::Assistant, "yo")],
                u,
                false,
            )
            .unwrap();
            let listed = s2.list().len();
            let history = s2.history("agent:main:b").len();
            let _ = tx.send((listed, history, s2.count()));
        });
        let got = rx.recv_timeout(Duration::from_secs(60)).expect("session b waited for session a");
        assert_eq!(got, (2, 2, 2));
        drop(guard);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
