//! A one-pass reader for the record an OpenAI-compatible stream sends once per token:
//! `{"id":…,"object":"chat.completion.chunk",…,"choices":[{"index":0,"delta":{"content":"…"},
//! "finish_reason":null}]}`.
//!
//! [`plain_text`] says `Some(text)` only for a record it is sure is a plain content delta of the
//! first choice written without escapes (no finish reason, usage, error, tool or function call;
//! any other members skipped) — the same answer the typed reader in `openai` gives, found without
//! its generic machinery. Anything else, including everything it is unsure of (an escape in any
//! string, duplicate members, a malformed value, nesting deeper than [`MAX_DEPTH`]), is `None`,
//! and the typed reader decides.

/// Deepest nesting of a skipped value this reader follows (deeper: unsure).
const MAX_DEPTH: usize = 32;

/// The content text of a plain content record, or `None` when the record is anything else or
/// this reader is unsure.
pub fn plain_text(data: &str) -> Option<&str> {
    let mut r = Reader { b: data.as_bytes(), s: data, i: 0 };
    r.ws();
    let mut text = None;
    let (mut usage, mut error) = (false, false);
    r.members(|r, key| {
        match key {
            "choices" if text.is_none() => text = Some(r.choices()?),
            "usage" if !usage => {
                usage = true;
                r.null()?
            }
            "error" if !error => {
                error = true;
                r.null()?
            }
            "choices" | "usage" | "error" => return None,
            _ => r.skip(0)?,
        }
        Some(())
    })?;
    r.ws();
    (r.i == r.b.len()).then_some(())?;
    text
}

struct Reader<'a> {
    b: &'a [u8],
    s: &'a str,
    i: usize,
}

