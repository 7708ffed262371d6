//! Tool calls as runs carry them (SPEC §5.1): the pieces backends emit, the assembled calls, and
//! the normalisation of the pieces upstreams stream.
//!
//! Upstreams stream a call as pieces keyed by their own `index`, with `id` and `name` on the
//! first piece and the `arguments` string split anywhere. [`Assembler`] turns those into the
//! pieces every backend emits: calls numbered 0, 1, 2… in the order they start, the first piece
//! of each with an id and a name, and a bound on how many calls and argument bytes one reply may
//! hold.

use serde_json::{Value, json};

/// Most tools one request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// Most tool calls one reply may make.
pub const MAX_CALLS: usize = 128;
/// Most argument bytes, over all calls of one reply.
pub const MAX_ARGUMENT_BYTES: usize = 4 * 1024 * 1024;

/// One piece of a tool call, as backends emit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCallPiece {
    /// Which call (0, 1, 2… in the order the calls start).
    pub index: usize,
    /// The call's id: on the first piece of a call only.
    pub id: Option<String>,
    /// The function's name: on the first piece of a call only.
    pub name: Option<String>,
    /// The next piece of the arguments (a JSON text, split anywhere).
    pub arguments: String,
}

/// A whole tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_…`.
    pub id: String,
    /// Function name.
    pub name: String,
    /// Arguments (a JSON text, as the model wrote it).
    pub arguments: String,
}

impl ToolCall {
    /// `{"id","type":"function","function":{"name","arguments"}}`.
    pub fn to_json(&self) -> Value {
        json!({ "id": self.id, "type": "function", "function": { "name": self.name, "arguments": self.arguments } })
    }
}

/// An agent tool's progress, for surfaces that show it (WebSocket `agent` events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent<'a> {
    /// The tool is about to run.
    Start {
        /// Call id.
        id: &'a str,
        /// Tool name.
        name: &'a str,
        /// Arguments as the model wrote them.
        args: &'a str,
    },
    /// The tool ran; `result` goes back to the model.
    Result {
        /// Call id.
        id: &'a str,
        /// Tool name.
        name: &'a str,
        /// What the tool printed.
        result: &'a str,
    },
    /// The tool failed; `error` goes back to the model as the result.
    Error {
        /// Call id.
        id: &'a str,
        /// Tool name.
        name: &'a str,
        /// What went wrong (exit status, stderr tail, timeout).
        error: &'a str,
    },
}

/// Function names (the rule agent tools are configured with).
pub use crate::config::valid_tool_name;

/// A fresh call id, for backends and upstreams that do not give one.
pub fn new_call_id() -> String {
    format!("call_{}", crate::util::random_hex(24))
}

/// Whole calls rebuilt from normalised pieces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Calls {
    calls: Vec<ToolCall>,
}

impl Calls {
    /// Add `p`; an error when it does not follow the piece rules ([`ToolCallPiece`]).
    pub fn add(&mut self, p: &ToolCallPiece) -> Result<(), String> {
        if p.index == self.calls.len() {
            match (&p.id, &p.name) {
                (Some(id), Some(name)) => {
                    self.calls.push(ToolCall { id: id.clone(), name: name.clone(), arguments: p.arguments.clone() })
                }
                _ => return Err(format!("tool call {} starts without an id and a name", p.index)),
            }
        } else if let Some(c) = self.calls.get_mut(p.index) {
            c.arguments.push_str(&p.arguments);
        } else {
            return Err(format!("tool call {} arrived before call {}", p.index, self.calls.len()));
        }
        Ok(())
    }

    /// The calls so far.
    pub fn calls(&self) -> &[ToolCall] {
        &self.calls
    }

    /// Take the calls, leaving none.
    pub fn take(&mut self) -> Vec<ToolCall> {
        std::mem::take(&mut self.calls)
    }

