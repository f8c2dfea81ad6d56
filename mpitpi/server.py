"""An OpenAI-compatible HTTP server on rank 0; the other ranks follow each request.

Rank 0 runs a threaded HTTP server. Handler threads validate requests, tokenize them and
queue them; rank 0's main thread (the engine) takes them one at a time, in arrival order,
tells the followers to start (``comm.send_command``) and runs ``generate`` with them, handing
each piece of text back to the waiting handler. Followers sleep in ``comm.wait_command``
between requests, so idle ranks do not spin.

SIGINT/SIGTERM on rank 0 (mpiexec forwards them) stop the engine between tokens: the current
and queued clients get an error, followers are told to quit, every rank exits 0. Followers
ignore those signals and leave when told.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mpitpi.errors import MpitpiError
from mpitpi.generate import Session, generate
from mpitpi.sampling import Sampler, SamplingParams

MAX_BODY = 8 * 2**20
STATIC = os.path.join(os.path.dirname(__file__), "static")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    params: SamplingParams
    stops: list[str]
    out: queue.Queue = field(default_factory=queue.Queue)   # ("text", str) / ("done", Result)
    cancelled: bool = False


# -- request validation (pure) ---------------------------------------------------------------

def _num(body, key, kind, default, lo=None, hi=None, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind is int:
        ok = ok and float(v).is_integer()
    if not ok:
        raise BadRequest(400, f"'{key}' must be {'an integer' if kind is int else 'a number'}, "
                         f"got {json.dumps(v)}.", key)
    v = kind(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise BadRequest(400, f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}.", key)
    if hi is not None and v > hi:
        raise BadRequest(400, f"'{key}' must be <= {hi}, got {v}.", key)
    return v


def parse_options(body: dict) -> dict:
    """Sampling and length options shared by both endpoints, validated."""
    stops = body.get("stop")
    if stops is None:
        stops = []
    elif isinstance(stops, str):
        stops = [stops]
    elif not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        raise BadRequest(400, "'stop' must be a string or a list of strings.", "stop")
    if len(stops) > 4:
        raise BadRequest(400, "'stop' takes at most 4 sequences.", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(400, "'stream' must be true or false.", "stream")
    if body.get("n", 1) != 1:
        raise BadRequest(400, "only 'n': 1 is supported.", "n")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise BadRequest(400, "'stream_options' must be an object.", "stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", int, None, lo=1)
    seed = body.get("seed")
    if seed is not None:
        seed = _num(body, "seed", int, None)
    return {
        "max_tokens": max_tokens, "stops": stops, "stream": stream,
        "include_usage": bool(so.get("include_usage", False)),
        "params": SamplingParams(
            temperature=_num(body, "temperature", float, 1.0, 0, 2),
            top_p=_num(body, "top_p", float, 1.0, 0, 1, lo_open=True),
            top_k=_num(body, "top_k", int, 0, 0),
            min_p=_num(body, "min_p", float, 0.0, 0, 1),
            repeat_penalty=_num(body, "repetition_penalty", float, 1.0, 0, lo_open=True),
            seed=seed),
    }


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest(400, "'messages' must be a non-empty list of {role, content} objects.",
                         "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(400, f"messages[{i}] needs a 'role' of system, user or assistant.",
                             "messages")
        content = m.get("content")
        if isinstance(content, list):   # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and
                       isinstance(c.get("text"), str) for c in content):
                raise BadRequest(400, f"messages[{i}].content: only text parts are supported.",
                                 "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise BadRequest(400, f"messages[{i}].content must be a string.", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str) or not p:
        raise BadRequest(400, "'prompt' must be a non-empty string.", "prompt")
    return p


# -- the server --------------------------------------------------------------------------------

class App:
    """Rank 0's state: the job queue, the tokenizer and what the handlers need to know."""

    def __init__(self, comm, loaded, tokenizer, model_name: str, api_key: str | None,
                 default_max_tokens: int):
        self.comm, self.loaded, self.tok = comm, loaded, tokenizer
        self.model_name, self.api_key = model_name, api_key
        self.default_max_tokens = default_max_tokens
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.created = int(time.time())

    def make_job(self, ids: list[int], opts: dict) -> Job:
        ctx, n = self.loaded.args.max_seq_len, len(ids)
        if n >= ctx:
            raise BadRequest(400, f"the prompt is {n} tokens; this model's context is {ctx}.",
                             "messages", code="context_length_exceeded")
        max_tokens = opts["max_tokens"]
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, ctx - n)
        elif n + max_tokens > ctx:
            raise BadRequest(400, f"prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds "
                             f"this model's context of {ctx} tokens.", "max_tokens",
                             code="context_length_exceeded")
        return Job(ids, max_tokens, opts["params"], opts["stops"])

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise BadRequest(503, "the server is shutting down.", kind="server_error")
        self.jobs.put(job)

    # engine: rank 0's main thread
    def serve_jobs(self) -> None:
        eos = self.loaded.args.eos_token_ids
        while not self.stopping.is_set():
            try:
                job = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if job.cancelled:
                continue
            self.comm.send_command({"op": "generate"})
            try:
                session = Session(job.ids, job.max_tokens, Sampler(job.params), eos,
                                  self.tok.decode, job.stops,
                                  on_text=lambda t: job.out.put(("text", t)),
                                  cancel=lambda: job.cancelled or self.stopping.is_set())
                res = generate(self.comm, self.loaded.model, session)
            except BaseException as e:
                job.out.put(("error", e))
                raise
            job.out.put(("done", res))
        while True:   # fail whoever is still queued
            try:
                self.jobs.get_nowait().out.put(("error", "the server is shutting down"))
            except queue.Empty:
                break
        self.comm.send_command({"op": "quit"})


