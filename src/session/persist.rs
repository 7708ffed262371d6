//! On-disk sessions under `<state>/agents/<agentId>/sessions/`:
//!
//! - `<sessionId>.jsonl`: one append-only transcript per sticky session (header line, then one
//!   `message` line per message). Each turn is one `write` followed by a sync of that file only,
//!   so a crash loses at most the turn being written, and sessions never wait on each other.
//! - `sessions.json`: a snapshot of the index (key → session id, updated-at, token and message
//!   counts), rewritten atomically by a background writer and on drain, never per turn.
//! - `sessions.journal`: the index changes since the snapshot, one JSON line each (`put` or
//!   `del`), appended without a sync: a killed process loses nothing the kernel has, and the
//!   transcripts stay the source of truth. A snapshot first renames the journal to
//!   `sessions.journal.<n>` and deletes it once the snapshot is in place; load replays the
//!   rotated journals in order, then the live one. Replaying a rotated journal over the snapshot
//!   that already contains it is harmless: the snapshot is exactly the state after its last line.
//!
//! Load reads the snapshot and the journals and lists the directory; it does not open
//! transcripts, except those the index does not describe (left by a crash between a
//! transcript's first write and its journal line, or by an older gatelet whose `sessions.json`
//! lacked message counts), which are read once to rebuild their entry.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::message::{Role, Usage};
use super::{SessionInfo, StoredMessage};

const SNAPSHOT: &str = "sessions.json";
const JOURNAL: &str = "sessions.journal";

