//! The run path every surface uses: context building, the backend call, usage accounting and the
//! transcript append.

use std::time::Duration;

use super::{
    CancelToken, ChatMessage, EventSink, FinishReason, Role, RunControl, RunError, RunInput, RunOptions, Usage,
    count_words,
};
use crate::gateway::Gateway;

/// A resolved request for one agent turn.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Unique run id.
    pub run_id: String,
    /// Index of the agent in [`Gateway::agents`].
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
    /// Token counts (reported by the backend, else word counts).
    pub usage: Usage,
    /// Finish reason when the run succeeded.
    pub finish: FinishReason,
    /// Why the run failed, if it did.
    pub error: Option<RunError>,
}

struct Recorder<'a> {
    inner: &'a mut dyn EventSink,
    text: String,
    usage: Option<Usage>,
    finish: FinishReason,
}

impl EventSink for Recorder<'_> {
    fn delta(&mut self, text: &str) -> Result<(), RunError> {
        if text.is_empty() {
            return Ok(());
        }
        self.text.push_str(text);
        self.inner.delta(text)
    }
    fn usage(&mut self, usage: Usage) {
        self.usage = Some(usage);
        self.inner.usage(usage);
    }
    fn finish(&mut self, reason: FinishReason) {
        self.finish = reason;
        self.inner.finish(reason);
    }
    fn tick(&mut self) -> Result<(), RunError> {
        self.inner.tick()
    }
    fn batch_begin(&mut self) {
        self.inner.batch_begin()
    }
    fn batch_end(&mut self) -> Result<(), RunError> {
        self.inner.batch_end()
    }
}

/// The messages of a request that form its new turn: those after its last `assistant` message.
pub fn new_turn(messages: &[ChatMessage]) -> &[ChatMessage] {
    let start = messages.iter().rposition(|m| m.role == Role::Assistant).map_or(0, |i| i + 1);
    &messages[start..]
}

/// Run `req` to completion on the calling thread, streaming events into `sink`.
pub fn execute(gw: &Gateway, req: &RunRequest, cancel: &CancelToken, sink: &mut dyn EventSink) -> RunOutcome {
    let agent = &gw.agents[req.agent];
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
        let mut history = gw.sessions.history(&req.session_key);
        history.extend_from_slice(turn);
        (history, turn)
    } else {
        (req.messages.clone(), &req.messages[..])
    };
    let input = RunInput {
        run_id: req.run_id.clone(),
        agent_id: agent.cfg.id.clone(),
        session_key: req.session_key.clone(),
        system_prompt,
        messages,
        options: req.options.clone(),
    };
    let ctl = RunControl::new(cancel.clone(), req.timeout.unwrap_or(agent.cfg.timeout));
    let mut rec = Recorder { inner: sink, text: String::new(), usage: None, finish: FinishReason::Stop };
    let result = ctl.check().and_then(|_| agent.backend.run(&input, &ctl, &mut rec));
    // A backend that noticed nothing still loses to a cancel or deadline that fired meanwhile.
    let error = result.err();
    let usage = rec.usage.unwrap_or_else(|| Usage {
        prompt_tokens: count_words(&input.system_prompt)
            + input.messages.iter().map(|m| count_words(&m.content)).sum::<u64>(),
        completion_tokens: count_words(&rec.text),
    });
    if sticky
        && let Err(e) =
            gw.sessions.append_turn(&req.session_key, &agent.cfg.id, turn, &rec.text, usage, error.is_some())
    {
        crate::log!(Error, "session {}: transcript write failed: {e}", req.session_key);
    }
    crate::log!(
        Debug,
        "run {} agent={} session={} finish={} error={:?} tokens={}+{}",
        req.run_id,
        agent.cfg.id,
        req.session_key,
        rec.finish.as_str(),
        error,
        usage.prompt_tokens,
        usage.completion_tokens
    );
    RunOutcome { text: rec.text, usage, finish: rec.finish, error }
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
