//! On-disk sessions: `<state>/agents/<agentId>/sessions/sessions.json` (index) and one append-only
//! `<sessionId>.jsonl` transcript per sticky session.
//!
//! Transcript lines are appended with one `write` per turn and synced, so a crash loses at most
//! the turn being written; a torn last line is skipped with a warning on load. The index is
//! rewritten atomically (temp file + rename) and is advisory: loading reads the transcripts'
//! header lines, so a crash between the two writes loses nothing.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Session, SessionInfo, StoredMessage};
use crate::agent::{Role, Usage};

/// The session directory tree under a state dir.
#[derive(Debug)]
pub struct Disk {
    root: PathBuf,
}

impl Disk {
    /// Sessions live under `<state_dir>/agents/`.
    pub fn new(state_dir: &Path) -> Self {
        Disk { root: state_dir.join("agents") }
    }

    fn dir(&self, agent: &str) -> PathBuf {
        self.root.join(agent).join("sessions")
    }

    fn file(&self, info: &SessionInfo) -> PathBuf {
        self.dir(&info.agent_id).join(format!("{}.jsonl", info.session_id))
    }

    /// Load every transcript; problems become warnings, never failures.
    pub(crate) fn load_all(&self) -> (Vec<Session>, Vec<String>) {
        let mut out = Vec::new();
        let mut warnings = Vec::new();
        let Ok(agents) = fs::read_dir(&self.root) else { return (out, warnings) };
        for agent in agents.flatten() {
            let dir = agent.path().join("sessions");
            let Ok(files) = fs::read_dir(&dir) else { continue };
            for f in files.flatten() {
                let path = f.path();
                if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
                    continue;
                }
                match load_one(&path, &mut warnings) {
                    Some(s) => out.push(s),
                    None => warnings.push(format!("{}: no session header, file skipped", path.display())),
                }
            }
        }
        (out, warnings)
    }

    /// Append `new` (already pushed onto `s.messages`) to the transcript, creating it when `created`.
    pub(crate) fn append(&self, s: &Session, created: bool, new: &[StoredMessage]) -> Result<(), String> {
        let path = self.file(&s.info);
        let mut buf = Vec::new();
        if created {
            fs::create_dir_all(self.dir(&s.info.agent_id)).map_err(|e| format!("{}: {e}", path.display()))?;
            push_line(&mut buf, &header(&s.info));
        }
        for m in new {
            push_line(&mut buf, &message_line(m));
        }
        let mut f =
            OpenOptions::new().create(true).append(true).open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let before = f.metadata().map(|m| m.len());
        if let Err(e) = f.write_all(&buf).and_then(|_| f.sync_data()) {
            // A partial write (disk full) must not stay: later turns would be appended after a
            // torn line, in the middle of the file, where load cannot tell it from damage.
            if let Ok(len) = before {
                let _ = f.set_len(len);
            }
            return Err(format!("{}: {e}", path.display()));
        }
        self.write_index(&s.info.agent_id, std::iter::once(&s.info))
    }

    /// Rewrite a transcript from scratch (after a reset).
    pub(crate) fn rewrite(&self, s: &Session) -> Result<(), String> {
        let path = self.file(&s.info);
        let _ = fs::create_dir_all(self.dir(&s.info.agent_id));
        let mut buf = Vec::new();
        push_line(&mut buf, &header(&s.info));
        for m in &s.messages {
            push_line(&mut buf, &message_line(m));
        }
        atomic_write(&path, &buf)?;
        self.write_index(&s.info.agent_id, std::iter::once(&s.info))
    }

    /// Delete a transcript and drop it from the index.
    pub(crate) fn remove<'a>(&self, s: &Session, _rest: impl Iterator<Item = &'a Session>) -> Result<(), String> {
        let path = self.file(&s.info);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
        let index = self.dir(&s.info.agent_id).join("sessions.json");
        let mut map = read_index(&index);
        map.remove(&s.info.key);
        atomic_write(&index, &serde_json::to_vec_pretty(&map).unwrap_or_default())
    }

    /// Merge `infos` into the agent's `sessions.json`.
    fn write_index<'a>(&self, agent: &str, infos: impl Iterator<Item = &'a SessionInfo>) -> Result<(), String> {
        let index = self.dir(agent).join("sessions.json");
        let mut map = read_index(&index);
        for i in infos {
            map.insert(
                i.key.clone(),
                json!({ "sessionId": i.session_id, "updatedAt": i.updated_at,
                        "inputTokens": i.input_tokens, "outputTokens": i.output_tokens }),
            );
        }
        atomic_write(&index, &serde_json::to_vec_pretty(&map).unwrap_or_default())
    }
}

