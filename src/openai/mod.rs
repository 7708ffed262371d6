//! The OpenAI-compatible surface: error envelopes, `/v1/models`, chat request parsing and
//! response/chunk encoding.

pub mod chat;
pub mod error;

pub use error::ApiError;

use serde_json::json;

use crate::gateway::Gateway;

fn model_json(id: &str) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": "gatelet" })
}

/// `GET /v1/models`.
pub fn list_models(gw: &Gateway) -> Vec<u8> {
    let data: Vec<_> = gw.model_ids().iter().map(|id| model_json(id)).collect();
    serde_json::to_vec(&json!({ "object": "list", "data": data })).unwrap_or_default()
}

/// `GET /v1/models/{id}` (`id` still percent-encoded).
pub fn get_model(gw: &Gateway, raw_id: &str) -> Result<Vec<u8>, ApiError> {
    let id = percent_decode(raw_id)
        .ok_or_else(|| ApiError::invalid_value("model", "model id is not valid percent-encoded UTF-8"))?;
    gw.model_ids()
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
    fn percent() {
        assert_eq!(percent_decode("gatelet%2Fmain").as_deref(), Some("gatelet/main"));
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_decode("%ff"), None);
    }
}
