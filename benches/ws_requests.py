#!/usr/bin/env python3
"""Small WebSocket gateway requests: what one `health` request costs end to end.

Stdlib only; reuses benches/ws_bench.py's client and gateway start-up. Over one authenticated
connection: sequential `health` round trips (latency p50/p99 and rate), then the same with
--window requests pipelined (rate), then `models.list` sequentially (a request that renders a
longer answer). RSS of the gateway before and after.

    cargo build --release && python3 benches/ws_requests.py [--seconds 3] [--window 64]

Prints a human summary and one JSON line (prefix "RESULT ").
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ws_bench import ROOT, Conn, free_port, rss_kib, start_gateway  # noqa: E402


def sequential(c, method, seconds):
    """Latencies (seconds) of one-at-a-time requests for `seconds`."""
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        rid = c.send(method, {})
        while True:
            m = c.recv()
            if m.get("type") == "res" and m["id"] == rid:
                break
        assert m["ok"], m
        lat.append(time.perf_counter() - t)
    return lat


def pipelined(c, seconds, window):
    """Requests per second with `window` `health` requests in flight."""
    inflight, done = 0, 0
    end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while True:
        while inflight < window and time.perf_counter() < end:
            c.send("health", {})
            inflight += 1
        if not inflight:
            break
        m = c.recv()
        if m.get("type") == "res":
            assert m["ok"], m
            inflight -= 1
            done += 1
    return done / (time.perf_counter() - t0)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--bin", default=os.environ.get("GATELET_BIN", str(ROOT / "target" / "release" / "gatelet")))
    a = ap.parse_args()
    if not Path(a.bin).exists():
        sys.exit(f"{a.bin} not found: run `cargo build --release` first")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gatelet-ws-requests-") as state:
        gw = start_gateway(a.bin, port, state)
        try:
            time.sleep(0.3)
            rss0 = rss_kib(gw.pid)
            c = Conn(port).connect()
            sequential(c, "health", 0.3)  # warm-up
            lat = sequential(c, "health", a.seconds)
            models = sequential(c, "models.list", a.seconds / 2)
            rate = pipelined(c, a.seconds, a.window)
            rss1 = rss_kib(gw.pid)
            c.s.close()
        finally:
            gw.terminate()
            gw.wait(15)
    us = lambda s: s * 1e6  # noqa: E731
    print(f"gatelet WebSocket small requests; binary {a.bin}")
    print(f"  health, 1 in flight:   {len(lat) / sum(lat):,.0f}/s, p50 {us(pct(lat, 0.5)):.0f} us, "
          f"p99 {us(pct(lat, 0.99)):.0f} us")
    print(f"  models.list, 1 in flight: p50 {us(pct(models, 0.5)):.0f} us, p99 {us(pct(models, 0.99)):.0f} us")
    print(f"  health, {a.window} in flight:  {rate:,.0f}/s")
    print(f"  RSS idle {rss0 / 1024:.1f} MiB, after {rss1 / 1024:.1f} MiB")
    result = {
        "bench": "ws_requests",
        "health_seq_per_s": round(len(lat) / sum(lat), 1),
        "health_p50_us": round(us(pct(lat, 0.5)), 1),
        "health_p99_us": round(us(pct(lat, 0.99)), 1),
        "models_p50_us": round(us(pct(models, 0.5)), 1),
        "models_p99_us": round(us(pct(models, 0.99)), 1),
        "health_window_per_s": round(rate, 1),
        "window": a.window,
        "idle_rss_kib": rss0,
        "after_rss_kib": rss1,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
