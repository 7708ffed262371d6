//! The OpenAI-compatible surface: error envelopes, `/v1/models`, chat request parsing and
//! response/chunk encoding.

pub mod chat;

use serde_json::json;

use crate::gateway::Gateway;
use crate::http::response::Response;
use crate::ws::handshake::HandshakeError;

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

/// The model ids the gateway lists: `gatelet`, `gatelet/default`, then `gatelet/<id>` per agent.
pub fn model_ids(gw: &Gateway) -> Vec<String> {
    let mut v = vec!["gatelet".to_string(), "gatelet/default".to_string()];
    v.extend(gw.agents.iter().map(|a| format!("gatelet/{}", a.cfg.id)));
    v
}

fn model_json(id: &str) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": "gatelet" })
}

/// `GET /v1/models`.
pub fn list_models(gw: &Gateway) -> Vec<u8> {
    let data: Vec<_> = model_ids(gw).iter().map(|id| model_json(id)).collect();
    serde_json::to_vec(&json!({ "object": "list", "data": data })).unwrap_or_default()
}

/// `GET /v1/models/{id}` (`id` still percent-encoded).
pub fn get_model(gw: &Gateway, raw_id: &str) -> Result<Vec<u8>, ApiError> {
    let id = percent_decode(raw_id)
        .ok_or_else(|| ApiError::invalid_value("model", "model id is not valid percent-encoded UTF-8"))?;
    model_ids(gw)
        .iter()
        .find(|m| m.eq_ignore_ascii_case(&id))
        .map(|m| serde_json::to_vec(&model_json(m)).unwrap_or_default())
        .ok_or_else(|| ApiError::invalid(404, "model_not_found", format!("The model `{id}` does not exist")))
}

/// Decode `%XX` escapes; `None` for a bad escape or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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

    #[test]
    fn percent() {
        assert_eq!(percent_decode("gatelet%2Fmain").as_deref(), Some("gatelet/main"));
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
