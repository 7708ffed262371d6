//! The shared state of a running gateway: config, agents, sessions, worker pool, authorizer.
//!
//! A config reload builds a new [`Gateway`] with [`Gateway::reloaded`]: config, agents and
//! secrets are new, while sessions, the worker pool, the run registry, the failure limiter and
//! readiness are shared with the old one. Work in flight keeps the `Arc<Gateway>` it started
//! with, so it finishes under the config it started with.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use crate::agent::Agent;
use crate::agent::backend;
use crate::agent::pool::Pool;
use crate::agent::registry::Registry;
use crate::auth::Authorizer;
use crate::config::Config;
use crate::session::SessionStore;

/// Everything the surfaces (HTTP, WebSocket, CLI) share.
#[derive(Debug)]
pub struct Gateway {
    /// The validated configuration.
    config: Config,
    /// Agents, in config order.
    agents: Vec<Agent>,
    /// Sticky sessions.
    sessions: Arc<SessionStore>,
    /// Agent-run workers.
    pool: Arc<Pool>,
    /// Secret checks and the failure limiter.
    auth: Authorizer,
    /// Runs addressable by id (WebSocket `agent.wait`, `chat.abort`, idempotency).
    runs: Arc<Registry>,
    ready: Arc<AtomicBool>,
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
        let agents = build_agents(&config, &[]);
        let (sessions, warnings) = SessionStore::open_with(
            &config.state_dir,
            crate::session::StoreOptions { background: owner, ..crate::session::options(&config) },
        );
        let g = &config.gateway;
        let pool = Pool::new(g.workers, g.max_queued_runs, g.max_runs_per_ip);
        let auth = Authorizer::new(&config.gateway.auth);
        let gw = Gateway {
            config,
            agents,
            sessions: Arc::new(sessions),
            pool: Arc::new(pool),
            auth,
            runs: Arc::new(Registry::new()),
            ready: Arc::new(AtomicBool::new(false)),
        };
        (gw, warnings)
    }

    /// The gateway for a reloaded `config`, sharing this one's sessions, workers, run registry,
    /// failure limiter and readiness. Agents whose backend config is unchanged keep their
    /// backend (and its pooled upstream connections). Returns the settings that only a restart
    /// changes, for a warning.
    pub fn reloaded(&self, config: Config) -> (Gateway, Vec<&'static str>) {
        let (old, new) = (&self.config, &config);
        let mut restart = Vec::new();
        if (old.gateway.bind, old.gateway.port) != (new.gateway.bind, new.gateway.port) {
            restart.push("gateway.port / gateway.bind");
        }
        if old.gateway.workers != new.gateway.workers {
            restart.push("gateway.workers");
        }
        if old.state_dir != new.state_dir || old.persist_sessions != new.persist_sessions {
            restart.push("the state directory / session.persist");
        }
        if (old.session_max_history, old.session_idle_days) != (new.session_max_history, new.session_idle_days) {
            restart.push("session.maxHistoryMessages / session.idleDays");
        }
        self.pool.set_max_queued(new.gateway.max_queued_runs);
        self.pool.set_max_per_ip(new.gateway.max_runs_per_ip);
        let gw = Gateway {
            agents: build_agents(&config, &self.agents),
            auth: Authorizer::reloaded(&config.gateway.auth, &self.auth),
            config,
            sessions: self.sessions.clone(),
            pool: self.pool.clone(),
            runs: self.runs.clone(),
            ready: self.ready.clone(),
        };
        (gw, restart)
    }

    /// The validated configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Agents, in config order.
    pub fn agents(&self) -> &[Agent] {
        &self.agents
    }

    /// Sticky sessions (shared with workers, hence the `Arc`).
    pub fn sessions(&self) -> &Arc<SessionStore> {
        &self.sessions
    }

    /// Agent-run workers.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Secret checks and the failure limiter.
    pub fn auth(&self) -> &Authorizer {
        &self.auth
    }

    /// Runs addressable by id (WebSocket `agent.wait`, `chat.abort`, idempotency; shared with
    /// workers).
    pub fn runs(&self) -> &Arc<Registry> {
        &self.runs
    }

    /// The agents' ids, comma-separated (for log lines).
    pub fn agent_ids(&self) -> String {
        self.agents.iter().map(|a| a.cfg.id.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Index of the agent with this id (case-insensitive).
    pub fn agent_index(&self, id: &str) -> Option<usize> {
        crate::agent::resolve::agent_index(&self.agents, id)
    }

    /// Index of the default agent.
    pub fn default_agent(&self) -> usize {
        self.config.default_agent
    }

    /// The model ids the gateway lists (HTTP `/v1/models`, WebSocket `models.list`): `gatelet`,
    /// `gatelet/default`, then `gatelet/<id>` per agent.
    pub fn model_ids(&self) -> Vec<String> {
        let mut v = vec!["gatelet".to_string(), "gatelet/default".to_string()];
        v.extend(self.agents.iter().map(|a| format!("gatelet/{}", a.cfg.id)));
        v
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

/// The agents of `config`, reusing the backend of an agent in `old` with the same id and backend
/// config.
fn build_agents(config: &Config, old: &[Agent]) -> Vec<Agent> {
    config
        .agents
        .iter()
        .map(|a| {
            let backend = match old.iter().find(|o| o.cfg.id == a.id && o.cfg.backend == a.backend) {
                Some(o) => o.backend.clone(),
                None => backend::build(&a.backend),
            };
            Agent { cfg: a.clone(), backend, stats: crate::metrics::agent(&a.id) }
        })
        .collect()
}
