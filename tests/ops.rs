//! Operations: `/metrics`, the access log and JSON log format, logging that never blocks the
//! event loop, SIGHUP reload, CORS and `Cache-Control`.

mod util;

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use util::sse_client::SseStream;
use util::ws::Ws;
use util::*;

/// One scrape: series (`name{labels}`) → value, plus the raw text.
struct Scrape {
    series: HashMap<String, f64>,
    text: String,
}

impl Scrape {
    fn get(&self, key: &str) -> f64 {
        self.series.get(key).copied().unwrap_or(0.0)
    }
    fn has(&self, key: &str) -> bool {
        self.series.contains_key(key)
    }
}

/// Parse the Prometheus text format strictly enough to catch malformed output: every line is a
/// comment or `name{labels} value` with a numeric value, each `# TYPE` comes once.
fn parse_metrics(text: &str) -> Scrape {
    let mut series = HashMap::new();
    let mut types = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap().to_string();
            assert!(types.insert(name), "TYPE repeated: {line}");
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.is_empty() && !line.starts_with('#'), "unexpected line {line:?}");
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line:?}"));
        let v: f64 = value.parse().unwrap_or_else(|_| panic!("value not a number: {line:?}"));
        let name = key.split('{').next().unwrap();
        assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "bad name {line:?}");
        assert!(series.insert(key.to_string(), v).is_none(), "series repeated: {line:?}");
    }
    Scrape { series, text: text.to_string() }
}

fn get(gw: &Gateway, path: &str, token: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    gw.one(format!("GET {path} HTTP/1.1\r\nHost: t\r\n{auth}\r\n").as_bytes())
}

fn scrape(gw: &Gateway) -> Scrape {
    let r = get(gw, "/metrics", Some(TOKEN));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain; version=0.0.4; charset=utf-8"));
    parse_metrics(&r.text())
}

/// Every `<name>_bucket{…}` series of a histogram with these labels, in order of `le`.
fn buckets(s: &Scrape, name: &str, labels: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{{labels},le=\"");
    let mut out: Vec<(f64, f64)> = s
        .series
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, *v))
        })
        .collect();
    out.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    out
}

fn sighup(gw: &Gateway) {
    let ok = Command::new("kill").arg("-HUP").arg(gw.child.id().to_string()).status().unwrap().success();
    assert!(ok, "kill -HUP failed");
}

