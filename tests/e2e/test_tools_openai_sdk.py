"""Tool round trips with the official `openai` Python SDK: sync, async and the `.stream()` helper,
streaming and not, against gatelet's echo tool mode and gatelet's `openai` backend in front of a
fake upstream that calls tools (see conftest.py `tool_target`)."""

import asyncio
import json

import openai
import pydantic
import pytest

from tools_common import (
    PARALLEL_PROMPT,
    PROMPT,
    WEATHER_TOOL,
    assert_upstream_round_trip,
    final_for,
    get_weather,
    tool_text,
)


def sync_client(t):
    return openai.OpenAI(base_url=t.base_url, api_key=t.api_key, max_retries=0, timeout=30)


def async_client(t):
    return openai.AsyncOpenAI(base_url=t.base_url, api_key=t.api_key, max_retries=0, timeout=30)


def results_for(message):
    """The tool messages a client sends back for an assistant message's tool calls."""
    out = []
    for call in message.tool_calls:
        assert call.type == "function"
        assert call.function.name == "get_weather"
        args = json.loads(call.function.arguments)
        out.append({"role": "tool", "tool_call_id": call.id, "content": get_weather(**args)})
    return out


def follow_up(message):
    """The assistant message as a client replays it: the SDK's own type, dumped for the wire."""
    return message.model_dump(exclude_none=True, exclude={"refusal", "annotations", "audio"}) | {"content": None}


def check_first_answer(r, cities=("Paris",)):
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.role == "assistant"
    assert c.message.content is None
    assert [json.loads(tc.function.arguments) for tc in c.message.tool_calls] == [{"city": x} for x in cities]
    assert len({tc.id for tc in c.message.tool_calls}) == len(cities)


def test_sync_non_streaming_round_trip(tool_target):
    client = sync_client(tool_target)
    messages = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model=tool_target.model, messages=messages, tools=[WEATHER_TOOL])
    check_first_answer(r)
    messages += [follow_up(r.choices[0].message)] + results_for(r.choices[0].message)
    r2 = client.chat.completions.create(model=tool_target.model, messages=messages, tools=[WEATHER_TOOL])
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].message.content == final_for("Paris")
    assert r2.choices[0].message.tool_calls is None
    assert_upstream_round_trip(tool_target, stream=False)


def collect_stream(stream):
    """Rebuild tool calls from raw chunks, checking OpenAI's streaming shape on the way: index on
    every piece; id, type and name only on the first piece of each call; arguments as strings."""
    calls, text, finishes, pieces = {}, [], [], {}
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        if ch.finish_reason:
            finishes.append(ch.finish_reason)
        if ch.delta.content:
            text.append(ch.delta.content)
        for tc in ch.delta.tool_calls or []:
            assert tc.index is not None
            if tc.index not in calls:
                assert tc.id and tc.type == "function" and tc.function.name, tc
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
                pieces[tc.index] = 0
            else:
                assert tc.id is None and tc.function.name is None, tc
            if tc.function and tc.function.arguments:
                assert isinstance(tc.function.arguments, str)
                calls[tc.index]["arguments"] += tc.function.arguments
                pieces[tc.index] += 1
    return calls, "".join(text), finishes, pieces


def test_sync_streaming_round_trip(tool_target):
    client = sync_client(tool_target)
    messages = [{"role": "user", "content": PROMPT}]
    calls, text, finishes, pieces = collect_stream(client.chat.completions.create(
        model=tool_target.model, messages=messages, tools=[WEATHER_TOOL], stream=True))
    assert text == ""
    assert finishes == ["tool_calls"]
    assert list(calls) == [0]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    # The arguments arrive in pieces (echo: at most 8 bytes each; the fake: 5), not in one lump.
    assert pieces[0] >= 2
    call = calls[0]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": get_weather("Paris")},
    ]
    _, text, finishes, _ = collect_stream(client.chat.completions.create(
        model=tool_target.model, messages=messages, tools=[WEATHER_TOOL], stream=True,
        stream_options={"include_usage": True}))
    assert text == final_for("Paris")
    assert finishes == ["stop"]
    assert_upstream_round_trip(tool_target, stream=True)


