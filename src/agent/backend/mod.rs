//! Backends: `echo` (built in), `openai` (upstream server), `command` (a program per run).

pub mod client;
pub mod command;
mod delta_scan;
pub mod echo;
pub mod openai;
pub mod upstream;

use std::sync::Arc;

use super::Backend;
use crate::config::BackendConfig;

/// Build the backend described by `cfg`.
pub fn build(cfg: &BackendConfig) -> Arc<dyn Backend> {
    match cfg {
        BackendConfig::Echo { token_delay, max_tokens } => {
            Arc::new(echo::Echo { token_delay: *token_delay, max_tokens: *max_tokens })
        }
        BackendConfig::OpenAi(c) => Arc::new(openai::OpenAi::new(c.clone())),
        BackendConfig::Command(c) => Arc::new(command::Command::new(c.clone())),
    }
}
