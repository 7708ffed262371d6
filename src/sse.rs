//! Server-Sent Events decoding, for reading upstream streams.
