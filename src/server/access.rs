//! Per-request bookkeeping for the access log and `gatelet_http_requests_total`: one record per
//! answered request, finished wherever the answer is written (the loop, or the worker that owns
//! a streaming response).

use std::time::Instant;

use crate::http::head::Head;
use crate::metrics::{self, RouteLabel};

/// Status logged when the client went away before an answer was written (as nginx does).
pub const CLIENT_CLOSED: u16 = 499;

/// A request that is being answered.
#[derive(Debug)]
pub struct Pending {
    /// When its head was complete.
    pub start: Instant,
    /// Its `/metrics` route.
    pub route: RouteLabel,
    /// Method, a space and the path without the query, in one allocation (empty when the
    /// access log is off: nothing to copy then).
    target: String,
    /// The agent, once resolved.
    pub agent: Option<String>,
    /// The session key, once resolved.
    pub session_key: Option<String>,
    /// The `x-request-id` sent back.
    pub request_id: Option<String>,
}

impl Pending {
    /// A record for `head`, started at `start`.
    pub fn new(head: &Head, start: Instant) -> Self {
        let mut target = String::new();
        if crate::log::access_enabled() {
            let path = head.path();
            target.reserve_exact(head.method.len() + 1 + path.len());
            target.push_str(&head.method);
            target.push(' ');
            target.push_str(path);
        }
        Pending {
            start,
            route: super::handler::route_label(head),
            target,
            agent: None,
            session_key: None,
            request_id: None,
        }
    }

    /// Count the request and write its access-log line.
    pub fn finish(&self, status: u16, bytes: u64) {
        metrics::request(self.route, status);
        if crate::log::access_enabled() {
            // A method has no space; a record started while the log was off has no target.
            let (method, path) = self.target.split_once(' ').unwrap_or(("-", "-"));
            crate::log::access(&crate::log::Access {
                method,
                path,
                status,
                bytes,
                duration: self.start.elapsed(),
                agent: self.agent.as_deref(),
                session_key: self.session_key.as_deref(),
                request_id: self.request_id.as_deref(),
            });
        }
    }
}

/// Count and log an answer written at once: `head` is `None` when the request could not be
/// parsed.
pub fn immediate(head: Option<&Head>, start: Instant, status: u16, bytes: u64, request_id: Option<&str>) {
    match head {
        Some(h) => {
            let mut p = Pending::new(h, start);
            p.request_id = request_id.map(str::to_string);
            p.finish(status, bytes);
        }
        None => {
            let p = Pending {
                start,
                route: RouteLabel::Other,
                target: String::new(),
                agent: None,
                session_key: None,
                request_id: None,
            };
            p.finish(status, bytes);
        }
    }
}

/// The `x-request-id` among response headers.
pub fn request_id<'a>(headers: &'a [(&'static str, String)]) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("x-request-id")).map(|(_, v)| v.as_str())
}

/// What a worker learned about a request for its access-log record: the agent, the session
/// and the request id it answered with.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    /// The resolved agent.
    pub agent: Option<String>,
    /// The resolved session key.
    pub session_key: Option<String>,
    /// The `x-request-id` sent back.
    pub request_id: Option<String>,
}

impl RunInfo {
    /// Fill `p` (only while the access log is on: the fields are only logged).
    pub fn apply(self, p: &mut Pending) {
        if crate::log::access_enabled() {
            p.agent = self.agent;
            p.session_key = self.session_key;
        }
        p.request_id = self.request_id;
    }
}
