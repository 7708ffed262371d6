#!/usr/bin/env python3
"""Load bench: gatelet on the echo agent against nginx `return 200`, measured in the same run.

Figures: non-streaming requests/s and latency percentiles (wrk, keep-alive, 1/8/32 connections),
SSE records/s for one long streamed reply, idle RSS, RSS with N idle keep-alive connections and the
stripped binary size. Each gatelet figure sits beside the nginx figure taken on the same machine a
few seconds apart, and the ratio gatelet/nginx.

Python 3 standard library only. Installs nothing: if `wrk` or `nginx` is missing it says so and
leaves those cells empty. Loopback only; every child has a timeout and both servers are killed at
exit. Normally started by `benches/load.sh`, which builds and strips the binary.
"""

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TOKEN = "bench-token"
HOST = "127.0.0.1"
MODEL = "gatelet"
# The non-streaming request: a short user message, so the figure is per-request overhead.
SHORT_MESSAGE = "hello from the gatelet load bench"
# Words cycled to build the long streamed reply (the echo agent emits one delta per word).
WORDS = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor".split()

CHILDREN = []  # Popen objects to kill at exit


# ---------------------------------------------------------------------------------------------
# process helpers


def kill_children():
    for p in CHILDREN:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def on_signal(signum, _frame):
    # Turn SIGTERM/SIGINT/SIGHUP into a normal exit so atexit kills the servers.
    sys.exit(128 + signum)


def pin(cpu):
    """Command prefix that pins a process to one CPU, or nothing when pinning is off."""
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listening(proc, port, timeout, log_path):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode} at start; log:\n{read_text(log_path)}")
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"server did not listen on {port} within {timeout} s; log:\n{read_text(log_path)}")


def die_with_parent():
    # Runs in the child before exec: SIGKILL it if the driver dies without running atexit
    # (e.g. SIGKILL), so no server outlives the bench. PR_SET_PDEATHSIG = 1.
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def start(argv, env, log_path, port, cpu):
    log = open(log_path, "wb")
    proc = subprocess.Popen(pin(cpu) + argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=die_with_parent)
    CHILDREN.append(proc)
    wait_listening(proc, port, 20, log_path)
    time.sleep(0.3)  # let start-up allocations settle before reading RSS
    return proc


def read_text(path, tail=4000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-tail:] if tail else f.read()
    except OSError:
        return ""


def proc_status(pid):
    """VmRSS, VmHWM (KiB), thread count and open fds of a process."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
            elif k == "Threads":
                out[k] = int(v)
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU time of a process so far (all its threads, live or exited), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def sockstat_tcp():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                p = line.split()[1:]
                return {p[i]: int(p[i + 1]) for i in range(0, len(p) - 1, 2)}
    return {}


def run(argv, timeout):
    """Run a client; returns (rc, stdout, stderr). A hung client is killed after `timeout`."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out, f"timed out after {timeout} s"


# ---------------------------------------------------------------------------------------------
# raw HTTP/1.1 client (probe requests and the idle-connection test)


def request_bytes(method, path, port, body=b"", headers=()):
    head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    head += [f"{k}: {v}" for k, v in headers]
    if body or method == "POST":
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chat_request(port, body):
    return request_bytes("POST", "/v1/chat/completions", port, body,
                         [("Authorization", f"Bearer {TOKEN}"), ("Content-Type", "application/json")])


