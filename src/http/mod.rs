//! HTTP/1.1 codecs: request head and framing, chunked bodies, responses, upstream base URLs.

pub mod chunked;
pub mod head;
#[cfg(feature = "tls")]
pub mod pem;
pub mod response;
pub mod url;