def test_async_round_trip_non_streaming_and_streaming(tool_target):
    async def go(stream):
        client = async_client(tool_target)
        messages = [{"role": "user", "content": PROMPT}]
        if stream:
            s = await client.chat.completions.create(
                model=tool_target.model, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto",
                stream=True)
            chunks = [c async for c in s]
            args = "".join(tc.function.arguments or "" for c in chunks if c.choices
                           for tc in c.choices[0].delta.tool_calls or [])
            first = next(tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or [])
            assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
                == ["tool_calls"]
            call = {"id": first.id, "type": "function",
                    "function": {"name": first.function.name, "arguments": args}}
        else:
            r = await client.chat.completions.create(
                model=tool_target.model, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto")
            check_first_answer(r)
            call = r.choices[0].message.tool_calls[0].model_dump()
        city = json.loads(call["function"]["arguments"])["city"]
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": get_weather(city)}]
        if stream:
            s = await client.chat.completions.create(
                model=tool_target.model, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto",
                stream=True)
            final = "".join([c.choices[0].delta.content or "" async for c in s if c.choices])
        else:
            r = await client.chat.completions.create(
                model=tool_target.model, messages=messages, tools=[WEATHER_TOOL], tool_choice="auto")
            final = r.choices[0].message.content
        await client.close()
        return final

    for stream in (False, True):
        if tool_target.fake:
            tool_target.fake.reset()
        assert asyncio.run(go(stream)) == final_for("Paris")
        assert_upstream_round_trip(tool_target, tool_choice="auto", stream=stream)


class GetWeather(pydantic.BaseModel):
    """Current weather in a city."""

    city: str


def test_stream_helper_round_trip(tool_target):
    """`client.chat.completions.stream()`: its events and its final completion carry the call,
    parsed into the tool's pydantic model (a strict function tool)."""
    client = sync_client(tool_target)
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    messages = [{"role": "user", "content": PROMPT}]
    done_events = []
    with client.chat.completions.stream(model=tool_target.model, messages=messages, tools=[tool]) as s:
        for ev in s:
            if ev.type == "tool_calls.function.arguments.done":
                done_events.append(ev)
        final = s.get_final_completion()
    assert [(e.name, e.index, e.parsed_arguments) for e in done_events] == [
        ("get_weather", 0, GetWeather(city="Paris"))]
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls"
    call = msg.tool_calls[0]
    assert call.function.parsed_arguments == GetWeather(city="Paris")
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": get_weather(call.function.parsed_arguments.city)},
    ]
    deltas = []
    with client.chat.completions.stream(model=tool_target.model, messages=messages, tools=[tool]) as s:
        for ev in s:
            if ev.type == "content.delta":
                deltas.append(ev.delta)
        final = s.get_final_completion()
    assert final.choices[0].message.content == final_for("Paris")
    assert "".join(deltas) == final_for("Paris")
    assert final.choices[0].finish_reason == "stop"
    assert_upstream_round_trip(tool_target)
    if tool_target.fake:
        assert all(b["tools"][0]["function"].get("strict") is True for b in tool_target.fake.bodies())


def test_async_stream_helper_round_trip(tool_target):
    """`AsyncOpenAI().chat.completions.stream()`: the same round trip through the async helper."""
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")

    async def go():
        client = async_client(tool_target)
        messages = [{"role": "user", "content": PROMPT}]
        async with client.chat.completions.stream(model=tool_target.model, messages=messages, tools=[tool]) as s:
            final = await s.get_final_completion()
        call = final.choices[0].message.tool_calls[0]
        assert final.choices[0].finish_reason == "tool_calls"
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "type": "function",
                 "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": get_weather(call.function.parsed_arguments.city)},
        ]
        async with client.chat.completions.stream(model=tool_target.model, messages=messages, tools=[tool]) as s:
            text = "".join([ev.delta async for ev in s if ev.type == "content.delta"])
        await client.close()
        return text

    assert asyncio.run(go()) == final_for("Paris")
    assert_upstream_round_trip(tool_target)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_parallel_calls_round_trip(fake_target, stream):
    tool_target = fake_target
    client = sync_client(tool_target)
    messages = [{"role": "user", "content": PARALLEL_PROMPT}]
    kw = dict(model=tool_target.model, tools=[WEATHER_TOOL], parallel_tool_calls=True)
    if stream:
        calls, _, finishes, _ = collect_stream(client.chat.completions.create(messages=messages, stream=True, **kw))
        assert finishes == ["tool_calls"]
        assert sorted(calls) == [0, 1]
        tool_calls = [{"id": calls[i]["id"], "type": "function",
                       "function": {"name": calls[i]["name"], "arguments": calls[i]["arguments"]}}
                      for i in (0, 1)]
    else:
        r = client.chat.completions.create(messages=messages, **kw)
        check_first_answer(r, ("Paris", "Tokyo"))
        tool_calls = [tc.model_dump() for tc in r.choices[0].message.tool_calls]
    messages.append({"role": "assistant", "content": None, "tool_calls": tool_calls})
    for tc in tool_calls:
        city = json.loads(tc["function"]["arguments"])["city"]
        messages.append({"role": "tool", "tool_call_id": tc["id"], "content": get_weather(city)})
    r2 = client.chat.completions.create(messages=messages, **kw)
    assert r2.choices[0].message.content == final_for("Paris", "Tokyo")
    assert_upstream_round_trip(tool_target, cities=("Paris", "Tokyo"))
    assert all(b.get("parallel_tool_calls") is True for b in tool_target.fake.bodies())


