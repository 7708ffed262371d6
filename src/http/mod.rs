//! HTTP/1.1 codecs: request head, message framing and bodies (shared by the server and the upstream
//! client), chunked bodies, responses, the upstream client codec and base URLs.

pub mod chunked;
pub mod framing;
pub mod head;
#[cfg(feature = "tls")]
pub mod pem;
pub mod response;
pub mod upstream;
pub mod url;
