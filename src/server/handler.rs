//! Routing: what to do with a request head, and with a complete request body.
//!
//! Order for every request (SPEC §4): path → method → auth → body → validation → run. These
//! functions decide; the event loop acts.

use std::net::IpAddr;
use std::time::Instant;

use crate::auth::{AuthResult, bearer};
use crate::gateway::Gateway;
use crate::http::framing::Framing;
use crate::http::head::Head;
use crate::http::response::Response;
use crate::metrics::RouteLabel;
use crate::openai::{self, ApiError};

use super::cors;

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
    /// `/metrics`.
    Metrics,
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
        "/metrics" => Route::Metrics,
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
    match gw.auth().check(bearer(head.authorization.as_deref()), ip, Instant::now()) {
        AuthResult::Ok => Ok(()),
        AuthResult::Invalid => Err(ApiError::unauthorized()),
        AuthResult::Locked(secs) => Err(ApiError::locked_out(secs)),
    }
}

fn is_ws_upgrade(head: &Head) -> bool {
    head.upgrade.as_deref().is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
}

/// The `route` label of `/metrics` for a request.
pub fn route_label(head: &Head) -> RouteLabel {
    match route(head.path()) {
        Route::Health => RouteLabel::Health,
        Route::Ready => RouteLabel::Ready,
        Route::Chat => RouteLabel::Chat,
        Route::Models => RouteLabel::Models,
        Route::Model => RouteLabel::Model,
        Route::Metrics => RouteLabel::Metrics,
        Route::NotFound if is_ws_upgrade(head) && head.path() == "/" => RouteLabel::WebSocket,
        Route::NotFound => RouteLabel::Other,
    }
}

/// Whether the path is one of the API routes (authenticated JSON, CORS).
pub fn is_api(path: &str) -> bool {
    matches!(route(path), Route::Chat | Route::Models | Route::Model)
}

/// Headers on every JSON answer of an API route: `Cache-Control: no-store` (answers are per
/// caller and carry conversation content) and the CORS headers.
pub fn api_headers(gw: &Gateway, head: &Head) -> Vec<(&'static str, String)> {
    let mut h = vec![("Cache-Control", "no-store".to_string())];
    h.extend(cors::headers(gw, head));
    h
}

fn metrics(gw: &Gateway, head: &Head, ip: IpAddr) -> Result<Response, ApiError> {
    if !gw.config().gateway.metrics_public {
        check_auth(gw, head, ip)?;
    }
    let mut r = Response::json(200, crate::metrics::render(gw.pool().pending()).into_bytes());
    r.headers[0].1 = crate::metrics::CONTENT_TYPE.into();
    Ok(r.header("Cache-Control", "no-store"))
}

/// Decide what to do with a complete head.
pub fn on_head(gw: &Gateway, head: &Head, ip: IpAddr) -> HeadAction {
    let path = head.path();
    let m = head.method.as_str();
    let get_like = m == "GET" || m == "HEAD";
    let rt = route(path);
    if m == "OPTIONS" && cors::enabled(gw) {
        // Preflight comes before authentication: browsers never send credentials with it.
        let methods = match rt {
            Route::Chat => Some("POST, OPTIONS"),
            Route::Models | Route::Model => Some("GET, HEAD, OPTIONS"),
            _ => None,
        };
        if let Some(methods) = methods {
            return HeadAction::Respond(cors::preflight(gw, head, methods));
        }
    }
    let r = match rt {
        Route::Health if get_like => Ok(Response::json(200, br#"{"ok":true,"status":"live"}"#.to_vec())),
        Route::Ready if get_like => Ok(if gw.is_ready() {
            Response::json(200, br#"{"ready":true}"#.to_vec())
        } else {
            Response::json(503, br#"{"ready":false}"#.to_vec())
        }),
        Route::Metrics if get_like => metrics(gw, head, ip),
        Route::Health | Route::Ready | Route::Metrics => Err(ApiError::method_not_allowed(m, path, "GET, HEAD")),
        Route::Chat | Route::Models | Route::Model if !gw.config().gateway.chat_completions => Err(disabled()),
        Route::Chat if m != "POST" => Err(ApiError::method_not_allowed(m, path, "POST")),
        Route::Models | Route::Model if !get_like => Err(ApiError::method_not_allowed(m, path, "GET, HEAD")),
        Route::Chat => match check_auth(gw, head, ip) {
            Err(e) => Err(e),
            Ok(()) => {
                let limit = gw.config().gateway.max_body_bytes;
                return match head.body {
                    Some(Framing::Length(n)) if n > limit => Err(ApiError::too_large(limit)),
                    _ => Ok(HeadAction::ReadBody { limit, continue_100: head.expect_continue && head.minor >= 1 }),
                }
                .unwrap_or_else(|e: ApiError| HeadAction::Respond(with_headers(e.response(), api_headers(gw, head))));
            }
        },
        Route::Models => check_auth(gw, head, ip).map(|_| Response::json(200, openai::list_models(gw))),
        Route::Model => check_auth(gw, head, ip)
            .and_then(|_| openai::get_model(gw, &path["/v1/models/".len()..]))
            .map(|b| Response::json(200, b)),
        Route::NotFound if path == "/" && m == "GET" && is_ws_upgrade(head) => return HeadAction::Upgrade,
        Route::NotFound => Err(ApiError::not_found(m, path)),
    };
    let resp = r.unwrap_or_else(|e| e.response());
    HeadAction::Respond(if is_api(path) { with_headers(resp, api_headers(gw, head)) } else { resp })
}

/// `resp` with `headers` added.
pub fn with_headers(mut resp: Response, headers: Vec<(&'static str, String)>) -> Response {
    resp.headers.extend(headers);
    resp
}
