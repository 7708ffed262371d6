//! Runs in flight and recently finished, for the surfaces that address runs by id: waiting for a
//! run (`agent.wait`), aborting the runs of a session (`chat.abort`) and idempotent starts.
//!
//! Finished runs are kept for [`RETAIN`] (at most [`MAX_FINISHED`] of them); idempotency keys
//! for [`RETAIN`] (at most [`MAX_KEYS`]). Waiters are callbacks run on the thread that finishes
//! the run, outside the registry lock.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{CancelToken, FinishReason, RunError, Usage};

/// How long finished runs and idempotency keys are remembered.
pub const RETAIN: Duration = Duration::from_secs(5 * 60);
/// Most finished runs remembered.
pub const MAX_FINISHED: usize = 4096;
/// Most reply text kept for finished runs, in bytes: long replies age out sooner, so memory
/// stays bounded whatever the replies' sizes.
pub const MAX_FINISHED_BYTES: usize = 16 * 1024 * 1024;
/// Most waiters one run keeps: further waits are refused rather than piling up callbacks.
pub const MAX_WAITERS: usize = 256;
/// Most idempotency keys remembered.
pub const MAX_KEYS: usize = 1000;

/// The end of a run, as reported to waiters.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Run id.
    pub run_id: String,
    /// Session key.
    pub session_key: String,
    /// Agent id.
    pub agent_id: String,
    /// Unix ms when the run was accepted.
    pub started_at: u64,
    /// Unix ms when it ended.
    pub ended_at: u64,
    /// The reply (partial when the run failed).
    pub text: String,
    /// Calls to client tools the reply ends with.
    pub tool_calls: Vec<crate::agent::tools::ToolCall>,
    /// Finish reason of a successful run.
    pub finish: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Why the run failed, if it did.
    pub error: Option<RunError>,
}

impl RunSummary {
    /// Bytes of reply this summary holds (text and tool-call arguments).
    pub fn held_bytes(&self) -> usize {
        self.text.len() + self.tool_calls.iter().map(|c| c.arguments.len() + c.name.len() + c.id.len()).sum::<usize>()
    }
}

/// Called once with the summary when a run ends.
pub type Waiter = Box<dyn FnOnce(&RunSummary) + Send>;

struct Entry {
    /// Kept after it finishes (for `agent.wait` and idempotent starts); an HTTP run is not:
    /// its client already has the answer, and thousands of requests a second must not pile up.
    keep: bool,
    session_key: String,
    cancel: CancelToken,
    done: Option<RunSummary>,
    waiters: Vec<Waiter>,
}

#[derive(Default)]
struct Inner {
    runs: HashMap<String, Entry>,
    finished: VecDeque<(Instant, String)>,
    /// Reply bytes held by the runs in `finished`.
    finished_bytes: usize,
    keys: HashMap<String, (String, Instant)>,
    key_order: VecDeque<(Instant, String)>,
}

impl Inner {
    fn prune(&mut self, now: Instant) {
        while let Some((t, id)) = self.finished.front() {
            if now.duration_since(*t) < RETAIN
                && self.finished.len() <= MAX_FINISHED
                && self.finished_bytes <= MAX_FINISHED_BYTES
            {
                break;
            }
            if let Some(e) = self.runs.remove(id) {
                self.finished_bytes -= e.done.map_or(0, |d| d.held_bytes());
            }
            self.finished.pop_front();
        }
        while let Some((t, k)) = self.key_order.front() {
            if now.duration_since(*t) < RETAIN && self.key_order.len() <= MAX_KEYS {
                break;
            }
            // Only forget the key if this queue entry is the one that set it.
            if self.keys.get(k).is_some_and(|(_, at)| at == t) {
                self.keys.remove(k);
            }
            self.key_order.pop_front();
        }
    }
}

/// What [`Registry::start`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The run was registered under the new id.
    New,
    /// The idempotency key already names this run (running or finished).
    Existing(String),
}

/// What [`Registry::wait`] found.
#[derive(Debug)]
pub enum Wait {
    /// No such run (never started, or forgotten).
    NotFound,
    /// Still running: the waiter will be called when it ends.
    Pending,
    /// Already ended (the waiter was not kept).
    Done(RunSummary),
    /// Still running, and already has [`MAX_WAITERS`] waiters (the waiter was not kept).
    Busy,
}