class Reader:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def fill(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("connection closed mid-response")
        self.buf += data

    def until(self, sep):
        while sep not in self.buf:
            self.fill()
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n):
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def read_response(reader):
    """One response: (status, head bytes, decoded body bytes). Content-Length or chunked."""
    head = reader.until(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for ln in lines[1:]:
        if ":" in ln:
            k, v = ln.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    if hdrs.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int(reader.until(b"\r\n").split(b";")[0].strip(), 16)
            if size == 0:
                reader.until(b"\r\n")  # no trailers expected
                break
            body += reader.exactly(size)
            reader.exactly(2)
        return status, head, bytes(body)
    return status, head, reader.exactly(int(hdrs.get("content-length", "0")))


def one_request(port, raw, timeout=60):
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(raw)
        return read_response(Reader(s))


# ---------------------------------------------------------------------------------------------
# wrk


WRK_LINE = {
    "rps": re.compile(r"^Requests/sec:\s+([\d.]+)", re.M),
    "total": re.compile(r"^\s*(\d+) requests in", re.M),
    "non2xx": re.compile(r"Non-2xx or 3xx responses:\s+(\d+)"),
    "sockerr": re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"),
}
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def parse_wrk(out):
    r = {"rps": None, "total": None, "non2xx": 0, "lat_ms": {}}
    m = WRK_LINE["rps"].search(out)
    r["rps"] = float(m.group(1)) if m else None
    m = WRK_LINE["total"].search(out)
    r["total"] = int(m.group(1)) if m else None
    m = WRK_LINE["non2xx"].search(out)
    r["non2xx"] = int(m.group(1)) if m else 0
    # wrk prints the "Non-2xx" and "Socket errors" lines only when a count is non-zero.
    m = WRK_LINE["sockerr"].search(out)
    groups = map(int, m.groups()) if m else (0, 0, 0, 0)
    r["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), groups))
    for pct, val, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.M):
        r["lat_ms"][pct] = float(val) * UNIT_MS[unit]
    return r


def wrk(port, lua, conns, duration, cpu):
    argv = pin(cpu) + ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "--latency",
                       "-s", lua, f"http://{HOST}:{port}/v1/chat/completions"]
    rc, out, err = run(argv, duration + 30)
    r = parse_wrk(out)
    r["rc"] = rc
    if rc != 0 or r["rps"] is None:
        r["error"] = (err or out).strip()[-500:]
    return r


# ---------------------------------------------------------------------------------------------
# figures


def median_minmax(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def cpu_per(runs, key):
    """Server CPU µs per unit (`key` of each run) over all runs, or None."""
    n = sum(r.get(key) or 0 for r in runs)
    cpu = sum(r.get("server_cpu_s") or 0 for r in runs)
    return cpu * 1e6 / n if n else None


def idle_connections(pid, port, n, raw):
    """RSS with `n` idle keep-alive connections: first just connected, then after one request each."""
    base = proc_status(pid)
    ss0 = sockstat_tcp()
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((HOST, port), timeout=10)
            socks.append(s)
        time.sleep(1.0)  # let the server accept them all
        connected = proc_status(pid)
        ss1 = sockstat_tcp()
        # One request per connection, one connection at a time: this measures what a served
        # keep-alive connection keeps, not a burst of concurrent runs.
        statuses = {}
        for s in socks:
            s.sendall(raw)
            st, _, _ = read_response(Reader(s))
            statuses[st] = statuses.get(st, 0) + 1
        time.sleep(0.5)
        served = proc_status(pid)
        ss2 = sockstat_tcp()
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    kib = lambda a, b: (b["VmRSS"] - a["VmRSS"]) / n
    return {
        "n": n, "before": base, "connected": connected, "after_one_request": served,
        "per_conn_kib_connected": kib(base, connected), "per_conn_kib_after_request": kib(base, served),
        "accepted": connected["fds"] - base["fds"], "statuses": statuses,
        "non200": n - statuses.get(200, 0), "sockstat_before": ss0, "sockstat_connected": ss1, "sockstat_after_request": ss2,
    }


def sse_curl(url, data_file, cpu, reps):
    """Time one long stream with curl reading as fast as it can; median of `reps`."""
    argv = pin(cpu) + ["curl", "-sN", "-o", "/dev/null", "--max-time", "60", "-w",
                       "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"]
    if data_file:
        argv += ["-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
                 "--data-binary", f"@{data_file}"]
    argv.append(url)
    runs = []
    for _ in range(reps):
        rc, out, err = run(argv, 90)
        try:
            code, size, ttfb, total = out.split()
            runs.append({"code": int(code), "bytes": int(size), "ttfb_s": float(ttfb), "total_s": float(total)})
        except ValueError:
            runs.append({"code": 0, "error": (err or out).strip()[-300:]})
    return runs


def machine():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "loadavg_at_start": load,
            "busy_at_start_pct": cpu_busy(1.0)}


