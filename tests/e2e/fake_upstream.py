"""A fake OpenAI-compatible upstream that calls tools, for end-to-end tests of gatelet's `openai`
backend with real clients.

It speaks `POST /v1/chat/completions` (streaming and not) the way OpenAI does and decides what to
answer from the conversation, deterministically:

- the last message is a `tool` message: the reply is the text `tool said: <content>` (the contents
  of all trailing tool messages joined with ` | ` when a call was parallel), like gatelet's `echo`
  tool mode;
- the request has `tools`, `tool_choice` is not `"none"`, and the last user message holds lines
  `/tool NAME JSON`: one tool call per line (index 0, 1, …), with ids `call_fake_<n>`;
- anything else: the text `fake reply: <last user text>`.

Streaming follows OpenAI's shape exactly: the first delta of each call carries
`index`/`id`/`type`/`function.name` and empty arguments, the arguments follow in pieces of at most
`piece` bytes carrying only `index` and `function.arguments`, then `finish_reason: "tool_calls"`,
the usage chunk when `stream_options.include_usage` is set, and `[DONE]`. The model named
A model whose name ends in `-json` (`fake-json`) answers with a whole `chat.completion` even when
asked to stream (some servers do). Models named `fake-broken…` make malformed calls: streamed,
arguments for a call that never got a name; whole, `tool_calls` an object instead of an array.
Models named `fake-objargs…` send each call whole with its `arguments` an object, as Ollama does.
When `gate` is set (a `threading.Event`), a streamed call waits after its first arguments piece
until the test sets it, so a test can check that piece reached the client on its own.

Every request is recorded (`requests`: path, headers, parsed body) so tests can check what
reached the upstream.
"""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOOL_PREFIX = "/tool "


def text_of(content):
    """The text of a message's `content` (a string, null, or an array of parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def parse_tool_lines(text):
    """`[(name, arguments_json)]` for each `/tool NAME JSON` line of `text`."""
    calls = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith(TOOL_PREFIX):
            continue
        name, _, args = line[len(TOOL_PREFIX):].strip().partition(" ")
        args = args.strip() or "{}"
        json.loads(args)  # a test's typo should fail loudly here, not downstream
        calls.append((name, args))
    return calls


def decide(body):
    """`("text", str)` or `("tools", [(id, name, args)])` for a request body."""
    messages = body.get("messages") or []
    trailing_tools = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        trailing_tools.append(text_of(m.get("content")))
    if trailing_tools:
        return "text", "tool said: " + " | ".join(reversed(trailing_tools))
    last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    text = text_of(last_user.get("content"))
    if body.get("tools") and body.get("tool_choice") != "none":
        calls = parse_tool_lines(text)
        if calls:
            return "tools", [(f"call_fake_{i}", n, a) for i, (n, a) in enumerate(calls)]
    return "text", "fake reply: " + text


def split(s, size):
    return [s[i:i + size] for i in range(0, len(s), size)] or [""]


class QuietServer(ThreadingHTTPServer):
    """Clients that close a kept-alive connection are normal, not worth a traceback."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeUpstream:
    """The server, on a free loopback port, in a daemon thread. `url` ends in `/v1`."""

    def __init__(self, api_key=None, piece=5, delay=0.0):
        self.api_key = api_key
        self.piece = piece
        self.delay = delay
        self.requests = []
        self.gate = None
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self.json(200, {"object": "list", "data": [
                        {"id": "fake-gpt", "object": "model", "created": 0, "owned_by": "fake"}]})
                else:
                    self.json(404, {"error": {"message": "no such path", "type": "invalid_request_error",
                                              "param": None, "code": None}})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    body = json.loads(raw)
                except ValueError:
                    return self.json(400, {"error": {"message": "body is not JSON",
                                                     "type": "invalid_request_error", "param": None,
                                                     "code": None}})
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self.json(404, {"error": {"message": "no such path",
                                                     "type": "invalid_request_error", "param": None,
                                                     "code": None}})
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    return self.json(401, {"error": {"message": "Incorrect API key provided",
                                                     "type": "invalid_request_error", "param": None,
                                                     "code": "invalid_api_key"}})
                kind, what = decide(body)
                model = body.get("model") or "fake-gpt"
                if body.get("stream") and not model.endswith("-json"):
                    self.stream(body, model, kind, what)
                else:
                    self.json(200, fake.completion(model, kind, what))

            def json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def stream(self, body, model, kind, what):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                for record in fake.records(model, kind, what, usage):
                    data = b"data: " + record + b"\n\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    if fake.delay:
                        time.sleep(fake.delay)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def reset(self):
        with self.lock:
            self.requests.clear()

    def bodies(self):
        with self.lock:
            return [r["body"] for r in self.requests]

    @staticmethod
    def usage(kind, what):
        n = len(what) if kind == "tools" else len(what.split())
        return {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}

    def completion(self, model, kind, what):
        if kind == "tools" and model.startswith("fake-broken"):
            message = {"role": "assistant", "content": None, "tool_calls": {"id": what[0][0]}}
            finish = "tool_calls"
        elif kind == "tools" and model.startswith("fake-objargs"):
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": json.loads(args)}}
                for cid, name, args in what]}
            finish = "tool_calls"
        elif kind == "tools":
            message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                for cid, name, args in what]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": what, "refusal": None}
            finish = "stop"
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": model, "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": self.usage(kind, what)}

    def records(self, model, kind, what, include_usage):
        """The SSE records' data (bytes) of a streamed answer, `[DONE]` last."""
        created = int(time.time())

        def chunk(delta, finish=None):
            c = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created,
                 "model": model, "system_fingerprint": "fp_fake",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return json.dumps(c).encode()

        if kind == "tools" and model.startswith("fake-broken"):
            yield chunk({"role": "assistant", "content": None})
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": what[0][2]}}]})
            yield chunk({}, "tool_calls")
        elif kind == "tools" and model.startswith("fake-objargs"):
            # Ollama's way: each call whole in one delta, its arguments an object.
            yield chunk({"role": "assistant", "content": None, "tool_calls": [
                {"index": i, "id": cid, "type": "function", "function": {"name": name, "arguments": json.loads(args)}}
                for i, (cid, name, args) in enumerate(what)]})
            yield chunk({}, "tool_calls")
        elif kind == "tools":
            first = True
            for index, (cid, name, args) in enumerate(what):
                head = {"index": index, "id": cid, "type": "function",
                        "function": {"name": name, "arguments": ""}}
                delta = {"tool_calls": [head]}
                if first:
                    delta = {"role": "assistant", "content": None, "tool_calls": [head], "refusal": None}
                    first = False
                yield chunk(delta)
                for n, piece in enumerate(split(args, self.piece)):
                    yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
                    if n == 0 and self.gate is not None:
                        self.gate.wait(20)
            yield chunk({}, "tool_calls")
        else:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
            words = what.split(" ")
            for i, w in enumerate(words):
                yield chunk({"content": w if i == 0 else " " + w})
            yield chunk({}, "stop")
        if include_usage:
            yield json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                              "created": created, "model": model, "system_fingerprint": "fp_fake",
                              "choices": [], "usage": self.usage(kind, what)}).encode()
        yield b"[DONE]"
