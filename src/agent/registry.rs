//! Runs in flight and recently finished, for the surfaces that address runs by id: waiting for a
//! run (`agent.wait`), aborting the runs of a session (`chat.abort`) and idempotent starts.
//!
//! Finished runs are kept for [`RETAIN`] (at most [`MAX_FINISHED`] of them) as a small record:
//! how the run ended, when, and its token counts, which is all `agent.wait` answers with. The
//! reply itself is kept only for a run started with an idempotency key, whose `agent` request
//! may be sent again to get the result ([`MAX_REPLY_BYTES`] of such replies at most).
//! Idempotency keys are kept for [`RETAIN`] (at most [`MAX_KEYS`]). Waiters are callbacks run on
//! the thread that finishes the run, outside the registry lock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{CancelToken, FinishReason, RunError, Usage};

/// How long finished runs and idempotency keys are remembered.
pub const RETAIN: Duration = Duration::from_secs(5 * 60);
/// Most finished runs remembered.
pub const MAX_FINISHED: usize = 1024;
/// Most reply bytes kept for finished runs started with an idempotency key: long replies age out
/// sooner, so memory stays bounded whatever the replies' sizes.
pub const MAX_REPLY_BYTES: usize = 4 * 1024 * 1024;
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

struct Running {
    /// Kept after it finishes (for `agent.wait` and idempotent starts); an HTTP run is not:
    /// its client already has the answer, and thousands of requests a second must not pile up.
    keep: bool,
    /// Started with an idempotency key: the whole summary is kept, for a repeated request.
    replay: bool,
    session_key: String,
    cancel: CancelToken,
    waiters: Vec<Waiter>,
}

/// What is remembered of a finished run.
struct Finished {
    started_at: u64,
    ended_at: u64,
    finish: FinishReason,
    usage: Usage,
    error: Option<RunError>,
    /// The whole summary, for a run started with an idempotency key.
    reply: Option<Box<RunSummary>>,
}

impl Finished {
    fn new(s: &RunSummary, replay: bool) -> Self {
        Finished {
            started_at: s.started_at,
            ended_at: s.ended_at,
            finish: s.finish,
            usage: s.usage,
            error: s.error.clone(),
            reply: replay.then(|| Box::new(s.clone())),
        }
    }

    fn reply_bytes(&self) -> usize {
        self.reply.as_ref().map_or(0, |r| r.held_bytes())
    }

    /// The summary `wait` answers with: without a kept reply, no text, tool calls, session or
    /// agent (nothing that reads a finished run without a key needs them).
    fn summary(&self, run_id: &str) -> RunSummary {
        if let Some(r) = &self.reply {
            return (**r).clone();
        }
        RunSummary {
            run_id: run_id.to_string(),
            session_key: String::new(),
            agent_id: String::new(),
            started_at: self.started_at,
            ended_at: self.ended_at,
            text: String::new(),
            tool_calls: Vec::new(),
            finish: self.finish,
            usage: self.usage,
            error: self.error.clone(),
        }
    }
}

/// Boxed, so that the table holds a pointer per run: a table that churns through
/// [`MAX_FINISHED`] runs settles at twice as many buckets, each kept small.
enum Entry {
    Running(Box<Running>),
    Finished(Box<Finished>),
}

#[derive(Default)]
struct Inner {
    /// Keyed by run id, shared with `finished` (one allocation per id).
    runs: HashMap<Arc<str>, Entry>,
    finished: VecDeque<(Instant, Arc<str>)>,
    /// Reply bytes held by the runs in `finished`.
    reply_bytes: usize,
    keys: HashMap<String, (String, Instant)>,
    key_order: VecDeque<(Instant, String)>,
}

impl Inner {
    fn forget_oldest(&mut self) {
        if let Some((_, id)) = self.finished.pop_front()
            && let Some(Entry::Finished(f)) = self.runs.remove(&id)
        {
            self.reply_bytes -= f.reply_bytes();
        }
    }

