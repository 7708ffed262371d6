//! Configuration: a JSON5 file plus environment, validated into [`Config`].
//!
//! Every error names the file, line, column and key path (`gateway.auth.mode`); unknown keys are
//! warnings. Precedence follows SPEC §1: command line > environment > file > defaults.

pub mod locate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use locate::Locations;

/// Default port of the gateway.
pub const DEFAULT_PORT: u16 = 18789;

/// Default `gateway.workers`: runs mostly wait on upstreams and clients, not on the CPU, so the
/// pool is sized for concurrency (threads start on demand and idle ones exit).
pub const DEFAULT_WORKERS: usize = 256;

/// Default `gateway.listenBacklog`: the host's `net.core.somaxconn` (the kernel caps the backlog
/// there anyway), else 1024.
pub fn default_backlog() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1024)
}

/// How callers authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// `Authorization: Bearer <token>`.
    Token,
    /// `Authorization: Bearer <password>`.
    Password,
    /// Everyone is accepted (loopback only).
    None,
}

/// Opt-in per-IP limiter for failed authentications.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// Failures allowed within `window`.
    pub max_attempts: u32,
    /// Sliding window for counting failures.
    pub window: Duration,
    /// How long a client stays locked out.
    pub lockout: Duration,
    /// Never lock out loopback clients.
    pub exempt_loopback: bool,
}

/// `gateway.auth`.
#[derive(Clone, PartialEq)]
pub struct AuthConfig {
    /// Effective mode.
    pub mode: AuthMode,
    /// Token (config or `GATELET_GATEWAY_TOKEN`).
    pub token: Option<String>,
    /// Password (config or `GATELET_GATEWAY_PASSWORD`).
    pub password: Option<String>,
    /// Failure limiter, when configured.
    pub rate_limit: Option<RateLimitConfig>,
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("mode", &self.mode)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

/// `gateway.*`.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// Listening port.
    pub port: u16,
    /// Listening address.
    pub bind: IpAddr,
    /// Authentication.
    pub auth: AuthConfig,
    /// `gateway.http.endpoints.chatCompletions.enabled`.
    pub chat_completions: bool,
    /// `gateway.http.endpoints.chatCompletions.maxBodyBytes`.
    pub max_body_bytes: u64,
    /// `gateway.http.maxBodyBytesInFlight`: request-body bytes held at once across all
    /// connections (never less than `max_body_bytes`, so one largest body always fits).
    pub max_body_in_flight: u64,
    /// `gateway.http.headerTimeoutSeconds`: time to receive a whole request head.
    pub header_timeout: Duration,
    /// `gateway.http.idleTimeoutSeconds`: idle keep-alive connections are closed after this.
    pub idle_timeout: Duration,
    /// Worker threads for agent runs.
    pub workers: usize,
    /// Runs waiting for a worker before 503.
    pub max_queued_runs: usize,
    /// Open connections before new ones wait in the backlog.
    pub max_connections: usize,
    /// `gateway.maxConnectionsPerIp`: connections one address may hold; 0 = no limit.
    pub max_connections_per_ip: usize,
    /// `gateway.maxRunsPerIp`: runs (running or queued) one address may have; 0 = no limit.
    pub max_runs_per_ip: usize,
    /// `gateway.http.stallTimeoutSeconds`: a stream whose client takes no bytes this long is cut.
    pub stall_timeout: Duration,
    /// `gateway.listenBacklog`: the listen queue length (the host's `somaxconn` by default).
    pub listen_backlog: u32,
    /// SSE heartbeat interval; zero disables it.
    pub keepalive: Duration,
    /// `gateway.metrics.public`: `/metrics` without authentication.
    pub metrics_public: bool,
    /// `gateway.http.cors.allowOrigins`: exact origins, or `*`; empty = CORS off.
    pub cors_origins: Vec<String>,
    /// `gateway.log`.
    pub log: LogConfig,
    /// `gateway.drainTimeoutSeconds`: how long runs and streams may take to finish after
    /// SIGTERM/SIGINT.
    pub drain_timeout: Duration,
}

/// `gateway.log`: the file's logging settings (`GATELET_LOG` / `GATELET_LOG_FORMAT` win).
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// `level`: error, warn, info, debug, trace.
    pub level: Option<crate::log::Level>,
    /// `format`: "text" or "json".
    pub format: Option<String>,
    /// `accessLog`: one line per request at `info` (default true).
    pub access: bool,
}

/// How an agent produces replies.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendConfig {
    /// Built-in deterministic echo.
    Echo {
        /// Sleep between deltas.
        token_delay: Duration,
        /// Cut the reply after this many words (finish `length`).
        max_tokens: Option<u64>,
    },
    /// An upstream OpenAI-compatible server.
    OpenAi(OpenAiBackendConfig),
    /// A program run per turn.
    Command(CommandBackendConfig),
}

/// `backend: { kind: "openai", … }`.
#[derive(Clone, PartialEq)]
pub struct OpenAiBackendConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    /// Upstream model name (defaults to the agent id).
    pub model: Option<String>,
    /// Bearer token for the upstream.
    pub api_key: Option<String>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Longest silence tolerated from the upstream.
    pub read_timeout: Duration,
    /// `headers`: extra request headers, in file order.
    pub headers: Vec<(String, String)>,
    /// `maxIdleConnections`: keep-alive connections kept idle (0: none).
    pub max_idle: usize,
    /// `idleTimeoutMs`: idle connections are closed after this.
    pub idle_timeout: Duration,
    /// `caFile`, and the DER certificates read from it at start-up.
    pub ca_file: Option<PathBuf>,
    /// The certificates of `caFile` (DER), trusted instead of the bundled roots.
    pub ca_certs: Vec<Vec<u8>>,
    /// `fallbacks`: tried in order when this upstream fails before its first delta.
    pub fallbacks: Vec<OpenAiBackendConfig>,
}

impl fmt::Debug for OpenAiBackendConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackendConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("headers", &self.headers.iter().map(|(k, _)| (k, "<redacted>")).collect::<Vec<_>>())
            .field("max_idle", &self.max_idle)
            .field("idle_timeout", &self.idle_timeout)
            .field("ca_file", &self.ca_file)
            .field("fallbacks", &self.fallbacks)
            .finish()
    }
}

/// `backend: { kind: "command", … }`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandBackendConfig {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Extra environment variables.
    pub env: BTreeMap<String, String>,
}

/// One agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// `[a-z0-9][a-z0-9_-]{0,63}`.
    pub id: String,
    /// Prepended to every run's system prompt.
    pub system_prompt: String,
    /// Run deadline.
    pub timeout: Duration,
    /// How replies are produced.
    pub backend: BackendConfig,
    /// Tools the gateway runs itself when the model calls them.
    pub tools: Vec<AgentToolConfig>,
    /// Most agent-tool rounds per run before it ends with `length`.
    pub max_tool_steps: u32,
}

/// One agent tool: `{name, description, parameters, command: {argv, cwd?, env?, timeoutSeconds?}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentToolConfig {
    /// Function name offered to the model (`[A-Za-z0-9_-]{1,64}`).
    pub name: String,
    /// What the tool does, for the model.
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    pub parameters: Option<Value>,
    /// The program run per call (arguments JSON on stdin, result on stdout).
    pub command: CommandBackendConfig,
    /// Longest one call may run.
    pub timeout: Duration,
}

