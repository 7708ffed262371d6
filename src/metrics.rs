//! Process-wide counters and their Prometheus text rendering (format 0.0.4, `GET /metrics`).
//!
//! Every counter is an atomic bumped with `Relaxed` ordering: the hot path never takes a lock.
//! Label sets are bounded by construction: routes and statuses are fixed lists, agents come from
//! the config (a registry keyed by id, capped at [`MAX_AGENT_SERIES`]), outcomes are an enum.
//! A scrape reads the atomics one by one, so series read at slightly different instants; each
//! histogram is rendered from one read of its buckets, so it is always cumulative and consistent
//! with its own `_count`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Counters of every upstream pool in this process, read by `/metrics`.
#[derive(Debug)]
pub struct PoolStats {
    /// Idle pooled connections now.
    pub idle: AtomicI64,
    /// Connections opened.
    pub opened: AtomicU64,
    /// Requests sent on a pooled (reused) connection.
    pub reused: AtomicU64,
}

/// The process-wide upstream pool counters.
pub static POOL_STATS: PoolStats =
    PoolStats { idle: AtomicI64::new(0), opened: AtomicU64::new(0), reused: AtomicU64::new(0) };

/// Routes counted in `gatelet_http_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    /// `/v1/chat/completions`.
    Chat = 0,
    /// `/v1/models`.
    Models,
    /// `/v1/models/{id}`.
    Model,
    /// `/metrics`.
    Metrics,
    /// `/health`, `/healthz`.
    Health,
    /// `/ready`, `/readyz`.
    Ready,
    /// WebSocket upgrades on `/`.
    WebSocket,
    /// Anything else (unknown paths, unparsable requests).
    Other,
}

const ROUTES: [&str; 8] = ["chat_completions", "models", "model", "metrics", "health", "ready", "websocket", "other"];

/// Statuses with their own series; anything else is counted as `other`.
const STATUSES: [u16; 21] =
    [101, 200, 204, 400, 401, 403, 404, 405, 408, 413, 414, 426, 429, 431, 500, 501, 502, 503, 504, 505, 0];

fn status_index(status: u16) -> usize {
    STATUSES[..STATUSES.len() - 1].iter().position(|&s| s == status).unwrap_or(STATUSES.len() - 1)
}

/// How a run ended, for `gatelet_runs_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Finished normally (`stop`, `length`, tool calls).
    Completed = 0,
    /// Hit its deadline.
    Timeout,
    /// The backend failed.
    BackendError,
    /// The client went away or the run was aborted.
    Cancelled,
}

const OUTCOMES: [&str; 4] = ["completed", "timeout", "backend_error", "cancelled"];

/// Bucket upper bounds (seconds) for time to first token.
pub const TTFT_BUCKETS: [f64; 13] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Bucket upper bounds (seconds) for run duration.
pub const DURATION_BUCKETS: [f64; 15] =
    [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

/// A fixed-bucket histogram: one atomic per bucket (non-cumulative; summed when rendered), the
/// +Inf bucket last, and the sum in microseconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (ascending; +Inf is implied).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_us: AtomicU64::new(0) }
    }

    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| s <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Relaxed);
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cum}");
        }
        let sum = self.sum_us.load(Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {cum}");
    }
}

/// Counters of one agent id. Agents keep their series across reloads (and after they are
/// removed), so a counter never goes backwards.
#[derive(Debug)]
pub struct AgentStats {
    /// The agent id (the `agent` label).
    pub id: String,
    runs: [AtomicU64; 4],
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    ttft: Histogram,
    duration: Histogram,
}

impl AgentStats {
    fn new(id: &str) -> Self {
        AgentStats {
            id: id.to_string(),
            runs: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            ttft: Histogram::new(&TTFT_BUCKETS),
            duration: Histogram::new(&DURATION_BUCKETS),
        }
    }

