#!/usr/bin/env python3
"""Time to first token through gatelet's `openai` backend versus calling the upstream directly.

Starts a tiny local OpenAI-compatible upstream (stdlib, streams a role chunk and then tokens over
chunked SSE), starts the release gatelet binary on a generated config with --port, and measures,
for N requests each way in the same run (interleaved), the time from sending the request to
receiving the first non-empty content delta. Prints median and p99 for both, their ratio and the
added time. Stdlib only; loopback only; stops by itself.

    cargo build --release && python3 benches/ttft_bench.py [-n 200] [--bin target/release/gatelet]
"""

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "bench-token"
TOKENS = ["Hello", " from", " the", " upstream", "."]


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Each record is its own small write: without TCP_NODELAY, a kept-alive client that delays
    # its ACKs would see each one held for up to 40 ms (Nagle).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def chunk(self, data: bytes):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        json.loads(self.rfile.read(n) or b"{}")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 1, "model": "m"}

        def rec(choices, **extra):
            return b"data: " + json.dumps(dict(base, choices=choices, **extra), separators=(",", ":")).encode() + b"\n\n"

        self.chunk(rec([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))
        for t in TOKENS:
            self.chunk(rec([{"index": 0, "delta": {"content": t}, "finish_reason": None}]))
        self.chunk(rec([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        self.chunk(rec([], usage={"prompt_tokens": 3, "completion_tokens": len(TOKENS), "total_tokens": 3 + len(TOKENS)}))
        self.chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FIRST = b'"delta":{"content":"'


class Side:
    """One kept-alive client connection to a server (reopened if the server closes it)."""

    def __init__(self, port):
        self.port = port
        self.sock = None

    def connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s


def ttft(side, path, body, auth):
    """Seconds from sending the request to the first non-empty content delta, over `side`'s
    kept-alive connection; the whole chunked response is read before the next request."""
    req = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{side.port}\r\nContent-Type: application/json\r\n"
        f"{auth}Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    if side.sock is None:
        side.sock = side.connect()
    s = side.sock
    t0 = time.perf_counter()
    s.sendall(req)
    buf = b""
    first = None
    while True:
        data = s.recv(65536)
        if not data:
            side.sock = None
            s.close()
            break
        buf += data
        if first is None:
            i = buf.find(FIRST)
            while i >= 0:
                j = i + len(FIRST)
                if j < len(buf) and buf[j : j + 1] != b'"':
                    first = time.perf_counter() - t0
                    break
                i = buf.find(FIRST, j)
        if b"data: [DONE]" in buf and buf.endswith(b"\r\n0\r\n\r\n"):
            break
    if first is None:
        raise RuntimeError(f"no content delta from port {side.port}: {buf[:300]!r}")
    if b"data: [DONE]" not in buf:
        raise RuntimeError(f"stream from port {side.port} did not finish: {buf[-300:]!r}")
    return first


def pct(xs, p):
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * len(xs) + 0.5) - 1))
    return xs[k]


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200, help="requests each way (default 200)")
    ap.add_argument("--bin", default=os.path.join(root, "target", "release", "gatelet"))
    ap.add_argument("--warmup", type=int, default=10)
    a = ap.parse_args()
    if not os.path.exists(a.bin):
        sys.exit(f"{a.bin} not found: run `cargo build --release` first")

    up_port = free_port()
    upstream = ThreadingHTTPServer(("127.0.0.1", up_port), Upstream)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()

    state = tempfile.mkdtemp(prefix="gatelet-ttft-")
    gw_port = free_port()
    cfg = os.path.join(state, "gatelet.json5")
    with open(cfg, "w") as f:
        f.write(
            "{ gateway: { auth: { token: '%s' }, workers: 4, maxRunsPerIp: 0, http: { endpoints: { chatCompletions: { enabled: true } } } },\n"
            "  session: { persist: false },\n"
            "  agents: { list: [{ id: 'up', default: true, backend: { kind: 'openai', baseUrl: 'http://127.0.0.1:%d/v1', model: 'm' } }] } }\n"
            % (TOKEN, up_port)
        )
    env = dict(os.environ, GATELET_STATE_DIR=state, GATELET_LOG="warn")
    for k in ("GATELET_GATEWAY_TOKEN", "GATELET_GATEWAY_PASSWORD", "GATELET_GATEWAY_PORT", "GATELET_CONFIG_PATH"):
        env.pop(k, None)
    gw = subprocess.Popen(
        [a.bin, "gateway", "--config", cfg, "--port", str(gw_port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", gw_port), timeout=1).close()
                break
            except OSError:
                if gw.poll() is not None or time.time() > deadline:
                    sys.exit("gatelet did not start: " + gw.stderr.read().decode(errors="replace"))
                time.sleep(0.05)

        body = json.dumps(
            {"model": "gatelet", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        up_side, gw_side = Side(up_port), Side(gw_port)
        direct = lambda: ttft(up_side, "/v1/chat/completions", body, "")
        via = lambda: ttft(gw_side, "/v1/chat/completions", body, f"Authorization: Bearer {TOKEN}\r\n")
        for _ in range(a.warmup):
            direct()
            via()
        d, g = [], []
        for i in range(a.n):
            # Interleaved, alternating which goes first, so drift hits both sides alike.
            if i % 2 == 0:
                d.append(direct())
                g.append(via())
            else:
                g.append(via())
                d.append(direct())
    finally:
        gw.terminate()
        try:
            gw.wait(5)
        except subprocess.TimeoutExpired:
            gw.kill()
            gw.wait()
        upstream.shutdown()
        shutil.rmtree(state, ignore_errors=True)

    ms = lambda x: f"{x * 1000:.3f} ms"
    md, mg = statistics.median(d), statistics.median(g)
    pd, pg = pct(d, 99), pct(g, 99)
    print(f"ttft_bench: N={a.n} per side, interleaved, loopback; every connection kept alive: the client's")
    print("to the upstream and to gatelet, and gatelet's pooled one to the upstream")
    print(f"machine: {platform.platform()}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"binary: {a.bin}")
    print(f"{'':16}{'median':>14}{'p99':>14}")
    print(f"{'direct':16}{ms(md):>14}{ms(pd):>14}")
    print(f"{'via gatelet':16}{ms(mg):>14}{ms(pg):>14}")
    print(f"{'added':16}{ms(mg - md):>14}{ms(pg - pd):>14}")
    print(f"{'ratio':16}{mg / md:>13.2f}x{pg / pd:>13.2f}x")


if __name__ == "__main__":
    main()
