"""Tool round trips with Node clients: the official `openai` Node SDK (`runTools`) and the Vercel
AI SDK (`ai` + `@ai-sdk/openai-compatible`, generateText/streamText with a tool that has
`execute`). The scripts live in tests/e2e/node/ (versions pinned in its package-lock.json,
installed by run.sh with `npm ci`); each prints one JSON line that these tests check."""

import json
import pathlib
import shutil
import subprocess

import pytest

from tools_common import PARALLEL_PROMPT, PROMPT, assert_upstream_round_trip, final_for, get_weather

NODE_DIR = pathlib.Path(__file__).resolve().parent / "node"


def run_node(script, target, stream, prompt=PROMPT):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (Node 20 or later is needed for the Node client tests)")
    if not (NODE_DIR / "node_modules").is_dir():
        pytest.fail(f"Node packages are missing: run `npm ci` in {NODE_DIR} (tests/e2e/run.sh does)")
    cfg = {"baseURL": target.base_url, "apiKey": target.api_key, "model": target.model,
           "prompt": prompt, "stream": stream}
    p = subprocess.run([node, str(NODE_DIR / script), json.dumps(cfg)], cwd=NODE_DIR,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, f"{script} failed ({p.returncode}):\n{p.stderr}\n{p.stdout}"
    return json.loads(p.stdout.strip().splitlines()[-1])


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])


@STREAM
def test_openai_node_run_tools(tool_target, stream):
    out = run_node("openai_run_tools.mjs", tool_target, stream)
    assert out["calls"] == ["Paris"], out
    assert out["final"] == final_for("Paris"), out
    if stream:
        assert out["streamed"] == final_for("Paris"), out
    assert out["finishReasons"] == ["tool_calls", "stop"], out
    assert out["messages"] == ["user", "assistant", "tool", "assistant"], out
    assert_upstream_round_trip(tool_target, stream=stream)


@STREAM
def test_ai_sdk_tool_with_execute(tool_target, stream):
    out = run_node("ai_sdk.mjs", tool_target, stream)
    assert out["errors"] == [], out
    assert out["calls"] == ["Paris"], out
    assert [(c["name"], c["input"]) for c in out["toolCalls"]] == [("get_weather", {"city": "Paris"})], out
    assert out["toolResults"] == [get_weather("Paris")], out
    assert out["finishReasons"] == ["tool-calls", "stop"], out
    assert out["final"] == final_for("Paris"), out
    if stream:
        # The tool input arrived as streamed deltas, not only as a finished call.
        assert {"tool-input-start", "tool-input-delta", "tool-call", "tool-result", "text-delta"} <= set(out["parts"]), out
    assert_upstream_round_trip(tool_target, stream=stream)


@STREAM
def test_node_clients_parallel_calls(fake_target, stream):
    tool_target = fake_target
    for script in ("openai_run_tools.mjs", "ai_sdk.mjs"):
        tool_target.fake.reset()
        out = run_node(script, tool_target, stream, PARALLEL_PROMPT)
        assert sorted(out["calls"]) == ["Paris", "Tokyo"], (script, out)
        assert out["final"] == final_for("Paris", "Tokyo"), (script, out)
        assert_upstream_round_trip(tool_target, cities=("Paris", "Tokyo"), stream=stream)
