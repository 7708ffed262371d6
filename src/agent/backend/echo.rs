//! The built-in `echo` backend (SPEC §6): replies with the last user message, one delta per
//! whitespace-separated word (spaces kept), with word-count usage.
//!
//! Tool mode (SPEC §5.1), so that a whole tool round trip works without a model: when tools are
//! offered and the last user message is `/tool NAME JSON`, the reply is one call to `NAME` with
//! those arguments, streamed in pieces of at most [`ARG_PIECE`] bytes; when the last message is
//! a tool result, the reply is `tool said: <result>`.

use std::time::Duration;

use crate::agent::tools::{ToolCallPiece, split_pieces};
use crate::agent::{Backend, EventSink, FinishReason, Role, RunControl, RunError, RunInput, Usage, count_words};

/// Largest argument piece of a tool call in tool mode.
pub const ARG_PIECE: usize = 8;

/// `/tool NAME JSON` → (`NAME`, `JSON`); the arguments default to `{}`.
pub fn tool_command(text: &str) -> Option<(&str, &str)> {
    let rest = text.trim().strip_prefix("/tool")?;
    if !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let rest = rest.trim_start();
    let (name, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    if name.is_empty() {
        return None;
    }
    let args = args.trim();
    Some((name, if args.is_empty() { "{}" } else { args }))
}

/// Deterministic echo.
#[derive(Debug, Clone)]
pub struct Echo {
    /// Sleep between deltas (honours cancellation).
    pub token_delay: Duration,
    /// Cut the reply after this many words and finish with `length`.
    pub max_tokens: Option<u64>,
}

/// Split `text` into deltas: each starts with the whitespace before its word, so that the deltas
/// concatenate back to `text` (trailing whitespace stays on the last delta). Lazy: a reply of
/// millions of words is never held as a list.
pub fn split_words(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let word = rest.trim_start();
        let word_end = rest.len() - word.len() + word.find(char::is_whitespace).unwrap_or(word.len());
        // Trailing whitespace stays on the last word rather than forming a delta of its own.
        let end = if rest[word_end..].trim_start().is_empty() { rest.len() } else { word_end };
        let (delta, r) = rest.split_at(end);
        rest = r;
        Some(delta)
    })
}

impl Backend for Echo {
    fn run(&self, input: &RunInput<'_>, ctl: &RunControl, out: &mut dyn EventSink) -> Result<(), RunError> {
        let prompt_tokens = input.prompt_words;
        let last = input.messages.last();
        let tool_said;
        let reply = if let Some(m) = last.filter(|m| m.role == Role::Tool) {
            tool_said = format!("tool said: {}", m.content);
            tool_said.as_str()
        } else {
            let user = input.messages.iter().rev().find(|m| m.role == Role::User).map(|m| m.content.as_str());
            let user = user.unwrap_or("");
            if !input.options.tools.is_empty()
                && let Some((name, args)) = tool_command(user)
            {
                ctl.check()?;
                // Ids differ from turn to turn and stay the same for the same conversation.
                let id = format!("call_{}", input.messages.len());
                let pieces = split_pieces(args, ARG_PIECE);
                out.tool_call(&ToolCallPiece {
                    index: 0,
                    id: Some(id),
                    name: Some(name.into()),
                    arguments: String::new(),
                })?;
                for (i, p) in pieces.iter().enumerate() {
                    if i > 0 && !self.token_delay.is_zero() {
                        ctl.sleep(self.token_delay, out)?;
                    }
                    out.tool_call(&ToolCallPiece { index: 0, id: None, name: None, arguments: (*p).into() })?;
                }
                out.usage(Usage { prompt_tokens, completion_tokens: pieces.len() as u64 });
                out.finish(FinishReason::ToolCalls);
                return Ok(());
            }
            user
        };
        let limit = match (self.max_tokens, input.options.max_tokens) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut sent = 0u64;
        let mut reason = FinishReason::Stop;
        for (i, w) in split_words(reply).enumerate() {
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
        let split = |s| split_words(s).collect::<Vec<_>>();
        assert_eq!(split("hello big  world"), vec!["hello", " big", "  world"]);
        assert_eq!(split("  lead trail  "), vec!["  lead", " trail  "]);
        assert_eq!(split(""), Vec::<&str>::new());
        assert_eq!(split("   "), vec!["   "]);
        assert_eq!(split("one"), vec!["one"]);
        assert_eq!(split("a\nb\tc"), vec!["a", "\nb", "\tc"]);
        assert_eq!(split("\u{3000}x\u{a0}y\u{85}"), vec!["\u{3000}x", "\u{a0}y\u{85}"]);
        // One word per delta, and nothing lost.
        let text = "  many  words\there,\n and\u{2028}more  ";
        let deltas = split(text);
        assert_eq!(deltas.concat(), text);
        assert!(deltas.iter().all(|d| count_words(d) == 1), "{deltas:?}");
        assert_eq!(deltas.len() as u64, count_words(text));
    }

    #[test]
    fn tool_commands() {
        assert_eq!(
            tool_command("/tool get_weather {\"city\":\"Paris\"}"),
            Some(("get_weather", "{\"city\":\"Paris\"}"))
        );
        assert_eq!(tool_command("  /tool f  "), Some(("f", "{}")));
        assert_eq!(tool_command("/tool\tf\n{\"a\": 1}\n"), Some(("f", "{\"a\": 1}")));
        assert_eq!(tool_command("/toolf {}"), None);
        assert_eq!(tool_command("/tool "), None);
        assert_eq!(tool_command("say /tool f {}"), None);
    }
}
