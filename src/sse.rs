//! Incremental server-sent events decoder (WHATWG HTML §9.2.6), used to read upstream streams.
//!
//! Bytes go in as they arrive, in any split; complete events come out. Lines end in CRLF, LF or a
//! lone CR (a CR at the end of one feed and an LF at the start of the next are one line end).
//! Comment lines (`:` first) are skipped, `data` lines are joined with `\n`, `event` names the
//! event, `id` and `retry` are ignored (chat completion streams do not use them), and a blank line
//! dispatches the event when it has data. A leading UTF-8 BOM is skipped.
//!
//! Two rules are ours: a line longer than the configured limit is an error (an upstream cannot
//! make us buffer without bound), and a line that is not UTF-8 is an error.

use std::fmt;

/// Default longest line, and longest event data, accepted.
pub const DEFAULT_MAX_LINE: usize = 4 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Event {
    /// The `event` field, when one was given.
    pub event: Option<String>,
    /// The `data` lines joined with `\n`.
    pub data: String,
}

/// Why a stream could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseError {
    /// A line, or the data of one event, is longer than the limit.
    TooLong,
    /// A line is not valid UTF-8 (the stream is always UTF-8, §9.2.5).
    InvalidUtf8,
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SseError::TooLong => "server-sent event line or data is too long",
            SseError::InvalidUtf8 => "server-sent event stream is not valid UTF-8",
        })
    }
}

impl std::error::Error for SseError {}

/// Decoder state between feeds.
#[derive(Debug, Clone)]
pub struct SseDecoder {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    event: Option<String>,
    /// The previous feed ended in CR: an LF first in the next one belongs to it.
    after_cr: bool,
    /// Still at the very start of the stream (BOM check pending).
    at_start: bool,
    max: usize,
    /// Data buffers of events handed back through [`SseDecoder::recycle`], reused for the next
    /// events so that a long stream does not allocate per record.
    spare: Vec<String>,
}

/// Most buffers kept for reuse, and the largest one kept.
const SPARE_COUNT: usize = 256;
const SPARE_CAPACITY: usize = 4096;
/// Most buffers, and the largest, a thread keeps between decoders: the next stream run on the
/// same worker starts with them instead of allocating one per record (at most 32 KiB a thread).
const KEPT_COUNT: usize = 64;
const KEPT_CAPACITY: usize = 512;

