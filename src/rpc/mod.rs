//! The WebSocket gateway protocol (SPEC §8): the second surface beside the OpenAI HTTP one.
//!
//! [`protocol`] parses request frames and renders answers and events; [`session`] is one
//! connection's state machine above the RFC 6455 connection ([`crate::ws::conn`]); [`run`] is the
//! worker side of a run started over WebSocket. This surface reaches the event loop only through
//! [`Outbox`], which the server implements: nothing here knows about sockets or the loop.

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

use crate::agent::registry::RunSummary;
use protocol::{FrameError, Request};

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
    /// A large text message, parsed off the loop (see [`session::PARSE_OFF_LOOP`]).
    Parsed(Box<Result<Request, FrameError>>),
    /// A run watched by `agent.wait` (or a duplicate `agent` request) ended.
    Waited {
        /// Which pending wait.
        token: u64,
        /// How the run ended.
        summary: Box<RunSummary>,
    },
}

impl Outgoing {
    /// About how many bytes this message will put on the wire (what the loop counts against a
    /// connection's outbound bound).
    pub fn wire_len(&self) -> usize {
        match self {
            Outgoing::Res(t) => t.len(),
            Outgoing::Event { payload, .. } => payload.len(),
            Outgoing::RunEnded { .. } | Outgoing::Waited { .. } | Outgoing::Parsed(_) => 64,
        }
    }
}
