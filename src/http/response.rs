//! Response encoding: status line, headers, bodies and chunked framing. The `Date` is the
//! caller's ([`HttpDate`]): this module reads no clock.

use crate::util::{push_decimal, push_hex};

/// Reason phrase for the statuses gatelet sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        414 => "URI Too Long",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// A `Date` field value: the IMF-fixdate of a Unix time (RFC 9110 §5.6.7), rendered once. A server
/// renders one a second and stamps every response of that second with it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HttpDate {
    secs: u64,
    text: [u8; 29],
}

impl HttpDate {
    /// `Sun, 06 Nov 1994 08:49:37 GMT` for a Unix time.
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86400;
        let rem = secs % 86400;
        let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
        let wday = ((days + 4) % 7) as usize; // 1970-01-01 was a Thursday
        let (year, month, day) = crate::util::civil_from_days(days as i64);
        const WD: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
        const MO: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
        let text =
            format!("{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT", WD[wday], day, MO[(month - 1) as usize], year, h, m, s);
        let mut out = [b' '; 29];
        let n = text.len().min(29);
        out[..n].copy_from_slice(&text.as_bytes()[..n]);
        HttpDate { secs, text: out }
    }

    /// The Unix time it was rendered for.
    pub fn secs(&self) -> u64 {
        self.secs
    }

    /// The field value.
    pub fn as_bytes(&self) -> &[u8] {
        &self.text
    }
}

impl std::fmt::Debug for HttpDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.text))
    }
}

/// A complete response with an in-memory body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Extra headers (Date, Content-Length and Connection are added when encoding).
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Close the connection after this response.
    pub close: bool,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response { status, headers: vec![("Content-Type", "application/json".into())], body, close: false }
    }

    /// Add a header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// Encode into `out`, stamped with `date`. `head_only` omits the body (HEAD); `close` is the
    /// final decision on persistence.
    pub fn encode(&self, out: &mut Vec<u8>, date: &HttpDate, head_only: bool, close: bool) {
        push_status_line(out, self.status, date);
        for (k, v) in &self.headers {
            push_header(out, k, v.as_bytes());
        }
        // A 204 has no body and must not announce one (RFC 9110 §8.6).
        if self.status != 204 {
            push_content_length(out, self.body.len() as u64);
        }
        out.extend_from_slice(if close { b"Connection: close\r\n\r\n" } else { b"\r\n" });
        if !head_only && self.status != 204 {
            out.extend_from_slice(&self.body);
        }
    }
}

/// `HTTP/1.1 <status> <reason>\r\nDate: <date>\r\n`.
pub fn push_status_line(out: &mut Vec<u8>, status: u16, date: &HttpDate) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    push_header(out, "Date", date.as_bytes());
}

/// `name: value\r\n`: the one header-line writer, for responses and upstream requests alike.
pub fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `Content-Length: n\r\n`, without formatting through a string.
pub fn push_content_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"Content-Length: ");
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Frame `data` as one chunk (`<hex>\r\n<data>\r\n`); empty data is skipped because a zero-size
/// chunk would end the body.
pub fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    push_hex(out, data.len() as u64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(HttpDate::from_unix(784_111_777).as_bytes(), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(HttpDate::from_unix(0).as_bytes(), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(HttpDate::from_unix(1_709_210_096).as_bytes(), b"Thu, 29 Feb 2024 12:34:56 GMT");
        assert_eq!(HttpDate::from_unix(7).secs(), 7);
    }

    #[test]
    fn encodes_response() {
        let date = HttpDate::from_unix(784_111_777);
        let mut out = Vec::new();
        Response::json(404, b"{}".to_vec()).header("X-A", "b").encode(&mut out, &date, false, true);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"), "{s}");
        assert!(
            s.ends_with("Content-Type: application/json\r\nX-A: b\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"),
            "{s}"
        );
        let mut out = Vec::new();
        Response::json(200, b"{}".to_vec()).encode(&mut out, &date, true, false);
        assert!(out.ends_with(b"Content-Length: 2\r\n\r\n"));
    }

    #[test]
    fn chunks() {
        let mut out = Vec::new();
        push_chunk(&mut out, b"hello world, this is 26 b!");
        push_chunk(&mut out, b"");
        out.extend_from_slice(LAST_CHUNK);
        assert_eq!(out, b"1a\r\nhello world, this is 26 b!\r\n0\r\n\r\n");
    }
}
