"""What every tool round trip shares: the tool, the prompt that makes the model call it, and the
checks on what the fake upstream received."""

import json

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}

# The echo tool mode and the fake upstream both answer this with one call get_weather({"city":"Paris"}).
PROMPT = '/tool get_weather {"city":"Paris"}'
# The fake upstream answers this with two parallel calls (index 0 and 1).
PARALLEL_PROMPT = PROMPT + '\n/tool get_weather {"city":"Tokyo"}'


def get_weather(city):
    """The tool every client runs: its result names the city, so the final answer proves the
    client parsed the call's arguments."""
    return f"sunny, 21 C in {city}"


def final_for(*cities):
    """The final answer once the tool results for `cities` went back (echo and fake agree)."""
    return "tool said: " + " | ".join(get_weather(c) for c in cities)


def assert_upstream_round_trip(target, tool_names=("get_weather",), cities=("Paris",), tool_choice=None,
                               stream=None):
    """When the fake upstream answered: it got exactly two requests, the first with the client's
    tools (and tool_choice), the second with the history in order, each message once: the user
    turn, the assistant's tool calls (content null), one tool message per call."""
    if target.fake is None:
        return
    bodies = target.fake.bodies()
    assert len(bodies) == 2, json.dumps(bodies, indent=1)
    first, second = bodies
    for b in bodies:
        assert sorted(t["function"]["name"] for t in b.get("tools") or []) == sorted(tool_names), b
        assert all(t["type"] == "function" for t in b["tools"]), b
        if tool_choice is not None:
            assert b.get("tool_choice") == tool_choice, b
        if target.through_gatelet:
            # gatelet always streams from its upstream and names the upstream model.
            assert b["stream"] is True and b["model"] == "fake-gpt", b
        elif stream is not None:
            assert bool(b.get("stream")) == stream, b
    convo = [m for m in second["messages"] if m["role"] not in ("system", "developer")]
    roles = [m["role"] for m in convo]
    assert roles == ["user", "assistant"] + ["tool"] * len(cities), json.dumps(second["messages"], indent=1)
    assert [m["role"] for m in first["messages"] if m["role"] not in ("system", "developer")] == ["user"]
    asst = convo[1]
    assert asst.get("content") in (None, ""), asst
    calls = asst["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"] * len(cities)
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": c} for c in cities]
    assert [c["id"] for c in calls] == [f"call_fake_{i}" for i in range(len(cities))]
    tools = convo[2:]
    assert [m["tool_call_id"] for m in tools] == [c["id"] for c in calls]
    assert [tool_text(m["content"]) for m in tools] == [get_weather(c) for c in cities]


def tool_text(content):
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content)
