//! Which agent answers a run, and under which session key: the rules every surface shares
//! (HTTP SPEC §5, WebSocket SPEC §8, `gatelet agent`). Errors are typed; each surface renders
//! them in its own words (`openai::ApiError::from`, `rpc::protocol::ErrorShape::from`, the CLI).

use std::fmt;

use super::Agent;
use crate::session::{self, KeyError};

/// Why a run's agent or session key could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// An agent id (`x-gatelet-agent-id`, `agentId`, `--agent`, or a `gatelet/<id>`-style model)
    /// names no configured agent.
    NoAgent(String),
    /// `model` names neither an agent nor one of the gateway's own model names.
    UnknownModel(String),
    /// The given session key breaks the key rule.
    Key(KeyError),
    /// The session key (`agent:<id>:…`) belongs to another agent than the one asked for.
    KeyOfOtherAgent {
        /// The agent named by the key.
        key_agent: String,
        /// The agent asked for.
        agent: String,
    },
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::NoAgent(id) => write!(f, "no agent {id:?} is configured"),
            ResolveError::UnknownModel(m) => write!(f, "the model {m:?} names no agent"),
            ResolveError::Key(e) => write!(f, "the session key {e}"),
            ResolveError::KeyOfOtherAgent { key_agent, agent } => {
                write!(f, "the session key belongs to agent {key_agent}, not {agent}")
            }
        }
    }
}

impl std::error::Error for ResolveError {}

impl From<KeyError> for ResolveError {
    fn from(e: KeyError) -> Self {
        ResolveError::Key(e)
    }
}

/// Index of the agent with this id (case-insensitive).
pub fn agent_index(agents: &[Agent], id: &str) -> Option<usize> {
    agents.iter().position(|a| a.cfg.id.eq_ignore_ascii_case(id))
}

fn by_id(agents: &[Agent], id: &str) -> Result<usize, ResolveError> {
    agent_index(agents, id).ok_or_else(|| ResolveError::NoAgent(id.to_string()))
}

/// The HTTP rule (SPEC §5): an explicit agent id (`x-gatelet-agent-id`) > `model` > the default
/// agent. `model` may be `gatelet`, `gatelet/default`, `gatelet/<id>`, `gatelet:<id>`,
/// `agent:<id>` or a bare agent id.
pub fn agent_for_model(
    agents: &[Agent],
    default: usize,
    explicit: Option<&str>,
    model: Option<&str>,
) -> Result<usize, ResolveError> {
    if let Some(h) = explicit.filter(|h| !h.is_empty()) {
        return by_id(agents, h);
    }
    let Some(model) = model.map(str::trim).filter(|m| !m.is_empty()) else { return Ok(default) };
    let lower = model.to_ascii_lowercase();
    if lower == "gatelet" || lower == "gatelet/default" {
        return Ok(default);
    }
    for prefix in ["gatelet/", "gatelet:", "agent:"] {
        if let Some(id) = lower.strip_prefix(prefix) {
            return by_id(agents, id);
        }
    }
    agent_index(agents, &lower).ok_or_else(|| ResolveError::UnknownModel(model.to_string()))
}

/// The WebSocket and CLI rule (SPEC §8): an explicit agent id wins; otherwise a key of the form
/// `agent:<id>:…` names its agent; otherwise the default agent. Returns the agent, the session
/// key as runs store it ([`session::key_for`]) and whether it is sticky.
pub fn agent_for_key(
    agents: &[Agent],
    default: usize,
    explicit: Option<&str>,
    key: Option<&str>,
) -> Result<(usize, String, bool), ResolveError> {
    let from_key = key.and_then(session::agent_of);
    let agent = match (explicit, from_key) {
        (Some(a), Some(k)) if !a.eq_ignore_ascii_case(k) => {
            return Err(ResolveError::KeyOfOtherAgent { key_agent: k.to_string(), agent: a.to_string() });
        }
        (Some(a), _) | (None, Some(a)) => by_id(agents, a)?,
        (None, None) => default,
    };
    let (key, sticky) = session::key_for(&agents[agent].cfg.id, key, None)?;
    Ok((agent, key, sticky))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Overrides};

    struct Agents {
        agents: Vec<Agent>,
    }

    fn gateway() -> Agents {
        let text =
            "{ gateway: { auth: { token: 't' } }, agents: { list: [ { id: 'main', default: true }, { id: 'alt' } ] } }";
        let cfg = config::parse(text, None, std::env::temp_dir(), &Overrides::default(), &|_| None).unwrap();
        let agents = cfg
            .agents
            .iter()
            .map(|a| Agent {
                cfg: a.clone(),
                backend: crate::agent::backend::build(&a.backend),
                stats: crate::metrics::agent(&a.id),
            })
            .collect();
        Agents { agents }
    }

    #[test]
    fn http_rule_header_then_model_then_default() {
        let gw = gateway();
        let a = |h: Option<&str>, m: Option<&str>| agent_for_model(&gw.agents, 0, h, m);
        assert_eq!(a(None, None), Ok(0));
        assert_eq!(a(Some("ALT"), Some("gatelet/main")), Ok(1));
        for m in ["gatelet", "gatelet/default", " "] {
            assert_eq!(a(None, Some(m)), Ok(0), "{m}");
        }
        for m in ["gatelet/alt", "gatelet:alt", "agent:alt", "Alt"] {
            assert_eq!(a(None, Some(m)), Ok(1), "{m}");
        }
        assert_eq!(a(Some("ghost"), None), Err(ResolveError::NoAgent("ghost".into())));
        assert_eq!(a(None, Some("gatelet/ghost")), Err(ResolveError::NoAgent("ghost".into())));
        assert_eq!(a(None, Some("gpt-4o")), Err(ResolveError::UnknownModel("gpt-4o".into())));
    }

    #[test]
    fn key_rule_agent_id_then_key_then_default() {
        let gw = gateway();
        let r = |a: Option<&str>, k: Option<&str>| agent_for_key(&gw.agents, 0, a, k);
        assert_eq!(r(None, Some("room")), Ok((0, "agent:main:room".into(), true)));
        assert_eq!(r(None, Some("agent:alt:room")), Ok((1, "agent:alt:room".into(), true)));
        assert_eq!(r(Some("alt"), Some("room")), Ok((1, "agent:alt:room".into(), true)));
        assert_eq!(
            r(Some("main"), Some("agent:alt:room")),
            Err(ResolveError::KeyOfOtherAgent { key_agent: "alt".into(), agent: "main".into() })
        );
        assert_eq!(r(None, Some("agent:ghost:x")), Err(ResolveError::NoAgent("ghost".into())));
        assert_eq!(r(None, Some("tab\there")), Err(ResolveError::Key(KeyError::Invalid)));
        let (agent, key, sticky) = r(None, None).unwrap();
        assert!(agent == 0 && key.starts_with("agent:main:openai:") && !sticky);
    }
}
