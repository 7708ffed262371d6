//! Strict chunked body decoder (RFC 9112 §7.1), byte-at-a-time so that any split of the input
//! gives the same result.
//!
//! Refused, unlike httparse's `parse_chunk_size`: an empty size line, a bare LF anywhere in a
//! chunk line or after chunk data, sizes that overflow, and extensions or trailers over 16 KiB.

use std::fmt;

/// Largest total of chunk-extension bytes (hyper uses the same bound).
pub const MAX_EXTENSION_BYTES: usize = 16 * 1024;
/// Largest trailer section.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Why a chunked body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// A size line with no hex digit, or a non-hex character in it.
    InvalidSize,
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
    /// Whitespace after the size (BWS before `;`).
    SizeWs,
    /// Inside `;ext…` up to CR.
    Ext,
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
                (State::Size | State::SizeWs, b' ' | b'\t') => State::SizeWs,
                (State::Size | State::SizeWs, b';') => State::Ext,
                (State::Size | State::SizeWs, b'\r') => State::SizeLf,
                (State::Size | State::SizeWs | State::Ext, b'\n') => return Err(ChunkError::BadLineEnding),
                (State::Size | State::SizeWs, _) => return Err(ChunkError::InvalidSize),
                (State::Ext, b'\r') => State::SizeLf,
                (State::Ext, _) => {
                    self.ext_bytes += 1;
                    if self.ext_bytes > MAX_EXTENSION_BYTES {
                        return Err(ChunkError::ExtensionsTooLarge);
                    }
                    State::Ext
                }
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
            run(b"5;a=b\r\nhello\r\n6 ; x\r\n world\r\n0\r\n\r\nGET").unwrap(),
            (b"hello world".to_vec(), 34, true)
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
        let input = b"5;x=y\r\nhello\r\n1\r\n!\r\n0\r\nT: v\r\n\r\nNEXT";
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