impl AgentToolConfig {
    /// The `tools` entry offered to the model.
    pub fn to_json(&self) -> Value {
        let mut f = Map::new();
        f.insert("name".into(), Value::from(self.name.clone()));
        if let Some(d) = &self.description {
            f.insert("description".into(), Value::from(d.clone()));
        }
        if let Some(p) = &self.parameters {
            f.insert("parameters".into(), p.clone());
        }
        serde_json::json!({ "type": "function", "function": f })
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    /// State directory (sessions).
    pub state_dir: PathBuf,
    /// `gateway.*`.
    pub gateway: GatewayConfig,
    /// Agents, at least one.
    pub agents: Vec<AgentConfig>,
    /// Index into `agents` of the default agent.
    pub default_agent: usize,
    /// `session.persist`.
    pub persist_sessions: bool,
    /// `session.maxHistoryMessages` (0 = no bound).
    pub session_max_history: usize,
    /// `session.idleDays` (`None` = keep sessions forever).
    pub session_idle_days: Option<u64>,
    /// True when no backend was configured anywhere (echo is used).
    pub implicit_echo: bool,
    /// Non-fatal findings (unknown keys).
    pub warnings: Vec<String>,
}

/// Command-line overrides, highest precedence.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config`.
    pub config_path: Option<PathBuf>,
    /// `--port`.
    pub port: Option<u16>,
    /// `--bind`.
    pub bind: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// Skip the listener safety checks (missing secrets, `none` off loopback): `gatelet agent`
    /// runs in process and serves nobody.
    pub no_listener: bool,
}

/// A configuration that cannot be used. `Display` gives one line per problem.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// One message per problem, each already prefixed with `file:line:col`.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(p)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Read access to environment variables (a closure in tests).
pub type EnvFn<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, with empty values treated as unset.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The state directory: `GATELET_STATE_DIR`, else `~/.gatelet`.
pub fn state_dir(env: EnvFn<'_>) -> PathBuf {
    if let Some(d) = env("GATELET_STATE_DIR") {
        return PathBuf::from(d);
    }
    let home = env("HOME").unwrap_or_else(|| ".".into());
    Path::new(&home).join(".gatelet")
}

/// Load and validate the configuration: file (if any), environment, then overrides.
pub fn load(ov: &Overrides, env: EnvFn<'_>) -> Result<Config, ConfigError> {
    let state = state_dir(env);
    let (path, explicit) = match (&ov.config_path, env("GATELET_CONFIG_PATH")) {
        (Some(p), _) => (p.clone(), true),
        (None, Some(p)) => (PathBuf::from(p), true),
        (None, None) => (state.join("gatelet.json"), false),
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => None,
        Err(e) => {
            return Err(ConfigError { problems: vec![format!("{}: cannot read config: {e}", path.display())] });
        }
    };
    let source = text.as_ref().map(|_| path.clone());
    parse(text.as_deref().unwrap_or("{}"), source, state, ov, env)
}

/// Parse and validate config text. `source` is used in messages.
pub fn parse(
    text: &str,
    source: Option<PathBuf>,
    state_dir: PathBuf,
    ov: &Overrides,
    env: EnvFn<'_>,
) -> Result<Config, ConfigError> {
    let file = source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "<defaults>".into());
    let root: Value = match json5::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let at = e.position().map(|p| format!(":{}:{}", p.line + 1, p.column + 1)).unwrap_or_default();
            return Err(ConfigError { problems: vec![format!("{file}{at}: invalid JSON5: {e}")] });
        }
    };
    let mut v = Validator { file, locs: locate::scan(text), problems: Vec::new(), warnings: Vec::new() };
    let cfg = v.config(&root, source, state_dir, ov, env);
    if v.problems.is_empty() {
        let mut cfg = cfg.expect("no problems means a config");
        cfg.warnings = v.warnings;
        Ok(cfg)
    } else {
        Err(ConfigError { problems: v.problems })
    }
}

struct Validator {
    file: String,
    locs: Locations,
    problems: Vec<String>,
    warnings: Vec<String>,
}

static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);

impl Validator {
    fn at(&self, path: &str) -> String {
        match self.locs.find(path) {
            Some((l, c)) => format!("{}:{l}:{c}", self.file),
            None => self.file.clone(),
        }
    }

    fn problem(&mut self, path: &str, msg: impl fmt::Display) {
        let p = format!("{}: `{path}`: {msg}", self.at(path));
        self.problems.push(p);
    }

