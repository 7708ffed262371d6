"""Tool round trips with the Python clients other than the official SDK: LangChain
(`ChatOpenAI.bind_tools`, invoke and stream), the LiteLLM SDK (`litellm.completion` with an
`openai/` model and `api_base`) and the `llm` CLI (`--functions`, with the model declared in
`extra-openai-models.yaml`). Each runs against the targets of conftest.py `tool_target`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools_common import PARALLEL_PROMPT, PROMPT, WEATHER_TOOL, assert_upstream_round_trip, final_for, get_weather

# LiteLLM would otherwise fetch its model price list from the internet when imported.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_TELEMETRY", "False")

STREAM = pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])


# ---- LangChain ----

def langchain_model(target):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool("get_weather")
    def weather(city: str) -> str:
        """Current weather in a city."""
        return get_weather(city)

    llm = ChatOpenAI(model=target.model, base_url=target.base_url, api_key=target.api_key,
                     max_retries=0, timeout=30)
    return llm.bind_tools([weather]), weather


def langchain_ask(model, messages, stream):
    if not stream:
        return model.invoke(messages)
    full, n = None, 0
    for chunk in model.stream(messages):
        full = chunk if full is None else full + chunk
        n += 1
    assert n > 1, "the stream arrived as one chunk"
    return full


@STREAM
def test_langchain_bind_tools(tool_target, stream):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    model, weather = langchain_model(tool_target)
    messages = [HumanMessage(PROMPT)]
    ai = langchain_ask(model, messages, stream)
    assert isinstance(ai, AIMessage)
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"city": "Paris"})], ai
    assert ai.invalid_tool_calls == []
    assert ai.response_metadata.get("finish_reason") == "tool_calls", ai.response_metadata
    if stream:
        # The arguments came in several streamed pieces that LangChain joined.
        assert len(ai.tool_call_chunks) == 1 and ai.tool_call_chunks[0]["index"] == 0
    result = weather.invoke(ai.tool_calls[0])
    assert isinstance(result, ToolMessage) and result.tool_call_id == ai.tool_calls[0]["id"]
    final = langchain_ask(model, messages + [ai, result], stream)
    assert final.content == final_for("Paris")
    assert final.tool_calls == []
    assert_upstream_round_trip(tool_target, stream=stream)


def test_langchain_parallel_calls(fake_target):
    from langchain_core.messages import HumanMessage

    tool_target = fake_target
    model, weather = langchain_model(tool_target)
    messages = [HumanMessage(PARALLEL_PROMPT)]
    ai = langchain_ask(model, messages, True)
    assert [c["args"]["city"] for c in ai.tool_calls] == ["Paris", "Tokyo"]
    final = model.invoke(messages + [ai] + [weather.invoke(c) for c in ai.tool_calls])
    assert final.content == final_for("Paris", "Tokyo")
    assert_upstream_round_trip(tool_target, cities=("Paris", "Tokyo"))


# ---- LiteLLM SDK ----

@STREAM
def test_litellm_completion(tool_target, stream):
    import litellm

    kw = dict(model="openai/" + tool_target.model, api_base=tool_target.base_url,
              api_key=tool_target.api_key, tools=[WEATHER_TOOL], timeout=30, num_retries=0)

    def ask(messages):
        if not stream:
            return litellm.completion(messages=messages, **kw)
        chunks = list(litellm.completion(messages=messages, stream=True, **kw))
        assert len(chunks) > 1
        return litellm.stream_chunk_builder(chunks, messages=messages)

    messages = [{"role": "user", "content": PROMPT}]
    r = ask(messages)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args == {"city": "Paris"}
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": get_weather(**args)},
    ]
    r2 = ask(messages)
    assert r2.choices[0].message.content == final_for("Paris")
    assert r2.choices[0].finish_reason == "stop"
    assert_upstream_round_trip(tool_target, stream=stream)


# ---- the llm CLI ----

LLM_FUNCTIONS = '''
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"sunny, 21 C in {city}"
'''


@STREAM
def test_llm_cli_functions(tool_target, stream, tmp_path):
    exe = Path(sys.executable).parent / "llm"
    if not exe.exists():
        pytest.fail(f"the llm CLI is not installed in {exe.parent} (tests/e2e/requirements.txt)")
    (tmp_path / "extra-openai-models.yaml").write_text(
        "- model_id: gatelet-tools\n"
        f"  model_name: {tool_target.model}\n"
        f"  api_base: {tool_target.base_url}\n"
        "  api_key_name: gatelet\n"
        "  supports_tools: true\n"
    )
    (tmp_path / "keys.json").write_text(json.dumps({"gatelet": tool_target.api_key}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LLM_"))}
    env["LLM_USER_PATH"] = str(tmp_path)
    argv = [str(exe), "prompt", "-m", "gatelet-tools", "--no-log", "--functions", LLM_FUNCTIONS, "--td", PROMPT]
    if not stream:
        argv.insert(2, "--no-stream")
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr + p.stdout
    out = p.stdout + p.stderr
    # --td shows (on stderr) the call with its parsed arguments and the tool's output; stdout ends
    # with the final answer.
    assert "Tool call: get_weather({'city': 'Paris'})\n  " + get_weather("Paris") in p.stderr, out
    assert p.stdout.strip().splitlines()[-1] == final_for("Paris"), out
    assert_upstream_round_trip(tool_target, stream=stream)
