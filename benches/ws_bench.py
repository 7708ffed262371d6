#!/usr/bin/env python3
"""WebSocket load bench for gatelet: memory of idle authenticated connections, and agent-run
round trips over one connection.

Stdlib only: speaks RFC 6455 over raw sockets. Starts the release binary on examples/echo.json5
with --port (a free port) and a throwaway state dir, and stops it at the end.

    cargo build --release && python3 benches/ws_bench.py [--conns 1000] [--seconds 5] [--window 32]

Prints a human summary and one JSON line (prefix "RESULT ") for the main bench to collect.
Figures: RSS before and after opening --conns connections that completed `connect`; sequential
`agent` round trips per second (send, read the streamed events, wait for the final answer); the
same with --window runs in flight at once; RSS after the runs (the connections still open) and
6 s after every client has gone.
"""

import argparse
import base64
import json
import os
import platform
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "dev-token"  # examples/echo.json5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def mem(pid):
    """RSS, its anonymous part (heap, stacks: what the process holds) and its file-backed part
    (the binary's and libraries' pages, which the kernel can drop and read again), KiB; threads."""
    return {k: rss_kib(pid, k) for k in ("VmRSS", "RssAnon", "RssFile", "Threads")}


def mask_frame(opcode, payload, fin=True):
    """A masked client frame (RFC 6455 §5.2, §5.3)."""
    key = os.urandom(4)
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n <= 0xFFFF:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    # XOR with the repeated key, done on whole integers for speed.
    k = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big") if n else b""
    return head + key + masked


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.n = 0
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.decode(errors="replace"))
        self.buf = bytearray(rest)

    def _fill(self):
        chunk = self.s.recv(1 << 16)
        if not chunk:
            raise ConnectionError("closed by server")
        self.buf += chunk

    def recv(self):
        """The next message as parsed JSON (server frames: unmasked, unfragmented)."""
        while True:
            while len(self.buf) < 2:
                self._fill()
            b0, b1 = self.buf[0], self.buf[1]
            n, off = b1 & 0x7F, 2
            if n == 126:
                while len(self.buf) < 4:
                    self._fill()
                n, off = struct.unpack(">H", self.buf[2:4])[0], 4
            elif n == 127:
                while len(self.buf) < 10:
                    self._fill()
                n, off = struct.unpack(">Q", self.buf[2:10])[0], 10
            while len(self.buf) < off + n:
                self._fill()
            payload = bytes(self.buf[off : off + n])
            del self.buf[: off + n]
            op = b0 & 0x0F
            if op == 0x1:
                return json.loads(payload)
            if op == 0x8:
                raise ConnectionError(f"server closed: {payload[:2].hex()}")
            if op == 0x9:
                self.s.sendall(mask_frame(0xA, payload))

    def send(self, method, params):
        self.n += 1
        rid = str(self.n)
        msg = {"type": "req", "id": rid, "method": method, "params": params}
        self.s.sendall(mask_frame(0x1, json.dumps(msg, separators=(",", ":")).encode()))
        return rid

    def connect(self):
        ch = self.recv()
        assert ch["event"] == "connect.challenge", ch
        rid = self.send(
            "connect",
            {
                "minProtocol": 3,
                "maxProtocol": 3,
                "client": {"id": "ws-bench", "version": "1", "platform": sys.platform, "mode": "bench"},
                "auth": {"token": TOKEN},
            },
        )
        r = self.recv()
        assert r["id"] == rid and r["ok"], r
        return self