    fn prune(&mut self, now: Instant) {
        while let Some((t, _)) = self.finished.front() {
            if now.duration_since(*t) < RETAIN
                && self.finished.len() <= MAX_FINISHED
                && self.reply_bytes <= MAX_REPLY_BYTES
            {
                break;
            }
            self.forget_oldest();
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
        // Give back the room a burst of runs took once it is over.
        if self.runs.capacity() > 4 * self.runs.len() + 64 {
            self.runs.shrink_to(2 * self.runs.len());
        }
        if self.finished.capacity() > 4 * self.finished.len() + 64 {
            self.finished.shrink_to(2 * self.finished.len());
        }
        if self.keys.capacity() > 4 * self.keys.len() + 64 {
            self.keys.shrink_to(2 * self.keys.len());
        }
        if self.key_order.capacity() > 4 * self.key_order.len() + 64 {
            self.key_order.shrink_to(2 * self.key_order.len());
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
    /// Already ended (the waiter was not kept). The reply, session and agent are there only for
    /// a run started with an idempotency key.
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
                && g.runs.contains_key(id.as_str())
            {
                return Start::Existing(id.clone());
            }
            g.keys.insert(k.to_string(), (run_id.to_string(), now));
            g.key_order.push_back((now, k.to_string()));
        }
        let entry = Running {
            keep: true,
            replay: idempotency_key.is_some(),
            session_key: session_key.to_string(),
            cancel: cancel.clone(),
            waiters: Vec::new(),
        };
        g.runs.insert(run_id.into(), Entry::Running(Box::new(entry)));
        Start::New
    }

    /// Register a run that is visible while it runs (counted, abortable by session) and
    /// forgotten as soon as it finishes.
    pub fn start_transient(&self, run_id: &str, session_key: &str, cancel: &CancelToken) {
        let entry = Running {
            keep: false,
            replay: false,
            session_key: session_key.to_string(),
            cancel: cancel.clone(),
            waiters: Vec::new(),
        };
        self.lock().runs.insert(run_id.into(), Entry::Running(Box::new(entry)));
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
            // A run ends once: a second report (or one for an unknown run) changes nothing.
            if !matches!(g.runs.get(summary.run_id.as_str()), Some(Entry::Running(_))) {
                return;
            }
            let Some((id, Entry::Running(r))) = g.runs.remove_entry(summary.run_id.as_str()) else { return };
            if r.keep {
                // Room first, so that the queue never grows past its bound.
                if g.finished.len() >= MAX_FINISHED {
                    g.forget_oldest();
                }
                let f = Finished::new(&summary, r.replay);
                g.reply_bytes += f.reply_bytes();
                // A copy made here, on the thread that finishes the run: the id the run started
                // with was made on the event loop, where a thousand small records kept for
                // minutes would pin the pages a burst of connections freed around them.
                let id: Arc<str> = Arc::from(&*id);
                g.finished.push_back((now, id.clone()));
                g.runs.insert(id, Entry::Finished(Box::new(f)));
            }
            g.prune(now);
            r.waiters
        };
        for w in waiters {
            w(&summary);
        }
    }

    /// Whether `run_id` is known and still running.
    pub fn is_running(&self, run_id: &str) -> bool {
        matches!(self.lock().runs.get(run_id), Some(Entry::Running(_)))
    }

