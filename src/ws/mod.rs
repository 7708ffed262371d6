//! WebSocket on the gateway's port: the RFC 6455 handshake and frame codec, and the gateway
//! protocol (SPEC §8) spoken over it.
//!
//! Layers, each pure: [`handshake`] (upgrade request → `101` bytes or an HTTP error),
//! [`frame`] and [`utf8`] (client bytes → messages, messages → server frames), [`conn`] (one
//! RFC 6455 connection: pings, close handshake, limits, its timer), [`protocol`]
//! (JSON frames), [`session`] (one connection's state machine). [`run`] is the worker side of a
//! run started over WebSocket; it reaches the connection through the event loop.

pub mod conn;
pub mod frame;
pub mod handshake;
pub mod protocol;
pub mod run;
pub mod session;
pub mod utf8;

pub use session::Session;

use crate::agent::registry::RunSummary;

/// A message from a run or a waiter (on a worker thread) to a WebSocket connection.
#[derive(Debug)]
pub enum Outgoing {
    /// A complete `res` frame.
    Res(String),
    /// An event payload; the connection adds its own `seq`.
    Event {
        /// Event name.
        name: &'static str,
        /// Rendered JSON payload.
        payload: String,
    },
    /// A run this connection started has ended.
    RunEnded {
        /// Its id.
        run_id: String,
    },
    /// A run watched by `agent.wait` (or a duplicate `agent` request) ended.
    Waited {
        /// Which pending wait.
        token: u64,
        /// How the run ended.
        summary: Box<RunSummary>,
    },
}