def follow(comm, loaded) -> None:
    """Ranks other than 0: run each generation rank 0 starts, until told to quit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # rank 0 leads the shutdown
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        cmd = comm.wait_command()
        if cmd["op"] == "quit":
            return
        generate(comm, loaded.model, None)


def make_handler(app: App):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "mpitpi"

        def log_message(self, fmt, *args):   # quiet: one line per request on stderr
            sys.stderr.write(f"[serve] {self.address_string()} {fmt % args}\n")

        def _send_json(self, status: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: BadRequest) -> None:
            self._send_json(e.status, e.body())

        def _auth(self) -> None:
            if app.api_key and self.headers.get("Authorization") != f"Bearer {app.api_key}":
                raise BadRequest(401, "missing or wrong API key: send 'Authorization: Bearer "
                                 "KEY'.", kind="authentication_error", code="invalid_api_key")

        def do_GET(self):
            try:
                path = self.path.split("?")[0]
                if path == "/health":
                    return self._send_json(200, {"status": "ok", "ranks": app.comm.size})
                if path in ("/", "/index.html"):
                    with open(os.path.join(STATIC, "chat.html"), "rb") as f:
                        data = f.read()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                if path == "/v1/models":
                    self._auth()
                    return self._send_json(200, {"object": "list", "data": [{
                        "id": app.model_name, "object": "model", "created": app.created,
                        "owned_by": "mpitpi"}]})
                raise BadRequest(404, f"no such path: GET {path}", kind="not_found_error")
            except BadRequest as e:
                self._error(e)

        def _body(self) -> dict:
            try:
                n = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                raise BadRequest(400, "bad Content-Length header.")
            if n > MAX_BODY:
                raise BadRequest(413, f"request body over {MAX_BODY} bytes.")
            raw = self.rfile.read(n)
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise BadRequest(400, f"the request body is not valid JSON: {e}.")
            if not isinstance(body, dict):
                raise BadRequest(400, "the request body must be a JSON object.")
            return body

        def do_POST(self):
            path = self.path.split("?")[0]
            try:
                if path not in ("/v1/chat/completions", "/v1/completions"):
                    raise BadRequest(404, f"no such path: POST {path}", kind="not_found_error")
                self._auth()
                body = self._body()
                model = body.get("model")
                if model is not None and model != app.model_name:
                    raise BadRequest(404, f"model {model!r} is not served here; this server "
                                     f"serves {app.model_name!r}.", "model",
                                     code="model_not_found")
                opts = parse_options(body)
                chat = path == "/v1/chat/completions"
                try:
                    ids = (app.tok.encode_chat(parse_messages(body)) if chat
                           else app.tok.encode(parse_prompt(body)))
                except MpitpiError as e:
                    raise BadRequest(400, str(e))
                job = app.make_job(ids, opts)
                app.submit(job)
            except BadRequest as e:
                self.close_connection = True
                return self._error(e)
            self._respond(job, opts, chat)

        def _respond(self, job: Job, opts: dict, chat: bool) -> None:
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
            kind = "chat.completion" if chat else "text_completion"
            base = {"id": rid, "created": int(time.time()), "model": app.model_name}
            if not opts["stream"]:
                parts, res = [], None
                while True:
                    what, val = job.out.get()
                    if what == "text":
                        parts.append(val)
                    elif what == "done":
                        res = val
                        break
                    else:
                        return self._error(BadRequest(503, f"generation failed: {val}",
                                                      kind="server_error"))
                if res.finish_reason == "cancelled":
                    return self._error(BadRequest(503, "the server is shutting down.",
                                                  kind="server_error"))
                text = res.text
                choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": res.finish_reason} if chat else
                          {"index": 0, "text": text, "logprobs": None,
                           "finish_reason": res.finish_reason})
                return self._send_json(200, {**base, "object": kind, "choices": [choice],
                                             "usage": _usage(res), "timings": _timings(res)})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            kind += ".chunk" if chat else ""
            try:
                if chat:
                    self._event({**base, "object": kind, "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""},
                         "finish_reason": None}]})
                while True:
                    what, val = job.out.get()
                    if what == "text":
                        delta = ({"delta": {"content": val}} if chat
                                 else {"text": val, "logprobs": None})
                        self._event({**base, "object": kind, "choices": [
                            {"index": 0, **delta, "finish_reason": None}]})
                    elif what == "done":
                        if val.finish_reason == "cancelled":
                            self._event({"error": {"message": "the server is shutting down.",
                                                   "type": "server_error"}})
                            break
                        end = ({"delta": {}} if chat else {"text": "", "logprobs": None})
                        self._event({**base, "object": kind, "choices": [
                            {"index": 0, **end, "finish_reason": val.finish_reason}],
                            "timings": _timings(val)})
                        if opts["include_usage"]:
                            self._event({**base, "object": kind, "choices": [],
                                         "usage": _usage(val)})
                        break
                    else:
                        self._event({"error": {"message": f"generation failed: {val}",
                                               "type": "server_error"}})
                        break
                self._chunk(b"data: [DONE]\n\n")
                self._chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                job.cancelled = True            # the engine stops at the next token
                self.close_connection = True

        def _event(self, obj: dict) -> None:
            self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

        def _chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


def _usage(res) -> dict:
    n = len(res.token_ids)
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": n,
            "total_tokens": res.prompt_tokens + n}


def _timings(res) -> dict:
    return {"ttft_ms": round(res.ttft_ms, 1), "ms_per_token": round(res.ms_per_token, 2)}


@dataclass
class ServeOptions:
    name: str                       # the model's id in the API
    host: str = "127.0.0.1"
    port: int = 8000                # 0: any free port
    api_key: str | None = None
    default_max_tokens: int = 512   # completion length when a request gives none
    cors_origins: list[str] = field(default_factory=list)


def serve(comm, loaded, tokenizer, opts: ServeOptions) -> None:
    """Collective: rank 0 serves HTTP until SIGINT/SIGTERM; the others follow."""
    model_name, host, port = opts.name, opts.host, opts.port
    app = App(comm, loaded, tokenizer, model_name, opts.api_key, opts.default_max_tokens)
    bound = {}

    def bind():
        try:
            bound["httpd"] = ThreadingHTTPServer((host, port), make_handler(app))
        except OSError as e:
            raise MpitpiError(f"cannot listen on {host}:{port}: {e.strerror}. Fix: choose "
                              f"another --port, or stop what uses this one.")
    comm.root_checked(bind)
    if comm.rank != 0:
        return follow(comm, loaded)
    httpd = bound["httpd"]
    httpd.daemon_threads = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: app.stopping.set())
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    print(f"mpitpi: serving {model_name} on {comm.size} ranks at "
          f"http://{host}:{httpd.server_address[1]}/ (OpenAI API under /v1)", flush=True)
    try:
        app.serve_jobs()
    finally:
        httpd.shutdown()
        httpd.server_close()
    print("mpitpi: server stopped", file=sys.stderr, flush=True)
