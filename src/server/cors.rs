//! CORS for the API routes (`gateway.http.cors.allowOrigins`, off by default): preflight answers
//! and the `Access-Control-*` headers on every answer of those routes, errors and SSE included.
//!
//! Bearer tokens are sent explicitly by the browser app, never as cookies, so credentials mode
//! is not offered. A preflight may ask for any request headers (SDKs add their own, e.g. the
//! OpenAI SDK's `x-stainless-*`): the origin is the gate, so the requested names are allowed
//! back as long as they are well-formed.

use crate::gateway::Gateway;
use crate::http::head::Head;
use crate::http::response::Response;
use crate::openai::ApiError;

/// How long a browser may cache a preflight answer (seconds).
pub const MAX_AGE: &str = "600";
/// Request headers allowed when a preflight names none.
const DEFAULT_HEADERS: &str = "authorization, content-type, x-gatelet-agent-id, x-gatelet-session-key";
/// Response headers a script may read.
const EXPOSE: &str = "x-request-id, x-gatelet-session-key";

/// Whether CORS is configured.
pub fn enabled(gw: &Gateway) -> bool {
    !gw.config().gateway.cors_origins.is_empty()
}

/// The `Access-Control-Allow-Origin` value for `origin`, when it is allowed.
fn allow_origin<'a>(gw: &'a Gateway, origin: Option<&'a str>) -> Option<&'a str> {
    let list = &gw.config().gateway.cors_origins;
    if list.iter().any(|o| o == "*") {
        return Some("*");
    }
    let origin = origin?;
    list.iter().any(|o| o.eq_ignore_ascii_case(origin)).then_some(origin)
}

/// Headers for an answer on an API route (empty when CORS is off).
pub fn headers(gw: &Gateway, head: &Head) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if !enabled(gw) {
        return out;
    }
    let allowed = allow_origin(gw, head.origin.as_deref());
    if allowed != Some("*") {
        // The answer depends on the Origin: caches must key on it.
        out.push(("Vary", "Origin".to_string()));
    }
    if let Some(o) = allowed {
        out.push(("Access-Control-Allow-Origin", o.to_string()));
        out.push(("Access-Control-Expose-Headers", EXPOSE.to_string()));
    }
    out
}

fn token_list(v: &str) -> bool {
    v.len() <= 1024
        && v.split(',')
            .map(str::trim)
            .all(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)))
}

/// The answer to `OPTIONS` on an API route whose methods are `methods`, before authentication.
pub fn preflight(gw: &Gateway, head: &Head, methods: &'static str) -> Response {
    if allow_origin(gw, head.origin.as_deref()).is_none() {
        let mut r = ApiError::invalid(
            403,
            "cors_origin_not_allowed",
            format!("Origin {:?} is not in gateway.http.cors.allowOrigins", head.origin.as_deref().unwrap_or("(none)")),
        )
        .response();
        for (k, v) in headers(gw, head) {
            r = r.header(k, v);
        }
        return r;
    }
    let req_headers = head.cors_request_headers.as_deref().filter(|v| token_list(v)).unwrap_or(DEFAULT_HEADERS);
    let mut r = Response { status: 204, headers: Vec::new(), body: Vec::new(), close: false };
    for (k, v) in headers(gw, head) {
        r = r.header(k, v);
    }
    r.header("Access-Control-Allow-Methods", methods)
        .header("Access-Control-Allow-Headers", req_headers.to_ascii_lowercase())
        .header("Access-Control-Max-Age", MAX_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists() {
        assert!(token_list("authorization, content-type, x-stainless-os"));
        assert!(!token_list("a, , b"));
        assert!(!token_list("a b"));
        assert!(!token_list("a\r\nx-evil: 1"));
        assert!(!token_list(&"a,".repeat(600)));
    }
}
