#!/usr/bin/env python3
"""JSON events on stdout: echoes the last user message word by word, then usage and finish."""
import json
import sys

run = json.load(sys.stdin)
last = [m["content"] for m in run["messages"] if m["role"] == "user"][-1]
words = last.split(" ")
for i, w in enumerate(words):
    print(json.dumps({"delta": w if i == 0 else " " + w}), flush=True)
print(json.dumps({"usage": {"prompt_tokens": 11, "completion_tokens": len(words)}}), flush=True)
print(json.dumps({"finish": "length" if run["options"]["maxTokens"] else "stop"}), flush=True)
