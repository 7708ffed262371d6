//! Request head parsing and the framing decision (RFC 9112 §2–§6).
//!
//! httparse parses the head; this layer adds the rules httparse leaves to the caller: size limits,
//! bare-LF rejection, `Host`, and the framing decision of `http::framing` (the `Content-Length` /
//! `Transfer-Encoding` grammar shared with the upstream client, in its strict request role). The
//! result is a small owned [`Head`] with only the fields the server uses.

use std::fmt;

use super::framing::{Framing, FramingError, FramingFields, Role};

/// Most headers accepted in one request.
pub const MAX_HEADERS: usize = 64;
/// Largest header section (request line included): beyond → 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Longest request target: beyond → 414.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// The parsed request head.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    /// Method, as sent.
    pub method: String,
    /// Request target, as sent (path and query).
    pub target: String,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// `Connection: close` (or HTTP/1.0 without `keep-alive`).
    pub close: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// `Authorization` value.
    pub authorization: Option<String>,
    /// `x-gatelet-agent-id`.
    pub agent_id: Option<String>,
    /// `x-gatelet-session-key`.
    pub session_key: Option<String>,
    /// `Upgrade` value.
    pub upgrade: Option<String>,
    /// `Connection` has the `upgrade` token.
    pub connection_upgrade: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<String>,
    /// Body framing: [`Framing::None`], [`Framing::Length`] or [`Framing::Chunked`].
    pub body: Option<Framing>,
    /// `Origin` (CORS).
    pub origin: Option<String>,
    /// `Access-Control-Request-Headers` (CORS preflight).
    pub cors_request_headers: Option<String>,
}

impl Head {
    /// The path without the query string. An absolute-form target (`http://host/path`), which a
    /// server must accept (RFC 9112 §3.2.2), is reduced to its path.
    pub fn path(&self) -> &str {
        let mut t = self.target.as_str();
        for scheme in ["http://", "https://"] {
            // Compared as bytes: the target may hold UTF-8, and `scheme.len()` need not fall on a
            // char boundary.
            if t.len() > scheme.len() && t.as_bytes()[..scheme.len()].eq_ignore_ascii_case(scheme.as_bytes()) {
                let rest = &t[scheme.len()..];
                t = rest.find('/').map_or("/", |i| &rest[i..]);
            }
        }
        t.split('?').next().unwrap_or("")
    }
}

/// Why a head was refused. Each variant names one rule; [`HeadError::status`] is the one place
/// that maps them to HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// httparse rejected the syntax (token, header name/value, newline).
    Syntax(&'static str),
    /// The request line is not `method SP request-target SP HTTP-version` with
    /// `HTTP-version = "HTTP/" DIGIT "." DIGIT` (RFC 9112 §3, §2.3): a version such as `HTTP/1`,
    /// `HTTP/01.01`, `HTTP/ 1.1` or `http/1.1`, or a space inside the target.
    RequestLine,
    /// A well-formed version whose major is not 1 (RFC 9110 §15.6.6: 505).
    VersionNotSupported,
    /// A `Host` value that is not `uri-host [ ":" port ]` (RFC 9112 §3.2, RFC 3986 §3.2.2).
    HostValue,
    /// A line ended in LF without CR (RFC 9112 §2.2: we choose to reject).
    BareLf,
    /// Request target over [`MAX_TARGET_BYTES`].
    UriTooLong,
    /// Header section over [`MAX_HEAD_BYTES`] or more than [`MAX_HEADERS`] headers.
    HeadersTooLarge,
    /// HTTP/1.1 without exactly one `Host` (RFC 9112 §3.2).
    Host,
    /// A framing field the request role refuses (`http::framing`).
    Framing(FramingError),
}

impl From<FramingError> for HeadError {
    fn from(e: FramingError) -> Self {
        HeadError::Framing(e)
    }
}