    /// Record a finished run: its outcome, duration, time to first token (when one came) and
    /// token counts.
    pub fn record_run(&self, outcome: Outcome, duration: Duration, ttft: Option<Duration>, tokens: (u64, u64)) {
        self.runs[outcome as usize].fetch_add(1, Relaxed);
        self.duration.observe(duration);
        if let Some(t) = ttft {
            self.ttft.observe(t);
        }
        self.prompt_tokens.fetch_add(tokens.0, Relaxed);
        self.completion_tokens.fetch_add(tokens.1, Relaxed);
    }
}

/// Most distinct agent ids that get their own series; later ones share the `_other` series.
pub const MAX_AGENT_SERIES: usize = 256;

/// The process-wide counters.
#[derive(Debug)]
pub struct Metrics {
    requests: [[AtomicU64; STATUSES.len()]; ROUTES.len()],
    open_conns: AtomicI64,
    open_ws: AtomicI64,
    active_streams: AtomicI64,
    active_runs: AtomicI64,
    rejected_runs: AtomicU64,
    reload_ok: AtomicU64,
    reload_failed: AtomicU64,
    agents: Mutex<Vec<Arc<AgentStats>>>,
}

/// The counters of this process.
pub static METRICS: std::sync::LazyLock<Metrics> = std::sync::LazyLock::new(|| Metrics {
    requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
    open_conns: AtomicI64::new(0),
    open_ws: AtomicI64::new(0),
    active_streams: AtomicI64::new(0),
    active_runs: AtomicI64::new(0),
    rejected_runs: AtomicU64::new(0),
    reload_ok: AtomicU64::new(0),
    reload_failed: AtomicU64::new(0),
    agents: Mutex::new(Vec::new()),
});

/// Count one answered request.
pub fn request(route: RouteLabel, status: u16) {
    METRICS.requests[route as usize][status_index(status)].fetch_add(1, Relaxed);
}

/// A run refused because the queue was full.
pub fn run_rejected() {
    METRICS.rejected_runs.fetch_add(1, Relaxed);
}

/// A config reload finished (`ok`) or was refused.
pub fn reloaded(ok: bool) {
    if ok { &METRICS.reload_ok } else { &METRICS.reload_failed }.fetch_add(1, Relaxed);
}

/// The counters of agent `id`, created on first use (at startup and on reload, never per
/// request).
pub fn agent(id: &str) -> Arc<AgentStats> {
    let mut list = METRICS.agents.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = list.iter().find(|a| a.id == id) {
        return a.clone();
    }
    let id = if list.len() >= MAX_AGENT_SERIES { "_other" } else { id };
    if let Some(a) = list.iter().find(|a| a.id == id) {
        return a.clone();
    }
    let a = Arc::new(AgentStats::new(id));
    list.push(a.clone());
    a
}

/// Holds one unit of a gauge while alive.
#[derive(Debug)]
pub struct GaugeGuard(&'static AtomicI64);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn hold(g: &'static AtomicI64) -> GaugeGuard {
    g.fetch_add(1, Relaxed);
    GaugeGuard(g)
}

/// An SSE response in progress.
pub fn stream_guard() -> GaugeGuard {
    hold(&METRICS.active_streams)
}

/// A run executing on a worker.
pub fn run_guard() -> GaugeGuard {
    hold(&METRICS.active_runs)
}

/// One open client connection: HTTP until [`ConnGauge::upgrade`], then WebSocket.
#[derive(Debug)]
pub struct ConnGauge {
    ws: bool,
}

impl ConnGauge {
    /// A connection was accepted.
    pub fn open() -> Self {
        METRICS.open_conns.fetch_add(1, Relaxed);
        ConnGauge { ws: false }
    }
    /// The connection became a WebSocket.
    pub fn upgrade(&mut self) {
        if !self.ws {
            self.ws = true;
            METRICS.open_ws.fetch_add(1, Relaxed);
        }
    }
}