fn read_index(path: &Path) -> BTreeMap<String, Value> {
    fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn atomic_write(path: &Path, data: &[u8]) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let r = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        fs::rename(&tmp, path)
    })();
    r.map_err(|e| format!("{}: {e}", path.display()))
}

fn push_line(buf: &mut Vec<u8>, v: &Value) {
    // serde_json never emits a raw newline inside compact output.
    let _ = serde_json::to_writer(&mut *buf, v);
    buf.push(b'\n');
}

fn header(i: &SessionInfo) -> Value {
    json!({ "type": "session", "version": 1, "id": i.session_id, "key": i.key, "agentId": i.agent_id,
            "timestamp": i.updated_at })
}

fn message_line(m: &StoredMessage) -> Value {
    let mut v = json!({ "type": "message", "role": m.role.as_str(), "content": m.content, "timestamp": m.timestamp });
    if let Some(u) = m.usage {
        v["usage"] = json!({ "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                             "total_tokens": u.total() });
    }
    // `content` stays a string so that any reader of these files finds text there; parts and
    // a `null` content live beside it.
    if let Some(r) = &m.raw_content {
        v["rawContent"] = r.clone();
    }
    if let Some(t) = &m.tool {
        v["tool"] = Value::Object(t.clone());
    }
    if m.aborted {
        v["aborted"] = Value::Bool(true);
    }
    v
}

fn load_one(path: &Path, warnings: &mut Vec<String>) -> Option<Session> {
    let text = match fs::read(path) {
        Ok(b) => {
            // A torn last line (crash mid-write) is cut off so the next append starts clean.
            let good = b.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
            if good < b.len()
                && let Ok(f) = OpenOptions::new().write(true).open(path)
            {
                let _ = f.set_len(good as u64);
            }
            String::from_utf8_lossy(&b).into_owned()
        }
        Err(e) => {
            warnings.push(format!("{}: {e}", path.display()));
            return None;
        }
    };
    let mut lines = text.split('\n').enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, first) = lines.next()?;
    let h: Value = serde_json::from_str(first).ok()?;
    if h["type"] != "session" {
        return None;
    }
    let mut info = SessionInfo {
        key: h["key"].as_str()?.to_string(),
        agent_id: h["agentId"].as_str()?.to_string(),
        session_id: h["id"].as_str()?.to_string(),
        updated_at: h["timestamp"].as_u64().unwrap_or(0),
        input_tokens: 0,
        output_tokens: 0,
        message_count: 0,
    };
    let mut messages = Vec::new();
    for (n, line) in lines {
        let m = serde_json::from_str::<Value>(line).ok().and_then(|v| parse_message(&v));
        match m {
            Some(m) => {
                if let Some(u) = m.usage {
                    info.input_tokens += u.prompt_tokens;
                    info.output_tokens += u.completion_tokens;
                }
                info.updated_at = info.updated_at.max(m.timestamp);
                messages.push(m);
            }
            None => warnings.push(format!("{}:{}: unreadable transcript line skipped", path.display(), n + 1)),
        }
    }
    info.message_count = messages.len();
    Some(Session { info, messages })
}

fn parse_message(v: &Value) -> Option<StoredMessage> {
    if v["type"] != "message" {
        return None;
    }
    let role = match v["role"].as_str()? {
        "system" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        _ => return None,
    };
    let usage = v.get("usage").and_then(|u| {
        Some(Usage { prompt_tokens: u["prompt_tokens"].as_u64()?, completion_tokens: u["completion_tokens"].as_u64()? })
    });
    Some(StoredMessage {
        role,
        content: v["content"].as_str()?.to_string(),
        raw_content: v.get("rawContent").cloned(),
        timestamp: v["timestamp"].as_u64().unwrap_or(0),
        usage,
        tool: v.get("tool").and_then(Value::as_object).cloned(),
        aborted: v["aborted"].as_bool().unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::super::SessionStore;
    use crate::agent::{ChatMessage, Role, Usage};

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("gatelet-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn survives_reopen_and_torn_last_line() {
        let dir = tmpdir("reopen");
        let key = "agent:main:openai-user:bob";
        {
            let (s, w) = SessionStore::open(&dir, true);
            assert!(w.is_empty());
            let u = Usage { prompt_tokens: 2, completion_tokens: 1 };
            let one = [ChatMessage::new(Role::Assistant, "one")];
            s.append_turn(key, "main", &[ChatMessage::new(Role::User, "one")], &one, u, false).unwrap();
            let mut tool_msg = ChatMessage::new(Role::Tool, "two");
            tool_msg.tool = Some([("tool_call_id".to_string(), serde_json::json!("c1"))].into_iter().collect());
            s.append_turn(key, "main", &[tool_msg], &[ChatMessage::new(Role::Assistant, "tw")], u, true).unwrap();
        }
        // Simulate a crash in the middle of a line.
        let sdir = dir.join("agents/main/sessions");
        let file = std::fs::read_dir(&sdir)
            .unwrap()
            .flatten()
            .find(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
            .unwrap()
            .path();
        let mut f = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
        std::io::Write::write_all(&mut f, b"{\"type\":\"message\",\"role\":\"us").unwrap();
        let (s, w) = SessionStore::open(&dir, true);
        assert_eq!(w.len(), 1, "{w:?}");
        let t = s.transcript(key, None).unwrap();
        assert_eq!(t.len(), 4);
        assert!(t[3].aborted);
        assert_eq!(t[2].tool.as_ref().unwrap()["tool_call_id"], "c1", "tool fields survive a reload");
        assert_eq!(s.list()[0].input_tokens, 4);
        assert!(sdir.join("sessions.json").exists());
        // Delete removes the file and the index entry.
        assert!(s.delete(key).unwrap());
        assert!(!file.exists());
        let (s, _) = SessionStore::open(&dir, true);
        assert!(s.list().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tool_calls_parts_and_null_content_survive_a_reload() {
        let dir = tmpdir("toolcalls");
        let key = "agent:main:k";
        let mut user = ChatMessage::new(Role::User, "look");
        user.raw_content =
            Some(serde_json::json!([{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:,"}}]));
        let call = crate::agent::tools::ToolCall { id: "call_1".into(), name: "f".into(), arguments: "{}".into() };
        let produced = [
            ChatMessage::assistant_calls("", &[call]),
            ChatMessage::tool_result("call_1", "42"),
            ChatMessage::new(Role::Assistant, "done"),
        ];
        {
            let (s, _) = SessionStore::open(&dir, true);
            s.append_turn(key, "main", &[user.clone()], &produced, Usage::default(), false).unwrap();
        }
        let (s, w) = SessionStore::open(&dir, true);
        assert!(w.is_empty(), "{w:?}");
        let mut want = vec![user];
        want.extend(produced);
        assert_eq!(s.history(key), want);
        // Usage goes on the last assistant message only.
        let t = s.transcript(key, None).unwrap();
        assert_eq!(t.iter().filter(|m| m.usage.is_some()).count(), 1);
        assert!(t[3].usage.is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn two_transcripts_for_one_key_load_the_newest() {
        let dir = tmpdir("dupkey");
        let sdir = dir.join("agents/main/sessions");
        std::fs::create_dir_all(&sdir).unwrap();
        let key = "agent:main:k";
        let file = |id: &str, ts: u64, text: &str| {
            let header = format!(
                r#"{{"type":"session","version":1,"id":"{id}","key":"{key}","agentId":"main","timestamp":{ts}}}"#
            );
            let msg = format!(r#"{{"type":"message","role":"user","content":"{text}","timestamp":{ts}}}"#);
            std::fs::write(sdir.join(format!("{id}.jsonl")), format!("{header}\n{msg}\n")).unwrap();
        };
        // Whatever order the directory lists them in, the newer one wins.
        file("aaa", 2000, "new");
        file("zzz", 1000, "old");
        file("mmm", 1500, "middle");
        let (s, w) = SessionStore::open(&dir, true);
        assert_eq!(s.history(key), vec![ChatMessage::new(Role::User, "new")]);
        assert_eq!(w.len(), 2, "{w:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
