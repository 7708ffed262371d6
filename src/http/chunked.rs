//! Strict chunked body decoder (RFC 9112 §7.1), byte-at-a-time so that any split of the input
//! gives the same result.
//!
//! A chunk line is exactly `chunk-size [ chunk-ext ] CRLF` (§7.1, §7.1.1):
//!
//! ```text
//! chunk-size = 1*HEXDIG
//! chunk-ext  = *( ";" chunk-ext-name [ "=" chunk-ext-val ] )
//! chunk-ext-name = token
//! chunk-ext-val  = token / quoted-string
//! ```
//!
//! Refused, unlike httparse's `parse_chunk_size`: an empty size line, a bare LF anywhere in a
//! chunk line or after chunk data, sizes that overflow, an extension that is not a token (with an
//! optional token or quoted-string value), control bytes, and extensions or trailers over 16 KiB.
//! Stricter than the RFC, deliberately: the `BWS` (bad whitespace) that §7.1.1 lets a recipient
//! skip around `;` and `=` is refused, as is any whitespace after the size — no sender is
//! allowed to produce it, and parsers that disagree about it are how chunked bodies get smuggled.

use std::fmt;

/// Largest total of chunk-extension bytes (hyper uses the same bound).
pub const MAX_EXTENSION_BYTES: usize = 16 * 1024;
/// Largest trailer section.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// A size line with no hex digit, or a non-hex character after the digits (whitespace
    /// included) other than `;` or CR.
    InvalidSize,
    /// A chunk extension that is not `";" token [ "=" ( token / quoted-string ) ]` (RFC 9112
    /// §7.1.1), or a control byte in one.
    InvalidExtension,
    /// More than 16 hex digits.
    SizeOverflow,
    /// LF without CR, or CR not followed by LF.
    BadLineEnding,
    /// Chunk data not followed by CRLF.
    MissingDataCrlf,
    /// Extensions over [`MAX_EXTENSION_BYTES`].
    ExtensionsTooLarge,
    /// Trailers over [`MAX_TRAILER_BYTES`].
    TrailersTooLarge,
    /// The decoded body exceeds the configured limit (413, not 400).
    BodyTooLarge,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkError::InvalidSize => "invalid chunk size line",
            ChunkError::InvalidExtension => "invalid chunk extension",
            ChunkError::SizeOverflow => "chunk size overflows",
            ChunkError::BadLineEnding => "chunk line must end in CRLF",
            ChunkError::MissingDataCrlf => "chunk data must be followed by CRLF",
            ChunkError::ExtensionsTooLarge => "chunk extensions are larger than 16384 bytes",
            ChunkError::TrailersTooLarge => "trailer section is larger than 16384 bytes",
            ChunkError::BodyTooLarge => "request body is larger than maxBodyBytes",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Start of a size line: at least one hex digit needed.
    SizeStart,
    /// Reading hex digits.
    Size,
    /// After `;`: the first byte of an extension name.
    ExtName,
    /// Inside an extension name.
    ExtNameMore,
    /// After `=`: the first byte of a value (token or `"`).
    ExtValue,
    /// Inside a token value.
    ExtToken,
    /// Inside a quoted-string value.
    ExtQuoted,
    /// After `\` inside a quoted-string.
    ExtQuotedPair,
    /// After the closing `"`: `;` or CR.
    ExtQuotedEnd,
    /// After CR of the size line.
    SizeLf,
    /// Reading chunk data.
    Data,
    /// After data, expecting CR.
    DataCr,
    /// After data CR, expecting LF.
    DataLf,
    /// Start of a trailer line (or the final CRLF).
    TrailerStart,
    /// Inside a trailer line.
    Trailer,
    /// After CR of a trailer line.
    TrailerLf,
    /// After CR of the final empty line.
    EndLf,
    /// Body complete.
    Done,
}

impl State {
    /// After the size's first digit and before the line's CR.
    fn in_chunk_line(self) -> bool {
        matches!(
            self,
            State::Size
                | State::ExtName
                | State::ExtNameMore
                | State::ExtValue
                | State::ExtToken
                | State::ExtQuoted
                | State::ExtQuotedPair
                | State::ExtQuotedEnd
        )
    }
}

