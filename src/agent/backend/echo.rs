//! The built-in `echo` backend (SPEC §6): replies with the last user message, one delta per
//! whitespace-separated word (spaces kept), with word-count usage.

use std::time::Duration;

use crate::agent::{Backend, EventSink, FinishReason, Role, RunControl, RunError, RunInput, Usage, count_words};

/// Deterministic echo.
#[derive(Debug, Clone)]
pub struct Echo {
    /// Sleep between deltas (honours cancellation).
    pub token_delay: Duration,
    /// Cut the reply after this many words and finish with `length`.
    pub max_tokens: Option<u64>,
}

/// Split `text` into deltas: each starts with the whitespace before its word, so that the deltas
/// concatenate back to `text` (trailing whitespace stays on the last delta).
pub fn split_words(text: &str) -> Vec<&str> {
    let mut starts = Vec::new();
    let mut seen_word = false;
    let mut prev_ws = true;
    for (i, c) in text.char_indices() {
        let ws = c.is_whitespace();
        // A new delta starts with the whitespace run that follows a word.
        if ws && !prev_ws && seen_word {
            starts.push(i);
        }
        seen_word |= !ws;
        prev_ws = ws;
    }
    // Trailing whitespace stays on the last word rather than forming a delta of its own.
    if prev_ws && !starts.is_empty() {
        starts.pop();
    }
    let mut out = Vec::with_capacity(starts.len() + 1);
    let mut from = 0;
    for s in starts {
        out.push(&text[from..s]);
        from = s;
    }
    if from < text.len() {
        out.push(&text[from..]);
    }
    out
}

impl Backend for Echo {
    fn run(&self, input: &RunInput, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), RunError> {
        let reply =
            input.messages.iter().rev().find(|m| m.role == Role::User).map(|m| m.content.as_str()).unwrap_or("");
        let prompt_tokens =
            count_words(&input.system_prompt) + input.messages.iter().map(|m| count_words(&m.content)).sum::<u64>();
        let limit = match (self.max_tokens, input.options.max_tokens) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let words = split_words(reply);
        let mut sent = 0u64;
        let mut reason = FinishReason::Stop;
        for (i, w) in words.iter().enumerate() {
            if limit.is_some_and(|l| sent >= l) {
                reason = FinishReason::Length;
                break;
            }
            if i > 0 && !self.token_delay.is_zero() {
                ctl.sleep(self.token_delay, out)?;
            } else {
                ctl.check()?;
            }
            out.delta(w)?;
            sent += count_words(w);
        }
        out.usage(Usage { prompt_tokens, completion_tokens: sent });
        out.finish(reason);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_their_spaces() {
        assert_eq!(split_words("hello big  world"), vec!["hello", " big", "  world"]);
        assert_eq!(split_words("  lead trail  "), vec!["  lead", " trail  "]);
        assert_eq!(split_words(""), Vec::<&str>::new());
        assert_eq!(split_words("   "), vec!["   "]);
        assert_eq!(split_words("one"), vec!["one"]);
        assert_eq!(split_words("a\nb\tc"), vec!["a", "\nb", "\tc"]);
    }
}
