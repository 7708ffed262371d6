#!/usr/bin/env python3
"""Syscalls the gateway makes while WebSocket connections sit idle (after `connect`).

Opens --conns authenticated connections to the release binary, waits --settle seconds, then
counts the gateway's syscalls for --seconds with `strace -c -f -p PID` (needs strace and ptrace
rights, e.g. root). Idle connections should cost nothing but their timers: the target is fewer
than 100 syscalls in 5 s for 1,000 connections (ticks every 30 s per connection aside, which
fall outside the window when the connections were opened together).

    cargo build --release && nice -n 10 python3 benches/ws_idle_syscalls.py [--conns 1000] [--seconds 5]
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ws_bench import ROOT, TOKEN, Conn, free_port  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--bin", default=os.environ.get("GATELET_BIN", str(ROOT / "target" / "release" / "gatelet")))
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * a.conns + 256)), hard))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="gatelet-ws-idle-") as state:
        cfg = Path(state) / "gatelet.json5"
        cfg.write_text(
            "{ gateway: { port: %d, auth: { token: '%s' }, maxConnectionsPerIp: 0 }, session: { persist: false } }"
            % (port, TOKEN)
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATELET_")}
        env.update(GATELET_STATE_DIR=state, GATELET_LOG="warn")
        gw = subprocess.Popen(
            [a.bin, "gateway", "--config", str(cfg)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=lambda: [None for _ in gw.stderr], daemon=True).start()
        try:
            deadline = time.time() + 20
            while True:
                try:
                    Conn(port).s.close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.05)
            conns = [Conn(port).connect() for _ in range(a.conns)]
            time.sleep(a.settle)
            out = subprocess.run(
                ["timeout", "-s", "INT", str(a.seconds), "strace", "-c", "-f", "-p", str(gw.pid)],
                capture_output=True,
                text=True,
            )
            report = out.stderr
            total = 0
            for line in report.splitlines():
                parts = line.split()
                if parts and parts[-1] == "total":
                    total = int(parts[3]) if len(parts) >= 5 else int(parts[2])
            print(report)
            print(f"{a.conns} idle WebSocket connections: {total} syscalls by the gateway in {a.seconds:g} s")
            for c in conns:
                c.s.close()
        finally:
            gw.terminate()
            try:
                gw.wait(15)
            except subprocess.TimeoutExpired:
                gw.kill()


if __name__ == "__main__":
    main()
