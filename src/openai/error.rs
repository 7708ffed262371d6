//! Errors as the OpenAI surface answers them (SPEC §4): the `{"error":{…}}` envelope, and the
//! one place where every lower layer's error becomes an HTTP status and an OpenAI code.

use serde_json::json;

use crate::agent::RunError;
use crate::agent::resolve::ResolveError;
use crate::http::chunked::ChunkError;
use crate::http::head::HeadError;
use crate::http::response::Response;
use crate::session::KeyError;
use crate::ws::handshake::HandshakeError;

use super::chat::SESSION_KEY_HEADER;

/// An error in the OpenAI envelope (SPEC §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// `invalid_request_error`, `rate_limit_error` or `server_error`.
    pub kind: &'static str,
    /// Machine-readable code.
    pub code: Option<&'static str>,
    /// Human-readable message.
    pub message: String,
    /// The request parameter at fault.
    pub param: Option<String>,
    /// Extra response headers (`Allow`, `Retry-After`, `WWW-Authenticate`).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    /// A 4xx `invalid_request_error`.
    pub fn invalid(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: "invalid_request_error",
            code: Some(code),
            message: message.into(),
            param: None,
            headers: vec![],
        }
    }

    /// A 5xx `server_error`.
    pub fn server(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind: "server_error",
            code: Some(code),
            message: message.into(),
            param: None,
            headers: vec![],
        }
    }

    /// 400 `invalid_value` naming `param`.
    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::invalid(400, "invalid_value", message);
        e.param = Some(param.into());
        e
    }

    /// Add a response header.
    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// 404 for an unknown route.
    pub fn not_found(method: &str, path: &str) -> Self {
        Self::invalid(404, "not_found", format!("Invalid URL ({method} {path})"))
    }

    /// 405 with `Allow`.
    pub fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> Self {
        Self::invalid(405, "method_not_allowed", format!("Method {method} is not allowed on {path}; allowed: {allow}"))
            .with_header("Allow", allow)
    }

    /// 401 with `WWW-Authenticate`.
    pub fn unauthorized() -> Self {
        Self::invalid(
            401,
            "invalid_api_key",
            "Missing or incorrect API key: send the gateway token or password as 'Authorization: Bearer <secret>'",
        )
        .with_header("WWW-Authenticate", "Bearer")
    }

    /// 429 from the failure limiter.
    pub fn locked_out(retry_after: u64) -> Self {
        ApiError {
            status: 429,
            kind: "rate_limit_error",
            code: Some("rate_limit_exceeded"),
            message: format!("Too many failed authentication attempts; retry after {retry_after} s"),
            param: None,
            headers: vec![("Retry-After", retry_after.to_string())],
        }
    }

    /// 503 when the run queue is full.
    pub fn overloaded() -> Self {
        Self::server(503, "overloaded", "The gateway is overloaded: all workers are busy and the run queue is full")
            .with_header("Retry-After", "1")
    }

    /// The JSON body `{"error":{…}}`.
    pub fn body(&self) -> Vec<u8> {
        let v =
            json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code } });
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// The full response.
    pub fn response(&self) -> Response {
        let mut r = Response::json(self.status, self.body());
        r.headers.extend(self.headers.iter().cloned());
        r
    }

    /// 413 for a body over the limit.
    pub fn too_large(limit: u64) -> Self {
        Self::invalid(413, "payload_too_large", format!("Request body is larger than maxBodyBytes ({limit} bytes)"))
    }

    /// 429 for a client address that already has `limit` runs going or queued
    /// (`gateway.maxRunsPerIp`): a per-client limit, not a server fault, so it is a 429 as nginx's
    /// and HAProxy's rate limits are usually configured — retried by clients after `Retry-After`,
    /// and not counted by a load balancer as a failing instance the way a 503 would be.
    pub fn too_many_runs(limit: usize) -> Self {
        ApiError {
            status: 429,
            kind: "rate_limit_error",
            code: Some("rate_limit_exceeded"),
            message: format!(
                "Too many concurrent runs from this address (gateway.maxRunsPerIp is {limit}); retry when one has finished"
            ),
            param: None,
            headers: vec![("Retry-After", "1".to_string())],
        }
    }

    /// 503 for a body that does not fit in the budget for bodies in flight
    /// (`gateway.http.maxBodyBytesInFlight`): the gateway is busy, as with a full run queue.
    pub fn bodies_over_budget(limit: u64) -> Self {
        ApiError::server(
            503,
            "overloaded",
            format!(
                "The gateway is overloaded: request bodies in flight would exceed gateway.http.maxBodyBytesInFlight \
                 ({limit} bytes)"
            ),
        )
        .with_header("Retry-After", "1")
    }

    /// 408 for a request that did not arrive in time.
    pub fn timed_out() -> Self {
        Self::invalid(408, "request_timeout", "The request was not received in time")
    }
}