impl Drop for ConnGauge {
    fn drop(&mut self) {
        METRICS.open_conns.fetch_sub(1, Relaxed);
        if self.ws {
            METRICS.open_ws.fetch_sub(1, Relaxed);
        }
    }
}

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Escape a label value (backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The whole exposition; `queued_runs` is the worker pool's queue length.
pub fn render(queued_runs: usize) -> String {
    let m = &*METRICS;
    let mut out = String::with_capacity(8 * 1024);

    head(&mut out, "gatelet_http_requests_total", "counter", "HTTP requests answered, by route and status.");
    for (r, route) in ROUTES.iter().enumerate() {
        for (s, status) in STATUSES.iter().enumerate() {
            let n = m.requests[r][s].load(Relaxed);
            // Zero series are left out to keep the page short; a series appears at its first
            // request and then stays.
            if n > 0 {
                let st = if *status == 0 { "other".to_string() } else { status.to_string() };
                let _ = writeln!(out, "gatelet_http_requests_total{{route=\"{route}\",status=\"{st}\"}} {n}");
            }
        }
    }

    let agents: Vec<Arc<AgentStats>> = m.agents.lock().unwrap_or_else(|e| e.into_inner()).clone();
    head(&mut out, "gatelet_runs_total", "counter", "Agent runs finished, by agent and outcome.");
    for a in &agents {
        for (i, o) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "gatelet_runs_total{{agent=\"{}\",outcome=\"{o}\"}} {}",
                esc(&a.id),
                a.runs[i].load(Relaxed)
            );
        }
    }
    head(&mut out, "gatelet_runs_rejected_total", "counter", "Runs refused with 503 because the run queue was full.");
    let _ = writeln!(out, "gatelet_runs_rejected_total {}", m.rejected_runs.load(Relaxed));
    head(&mut out, "gatelet_run_duration_seconds", "histogram", "Wall time of finished agent runs.");
    for a in &agents {
        a.duration.render(&mut out, "gatelet_run_duration_seconds", &format!("agent=\"{}\"", esc(&a.id)));
    }
    head(
        &mut out,
        "gatelet_run_time_to_first_token_seconds",
        "histogram",
        "Time from the start of a run to its first reply token (runs that produced one).",
    );
    for a in &agents {
        a.ttft.render(&mut out, "gatelet_run_time_to_first_token_seconds", &format!("agent=\"{}\"", esc(&a.id)));
    }
    head(&mut out, "gatelet_tokens_total", "counter", "Tokens of finished runs, by agent and direction (in = prompt).");
    for a in &agents {
        let id = esc(&a.id);
        let _ =
            writeln!(out, "gatelet_tokens_total{{agent=\"{id}\",direction=\"in\"}} {}", a.prompt_tokens.load(Relaxed));
        let _ = writeln!(
            out,
            "gatelet_tokens_total{{agent=\"{id}\",direction=\"out\"}} {}",
            a.completion_tokens.load(Relaxed)
        );
    }

    let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
        head(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    };
    gauge(&mut out, "gatelet_active_runs", "Agent runs executing on a worker now.", m.active_runs.load(Relaxed));
    gauge(&mut out, "gatelet_active_streams", "SSE responses being streamed now.", m.active_streams.load(Relaxed));
    gauge(&mut out, "gatelet_queued_runs", "Runs admitted and waiting for a worker.", queued_runs as i64);
    let conns = m.open_conns.load(Relaxed);
    let ws = m.open_ws.load(Relaxed);
    head(&mut out, "gatelet_open_connections", "gauge", "Open client connections, by protocol.");
    let _ = writeln!(out, "gatelet_open_connections{{protocol=\"http\"}} {}", conns - ws);
    let _ = writeln!(out, "gatelet_open_connections{{protocol=\"websocket\"}} {ws}");

    let up = &POOL_STATS;
    gauge(
        &mut out,
        "gatelet_upstream_pool_idle_connections",
        "Idle pooled upstream connections.",
        up.idle.load(Relaxed),
    );
    head(&mut out, "gatelet_upstream_connections_opened_total", "counter", "Upstream connections opened.");
    let _ = writeln!(out, "gatelet_upstream_connections_opened_total {}", up.opened.load(Relaxed));
    head(
        &mut out,
        "gatelet_upstream_connections_reused_total",
        "counter",
        "Upstream requests sent on a pooled connection.",
    );
    let _ = writeln!(out, "gatelet_upstream_connections_reused_total {}", up.reused.load(Relaxed));

    head(&mut out, "gatelet_log_lines_dropped_total", "counter", "Log lines dropped because stderr could not keep up.");
    let _ = writeln!(out, "gatelet_log_lines_dropped_total {}", crate::log::dropped());
    head(&mut out, "gatelet_config_reloads_total", "counter", "SIGHUP config reloads, by result.");
    let _ = writeln!(out, "gatelet_config_reloads_total{{result=\"ok\"}} {}", m.reload_ok.load(Relaxed));
    let _ = writeln!(out, "gatelet_config_reloads_total{{result=\"error\"}} {}", m.reload_failed.load(Relaxed));
    head(&mut out, "gatelet_build_info", "gauge", "Always 1; the version is a label.");
    let _ = writeln!(out, "gatelet_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));

    let (rss, fds, max_fds) = process_stats();
    if let Some(v) = rss {
        gauge(&mut out, "process_resident_memory_bytes", "Resident memory size in bytes.", v as i64);
    }
    if let Some(v) = fds {
        gauge(&mut out, "process_open_fds", "Open file descriptors.", v as i64);
    }
    if let Some(v) = max_fds {
        gauge(&mut out, "process_max_fds", "Limit on open file descriptors.", v as i64);
    }
    out
}

