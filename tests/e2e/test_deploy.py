"""End-to-end: two gatelets behind nginx, configured with the recipe in docs/deploy.md.

Checks what the page promises: a sticky session stays on one instance and keeps its history,
ephemeral requests spread over both, a drain (SIGTERM) lets an open stream finish while new
requests go to the other instance, a SIGHUP reload takes effect, and /metrics passes through.
Skipped when nginx (or, for the HAProxy recipe, haproxy) is not installed; .ci/run installs
both, so CI always runs them.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, TOKEN, config_text, wait_until

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (CI installs it; locally: apt-get install nginx)"
)

AGENTS = (
    "agents: { list: [ { id: 'main', default: true }, "
    "{ id: 'slow', backend: { kind: 'echo', tokenDelayMs: 150 } } ] }"
)
# As docs/deploy.md says for instances behind a balancer (every client has nginx's address).
GATEWAY = "drainTimeoutSeconds: 60, maxRunsPerIp: 0, maxConnectionsPerIp: 0"


def recipe():
    """The nginx block of docs/deploy.md, exactly as a reader would copy it."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```nginx\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/deploy.md should have exactly one nginx block"
    return blocks[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, tmp, ports):
        conf = recipe()
        # The page's two instances and port, moved to this test's free ports.
        assert conf.count("server 127.0.0.1:18789 ") == 1 and conf.count("server 127.0.0.1:18790 ") == 1
        conf = conf.replace("127.0.0.1:18789", f"127.0.0.1:{ports[0]}")
        conf = conf.replace("127.0.0.1:18790", f"127.0.0.1:{ports[1]}")
        self.port = free_port()
        assert "listen 8080;" in conf
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{self.port};")
        (tmp / "gatelet.conf").write_text(conf)
        # What /etc/nginx/nginx.conf provides on Debian, minus what needs root: one process,
        # temp files and logs under tmp.
        (tmp / "nginx.conf").write_text(
            f"""daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/gatelet.conf;
}}
"""
        )
        self.tmp = tmp
        # -e: nginx opens its compiled-in error log before reading the config; point it here.
        args = ["-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
        check = subprocess.run([NGINX, "-t", *args], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen(
            [NGINX, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert wait_until(self.listening, 10), "nginx did not start: " + self.errors()
        self.base = f"http://127.0.0.1:{self.port}"

    def listening(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def errors(self):
        p = self.tmp / "error.log"
        return p.read_text() if p.exists() else ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def request(base, path, body=None, headers=None, token=TOKEN, timeout=30):
    h = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        h["Content-Type"] = "application/json"
    h.update(headers or {})
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers=h, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def chat(base, text, session=None, model="gatelet", **kw):
    headers = {"x-gatelet-session-key": session} if session else {}
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    status, h, raw = request(base, "/v1/chat/completions", body, headers, **kw)
    try:
        return status, h, json.loads(raw)
    except ValueError:  # e.g. nginx's own HTML error page
        return status, h, {"not_json": raw.decode(errors="replace")[:300]}


def served_by(gws, request_id):
    """Which gateway wrote the access line of this request id (logging is asynchronous)."""
    found = []

    def look():
        found[:] = [i for i, g in enumerate(gws) if any(f"request_id={request_id}" in l for l in g.lines)]
        return bool(found)

    assert wait_until(look, 10), f"no instance logged {request_id}"
    assert len(found) == 1, found
    return found[0]


@pytest.fixture
def cluster(start_gateway, tmp_path):
    gws = [start_gateway(config_text(GATEWAY, AGENTS)) for _ in range(2)]
    (tmp_path / "nginx").mkdir()
    ngx = Nginx(tmp_path / "nginx", [g.port for g in gws])
    yield gws, ngx
    ngx.stop()


def test_two_instances_behind_nginx(cluster):
    gws, ngx = cluster
    base = ngx.base

    # A sticky session stays on one instance and keeps its history: the echo backend counts
    # every word of the context as prompt tokens, so the count grows only if history is there.
    homes, prompts = set(), []
    for i in range(6):
        status, h, body = chat(base, "one two three", session="alice")
        assert status == 200, body
        homes.add(served_by(gws, h["x-request-id"]))
        prompts.append(body["usage"]["prompt_tokens"])
    assert len(homes) == 1, f"session alice moved between instances: {homes}"
    assert all(b > a for a, b in zip(prompts, prompts[1:])), f"history lost: {prompts}"
    home = homes.pop()

    # Ephemeral requests (no session header, no user) spread over both instances.
    seen = [0, 0]
    for i in range(20):
        status, h, body = chat(base, f"ephemeral {i}")
        assert status == 200, body
        seen[served_by(gws, h["x-request-id"])] += 1
    assert min(seen) >= 3, f"ephemeral requests not spread: {seen}"

    # /metrics through nginx (with the token), parsed.
    status, h, raw = request(base, "/metrics")
    assert status == 200 and h["Content-Type"].startswith("text/plain; version=0.0.4"), (status, h)
    series = dict(l.rsplit(" ", 1) for l in raw.decode().splitlines() if l and not l.startswith("#"))
    assert float(series['gatelet_runs_total{agent="main",outcome="completed"}']) >= 1
    assert request(base, "/metrics", token=None)[0] == 401

    # A SIGHUP reload: rotate the token on both instances; an added agent appears.
    for g in gws:
        path = pathlib.Path(g.proc.args[3])
        path.write_text(config_text(GATEWAY, AGENTS).replace(TOKEN, "rotated").replace(
            "{ id: 'slow'", "{ id: 'extra' }, { id: 'slow'"))
        g.proc.send_signal(signal.SIGHUP)
    for g in gws:
        assert wait_until(lambda: any("config reloaded" in l for l in g.lines), 10), g.lines
    for _ in range(4):  # both instances, whichever nginx picks
        assert request(base, "/v1/models")[0] == 401
        status, _, raw = request(base, "/v1/models", token="rotated")
        assert status == 200 and "extra" in raw.decode(), raw

    # Drain the instance that holds alice while a stream is open on it.
    drained, other = gws[home], gws[1 - home]
    body = json.dumps(
        {"model": "slow", "stream": True, "messages": [{"role": "user", "content": " ".join(["w"] * 30)}]}
    ).encode()
    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=body,
        headers={"Authorization": "Bearer rotated", "Content-Type": "application/json", "x-gatelet-session-key": "alice"},
    )
    stream = urllib.request.urlopen(req, timeout=60)
    assert stream.status == 200
    records = []
    first = stream.readline()
    assert first.startswith(b"data: "), first
    records.append(first)

    drained.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: any("stop signal: draining" in l for l in drained.lines), 10), drained.lines

    # While the stream runs, new requests (ephemeral and alice's) go to the other instance.
    for i in range(6):
        session = "alice" if i % 2 else None
        status, h, body = chat(base, f"during drain {i}", session=session, token="rotated")
        assert status == 200, body
        assert served_by(gws, h["x-request-id"]) == 1 - home
    assert drained.proc.poll() is None, "the drained instance must wait for its stream"

    # The stream that was open finishes in full.
    rest = stream.read().decode()
    lines = [l for l in (b"".join(records).decode() + rest).split("\n") if l.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    words = "".join(
        json.loads(l[6:])["choices"][0]["delta"].get("content") or "" for l in lines[:-1]
    )
    assert words.split() == ["w"] * 30, words
    assert drained.proc.wait(30) == 0
    assert any("drained; exiting" in l for l in drained.lines), drained.lines[-5:]
    # The stream's access line was written by the drained instance.
    assert served_by(gws, stream.headers["x-request-id"]) == home


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (CI installs it; locally: apt-get install haproxy)")
def test_haproxy_recipe(start_gateway, tmp_path):
    """The HAProxy block of docs/deploy.md: header or body `user` affinity, spread, drain."""
    gws = [start_gateway(config_text(GATEWAY, AGENTS)) for _ in range(2)]
    text = (ROOT / "docs" / "deploy.md").read_text()
    (cfg,) = re.findall(r"```haproxy\n(.*?)```", text, re.S)
    port = free_port()
    cfg = cfg.replace("bind :8080", f"bind 127.0.0.1:{port}")
    cfg = cfg.replace("127.0.0.1:18789", f"127.0.0.1:{gws[0].port}").replace("127.0.0.1:18790", f"127.0.0.1:{gws[1].port}")
    path = tmp_path / "haproxy.cfg"
    path.write_text(cfg)
    check = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        def up():
            try:
                return request(base, "/health", token=None)[0] == 200
            except OSError:
                return False

        assert wait_until(up, 10), "haproxy did not start"
        # Header affinity, body `user` affinity.
        for session, user in (("alice", None), (None, "bob")):
            homes = set()
            for _ in range(5):
                body = {"model": "gatelet", "messages": [{"role": "user", "content": "hi"}]}
                if user:
                    body["user"] = user
                headers = {"x-gatelet-session-key": session} if session else {}
                status, h, raw = request(base, "/v1/chat/completions", body, headers)
                assert status == 200, raw
                homes.add(served_by(gws, h["x-request-id"]))
            assert len(homes) == 1, (session, user, homes)
        seen = [0, 0]
        for i in range(20):
            status, h, body = chat(base, f"ephemeral {i}")
            assert status == 200, body
            seen[served_by(gws, h["x-request-id"])] += 1
        assert min(seen) >= 3, seen
        # Drain one: every request goes to the other.
        gws[0].proc.send_signal(signal.SIGTERM)
        assert gws[0].proc.wait(15) == 0
        for i in range(6):
            status, h, body = chat(base, f"after drain {i}", session="alice" if i % 2 else None)
            assert status == 200, body
            assert served_by(gws, h["x-request-id"]) == 1
    finally:
        proc.terminate()
        proc.wait(5)