def test_upstream_answering_without_streaming(tools_gateway):
    """An upstream that answers a streaming request with a whole completion holding
    `message.tool_calls`: gatelet still hands the calls to both kinds of client."""
    client = tools_gateway.client()
    messages = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="gatelet/fakejson", messages=messages, tools=[WEATHER_TOOL])
    check_first_answer(r)
    calls, _, finishes, _ = collect_stream(client.chat.completions.create(
        model="gatelet/fakejson", messages=messages, tools=[WEATHER_TOOL], stream=True))
    assert finishes == ["tool_calls"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    messages += [follow_up(r.choices[0].message)] + results_for(r.choices[0].message)
    r2 = client.chat.completions.create(model="gatelet/fakejson", messages=messages, tools=[WEATHER_TOOL])
    assert r2.choices[0].message.content == final_for("Paris")


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_sticky_session_sends_the_history_once_in_order(gatelet_fake_target, stream):
    """With a sticky session (`user`) the client replays the whole conversation; gatelet keeps the
    stored turns (the assistant's tool calls included) and sends each message upstream once."""
    tool_target = gatelet_fake_target
    client = sync_client(tool_target)
    user = f"e2e-tools-sticky-{stream}"
    kw = dict(model=tool_target.model, tools=[WEATHER_TOOL], user=user)
    messages = [{"role": "user", "content": PROMPT}]
    if stream:
        calls, _, _, _ = collect_stream(client.chat.completions.create(messages=messages, stream=True, **kw))
        call = {"id": calls[0]["id"], "type": "function",
                "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}
    else:
        call = client.chat.completions.create(messages=messages, **kw).choices[0].message.tool_calls[0].model_dump()
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"], "content": get_weather("Paris")}]
    r = client.chat.completions.create(messages=messages, **kw)
    assert r.choices[0].message.content == final_for("Paris")
    assert_upstream_round_trip(tool_target)
    # A third turn: the stored transcript (call, result, answer) comes first, once.
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "thanks"}]
    r = client.chat.completions.create(messages=messages, **kw)
    assert r.choices[0].message.content == "fake reply: thanks"
    third = tool_target.fake.bodies()[2]["messages"]
    convo = [(m["role"], m.get("tool_call_id") or m.get("content")) for m in third
             if m["role"] not in ("system", "developer")]
    assert convo == [("user", PROMPT), ("assistant", None), ("tool", call["id"]),
                     ("assistant", final_for("Paris")), ("user", "thanks")], third
    assert third[1]["tool_calls"][0]["id"] == call["id"]


def test_output_fields_reach_the_upstream_verbatim(fake_target):
    """The §5.1 fields a client sets reach an `openai` upstream exactly as sent, and the ones it
    did not set are not invented."""
    tool_target = fake_target
    client = sync_client(tool_target)
    sent = {
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "w", "strict": True,
            "schema": {"type": "object", "properties": {"t": {"type": "number"}}, "required": ["t"],
                       "additionalProperties": False}}},
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "logit_bias": {"50256": -100},
        "logprobs": True,
        "top_logprobs": 2,
        "reasoning_effort": "low",
        "metadata": {"team": "e2e"},
    }
    r = client.chat.completions.create(model=tool_target.model, messages=[{"role": "user", "content": PROMPT}],
                                       tools=[WEATHER_TOOL], **sent)
    assert r.choices[0].finish_reason == "tool_calls"
    client.chat.completions.create(model=tool_target.model, messages=[{"role": "user", "content": "plain"}])
    with_fields, without = tool_target.fake.bodies()
    for k, v in sent.items():
        assert with_fields.get(k) == v, (k, with_fields)
    assert with_fields["tools"] == [WEATHER_TOOL]
    assert not set(sent) & set(without), without
    assert "tools" not in without


def test_argument_pieces_reach_the_client_as_they_arrive(gatelet_fake_target):
    """The upstream holds the rest of the call back until the client has seen the first
    arguments piece: had gatelet buffered the call, that piece would never arrive on its own."""
    import threading

    fake = gatelet_fake_target.fake
    fake.gate = threading.Event()
    try:
        stream = sync_client(gatelet_fake_target).chat.completions.create(
            model=gatelet_fake_target.model, messages=[{"role": "user", "content": PROMPT}],
            tools=[WEATHER_TOOL], stream=True)
        pieces = []
        for chunk in stream:
            for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                if tc.function and tc.function.arguments:
                    assert fake.gate.is_set() == bool(pieces), "a piece arrived only after the gate opened"
                    pieces.append(tc.function.arguments)
                    fake.gate.set()
        assert len(pieces) >= 2 and json.loads("".join(pieces)) == {"city": "Paris"}
    finally:
        fake.gate.set()
        fake.gate = None


