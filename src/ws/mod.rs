//! WebSocket (RFC 6455) on the gateway's port, and nothing above it.
//!
//! Layers, each pure: [`handshake`] (upgrade request → `101` bytes or a [`handshake::HandshakeError`]),
//! [`frame`] and [`utf8`] (client bytes → messages, messages → server frames), [`conn`] (one
//! RFC 6455 connection: pings, close handshake, limits, its timer). The gateway protocol spoken
//! over it is [`crate::rpc`].

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod utf8;
