//! The RFC 6455 §5 frame codec, server side.
//!
//! [`Decoder`] is a push parser: give it whatever bytes arrived, it consumes what it can and
//! returns at most one complete [`Message`] per call. Data frame payloads are unmasked and
//! checked as they stream in, so an invalid UTF-8 prefix or an oversized message fails before the
//! rest arrives (RFC 6455 §8.1 "fail fast"), and memory is bounded by the message limit, not by
//! what a peer announces. Encoding ([`encode`], [`encode_close`]) writes unmasked, unfragmented
//! server frames (§5.1). No extension is negotiated, so every RSV bit must be 0.

use std::fmt;

use super::utf8::Utf8Validator;

/// Frame opcodes (RFC 6455 §5.2, §11.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: UTF-8 text.
    Text,
    /// 0x2: binary data.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// The opcode for the low nibble `b`; `None` for the reserved values 0x3–0x7 and 0xB–0xF.
    pub fn from_u8(b: u8) -> Option<OpCode> {
        Some(match b {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong (RFC 6455 §5.5).
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Close status codes (RFC 6455 §7.4.1) the server sends.
pub mod close {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// A data type the endpoint cannot accept (binary messages here).
    pub const UNSUPPORTED: u16 = 1003;
    /// Text that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// A policy violation (auth, slow consumer).
    pub const POLICY: u16 = 1008;
    /// A message over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// An unexpected condition on the server.
    pub const INTERNAL: u16 = 1011;
}

/// Whether `code` may appear in a close frame (RFC 6455 §7.4.1, §7.4.2, IANA registry):
/// 1000–1003, 1007–1014 and the application ranges 3000–4999. 1004 is reserved; 1005, 1006 and
/// 1015 must never be sent on the wire; 0–999, 1016–2999 and 5000+ are not assigned.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Why a client's byte stream is not valid RFC 6455. Each variant names one rule;
/// [`ProtocolError::close_code`] is the one place that maps them to close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// A client frame without the MASK bit (§5.1: the server must fail the connection).
    Unmasked,
    /// An RSV bit set with no extension negotiated (§5.2).
    ReservedBits,
    /// An opcode from the reserved ranges (§5.2).
    UnknownOpcode(u8),
    /// A control frame with a payload over 125 bytes (§5.5).
    ControlTooLong,
    /// A control frame without FIN (§5.5: control frames must not be fragmented).
    ControlFragmented,
    /// A 64-bit length with the most significant bit set (§5.2).
    LengthHighBit,
    /// A length not in its shortest encoding (§5.2: "the minimal number of bytes MUST be used").
    NonMinimalLength,
    /// A continuation frame with no fragmented message in progress (§5.4).
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is still open (§5.4).
    ExpectedContinuation,
    /// A text message, or a close reason, that is not UTF-8 (§8.1).
    InvalidUtf8,
    /// A message larger than the configured limit (§7.4.1 code 1009).
    MessageTooLarge,
    /// A close frame with a 1-byte payload (§5.5.1: a body starts with a 2-byte code).
    CloseTooShort,
    /// A close code that may not be sent (§7.4).
    InvalidCloseCode(u16),
}

impl ProtocolError {
    /// The close code to fail the connection with (§7.4.1).
    pub fn close_code(self) -> u16 {
        match self {
            ProtocolError::InvalidUtf8 => close::INVALID_DATA,
            ProtocolError::MessageTooLarge => close::TOO_BIG,
            _ => close::PROTOCOL,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::Unmasked => f.write_str("client frame is not masked"),
            ProtocolError::ReservedBits => f.write_str("reserved bits set without an extension"),
            ProtocolError::UnknownOpcode(o) => write!(f, "reserved opcode {o:#x}"),
            ProtocolError::ControlTooLong => f.write_str("control frame payload over 125 bytes"),
            ProtocolError::ControlFragmented => f.write_str("fragmented control frame"),
            ProtocolError::LengthHighBit => f.write_str("64-bit payload length has its high bit set"),
            ProtocolError::NonMinimalLength => f.write_str("payload length not minimally encoded"),
            ProtocolError::UnexpectedContinuation => f.write_str("continuation frame without a message"),
            ProtocolError::ExpectedContinuation => f.write_str("new message before the fragmented one ended"),
            ProtocolError::InvalidUtf8 => f.write_str("invalid UTF-8 in text"),
            ProtocolError::MessageTooLarge => f.write_str("message too large"),
            ProtocolError::CloseTooShort => f.write_str("close frame payload of 1 byte"),
            ProtocolError::InvalidCloseCode(c) => write!(f, "invalid close code {c}"),
        }
    }
}

impl std::error::Error for ProtocolError {}

/// A parsed frame header (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN bit.
    pub fin: bool,
    /// RSV1–3 as the low three bits.
    pub rsv: u8,
    /// The raw opcode nibble.
    pub opcode: u8,
    /// The masking key, when the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
}

/// Parse a frame header from the start of `buf` with only the rules that concern the header's
/// own encoding (§5.2: 64-bit length high bit, minimal length). `Ok(None)`: more bytes needed;
/// `Ok(Some((header, n)))`: the header took `n` bytes.
pub fn parse_header(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let (len, mut n) = match b1 & 0x7f {
        126 => {
            let Some(b) = buf.get(2..4) else { return Ok(None) };
            let l = u16::from_be_bytes([b[0], b[1]]) as u64;
            if l < 126 {
                return Err(ProtocolError::NonMinimalLength);
            }
            (l, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else { return Ok(None) };
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let l = u64::from_be_bytes(a);
            if l >> 63 != 0 {
                return Err(ProtocolError::LengthHighBit);
            }
            if l <= 0xffff {
                return Err(ProtocolError::NonMinimalLength);
            }
            (l, 10)
        }
        l => (l as u64, 2),
    };
    let mask = if masked {
        let Some(b) = buf.get(n..n + 4) else { return Ok(None) };
        n += 4;
        Some([b[0], b[1], b[2], b[3]])
    } else {
        None
    };
    Ok(Some((FrameHeader { fin: b0 & 0x80 != 0, rsv: (b0 >> 4) & 0x7, opcode: b0 & 0x0f, mask, len }, n)))
}

/// XOR `data` with `key`, starting at key position `pos` (§5.3). Returns the next position.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], pos: usize) -> usize {
    // Rotate the key so that the word loop can start at index 0.
    let k = [key[pos & 3], key[(pos + 1) & 3], key[(pos + 2) & 3], key[(pos + 3) & 3]];
    let word = u32::from_ne_bytes(k);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= k[i];
    }
    (pos + data.len()) & 3
}