/// All runs the gateway knows by id.
pub struct Registry {
    inner: Mutex<Inner>,
    started: Instant,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({} active)", self.active())
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry { inner: Mutex::new(Inner::default()), started: Instant::now() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the gateway started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Register run `run_id`, unless `idempotency_key` (scoped by the caller) already names a
    /// run seen within [`RETAIN`].
    pub fn start(&self, run_id: &str, idempotency_key: Option<&str>, session_key: &str, cancel: &CancelToken) -> Start {
        let now = Instant::now();
        let mut g = self.lock();
        g.prune(now);
        if let Some(k) = idempotency_key {
            if let Some((id, _)) = g.keys.get(k)
                && g.runs.contains_key(id)
            {
                return Start::Existing(id.clone());
            }
            g.keys.insert(k.to_string(), (run_id.to_string(), now));
            g.key_order.push_back((now, k.to_string()));
        }
        g.runs.insert(
            run_id.to_string(),
            Entry {
                keep: true,
                session_key: session_key.to_string(),
                cancel: cancel.clone(),
                done: None,
                waiters: Vec::new(),
            },
        );
        Start::New
    }

    /// Register a run that is visible while it runs (counted, abortable by session) and
    /// forgotten as soon as it finishes.
    pub fn start_transient(&self, run_id: &str, session_key: &str, cancel: &CancelToken) {
        let entry = Entry {
            keep: false,
            session_key: session_key.to_string(),
            cancel: cancel.clone(),
            done: None,
            waiters: Vec::new(),
        };
        self.lock().runs.insert(run_id.to_string(), entry);
    }

    /// Forget a run that was registered but never started (the queue was full).
    pub fn forget(&self, run_id: &str) {
        let mut g = self.lock();
        g.runs.remove(run_id);
        g.keys.retain(|_, (id, _)| id != run_id);
    }

    /// Record the end of a run and call its waiters (on this thread, outside the lock).
    pub fn finish(&self, summary: RunSummary) {
        let now = Instant::now();
        let waiters = {
            let mut g = self.lock();
            let Some(e) = g.runs.get_mut(&summary.run_id) else { return };
            if !e.keep {
                let w = std::mem::take(&mut e.waiters);
                g.runs.remove(&summary.run_id);
                drop(g);
                for w in w {
                    w(&summary);
                }
                return;
            }
            let w = std::mem::take(&mut e.waiters);
            e.done = Some(summary.clone());
            g.finished_bytes += summary.held_bytes();
            g.finished.push_back((now, summary.run_id.clone()));
            g.prune(now);
            w
        };
        for w in waiters {
            w(&summary);
        }
    }

    /// Whether `run_id` is known and still running.
    pub fn is_running(&self, run_id: &str) -> bool {
        self.lock().runs.get(run_id).is_some_and(|e| e.done.is_none())
    }

    /// Call `waiter` when `run_id` ends; with no waiter, only look.
    pub fn wait(&self, run_id: &str, waiter: Option<Waiter>) -> Wait {
        let mut g = self.lock();
        match g.runs.get_mut(run_id) {
            None => Wait::NotFound,
            Some(Entry { done: Some(s), .. }) => Wait::Done(s.clone()),
            Some(e) => match waiter {
                None => Wait::Pending,
                Some(_) if e.waiters.len() >= MAX_WAITERS => Wait::Busy,
                Some(w) => {
                    e.waiters.push(w);
                    Wait::Pending
                }
            },
        }
    }

    /// Cancel the running runs of `session_key` (only `run_id` when given). Returns their ids.
    pub fn abort(&self, session_key: &str, run_id: Option<&str>) -> Vec<String> {
        let g = self.lock();
        let mut ids: Vec<String> = g
            .runs
            .iter()
            .filter(|(id, e)| {
                e.done.is_none() && e.session_key == session_key && run_id.is_none_or(|r| r == id.as_str())
            })
            .map(|(id, e)| {
                e.cancel.cancel();
                id.clone()
            })
            .collect();
        ids.sort();
        ids
    }

    /// Runs registered and not yet finished.
    pub fn active(&self) -> usize {
        self.lock().runs.values().filter(|e| e.done.is_none()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn summary(id: &str, text: &str) -> RunSummary {
        RunSummary {
            run_id: id.into(),
            session_key: "agent:main:s".into(),
            agent_id: "main".into(),
            started_at: 1,
            ended_at: 2,
            text: text.into(),
            tool_calls: Vec::new(),
            finish: FinishReason::Stop,
            usage: Usage::default(),
            error: None,
        }
    }

    #[test]
    fn idempotent_start_wait_and_abort() {
        let r = Registry::new();
        let c = CancelToken::new();
        assert_eq!(r.start("r1", Some("agent\0k"), "agent:main:s", &c), Start::New);
        assert_eq!(r.start("r2", Some("agent\0k"), "agent:main:s", &c), Start::Existing("r1".into()));
        assert_eq!(r.start("r3", Some("chat.send\0k"), "agent:main:s", &c), Start::New);
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        assert!(matches!(
            r.wait(
                "r1",
                Some(Box::new(move |s| {
                    assert_eq!(s.text, "hi");
                    h.fetch_add(1, Ordering::SeqCst);
                }))
            ),
            Wait::Pending
        ));
        assert!(matches!(r.wait("nope", Some(Box::new(|_| {}))), Wait::NotFound));
        assert_eq!(r.active(), 2);
        assert_eq!(r.abort("agent:main:s", Some("r3")), vec!["r3".to_string()]);
        assert!(c.is_cancelled());
        r.finish(summary("r1", "hi"));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert!(matches!(r.wait("r1", Some(Box::new(|_| {}))), Wait::Done(s) if s.text == "hi"));
        // A finished run still dedupes its key.
        assert_eq!(r.start("r4", Some("agent\0k"), "agent:main:s", &c), Start::Existing("r1".into()));
        assert_eq!(r.abort("agent:main:s", None), vec!["r3".to_string()]);
        r.forget("r3");
        assert_eq!(r.active(), 0);
    }

    #[test]
    fn a_transient_run_is_visible_while_it_runs_and_forgotten_when_it_ends() {
        let r = Registry::new();
        let cancel = CancelToken::new();
        r.start_transient("chatcmpl-1", "agent:main:s", &cancel);
        assert_eq!(r.active(), 1);
        assert!(r.is_running("chatcmpl-1"));
        let called = Arc::new(AtomicUsize::new(0));
        let c = called.clone();
        assert!(matches!(
            r.wait(
                "chatcmpl-1",
                Some(Box::new(move |_| {
                    c.fetch_add(1, Ordering::Relaxed);
                }))
            ),
            Wait::Pending
        ));
        assert_eq!(r.abort("agent:main:s", None), vec!["chatcmpl-1".to_string()]);
        assert!(cancel.is_cancelled());
        r.finish(summary("chatcmpl-1", "reply"));
        assert_eq!(called.load(Ordering::Relaxed), 1, "waiters still hear the end");
        assert_eq!(r.active(), 0);
        assert!(matches!(r.wait("chatcmpl-1", None), Wait::NotFound));
        assert!(r.lock().finished.is_empty() && r.lock().finished_bytes == 0);
    }

    #[test]
    fn finished_runs_are_bounded() {
        let r = Registry::new();
        let c = CancelToken::new();
        for i in 0..MAX_FINISHED + 10 {
            let id = format!("r{i}");
            r.start(&id, None, "k", &c);
            r.finish(summary(&id, ""));
        }
        assert!(matches!(r.wait("r0", None), Wait::NotFound));
        assert!(r.lock().runs.len() <= MAX_FINISHED);
    }

    #[test]
    fn finished_reply_text_is_bounded_in_bytes() {
        let r = Registry::new();
        let big = "x".repeat(MAX_FINISHED_BYTES / 4 + 1);
        for i in 0..8 {
            let id = format!("r{i}");
            r.start(&id, None, "agent:main:s", &CancelToken::new());
            r.finish(summary(&id, &big));
        }
        // Only the newest runs that fit in the byte budget are remembered.
        assert!(matches!(r.wait("r0", None), Wait::NotFound));
        assert!(matches!(r.wait("r7", None), Wait::Done(_)));
        assert!(r.lock().finished_bytes <= MAX_FINISHED_BYTES);
    }

    #[test]
    fn waiters_per_run_are_capped() {
        let r = Registry::new();
        r.start("r", None, "agent:main:s", &CancelToken::new());
        for _ in 0..MAX_WAITERS {
            assert!(matches!(r.wait("r", Some(Box::new(|_| {}))), Wait::Pending));
        }
        assert!(matches!(r.wait("r", Some(Box::new(|_| {}))), Wait::Busy));
        // Looking without a waiter is always possible.
        assert!(matches!(r.wait("r", None), Wait::Pending));
    }
}