/// Incremental decoder state.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    digits: u8,
    ext_bytes: usize,
    trailer_bytes: usize,
    total: u64,
    limit: u64,
}

impl ChunkedDecoder {
    /// A decoder refusing bodies larger than `limit` bytes.
    pub fn new(limit: u64) -> Self {
        ChunkedDecoder { state: State::SizeStart, size: 0, digits: 0, ext_bytes: 0, trailer_bytes: 0, total: 0, limit }
    }

    /// Whether the terminating chunk and trailers were read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Count one byte of chunk extensions against [`MAX_EXTENSION_BYTES`].
    fn ext_byte(&mut self) -> Result<(), ChunkError> {
        self.ext_bytes += 1;
        if self.ext_bytes > MAX_EXTENSION_BYTES {
            return Err(ChunkError::ExtensionsTooLarge);
        }
        Ok(())
    }

    /// Decode from `input`, appending body bytes to `out`. Returns bytes consumed; stops at the
    /// end of the body (leaving pipelined bytes unconsumed).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            if self.state == State::Data {
                let n = (input.len() - i).min(self.size as usize) as u64;
                out.extend_from_slice(&input[i..i + n as usize]);
                i += n as usize;
                self.size -= n;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (State::SizeStart | State::Size, b) if b.is_ascii_hexdigit() => {
                    if self.digits == 16 {
                        return Err(ChunkError::SizeOverflow);
                    }
                    self.digits += 1;
                    self.size = (self.size << 4) | (b as char).to_digit(16).unwrap_or(0) as u64;
                    State::Size
                }
                (State::SizeStart, _) => return Err(ChunkError::InvalidSize),
                (s, b'\n') if s.in_chunk_line() => return Err(ChunkError::BadLineEnding),
                (State::Size | State::ExtNameMore | State::ExtToken | State::ExtQuotedEnd, b';') => {
                    self.ext_byte()?;
                    State::ExtName
                }
                (State::Size | State::ExtNameMore | State::ExtToken | State::ExtQuotedEnd, b'\r') => State::SizeLf,
                (State::Size, _) => return Err(ChunkError::InvalidSize),
                (State::ExtName | State::ExtNameMore, b) if is_tchar(b) => {
                    self.ext_byte()?;
                    State::ExtNameMore
                }
                (State::ExtNameMore, b'=') => {
                    self.ext_byte()?;
                    State::ExtValue
                }
                (State::ExtValue | State::ExtToken, b) if is_tchar(b) => {
                    self.ext_byte()?;
                    State::ExtToken
                }
                (State::ExtValue, b'"') => {
                    self.ext_byte()?;
                    State::ExtQuoted
                }
                (State::ExtQuoted, b'"') => {
                    self.ext_byte()?;
                    State::ExtQuotedEnd
                }
                (State::ExtQuoted, b'\\') => {
                    self.ext_byte()?;
                    State::ExtQuotedPair
                }
                // qdtext = HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text; quoted-pair = "\"
                // ( HTAB / SP / VCHAR / obs-text ): anything but CTLs (the quote and backslash
                // are matched above).
                (State::ExtQuoted | State::ExtQuotedPair, b) if b == b'\t' || (b >= 0x20 && b != 0x7f) => {
                    self.ext_byte()?;
                    State::ExtQuoted
                }
                (
                    State::ExtName
                    | State::ExtNameMore
                    | State::ExtValue
                    | State::ExtToken
                    | State::ExtQuoted
                    | State::ExtQuotedPair
                    | State::ExtQuotedEnd,
                    _,
                ) => return Err(ChunkError::InvalidExtension),
                (State::SizeLf, b'\n') => {
                    if self.size == 0 {
                        State::TrailerStart
                    } else {
                        self.total = self.total.checked_add(self.size).ok_or(ChunkError::BodyTooLarge)?;
                        if self.total > self.limit {
                            return Err(ChunkError::BodyTooLarge);
                        }
                        State::Data
                    }
                }
                (State::SizeLf, _) => return Err(ChunkError::BadLineEnding),
                (State::DataCr, b'\r') => State::DataLf,
                (State::DataCr, _) => return Err(ChunkError::MissingDataCrlf),
                (State::DataLf, b'\n') => {
                    self.digits = 0;
                    State::SizeStart
                }
                (State::DataLf, _) => return Err(ChunkError::MissingDataCrlf),
                (State::TrailerStart, b'\r') => State::EndLf,
                (State::TrailerStart | State::Trailer, b'\n') => return Err(ChunkError::BadLineEnding),
                (State::Trailer, b'\r') => State::TrailerLf,
                (State::TrailerStart | State::Trailer, _) => {
                    self.trailer_bytes += 1;
                    if self.trailer_bytes > MAX_TRAILER_BYTES {
                        return Err(ChunkError::TrailersTooLarge);
                    }
                    State::Trailer
                }
                (State::TrailerLf, b'\n') => State::TrailerStart,
                (State::EndLf, b'\n') => State::Done,
                (State::TrailerLf | State::EndLf, _) => return Err(ChunkError::BadLineEnding),
                (State::Data | State::Done, _) => unreachable!("handled above"),
            };
        }
        Ok(i)
    }
}

