//! gatelet: a small-footprint agent gateway.
//!
//! One binary serves HTTP/1.1 and WebSocket on one port and exposes an OpenAI-compatible
//! `POST /v1/chat/completions` endpoint whose requests run as agent runs on a worker pool.
//! Protocol layers (`http`, `sse`, and in `ws` the handshake, frame codec and RFC 6455
//! connection) are pure byte-in/byte-out codecs; `rpc` speaks the gateway protocol on top;
//! `server` is the thin mio shell that moves bytes between sockets, codecs and workers.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, unused_must_use)]
#![warn(missing_docs)]

pub mod agent;
pub mod auth;
pub mod cli;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod gateway;
pub mod http;
pub mod log;
pub mod metrics;
pub mod openai;
pub mod rpc;
pub mod server;
pub mod session;
pub mod sse;
pub mod util;
pub mod ws;
