//! WebSocket: RFC 6455 handshake and frame codec, and the gateway protocol over it.

pub mod handshake;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::gateway::Gateway;
use crate::server::Notifier;

/// A message from a run (on a worker thread) to a WebSocket connection.
#[derive(Debug)]
pub enum Outgoing {
    /// One JSON text frame.
    Text(String),
}

/// One WebSocket connection's protocol state.
#[derive(Debug)]
pub struct Session {
    closed: bool,
}

impl Session {
    /// A new session, right after the handshake response.
    pub fn new(_gw: &Arc<Gateway>, _now: Instant, _out: &mut Vec<u8>) -> Self {
        Session { closed: true }
    }

    /// Consume client bytes, queueing frames to send in `out`. Returns bytes consumed.
    #[allow(clippy::too_many_arguments)]
    pub fn on_bytes(
        &mut self,
        input: &[u8],
        _out: &mut Vec<u8>,
        _gw: &Arc<Gateway>,
        _slot: usize,
        _conn_id: u64,
        _notifier: &Notifier,
        _ip: IpAddr,
    ) -> usize {
        input.len()
    }

    /// A message from a run.
    pub fn outgoing(&mut self, _msg: Outgoing, _out: &mut Vec<u8>) {}

    /// Timers (handshake deadline, ticks).
    pub fn on_timer(&mut self, _now: Instant, _out: &mut Vec<u8>) {}

    /// The gateway is stopping: queue the `shutdown` event and a close frame.
    pub fn on_shutdown(&mut self, _out: &mut Vec<u8>) {
        self.closed = true;
    }

    /// The peer went away: abort this connection's runs.
    pub fn on_eof(&mut self) {}

    /// Whether the connection should close once `out` is flushed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}
