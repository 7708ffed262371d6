//! The global budget for request bodies in flight (`gateway.http.maxBodyBytesInFlight`): bytes
//! of chat bodies the gateway holds at once, from the first byte read until a worker has parsed
//! them. Without it, memory for bodies would be bounded only by `maxConnections × maxBodyBytes`.
//!
//! A body declared with `Content-Length` takes its whole length when its head arrives; a chunked
//! body takes bytes as they are decoded. A body that does not fit is refused with 503
//! `overloaded` and `Retry-After` (as a full run queue is) rather than left waiting: waiting
//! bodies holding part of the budget could wait on one another until their stall timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Body bytes held across all connections.
#[derive(Debug, Default)]
pub struct BodyBudget {
    used: AtomicU64,
}

impl BodyBudget {
    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: u64, limit: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |u| u.checked_add(n).filter(|t| *t <= limit))
            .is_ok()
    }
}

/// One body's share of the budget, given back when dropped (by the worker, once the body is
/// parsed, or by the loop when the request ends early).
#[derive(Debug)]
pub struct Ticket {
    budget: Arc<BodyBudget>,
    held: u64,
}

impl Ticket {
    /// A ticket holding nothing yet.
    pub fn new(budget: &Arc<BodyBudget>) -> Self {
        Ticket { budget: budget.clone(), held: 0 }
    }

    /// Hold `total` bytes (no-op when already held); false when that would take the budget
    /// over `limit` (nothing more is taken then).
    pub fn hold(&mut self, total: u64, limit: u64) -> bool {
        if total <= self.held {
            return true;
        }
        if !self.budget.take(total - self.held, limit) {
            return false;
        }
        self.held = total;
        true
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_share_one_budget_and_give_it_back_when_dropped() {
        let b = Arc::new(BodyBudget::default());
        let mut a = Ticket::new(&b);
        let mut c = Ticket::new(&b);
        assert!(a.hold(60, 100));
        assert!(!c.hold(41, 100), "over the budget");
        assert_eq!(b.used(), 60, "a refusal takes nothing");
        assert!(c.hold(40, 100));
        // Growing (a chunked body) takes only the difference.
        assert!(a.hold(60, 100));
        assert!(!a.hold(61, 100));
        drop(a);
        assert_eq!(b.used(), 40);
        assert!(c.hold(100, 100));
        drop(c);
        assert_eq!(b.used(), 0);
    }
}
