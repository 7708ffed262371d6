"""An https:// upstream end to end: the official openai SDK talks to gatelet, whose `openai`
backend talks TLS to a local OpenAI-compatible server (Python's http.server wrapped in ssl, with
a throwaway CA and certificate made by the `openssl` command), trusted through `caFile`, with the
key from `apiKeyEnv` and extra `headers`. The TLS connection is kept alive across turns.
"""

import http.server
import json
import shutil
import ssl
import subprocess
import threading

import openai
import pytest

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def make_certs(d):
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=e2e CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    run("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost")
    (d / "leaf.ext").write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")
    return d / "ca.pem", d / "leaf.pem", d / "leaf.key"


class Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, cert, key):
        super().__init__(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.connections = 0
        self.requests = []
        self.lock = threading.Lock()

    def get_request(self):
        conn, addr = super().get_request()
        with self.lock:
            self.connections += 1
        return conn, addr


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((dict(self.headers), body))
        text = "tls says: " + body["messages"][-1]["content"]
        if not body.get("stream"):
            out = json.dumps({"id": "x", "object": "chat.completion", "created": 1, "model": body["model"],
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        records = [{"choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
                   for w in text.split(" ")]
        records[1:] = [{"choices": [{"index": 0, "delta": {"content": " " + r["choices"][0]["delta"]["content"]},
                                     "finish_reason": None}]} for r in records[1:]]
        records.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
        for r in [*(f"data: {json.dumps(r)}\n\n" for r in records), "data: [DONE]\n\n"]:
            b = r.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(b), b))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def upstream(tmp_path):
    ca, cert, key = make_certs(tmp_path)
    srv = Upstream(str(cert), str(key))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, ca
    srv.shutdown()


def test_https_upstream_with_the_openai_sdk(upstream, start_gateway, monkeypatch):
    from conftest import config_text

    srv, ca = upstream
    port = srv.server_address[1]
    monkeypatch.setenv("E2E_UPSTREAM_KEY", "sk-e2e-upstream")
    gw = start_gateway(config_text(extra=(
        "agents: { list: [ { id: 'secure', default: true, backend: { kind: 'openai', "
        f"baseUrl: 'https://localhost:{port}/v1', model: 'tiny', caFile: '{ca}', "
        "apiKeyEnv: 'E2E_UPSTREAM_KEY', headers: { 'X-Title': 'gatelet-e2e' } } } ] }"
    )))
    client = gw.client()

    r = client.chat.completions.create(model="secure", messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.content == "tls says: hello"
    assert r.choices[0].finish_reason == "stop"

    for turn in ("one", "two"):
        stream = client.chat.completions.create(
            model="secure", messages=[{"role": "user", "content": turn}], stream=True,
            stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == f"tls says: {turn}"
        assert chunks[-1].usage.total_tokens == 7

    headers, body = srv.requests[0]
    assert headers["Authorization"] == "Bearer sk-e2e-upstream"
    assert headers["X-Title"] == "gatelet-e2e"
    assert body["model"] == "tiny" and body["stream"] is True
    assert len(srv.requests) == 3
    assert srv.connections == 1, "one kept-alive TLS connection carried every turn"


def test_an_untrusted_certificate_is_a_clear_backend_error(upstream, start_gateway):
    from conftest import config_text

    srv, _ = upstream
    port = srv.server_address[1]
    gw = start_gateway(config_text(extra=(
        "agents: { list: [ { id: 'secure', default: true, backend: { kind: 'openai', "
        f"baseUrl: 'https://localhost:{port}/v1' }} }} ] }}"
    )))
    with pytest.raises(openai.APIStatusError) as e:
        gw.client().chat.completions.create(model="secure", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 502
    err = e.value.body if isinstance(e.value.body, dict) else {}
    err = err.get("error", err)
    assert err["code"] == "backend_error"
    assert "UnknownIssuer" in err["message"] and "caFile" in err["message"]
    assert srv.requests == []
