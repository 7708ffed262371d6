#!/usr/bin/env python3
"""Session store bench: per-turn latency, start-up time and disk use as the store grows.

For each size in --sizes (default 100, 1,000, 10,000, 100,000) a gatelet (echo agent,
`session.persist: true`, 2 workers) gets its own scratch state dir:

  1. populate: sticky one-turn sessions (`user` = u<i>) are added through the HTTP API by
     --fill-conns keep-alive clients; then SIGTERM (the drain writes the index snapshot) and a
     `sync`, so writeback from the fill does not land in the measurements;
  2. start-up: spawn → "listening on" (the store is loaded before the listener opens), the median
     of --starts starts;
  3. disk: bytes under <state>/agents/ per session, apparent (file sizes) and allocated (blocks);
  4. turns: all sizes' gateways run at once and one keep-alive client per size does sticky turns
     on random existing sessions (so most turns are that session's first use since the start: the
     lazy transcript read is in the figure), in rounds of --batch turns per size, interleaved, so
     that noise from the rest of the machine spreads over all sizes alike. Latency is send →
     whole response read, in the client; --warmup turns per size are not counted.

Prints a Markdown table with ratios against the first (smallest) size, and the machine. Standard
library only.
"""

import argparse
import http.client
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

TOKEN = "bench-token"


def percentile(xs, p):
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


class Gateway:
    def __init__(self, binary, state):
        self.binary = binary
        self.state = state
        self.proc = None
        self.port = None
        self.problems = []

    def start(self):
        cfg = os.path.join(self.state, "gatelet.json5")
        env = dict(os.environ, GATELET_STATE_DIR=self.state, GATELET_LOG="info")
        for k in ("GATELET_CONFIG_PATH", "GATELET_GATEWAY_TOKEN", "GATELET_GATEWAY_PASSWORD", "GATELET_GATEWAY_PORT"):
            env.pop(k, None)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [self.binary, "gateway", "--config", cfg], env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                if "listening on http://" in line and not ready.is_set():
                    self.port = int(line.split("listening on http://")[1].split()[0].rsplit(":", 1)[1])
                    ready.set()
                elif line.startswith(("gatelet: warn:", "gatelet: error:")):
                    self.problems.append(line.strip())
        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120):
            self.proc.kill()
            raise SystemExit("gatelet did not start")
        return time.perf_counter() - t0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.problems.append("did not exit within 120 s of SIGTERM")
        if self.proc.returncode not in (0, None):
            self.problems.append(f"exit status {self.proc.returncode}")


def turn(conn, user, text):
    body = json.dumps({"model": "gatelet", "user": user, "messages": [{"role": "user", "content": text}]})
    conn.request("POST", "/v1/chat/completions", body,
                 {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")


def populate(port, start, end, conns):
    nxt = [start]
    lock = threading.Lock()
    errors = []

    def worker():
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = nxt[0]
                if i >= end:
                    return
                nxt[0] += 1
            try:
                turn(c, f"u{i}", f"hello number {i}")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(str(e))
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    ts = [threading.Thread(target=worker) for _ in range(conns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise SystemExit(f"populate: {len(errors)} failed turns, first: {errors[0]}")


def disk_use(state):
    apparent = allocated = 0
    files = 0
    for root, _, names in os.walk(os.path.join(state, "agents")):
        for n in names:
            st = os.stat(os.path.join(root, n))
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return apparent, allocated, files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--sizes", default="100,1000,10000,100000")
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--batch", type=int, default=20, help="turns per size per round")
    ap.add_argument("--starts", type=int, default=3, help="start-ups timed per size (median)")
    ap.add_argument("--fill-conns", type=int, default=8)
    ap.add_argument("--dir", default=None, help="parent of the scratch state dir (default: $TMPDIR)")
    ap.add_argument("--command", default="")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    config = ("{ gateway: { port: 0, workers: 2, maxRunsPerIp: 0, auth: { token: '%s' }, "
              "http: { endpoints: { chatCompletions: { enabled: true } } } }, "
              "agents: { defaults: { backend: { kind: 'echo' } } }, session: { persist: true } }\n" % TOKEN)
    states = []
    rng = random.Random(42)
    gws = []
    rows = []
    try:
        for n in sizes:
            state = tempfile.mkdtemp(prefix=f"gatelet-sessions-bench-{n}.", dir=args.dir)
            states.append(state)
            with open(os.path.join(state, "gatelet.json5"), "w") as f:
                f.write(config)
            gw = Gateway(args.bin, state)
            gws.append(gw)
            gw.start()
            t0 = time.perf_counter()
            populate(gw.port, 0, n, args.fill_conns)
            fill_s = time.perf_counter() - t0
            gw.stop()
            os.sync()
            starts = []
            for _ in range(args.starts):
                starts.append(gw.start())
                gw.stop()
            apparent, allocated, files = disk_use(state)
            snapshot = os.path.getsize(os.path.join(state, "agents/main/sessions/sessions.json"))
            rows.append(dict(n=n, startup=percentile(starts, 50), apparent=apparent / n, allocated=allocated / n,
                             files=files, snapshot=snapshot, fill_s=fill_s, lat=[]))
            print(f"# {n} sessions: filled in {fill_s:.1f} s, start-up {rows[-1]['startup']*1000:.0f} ms",
                  file=sys.stderr, flush=True)
        os.sync()
        conns = []
        for gw in gws:
            gw.start()
            conns.append(http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60))
        done = 0
        k = 0
        while done < args.warmup + args.turns:
            b = min(args.batch, args.warmup + args.turns - done)
            for r, c in zip(rows, conns):
                for j in range(b):
                    user = f"u{rng.randrange(r['n'])}"
                    t = time.perf_counter()
                    turn(c, user, f"turn {k}")
                    if done + j >= args.warmup:
                        r["lat"].append(time.perf_counter() - t)
                    k += 1
            done += b
        for c in conns:
            c.close()
        for gw in gws:
            gw.stop()
        for r in rows:
            lat = r.pop("lat")
            r.update(p50=percentile(lat, 50), p90=percentile(lat, 90), p99=percentile(lat, 99))
    finally:
        for gw in gws:
            if gw.proc and gw.proc.poll() is None:
                gw.proc.kill()
        for st in states:
            shutil.rmtree(st, ignore_errors=True)

    base = rows[0]
    print("| sessions | start-up | turn p50 / p90 / p99 | ratio to base p50 / p90 / p99 | disk per session, apparent / allocated | sessions.json |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['startup']*1000:.0f} ms | "
              f"{r['p50']*1000:.2f} / {r['p90']*1000:.2f} / {r['p99']*1000:.2f} ms | "
              f"{r['p50']/base['p50']:.2f}× / {r['p90']/base['p90']:.2f}× / {r['p99']/base['p99']:.2f}× | "
              f"{r['apparent']:.0f} B / {r['allocated']:.0f} B | {r['snapshot']/1e6:.2f} MB |")
    print()
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"machine: {platform.machine()} {cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
          f"load average before the run {os.getloadavg()[0]:.1f}")
    print(f"settings: echo agent, 2 workers, persist on, state dirs under {args.dir or tempfile.gettempdir()}; "
          f"{args.turns} measured turns per size after {args.warmup} warm-up, interleaved in rounds of {args.batch}, "
          f"one keep-alive client per size, each turn on a random existing session; "
          f"start-up = spawn → listening, median of {args.starts}")
    if args.command:
        print(f"command: {args.command}")
    problems = [p for gw in gws for p in gw.problems]
    print("problems: " + ("none" if not problems else "; ".join(problems[:5])))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
