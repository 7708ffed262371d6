//! The upstream HTTP/1.1 client codec: what the worker-side client writes and reads.
//!
//! The pieces are pure: [`BaseUrl`] parsing (in `http::url`), [`encode_request`] (header lines
//! through the writer the server's responses use, `http::response::push_header`) and
//! [`parse_head`] (status line and headers through httparse, framing decided by
//! `http::framing` in its response role). The body is read with `http::framing::BodyDecoder`,
//! the same decoder the server reads request bodies with. The connections, their pool and TLS
//! live in `agent::backend::client`; no socket or clock here.

use std::fmt;
use std::io;
use std::time::Duration;

use super::framing::{Framing, FramingError, FramingFields, Role};
use super::response::{push_content_length, push_header};
pub use super::url::{BaseUrl, UrlError};
use crate::http::chunked::ChunkError;

/// Largest response head accepted from an upstream.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers in a response head.
const MAX_HEADERS: usize = 64;

/// Why talking to an upstream failed. `Display` says what happened, without the upstream's
/// address (the backend prefixes it).
#[derive(Debug)]
pub enum UpstreamError {
    /// No address for the host.
    Resolve(io::Error),
    /// Every address refused or failed.
    Connect(io::Error),
    /// No connection within the connect timeout.
    ConnectTimeout(Duration),
    /// Writing the request failed.
    Write(io::Error),
    /// Reading failed.
    Read(io::Error),
    /// Nothing arrived for the read timeout.
    ReadTimeout(Duration),
    /// The connection closed before a complete response head.
    ClosedBeforeHead,
    /// The connection closed before the body's framing said it was complete.
    ClosedMidBody,
    /// The response head is not HTTP/1.x.
    BadHead(httparse::Error),
    /// The response head is over [`MAX_HEAD`].
    HeadTooLarge,
    /// A framing header that cannot be honoured (unknown transfer coding, bad or conflicting
    /// `Content-Length`).
    BadFraming(FramingError),
    /// The chunked body is malformed.
    Chunked(ChunkError),
    /// The TLS handshake or a TLS record failed (certificate problems included).
    Tls(String),
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Resolve(e) => write!(f, "cannot resolve host: {e}"),
            UpstreamError::Connect(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                f.write_str("connection refused")
            }
            UpstreamError::Connect(e) => write!(f, "cannot connect: {e}"),
            UpstreamError::ConnectTimeout(d) => {
                write!(f, "no connection within {} ms (connectTimeoutMs)", d.as_millis())
            }
            UpstreamError::Write(e) => write!(f, "sending the request failed: {e}"),
            UpstreamError::Read(e) => write!(f, "reading the response failed: {e}"),
            UpstreamError::ReadTimeout(d) => {
                write!(f, "no data for {} ms (readTimeoutMs)", d.as_millis())
            }
            UpstreamError::ClosedBeforeHead => f.write_str("connection closed before a response"),
            UpstreamError::ClosedMidBody => f.write_str("connection closed in the middle of the response body"),
            UpstreamError::BadHead(e) => write!(f, "malformed response head: {e}"),
            UpstreamError::HeadTooLarge => write!(f, "response head larger than {MAX_HEAD} bytes"),
            UpstreamError::BadFraming(m) => write!(f, "malformed response framing: {m}"),
            UpstreamError::Chunked(e) => write!(f, "malformed chunked response body: {e}"),
            UpstreamError::Tls(m) => write!(f, "TLS: {m}"),
        }
    }
}

impl std::error::Error for UpstreamError {}

