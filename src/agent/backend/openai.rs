//! The `openai` backend: an upstream OpenAI-compatible server, always called with streaming.

use crate::agent::{Backend, EventSink, RunControl, RunError, RunInput};
use crate::config::OpenAiBackendConfig;

/// Upstream OpenAI-compatible server.
#[derive(Debug)]
pub struct OpenAi {
    cfg: OpenAiBackendConfig,
}

impl OpenAi {
    /// A backend for `cfg`.
    pub fn new(cfg: OpenAiBackendConfig) -> Self {
        OpenAi { cfg }
    }
}

impl Backend for OpenAi {
    fn run(&self, _input: &RunInput, _ctl: &RunControl, _out: &mut dyn EventSink) -> Result<(), RunError> {
        Err(RunError::Backend(format!("openai backend at {} is not implemented yet", self.cfg.base_url)))
    }
}
