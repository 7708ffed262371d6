//! The RFC 6455 §4.2 server handshake: validate the upgrade request, answer `101` with the
//! accept key. No subprotocol and no extension (permessage-deflate) is offered.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

use crate::http::framing::Framing;
use crate::http::head::Head;
use crate::http::response::push_header;

/// The GUID appended to the key (RFC 6455 §1.3).
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why an upgrade request was refused. Each variant names one rule of RFC 6455 §4.2.1;
/// the OpenAI surface maps them to HTTP answers (`openai::ApiError::from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    /// Not GET (§4.2.1 item 1).
    Method,
    /// Older than HTTP/1.1 (§4.2.1 item 1).
    Version,
    /// `Upgrade` is not `websocket` (item 3).
    Upgrade,
    /// `Connection` lacks the `upgrade` token (item 4).
    Connection,
    /// `Sec-WebSocket-Key` missing, or not base64 of 16 bytes (item 5).
    Key,
    /// `Sec-WebSocket-Version` is not 13 (item 6; answered 426, §4.4).
    WsVersion,
    /// The request announces a body, which would be read as frames.
    Body,
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HandshakeError::Method => "a WebSocket upgrade must be a GET request",
            HandshakeError::Version => "a WebSocket upgrade needs HTTP/1.1 or later",
            HandshakeError::Upgrade => "Upgrade must be websocket",
            HandshakeError::Connection => "Connection must include the upgrade token",
            HandshakeError::Key => "Sec-WebSocket-Key must be the base64 encoding of 16 bytes",
            HandshakeError::WsVersion => "unsupported Sec-WebSocket-Version: this server speaks version 13",
            HandshakeError::Body => "a WebSocket upgrade request must not have a body",
        })
    }
}

/// `Sec-WebSocket-Accept` for `key` (§4.2.2 item 5.4): base64(SHA-1(key ‖ GUID)).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    STANDARD.encode(h.finalize())
}

/// Check an upgrade request (§4.2.1).
pub fn validate(head: &Head) -> Result<&str, HandshakeError> {
    if head.method != "GET" {
        return Err(HandshakeError::Method);
    }
    if head.minor < 1 {
        return Err(HandshakeError::Version);
    }
    if !head.upgrade.as_deref().is_some_and(|u| u.split(',').any(|t| t.trim().eq_ignore_ascii_case("websocket"))) {
        return Err(HandshakeError::Upgrade);
    }
    if !head.connection_upgrade {
        return Err(HandshakeError::Connection);
    }
    if !matches!(head.body, None | Some(Framing::None)) {
        return Err(HandshakeError::Body);
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(HandshakeError::WsVersion);
    }
    let key = head.ws_key.as_deref().ok_or(HandshakeError::Key)?;
    match STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => Ok(key),
        _ => Err(HandshakeError::Key),
    }
}

impl std::error::Error for HandshakeError {}

/// Validate an upgrade request: the `101` response bytes, or the rule it breaks.
pub fn accept(head: &Head) -> Result<Vec<u8>, HandshakeError> {
    let key = validate(head)?;
    let mut out = Vec::with_capacity(160);
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n");
    push_header(&mut out, "Upgrade", b"websocket");
    push_header(&mut out, "Connection", b"Upgrade");
    push_header(&mut out, "Sec-WebSocket-Accept", accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::head;

    const OK: &str = "GET / HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                      Origin: http://example.com\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn parse(s: &str) -> Head {
        head::parse(s.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn rfc6455_1_3_accept_key() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let resp = String::from_utf8(accept(&parse(OK)).unwrap()).unwrap();
        assert!(resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!resp.to_ascii_lowercase().contains("sec-websocket-extensions"));
        assert!(resp.ends_with("\r\n\r\n"));
    }

    #[test]
    fn each_rule_refuses() {
        let cases = [
            ("GET / HTTP/1.1", "GET / HTTP/1.0", HandshakeError::Version),
            ("Upgrade: websocket", "Upgrade: h2c", HandshakeError::Upgrade),
            ("Connection: Upgrade", "Connection: keep-alive", HandshakeError::Connection),
            ("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8", HandshakeError::WsVersion),
            ("Sec-WebSocket-Version: 13\r\n", "", HandshakeError::WsVersion),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ", HandshakeError::Key),
            ("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZSE=", HandshakeError::Key),
            ("dGhlIHNhbXBsZSBub25jZQ==", "not base64!", HandshakeError::Key),
            ("Origin", "Content-Length: 5\r\nOrigin", HandshakeError::Body),
        ];
        for (from, to, want) in cases {
            let req = OK.replacen(from, to, 1);
            assert_eq!(validate(&parse(&req)), Err(want), "{req}");
        }
        let missing_key = OK.replacen("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "", 1);
        assert_eq!(validate(&parse(&missing_key)), Err(HandshakeError::Key));
        let post = OK.replacen("GET", "POST", 1);
        assert_eq!(validate(&parse(&post)), Err(HandshakeError::Method));
        // Token lists and case are accepted.
        let lists = OK.replacen("Connection: Upgrade", "Connection: keep-alive, UPGRADE", 1);
        assert!(validate(&parse(&lists)).is_ok());
    }
}