impl<'a> Reader<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.b.get(self.i) == Some(&c)).then(|| self.i += 1)
    }

    fn lit(&mut self, word: &[u8]) -> Option<()> {
        self.b[self.i..].starts_with(word).then(|| self.i += word.len())
    }

    fn null(&mut self) -> Option<()> {
        self.lit(b"null")
    }

    /// A string without escapes or control characters (the cursor on its opening quote).
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match *self.b.get(self.i)? {
                b'"' => break,
                b'\\' | 0..0x20 => return None,
                _ => self.i += 1,
            }
        }
        self.i += 1;
        // Quotes are ASCII, so both ends fall on character boundaries.
        self.s.get(start..self.i - 1)
    }

    /// An object's members: `each` reads the value of each key (the cursor after the colon and
    /// any white space), and returns `None` to give up.
    fn members(&mut self, mut each: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.ws();
            self.eat(b':')?;
            self.ws();
            each(self, key)?;
            self.ws();
            match *self.b.get(self.i)? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
            self.ws();
        }
    }

    /// `[{…}]`: one choice of index 0 whose delta has content and nothing that makes it more
    /// than text.
    fn choices(&mut self) -> Option<&'a str> {
        self.eat(b'[')?;
        self.ws();
        let (mut index, mut finish, mut delta) = (false, false, None);
        self.members(|r, key| {
            match key {
                "index" if !index => {
                    index = true;
                    match r.b.get(r.i)? {
                        b'n' => r.null()?,
                        _ => r.eat(b'0')?,
                    }
                }
                "finish_reason" if !finish => {
                    finish = true;
                    r.null()?
                }
                "delta" if delta.is_none() => delta = Some(r.delta()?),
                "index" | "finish_reason" | "delta" => return None,
                _ => r.skip(1)?,
            }
            Some(())
        })?;
        self.ws();
        self.eat(b']')?;
        delta
    }

    fn delta(&mut self) -> Option<&'a str> {
        let (mut content, mut tools, mut function) = (None, false, false);
        self.members(|r, key| {
            match key {
                "content" if content.is_none() => content = Some(r.string()?),
                "tool_calls" if !tools => {
                    tools = true;
                    r.null()?
                }
                "function_call" if !function => {
                    function = true;
                    r.null()?
                }
                "content" | "tool_calls" | "function_call" => return None,
                _ => r.skip(2)?,
            }
            Some(())
        })?;
        content
    }

    /// Step over any well-formed value (strings without escapes).
    fn skip(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match *self.b.get(self.i)? {
            b'"' => self.string().map(drop),
            b'{' => self.members(|r, _| r.skip(depth + 1)),
            b'[' => {
                self.i += 1;
                self.ws();
                if self.eat(b']').is_some() {
                    return Some(());
                }
                loop {
                    self.skip(depth + 1)?;
                    self.ws();
                    match *self.b.get(self.i)? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                    self.ws();
                }
            }
            b't' => self.lit(b"true"),
            b'f' => self.lit(b"false"),
            b'n' => self.null(),
            _ => self.number(),
        }
    }

    /// `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`
    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        if self.eat(b'0').is_none() {
            matches!(self.b.get(self.i)?, b'1'..=b'9').then_some(())?;
            self.digits();
        }
        if self.eat(b'.').is_some() {
            self.digits1()?;
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            self.digits1()?;
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn digits1(&mut self) -> Option<()> {
        let at = self.i;
        self.digits();
        (self.i > at).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_usual_token_record() {
        let rec = r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"m","system_fingerprint":null,"choices":[{"index":0,"delta":{"content":" tok5"},"logprobs":null,"finish_reason":null}],"usage":null}"#;
        assert_eq!(plain_text(rec), Some(" tok5"));
        assert_eq!(
            plain_text(r#" { "choices" : [ { "delta" : { "role" : "assistant" , "content" : "" } } ] } "#),
            Some("")
        );
        assert_eq!(
            plain_text(
                r#"{"choices":[{"index":null,"delta":{"content":"é","tool_calls":null,"x":[1,-2.5e+3,{"y":[]},true,false]}}]}"#
            ),
            Some("é")
        );
    }

    #[test]
    fn anything_more_or_anything_unsure_is_none() {
        for rec in [
            r#"{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"index":0.0,"delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"index":00,"delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"delta":{"content":"x"}},{"delta":{"content":"y"}}]}"#,
            r#"{"choices":[{"delta":{"content":"x","tool_calls":[]}}]}"#,
            r#"{"choices":[{"delta":{"content":"x","function_call":{}}}]}"#,
            r#"{"choices":[{"delta":{"content":null}}]}"#,
            r#"{"choices":[{"delta":{}}]}"#,
            r#"{"choices":[{"index":0}]}"#,
            r#"{"choices":[]}"#,
            r#"{"choices":[{"delta":{"content":"x"}}],"usage":{"total_tokens":1}}"#,
            r#"{"choices":[{"delta":{"content":"x"}}],"error":"boom"}"#,
            r#"{"choices":[{"delta":{"content":"a\nb"}}]}"#,
            r#"{"ch\u006fices":[{"delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"delta":{"content":"x"}}],"choices":[{"delta":{"content":"y"}}]}"#,
            r#"{"choices":[{"delta":{"content":"x","content":"y"}}]}"#,
            r#"{"choices":[{"delta":{"content":"x"}}]} trailing"#,
            r#"{"choices":[{"delta":{"content":"x"}}],}"#,
            r#"{"choices":[{"delta":{"content":"x"}}],"n":01}"#,
            r#"{"choices":[{"delta":{"content":"x"}}],"n":1.}"#,
            r#"{"choices":[{"delta":{"content":"x"}}],"n":tru}"#,
            r#"{"choices":[{"delta":{"content":"x"}}]"#,
            "{\"choices\":[{\"delta\":{\"content\":\"a\tb\"}}]}",
            "[DONE]",
            "",
        ] {
            assert_eq!(plain_text(rec), None, "{rec}");
        }
        let deep =
            format!(r#"{{"choices":[{{"delta":{{"content":"x"}}}}],"d":{}1{}}}"#, "[".repeat(40), "]".repeat(40));
        assert_eq!(plain_text(&deep), None);
    }
}