impl HeadError {
    /// HTTP status for this error.
    pub fn status(self) -> u16 {
        match self {
            HeadError::UriTooLong => 414,
            HeadError::HeadersTooLarge => 431,
            HeadError::Framing(FramingError::UnsupportedCoding) => 501,
            HeadError::VersionNotSupported => 505,
            _ => 400,
        }
    }
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = match self {
            HeadError::Syntax(what) => return write!(f, "malformed request head: invalid {what}"),
            HeadError::RequestLine => "malformed request line: expected `method SP target SP HTTP/1.x`",
            HeadError::VersionNotSupported => "unsupported HTTP version: this server speaks HTTP/1.x",
            HeadError::HostValue => "invalid Host: expected host[:port] (no userinfo, path, list or spaces)",
            HeadError::BareLf => "malformed request head: line ends in LF without CR",
            HeadError::UriTooLong => "request target is longer than 8192 bytes",
            HeadError::HeadersTooLarge => {
                "request header section is larger than 16384 bytes or has more than 64 headers"
            }
            HeadError::Host => "HTTP/1.1 request needs exactly one Host header",
            HeadError::Framing(e) => return fmt::Display::fmt(e, f),
        };
        f.write_str(m)
    }
}

/// Parse a request head from the start of `buf`.
///
/// `Ok(None)` means more bytes are needed; `Ok(Some((head, len)))` consumed `len` bytes.
pub fn parse(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    match parse_with(buf) {
        // From `parse_with`, this error only ever means httparse refused the version.
        Err(HeadError::RequestLine) => match classify_version(buf) {
            Version::Partial => partial(buf),
            Version::Malformed => Err(HeadError::RequestLine),
            Version::Unsupported => Err(HeadError::VersionNotSupported),
            Version::LaterMinor(at) => {
                // RFC 9110 §2.5: a later 1.x minor is answered as the highest 1.x we speak. httparse
                // knows only 1.0 and 1.1, so parse a copy that says 1.1 (the same length).
                let mut copy = buf.to_vec();
                copy[at] = b'1';
                parse_with(&copy)
            }
        },
        r => r,
    }
}

/// More bytes are needed, unless the head already exceeds the limits.
fn partial(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    if buf.len() > MAX_HEAD_BYTES {
        let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(buf.len());
        return Err(if line_end > MAX_TARGET_BYTES { HeadError::UriTooLong } else { HeadError::HeadersTooLarge });
    }
    Ok(None)
}

/// What httparse's version error means for the request line.
#[derive(Debug, PartialEq, Eq)]
enum Version {
    /// Not `HTTP/` DIGIT `.` DIGIT after exactly two single spaces: 400.
    Malformed,
    /// Well-formed so far, but the line has not ended yet.
    Partial,
    /// `HTTP/x.y` with x ≠ 1: 505.
    Unsupported,
    /// `HTTP/1.y` with y ≥ 2; the minor digit is at this offset of the buffer.
    LaterMinor(usize),
}

/// Classify the request line of a head httparse refused for its version.
///
/// RFC 9112 §3: `request-line = method SP request-target SP HTTP-version`; §2.3:
/// `HTTP-version = HTTP-name "/" DIGIT "." DIGIT`, `HTTP-name = %s"HTTP"` (case-sensitive).
/// RFC 9110 §2.5: a recipient answers a higher minor version of its major as the highest minor it
/// supports; a major it does not support gets 505 (§15.6.6).
fn classify_version(buf: &[u8]) -> Version {
    // httparse skips empty lines before the request line (RFC 9112 §2.2); so do we.
    let mut start = 0;
    while let Some(&b) = buf.get(start) {
        match b {
            b'\r' if buf.get(start + 1) == Some(&b'\n') => start += 2,
            b'\n' => start += 1,
            _ => break,
        }
    }
    let rest = &buf[start..];
    let end = rest.iter().position(|&b| b == b'\r' || b == b'\n');
    let line = &rest[..end.unwrap_or(rest.len())];
    let mut parts = line.splitn(3, |&b| b == b' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next()) else {
        return if end.is_some() { Version::Malformed } else { Version::Partial };
    };
    const SHAPE: &[u8] = b"HTTP/0.0";
    let fits = |i: usize, b: u8| if SHAPE[i] == b'0' { b.is_ascii_digit() } else { SHAPE[i] == b };
    if version.len() > SHAPE.len() || !version.iter().enumerate().all(|(i, &b)| fits(i, b)) {
        return Version::Malformed;
    }
    match (version.len() == SHAPE.len(), end) {
        (false, Some(_)) => Version::Malformed,
        (false, None) => Version::Partial,
        (true, _) if version[5] == b'1' => Version::LaterMinor(start + method.len() + target.len() + 2 + 7),
        (true, None) => Version::Partial,
        (true, Some(_)) => Version::Unsupported,
    }
}

