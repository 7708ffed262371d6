//! The run path every surface uses: context building, the backend call, usage accounting and the
//! transcript append.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use super::Agent;
use super::pool::{BulkLanes, LARGE_INPUT};
use super::tools::{Calls, ToolCall, ToolCallPiece, ToolEvent};
use super::{
    CancelToken, ChatMessage, EventSink, FinishReason, Role, RunControl, RunError, RunInput, RunOptions, RunSink,
    Usage, count_words, tool_exec,
};
use crate::config::AgentToolConfig;
use crate::session::SessionStore;

/// A resolved request for one agent turn.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Unique run id.
    pub run_id: String,
    /// Index of the agent in the gateway's agent list.
    pub agent: usize,
    /// Session key (`agent:<id>:…`).
    pub session_key: String,
    /// Whether the session keeps history (false for ephemeral keys).
    pub sticky: bool,
    /// Extra system text from the request (system/developer messages), in order.
    pub extra_system: Vec<String>,
    /// The request's non-system messages.
    pub messages: Vec<ChatMessage>,
    /// Sampling options.
    pub options: RunOptions,
    /// Overrides the agent's `timeoutSeconds`.
    pub timeout: Option<Duration>,
}

impl RunRequest {
    /// A run of one user message (the WebSocket methods and `gatelet agent`), with a fresh
    /// `run-…` id and default options.
    pub fn user_turn(agent: usize, session_key: String, sticky: bool, message: String) -> Self {
        RunRequest {
            run_id: format!("run-{}", crate::util::random_hex(24)),
            agent,
            session_key,
            sticky,
            extra_system: Vec::new(),
            messages: vec![ChatMessage::new(Role::User, message)],
            options: RunOptions::default(),
            timeout: None,
        }
    }
}

/// What a run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RunOutcome {
    /// The reply text (partial when the run failed).
    pub text: String,
    /// Calls to the client's tools the reply ends with (finish `tool_calls`).
    pub tool_calls: Vec<ToolCall>,
    /// Token counts (reported by the backend, else word counts).
    pub usage: Usage,
    /// Finish reason when the run succeeded.
    pub finish: FinishReason,
    /// Why the run failed, if it did.
    pub error: Option<RunError>,
}

impl RunOutcome {
    /// A run that produced nothing (yet): no text, no calls, no usage; `error` says why, if it
    /// never ran.
    pub fn nothing(error: Option<RunError>) -> Self {
        RunOutcome {
            text: String::new(),
            tool_calls: Vec::new(),
            usage: Usage::default(),
            finish: FinishReason::Stop,
            error,
        }
    }
}

/// Sits between the backend and the surface's sink for one backend call (a step): keeps the
/// text and the calls, forwards text and the pieces of calls to the client's tools (numbered
/// among themselves), and holds back the pieces of calls to the agent's own tools.
struct Recorder<'a> {
    inner: &'a mut dyn RunSink,
    agent_tools: &'a [AgentToolConfig],
    text: String,
    step_text: String,
    usage: Option<Usage>,
    finish: FinishReason,
    /// When the first reply text arrived (time to first token).
    first: Option<Instant>,
    calls: Calls,
    /// Per call of this step: its index among the client's calls, `None` for agent tools.
    routes: Vec<Option<usize>>,
    client_calls: usize,
}

impl Recorder<'_> {
    fn next_step(&mut self) {
        self.step_text.clear();
        self.calls = Calls::default();
        self.routes.clear();
        self.client_calls = 0;
        self.finish = FinishReason::Stop;
    }
}

impl RunSink for Recorder<'_> {
    fn delta(&mut self, text: &str) -> Result<(), RunError> {
        if text.is_empty() {
            return Ok(());
        }
        if self.first.is_none() {
            self.first = Some(Instant::now());
        }
        self.text.push_str(text);
        self.step_text.push_str(text);
        self.inner.delta(text)
    }
    fn tool_call(&mut self, piece: &ToolCallPiece) -> Result<(), RunError> {
        // A streamed tool call is the reply's first output just as text is.
        if self.first.is_none() {
            self.first = Some(Instant::now());
        }
        self.calls.add(piece).map_err(|e| RunError::Backend(format!("backend: {e}")))?;
        if piece.index == self.routes.len() {
            let agent = piece.name.as_deref().is_some_and(|n| self.agent_tools.iter().any(|t| t.name == n));
            self.routes.push((!agent).then_some(self.client_calls));
            self.client_calls += usize::from(!agent);
        }
        match self.routes.get(piece.index).copied().flatten() {
            Some(index) => self.inner.tool_call(&ToolCallPiece { index, ..piece.clone() }),
            None => Ok(()),
        }
    }
    fn tick(&mut self) -> Result<(), RunError> {
        self.inner.tick()
    }
    fn tool_event(&mut self, ev: &ToolEvent<'_>) {
        self.inner.tool_event(ev)
    }
    fn batch_begin(&mut self) {
        self.inner.batch_begin()
    }
    fn batch_end(&mut self) -> Result<(), RunError> {
        self.inner.batch_end()
    }
}