@pytest.mark.parametrize("agent", ["fakebroken", "fakebrokenjson"])
@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_a_malformed_upstream_call_is_a_backend_error(tools_gateway, agent, stream):
    """An upstream call without a name (streamed) or a `tool_calls` that is not an array (whole)
    reaches the SDK as a `backend_error` naming the upstream, never as an empty answer or a hang."""
    client = tools_gateway.client()
    with pytest.raises(openai.APIError) as e:
        r = client.chat.completions.create(model=f"gatelet/{agent}", messages=[{"role": "user", "content": PROMPT}],
                                           tools=[WEATHER_TOOL], stream=stream)
        if stream:
            for _ in r:
                pass
    err = e.value.body if isinstance(e.value.body, dict) else {}
    if isinstance(e.value, openai.APIStatusError):
        assert e.value.status_code == 502
        assert e.value.code == "backend_error"
    assert "malformed" in str(e.value), (str(e.value), err)
    assert "upstream http://127.0.0.1:" in str(e.value), str(e.value)


@pytest.mark.parametrize("agent", ["fakeobjargs", "fakeobjargsjson"])
@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_object_arguments_reach_the_client_as_json_text(tools_gateway, agent, stream):
    """An upstream that sends `arguments` as an object (Ollama does): the SDK still gets the JSON
    text OpenAI's clients expect, and the round trip completes."""
    client = tools_gateway.client()
    messages = [{"role": "user", "content": PROMPT}]
    kw = dict(model=f"gatelet/{agent}", tools=[WEATHER_TOOL])
    if stream:
        calls, _, finishes, _ = collect_stream(client.chat.completions.create(messages=messages, stream=True, **kw))
        assert finishes == ["tool_calls"]
        call = {"id": calls[0]["id"], "type": "function",
                "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}
    else:
        r = client.chat.completions.create(messages=messages, **kw)
        check_first_answer(r)
        call = r.choices[0].message.tool_calls[0].model_dump()
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": call["id"], "content": get_weather("Paris")}]
    assert client.chat.completions.create(messages=messages, **kw).choices[0].message.content == final_for("Paris")


@pytest.mark.parametrize("stream", [False, True], ids=["non-streaming", "streaming"])
def test_agent_tool_runs_in_gatelet_and_the_client_sees_only_the_answer(start_gateway, fake_upstream, tmp_path,
                                                                        stream):
    """An agent tool (a script gatelet runs) called by the fake upstream: the SDK client sends no
    tools and gets only the final answer; the upstream saw the agent's tool offered, then the call
    and the script's output in the history."""
    import sys

    from conftest import FAKE_UPSTREAM_KEY, config_text

    script = tmp_path / "weather_tool.py"
    script.write_text(
        "import json, sys\n"
        "args = json.load(sys.stdin)\n"
        "print(f\"sunny, 21 C in {args['city']}\")\n"
    )
    tool = {"name": "get_weather", "description": "Current weather in a city.",
            "parameters": WEATHER_TOOL["function"]["parameters"],
            "command": {"argv": [sys.executable, str(script)], "timeoutSeconds": 20}}
    agent = {"id": "runner", "default": True, "tools": [tool],
             "backend": {"kind": "openai", "baseUrl": fake_upstream.url, "apiKey": FAKE_UPSTREAM_KEY,
                         "model": "fake-gpt"}}
    gw = start_gateway(config_text(extra="agents: { list: [ %s ] }" % json.dumps(agent)))
    fake_upstream.reset()
    client = gw.client()
    messages = [{"role": "user", "content": PROMPT}]
    if stream:
        calls, text, finishes, _ = collect_stream(client.chat.completions.create(
            model="gatelet/runner", messages=messages, stream=True))
        assert calls == {}
    else:
        r = client.chat.completions.create(model="gatelet/runner", messages=messages)
        assert r.choices[0].message.tool_calls is None
        text, finishes = r.choices[0].message.content, [r.choices[0].finish_reason]
    assert (text, finishes) == (final_for("Paris"), ["stop"])
    first, second = fake_upstream.bodies()
    assert [t["function"]["name"] for t in first["tools"]] == ["get_weather"]
    assert "command" not in json.dumps(first["tools"])
    convo = [m for m in second["messages"] if m["role"] != "system"]
    assert [m["role"] for m in convo] == ["user", "assistant", "tool"]
    assert convo[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert convo[2]["tool_call_id"] == convo[1]["tool_calls"][0]["id"]
    assert tool_text(convo[2]["content"]) == get_weather("Paris")
