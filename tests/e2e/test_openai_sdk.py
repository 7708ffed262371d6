"""End-to-end tests with real clients: the official `openai` Python SDK and `curl -N`."""

import json
import shutil
import subprocess
import time

import openai
import pytest

from conftest import TOKEN, config_text


def test_non_streaming(client):
    r = client.chat.completions.create(
        model="gatelet", messages=[{"role": "user", "content": "hello from the sdk"}]
    )
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == "gatelet"
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0
    assert c.message.role == "assistant"
    assert c.message.content == "hello from the sdk"
    assert c.finish_reason == "stop"
    assert r.usage.prompt_tokens == 4
    assert r.usage.completion_tokens == 4
    assert r.usage.total_tokens == 8
    assert abs(r.created - time.time()) < 120


def test_raw_response_headers(client):
    raw = client.chat.completions.with_raw_response.create(
        model="gatelet/main", messages=[{"role": "user", "content": "hi"}], user="hdr"
    )
    assert raw.headers["x-gatelet-session-key"] == "agent:main:openai-user:hdr"
    assert raw.headers["x-request-id"]
    assert raw.parse().choices[0].message.content == "hi"


def test_max_tokens_finish_length(client):
    r = client.chat.completions.create(
        model="gatelet",
        messages=[{"role": "user", "content": "one two three four"}],
        max_completion_tokens=2,
    )
    assert r.choices[0].message.content == "one two"
    assert r.choices[0].finish_reason == "length"


def test_streaming_deltas_arrive_incrementally(gateway):
    client = gateway.client()
    text = "streamed words arrive one by one"
    stream = client.chat.completions.create(
        model="gatelet/slow", messages=[{"role": "user", "content": text}], stream=True
    )
    deltas, times, finishes, roles, ids = [], [], [], [], set()
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == "gatelet/slow"
        ids.add(chunk.id)
        ch = chunk.choices[0]
        if ch.delta.role:
            roles.append(ch.delta.role)
        if ch.delta.content:
            deltas.append(ch.delta.content)
            times.append(time.monotonic())
        if ch.finish_reason:
            finishes.append(ch.finish_reason)
    assert "".join(deltas) == text
    assert len(deltas) == len(text.split())
    assert roles == ["assistant"]
    assert finishes == ["stop"]
    assert len(ids) == 1
    # Five 200 ms pauses between six words: the chunks were not buffered up to the end.
    assert times[-1] - times[0] >= 0.7


def test_streaming_include_usage(client):
    stream = client.chat.completions.create(
        model="gatelet",
        messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "a b c"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].choices == []
    u = chunks[-1].usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (4, 3, 7)
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "a b c"


def test_stream_helper_accumulates(client):
    with client.chat.completions.stream(
        model="gatelet", messages=[{"role": "user", "content": "helper text"}]
    ) as s:
        final = s.get_final_completion()
    assert final.choices[0].message.content == "helper text"
    assert final.choices[0].finish_reason == "stop"


def test_wrong_token_is_authentication_error(gateway):
    bad = gateway.client(api_key="wrong")
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="gatelet", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"
    assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}], stream=True
        )
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gatelet/nobody")


def test_bad_request_is_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gatelet", messages=[])
    assert e.value.param == "messages"


def test_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["gatelet", "gatelet/default", "gatelet/main", "gatelet/slow"]
    m = client.models.retrieve("gatelet/slow")
    assert (m.id, m.object, m.owned_by) == ("gatelet/slow", "model", "gatelet")


def test_session_stickiness_by_user(client):
    def turn(text, **kw):
        return client.chat.completions.create(
            model="gatelet", messages=[{"role": "user", "content": text}], **kw
        )

    sticky = [turn("alpha beta", user="e2e-sticky").usage.prompt_tokens for _ in range(3)]
    # Each turn sees the previous turns (2 words asked + 2 echoed) plus its own 2 words.
    assert sticky == [2, 6, 10]
    ephemeral = [turn("alpha beta").usage.prompt_tokens for _ in range(3)]
    assert ephemeral == [2, 2, 2]
    # Stickiness by header, through the SDK's extra_headers.
    hdr = [
        turn("x y z", extra_headers={"x-gatelet-session-key": "e2e-hdr"}).usage.prompt_tokens
        for _ in range(2)
    ]
    assert hdr == [3, 9]


