"""gatelet's `openai` backend against a real OpenAI-compatible server written by somebody else.

The upstream is the LiteLLM proxy (PyPI `litellm[proxy]`) with `mock_response` models: it runs
offline, needs no weights, and streams its canned reply over SSE the way it streams real
providers. The client is the official `openai` Python SDK.

    .venv/bin/pip install 'litellm[proxy]' openai pytest
    cargo build && .venv/bin/python -m pytest tests/e2e/test_upstream_real.py -q

The gatelet binary is started through conftest.py ($GATELET_BIN, else target/debug/gatelet).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import FAKE_UPSTREAM_KEY, TOKEN, Gateway, ToolTarget
from tools_common import PROMPT, WEATHER_TOOL, assert_upstream_round_trip, final_for, get_weather

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[2]
MASTER_KEY = "sk-mock-master"
REPLY = "Hello from the LiteLLM mock"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, proc, seconds, what):
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {seconds} s")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def litellm_url(fake_upstream):
    exe = shutil.which("litellm", path=str(Path(sys.executable).parent)) or shutil.which("litellm")
    if exe is None:
        pytest.fail("the litellm proxy is not installed: pip install 'litellm[proxy]'")
    d = tempfile.mkdtemp(prefix="gatelet-litellm-")
    cfg = Path(d, "litellm.yaml")
    cfg.write_text(
        "model_list:\n"
        "  - model_name: mock-gpt\n"
        "    litellm_params:\n"
        "      model: openai/mock-gpt\n"
        "      api_key: unused\n"
        f"      mock_response: \"{REPLY}\"\n"
        # A model LiteLLM serves from the fake upstream of fake_upstream.py, which calls tools.
        "  - model_name: fake-tools\n"
        "    litellm_params:\n"
        "      model: openai/fake-gpt\n"
        f"      api_base: {fake_upstream.url}\n"
        f"      api_key: {FAKE_UPSTREAM_KEY}\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
    )
    port = free_port()
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False", NO_PROXY="*")
    log = open(Path(d, "litellm.log"), "wb")
    proc = subprocess.Popen(
        [exe, "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=d,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health/liveliness", proc, 120, "litellm proxy")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def gatelet_url(litellm_url, tmp_path_factory):
    agents = [
        {"id": "lite", "default": True, "systemPrompt": "Be brief.",
         "backend": {"kind": "openai", "baseUrl": litellm_url, "model": "mock-gpt", "apiKey": MASTER_KEY}},
        {"id": "badkey", "backend": {"kind": "openai", "baseUrl": litellm_url, "model": "mock-gpt", "apiKey": "sk-wrong"}},
        {"id": "litetools", "backend": {"kind": "openai", "baseUrl": litellm_url, "model": "fake-tools", "apiKey": MASTER_KEY}},
        {"id": "nomodel", "backend": {"kind": "openai", "baseUrl": litellm_url, "model": "no-such-model", "apiKey": MASTER_KEY}},
    ]
    gw = Gateway(upstream_config(agents), tmp_path_factory.mktemp("gatelet-upstream"))
    yield gw.base_url
    gw.stop()


def upstream_config(agents):
    """A gatelet config (JSON is JSON5) with token auth, chat completions on, and `agents`."""
    return json.dumps({
        "gateway": {"port": 0, "auth": {"token": TOKEN}, "http": {"endpoints": {"chatCompletions": {"enabled": True}}}},
        "agents": {"list": agents},
    })


def client(base_url, key):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)


MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_streaming_through_gatelet_matches_the_upstream(litellm_url, gatelet_url):
    direct = client(litellm_url, MASTER_KEY).chat.completions.create(
        model="mock-gpt", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "Be brief."}] + MESSAGES,
    )
    direct_chunks = list(direct)
    direct_usage = next(c.usage for c in reversed(direct_chunks) if c.usage)

    stream = client(gatelet_url, TOKEN).chat.completions.create(
        model="gatelet/lite", stream=True, stream_options={"include_usage": True}, messages=MESSAGES,
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == REPLY
    # LiteLLM streams the mock in several pieces; gatelet forwards them one by one.
    upstream_pieces = [c.choices[0].delta.content for c in direct_chunks if c.choices and c.choices[0].delta.content]
    assert pieces == upstream_pieces
    assert len(pieces) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == direct_usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == direct_usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_non_streaming_through_gatelet(gatelet_url):
    r = client(gatelet_url, TOKEN).chat.completions.create(model="gatelet/lite", messages=MESSAGES)
    assert r.choices[0].message.content == REPLY
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens > 0


def test_a_rejected_api_key_is_a_backend_error_naming_the_upstream(litellm_url, gatelet_url):
    with pytest.raises(openai.APIStatusError) as e:
        client(gatelet_url, TOKEN).chat.completions.create(model="gatelet/badkey", messages=MESSAGES)
    assert e.value.status_code == 502
    err = e.value.body
    assert err["code"] == "backend_error", err
    # Without a database LiteLLM refuses unknown keys with a 400 ("No connected db."), with one
    # with a 401: either way a 4xx whose error message (not raw JSON) is carried over.
    prefix = f"upstream {litellm_url}: HTTP 4"
    assert err["message"].startswith(prefix), err
    upstream_message = err["message"].split(": ", 2)[2]
    assert upstream_message and not upstream_message.startswith("{"), err


def test_an_unknown_upstream_model_is_a_backend_error(litellm_url, gatelet_url):
    with pytest.raises(openai.APIStatusError) as e:
        client(gatelet_url, TOKEN).chat.completions.create(model="gatelet/nomodel", stream=True, messages=MESSAGES)
    assert e.value.status_code == 502
    assert e.value.body["message"].startswith(f"upstream {litellm_url}: HTTP 4"), e.value.body


# ---- tokens reach an SDK client as they arrive ----

class GatedUpstream:
    """A stdlib upstream that sends one token, then waits until the test has seen it."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen_first = threading.Event()
        gate = self.seen_first

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()

                def send(obj):
                    data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()

                def delta(d, finish=None):
                    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                            "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}

                send(delta({"content": "first"}))
                gate.wait(20)
                send(delta({"content": " second"}))
                send(delta({}, "stop"))
                send(b"[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


def test_sdk_client_gets_each_token_before_the_upstream_sends_the_next(start_gateway):
    up = GatedUpstream()
    gw = start_gateway(upstream_config([{"id": "up", "backend": {"kind": "openai", "baseUrl": up.url}}]))
    try:
        stream = client(gw.base_url, TOKEN).chat.completions.create(
            model="gatelet/up", stream=True, messages=MESSAGES)
        got = []
        for c in stream:
            text = c.choices[0].delta.content if c.choices else None
            if text:
                got.append(text)
                # The upstream holds " second" back until this point: had gatelet buffered,
                # "first" would never have arrived here on its own.
                assert up.seen_first.is_set() == (len(got) > 1)
                up.seen_first.set()
        assert got == ["first", " second"]
    finally:
        up.seen_first.set()
        up.server.shutdown()


# ---- a tool round trip through gatelet, LiteLLM and an upstream that calls tools ----

from conftest import TOOL_TARGETS  # noqa: E402

VIA = ["gatelet"] + (["direct"] if "direct" in TOOL_TARGETS else [])


@pytest.mark.parametrize("via", VIA)
@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_tool_round_trip_through_litellm(litellm_url, gatelet_url, fake_upstream, via, stream):
    """client → gatelet (`openai` backend) → LiteLLM proxy → fake upstream: the call LiteLLM
    re-streams in its own pieces reaches the client, and the result reaches the upstream."""
    if via == "gatelet":
        target = ToolTarget("fake", gatelet_url, TOKEN, "gatelet/litetools", fake_upstream)
    else:
        target = ToolTarget("direct", litellm_url, MASTER_KEY, "fake-tools", fake_upstream)
    fake_upstream.reset()
    c = client(target.base_url, target.api_key)
    messages = [{"role": "user", "content": PROMPT}]

    def ask():
        if not stream:
            r = c.chat.completions.create(model=target.model, messages=messages, tools=[WEATHER_TOOL])
            return r.choices[0].message.model_dump(), r.choices[0].finish_reason
        msg, finish, calls = {"content": ""}, None, {}
        for chunk in c.chat.completions.create(model=target.model, messages=messages, tools=[WEATHER_TOOL],
                                               stream=True):
            if not chunk.choices:
                continue
            ch = chunk.choices[0]
            finish = ch.finish_reason or finish
            msg["content"] += ch.delta.content or ""
            for tc in ch.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": tc.id, "type": "function",
                                                   "function": {"name": tc.function.name, "arguments": ""}})
                slot["function"]["arguments"] += tc.function.arguments or ""
        msg["tool_calls"] = [calls[i] for i in sorted(calls)] or None
        return msg, finish

    msg, finish = ask()
    assert finish == "tool_calls", msg
    assert not msg["content"], msg
    [call] = msg["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    args = json.loads(call["function"]["arguments"])
    assert args == {"city": "Paris"}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function", "function": call["function"]}]},
        {"role": "tool", "tool_call_id": call["id"], "content": get_weather(**args)},
    ]
    msg, finish = ask()
    assert (msg["content"], finish) == (final_for("Paris"), "stop")
    assert_upstream_round_trip(target)


def upstream_connections(pid, port):
    """Local ports of `pid`'s established TCP connections to `port` on loopback."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
                if state == "01" and inode in inodes and int(remote.rsplit(":", 1)[1], 16) == port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc")
def test_several_turns_share_one_kept_alive_upstream_connection(litellm_url, start_gateway):
    gw = start_gateway(upstream_config([
        {"id": "lite", "default": True,
         "backend": {"kind": "openai", "baseUrl": litellm_url, "model": "mock-gpt", "apiKey": MASTER_KEY}},
    ]))
    port = int(litellm_url.rsplit(":", 1)[1].split("/")[0])
    c = client(gw.base_url, TOKEN)
    seen = set()
    for turn in range(4):
        if turn % 2:
            text = "".join(ch.choices[0].delta.content or "" for ch in
                           c.chat.completions.create(model="lite", messages=MESSAGES, stream=True) if ch.choices)
        else:
            text = c.chat.completions.create(model="lite", messages=MESSAGES).choices[0].message.content
        assert text == REPLY
        now = upstream_connections(gw.proc.pid, port)
        assert len(now) == 1, now
        seen |= now
    assert len(seen) == 1, f"every turn used the same upstream connection: {seen}"
