//! Upstream base URLs: `http[s]://host[:port][/path]`, checked once (at config load) so that
//! every request line and `Host` header built from one is well formed.

use std::fmt;

/// Why a base URL is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UrlError {
    /// Neither `http://` nor `https://`.
    Scheme,
    /// No host after the scheme.
    NoHost,
    /// The port is not a number from 1 to 65535.
    BadPort,
    /// `user:password@` in the URL.
    UserInfo,
    /// A query or fragment in the URL.
    QueryOrFragment,
    /// A character that cannot go into a request line or `Host` header.
    BadCharacter,
}

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UrlError::Scheme => "expected an http:// or https:// URL",
            UrlError::NoHost => "the URL has no host",
            UrlError::BadPort => "the URL's port must be a number from 1 to 65535",
            UrlError::UserInfo => "credentials in the URL are not supported: use apiKey",
            UrlError::QueryOrFragment => "a query or fragment in the URL is not supported",
            UrlError::BadCharacter => "the URL contains a space, control or non-ASCII character",
        })
    }
}

/// An `http[s]://host[:port][/path]` base URL, e.g. `http://127.0.0.1:8080/v1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// `https://`.
    pub tls: bool,
    /// Host name or IP (IPv6 without brackets).
    pub host: String,
    /// Port (80, or 443 for https, when absent).
    pub port: u16,
    /// `host[:port]` as written, for the `Host` header.
    pub authority: String,
    /// Path prefix without a trailing slash (`""` or `/v1`).
    pub path: String,
}

impl BaseUrl {
    /// Parse and check a base URL.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let (tls, rest) = if s.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("http://")) {
            (false, &s[7..])
        } else if s.get(..8).is_some_and(|p| p.eq_ignore_ascii_case("https://")) {
            (true, &s[8..])
        } else {
            return Err(UrlError::Scheme);
        };
        if rest.bytes().any(|b| b <= b' ' || b >= 0x7f) {
            return Err(UrlError::BadCharacter);
        }
        if rest.contains(['?', '#']) {
            return Err(UrlError::QueryOrFragment);
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(UrlError::UserInfo);
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or(UrlError::NoHost)?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(UrlError::NoHost);
        }
        let port = match port {
            None if tls => 443,
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(UrlError::BadPort),
            },
        };
        Ok(BaseUrl {
            tls,
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path: path.trim_end_matches('/').to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let u = BaseUrl::parse("http://127.0.0.1:8080/v1/").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.authority.as_str(), u.path.as_str()),
            (false, "127.0.0.1", 8080, "127.0.0.1:8080", "/v1")
        );
        let u = BaseUrl::parse("https://api.openai.com/v1").unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.authority.as_str()),
            (true, "api.openai.com", 443, "api.openai.com")
        );
        let u = BaseUrl::parse("HTTP://localhost").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("localhost", 80, ""));
        let u = BaseUrl::parse("http://[::1]:11434/v1").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.authority.as_str()), ("::1", 11434, "[::1]:11434"));
        let bad: &[(&str, UrlError)] = &[
            ("httpx://x/v1", UrlError::Scheme),
            ("https:/x", UrlError::Scheme),
            ("ftp://x", UrlError::Scheme),
            ("http://", UrlError::NoHost),
            ("http://:80/v1", UrlError::NoHost),
            ("http://x:0", UrlError::BadPort),
            ("http://x:99999", UrlError::BadPort),
            ("http://x:+80", UrlError::BadPort),
            ("http://u:p@x/v1", UrlError::UserInfo),
            ("http://x/v1?a=b", UrlError::QueryOrFragment),
            ("http://x/v 1", UrlError::BadCharacter),
            ("http://x/v1\r\nX: y", UrlError::BadCharacter),
        ];
        for (s, e) in bad {
            assert_eq!(BaseUrl::parse(s).as_ref(), Err(e), "{s}");
        }
    }
}
