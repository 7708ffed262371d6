//! Message framing for both directions (RFC 9112 §6): the one `Content-Length` /
//! `Transfer-Encoding` grammar, the one decision of how a body is delimited ([`FramingFields::decide`])
//! and the one body decoder ([`BodyDecoder`]). The server reads request bodies with it
//! (`http::head`, `server::conn`), the upstream client response bodies (`http::upstream`).
//!
//! The grammar is the same for both roles: `Content-Length = 1*DIGIT` (a list of identical values
//! is one value; a sign, a space inside, overflow or two different values are refused), and
//! `Transfer-Encoding = 1#transfer-coding` with only `chunked`, once and last (a field with no
//! coding at all is refused; empty list elements are skipped, RFC 9110 §5.6.1). Where RFC 9112
//! treats requests and responses differently, the role decides:
//!
//! | | request (server, strict: `docs/conformance.md`) | response (upstream client) |
//! |---|---|---|
//! | neither field | no body | read until the connection closes |
//! | both fields | 400 (§6.3 p.3: a server may refuse) | `chunked` wins, and the connection is not reused (§6.3 p.3) |
//! | `Transfer-Encoding` in HTTP/1.0 | 400 (§6.1) | decoded as chunked; an HTTP/1.0 connection is never reused anyway |
//! | a coding other than `chunked` | 501 | refused: no coding is asked for (no `TE`, no `Accept-Encoding`), and reading a compressed body until close would hand it on undecoded |
//! | status | — | 204 and 304 have no body (§6.3 p.1); 1xx are skipped by the head parser |
//!
//! A zero `Content-Length` is [`Framing::None`] in both roles.

use std::fmt;

use super::chunked::{ChunkError, ChunkedDecoder};

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// Exactly this many bytes (never 0: that is [`Framing::None`]).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (a response with neither field).
    CloseDelimited,
}

/// Which message the framing fields belong to; the rules that differ are in the module table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A request, with its HTTP minor version.
    Request {
        /// 0 for HTTP/1.0, 1 for HTTP/1.1.
        minor: u8,
    },
    /// A final (non-1xx) response to a request that was not `HEAD` or `CONNECT` (the upstream
    /// client sends only `POST`).
    Response {
        /// Status code.
        status: u16,
    },
}

/// A framing field that cannot be honoured. Each variant names one rule; the server's status for
/// it is `http::head::HeadError::status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    /// `Content-Length` that is not all digits, overflows, or disagrees with another.
    ContentLength,
    /// A `Transfer-Encoding` field with no coding in it (RFC 9112 §6.1: `1#transfer-coding`).
    EmptyTransferEncoding,
    /// Both `Content-Length` and `Transfer-Encoding` in a request (RFC 9112 §6.3 p.3).
    LengthAndChunked,
    /// `Transfer-Encoding` in an HTTP/1.0 request (RFC 9112 §6.1).
    ChunkedInHttp10,
    /// `chunked` is not the final coding, or appears twice (RFC 9112 §6.3 p.4).
    ChunkedNotLast,
    /// A transfer coding other than `chunked` (RFC 9112 §6.1: 501).
    UnsupportedCoding,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FramingError::ContentLength => "invalid Content-Length",
            FramingError::EmptyTransferEncoding => "Transfer-Encoding names no transfer coding",
            FramingError::LengthAndChunked => "both Content-Length and Transfer-Encoding are present",
            FramingError::ChunkedInHttp10 => "Transfer-Encoding is not allowed in an HTTP/1.0 request",
            FramingError::ChunkedNotLast => "chunked must be the final transfer coding, applied once",
            FramingError::UnsupportedCoding => "only the chunked transfer coding is supported",
        })
    }
}

/// The framing fields of one head, collected field by field ([`FramingFields::content_length`],
/// [`FramingFields::transfer_encoding`]) and then decided once ([`FramingFields::decide`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FramingFields {
    length: Option<u64>,
    /// A `Transfer-Encoding` field was present.
    te: bool,
    /// How many `chunked` codings were listed.
    chunked: u32,
    /// The last coding listed was `chunked`.
    chunked_last: bool,
    /// A coding other than `chunked` was listed.
    other: bool,
}

impl FramingFields {
    /// Take one `Content-Length` field value: `1*DIGIT`, or a list of identical ones.
    pub fn content_length(&mut self, value: &[u8]) -> Result<(), FramingError> {
        for part in value.split(|&b| b == b',') {
            let n = parse_digits(trim_ows(part)).ok_or(FramingError::ContentLength)?;
            if self.length.is_some_and(|l| l != n) {
                return Err(FramingError::ContentLength);
            }
            self.length = Some(n);
        }
        Ok(())
    }

    /// Take one `Transfer-Encoding` field value (a list of codings; empty elements skipped, but a
    /// field with none is refused).
    pub fn transfer_encoding(&mut self, value: &[u8]) -> Result<(), FramingError> {
        if std::str::from_utf8(value).is_err() {
            return Err(FramingError::UnsupportedCoding);
        }
        self.te = true;
        let mut any = false;
        for coding in value.split(|&b| b == b',').map(trim_ows).filter(|c| !c.is_empty()) {
            any = true;
            self.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
            if self.chunked_last {
                self.chunked += 1;
            } else {
                self.other = true;
            }
        }
        if any { Ok(()) } else { Err(FramingError::EmptyTransferEncoding) }
    }

