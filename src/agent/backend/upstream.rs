//! Upstream exchanges as a run sees them: the client codec ([`crate::http::upstream`]) and why an
//! exchange stopped early ([`Stop`]).

pub use crate::http::upstream::*;

use crate::agent::RunError;

/// Why an upstream exchange stopped early: the run's own cancel/deadline, or the upstream.
#[derive(Debug)]
pub enum Stop {
    /// From [`crate::agent::RunControl::check`] or the event sink.
    Run(RunError),
    /// The upstream failed.
    Upstream(UpstreamError),
}

impl From<RunError> for Stop {
    fn from(e: RunError) -> Self {
        Stop::Run(e)
    }
}

impl From<UpstreamError> for Stop {
    fn from(e: UpstreamError) -> Self {
        Stop::Upstream(e)
    }
}