fn wait_for_line(gw: &Gateway, pat: &str, nth: usize) -> String {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<String> = gw.stderr.lock().unwrap().iter().filter(|l| l.contains(pat)).cloned().collect();
        if found.len() >= nth {
            return found[nth - 1].clone();
        }
        assert!(Instant::now() < end, "no log line {pat:?} (#{nth}): {:?}", gw.stderr.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write_config(gw: &Gateway, text: &str) {
    std::fs::write(gw.dir.join("gatelet.json5"), text).unwrap();
}

#[test]
fn metrics_counters_move_by_exactly_what_was_done() {
    let gw = Gateway::start();
    let before = scrape(&gw);
    let (mut tin, mut tout) = (0.0, 0.0);
    for i in 0..3 {
        let r = gw.one(&chat_request(&user_body(&format!("hello number {i} of three"), "")));
        assert_eq!(r.status, 200, "{}", r.text());
        let u = &r.json()["usage"];
        tin += u["prompt_tokens"].as_f64().unwrap();
        tout += u["completion_tokens"].as_f64().unwrap();
    }
    let r = gw.one(&chat_request(&user_body(
        "one streamed reply",
        r#""stream":true,"stream_options":{"include_usage":true}"#,
    )));
    assert_eq!(r.status, 200);
    let usage = sse_json(&r.body).into_iter().find(|v| v["usage"].is_object()).expect("usage chunk");
    tin += usage["usage"]["prompt_tokens"].as_f64().unwrap();
    tout += usage["usage"]["completion_tokens"].as_f64().unwrap();
    for _ in 0..2 {
        assert_eq!(get(&gw, "/v1/models", None).status, 401);
    }
    assert_eq!(get(&gw, "/nope", Some(TOKEN)).status, 404);
    let bad = gw.one(&chat_request(r#"{"messages": 5}"#));
    assert_eq!(bad.status, 400);

    // A streamed answer is counted by its worker once the last byte is written, which can be
    // a moment after the client has read it: wait for that, then every delta must be exact.
    let ok200 = r#"gatelet_http_requests_total{route="chat_completions",status="200"}"#;
    let end = Instant::now() + Duration::from_secs(10);
    let (mut after, mut scrapes_before_last) = (scrape(&gw), 1.0);
    while after.get(ok200) - before.get(ok200) < 4.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
        after = scrape(&gw);
        scrapes_before_last += 1.0;
    }
    let d = |k: &str| after.get(k) - before.get(k);
    assert_eq!(d(ok200), 4.0);
    assert_eq!(d(r#"gatelet_http_requests_total{route="chat_completions",status="400"}"#), 1.0);
    assert_eq!(d(r#"gatelet_http_requests_total{route="models",status="401"}"#), 2.0);
    assert_eq!(d(r#"gatelet_http_requests_total{route="other",status="404"}"#), 1.0);
    // Earlier scrapes are counted once answered; the last one is not yet.
    assert_eq!(d(r#"gatelet_http_requests_total{route="metrics",status="200"}"#), scrapes_before_last);
    assert_eq!(d(r#"gatelet_runs_total{agent="main",outcome="completed"}"#), 4.0);
    assert_eq!(d(r#"gatelet_runs_total{agent="main",outcome="backend_error"}"#), 0.0);
    assert_eq!(d(r#"gatelet_tokens_total{agent="main",direction="in"}"#), tin);
    assert_eq!(d(r#"gatelet_tokens_total{agent="main",direction="out"}"#), tout);
    assert_eq!(d(r#"gatelet_run_duration_seconds_count{agent="main"}"#), 4.0);
    assert_eq!(d(r#"gatelet_run_time_to_first_token_seconds_count{agent="main"}"#), 4.0);
    assert_eq!(after.get("gatelet_active_streams"), 0.0);
    assert_eq!(after.get("gatelet_queued_runs"), 0.0);
    assert!(after.get("process_resident_memory_bytes") > 1e5, "{}", after.text);
    assert!(after.get("process_open_fds") >= 3.0, "{}", after.text);
    assert!(after.has("gatelet_upstream_pool_idle_connections"));
    assert!(after.has("gatelet_log_lines_dropped_total"));

    for name in ["gatelet_run_duration_seconds", "gatelet_run_time_to_first_token_seconds"] {
        let b = buckets(&after, name, r#"agent="main""#);
        assert!(b.len() >= 10, "{name}: {b:?}");
        assert_eq!(b.last().unwrap().0, f64::INFINITY);
        assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "{name} buckets not cumulative: {b:?}");
        assert_eq!(b.last().unwrap().1, after.get(&format!("{name}_count{{agent=\"main\"}}")));
        assert!(after.get(&format!("{name}_sum{{agent=\"main\"}}")) > 0.0);
    }
}

#[test]
fn connection_gauges_follow_http_and_websocket_connections() {
    let gw = Gateway::start();
    let ws_gauge = r#"gatelet_open_connections{protocol="websocket"}"#;
    let http_gauge = r#"gatelet_open_connections{protocol="http"}"#;
    let base = scrape(&gw);
    assert_eq!(base.get(ws_gauge), 0.0);
    // The scraping connection itself is open while the page is rendered.
    assert!(base.get(http_gauge) >= 1.0);
    let mut ws = Ws::connected(&gw);
    let _idle: Vec<_> = (0..3).map(|_| gw.connect()).collect();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(&gw);
        if s.get(ws_gauge) == 1.0 && s.get(http_gauge) == base.get(http_gauge) + 3.0 {
            break;
        }
        assert!(Instant::now() < end, "gauges did not reach ws=1, http=+3:\n{}", s.text);
        std::thread::sleep(Duration::from_millis(50));
    }
    ws.send(&util::ws::close_frame(1000, b""));
    let _ = ws.expect_close();
    drop(ws);
    let end = Instant::now() + Duration::from_secs(10);
    while scrape(&gw).get(ws_gauge) != 0.0 {
        assert!(Instant::now() < end, "websocket gauge did not go back to 0");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_need_the_token_unless_public() {
    let gw = Gateway::start();
    let r = get(&gw, "/metrics", None);
    assert_eq!(r.status, 401);
    error_of(&r);
    assert_eq!(get(&gw, "/metrics", Some("wrong")).status, 401);
    assert_eq!(gw.one(b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n").status, 405);
    let open = Gateway::with_config(&config("metrics: { public: true }", ""));
    let r = get(&open, "/metrics", None);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("# TYPE gatelet_http_requests_total counter"), "{}", r.text());
    assert_eq!(r.header("cache-control").as_deref(), Some("no-store"));
}

#[test]
fn access_log_has_one_line_per_request_with_its_fields() {
    let gw = Gateway::start();
    let r = gw.one(&chat_request_with(&["x-gatelet-session-key: alice-1"], &user_body("log me", "")));
    assert_eq!(r.status, 200);
    let rid = r.header("x-request-id").unwrap();
    let key = r.header("x-gatelet-session-key").unwrap();
    let line = wait_for_line(&gw, &format!("request_id={rid}"), 1);
    assert!(
        line.starts_with("gatelet: info: access method=POST path=/v1/chat/completions status=200 bytes="),
        "{line}"
    );
    assert!(line.contains(" agent=main "), "{line}");
    assert!(line.contains(&format!(" session={} ", gatelet::log::session_hash(&key))), "{line}");
    assert!(!line.contains("alice-1"), "the session key itself must not be logged: {line}");
    let bytes: usize = line.split(" bytes=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert_eq!(bytes, r.head.len() + r.body.len(), "{line}");
    let ms: f64 = line.split(" duration_ms=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(ms >= 0.0);
    // A streamed answer is logged by the worker that wrote it, with every byte it wrote.
    let r = gw.one(&chat_request(&user_body("stream me", r#""stream":true"#)));
    let rid = r.header("x-request-id").unwrap();
    let line = wait_for_line(&gw, &format!("request_id={rid}"), 1);
    let bytes: usize = line.split(" bytes=").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(line.contains(" status=200 "), "{line}");
    // The test client de-chunks the body, so the raw byte count is larger than head + data.
    assert!(bytes > r.head.len() + r.body.len(), "{line} vs {}", r.head.len() + r.body.len());
    get(&gw, "/health", None);
    wait_for_line(&gw, "access method=GET path=/health status=200", 1);
}

/// Start the binary with a config and extra environment; stderr is piped to the caller.
fn spawn(cfg: &str, env: &[(&str, &str)], port: u16) -> (std::process::Child, std::path::PathBuf) {
    let dir = temp_dir("ops");
    let path = dir.join("gatelet.json5");
    std::fs::write(&path, cfg).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_gatelet"));
    c.args(["gateway", "--config"]).arg(&path).arg("--port").arg(port.to_string());
    c.env("GATELET_STATE_DIR", &dir).env_remove("GATELET_GATEWAY_TOKEN").env_remove("GATELET_LOG_FORMAT");
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    (child, dir)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn json_log_format_makes_every_line_a_json_object() {
    let port = free_port();
    let (child, dir) = spawn(&config("", ""), &[("GATELET_LOG", "debug"), ("GATELET_LOG_FORMAT", "json")], port);
    let gw_addr = format!("127.0.0.1:{port}");
    let end = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match std::net::TcpStream::connect(&gw_addr) {
            Ok(s) => break s,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("gatelet did not start: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&chat_request_with(&["Connection: close"], &user_body("json please", ""))).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    let rid = r.header("x-request-id").unwrap();
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    let text = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{text}")))
        .collect();
    assert!(lines.len() >= 4, "{text}");
    for l in &lines {
        assert!(l["ts"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{l}");
        assert!(["error", "warn", "info", "debug", "trace"].contains(&l["level"].as_str().unwrap()), "{l}");
        assert!(l["msg"].is_string(), "{l}");
    }
    assert!(lines.iter().any(|l| l["msg"].as_str().unwrap().starts_with("listening on http://")), "{text}");
    let a = lines.iter().find(|l| l["request_id"] == rid.as_str()).unwrap_or_else(|| panic!("no access line: {text}"));
    assert_eq!(a["msg"], "access");
    assert_eq!(a["method"], "POST");
    assert_eq!(a["path"], "/v1/chat/completions");
    assert_eq!(a["status"], 200);
    assert_eq!(a["agent"], "main");
    assert!(a["bytes"].as_u64().unwrap() > 100, "{a}");
    assert!(a["duration_ms"].as_f64().is_some(), "{a}");
    assert_eq!(a["session"].as_str().unwrap().len(), 12, "{a}");
}

#[test]
fn a_stderr_pipe_nobody_reads_never_stalls_requests() {
    let port = free_port();
    // stderr is piped and never read: once the pipe is full every write to it would block.
    let (mut child, dir) = spawn(&config("", ""), &[("GATELET_LOG", "debug")], port);
    let _unread = child.stderr.take();
    let end = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("gatelet did not start: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // Each request logs a ~600-byte access line: 3,000 of them are far more than a pipe buffer
    // plus the logger's queue.
    let id = "m".repeat(450);
    let req = format!("GET /v1/models/{id} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    for i in 0..3000 {
        s.write_all(req.as_bytes()).unwrap();
        let r = read_response(&mut s).unwrap_or_else(|| panic!("request {i} was not answered"));
        assert_eq!(r.status, 404);
    }
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").as_bytes())
        .unwrap();
    let m = parse_metrics(&read_response(&mut s).unwrap().text());
    assert!(m.get("gatelet_log_lines_dropped_total") > 0.0, "{}", m.text);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

const OLD: &str = "old-token";
const NEW: &str = "new-token";

fn reload_config(token: &str, extra_agent: &str) -> String {
    format!(
        "{{ gateway: {{ port: 0, auth: {{ token: '{token}' }}, http: {{ endpoints: {{ chatCompletions: {{ enabled: true }} }} }} }},
           agents: {{ list: [ {{ id: 'main', default: true, backend: {{ kind: 'echo', tokenDelayMs: 100 }} }} {extra_agent} ] }} }}"
    )
}

fn chat_as(token: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn reload_rotates_the_token_while_a_stream_opened_before_it_finishes() {
    let gw = Gateway::with_config(&reload_config(OLD, ""));
    let words = "w ".repeat(20);
    let mut stream = SseStream::open(gw.connect(), &chat_as(OLD, &user_body(words.trim(), r#""stream":true"#)));
    assert_eq!(stream.status, 200);
    assert!(stream.next_data().is_some(), "first record");

    write_config(&gw, &reload_config(NEW, ", { id: 'extra' }"));
    sighup(&gw);
    wait_for_line(&gw, "config reloaded (agents: main, extra)", 1);

    let models =
        |t: &str| gw.one(format!("GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {t}\r\n\r\n").as_bytes());
    assert_eq!(models(OLD).status, 401, "the old token is refused after the reload");
    let r = models(NEW);
    assert_eq!(r.status, 200);
    let ids: Vec<String> =
        r.json()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().into()).collect();
    assert!(ids.iter().any(|i| i.contains("extra")), "added agent listed: {ids:?}");
    let r = gw.one(&chat_as(NEW, &user_body("hi", r#""model":"extra""#)));
    assert_eq!(r.status, 200, "{}", r.text());

    // The stream that started under the old config runs to its end.
    let rest: Vec<String> = stream.rest().iter().map(|r| r.strip_prefix("data: ").unwrap_or(r).to_string()).collect();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "{rest:?}");
    let text: String = rest
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    assert!(text.matches('w').count() >= 19, "{text:?}");
    // …and it was still open when the reload happened: its access line comes after the reload's.
    let rid = stream.head.lines().find_map(|l| l.strip_prefix("x-request-id: ")).unwrap().to_string();
    wait_for_line(&gw, &format!("request_id={rid}"), 1);
    let lines = gw.stderr.lock().unwrap().clone();
    let at = |pat: &str| lines.iter().position(|l| l.contains(pat)).unwrap();
    assert!(at("config reloaded") < at(&format!("request_id={rid}")), "{lines:?}");
    let m = parse_metrics(&get(&gw, "/metrics", Some(NEW)).text());
    assert_eq!(m.get(r#"gatelet_config_reloads_total{result="ok"}"#), 1.0);
}

#[test]
fn an_invalid_file_keeps_the_running_config() {
    let gw = Gateway::with_config(&reload_config(OLD, ""));
    write_config(&gw, "{\n  gateway: {\n    auth: { mode: 'tokn', token: 'x' },\n  }\n}\n");
    sighup(&gw);
    let line = wait_for_line(&gw, "config reload failed", 1);
    assert!(line.contains("gatelet.json5:3:") && line.contains("`gateway.auth.mode`"), "{line}");
    assert_eq!(gw.one(&chat_as(OLD, &user_body("still here", ""))).status, 200);
    // A syntax error, too.
    write_config(&gw, "{ gateway: { port: ");
    sighup(&gw);
    let line = wait_for_line(&gw, "config reload failed", 2);
    assert!(line.contains("gatelet.json5:1:"), "{line}");
    assert_eq!(gw.one(&chat_as(OLD, &user_body("still here", ""))).status, 200);
    let m = parse_metrics(&get(&gw, "/metrics", Some(OLD)).text());
    assert_eq!(m.get(r#"gatelet_config_reloads_total{result="error"}"#), 2.0);
    assert_eq!(m.get(r#"gatelet_config_reloads_total{result="ok"}"#), 0.0);
}

#[test]
fn a_reload_keeps_lockouts_and_warns_about_a_new_port() {
    let rl = "rateLimit: { maxAttempts: 2, lockoutMs: 600000, exemptLoopback: false }";
    let cfg = |tok: &str, port: u16| {
        format!(
            "{{ gateway: {{ port: {port}, auth: {{ token: '{tok}', {rl} }}, \
               http: {{ endpoints: {{ chatCompletions: {{ enabled: true }} }} }} }} }}"
        )
    };
    let gw = Gateway::with_config(&cfg(OLD, 0));
    for _ in 0..2 {
        assert_eq!(get(&gw, "/v1/models", Some("wrong")).status, 401);
    }
    assert_eq!(get(&gw, "/v1/models", Some(OLD)).status, 429);
    write_config(&gw, &cfg(NEW, 1));
    sighup(&gw);
    wait_for_line(&gw, "config reloaded", 1);
    let warn = wait_for_line(&gw, "gateway.port / gateway.bind", 1);
    assert!(warn.contains("restart"), "{warn}");
    // Still locked out with the new token: the limiter survived, and the port did not change.
    assert_eq!(get(&gw, "/v1/models", Some(NEW)).status, 429);
}

const ORIGIN: &str = "https://app.example";

fn with_origin(req: &[u8], origin: &str) -> Vec<u8> {
    let s = String::from_utf8(req.to_vec()).unwrap();
    s.replacen("Host: t\r\n", &format!("Host: t\r\nOrigin: {origin}\r\n"), 1).into_bytes()
}

fn assert_cors(r: &Resp, origin: &str) {
    assert_eq!(r.header("access-control-allow-origin").as_deref(), Some(origin), "{}", r.head);
    assert_eq!(r.header("vary").as_deref(), Some("Origin"), "{}", r.head);
    let expose = r.header("access-control-expose-headers").unwrap_or_default();
    assert!(expose.contains("x-request-id") && expose.contains("x-gatelet-session-key"), "{}", r.head);
}

#[test]
fn cors_preflight_and_headers_on_every_api_answer() {
    let gw = Gateway::with_config(
        &config("", "").replace("http: {", &format!("http: {{ cors: {{ allowOrigins: ['{ORIGIN}'] }},")),
    );
    let pre = gw.one(
        format!(
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: t\r\nOrigin: {ORIGIN}\r\n\
             Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type, x-stainless-os\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(pre.status, 204, "preflight needs no token: {}", pre.head);
    assert_cors(&pre, ORIGIN);
    assert!(pre.header("content-length").is_none(), "{}", pre.head);
    assert_eq!(pre.header("access-control-allow-methods").as_deref(), Some("POST, OPTIONS"));
    assert_eq!(
        pre.header("access-control-allow-headers").as_deref(),
        Some("authorization, content-type, x-stainless-os")
    );
    assert_eq!(pre.header("access-control-max-age").as_deref(), Some("600"));
    let pre = gw.one(format!("OPTIONS /v1/models HTTP/1.1\r\nHost: t\r\nOrigin: {ORIGIN}\r\n\r\n").as_bytes());
    assert_eq!(pre.status, 204);
    assert_eq!(pre.header("access-control-allow-methods").as_deref(), Some("GET, HEAD, OPTIONS"));
    assert!(pre.header("access-control-allow-headers").unwrap().contains("authorization"));

    let evil = gw.one(b"OPTIONS /v1/models HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example\r\n\r\n");
    assert_eq!(evil.status, 403);
    assert!(evil.header("access-control-allow-origin").is_none(), "{}", evil.head);
    assert_eq!(error_of(&evil)["code"], "cors_origin_not_allowed");

    // JSON answer, SSE answer, an auth error and a validation error all carry the headers.
    let r = gw.one(&with_origin(&chat_request(&user_body("hi", "")), ORIGIN));
    assert_eq!(r.status, 200);
    assert_cors(&r, ORIGIN);
    let r = gw.one(&with_origin(&chat_request(&user_body("hi", r#""stream":true"#)), ORIGIN));
    assert_eq!(r.header("content-type").as_deref(), Some("text/event-stream; charset=utf-8"));
    assert_cors(&r, ORIGIN);
    let r = gw.one(&with_origin(b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n", ORIGIN));
    assert_eq!(r.status, 401);
    assert_cors(&r, ORIGIN);
    let r = gw.one(&with_origin(&chat_request("{"), ORIGIN));
    assert_eq!(r.status, 400);
    assert_cors(&r, ORIGIN);
    // Another origin gets no grant, but still the Vary.
    let r = gw.one(&with_origin(&chat_request(&user_body("hi", "")), "https://evil.example"));
    assert_eq!(r.status, 200);
    assert!(r.header("access-control-allow-origin").is_none());
    assert_eq!(r.header("vary").as_deref(), Some("Origin"));
}

#[test]
fn cors_is_off_by_default_and_star_allows_any_origin() {
    let gw = Gateway::start();
    let r = gw.one(format!("OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: t\r\nOrigin: {ORIGIN}\r\n\r\n").as_bytes());
    assert_eq!(r.status, 405);
    assert!(r.header("access-control-allow-origin").is_none());
    let r = gw.one(&with_origin(&chat_request(&user_body("hi", "")), ORIGIN));
    assert!(r.header("access-control-allow-origin").is_none() && r.header("vary").is_none(), "{}", r.head);

    let star = Gateway::with_config(&config("", "").replace("http: {", "http: { cors: { allowOrigins: ['*'] },"));
    let r = star.one(&with_origin(&chat_request(&user_body("hi", "")), "https://anything.example"));
    assert_eq!(r.header("access-control-allow-origin").as_deref(), Some("*"));
    let bad = config_check_stderr(
        "{ gateway: { auth: { token: 'x' }, http: { cors: { allowOrigins: ['https://a.example/'] } } } }",
    );
    assert!(bad.contains("gateway.http.cors.allowOrigins[0]"), "{bad}");
}

#[test]
fn authenticated_json_answers_are_not_stored_by_caches() {
    let gw = Gateway::start();
    for r in [
        get(&gw, "/v1/models", Some(TOKEN)),
        get(&gw, "/v1/models/main", Some(TOKEN)),
        get(&gw, "/v1/models", None),
        gw.one(&chat_request(&user_body("hi", ""))),
        gw.one(&chat_request("{")),
    ] {
        assert_eq!(r.header("cache-control").as_deref(), Some("no-store"), "{}", r.head);
    }
    assert!(get(&gw, "/health", None).header("cache-control").is_none());
}

/// `gatelet config check` on `cfg`: its stderr.
fn config_check_stderr(cfg: &str) -> String {
    let dir = temp_dir("check");
    let path = dir.join("c.json5");
    std::fs::write(&path, cfg).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_gatelet")).args(["config", "check", "--config"]).arg(&path).output().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_answer_written_while_draining_says_connection_close() {
    let cfg = config("", "agents: { defaults: { backend: { kind: 'echo', tokenDelayMs: 100 } } }");
    let mut gw = Gateway::with_config(&cfg);
    let mut s = gw.connect();
    // A keep-alive request whose run lasts ~1 s: the drain starts while it runs.
    let words = (0..10).map(|i| format!("w{i}")).collect::<Vec<_>>().join(" ");
    s.write_all(&chat_request(&user_body(&words, ""))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = Command::new("kill").args(["-TERM", &gw.child.id().to_string()]).status();
    let r = read_response(&mut s).expect("the run's answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("connection").as_deref(), Some("close"), "{}", r.head);
    assert!(closed_within(&mut s, Duration::from_secs(10)));
    gw.terminate();
}