/// `tchar` (RFC 9110 §5.6.2): `"!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" /
/// "_" / "`" / "|" / "~" / DIGIT / ALPHA`.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut d = ChunkedDecoder::new(1 << 20);
        let mut out = Vec::new();
        let n = d.decode(input, &mut out)?;
        Ok((out, n, d.is_done()))
    }

    #[test]
    fn valid_bodies() {
        assert_eq!(run(b"5\r\nhello\r\n0\r\n\r\n").unwrap(), (b"hello".to_vec(), 15, true));
        assert_eq!(
            run(b"5;a=b\r\nhello\r\n6;x\r\n world\r\n0\r\n\r\nGET").unwrap(),
            (b"hello world".to_vec(), 32, true)
        );
        assert_eq!(run(b"A\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n").unwrap().0, b"0123456789");
        assert_eq!(run(b"5\r\nhel").unwrap(), (b"hel".to_vec(), 6, false));
    }

    #[test]
    fn smuggling_vectors_rejected() {
        let cases: &[(&[u8], ChunkError)] = &[
            (b"\r\n", ChunkError::InvalidSize),
            (b";ext\r\n", ChunkError::InvalidSize),
            (b"4;a\nb\r\n", ChunkError::BadLineEnding),
            (b"4\n", ChunkError::BadLineEnding),
            (b"4\rX", ChunkError::BadLineEnding),
            (b"f0000000000000003\r\n", ChunkError::SizeOverflow),
            (b"0x4\r\n", ChunkError::InvalidSize),
            (b"-4\r\n", ChunkError::InvalidSize),
            (b"4 4\r\n", ChunkError::InvalidSize),
            (b"4\r\nabcdX", ChunkError::MissingDataCrlf),
            (b"4\r\nabcd\n", ChunkError::MissingDataCrlf),
            (b"0\r\n\n", ChunkError::BadLineEnding),
            (b"0\r\nX: y\n", ChunkError::BadLineEnding),
            (b"fffffffffffffff\r\n", ChunkError::BodyTooLarge),
        ];
        for (input, want) in cases {
            assert_eq!(run(input).map(|_| ()), Err(*want), "{:?}", String::from_utf8_lossy(input));
        }
    }

    /// RFC 9112 §7.1 / §7.1.1: the chunk-line grammar, one row per rule. Every body is complete
    /// and well-formed apart from its first chunk line, and is followed by bytes that would be a
    /// second request if the decoder resynchronised.
    #[test]
    fn chunk_line_table() {
        let cases: &[(&[u8], Result<(), ChunkError>)] = &[
            (b"5", Ok(())),
            (b"05", Ok(())),
            (b"5;a", Ok(())),
            (b"5;a=b", Ok(())),
            (b"5;a=b;c;d=e", Ok(())),
            (b"5;a=\"q u;o\\\"te\"", Ok(())),
            (b"5;a=\"\"", Ok(())),
            (b"5;a=\"\t\x80\"", Ok(())),
            (b"5;!#$%&'*+-.^_`|~09aZ=!#$%&'*+-.^_`|~", Ok(())),
            (b"5;a=\"x\";b", Ok(())),
            // No whitespace anywhere in a chunk line (BWS refused).
            (b"5 ", Err(ChunkError::InvalidSize)),
            (b"5\t", Err(ChunkError::InvalidSize)),
            (b"5 ;a", Err(ChunkError::InvalidSize)),
            (b"5; a", Err(ChunkError::InvalidExtension)),
            (b"5;a =b", Err(ChunkError::InvalidExtension)),
            (b"5;a= b", Err(ChunkError::InvalidExtension)),
            (b"5;a=b ", Err(ChunkError::InvalidExtension)),
            // `;` must be followed by a token.
            (b"5;", Err(ChunkError::InvalidExtension)),
            (b"5;;a", Err(ChunkError::InvalidExtension)),
            (b"5;=x", Err(ChunkError::InvalidExtension)),
            (b"5;bad[=x", Err(ChunkError::InvalidExtension)),
            (b"5;a=", Err(ChunkError::InvalidExtension)),
            (b"5;a=b=c", Err(ChunkError::InvalidExtension)),
            (b"5;a=[", Err(ChunkError::InvalidExtension)),
            (b"5;a=\"x\"y", Err(ChunkError::InvalidExtension)),
            (b"5;a=\"x", Err(ChunkError::InvalidExtension)),
            (b"5,a", Err(ChunkError::InvalidSize)),
            // No control bytes.
            (b"5;\x00ext", Err(ChunkError::InvalidExtension)),
            (b"5;e\x00xt", Err(ChunkError::InvalidExtension)),
            (b"5;a=\"\x00\"", Err(ChunkError::InvalidExtension)),
            (b"5;a=\"\x7f\"", Err(ChunkError::InvalidExtension)),
            (b"5;a=\"\\\x01\"", Err(ChunkError::InvalidExtension)),
            (b"5\x00", Err(ChunkError::InvalidSize)),
            (b"5;a=\"x\ry\"", Err(ChunkError::InvalidExtension)),
            (b"5;a=\"x\ny\"", Err(ChunkError::BadLineEnding)),
            (b"5;a\n", Err(ChunkError::BadLineEnding)),
        ];
        for (line, want) in cases {
            let mut body = line.to_vec();
            body.extend_from_slice(b"\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n");
            let got = run(&body).map(|(out, n, done)| {
                assert_eq!((out.as_slice(), done), (&b"hello"[..], true), "{:?}", String::from_utf8_lossy(line));
                assert_eq!(&body[n..], b"GET / HTTP/1.1\r\n\r\n");
            });
            assert_eq!(got, *want, "{:?}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn limits() {
        let ext = format!("1;{}\r\n", "e".repeat(MAX_EXTENSION_BYTES + 1));
        assert_eq!(run(ext.as_bytes()).map(|_| ()), Err(ChunkError::ExtensionsTooLarge));
        let tr = format!("0\r\nX: {}\r\n", "t".repeat(MAX_TRAILER_BYTES));
        assert_eq!(run(tr.as_bytes()).map(|_| ()), Err(ChunkError::TrailersTooLarge));
        let mut d = ChunkedDecoder::new(4);
        assert_eq!(d.decode(b"3\r\nabc\r\n2\r\n", &mut Vec::new()), Err(ChunkError::BodyTooLarge));
    }

    #[test]
    fn every_split_gives_the_same_result() {
        let input = b"5;x=y\r\nhello\r\n1;q=\"a\\\"b\"\r\n!\r\n0\r\nT: v\r\n\r\nNEXT";
        let whole = run(input).unwrap();
        for cut in 0..=whole.1 {
            let mut d = ChunkedDecoder::new(1 << 20);
            let mut out = Vec::new();
            let a = d.decode(&input[..cut], &mut out).unwrap();
            assert_eq!(a, cut);
            let b = d.decode(&input[cut..], &mut out).unwrap();
            assert_eq!((out.clone(), a + b, d.is_done()), whole, "cut {cut}");
        }
    }
}
