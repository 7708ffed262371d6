//! Agent runs: the one code path shared by HTTP, WebSocket and `gatelet agent`.
//!
//! A run is (agent, session key, system prompt, conversation, options, cancel token, deadline)
//! turned into a stream of events by a [`Backend`]. Backends are synchronous: they run on a
//! worker thread, push events into an [`EventSink`] and poll [`RunControl`] often enough that a
//! cancel or a deadline ends them within a second.

pub mod backend;
pub mod pool;
pub mod registry;
pub mod resolve;
pub mod run;
pub mod tool_exec;
pub mod tools;

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use crate::session::message::{ChatMessage, Role, ToolFields, Usage};

impl ChatMessage {
    /// An assistant message that calls `calls` (content `null` when `text` is empty, as OpenAI
    /// sends it).
    pub fn assistant_calls(text: &str, calls: &[tools::ToolCall]) -> Self {
        let mut m = ChatMessage::new(Role::Assistant, text);
        if text.is_empty() {
            m.raw_content = Some(serde_json::Value::Null);
        }
        if !calls.is_empty() {
            let v = calls.iter().map(tools::ToolCall::to_json).collect();
            m.tool = Some([("tool_calls".to_string(), serde_json::Value::Array(v))].into_iter().collect());
        }
        m
    }
}

/// Sampling options passed through to the backend.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunOptions {
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<u64>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Function tools offered to the model (`tools`, validated; the agent's own tools are added
    /// when the run starts).
    pub tools: Vec<serde_json::Value>,
    /// `tool_choice`, as sent.
    pub tool_choice: Option<serde_json::Value>,
    /// `parallel_tool_calls`, as sent.
    pub parallel_tool_calls: Option<bool>,
    /// Output fields passed on verbatim to upstreams that take them (`response_format`, `seed`,
    /// `presence_penalty`, …): only those the client set.
    pub passthrough: serde_json::Map<String, serde_json::Value>,
}

/// Everything a backend needs to produce a reply.
#[derive(Debug, Clone)]
pub struct RunInput<'a> {
    /// Unique id of this run (`chatcmpl-…` for HTTP runs).
    pub run_id: String,
    /// The agent answering.
    pub agent_id: String,
    /// The session this run belongs to.
    pub session_key: String,
    /// The agent's system prompt followed by the request's system/developer messages.
    pub system_prompt: String,
    /// The conversation (no system messages), oldest first: a request's own messages are
    /// borrowed (a prompt can be tens of MiB), copied only when the run adds agent-tool steps.
    pub messages: Cow<'a, [ChatMessage]>,
    /// Sampling options.
    pub options: RunOptions,
    /// Words in `system_prompt` and the messages' contents ([`count_words`]), counted once by
    /// the run path for backends that report word-count usage.
    pub prompt_words: u64,
}

impl RunInput<'_> {
    /// Words in a system prompt and messages: [`RunInput::prompt_words`] for them.
    pub fn count_prompt_words(system_prompt: &str, messages: &[ChatMessage]) -> u64 {
        count_words(system_prompt) + messages.iter().map(|m| count_words(&m.content)).sum::<u64>()
    }
}

/// Why a run finished normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FinishReason {
    /// Natural end.
    #[default]
    Stop,
    /// Token limit reached (or the agent's `maxToolSteps`).
    Length,
    /// The reply is one or more tool calls for the client to run.
    ToolCalls,
}

impl FinishReason {
    /// The OpenAI wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
        }
    }
}