/// Append a complete request for `base.path + suffix` with `headers` and `body` to `out`.
/// `Host` and `Content-Length` are added here. The connection is left to keep-alive: a run that
/// must stop the upstream's work closes it instead.
pub fn encode_request<'a>(
    out: &mut Vec<u8>,
    base: &BaseUrl,
    suffix: &str,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    body: &[u8],
) {
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(base.path.as_bytes());
    out.extend_from_slice(suffix.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(out, "Host", base.authority.as_bytes());
    for (k, v) in headers {
        push_header(out, k, v.as_bytes());
    }
    push_content_length(out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// A parsed response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Body framing.
    pub framing: Framing,
    /// `Content-Type`, lower-cased, parameters dropped.
    pub content_type: Option<String>,
    /// The upstream lets the connection carry another request after this response (HTTP/1.1
    /// without `Connection: close`, and not framed by both `Content-Length` and
    /// `Transfer-Encoding`).
    pub keep_alive: bool,
}

/// Parse a response head at the start of `buf`: `Ok(None)` when more bytes are needed, else the
/// head and its length. Interim 1xx responses are skipped (their length is included).
pub fn parse_head(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, UpstreamError> {
    let mut skipped = 0;
    loop {
        let buf = &buf[skipped..];
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if skipped + buf.len() > MAX_HEAD => {
                return Err(UpstreamError::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(UpstreamError::HeadTooLarge),
            Err(e) => return Err(UpstreamError::BadHead(e)),
        };
        let status = resp.code.unwrap_or(0);
        if (100..200).contains(&status) {
            skipped += n;
            continue;
        }
        let mut fields = FramingFields::default();
        let mut content_type = None;
        let mut keep_alive = resp.version == Some(1);
        for h in resp.headers.iter() {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                fields.transfer_encoding(h.value).map_err(UpstreamError::BadFraming)?;
            } else if h.name.eq_ignore_ascii_case("content-length") {
                fields.content_length(h.value).map_err(UpstreamError::BadFraming)?;
            } else if h.name.eq_ignore_ascii_case("connection") {
                if value.split(',').any(|o| o.trim().eq_ignore_ascii_case("close")) {
                    keep_alive = false;
                }
            } else if h.name.eq_ignore_ascii_case("content-type") {
                let ct = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
                content_type = Some(ct);
            }
        }
        let framing = fields.decide(Role::Response { status }).map_err(UpstreamError::BadFraming)?;
        // RFC 9112 §6.3 p.3: such a response may be an attempt at response splitting.
        keep_alive &= !fields.length_and_chunked();
        return Ok(Some((ResponseHead { status, framing, content_type, keep_alive }, skipped + n)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bytes() {
        let u = BaseUrl::parse("http://h:1/v1").unwrap();
        let mut out = Vec::new();
        encode_request(&mut out, &u, "/chat/completions", [("Accept", "text/event-stream")], b"{}");
        assert_eq!(
            out,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h:1\r\nAccept: text/event-stream\r\n\
              Content-Length: 2\r\n\r\n{}"
        );
    }

    fn head(s: &str) -> Result<Option<(ResponseHead, usize)>, UpstreamError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn response_heads() {
        let s = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\nrest";
        let (h, n) = head(s).unwrap().unwrap();
        assert_eq!(n, s.len() - 4);
        assert_eq!(
            h,
            ResponseHead {
                status: 200,
                framing: Framing::Chunked,
                content_type: Some("text/event-stream".into()),
                keep_alive: true
            }
        );
        let (h, _) = head("HTTP/1.0 404 Not Found\r\nContent-Length: 5, 5\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.status, h.framing, h.keep_alive), (404, Framing::Length(5), false));
        let (h, _) =
            head("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let (h, _) = head("HTTP/1.1 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.framing, Framing::CloseDelimited);
        // Transfer-Encoding wins over Content-Length, and such a connection is not reused.
        let (h, _) =
            head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        // Interim responses are skipped.
        let (h, n) = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.status, h.framing, n), (204, Framing::None, 52));
        assert!(head("HTTP/1.1 200 OK\r\nContent-").unwrap().is_none());
        assert!(head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2").unwrap().is_none());
        for bad in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding:\r\n\r\n",
        ] {
            assert!(matches!(head(bad), Err(UpstreamError::BadFraming(_))), "{bad:?}");
        }
        assert!(matches!(head("SSH-2.0-OpenSSH\r\n\r\n"), Err(UpstreamError::BadHead(_))));
        let big = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD));
        assert!(matches!(head(&big), Err(UpstreamError::HeadTooLarge)));
    }
}