/// A close frame's body (§5.5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// Status code.
    pub code: u16,
    /// UTF-8 reason.
    pub reason: String,
}

/// A complete message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (validated UTF-8).
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A ping with its application data.
    Ping(Vec<u8>),
    /// A pong.
    Pong(Vec<u8>),
    /// A close frame; `None` when it carried no status code.
    Close(Option<CloseFrame>),
}

/// Parse a close frame payload (§5.5.1, §7.4).
pub fn parse_close(p: &[u8]) -> Result<Option<CloseFrame>, ProtocolError> {
    match p.len() {
        0 => Ok(None),
        1 => Err(ProtocolError::CloseTooShort),
        _ => {
            let code = u16::from_be_bytes([p[0], p[1]]);
            if !valid_close_code(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(&p[2..]).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some(CloseFrame { code, reason: reason.to_string() }))
        }
    }
}

enum Stage {
    /// Waiting for (the rest of) a frame header.
    Header,
    /// Reading a payload: `left` bytes to go, masked with `key` from position `pos`.
    Payload { op: OpCode, fin: bool, left: u64, key: [u8; 4], pos: usize },
}

/// The fragmented data message being assembled.
struct Partial {
    text: bool,
    data: Vec<u8>,
    utf8: Utf8Validator,
}

/// Incremental decoder for the client-to-server direction (§5, §6.2).
pub struct Decoder {
    max_message: usize,
    stage: Stage,
    msg: Option<Partial>,
    control: Vec<u8>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Decoder(max_message={})", self.max_message)
    }
}

impl Decoder {
    /// A decoder accepting messages of at most `max_message` payload bytes.
    pub fn new(max_message: usize) -> Self {
        Decoder { max_message, stage: Stage::Header, msg: None, control: Vec::new() }
    }

    /// Change the message limit (it grows once a client has authenticated).
    pub fn set_max_message(&mut self, max: usize) {
        self.max_message = max;
    }