/// Whether `v` is a valid `Host` value: `uri-host [ ":" port ]` (RFC 9112 §3.2, RFC 9110 §7.2),
/// where `uri-host` is RFC 3986's `host` (§3.2.2: `IP-literal / IPv4address / reg-name`) and
/// `port = *DIGIT` (§3.2.3).
///
/// Stricter than the grammar, deliberately: the host must not be empty — neither an empty value
/// (RFC 9112 §3.2 lets a client send one for a target without authority; no client of this
/// server does) nor a port alone (`:80`, an empty `reg-name`) — and a comma is refused although
/// `reg-name` allows it as a sub-delimiter, because `a, b` is how a second Host hides in one field
/// (a proxy may pick either).
pub fn valid_host(v: &[u8]) -> bool {
    let (host, port) = if v.first() == Some(&b'[') {
        let Some(close) = v.iter().position(|&b| b == b']') else { return false };
        if !valid_ip_literal(&v[1..close]) {
            return false;
        }
        match &v[close + 1..] {
            [] => (&v[..close + 1], None),
            [b':', port @ ..] => (&v[..close + 1], Some(port)),
            _ => return false,
        }
    } else {
        match v.iter().position(|&b| b == b':') {
            Some(i) => (&v[..i], Some(&v[i + 1..])),
            None => (v, None),
        }
    };
    if host.is_empty() || port.is_some_and(|p| !p.iter().all(u8::is_ascii_digit)) {
        return false;
    }
    host.first() == Some(&b'[') || valid_reg_name(host)
}

/// `reg-name = *( unreserved / pct-encoded / sub-delims )` (RFC 3986 §3.2.2), without `,`
/// (see [`valid_host`]). IPv4 addresses are reg-names too.
fn valid_reg_name(h: &[u8]) -> bool {
    let mut i = 0;
    while i < h.len() {
        match h[i] {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b';' | b'=' => {}
            b'%' if h.get(i + 1..i + 3).is_some_and(|x| x.iter().all(u8::is_ascii_hexdigit)) => i += 2,
            _ => return false,
        }
        i += 1;
    }
    true
}

/// The inside of `IP-literal = "[" ( IPv6address / IPvFuture ) "]"` (RFC 3986 §3.2.2).
fn valid_ip_literal(b: &[u8]) -> bool {
    if let [b'v' | b'V', rest @ ..] = b {
        // IPvFuture = "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
        let Some(dot) = rest.iter().position(|&c| c == b'.') else { return false };
        let (ver, tail) = (&rest[..dot], &rest[dot + 1..]);
        return !ver.is_empty()
            && ver.iter().all(u8::is_ascii_hexdigit)
            && !tail.is_empty()
            && tail.iter().all(|&c| c == b':' || (c != b'%' && valid_reg_name(&[c])));
    }
    std::str::from_utf8(b).is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok())
}