    /// The object at `path` (absent or null → empty), warning about keys not in `known`.
    fn object<'v>(&mut self, v: Option<&'v Value>, path: &str, known: &[&str]) -> &'v Map<String, Value> {
        match v {
            None | Some(Value::Null) => &EMPTY,
            Some(Value::Object(m)) => {
                for k in m.keys() {
                    if !known.contains(&k.as_str()) {
                        let kp = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                        let w = format!("{}: unknown key `{kp}` (ignored)", self.at(&kp));
                        self.warnings.push(w);
                    }
                }
                m
            }
            Some(_) => {
                self.problem(path, "expected an object");
                &EMPTY
            }
        }
    }

    fn bool(&mut self, m: &Map<String, Value>, path: &str, key: &str, default: bool) -> bool {
        match m.get(key) {
            None | Some(Value::Null) => default,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                self.problem(&format!("{path}.{key}"), "expected true or false");
                default
            }
        }
    }

    fn uint(&mut self, m: &Map<String, Value>, path: &str, key: &str, default: u64, min: u64, max: u64) -> u64 {
        match m.get(key) {
            None | Some(Value::Null) => default,
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => n,
                _ => {
                    self.problem(&format!("{path}.{key}"), format!("expected an integer from {min} to {max}, got {v}"));
                    default
                }
            },
        }
    }

    fn string(&mut self, m: &Map<String, Value>, path: &str, key: &str) -> Option<String> {
        match m.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.problem(&format!("{path}.{key}"), format!("expected a string, got {v}"));
                None
            }
        }
    }

    fn config(
        &mut self,
        root: &Value,
        source: Option<PathBuf>,
        state_dir: PathBuf,
        ov: &Overrides,
        env: EnvFn<'_>,
    ) -> Option<Config> {
        let root = self.object(Some(root), "", &["gateway", "agents", "session"]);
        let gw = self.object(
            root.get("gateway"),
            "gateway",
            &[
                "port",
                "bind",
                "auth",
                "http",
                "workers",
                "maxQueuedRuns",
                "maxConnections",
                "keepaliveSeconds",
                "maxConnectionsPerIp",
                "maxRunsPerIp",
                "listenBacklog",
                "metrics",
                "log",
                "drainTimeoutSeconds",
            ],
        );

        // Port: --port > GATELET_GATEWAY_PORT > gateway.port > default.
        let mut port = self.uint(gw, "gateway", "port", DEFAULT_PORT as u64, 0, 65535) as u16;
        if let Some(p) = env("GATELET_GATEWAY_PORT") {
            match p.parse::<u16>() {
                Ok(n) => port = n,
                Err(_) => self.problems.push(format!("GATELET_GATEWAY_PORT: expected a port number, got {p:?}")),
            }
        }
        if let Some(p) = ov.port {
            port = p;
        }

        let bind_raw =
            ov.bind.clone().or_else(|| self.string(gw, "gateway", "bind")).unwrap_or_else(|| "loopback".into());
        let bind = match bind_raw.as_str() {
            "loopback" => IpAddr::V4(Ipv4Addr::LOCALHOST),
            "lan" => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            s => match s.parse::<IpAddr>() {
                Ok(ip) => ip,
                Err(_) => {
                    self.problem("gateway.bind", format!("expected \"loopback\", \"lan\" or an IP address, got {s:?}"));
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                }
            },
        };

        let auth = self.auth(gw.get("auth"), bind, ov, env);

        let http = self.object(
            gw.get("http"),
            "gateway.http",
            &[
                "endpoints",
                "headerTimeoutSeconds",
                "idleTimeoutSeconds",
                "stallTimeoutSeconds",
                "cors",
                "maxBodyBytesInFlight",
            ],
        );
        let eps = self.object(http.get("endpoints"), "gateway.http.endpoints", &["chatCompletions"]);
        let cc = self.object(
            eps.get("chatCompletions"),
            "gateway.http.endpoints.chatCompletions",
            &["enabled", "maxBodyBytes"],
        );
        let ccp = "gateway.http.endpoints.chatCompletions";
        let chat_completions = self.bool(cc, ccp, "enabled", false);
        let max_body_bytes = self.uint(cc, ccp, "maxBodyBytes", 20 * 1024 * 1024, 1, 1 << 40);
        let max_body_in_flight =
            self.uint(http, "gateway.http", "maxBodyBytesInFlight", 64 * 1024 * 1024, 1, 1 << 40).max(max_body_bytes);
        let header_timeout = self.uint(http, "gateway.http", "headerTimeoutSeconds", 30, 1, 3600);
        let idle_timeout = self.uint(http, "gateway.http", "idleTimeoutSeconds", 60, 1, 86400);
        let stall_timeout = self.uint(http, "gateway.http", "stallTimeoutSeconds", 10, 1, 3600);
        let workers = self.uint(gw, "gateway", "workers", DEFAULT_WORKERS as u64, 1, 4096) as usize;

        let gateway = GatewayConfig {
            port,
            bind,
            auth: auth?,
            chat_completions,
            max_body_bytes,
            max_body_in_flight,
            header_timeout: Duration::from_secs(header_timeout),
            idle_timeout: Duration::from_secs(idle_timeout),
            workers,
            max_queued_runs: self.uint(gw, "gateway", "maxQueuedRuns", 64, 0, 1_000_000) as usize,
            max_connections: self.uint(gw, "gateway", "maxConnections", 10_000, 1, 1_000_000) as usize,
            keepalive: Duration::from_secs(self.uint(gw, "gateway", "keepaliveSeconds", 15, 0, 86400)),
            max_connections_per_ip: self.uint(gw, "gateway", "maxConnectionsPerIp", 256, 0, 1_000_000) as usize,
            // Half the pool: one address can use a lot of it, never all of it.
            max_runs_per_ip: self.uint(gw, "gateway", "maxRunsPerIp", (workers as u64 / 2).max(1), 0, 1_000_000)
                as usize,
            stall_timeout: Duration::from_secs(stall_timeout),
            listen_backlog: self.uint(gw, "gateway", "listenBacklog", default_backlog() as u64, 1, 1 << 20) as u32,
            metrics_public: {
                let m = self.object(gw.get("metrics"), "gateway.metrics", &["public"]);
                self.bool(m, "gateway.metrics", "public", false)
            },
            cors_origins: self.cors(http.get("cors")),
            log: self.log(gw.get("log")),
            drain_timeout: Duration::from_secs(self.uint(gw, "gateway", "drainTimeoutSeconds", 10, 1, 86400)),
        };

        let (agents, default_agent, implicit_echo) = self.agents(root.get("agents"), env)?;

        let session = self.object(root.get("session"), "session", &["persist", "maxHistoryMessages", "idleDays"]);
        let persist_sessions = self.bool(session, "session", "persist", true);
        let session_max_history = self.uint(session, "session", "maxHistoryMessages", 200, 0, 1_000_000) as usize;
        let session_idle_days = Some(self.uint(session, "session", "idleDays", 0, 0, 36_500)).filter(|d| *d > 0);

        Some(Config {
            source,
            state_dir,
            gateway,
            agents,
            default_agent,
            persist_sessions,
            session_max_history,
            session_idle_days,
            implicit_echo,
            warnings: Vec::new(),
        })
    }

    fn cors(&mut self, v: Option<&Value>) -> Vec<String> {
        let p = "gateway.http.cors.allowOrigins";
        let c = self.object(v, "gateway.http.cors", &["allowOrigins"]);
        let list = match c.get("allowOrigins") {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Array(l)) => l,
            Some(_) => {
                self.problem(p, "expected an array of origins, e.g. [\"https://app.example\"] or [\"*\"]");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (i, o) in list.iter().enumerate() {
            match o.as_str() {
                // An origin is `scheme://host[:port]`, serialized without a path or a trailing slash.
                Some(s)
                    if s == "*"
                        || (s.contains("://") && !s.ends_with('/') && s.bytes().all(|b| b.is_ascii_graphic())) =>
                {
                    out.push(s.to_string())
                }
                _ => self.problem(
                    &format!("{p}[{i}]"),
                    format!(
                        "expected \"*\" or an origin like \"https://app.example\" (no path, no trailing slash), got {o}"
                    ),
                ),
            }
        }
        out
    }

    fn log(&mut self, v: Option<&Value>) -> LogConfig {
        let p = "gateway.log";
        let m = self.object(v, p, &["level", "format", "accessLog"]);
        let level = match self.string(m, p, "level") {
            None => None,
            Some(l) => match crate::log::Level::parse(&l) {
                Some(l) => Some(l),
                None => {
                    self.problem(
                        &format!("{p}.level"),
                        format!("expected error, warn, info, debug or trace, got {l:?}"),
                    );
                    None
                }
            },
        };
        let format = match self.string(m, p, "format") {
            None => None,
            Some(f) if f == "text" || f == "json" => Some(f),
            Some(f) => {
                self.problem(&format!("{p}.format"), format!("expected \"text\" or \"json\", got {f:?}"));
                None
            }
        };
        LogConfig { level, format, access: self.bool(m, p, "accessLog", true) }
    }

    fn auth(&mut self, v: Option<&Value>, bind: IpAddr, ov: &Overrides, env: EnvFn<'_>) -> Option<AuthConfig> {
        let p = "gateway.auth";
        let a = self.object(v, p, &["mode", "token", "password", "rateLimit"]);
        let token = ov.token.clone().or_else(|| self.string(a, p, "token")).or_else(|| env("GATELET_GATEWAY_TOKEN"));
        let password = self.string(a, p, "password").or_else(|| env("GATELET_GATEWAY_PASSWORD"));
        let mode = match self.string(a, p, "mode").as_deref() {
            None => {
                if password.is_some() && token.is_none() {
                    AuthMode::Password
                } else {
                    AuthMode::Token
                }
            }
            Some("token") => AuthMode::Token,
            Some("password") => AuthMode::Password,
            Some("none") => AuthMode::None,
            Some(other) => {
                self.problem(
                    "gateway.auth.mode",
                    format!("expected \"token\", \"password\" or \"none\", got {other:?}"),
                );
                AuthMode::Token
            }
        };
        match mode {
            _ if ov.no_listener => {}
            AuthMode::Token if token.as_deref().is_none_or(str::is_empty) => self.problem(
                "gateway.auth.token",
                "token mode needs a token: set gateway.auth.token, GATELET_GATEWAY_TOKEN or --token",
            ),
            AuthMode::Password if password.as_deref().is_none_or(str::is_empty) => self.problem(
                "gateway.auth.password",
                "password mode needs a password: set gateway.auth.password or GATELET_GATEWAY_PASSWORD",
            ),
            AuthMode::None if !bind.is_loopback() => self.problem(
                "gateway.auth.mode",
                format!("auth mode \"none\" is refused on the non-loopback bind {bind}: set a token or password"),
            ),
            _ => {}
        }
        let rate_limit = match a.get("rateLimit") {
            None | Some(Value::Null) => None,
            Some(rl) => {
                let rp = "gateway.auth.rateLimit";
                let r = self.object(Some(rl), rp, &["maxAttempts", "windowMs", "lockoutMs", "exemptLoopback"]);
                Some(RateLimitConfig {
                    max_attempts: self.uint(r, rp, "maxAttempts", 10, 1, 1_000_000) as u32,
                    window: Duration::from_millis(self.uint(r, rp, "windowMs", 60_000, 1, 86_400_000)),
                    lockout: Duration::from_millis(self.uint(r, rp, "lockoutMs", 300_000, 1, 86_400_000)),
                    exempt_loopback: self.bool(r, rp, "exemptLoopback", true),
                })
            }
        };
        Some(AuthConfig { mode, token, password, rate_limit })
    }

    fn agents(&mut self, v: Option<&Value>, env: EnvFn<'_>) -> Option<(Vec<AgentConfig>, usize, bool)> {
        let a = self.object(v, "agents", &["defaults", "list"]);
        let d = self.object(
            a.get("defaults"),
            "agents.defaults",
            &["timeoutSeconds", "backend", "systemPrompt", "tools", "maxToolSteps"],
        );
        let d_timeout = self.uint(d, "agents.defaults", "timeoutSeconds", 600, 1, 86_400 * 7);
        let d_prompt = self.string(d, "agents.defaults", "systemPrompt").unwrap_or_default();
        let d_tools = self.tools(d.get("tools"), "agents.defaults.tools");
        let d_steps = self.uint(d, "agents.defaults", "maxToolSteps", 8, 0, 1000) as u32;
        let d_backend =
            d.get("backend").filter(|b| !b.is_null()).map(|b| self.backend(b, "agents.defaults.backend", env));
        let mut implicit_echo = d_backend.is_none();
        let d_backend =
            d_backend.unwrap_or(Some(BackendConfig::Echo { token_delay: Duration::ZERO, max_tokens: None }));

        let list = match a.get("list") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(l)) => l.iter().collect(),
            Some(_) => {
                self.problem("agents.list", "expected an array of agents");
                Vec::new()
            }
        };
        let mut agents = Vec::new();
        let mut default_agent = None;
        if list.is_empty() {
            agents.push(AgentConfig {
                id: "main".into(),
                system_prompt: d_prompt.clone(),
                timeout: Duration::from_secs(d_timeout),
                backend: d_backend.clone()?,
                tools: d_tools.clone(),
                max_tool_steps: d_steps,
            });
            default_agent = Some(0);
        }
        for (i, item) in list.iter().enumerate() {
            let p = format!("agents.list[{i}]");
            let m = self.object(
                Some(item),
                &p,
                &["id", "default", "systemPrompt", "timeoutSeconds", "backend", "tools", "maxToolSteps"],
            );
            let id = match self.string(m, &p, "id") {
                Some(id) if valid_agent_id(&id) => id,
                Some(id) => {
                    self.problem(&format!("{p}.id"), format!("agent id {id:?} must match [a-z0-9][a-z0-9_-]{{0,63}}"));
                    continue;
                }
                None => {
                    self.problem(&p, "agent needs an `id`");
                    continue;
                }
            };
            if agents.iter().any(|x: &AgentConfig| x.id == id) {
                self.problem(&format!("{p}.id"), format!("duplicate agent id {id:?}"));
                continue;
            }
            if self.bool(m, &p, "default", false) {
                if default_agent.is_some() {
                    self.problem(&format!("{p}.default"), "more than one agent is marked default");
                }
                default_agent = Some(agents.len());
            }
            let backend = match m.get("backend").filter(|b| !b.is_null()) {
                Some(b) => {
                    implicit_echo = false;
                    self.backend(b, &format!("{p}.backend"), env)
                }
                None => d_backend.clone(),
            };
            let timeout = self.uint(m, &p, "timeoutSeconds", d_timeout, 1, 86_400 * 7);
            let system_prompt = self.string(m, &p, "systemPrompt").unwrap_or_else(|| d_prompt.clone());
            let tools = match m.get("tools").filter(|t| !t.is_null()) {
                Some(t) => self.tools(Some(t), &format!("{p}.tools")),
                None => d_tools.clone(),
            };
            let max_tool_steps = self.uint(m, &p, "maxToolSteps", d_steps as u64, 0, 1000) as u32;
            if let Some(backend) = backend {
                agents.push(AgentConfig {
                    id,
                    system_prompt,
                    timeout: Duration::from_secs(timeout),
                    backend,
                    tools,
                    max_tool_steps,
                });
            }
        }
        if !self.problems.is_empty() {
            return None;
        }
        Some((agents, default_agent.unwrap_or(0), implicit_echo))
    }

    /// `tools: [{name, description, parameters, command: {argv, cwd?, env?, timeoutSeconds?}}]`.
    fn tools(&mut self, v: Option<&Value>, p: &str) -> Vec<AgentToolConfig> {
        let list = match v {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Array(l)) => l,
            Some(_) => {
                self.problem(p, "expected an array of tools");
                return Vec::new();
            }
        };
        let mut tools: Vec<AgentToolConfig> = Vec::new();
        for (i, t) in list.iter().enumerate() {
            let tp = format!("{p}[{i}]");
            let m = self.object(Some(t), &tp, &["name", "description", "parameters", "command"]);
            let name = match self.string(m, &tp, "name") {
                Some(n) if valid_tool_name(&n) => n,
                Some(n) => {
                    self.problem(&format!("{tp}.name"), format!("tool name {n:?} must match [A-Za-z0-9_-]{{1,64}}"));
                    continue;
                }
                None => {
                    self.problem(&tp, "tool needs a `name`");
                    continue;
                }
            };
            if tools.iter().any(|x| x.name == name) {
                self.problem(&format!("{tp}.name"), format!("duplicate tool name {name:?}"));
                continue;
            }
            let description = self.string(m, &tp, "description");
            let parameters = match m.get("parameters") {
                None | Some(Value::Null) => None,
                Some(v @ Value::Object(_)) => Some(v.clone()),
                Some(_) => {
                    self.problem(&format!("{tp}.parameters"), "expected a JSON Schema object");
                    None
                }
            };
            let cp = format!("{tp}.command");
            let Some(cv) = m.get("command").filter(|c| c.is_object()) else {
                self.problem(&cp, "tool needs a `command` object with `argv`");
                continue;
            };
            let cm = self.object(Some(cv), &cp, &["argv", "cwd", "env", "timeoutSeconds"]);
            let timeout = self.uint(cm, &cp, "timeoutSeconds", 30, 1, 86_400);
            let command = self.command(cm, &cp);
            tools.push(AgentToolConfig {
                name,
                description,
                parameters,
                command,
                timeout: Duration::from_secs(timeout),
            });
        }
        tools
    }

    /// `argv`, `cwd` and `env` of a program to run (command backend, agent tools).
    fn command(&mut self, m: &Map<String, Value>, p: &str) -> CommandBackendConfig {
        let argv: Vec<String> = match m.get("argv") {
            Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_string) => {
                a.iter().filter_map(|s| s.as_str().map(String::from)).collect()
            }
            _ => {
                self.problem(&format!("{p}.argv"), "expected a non-empty array of strings");
                Vec::new()
            }
        };
        let mut env = BTreeMap::new();
        match m.get("env") {
            None | Some(Value::Null) => {}
            Some(Value::Object(e)) => {
                for (k, val) in e {
                    match val.as_str() {
                        Some(s) => {
                            env.insert(k.clone(), s.to_string());
                        }
                        None => self.problem(&format!("{p}.env.{k}"), "expected a string"),
                    }
                }
            }
            Some(_) => self.problem(&format!("{p}.env"), "expected an object of strings"),
        }
        CommandBackendConfig { argv, cwd: self.string(m, p, "cwd").map(PathBuf::from), env }
    }

    fn backend(&mut self, v: &Value, p: &str, env: EnvFn<'_>) -> Option<BackendConfig> {
        let kind = match v.get("kind") {
            Some(Value::String(k)) => k.clone(),
            _ => {
                self.problem(&format!("{p}.kind"), "backend needs `kind`: \"echo\", \"openai\" or \"command\"");
                return None;
            }
        };
        let before = self.problems.len();
        let b = match kind.as_str() {
            "echo" => {
                let m = self.object(Some(v), p, &["kind", "tokenDelayMs", "maxTokens"]);
                let delay = self.uint(m, p, "tokenDelayMs", 0, 0, 600_000);
                let max = m
                    .get("maxTokens")
                    .filter(|x| !x.is_null())
                    .map(|_| self.uint(m, p, "maxTokens", 0, 0, u32::MAX as u64));
                BackendConfig::Echo { token_delay: Duration::from_millis(delay), max_tokens: max }
            }
            "openai" => BackendConfig::OpenAi(self.openai(v, p, env, true)),
            "command" => {
                let m = self.object(Some(v), p, &["kind", "argv", "cwd", "env"]);
                BackendConfig::Command(self.command(m, p))
            }
            other => {
                self.problem(
                    &format!("{p}.kind"),
                    format!("unknown backend kind {other:?}: expected \"echo\", \"openai\" or \"command\""),
                );
                return None;
            }
        };
        (self.problems.len() == before).then_some(b)
    }

    /// An `openai` backend at `p` (`fallbacks` allowed when `top`).
    fn openai(&mut self, v: &Value, p: &str, env: EnvFn<'_>, top: bool) -> OpenAiBackendConfig {
        let m = self.object(
            Some(v),
            p,
            &[
                "kind",
                "baseUrl",
                "model",
                "apiKey",
                "connectTimeoutMs",
                "readTimeoutMs",
                "headers",
                "apiKeyEnv",
                "maxIdleConnections",
                "idleTimeoutMs",
                "caFile",
                "fallbacks",
            ],
        );
        let base_url = self.string(m, p, "baseUrl").unwrap_or_default();
        let url = crate::http::url::BaseUrl::parse(&base_url);
        match &url {
            Ok(u) if u.tls && !cfg!(feature = "tls") => self.problem(
                &format!("{p}.baseUrl"),
                "https:// upstreams need TLS, which this build does not include (built without the `tls` feature): use an http:// URL on loopback or a TLS-terminating proxy",
            ),
            Ok(_) => {}
            Err(e) => self.problem(&format!("{p}.baseUrl"), format!("{e}, got {base_url:?}")),
        }
        let mut api_key = self.string(m, p, "apiKey");
        if let Some(name) = self.string(m, p, "apiKeyEnv") {
            if api_key.is_some() {
                self.problem(&format!("{p}.apiKeyEnv"), "set either apiKey or apiKeyEnv, not both");
            }
            match env(&name) {
                Some(k) => api_key = Some(k),
                None => self.problem(
                    &format!("{p}.apiKeyEnv"),
                    format!("the environment variable {name} (the upstream's API key) is not set or empty"),
                ),
            }
        }
        let headers = self.upstream_headers(m, p);
        let (ca_file, ca_certs) = match self.string(m, p, "caFile") {
            None => (None, Vec::new()),
            Some(f) => {
                let certs = self.ca_file(&f, &format!("{p}.caFile"));
                (Some(PathBuf::from(f)), certs)
            }
        };
        let mut fallbacks = Vec::new();
        match m.get("fallbacks") {
            None | Some(Value::Null) => {}
            Some(Value::Array(list)) if top => {
                for (i, f) in list.iter().enumerate() {
                    let fp = format!("{p}.fallbacks[{i}]");
                    match f.get("kind") {
                        Some(Value::String(k)) if k == "openai" => {}
                        _ => {
                            self.problem(
                                &format!("{fp}.kind"),
                                "a fallback is an `openai` backend: set kind: \"openai\"",
                            );
                            continue;
                        }
                    }
                    fallbacks.push(self.openai(f, &fp, env, false));
                }
            }
            Some(Value::Array(_)) => self.problem(
                &format!("{p}.fallbacks"),
                "fallbacks cannot have fallbacks: list them all on the first backend",
            ),
            Some(_) => self.problem(&format!("{p}.fallbacks"), "expected an array of backends"),
        }
        OpenAiBackendConfig {
            base_url,
            model: self.string(m, p, "model"),
            api_key,
            connect_timeout: Duration::from_millis(self.uint(m, p, "connectTimeoutMs", 5_000, 1, 600_000)),
            read_timeout: Duration::from_millis(self.uint(m, p, "readTimeoutMs", 300_000, 1, 86_400_000)),
            headers,
            max_idle: self.uint(m, p, "maxIdleConnections", 16, 0, 4096) as usize,
            idle_timeout: Duration::from_millis(self.uint(m, p, "idleTimeoutMs", 30_000, 1, 86_400_000)),
            ca_file,
            ca_certs,
            fallbacks,
        }
    }

    /// `headers: {name: value}`: names are HTTP tokens, values have no control characters, and
    /// the headers that frame the request are left to the gateway.
    fn upstream_headers(&mut self, m: &Map<String, Value>, p: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match m.get("headers") {
            None | Some(Value::Null) => {}
            Some(Value::Object(h)) => {
                for (k, val) in h {
                    let hp = format!("{p}.headers.{k}");
                    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
                    if k.is_empty() || !k.bytes().all(token) {
                        self.problem(&hp, "not a valid header name");
                        continue;
                    }
                    const RESERVED: &[&str] =
                        &["host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer"];
                    if RESERVED.iter().any(|r| k.eq_ignore_ascii_case(r)) {
                        self.problem(&hp, "this header is set by the gateway and cannot be configured");
                        continue;
                    }
                    match val.as_str() {
                        Some(s) if s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f)) => {
                            out.push((k.clone(), s.trim().to_string()))
                        }
                        Some(_) => self.problem(&hp, "header values cannot contain control characters"),
                        None => self.problem(&hp, "expected a string"),
                    }
                }
            }
            Some(_) => self.problem(&format!("{p}.headers"), "expected an object of header names to strings"),
        }
        out
    }

    /// The certificates of a `caFile`, read now so that a bad file stops start-up.
    fn ca_file(&mut self, file: &str, path: &str) -> Vec<Vec<u8>> {
        let pem = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) => {
                self.problem(path, format!("cannot read {file}: {e}"));
                return Vec::new();
            }
        };
        #[cfg(feature = "tls")]
        match crate::http::pem::parse_ca_pem(&pem) {
            Ok(c) => c,
            Err(e) => {
                self.problem(path, format!("{file}: {e}"));
                Vec::new()
            }
        }
        #[cfg(not(feature = "tls"))]
        {
            drop(pem);
            Vec::new()
        }
    }
}