    /// Consume bytes from `buf`. Returns how many were consumed and the message they completed,
    /// if any; call again with the rest while it returns a message. An error means the
    /// connection must be failed with [`ProtocolError::close_code`]; the decoder then drops the
    /// message it was assembling and expects a frame header next, so that a caller still looking
    /// for the peer's close frame never feeds a broken message further.
    pub fn decode(&mut self, buf: &[u8]) -> Result<(usize, Option<Message>), ProtocolError> {
        let r = self.decode_frames(buf);
        if r.is_err() {
            self.stage = Stage::Header;
            self.msg = None;
            self.control.clear();
        }
        r
    }

    fn decode_frames(&mut self, buf: &[u8]) -> Result<(usize, Option<Message>), ProtocolError> {
        let mut pos = 0;
        loop {
            match self.stage {
                Stage::Header => {
                    let Some((h, n)) = parse_header(&buf[pos..])? else { return Ok((pos, None)) };
                    pos += n;
                    let (op, key) = self.check(&h)?;
                    self.stage = Stage::Payload { op, fin: h.fin, left: h.len, key, pos: 0 };
                    if h.len == 0
                        && let Some(m) = self.frame_done(op, h.fin)?
                    {
                        return Ok((pos, Some(m)));
                    }
                }
                Stage::Payload { op, fin, left, key, pos: mpos } => {
                    let avail = buf.len() - pos;
                    if avail == 0 {
                        return Ok((pos, None));
                    }
                    let take = left.min(avail as u64) as usize;
                    let chunk = &buf[pos..pos + take];
                    pos += take;
                    let next = if op.is_control() {
                        let start = self.control.len();
                        self.control.extend_from_slice(chunk);
                        apply_mask(&mut self.control[start..], key, mpos)
                    } else {
                        let Some(m) = self.msg.as_mut() else { return Err(ProtocolError::UnexpectedContinuation) };
                        let start = m.data.len();
                        m.data.extend_from_slice(chunk);
                        let next = apply_mask(&mut m.data[start..], key, mpos);
                        if m.text && m.utf8.feed(&m.data[start..]).is_err() {
                            return Err(ProtocolError::InvalidUtf8);
                        }
                        next
                    };
                    let left = left - take as u64;
                    self.stage = Stage::Payload { op, fin, left, key, pos: next };
                    if left == 0
                        && let Some(m) = self.frame_done(op, fin)?
                    {
                        return Ok((pos, Some(m)));
                    }
                }
            }
        }
    }

    /// Header rules that depend on the connection's state (§5.1–§5.5).
    fn check(&mut self, h: &FrameHeader) -> Result<(OpCode, [u8; 4]), ProtocolError> {
        if h.rsv != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let op = OpCode::from_u8(h.opcode).ok_or(ProtocolError::UnknownOpcode(h.opcode))?;
        let key = h.mask.ok_or(ProtocolError::Unmasked)?;
        if op.is_control() {
            if !h.fin {
                return Err(ProtocolError::ControlFragmented);
            }
            if h.len > 125 {
                return Err(ProtocolError::ControlTooLong);
            }
            self.control.clear();
            return Ok((op, key));
        }
        let so_far = match (op, &self.msg) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Continuation, Some(m)) => m.data.len(),
            (_, Some(_)) => return Err(ProtocolError::ExpectedContinuation),
            (_, None) => 0,
        };
        if h.len > self.max_message.saturating_sub(so_far) as u64 {
            return Err(ProtocolError::MessageTooLarge);
        }
        if self.msg.is_none() {
            self.msg = Some(Partial { text: op == OpCode::Text, data: Vec::new(), utf8: Utf8Validator::default() });
        }
        Ok((op, key))
    }

    /// A frame's payload is complete: produce a message when it completed one.
    fn frame_done(&mut self, op: OpCode, fin: bool) -> Result<Option<Message>, ProtocolError> {
        self.stage = Stage::Header;
        let m = match op {
            OpCode::Ping => Message::Ping(std::mem::take(&mut self.control)),
            OpCode::Pong => Message::Pong(std::mem::take(&mut self.control)),
            OpCode::Close => {
                let c = parse_close(&self.control)?;
                self.control.clear();
                Message::Close(c)
            }
            _ if !fin => return Ok(None),
            _ => {
                let Some(p) = self.msg.take() else { return Err(ProtocolError::UnexpectedContinuation) };
                if p.text {
                    if !p.utf8.is_complete() {
                        return Err(ProtocolError::InvalidUtf8);
                    }
                    Message::Text(String::from_utf8(p.data).map_err(|_| ProtocolError::InvalidUtf8)?)
                } else {
                    Message::Binary(p.data)
                }
            }
        };
        Ok(Some(m))
    }
}

