//! Source positions of keys in a JSON5 document, so that validation errors can name the line and
//! column of the offending key. The document has already been parsed by `json5`; this scanner only
//! needs to be right for valid input and must never panic on invalid input.

use std::collections::HashMap;

/// `key path → (line, column)`, both 1-based. Paths look like `gateway.auth.mode` and
/// `agents.list[1].id`.
#[derive(Debug, Default)]
pub struct Locations(HashMap<String, (u32, u32)>);

impl Locations {
    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn find(&self, path: &str) -> Option<(u32, u32)> {
        let mut p = path;
        loop {
            if let Some(pos) = self.0.get(p) {
                return Some(*pos);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

enum Frame {
    Object { base: String, key: Option<String> },
    Array { base: String, index: usize },
}

struct Cursor<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    line: u32,
    col: u32,
}

impl Cursor<'_> {
    fn peek(&mut self) -> Option<char> {
        self.chars.peek().copied()
    }
    fn bump(&mut self) -> Option<char> {
        let c = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }
    fn skip_trivia(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_whitespace() || c == '\u{feff}' {
                self.bump();
            } else if c == '/' {
                self.bump();
                match self.bump() {
                    Some('/') => {
                        while let Some(c) = self.bump() {
                            if c == '\n' {
                                break;
                            }
                        }
                    }
                    Some('*') => {
                        let mut star = false;
                        while let Some(c) = self.bump() {
                            if star && c == '/' {
                                break;
                            }
                            star = c == '*';
                        }
                    }
                    _ => return,
                }
            } else {
                return;
            }
        }
    }
    /// A quoted string (the opening quote not yet consumed) or a bare word.
    fn token(&mut self) -> String {
        let mut out = String::new();
        match self.peek() {
            Some(q @ ('"' | '\'')) => {
                self.bump();
                while let Some(c) = self.bump() {
                    if c == q {
                        break;
                    }
                    if c == '\\' {
                        if let Some(e) = self.bump() {
                            out.push(e);
                        }
                        continue;
                    }
                    out.push(c);
                }
            }
            _ => {
                while let Some(c) = self.peek() {
                    if c.is_whitespace() || matches!(c, ',' | ':' | '{' | '}' | '[' | ']' | '/') {
                        break;
                    }
                    out.push(c);
                    self.bump();
                }
            }
        }
        out
    }
}

/// Scan `src` and record where every key and array element starts.
pub fn scan(src: &str) -> Locations {
    let mut locs = HashMap::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut cur = Cursor { chars: src.chars().peekable(), line: 1, col: 1 };
    // Path of the value about to start, when one is expected.
    let mut value_path: Option<String> = Some(String::new());
    loop {
        cur.skip_trivia();
        let pos = (cur.line, cur.col);
        let Some(c) = cur.peek() else { break };
        // Inside an object and expecting a key?
        if let Some(Frame::Object { base, key }) = stack.last_mut()
            && key.is_none()
            && value_path.is_none()
            && c != '}'
            && c != ','
        {
            let k = cur.token();
            if k.is_empty() {
                cur.bump();
                continue;
            }
            let path = if base.is_empty() { k.clone() } else { format!("{base}.{k}") };
            locs.entry(path.clone()).or_insert(pos);
            *key = Some(k);
            cur.skip_trivia();
            if cur.peek() == Some(':') {
                cur.bump();
            }
            value_path = Some(path);
            continue;
        }
        match c {
            '{' | '[' => {
                cur.bump();
                let base = value_path.take().unwrap_or_default();
                locs.entry(base.clone()).or_insert(pos);
                if c == '{' {
                    stack.push(Frame::Object { base, key: None });
                } else {
                    value_path = Some(format!("{base}[0]"));
                    stack.push(Frame::Array { base, index: 0 });
                }
            }
            '}' | ']' => {
                cur.bump();
                stack.pop();
                value_path = None;
            }
            ',' => {
                cur.bump();
                match stack.last_mut() {
                    Some(Frame::Object { key, .. }) => {
                        *key = None;
                        value_path = None;
                    }
                    Some(Frame::Array { base, index }) => {
                        *index += 1;
                        value_path = Some(format!("{base}[{index}]"));
                    }
                    None => value_path = None,
                }
            }
            _ => {
                if let Some(p) = value_path.take() {
                    locs.entry(p).or_insert(pos);
                }
                if cur.token().is_empty() {
                    cur.bump();
                }
            }
        }
    }
    Locations(locs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_array_elements() {
        let src = "{\n  // comment\n  gateway: {\n    auth: { mode: 'tok}en', },\n  },\n  agents: { list: [ {id: \"a\"}, { id: 'b' } ] },\n}";
        let l = scan(src);
        assert_eq!(l.find("gateway.auth.mode"), Some((4, 13)));
        assert_eq!(l.find("agents.list[1].id"), Some((6, 34)));
        assert_eq!(l.find("agents.list[0]"), Some((6, 21)));
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(l.find("gateway.auth.nope"), Some((4, 5)));
    }

    #[test]
    fn never_panics_on_garbage() {
        for s in ["", "{", "}}}", "[,,,", "{a:", "'unterminated", "/* x", "{a:{b:[1,{c:}]}}"] {
            let _ = scan(s).find("a.b");
        }
    }
}
