#!/usr/bin/env python3
"""A client-tool round trip with the official `openai` Python SDK, against gatelet's echo tool
mode (examples/tools/gatelet.json5): the model calls `get_weather`, this script runs it and sends
the result back, and the final answer arrives. Works the same against a real tool-calling model
behind an `openai` backend (drop the `/tool` line and ask a question instead).

    pip install openai
    python3 examples/tools/sdk_round_trip.py
"""
import json
import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("GATELET_URL", "http://127.0.0.1:18789/v1"),
                api_key=os.environ.get("GATELET_TOKEN", "dev-token"))

tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


def get_weather(city):
    return json.dumps({"city": city, "sky": "clear", "celsius": 21})


messages = [{"role": "user", "content": '/tool get_weather {"city":"Paris"}'}]
first = client.chat.completions.create(model="gatelet", messages=messages, tools=tools)
msg = first.choices[0].message
print("finish_reason:", first.choices[0].finish_reason)
for call in msg.tool_calls:
    print("call:", call.id, call.function.name, call.function.arguments)

messages.append(msg.model_dump(exclude_none=True))
for call in msg.tool_calls:
    result = get_weather(**json.loads(call.function.arguments))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})

# Streaming this time: the answer arrives as deltas.
stream = client.chat.completions.create(model="gatelet", messages=messages, tools=tools, stream=True)
answer = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
print("answer:", answer)
