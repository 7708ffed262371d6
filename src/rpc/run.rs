//! The worker side of a run started over WebSocket: the shared run path
//! ([`crate::agent::run::execute`]) with a sink that turns backend events into `agent` or `chat`
//! event payloads and posts them to the connection through its [`Outbox`].
//!
//! Payloads are rendered here, on the worker, so the event loop only frames and writes them.
//!
//! Output is bounded per run, not per token: `agent` assistant events are coalesced to at most
//! one per [`AGENT_EVENT_EVERY`] (each carries the `delta` since the previous one and the
//! cumulative `text`, SPEC §8), `chat` deltas to one per `CHAT_DELTA_EVERY`, and while the
//! connection has more than its bound on the way to the client ([`Outbox::congested`]) both wait
//! and merge into the next event, so a client that reads slowly gets fewer, larger events
//! instead of a growing queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::protocol;
use super::{Outbox, Outgoing};
use crate::agent::registry::RunSummary;
use crate::agent::run::{RunRequest, execute};
use crate::agent::tools::{ToolCall, ToolCallPiece, ToolEvent};
use crate::agent::{CancelToken, FinishReason, RunError, RunSink, Usage};
use crate::gateway::Gateway;
use crate::util::now_ms;

/// Chat deltas carry the whole text so far, so they are sent at most this often (the final
/// event always carries everything).
const CHAT_DELTA_EVERY: Duration = Duration::from_millis(150);
/// `agent` assistant events per run are sent at most this often (SPEC §8).
pub const AGENT_EVENT_EVERY: Duration = Duration::from_millis(50);

/// A connection's outbox, shared by its runs and waiters.
pub type Link = Arc<dyn Outbox>;

/// Which surface started the run, which decides the events it emits.
#[derive(Debug, Clone)]
pub enum Kind {
    /// The `agent` method: `agent` events, then the second `res` to request `req_id`.
    Agent {
        /// The request to answer.
        req_id: String,
    },
    /// `chat.send`: `chat` events.
    Chat,
}

/// A run handed to a worker.
#[derive(Debug)]
pub struct WsRun {
    /// The shared gateway.
    pub gw: Arc<Gateway>,
    /// The run.
    pub run: RunRequest,
    /// Agent id (for results).
    pub agent_id: String,
    /// Events go here.
    pub link: Link,
    /// What started it.
    pub kind: Kind,
    /// Cancelled by `chat.abort` or when the connection closes.
    pub cancel: CancelToken,
    /// Unix ms when the run was accepted.
    pub accepted_at: u64,
}

struct Sink<'a> {
    r: &'a WsRun,
    seq: u64,
    text: String,
    last_chat: Option<Instant>,
    /// `text` grew since the last `chat` delta event.
    chat_dirty: bool,
    /// Assistant text not yet sent in an `agent` event.
    pending: String,
    last_assistant: Option<Instant>,
}

impl Sink<'_> {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn agent_event(&mut self, stream: &str, data: Value) {
        let seq = self.next_seq();
        let p = json!({ "runId": self.r.run.run_id, "seq": seq, "stream": stream, "ts": now_ms(), "data": data,
                        "sessionKey": self.r.run.session_key });
        self.r.link.post(Outgoing::Event { name: "agent", payload: p.to_string() });
    }

    fn chat_event(&mut self, state: &str, extra: Value) {
        let seq = self.next_seq();
        let mut p = json!({ "runId": self.r.run.run_id, "sessionKey": self.r.run.session_key, "seq": seq,
                            "state": state,
                            "message": { "role": "assistant", "content": [{ "type": "text", "text": self.text }],
                                         "timestamp": now_ms() } });
        if let (Value::Object(p), Value::Object(e)) = (&mut p, extra) {
            p.extend(e);
        }
        self.r.link.post(Outgoing::Event { name: "chat", payload: p.to_string() });
    }

    /// Send the pending assistant text as one `agent` event when one is due (always, when
    /// `force`: before the run's last events).
    fn flush_assistant(&mut self, force: bool) {
        if self.pending.is_empty() {
            return;
        }
        let now = Instant::now();
        let due = self.last_assistant.is_none_or(|t| now.duration_since(t) >= AGENT_EVENT_EVERY);
        if !force && (!due || self.r.link.congested()) {
            return;
        }
        self.last_assistant = Some(now);
        let delta = std::mem::take(&mut self.pending);
        let data = json!({ "text": self.text, "delta": delta });
        self.agent_event("assistant", data);
    }

    /// Send a `chat` delta event when the text changed and one is due.
    fn flush_chat(&mut self) {
        let now = Instant::now();
        let due = self.last_chat.is_none_or(|t| now.duration_since(t) >= CHAT_DELTA_EVERY);
        if self.chat_dirty && due && !self.r.link.congested() {
            self.last_chat = Some(now);
            self.chat_dirty = false;
            self.chat_event("delta", json!({}));
        }
    }
}