/// A journal this long (in lines, and at least a quarter of the index) asks for a snapshot.
const JOURNAL_MIN_LINES: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One index entry (the value under a session key in `sessions.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Entry {
    session_id: String,
    #[serde(default)]
    updated_at: u64,
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    /// Absent in indexes written before the journal existed: such entries are rebuilt from their
    /// transcript on load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_count: Option<u64>,
}

impl Entry {
    fn of(i: &SessionInfo) -> Self {
        Entry {
            session_id: i.session_id.clone(),
            updated_at: i.updated_at,
            input_tokens: i.input_tokens,
            output_tokens: i.output_tokens,
            message_count: Some(i.message_count as u64),
        }
    }
}

/// One journal line.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    op: Op,
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entry: Option<Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Put,
    Del,
}

/// A session found on load: its summary, and its messages when load had to read them anyway.
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) info: SessionInfo,
    pub(crate) messages: Option<Vec<StoredMessage>>,
}

#[derive(Debug, Default)]
struct IndexState {
    /// The index as of the last snapshot (or load); a snapshot being written shares it.
    base: Arc<HashMap<String, Entry>>,
    /// Changes since `base` (`None`: deleted), so that starting a snapshot copies nothing.
    delta: HashMap<String, Option<Entry>>,
    journal: Option<File>,
    lines: usize,
    next_rotation: u64,
    /// The snapshot is known to differ from the index beyond what the journal says (load
    /// repaired something): write one soon.
    dirty: bool,
}

/// One agent's index: the in-memory mirror of snapshot + journal.
#[derive(Debug)]
struct AgentIndex {
    dir: PathBuf,
    /// Held only for in-memory work and one unsynced append: never across a sync.
    state: Mutex<IndexState>,
    /// Serializes snapshots; holds the rotated journals not yet deleted.
    snapshots: Mutex<Vec<u64>>,
}

impl AgentIndex {
    fn new(dir: PathBuf) -> Self {
        AgentIndex { dir, state: Mutex::new(IndexState::default()), snapshots: Mutex::new(Vec::new()) }
    }

    fn record(&self, rec: &Record) -> Result<(), String> {
        let mut line = serde_json::to_vec(rec).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut st = lock(&self.state);
        st.delta.insert(rec.key.clone(), if rec.op == Op::Put { rec.entry.clone() } else { None });
        let path = self.dir.join(JOURNAL);
        if st.journal.is_none() {
            let _ = fs::create_dir_all(&self.dir);
            st.journal = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?,
            );
        }
        let f = st.journal.as_mut().expect("journal opened above");
        // One write per line (O_APPEND): a crash leaves at worst a torn last line.
        f.write_all(&line).map_err(|e| format!("{}: {e}", path.display()))?;
        st.lines += 1;
        Ok(())
    }

    fn due(&self) -> bool {
        let st = lock(&self.state);
        st.dirty || (st.lines >= JOURNAL_MIN_LINES && st.lines >= (st.base.len() + st.delta.len()) / 4)
    }

    /// Write a snapshot of the index and drop the journal it covers.
    fn snapshot(&self, pause: Option<Duration>) -> Result<(), String> {
        let mut rotated = lock(&self.snapshots);
        let (base, delta) = {
            let mut st = lock(&self.state);
            if st.lines == 0 && !st.dirty {
                return Ok(());
            }
            let n = st.next_rotation;
            st.next_rotation += 1;
            let live = self.dir.join(JOURNAL);
            if st.journal.take().is_some() || live.exists() {
                // A rename, not a sync: cheap enough under the lock appends share.
                match fs::rename(&live, self.dir.join(format!("{JOURNAL}.{n}"))) {
                    Ok(()) => rotated.push(n),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("{}: {e}", live.display())),
                }
            }
            st.lines = 0;
            st.dirty = false;
            (st.base.clone(), std::mem::take(&mut st.delta))
        };
        // The copy is made here, outside the lock turns take.
        let mut entries = (*base).clone();
        drop(base);
        for (k, e) in delta {
            match e {
                Some(e) => entries.insert(k, e),
                None => entries.remove(&k),
            };
        }
        let sorted: BTreeMap<&String, &Entry> = entries.iter().collect();
        let mut buf = Vec::with_capacity(entries.len() * 160 + 4);
        buf.extend_from_slice(b"{");
        for (i, (k, e)) in sorted.iter().enumerate() {
            buf.extend_from_slice(if i == 0 { b"\n  " } else { b",\n  " });
            let _ = serde_json::to_writer(&mut buf, k);
            buf.extend_from_slice(b": ");
            let _ = serde_json::to_writer(&mut buf, e);
        }
        buf.extend_from_slice(b"\n}\n");
        drop(sorted);
        let path = self.dir.join(SNAPSHOT);
        let written = atomic_write_paused(&path, &buf, pause);
        {
            // Changes made meanwhile are in the new delta, on top of exactly this state.
            let mut st = lock(&self.state);
            st.base = Arc::new(entries);
            if written.is_err() {
                st.dirty = true;
            }
        }
        written?;
        for n in rotated.drain(..) {
            let _ = fs::remove_file(self.dir.join(format!("{JOURNAL}.{n}")));
        }
        Ok(())
    }
}

/// The session directory tree under a state dir.
#[derive(Debug)]
pub(crate) struct Disk {
    root: PathBuf,
    agents: Mutex<HashMap<String, Arc<AgentIndex>>>,
    /// Test-only fault injection (`GATELET_TEST_SNAPSHOT_PAUSE_MS`): pause half-way through a
    /// snapshot write, so a test can kill the process there.
    pause: Option<Duration>,
}

impl Disk {
    /// Open the tree under `<state_dir>/agents/` and load every agent's index.
    pub(crate) fn open(state_dir: &Path) -> (Self, Vec<Found>, Vec<String>) {
        let pause = std::env::var("GATELET_TEST_SNAPSHOT_PAUSE_MS").ok().and_then(|v| v.parse().ok());
        let disk = Disk {
            root: state_dir.join("agents"),
            agents: Mutex::new(HashMap::new()),
            pause: pause.map(Duration::from_millis),
        };
        let mut found = Vec::new();
        let mut warnings = Vec::new();
        if let Ok(agents) = fs::read_dir(&disk.root) {
            for agent in agents.flatten() {
                let Some(agent_id) = agent.file_name().to_str().map(str::to_string) else { continue };
                let dir = agent.path().join("sessions");
                if !dir.is_dir() {
                    continue;
                }
                let idx = Arc::new(AgentIndex::new(dir));
                load_agent(&idx, &agent_id, &mut found, &mut warnings);
                lock(&disk.agents).insert(agent_id, idx);
            }
        }
        (disk, found, warnings)
    }

    fn index(&self, agent: &str) -> Arc<AgentIndex> {
        lock(&self.agents)
            .entry(agent.to_string())
            .or_insert_with(|| Arc::new(AgentIndex::new(self.dir(agent))))
            .clone()
    }

    fn dir(&self, agent: &str) -> PathBuf {
        self.root.join(agent).join("sessions")
    }

    fn file(&self, info: &SessionInfo) -> PathBuf {
        self.dir(&info.agent_id).join(format!("{}.jsonl", info.session_id))
    }

    /// Append `new` to the transcript (with the header first when `created`) and sync it.
    pub(crate) fn append(&self, info: &SessionInfo, created: bool, new: &[StoredMessage]) -> Result<(), String> {
        let path = self.file(info);
        let mut buf = Vec::new();
        if created {
            fs::create_dir_all(self.dir(&info.agent_id)).map_err(|e| format!("{}: {e}", path.display()))?;
            push_line(&mut buf, &header(info));
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
        Ok(())
    }

    /// Rewrite a transcript from scratch (after a reset).
    pub(crate) fn rewrite(&self, info: &SessionInfo, messages: &[StoredMessage]) -> Result<(), String> {
        let path = self.file(info);
        let _ = fs::create_dir_all(self.dir(&info.agent_id));
        let mut buf = Vec::new();
        push_line(&mut buf, &header(info));
        for m in messages {
            push_line(&mut buf, &message_line(m));
        }
        atomic_write_paused(&path, &buf, None)
    }

    /// Delete a transcript (the index entry goes with [`Disk::forget`], after it).
    pub(crate) fn remove(&self, info: &SessionInfo) -> Result<(), String> {
        let path = self.file(info);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Rename an unreadable transcript to `<id>.jsonl.unreadable`; its path, if there was one.
    pub(crate) fn set_aside(&self, info: &SessionInfo) -> Option<PathBuf> {
        let path = self.file(info);
        let mut aside = path.clone().into_os_string();
        aside.push(".unreadable");
        let aside = PathBuf::from(aside);
        fs::rename(&path, &aside).ok().map(|_| aside)
    }

    /// Record the new state of a session in the journal.
    pub(crate) fn put(&self, info: &SessionInfo) -> Result<(), String> {
        let rec = Record { op: Op::Put, key: info.key.clone(), entry: Some(Entry::of(info)) };
        self.index(&info.agent_id).record(&rec)
    }

    /// Record that a session is gone.
    pub(crate) fn forget(&self, info: &SessionInfo) -> Result<(), String> {
        self.index(&info.agent_id).record(&Record { op: Op::Del, key: info.key.clone(), entry: None })
    }

    /// Read a session's transcript (first use after start-up). `None` when the file is missing or
    /// has no header; problems become warnings.
    pub(crate) fn read(
        &self,
        info: &SessionInfo,
        warnings: &mut Vec<String>,
    ) -> Option<(SessionInfo, Vec<StoredMessage>)> {
        load_one(&self.file(info), warnings)
    }

    /// Whether some agent's journal is long enough (or its index repaired) to want a snapshot.
    pub(crate) fn snapshot_due(&self) -> bool {
        lock(&self.agents).values().any(|a| a.due())
    }

    /// Snapshot the indexes that changed (`all`) or that are due.
    pub(crate) fn snapshot(&self, all: bool) -> Vec<String> {
        let agents: Vec<Arc<AgentIndex>> = lock(&self.agents).values().cloned().collect();
        let mut errors = Vec::new();
        for a in agents {
            if (all || a.due())
                && let Err(e) = a.snapshot(self.pause)
            {
                errors.push(e);
            }
        }
        errors
    }
}

/// Load one agent directory into `idx`, adding its sessions to `found`.
fn load_agent(idx: &AgentIndex, agent_id: &str, found: &mut Vec<Found>, warnings: &mut Vec<String>) {
    let dir = &idx.dir;
    let mut st = lock(&idx.state);
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let snap_path = dir.join(SNAPSHOT);
    match fs::read(&snap_path) {
        Ok(b) => match serde_json::from_slice::<HashMap<String, Entry>>(&b) {
            Ok(m) => entries = m,
            Err(e) => {
                // Rebuilt from the transcripts below (every one is then "undescribed").
                warnings.push(format!(
                    "{}: unreadable index ({e}); rebuilding it from the transcripts",
                    snap_path.display()
                ));
                st.dirty = true;
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warnings.push(format!("{}: {e}; rebuilding the index from the transcripts", snap_path.display()));
            st.dirty = true;
        }
    }

    // Rotated journals (a snapshot that did not finish), oldest first, then the live one.
    let mut transcripts: HashSet<Box<str>> = HashSet::new();
    let mut rotated = Vec::new();
    if let Ok(files) = fs::read_dir(dir) {
        for f in files.flatten() {
            let name = f.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name.strip_suffix(".jsonl") {
                transcripts.insert(id.into());
            } else if let Some(Ok(n)) =
                name.strip_prefix(JOURNAL).and_then(|r| r.strip_prefix('.')).map(str::parse::<u64>)
            {
                rotated.push(n);
            }
        }
    }
    rotated.sort_unstable();
    for &n in &rotated {
        replay(&dir.join(format!("{JOURNAL}.{n}")), &mut entries, &mut st.dirty, warnings, false);
    }
    if !rotated.is_empty() {
        st.dirty = true;
    }
    st.next_rotation = rotated.last().map_or(0, |n| n + 1);
    *lock(&idx.snapshots) = rotated;
    st.lines = replay(&dir.join(JOURNAL), &mut entries, &mut st.dirty, warnings, true);

    // Entries whose transcript is gone (a delete that stopped between its two steps) are
    // dropped; what is left in `transcripts` afterwards is the undescribed ones.
    let first = found.len();
    let mut dropped = Vec::new();
    for (key, e) in &entries {
        if !transcripts.remove(e.session_id.as_str()) {
            warnings
                .push(format!("session {key}: transcript {}.jsonl is missing; dropped from the index", e.session_id));
            dropped.push(key.clone());
            continue;
        }
        let info = SessionInfo {
            key: key.clone(),
            agent_id: agent_id.to_string(),
            session_id: e.session_id.clone(),
            updated_at: e.updated_at,
            input_tokens: e.input_tokens,
            output_tokens: e.output_tokens,
            message_count: e.message_count.unwrap_or(0) as usize,
        };
        if e.message_count.is_some() {
            found.push(Found { info, messages: None });
            continue;
        }
        // An index from before the journal: its figures are advisory, the transcript decides.
        match load_one(&dir.join(format!("{}.jsonl", e.session_id)), warnings) {
            Some((mut info, messages)) if info.key == *key => {
                info.agent_id = agent_id.to_string();
                found.push(Found { info, messages: Some(messages) });
            }
            Some(_) => {
                // The file belongs to another key: it is read again below as undescribed.
                transcripts.insert(e.session_id.as_str().into());
                dropped.push(key.clone());
            }
            None => {
                warnings.push(format!("session {key}: transcript {}.jsonl unreadable; skipped", e.session_id));
                dropped.push(key.clone());
            }
        }
    }
    for key in dropped {
        entries.remove(&key);
        st.dirty = true;
    }
    if entries.values().any(|e| e.message_count.is_none()) {
        st.dirty = true;
    }

    // Transcripts the index does not describe: read them to rebuild their entries.
    if transcripts.is_empty() {
        for f in &found[first..] {
            if f.messages.is_some() {
                entries.insert(f.info.key.clone(), Entry::of(&f.info));
            }
        }
        st.base = Arc::new(entries);
        return;
    }
    st.dirty = true;
    let mut at: HashMap<String, usize> =
        found[first..].iter().enumerate().map(|(i, f)| (f.info.key.clone(), first + i)).collect();
    let mut orphans: Vec<Box<str>> = transcripts.into_iter().collect();
    orphans.sort();
    for id in orphans {
        let path = dir.join(format!("{id}.jsonl"));
        let Some((mut info, messages)) = load_one(&path, warnings) else {
            warnings.push(format!("{}: no session header, file skipped", path.display()));
            continue;
        };
        info.agent_id = agent_id.to_string();
        // Two transcripts for one key (a delete whose file removal failed, then a new session):
        // the most recently updated one is the live session.
        match at.get(&info.key) {
            Some(&i) if found[i].info.updated_at >= info.updated_at => {
                warnings.push(format!("session {}: older transcript {} ignored", info.key, info.session_id));
            }
            Some(&i) => {
                warnings.push(format!("session {}: older transcript {} ignored", info.key, found[i].info.session_id));
                found[i] = Found { info, messages: Some(messages) };
            }
            None => {
                at.insert(info.key.clone(), found.len());
                found.push(Found { info, messages: Some(messages) });
            }
        }
    }
    for f in &found[first..] {
        if f.messages.is_some() {
            entries.insert(f.info.key.clone(), Entry::of(&f.info));
        }
    }
    st.base = Arc::new(entries);
}

/// Apply the lines of a journal file; returns how many it had. A torn or unreadable line is
/// skipped with a warning; a torn last line of the live journal is cut off so appends start clean.
fn replay(
    path: &Path,
    entries: &mut HashMap<String, Entry>,
    dirty: &mut bool,
    warnings: &mut Vec<String>,
    live: bool,
) -> usize {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            warnings.push(format!("{}: {e}", path.display()));
            *dirty = true;
            return 0;
        }
    };
    let good = bytes.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
    if live
        && good < bytes.len()
        && let Ok(f) = OpenOptions::new().write(true).open(path)
    {
        let _ = f.set_len(good as u64);
    }
    let mut n = 0;
    for (i, line) in bytes.split(|&c| c == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        n += 1;
        match serde_json::from_slice::<Record>(line) {
            Ok(Record { op: Op::Put, key, entry: Some(e) }) => {
                entries.insert(key, e);
            }
            Ok(Record { op: Op::Del, key, .. }) => {
                entries.remove(&key);
            }
            _ => {
                warnings.push(format!("{}:{}: unreadable journal line skipped", path.display(), i + 1));
                *dirty = true;
            }
        }
    }
    n
}

/// Write `data` to `path` atomically (temp file, sync, rename).
fn atomic_write_paused(path: &Path, data: &[u8], pause: Option<Duration>) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let r = (|| {
        let mut f = File::create(&tmp)?;
        match pause {
            Some(d) => {
                let half = data.len() / 2;
                f.write_all(&data[..half])?;
                f.flush()?;
                std::thread::sleep(d);
                f.write_all(&data[half..])?;
            }
            None => f.write_all(data)?,
        }
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
        v["usage"] = u.to_json(false);
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

/// Read one transcript: its summary (from the header and the messages) and messages.
fn load_one(path: &Path, warnings: &mut Vec<String>) -> Option<(SessionInfo, Vec<StoredMessage>)> {
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
    Some((info, messages))
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
    let usage = v.get("usage").and_then(Usage::from_json);
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

/// The lock a running gateway holds on its state dir, so offline tools do not race it.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Why [`StateLock::acquire`] failed.
#[derive(Debug)]
pub enum LockError {
    /// Another process holds it; the pid it wrote, when readable.
    Held(Option<u32>),
    /// The lock file could not be opened or locked.
    Io(String),
}

impl StateLock {
    /// Take `<state_dir>/gateway.lock` exclusively, without waiting. The lock is the kernel's
    /// (released when the process ends, however it ends); the pid inside is only for messages.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let path = state_dir.join("gateway.lock");
        let io = |e: std::io::Error| LockError::Io(format!("{}: {e}", path.display()));
        fs::create_dir_all(state_dir).map_err(io)?;
        let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let pid = fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
                return Err(LockError::Held(pid));
            }
            Err(fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let _ = f.set_len(0);
        let _ = writeln!(f, "{}", std::process::id());
        Ok(StateLock { _file: f })
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::super::{SessionStore, StoreOptions};
    use crate::session::message::{ChatMessage, Role, Usage};

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gatelet-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn open(dir: &Path) -> (SessionStore, Vec<String>) {
        SessionStore::open_with(dir, StoreOptions { persist: true, background: false, ..StoreOptions::default() })
    }

    fn turn(s: &SessionStore, key: &str, text: &str) {
        let u = Usage { prompt_tokens: 2, completion_tokens: 1 };
        s.append_turn(
            key,
            "main",
            &[ChatMessage::new(Role::User, text)],
            &[ChatMessage::new(Role::Assistant, format!("re: {text}"))],
            u,
            false,
        )
        .unwrap();
    }

    fn texts(s: &SessionStore, key: &str) -> Vec<String> {
        s.history(key).into_iter().map(|m| m.content).collect()
    }

    fn transcript_of(dir: &Path, s: &SessionStore, key: &str) -> PathBuf {
        let id = s.info(key).unwrap().session_id;
        dir.join(format!("agents/main/sessions/{id}.jsonl"))
    }

    fn append(path: &Path, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
    }

    #[test]
    fn survives_reopen_and_torn_last_line() {
        let dir = tmpdir("reopen");
        let key = "agent:main:openai-user:bob";
        let file;
        {
            let (s, w) = open(&dir);
            assert!(w.is_empty());
            let u = Usage { prompt_tokens: 2, completion_tokens: 1 };
            s.append_turn(
                key,
                "main",
                &[ChatMessage::new(Role::User, "one")],
                &[ChatMessage::new(Role::Assistant, "one")],
                u,
                false,
            )
            .unwrap();
            let mut tool_msg = ChatMessage::new(Role::Tool, "two");
            tool_msg.tool = Some([("tool_call_id".to_string(), serde_json::json!("c1"))].into_iter().collect());
            s.append_turn(key, "main", &[tool_msg], &[ChatMessage::new(Role::Assistant, "tw")], u, true).unwrap();
            file = transcript_of(&dir, &s, key);
        }
        // A crash in the middle of a transcript line.
        append(&file, b"{\"type\":\"message\",\"role\":\"us");
        let (s, w) = open(&dir);
        assert!(w.is_empty(), "the index is read, not the transcript: {w:?}");
        assert_eq!(s.list()[0].input_tokens, 4);
        let t = s.transcript(key, None).unwrap();
        assert_eq!(t.len(), 4);
        assert!(t[3].aborted);
        assert_eq!(t[2].tool.as_ref().unwrap()["tool_call_id"], "c1", "tool fields survive a reload");
        assert!(std::fs::read(&file).unwrap().ends_with(b"\n"), "the torn line is cut off");
        turn(&s, key, "three");
        // Delete removes the file and the index entry.
        assert!(s.delete(key).unwrap());
        assert!(!file.exists());
        let (s, w) = open(&dir);
        assert!(s.list().is_empty(), "{w:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn start_up_reads_the_index_not_the_transcripts() {
        let dir = tmpdir("lazy");
        let (s, _) = open(&dir);
        turn(&s, "agent:main:a", "one");
        turn(&s, "agent:main:b", "two");
        let file = transcript_of(&dir, &s, "agent:main:a");
        drop(s);
        // If start-up read transcripts, this one would now show up broken (no header).
        std::fs::write(&file, b"not json\n").unwrap();
        let (s, w) = open(&dir);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.info("agent:main:a").unwrap().message_count, 2, "from the index");
        // First use reads it: the damage is found then, the file is set aside, and the session
        // goes on empty, with a transcript that loads again.
        assert!(s.history("agent:main:a").is_empty());
        let mut aside = file.clone().into_os_string();
        aside.push(".unreadable");
        assert_eq!(std::fs::read(&aside).unwrap(), b"not json\n");
        turn(&s, "agent:main:a", "again");
        assert_eq!(s.info("agent:main:a").unwrap().message_count, 2);
        drop(s);
        let (s, w) = open(&dir);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(texts(&s, "agent:main:a"), ["again", "re: again"]);
        assert_eq!(texts(&s, "agent:main:b"), ["two", "re: two"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_last_journal_entry_is_skipped_and_cut_off() {
        let dir = tmpdir("journal");
        let (s, _) = open(&dir);
        turn(&s, "agent:main:a", "one");
        turn(&s, "agent:main:b", "two");
        drop(s);
        let journal = dir.join("agents/main/sessions/sessions.journal");
        assert!(!dir.join("agents/main/sessions/sessions.json").exists(), "no snapshot per turn");
        append(&journal, b"{\"op\":\"put\",\"key\":\"agent:main:c\",\"entry\":{\"sessionId\":\"ab");
        let (s, w) = open(&dir);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("unreadable journal line skipped"), "{w:?}");
        assert_eq!(s.count(), 2);
        assert!(std::fs::read(&journal).unwrap().ends_with(b"\n"), "the torn entry is cut off");
        // The next entry starts on a line of its own, so the journal reads back clean.
        turn(&s, "agent:main:c", "three");
        drop(s);
        let (s, w) = open(&dir);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(s.count(), 3);
        assert_eq!(texts(&s, "agent:main:c"), ["three", "re: three"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_crash_during_a_snapshot_loses_nothing() {
        let dir = tmpdir("snapcrash");
        let sdir = dir.join("agents/main/sessions");
        let (s, _) = open(&dir);
        turn(&s, "agent:main:a", "one");
        s.flush().unwrap();
        turn(&s, "agent:main:a", "two");
        turn(&s, "agent:main:b", "three");
        drop(s);
        let old_snapshot = std::fs::read(sdir.join("sessions.json")).unwrap();

        // Killed after rotating the journal, half-way through writing the new snapshot.
        std::fs::rename(sdir.join("sessions.journal"), sdir.join("sessions.journal.7")).unwrap();
        std::fs::write(sdir.join("sessions.json.tmp"), &old_snapshot[..old_snapshot.len() / 2]).unwrap();
        let (s, w) = open(&dir);
        assert!(w.is_empty(), "{w:?}");
        // The index alone (before any transcript is read) is up to date.
        assert_eq!(s.info("agent:main:a").unwrap().message_count, 4);
        assert_eq!(s.info("agent:main:b").unwrap().message_count, 2);
        assert_eq!(texts(&s, "agent:main:a"), ["one", "re: one", "two", "re: two"]);
        // Changes after the rotation go to a new live journal.
        turn(&s, "agent:main:b", "four");
        drop(s);

        let (s, _) = open(&dir);
        turn(&s, "agent:main:c", "five");
        s.flush().unwrap();
        let left: Vec<String> = std::fs::read_dir(&sdir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("sessions.journal."))
            .collect();
        assert!(left.is_empty(), "rotated journals are deleted once a snapshot covers them: {left:?}");
        drop(s);
        let (s, w) = open(&dir);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(texts(&s, "agent:main:b"), ["three", "re: three", "four", "re: four"]);
        assert_eq!(texts(&s, "agent:main:c"), ["five", "re: five"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn turns_during_snapshots_are_all_in_the_index() {
        let dir = tmpdir("concurrent");
        let (s, _) = open(&dir);
        let s = std::sync::Arc::new(s);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let snapshots = {
            let (s, done) = (s.clone(), done.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    s.flush().unwrap();
                    n += 1;
                }
                n
            })
        };
        for i in 0..300 {
            turn(&s, &format!("agent:main:k{}", i % 30), "x");
            if i % 100 == 99 {
                assert!(s.delete(&format!("agent:main:k{}", i % 30)).unwrap());
            }
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(snapshots.join().unwrap() > 0);
        drop(s);
        let (s, w) = open(&dir);
        assert!(w.is_empty(), "{w:?}");
        // From the index alone: ten turns each, except k9, k19 and k29, deleted after turn 99,
        // 199 and 299 (their 4th, 7th and 10th), which then had 6, 3 and no turns more.
        let mut counts: Vec<(String, usize)> = s.list().into_iter().map(|i| (i.key, i.message_count)).collect();
        counts.sort();
        let mut want: Vec<(String, usize)> = (0..29)
            .map(|k| {
                (
                    format!("agent:main:k{k}"),
                    match k {
                        9 => 12,
                        19 => 6,
                        _ => 20,
                    },
                )
            })
            .collect();
        want.sort();
        assert_eq!(counts, want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotated_journals_replay_over_the_snapshot_that_contains_them() {
        let dir = tmpdir("replay");
        let sdir = dir.join("agents/main/sessions");
        let (s, _) = open(&dir);
        turn(&s, "agent:main:a", "one");
        turn(&s, "agent:main:a", "two");
        // The journal as it stands is what the snapshot is about to cover.
        let journal = std::fs::read(sdir.join("sessions.journal")).unwrap();
        s.flush().unwrap();
        assert!(!sdir.join("sessions.journal").exists());
        turn(&s, "agent:main:a", "three");
        drop(s);
        // The rotated copy was not deleted (a crash right after the rename of the snapshot).
        std::fs::write(sdir.join("sessions.journal.0"), journal).unwrap();
        let (s, w) = open(&dir);
        assert!(w.is_empty(), "{w:?}");
        let a = s.info("agent:main:a").unwrap();
        assert_eq!((a.message_count, a.input_tokens), (6, 6), "the newest state wins, nothing counted twice");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_old_state_dir_loads_and_is_converted() {
        let dir = tmpdir("oldlayout");
        let sdir = dir.join("agents/main/sessions");
        std::fs::create_dir_all(&sdir).unwrap();
        // The layout before the journal: transcripts plus an advisory index without message
        // counts, whose token figures may lag the transcript.
        let header = |id: &str, key: &str| {
            format!(r#"{{"type":"session","version":1,"id":"{id}","key":"{key}","agentId":"main","timestamp":1000}}"#)
        };
        let m = |role: &str, text: &str, ts: u64| {
            format!(
                r#"{{"type":"message","role":"{role}","content":"{text}","timestamp":{ts},"usage":{{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}}}"#
            )
        };
        std::fs::write(
            sdir.join("aaa.jsonl"),
            format!("{}\n{}\n{}\n", header("aaa", "agent:main:bob"), m("user", "hi", 1000), m("assistant", "yo", 2000)),
        )
        .unwrap();
        std::fs::write(
            sdir.join("bbb.jsonl"),
            format!("{}\n{}\n", header("bbb", "agent:main:carol"), m("user", "x", 1500)),
        )
        .unwrap();
        std::fs::write(
            sdir.join("sessions.json"),
            r#"{ "agent:main:bob": { "sessionId": "aaa", "updatedAt": 1000, "inputTokens": 3, "outputTokens": 2 } }"#,
        )
        .unwrap();
        let (s, w) = open(&dir);
        assert!(w.is_empty(), "{w:?}");
        let bob = s.info("agent:main:bob").unwrap();
        assert_eq!((bob.message_count, bob.input_tokens, bob.updated_at), (2, 6, 2000));
        assert_eq!(s.info("agent:main:carol").unwrap().message_count, 1, "a transcript missing from the index");
        assert_eq!(texts(&s, "agent:main:bob"), ["hi", "yo"]);
        // Converted: the next snapshot carries message counts, so the next start reads no transcript.
        s.snapshot_if_due();
        let snap: serde_json::Value =
            serde_json::from_slice(&std::fs::read(sdir.join("sessions.json")).unwrap()).unwrap();
        assert_eq!(snap["agent:main:bob"]["messageCount"], 2, "{snap}");
        assert_eq!(snap["agent:main:carol"]["sessionId"], "bbb", "{snap}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tool_calls_parts_and_null_content_survive_a_reload() {
        let dir = tmpdir("toolcalls");
        let key = "agent:main:k";
        let mut user = ChatMessage::new(Role::User, "look");
        user.raw_content =
            Some(serde_json::json!([{"type":"text","text":"look"},{"type":"image_url","image_url":{"url":"data:,"}}]));
        let mut call = ChatMessage::new(Role::Assistant, "");
        call.raw_content = Some(serde_json::Value::Null);
        let calls = serde_json::json!([{"id":"call_1","type":"function","function":{"name":"f","arguments":"{}"}}]);
        call.tool = Some([("tool_calls".to_string(), calls)].into_iter().collect());
        let produced = [call, ChatMessage::tool_result("call_1", "42"), ChatMessage::new(Role::Assistant, "done")];
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
        let (s, w) = open(&dir);
        assert_eq!(s.history(key), vec![ChatMessage::new(Role::User, "new")]);
        assert_eq!(w.len(), 2, "{w:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_state_dir_lock_is_exclusive() {
        let dir = tmpdir("lock");
        let first = super::StateLock::acquire(&dir).unwrap();
        match super::StateLock::acquire(&dir) {
            Err(super::LockError::Held(pid)) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("second lock: {other:?}"),
        }
        drop(first);
        assert!(super::StateLock::acquire(&dir).is_ok(), "released with its holder");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
