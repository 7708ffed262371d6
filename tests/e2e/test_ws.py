"""End-to-end: the WebSocket gateway protocol (SPEC §8) with a real client library (`websockets`).

Gateways come from conftest's `start_gateway` (the binary on a free port, own state dir).
"""

import asyncio
import json
import urllib.request

import pytest
import websockets
from conftest import TOKEN, config_text


def ws_gateway(start_gateway, extra=""):
    gw = start_gateway(config_text(extra=extra))
    gw.url = f"ws://127.0.0.1:{gw.port}/"
    return gw


@pytest.fixture
def gw(start_gateway):
    return ws_gateway(start_gateway)


@pytest.fixture
def slow_gw(start_gateway):
    return ws_gateway(start_gateway, "agents: { defaults: { backend: { kind: 'echo', tokenDelayMs: 150 } } }")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Client:
    """A protocol-3 client written from SPEC §8 alone."""

    def __init__(self, ws):
        self.ws = ws
        self.n = 0
        self.events = []
        self.pending = []

    @classmethod
    async def connect(cls, url, token=TOKEN):
        ws = await websockets.connect(url, max_size=None)
        c = cls(ws)
        challenge = json.loads(await ws.recv())
        assert challenge["type"] == "event" and challenge["event"] == "connect.challenge"
        assert challenge["payload"]["nonce"]
        hello = await c.call(
            "connect",
            {
                "minProtocol": 3,
                "maxProtocol": 3,
                "client": {"id": "e2e", "version": "1.0", "platform": "python", "mode": "test"},
                "auth": {"token": token},
            },
        )
        return c, hello

    async def send(self, method, params=None):
        self.n += 1
        rid = f"r{self.n}"
        await self.ws.send(json.dumps({"type": "req", "id": rid, "method": method, "params": params or {}}))
        return rid

    async def res(self, rid):
        for i, f in enumerate(self.pending):
            if f["id"] == rid:
                return self.pending.pop(i)
        while True:
            f = json.loads(await self.ws.recv())
            if f["type"] == "event":
                self.events.append(f)
            elif f["id"] == rid:
                return f
            else:
                self.pending.append(f)

    async def call(self, method, params=None):
        return await self.res(await self.send(method, params))

    async def event(self, pred):
        for e in self.events:
            if pred(e):
                return e
        while True:
            f = json.loads(await self.ws.recv())
            if f["type"] == "event":
                self.events.append(f)
                if pred(f):
                    return f
            else:
                self.pending.append(f)


def test_connect_hello_ok(gw):
    async def t():
        c, hello = await Client.connect(gw.url)
        assert hello["ok"] is True
        p = hello["payload"]
        assert p["type"] == "hello-ok" and p["protocol"] == 3
        assert "agent" in p["features"]["methods"] and "agent" in p["features"]["events"]
        assert p["policy"]["tickIntervalMs"] == 30000
        h = await c.call("health")
        assert h["ok"] and h["payload"]["ok"] is True
        await c.ws.close()

    run(t())


def test_bad_auth_is_refused_and_closed_1008(gw):
    async def t():
        c, hello = await Client.connect(gw.url, token="wrong")
        assert hello["ok"] is False and hello["error"]["code"] == "UNAUTHORIZED"
        with pytest.raises(websockets.ConnectionClosed) as info:
            await c.ws.recv()
        assert info.value.rcvd.code == 1008

    run(t())


def test_agent_run_streams_events_and_final_answer(gw):
    async def t():
        c, _ = await Client.connect(gw.url)
        rid = await c.send("agent", {"message": "the quick brown fox", "sessionKey": "e2e"})
        first = await c.res(rid)
        assert first["ok"] and first["payload"]["status"] == "accepted"
        run_id = first["payload"]["runId"]
        final = await c.res(rid)
        assert final["ok"] and final["payload"]["status"] == "ok"
        assert final["payload"]["runId"] == run_id
        assert final["payload"]["result"]["text"] == "the quick brown fox"
        evs = [e["payload"] for e in c.events if e["event"] == "agent" and e["payload"]["runId"] == run_id]
        assistant = [e["data"] for e in evs if e["stream"] == "assistant"]
        assert "".join(d["delta"] for d in assistant) == "the quick brown fox"
        assert assistant[-1]["text"] == "the quick brown fox"
        assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
        assert evs[0]["stream"] == "lifecycle" and evs[-1]["data"]["phase"] == "end"
        await c.ws.close()

    run(t())


def test_same_port_serves_http_and_ws(gw):
    async def t():
        c, _ = await Client.connect(gw.url)
        await c.ws.close()

    run(t())
    req = urllib.request.Request(
        f"http://127.0.0.1:{gw.port}/v1/chat/completions",
        data=json.dumps({"model": "gatelet", "messages": [{"role": "user", "content": "over http"}]}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert json.load(r)["choices"][0]["message"]["content"] == "over http"


def test_chat_abort(slow_gw):
    async def t():
        c, _ = await Client.connect(slow_gw.url)
        words = " ".join(f"w{i}" for i in range(60))
        sent = await c.call("chat.send", {"sessionKey": "abortme", "message": words})
        assert sent["ok"] and sent["payload"]["status"] == "started"
        run_id = sent["payload"]["runId"]
        await c.event(lambda e: e["event"] == "chat" and e["payload"]["state"] == "delta")
        ab = await c.call("chat.abort", {"sessionKey": "abortme"})
        assert ab["ok"] and ab["payload"]["aborted"] is True and ab["payload"]["runIds"] == [run_id]
        end = await c.event(lambda e: e["event"] == "chat" and e["payload"]["state"] in ("aborted", "final"))
        assert end["payload"]["state"] == "aborted"
        text = end["payload"]["message"]["content"][0]["text"]
        assert words.startswith(text) and text != words
        hist = await c.call("chat.history", {"sessionKey": "abortme"})
        assert hist["payload"]["messages"][-1]["aborted"] is True
        await c.ws.close()

    run(t())


def test_sessions_list_after_a_run(gw):
    async def t():
        c, _ = await Client.connect(gw.url)
        rid = await c.send("agent", {"message": "remember me", "sessionKey": "listed"})
        await c.res(rid)
        final = await c.res(rid)
        assert final["payload"]["status"] == "ok"
        lst = await c.call("sessions.list")
        keys = [s["key"] for s in lst["payload"]["sessions"]]
        assert keys == ["agent:main:listed"]
        s = lst["payload"]["sessions"][0]
        assert s["agentId"] == "main" and s["updatedAt"] > 0
        assert s["outputTokens"] == 2 and s["totalTokens"] == s["inputTokens"] + 2
        await c.ws.close()

    run(t())


def test_many_runs_interleave_on_one_connection(slow_gw):
    async def t():
        c, _ = await Client.connect(slow_gw.url)
        rids = [await c.send("agent", {"message": f"run{i} a b c"}) for i in range(4)]
        firsts = [await c.res(r) for r in rids]
        finals = [await c.res(r) for r in rids]
        assert [f["payload"]["result"]["text"] for f in finals] == [f"run{i} a b c" for i in range(4)]
        order = [e["payload"]["runId"] for e in c.events if e["event"] == "agent" and e["payload"]["stream"] == "assistant"]
        run_ids = [f["payload"]["runId"] for f in firsts]
        assert set(order) == set(run_ids)
        assert order != sorted(order, key=run_ids.index), "deltas of concurrent runs interleave"
        await c.ws.close()

    run(t())