thread_local! {
    static KEPT: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The index of the first CR or LF in `s`. Eight bytes at a time: a line of a token stream is a
/// few hundred bytes, and this search runs over every byte of the stream.
fn line_end(s: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut words = s.chunks_exact(8);
    let mut at = 0;
    for w in &mut words {
        let v = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        // Only the lowest flagged byte is exact (a borrow can flag bytes above it), and only it
        // is used.
        let hit = zero_byte(v ^ (ONES * u64::from(b'\n'))) | zero_byte(v ^ (ONES * u64::from(b'\r')));
        if hit != 0 {
            return Some(at + (hit.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    words.remainder().iter().position(|&b| b == b'\n' || b == b'\r').map(|i| at + i)
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_LINE)
    }
}

impl Drop for SseDecoder {
    fn drop(&mut self) {
        let mut spare = std::mem::take(&mut self.spare);
        spare.retain(|b| b.capacity() <= KEPT_CAPACITY);
        spare.truncate(KEPT_COUNT);
        // `try_with`: a decoder dropped while its thread exits keeps nothing.
        let _ = KEPT.try_with(|k| {
            let mut k = k.borrow_mut();
            if k.len() < spare.len() {
                *k = spare;
            }
        });
    }
}

impl SseDecoder {
    /// A decoder refusing lines or event data longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        SseDecoder {
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            event: None,
            after_cr: false,
            at_start: true,
            max,
            spare: KEPT.with(|k| std::mem::take(&mut *k.borrow_mut())),
        }
    }

    /// Decode `input`, pushing every event it completes onto `out`. All input is consumed; after
    /// an error the decoder must not be used again.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        if self.at_start {
            // The BOM may arrive split across feeds: wait for three bytes before deciding.
            let have = self.line.len();
            let need = 3 - have.min(3);
            let take = need.min(input.len());
            self.line.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.line.len() < 3 && b"\xEF\xBB\xBF".starts_with(&self.line) {
                return Ok(());
            }
            self.at_start = false;
            let head = std::mem::take(&mut self.line);
            let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&head);
            self.scan(head, out)?;
        }
        self.scan(input, out)
    }

    fn scan(&mut self, mut input: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        if self.after_cr && !input.is_empty() {
            self.after_cr = false;
            if input[0] == b'\n' {
                input = &input[1..];
            }
        }
        while let Some(i) = line_end(input) {
            if self.line.len() + i > self.max {
                return Err(SseError::TooLong);
            }
            let (line, rest) = input.split_at(i);
            input = &rest[1..];
            if rest[0] == b'\r' {
                match input.first() {
                    Some(b'\n') => input = &input[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if self.line.is_empty() {
                // The whole line is in this feed: read it in place.
                self.line_done(line, out)?;
            } else {
                self.line.extend_from_slice(line);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, out)?;
                self.line = line;
                self.line.clear();
            }
        }
        if self.line.len() + input.len() > self.max {
            return Err(SseError::TooLong);
        }
        self.line.extend_from_slice(input);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        if line.is_empty() {
            if self.has_data {
                let data = std::mem::replace(&mut self.data, self.spare.pop().unwrap_or_default());
                out.push(Event { event: self.event.take(), data });
            }
            self.has_data = false;
            self.event = None;
            self.data.clear();
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::InvalidUtf8)?;
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.data.len() + value.len() + 1 > self.max {
                    return Err(SseError::TooLong);
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_string()),
            // `id`, `retry` and unknown fields are ignored (§9.2.6).
            _ => {}
        }
        Ok(())
    }

    /// Empty `events`, keeping their data buffers for the events to come (optional: dropping
    /// the events is fine too, it just costs an allocation per event).
    pub fn recycle(&mut self, events: &mut Vec<Event>) {
        for ev in events.drain(..) {
            let mut data = ev.data;
            if self.spare.len() < SPARE_COUNT && data.capacity() <= SPARE_CAPACITY {
                data.clear();
                self.spare.push(data);
            }
        }
    }

    /// The end of the stream. A last event without its blank line is returned (the standard
    /// discards it; an upstream that closes right after `data: [DONE]` still means it).
    pub fn finish(&mut self, out: &mut Vec<Event>) -> Result<(), SseError> {
        if self.at_start {
            self.at_start = false;
            let head = std::mem::take(&mut self.line);
            let head = head.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&head);
            self.scan(head, out)?;
        }
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, out)?;
        }
        self.line_done(&[], out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: Option<&str>, data: &str) -> Event {
        Event { event: event.map(String::from), data: data.to_string() }
    }

    fn decode_all(input: &[u8]) -> Result<Vec<Event>, SseError> {
        let mut d = SseDecoder::new(64);
        let mut out = Vec::new();
        d.feed(input, &mut out)?;
        d.finish(&mut out)?;
        Ok(out)
    }

    /// Every split of the input into two feeds, and byte-at-a-time feeding, give one result.
    fn decode_every_split(input: &[u8]) -> Result<Vec<Event>, SseError> {
        let whole = decode_all(input);
        for cut in 0..=input.len() {
            let mut d = SseDecoder::new(64);
            let mut out = Vec::new();
            let r = d.feed(&input[..cut], &mut out).and_then(|_| d.feed(&input[cut..], &mut out));
            let r = r.and_then(|_| d.finish(&mut out)).map(|_| out);
            assert_eq!(r, whole, "split at {cut} of {:?}", String::from_utf8_lossy(input));
        }
        let mut d = SseDecoder::new(64);
        let mut out = Vec::new();
        let r = input.iter().try_for_each(|b| d.feed(std::slice::from_ref(b), &mut out));
        let r = r.and_then(|_| d.finish(&mut out)).map(|_| out);
        assert_eq!(r, whole, "byte at a time");
        whole
    }

    #[test]
    fn table() {
        type Case = (&'static str, &'static [u8], Result<Vec<Event>, SseError>);
        let cases: Vec<Case> = vec![
            ("lf", b"data: a\n\ndata: b\n\n", Ok(vec![ev(None, "a"), ev(None, "b")])),
            ("crlf", b"data: a\r\n\r\ndata: b\r\n\r\n", Ok(vec![ev(None, "a"), ev(None, "b")])),
            ("lone cr", b"data: a\r\rdata: b\r\r", Ok(vec![ev(None, "a"), ev(None, "b")])),
            ("mixed", b"data: a\r\n\ndata: b\n\r\n", Ok(vec![ev(None, "a"), ev(None, "b")])),
            ("no space", b"data:{\"x\":1}\n\n", Ok(vec![ev(None, "{\"x\":1}")])),
            ("one space stripped", b"data:  two\n\n", Ok(vec![ev(None, " two")])),
            ("multi-line data", b"data: a\ndata: b\ndata\n\n", Ok(vec![ev(None, "a\nb\n")])),
            ("comments skipped", b": keep-alive\n\n:\n\ndata: x\n: mid\n\n", Ok(vec![ev(None, "x")])),
            ("blank lines alone", b"\n\n\r\n\r\r", Ok(vec![])),
            ("event name", b"event: error\ndata: {}\n\n", Ok(vec![ev(Some("error"), "{}")])),
            ("event name reset", b"event: e\n\ndata: x\n\n", Ok(vec![ev(None, "x")])),
            ("id and retry ignored", b"id: 7\nretry: 10\n\ndata: x\nid: 8\n\n", Ok(vec![ev(None, "x")])),
            ("unknown field", b"foo: bar\ndata: x\n\n", Ok(vec![ev(None, "x")])),
            ("bom", b"\xEF\xBB\xBFdata: x\n\n", Ok(vec![ev(None, "x")])),
            ("bom only once", b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n", Ok(vec![])),
            ("unterminated last event", b"data: a\n\ndata: [DONE]", Ok(vec![ev(None, "a"), ev(None, "[DONE]")])),
            ("unterminated after lf", b"data: [DONE]\n", Ok(vec![ev(None, "[DONE]")])),
            ("utf8", "data: héllo ✓\n\n".as_bytes(), Ok(vec![ev(None, "héllo ✓")])),
            ("invalid utf8", b"data: \xff\n\n", Err(SseError::InvalidUtf8)),
            ("invalid utf8 in comment is fine", b": \xff\n\ndata: x\n\n", Ok(vec![ev(None, "x")])),
            ("line too long", &[b'a'; 65], Err(SseError::TooLong)),
            ("data too long", b"data: 0123456789012345678901234\ndata: 0123456789012345678901234\ndata: 0123456789012345678901234\n\n", Err(SseError::TooLong)),
            ("empty", b"", Ok(vec![])),
        ];
        for (name, input, want) in cases {
            assert_eq!(decode_every_split(input), want, "{name}");
        }
    }

    #[test]
    fn line_end_finds_the_first_cr_or_lf() {
        let naive = |s: &[u8]| s.iter().position(|&b| b == b'\n' || b == b'\r');
        let fillers = [b'a', 0x00, 0x01, 0x09, 0x0b, 0x0c, 0x0e, 0x8a, 0x8d, 0xff, 0x7f, 0x80];
        for len in 0..40 {
            for &fill in &fillers {
                let mut s = vec![fill; len];
                assert_eq!(line_end(&s), naive(&s), "none in {s:?}");
                for at in 0..len {
                    for eol in [b'\n', b'\r'] {
                        s[at] = eol;
                        assert_eq!(line_end(&s), Some(at), "{s:?}");
                        // A later line end, and a borrow-prone byte just before the first.
                        if at + 1 < len {
                            s[at + 1] = b'\n';
                            assert_eq!(line_end(&s), Some(at), "{s:?}");
                            s[at + 1] = fill;
                        }
                        s[at] = fill;
                    }
                }
            }
        }
        // Pseudo-random bytes, many line ends.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let s: Vec<u8> = (0..(x % 64) as usize)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    [b'\n', b'\r', x as u8, x as u8, x as u8, x as u8][(x >> 40) as usize % 6]
                })
                .collect();
            assert_eq!(line_end(&s), naive(&s), "{s:?}");
            for from in 0..s.len() {
                assert_eq!(line_end(&s[from..]), naive(&s[from..]), "{:?}", &s[from..]);
            }
        }
    }

    #[test]
    fn recycled_buffers_do_not_leak_into_later_events() {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        d.feed(b"data: a long first event\n\ndata: second\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev(None, "a long first event"), ev(None, "second")]);
        d.recycle(&mut out);
        assert!(out.is_empty());
        d.feed(b"data: x\n\ndata: y\ndata: z\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev(None, "x"), ev(None, "y\nz")]);
    }

    #[test]
    fn a_later_decoder_on_the_thread_starts_with_the_buffers_of_an_earlier_one() {
        let mut out = Vec::new();
        {
            let mut d = SseDecoder::default();
            d.feed(b"data: one\n\ndata: two\n\n", &mut out).unwrap();
            d.recycle(&mut out);
            // Too large to keep between decoders.
            d.spare.push(String::with_capacity(KEPT_CAPACITY + 1));
        }
        let mut d = SseDecoder::default();
        assert_eq!(d.spare.len(), 2, "the earlier decoder's buffers were not kept");
        assert!(d.spare.iter().all(|b| b.is_empty() && b.capacity() <= KEPT_CAPACITY));
        // Kept buffers carry nothing over.
        d.feed(b"data: x\n\n", &mut out).unwrap();
        assert_eq!(out, vec![ev(None, "x")]);
        // Taken by the decoder that uses them.
        assert!(SseDecoder::default().spare.is_empty());
    }

    #[test]
    fn crlf_split_across_feeds_is_one_line_end() {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        d.feed(b"data: a\r", &mut out).unwrap();
        d.feed(b"\n\r", &mut out).unwrap();
        assert_eq!(out, vec![ev(None, "a")]);
        d.feed(b"\ndata: b\r\n\r\n", &mut out).unwrap();
        assert_eq!(out, vec![ev(None, "a"), ev(None, "b")]);
    }

    #[test]
    fn events_come_out_as_soon_as_complete() {
        let mut d = SseDecoder::default();
        let mut out = Vec::new();
        d.feed(b"data: one\n\ndata: tw", &mut out).unwrap();
        assert_eq!(out, vec![ev(None, "one")]);
        d.feed(b"o\n\n", &mut out).unwrap();
        assert_eq!(out.len(), 2);
    }
}
