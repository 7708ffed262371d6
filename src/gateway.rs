//! The shared state of a running gateway: config, agents, sessions, worker pool, authorizer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::agent::Backend;
use crate::agent::backend;
use crate::agent::pool::Pool;
use crate::agent::registry::Registry;
use crate::auth::Authorizer;
use crate::config::{AgentConfig, Config};
use crate::session::SessionStore;

/// A configured agent with its backend.
#[derive(Debug)]
pub struct Agent {
    /// Its configuration.
    pub cfg: AgentConfig,
    /// The backend answering its runs.
    pub backend: Arc<dyn Backend>,
}

/// Everything the surfaces (HTTP, WebSocket, CLI) share.
#[derive(Debug)]
pub struct Gateway {
    /// The validated configuration.
    pub config: Config,
    /// Agents, in config order.
    pub agents: Vec<Agent>,
    /// Sticky sessions.
    pub sessions: SessionStore,
    /// Agent-run workers.
    pub pool: Pool,
    /// Secret checks and the failure limiter.
    pub auth: Authorizer,
    /// Runs addressable by id (WebSocket `agent.wait`, `chat.abort`, idempotency).
    pub runs: Registry,
    ready: AtomicBool,
}

impl Gateway {
    /// Build the gateway; returns warnings from loading sessions.
    pub fn new(config: Config) -> (Self, Vec<String>) {
        Self::with_store_writer(config, true)
    }

    /// Build the gateway; `owner` is false for a process that shares the state dir with a
    /// running gateway (`gatelet agent` while one runs): it appends turns but never rewrites the
    /// session index snapshot or removes idle sessions.
    pub fn with_store_writer(config: Config, owner: bool) -> (Self, Vec<String>) {
        let agents =
            config.agents.iter().map(|a| Agent { cfg: a.clone(), backend: backend::build(&a.backend) }).collect();
        let (sessions, warnings) = SessionStore::open_with(
            &config.state_dir,
            crate::session::StoreOptions { background: owner, ..crate::session::options(&config) },
        );
        let g = &config.gateway;
        let pool = Pool::new(g.workers, g.max_queued_runs, g.max_runs_per_ip);
        let auth = Authorizer::new(&config.gateway.auth);
        (
            Gateway { config, agents, sessions, pool, auth, runs: Registry::new(), ready: AtomicBool::new(false) },
            warnings,
        )
    }

    /// Index of the agent with this id (case-insensitive).
    pub fn agent_index(&self, id: &str) -> Option<usize> {
        self.agents.iter().position(|a| a.cfg.id.eq_ignore_ascii_case(id))
    }

    /// Index of the default agent.
    pub fn default_agent(&self) -> usize {
        self.config.default_agent
    }

    /// Whether `/ready` answers 200.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Set readiness (false while starting and draining).
    pub fn set_ready(&self, r: bool) {
        self.ready.store(r, Ordering::SeqCst);
    }
}