def cpu_busy(seconds):
    """Share of all CPUs busy (any process) over `seconds`: other tenants add noise."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = sample()
    time.sleep(seconds)
    t1, i1 = sample()
    return round(100 * (1 - (i1 - i0) / max(1, t1 - t0)), 1)


def tool_version(argv):
    rc, out, err = run(argv, 10)
    return (out + err).strip().splitlines()[0] if (out + err).strip() else "?"


# ---------------------------------------------------------------------------------------------
# table


def fmt_rps(x):
    return f"{x:,.0f}"


def fmt_ms(x):
    return f"{x * 1000:.0f} µs" if x < 1 else f"{x:.2f} ms"


def fmt_spread(mm, f):
    if mm is None:
        return "—"
    if mm["min"] == mm["max"]:
        return f(mm["median"])
    return f"{f(mm['median'])} ({f(mm['min'])}–{f(mm['max'])})"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}×"


def kib(x):
    if x is None:
        return "—"
    return f"{x / 1024:.1f} MiB" if x >= 1024 else f"{x:.0f} KiB"


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gatelet", required=True, help="gatelet binary to run")
    ap.add_argument("--stripped", help="stripped copy of the binary, for the size row")
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    ap.add_argument("--warmup", type=int, default=3, help="wrk warm-up seconds per server (default 3)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per figure (default 3)")
    ap.add_argument("--conns", default="1,8,32", help="wrk connection counts (default 1,8,32)")
    ap.add_argument("--sse-words", type=int, default=20000, help="words in the streamed reply")
    ap.add_argument("--idle-conns", type=int, default=1000, help="idle keep-alive connections")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server/client to CPUs")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--rev", default="?", help="source revision of the binary, for the report")
    ap.add_argument("--command", default=" ".join(sys.argv), help="command line to print with the table")
    ap.add_argument("--ops-off", metavar="BIN",
                    help="also run BIN (`same` = --gatelet) with the access log off and nobody scraping /metrics, "
                         "interleaved with the main gatelet, which then has its access log on and /metrics "
                         "scraped every second; adds an on-vs-off table (with a third gatelet, the --gatelet "
                         "binary with the access log off and /metrics scraped: metrics only)")
    ap.add_argument("--ops-before", metavar="BIN",
                    help="with --ops-off: also run BIN in the same three settings (its own access log off, "
                         "metrics only, metrics and access log), interleaved: before/after in one run")
    ap.add_argument("--ops-only", action="store_true",
                    help="with --ops-off: skip nginx and the idle-connection test (only the ops table matters)")
    a = ap.parse_args()

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    atexit.register(kill_children)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * a.idle_conns + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    have = {t: shutil.which(t) for t in ("wrk", "nginx", "curl", "taskset")}
    missing = [t for t in ("wrk", "nginx", "curl") if not have[t]]
    for t in missing:
        what = {"wrk": "non-streaming requests/s and latency rows are skipped",
                "nginx": "the nginx column is empty",
                "curl": "the SSE rows are skipped"}[t]
        print(f"MISSING: `{t}` is not installed ({what}); Debian: apt-get install -y {t}", file=sys.stderr)
    pinned = not a.no_pin and have["taskset"] and (os.cpu_count() or 1) >= 2
    srv_cpu, cli_cpu = (0, 1) if pinned else (None, None)
    conns = [int(c) for c in a.conns.split(",")]

    mach = machine()
    tmp = tempfile.mkdtemp(prefix="gatelet-load-")
    atexit.register(shutil.rmtree, tmp, True)
    res = {"machine": mach, "command": a.command, "pinned": bool(pinned), "missing": missing,
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "settings": {"duration_s": a.duration, "warmup_s": a.warmup, "reps": a.reps, "conns": conns,
                        "sse_words": a.sse_words, "idle_conns": a.idle_conns}}
    res["versions"] = {"gatelet": f"{tool_version([a.gatelet, '--version'])} ({a.rev})"}
    if have["nginx"]:
        res["versions"]["nginx"] = tool_version(["nginx", "-v"])
    if have["wrk"]:
        res["versions"]["wrk"] = tool_version(["wrk", "--version"]).split(" Copyright")[0]

    # --- gatelet ---------------------------------------------------------------------------
    def start_gatelet(binary, name, access_log):
        port = free_port()
        d = os.path.join(tmp, name)
        os.makedirs(d)
        cfg = os.path.join(d, "gatelet.json5")
        with open(cfg, "w") as f:
            f.write(f"""{{
  gateway: {{
    port: {port}, bind: "loopback", workers: 2, maxRunsPerIp: 0, maxConnectionsPerIp: 0,
    auth: {{ mode: "token", token: "{TOKEN}" }},
    http: {{ endpoints: {{ chatCompletions: {{ enabled: true }} }} }},
  }},
  agents: {{ defaults: {{ backend: {{ kind: "echo" }} }} }},
  session: {{ persist: false }},
}}
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATELET_")}
        env["GATELET_STATE_DIR"] = d
        if not access_log:
            # `warn` turns the access log (an `info` line) off in any version of gatelet.
            env["GATELET_LOG"] = "warn"
        return start([binary, "gateway", "--config", cfg], env, os.path.join(d, "gatelet.log"), port, srv_cpu), port, d

    g, gport, gdir = start_gatelet(a.gatelet, "gatelet", True)
    res["gatelet"] = {"idle": proc_status(g.pid)}
    # Extra gatelets for the ops table: (name, process, port, state dir), interleaved with the
    # main one in every figure. `-metrics` ones are scraped but have the access log off.
    ops_servers, scrapers = [], []
    if a.ops_off:
        off_bin = a.gatelet if a.ops_off == "same" else a.ops_off
        sets = [("gatelet", a.gatelet, off_bin)]
        if a.ops_before:
            sets.append(("before", a.ops_before, a.ops_before))
        for label, on_bin, base_bin in sets:
            if label != "gatelet":
                p, port, d = start_gatelet(on_bin, label, True)
                ops_servers.append((label, p, port, d))
                res[label] = {"binary": on_bin}
            p, port, d = start_gatelet(on_bin, f"{label}-metrics", False)
            ops_servers.append((f"{label}-metrics", p, port, d))
            res[f"{label}-metrics"] = {"binary": on_bin}
            p, port, d = start_gatelet(base_bin, f"{label}-off", False)
            ops_servers.append((f"{label}-off", p, port, d))
            res[f"{label}-off"] = {"binary": base_bin}
        res["versions"]["gatelet-off"] = tool_version([off_bin, "--version"])
        for name, _, port, _ in [("gatelet", g, gport, gdir)] + ops_servers:
            if not name.endswith("-off"):
                scrapers.append((name, Scraper(port)))
        for _, sc in scrapers:
            sc.start()
    off = bool(ops_servers)

    short_body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": SHORT_MESSAGE}]},
                            separators=(",", ":")).encode()
    st, ghead, gbody = one_request(gport, chat_request(gport, short_body))
    if st != 200:
        sys.exit(f"gatelet answered {st} to the bench request: {gbody[:300]!r}")
    res["gatelet"]["response"] = {"head_bytes": len(ghead), "body_bytes": len(gbody)}

    long_msg = " ".join(WORDS[i % len(WORDS)] for i in range(a.sse_words))
    sse_req = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": long_msg}]},
                         separators=(",", ":")).encode()
    sse_file = os.path.join(tmp, "sse-request.json")
    with open(sse_file, "wb") as f:
        f.write(sse_req)
    st, _, sse_body = one_request(gport, chat_request(gport, sse_req))
    if st != 200:
        sys.exit(f"gatelet answered {st} to the streaming request: {sse_body[:300]!r}")
    records = sse_body.count(b"\n\ndata:") + (1 if sse_body.startswith(b"data:") else 0)
    res["sse"] = {"records": records, "bytes": len(sse_body), "request_bytes": len(sse_req)}

    # --- nginx -----------------------------------------------------------------------------
    n = None
    if have["nginx"] and not a.ops_only:
        nport = free_port()
        ndir = os.path.join(tmp, "nginx")
        os.makedirs(os.path.join(ndir, "www", "sse"))
        with open(os.path.join(ndir, "www", "sse", "stream"), "wb") as f:
            f.write(sse_body)  # the same SSE records gatelet sent, as a static file
        text = gbody.decode()
        if "$" in text:
            sys.exit("response body contains `$`, which nginx would expand; change SHORT_MESSAGE")
        quoted = text.replace("\\", "\\\\").replace("'", "\\'")
        ncfg = os.path.join(ndir, "nginx.conf")
        temps = "\n".join(f"  {d}_temp_path {ndir}/{d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        with open(ncfg, "w") as f:
            f.write(f"""# One process, no master: the same footing as one gatelet process.
daemon off;
master_process off;
worker_processes 1;
pid {ndir}/nginx.pid;
error_log {ndir}/error.log warn;
events {{ worker_connections {max(1024, 2 * a.idle_conns + 256)}; }}
http {{
  access_log {ndir}/access.log combined buffer=64k flush=1s;
{temps}
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  server_tokens off;
  sendfile off;
  server {{
    listen {HOST}:{nport};
    location = /v1/chat/completions {{
      default_type application/json;
      return 200 '{quoted}';
    }}
    location /sse/ {{
      root {ndir}/www;
      default_type text/event-stream;
    }}
  }}
}}
""")
        n = start(["nginx", "-p", ndir, "-c", ncfg], dict(os.environ), os.path.join(ndir, "stderr.log"), nport, srv_cpu)
        res["nginx"] = {"idle": proc_status(n.pid)}
        st, nhead, nbody = one_request(nport, chat_request(nport, short_body))
        if st != 200 or len(nbody) != len(gbody):
            sys.exit(f"nginx answered {st} with {len(nbody)} body bytes (want 200, {len(gbody)})")
        res["nginx"]["response"] = {"head_bytes": len(nhead), "body_bytes": len(nbody)}
    servers = [("gatelet", g, gport)] + ([("nginx", n, nport)] if n else [])
    idle_servers = list(servers)
    servers += [(name, p, port) for name, p, port, _ in ops_servers]

    # --- idle connections ------------------------------------------------------------------
    for name, p, port in ([] if a.ops_only else idle_servers):
        print(f"[{name}] {a.idle_conns} idle connections", file=sys.stderr)
        res[name]["idle_conns"] = idle_connections(p.pid, port, a.idle_conns, chat_request(port, short_body))

    # --- non-streaming: wrk ----------------------------------------------------------------
    if have["wrk"]:
        lua = os.path.join(tmp, "chat.lua")
        with open(lua, "w") as f:
            f.write('wrk.method = "POST"\n'
                    f'wrk.body = [==[{short_body.decode()}]==]\n'
                    'wrk.headers["Content-Type"] = "application/json"\n'
                    f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n')
        for name, p, port in servers:
            print(f"[{name}] warm-up {a.warmup} s", file=sys.stderr)
            wrk(port, lua, max(conns), a.warmup, cli_cpu)
        runs = {name: {c: [] for c in conns} for name, _, _ in servers}
        # Interleave servers and connection counts so drift on a shared host hits both alike.
        for rep in range(a.reps):
            for c in conns:
                for name, p, port in servers:
                    cpu0 = cpu_seconds(p.pid)
                    r = wrk(port, lua, c, a.duration, cli_cpu)
                    r["server_cpu_s"] = cpu_seconds(p.pid) - cpu0
                    print(f"[{name}] rep {rep + 1}/{a.reps} c={c}: {r['rps']} req/s, non-2xx {r['non2xx']}, "
                          f"socket errors {r['socket_errors']}", file=sys.stderr)
                    runs[name][c].append(r)
        for name, _, _ in servers:
            res[name]["wrk"] = {str(c): {
                "runs": runs[name][c],
                "rps": median_minmax([r["rps"] for r in runs[name][c]]),
                **{f"p{q}_ms": median_minmax([r["lat_ms"].get(q) for r in runs[name][c]]) for q in ("50", "90", "99")},
                # Server CPU time (user + system, all threads) over all reps / requests served:
                # steadier than req/s on a shared machine, where a neighbour can take the CPU.
                "cpu_us_per_req": cpu_per(runs[name][c], "total"),
            } for c in conns}

    # --- SSE -------------------------------------------------------------------------------
    if have["curl"]:
        sse_reps = max(5, a.reps)  # one stream takes well under a second
        for name, p, port in servers:
            print(f"[{name}] SSE stream x{sse_reps}", file=sys.stderr)
            if name != "nginx":
                sse_curl(f"http://{HOST}:{port}/v1/chat/completions", sse_file, cli_cpu, 1)
                cpu0 = cpu_seconds(p.pid)
                runs_ = sse_curl(f"http://{HOST}:{port}/v1/chat/completions", sse_file, cli_cpu, sse_reps)
                cpu_s = cpu_seconds(p.pid) - cpu0
            else:
                runs_ = sse_curl(f"http://{HOST}:{port}/sse/stream", None, cli_cpu, 1 + sse_reps)[1:]
            ok = [r for r in runs_ if r["code"] == 200 and r["bytes"] == len(sse_body)]
            res[name]["sse"] = {
                "runs": runs_,
                "records_per_s": median_minmax([records / r["total_s"] for r in ok]),
                "mb_per_s": median_minmax([r["bytes"] / r["total_s"] / 1e6 for r in ok]),
                "ttfb_ms": median_minmax([r["ttfb_s"] * 1000 for r in ok]),
                "failed_runs": len(runs_) - len(ok),
            }
            if name != "nginx":
                res[name]["sse"]["cpu_ms_per_stream"] = cpu_s * 1000 / len(runs_)

    # --- after load, binary size -----------------------------------------------------------
    for name, p, _ in servers:
        res[name]["after_load"] = proc_status(p.pid)
        res[name]["exited"] = p.poll()
    mach["busy_at_end_pct"] = cpu_busy(1.0)
    res["gatelet"]["log_complaints"] = log_complaints(os.path.join(gdir, "gatelet.log"), ("warn", "error"))
    if off:
        for name, sc in scrapers:
            sc.stop()
            res[name]["scrapes"] = {"ok": sc.ok, "failed": sc.failed}
        for name, _, _, d in ops_servers:
            res[name]["log_complaints"] = log_complaints(os.path.join(d, "gatelet.log"), ("warn", "error"))
        for name, d in [("gatelet", gdir)] + [(nm, d) for nm, _, _, d in ops_servers]:
            with open(os.path.join(d, "gatelet.log"), "rb") as f:
                res[name]["access_lines"] = sum(1 for ln in f if b" access method=" in ln)
    if n:
        res["nginx"]["log_complaints"] = log_complaints(os.path.join(ndir, "error.log"), ("[warn]", "[error]", "[crit]", "[alert]", "[emerg]"))
    if a.stripped:
        res["gatelet"]["binary_bytes"] = os.path.getsize(a.stripped)
    if n:
        res["nginx"]["binary_bytes"] = os.path.getsize(have["nginx"])

    # --- report ----------------------------------------------------------------------------
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "latest-raw.json"), "w") as f:
        json.dump(res, f, indent=1)  # kept even if rendering fails
    table = render(res, servers, conns, a)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for path in (os.path.join(a.out, f"load-{stamp}.json"), os.path.join(a.out, "latest.json")):
        with open(path, "w") as f:
            json.dump({**res, "table": table}, f, indent=1)
    with open(os.path.join(a.out, "latest.md"), "w") as f:
        f.write(table + "\n")
    print(f"\nwritten: {os.path.join(a.out, f'load-{stamp}.json')}", file=sys.stderr)
    return 1 if res.get("problems") else 0