    /// Call `waiter` when `run_id` ends; with no waiter, only look.
    pub fn wait(&self, run_id: &str, waiter: Option<Waiter>) -> Wait {
        let mut g = self.lock();
        match g.runs.get_mut(run_id) {
            None => Wait::NotFound,
            Some(Entry::Finished(f)) => Wait::Done(f.summary(run_id)),
            Some(Entry::Running(r)) => match waiter {
                None => Wait::Pending,
                Some(_) if r.waiters.len() >= MAX_WAITERS => Wait::Busy,
                Some(w) => {
                    r.waiters.push(w);
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
            .filter_map(|(id, e)| match e {
                Entry::Running(r) if r.session_key == session_key && run_id.is_none_or(|x| x == &**id) => {
                    r.cancel.cancel();
                    Some(id.to_string())
                }
                _ => None,
            })
            .collect();
        ids.sort();
        ids
    }

    /// Runs registered and not yet finished.
    pub fn active(&self) -> usize {
        self.lock().runs.values().filter(|e| matches!(e, Entry::Running(_))).count()
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
        assert!(r.lock().finished.is_empty() && r.lock().reply_bytes == 0);
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
        let g = r.lock();
        assert!(g.runs.len() <= MAX_FINISHED);
        // Room is made before a run is added: the queue never doubles past its bound.
        assert!(g.finished.capacity() <= MAX_FINISHED, "{}", g.finished.capacity());
    }

    #[test]
    fn a_table_entry_is_two_words() {
        // The table of recent runs churns at twice MAX_FINISHED buckets: keep each one small.
        assert!(std::mem::size_of::<Entry>() <= 16, "{}", std::mem::size_of::<Entry>());
    }

    #[test]
    fn kept_replies_are_bounded_in_bytes() {
        let r = Registry::new();
        let big = "x".repeat(MAX_REPLY_BYTES / 4 + 1);
        for i in 0..8 {
            let id = format!("r{i}");
            r.start(&id, Some(&format!("agent\0k{i}")), "agent:main:s", &CancelToken::new());
            r.finish(summary(&id, &big));
        }
        // Only the newest runs whose replies fit in the byte budget are remembered.
        assert!(matches!(r.wait("r0", None), Wait::NotFound));
        assert!(matches!(r.wait("r7", None), Wait::Done(s) if s.text == big));
        assert!(r.lock().reply_bytes <= MAX_REPLY_BYTES);
    }

    #[test]
    fn a_finished_run_without_a_key_keeps_its_outcome_but_not_its_reply() {
        let r = Registry::new();
        let big = "x".repeat(MAX_REPLY_BYTES);
        for i in 0..8 {
            let id = format!("r{i}");
            r.start(&id, None, "agent:main:s", &CancelToken::new());
            let mut s = summary(&id, &big);
            s.usage = Usage { prompt_tokens: 3, completion_tokens: i };
            if i == 7 {
                s.error = Some(RunError::Timeout);
                s.finish = FinishReason::Length;
            }
            r.finish(s);
        }
        assert_eq!(r.lock().reply_bytes, 0, "no reply is kept");
        // What `agent.wait` answers with is all there, for every run.
        let Wait::Done(s) = r.wait("r0", None) else { panic!("r0 forgotten") };
        assert_eq!((s.run_id.as_str(), s.started_at, s.ended_at, s.text.as_str()), ("r0", 1, 2, ""));
        assert_eq!(s.error, None);
        let Wait::Done(s) = r.wait("r7", Some(Box::new(|_| {}))) else { panic!("r7 forgotten") };
        assert_eq!((s.usage.completion_tokens, s.finish, s.error), (7, FinishReason::Length, Some(RunError::Timeout)));
        // A run ends once: a second report does not forget it or change it.
        r.finish(summary("r7", "again"));
        assert!(matches!(r.wait("r7", None), Wait::Done(s) if s.error == Some(RunError::Timeout)));
    }

    #[test]
    fn the_table_gives_room_back_after_a_burst() {
        let r = Registry::new();
        let c = CancelToken::new();
        let ids: Vec<String> = (0..10_000).map(|i| format!("chatcmpl-{i}")).collect();
        for id in &ids {
            r.start_transient(id, "agent:main:s", &c);
        }
        let burst = r.lock().runs.capacity();
        for id in &ids {
            r.finish(summary(id, ""));
        }
        let g = r.lock();
        assert!(g.runs.is_empty());
        assert!(g.runs.capacity() < burst / 8, "{} of {burst}", g.runs.capacity());
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