/// RSS bytes, open fds and the fd limit, from `/proc/self` (None where unavailable).
pub fn process_stats() -> (Option<u64>, Option<u64>, Option<u64>) {
    let rss = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        let l = s.lines().find(|l| l.starts_with("VmRSS:"))?;
        l.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    let fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as u64);
    let max = std::fs::read_to_string("/proc/self/limits").ok().and_then(|s| {
        let l = s.lines().find(|l| l.starts_with("Max open files"))?;
        l.split_whitespace().nth(3)?.parse::<u64>().ok()
    });
    (rss, fds, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_every_observation() {
        let h = Histogram::new(&TTFT_BUCKETS);
        for ms in [1, 7, 7, 40, 900, 120_000] {
            h.observe(Duration::from_millis(ms));
        }
        let mut out = String::new();
        h.render(&mut out, "x", "agent=\"a\"");
        let vals: Vec<(String, u64)> = out
            .lines()
            .filter(|l| l.starts_with("x_bucket"))
            .map(|l| {
                let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
                (le, l.rsplit(' ').next().unwrap().parse().unwrap())
            })
            .collect();
        assert_eq!(vals.len(), TTFT_BUCKETS.len() + 1);
        assert_eq!(vals[0], ("0.005".to_string(), 1));
        assert_eq!(vals[1], ("0.01".to_string(), 3));
        assert_eq!(vals[3], ("0.05".to_string(), 4));
        assert_eq!(vals[7], ("1".to_string(), 5));
        assert_eq!(vals.last().unwrap(), &("+Inf".to_string(), 6));
        assert!(vals.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!(out.contains("x_count{agent=\"a\"} 6\n"), "{out}");
        assert!(out.contains("x_sum{agent=\"a\"} 120.955\n"), "{out}");
    }

    #[test]
    fn statuses_outside_the_list_share_one_series() {
        assert_eq!(STATUSES[status_index(200)], 200);
        assert_eq!(STATUSES[status_index(418)], 0);
        assert_eq!(STATUSES[status_index(0)], 0);
    }

    #[test]
    fn agent_registry_reuses_series_by_id() {
        let a = agent("registry-test-a");
        let b = agent("registry-test-a");
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &agent("registry-test-b")));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