def test_streaming_stickiness(client):
    def stream_turn(text):
        chunks = list(
            client.chat.completions.create(
                model="gatelet",
                messages=[{"role": "user", "content": text}],
                user="e2e-stream-sticky",
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        return chunks[-1].usage.prompt_tokens

    assert [stream_turn("p q"), stream_turn("r")] == [2, 5]


def test_backend_error_before_stream_is_a_real_status(start_gateway):
    gw = start_gateway(
        config_text(extra="agents: { list: [ { id: 'up', backend: { kind: 'openai', baseUrl: 'http://127.0.0.1:1/v1' } } ] }")
    )
    c = gw.client()
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as e:
            r = c.chat.completions.create(
                model="gatelet", messages=[{"role": "user", "content": "x"}], stream=stream
            )
            list(r) if stream else r
        assert e.value.status_code == 502
        assert e.value.code == "backend_error"


def test_timeout_mid_stream_raises_api_error(start_gateway):
    gw = start_gateway(
        config_text(
            extra="agents: { list: [ { id: 'main', timeoutSeconds: 1, backend: { kind: 'echo', tokenDelayMs: 400 } } ] }"
        )
    )
    stream = gw.client().chat.completions.create(
        model="gatelet", messages=[{"role": "user", "content": "a b c d e f g"}], stream=True
    )
    got = []
    with pytest.raises(openai.APIError) as e:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got).startswith("a")
    assert "timed out" in str(e.value)


def test_keep_alive_comments_do_not_break_the_sdk(start_gateway):
    gw = start_gateway(
        config_text(
            gateway_extra="keepaliveSeconds: 1",
            extra="agents: { list: [ { id: 'main', backend: { kind: 'echo', tokenDelayMs: 1600 } } ] }",
        )
    )
    stream = gw.client().chat.completions.create(
        model="gatelet", messages=[{"role": "user", "content": "slow words"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "slow words"


def curl(gateway, body, *extra):
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed")
    return subprocess.run(
        [
            "curl", "-sS", "-N", "--max-time", "20",
            "-H", f"Authorization: Bearer {TOKEN}",
            "-H", "Content-Type: application/json",
            "--data-binary", "@-",
            *extra,
            f"{gateway.base_url}/chat/completions",
        ],
        input=json.dumps(body).encode(),
        capture_output=True,
        check=False,
    )


def test_curl_streaming(gateway):
    body = {"model": "gatelet/slow", "stream": True, "messages": [{"role": "user", "content": "curl sees records"}]}
    p = curl(gateway, body, "-D", "-")
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    head, _, raw = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "content-type: text/event-stream" in head.lower()
    assert "transfer-encoding: chunked" in head.lower()
    records = raw.split("\n\n")
    assert records[-1] == ""
    records = records[:-1]
    assert all(r.startswith("data: ") for r in records), records
    assert raw.endswith("data: [DONE]\n\n")
    chunks = [json.loads(r[6:]) for r in records[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "curl sees records"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_curl_http10_streaming_is_close_delimited(gateway):
    body = {"model": "gatelet", "stream": True, "messages": [{"role": "user", "content": "old style"}]}
    p = curl(gateway, body, "--http1.0", "-D", "-")
    assert p.returncode == 0, p.stderr
    head, _, raw = p.stdout.decode().partition("\r\n\r\n")
    assert "transfer-encoding" not in head.lower()
    assert "connection: close" in head.lower()
    assert raw.startswith("data: {")
    assert raw.endswith("data: [DONE]\n\n")


def test_curl_large_body_gets_100_continue(gateway):
    # curl sends `Expect: 100-continue` for bodies over 1 MiB and waits for the interim answer.
    text = "w " * 600_000
    body = {"model": "gatelet", "messages": [{"role": "user", "content": text}]}
    t0 = time.monotonic()
    p = curl(gateway, body, "-v")
    err = p.stderr.decode()
    assert p.returncode == 0, err
    assert "Expect: 100-continue" in err
    assert "HTTP/1.1 100 Continue" in err
    assert json.loads(p.stdout)["usage"]["completion_tokens"] == 600_000
    assert time.monotonic() - t0 < 15


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_tool_round_trip_with_the_echo_tool_mode(client):
    messages = [{"role": "user", "content": '/tool get_weather {"city":"Paris"}'}]
    r = client.chat.completions.create(model="gatelet", messages=messages, tools=[WEATHER_TOOL])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content is None
    (call,) = c.message.tool_calls
    assert (call.type, call.function.name) == ("function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The SDK's stream helper assembles the same call from the streamed pieces.
    with client.chat.completions.stream(model="gatelet", messages=messages, tools=[WEATHER_TOOL]) as s:
        final = s.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    messages.append(c.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny"})
    r = client.chat.completions.create(model="gatelet", messages=messages, tools=[WEATHER_TOOL])
    assert r.choices[0].message.content == "tool said: sunny"
    assert r.choices[0].finish_reason == "stop"