/// Append one unmasked, final frame (§5.2; server frames are never masked, §5.1).
pub fn encode(out: &mut Vec<u8>, op: OpCode, payload: &[u8]) {
    push_header(out, 0x80 | op.as_u8(), payload.len(), None);
    out.extend_from_slice(payload);
}

/// Append a client frame: first byte `b0` as given (FIN, RSV bits, opcode), `payload` masked with
/// `key` (§5.3). The gateway never sends one; tests and fuzz targets play the client with it.
pub fn encode_masked(out: &mut Vec<u8>, b0: u8, payload: &[u8], key: [u8; 4]) {
    push_header(out, b0, payload.len(), Some(key));
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key, 0);
}

/// The frame header: first byte, the shortest length form (§5.2), the mask key if any.
fn push_header(out: &mut Vec<u8>, b0: u8, n: usize, key: Option<[u8; 4]>) {
    let m = if key.is_some() { 0x80 } else { 0 };
    out.push(b0);
    if n < 126 {
        out.push(m | n as u8);
    } else if n <= 0xffff {
        out.push(m | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    if let Some(k) = key {
        out.extend_from_slice(&k);
    }
}

/// Append a close frame with `code` and `reason` (cut to fit the 125-byte control limit on a
/// character boundary); `code` `None` sends an empty close body (§5.5.1).
pub fn encode_close(out: &mut Vec<u8>, code: Option<u16>, reason: &str) {
    let Some(code) = code else { return encode(out, OpCode::Close, &[]) };
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut p = Vec::with_capacity(2 + end);
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&reason.as_bytes()[..end]);
    encode(out, OpCode::Close, &p);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, with a raw first byte so tests can set any bit.
    fn raw(b0: u8, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
        let mut v = Vec::new();
        encode_masked(&mut v, b0, payload, key);
        v
    }

    fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        raw(if fin { 0x80 } else { 0 } | op, payload, [0x37, 0xfa, 0x21, 0x3d])
    }

    /// Decode `bytes` completely, collecting messages, or the first error.
    fn all(d: &mut Decoder, bytes: &[u8]) -> Result<Vec<Message>, ProtocolError> {
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let (n, m) = d.decode(&bytes[pos..])?;
            pos += n;
            match m {
                Some(m) => out.push(m),
                None => return Ok(out),
            }
        }
    }

    fn one(bytes: &[u8]) -> Result<Vec<Message>, ProtocolError> {
        all(&mut Decoder::new(1 << 20), bytes)
    }

    #[test]
    fn rfc6455_5_7_examples() {
        // "A single-frame masked text message" (§5.7).
        let b = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(one(&b), Ok(vec![Message::Text("Hello".into())]));
        // "A single-frame unmasked text message" comes from a server: a server must refuse it.
        assert_eq!(one(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]), Err(ProtocolError::Unmasked));
        // "A fragmented unmasked text message", here masked: "Hel" + "lo".
        let mut v = frame(false, 1, b"Hel");
        v.extend(frame(true, 0, b"lo"));
        assert_eq!(one(&v), Ok(vec![Message::Text("Hello".into())]));
        // "Unmasked Ping request and masked Ping response": we encode the unmasked direction.
        let mut out = Vec::new();
        encode(&mut out, OpCode::Pong, b"Hello");
        assert_eq!(out, [0x8a, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        // "256 bytes binary message in a single unmasked frame" / "64KiB": length encodings.
        out.clear();
        encode(&mut out, OpCode::Binary, &[0u8; 256]);
        assert_eq!(&out[..4], [0x82, 0x7e, 0x01, 0x00]);
        out.clear();
        encode(&mut out, OpCode::Binary, &vec![0u8; 65536]);
        assert_eq!(&out[..10], [0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(out.len(), 10 + 65536);
    }

    #[test]
    fn byte_at_a_time_equals_all_at_once() {
        let mut v = frame(false, 1, "héllo ".as_bytes());
        v.extend(frame(true, 9, b"ping!"));
        v.extend(frame(true, 0, "wörld €𝄞".as_bytes()));
        v.extend(frame(true, 2, &[1, 2, 3]));
        let whole = one(&v).unwrap();
        let mut d = Decoder::new(1 << 20);
        let mut got = Vec::new();
        let mut buf = Vec::new();
        for b in v {
            buf.push(b);
            let (n, m) = d.decode(&buf).unwrap();
            buf.drain(..n);
            got.extend(m);
        }
        assert_eq!(got, whole);
        assert_eq!(
            whole,
            vec![
                Message::Ping(b"ping!".to_vec()),
                Message::Text("héllo wörld €𝄞".into()),
                Message::Binary(vec![1, 2, 3])
            ]
        );
    }

    #[test]
    fn header_rules_each_fail() {
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (raw(0x80 | 0x40 | 1, b"x", [1, 2, 3, 4]), ProtocolError::ReservedBits),
            (raw(0x80 | 0x20 | 1, b"x", [1, 2, 3, 4]), ProtocolError::ReservedBits),
            (raw(0x80 | 0x10 | 1, b"x", [1, 2, 3, 4]), ProtocolError::ReservedBits),
            (frame(true, 3, b""), ProtocolError::UnknownOpcode(3)),
            (frame(true, 7, b""), ProtocolError::UnknownOpcode(7)),
            (frame(true, 0xb, b""), ProtocolError::UnknownOpcode(0xb)),
            (frame(true, 0xf, b""), ProtocolError::UnknownOpcode(0xf)),
            (frame(true, 9, &[0; 126]), ProtocolError::ControlTooLong),
            (frame(false, 9, b""), ProtocolError::ControlFragmented),
            (frame(false, 8, b""), ProtocolError::ControlFragmented),
            (frame(true, 0, b"x"), ProtocolError::UnexpectedContinuation),
            (frame(true, 8, &[3]), ProtocolError::CloseTooShort),
            (vec![0x81, 0x05, b'h', b'e', b'l', b'l', b'o'], ProtocolError::Unmasked),
            (vec![0x81, 0xfe, 0, 125, 0, 0, 0, 0], ProtocolError::NonMinimalLength),
            (vec![0x82, 0xff, 0, 0, 0, 0, 0, 0, 0xff, 0xff], ProtocolError::NonMinimalLength),
            (vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0], ProtocolError::LengthHighBit),
        ];
        for (bytes, want) in cases {
            assert_eq!(one(&bytes), Err(want), "{bytes:02x?}");
        }
        let mut v = frame(false, 1, b"a");
        v.extend(frame(true, 1, b"b"));
        assert_eq!(one(&v), Err(ProtocolError::ExpectedContinuation));
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), 1007);
        assert_eq!(ProtocolError::MessageTooLarge.close_code(), 1009);
        assert_eq!(ProtocolError::Unmasked.close_code(), 1002);
    }

    #[test]
    fn control_frames_interleave_with_fragments() {
        let mut v = frame(false, 1, b"frag");
        v.extend(frame(true, 9, b""));
        v.extend(frame(false, 0, b"ment"));
        v.extend(frame(true, 10, b"unsolicited"));
        v.extend(frame(true, 0, b"ed"));
        assert_eq!(
            one(&v),
            Ok(vec![Message::Ping(vec![]), Message::Pong(b"unsolicited".to_vec()), Message::Text("fragmented".into())])
        );
        // Empty fragments are fine, including an empty final one.
        let mut v = frame(false, 1, b"");
        v.extend(frame(false, 0, b""));
        v.extend(frame(true, 0, b""));
        assert_eq!(one(&v), Ok(vec![Message::Text(String::new())]));
        // 125 bytes is the largest control payload.
        assert_eq!(one(&frame(true, 9, &[7; 125])), Ok(vec![Message::Ping(vec![7; 125])]));
    }

    #[test]
    fn close_codes() {
        let c = |code: u16, reason: &[u8]| {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason);
            one(&frame(true, 8, &p))
        };
        for ok in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999] {
            assert_eq!(c(ok, b"bye"), Ok(vec![Message::Close(Some(CloseFrame { code: ok, reason: "bye".into() }))]));
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert_eq!(c(bad, b""), Err(ProtocolError::InvalidCloseCode(bad)), "{bad}");
        }
        assert_eq!(c(1000, &[0xce, 0xba, 0xe1, 0xbd]), Err(ProtocolError::InvalidUtf8));
        assert_eq!(one(&frame(true, 8, b"")), Ok(vec![Message::Close(None)]));
        let mut out = Vec::new();
        encode_close(&mut out, Some(1000), &"é".repeat(100));
        assert_eq!(out[1] as usize, out.len() - 2);
        assert!(out.len() - 2 <= 125);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }

    #[test]
    fn utf8_fails_fast_within_and_across_frames() {
        // Invalid byte in the first fragment: fails before the message is complete.
        let mut d = Decoder::new(1 << 20);
        let v = frame(false, 1, &[b'a', 0xff]);
        assert_eq!(d.decode(&v), Err(ProtocolError::InvalidUtf8));
        // Fails on a partial frame: only part of the payload has arrived.
        let mut d = Decoder::new(1 << 20);
        let v = frame(true, 1, &[b'o', b'k', 0xc0, 0xaf, b'x', b'y', b'z']);
        assert_eq!(d.decode(&v[..2 + 4 + 4]), Err(ProtocolError::InvalidUtf8));
        // A code point split across fragments is fine.
        let euro = "€".as_bytes();
        let mut v = frame(false, 1, &euro[..1]);
        v.extend(frame(false, 0, &euro[1..2]));
        v.extend(frame(true, 0, &euro[2..]));
        assert_eq!(one(&v), Ok(vec![Message::Text("€".into())]));
        // Truncated at the end of the message.
        assert_eq!(one(&frame(true, 1, &euro[..2])), Err(ProtocolError::InvalidUtf8));
        // Surrogates and over-long forms, and beyond U+10FFFF.
        for bad in [&[0xed, 0xa0, 0x80][..], &[0xe0, 0x80, 0xaf], &[0xf4, 0x90, 0x80, 0x80], &[0xf8, 0x88]] {
            assert_eq!(one(&frame(true, 1, bad)), Err(ProtocolError::InvalidUtf8), "{bad:02x?}");
        }
        // Binary is not validated.
        assert_eq!(one(&frame(true, 2, &[0xff])), Ok(vec![Message::Binary(vec![0xff])]));
    }

    /// Found by the `ws_conn` fuzz target: after a text message failed on invalid UTF-8 that
    /// completed a code point left open by the previous fragment, a further fragment of the same
    /// message (sent before the peer's close) indexed past the validator's 4-byte buffer.
    #[test]
    fn bytes_after_an_error_start_a_new_frame() {
        let mut d = Decoder::new(1 << 20);
        let mut v = frame(false, 1, b"a\xf0\x90\x80");
        let first = v.len();
        v.extend(frame(false, 0, b"A"));
        let second = v.len();
        v.extend(frame(true, 0, b"B"));
        assert_eq!(d.decode(&v[..first]), Ok((first, None)));
        assert_eq!(d.decode(&v[first..second]), Err(ProtocolError::InvalidUtf8));
        // The message is gone: its next fragment is a continuation of nothing.
        assert_eq!(d.decode(&v[second..]), Err(ProtocolError::UnexpectedContinuation));
        // And a close frame after that is read as one.
        assert_eq!(d.decode(&frame(true, 8, &1000u16.to_be_bytes())).map(|r| r.1.is_some()), Ok(true));
    }

    #[test]
    fn message_limit_counts_all_fragments() {
        let mut d = Decoder::new(10);
        assert_eq!(all(&mut d, &frame(true, 1, &[b'a'; 10])), Ok(vec![Message::Text("a".repeat(10))]));
        let mut v = frame(false, 1, &[b'a'; 6]);
        v.extend(frame(true, 0, &[b'a'; 5]));
        assert_eq!(all(&mut Decoder::new(10), &v), Err(ProtocolError::MessageTooLarge));
        // Refused on the header alone, before any payload arrives.
        let v = frame(true, 2, &[0; 11]);
        assert_eq!(Decoder::new(10).decode(&v[..8]), Err(ProtocolError::MessageTooLarge));
    }

    #[test]
    fn mask_positions() {
        let key = [1, 2, 3, 4];
        let mut whole = *b"abcdefghij";
        apply_mask(&mut whole, key, 0);
        let mut parts = *b"abcdefghij";
        let p = apply_mask(&mut parts[..3], key, 0);
        let p = apply_mask(&mut parts[3..8], key, p);
        apply_mask(&mut parts[8..], key, p);
        assert_eq!(whole, parts);
    }
}
