#!/usr/bin/env python3
"""Proxied-load bench: gatelet's `openai` backend in front of a canned OpenAI-compatible nginx.

nginx plays the upstream: `POST /json/v1/chat/completions` answers a small `chat.completion`
(JSON, Content-Length) and `POST /sse/v1/chat/completions` a 64-delta SSE reply (role chunk, 64
content deltas, finish, usage, `[DONE]`; Content-Length framing), both static files (a POST's 405
is redirected to the file), so the path picks the answer. gatelet runs two agents, `json` and `sse`, one per path, with its default
keep-alive pool. For each cell `wrk -t1` drives the upstream directly and then gatelet (order
alternating between cells), in the same run, and the table shows both and gatelet/direct.

Cells: non-streaming at 1, 8 and 32 connections (the client asks gatelet without `stream`; gatelet
asks the upstream with `stream: true` and gets the JSON completion), and the 64-delta stream at 1
and 8 connections (streams/s: the client asks with `stream: true`). wrk is pinned to CPU 1 and the
servers are free (--layout wrk, the default); --layout split pins the servers to CPU 0 as well,
--layout free (or --no-pin) pins nothing; with fewer than 2 CPUs nothing is pinned. Stdlib only;
loopback only; every child is killed at exit.

With --reference, each cell also drives a second nginx set up as a plain reverse proxy in front of
the same upstream (pooled keep-alive, `proxy_buffering off`, laid out like gatelet): a proxy that
only forwards bytes — no JSON parsing, no run, no re-rendering — shows what any proxy can reach
on this machine and layout, the bound against which gatelet's ratio is read.

    cargo build --release && python3 benches/proxy.py [--duration 8] [--bin target/release/gatelet]
"""

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
TOKEN = "bench-token"
DELTAS = 64
CHILDREN = []


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


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pin(cpu):
    return ["taskset", "-c", str(cpu)] if cpu is not None else []


def start(argv, env, log, port):
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    CHILDREN.append(p)
    end = time.monotonic() + 20
    while time.monotonic() < end:
        if p.poll() is not None:
            log.flush()
            sys.exit(f"{' '.join(argv)} exited:\n" + open(log.name).read()[-2000:])
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return p
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{argv} did not start listening on {port}")


