//! The `command` backend: runs a program per turn.

use crate::agent::{Backend, EventSink, RunControl, RunError, RunInput};
use crate::config::CommandBackendConfig;

/// A program run per turn.
#[derive(Debug)]
pub struct Command {
    cfg: CommandBackendConfig,
}

impl Command {
    /// A backend for `cfg`.
    pub fn new(cfg: CommandBackendConfig) -> Self {
        Command { cfg }
    }
}

impl Backend for Command {
    fn run(&self, _input: &RunInput, _ctl: &RunControl, _out: &mut dyn EventSink) -> Result<(), RunError> {
        Err(RunError::Backend(format!("command backend {:?} is not implemented yet", self.cfg.argv)))
    }
}