/// Agent ids: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn valid_agent_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

impl Config {
    /// A printable view with secrets redacted (for `gatelet config check`).
    pub fn redacted_json(&self) -> Value {
        let g = &self.gateway;
        let secret = |s: &Option<String>| s.as_ref().map(|_| Value::from("<redacted>")).unwrap_or(Value::Null);
        let agents: Vec<Value> = self
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let backend = match &a.backend {
                    BackendConfig::Echo { token_delay, max_tokens } => serde_json::json!({
                        "kind": "echo", "tokenDelayMs": token_delay.as_millis() as u64, "maxTokens": max_tokens }),
                    BackendConfig::OpenAi(o) => serde_json::json!({
                        "kind": "openai", "baseUrl": o.base_url, "model": o.model, "apiKey": secret(&o.api_key),
                        "connectTimeoutMs": o.connect_timeout.as_millis() as u64,
                        "readTimeoutMs": o.read_timeout.as_millis() as u64,
                        "headers": o.headers.iter().map(|(k, _)| (k.clone(), Value::from("<redacted>"))).collect::<Map<_, _>>(),
                        "maxIdleConnections": o.max_idle, "idleTimeoutMs": o.idle_timeout.as_millis() as u64,
                        "caFile": o.ca_file.as_ref().map(|p| p.display().to_string()),
                        "fallbacks": o.fallbacks.iter().map(|f| serde_json::json!({
                            "baseUrl": f.base_url, "model": f.model, "apiKey": secret(&f.api_key) })).collect::<Vec<_>>() }),
                    BackendConfig::Command(c) => serde_json::json!({
                        "kind": "command", "argv": c.argv, "cwd": c.cwd.as_ref().map(|p| p.display().to_string()),
                        "env": c.env.keys().map(|k| (k.clone(), Value::from("<redacted>"))).collect::<Map<_, _>>() }),
                };
                let tools: Vec<Value> = a.tools.iter().map(|t| serde_json::json!({
                    "name": t.name, "description": t.description, "parameters": t.parameters,
                    "command": { "argv": t.command.argv,
                                 "cwd": t.command.cwd.as_ref().map(|p| p.display().to_string()),
                                 "env": t.command.env.keys().map(|k| (k.clone(), Value::from("<redacted>"))).collect::<Map<_, _>>(),
                                 "timeoutSeconds": t.timeout.as_secs() } })).collect();
                serde_json::json!({ "id": a.id, "default": i == self.default_agent, "systemPrompt": a.system_prompt,
                    "timeoutSeconds": a.timeout.as_secs(), "backend": backend, "tools": tools,
                    "maxToolSteps": a.max_tool_steps })
            })
            .collect();
        serde_json::json!({
            "source": self.source.as_ref().map(|p| p.display().to_string()),
            "stateDir": self.state_dir.display().to_string(),
            "gateway": {
                "port": g.port, "bind": g.bind.to_string(),
                "auth": { "mode": match g.auth.mode { AuthMode::Token => "token", AuthMode::Password => "password", AuthMode::None => "none" },
                          "token": secret(&g.auth.token), "password": secret(&g.auth.password),
                          "rateLimit": g.auth.rate_limit.as_ref().map(|r| serde_json::json!({
                              "maxAttempts": r.max_attempts, "windowMs": r.window.as_millis() as u64,
                              "lockoutMs": r.lockout.as_millis() as u64, "exemptLoopback": r.exempt_loopback })) },
                "http": { "headerTimeoutSeconds": g.header_timeout.as_secs(), "idleTimeoutSeconds": g.idle_timeout.as_secs(),
                          "stallTimeoutSeconds": g.stall_timeout.as_secs(), "maxBodyBytesInFlight": g.max_body_in_flight,
                          "endpoints": { "chatCompletions": { "enabled": g.chat_completions, "maxBodyBytes": g.max_body_bytes } },
                          "cors": { "allowOrigins": g.cors_origins } },
                "workers": g.workers, "maxQueuedRuns": g.max_queued_runs, "maxConnections": g.max_connections,
                "keepaliveSeconds": g.keepalive.as_secs(),
                "maxConnectionsPerIp": g.max_connections_per_ip, "maxRunsPerIp": g.max_runs_per_ip,
                "listenBacklog": g.listen_backlog,
                "metrics": { "public": g.metrics_public },
                "log": { "level": g.log.level.map(|l| l.as_str()), "format": g.log.format, "accessLog": g.log.access },
                "drainTimeoutSeconds": g.drain_timeout.as_secs(),
            },
            "agents": { "list": agents },
            "session": { "persist": self.persist_sessions, "maxHistoryMessages": self.session_max_history,
                         "idleDays": self.session_idle_days },
        })
    }
}