fn parse_with(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return partial(buf),
        Err(e) => {
            return Err(match e {
                httparse::Error::TooManyHeaders => HeadError::HeadersTooLarge,
                httparse::Error::Version => HeadError::RequestLine,
                httparse::Error::HeaderName => HeadError::Syntax("header name"),
                httparse::Error::HeaderValue => HeadError::Syntax("header value"),
                httparse::Error::NewLine => HeadError::Syntax("line ending"),
                httparse::Error::Status => HeadError::Syntax("status"),
                httparse::Error::Token => HeadError::Syntax("method or target"),
            });
        }
    };
    let target = req.path.unwrap_or("");
    if target.len() > MAX_TARGET_BYTES {
        return Err(HeadError::UriTooLong);
    }
    if len > MAX_HEAD_BYTES {
        return Err(HeadError::HeadersTooLarge);
    }
    if buf[..len].iter().enumerate().any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r')) {
        return Err(HeadError::BareLf);
    }
    let minor = req.version.unwrap_or(1);
    let mut h = Head {
        method: req.method.unwrap_or("").to_string(),
        target: target.to_string(),
        minor,
        close: minor == 0,
        ..Head::default()
    };
    let mut hosts = 0;
    let mut framing = FramingFields::default();
    for hd in req.headers.iter() {
        let name = hd.name;
        let value = std::str::from_utf8(hd.value).ok();
        let eq = |n: &str| name.eq_ignore_ascii_case(n);
        if eq("host") {
            hosts += 1;
            if !valid_host(hd.value) {
                return Err(HeadError::HostValue);
            }
        } else if eq("content-length") {
            framing.content_length(hd.value)?;
        } else if eq("transfer-encoding") {
            framing.transfer_encoding(hd.value)?;
        } else if eq("connection") {
            for t in value.unwrap_or("").split(',').map(str::trim) {
                if t.eq_ignore_ascii_case("close") {
                    h.close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") && minor == 0 {
                    h.close = false;
                } else if t.eq_ignore_ascii_case("upgrade") {
                    h.connection_upgrade = true;
                }
            }
        } else if eq("expect") {
            h.expect_continue = value.is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
        } else if eq("authorization") {
            h.authorization = value.map(str::to_string);
        } else if eq("x-gatelet-agent-id") {
            h.agent_id = value.map(|v| v.trim().to_string());
        } else if eq("x-gatelet-session-key") {
            h.session_key = Some(String::from_utf8_lossy(hd.value).trim().to_string());
        } else if eq("upgrade") {
            h.upgrade = value.map(|v| v.trim().to_string());
        } else if eq("sec-websocket-key") {
            h.ws_key = value.map(|v| v.trim().to_string());
        } else if eq("sec-websocket-version") {
            h.ws_version = value.map(|v| v.trim().to_string());
        } else if eq("origin") {
            h.origin = value.map(|v| v.trim().to_string());
        } else if eq("access-control-request-headers") {
            h.cors_request_headers = value.map(|v| v.trim().to_string());
        }
    }
    if minor == 1 && hosts != 1 || hosts > 1 {
        return Err(HeadError::Host);
    }
    h.body = Some(framing.decide(Role::Request { minor })?);
    Ok(Some((h, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Option<(Head, usize)>, HeadError> {
        parse(s.as_bytes())
    }

    fn head(s: &str) -> Head {
        p(s).unwrap().unwrap().0
    }

    #[test]
    fn simple_get_and_partial() {
        let h = head("GET /health?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(h.method, "GET");
        assert_eq!(h.path(), "/health");
        assert_eq!(h.body, Some(Framing::None));
        assert!(!h.close);
        assert_eq!(p("GET / HTTP/1.1\r\nHost: a\r\n").unwrap(), None);
        assert_eq!(head("GET http://a:1/health?x HTTP/1.1\r\nHost: a\r\n\r\n").path(), "/health");
        assert_eq!(head("GET HTTP://a HTTP/1.1\r\nHost: a\r\n\r\n").path(), "/");
    }

    #[test]
    fn path_of_a_non_ascii_target_near_the_scheme_does_not_panic() {
        // httparse accepts UTF-8 in the target; the scheme check must not slice inside a char.
        let h = Head { target: "http:/\u{e9}x".into(), ..Head::default() };
        assert_eq!(h.path(), "http:/\u{e9}x");
        let h = Head { target: "https:/\u{e9}x".into(), ..Head::default() };
        assert_eq!(h.path(), "https:/\u{e9}x");
        let h = Head { target: "http://h\u{e9}/p".into(), ..Head::default() };
        assert_eq!(h.path(), "/p");
    }

    #[test]
    fn framing_table() {
        use FramingError::*;
        let cases: &[(&str, Result<Framing, FramingError>)] = &[
            ("Content-Length: 5", Ok(Framing::Length(5))),
            ("Content-Length: 5\r\nContent-Length: 5", Ok(Framing::Length(5))),
            ("Content-Length: 5, 5", Ok(Framing::Length(5))),
            ("Content-Length: +5", Err(ContentLength)),
            ("Content-Length: -1", Err(ContentLength)),
            ("Content-Length: 1,2", Err(ContentLength)),
            ("Content-Length: 5\r\nContent-Length: 6", Err(ContentLength)),
            ("Content-Length: 0x10", Err(ContentLength)),
            ("Content-Length: 99999999999999999999", Err(ContentLength)),
            ("Content-Length:", Err(ContentLength)),
            ("Transfer-Encoding: chunked", Ok(Framing::Chunked)),
            ("Transfer-Encoding: CHUNKED", Ok(Framing::Chunked)),
            ("Transfer-Encoding: chunked\r\nContent-Length: 3", Err(LengthAndChunked)),
            ("Transfer-Encoding: gzip, chunked", Err(ChunkedNotLast)),
            ("Transfer-Encoding: chunked, gzip", Err(ChunkedNotLast)),
            ("Transfer-Encoding: chunked, chunked", Err(ChunkedNotLast)),
            ("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked", Err(ChunkedNotLast)),
            ("Transfer-Encoding: gzip", Err(UnsupportedCoding)),
            ("Transfer-Encoding: identity", Err(UnsupportedCoding)),
            ("Transfer-Encoding: chunkedx", Err(UnsupportedCoding)),
            // RFC 9112 §6.1 / RFC 9110 §5.6.1: empty elements are ignored, no coding at all is 400.
            ("Transfer-Encoding:", Err(EmptyTransferEncoding)),
            ("Transfer-Encoding:  ", Err(EmptyTransferEncoding)),
            ("Transfer-Encoding: ,", Err(EmptyTransferEncoding)),
            ("Transfer-Encoding: , ,", Err(EmptyTransferEncoding)),
            ("Transfer-Encoding: chunked\r\nTransfer-Encoding:", Err(EmptyTransferEncoding)),
            ("Transfer-Encoding: , chunked,", Ok(Framing::Chunked)),
            ("Content-Length: 3\r\nTransfer-Encoding:", Err(EmptyTransferEncoding)),
        ];
        for (hdrs, want) in cases {
            let req = format!("POST / HTTP/1.1\r\nHost: a\r\n{hdrs}\r\n\r\n");
            let got = p(&req).map(|o| o.unwrap().0.body.unwrap());
            assert_eq!(got, want.map_err(HeadError::Framing), "{hdrs}");
        }
        assert_eq!(HeadError::Framing(EmptyTransferEncoding).status(), 400);
        assert_eq!(HeadError::Framing(UnsupportedCoding).status(), 501);
    }

    #[test]
    fn smuggling_shapes_rejected() {
        assert_eq!(
            p("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n"),
            Err(HeadError::Syntax("header name"))
        );
        assert_eq!(p("GET / HTTP/1.1\nHost: a\n\n"), Err(HeadError::BareLf));
        assert_eq!(p("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n"), Err(HeadError::Syntax("header value")));
        assert_eq!(
            p("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::Framing(FramingError::ChunkedInHttp10))
        );
        assert_eq!(p("GET / HTTP/1.1\r\n\r\n"), Err(HeadError::Host));
        assert_eq!(p("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), Err(HeadError::Host));
    }

    /// RFC 9112 §3 / §2.3 and RFC 9110 §2.5: every request-line shape, with the status it gets.
    /// Each malformed line is followed by a second request that must never be parsed.
    #[test]
    fn request_line_table() {
        let cases: &[(&str, Result<u8, HeadError>)] = &[
            ("GET / HTTP/1.1", Ok(1)),
            ("GET / HTTP/1.0", Ok(0)),
            ("GET / HTTP/1.2", Ok(1)),
            ("GET / HTTP/1.9", Ok(1)),
            ("GET / HTTP/2.0", Err(HeadError::VersionNotSupported)),
            ("GET / HTTP/0.9", Err(HeadError::VersionNotSupported)),
            ("GET / HTTP/9.9", Err(HeadError::VersionNotSupported)),
            ("GET / HTTP/1", Err(HeadError::RequestLine)),
            ("GET / HTTP/01.01", Err(HeadError::RequestLine)),
            ("GET / HTTP/1.01", Err(HeadError::Syntax("line ending"))),
            ("GET / HTTP/1.10", Err(HeadError::Syntax("line ending"))),
            ("GET / HTTP/ 1.1", Err(HeadError::RequestLine)),
            ("GET / http/1.1", Err(HeadError::RequestLine)),
            ("GET / HTTP/1.1 ", Err(HeadError::Syntax("line ending"))),
            ("GET /pa th HTTP/1.1", Err(HeadError::RequestLine)),
            ("GET / HTTP/2", Err(HeadError::RequestLine)),
            ("GET / HTTPS/1.1", Err(HeadError::RequestLine)),
            ("GET  / HTTP/1.1", Err(HeadError::Syntax("method or target"))),
            ("GET /", Err(HeadError::Syntax("method or target"))),
        ];
        for (line, want) in cases {
            let req = format!("{line}\r\nHost: a\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n");
            let got = p(&req).map(|o| o.expect("complete").0);
            assert_eq!(got.as_ref().map(|h| h.minor), want.as_ref().map(|m| *m), "{line}");
            if let Ok(h) = got {
                assert_eq!(h.target, "/", "{line}");
            }
        }
        assert_eq!(HeadError::VersionNotSupported.status(), 505);
        assert_eq!(HeadError::RequestLine.status(), 400);
        // A version is judged only once it is complete, and a 1.x minor once the head is.
        for partial in
            ["GET / HTTP/2", "GET / HTTP/2.0", "GET / HTTP/1.2", "GET / HTTP/1.2\r\nHost: a\r\n", "\r\nGET / HTTP/"]
        {
            assert_eq!(p(partial), Ok(None), "{partial:?}");
        }
        // Leading empty lines are skipped before a later minor, and the offset still lands on it.
        let h = head("\r\n\r\nPOST /v1 HTTP/1.7\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!((h.method.as_str(), h.target.as_str(), h.minor), ("POST", "/v1", 1));
        assert_eq!(h.body, Some(Framing::Length(2)));
    }

    /// RFC 9112 §3.2 with RFC 3986 §3.2.2–3.2.3: `Host = uri-host [ ":" port ]`, exactly one on
    /// HTTP/1.1, plus our stricter rules (no empty value, no comma).
    #[test]
    fn host_table() {
        let ok = [
            "a",
            "127.0.0.1",
            "127.0.0.1:8080",
            "example.com:",
            "EXAMPLE.com:443",
            "[::1]",
            "[::1]:80",
            "[2001:db8::7]:1",
            "[v1.fe:x]",
            "a%20b",
            "xn--bcher-kva.example",
            "a_b~c!$&'()*+;=",
        ];
        for v in ok {
            assert!(p(&format!("GET / HTTP/1.1\r\nHost: {v}\r\n\r\n")).is_ok(), "{v}");
        }
        let bad = [
            "",
            "user@127.0.0.1:80",
            "127.0.0.1:80/path",
            "127.0.0.1:80, other.example.com",
            "a,b",
            "a b",
            "a:80:90",
            "a:8x",
            ":80",
            "[::1",
            "[::1]x",
            "[zz::1]",
            "[v1.]",
            "a%2",
            "a%zz",
            "a/",
            "a?b",
            "a#b",
            "a\"b",
            "\u{e9}",
        ];
        for v in bad {
            let r = p(&format!("GET / HTTP/1.1\r\nHost: {v}\r\n\r\n"));
            assert_eq!(r, Err(HeadError::HostValue), "{v:?}");
            assert_eq!(HeadError::HostValue.status(), 400);
        }
        // HTTP/1.0 may omit Host, but one it sends is checked too.
        assert!(p("GET / HTTP/1.0\r\n\r\n").is_ok());
        assert_eq!(p("GET / HTTP/1.0\r\nHost: a@b\r\n\r\n"), Err(HeadError::HostValue));
        assert_eq!(p("GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n"), Err(HeadError::Host));
        // A later minor needs a Host like 1.1 does.
        assert_eq!(p("GET / HTTP/1.2\r\n\r\n"), Err(HeadError::Host));
    }

    #[test]
    fn limits() {
        let long = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(MAX_TARGET_BYTES));
        assert_eq!(p(&long), Err(HeadError::UriTooLong));
        let partial_long = format!("GET /{}", "a".repeat(MAX_HEAD_BYTES + 10));
        assert_eq!(p(&partial_long), Err(HeadError::UriTooLong));
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "b".repeat(MAX_HEAD_BYTES));
        assert_eq!(p(&big), Err(HeadError::HeadersTooLarge));
        let many: String = (0..MAX_HEADERS + 1).map(|i| format!("X{i}: v\r\n")).collect();
        assert_eq!(p(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")), Err(HeadError::HeadersTooLarge));
    }

    #[test]
    fn connection_semantics() {
        assert!(head("GET / HTTP/1.0\r\n\r\n").close);
        assert!(!head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").close);
        assert!(head("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").close);
        let h = head("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert!(h.expect_continue);
        let h = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(h.connection_upgrade);
        assert_eq!(h.upgrade.as_deref(), Some("websocket"));
    }
}