impl RunSink for Sink<'_> {
    fn delta(&mut self, d: &str) -> Result<(), RunError> {
        if self.r.cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        self.text.push_str(d);
        match self.r.kind {
            Kind::Agent { .. } => {
                self.pending.push_str(d);
                self.flush_assistant(false);
            }
            Kind::Chat => {
                self.chat_dirty = true;
                self.flush_chat();
            }
        }
        Ok(())
    }

    fn tool_call(&mut self, _: &ToolCallPiece) -> Result<(), RunError> {
        // Calls to the caller's tools arrive whole in the run's result.
        if self.r.cancel.is_cancelled() { Err(RunError::Cancelled) } else { Ok(()) }
    }

    fn tool_event(&mut self, ev: &ToolEvent<'_>) {
        if !matches!(self.r.kind, Kind::Agent { .. }) {
            return;
        }
        // Text held back by coalescing goes out before the tool step it led to.
        self.flush_assistant(true);
        let data = match ev {
            ToolEvent::Start { id, name, args } => {
                json!({ "phase": "start", "toolCallId": id, "name": name, "args": args })
            }
            ToolEvent::Result { id, name, result } => {
                json!({ "phase": "result", "toolCallId": id, "name": name, "result": result })
            }
            ToolEvent::Error { id, name, error } => {
                json!({ "phase": "error", "toolCallId": id, "name": name, "error": error })
            }
        };
        self.agent_event("tool", data);
    }

    fn tick(&mut self) -> Result<(), RunError> {
        if self.r.cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        // Text held back by coalescing goes out during a pause in the reply, not at its end.
        match self.r.kind {
            Kind::Agent { .. } => self.flush_assistant(false),
            Kind::Chat => self.flush_chat(),
        }
        Ok(())
    }
}

/// Ends the run for its waiters and its connection even if the backend panics.
struct Finisher<'a> {
    r: &'a WsRun,
    armed: bool,
}

impl Drop for Finisher<'_> {
    fn drop(&mut self) {
        if self.armed {
            let err = Some(RunError::Backend("the run failed unexpectedly".into()));
            let s = self.r.summary(String::new(), Vec::new(), FinishReason::Stop, Usage::default(), err);
            self.r.gw.runs().finish(s.clone());
            self.r.answer(&s);
        }
    }
}

impl WsRun {
    /// Run to completion on this (worker) thread.
    pub fn execute(self) {
        let mut fin = Finisher { r: &self, armed: true };
        let mut sink = Sink {
            r: &self,
            seq: 0,
            text: String::new(),
            last_chat: None,
            chat_dirty: false,
            pending: String::new(),
            last_assistant: None,
        };
        if let Kind::Agent { .. } = self.kind {
            sink.agent_event("lifecycle", json!({ "phase": "start", "startedAt": now_ms() }));
        }
        let out = execute(&self.gw.agents()[self.run.agent], self.gw.sessions(), &self.run, &self.cancel, &mut sink);
        fin.armed = false;
        if let Kind::Agent { .. } = self.kind {
            // The deltas sent add up to the whole reply before the run's end is reported.
            sink.flush_assistant(true);
        }
        let summary = self.summary(out.text, out.tool_calls, out.finish, out.usage, out.error);
        // The registry learns of the end first, so that a client reacting to the final event
        // (`chat.abort`, `agent.wait`) sees the run as finished.
        self.gw.runs().finish(summary.clone());
        // Only the final messages are left: the run's place in the pool is free for the next.
        self.gw.pool().release_place();
        let s = &summary;
        match (&self.kind, &s.error) {
            (Kind::Agent { .. }, None) => {
                sink.agent_event("lifecycle", json!({ "phase": "end", "finishReason": s.finish.as_str() }));
            }
            (Kind::Agent { .. }, Some(e)) => {
                let shape = protocol::run_error(e);
                sink.agent_event("error", json!({ "code": shape.code.as_str(), "message": shape.message }));
                sink.agent_event("lifecycle", json!({ "phase": "error", "error": e.to_string() }));
            }
            (Kind::Chat, err) => {
                let usage = s.usage.to_json(true);
                sink.text = s.text.clone();
                match err {
                    None => {
                        let mut extra = json!({ "stopReason": s.finish.as_str(), "usage": usage });
                        if !s.tool_calls.is_empty() {
                            extra["toolCalls"] = s.tool_calls.iter().map(ToolCall::to_json).collect();
                        }
                        sink.chat_event("final", extra)
                    }
                    Some(RunError::Cancelled) => sink.chat_event("aborted", json!({ "usage": usage })),
                    Some(e) => {
                        let shape = protocol::run_error(e);
                        sink.chat_event(
                            "error",
                            json!({ "errorMessage": shape.message, "errorKind": shape.code.as_str() }),
                        )
                    }
                }
            }
        }
        self.answer(s);
    }

    fn summary(
        &self,
        text: String,
        tool_calls: Vec<ToolCall>,
        finish: FinishReason,
        usage: Usage,
        error: Option<RunError>,
    ) -> RunSummary {
        RunSummary {
            run_id: self.run.run_id.clone(),
            session_key: self.run.session_key.clone(),
            agent_id: self.agent_id.clone(),
            started_at: self.accepted_at,
            ended_at: now_ms(),
            text,
            tool_calls,
            finish,
            usage,
            error,
        }
    }

    /// The `agent` request's second answer, and the end of the run for its connection.
    fn answer(&self, s: &RunSummary) {
        if let Kind::Agent { req_id } = &self.kind {
            self.link.post(Outgoing::Res(protocol::agent_final(req_id, s)));
        }
        self.link.post(Outgoing::RunEnded { run_id: s.run_id.clone() });
    }
}