    /// No call yet.
    pub fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

/// Normalises the tool-call pieces of one upstream reply (see the module docs).
#[derive(Debug, Default)]
pub struct Assembler {
    /// Per call, in order of appearance: the upstream's index and the call's id.
    seen: Vec<(u64, String)>,
    bytes: usize,
}

impl Assembler {
    /// One upstream piece: `index` as the upstream numbers it, then what the piece carries.
    /// Returns the normalised piece, or why the piece is malformed.
    pub fn push(
        &mut self,
        index: u64,
        id: Option<&str>,
        name: Option<&str>,
        arguments: &str,
    ) -> Result<ToolCallPiece, String> {
        self.bytes += arguments.len();
        if self.bytes > MAX_ARGUMENT_BYTES {
            return Err(format!("tool call arguments longer than {MAX_ARGUMENT_BYTES} bytes"));
        }
        let name = name.filter(|n| !n.is_empty());
        let id = id.filter(|i| !i.is_empty());
        if let Some(ours) = self.seen.iter().rposition(|(i, _)| *i == index) {
            // Some proxies number every call 0; a named piece with another id is a new call.
            let new_call = name.is_some() && id.is_some_and(|id| id != self.seen[ours].1);
            if !new_call {
                return Ok(ToolCallPiece { index: ours, id: None, name: None, arguments: arguments.to_string() });
            }
        }
        let Some(name) = name else {
            return Err(format!("tool call {index} starts without a function name"));
        };
        if self.seen.len() >= MAX_CALLS {
            return Err(format!("more than {MAX_CALLS} tool calls in one reply"));
        }
        let id = id.map_or_else(new_call_id, String::from);
        self.seen.push((index, id.clone()));
        Ok(ToolCallPiece {
            index: self.seen.len() - 1,
            id: Some(id),
            name: Some(name.to_string()),
            arguments: arguments.to_string(),
        })
    }

    /// Whether any call started.
    pub fn any(&self) -> bool {
        !self.seen.is_empty()
    }
}

/// Split `s` into pieces of at most `max` bytes (never inside a character).
pub fn split_pieces(s: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let mut end = rest.len().min(max.max(4));
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        out.push(&rest[..end]);
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembler_numbers_calls_in_order_of_appearance() {
        let mut a = Assembler::default();
        let p = a.push(5, Some("c5"), Some("f"), "").unwrap();
        assert_eq!(p, ToolCallPiece { index: 0, id: Some("c5".into()), name: Some("f".into()), arguments: "".into() });
        let p = a.push(2, None, Some("g"), "{\"a\"").unwrap();
        assert_eq!(p.index, 1);
        assert!(p.id.as_deref().is_some_and(|i| i.starts_with("call_")), "{p:?}");
        // Later pieces carry only arguments, even when the upstream repeats id and name.
        let p = a.push(5, Some("c5"), Some("f"), "{}").unwrap();
        assert_eq!(p, ToolCallPiece { index: 0, id: None, name: None, arguments: "{}".into() });
        // A proxy that numbers every call 0: another id with a name starts a new call.
        let p = a.push(5, Some("c6"), Some("h"), "{").unwrap();
        assert_eq!((p.index, p.id.as_deref()), (2, Some("c6")));
        let p = a.push(5, None, None, "}").unwrap();
        assert_eq!(p.index, 2, "later pieces go to the newest call with that index");
        assert!(a.push(9, Some("x"), None, "{}").unwrap_err().contains("without a function name"));
        assert!(a.push(9, Some("x"), Some(""), "{}").is_err());
    }

    #[test]
    fn assembler_bounds() {
        let mut a = Assembler::default();
        for i in 0..MAX_CALLS as u64 {
            a.push(i, None, Some("f"), "").unwrap();
        }
        assert!(a.push(MAX_CALLS as u64, None, Some("f"), "").unwrap_err().contains("more than"));
        let mut a = Assembler::default();
        a.push(0, None, Some("f"), &"x".repeat(MAX_ARGUMENT_BYTES)).unwrap();
        assert!(a.push(0, None, None, "y").unwrap_err().contains("longer than"));
    }

    #[test]
    fn calls_rebuild_and_refuse_out_of_order() {
        let piece = |index, id: Option<&str>, name: Option<&str>, a: &str| ToolCallPiece {
            index,
            id: id.map(String::from),
            name: name.map(String::from),
            arguments: a.into(),
        };
        let mut c = Calls::default();
        c.add(&piece(0, Some("a"), Some("f"), "{\"x\"")).unwrap();
        c.add(&piece(1, Some("b"), Some("g"), "")).unwrap();
        c.add(&piece(0, None, None, ":1}")).unwrap();
        assert_eq!(c.calls()[0], ToolCall { id: "a".into(), name: "f".into(), arguments: "{\"x\":1}".into() });
        assert_eq!(c.calls()[1].name, "g");
        assert!(c.add(&piece(3, Some("d"), Some("h"), "")).is_err());
        assert!(c.add(&piece(2, None, None, "")).is_err());
    }

    #[test]
    fn pieces_keep_characters_whole() {
        assert_eq!(split_pieces("{\"city\":\"Paris\"}", 8), vec!["{\"city\":", "\"Paris\"}"]);
        let s = "ééééé"; // 10 bytes
        let p = split_pieces(s, 8);
        assert_eq!(p.concat(), s);
        assert!(p.iter().all(|x| x.len() <= 8));
        assert!(split_pieces("", 8).is_empty());
    }
}
