//! Routing: what to do with a request head, and with a complete request body.
//!
//! Order for every request (SPEC §4): path → method → auth → body → validation → run. These
//! functions decide; the event loop acts.

use std::net::IpAddr;
use std::time::Instant;

use crate::auth::{AuthResult, bearer};
use crate::gateway::Gateway;
use crate::http::head::{BodyFraming, Head};
use crate::http::response::Response;
use crate::openai::{self, ApiError};

/// What the loop should do after a head.
#[derive(Debug)]
pub enum HeadAction {
    /// Answer now. The request body (if any) is not read, so the connection closes when one was
    /// announced.
    Respond(Response),
    /// Read the body, then validate it and start the run. `continue_100` asks for `100 Continue` first.
    ReadBody {
        /// The body limit.
        limit: u64,
        /// Send `100 Continue` before reading.
        continue_100: bool,
    },
    /// A WebSocket upgrade on `/`.
    Upgrade,
}

/// Where a request is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/health`, `/healthz`.
    Health,
    /// `/ready`, `/readyz`.
    Ready,
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/models`.
    Models,
    /// `/v1/models/{id}` (raw id follows the prefix).
    Model,
    /// Anything else.
    NotFound,
}

/// Classify a path.
pub fn route(path: &str) -> Route {
    match path {
        "/health" | "/healthz" => Route::Health,
        "/ready" | "/readyz" => Route::Ready,
        "/v1/chat/completions" => Route::Chat,
        "/v1/models" => Route::Models,
        p if p.starts_with("/v1/models/") && p.len() > "/v1/models/".len() => Route::Model,
        _ => Route::NotFound,
    }
}

fn disabled() -> ApiError {
    ApiError::invalid(
        404,
        "endpoint_disabled",
        "The chat completions endpoint is disabled: set gateway.http.endpoints.chatCompletions.enabled to true",
    )
}

fn check_auth(gw: &Gateway, head: &Head, ip: IpAddr) -> Result<(), ApiError> {
    match gw.auth.check(bearer(head.authorization.as_deref()), ip, Instant::now()) {
        AuthResult::Ok => Ok(()),
        AuthResult::Invalid => Err(ApiError::unauthorized()),
        AuthResult::Locked(secs) => Err(ApiError::locked_out(secs)),
    }
}

fn is_ws_upgrade(head: &Head) -> bool {
    head.upgrade.as_deref().is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
}

/// Decide what to do with a complete head.
pub fn on_head(gw: &Gateway, head: &Head, ip: IpAddr) -> HeadAction {
    let path = head.path();
    let m = head.method.as_str();
    let get_like = m == "GET" || m == "HEAD";
    let r = match route(path) {
        Route::Health if get_like => Ok(Response::json(200, br#"{"ok":true,"status":"live"}"#.to_vec())),
        Route::Ready if get_like => Ok(if gw.is_ready() {
            Response::json(200, br#"{"ready":true}"#.to_vec())
        } else {
            Response::json(503, br#"{"ready":false}"#.to_vec())
        }),
        Route::Health | Route::Ready => Err(ApiError::method_not_allowed(m, path, "GET, HEAD")),
        Route::Chat | Route::Models | Route::Model if !gw.config.gateway.chat_completions => Err(disabled()),
        Route::Chat if m != "POST" => Err(ApiError::method_not_allowed(m, path, "POST")),
        Route::Models | Route::Model if !get_like => Err(ApiError::method_not_allowed(m, path, "GET, HEAD")),
        Route::Chat => match check_auth(gw, head, ip) {
            Err(e) => Err(e),
            Ok(()) => {
                let limit = gw.config.gateway.max_body_bytes;
                return match head.body {
                    Some(BodyFraming::Length(n)) if n > limit => Err(too_large(limit)),
                    _ => Ok(HeadAction::ReadBody { limit, continue_100: head.expect_continue && head.minor >= 1 }),
                }
                .unwrap_or_else(|e: ApiError| HeadAction::Respond(e.response()));
            }
        },
        Route::Models => check_auth(gw, head, ip).map(|_| Response::json(200, openai::list_models(gw))),
        Route::Model => check_auth(gw, head, ip)
            .and_then(|_| openai::get_model(gw, &path["/v1/models/".len()..]))
            .map(|b| Response::json(200, b)),
        Route::NotFound if path == "/" && m == "GET" && is_ws_upgrade(head) => return HeadAction::Upgrade,
        Route::NotFound => Err(ApiError::not_found(m, path)),
    };
    HeadAction::Respond(r.unwrap_or_else(|e| e.response()))
}

/// 413 for a body over the limit.
pub fn too_large(limit: u64) -> ApiError {
    ApiError::invalid(413, "payload_too_large", format!("Request body is larger than maxBodyBytes ({limit} bytes)"))
}

/// 429 for a client address that already has `limit` runs going or queued
/// (`gateway.maxRunsPerIp`): a per-client limit, not a server fault, so it is a 429 as nginx's
/// and HAProxy's rate limits are usually configured — retried by clients after `Retry-After`,
/// and not counted by a load balancer as a failing instance the way a 503 would be.
pub fn too_many_runs(limit: usize) -> ApiError {
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

/// 408 for a request that did not arrive in time.
pub fn timed_out() -> ApiError {
    ApiError::invalid(408, "request_timeout", "The request was not received in time")
}

/// The error for a refused head or body framing (SPEC §4 codes).
pub fn framing_error(status: u16, message: String) -> ApiError {
    let code = match status {
        413 => "payload_too_large",
        414 => "uri_too_long",
        431 => "headers_too_large",
        501 => "not_implemented",
        505 => "http_version_not_supported",
        _ => "bad_request",
    };
    ApiError::invalid(status, code, message)
}
