#!/usr/bin/env python3
"""A scripted tool-calling "model" for the command backend. The last user message says what to do:
  inspect              -> reply with the offered tool names and the last user message's parts
  call NAME ARGS       -> call NAME with ARGS (JSON), then answer "final: <tool result>"
  calls [[N, A], ...]  -> several calls at once, then answer with every tool result
  loop NAME            -> call NAME again after every result, without end
"""
import json
import sys

run = json.load(sys.stdin)
msgs = run["messages"]
user = [m for m in msgs if m["role"] == "user"][-1]
text = user["content"]
last = msgs[-1]
verb, _, rest = text.partition(" ")


def call(name, args, n):
    print(json.dumps({"tool_call": {"id": "call_m%d_%d" % (len(msgs), n), "name": name, "arguments": args}}), flush=True)


if verb == "inspect":
    names = [t["function"]["name"] for t in run.get("tools", [])]
    print(json.dumps({"delta": json.dumps({"tools": names, "parts": user.get("parts"), "toolChoice": run.get("toolChoice")})}))
elif verb == "loop":
    call(rest, "{}", 0)
elif last["role"] == "tool":
    results = [m["content"] for m in msgs[msgs.index(user):] if m["role"] == "tool"]
    print(json.dumps({"delta": "final: " + " | ".join(results)}))
elif verb == "call":
    name, _, args = rest.partition(" ")
    call(name, args or "{}", 0)
elif verb == "calls":
    for i, (name, args) in enumerate(json.loads(rest)):
        call(name, args, i)
else:
    print(text)