class Scraper(threading.Thread):
    """GETs /metrics once a second, as Prometheus would, until stopped."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.ok, self.failed = port, 0, 0
        self.done = threading.Event()

    def run(self):
        raw = request_bytes("GET", "/metrics", self.port, headers=(("Authorization", f"Bearer {TOKEN}"),))
        while not self.done.wait(1.0):
            try:
                st, _, body = one_request(self.port, raw, timeout=10)
                if st == 200 and b"gatelet_http_requests_total" in body:
                    self.ok += 1
                else:
                    self.failed += 1
            except Exception:
                self.failed += 1

    def stop(self):
        self.done.set()
        self.join(15)


def sockmem(S):
    ic = S["idle_conns"]
    return "/".join(str(ic[k].get("mem")) for k in ("sockstat_before", "sockstat_connected", "sockstat_after_request"))


def log_complaints(path, words):
    """Lines of a server log that mention any of `words` (first few, and the count)."""
    hits = [ln for ln in read_text(path, tail=None).splitlines() if any(w in ln.lower() for w in words)]
    return len(hits), hits[:5]



def render(res, servers, conns, a):
    G = res["gatelet"]
    N = res.get("nginx")

    def get(d, *path):
        for k in path:
            if d is None:
                return None
            d = d.get(k)
        return d

    def med(mm):
        return mm and mm["median"]

    rows = []

    def row(label, g, n, r):
        rows.append(f"| {label} | {g} | {n} | {r} |")

    def pair(S, key, f, *path):
        # "a / b" from two entries of S, or "—" when S is missing.
        return "—" if S is None else " / ".join(f(get(S, *path, k)) for k in key)

    for c in conns:
        if "wrk" not in G:
            break
        gr, nr = get(G, "wrk", str(c), "rps"), get(N, "wrk", str(c), "rps")
        row(f"non-streaming req/s, {c} conn", fmt_spread(gr, fmt_rps), fmt_spread(nr, fmt_rps), ratio(med(gr), med(nr)))
        qs = [(get(G, "wrk", str(c), f"p{q}_ms"), get(N, "wrk", str(c), f"p{q}_ms")) for q in ("50", "90", "99")]
        row(f"latency p50 / p90 / p99, {c} conn",
            " / ".join(fmt_ms(med(g)) if g else "—" for g, _ in qs),
            " / ".join(fmt_ms(med(n)) if n else "—" for _, n in qs),
            " / ".join(ratio(med(g), med(n)) for g, n in qs))
    if "sse" in G:
        f1 = lambda x: f"{x:.1f}"
        f2 = lambda x: f"{x:.1f} ms"
        for label, key, f in ((f"SSE records/s, one {res['sse']['records']:,}-record stream", "records_per_s", fmt_rps),
                              (f"SSE MB/s ({res['sse']['bytes'] / 1e6:.1f} MB)", "mb_per_s", f1),
                              ("SSE time to first byte", "ttfb_ms", f2)):
            g, n = get(G, "sse", key), get(N, "sse", key)
            row(label, fmt_spread(g, f), fmt_spread(n, f), ratio(med(g), med(n)))
    ic = f"{a.idle_conns:,}"
    for label, path in (("idle RSS (fresh start, no request yet)", ("idle", "VmRSS")),
                        (f"RSS, {ic} idle conns (connected, no request)", ("idle_conns", "connected", "VmRSS")),
                        (f"RSS, {ic} idle conns (after one request each)", ("idle_conns", "after_one_request", "VmRSS"))):
        g, n = get(G, *path), get(N, *path)
        row(label, kib(g), kib(n) if n is not None else "—", ratio(g, n))
    f3 = lambda x: "—" if x is None else f"{x:.2f} KiB"
    row("RSS per idle conn (connected / after one request)",
        pair(G, ("per_conn_kib_connected", "per_conn_kib_after_request"), f3, "idle_conns"),
        pair(N, ("per_conn_kib_connected", "per_conn_kib_after_request"), f3, "idle_conns"), "—")
    row("RSS after all load runs (VmRSS / peak VmHWM)", pair(G, ("VmRSS", "VmHWM"), kib, "after_load"),
        pair(N, ("VmRSS", "VmHWM"), kib, "after_load"),
        ratio(get(G, "after_load", "VmRSS"), get(N, "after_load", "VmRSS")))
    row("threads", G["idle"]["Threads"], get(N, "idle", "Threads") or "—", "—")
    gb, nb = G.get("binary_bytes"), get(N, "binary_bytes")
    fb = lambda b: f"{b / 1024:,.0f} KiB" if b else "—"
    row("binary size (gatelet stripped; nginx as packaged, shared libs not counted)", fb(gb), fb(nb), ratio(gb, nb))
    row("response head / body bytes", pair(G, ("head_bytes", "body_bytes"), str, "response"),
        pair(N, ("head_bytes", "body_bytes"), str, "response"), "—")

    # Errors are part of the result: wrk's non-2xx and socket-error lines, failed streams, exits.
    problems = []
    for name, _, _ in servers:
        S = res[name]
        for c, w in (S.get("wrk") or {}).items():
            for i, r in enumerate(w["runs"]):
                se = r.get("socket_errors")
                if r.get("non2xx") or (se and any(se.values())) or r.get("error"):
                    problems.append(f"{name} c={c} rep {i + 1}: non-2xx {r.get('non2xx')} of {r.get('total')}, "
                                    f"socket errors {se}" + (f", wrk: {r['error']}" if r.get("error") else ""))
        ic = S.get("idle_conns", {})
        if ic.get("non200"):
            problems.append(f"{name}: non-200 answers in the idle-connection test: {ic['statuses']}")
        if ic and ic["accepted"] < ic["n"]:
            problems.append(f"{name}: only {ic['accepted']} of {ic['n']} idle connections were accepted")
        if S.get("sse", {}).get("failed_runs"):
            problems.append(f"{name}: {S['sse']['failed_runs']} SSE runs failed: {S['sse']['runs']}")
        count, first = S.get("log_complaints", (0, []))
        if count:
            problems.append(f"{name} logged {count} warning/error lines, first: {first}")
        if S.get("exited") is not None:
            problems.append(f"{name} exited during the run (status {S['exited']})")
    res["problems"] = problems

    m = res["machine"]
    v = res["versions"]
    st = res["settings"]
    lines = [
        f"machine: nproc={m['nproc']}, CPU: {m['cpu']}, Linux {m['kernel']}, load average at start {m['loadavg_at_start']}, "
        f"CPU busy before start {m['busy_at_start_pct']}% / after {m.get('busy_at_end_pct', '?')}% of all cores",
        f"versions: {v.get('gatelet')}; {v.get('nginx', 'nginx: not installed')}; {v.get('wrk', 'wrk: not installed')}",
        (f"pinning: servers on CPU 0 (gatelet: loop + 2 workers; nginx: 1 process, no master), clients on CPU 1 "
         if res["pinned"] else "pinning: off ")
        + f"(wrk -t1, keep-alive); loopback; {st['warmup_s']} s warm-up, {st['reps']} × {st['duration_s']} s per cell, "
          "median (min–max); latency cells are medians of wrk's percentiles; ratio = gatelet / nginx",
        f"SSE: gatelet streams the echo of a {st['sse_words']:,}-word message (POST {res['sse']['request_bytes']:,} B, "
        f"chunked); nginx serves the same {res['sse']['bytes']:,} bytes of records as a static file (GET, Content-Length, "
        "sendfile off); curl -sN -o /dev/null, first run discarded",
        f"idle conns: {a.idle_conns:,} opened by the driver, measured once connected and again after one request "
        "each (sent one connection at a time); kernel socket memory is not in RSS: /proc/net/sockstat TCP mem "
        "(pages) before / connected / after-request: "
        + "; ".join(f"{name} {sockmem(res[name])}" for name, _, _ in servers if "idle_conns" in res[name]),
    ]
    if res["missing"]:
        lines.append("MISSING: " + ", ".join(res["missing"]) + " (install with apt-get install -y "
                     + " ".join(res["missing"]) + ")")
    out = ["| figure | gatelet | nginx | ratio |", "|---|---|---|---|"] + rows + [""] + lines
    if res.get("gatelet-off"):
        out += ["", "Operations overhead, same run, interleaved: `off` = access log off (GATELET_LOG=warn) and "
                "nobody scraping /metrics; `metrics` = the same but /metrics scraped every second; `m+log` = "
                "/metrics scraped and the access log on (to a file). Counters are always compiled in. CPU = "
                "server user+system time (all threads) over all reps / requests (or streams).", ""]
        def r3(x, y):
            return "—" if x is None or not y else f"{x / y:.3f}"

        sets = [("gatelet", a.gatelet, a.gatelet if a.ops_off == "same" else a.ops_off)]
        if a.ops_before:
            sets.append(("before", a.ops_before, a.ops_before))
        for label, on_bin, base_bin in sets:
            L, M, O = res.get(label), res.get(f"{label}-metrics"), res.get(f"{label}-off")
            out += [f"{label}: on/metrics {on_bin}, off {base_bin}", "",
                    "| figure | off | metrics | m+log | metrics / off | m+log / off |", "|---|---|---|---|---|---|"]
            for c in conns:
                vals = [get(S, "wrk", str(c), "rps") for S in (O, M, L)]
                if vals[2]:
                    out.append(f"| req/s, {c} conn | " + " | ".join(fmt_spread(v, fmt_rps) for v in vals)
                               + f" | {r3(med(vals[1]), med(vals[0]))} | {r3(med(vals[2]), med(vals[0]))} |")
                cpu = [get(S, "wrk", str(c), "cpu_us_per_req") for S in (O, M, L)]
                if cpu[2]:
                    out.append(f"| CPU µs/req, {c} conn | " + " | ".join(f"{v:.2f}" if v else "—" for v in cpu)
                               + f" | {r3(cpu[1], cpu[0])} | {r3(cpu[2], cpu[0])} |")
            vals = [get(S, "sse", "records_per_s") for S in (O, M, L)]
            if vals[2]:
                out.append("| SSE records/s | " + " | ".join(fmt_spread(v, fmt_rps) for v in vals)
                           + f" | {r3(med(vals[1]), med(vals[0]))} | {r3(med(vals[2]), med(vals[0]))} |")
                cpu = [get(S, "sse", "cpu_ms_per_stream") for S in (O, M, L)]
                out.append("| SSE CPU ms/stream | " + " | ".join(f"{v:.1f}" if v else "—" for v in cpu)
                           + f" | {r3(cpu[1], cpu[0])} | {r3(cpu[2], cpu[0])} |")
            out.append("")
        for name in [n for n, _, _ in servers if n != "nginx"]:
            S = res[name]
            sc = S.get("scrapes")
            if sc:
                out.append(f"{name}: /metrics scrapes {sc['ok']} ok, {sc['failed']} failed; "
                           f"access-log lines {S.get('access_lines', 0):,}")
                if sc["failed"]:
                    problems.append(f"{name}: {sc['failed']} /metrics scrapes failed")
    out.append("problems: " + ("none (no non-2xx responses, no socket errors, no failed streams)" if not problems
                               else "\n  - " + "\n  - ".join(problems)))
    out.append(f"command: {res['command']}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