    /// Both `Content-Length` and `Transfer-Encoding` were present: a response framed this way is
    /// decoded by its `Transfer-Encoding`, but its connection must not carry another exchange.
    pub fn length_and_chunked(&self) -> bool {
        self.te && self.length.is_some()
    }

    /// How the body of a message in `role` is delimited.
    pub fn decide(&self, role: Role) -> Result<Framing, FramingError> {
        let length = match self.length {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        };
        match role {
            Role::Request { minor } => {
                if !self.te {
                    return Ok(length);
                }
                if self.length.is_some() {
                    return Err(FramingError::LengthAndChunked);
                }
                if minor == 0 {
                    return Err(FramingError::ChunkedInHttp10);
                }
                self.codings()?;
                Ok(Framing::Chunked)
            }
            Role::Response { status } => {
                if self.te {
                    self.codings()?;
                }
                Ok(if status == 204 || status == 304 {
                    Framing::None
                } else if self.te {
                    Framing::Chunked
                } else if self.length.is_some() {
                    length
                } else {
                    Framing::CloseDelimited
                })
            }
        }
    }

    /// The listed codings are exactly one `chunked`.
    fn codings(&self) -> Result<(), FramingError> {
        if self.other {
            return Err(if self.chunked > 0 { FramingError::ChunkedNotLast } else { FramingError::UnsupportedCoding });
        }
        if self.chunked != 1 || !self.chunked_last {
            return Err(FramingError::ChunkedNotLast);
        }
        Ok(())
    }
}

/// Strip optional whitespace (`OWS`: spaces and tabs) from both ends.
fn trim_ows(b: &[u8]) -> &[u8] {
    let s = b.iter().position(|c| !matches!(c, b' ' | b'\t')).unwrap_or(b.len());
    let e = b.iter().rposition(|c| !matches!(c, b' ' | b'\t')).map_or(s, |i| i + 1);
    &b[s..e]
}

/// `1*DIGIT` into a u64, refusing signs, spaces, empty input and overflow (RFC 9110 §8.6).
pub fn parse_digits(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some(n)
}

/// Decodes a body by its [`Framing`]: bytes in, body bytes appended, and whether the framing says
/// the body is complete.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Length(u64),
    Chunked(ChunkedDecoder),
    CloseDelimited,
}

impl BodyDecoder {
    /// A decoder for `framing`. `limit` bounds a chunked body ([`ChunkError::BodyTooLarge`]); a
    /// declared length is the caller's to check before reading, where it can be refused before
    /// any byte arrives.
    pub fn new(framing: Framing, limit: u64) -> Self {
        let kind = match framing {
            Framing::None => Kind::Length(0),
            Framing::Length(n) => Kind::Length(n),
            Framing::Chunked => Kind::Chunked(ChunkedDecoder::new(limit)),
            Framing::CloseDelimited => Kind::CloseDelimited,
        };
        BodyDecoder { kind }
    }

