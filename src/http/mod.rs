//! HTTP/1.1 codecs: request head and framing, chunked bodies, responses, the upstream client codec and base URLs.

pub mod chunked;
pub mod head;
#[cfg(feature = "tls")]
pub mod pem;
pub mod response;
pub mod upstream;
pub mod url;
