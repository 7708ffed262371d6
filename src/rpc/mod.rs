//! The WebSocket gateway protocol (SPEC §8): the second surface beside the OpenAI HTTP one.
//!
//! [`protocol`] parses request frames and renders answers and events; [`session`] is one
//! connection's state machine on the event loop, above the RFC 6455 connection
//! ([`crate::ws::conn`]); a connection's lane hands its text messages, in order, to the request
//! workers (`gatelet-rpc` threads), which parse, validate, resolve and answer them; [`run`] is
//! the worker side of a run started over WebSocket. The event loop never parses a request: it
//! decodes frames, answers pings, runs the close handshake, enforces the limits and timers, and
//! frames what the workers post. This surface reaches the loop only through [`Outbox`], which
//! the server implements: nothing here knows about sockets or the loop.

mod handler;
mod lane;
pub mod protocol;
pub mod run;
pub mod session;

pub use session::Session;

use std::fmt;

/// Where a connection's messages go from other threads (runs, waiters, the store thread): the
/// event loop, which frames them onto that connection. Implemented by the server.
pub trait Outbox: Send + Sync + fmt::Debug {
    /// Post `msg` to the connection (dropped if the connection is gone).
    fn post(&self, msg: Outgoing);
    /// Whether the connection is behind (bytes on their way to it over its bound): mergeable
    /// events should wait and merge into the next one.
    fn congested(&self) -> bool;
}

/// A message from a request worker, a run or a waiter (on another thread) to a WebSocket
/// connection.
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
    /// `connect` succeeded: open the connection and send this `hello-ok` response.
    Connected {
        /// The rendered response.
        hello: String,
    },
    /// Close the connection with `code`, after sending `res` if there is one (a refused
    /// `connect`, a binary message).
    Close {
        /// A `res` frame to send first.
        res: Option<String>,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// Every message decoded before the connection started closing has been answered: its
    /// close frame may go now.
    Drained,
    /// Room again in the connection's request queue, or a new `agent.wait` deadline: read on
    /// and re-arm the timer.
    Wake,
}

impl Outgoing {
    /// About how many bytes this message will put on the wire (what the loop counts against a
    /// connection's outbound bound).
    pub fn wire_len(&self) -> usize {
        match self {
            Outgoing::Res(t) | Outgoing::Connected { hello: t } => t.len(),
            Outgoing::Event { payload, .. } => payload.len(),
            Outgoing::Close { res, .. } => res.as_ref().map_or(64, String::len),
            Outgoing::RunEnded { .. } | Outgoing::Wake | Outgoing::Drained => 64,
        }
    }
}