/// Why a run did not finish normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunError {
    /// The client went away or asked to abort.
    Cancelled,
    /// The agent's `timeoutSeconds` passed.
    Timeout,
    /// The backend failed; the message names the backend and what went wrong.
    Backend(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Cancelled => f.write_str("run cancelled"),
            RunError::Timeout => f.write_str("agent run timed out"),
            RunError::Backend(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for RunError {}

/// Where a backend sends what it produces: everything a surface sees ([`RunSink`]), plus the
/// token counts and the finish reason, which the run path keeps and returns in its outcome.
pub trait EventSink: RunSink {
    /// Token counts reported by the backend (the last report wins).
    fn usage(&mut self, usage: Usage);
    /// The finish reason reported by the backend (default `stop`).
    fn finish(&mut self, reason: FinishReason);
}

/// Where a run's output goes on its surface (SSE records, WebSocket events, the terminal): what
/// a client sees while the run goes. Usage and the finish reason are not pushed here; they come
/// back in the run's outcome ([`run::RunOutcome`]). `()` is the sink of a run whose client only
/// wants the outcome.
pub trait RunSink {
    /// A piece of reply text. An error means the consumer is gone: stop and return
    /// `Err(RunError::Cancelled)`.
    fn delta(&mut self, text: &str) -> Result<(), RunError>;
    /// A piece of a tool call. The first piece of each call carries its `id` and `name`; calls
    /// are numbered 0, 1, 2… in the order they start. An error means: stop with it.
    fn tool_call(&mut self, piece: &tools::ToolCallPiece) -> Result<(), RunError>;
    /// An agent tool started or ended (the gateway runs those itself; clients never see them as
    /// reply content).
    fn tool_event(&mut self, _ev: &tools::ToolEvent<'_>) {}
    /// Called by backends at least every half second while they wait for something (an
    /// upstream, a child process, a delay), so that a streaming consumer can send heartbeats
    /// and notice a dead client. An error means: stop with it.
    fn tick(&mut self) -> Result<(), RunError> {
        Ok(())
    }
    /// The backend has several events at hand (records decoded from one upstream read): until
    /// [`batch_end`](Self::batch_end) the sink may hold deltas back to write them together. A
    /// backend whose reply ends with the batch may leave out `batch_end`: what is held then
    /// leaves with the end of the run (or before an agent tool runs, see `tool_event`).
    fn batch_begin(&mut self) {}
    /// End of a batch: everything held back goes out now. An error means: stop with it.
    fn batch_end(&mut self) -> Result<(), RunError> {
        Ok(())
    }
}

impl RunSink for () {
    fn delta(&mut self, _: &str) -> Result<(), RunError> {
        Ok(())
    }
    fn tool_call(&mut self, _: &tools::ToolCallPiece) -> Result<(), RunError> {
        Ok(())
    }
}

/// `()` drops usage and the finish reason too: for callers that want neither events nor report.
impl EventSink for () {
    fn usage(&mut self, _: Usage) {}
    fn finish(&mut self, _: FinishReason) {}
}

/// A cancel flag that sleeping backends can wait on.
#[derive(Clone, Default)]
pub struct CancelToken(Arc<CancelInner>);

#[derive(Default)]
struct CancelInner {
    flag: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

impl fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CancelToken({})", self.is_cancelled())
    }
}

impl CancelToken {
    /// A fresh, uncancelled token.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancel the run; wakes any waiter.
    pub fn cancel(&self) {
        self.0.flag.store(true, Ordering::SeqCst);
        let _g = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.0.cv.notify_all();
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.flag.load(Ordering::SeqCst)
    }

    /// Sleep up to `dur`; returns early (true) when cancelled.
    pub fn wait(&self, dur: Duration) -> bool {
        let end = Instant::now() + dur;
        let mut g = self.0.lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.is_cancelled() {
                return true;
            }
            let now = Instant::now();
            if now >= end {
                return false;
            }
            g = self.0.cv.wait_timeout(g, end - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

/// The longest a backend may go without checking [`RunControl`] and calling
/// [`RunSink::tick`].
pub const TICK: Duration = Duration::from_millis(250);

/// Cancellation and deadline of one run, as seen by a backend.
#[derive(Debug, Clone)]
pub struct RunControl {
    /// Set when the client goes away or aborts.
    pub cancel: CancelToken,
    /// When the run must end with `RunError::Timeout`.
    pub deadline: Instant,
}

impl RunControl {
    /// A control with a deadline `timeout` from now.
    pub fn new(cancel: CancelToken, timeout: Duration) -> Self {
        RunControl { cancel, deadline: Instant::now() + timeout }
    }

    /// `Err` when the run must stop now.
    pub fn check(&self) -> Result<(), RunError> {
        if self.cancel.is_cancelled() {
            Err(RunError::Cancelled)
        } else if Instant::now() >= self.deadline {
            Err(RunError::Timeout)
        } else {
            Ok(())
        }
    }

    /// Sleep `dur` (cut short by the deadline), failing on cancel or deadline, and ticking `out`
    /// every [`TICK`] meanwhile.
    pub fn sleep(&self, dur: Duration, out: &mut dyn EventSink) -> Result<(), RunError> {
        let end = Instant::now() + dur;
        loop {
            let now = Instant::now();
            let step = end.saturating_duration_since(now).min(TICK).min(self.deadline.saturating_duration_since(now));
            if self.cancel.wait(step) {
                return Err(RunError::Cancelled);
            }
            self.check()?;
            if Instant::now() >= end {
                return Ok(());
            }
            out.tick()?;
        }
    }
}

/// A configured agent with its backend.
#[derive(Debug)]
pub struct Agent {
    /// Its configuration.
    pub cfg: crate::config::AgentConfig,
    /// The backend answering its runs.
    pub backend: Arc<dyn Backend>,
    /// Its counters in `/metrics`.
    pub stats: Arc<crate::metrics::AgentStats>,
}

/// A model or program that answers runs.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Produce the reply for `input`, pushing events into `out`. Returning `Ok` finishes the
    /// run (with the finish reason last given to `out`, `stop` by default).
    fn run(&self, input: &RunInput<'_>, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), RunError>;
}

/// Counts whitespace-separated words: the token estimate used by `echo` and as a fallback.
///
/// The same count as `s.split_whitespace().count()` (Unicode whitespace), eight ASCII bytes at a
/// time: prompts can be tens of MiB, and this runs once per run on a worker.
pub fn count_words(s: &str) -> u64 {
    const HI: u64 = 0x8080_8080_8080_8080;
    const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const fn splat(b: u8) -> u64 {
        u64::from_ne_bytes([b; 8])
    }
    let b = s.as_bytes();
    let mut words = 0u64;
    // Bit 7 set when the byte before the current position is whitespace (or at the start).
    let mut prev_ws = 0x80u64;
    let mut i = 0;
    // Word starts per byte lane (each under 256), summed into `words` every 255 blocks and at
    // the end of every ASCII run: no population count per block.
    let mut lanes = 0u64;
    let mut in_lanes = 0u32;
    let sum = |lanes: u64| {
        let pairs = (lanes & 0x00ff_00ff_00ff_00ff) + ((lanes >> 8) & 0x00ff_00ff_00ff_00ff);
        pairs.wrapping_mul(0x0001_0001_0001_0001) >> 48
    };
    while i < b.len() {
        for chunk in b[i..].chunks_exact(8) {
            let x =
                u64::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7]]);
            if x & HI != 0 {
                break;
            }
            // No byte under 0x21, so no whitespace: at most a word starting at the first byte.
            if x.wrapping_sub(splat(0x21)) & !x & HI == 0 {
                words += prev_ws >> 7;
                prev_ws = 0;
                i += 8;
                continue;
            }
            // Per byte, bit 7 = whitespace: a space, or 0x09..=0x0d (no carries: bytes < 0x80).
            let t = x ^ splat(b' ');
            let space = !((((t & LO7) + LO7) | t) & HI) & HI;
            let ge_tab = x + splat(0x80 - 0x09);
            let ge_so = x + splat(0x80 - 0x0e);
            let ws = space | (ge_tab & !ge_so & HI);
            // A word starts at a non-whitespace byte after a whitespace one (little endian: the
            // next byte is the next 8 bits up).
            let starts = !ws & HI & ((ws << 8) | prev_ws);
            lanes += starts >> 7;
            in_lanes += 1;
            if in_lanes == 255 {
                words += sum(lanes);
                lanes = 0;
                in_lanes = 0;
            }
            prev_ws = (ws >> 56) & 0x80;
            i += 8;
        }
        if in_lanes > 0 {
            words += sum(lanes);
            lanes = 0;
            in_lanes = 0;
        }
        if i >= b.len() {
            break;
        }
        // One character: a short tail or a non-ASCII one (`i` is always on a char boundary).
        let c = s[i..].chars().next().unwrap_or(' ');
        let ws = c.is_whitespace();
        words += u64::from(prev_ws != 0 && !ws);
        prev_ws = if ws { 0x80 } else { 0 };
        i += c.len_utf8();
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_count_matches_split_whitespace() {
        let ws = [" ", "\t", "\n", "\r", "\u{b}", "\u{c}", "\u{85}", "\u{a0}", "\u{2028}", "\u{3000}", "\u{1c}"];
        let words = ["a", "héllo", "x", "日本", "\u{200b}", "longer-word-than-a-block", "🙂"];
        let mut cases: Vec<String> = vec![String::new(), " ".into(), "one".into(), "a  b ".into()];
        // A deterministic mix that puts ASCII blocks, non-ASCII characters and every kind of
        // whitespace on both sides of the 16-byte blocks.
        let mut x = 12345u64;
        for len in [5, 17, 40, 300] {
            for _ in 0..50 {
                let mut s = String::new();
                for _ in 0..len {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let pick = (x >> 33) as usize;
                    if pick.is_multiple_of(3) {
                        s.push_str(ws[pick / 3 % ws.len()]);
                    } else {
                        s.push_str(words[pick / 3 % words.len()]);
                    }
                }
                cases.push(s);
            }
        }
        cases.push("x".repeat(1000) + " y");
        for s in &cases {
            assert_eq!(count_words(s), s.split_whitespace().count() as u64, "{s:?}");
        }
    }
}