/// A refused request head: the status the HTTP layer gives the rule ([`HeadError::status`]), with
/// its code (SPEC §4).
impl From<HeadError> for ApiError {
    fn from(e: HeadError) -> Self {
        let status = e.status();
        let code = match status {
            414 => "uri_too_long",
            431 => "headers_too_large",
            501 => "not_implemented",
            505 => "http_version_not_supported",
            _ => "bad_request",
        };
        ApiError::invalid(status, code, e.to_string())
    }
}

impl ApiError {
    /// A refused chunked body: 413 over `limit` (`gateway.maxBodyBytes`), 400 for a framing error.
    pub fn from_chunk(e: ChunkError, limit: u64) -> Self {
        match e {
            ChunkError::BodyTooLarge => Self::too_large(limit),
            e => ApiError::invalid(400, "bad_request", e.to_string()),
        }
    }
}

/// A refused WebSocket upgrade: 426 with `Sec-WebSocket-Version: 13` for a version mismatch
/// (RFC 6455 §4.4), 400 for every other rule.
impl From<HandshakeError> for ApiError {
    fn from(e: HandshakeError) -> Self {
        match e {
            HandshakeError::WsVersion => {
                ApiError::invalid(426, "upgrade_required", e.to_string()).with_header("Sec-WebSocket-Version", "13")
            }
            _ => ApiError::invalid(400, "bad_request", e.to_string()),
        }
    }
}

/// A run that failed: 504 past the agent's deadline, 502 when the backend failed.
impl From<&RunError> for ApiError {
    fn from(e: &RunError) -> Self {
        match e {
            RunError::Timeout => {
                ApiError::server(504, "agent_timeout", "The agent run timed out (agents timeoutSeconds)")
            }
            RunError::Backend(m) => ApiError::server(502, "backend_error", m.clone()),
            RunError::Cancelled => ApiError::server(500, "internal_error", "The run was cancelled"),
        }
    }
}

/// An agent or session key the request names that cannot be used: 404 `model_not_found` for an
/// agent, 400 naming the session-key header for a key.
impl From<ResolveError> for ApiError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::NoAgent(id) => {
                ApiError::invalid(404, "model_not_found", format!("No agent `{id}` is configured (see GET /v1/models)"))
            }
            ResolveError::UnknownModel(model) => ApiError::invalid(
                404,
                "model_not_found",
                format!(
                    "The model `{model}` does not exist. Use `gatelet` or `gatelet/default` for the default agent, \
                     or `gatelet/<agentId>`, `gatelet:<agentId>`, `agent:<agentId>` or a bare agent id (see GET \
                     /v1/models)"
                ),
            ),
            ResolveError::Key(KeyError::Invalid) => {
                ApiError::invalid_value(SESSION_KEY_HEADER, format!("{SESSION_KEY_HEADER} {}", KeyError::Invalid))
            }
            e @ ResolveError::KeyOfOtherAgent { .. } => ApiError::invalid_value(SESSION_KEY_HEADER, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelope() {
        let e = ApiError::invalid_value("messages[0].role", "bad role");
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            json!({"error":{"message":"bad role","type":"invalid_request_error","param":"messages[0].role","code":"invalid_value"}})
        );
        let r = ApiError::overloaded().response();
        assert_eq!(r.status, 503);
        assert!(r.headers.iter().any(|(k, v)| *k == "Retry-After" && v == "1"));
    }

    #[test]
    fn refused_upgrades() {
        let r = ApiError::from(HandshakeError::WsVersion).response();
        assert_eq!(r.status, 426);
        assert!(r.headers.iter().any(|(k, v)| *k == "Sec-WebSocket-Version" && v == "13"));
        let e = ApiError::from(HandshakeError::Key);
        assert_eq!((e.status, e.code), (400, Some("bad_request")));
    }
}
