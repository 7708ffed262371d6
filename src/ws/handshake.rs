//! The RFC 6455 §4.2 server handshake.

use crate::http::head::Head;
use crate::http::response::Response;
use crate::openai::ApiError;

/// Validate an upgrade request: the `101` response bytes, or the error response.
pub fn accept(_head: &Head) -> Result<Vec<u8>, Response> {
    Err(ApiError::not_found("GET", "/").response())
}
