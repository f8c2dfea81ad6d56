"""The OpenAI-compatible server across 2 ranks on SmolLM2: the official client, streaming,
20 concurrent clients, disconnects, bad input, requests a browser could forge, raw HTTP
corner cases, a stalled rank, API keys and shutdown (also in the middle of a long prefill)."""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MPIEXEC, run_mpi

QUESTION = "What is the capital of France?"
# greedy SmolLM2 answers this with all 2000 tokens (about 30 s here; "Tell me a long story."
# ends after 54): a generation that is not stopped shows in the time of the next request
LONG = "Write the numbers from 1 to 300 separated by commas."
STORY = {"messages": [{"role": "user", "content": LONG}], "max_tokens": 2000, "temperature": 0}
ALLOWED = "http://localhost:3000"   # the module server's --cors-origin


class Server:
    def __init__(self, n: int = 2, extra: list[str] = (), model: str = "smollm2-135m"):
        cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpitpi", "serve", "--model",
               model, "--port", "0", *extra]
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
        status, _, got = self.exchange(method, path, body, headers, timeout)
        return status, got

    def exchange(self, method: str, path: str, body=None, headers=None, timeout=120):
        """(status, headers, body as JSON or bytes) of one request on a new connection."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        c.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                    **(headers or {})})
        r = c.getresponse()
        raw = r.read()
        c.close()
        try:
            return r.status, r.headers, json.loads(raw)
        except ValueError:
            return r.status, r.headers, raw

    def raw(self, data: bytes, timeout: float = 30) -> bytes:
        """Send ``data`` on a new socket; everything received until the server closes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out

    def post_raw(self, body: dict, version: str = "HTTP/1.1") -> socket.socket:
        """A socket on which a POST /v1/chat/completions of ``body`` has been sent."""
        data = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        s.sendall(f"POST /v1/chat/completions {version}\r\nHost: 127.0.0.1:{self.port}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                  .encode() + data)
        return s

    def rank_pid(self, rank: int) -> int:
        """The pid of rank ``rank`` (a descendant of mpiexec with PMI_RANK=rank)."""
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                except OSError:
                    continue
                children.setdefault(ppid, []).append(int(d))
        todo, found = [self.p.pid], []
        while todo:
            for c in children.get(todo.pop(), []):
                todo.append(c)
                try:
                    env = open(f"/proc/{c}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                if f"PMI_RANK={rank}".encode() in env:
                    found.append(c)
        assert len(found) == 1, found
        return found[0]

    def logged(self, text: str, timeout: float = 5) -> bool:
        """Whether the server's stderr has (or gets within ``timeout``) a line with text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.err)):
                return True
            time.sleep(0.05)
        return False

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
    s = Server(2, ["--cors-origin", ALLOWED])
    yield s
    s.kill()


def hi(s) -> None:
    """The server answers a small request."""
    ok, r = s.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok == 200 and r["usage"]["completion_tokens"] >= 1, r


def scrape(s, headers=None) -> dict:
    """{(sample name, sorted labels): value} of one GET /metrics."""
    status, got, raw = s.exchange("GET", "/metrics", headers=headers)
    assert status == 200 and got["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for fam in text_string_to_metric_families(raw.decode()) for x in fam.samples}


def gauge(s, name: str) -> float:
    """One unlabelled sample of GET /metrics."""
    return scrape(s)[(name, ())]


def stopped_early(s, before: float, bound: int = 1000) -> None:
    """Every generation has ended within 10 s, and fewer than ``bound`` tokens were
    generated since ``before`` (mpitpi_generated_tokens_total): a story that had run on
    would add its 2000, however fast the host."""
    deadline = time.monotonic() + 10
    while gauge(s, "mpitpi_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gauge(s, "mpitpi_requests_running") == 0
    assert gauge(s, "mpitpi_generated_tokens_total") - before < bound


def chat(s, question=QUESTION, max_tokens=24, **kw):
    c = s.client()
    return c.chat.completions.create(model="smollm2-135m", temperature=0, max_tokens=max_tokens,
                                     messages=[{"role": "user", "content": question}], **kw)


def test_health_models_and_page(server):
    assert server.request("GET", "/health") == (200, {"status": "ok", "ranks": 2})
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]
    status, page = server.request("GET", "/")
    assert status == 200 and b'<script src="/static/chat.js"' in page


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
    before = gauge(server, "mpitpi_generated_tokens_total")
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", "/v1/chat/completions", body=json.dumps({
        **STORY, "stream": True}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    r.fp.readline()                 # the first chunk has arrived: generation is running
    c.sock.close()
    c.close()
    t0 = time.monotonic()
    assert chat(server).choices[0].message.content == expected
    assert time.monotonic() - t0 < 10
    stopped_early(server, before)       # the story was stopped, not left to run


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
    hi(server)


def test_unknown_path_is_404(server):
    assert server.request("GET", "/v2/nothing")[0] == 404
    assert server.request("POST", "/v1/embeddings", {})[0] == 404


# sampling options that once crashed or hung the engine: each a 400 naming the field
CRASH = [
    (b'"min_p": 1', "min_p"),
    (b'"temperature": NaN', "temperature"),
    (b'"top_p": NaN', "top_p"),
    (b'"repetition_penalty": NaN, "temperature": 0.7', "repetition_penalty"),
    (b'"repeat_penalty": NaN, "temperature": 0.7', "repetition_penalty"),   # llama.cpp's name
    (b'"seed": 9223372036854775808', "seed"),
    (b'"temperature": Infinity', "temperature"),
    (b'"temperature": 1e400', "temperature"),
    (b'"top_p": -Infinity', "top_p"),
    (b'"min_p": Infinity', "min_p"),
    (b'"top_k": 1e400', "top_k"),
    (b'"top_k": true', "top_k"),
    (b'"temperature": "hot"', "temperature"),
    (b'"max_tokens": Infinity', "max_tokens"),
    (b'"temperature": 10000000000000000000000000000000000000000000000000000000000000000000'
     b'000000000000000000000000000000000000000000000000000000000000000000000000000000000000'
     b'000000000000000000000000000000000000000000000000000000000000000000000000000000000000'
     b'0000000000000000000000000000000000000000000000000000000000000000000000000000000000000',
     "temperature"),
]


@pytest.mark.parametrize("option,param", CRASH, ids=[c[0].decode()[:30] for c in CRASH])
def test_crash_options_get_a_400_and_the_server_answers_the_next(server, option, param):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + option + b"}"
    got, err = server.request("POST", "/v1/chat/completions", body, timeout=30)
    assert got == 400, err
    assert err["error"]["param"] == param and err["error"]["type"] == "invalid_request_error"
    hi(server)


def test_a_tiny_temperature_and_the_largest_seed_are_valid(server):
    ok, r = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "temperature": 1e-39, "seed": 2**63 - 1}, timeout=60)
    assert ok == 200 and r["usage"]["completion_tokens"] >= 1, r


def test_forty_simultaneous_connections_are_all_answered(server):
    start = threading.Barrier(40)

    def one(_):
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        start.wait()
        c.request("GET", "/health")
        r = c.getresponse()
        r.read()
        c.close()
        return r.status
    with ThreadPoolExecutor(40) as pool:
        assert list(pool.map(one, range(40))) == [200] * 40


def post_head(server, length_lines: str) -> bytes:
    return server.raw(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      f"application/json\r\n{length_lines}\r\n".encode(), timeout=10)


def test_content_length_is_checked_before_the_body_is_read(server):
    for lines, status in [("Content-Length: -1\r\n", 400), ("Content-Length: ten\r\n", 400),
                          ("Content-Length: 1, 2\r\n", 400),
                          (f"Content-Length: {9 * 2**20}\r\n", 413),
                          ("Content-Length: 99999999999999999999\r\n", 413), ("", 411),
                          ("Transfer-Encoding: chunked\r\n", 411)]:
        out = post_head(server, lines)       # no body is sent: the answer must not wait for one
        assert out.startswith(f"HTTP/1.1 {status} ".encode()), (lines, out[:200])
        assert b'"error"' in out
    hi(server)


def test_a_non_streaming_client_that_leaves_stops_its_generation(server):
    expected = chat(server).choices[0].message.content
    before = gauge(server, "mpitpi_generated_tokens_total")
    s = server.post_raw(STORY)
    time.sleep(1)                  # generating by now
    s.close()
    t0 = time.monotonic()
    assert chat(server).choices[0].message.content == expected
    elapsed = time.monotonic() - t0
    print(f"[fault-time] next request after a non-streaming client left: {elapsed:.2f} s")
    assert elapsed < 10
    stopped_early(server, before)  # the story was stopped, not left to run


BOMBS = [
    (b"[" * 100_000, "not valid JSON"),
    (b'{"a": ' * 100_000, "not valid JSON"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    (b'{"messages": [{"role": "user", "content": "ok"}, '
     b'{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}', "surrogate"),
    (b'{"prompt": "\\ud83d"}', "surrogate"),
]


@pytest.mark.parametrize("body,words", BOMBS, ids=["deep-list", "deep-object", "surrogate",
                                                   "surrogate-part", "surrogate-prompt"])
def test_json_bombs_and_lone_surrogates_get_a_400(server, body, words):
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    got, err = server.request("POST", path, body, timeout=30)
    assert got == 400 and words in err["error"]["message"], err
    hi(server)


def test_requests_a_browser_could_forge_are_refused(server):
    msg = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        got, err = server.request("POST", "/v1/chat/completions", msg, {"Content-Type": ctype})
        assert got == 415 and "application/json" in err["error"]["message"]
    evil = {"Origin": "http://evil.example"}
    for method, path, body in [("GET", "/health", None), ("GET", "/v1/models", None),
                               ("POST", "/v1/chat/completions", msg),
                               ("OPTIONS", "/v1/chat/completions", None)]:
        got, headers, err = server.exchange(method, path, body, evil)
        assert got == 403 and "--cors-origin" in err["error"]["message"], (method, path)
        assert "Access-Control-Allow-Origin" not in headers
    own = {"Origin": f"http://127.0.0.1:{server.port}"}     # the chat page's own requests
    assert server.request("POST", "/v1/chat/completions", msg, own)[0] == 200
    got, headers, r = server.exchange("POST", "/v1/chat/completions", msg, {"Origin": ALLOWED})
    assert got == 200 and headers["Access-Control-Allow-Origin"] == ALLOWED
    got, headers, _ = server.exchange("OPTIONS", "/v1/chat/completions", None, {
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert got == 204 and headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in headers["Access-Control-Allow-Headers"]
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    got, headers, _ = server.exchange("POST", "/v1/chat/completions", msg)   # no Origin: curl
    assert got == 200 and "Access-Control-Allow-Origin" not in headers


def test_head_options_http10_and_a_hostile_path(server):
    for method in ("HEAD", "OPTIONS", "PUT", "DELETE"):
        got, headers, body = server.exchange(method, "/nowhere")
        assert got == 405 and headers["Content-Type"] == "application/json", method
        assert method == "HEAD" or "not allowed" in body["error"]["message"]
    got, headers, _ = server.exchange("HEAD", "/health")
    assert got == 200 and headers["Content-Type"] == "application/json"
    assert server.exchange("GET", "/v1/chat/completions")[0] == 405
    out = server.raw(b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 501 ") and b'"error"' in out
    # HTTP/1.0 knows no chunked encoding: the stream ends when the server closes
    s = server.post_raw({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                         "stream": True}, version="HTTP/1.0")
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    head, _, events = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" not in head.lower()
    assert events.startswith(b"data: {") and events.endswith(b"data: [DONE]\n\n")
    # raw control characters in the path reach the log escaped
    out = server.raw(b"GET /\x1b[2J\x1b]0;pwned\x07/x HTTP/1.1\r\nHost: x\r\nConnection: close"
                     b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 404 ")
    assert server.logged("\\x1b[2J\\x1b]0;pwned\\x07")
    assert not any("\x1b" in line or "\x07" in line for line in server.err)


def test_health_answers_during_a_long_prefill_that_a_leaving_client_stops(server):
    s = server.post_raw({"messages": [{"role": "user", "content": "word " * 4000}],
                         "max_tokens": 8, "temperature": 0})
    time.sleep(1.5)                # the 4000-token prefill is running on rank 0's main thread
    t0 = time.monotonic()
    got, body = server.request("GET", "/health", timeout=10)
    took = time.monotonic() - t0
    print(f"[fault-time] /health during a 4000-token prefill: {took:.3f} s")
    assert (got, body["status"]) == (200, "ok") and took < 2
    s.close()                      # cancelled between prefill chunks
    t0 = time.monotonic()
    hi(server)
    print(f"[fault-time] next request after a client left mid-prefill: "
          f"{time.monotonic() - t0:.2f} s")
    assert time.monotonic() - t0 < 30


def test_health_reports_a_rank_that_stopped_answering(server):
    follower = server.rank_pid(1)
    s = server.post_raw({**STORY, "stream": True})
    assert s.recv(100).startswith(b"HTTP/1.1 200 ")      # generating
    os.kill(follower, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20:
            got, body = server.request("GET", "/health", timeout=2)
            if got != 200:
                break
            time.sleep(0.25)
        took = time.monotonic() - t0
        print(f"[fault-time] /health says stalled after {took:.2f} s")
        assert (got, body["status"]) == (503, "stalled") and 4 < took < 15, body
        assert body["idle_s"] >= 5
    finally:
        os.kill(follower, signal.SIGCONT)
    s.close()
    hi(server)
    assert server.request("GET", "/health") == (200, {"status": "ok", "ranks": 2})


def test_sigterm_during_a_long_prefill_ends_the_server_quickly():
    s = Server(2)
    try:
        answers = []

        def ask():
            try:
                answers.append(s.request("POST", "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": "word " * 7000}],
                    "max_tokens": 16}, timeout=60)[0])
            except Exception as e:     # an error, not a hang
                answers.append(e)
        t = threading.Thread(target=ask, daemon=True)
        t.start()
        time.sleep(2)                  # well inside the 7000-token prefill
        elapsed = s.stop(signal.SIGTERM)
        print(f"[fault-time] SIGTERM during a 7000-token prefill: {elapsed:.2f} s")
        assert elapsed < 10
        t.join(timeout=10)
        assert answers and answers[0] != 200, answers
    finally:
        s.kill()


def test_sigterm_with_a_stopped_rank_ends_the_job():
    s = Server(2)
    follower = s.rank_pid(1)
    try:
        sock = s.post_raw({**STORY, "stream": True})
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
        os.kill(follower, signal.SIGSTOP)   # rank 0 now waits for it in a collective
        time.sleep(1)
        t0 = time.monotonic()
        os.kill(s.p.pid, signal.SIGTERM)
        try:
            s.p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("a stuck server outlived SIGTERM by 15 s")
        elapsed = time.monotonic() - t0
        print(f"[fault-time] SIGTERM to a server waiting for a stopped rank: {elapsed:.2f} s")
        assert elapsed < 10 and s.p.returncode != 0
    finally:
        try:
            os.kill(follower, signal.SIGCONT)
        except ProcessLookupError:
            pass
        s.kill()


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