/// Function names: `[A-Za-z0-9_-]{1,64}`.
pub fn valid_tool_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_none(_: &str) -> Option<String> {
        None
    }

    fn parse_str(s: &str) -> Result<Config, ConfigError> {
        let ov = Overrides::default();
        parse(s, Some("cfg.json5".into()), "/tmp/st".into(), &ov, &env_none)
    }

    #[test]
    fn names() {
        assert!(valid_tool_name("get_weather-2"));
        assert!(valid_tool_name(&"a".repeat(64)));
        assert!(!valid_tool_name(&"a".repeat(65)));
        assert!(!valid_tool_name(""));
        assert!(!valid_tool_name("get weather"));
        assert!(!valid_tool_name("é"));
    }

    #[test]
    fn defaults_need_a_token() {
        let e = parse_str("{}").unwrap_err();
        assert!(e.to_string().contains("gateway.auth.token"), "{e}");
    }

    #[test]
    fn json5_features_and_defaults() {
        let c =
            parse_str("// c\n{gateway: {auth: {token: 's',}, http: {endpoints: {chatCompletions: {enabled: true}}}},}")
                .unwrap();
        assert_eq!(c.gateway.port, DEFAULT_PORT);
        assert!(c.gateway.chat_completions);
        assert_eq!(c.gateway.max_body_bytes, 20_971_520);
        assert_eq!(c.gateway.max_body_in_flight, 64 << 20);
        assert_eq!(c.agents.len(), 1);
        assert_eq!(c.agents[0].id, "main");
        assert!(c.implicit_echo);
        assert_eq!(c.gateway.auth.mode, AuthMode::Token);
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let e = parse_str("{\n  gateway: {\n    port: ,\n  }\n}").unwrap_err().to_string();
        assert!(e.starts_with("cfg.json5:3:"), "{e}");
    }

    #[test]
    fn bad_value_names_file_line_col_and_path() {
        let e = parse_str("{\n gateway: {\n  auth: { mode: 'tokn', token: 'x' }\n }\n}").unwrap_err().to_string();
        assert!(e.contains("cfg.json5:3:11: `gateway.auth.mode`"), "{e}");
    }

    #[test]
    fn fairness_limits_defaults_and_overrides() {
        let g = parse_str("{gateway: {auth: {token: 'x'}}}").unwrap().gateway;
        assert_eq!(g.workers, DEFAULT_WORKERS);
        assert_eq!(g.max_connections_per_ip, 256);
        assert_eq!(g.max_runs_per_ip, DEFAULT_WORKERS / 2);
        assert_eq!(g.stall_timeout, Duration::from_secs(10));
        assert_eq!(g.listen_backlog, default_backlog());
        // The run limit follows the pool size unless set; 0 turns the limits off.
        let g = parse_str("{gateway: {auth: {token: 'x'}, workers: 1}}").unwrap().gateway;
        assert_eq!(g.max_runs_per_ip, 1);
        let g = parse_str(
            "{gateway: {auth: {token: 'x'}, workers: 8, maxRunsPerIp: 0, maxConnectionsPerIp: 0, listenBacklog: 64, \
             http: {stallTimeoutSeconds: 3}}}",
        )
        .unwrap();
        assert!(g.warnings.is_empty(), "{:?}", g.warnings);
        let g = g.gateway;
        assert_eq!((g.max_runs_per_ip, g.max_connections_per_ip, g.listen_backlog), (0, 0, 64));
        assert_eq!(g.stall_timeout, Duration::from_secs(3));
        assert!(parse_str("{gateway: {auth: {token: 'x'}, http: {stallTimeoutSeconds: 0}}}").is_err());
        // The body budget: set, and never below one largest body.
        let g = parse_str("{gateway: {auth: {token: 'x'}, http: {maxBodyBytesInFlight: 30000000}}}").unwrap();
        assert!(g.warnings.is_empty(), "{:?}", g.warnings);
        assert_eq!(g.gateway.max_body_in_flight, 30_000_000);
        let g = parse_str(
            "{gateway: {auth: {token: 'x'}, http: {maxBodyBytesInFlight: 10, endpoints: {chatCompletions: {maxBodyBytes: 500}}}}}",
        )
        .unwrap();
        assert_eq!(g.gateway.max_body_in_flight, 500);
    }

    #[test]
    fn unknown_keys_warn() {
        let c = parse_str("{gateway: {auth: {token: 'x'}, portt: 1}}").unwrap();
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("gateway.portt"), "{:?}", c.warnings);
    }

    #[test]
    fn refuses_unsafe_setups() {
        assert!(parse_str("{gateway: {auth: {mode: 'password'}}}").is_err());
        assert!(parse_str("{gateway: {bind: 'lan', auth: {mode: 'none'}}}").is_err());
        assert!(parse_str("{gateway: {auth: {mode: 'none'}}}").is_ok());
        let e = parse_str("{gateway:{auth:{token:'x'}}, agents: {list: [{id: 'Bad'}]}}").unwrap_err();
        assert!(e.to_string().contains("agents.list[0].id"), "{e}");
        let e = parse_str("{gateway:{auth:{token:'x'}}, agents: {list: [{id: 'a'}, {id: 'a'}]}}").unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
        let https = parse_str(
            "{gateway:{auth:{token:'x'}}, agents: {list: [{id: 'a', backend: {kind: 'openai', baseUrl: 'https://x'}}]}}",
        );
        if cfg!(feature = "tls") {
            assert!(https.is_ok(), "{https:?}");
        } else {
            let e = https.unwrap_err().to_string();
            assert!(e.contains("agents.list[0].backend.baseUrl") && e.contains("`tls` feature"), "{e}");
        }
        let e = parse_str("{gateway:{auth:{token:'x'}}, agents: {list: [{id: 'a', backend: {kind: 'openai', baseUrl: 'http://u:p@h/v1'}}]}}")
            .unwrap_err();
        assert!(e.to_string().contains("agents.list[0].backend.baseUrl") && e.to_string().contains("apiKey"), "{e}");
    }

    #[test]
    fn password_inferred_and_env_secrets() {
        let c = parse_str("{gateway: {auth: {password: 'p'}}}").unwrap();
        assert_eq!(c.gateway.auth.mode, AuthMode::Password);
        let env = |k: &str| (k == "GATELET_GATEWAY_TOKEN").then(|| "envtok".to_string());
        let c = parse("{}", None, "/tmp".into(), &Overrides::default(), &env).unwrap();
        assert_eq!(c.gateway.auth.token.as_deref(), Some("envtok"));
    }

    #[test]
    fn port_precedence() {
        let env = |k: &str| (k == "GATELET_GATEWAY_PORT").then(|| "2000".to_string());
        let text = "{gateway: {port: 1000, auth: {token: 'x'}}}";
        let c = parse(text, None, "/tmp".into(), &Overrides::default(), &env).unwrap();
        assert_eq!(c.gateway.port, 2000);
        let ov = Overrides { port: Some(3000), ..Default::default() };
        assert_eq!(parse(text, None, "/tmp".into(), &ov, &env).unwrap().gateway.port, 3000);
        assert_eq!(parse(text, None, "/tmp".into(), &Overrides::default(), &env_none).unwrap().gateway.port, 1000);
    }

    #[test]
    fn operations_keys() {
        let c = parse_str(
            "{gateway: {auth: {token: 'x'}, metrics: {public: true}, drainTimeoutSeconds: 90,
              http: {cors: {allowOrigins: ['https://app.example', 'http://localhost:5173']}},
              log: {level: 'debug', format: 'json', accessLog: false}}}",
        )
        .unwrap();
        assert!(c.gateway.metrics_public);
        assert_eq!(c.gateway.drain_timeout, Duration::from_secs(90));
        assert_eq!(c.gateway.cors_origins, ["https://app.example", "http://localhost:5173"]);
        assert_eq!(c.gateway.log.level, Some(crate::log::Level::Debug));
        assert_eq!(c.gateway.log.format.as_deref(), Some("json"));
        assert!(!c.gateway.log.access);
        let d = parse_str("{gateway: {auth: {token: 'x'}}}").unwrap();
        assert!(!d.gateway.metrics_public && d.gateway.cors_origins.is_empty() && d.gateway.log.access);
        assert_eq!(d.gateway.drain_timeout, Duration::from_secs(10));
        for (bad, path) in [
            ("http: {cors: {allowOrigins: ['https://a.example/']}}", "gateway.http.cors.allowOrigins[0]"),
            ("http: {cors: {allowOrigins: ['*', 'app.example']}}", "gateway.http.cors.allowOrigins[1]"),
            ("http: {cors: {allowOrigins: 'https://a.example'}}", "gateway.http.cors.allowOrigins"),
            ("log: {level: 'loud'}", "gateway.log.level"),
            ("log: {format: 'xml'}", "gateway.log.format"),
            ("metrics: {public: 'yes'}", "gateway.metrics.public"),
        ] {
            let e = parse_str(&format!("{{gateway: {{auth: {{token: 'x'}}, {bad}}}}}")).unwrap_err().to_string();
            assert!(e.contains(&format!("`{path}`")), "{bad}: {e}");
        }
    }

    #[test]
    fn agent_defaults_apply() {
        let c = parse_str(
            "{gateway:{auth:{token:'x'}}, agents: {defaults: {timeoutSeconds: 5, systemPrompt: 'S', backend: {kind: 'echo', tokenDelayMs: 3}},
              list: [{id: 'a'}, {id: 'b', default: true, timeoutSeconds: 9, backend: {kind: 'command', argv: ['cat']}}]}}",
        )
        .unwrap();
        assert_eq!(c.default_agent, 1);
        assert_eq!(c.agents[0].timeout, Duration::from_secs(5));
        assert_eq!(c.agents[0].system_prompt, "S");
        assert_eq!(
            c.agents[0].backend,
            BackendConfig::Echo { token_delay: Duration::from_millis(3), max_tokens: None }
        );
        assert_eq!(c.agents[1].timeout, Duration::from_secs(9));
        assert!(matches!(c.agents[1].backend, BackendConfig::Command(_)));
        assert!(!c.implicit_echo);
    }

    fn upstream(backend: &str, env: EnvFn<'_>) -> Result<OpenAiBackendConfig, ConfigError> {
        let text = format!(
            "{{gateway: {{auth: {{token: 'x'}}}},\nagents: {{list: [{{id: 'a', backend: {{kind: 'openai',\n{backend}}}}}]}}}}"
        );
        let c = parse(&text, Some("cfg.json5".into()), "/tmp/st".into(), &Overrides::default(), env)?;
        match &c.agents[0].backend {
            BackendConfig::OpenAi(o) => Ok(o.clone()),
            b => panic!("{b:?}"),
        }
    }

    #[test]
    fn upstream_pool_headers_key_from_env_and_fallbacks() {
        let env = |k: &str| (k == "UP_KEY").then(|| "sk-env".to_string());
        let o = upstream(
            "baseUrl: 'http://h/v1', apiKeyEnv: 'UP_KEY', headers: {'HTTP-Referer': 'https://me', 'X-Title': 'gl'},
             maxIdleConnections: 4, idleTimeoutMs: 1000,
             fallbacks: [{kind: 'openai', baseUrl: 'http://f/v1', model: 'm2'}]",
            &env,
        )
        .unwrap();
        assert_eq!(o.api_key.as_deref(), Some("sk-env"));
        assert_eq!(o.headers, vec![("HTTP-Referer".into(), "https://me".into()), ("X-Title".into(), "gl".into())]);
        assert_eq!((o.max_idle, o.idle_timeout), (4, Duration::from_millis(1000)));
        assert_eq!(o.fallbacks.len(), 1);
        assert_eq!((o.fallbacks[0].base_url.as_str(), o.fallbacks[0].model.as_deref()), ("http://f/v1", Some("m2")));
        assert_eq!(o.fallbacks[0].max_idle, 16);
        let d = upstream("baseUrl: 'http://h/v1'", &env_none).unwrap();
        assert_eq!((d.max_idle, d.idle_timeout, d.fallbacks.len()), (16, Duration::from_secs(30), 0));
        // Secrets stay out of `config check`.
        let c = parse_str(
            "{gateway:{auth:{token:'x'}}, agents: {list: [{id: 'a', backend: {kind: 'openai', baseUrl: 'http://h',
              headers: {'X-Key': 'secret'}, fallbacks: [{kind: 'openai', baseUrl: 'http://f', apiKey: 'sk-f'}]}}]}}",
        )
        .unwrap();
        let shown = c.redacted_json().to_string();
        assert!(!shown.contains("secret") && !shown.contains("sk-f"), "{shown}");
    }

    #[test]
    fn upstream_config_errors_name_file_line_col_and_path() {
        let e = upstream("baseUrl: 'http://h/v1', apiKeyEnv: 'NOPE_KEY'", &env_none).unwrap_err().to_string();
        assert!(e.starts_with("cfg.json5:3:25: `agents.list[0].backend.apiKeyEnv`") && e.contains("NOPE_KEY"), "{e}");
        let e = upstream("baseUrl: 'http://h', headers: {Host: 'x'}", &env_none).unwrap_err().to_string();
        assert!(e.contains("cfg.json5:3:") && e.contains("`agents.list[0].backend.headers.Host`"), "{e}");
        let e = upstream("baseUrl: 'http://h', headers: {'X-A': 'a\\u0001b'}", &env_none).unwrap_err().to_string();
        assert!(e.contains("`agents.list[0].backend.headers.X-A`") && e.contains("control"), "{e}");
        let e = upstream("baseUrl: 'http://h', headers: {'Bad Name': 'a'}", &env_none).unwrap_err().to_string();
        assert!(e.contains("not a valid header name"), "{e}");
        let e = upstream("baseUrl: 'http://h', fallbacks: [{kind: 'echo'}]", &env_none).unwrap_err().to_string();
        assert!(e.contains("`agents.list[0].backend.fallbacks[0].kind`"), "{e}");
        let e = upstream("baseUrl: 'http://h', fallbacks: [{kind: 'openai', baseUrl: 'ftp://f'}]", &env_none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`agents.list[0].backend.fallbacks[0].baseUrl`"), "{e}");
        let e = upstream(
            "baseUrl: 'http://h', fallbacks: [{kind: 'openai', baseUrl: 'http://f', fallbacks: []}]",
            &env_none,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`agents.list[0].backend.fallbacks[0].fallbacks`"), "{e}");
        let e = upstream("baseUrl: 'http://h', apiKey: 'k', apiKeyEnv: 'K'", &|_| Some("v".into())).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let e = upstream("baseUrl: 'http://h', maxIdleConnections: -1", &env_none).unwrap_err();
        assert!(e.to_string().contains("maxIdleConnections"), "{e}");
    }
}