impl EventSink for Recorder<'_> {
    fn usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
    }
    fn finish(&mut self, reason: FinishReason) {
        self.finish = reason;
    }
}

/// The messages of a request that form its new turn: those after its last `assistant` message.
pub fn new_turn(messages: &[ChatMessage]) -> &[ChatMessage] {
    let start = messages.iter().rposition(|m| m.role == Role::Assistant).map_or(0, |i| i + 1);
    &messages[start..]
}

/// Run `req` on `agent` to completion on the calling thread, streaming events into `sink`; a
/// sticky run reads its context from and appends its turn to `sessions`.
///
/// When the backend calls the agent's own tools, they run here, their calls and results join
/// the conversation and the backend is called again, up to the agent's `maxToolSteps` (SPEC
/// §5.1). A call to any other tool ends the run with `tool_calls` for the client to run.
pub fn execute(
    agent: &Agent,
    sessions: &SessionStore,
    req: &RunRequest,
    cancel: &CancelToken,
    sink: &mut dyn RunSink,
) -> RunOutcome {
    let started = Instant::now();
    let _active = crate::metrics::run_guard();
    let mut system_prompt = agent.cfg.system_prompt.clone();
    for s in &req.extra_system {
        if !system_prompt.is_empty() {
            system_prompt.push_str("\n\n");
        }
        system_prompt.push_str(s);
    }
    let sticky = req.sticky;
    let (messages, turn) = if sticky {
        let turn = new_turn(&req.messages);
        (Cow::Owned(sessions.context_for_run(&req.session_key, turn)), turn)
    } else {
        (Cow::Borrowed(&req.messages[..]), &req.messages[..])
    };
    let mut options = req.options.clone();
    if !agent.cfg.tools.is_empty() {
        // The agent's tools win over a client tool of the same name.
        options.tools.retain(|t| {
            let name = t["function"]["name"].as_str().unwrap_or("");
            !agent.cfg.tools.iter().any(|a| a.name == name)
        });
        options.tools.extend(agent.cfg.tools.iter().map(AgentToolConfig::to_json));
    }
    // Counted once here: backends that count words take it from the input. A large prompt is
    // bulk work, done in its turn (see `BulkLanes`).
    let size = system_prompt.len() + messages.iter().map(|m| m.content.len()).sum::<usize>();
    let prompt_words = {
        let _lane = (size >= LARGE_INPUT).then(|| BulkLanes::global().take());
        RunInput::count_prompt_words(&system_prompt, &messages)
    };
    let mut input = RunInput {
        run_id: req.run_id.clone(),
        agent_id: agent.cfg.id.clone(),
        session_key: req.session_key.clone(),
        system_prompt,
        messages,
        options,
        prompt_words,
    };
    let ctl = RunControl::new(cancel.clone(), req.timeout.unwrap_or(agent.cfg.timeout));
    let mut rec = Recorder {
        inner: sink,
        agent_tools: &agent.cfg.tools,
        text: String::new(),
        step_text: String::new(),
        usage: None,
        finish: FinishReason::Stop,
        calls: Calls::default(),
        routes: Vec::new(),
        client_calls: 0,
        first: None,
    };
    // What the run adds to the conversation: agent-tool steps, then the reply.
    let mut produced: Vec<ChatMessage> = Vec::new();
    let mut reported: Option<Usage> = None;
    let mut client_calls = Vec::new();
    let mut steps = 0u32;
    let result = loop {
        rec.next_step();
        let r = ctl.check().and_then(|_| agent.backend.run(&input, &ctl, &mut rec));
        if let Some(u) = rec.usage.take() {
            let t = reported.get_or_insert_with(Usage::default);
            t.prompt_tokens += u.prompt_tokens;
            t.completion_tokens += u.completion_tokens;
        }
        let calls = rec.calls.take();
        if let Err(e) = r {
            // A cancel or deadline that fired meanwhile wins over what the backend noticed.
            produced.push(ChatMessage::new(Role::Assistant, rec.step_text.clone()));
            break Err(ctl.check().err().unwrap_or(e));
        }
        let (mine, theirs): (Vec<ToolCall>, Vec<ToolCall>) =
            calls.iter().cloned().partition(|c| agent.cfg.tools.iter().any(|t| t.name == c.name));
        if mine.is_empty() || steps >= agent.cfg.max_tool_steps {
            if !mine.is_empty() {
                crate::log!(Debug, "run {}: maxToolSteps ({}) reached", req.run_id, agent.cfg.max_tool_steps);
                rec.finish = FinishReason::Length;
            } else if !theirs.is_empty() {
                rec.finish = FinishReason::ToolCalls;
            } else if rec.finish == FinishReason::ToolCalls {
                // An upstream that says `tool_calls` but sent none: a plain end.
                rec.finish = FinishReason::Stop;
            }
            produced.push(if theirs.is_empty() {
                ChatMessage::new(Role::Assistant, rec.step_text.clone())
            } else {
                ChatMessage::assistant_calls(&rec.step_text, &theirs)
            });
            client_calls = theirs;
            break Ok(());
        }
        steps += 1;
        let step = ChatMessage::assistant_calls(&rec.step_text, &calls);
        input.prompt_words += count_words(&step.content);
        input.messages.to_mut().push(step.clone());
        produced.push(step);
        let mut stopped = None;
        for c in &mine {
            let Some(tool) = agent.cfg.tools.iter().find(|t| t.name == c.name) else { continue };
            if let Some(e) = &stopped {
                // Every call keeps a result, so the stored history stays valid for upstreams.
                produced.push(ChatMessage::tool_result(&c.id, format!("tool {} did not run: {e}", c.name)));
                continue;
            }
            rec.tool_event(&ToolEvent::Start { id: &c.id, name: &c.name, args: &c.arguments });
            let result = match tool_exec::run(tool, &c.arguments, &ctl, &mut rec) {
                Ok(Ok(out)) => {
                    rec.tool_event(&ToolEvent::Result { id: &c.id, name: &c.name, result: &out });
                    out
                }
                Ok(Err(err)) => {
                    rec.tool_event(&ToolEvent::Error { id: &c.id, name: &c.name, error: &err });
                    err
                }
                Err(e) => {
                    produced.push(ChatMessage::tool_result(&c.id, format!("tool {} was stopped: {e}", c.name)));
                    stopped = Some(e);
                    continue;
                }
            };
            let msg = ChatMessage::tool_result(&c.id, result);
            input.prompt_words += count_words(&msg.content);
            input.messages.to_mut().push(msg.clone());
            produced.push(msg);
        }
        if let Some(e) = stopped {
            break Err(e);
        }
        if !theirs.is_empty() {
            rec.finish = FinishReason::ToolCalls;
            client_calls = theirs;
            break Ok(());
        }
    };
    let error = result.err();
    let usage =
        reported.unwrap_or_else(|| Usage { prompt_tokens: prompt_words, completion_tokens: count_words(&rec.text) });
    if sticky
        && let Err(e) = sessions.append_turn(&req.session_key, &agent.cfg.id, turn, &produced, usage, error.is_some())
    {
        crate::log!(Error, "session {}: transcript write failed: {e}", req.session_key);
    }
    let outcome = match &error {
        None => crate::metrics::Outcome::Completed,
        Some(RunError::Timeout) => crate::metrics::Outcome::Timeout,
        Some(RunError::Backend(_)) => crate::metrics::Outcome::BackendError,
        Some(RunError::Cancelled) => crate::metrics::Outcome::Cancelled,
    };
    agent.stats.record_run(
        outcome,
        started.elapsed(),
        rec.first.map(|f| f.duration_since(started)),
        (usage.prompt_tokens, usage.completion_tokens),
    );
    crate::log!(
        Debug,
        "run {} agent={} session={} finish={} error={:?} tokens={}+{} tool_steps={}",
        req.run_id,
        agent.cfg.id,
        req.session_key,
        rec.finish.as_str(),
        error,
        usage.prompt_tokens,
        usage.completion_tokens,
        steps
    );
    RunOutcome { text: rec.text, tool_calls: client_calls, usage, finish: rec.finish, error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_turn_is_after_last_assistant() {
        let m = |r, c: &str| ChatMessage::new(r, c);
        let msgs = vec![m(Role::User, "a"), m(Role::Assistant, "b"), m(Role::User, "c"), m(Role::Tool, "d")];
        assert_eq!(new_turn(&msgs), &msgs[2..]);
        assert_eq!(new_turn(&msgs[..1]), &msgs[..1]);
        assert!(new_turn(&msgs[..2]).is_empty());
    }
}
