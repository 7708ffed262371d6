//! The conversation types shared by the session store and the run path: who said what, the
//! content as sent, tool-calling fields, and token counts.

use serde::{Deserialize, Serialize};

/// Who said a message in a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions (`system` and `developer` in the OpenAI surface).
    System,
    /// The caller.
    User,
    /// The agent.
    Assistant,
    /// A tool result (`tool`, and the legacy `function`).
    Tool,
}

impl Role {
    /// The lower-case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// The tool-calling fields of a message (`tool_call_id`, `tool_calls`, `name`), kept verbatim so
/// that an upstream that checks them accepts the history.
pub type ToolFields = serde_json::Map<String, serde_json::Value>;

/// One message of a conversation: its text, the content exactly as sent when that was not a
/// plain string (an array of parts, or `null`), and its tool-calling fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: Role,
    /// What was said (text parts joined): what `echo`, `command` and token estimates work on.
    pub content: String,
    /// The original `content` when it was an array of parts (images, audio, files…) or `null`;
    /// upstreams that understand parts get this instead of the text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_content: Option<serde_json::Value>,
    /// Tool-calling fields, when the message had any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<ToolFields>,
}

impl ChatMessage {
    /// A message with `role` and `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage { role, content: content.into(), raw_content: None, tool: None }
    }

    /// A `tool` message answering call `id`.
    pub fn tool_result(id: &str, content: impl Into<String>) -> Self {
        let mut m = ChatMessage::new(Role::Tool, content);
        m.tool = Some([("tool_call_id".to_string(), serde_json::Value::from(id))].into_iter().collect());
        m
    }

    /// The `content` as it goes to an upstream that takes OpenAI messages.
    pub fn wire_content(&self) -> serde_json::Value {
        match &self.raw_content {
            Some(v) => v.clone(),
            None => serde_json::Value::String(self.content.clone()),
        }
    }
}

/// Token counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the context given to the model.
    pub prompt_tokens: u64,
    /// Tokens in the reply.
    pub completion_tokens: u64,
}

impl Usage {
    /// `prompt_tokens + completion_tokens`.
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    /// The usage object every answer carries: `{"prompt_tokens","completion_tokens",
    /// "total_tokens"}` (OpenAI responses, transcripts, `gatelet agent --json`), or with `camel`
    /// the WebSocket protocol's `{"promptTokens","completionTokens","totalTokens"}`.
    pub fn to_json(self, camel: bool) -> serde_json::Value {
        let (p, c, t) = if camel {
            ("promptTokens", "completionTokens", "totalTokens")
        } else {
            ("prompt_tokens", "completion_tokens", "total_tokens")
        };
        serde_json::json!({ p: self.prompt_tokens, c: self.completion_tokens, t: self.total() })
    }

    /// Read the snake-case form (an upstream's `usage`, a transcript line's): `None` unless both
    /// counts are there as non-negative integers (`total_tokens` is recomputed, never trusted).
    pub fn from_json(v: &serde_json::Value) -> Option<Usage> {
        Some(Usage { prompt_tokens: v["prompt_tokens"].as_u64()?, completion_tokens: v["completion_tokens"].as_u64()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_in_both_wire_styles() {
        let u = Usage { prompt_tokens: 2, completion_tokens: 3 };
        let want = serde_json::json!({ "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5 });
        assert_eq!(u.to_json(false), want);
        let want = serde_json::json!({ "promptTokens": 2, "completionTokens": 3, "totalTokens": 5 });
        assert_eq!(u.to_json(true), want);
        // Read back from the snake-case form; the total is recomputed, a missing or negative
        // count is no usage.
        assert_eq!(Usage::from_json(&u.to_json(false)), Some(u));
        let odd = serde_json::json!({ "prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 99 });
        assert_eq!(Usage::from_json(&odd).map(|u| u.total()), Some(5));
        assert_eq!(Usage::from_json(&serde_json::json!({ "prompt_tokens": 2 })), None);
        assert_eq!(Usage::from_json(&serde_json::json!({ "prompt_tokens": -1, "completion_tokens": 3 })), None);
    }
}
