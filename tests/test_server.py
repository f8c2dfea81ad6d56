"""The OpenAI-compatible server across 2 ranks on SmolLM2: the official client, streaming,
20 concurrent clients, disconnects, bad input, API keys and shutdown."""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import MPIEXEC, run_mpi

QUESTION = "What is the capital of France?"


class Server:
    def __init__(self, n: int = 2, extra: list[str] = ()):
        cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpitpi", "serve", "--model",
               "smollm2-135m", "--port", "0", *extra]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, start_new_session=True)
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True).start()
        deadline = time.monotonic() + 180
        self.port = None
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.port = int(m.group(1))
                break
        if self.port is None:
            self.kill()
            pytest.fail("server did not start:\n" + "".join(self.err)[-3000:])
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, headers=None, timeout=120):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        c.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                    **(headers or {})})
        r = c.getresponse()
        raw = r.read()
        c.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw

    def client(self, key: str = "unused"):
        from openai import OpenAI
        return OpenAI(base_url=self.url + "/v1", api_key=key, timeout=120, max_retries=0)

    def stop(self, sig=signal.SIGINT, timeout: float = 10) -> float:
        t0 = time.monotonic()
        os.kill(self.p.pid, sig)
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"server still running {timeout}s after {sig.name}")
        return time.monotonic() - t0

    def kill(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server():
    s = Server(2)
    yield s
    s.kill()


def chat(s, question=QUESTION, max_tokens=24, **kw):
    c = s.client()
    return c.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=max_tokens,
                                     messages=[{"role": "user", "content": question}], **kw)


def test_health_models_and_page(server):
    assert server.request("GET", "/health") == (200, {"status": "ok", "ranks": 2})
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]
    status, page = server.request("GET", "/")
    assert status == 200 and b"/v1/chat/completions" in page and b"<script>" in page


def test_chat_matches_generate_and_counts_usage(server):
    r = chat(server)
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason == "stop"
    g = run_mpi(2, ["generate", "--model", "smollm2-135m", "--chat", "--prompt", QUESTION,
                    "--max-tokens", "24", "--json"], timeout=300)
    ref = json.loads(g.stdout)
    assert text == ref["text"]
    assert r.usage.prompt_tokens == ref["prompt_tokens"]
    assert r.usage.completion_tokens == len(ref["token_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(server):
    full = chat(server).choices[0].message.content
    pieces, finish, usage = [], None, None
    for chunk in chat(server, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(pieces) == full and finish == "stop"
    assert usage and usage.completion_tokens > 0


def test_completions_length_and_stop(server):
    c = server.client()
    r = c.completions.create(model="smollm2-135m", prompt="The capital of France is",
                             max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    text = r.choices[0].text
    word = text.strip().split()[0]
    r2 = c.completions.create(model="smollm2-135m", prompt="The capital of France is",
                              max_tokens=5, temperature=0, stop=[word])
    assert r2.choices[0].finish_reason == "stop"
    assert r2.choices[0].text == text[:text.find(word)]
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=5, temperature=0,
        stream=True) if ch.choices)
    assert streamed == text


def test_twenty_concurrent_clients_all_correct(server):
    questions = [QUESTION, "How many days are in a week?", "What color is the sky?"]
    expected = {q: chat(server, q, max_tokens=10).choices[0].message.content for q in questions}
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(lambda q: (q, chat(server, q, max_tokens=10)),
                               questions[i % 3]) for i in range(20)]
        results = [f.result(timeout=300) for f in futures]
    assert len(results) == 20
    for q, r in results:
        assert r.choices[0].message.content == expected[q]


def test_disconnect_mid_stream_does_not_disturb_the_next_request(server):
    expected = chat(server).choices[0].message.content
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/v1/chat/completions", body=json.dumps({
        "messages": [{"role": "user", "content": "Tell me a long story."}], "stream": True,
        "max_tokens": 2000, "temperature": 0}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    r.fp.readline()                 # the first chunk has arrived: generation is running
    c.sock.close()
    c.close()
    t0 = time.monotonic()
    assert chat(server).choices[0].message.content == expected
    assert time.monotonic() - t0 < 60   # far less than 2000 tokens: the story was stopped


BAD = [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "smollm2-135m"}, 400, "'messages'"),
    ({"messages": "hi"}, 400, "'messages'"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 400, "context"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, 400, "context"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, 404, "gpt-9"),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[b[2] for b in BAD])
def test_bad_input_gets_a_4xx_and_the_server_stays_up(server, body, status, words):
    got, err = server.request("POST", "/v1/chat/completions", body)
    assert got == status, err
    assert words in err["error"]["message"] and err["error"]["type"]
    ok, r = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok == 200 and r["usage"]["completion_tokens"] >= 1


def test_unknown_path_is_404(server):
    assert server.request("GET", "/v2/nothing")[0] == 404
    assert server.request("POST", "/v1/embeddings", {})[0] == 404


def test_api_key_and_shutdown_with_a_client_in_flight():
    s = Server(2, ["--api-key", "sesame"])
    try:
        from openai import AuthenticationError
        with pytest.raises(AuthenticationError):
            s.client("wrong").models.list()
        assert s.request("GET", "/v1/models")[0] == 401
        assert s.client("sesame").models.list().data[0].id == "smollm2-135m"
        # a long streaming request in flight, then SIGTERM to mpiexec
        events = []

        def stream():
            try:
                for chunk in s.client("sesame").chat.completions.create(
                        model="smollm2-135m", stream=True, max_tokens=3000,
                        messages=[{"role": "user", "content": "Tell me a long story."}]):
                    events.append(chunk)
            except Exception as e:     # an error, not a hang
                events.append(e)
        t = threading.Thread(target=stream, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while not events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert events, "no stream started"
        elapsed = s.stop(signal.SIGTERM)
        print(f"[fault-time] SIGTERM to a serving mpiexec: {elapsed:.2f} s")
        assert elapsed < 10
        t.join(timeout=10)
        assert not t.is_alive(), "the client hung"
        assert isinstance(events[-1], Exception)
    finally:
        s.kill()