def upstream_bodies():
    base = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    rec = lambda **kw: "data: " + json.dumps(dict(base, **kw), separators=(",", ":")) + "\n\n"
    sse = [rec(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
    for i in range(DELTAS):
        sse.append(rec(choices=[{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}]))
    sse.append(rec(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    sse.append(rec(choices=[], usage={"prompt_tokens": 5, "completion_tokens": DELTAS, "total_tokens": 5 + DELTAS}))
    sse.append("data: [DONE]\n\n")
    js = json.dumps({"id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "m",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the upstream."},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}}, separators=(",", ":"))
    return js, "".join(sse)


WRK = {
    "rps": re.compile(r"^Requests/sec:\s+([\d.]+)", re.M),
    "n": re.compile(r"(\d+) requests in"),
    "non2xx": re.compile(r"Non-2xx or 3xx responses:\s+(\d+)"),
    "sockerr": re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"),
}
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url, lua, conns, duration, cpu):
    argv = pin(cpu) + ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "5s", "--latency", "-s", lua, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    m = WRK["rps"].search(out)
    r = {"rps": float(m.group(1)) if m else None, "lat": {}, "problems": []}
    m = WRK["n"].search(out)
    r["n"] = int(m.group(1)) if m else 0
    m = WRK["non2xx"].search(out)
    if m:
        r["problems"].append(f"{m.group(1)} non-2xx")
    m = WRK["sockerr"].search(out)
    if m and any(int(x) for x in m.groups()[:3]):
        r["problems"].append("socket errors " + "/".join(m.groups()))
    for p, v, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        r["lat"][p] = float(v) * UNIT_MS[unit]
    if r["rps"] is None:
        r["problems"].append("no result: " + out[-300:])
    return r


def cpu_seconds(pid):
    """User + system CPU time of process `pid` (all its threads), from /proc."""
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def lua_file(tmp, name, body, auth):
    path = os.path.join(tmp, name + ".lua")
    hdr = f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n' if auth else ""
    with open(path, "w") as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n' + hdr
                + "wrk.body = " + json.dumps(body) + "\n")
    return path


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(root, "target", "release", "gatelet"))
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run (default 8)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--layout", choices=("wrk", "split", "free"), default="wrk",
                    help="wrk: wrk on CPU 1, servers free (default, the layout the upstream issue measured); "
                         "split: servers on CPU 0, wrk on CPU 1; free: nothing pinned")
    ap.add_argument("--no-pin", action="store_true", help="the same as --layout free")
    ap.add_argument("--only", default="", help="run only the cells whose name contains this (e.g. delta)")
    ap.add_argument("--reference", action="store_true", help="also measure nginx as a pass-through proxy")
    ap.add_argument("--command", default="python3 benches/proxy.py")
    a = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"proxy.py: needs {tool} (Debian: apt-get install -y wrk nginx-light)")
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} not found: run `cargo build --release` first")
    atexit.register(kill_children)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, lambda n, _f: sys.exit(128 + n))
    layout = "free" if a.no_pin else a.layout
    if (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        layout = "free"
    srv_cpu, cli_cpu = {"wrk": (None, 1), "split": (0, 1), "free": (None, None)}[layout]

    tmp = tempfile.mkdtemp(prefix="gatelet-proxy-")
    atexit.register(shutil.rmtree, tmp, True)
    js, sse = upstream_bodies()
    up_port, gw_port = free_port(), free_port()
    for sub, body in (("json", js), ("sse", sse)):
        os.makedirs(os.path.join(tmp, "www", sub, "v1", "chat"))
        with open(os.path.join(tmp, "www", sub, "v1", "chat", "completions"), "w") as f:
            f.write(body)
    nginx_conf = os.path.join(tmp, "nginx.conf")
    with open(nginx_conf, "w") as f:
        f.write(f"""daemon off; master_process off; worker_processes 1; pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 60s;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  server {{
    listen {HOST}:{up_port} reuseport;
    root {tmp}/www;
    # Static files answer GET only: a POST's 405 is redirected to the same file (as a GET).
    location /json/ {{ default_type application/json; error_page 405 =200 $uri; }}
    location /sse/ {{ default_type text/event-stream; error_page 405 =200 $uri; }}
  }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    nlog = open(os.path.join(tmp, "nginx.out"), "w")
    nginx_proc = start(pin(srv_cpu) + [nginx, "-c", nginx_conf, "-e", f"{tmp}/nginx-error.log"], os.environ, nlog, up_port)

    ref_proc, ref_port = None, free_port()
    if a.reference:
        ref_conf = os.path.join(tmp, "nginx-proxy.conf")
        with open(ref_conf, "w") as f:
            f.write(f"""daemon off; master_process off; worker_processes 1; pid {tmp}/nginx-proxy.pid;
error_log {tmp}/nginx-proxy-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off; keepalive_requests 1000000; keepalive_timeout 60s;
  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};
  upstream up {{ server {HOST}:{up_port}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen {HOST}:{ref_port} reuseport;
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }}
  }}
}}
""")
        rlog = open(os.path.join(tmp, "nginx-proxy.out"), "w")
        ref_proc = start(pin(srv_cpu) + [nginx, "-c", ref_conf, "-e", f"{tmp}/nginx-proxy-error.log"], os.environ, rlog, ref_port)

    cfg = os.path.join(tmp, "gatelet.json5")
    with open(cfg, "w") as f:
        f.write(
            "{ gateway: { auth: { token: '%s' }, workers: %d, maxRunsPerIp: 0, maxConnectionsPerIp: 0,\n"
            "    http: { endpoints: { chatCompletions: { enabled: true } } } },\n"
            "  session: { persist: false },\n"
            "  agents: { list: [\n"
            "    { id: 'json', default: true, backend: { kind: 'openai', baseUrl: 'http://%s:%d/json/v1', model: 'm' } },\n"
            "    { id: 'sse', backend: { kind: 'openai', baseUrl: 'http://%s:%d/sse/v1', model: 'm' } } ] } }\n"
            % (TOKEN, a.workers, HOST, up_port, HOST, up_port)
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATELET_")}
    env.update(GATELET_STATE_DIR=tmp, GATELET_LOG="warn")
    glog = open(os.path.join(tmp, "gatelet.log"), "w")
    gatelet_proc = start(pin(srv_cpu) + [a.bin, "gateway", "--config", cfg, "--port", str(gw_port)], env, glog, gw_port)

    msgs = [{"role": "user", "content": "hello from the proxy bench"}]
    plain = lua_file(tmp, "plain", json.dumps({"model": "json", "messages": msgs}), False)
    plain_gw = lua_file(tmp, "plain_gw", json.dumps({"model": "json", "messages": msgs}), True)
    stream = lua_file(tmp, "stream", json.dumps({"model": "sse", "stream": True, "messages": msgs}), False)
    stream_gw = lua_file(tmp, "stream_gw", json.dumps({"model": "sse", "stream": True, "messages": msgs}), True)
    direct_json = f"http://{HOST}:{up_port}/json/v1/chat/completions"
    direct_sse = f"http://{HOST}:{up_port}/sse/v1/chat/completions"
    via = f"http://{HOST}:{gw_port}/v1/chat/completions"
    ref_json = f"http://{HOST}:{ref_port}/json/v1/chat/completions"
    ref_sse = f"http://{HOST}:{ref_port}/sse/v1/chat/completions"

    cells = [
        ("non-streaming, 1 conn", 1, (direct_json, plain), (via, plain_gw), (ref_json, plain), "req/s"),
        ("non-streaming, 8 conns", 8, (direct_json, plain), (via, plain_gw), (ref_json, plain), "req/s"),
        ("non-streaming, 32 conns", 32, (direct_json, plain), (via, plain_gw), (ref_json, plain), "req/s"),
        (f"{DELTAS}-delta stream, 1 conn", 1, (direct_sse, stream), (via, stream_gw), (ref_sse, stream), "streams/s"),
        (f"{DELTAS}-delta stream, 8 conns", 8, (direct_sse, stream), (via, stream_gw), (ref_sse, stream), "streams/s"),
    ]
    cells = [c for c in cells if a.only in c[0]]
    # Warm both paths (and gatelet's upstream pool).
    wrk(via, plain_gw, 32, a.warmup, cli_cpu)
    wrk(via, stream_gw, 8, a.warmup, cli_cpu)
    wrk(direct_json, plain, 8, a.warmup, cli_cpu)
    if ref_proc:
        wrk(ref_json, plain, 32, a.warmup, cli_cpu)
    rows, problems = [], []
    for i, (name, conns, d, g, r, unit) in enumerate(cells):
        order = [("d", d), ("g", g)] if i % 2 == 0 else [("g", g), ("d", d)]
        if ref_proc:
            order.insert(1, ("r", r))
        res = {}
        for k, (url, lua) in order:
            procs = (nginx_proc, ref_proc if k == "r" else gatelet_proc)
            before = [cpu_seconds(p.pid) for p in procs]
            res[k] = wrk(url, lua, conns, a.duration, cli_cpu)
            after = [cpu_seconds(p.pid) for p in procs]
            # CPU per request of each server: steadier than req/s on a shared machine, and it
            # says where the time goes (the upstream's own share against gatelet's).
            res[k]["cpu_us"] = [
                (y - x) * 1e6 / res[k]["n"] if None not in (x, y) and res[k]["n"] else None
                for x, y in zip(before, after)
            ]
            who = {"d": "direct", "g": "gatelet", "r": "nginx proxy"}[k]
            problems += [f"{name} {who}: {p}" for p in res[k]["problems"]]
        rows.append((name, unit, res["d"], res["g"], res.get("r")))

    def cell(r, unit):
        if r["rps"] is None:
            return "–"
        lat = r["lat"]
        return f"{r['rps']:,.0f} {unit}, p50 {lat.get('50', 0):.2f} ms, p99 {lat.get('99', 0):.2f} ms"

    ratio = lambda x, d: f"{x['rps'] / d['rps']:.2f}×" if x and d["rps"] and x["rps"] else "–"
    if ref_proc:
        print(f"\n| cell | upstream direct | through gatelet's `openai` backend | ratio | through nginx as a pass-through proxy | ratio |")
        print("|---|---|---|---|---|---|")
    else:
        print(f"\n| cell | upstream direct | through gatelet's `openai` backend | ratio |")
        print("|---|---|---|---|")
    for name, unit, d, g, r in rows:
        extra = f" {cell(r, unit)} | {ratio(r, d)} |" if ref_proc else ""
        print(f"| {name} | {cell(d, unit)} | {cell(g, unit)} | {ratio(g, d)} |{extra}")
    print()
    us = lambda v: f"{v:.1f}" if v is not None else "–"
    if ref_proc:
        print("CPU per request (µs, user + system, from /proc): | cell | nginx, direct | nginx, via gatelet | gatelet | nginx, via nginx proxy | nginx proxy |")
    else:
        print("CPU per request (µs, user + system, from /proc): | cell | nginx, direct | nginx, via gatelet | gatelet |")
    for name, unit, d, g, r in rows:
        extra = f" {us(r['cpu_us'][0])} | {us(r['cpu_us'][1])} |" if ref_proc else ""
        print(f"| {name} | {us(d['cpu_us'][0])} | {us(g['cpu_us'][0])} | {us(g['cpu_us'][1])} |{extra}")
    print()
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else []
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, load average {' '.join(load)} at the end")
    print(f"settings: wrk -t1, {a.duration} s per cell, gatelet workers {a.workers}, "
          f"{ {'wrk': 'wrk on CPU 1, servers not pinned', 'split': 'servers on CPU 0, wrk on CPU 1', 'free': 'not pinned'}[layout]}; nginx {DELTAS}-delta SSE body "
          f"{len(sse):,} bytes, JSON body {len(js)} bytes")
    print(f"binary: {a.bin}")
    print(f"command: {a.command}")
    print("problems: " + ("; ".join(problems) if problems else "none"))
    for p in CHILDREN:
        if p.poll() is not None:
            problems.append(f"a server exited early (rc {p.returncode})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
