//! Sticky sessions: the conversation history behind a session key.
//!
//! Ephemeral sessions (`agent:<id>:openai:<random>`) are never stored. Sticky sessions keep their
//! transcript here; `persist` adds an append-only JSONL file per session (SPEC §7).

pub mod persist;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

use crate::agent::{ChatMessage, Role, Usage};
use crate::util::now_ms;

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
    pub tool: Option<crate::agent::ToolFields>,
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

#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) info: SessionInfo,
    pub(crate) messages: Vec<StoredMessage>,
}

/// The agent id inside `agent:<id>:…`.
pub fn agent_of(key: &str) -> Option<&str> {
    key.strip_prefix("agent:")?.split(':').next()
}

/// All sticky sessions, in memory and (optionally) on disk.
#[derive(Debug)]
pub struct SessionStore {
    sessions: Mutex<HashMap<String, Session>>,
    disk: Option<persist::Disk>,
}

impl SessionStore {
    /// A store that keeps everything in memory.
    pub fn in_memory() -> Self {
        SessionStore { sessions: Mutex::new(HashMap::new()), disk: None }
    }

    /// A store persisted under `<state_dir>/agents/<id>/sessions/`, loading what is there.
    /// Load problems (torn lines, unreadable files) are returned as warnings.
    pub fn open(state_dir: &Path, persist: bool) -> (Self, Vec<String>) {
        if !persist {
            return (Self::in_memory(), Vec::new());
        }
        let disk = persist::Disk::new(state_dir);
        let (loaded, mut warnings) = disk.load_all();
        let mut map: HashMap<String, Session> = HashMap::new();
        for s in loaded {
            // Two transcripts for one key (a delete whose file removal failed, then a new
            // session): the most recently updated one is the live session.
            match map.get(&s.info.key) {
                Some(old) if old.info.updated_at >= s.info.updated_at => {
                    warnings.push(format!("session {}: older transcript {} ignored", s.info.key, s.info.session_id));
                }
                Some(old) => {
                    warnings.push(format!("session {}: older transcript {} ignored", s.info.key, old.info.session_id));
                    map.insert(s.info.key.clone(), s);
                }
                None => {
                    map.insert(s.info.key.clone(), s);
                }
            }
        }
        (SessionStore { sessions: Mutex::new(map), disk: Some(disk) }, warnings)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stored conversation of `key` (empty for unknown or ephemeral keys).
    pub fn history(&self, key: &str) -> Vec<ChatMessage> {
        self.lock()
            .get(key)
            .map(|s| {
                s.messages
                    .iter()
                    .map(|m| ChatMessage {
                        role: m.role,
                        content: m.content.clone(),
                        raw_content: m.raw_content.clone(),
                        tool: m.tool.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
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
        let now = now_ms();
        let mut map = self.lock();
        let is_new = !map.contains_key(key);
        let s = map.entry(key.to_string()).or_insert_with(|| Session {
            info: SessionInfo {
                key: key.to_string(),
                agent_id: agent_id.to_string(),
                session_id: crate::util::random_hex(16),
                updated_at: now,
                input_tokens: 0,
                output_tokens: 0,
                message_count: 0,
            },
            messages: Vec::new(),
        });
        let start = s.messages.len();
        let empty = [ChatMessage::new(Role::Assistant, "")];
        let produced = if produced.is_empty() { &empty[..] } else { produced };
        let last = turn.len() + produced.iter().rposition(|m| m.role == Role::Assistant).unwrap_or(produced.len() - 1);
        for (i, m) in turn.iter().chain(produced).enumerate() {
            let mine = i == last;
            s.messages.push(StoredMessage {
                role: m.role,
                content: m.content.clone(),
                raw_content: m.raw_content.clone(),
                timestamp: now,
                usage: mine.then_some(usage),
                tool: m.tool.clone(),
                aborted: mine && aborted,
            });
        }
        s.info.updated_at = now;
        s.info.input_tokens += usage.prompt_tokens;
        s.info.output_tokens += usage.completion_tokens;
        s.info.message_count = s.messages.len();
        match &self.disk {
            Some(d) => d.append(s, is_new, &s.messages[start..]),
            None => Ok(()),
        }
    }

    /// Transcript entries of `key`, the last `limit` when given.
    pub fn transcript(&self, key: &str, limit: Option<usize>) -> Option<Vec<StoredMessage>> {
        let map = self.lock();
        let s = map.get(key)?;
        let from = limit.map(|l| s.messages.len().saturating_sub(l)).unwrap_or(0);
        Some(s.messages[from..].to_vec())
    }

    /// Every sticky session, most recently updated first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self.lock().values().map(|s| s.info.clone()).collect();
        v.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then_with(|| a.key.cmp(&b.key)));
        v
    }

    /// Clear the history of `key`, keeping the key. False when unknown.
    pub fn reset(&self, key: &str) -> Result<bool, String> {
        let mut map = self.lock();
        let Some(s) = map.get_mut(key) else { return Ok(false) };
        s.messages.clear();
        s.info.message_count = 0;
        s.info.input_tokens = 0;
        s.info.output_tokens = 0;
        s.info.updated_at = now_ms();
        if let Some(d) = &self.disk {
            d.rewrite(s)?;
        }
        Ok(true)
    }

    /// Forget `key` and its transcript. False when unknown.
    pub fn delete(&self, key: &str) -> Result<bool, String> {
        let mut map = self.lock();
        let Some(s) = map.remove(key) else { return Ok(false) };
        if let Some(d) = &self.disk {
            d.remove(&s, map.values())?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_stored() {
        let s = SessionStore::in_memory();
        let turn = [ChatMessage::new(Role::User, "hi")];
        let reply = [ChatMessage::new(Role::Assistant, "hi")];
        s.append_turn("agent:main:openai-user:bob", "main", &turn, &reply, Usage::default(), false).unwrap();
        assert_eq!(s.list().len(), 1);
        assert_eq!(s.history("agent:main:openai-user:bob").len(), 2);
    }

    #[test]
    fn reset_keeps_key_delete_removes_it() {
        let s = SessionStore::in_memory();
        let turn = [ChatMessage::new(Role::User, "hi")];
        let reply = [ChatMessage::new(Role::Assistant, "yo")];
        s.append_turn("agent:main:k", "main", &turn, &reply, Usage { prompt_tokens: 1, completion_tokens: 1 }, false)
            .unwrap();
        assert!(s.reset("agent:main:k").unwrap());
        assert_eq!(s.list()[0].message_count, 0);
        assert!(s.history("agent:main:k").is_empty());
        assert!(s.delete("agent:main:k").unwrap());
        assert!(!s.delete("agent:main:k").unwrap());
        assert!(s.list().is_empty());
    }
}