    /// Append the body bytes in `input` to `out`; returns the bytes consumed (fewer than
    /// `input.len()` only when the body ended: the rest belongs to the next message).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        match &mut self.kind {
            Kind::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                out.extend_from_slice(&input[..n]);
                *left -= n as u64;
                Ok(n)
            }
            Kind::Chunked(d) => d.decode(input, out),
            Kind::CloseDelimited => {
                out.extend_from_slice(input);
                Ok(input.len())
            }
        }
    }

    /// Whether the framing says the body is complete (a close-delimited body never is).
    pub fn is_done(&self) -> bool {
        match &self.kind {
            Kind::Length(left) => *left == 0,
            Kind::Chunked(d) => d.is_done(),
            Kind::CloseDelimited => false,
        }
    }

    /// Whether the body is complete if the connection closes now: a close-delimited body or one
    /// the framing already ended; anything else is truncated.
    pub fn complete_at_close(&self) -> bool {
        matches!(self.kind, Kind::CloseDelimited) || self.is_done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(cl: &[&str], te: &[&str]) -> Result<FramingFields, FramingError> {
        let mut f = FramingFields::default();
        for v in cl {
            f.content_length(v.as_bytes())?;
        }
        for v in te {
            f.transfer_encoding(v.as_bytes())?;
        }
        Ok(f)
    }

    const REQ: Role = Role::Request { minor: 1 };
    const OK: Role = Role::Response { status: 200 };

    #[test]
    fn one_grammar_for_both_roles() {
        for bad in ["", "+5", "-1", "1,2", "0x10", "5 5", "99999999999999999999", "5,"] {
            assert_eq!(fields(&[bad], &[]), Err(FramingError::ContentLength), "{bad:?}");
        }
        assert_eq!(fields(&["5", "6"], &[]), Err(FramingError::ContentLength));
        for te in ["", " ", ",", ", ,"] {
            assert_eq!(fields(&[], &[te]), Err(FramingError::EmptyTransferEncoding), "{te:?}");
        }
        assert_eq!(fields(&[], &["chunked", ""]), Err(FramingError::EmptyTransferEncoding));
        // Optional whitespace is spaces and tabs only: a no-break space is part of the coding.
        assert_eq!(fields(&[], &["chunked\u{a0}"]).unwrap().decide(REQ), Err(FramingError::UnsupportedCoding));
        assert_eq!(fields(&["5\u{a0}"], &[]), Err(FramingError::ContentLength));
        // Not UTF-8: no coding to name.
        assert_eq!(FramingFields::default().transfer_encoding(b"\xe9"), Err(FramingError::UnsupportedCoding));
        for role in [REQ, OK] {
            let decide = |cl: &[&str], te: &[&str]| fields(cl, te).unwrap().decide(role);
            assert_eq!(decide(&["5"], &[]), Ok(Framing::Length(5)));
            assert_eq!(decide(&["5, 5", " 5\t"], &[]), Ok(Framing::Length(5)));
            assert_eq!(decide(&["0"], &[]), Ok(Framing::None));
            assert_eq!(decide(&[], &["CHUNKED"]), Ok(Framing::Chunked));
            assert_eq!(decide(&[], &[", chunked,"]), Ok(Framing::Chunked));
            assert_eq!(decide(&[], &["gzip"]), Err(FramingError::UnsupportedCoding));
            assert_eq!(decide(&[], &["chunkedx"]), Err(FramingError::UnsupportedCoding));
            assert_eq!(decide(&[], &["chunked, gzip"]), Err(FramingError::ChunkedNotLast));
            assert_eq!(decide(&[], &["gzip, chunked"]), Err(FramingError::ChunkedNotLast));
            assert_eq!(decide(&[], &["chunked", "chunked"]), Err(FramingError::ChunkedNotLast));
        }
    }

    #[test]
    fn where_the_roles_differ() {
        let none = FramingFields::default();
        assert_eq!(none.decide(REQ), Ok(Framing::None));
        assert_eq!(none.decide(OK), Ok(Framing::CloseDelimited));

        let both = fields(&["3"], &["chunked"]).unwrap();
        assert!(both.length_and_chunked());
        assert_eq!(both.decide(REQ), Err(FramingError::LengthAndChunked));
        assert_eq!(both.decide(OK), Ok(Framing::Chunked));

        let te = fields(&[], &["chunked"]).unwrap();
        assert!(!te.length_and_chunked());
        assert_eq!(te.decide(Role::Request { minor: 0 }), Err(FramingError::ChunkedInHttp10));

        for status in [204, 304] {
            let r = Role::Response { status };
            assert_eq!(fields(&["5"], &[]).unwrap().decide(r), Ok(Framing::None));
            assert_eq!(te.decide(r), Ok(Framing::None));
            assert_eq!(none.decide(r), Ok(Framing::None));
            assert_eq!(fields(&[], &["gzip"]).unwrap().decide(r), Err(FramingError::UnsupportedCoding));
        }
        // A request's conflicts are judged before its codings.
        assert_eq!(fields(&["3"], &["gzip"]).unwrap().decide(REQ), Err(FramingError::LengthAndChunked));
    }

    #[test]
    fn body_framings() {
        let mut out = Vec::new();
        let mut d = BodyDecoder::new(Framing::Length(3), 0);
        assert_eq!(d.decode(b"abcdef", &mut out).unwrap(), 3);
        assert!(d.is_done() && d.complete_at_close());
        assert_eq!(out, b"abc");

        let mut d = BodyDecoder::new(Framing::Length(3), 0);
        d.decode(b"a", &mut out).unwrap();
        assert!(!d.is_done() && !d.complete_at_close());

        let mut d = BodyDecoder::new(Framing::None, 0);
        assert_eq!(d.decode(b"GET", &mut out).unwrap(), 0);
        assert!(d.is_done());

        out.clear();
        let mut d = BodyDecoder::new(Framing::Chunked, u64::MAX);
        d.decode(b"3\r\nabc\r\n", &mut out).unwrap();
        assert!(!d.is_done() && !d.complete_at_close());
        assert_eq!(d.decode(b"0\r\n\r\nGET", &mut out).unwrap(), 5);
        assert!(d.is_done() && d.complete_at_close());
        assert_eq!(out, b"abc");
        let mut d = BodyDecoder::new(Framing::Chunked, u64::MAX);
        assert_eq!(d.decode(b"zz\r\n", &mut out), Err(ChunkError::InvalidSize));
        let mut d = BodyDecoder::new(Framing::Chunked, 2);
        assert_eq!(d.decode(b"3\r\nabc\r\n", &mut out), Err(ChunkError::BodyTooLarge));

        out.clear();
        let mut d = BodyDecoder::new(Framing::CloseDelimited, 0);
        assert_eq!(d.decode(b"xyz", &mut out).unwrap(), 3);
        assert!(!d.is_done() && d.complete_at_close());
        assert_eq!(out, b"xyz");
    }
}