def start_gateway(binary, port, state_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATELET_")}
    env.update(GATELET_STATE_DIR=state_dir, GATELET_LOG="warn")
    # examples/echo.json5, with the per-address caps off: every bench client comes from 127.0.0.1.
    cfg = os.path.join(state_dir, "ws_bench.json5")
    with open(cfg, "w") as f:
        f.write(
            "{ gateway: { auth: { token: '%s' }, maxConnectionsPerIp: 0, maxRunsPerIp: 0, "
            "http: { endpoints: { chatCompletions: { enabled: true } } } }, "
            "agents: { defaults: { backend: { kind: 'echo' } } }, session: { persist: false } }"
            % TOKEN
        )
    p = subprocess.Popen(
        [binary, "gateway", "--config", cfg, "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p
        except OSError:
            if p.poll() is not None:
                raise RuntimeError("gatelet exited at start")
            time.sleep(0.05)
    p.kill()
    raise RuntimeError("gatelet did not start listening")


def round_trips(c, seconds, window):
    """Agent runs per second over one connection with `window` runs in flight."""
    params = {"message": "hello from the bench"}
    done = 0
    inflight = {}
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while True:
        while len(inflight) < window and time.perf_counter() < end:
            inflight[c.send("agent", params)] = 0
        if not inflight:
            break
        m = c.recv()
        if m.get("type") != "res":
            continue
        rid = m["id"]
        assert m["ok"], m
        inflight[rid] += 1
        if inflight[rid] == 2:  # accepted, then the final answer
            assert m["payload"]["result"]["text"] == params["message"], m
            del inflight[rid]
            done += 1
    return done / (time.perf_counter() - t0), done


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--smaps", help="write the gateway's /proc/PID/smaps here after clients left")
    ap.add_argument("--bin", default=os.environ.get("GATELET_BIN", str(ROOT / "target" / "release" / "gatelet")))
    a = ap.parse_args()
    if not Path(a.bin).exists():
        sys.exit(f"{a.bin} not found: run `cargo build --release` first")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * a.conns + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # inherited by the gateway too

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gatelet-ws-bench-") as state:
        gw = start_gateway(a.bin, port, state)
        try:
            time.sleep(0.3)
            m0 = mem(gw.pid)
            rss0 = m0["VmRSS"]
            t0 = time.perf_counter()
            conns = [Conn(port).connect() for _ in range(a.conns)]
            open_s = time.perf_counter() - t0
            time.sleep(0.5)
            rss1 = rss_kib(gw.pid)
            per_conn = (rss1 - rss0) * 1024 / max(1, a.conns)
            # Round trips on one more connection while the idle ones stay open.
            c = Conn(port).connect()
            seq_rps, seq_n = round_trips(c, a.seconds, 1)
            win_rps, win_n = round_trips(c, a.seconds, a.window)
            m2 = mem(gw.pid)
            rss2 = m2["VmRSS"]
            for x in conns + [c]:
                x.s.close()
            # After the section: every client gone, and past the loop's 5 s shrink of idle buffers.
            time.sleep(6)
            m3 = mem(gw.pid)
            rss3 = m3["VmRSS"]
            if a.smaps:
                with open(f"/proc/{gw.pid}/smaps") as src, open(a.smaps, "w") as dst:
                    dst.write(src.read())
        finally:
            gw.terminate()
            try:
                gw.wait(15)
            except subprocess.TimeoutExpired:
                gw.kill()

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"
    print(f"gatelet WebSocket bench ({machine}); binary {a.bin}")
    print(f"  idle RSS:                         {rss0 / 1024:.1f} MiB")
    print(f"  RSS with {a.conns} idle authenticated connections: {rss1 / 1024:.1f} MiB "
          f"(+{per_conn / 1024:.1f} KiB each; opened in {open_s:.2f} s)")
    print(f"  agent round trips, 1 in flight:   {seq_rps:,.0f}/s ({seq_n} runs)")
    print(f"  agent round trips, {a.window} in flight:  {win_rps:,.0f}/s ({win_n} runs)")
    print(f"  RSS after the runs:               {rss2 / 1024:.1f} MiB")
    print(f"  RSS 6 s after every client left:  {rss3 / 1024:.1f} MiB ({(rss3 - rss0) / 1024:+.1f} MiB from idle)")
    for name, m in (("idle", m0), ("after runs", m2), ("clients left", m3)):
        print(f"    {name + ':':14} anon {m['RssAnon'] / 1024:.1f} MiB, file {m['RssFile'] / 1024:.1f} MiB, "
              f"{m['Threads']} threads")
    print(f"  anonymous RSS 6 s after every client left: {(m3['RssAnon'] - m0['RssAnon']) / 1024:+.1f} MiB from idle")
    result = {
        "bench": "ws",
        "machine": machine,
        "idle_rss_kib": rss0,
        "conns": a.conns,
        "conns_rss_kib": rss1,
        "per_conn_bytes": round(per_conn),
        "rt_per_s_seq": round(seq_rps, 1),
        "rt_per_s_window": round(win_rps, 1),
        "window": a.window,
        "rss_after_runs_kib": rss2,
        "rss_after_close_kib": rss3,
        "anon_idle_kib": m0["RssAnon"],
        "anon_after_close_kib": m3["RssAnon"],
        "file_idle_kib": m0["RssFile"],
        "file_after_close_kib": m3["RssFile"],
        "threads_after_close": m3["Threads"],
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
