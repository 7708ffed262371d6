//! The loop's side of the WebSocket gateway protocol's [`rpc::Outbox`].

use super::{Done, Notifier};
use crate::rpc;

/// One WebSocket connection's outbox: the loop's channel, addressed by slot and connection id
/// (slots are reused; the loop drops messages for a connection that is gone).
#[derive(Debug)]
pub(super) struct ConnOutbox {
    /// The connection's notifier, which counts the bytes its runs have on the way.
    pub notifier: Notifier,
    /// Connection slot.
    pub slot: usize,
    /// Connection id.
    pub id: u64,
}

impl rpc::Outbox for ConnOutbox {
    fn post(&self, msg: rpc::Outgoing) {
        self.notifier.send(Done::Ws { slot: self.slot, id: self.id, msg });
    }

    fn congested(&self) -> bool {
        self.notifier.congested()
    }
}
