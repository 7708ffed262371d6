"""Fixtures for end-to-end tests: start the real gatelet binary on a free loopback port.

The binary is $GATELET_BIN, else target/debug/gatelet in this repository (build it first with
`cargo build`). Each gateway gets its own state directory and config file and is stopped when
the test (or the session, for the shared one) ends.
"""

import os
import pathlib
import re
import subprocess
import threading
import time

import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = pathlib.Path(os.environ.get("GATELET_BIN", ROOT / "target" / "debug" / "gatelet"))
TOKEN = "e2e-token"
LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def config_text(gateway_extra="", extra=""):
    """The default e2e config (JSON5): token auth, chat completions on, echo agents."""
    return (
        "{ gateway: { port: 0, auth: { token: '%s' }, "
        "http: { endpoints: { chatCompletions: { enabled: true } } }, %s }, %s }"
        % (TOKEN, gateway_extra, extra)
    )


class Gateway:
    """A running gateway process."""

    def __init__(self, cfg, state_dir):
        if not BIN.exists():
            raise RuntimeError(f"{BIN} is missing: run `cargo build` first")
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / "gatelet.json5"
        path.write_text(cfg)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATELET_")}
        env.update(GATELET_STATE_DIR=str(state_dir), GATELET_LOG="info")
        self.proc = subprocess.Popen(
            [str(BIN), "gateway", "--config", str(path), "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.lines = []
        found = threading.Event()
        self.port = None

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = LISTENING.search(line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(20):
            self.stop()
            raise RuntimeError("gatelet did not start:\n" + "\n".join(self.lines))
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, api_key=TOKEN, **kw):
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 30)
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def pytest_configure(config):
    # LiteLLM's own types trip this pydantic warning on import; it says nothing about gatelet.
    config.addinivalue_line("filterwarnings", "ignore:.*is using the `ReadOnly` qualifier:UserWarning")


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    """A shared gateway with two echo agents: `main` (default) and `slow` (200 ms per word)."""
    gw = Gateway(
        config_text(
            extra="agents: { list: [ { id: 'main', default: true }, "
            "{ id: 'slow', backend: { kind: 'echo', tokenDelayMs: 200 } } ] }"
        ),
        tmp_path_factory.mktemp("gw"),
    )
    yield gw
    gw.stop()


@pytest.fixture
def start_gateway(tmp_path):
    """A factory for gateways with their own config; all are stopped after the test."""
    started = []

    def start(cfg):
        gw = Gateway(cfg, tmp_path / f"gw{len(started)}")
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def client(gateway):
    return gateway.client()


def wait_until(pred, timeout=5.0, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return False


# ---- tool round trips: the targets every tool-calling client is run against ----

FAKE_UPSTREAM_KEY = "sk-fake-upstream"


@pytest.fixture(scope="session")
def fake_upstream():
    """A fake OpenAI-compatible upstream that calls tools (fake_upstream.py)."""
    from fake_upstream import FakeUpstream

    up = FakeUpstream(api_key=FAKE_UPSTREAM_KEY)
    yield up
    up.close()


@pytest.fixture(scope="session")
def tools_gateway(fake_upstream, tmp_path_factory):
    """A gateway with an `echo` agent (tool mode) and `openai` agents in front of the fake upstream:
    `fake` (streamed answers), `fakejson` (an upstream that answers streaming requests with a
    whole `chat.completion`), `fakebroken` and `fakebrokenjson` (malformed tool calls), `fakeobjargs` and `fakeobjargsjson`
    (arguments as objects)."""
    backend = "kind: 'openai', baseUrl: '%s', apiKey: '%s'" % (fake_upstream.url, FAKE_UPSTREAM_KEY)
    gw = Gateway(
        config_text(
            extra="agents: { list: [ { id: 'echo', default: true }, "
            "{ id: 'fake', backend: { %s, model: 'fake-gpt' } }, "
            "{ id: 'fakejson', backend: { %s, model: 'fake-json' } }, "
            "{ id: 'fakebroken', backend: { %s, model: 'fake-broken' } }, "
            "{ id: 'fakebrokenjson', backend: { %s, model: 'fake-broken-json' } }, "
            "{ id: 'fakeobjargs', backend: { %s, model: 'fake-objargs' } }, "
            "{ id: 'fakeobjargsjson', backend: { %s, model: 'fake-objargs-json' } } ] }"
            % ((backend,) * 6)
        ),
        tmp_path_factory.mktemp("gw-tools"),
    )
    yield gw
    gw.stop()


class ToolTarget:
    """Where a client sends its requests for one tool round trip.

    `fake` is the fake upstream when it answers (through gatelet's `openai` backend, or directly),
    else None (gatelet's `echo` agent, whose tool mode makes exactly one call per answer).
    """

    def __init__(self, name, base_url, api_key, model, fake):
        self.name = name
        self.base_url = base_url
        self.api_key = api_key
        self.model = model
        self.fake = fake
        self.through_gatelet = name != "direct"

    def __repr__(self):
        return f"ToolTarget({self.name})"


TOOL_TARGETS = [t.strip() for t in os.environ.get("E2E_TOOL_TARGETS", "echo,fake").split(",") if t.strip()]


@pytest.fixture(params=TOOL_TARGETS)
def tool_target(request, fake_upstream):
    """Each tool round trip runs against gatelet's echo tool mode (`echo`) and gatelet's `openai`
    backend in front of the fake upstream (`fake`). `E2E_TOOL_TARGETS=direct` points the clients at
    the fake upstream itself, to check the tests and the fake without gatelet."""
    fake_upstream.reset()
    name = request.param
    if name == "direct":
        return ToolTarget(name, fake_upstream.url, FAKE_UPSTREAM_KEY, "fake-gpt", fake_upstream)
    gw = request.getfixturevalue("tools_gateway")
    if name == "echo":
        return ToolTarget(name, gw.base_url, TOKEN, "gatelet/echo", None)
    if name == "fake":
        return ToolTarget(name, gw.base_url, TOKEN, "gatelet/fake", fake_upstream)
    raise ValueError(f"unknown tool target {name!r} in E2E_TOOL_TARGETS")


@pytest.fixture(params=[t for t in TOOL_TARGETS if t != "echo"] or ["fake"])
def fake_target(request, fake_upstream):
    """The targets where the fake upstream answers (it can make parallel calls and shows what it
    received): gatelet's `openai` backend in front of it, or the fake itself under
    `E2E_TOOL_TARGETS=direct`."""
    fake_upstream.reset()
    if request.param == "direct":
        return ToolTarget("direct", fake_upstream.url, FAKE_UPSTREAM_KEY, "fake-gpt", fake_upstream)
    gw = request.getfixturevalue("tools_gateway")
    return ToolTarget("fake", gw.base_url, TOKEN, "gatelet/fake", fake_upstream)


@pytest.fixture
def gatelet_fake_target(fake_upstream, tools_gateway):
    """gatelet's `openai` backend in front of the fake upstream, whatever E2E_TOOL_TARGETS says."""
    fake_upstream.reset()
    return ToolTarget("fake", tools_gateway.base_url, TOKEN, "gatelet/fake", fake_upstream)
